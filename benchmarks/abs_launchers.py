"""The elastic pool's resize overhead with each launcher (issue #28), measured as Yao et al. 2018
(arXiv 1810.01021) report theirs: seconds per resize and the share of the training time spent
resizing (theirs: 0.32%, ResNet-18 on ImageNet, Ray's autoscaler).

One ABSA run of ``configs/fashion_mnist_compare.yaml`` (full Fashion-MNIST, 10 epochs, batch 128 ->
2048; the pool is 1 process at batch 128, 2 from 256 on: one resize) per launcher and seed:
``abs.launcher=torch`` (torch.distributed's elastic launcher) and ``abs.launcher=ray`` (Ray actors,
a local Ray started by the run). A resize is timed from the checkpoint the old group writes to the
first update of the new group (the run's ``resizes``); Ray's own start-up (``ray.init``) is
reported on its own line, outside the resizes, with the seconds all the run's actor starts took
(the resize's new actor included). The two launchers' final weights are compared bit for bit.

    .venv/bin/python benchmarks/abs_launchers.py [--seeds 2] [--out runs/abs-launchers]

Prints a table; writes ``benchmarks/results/abs_launchers.json``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
LAUNCHERS = ("torch", "ray")


def run(out: Path, launcher: str, seed: int) -> dict:
    """Train (unless finished) and return the summary plus the command's own wall seconds."""
    path = out / launcher / f"seed{seed}"
    t = time.perf_counter()
    if not (path / "summary.json").exists():
        subprocess.run([sys.executable, "-m", "swap.cli", "train", "--config", "fashion_mnist_compare", "--method", "absa",
                        "--set", f"abs.launcher={launcher}", "--set", f"seed={seed}", "--out", str(path), "--overwrite"],
                       check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    summary = json.loads((path / "summary.json").read_text())
    return {"launcher": launcher, "seed": seed, "path": str(path), "command_s": time.perf_counter() - t,
            "test_acc": summary["test_acc"]["final"], "total_s": summary["wall_s"]["total"],
            "resizes": len(summary["resizes"]), "resize_s": summary["wall_s"]["resize"],
            "resize_share": summary["resize_share"], "launcher_info": summary["launcher"]}


def same_weights(a: str, b: str) -> bool:
    import torch
    from safetensors.torch import load_file

    x, y = (load_file(str(Path(p) / "checkpoints" / "absa.safetensors")) for p in (a, b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "runs" / "abs-launchers"))
    args = p.parse_args()
    rows = []
    for seed in range(args.seeds):                   # interleaved, so machine drift spreads over both
        for launcher in LAUNCHERS:
            rows.append(run(Path(args.out), launcher, seed))
            print(json.dumps(rows[-1]), flush=True)
    equal = {seed: same_weights(*[r["path"] for r in rows if r["seed"] == seed]) for seed in range(args.seeds)}
    import torch

    from swap.distributed import machine_info
    machine = machine_info(torch.device("cpu"), 1, 2)
    result = {"machine": machine, "runs": rows, "same_weights": equal}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "abs_launchers.json").write_text(json.dumps(result, indent=1))
    print(f"\n| launcher | runs | test acc (%) | training (s) | resizes | s per resize | share of training | "
          f"Ray start (s) | actor starts, all (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for launcher in LAUNCHERS:
        mine = [r for r in rows if r["launcher"] == launcher]
        mean = lambda key: statistics.mean(r[key] for r in mine)          # noqa: E731
        per = sum(r["resize_s"] for r in mine) / max(1, sum(r["resizes"] for r in mine))
        info = [r["launcher_info"] for r in mine]
        ray = (f"{statistics.mean(i['ray_start_s'] for i in info):.1f} | "
               f"{statistics.mean(i['actor_start_s'] for i in info):.1f}") if launcher == "ray" else "- | -"
        print(f"| {launcher} | {len(mine)} | {mean('test_acc'):.2f} | {mean('total_s'):.1f} | {mean('resizes'):.0f} | "
              f"{per:.2f} | {100 * mean('resize_share'):.2f}% | {ray} |")
    print(f"\nsame final weights (torch vs ray), per seed: {equal}. {machine['cpu']}, {machine['cores']} cores, "
          f"torch {machine['torch']}")


if __name__ == "__main__":
    main()
