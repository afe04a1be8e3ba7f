"""ABS and ABSA: adaptive batch size from Hessian information, optionally with adversarial
training, on an elastic pool of data-parallel processes (Yao, Gholami, Keutzer, Mahoney, "Large
batch size training of neural networks with adversarial training and second-order information",
arXiv 1810.01021, Alg. 1)::

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
from ..callbacks import Callback
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
    ctx = Context.for_run(spec)                       # in-memory images (swap.launch.checked)
    if spec.resume:
        ctx.prune_metrics_for_resume()
    run = _ABSRun(ctx, "absa" if adversarial else "abs", spec.resume, launcher)
    a, d = spec.cfg.abs, ctx.dist
    out = None
    for epoch in range(run.state["epoch"], a.epochs):
        if run.state["decided"] < epoch:                              # the rule, once per epoch
            want = run.decide(epoch)
            if elastic and want != d.world_size:                      # resize: checkpoint, new group
                run.state["resize_from"] = {"time": time.time(), "epoch": epoch, "from": d.world_size, "to": want}
                run.unit.save(epoch, run.state["updates"] - run.start.updates, extra=run.saved_state())
                distributed.teardown()
                return {"resize": want}
        out = run.train_epoch(epoch, adversarial)
    if out is None:                 # resumed after the last epoch: evaluate it again
        out = {"test_acc": ctx.evaluate(run.step.model, distributed_eval=True).get("top1"),
               "train_acc": run.state["history"][-1].get("train_acc")}
    if run.start.result is None:
        run.unit.finish({"epoch": a.epochs, "test_acc": out["test_acc"], "updates": run.state["updates"],
                         **run.saved_state()})
    return _summarize(ctx, run.method, run.state, run.rule, out, launcher) if d.is_main else None


class _ABSRun:
    """One rank's ABS/ABSA phase: the model, its optimizer and update step, the batch-size rule
    and the phase's state (``state``: epoch, updates and samples so far, the rule's last decision,
    the history of epochs and resizes), restored from the resumable unit's checkpoint."""

    def __init__(self, ctx: Context, method: str, resume: bool, launcher: dict | None):
        a = ctx.cfg.abs
        self.ctx, self.method, self.launcher = ctx, method, launcher or {}
        self.model = model = ctx.build_model()            # plain (the update step's may be DDP-wrapped)
        opt = ctx.optimizer(model, "abs")
        self.rule = BatchSizeRule(a.batch_size, a.batch_size * a.max_batch_factor, a.decay_ratio, a.fallback_epochs)
        self.state = {"epoch": 0, "decided": -1, "eigenvalue": None, "eig_iters": 0, "updates": 0, "samples": 0,
                      "history": [], "resizes": [], "resize_from": None, "partial": {}}
        self.unit = Resumable(ctx.saving, [Unit(method, model, opt, {"phase": method})], epochs=a.epochs, group=True)
        self.start = self.unit.restore(resume)
        saved = self.start.result or self.start.meta
        if saved:
            self.state, self.rule = saved["state"], BatchSizeRule(**saved["rule"])
        self.step = ctx.update_step(ctx.data_parallel(model) if ctx.dist.world_size > 1 else model, opt,
                                    a.micro_batch_size, "abs")
        self.unit.sync = self.step.sync
        self.shape = warmup_decay(a.peak_lr, round(a.warmup_epochs * _RESOLUTION), a.epochs * _RESOLUTION, a.schedule)
        self.eig_x, self.eig_y = _eigen_sample(ctx)

    def saved_state(self) -> dict:
        """The rule's state, kept in every checkpoint of the phase."""
        return {"state": self.state, "rule": dataclasses.asdict(self.rule), "partial": self.state["partial"]}

    def decide(self, epoch: int) -> int:
        """The rule at the start of ``epoch``: the top eigenvalue measured (every ``abs.eig_every``
        epochs), the batch updated; returns the processes the new batch calls for."""
        a = self.ctx.cfg.abs
        eig, iters = _eigenvalue(self.ctx, self.model, self.eig_x, self.eig_y, epoch) \
            if epoch % a.eig_every == 0 else (None, 0)
        self.rule.update(epoch, eig)
        self.state.update(decided=epoch, eigenvalue=eig, eig_iters=iters)
        return pool_size(self.rule.batch, a.per_worker_batch, max_pool(self.ctx.cfg))

    def train_epoch(self, epoch: int, adversarial: bool) -> dict:
        """Train ``epoch`` at the rule's batch (ABSA: with its share of FGSM examples); returns the
        train loop's result."""
        ctx, state, a = self.ctx, self.state, self.ctx.cfg.abs
        if state["resize_from"] is not None:                          # first update after a resize
            r = state["resize_from"]                                  # (a pool restarted meanwhile: not timed)
            seconds = None if self.launcher.get("restarted") else time.time() - r["time"]
            state["resizes"].append({**r, "seconds": seconds})
            state["resize_from"] = None
        fraction = adversarial_fraction(a.adv_fraction, self.rule.doublings, epoch, a.epochs) if adversarial else 0.0
        loader, lr_at = _epoch_batches(ctx, self.model, self.rule.batch, fraction, self.shape)
        extra = {"eigenvalue": state["eigenvalue"], "eig_iters": state["eig_iters"], "adv_fraction": fraction,
                 "world_size": ctx.dist.world_size, "doublings": self.rule.doublings}
        first, totals = (self.start.step, self.start.totals) if epoch == self.start.epoch else (0, None)
        watch = _EpochWatch(self, extra, len(loader), first, epoch_shape(loader, epoch)[0])
        out = train(self.step, loader, lr_at, epochs=epoch + 1, start=Position(epoch, first, totals),
                    evaluate=Evaluation(lambda m: ctx.evaluate(m, distributed_eval=True), ctx.cfg.eval_every),
                    callbacks=[watch, *((*ctx.step_log(watch.step), *ctx.user_callbacks) if watch.sink is not None else ())],
                    guard=Guard(ctx.cfg.divergence_grad_norm, self.method))
        state.update(epoch=epoch + 1, partial={}, updates=state["updates"] + out["updates"],
                     samples=state["samples"] + (len(loader) - first) * self.rule.batch)
        self.unit.end_epoch(epoch + 1, updates=state["updates"] - self.start.updates, extra=self.saved_state())
        return out


