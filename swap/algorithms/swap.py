"""SWAP: Stochastic Weight Averaging in Parallel (Gupta, Akle Serrano, DeCoste, "Stochastic Weight
Averaging in Parallel: Large-Batch Training that Generalizes Well", ICLR 2020, Algorithm 1).

    Phase 1  all ranks train ONE model with synchronous data-parallel large-batch SGD
             (warm-up to a high peak LR) until the training accuracy over an epoch reaches the
             stopping accuracy (or max epochs).
    Phase 2  W workers each start from the phase-1 weights and BN buffers and train
             independently with small batches, a lower peak LR decaying to 0, and their own
             data order; no communication. Rank r trains workers r, r + world, r + 2*world, ...
             each in a child process of its own (``phase2.layout: processes``), so a worker that
             dies costs only its own work: the others finish, the failure is reported, and
             ``--resume`` trains only the missing worker.
    Phase 3  the W parameter vectors are averaged uniformly (an all_reduce of per-rank sums),
             the averaged model's BN statistics are recomputed with one pass over the training
             data, and it is evaluated on the test set.

Every rank runs :func:`run_swap`; it works the same under ``swap train --workers W`` (local
launch) and under ``torchrun`` across machines.
"""
from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .. import distributed, interrupt
from ..averaging import average_state_dicts, bn_buffer_names
from ..checkpoint import checkpoint_exists, load_checkpoint, save_checkpoint
from ..config import Config, SwapError
from ..train import train
from ..context import Context
from ..methods import RunSpec
from .sgd import train_data_parallel
from .stacked import positions, train_stacked


