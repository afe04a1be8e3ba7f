"""Synchronous data-parallel minibatch SGD: the paper's "SGD (small-batch)" and "SGD (large-batch)"
baselines and, with a stopping accuracy, SWAP's phase 1 (Gupta et al., ICLR 2020, Algorithm 1).

Every rank holds the same model wrapped in DistributedDataParallel; each global batch is the
same set of samples a single process would draw (shared permutation), split evenly over ranks
and, within a rank, into micro-batches with gradient accumulation.
"""
from __future__ import annotations

import time
from pathlib import Path

from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from .. import distributed
from ..checkpoint import checkpoint_exists, load_checkpoint, save_checkpoint
from ..config import Config, check_world
from ..train import average_bn_buffers, train, unwrap
from ..context import Context
from ..methods import RunSpec


def train_data_parallel(ctx: Context, model: nn.Module, *, phase: str, batch_size: int, micro_batch_size: int,
                        epochs: int, peak_lr: float = 0.0, warmup_epochs: float = 0.0, schedule: str = "linear",
                        lr_at=None, stop_acc: float | None = None, after_epoch=None, optimizer: str = "sgd",
                        resume: bool = False) -> dict:
    """Large- or small-batch SGD over all ranks; returns the train loop's last record + ``wall_s``
    and ``samples`` (training samples processed, all ranks), counted over resumed sessions too.

    ``model`` is trained in place (DDP wraps it when there is more than one rank; BN statistics
    end identical on all ranks). LR: linear warm-up to ``peak_lr`` then decay to 0 at ``epochs``,
    or ``lr_at(step)`` if given. ``after_epoch(record)`` runs on every rank after each epoch.
    ``optimizer``: ``sgd`` or ``extrap`` (extrapolated SGD, :mod:`swap.algorithms.extrap`).

    Every ``checkpoint_every`` epochs rank 0 writes ``checkpoints/PHASE_last`` (weights, BN
    statistics averaged over ranks, optimizer state, epoch, progress). With ``resume`` the phase
    continues from it; since every data stream derives from (seed, phase, worker, epoch), the
    continued run is the uninterrupted one, bit for bit on CPU.

    Raises:
        SwapError: ``batch_size`` not divisible by the world size; a checkpoint that does not match.
    """
    cfg, d = ctx.cfg, ctx.dist
    check_world(cfg, d.world_size, batch_size, phase)
    loader = ctx.loader(batch_size, (phase, 0), data_parallel=True)
    steps = len(loader)
    lr_at = lr_at or ctx.schedule(peak_lr, warmup_epochs, epochs, steps, schedule)
    opt = ctx.optimizer(model, optimizer, (phase,))
    last = ctx.run.checkpoint(f"{phase}_last")
    start_epoch, before, partial = 0, {"updates": 0, "wall_s": 0.0}, {}
    if resume and checkpoint_exists(last):
        meta = load_checkpoint(last, model, cfg.hash(), opt)
        if meta["done"]:
            return meta["result"]
        start_epoch, before, partial = meta["epoch"], meta["progress"], meta.get("partial") or {}
    # No per-forward buffer broadcast: each rank's BN statistics follow its own micro-batches and
    # are averaged over ranks before each evaluation and at the end (train.average_bn_buffers).
    ddp = DDP(model, forward_sync_buffers=False) if d.world_size > 1 else model
    t = time.perf_counter()

    def progress(rec: dict) -> dict:
        updates = before["updates"] + rec["epoch"] * steps - (start_epoch * steps + partial.get("step", 0))
        return {"updates": updates, "wall_s": before["wall_s"] + time.perf_counter() - t}

    def checkpoint(rec: dict) -> None:
        done = rec["epoch"] == epochs or rec["stopped"]
        if not done and not (cfg.checkpoint_every and rec["epoch"] % cfg.checkpoint_every == 0):
            return
        average_bn_buffers(ddp)                       # collective: every rank is here
        if d.is_main:
            p = progress(rec)
            result = {**rec, **p, "stopped_early": rec["stopped"], "steps_per_epoch": steps,
                      "samples": p["updates"] * batch_size}
            save_checkpoint(last, model, {"config_hash": cfg.hash(), "phase": phase, "epoch": rec["epoch"],
                                          "done": done, "progress": p, "result": result}, opt)

    def interrupted(state: dict) -> None:
        """SIGINT/SIGTERM: a checkpoint mid-epoch; every rank's partial epoch totals, kept by rank 0."""
        average_bn_buffers(ddp)
        totals = distributed.all_gather_objects(state["totals"])
        if d.is_main:
            p = {"updates": before["updates"] + state["updates"], "wall_s": before["wall_s"] + time.perf_counter() - t}
            save_checkpoint(last, model, {"config_hash": cfg.hash(), "phase": phase, "epoch": state["epoch"],
                                          "done": False, "progress": p,
                                          "partial": {"step": state["step"], "totals": totals}}, opt)

    bar = ctx.progress((epochs - start_epoch) * steps - partial.get("step", 0), phase) if d.is_main else None
    out = train(ddp, loader, opt, lr_at, epochs, start_epoch=start_epoch, start_step=partial.get("step", 0),
                start_totals=partial["totals"][d.rank] if partial else None, on_interrupt=interrupted,
                micro_batch_size=micro_batch_size,
                stop_acc=stop_acc, evaluate_fn=lambda m: ctx.evaluate(m, distributed_eval=True), amp_dtype=ctx.amp,
                eval_every=cfg.eval_every, progress=bar, max_grad_norm=cfg.max_grad_norm, label=phase,
                on_epoch=_both(ctx.sink(phase, None, epochs, optimizer) if d.is_main else None,
                               _both(checkpoint, after_epoch)))
    if bar is not None:
        bar.close()
    p = progress(out)
    return {**out, **p, "steps_per_epoch": steps, "samples": p["updates"] * batch_size}


