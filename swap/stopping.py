"""When phase 1 ends: the stopping rules over what the train loop computes each epoch.

- :class:`StopAt`: a threshold on a training metric, SWAP's stopping accuracy (Gupta, Akle Serrano,
  DeCoste, ICLR 2020, Algorithm 1), or a training loss to reach (:func:`stop_reached`).
- :class:`Plateau` and :class:`HeldOutPeak`: the rules of the automatic switch
  (:mod:`swap.algorithms.transition`), on the training loss and on held-out accuracy.

Metrics are those of :data:`swap.config.STOP_METRICS`: ``train_acc`` (percent, the worst model's) and
``train_loss`` (mean, the worst model's).
"""
from __future__ import annotations

from .callbacks import Callback
from .config import STOP_METRICS
from .errors import SwapError


class StopAt(Callback):
    """SWAP phase 1's stopping rule (Gupta et al., ICLR 2020, Algorithm 1): stop after the first
    epoch whose ``metric`` meets ``threshold`` (:func:`stop_reached`: ``train_acc``, the
    worst model's training accuracy in percent at least the threshold; ``train_loss``, the worst
    model's mean loss at most it). ``threshold`` None: never."""

    def __init__(self, metric: str = "train_acc", threshold: float | None = None):
        self.metric, self.threshold = metric, threshold

    def should_stop(self, epoch: int, train_acc: list, train_loss: list) -> bool:
        worst = min(train_acc) if self.metric == "train_acc" else max(train_loss)
        return stop_reached(self.metric, worst, self.threshold)


class Plateau:
    """Phase 1's automatic switch (``phase1.stop: auto``, signal ``plateau``): stop after the first
    epoch past the warm-up whose large-batch training loss is less than ``min_gain`` (relative)
    below the loss ``window`` epochs before. The large batch has then stopped making fast
    progress, which is when SWAP hands over to small-batch workers (the paper chose the switch by
    a grid search; Gupta et al., ICLR 2020, Sec. 6 names a principled rule as open work). Free: it
    reads the loss the loop computes anyway.

    ``history``: the losses of epochs already trained (a resumed phase 1), oldest first.
    """

    def __init__(self, window: int, min_gain: float, after_epoch: int, history: list[float] = ()):
        self.window, self.min_gain, self.after = window, min_gain, after_epoch
        self.losses = list(history)
        self.gain: float | None = None

    def __call__(self, epoch: int, train_loss: float) -> bool:
        """Whether to stop after ``epoch`` (1-based), whose training loss is ``train_loss``."""
        self.losses.append(train_loss)
        if len(self.losses) <= self.window:
            return False
        old = self.losses[-1 - self.window]
        self.gain = (old - train_loss) / old if old > 0 else 0.0
        return epoch > self.after and self.gain < self.min_gain


class HeldOutPeak:
    """Phase 1's automatic switch, signal ``holdout``: stop after the first epoch past the warm-up
    that ends ``window`` epochs in a row in which the large-batch model's held-out accuracy (the
    validation split, ``data.holdout``; never the test set) did not beat its best so far by more
    than ``min_delta`` points. This is early stopping with patience (Prechelt, "Early stopping -
    but when?", 1998) applied to the large-batch phase: once more large-batch epochs stop improving
    generalisation, SWAP's small-batch workers take over (Gupta et al., ICLR 2020, Sec. 6 leave the
    transition to a grid search). Cost: one evaluation of the validation split per epoch, no
    updates.

    ``history``: the held-out accuracies (%) of epochs already trained (a resumed phase 1), oldest first.
    """

    def __init__(self, window: int, min_delta: float, after_epoch: int, history: list[float] = ()):
        self.window, self.min_delta, self.after = window, min_delta, after_epoch
        self.best, self.since, self.last = float("-inf"), 0, None
        for accuracy in history:
            self._see(accuracy)

    def _see(self, accuracy: float) -> None:
        self.last = accuracy
        if accuracy > self.best + self.min_delta:
            self.best, self.since = accuracy, 0
        else:
            self.since += 1

    def __call__(self, epoch: int, accuracy: float) -> bool:
        """Whether to stop after ``epoch`` (1-based), whose held-out accuracy is ``accuracy`` (%)."""
        self._see(accuracy)
        return epoch > self.after and self.since >= self.window


def stop_reached(metric: str, value: float, at: float | None) -> bool:
    """Whether a training epoch with ``metric`` = ``value`` meets the stopping rule ``at``: at
    least ``at`` for an accuracy, at most ``at`` for a loss; never when ``at`` is None."""
    if at is None:
        return False
    if metric not in STOP_METRICS:
        raise SwapError(f"no stopping rule on {metric!r}: the train loop computes {', '.join(STOP_METRICS)}")
    return value >= at if STOP_METRICS[metric] == "max" else value <= at




__all__ = ["StopAt", "Plateau", "HeldOutPeak", "stop_reached"]
