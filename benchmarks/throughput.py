"""Throughput of our train loop against a bare PyTorch loop, the cost of phase 3, and phase-2 scaling.

1. Training samples/s: ``swap.train`` (loader with per-epoch permutation, batched augmentation,
   normalisation, micro-batches, metrics) against a bare loop (one pre-made batch already in memory;
   forward + backward + SGD step and nothing else), same model (smallcnn, channels_last), same batch,
   same threads, at the phase-1 (2048 as 8 x 256 micro-batches) and phase-2 (128) batch sizes.
   Repetitions are interleaved; medians reported.
2. Phase 3: averaging W=8 state dicts + one BN-recompute pass over 60,000 images + test evaluation,
   in seconds and as a share of a SWAP run's wall time (``--swap-run``, default runs/demo).
3. Phase-2 scaling: 2 workers x 1 epoch in 1 process (2 threads, workers in turn) against
   2 processes (1 thread each, workers in parallel).

    .venv/bin/python benchmarks/throughput.py [--reps 3]

Prints a table and writes ``benchmarks/results/throughput.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def bare_loop(model, x, y, steps: int, micro: int) -> float:
    """Samples/s of forward + backward + SGD step on a batch already in memory."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    chunks = list(zip(x.split(micro), y.split(micro)))
    t = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        for xc, yc in chunks:
            (F.cross_entropy(model(xc), yc) * (len(yc) / len(y))).backward()
        opt.step()
    return steps * len(y) / (time.perf_counter() - t)