def _both(first, second):
    """One per-epoch callback calling both (either may be None)."""
    hooks = [h for h in (first, second) if h is not None]
    return (lambda rec: [h(rec) for h in hooks]) if hooks else None


def run_sgd(spec: RunSpec) -> dict | None:
    """The SGD baseline on every rank (``swap train --method sgd``); rank 0 returns the summary.

    Writes metrics, ``checkpoints/sgd`` and ``summary.json`` into the run directory; ``resume``
    continues from ``checkpoints/sgd_last``. ``spec`` as in :func:`swap.algorithms.swap.run_swap`.
    """
    ctx = Context.for_run(spec)
    cfg, resume = spec.cfg, spec.resume
    if resume:
        ctx.prune_metrics_for_resume()
    s = cfg.sgd
    model = ctx.build_model()
    out = train_data_parallel(ctx, model, phase="sgd", batch_size=s.batch_size, micro_batch_size=s.micro_batch_size,
                              peak_lr=s.peak_lr, warmup_epochs=s.warmup_epochs, epochs=s.epochs, schedule=s.schedule,
                              optimizer=s.optimizer, resume=resume)
    summary = None
    if ctx.dist.is_main:
        save_checkpoint(ctx.run.checkpoint("sgd"), unwrap(model),
                        {"config_hash": cfg.hash(), "phase": "sgd", "epoch": out["epoch"], "test_acc": out["test_acc"]})
        summary = {
            "method": "sgd", "optimizer": s.optimizer, "config": cfg.name, "seed": cfg.seed,
            "test_acc": {"final": out["test_acc"]},
            "train_acc": {"final": out["train_acc"]},
            "wall_s": {"total": out["wall_s"]},
            "epochs": {"sgd": out["epoch"]},
            "updates": {"sgd": out["updates"], "critical_path": out["updates"]},
            "samples": out["samples"],
            "batch_size": {"sgd": s.batch_size},
            "machine": ctx.machine(),
        }
        ctx.run.write_summary(summary)
    distributed.teardown()
    return summary