class _EpochWatch(Callback):
    """One ABS epoch's watcher: its record goes into the rule's history and (rank 0) the metrics
    sink, with the pool's updates so far (its batch, so its updates per epoch, change between
    epochs: ``steps`` updates in this epoch, ``first`` of them done before a resume, ``offset`` its
    first global update index); a stop signal's progress goes into the phase's checkpoint."""

    def __init__(self, run: _ABSRun, extra: dict, steps: int, first: int, offset: int):
        self.run, self.extra, self.steps, self.first, self.offset = run, extra, steps, first, offset
        self.sink = run.ctx.sink(run.method, None, run.ctx.cfg.abs.epochs) if run.ctx.dist.is_main else None

    def on_epoch_end(self, record: dict) -> None:
        rec, state = record, self.run.state
        state["history"].append({"epoch": rec["epoch"], "batch_size": rec["batch_size"], "lr": rec["lr"],
                                 "train_acc": rec["train_acc"], "test_acc": rec["test_acc"], **self.extra})
        if self.sink is not None:
            self.sink({**rec, **self.extra, "update": state["updates"] + self.steps - self.first})

    def step(self, rec: dict) -> None:
        """A record between epochs (``logging.log_every``), rank 0."""
        self.sink.step({**rec, **self.extra, "update": self.run.state["updates"] + rec["update"] - self.offset
                        - self.first})

    def on_interrupt(self, state: dict) -> None:                      # SIGINT/SIGTERM mid-epoch
        self.run.state["updates"] += state["updates"]
        self.run.unit.interrupted(state, extra=self.run.saved_state())


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
