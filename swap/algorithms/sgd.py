"""Synchronous data-parallel minibatch SGD: the paper's "SGD (small-batch)" and "SGD (large-batch)"
baselines and, with a stopping accuracy, SWAP's phase 1 (Gupta et al., ICLR 2020, Algorithm 1).

Every rank holds the same model wrapped in DistributedDataParallel; each global batch is the
same set of samples a single process would draw (shared permutation), split evenly over ranks
and, within a rank, into micro-batches with gradient accumulation.
"""
from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable

from torch import nn

from .. import distributed, trajectory
from ..checkpoint import save_checkpoint
from ..callbacks import Callback, Progress
from ..stopping import StopAt
from ..config import Config, section_batch
from ..context import Context
from ..methods import RunSpec
from ..noise_scale import NoiseScale
from ..optim.build import kind_of
from ..resumable import Resumable, Unit
from ..rundir import RunDir
from ..schedules import epoch_shape, samples_between, updates_between
from ..train import Evaluation, Guard, train
from .transition import AutoSwitch


@dataclass
class DataParallel:
    """What a data-parallel phase trains (:func:`train_data_parallel`).

    ``phase``: its name (checkpoints ``PHASE_last``, ``PHASE``; records; data stream). Batches of
    ``batch_size`` samples (global), in micro-batches of ``micro_batch_size`` (0: one pass), for
    ``epochs``. LR: warm-up to ``peak_lr`` over ``warmup_epochs`` then ``schedule`` (linear or
    cosine) decay to 0 at ``epochs``, or ``lr_at(update)`` if given. ``stop``: (training metric,
    threshold) ending the phase early (:func:`swap.stopping.stop_reached`); (``auto``, None): the
    automatic switch of ``phase1.stop`` (:class:`swap.algorithms.transition.AutoSwitch`).
    ``updates``: > 0, a budget of exactly that many updates instead of the epochs (the LR schedule
    spans them; the last epoch cut short). ``average``: ``none``, or the average along the trajectory
    (``ema``, ``lawa``; :mod:`swap.trajectory`) that the phase also returns.
    ``section``: the config section (``phase1``, ``sgd``) whose piecewise schedule, if it has
    ``segments``, replaces the batch, the LR and the epochs (``Context.batches``). The
    optimizer is config section ``optim_section``'s (default ``section``; ``Context.optimizer``:
    its ``optimizer`` and ``optim`` settings, or the library user's own), clipped as it says."""
    phase: str
    batch_size: int
    micro_batch_size: int
    epochs: int
    peak_lr: float = 0.0
    warmup_epochs: float = 0.0
    schedule: str = "linear"
    lr_at: Callable[[int], float] | None = None
    stop: tuple[str, float | None] | None = None
    section: str | None = None
    optim_section: str | None = None
    average: str = "none"
    updates: int = 0

    @classmethod
    def of(cls, cfg: Config, section: str) -> "DataParallel":
        """The phase that config ``section`` (``phase1``, ``phase2``, ``sgd``) describes, named after it."""
        sec = getattr(cfg, section)
        return cls(section, sec.batch_size, sec.micro_batch_size, sec.max_epochs if section == "phase1" else sec.epochs,
                   sec.peak_lr, sec.warmup_epochs, sec.schedule,
                   stop=sec.stop_rule() if hasattr(sec, "stop_rule") else None, section=section,
                   average=getattr(sec, "average", "none"), updates=getattr(sec, "updates", 0))


