"""Cost of one extrapolated-SGD update relative to plain SGD (Lin et al., ICML 2020).

Same model (smallcnn, channels_last), same global batch (2048 as 8 x 256 micro-batches, the phase-1
setting), same threads, real Fashion-MNIST batches through our train loop; repetitions interleaved,
medians reported. extragradient adds a forward + backward at x_t; past-gradient and gaussian add a
forward at x_t (for BN statistics and metrics). Prints a table, writes
``benchmarks/results/extrap_cost.json``.

    .venv/bin/python benchmarks/extrap_cost.py [--reps 3] [--steps 8]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=2048)
    args = ap.parse_args()
    from swap.optim.extrap import ExtrapSGD, ExtrapStep
    from swap.data import Augment, Loader, load_dataset
    from swap.models import build_model
    from swap.distributed import machine_info
    from swap.train import SGDStep, train

    torch.set_num_threads(os.cpu_count() or 1)
    train_set, _ = load_dataset("fashion-mnist")
    mean, std = train_set.channel_stats()
    subset = train_set.subset(args.steps * args.batch)
    kinds = ["sgd", "extragradient", "past-gradient", "gaussian"]
    times = {k: [] for k in kinds}
    for _ in range(args.reps):
        for kind in kinds:
            torch.manual_seed(0)
            model = build_model("smallcnn", 10, 1).to(memory_format=torch.channels_last)
            opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
            if kind != "sgd":
                opt = ExtrapSGD(opt, kind, 1.0, 0.01, torch.Generator().manual_seed(0))
            loader = Loader(subset, args.batch, (0, "bench", 0), (mean, std), Augment(2, True, 8), channels_last=True)
            t = time.perf_counter()
            step = SGDStep(model, opt, 256) if kind == "sgd" else ExtrapStep(model, opt, 256)
            train(step, loader, lambda s: 0.1, epochs=1)
            times[kind].append((time.perf_counter() - t) / args.steps)
    rows = [{"optimizer": k, "s_per_update": statistics.median(v), "all": v,
             "ratio_to_sgd": statistics.median(v) / statistics.median(times["sgd"])} for k, v in times.items()]
    result = {"machine": machine_info(torch.device("cpu"), torch.get_num_threads(), 1), "batch": args.batch,
              "micro_batch": 256, "steps": args.steps, "reps": args.reps, "rows": rows}
    (ROOT / "benchmarks" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "benchmarks" / "results" / "extrap_cost.json").write_text(json.dumps(result, indent=1))
    print(f"| optimizer | s per update (batch {args.batch}) | ratio to SGD |\n|---|---:|---:|")
    for r in rows:
        print(f"| {r['optimizer']} | {r['s_per_update']:.3f} | {r['ratio_to_sgd']:.2f} |")


if __name__ == "__main__":
    main()
