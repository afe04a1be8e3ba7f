"""Where SWAP's averaging pays (issue #29): a study on the validation split (``data.holdout``; the test
set is never read) of what governs the phase-2 workers' spread, and of the average's gain.

Base: ``configs/fashion_mnist_compare.yaml`` at the size of ``benchmarks/large_batch.py``'s fashion
workload (the first 20,000 training images, 4,000 of them held out as the validation split, phase 1
at batch 1024 with peak LR 0.8 to its stopping accuracy of 88.5% training accuracy, 8 workers x 2
phase-2 epochs at batch 128, phase-2 peak LR 0.05 decaying linearly to 0: the LRs chosen there on the
same split). Each setting changes one thing. For each run (one ``swap train`` run directory under
OUT/SETTING/seedS, reused when finished):

- the validation accuracy of the averaged model, of its mean and of its best worker, and the gains;
- the workers' spread: mean pairwise L2 distance of their parameter vectors, also relative to the
  norm of phase 1's final vector;
- the error barrier between workers 0 and 1: validation error of their midpoint minus the mean of
  their own errors, every point with BN statistics recomputed over 4,096 training images;
- updates on the critical path.

    .venv/bin/python benchmarks/swap_effect.py [--settings base,lr0.2,...] [--seeds 2] [--model resnet9]

Prints one row per run and the mean per setting; writes ``benchmarks/results/swap_effect.json``
(``swap_effect_resnet9.json`` with ``--model resnet9``: the paper's model, ``MODELS`` below).
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
BASE = ["data.train_subset=20000", "data.holdout=4000", "eval_every=100", "phase1.batch_size=1024",
        "phase1.peak_lr=0.8", "phase2.peak_lr=0.05", "phase2.schedule=linear", "phase2.min_lr=0",
        "phase2.layout=sequential"]
# The paper's model (issue #29, item 2): ResNet-9 at half width (1.6M parameters, 38x the small CNN's
# 43k; full width is 6.6M and ~4x slower again), sized for a 2-core CPU: 6,000 training images with
# 2,000 held out, 4 workers, phase 1 at batch 512 with the linearly scaled peak LR 0.2 (0.05 x 512 / 128).
MODELS = {
    "smallcnn": BASE,
    "resnet9": [*BASE, "data.train_subset=6000", "data.holdout=2000", "model.name=resnet9", "model.width=0.5",
                "workers=4", "phase1.batch_size=512", "phase1.peak_lr=0.2", "phase1.stop_acc=85"],
}
SETTINGS = {
    "base": [],
    "lr0.1": ["phase2.peak_lr=0.1"],
    "lr0.2": ["phase2.peak_lr=0.2"],
    "epochs4": ["phase2.epochs=4"],
    "constant": ["phase2.min_lr=0.05"],                       # linear from 0.05 to 0.05: a constant LR
    "cosine": ["phase2.schedule=cosine", "phase2.min_lr=0.005"],
    "W4": ["workers=4"],
    "W16": ["workers=16"],
    "stop86": ["phase1.stop_acc=86"],
    "stop90": ["phase1.stop_acc=90"],
    "cosine-stop90": ["phase2.schedule=cosine", "phase2.min_lr=0.005", "phase1.stop_acc=90"],
}
BN_SUBSET = 4096


def run_dir(out: Path, setting: str, seed: int) -> Path:
    return out / setting / f"seed{seed}"


def train(out: Path, setting: str, seed: int, model: str = "smallcnn") -> Path:
    """The setting's SWAP run for ``seed`` (skipped when its summary exists)."""
    path = run_dir(out, setting, seed)
    if not (path / "summary.json").exists():
        sets = [*MODELS[model], *SETTINGS[setting], f"seed={seed}"]
        cmd = [sys.executable, "-m", "swap.cli", "train", "--config", "fashion_mnist_compare", "--method", "swap",
               "--procs", "2", "--out", str(path), "--overwrite", *[a for kv in sets for a in ("--set", kv)]]
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return path


def measure(path: Path) -> dict:
    """Gains, spread and the barrier of one finished run (module docstring)."""
    import torch

    from swap.analysis.landscape import evaluate_point, flat_params
    from swap.checkpoint import load_checkpoint
    from swap.context import Context

    summary = json.loads((path / "summary.json").read_text())
    acc = summary["test_acc"]                          # the held-out split: data.holdout
    workers = acc["workers"]
    ctx = Context.from_run_dir(str(path))
    model = ctx.build_model()
    vectors = []
    for w in range(len(workers)):
        load_checkpoint(ctx.run.checkpoint(f"worker{w}"), model)
        vectors.append(flat_params(model).double())
    load_checkpoint(ctx.run.checkpoint("phase1"), model)
    phase1 = flat_params(model).double()
    pairs = [(a - b).norm().item() for a, b in itertools.combinations(vectors, 2)]
    sub = ctx.train_set.subset(BN_SUBSET)

    def error(vector):
        return evaluate_point(model, vector.float(), sub, sub, ctx.test_set, ctx.mean, ctx.std,
                              ctx.cfg.channels_last)[1]
    e0, e1, mid = error(vectors[0]), error(vectors[1]), error((vectors[0] + vectors[1]) / 2)
    averaged = acc["averaged"]
    return {"averaged": averaged, "workers_mean": statistics.mean(workers), "workers_best": max(workers),
            "gain_over_mean": averaged - statistics.mean(workers), "gain_over_best": averaged - max(workers),
            "spread_l2": statistics.mean(pairs), "spread_rel": statistics.mean(pairs) / phase1.norm().item(),
            "barrier": mid - (e0 + e1) / 2, "critical_path_updates": summary["updates"]["critical_path"],
            "phase1_epochs": summary["epochs"]["phase1"], "workers": len(workers)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--model", choices=sorted(MODELS), default="smallcnn")
    p.add_argument("--out", help="default runs/swap-effect (smallcnn), runs/swap-effect-resnet9")
    args = p.parse_args()
    suffix = "" if args.model == "smallcnn" else f"_{args.model}"
    out = Path(args.out or ROOT / "runs" / f"swap-effect{suffix.replace('_', '-')}")
    saved = RESULTS / f"swap_effect{suffix}.json"
    rows = json.loads(saved.read_text())["runs"] if saved.exists() else []
    for setting in args.settings.split(","):
        for seed in range(args.seeds):
            row = {"setting": setting, "seed": seed, **measure(train(out, setting, seed, args.model))}
            rows = [r for r in rows if (r["setting"], r["seed"]) != (setting, seed)] + [row]
            print(json.dumps(row), flush=True)
            RESULTS.mkdir(parents=True, exist_ok=True)
            saved.write_text(json.dumps({"cpu": _cpu(), "base": MODELS[args.model], "settings": SETTINGS, "runs": rows}, indent=1))
    print("| setting | seeds | averaged | - mean worker | - best worker | spread (rel.) | barrier | updates |")
    for setting in SETTINGS:
        mine = [r for r in rows if r["setting"] == setting]
        if mine:
            m = {k: statistics.mean(r[k] for r in mine) for k in ("averaged", "gain_over_mean", "gain_over_best",
                                                                  "spread_rel", "barrier", "critical_path_updates")}
            beats = sum(r["gain_over_best"] > 0 for r in mine)
            print(f"| {setting} | {len(mine)} | {m['averaged']:.2f} | {m['gain_over_mean']:+.2f} | "
                  f"{m['gain_over_best']:+.2f} ({beats}/{len(mine)}) | {m['spread_rel']:.4f} | {m['barrier']:+.2f} | "
                  f"{m['critical_path_updates']:.0f} |")


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    main()
