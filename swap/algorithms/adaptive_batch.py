"""ABS and ABSA: adaptive batch size from Hessian information, optionally with adversarial
training, on an elastic pool of data-parallel processes (Yao, Gholami, Keutzer, Mahoney, "Large
batch size training of neural networks with adversarial training and second-order information",
arXiv 1810.01021, Alg. 1).

    start      batch B = base batch, LR = peak LR (warm-up/decay shape over epochs)
    each epoch e (every ``eig_every``): lambda_e = top Hessian eigenvalue at the current weights
               (power iteration on a fixed clean sample, eval mode; swap.hessian)
               if lambda_e <= decay_ratio x reference, or ``fallback_epochs`` passed without a
               doubling: B <- 2B (capped at max_batch_factor x base), reference <- lambda_e
               LR = schedule(e) x B / base batch (linear scaling)
    ABSA       a fraction of every batch (20%, halved at each doubling, 0 after half of the
               epochs) is replaced by FGSM examples made in eval mode (swap.adversarial)
    elastic    processes = B / per_worker_batch (at most max_workers): when the batch changes the
               number, the group writes a checkpoint (weights, BN statistics, optimizer state, rule
               state) and exits; the driver starts a group of the new size through the elastic
               launcher, which restores and continues (as Ray Train's elastic mode does).

Every global batch is the set of samples a 1-process run draws (shared permutation), so a run
that resizes 1 -> 2 processes follows the same trajectory as one that never resizes.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time

import torch

from .. import distributed
from ..adversarial import AdversarialBatches
from ..checkpoint import checkpoint_exists, read_meta
from ..callbacks import OnEpoch, OnInterrupt
from ..config import Config, SwapError
from ..data import stream_seed
from ..hessian import model_top_eigenvalue
from ..rundir import RunDir
from ..schedules import epoch_shape, warmup_decay
from ..context import Context
from ..methods import RunSpec
from ..resumable import Resumable, Unit
from ..ray_pool import RankDied
from ..train import Evaluation, Guard, Position, train

_RESOLUTION = 1000          # LR-schedule steps per epoch: the shape is over epochs, whatever the batch


@dataclasses.dataclass
class BatchSizeRule:
    """The ABS batch-size rule (Yao et al. 2018, Alg. 1), as a small state machine.

    ``update(epoch, eigenvalue)`` runs at the start of each epoch: the first measured eigenvalue
    becomes the reference; afterwards the batch doubles when the eigenvalue has fallen to at most
    ``decay_ratio`` x the reference (which is then reset to it), or when ``fallback_epochs`` epochs
    passed since the last doubling; never above ``max_batch``. Batches are in samples.
    """
    batch: int
    max_batch: int
    decay_ratio: float = 0.5
    fallback_epochs: int = 10
    reference: float | None = None
    last_change: int = 0
    doublings: int = 0

    def update(self, epoch: int, eigenvalue: float | None) -> bool:
        """Apply the rule at the start of ``epoch`` (0-based) with the top eigenvalue measured at the
        current weights (``None`` when not measured this epoch); True when the batch doubled."""
        if self.reference is None:
            self.reference = eigenvalue
            return False
        flatter = eigenvalue is not None and eigenvalue <= self.decay_ratio * self.reference
        stale = self.fallback_epochs > 0 and epoch - self.last_change >= self.fallback_epochs
        if not (flatter or stale) or 2 * self.batch > self.max_batch:
            return False
        self.batch *= 2
        self.doublings += 1
        self.last_change = epoch
        if eigenvalue is not None:
            self.reference = eigenvalue
        return True


def adversarial_fraction(base: float, doublings: int, epoch: int, epochs: int) -> float:
    """ABSA's share of FGSM examples in epoch ``epoch``: ``base`` halved per doubling, 0 from half
    of the epochs on (Yao et al. 2018, Sec. 4)."""
    return 0.0 if epoch >= epochs / 2 else base / 2 ** doublings


def pool_size(batch: int, per_worker_batch: int, max_workers: int) -> int:
    """Processes for a global batch: batch / per_worker_batch, at most ``max_workers``, at least 1,
    and a divisor of ``batch`` so every rank gets an equal share."""
    n = max(1, min(max_workers, batch // per_worker_batch))
    while batch % n:
        n -= 1
    return n


def max_pool(cfg: Config) -> int:
    return cfg.abs.max_workers or cfg.procs or (os.cpu_count() or 1)


def run_abs(spec: RunSpec, adversarial: bool = False, elastic: bool = False, launcher: dict | None = None) -> dict | None:
    """ABS (or ABSA with ``adversarial``) on every rank of the current group.

    Writes metrics (one record per epoch with eigenvalue, batch_size, lr, adv_fraction,
    world_size), ``checkpoints/METHOD_last`` every ``checkpoint_every`` epochs and at a resize
    (with the rule's state: a resumable :class:`swap.resumable.Resumable`), and at the end
    ``checkpoints/METHOD`` (METHOD = abs or absa) and ``summary.json``. With ``elastic``, when the
    rule's batch calls for another number of processes the group checkpoints and every rank
    returns ``{"resize": n}``; :func:`train_abs` starts the new group. ``launcher`` (the driver's
    :meth:`swap.ray_pool.RayPool.info` and restarts) goes into the summary as it is.

    Returns:
        The summary on rank 0 (``None`` elsewhere), or ``{"resize": n}``.
    """
    ctx = Context.for_run(spec)
    if ctx.generic:
        raise SwapError("ABS/ABSA need the in-memory image path (a fixed clean sample for the Hessian, FGSM in "
                        "pixel range)")
    cfg, d, a = spec.cfg, ctx.dist, spec.cfg.abs
    method = "absa" if adversarial else "abs"
    if spec.resume:
        ctx.prune_metrics_for_resume()
    model = ctx.build_model()
    opt = ctx.optimizer(model, "abs")
    rule = BatchSizeRule(a.batch_size, a.batch_size * a.max_batch_factor, a.decay_ratio, a.fallback_epochs)
    state = {"epoch": 0, "decided": -1, "eigenvalue": None, "eig_iters": 0, "updates": 0, "samples": 0,
             "history": [], "resizes": [], "resize_from": None, "partial": {}}
    unit = Resumable(ctx.saving, [Unit(method, model, opt, {"phase": method})], epochs=a.epochs,
                     group=True)
    start = unit.restore(spec.resume)
    saved = start.result or start.meta
    if saved:
        state, rule = saved["state"], BatchSizeRule(**saved["rule"])
    step = ctx.update_step(ctx.data_parallel(model) if d.world_size > 1 else model, opt,
                           a.micro_batch_size, "abs")
    unit.sync = step.sync
    shape = warmup_decay(a.peak_lr, round(a.warmup_epochs * _RESOLUTION), a.epochs * _RESOLUTION, a.schedule)
    eig_x, eig_y = _eigen_sample(ctx)

    def saved_state() -> dict:
        """The rule's state, kept in every checkpoint of the phase."""
        return {"state": state, "rule": dataclasses.asdict(rule), "partial": state["partial"]}

    out = None
    for epoch in range(state["epoch"], a.epochs):
        if state["decided"] < epoch:                                  # the rule, once per epoch
            eig, iters = _eigenvalue(ctx, model, eig_x, eig_y, epoch) if epoch % a.eig_every == 0 else (None, 0)
            rule.update(epoch, eig)
            state.update(decided=epoch, eigenvalue=eig, eig_iters=iters)
            want = pool_size(rule.batch, a.per_worker_batch, max_pool(cfg))
            if elastic and want != d.world_size:                      # resize: checkpoint, new group
                state["resize_from"] = {"time": time.time(), "epoch": epoch, "from": d.world_size, "to": want}
                unit.save(epoch, state["updates"] - start.updates, extra=saved_state())
                distributed.teardown()
                return {"resize": want}
        if state["resize_from"] is not None:                          # first update after a resize
            r = state["resize_from"]                                  # (a pool restarted meanwhile: not timed)
            seconds = None if (launcher or {}).get("restarted") else time.time() - r["time"]
            state["resizes"].append({**r, "seconds": seconds})
            state["resize_from"] = None
        fraction = adversarial_fraction(a.adv_fraction, rule.doublings, epoch, a.epochs) if adversarial else 0.0
        loader, lr_at = _epoch_batches(ctx, model, rule.batch, fraction, shape)
        steps = len(loader)
        extra = {"eigenvalue": state["eigenvalue"], "eig_iters": state["eig_iters"], "adv_fraction": fraction,
                 "world_size": d.world_size, "doublings": rule.doublings}
        sink = ctx.sink(method, None, a.epochs) if d.is_main else None

        def on_epoch(rec: dict) -> None:
            state["history"].append({"epoch": rec["epoch"], "batch_size": rec["batch_size"], "lr": rec["lr"],
                                     "train_acc": rec["train_acc"], "test_acc": rec["test_acc"], **extra})
            if sink is not None:               # the pool's updates so far (its batch changes between epochs)
                sink({**rec, **extra, "update": state["updates"] + steps - first})

        def on_interrupt(stop: dict) -> None:                         # SIGINT/SIGTERM mid-epoch
            state["updates"] += stop["updates"]
            unit.interrupted(stop, extra=saved_state())

        first, totals = (start.step, start.totals) if epoch == start.epoch else (0, None)

        def on_log(rec: dict, offset: int = epoch_shape(loader, epoch)[0], first: int = first) -> None:
            # the pool's updates so far: its batch, so its updates per epoch, change between epochs
            sink.step({**rec, **extra, "update": state["updates"] + rec["update"] - offset - first})
        out = train(step, loader, lr_at, epochs=epoch + 1, start=Position(epoch, first, totals),
                    evaluate=Evaluation(lambda m: ctx.evaluate(m, distributed_eval=True), cfg.eval_every),
                    callbacks=[OnEpoch(on_epoch), *(ctx.step_log(on_log) if sink is not None else ()),
                               OnInterrupt(on_interrupt)],
                    guard=Guard(cfg.divergence_grad_norm, method))
        state.update(epoch=epoch + 1, partial={}, updates=state["updates"] + out["updates"],
                     samples=state["samples"] + (steps - first) * rule.batch)
        unit.end_epoch(epoch + 1, updates=state["updates"] - start.updates, extra=saved_state())
    if out is None:                 # resumed after the last epoch: evaluate it again
        out = {"test_acc": ctx.evaluate(step.model, distributed_eval=True),
               "train_acc": state["history"][-1].get("train_acc")}
    if start.result is None:
        unit.finish({"epoch": a.epochs, "test_acc": out["test_acc"], "updates": state["updates"], **saved_state()})
    return _summarize(ctx, method, state, rule, out, launcher) if d.is_main else None


def _summarize(ctx: Context, method: str, state: dict, rule: BatchSizeRule, out: dict,
               launcher: dict | None = None) -> dict:
    """Rank 0: ``summary.json`` of a finished ABS/ABSA run (accuracies in percent, seconds, the
    batch per epoch and the resizes of the elastic pool). Returns it."""
    cfg, a = ctx.cfg, ctx.cfg.abs
    total = time.time() - ctx.t0
    resize_s = sum(r["seconds"] for r in state["resizes"] if r["seconds"] is not None)
    summary = {
        "method": method, "config": cfg.name, "seed": cfg.seed,
        "test_acc": {"final": out["test_acc"]}, "train_acc": {"final": out["train_acc"]},
        "wall_s": {"total": total, "resize": resize_s}, "resize_share": resize_s / total,
        "epochs": {method: a.epochs},
        "updates": {method: state["updates"], "critical_path": state["updates"]},
        "samples": state["samples"],
        "batch_size": {"base": a.batch_size, "final": rule.batch,
                       "per_epoch": [h["batch_size"] for h in state["history"]]},
        "doublings": rule.doublings, "history": state["history"], "resizes": state["resizes"],
        "launcher": {k: v for k, v in (launcher or {"name": "torch"}).items() if k != "restarted"},
        "machine": ctx.machine(),
    }
    ctx.write_summary(summary)
    return summary


def train_abs(spec: RunSpec, procs: int | None = None, adversarial: bool = False) -> dict | None:
    """The driver: launch ABS/ABSA groups until the run finishes. With ``abs.elastic`` the first
    group has the base batch's pool size and each resize starts a new group that resumes from the
    checkpoint; otherwise ``procs`` processes throughout. The groups' processes come from
    ``abs.launcher``: torch.distributed's elastic launcher (``torch``) or Ray actors (``ray``,
    :mod:`swap.ray_pool`), where a dead actor makes a new pool continue from the last checkpoint
    (``abs.max_restarts`` times at most).

    Returns:
        rank 0's summary (its ``launcher`` entry says which, with Ray's start-up seconds and the
        restarts), or ``{"interrupted": ...}`` after a stop signal.

    Raises:
        SwapError: a rank failed; Ray is missing or its cluster does not answer (before any work);
            more actor deaths than ``abs.max_restarts``.
    """
    cfg, run = spec.cfg, RunDir(spec.run_path)
    a = cfg.abs
    method = "absa" if adversarial else "abs"
    if a.launcher == "ray":
        from ..ray_pool import RayPool, pool_resources
        cpus, gpus = pool_resources(cfg)
        pool = RayPool(a.ray_address, cpus, gpus, local_cpus=max_pool(cfg) * cpus)
    else:
        pool = _TorchPool()

    def pool_for(resume: bool) -> int:
        """The processes of the next group: the batch's pool (the checkpoint's batch on a resume)."""
        if not a.elastic:
            return procs or 1
        last = run.last_checkpoint(method)
        batch = read_meta(last)["rule"]["batch"] if resume and checkpoint_exists(last) else a.batch_size
        return pool_size(batch, a.per_worker_batch, max_pool(cfg))

    restarts, restarted = 0, False
    with pool:
        world = pool_for(spec.resume)
        while True:
            try:
                info = {**pool.info(), "restarts": restarts, "restarted": restarted}
                out = pool.launch(run_abs, world, spec, adversarial, a.elastic, info, log_dir=run.logs_dir)
            except RankDied as exc:
                restarts += 1
                if restarts > a.max_restarts:
                    raise SwapError(f"{exc}; no restart left (abs.max_restarts={a.max_restarts})") from None
                print(f"swap: {exc}; restart {restarts} of {a.max_restarts} from the last checkpoint", file=sys.stderr,
                      flush=True)
                spec, world, restarted = dataclasses.replace(spec, resume=True), pool_for(True), True
                continue
            if not (isinstance(out, dict) and "resize" in out):
                return out
            world, spec, restarted = out["resize"], dataclasses.replace(spec, resume=True), False


class _TorchPool:
    """torch.distributed's elastic launcher (:func:`swap.distributed.launch`) behind the interface
    of :class:`swap.ray_pool.RayPool`."""

    def __enter__(self) -> "_TorchPool":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def info(self) -> dict:
        return {"name": "torch"}

    def launch(self, fn, nprocs: int, *args, log_dir=None):
        return distributed.launch(fn, nprocs, *args, log_dir=log_dir)


def _epoch_batches(ctx: Context, model, batch: int, fraction: float, shape):
    """One epoch's batches at global batch ``batch`` (this rank's share), with a ``fraction`` of
    FGSM examples (ABSA), and its LR: the ``shape`` over epochs x ``batch`` / base batch (linear
    scaling), at the global update index ``epoch * steps + i``."""
    a = ctx.cfg.abs
    loader = ctx.loader(batch, ("abs", 0), data_parallel=True)
    if fraction > 0:
        mean, std = ctx.mean.view(-1), ctx.std.view(-1)
        loader = AdversarialBatches(loader, model, fraction, a.adv_eps, (0.0 - mean) / std, (255.0 - mean) / std,
                                    ctx.task.loss)
    steps, scale = len(loader), batch / a.batch_size

    def lr_at(step: int) -> float:
        return shape(round(step * _RESOLUTION / steps)) * scale
    return loader, lr_at


def _eigen_sample(ctx: Context) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed clean training sample of the eigenvalue: ``abs.eig_samples`` images drawn once
    from the stream (seed, "hessian"), normalised, no augmentation."""
    n = min(ctx.cfg.abs.eig_samples, len(ctx.train_set))
    gen = torch.Generator().manual_seed(stream_seed(ctx.cfg.seed, "hessian"))
    idx = torch.randperm(len(ctx.train_set), generator=gen)[:n].to(ctx.train_set.images.device)
    return ctx.loader(n, ("hessian",), data_parallel=False, augment=False).batch(idx, {})


def _eigenvalue(ctx: Context, model, x, y, epoch: int) -> tuple[float, int]:
    """Top eigenvalue at the current weights, computed on rank 0 and broadcast, so every rank
    takes the same batch-size decision."""
    a = ctx.cfg.abs
    result = None
    if ctx.dist.is_main:
        gen = torch.Generator().manual_seed(stream_seed(ctx.cfg.seed, "hessian", epoch))
        result = model_top_eigenvalue(model, x, y, a.eig_iters, a.eig_tol, gen, ctx.task.loss)
    return distributed.broadcast_object(result)


__all__ = ["BatchSizeRule", "adversarial_fraction", "pool_size", "max_pool", "run_abs", "train_abs"]