def train_data_parallel(ctx: Context, model: nn.Module, plan: DataParallel, *, resume: bool = False,
                        final: bool = True, callbacks: Sequence[Callback] = ()) -> dict:
    """Large- or small-batch SGD over all ranks (:class:`DataParallel`), as one resumable
    :class:`swap.resumable.Resumable` named ``plan.phase`` (checkpoints ``PHASE_last`` and, if ``final``,
    ``PHASE``).

    ``model`` is trained in place (DDP wraps it when there is more than one rank; BN statistics
    end identical on all ranks). ``callbacks`` watch the loop after the phase's own (on every
    rank). With ``resume`` the phase continues from its checkpoint (or returns the result of a
    finished one); since every data stream derives from (seed, phase, worker, epoch), the
    continued run is the uninterrupted one, bit for bit on CPU.

    With ``plan.average`` the average along the trajectory (:mod:`swap.trajectory`) is updated by
    the loop, carried in the phase's checkpoints, evaluated at the end (:func:`finish_average`) and
    saved as ``PHASE_average``.

    Returns:
        the train loop's last record, plus ``updates`` and ``wall_s`` (over all sessions),
        ``steps_per_epoch``, ``samples`` (training samples processed, all ranks) and, with an
        average, ``average`` (:func:`swap.trajectory.summary_of`).
    Raises:
        SwapError: ``batch_size`` not divisible by the world size; a checkpoint that does not match.
    """
    cfg, d, phase, stop = ctx.cfg, ctx.dist, plan.phase, plan.stop
    loader, lr_at, epochs = ctx.batches(plan, (phase, 0), True)
    optim_section = plan.optim_section or plan.section
    opt = ctx.optimizer(model, optim_section, (phase,))
    along = trajectory.build(cfg, plan.average, model)
    unit = Resumable(ctx.saving, [Unit(phase, model, trajectory.Carried(opt, along) if along else opt, {"phase": phase})],
                     epochs=epochs,
                     steps=loader, group=True, final=final)
    start = unit.restore(resume)
    if start.result is not None:
        return start.result
    wrapped = ctx.data_parallel(model) if d.world_size > 1 else model
    step = ctx.update_step(wrapped, opt, plan.micro_batch_size, optim_section)
    unit.sync = step.sync
    watchers, callbacks = callbacks, []           # in order: each epoch's record is completed, logged, saved
    if phase == "phase1" and cfg.phase1.stop.metric == "auto" and d.world_size > 1 and ctx.optimizer_label(opt) == "sgd":
        # the gradient noise scale, logged every epoch
        callbacks.append(NoiseScale(epoch_shape(loader, 0)[2], d.world_size, d.device).attach(wrapped))
    if stop and stop[0] == "auto":
        callbacks.append(AutoSwitch(ctx, phase, model, step.sync, math.ceil(plan.warmup_epochs), epochs,
                                    start.epoch if resume else 0))
    elif stop:
        callbacks.append(StopAt(*stop))
    bar = ctx.progress(updates_between(loader, start.epoch, epochs) - start.step, phase) if d.is_main else None
    if d.is_main:
        sink = ctx.sink(phase, None, epochs, opt)
        callbacks += [sink, *ctx.step_log(sink.step), *ctx.user_callbacks, Progress(bar)]
    callbacks += [*([along] if along else []), unit, *watchers]
    out = train(step, loader, lr_at, epochs=epochs, start=start,
                evaluate=Evaluation(lambda m: ctx.evaluate(m, distributed_eval=True), cfg.eval_every),
                callbacks=callbacks, guard=Guard(cfg.divergence_grad_norm, phase))
    if bar is not None:
        bar.close()
    p = unit.progress(out["updates"])
    switch = next((cb for cb in callbacks if isinstance(cb, AutoSwitch)), None)
    if switch is not None:
        out["switch"] = {**switch.summary(), "epoch": out.get("epoch")}
    result = {k: v for k, v in out.items() if k != "records"}         # one model: its record is the result
    if along is not None:
        _, result["average"] = finish_average(ctx, along, phase, None, (out.get("epoch"), p["updates"]),
                                           distributed=d.world_size > 1, leads=d.is_main)
        p = unit.progress(out["updates"])                   # the average's BN pass and evaluation count as time
    return unit.finish({**result, **p, "optimizer": kind_of(opt), "steps_per_epoch": None if hasattr(loader, "segments") else len(loader),
                        "samples": samples_between(loader, 0, out.get("epoch", start.epoch))})[0]


