"""The train loop's callbacks: every watcher of :func:`swap.train.train` is an object with hooks.

The loop knows hooks, each feature is an object (the shape of Lightning's ``Callback``): the
metrics sink and its per-update records, the progress bar, the stopping rules (:mod:`swap.stopping`), a resumable unit's
checkpoints, local SGD's meetings, the gradient noise scale, saved iterates. Callbacks run in the
order given; a hook not defined does nothing.

Hooks, in the order the loop calls them:

- ``on_epoch_start(state)``: an epoch begins (``state.totals`` are its carried partial sums).
- ``on_update_end(state)``: after each update (``state.update``: global update index, 1-based).
- ``on_updates_end(state)``: the epoch's updates are done, before its statistics are gathered.
- ``should_stop(epoch, train_acc, train_loss) -> bool``: after each epoch (1-based), with each
  model's training accuracy (percent, None for soft targets) and mean loss over the epoch, summed
  over the ranks; the loop stops when any callback says so (every one is asked).
- ``on_epoch_end(record)``: one record per model (``record["model"]`` when there are several),
  after evaluation; a callback may add keys, which the later ones and the loop's result see.
- ``on_interrupt(state)``: a stop signal mid-epoch (``state``: ``epoch``, 0-based, ``step``, the
  updates done in it, ``totals``, ``updates``), before :class:`~swap.interrupt.Interrupted` is raised.

The run's hooks, for the callbacks of :func:`swap.train_swap` and :func:`swap.train_sgd`
(:mod:`swap.tracking` calls them in the process that writes the run's records):

- ``on_record(record)``: each metrics.jsonl record, with ``step`` (updates on the critical path).
- ``on_phase_end(phase, result)``: a phase (or a phase-2 worker) finished.
- ``on_run_end(summary)``: the run's summary was written.

A library callback that is a :class:`Callback` also gets the loop's hooks, from every loop of the
run, in the process that writes that loop's records (one per phase, worker or baseline).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch



@dataclass
class LoopState:
    """Where the loop is. ``epoch``: 1-based, in progress; ``update``: global index of the last
    update (1-based; the epoch's offset at its start); ``lr``: the last update's; ``batch_size``:
    global, samples; ``totals``: float64 (models, 3) on the device, this rank's loss sum, correct
    and samples of the epoch so far; ``norms``: the last update's gradient norms (None before one);
    ``checked``: the divergence guard read those norms (a host sync already happened)."""
    epoch: int
    update: int = 0
    lr: float = 0.0
    batch_size: int = 0
    totals: torch.Tensor | None = None
    norms: torch.Tensor | None = None
    checked: bool = False


class Callback:
    """Base class of the loop's callbacks (module docstring): override the hooks you need."""

    def on_epoch_start(self, state: LoopState) -> None:
        """An epoch begins (``state.totals``: its carried partial sums after a resume)."""

    def on_update_end(self, state: LoopState) -> None:
        """After each update (``state.update``: global index, 1-based)."""

    def on_updates_end(self, state: LoopState) -> None:
        """The epoch's updates are done, before its statistics are gathered."""

    def should_stop(self, epoch: int, train_acc: list, train_loss: list) -> bool:
        """After epoch ``epoch`` (1-based): whether to stop, from each model's training accuracy
        (percent, None for soft targets) and mean loss. Default: never."""
        return False

    def on_epoch_end(self, record: dict) -> None:
        """One record per model, after evaluation; keys added here reach the later callbacks."""

    def on_interrupt(self, state: dict) -> None:
        """A stop signal mid-epoch (``epoch``, ``step``, ``totals``, ``updates``), before
        :class:`~swap.interrupt.Interrupted` is raised."""

    # The run's hooks (swap.tracking), in the process that writes the run's records
    def on_record(self, record: dict) -> None:
        """Each metrics.jsonl record, with ``step`` (updates on the critical path)."""

    def on_phase_end(self, phase: str, result: dict) -> None:
        """A phase (or a phase-2 worker) finished with ``result``."""

    def on_run_end(self, summary: dict) -> None:
        """The run's summary was written."""


class On(Callback):
    """Plain functions as a callback: ``epoch_end(record)`` at every epoch's end, ``update_end(update)``
    after every update (global index, 1-based), ``interrupt(state)`` on a stop signal (so that the
    caller can write a checkpoint); each optional, e.g. ``On(epoch_end=records.append)``."""

    def __init__(self, *, epoch_end: Callable[[dict], None] | None = None,
                 update_end: Callable[[int], None] | None = None, interrupt: Callable[[dict], None] | None = None):
        self.epoch_end, self.update_end, self.interrupt = epoch_end, update_end, interrupt

    def on_epoch_end(self, record: dict) -> None:
        if self.epoch_end is not None:
            self.epoch_end(record)

    def on_update_end(self, state: LoopState) -> None:
        if self.update_end is not None:
            self.update_end(state.update)

    def on_interrupt(self, state: dict) -> None:
        if self.interrupt is not None:
            self.interrupt(state)


class Progress(Callback):
    """A tqdm-like bar advanced by one per update."""

    def __init__(self, bar):
        self.bar = bar

    def on_update_end(self, state: LoopState) -> None:
        self.bar.update(1)


__all__ = ["LoopState", "Callback", "On", "Progress"]
