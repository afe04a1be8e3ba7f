"""SWAP where it pays: one GPU, W phase-2 workers stacked on it (issue "the GPU path").

1. Phase-2 layout throughput: W=8 workers stacked with ``vmap`` at batch 128 each against ONE model
   at batch 1024 (the same 1024 samples per step), training samples/s through the real data path
   (loader, augmentation on the device), bf16 autocast, timed with device synchronisation
   (``swap.plan.calibrate``). Target: >= 0.8x.
2. ``swap compare`` of sgd-small, sgd-large and SWAP (phase 2 vmapped) on full Fashion-MNIST with
   ``configs/fashion_mnist_gpu.yaml``, 3 seeds. Target: SWAP within 0.1 points of sgd-small in
   <= 0.35x its wall time.
3. ``swap plan --devices 1`` against those measured runs: prediction error (target within 15%).

    .venv/bin/python benchmarks/gpu_compare.py              # on a CUDA machine, ~10 minutes
    .venv/bin/python benchmarks/gpu_compare.py --device cpu --quick   # smoke test of the script (bf16, as on a GPU)

Prints the figures and writes ``benchmarks/results/gpu_compare.json`` (+ the compare report).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

from swap.data import Augment  # noqa: E402
from swap.models import build_model  # noqa: E402
from swap.plan import Measure, calibrate  # noqa: E402
from swap.distributed import machine_info  # noqa: E402


def layout_throughput(device: torch.device, workers: int, batch: int, samples: int, amp: bool) -> dict:
    """Training samples/s of ``workers`` stacked workers at ``batch`` each against ONE model at
    ``workers x batch``, both through the real data path (loader, augmentation) with the run's
    model: :func:`swap.plan.calibrate`, which times the second epoch after a device sync."""
    how = Measure(device, samples=samples, amp_dtype=torch.bfloat16 if amp else None, channels_last=True)
    thr = calibrate(lambda: build_model("smallcnn", 10, 1), (1, 28, 28), 10, [workers * batch], how,
                    augment=Augment(2, True, 8), stacked=(workers, batch))
    out = {"one_model": thr.train[workers * batch], "vmap": thr.stacked[workers]}
    out["ratio"] = out["vmap"] / out["one_model"]
    return out


def run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True, cwd=ROOT)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny subset, 1 seed: checks the script, measures nothing")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_compare: no CUDA device here; nothing measured (use --device cpu --quick to check the script)",
              file=sys.stderr)
        return 2
    swap = str(ROOT / ".venv" / "bin" / "swap")
    results = {"machine": machine_info(device, torch.get_num_threads(), 1), "quick": args.quick}
    results["layout"] = layout_throughput(device, 8, 128, 2048 if args.quick else 65536, amp=device.type == "cuda" or args.quick)
    print(f"phase-2 layout: vmap 8 x 128 {results['layout']['vmap']:.0f} samples/s, one model x 1024 "
          f"{results['layout']['one_model']:.0f} samples/s, ratio {results['layout']['ratio']:.2f} (target >= 0.8)")

    out = ROOT / "runs" / ("gpu-compare-quick" if args.quick else "gpu-compare")
    if args.quick:
        shutil.rmtree(out, ignore_errors=True)
    settings = ["--config", "fashion_mnist_gpu", "--set", f"device={args.device}"]
    if args.quick:                   # bf16 as on a GPU (precision auto), so the smoke test takes the GPU's path
        settings += ["--set", "precision=bf16","--set", "data.train_subset=2048", "--set", "data.test_subset=500", "--set", "workers=2",
                     "--set", "phase1.max_epochs=2", "--set", "phase1.warmup_epochs=1", "--set", "phase2.epochs=1",
                     "--set", "sgd_small.epochs=1", "--set", "sgd_large.epochs=1", "--set", "sgd_large.warmup_epochs=0",
                     "--set", "phase1.batch_size=512", "--set", "sgd_large.batch_size=512"]
    seeds = 1 if args.quick else args.seeds
    t = time.time()
    run([swap, "compare", *settings, "--procs", "1", "--seeds", str(seeds), "--methods", "sgd-small,sgd-large,swap", "--out", str(out)])
    results["compare_s"] = time.time() - t
    report = json.loads((out / "report.json").read_text())
    rows = {r["method"]: r for r in report["rows"]}
    results["compare"] = {m: {"test_acc": r["test_acc"], "wall_s": r["wall_s"], "updates": r["critical_path_updates"]}
                          for m, r in rows.items()}
    small, swap_row = rows["sgd-small"], rows["swap"]
    results["swap_vs_sgd_small"] = {"acc_gap": swap_row["test_acc"]["mean"] - small["test_acc"]["mean"],
                                    "wall_ratio": swap_row["wall_s"]["mean"] / small["wall_s"]["mean"]}
    print(f"SWAP - sgd-small accuracy {results['swap_vs_sgd_small']['acc_gap']:+.2f} points (target >= -0.1), "
          f"wall ratio {results['swap_vs_sgd_small']['wall_ratio']:.2f} (target <= 0.35)")
    plan = subprocess.run([swap, "plan", *settings, "--devices", "1", "--measured", str(out)],
                          cwd=ROOT, capture_output=True, text=True, check=True)
    print(plan.stdout)
    results["plan"] = plan.stdout
    if not args.quick:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "gpu_compare.json").write_text(json.dumps(results, indent=1))
        shutil.copy(out / "report.md", RESULTS / "gpu_compare_report.md")
        print(f"wrote {RESULTS / 'gpu_compare.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