def finish_average(ctx: Context, along: trajectory.Along, phase: str, worker: int | None, at: tuple[int, int], *,
                   distributed=False, leads: bool = True) -> tuple:
    """A phase's average along its trajectory at the phase's end: BN statistics recomputed (the exact
    pass, over the run's ranks when ``distributed`` is True), evaluated (sharded as ``distributed``
    says: True, False or a worker group's process group), saved as ``PHASE_average`` (or
    ``workerW_average``) and logged as a record of phase ``PHASE_KIND`` (e.g. ``sgd_ema``) at ``at``,
    the phase's (epoch, updates) at its end, by the rank that ``leads``. An average with no sample is not evaluated.

    Returns:
        ``(model, record)``; ``model`` is the averaged model, or None without a sample; ``record`` is
        :func:`swap.trajectory.summary_of`'s, plus ``test_metrics`` where the run reports every metric.
    """
    t = time.perf_counter()
    model, tested = trajectory.evaluate_average(along, lambda m: ctx.recompute_bn(m, distributed=distributed is True),
                                                lambda m: ctx.evaluate(m, distributed_eval=distributed))
    result = trajectory.summary_of(along, tested)
    if tested is not None and ctx.reports_metrics:
        result["test_metrics"] = tested
    if model is not None and leads:
        name = phase if worker is None else RunDir.worker(worker)
        save_checkpoint(ctx.run.checkpoint(f"{name}_average"), model,
                        {"config_hash": ctx.cfg.hash(), "phase": phase, "worker": worker, **result})
        ctx.log({"phase": f"{phase}_{along.kind}", "worker": worker, "epoch": at[0], "update": at[1],
                 "test_acc": result["test_acc"], "samples_averaged": along.count,
                 "phase_wall_s": time.perf_counter() - t, "wall_s": time.time() - ctx.t0})
    return model, result


def run_sgd(spec: RunSpec) -> dict | None:
    """The SGD baseline on every rank (``swap train --method sgd``); rank 0 returns the summary.

    Writes metrics, ``checkpoints/sgd`` and ``summary.json`` into the run directory; ``resume``
    continues from ``checkpoints/sgd_last``. ``spec`` as in :func:`swap.algorithms.swap.run_swap`.
    """
    ctx = Context.for_run(spec)
    cfg = spec.cfg
    if spec.resume:
        ctx.prune_metrics_for_resume()
    out = train_data_parallel(ctx, ctx.build_model(), DataParallel.of(cfg, "sgd"), resume=spec.resume)
    summary = None
    if ctx.dist.is_main:
        raw = {"top1": out["test_acc"], **{k[5:]: v for k, v in out.items() if k.startswith("test_") and k != "test_acc"}}
        along = out.get("average")            # the run's model is its average along the trajectory, once it has a sample
        final = (along.get("test_metrics") or {"top1": along["test_acc"]}) if along and along["samples"] else raw
        summary = {
            "method": "sgd", "optimizer": out["optimizer"], "config": cfg.name, "seed": cfg.seed,
            "test_acc": {"final": final["top1"], **({"last_iterate": out["test_acc"]} if along else {})},
            "predictions": ctx.prediction_unit(out),
            **({"test_metrics": {"final": final, **({"last_iterate": raw} if along else {})}} if len(raw) > 1 else {}),
            **({"average": {k: v for k, v in along.items() if k != "test_metrics"}} if along else {}),
            "train_acc": {"final": out["train_acc"]},
            "wall_s": {"total": out["wall_s"]},
            "epochs": {"sgd": out["epoch"]},
            "updates": {"sgd": out["updates"], "critical_path": out["updates"]},
            "samples": out["samples"],
            "batch_size": {"sgd": section_batch(cfg, "sgd")},
            "machine": ctx.machine(),
        }
        ctx.write_summary(summary)
    distributed.teardown()
    return summary


__all__ = ["DataParallel", "train_data_parallel", "finish_average", "run_sgd"]
