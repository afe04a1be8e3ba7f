"""SWAP: Stochastic Weight Averaging in Parallel (Gupta, Akle Serrano, DeCoste, "Stochastic Weight
Averaging in Parallel: Large-Batch Training that Generalizes Well", ICLR 2020, Algorithm 1).

    Phase 1  all ranks train ONE model with synchronous data-parallel large-batch SGD
             (warm-up to a high peak LR) until the training accuracy over an epoch reaches the
             stopping accuracy (or max epochs).
    Phase 2  W workers each start from the phase-1 weights and BN buffers and train
             independently with small batches, a lower peak LR decaying to 0, and their own
             data order; no communication. Rank r trains workers r, r + world, r + 2*world, ...
    Phase 3  the W parameter vectors are averaged uniformly (an all_reduce of per-rank sums),
             the averaged model's BN statistics are recomputed with one pass over the training
             data, and it is evaluated on the test set.

Every rank runs :func:`run_swap`; it works the same under ``swap train --workers W`` (local
launch) and under ``torchrun`` across machines.
"""
from __future__ import annotations

import copy
import time
from pathlib import Path

import torch

from .. import distributed
from ..averaging import average_state_dicts, bn_buffer_names, recompute_bn
from ..checkpoint import checkpoint_exists, load_checkpoint, save_checkpoint
from ..config import Config
from ..train import train
from .common import Context
from .sgd import train_data_parallel


