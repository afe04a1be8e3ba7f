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

Every rank runs :func:`run_swap`, which reads as the algorithm box: :func:`phase1`, :func:`phase2`
(one :class:`WorkerResult` per worker, finished or failed), :func:`phase3` and :func:`summarize`. It
works the same under ``swap train --workers W`` (local launch) and under ``torchrun`` across
machines. Each phase and worker is a resumable :class:`swap.resumable.Resumable`.
"""
from __future__ import annotations

import copy
import dataclasses
import sys
import time
from dataclasses import dataclass

from tqdm import tqdm

from .. import distributed, interrupt, trajectory
from ..averaging import average_state_dicts, bn_buffer_names, distributed_average_, greedy_soup
from ..callbacks import Callback, Progress
from ..checkpoint import load_checkpoint, save_checkpoint
from ..config import SwapError, section_batch, section_epochs
from ..context import Context
from ..methods import RunSpec
from ..resumable import Resumable, Unit
from ..rundir import RunDir
from ..schedules import samples_between, updates_between
from ..train import Evaluation, Guard, train
from .sgd import DataParallel, finish_average, train_data_parallel
from .local_sgd import OuterSync
from .stacked import train_stacked


def run_swap(spec: RunSpec) -> dict | None:
    """SWAP on every rank; rank 0 writes ``summary.json`` and returns the summary (others ``None``).

    With ``spec.resume`` a finished phase 1 and finished workers are loaded from their checkpoints
    (verified against the config hash) instead of being trained again. ``spec.model_fn`` and
    ``spec.data`` (train, test ``ImageDataset``) replace the configured model and dataset.
    """
    ctx = Context.for_run(spec)
    if spec.resume:
        ctx.prune_metrics_for_resume()
    model = ctx.build_model()
    p1 = phase1(ctx, model, spec.resume)                      # large-batch SGD to the stopping accuracy
    t2 = time.perf_counter()
    workers, states = phase2(ctx, model, spec.resume)         # W workers refine copies, small batches
    phase2_wall = max(distributed.all_gather_objects(time.perf_counter() - t2))
    t3 = time.perf_counter()
    averaged, acc, soup = phase3(ctx, model, states, workers)  # average them, recompute BN statistics
    summary = None
    if ctx.dist.is_main:
        walls = {"phase1": p1["wall_s"], "phase2": phase2_wall, "phase3": time.perf_counter() - t3}
        summary = summarize(ctx, averaged, acc, p1, workers, walls, soup)
    distributed.teardown()
    return summary


# -------------------------------------------------------------------- phase 1: large-batch SGD
def phase1(ctx: Context, model, resume: bool) -> dict:
    """Phase 1 on every rank: ``model`` trained in place by synchronous data-parallel SGD with the
    large batch, warm-up to the peak LR, until the training accuracy of an epoch reaches
    ``phase1.stop_acc``, or meets the rule ``phase1.stop`` (or ``max_epochs``). Returns its result (epoch, updates, samples,
    accuracies, wall_s, stopped_early), also kept in ``checkpoints/phase1``."""
    out = train_data_parallel(ctx, model, DataParallel.of(ctx.cfg, "phase1"), resume=resume)
    distributed.barrier()
    return out


# -------------------------------------------------------------------- phase 2: W independent workers
@dataclass
class WorkerResult:
    """How phase-2 worker ``worker`` ended: finished with ``meta`` (its checkpoint metadata: epoch,
    updates, train_acc, test_acc in percent, wall_s), or failed (``error``: one line saying why)."""
    worker: int
    meta: dict | None = None
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.error is None


def phase2(ctx: Context, model, resume: bool) -> tuple[list[WorkerResult], list[dict]]:
    """Phase 2 on every rank: rank r trains workers r, r + world, ..., each from a copy of the
    phase-1 ``model`` (weights and BN buffers; a fresh optimizer), on its own data order, with no
    communication between workers; stacked into one computation with ``phase2.layout: vmap``.
    With ``phase2.ranks_per_worker`` k > 1, worker g is trained by ranks [g k, (g + 1) k) as one
    DistributedDataParallel group (:func:`swap.distributed.worker_groups`; SWAP paper Sec. 5.2).

    Returns:
        every worker's :class:`WorkerResult` (all ranks', sorted by worker) and the samples of this
        rank's finished workers, ``(label, state dict)`` (for :func:`phase3`).
    Raises:
        SwapError: a worker failed, unless ``phase3.allow_missing_workers`` and one finished.
    """
    cfg, d = ctx.cfg, ctx.dist
    k = cfg.phase2.ranks_per_worker
    group = distributed.worker_groups(cfg.workers, k) if k > 1 else None
    mine = list(range(d.rank, cfg.workers, d.world_size)) if group is None else \
        [group.worker] if group.worker is not None else []
    stacked = _phase2_stacked(ctx, model, mine, resume) if cfg.phase2.layout == "vmap" else {}
    results, states = [], []
    for w in mine:
        worker = copy.deepcopy(model)
        result = stacked.get(w) or _phase2_worker(ctx, worker, w, resume, group)
        if w in stacked and result.finished:
            load_checkpoint(ctx.run.checkpoint(RunDir.worker(w)), worker)
        if group is not None and not group.leads:            # the group's first rank reports the worker
            continue
        if result.finished:
            states += _samples(ctx, worker, w)
        else:
            tqdm.write(f"[phase2 worker {w}] FAILED: {result.error}", file=sys.stderr)
        results.append(result)
        del worker
    results = sorted((r for rank in distributed.all_gather_objects(results) for r in rank), key=lambda r: r.worker)
    failed, finished = [r for r in results if not r.finished], [r for r in results if r.finished]
    if failed and not (cfg.phase3.allow_missing_workers and finished):
        names = "; ".join(f"worker {r.worker}: {r.error}" for r in failed)
        raise SwapError(f"phase 2: {len(failed)} of {cfg.workers} workers failed ({names}); the other "
                        f"{len(finished)} finished and are kept. --resume trains only the failed ones; "
                        f"--set phase3.allow_missing_workers=true averages the {len(finished)} that finished")
    return results, states


def _samples(ctx: Context, worker, w: int) -> list[tuple[str, dict]]:
    """Worker ``w``'s samples for the average, ``(label, state dict)``: its final weights
    (``worker`` holds them; ``w3``) and, with ``phase2.cycles`` C > 1, its weights at the end of
    each earlier cycle (from their checkpoints; ``w3c1``)."""
    samples = []
    for c in range(1, ctx.cfg.phase2.cycles):
        sample = copy.deepcopy(worker)
        load_checkpoint(ctx.run.cycle_checkpoint(RunDir.worker(w), c), sample, ctx.cfg.hash())
        samples.append((f"w{w}c{c}", sample.state_dict()))
    return samples + [(f"w{w}", {k: v.detach().clone() for k, v in worker.state_dict().items()})]


def _phase2_stacked(ctx: Context, model, mine: list[int], resume: bool) -> dict[int, WorkerResult]:
    """``phase2.layout: vmap``: this rank's unfinished workers trained as one computation
    (:mod:`swap.algorithms.stacked`). Workers that would resume from different points are left out
    (trained in turn by the caller)."""
    todo = [w for w in mine if not (resume and Resumable.finished(ctx.run, RunDir.worker(w)))]
    if not todo or len({Resumable.position(ctx.run, RunDir.worker(w)) if resume else (0, 0) for w in todo}) != 1:
        return {}
    try:
        return {w: WorkerResult(w, meta) for w, meta in train_stacked(ctx, model, todo, resume).items()}
    except (SwapError, RuntimeError) as exc:           # divergence, out of memory: all of them failed
        why = str(exc).strip().splitlines()[-1]
        for w in todo:
            ctx.run.worker_error(w).write_text(why)
        return {w: WorkerResult(w, error=why) for w in todo}


def _phase2_worker(ctx: Context, worker, w: int, resume: bool, group=None) -> WorkerResult:
    """Worker ``w``'s phase 2, with ``worker`` holding its final weights when it finished.
    Finished workers are loaded on ``resume``. With ``phase2.layout: processes`` it trains in a
    child process of this rank (:func:`swap.distributed.run_isolated`), so a worker that dies takes
    no other with it; a failure (a diverged run, an exception, a killed process) is kept in
    ``checkpoints/workerW.error``. ``group``: this rank's :class:`swap.distributed.WorkerGroup`
    when a worker spans several ranks (it trains here, with them).

    Raises:
        swap.interrupt.Interrupted: SIGINT/SIGTERM (the worker's checkpoint is written first).
    """
    cfg, run, name = ctx.cfg, ctx.run, RunDir.worker(w)
    error = run.worker_error(w)
    if resume and Resumable.finished(run, name):
        return WorkerResult(w, load_checkpoint(run.checkpoint(name), worker, cfg.hash()))
    if resume and cfg.phase3.allow_missing_workers and error.is_file():
        return WorkerResult(w, error=error.read_text())     # failed before; averaged without it, not retrained
    if interrupt.requested():              # a stop signal arrived between two workers
        raise interrupt.Interrupted(interrupt.requested(), f"before phase2 worker {w}")
    if cfg.phase2.layout == "processes" and group is None and not cfg.phase2.sync_every:   # else: they communicate
        start = {k: v.detach().cpu() for k, v in worker.state_dict().items()}
        data = tuple(x.to("cpu") if not ctx.generic else x for x in (ctx.train_set, ctx.test_set, ctx.val_set)
                     if x is not None)
        spec = RunSpec(cfg, run.path, ctx.t0, resume, parts=dataclasses.replace(ctx.parts, data=data))
        why = distributed.run_isolated(_isolated_worker, (spec, w, start), error,
                                       run.logs_dir / f"worker{w}.log")     # leaves `why` in `error`
        return WorkerResult(w, error=why) if why is not None else \
            WorkerResult(w, load_checkpoint(run.checkpoint(name), worker, cfg.hash()))
    error.unlink(missing_ok=True)
    try:
        return WorkerResult(w, train_worker(ctx, worker, w, resume, group))
    except (SwapError, RuntimeError) as exc:          # divergence, out of memory, ...
        why = str(exc).strip().splitlines()[-1]
        error.write_text(why)
        return WorkerResult(w, error=why)


def _isolated_worker(spec: RunSpec, w: int, start: dict) -> None:
    """Body of an isolated phase-2 worker process: rebuild the rank's context from ``spec`` (its
    parts carry the rank's data, task, collate function, optimizer functions and callbacks)
    without joining the process group, start from the phase-1 state ``start`` and train worker
    ``w`` (checkpoints go to disk)."""
    ctx = Context.for_run(spec, join=False)
    worker = ctx.build_model()
    worker.load_state_dict(start)
    try:
        train_worker(ctx, worker, w, spec.resume)
    finally:
        if ctx.tracking is not None:
            ctx.tracking.close()                      # this process's event files closed


def train_worker(ctx: Context, worker, w: int, resume: bool, group=None) -> dict:
    """Phase 2 for worker ``w``, a resumable :class:`swap.resumable.Resumable` (``worker{w}_last``,
    ``worker{w}``): small-batch SGD on its own data order (stream ("phase2", w)), LR
    ``phase2.peak_lr`` decaying to 0, no communication. Trains ``worker`` in place and returns its
    metadata (epoch, updates, accuracies, wall_s). With ``phase2.track_average`` its weights at the
    end of every epoch but the last are kept (``track/``); with ``phase2.save_every = K`` every K-th
    iterate (``iterates/``). With ``phase2.average_along`` (``ema``, ``lawa``: :mod:`swap.trajectory`)
    the worker ends as its average along its trajectory, BN statistics recomputed (also saved as
    ``workerW_average``; its last iterate's test accuracy is kept as ``last_iterate_test_acc``).
    With a ``group`` (:class:`swap.distributed.WorkerGroup`) the worker is one DistributedDataParallel model over the group's ranks, each taking its share of every batch
    of the worker's data order; the group's first rank logs and writes its checkpoints."""
    cfg, p2 = ctx.cfg, ctx.cfg.phase2
    opt = ctx.optimizer(worker, "phase2", ("phase2", w))
    meet = OuterSync(worker, opt, p2.sync_every, p2.outer, p2.outer_lr, p2.outer_momentum) if p2.sync_every else None
    share = (group.rank, group.size) if group is not None else False
    loader, lr_at, epochs = ctx.batches(DataParallel.of(cfg, "phase2"), ("phase2", w), share)
    cycle_epochs, cycle_updates, cycle_lr = epochs, updates_between(loader, 0, epochs), lr_at
    if p2.cycles > 1:                       # C cycles of the same schedule, restarted (SWA's cyclic sampling)
        epochs, lr_at = epochs * p2.cycles, lambda update: cycle_lr(update % cycle_updates)
    along = trajectory.build(cfg, p2.average_along, worker)       # the worker's own average along its trajectory
    carried = meet or opt
    unit = Resumable(ctx.saving, [Unit(RunDir.worker(w), worker, trajectory.Carried(carried, along) if along else carried,
                                       {"phase": "phase2", "worker": w})],
                     epochs=epochs, steps=loader, snapshots=p2.track_average,
                     group=group.group if group is not None else False)
    start = unit.restore(resume)
    if start.result is not None:
        return start.result
    ddp = ctx.data_parallel(worker, group.group) if group is not None else worker
    step = ctx.update_step(ddp, opt, p2.micro_batch_size, "phase2")
    unit.sync = step.sync
    leads = group is None or group.rank == 0
    callbacks = []                                   # in order: the epoch's record is logged, then saved
    if leads:
        sink = ctx.sink("phase2", w, epochs, opt)
        callbacks += [sink, *ctx.step_log(sink.step), *ctx.user_callbacks]
        if cfg.phase2.save_every:
            callbacks.append(_Iterates(ctx, worker, w))
    if p2.cycles > 1:
        callbacks.append(_CycleSamples(ctx, worker, w, cycle_epochs, epochs, unit, leads))
    if meet is not None:
        callbacks.append(meet)
    bar = ctx.progress(updates_between(loader, start.epoch, epochs) - start.step, f"phase2 worker {w}",
                       position=ctx.dist.local_rank)
    callbacks += [Progress(bar), *([along] if along else []), unit]
    # a worker group's ranks each evaluate a shard of the test set
    shards = group.group if group is not None and group.group else False
    out = train(step, loader, lr_at, epochs=epochs, start=start,
                evaluate=Evaluation(lambda m: ctx.evaluate(m, distributed_eval=shards), cfg.eval_every),
                callbacks=callbacks, guard=Guard(cfg.divergence_grad_norm, f"phase2 worker {w}"))
    bar.close()
    p = unit.progress(out["updates"])
    along_result, test_acc = {}, out["test_acc"]
    if along is not None:              # the worker becomes its average (BN recomputed), which phase 3 averages
        averaged, average = finish_average(ctx, along, "phase2", w, (out["epoch"], p["updates"]), distributed=shards,
                                           leads=leads)
        if averaged is not None:
            worker.load_state_dict(averaged.state_dict())
            test_acc = average["test_acc"]
        along_result = {"average": average, "last_iterate_test_acc": out["test_acc"]}
        p = unit.progress(out["updates"])
    return unit.finish({"epoch": out["epoch"], "updates": p["updates"], "train_acc": out["train_acc"],
                        "test_acc": test_acc, "wall_s": p["wall_s"], **along_result,
                        "sync": {"rounds": meet.rounds, "bytes": meet.bytes} if meet else {"rounds": 0, "bytes": 0},
                        "samples": samples_between(loader, 0, out.get("epoch", start.epoch))})[0]


class _Iterates(Callback):
    """``phase2.save_every = K``: worker ``w``'s iterate every K updates, and its start."""

    def __init__(self, ctx: Context, worker, w: int):
        self.ctx, self.worker, self.w, self.every = ctx, worker, w, ctx.cfg.phase2.save_every
        self.save(0)

    def save(self, update: int) -> None:
        save_checkpoint(self.ctx.run.iterate_checkpoint(RunDir.worker(self.w), update), self.worker,
                        {"worker": self.w, "step": update})

    def on_update_end(self, state) -> None:
        if state.update % self.every == 0:
            self.save(state.update)


class _CycleSamples(Callback):
    """``phase2.cycles`` C > 1: at the end of each cycle but the last, worker ``w``'s weights are a
    sample (``checkpoints/workerW_cycleC``, written by the group's first rank)."""

    def __init__(self, ctx: Context, worker, w: int, cycle_epochs: int, epochs: int, unit: Resumable, leads: bool):
        self.ctx, self.worker, self.w, self.leads = ctx, worker, w, leads
        self.cycle_epochs, self.epochs, self.unit = cycle_epochs, epochs, unit

    def on_epoch_end(self, record: dict) -> None:
        epoch = record["epoch"]
        if epoch % self.cycle_epochs == 0 and epoch < self.epochs:
            self.unit.sync()
            if self.leads:
                save_checkpoint(self.ctx.run.cycle_checkpoint(RunDir.worker(self.w), epoch // self.cycle_epochs),
                                self.worker, {"config_hash": self.ctx.cfg.hash(), "phase": "phase2", "worker": self.w,
                                              "epoch": epoch})


# -------------------------------------------------------------------- phase 3: average, recompute BN
def phase3(ctx: Context, model, states: list[tuple[str, dict]], workers: list[WorkerResult]):
    """Phase 3 on every rank: the uniform mean of the finished workers' parameters (all ranks'
    samples ``states``: :func:`swap.averaging.distributed_average_`), a copy of ``model``; its BN
    statistics recomputed with one pass over the training data, shared by the ranks
    (:meth:`swap.context.Context.recompute_bn`); then, on rank 0, its test accuracy. With
    ``phase3.aggregate: greedy``, the greedy soup of the samples instead (``_greedy_soup``).

    Returns:
        the averaged model, its evaluation (``Context.evaluate``; None on the other ranks), and the
        soup's record (None for the uniform average).
    """
    if ctx.cfg.phase3.aggregate == "greedy":
        return _greedy_soup(ctx, model, states)
    finished = [r for r in workers if r.finished]
    averaged = distributed_average_(copy.deepcopy(model), [s for _, s in states], len(finished) * ctx.cfg.phase2.cycles)
    ctx.recompute_bn(averaged, distributed=True)
    return averaged, ctx.evaluate(averaged) if ctx.dist.is_main else None, None


def _greedy_soup(ctx: Context, model, states: list[tuple[str, dict]]):
    """Phase 3's greedy soup (:func:`swap.averaging.greedy_soup`; Wortsman et al. 2022): every
    rank gathers all samples and takes the same decisions, on the validation split's top-1 accuracy
    (evaluation and BN recomputation sharded over the ranks). Also scores the uniform average of
    all samples, for comparison. Returns the soup, its test accuracy (rank 0) and its record:
    the samples kept, each sample's and both averages' validation accuracy, the uniform
    average's test accuracy."""
    gathered = [x for rank in distributed.all_gather_objects(states) for x in rank]
    labels, candidates = [label for label, _ in gathered], [state for _, state in gathered]

    score = ctx.validation_score

    def prepare(m) -> None:
        ctx.recompute_bn(m, distributed=True)

    soup, kept, singles, best = greedy_soup(model, candidates, score, prepare)
    uniform = copy.deepcopy(model)
    uniform.load_state_dict(average_state_dicts(candidates, bn_buffer_names(model)))
    prepare(uniform)
    record = {"kept": [labels[i] for i in kept], "val_acc": dict(zip(labels, singles)), "soup_val_acc": best,
              "uniform_val_acc": score(uniform)}
    if ctx.dist.is_main:
        record["uniform_test_acc"] = ctx.evaluate(uniform).get("top1")
    return soup, ctx.evaluate(soup) if ctx.dist.is_main else None, record


def summarize(ctx: Context, averaged, tested: dict, phase1: dict, workers: list[WorkerResult],
              walls: dict, soup: dict | None = None) -> dict:
    """Rank 0, after phase 3: draw the average's curve if ``phase2.track_average``, save the
    averaged model (``checkpoints/swap``), log its record and write ``summary.json`` (accuracies in
    percent, ``walls``: seconds per phase, updates on the critical path). Returns the summary."""
    cfg, run = ctx.cfg, ctx.run
    p1, p2 = cfg.phase1, cfg.phase2
    finished = [r for r in workers if r.finished]
    metrics = tested if ctx.reports_metrics else None      # e.g. a generic dataset: every metric
    averaged_acc = tested.get("top1")
    track_s = _average_curve(ctx, averaged, averaged_acc, [r.worker for r in finished]) if p2.track_average else 0.0
    save_checkpoint(run.checkpoint("swap"), averaged, {"config_hash": cfg.hash(), "phase": "phase3",
                                                       "workers": [r.worker for r in finished], "test_acc": averaged_acc})
    p2_updates = [r.meta["updates"] for r in finished]
    # the averaged model sits at the end of the critical path: phase 2's updates (tracking adds phase 1's)
    ctx.log({"phase": "phase3", "worker": None, "epoch": None, "update": max(p2_updates), "test_acc": averaged_acc,
             **{f"test_{m}": v for m, v in (metrics or {}).items() if m != "top1"},
             "phase_wall_s": walls["phase3"], "wall_s": time.time() - ctx.t0})
    ctx.phase_end("phase3", {"workers": [r.worker for r in finished], "test_acc": averaged_acc,
                             **({"test_metrics": metrics} if metrics else {})})
    walls = {**walls, "total": sum(walls.values())}
    worker_accs = [r.meta["test_acc"] for r in finished]
    last_iterates, along = _along_summary(p2.average_along, finished)
    trials = phase1.get("switch", {}).get("trial_updates", 0)
    summary = {
        "method": "swap", "phase1_optimizer": phase1.get("optimizer", p1.optimizer),
        "phase2_optimizer": "user" if "phase2" in (ctx.optimizer_fns or {}) else p2.optimizer,
        "config": cfg.name, "seed": cfg.seed, "workers": cfg.workers,
        # the workers whose weights were averaged; the others failed (phase3.allow_missing_workers)
        "averaged_workers": [r.worker for r in finished],
        "samples_averaged": len(finished) * p2.cycles,        # W x C (phase2.cycles)
        # all-reduces, per rank: phase 1 one of the gradients per update (when data-parallel); phase 2
        # the meetings of phase2.sync_every (parameters and BN buffers; none for SWAP)
        "communication": {"phase1": _phase1_traffic(ctx, averaged, phase1["updates"]),
                          "phase2": {"rounds": max(r.meta.get("sync", {}).get("rounds", 0) for r in finished),
                                     "bytes": max(r.meta.get("sync", {}).get("bytes", 0) for r in finished)}},
        "aggregate": cfg.phase3.aggregate,
        **({"soup": soup} if soup is not None else {}),          # greedy: kept samples, validation accuracies
        "failed_workers": {str(r.worker): r.error for r in workers if not r.finished},
        "test_acc": {"workers": worker_accs,                    # None: no accuracy on this data (soft targets)
                     "workers_mean": None if None in worker_accs else sum(worker_accs) / len(worker_accs),
                     "averaged": averaged_acc, "phase1": phase1["test_acc"], **last_iterates},
        **along,
        "train_acc": {"phase1": phase1["train_acc"], "workers": [r.meta["train_acc"] for r in finished]},
        "wall_s": walls,
        "epochs": {"phase1": phase1["epoch"], "phase2": max(r.meta["epoch"] for r in finished)},
        "phase1_stopped_early": phase1["stopped_early"],
        **({"switch": phase1["switch"]} if "switch" in phase1 else {}),   # phase1.stop: auto
        "analysis_s": {"track_average": track_s},        # not part of training time
        # Updates on the critical path: phase 1 plus ONE worker's phase 2 (workers run in parallel
        # on W devices); the measure of SWAP's speed that does not depend on this machine.
        # The automatic switch's trial copies (phase1.stop.signal trials | barrier) count there too.
        "updates": {"phase1": phase1["updates"], "phase2_per_worker": max(p2_updates),
                    **({"switch_trials": trials} if trials else {}),
                    "critical_path": phase1["updates"] + trials + max(p2_updates)},
        "samples": phase1["samples"] + sum(r.meta.get("samples", r.meta["updates"] * p2.batch_size)
                                           for r in finished),                  # all workers' samples
        "batch_size": {"phase1": section_batch(cfg, "phase1"), "phase2": section_batch(cfg, "phase2")},
        "machine": ctx.machine(),
        "predictions": ctx.prediction_unit(phase1),
        **({"test_metrics": {"averaged": metrics}} if metrics else {}),
    }
    ctx.write_summary(summary)
    return summary


def _along_summary(kind: str, finished: list[WorkerResult]) -> tuple[dict, dict]:
    """``phase2.average_along`` (each worker is its own average along its trajectory): its workers'
    last iterates' test accuracies (for the summary's ``test_acc``) and the averages' kind and
    samples per worker (its ``average_along``); both empty for ``none``."""
    if kind == "none":
        return {}, {}
    return ({"workers_last_iterate": [r.meta.get("last_iterate_test_acc") for r in finished]},
            {"average_along": {"kind": kind, "samples": [r.meta.get("average", {}).get("samples") for r in finished]}})


def _phase1_traffic(ctx: Context, model, updates: int) -> dict:
    """Phase 1's all-reduces per rank: one of the gradients (float32 parameters) per update, none
    with one rank."""
    if ctx.dist.world_size == 1:
        return {"rounds": 0, "bytes": 0}
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"rounds": updates, "bytes": updates * grad_bytes}


def _average_curve(ctx: Context, template, final_acc: float, finished: list[int]) -> float:
    """Test accuracy of the average of the ``finished`` workers (BN recomputed) at each phase-2 epoch, logged as
    ``phase: average`` records at the slowest worker's time for that epoch (SWAP paper Fig. 1).
    Returns the seconds it cost; each record carries its own ``cost_s``."""
    cfg, run = ctx.cfg, ctx.run
    records = [r for r in run.read_metrics() if r["phase"] == "phase2"]
    buffers = bn_buffer_names(template)
    total = 0.0
    epochs = section_epochs(cfg, "phase2")
    for epoch in range(1, epochs + 1):
        t = time.perf_counter()
        wall = max(r["wall_s"] for r in records if r["epoch"] == epoch)
        update = max((r.get("update", 0) for r in records if r["epoch"] == epoch), default=0)
        if epoch == epochs:                                # the final SWAP model, already evaluated
            acc = final_acc
        else:
            states = []
            for w in finished:
                m = copy.deepcopy(template)
                load_checkpoint(run.track_checkpoint(RunDir.worker(w), epoch), m)
                states.append(m.state_dict())
            averaged = copy.deepcopy(template)
            averaged.load_state_dict(average_state_dicts(states, buffers))
            ctx.recompute_bn(averaged)
            acc = ctx.evaluate(averaged).get("top1")
        cost = time.perf_counter() - t
        total += cost
        ctx.log({"phase": "average", "worker": None, "epoch": epoch, "update": update, "test_acc": acc, "wall_s": wall,
                 "cost_s": cost})
    return total


__all__ = ["run_swap", "phase1", "WorkerResult", "phase2", "train_worker", "phase3", "summarize"]