def our_loop(model, train_set, mean, std, batch: int, micro: int, steps: int) -> float:
    """Samples/s of swap.train over ``steps`` updates of the real loader (augmentation on)."""
    from swap.data import Augment, Loader
    from swap.train import train

    loader = Loader(train_set.subset(steps * batch), batch, (0, "bench", 0), mean, std, Augment(2, True, 8),
                    channels_last=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    t = time.perf_counter()
    train(model, loader, opt, lambda s: 0.01, epochs=1, micro_batch_size=micro)
    return steps * batch / (time.perf_counter() - t)


def phase2_worker(run_dir: str, epochs: int, workers: int) -> float:
    """Rank function: train this rank's share of ``workers`` phase-2 workers; return wall seconds."""
    from swap import distributed
    from swap.context import Context
    from swap.config import load_config
    from swap.train import train

    cfg = load_config("fashion_mnist_quick", ["eval_every=100"])
    ctx = Context.create(cfg, run_dir)
    t = time.perf_counter()
    for w in range(ctx.dist.rank, workers, ctx.dist.world_size):
        model = ctx.build_model()
        loader = ctx.loader(128, ("phase2", w), data_parallel=False)
        train(model, loader, ctx.optimizer(model), lambda s: 0.05, epochs)
    wall = max(distributed.all_gather_objects(time.perf_counter() - t))
    distributed.teardown()
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--swap-run", default=str(ROOT / "runs" / "demo"))
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from swap import distributed
    from swap.averaging import average_state_dicts, bn_buffer_names, recompute_bn
    from swap.data import Loader, load_dataset
    from swap.models import build_model
    from swap.rundir import machine_info
    from swap.train import evaluate

    torch.set_num_threads(os.cpu_count() or 1)
    train_set, test_set = load_dataset("fashion-mnist")
    mean, std = train_set.channel_stats()
    results: dict = {"machine": machine_info(torch.device("cpu"), torch.get_num_threads(), 1), "loop": []}

    # 1. our loop vs the bare loop, interleaved repetitions
    for batch, micro, steps in ((2048, 256, 12), (128, 128, 200)):
        ours, bare = [], []
        for _ in range(args.reps):
            torch.manual_seed(0)
            m = build_model("smallcnn", 10, 1).to(memory_format=torch.channels_last)
            x = torch.randn(batch, 1, 28, 28).contiguous(memory_format=torch.channels_last)
            y = torch.randint(0, 10, (batch,))
            bare_loop(m, x, y, 2, micro)                       # warm-up
            bare.append(bare_loop(m, x, y, steps, micro))
            ours.append(our_loop(m, train_set, mean, std, batch, micro, steps))
        row = {"batch": batch, "micro_batch": micro, "steps": steps, "threads": torch.get_num_threads(),
               "ours_samples_per_s": statistics.median(ours), "bare_samples_per_s": statistics.median(bare),
               "ours_all": ours, "bare_all": bare}
        row["ratio"] = row["ours_samples_per_s"] / row["bare_samples_per_s"]
        results["loop"].append(row)
        print(json.dumps(row), flush=True)

    # 2. phase 3 cost
    torch.manual_seed(0)
    models = [build_model("smallcnn", 10, 1).to(memory_format=torch.channels_last) for _ in range(8)]
    t = time.perf_counter()
    avg_state = average_state_dicts([m.state_dict() for m in models], bn_buffer_names(models[0]))
    t_avg = time.perf_counter() - t
    averaged = models[0]
    averaged.load_state_dict(avg_state)
    t = time.perf_counter()
    from swap.data import Augment
    recompute_bn(averaged, (x for x, _ in Loader(train_set, 512, (0, "phase3", 0), mean, std, Augment(2, True, 8),
                                                channels_last=True).epoch(0)))
    t_bn = time.perf_counter() - t
    t = time.perf_counter()
    evaluate(averaged, test_set, mean, std, channels_last=True)
    t_eval = time.perf_counter() - t
    phase3 = {"average_s": t_avg, "bn_recompute_s": t_bn, "evaluate_s": t_eval, "total_s": t_avg + t_bn + t_eval}
    summary_path = Path(args.swap_run) / "summary.json"
    if summary_path.is_file():
        s = json.loads(summary_path.read_text())
        phase3["swap_run"] = str(args.swap_run)
        phase3["swap_run_total_s"] = s["wall_s"]["total"]
        phase3["swap_run_phase3_s"] = s["wall_s"]["phase3"]
        phase3["share_of_swap_run"] = s["wall_s"]["phase3"] / s["wall_s"]["total"]
    results["phase3"] = phase3
    print(json.dumps(phase3), flush=True)

    # 3. phase-2 scaling, 1 -> 2 processes (2 workers x 1 epoch)
    os.environ["PYTHONPATH"] = str(ROOT / "benchmarks") + os.pathsep + os.environ.get("PYTHONPATH", "")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import throughput as me  # the spawned ranks import this module by this name
    scaling = {}
    with tempfile.TemporaryDirectory() as tmp:
        for procs in (1, 2):
            walls = [distributed.launch(me.phase2_worker, procs, tmp, 1, 2) for _ in range(args.reps)]
            scaling[f"procs_{procs}_wall_s"] = statistics.median(walls)
    scaling["speedup"] = scaling["procs_1_wall_s"] / scaling["procs_2_wall_s"]
    results["phase2_scaling"] = scaling
    print(json.dumps(scaling), flush=True)

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "throughput.json").write_text(json.dumps(results, indent=1))
    print("\n| batch (micro) | ours samples/s | bare samples/s | ours / bare |\n|---:|---:|---:|---:|")
    for r in results["loop"]:
        print(f"| {r['batch']} ({r['micro_batch']}) | {r['ours_samples_per_s']:.0f} | {r['bare_samples_per_s']:.0f} | {r['ratio']:.3f} |")
    print(f"\nPhase 3: average {t_avg:.2f} s + BN recompute {t_bn:.2f} s + evaluate {t_eval:.2f} s"
          + (f"; in {phase3['swap_run']}: {phase3['swap_run_phase3_s']:.1f} s of {phase3['swap_run_total_s']:.1f} s "
             f"= {100 * phase3['share_of_swap_run']:.1f}%" if "share_of_swap_run" in phase3 else ""))
    print(f"Phase-2 scaling (2 workers x 1 epoch): 1 process {scaling['procs_1_wall_s']:.1f} s, "
          f"2 processes {scaling['procs_2_wall_s']:.1f} s, speed-up {scaling['speedup']:.2f}x")


if __name__ == "__main__":
    main()
