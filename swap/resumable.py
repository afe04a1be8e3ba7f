"""One resumable unit of training: where a phase, a worker or a baseline restarts from, and its
checkpoints. The rules that make a resumed run the uninterrupted one, bit for bit, are written here
once; SGD, SWAP's phases 1 and 2 (in turn, in child processes or stacked), SWA and ABS/ABSA use them.

A :class:`Resumable` trains one or more :class:`Unit` (a model, its optimizer and its checkpoint name:
``phase1``, ``worker3``, ``sgd``, ``abs``; several when workers are stacked) and writes, in
``RUN/checkpoints`` (names from :class:`swap.rundir.RunDir`)::

    NAME_last   every ``checkpoint_every`` epochs (1-based epoch % N == 0) before the last, and on a
                stop signal mid-epoch (``partial``: updates done in the epoch and the epoch's loss
                sum, correct and samples so far, per rank in a data-parallel phase): weights, BN
                statistics, optimizer state, epoch, ``progress`` (updates and wall seconds so far)
                and the unit's own fields (``phase``, ``worker``; ABS adds its rule's state).
    NAME        when the unit finished: weights and its result (epoch, updates, accuracies, ...).
    track/NAME_epochE  with ``snapshots``: the weights after every epoch E but the last.

:meth:`Resumable.restore` reads them back: a finished unit returns its result, an unfinished one
continues from ``NAME_last`` (the train loop then skips the updates already done: every data stream
derives from (seed, phase, worker, epoch), so the batches are the same). In a data-parallel phase
(``group=True``) every rank loads, the ranks agree on BN statistics before a save (``sync``), and
rank 0 writes. Every write goes through :func:`swap.checkpoint.save_checkpoint` (atomic).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from . import distributed
from .callbacks import Callback
from .checkpoint import checkpoint_exists, load_checkpoint, read_meta, save_checkpoint
from .rundir import RunDir
from .schedules import updates_between
from .train import Position


@dataclass
class Unit:
    """One model of a phase: ``name`` (its checkpoints: ``NAME``, ``NAME_last``), the plain
    ``model`` (not DDP-wrapped), its ``optimizer`` (saved in ``NAME_last``; None = none) and
    ``meta``, the fields every checkpoint of it carries (e.g. ``{"phase": "phase2", "worker": 3}``)."""
    name: str
    model: nn.Module
    optimizer: object = None
    meta: dict = field(default_factory=dict)


@dataclass
class Saving:
    """Where a resumable unit checkpoints and whom it tells: ``run`` (the run directory),
    ``config_hash`` (the run's; a checkpoint of another config is refused), ``every``
    (``checkpoint_every``, epochs; 0 = only at the end) and ``tracking`` (the run's
    :class:`swap.tracking.Tracking` in this process, told when a unit finishes; None = none).
    :attr:`swap.context.Context.saving` is the run's."""
    run: RunDir
    config_hash: str
    every: int = 1
    tracking: object = None


@dataclass
class Start(Position):
    """Where a phase continues (:meth:`Resumable.restore`): the loop's :class:`swap.train.Position`
    (``epoch``, first epoch to train, 0-based; ``step``, updates of it already done; ``totals``,
    this rank's partial loss sum, correct and samples of that epoch, one list per unit when
    several are stacked, or None), and

    Attributes:
        updates, wall_s: progress of the earlier sessions (updates, seconds).
        result: the finished unit's result (then nothing is left to train), else None.
        meta: the metadata of the checkpoint continued from (e.g. ABS's rule state), else None.
    """
    updates: int = 0
    wall_s: float = 0.0
    result: dict | None = None
    meta: dict | None = None


class Resumable(Callback):
    """The resumable unit (module docstring): restore, end-of-epoch and mid-epoch checkpoints, the
    ``checkpoint_every`` rule and the final checkpoint.

    Args:
        saving: the run directory, config hash, ``checkpoint_every`` and tracking (:class:`Saving`).
        units: the unit(s) trained.
        epochs: the unit's epochs (its last epoch writes ``NAME``, not ``NAME_last``).
        steps: updates per epoch (for the progress of an end-of-epoch checkpoint): a number, or
            the train loop's loader (a piecewise schedule's updates change by epoch).
        group: a data-parallel phase: one model on all ranks (see the module docstring); or the
            process group of the ranks that share the model (a phase-2 worker group).
        sync: called before every save, on every rank (e.g. the update step's ``sync``: BN
            statistics averaged over ranks, stacked workers unstacked).
        final: write ``NAME`` when finished (False when the method writes its own final model).
        snapshots: keep each unit's weights at the end of every epoch but the last
            (``track/NAME_epochE``; SWAP's ``phase2.track_average``).
    """

    def __init__(self, saving: Saving, units: list[Unit], *, epochs: int, steps=None, group=False,
                 sync: Callable[[], None] | None = None, final: bool = True, snapshots: bool = False):
        self.run, self.config_hash, self.every, self.tracking = saving.run, saving.config_hash, saving.every, saving.tracking
        self.units, self.epochs, self.steps, self.group, self.final = units, epochs, steps, group, final
        self.snapshots = snapshots
        self.sync = sync or (lambda: None)
        self.pg = None if isinstance(group, bool) else group       # None: all ranks
        self.rank = distributed.rank(self.pg) if group is not False else 0
        self.start = Start()
        self.t = time.perf_counter()

    # ------------------------------------------------------------------ where to continue
    @staticmethod
    def finished(run: RunDir, name: str) -> bool:
        """Unit ``name`` finished in an earlier session (its ``NAME`` holds a result)."""
        path = run.checkpoint(name)
        return checkpoint_exists(path) and "updates" in read_meta(path)

    @staticmethod
    def position(run: RunDir, name: str) -> tuple[int, int]:
        """(epoch, update in it) at which unit ``name`` would continue; (0, 0) without a checkpoint."""
        last = run.last_checkpoint(name)
        if not checkpoint_exists(last):
            return 0, 0
        meta = read_meta(last)
        return meta["epoch"], (meta.get("partial") or {}).get("step", 0)

    @classmethod
    def epochs_kept(cls, run: RunDir, name: str) -> float:
        """Epochs of unit ``name`` that a resume keeps (all of a finished one: ``inf``)."""
        return float("inf") if checkpoint_exists(run.checkpoint(name)) else cls.position(run, name)[0]

    def restore(self, resume: bool) -> Start:
        """Load the units' latest checkpoints (weights, optimizer state) when ``resume`` and say
        where to continue (:class:`Start`); without ``resume``, or without checkpoints, the start.

        Raises:
            SwapError: a checkpoint that does not match the config, the model or the optimizer.
        """
        self.t, self.start = time.perf_counter(), Start()
        if not resume:
            return self.start
        unit = self.units[0]
        if self.final and self.finished(self.run, unit.name):
            metas = [load_checkpoint(self.run.checkpoint(u.name), u.model, self.config_hash) for u in self.units]
            self.start = Start(result=metas[0])
            return self.start
        metas = [load_checkpoint(self.run.last_checkpoint(u.name), u.model, self.config_hash, u.optimizer)
                 for u in self.units if checkpoint_exists(self.run.last_checkpoint(u.name))]
        if not metas:
            return self.start
        meta = metas[0]
        partial, progress = meta.get("partial") or {}, meta.get("progress") or {}
        totals = None
        if partial:
            totals = ([m["partial"]["totals"] for m in metas] if len(self.units) > 1 else
                      partial["totals"][self.rank] if self.group is not False else partial["totals"])
        self.start = Start(epoch=meta["epoch"], step=partial.get("step", 0), totals=totals,
                           updates=progress.get("updates", 0), wall_s=progress.get("wall_s", 0.0), meta=meta)
        return self.start

    # ------------------------------------------------------------------ progress and checkpoints
    def progress(self, updates: int) -> dict:
        """``{"updates", "wall_s"}`` over all sessions, after ``updates`` updates in this one."""
        return {"updates": self.start.updates + updates,
                "wall_s": self.start.wall_s + time.perf_counter() - self.t}

    def updates_at(self, epoch: int) -> int:
        """Updates of this session at the end of ``epoch`` (1-based), with ``steps`` per epoch."""
        if isinstance(self.steps, int):
            return (epoch - self.start.epoch) * self.steps - self.start.step
        return updates_between(self.steps, self.start.epoch, epoch) - self.start.step

    def end_epoch(self, epoch: int, done: bool = False, updates: int | None = None, extra: dict | None = None) -> bool:
        """After epoch ``epoch`` (1-based, on every rank) of a unit not ``done`` (its last epoch, or
        its stopping accuracy reached: :meth:`finish` writes ``NAME``): with ``snapshots``, each
        unit's weights (``track/NAME_epochE``); if the ``checkpoint_every`` rule says so,
        ``NAME_last``, with ``updates`` (this session's; default from ``steps``) and ``extra``
        (more metadata). Returns whether ``NAME_last`` was written. Collective in a group phase."""
        if done or epoch >= self.epochs:
            return False
        if self.snapshots:
            self.sync()
            for u in self.units:
                if self.rank == 0:
                    save_checkpoint(self.run.track_checkpoint(u.name, epoch), u.model, {**u.meta, "epoch": epoch})
        if not (self.every and epoch % self.every == 0):
            return False
        self.save(epoch, self.updates_at(epoch) if updates is None else updates, extra=extra)
        return True

    def on_epoch_end(self, record: dict) -> None:
        """The train loop's hook (:mod:`swap.callbacks`): after an epoch's last record (its last
        unit's), :meth:`end_epoch` (``done`` when a stopping rule ended the loop there)."""
        if record.get("model", len(self.units) - 1) == len(self.units) - 1:
            self.end_epoch(record["epoch"], done=record["stopped"])

    def on_interrupt(self, state: dict) -> None:
        """The train loop's hook: a stop signal mid-epoch, :meth:`interrupted`."""
        self.interrupted(state)

    def interrupted(self, state: dict, extra: dict | None = None) -> None:
        """A stop signal mid-epoch (the train loop's ``on_interrupt`` ``state``: epoch, step,
        totals, updates): ``NAME_last`` with the position inside the epoch and each rank's partial
        totals (gathered: collective in a group phase)."""
        totals = distributed.all_gather_objects(state["totals"], self.pg) if self.group is not False else state["totals"]
        self.save(state["epoch"], state["updates"], partial={"step": state["step"], "totals": totals}, extra=extra)

    def save(self, epoch: int, updates: int, partial: dict | None = None, extra: dict | None = None) -> None:
        """Write every unit's ``NAME_last`` at ``epoch`` (0-based epoch in progress with
        ``partial``, else the number of epochs done). Collective in a group phase (``sync``)."""
        self.sync()
        if self.rank != 0:
            return
        progress = self.progress(updates)
        for i, u in enumerate(self.units):
            meta = {"config_hash": self.config_hash, **u.meta, "epoch": epoch, "progress": progress, **(extra or {})}
            if partial:
                meta["partial"] = partial if len(self.units) == 1 else {**partial, "totals": partial["totals"][i]}
            save_checkpoint(self.run.last_checkpoint(u.name), u.model, meta, u.optimizer)

    def finish(self, results: dict | list[dict]) -> list[dict]:
        """The units finished: write each ``NAME`` (weights; metadata: config hash, the unit's fields
        and its ``result``, which must hold ``updates``) unless ``final`` is off; return the metadata
        (one per unit). Rank 0 writes in a group phase."""
        results = results if isinstance(results, list) else [results]
        metas = [{"config_hash": self.config_hash, **u.meta, **r} for u, r in zip(self.units, results)]
        if self.final and self.rank == 0:
            for u, meta in zip(self.units, metas):
                save_checkpoint(self.run.checkpoint(u.name), u.model, meta)
        tracked = self.tracking if self.rank == 0 else None
        for u, meta in zip(self.units, metas) if tracked is not None else ():
            tracked.phase_end(u.meta.get("phase", u.name), meta)      # callbacks' on_phase_end; loggers flush
        return metas


__all__ = ["Unit", "Saving", "Start", "Resumable"]
