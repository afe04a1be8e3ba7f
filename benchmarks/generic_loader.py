"""The generic Dataset path (swap.data.generic.DatasetLoader inside swap.train.train) against a bare
DataLoader loop, on the same in-memory tensors and the same model.

Both loops read the same ``torch.utils.data.TensorDataset`` of Fashion-MNIST images (float32,
normalised, in memory) through torch's DataLoader (default collate, 0 workers): ours with our
sampler (the permutation of (seed, phase, worker, epoch), per-sample seeded RNG for transforms)
and the train loop (schedule, metrics, divergence guard, stop checks); the bare loop with
``shuffle=True`` and zero_grad / forward / backward / step only. Same model (smallcnn), same
initial weights, one untimed warm-up epoch each, then the two loops in lockstep, one update each
in turn, each side timed separately (as ``benchmarks/throughput.py``); the median and spread of the
per-epoch ratios ours / bare.

    .venv/bin/python benchmarks/generic_loader.py [--reps 5] [--batch 128] [--samples 16384]

Prints a table and writes ``benchmarks/results/generic_loader.json``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--samples", type=int, default=16384, help="training samples per epoch")
    args = ap.parse_args()
    from torch.utils.data import DataLoader, TensorDataset

    from swap.data import load_dataset
    from swap.data.generic import DatasetLoader
    from swap.models import build_model
    from swap.distributed import machine_info
    from swap.train import SGDStep
    from throughput import bare_sgd, lockstep  # benchmarks/: the lockstep timing and bare update, one copy

    train_set, _ = load_dataset("fashion-mnist", train_subset=args.samples)
    mean, std = train_set.channel_stats()
    x = (train_set.images.float() - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    data = TensorDataset(x, train_set.labels)

    def model():
        torch.manual_seed(0)
        return build_model("smallcnn", 10, 1)

    def sgd(m):
        return torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)

    ours, bare = model(), model()
    step, bare_update = SGDStep(ours, sgd(ours)), bare_sgd(bare, sgd(bare))
    loader = DatasetLoader(data, args.batch, (0, "bench", 0))
    bare_loader = DataLoader(data, batch_size=args.batch, shuffle=True, drop_last=True,
                             generator=torch.Generator().manual_seed(0))
    steps = len(loader)

    times = lockstep(step, loader, lambda epoch: bare_loader, bare_update, args.reps)
    rate = {k: [steps * args.batch / t for t in v] for k, v in times.items()}
    ratios = [o / b for o, b in zip(rate["ours"], rate["bare"])]
    result = {"machine": machine_info(torch.device("cpu"), torch.get_num_threads(), 1), "batch": args.batch,
              "steps": steps, "reps": args.reps, "ours_samples_per_s": statistics.median(rate["ours"]),
              "bare_samples_per_s": statistics.median(rate["bare"]), "ratio": statistics.median(ratios),
              "ratio_spread": (max(ratios) - min(ratios)) / statistics.median(ratios), "ratios": ratios}
    (ROOT / "benchmarks" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "benchmarks" / "results" / "generic_loader.json").write_text(json.dumps(result, indent=1))
    print("| path | batch | ours samples/s | bare DataLoader samples/s | ours / bare (median) | spread |\n"
          "|---|---:|---:|---:|---:|---:|")
    print(f"| generic Dataset | {args.batch} | {result['ours_samples_per_s']:.0f} | {result['bare_samples_per_s']:.0f} "
          f"| {result['ratio']:.3f} | {100 * result['ratio_spread']:.1f}% |")


if __name__ == "__main__":
    main()