def run_swap(cfg: Config, run_path: str | Path, t0: float | None = None, resume: bool = False,
             model_fn=None, data=None) -> dict | None:
    """SWAP on every rank; rank 0 writes ``summary.json`` and returns the summary (others ``None``).

    With ``resume`` a finished phase 1 and finished workers are loaded from their checkpoints
    (verified against the config hash) instead of being trained again. ``model_fn`` and ``data``
    (train, test ``ImageDataset``) replace the configured model and dataset.
    """
    ctx = Context.create(cfg, run_path, t0, model_fn, data)
    d, run = ctx.dist, ctx.run
    config_hash = cfg.hash()

    # ---------------------------------------------------------------- phase 1: large-batch SGD
    model = ctx.build_model()
    p1 = cfg.phase1
    if resume and checkpoint_exists(run.checkpoint("phase1")):
        phase1 = load_checkpoint(run.checkpoint("phase1"), model, config_hash)
    else:
        out = train_data_parallel(ctx, model, phase="phase1", batch_size=p1.batch_size,
                                  micro_batch_size=p1.micro_batch_size, peak_lr=p1.peak_lr,
                                  warmup_epochs=p1.warmup_epochs, epochs=p1.max_epochs, schedule=p1.schedule,
                                  stop_acc=p1.stop_acc)
        phase1 = {"config_hash": config_hash, "phase": "phase1", "epoch": out["epoch"], "updates": out["updates"],
                  "samples": out["samples"],
                  "train_acc": out["train_acc"], "test_acc": out["test_acc"], "wall_s": out["wall_s"],
                  "stopped_early": out["stopped_early"]}
        if d.is_main:
            save_checkpoint(run.checkpoint("phase1"), model, phase1)
    distributed.barrier()

    # ---------------------------------------------------------------- phase 2: W independent workers
    p2 = cfg.phase2
    t2 = time.perf_counter()
    mine = list(range(d.rank, cfg.workers, d.world_size))
    states, workers = [], {}
    for position, w in enumerate(mine):
        worker = copy.deepcopy(model)        # phase-1 weights AND BN buffers; fresh optimizer state
        ckpt = run.checkpoint(f"worker{w}")
        if resume and checkpoint_exists(ckpt):
            workers[w] = load_checkpoint(ckpt, worker, config_hash)
        else:
            loader = ctx.loader(p2.batch_size, ("phase2", w), data_parallel=False)
            steps = len(loader)
            lr_at = ctx.schedule(p2.peak_lr, p2.warmup_epochs, p2.epochs, steps, p2.schedule)
            bar = ctx.progress(p2.epochs * steps, f"phase2 worker {w}", position=d.local_rank)
            tw = time.perf_counter()
            out = train(worker, loader, ctx.optimizer(worker), lr_at, p2.epochs,
                        evaluate_fn=ctx.evaluate, eval_every=cfg.eval_every,
                        on_epoch=ctx.sink("phase2", w, p2.epochs), progress=bar)
            bar.close()
            workers[w] = {"config_hash": config_hash, "phase": "phase2", "worker": w, "epoch": out["epoch"],
                          "updates": out["updates"], "train_acc": out["train_acc"], "test_acc": out["test_acc"],
                          "wall_s": time.perf_counter() - tw}
            save_checkpoint(ckpt, worker, workers[w])
        states.append({k: v.detach().clone() for k, v in worker.state_dict().items()})
        del worker
    phase2_wall = time.perf_counter() - t2

    # ---------------------------------------------------------------- phase 3: average, recompute BN
    t3 = time.perf_counter()
    buffers = bn_buffer_names(model)
    averaged = copy.deepcopy(model)
    avg_state = averaged.state_dict()
    params = [k for k, v in avg_state.items() if v.is_floating_point() and k not in buffers]
    # Sum of this rank's workers (mean x count), summed over ranks, divided by W: the uniform mean.
    local_mean = average_state_dicts(states, buffers) if states else None
    sums = [(local_mean[k] * len(states) if states else torch.zeros_like(avg_state[k])).to(torch.float64)
            for k in params]
    distributed.all_reduce_sum_(sums)
    with torch.no_grad():
        for k, s in zip(params, sums):
            avg_state[k].copy_(s / cfg.workers)
    gathered = distributed.all_gather_objects({"workers": workers, "phase2_wall_s": phase2_wall})
    summary = None
    if d.is_main:
        bn_loader = ctx.loader(cfg.phase3.bn_batch_size, ("phase3", 0), data_parallel=False,
                               augment=cfg.phase3.bn_augment)
        recompute_bn(averaged, (x for x, _ in bn_loader.epoch(0)))
        averaged_acc = ctx.evaluate(averaged)
        phase3_wall = time.perf_counter() - t3
        all_workers = {w: m for g in gathered for w, m in g["workers"].items()}
        worker_accs = [all_workers[w]["test_acc"] for w in range(cfg.workers)]
        save_checkpoint(run.checkpoint("swap"), averaged,
                        {"config_hash": config_hash, "phase": "phase3", "workers": cfg.workers, "test_acc": averaged_acc})
        run.log({"phase": "phase3", "worker": None, "epoch": None, "test_acc": averaged_acc,
                 "phase_wall_s": phase3_wall, "wall_s": time.time() - ctx.t0})
        walls = {"phase1": phase1["wall_s"], "phase2": max(g["phase2_wall_s"] for g in gathered),
                 "phase3": phase3_wall}
        walls["total"] = sum(walls.values())
        p2_updates = [all_workers[w]["updates"] for w in range(cfg.workers)]
        summary = {
            "method": "swap", "config": cfg.name, "seed": cfg.seed, "workers": cfg.workers,
            "test_acc": {"workers": worker_accs, "workers_mean": sum(worker_accs) / len(worker_accs),
                         "averaged": averaged_acc, "phase1": phase1["test_acc"]},
            "train_acc": {"phase1": phase1["train_acc"],
                          "workers": [all_workers[w]["train_acc"] for w in range(cfg.workers)]},
            "wall_s": walls,
            "epochs": {"phase1": phase1["epoch"], "phase2": p2.epochs},
            "phase1_stopped_early": phase1["stopped_early"],
            # Updates on the critical path: phase 1 plus ONE worker's phase 2 (workers run in parallel
            # on W devices); the measure of SWAP's speed that does not depend on this machine.
            "updates": {"phase1": phase1["updates"], "phase2_per_worker": max(p2_updates),
                        "critical_path": phase1["updates"] + max(p2_updates)},
            "samples": phase1["samples"] + sum(p2_updates) * p2.batch_size,     # all workers' samples
            "batch_size": {"phase1": p1.batch_size, "phase2": p2.batch_size},
            "machine": ctx.machine(),
        }
        run.write_summary(summary)
    distributed.teardown()
    return summary
