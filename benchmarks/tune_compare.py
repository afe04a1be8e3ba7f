"""Tune the compare preset on a validation split, never on the test set.

Trains on the first 55,000 Fashion-MNIST training images and evaluates on the last 5,000
(``data.holdout=5000``) for a small grid of SWAP's phase-2 peak LR, as the paper tuned its phase-2
settings. Prints a table and writes ``benchmarks/results/tune_compare.json`` and ``.md``.

    .venv/bin/python benchmarks/tune_compare.py [--grid 0.025,0.05,0.1] [--seed 0]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", default="0.025,0.05,0.1", help="phase2.peak_lr values")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config", default="fashion_mnist_compare")
    args = ap.parse_args()
    rows = []
    for lr in [float(v) for v in args.grid.split(",")]:
        out = ROOT / "runs" / "tune" / f"lr{lr}-seed{args.seed}"
        cmd = [sys.executable, "-m", "swap.cli", "train", "--config", args.config, "--out", str(out), "--overwrite",
               "--set", "data.holdout=5000", "--set", f"phase2.peak_lr={lr}",
               "--set", "phase2.schedule=linear", "--set", "phase2.min_lr=0",   # the preset's phase 2 before #29
               "--set", f"seed={args.seed}"]
        t = time.time()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        s = json.loads((out / "summary.json").read_text())
        rows.append({"phase2.peak_lr": lr, "seed": args.seed, "val_acc_averaged": s["test_acc"]["averaged"],
                     "val_acc_workers_mean": s["test_acc"]["workers_mean"], "val_acc_best_worker": max(s["test_acc"]["workers"]),
                     "val_acc_phase1": s["test_acc"]["phase1"], "phase1_epochs": s["epochs"]["phase1"],
                     "wall_s": s["wall_s"]["total"], "command": " ".join(cmd[1:]), "elapsed_s": time.time() - t})
        print(json.dumps(rows[-1]), flush=True)
    lines = ["| phase2.peak_lr | val acc averaged | val acc mean worker | best worker | phase-1 val acc (epochs) | wall (s) |",
             "|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['phase2.peak_lr']} | {r['val_acc_averaged']:.2f} | {r['val_acc_workers_mean']:.2f} | "
              f"{r['val_acc_best_worker']:.2f} | {r['val_acc_phase1']:.2f} ({r['phase1_epochs']}) | {r['wall_s']:.0f} |" for r in rows]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "tune_compare.json").write_text(json.dumps(rows, indent=1))
    (RESULTS / "tune_compare.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