def run_swap(spec: RunSpec) -> dict | None:
    """SWAP on every rank; rank 0 writes ``summary.json`` and returns the summary (others ``None``).

    With ``spec.resume`` a finished phase 1 and finished workers are loaded from their checkpoints
    (verified against the config hash) instead of being trained again. ``spec.model_fn`` and
    ``spec.data`` (train, test ``ImageDataset``) replace the configured model and dataset.
    """
    ctx = Context.for_run(spec)
    cfg, resume = spec.cfg, spec.resume
    d, run = ctx.dist, ctx.run
    config_hash = cfg.hash()
    if resume:
        ctx.prune_metrics_for_resume()

    # ---------------------------------------------------------------- phase 1: large-batch SGD
    model = ctx.build_model()
    p1 = cfg.phase1
    if resume and checkpoint_exists(run.checkpoint("phase1")):
        phase1 = load_checkpoint(run.checkpoint("phase1"), model, config_hash)
    else:
        out = train_data_parallel(ctx, model, phase="phase1", batch_size=p1.batch_size,
                                  micro_batch_size=p1.micro_batch_size, peak_lr=p1.peak_lr,
                                  warmup_epochs=p1.warmup_epochs, epochs=p1.max_epochs, schedule=p1.schedule,
                                  stop_acc=p1.stop_acc, optimizer=p1.optimizer, resume=resume)
        phase1 = {"config_hash": config_hash, "phase": "phase1", "epoch": out["epoch"], "updates": out["updates"],
                  "samples": out["samples"],
                  "train_acc": out["train_acc"], "test_acc": out["test_acc"], "wall_s": out["wall_s"],
                  "stopped_early": out["stopped_early"]}
        if d.is_main:
            save_checkpoint(run.checkpoint("phase1"), model, phase1)
    distributed.barrier()

    # ---------------------------------------------------------------- phase 2: W independent workers
    p2, p3 = cfg.phase2, cfg.phase3
    t2 = time.perf_counter()
    states, workers, failures = [], {}, {}
    mine = list(range(d.rank, cfg.workers, d.world_size))  # rank r trains workers r, r + world, ...
    stacked = _phase2_stacked(ctx, model, mine, resume) if p2.layout == "vmap" else {}
    for w in mine:
        worker = copy.deepcopy(model)        # phase-1 weights AND BN buffers; fresh optimizer state
        if w in stacked and isinstance(stacked[w], dict):
            load_checkpoint(run.checkpoint(f"worker{w}"), worker)
        meta = stacked.get(w) or _phase2_worker(ctx, worker, w, resume)
        if isinstance(meta, str):
            failures[w] = meta
            tqdm.write(f"[phase2 worker {w}] FAILED: {meta}", file=sys.stderr)
        else:
            workers[w] = meta
            states.append({k: v.detach().clone() for k, v in worker.state_dict().items()})
        del worker
    phase2_wall = time.perf_counter() - t2
    gathered = distributed.all_gather_objects({"workers": workers, "failures": failures, "phase2_wall_s": phase2_wall})
    failures = {w: why for g in gathered for w, why in g["failures"].items()}
    finished = sorted(w for g in gathered for w in g["workers"])
    if failures and not (p3.allow_missing_workers and finished):
        names = "; ".join(f"worker {w}: {why}" for w, why in sorted(failures.items()))
        raise SwapError(f"phase 2: {len(failures)} of {cfg.workers} workers failed ({names}); the other "
                        f"{len(finished)} finished and are kept. --resume trains only the failed ones; "
                        f"--set phase3.allow_missing_workers=true averages the {len(finished)} that finished")

    # ---------------------------------------------------------------- phase 3: average, recompute BN
    t3 = time.perf_counter()
    buffers = bn_buffer_names(model)
    averaged = copy.deepcopy(model)
    avg_state = averaged.state_dict()
    params = [k for k, v in avg_state.items() if v.is_floating_point() and k not in buffers]
    # Sum of this rank's workers (mean x count), summed over ranks, divided by the number of
    # finished workers (W unless some failed and phase3.allow_missing_workers): the uniform mean.
    local_mean = average_state_dicts(states, buffers) if states else None
    sums = [(local_mean[k] * len(states) if states else torch.zeros_like(avg_state[k])).to(torch.float64)
            for k in params]
    distributed.all_reduce_sum_(sums)
    with torch.no_grad():
        for k, s in zip(params, sums):
            avg_state[k].copy_(s / len(finished))
    summary = None
    if d.is_main:
        ctx.recompute_bn(averaged)
        averaged_acc = ctx.evaluate(averaged)
        phase3_wall = time.perf_counter() - t3
        track_s = _average_curve(ctx, model, averaged_acc, finished) if p2.track_average else 0.0
        all_workers = {w: m for g in gathered for w, m in g["workers"].items()}
        worker_accs = [all_workers[w]["test_acc"] for w in finished]
        save_checkpoint(run.checkpoint("swap"), averaged,
                        {"config_hash": config_hash, "phase": "phase3", "workers": finished, "test_acc": averaged_acc})
        run.log({"phase": "phase3", "worker": None, "epoch": None, "test_acc": averaged_acc,
                 "phase_wall_s": phase3_wall, "wall_s": time.time() - ctx.t0})
        walls = {"phase1": phase1["wall_s"], "phase2": max(g["phase2_wall_s"] for g in gathered),
                 "phase3": phase3_wall}
        walls["total"] = sum(walls.values())
        p2_updates = [all_workers[w]["updates"] for w in finished]
        summary = {
            "method": "swap", "phase1_optimizer": p1.optimizer, "config": cfg.name, "seed": cfg.seed, "workers": cfg.workers,
            # the workers whose weights were averaged; the others failed (phase3.allow_missing_workers)
            "averaged_workers": finished, "failed_workers": {str(w): why for w, why in sorted(failures.items())},
            "test_acc": {"workers": worker_accs, "workers_mean": sum(worker_accs) / len(worker_accs),
                         "averaged": averaged_acc, "phase1": phase1["test_acc"]},
            "train_acc": {"phase1": phase1["train_acc"],
                          "workers": [all_workers[w]["train_acc"] for w in finished]},
            "wall_s": walls,
            "epochs": {"phase1": phase1["epoch"], "phase2": p2.epochs},
            "phase1_stopped_early": phase1["stopped_early"],
            "analysis_s": {"track_average": track_s},        # not part of training time
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


def _phase2_stacked(ctx: Context, model, mine: list[int], resume: bool) -> dict[int, dict | str]:
    """``phase2.layout: vmap``: this rank's unfinished workers trained as one computation
    (:mod:`swap.algorithms.stacked`); {worker: metadata, or why it failed}. Workers that would
    resume from different points are left out (trained in turn by the caller)."""
    todo = [w for w in mine if not (resume and checkpoint_exists(ctx.run.checkpoint(f"worker{w}")))]
    if not todo or len(positions(ctx, todo, resume)) != 1:
        return {}
    try:
        return train_stacked(ctx, model, todo, resume)
    except (SwapError, RuntimeError) as exc:           # divergence, out of memory: all of them failed
        why = str(exc).strip().splitlines()[-1]
        for w in todo:
            ctx.run.checkpoint(f"worker{w}").with_suffix(".error").write_text(why)
        return {w: why for w in todo}


def _phase2_worker(ctx: Context, worker, w: int, resume: bool) -> dict | str:
    """Worker ``w``'s phase 2: its metadata, with ``worker`` holding its final weights, or one line
    saying why it failed (a diverged run, an exception, a killed process). Finished workers are
    loaded on ``resume``. With ``phase2.layout: processes`` it trains in a child process of this
    rank (:func:`swap.distributed.run_isolated`), so a worker that dies takes no other with it.

    Raises:
        swap.interrupt.Interrupted: SIGINT/SIGTERM (the worker's checkpoint is written first).
    """
    ckpt = ctx.run.checkpoint(f"worker{w}")
    error = ckpt.with_suffix(".error")             # why the worker failed, kept for resumes
    if resume and checkpoint_exists(ckpt):
        return load_checkpoint(ckpt, worker, ctx.cfg.hash())
    if resume and ctx.cfg.phase3.allow_missing_workers and error.is_file():
        return error.read_text()                    # failed before; averaged without it, not retrained
    if interrupt.requested():              # a stop signal arrived between two workers
        raise interrupt.Interrupted(interrupt.requested(), f"before phase2 worker {w}")
    if ctx.cfg.phase2.layout == "processes":
        start = {k: v.detach().cpu() for k, v in worker.state_dict().items()}
        data = tuple(x.to("cpu") for x in (ctx.train_set, ctx.test_set))
        why = distributed.run_isolated(_isolated_worker, (ctx.cfg, ctx.run.path, ctx.t0, w, resume, start,
                                                          ctx.model_fn, data), error,     # leaves `why` in `error`
                                         ctx.run.logs_dir / f"worker{w}.log")
        return why if why is not None else load_checkpoint(ckpt, worker, ctx.cfg.hash())
    error.unlink(missing_ok=True)
    try:
        return _train_worker(ctx, worker, w, resume)
    except (SwapError, RuntimeError) as exc:          # divergence, out of memory, ...
        why = str(exc).strip().splitlines()[-1]
        error.write_text(why)
        return why


def _isolated_worker(cfg: Config, run_path, t0: float, w: int, resume: bool, start: dict, model_fn, data) -> None:
    """Body of an isolated phase-2 worker process: rebuild the rank's context without joining the
    process group, start from the phase-1 state ``start`` and train (checkpoints go to disk)."""
    ctx = Context.create(cfg, run_path, t0, model_fn, data, join=False)
    worker = ctx.build_model()
    worker.load_state_dict(start)
    _train_worker(ctx, worker, w, resume)


def _train_worker(ctx: Context, worker, w: int, resume: bool) -> dict:
    """Phase 2 for worker ``w``: small-batch SGD on its own data order (stream ("phase2", w)), LR
    ``phase2.peak_lr`` decaying to 0, no communication. Trains ``worker`` in place,
    saves ``checkpoints/worker{w}`` and returns its metadata (epoch, updates, accuracies, wall_s).
    ``resume`` continues from ``worker{w}_last`` (end of an epoch, or mid-epoch after a signal)."""
    cfg, run, p2 = ctx.cfg, ctx.run, ctx.cfg.phase2
    config_hash = cfg.hash()
    ckpt, last = run.checkpoint(f"worker{w}"), run.checkpoint(f"worker{w}_last")
    opt = ctx.optimizer(worker)
    start_epoch, before, partial = 0, {"updates": 0, "wall_s": 0.0}, {}
    if resume and checkpoint_exists(last):            # continue this worker where it stopped
        meta = load_checkpoint(last, worker, config_hash, opt)
        start_epoch, before, partial = meta["epoch"], meta["progress"], meta.get("partial") or {}
    loader = ctx.loader(p2.batch_size, ("phase2", w), data_parallel=False)
    steps = len(loader)
    lr_at = ctx.schedule(p2.peak_lr, p2.warmup_epochs, p2.epochs, steps, p2.schedule)
    bar = ctx.progress((p2.epochs - start_epoch) * steps - partial.get("step", 0), f"phase2 worker {w}",
                       position=ctx.dist.local_rank)
    t = time.perf_counter()

    def interrupted(state: dict) -> None:            # SIGINT/SIGTERM: checkpoint mid-epoch
        progress = {"updates": before["updates"] + state["updates"],
                    "wall_s": before["wall_s"] + time.perf_counter() - t}
        save_checkpoint(last, worker, {"config_hash": config_hash, "phase": "phase2", "worker": w,
                                       "epoch": state["epoch"], "progress": progress,
                                       "partial": {"step": state["step"], "totals": state["totals"]}}, opt)

    out = train(worker, loader, opt, lr_at, p2.epochs, start_epoch=start_epoch, start_step=partial.get("step", 0),
                start_totals=partial.get("totals"), on_interrupt=interrupted,
                evaluate_fn=ctx.evaluate, eval_every=cfg.eval_every, amp_dtype=ctx.amp,
                on_epoch=_phase2_epoch_hook(ctx, worker, w, opt, before, t, steps),
                on_step=_phase2_step_hook(ctx, worker, w), progress=bar,
                max_grad_norm=cfg.max_grad_norm, label=f"phase2 worker {w}")
    bar.close()
    meta = {"config_hash": config_hash, "phase": "phase2", "worker": w, "epoch": out["epoch"],
            "updates": before["updates"] + out["updates"], "train_acc": out["train_acc"],
            "test_acc": out["test_acc"], "wall_s": before["wall_s"] + time.perf_counter() - t}
    save_checkpoint(ckpt, worker, meta)
    return meta


def _phase2_epoch_hook(ctx: Context, worker, w: int, opt, before: dict, t_start: float, steps: int):
    """Per-epoch sink of worker ``w`` (``steps`` updates per epoch); every ``checkpoint_every`` epochs a resumable checkpoint
    (``worker{w}_last``: weights, optimizer state, epoch, progress); with ``phase2.track_average``
    the worker's weights at the end of each epoch but the last (that one is the worker checkpoint)."""
    cfg = ctx.cfg
    sink = ctx.sink("phase2", w, cfg.phase2.epochs)

    def hook(record: dict) -> None:
        sink(record)
        epoch = record["epoch"]
        if cfg.phase2.track_average and epoch < cfg.phase2.epochs:
            save_checkpoint(ctx.run.checkpoint(f"track/worker{w}_epoch{epoch}"), worker, {"worker": w, "epoch": epoch})
        if cfg.checkpoint_every and epoch % cfg.checkpoint_every == 0 and epoch < cfg.phase2.epochs:
            progress = {"updates": epoch * steps, "wall_s": before["wall_s"] + time.perf_counter() - t_start}
            save_checkpoint(ctx.run.checkpoint(f"worker{w}_last"), worker,
                            {"config_hash": cfg.hash(), "phase": "phase2", "worker": w, "epoch": epoch,
                             "progress": progress}, opt)
    return hook


def _phase2_step_hook(ctx: Context, worker, w: int):
    """With ``phase2.save_every = K``: save worker ``w``'s iterate every K updates (and its start)."""
    k = ctx.cfg.phase2.save_every
    if not k:
        return None
    save_checkpoint(ctx.run.checkpoint(f"iterates/worker{w}_step0"), worker, {"worker": w, "step": 0})

    def hook(step: int) -> None:
        if step % k == 0:
            save_checkpoint(ctx.run.checkpoint(f"iterates/worker{w}_step{step}"), worker, {"worker": w, "step": step})
    return hook


def _average_curve(ctx: Context, template, final_acc: float, finished: list[int]) -> float:
    """Test accuracy of the average of the ``finished`` workers (BN recomputed) at each phase-2 epoch, logged as
    ``phase: average`` records at the slowest worker's time for that epoch (SWAP paper Fig. 1).
    Returns the seconds it cost; each record carries its own ``cost_s``."""
    cfg, run = ctx.cfg, ctx.run
    records = [r for r in run.read_metrics() if r["phase"] == "phase2"]
    buffers = bn_buffer_names(template)
    total = 0.0
    for epoch in range(1, cfg.phase2.epochs + 1):
        t = time.perf_counter()
        wall = max(r["wall_s"] for r in records if r["epoch"] == epoch)
        if epoch == cfg.phase2.epochs:                     # the final SWAP model, already evaluated
            acc = final_acc
        else:
            states = []
            for w in finished:
                m = copy.deepcopy(template)
                load_checkpoint(run.checkpoint(f"track/worker{w}_epoch{epoch}"), m)
                states.append(m.state_dict())
            averaged = copy.deepcopy(template)
            averaged.load_state_dict(average_state_dicts(states, buffers))
            ctx.recompute_bn(averaged)
            acc = ctx.evaluate(averaged)
        cost = time.perf_counter() - t
        total += cost
        run.log({"phase": "average", "worker": None, "epoch": epoch, "test_acc": acc, "wall_s": wall, "cost_s": cost})
    return total
