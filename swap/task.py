"""What training optimises and reports, for any model: how a batch's input reaches the model, the
loss, the metrics, and the phase-1 stopping rule over them.

The data contract: a sample is ``(input, target)``; ``input`` is a tensor, a tuple of tensors or a
dict of tensors, and the model is called as ``model(x)``, ``model(*x)`` or ``model(**x)``
(:func:`swap.averaging.call_model`); ``target`` is any tensor. The loss is ``loss_fn(output,
target) -> scalar`` (default: cross-entropy over the last dimension, so a classifier's (B, K)
logits with (B,) labels and a language model's (B, T, V) logits with (B, T) tokens both work).
Metrics are counted per prediction (a sample for a classifier, a token for a language model):
``loss`` (mean loss), ``top1`` and ``top5`` (accuracy in percent, for integer targets), or a
user function ``fn(output, target) -> (sum, count)`` whose value is ``sum / count``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from .averaging import call_model
from .config import STOP_METRICS, SwapError

METRICS = ("loss", "top1", "top5")


def cross_entropy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits ``output`` (..., K) against class indices ``target`` (...),
    computed in float32 (under autocast the logits may be bfloat16)."""
    if output.dim() > 2:
        return F.cross_entropy(output.float().flatten(0, -2), target.flatten())
    return F.cross_entropy(output.float(), target)


def class_targets(output: torch.Tensor, target) -> bool:
    """Whether ``target`` holds class indices for the logits ``output`` (..., K): an integer tensor
    shaped like ``output`` without its last dimension. Soft or float targets (mixup, CutMix, label
    distributions, regression) are not, and have no accuracy."""
    return isinstance(target, torch.Tensor) and not target.is_floating_point() and output.shape[:-1] == target.shape


def top_k_correct(output: torch.Tensor, target: torch.Tensor, k: int = 1) -> torch.Tensor:
    """Predictions whose target is among the ``k`` largest logits (int64 scalar, on the device);
    0 when the target is not a tensor of class indices (:func:`class_targets`)."""
    if not class_targets(output, target):
        return torch.zeros((), dtype=torch.int64, device=output.device)
    if k == 1:
        return (output.argmax(-1) == target).sum()
    top = output.topk(min(k, output.shape[-1]), dim=-1).indices
    return (top == target.unsqueeze(-1)).any(-1).sum()


@dataclass(frozen=True)
class Task:
    """The loss and the metrics of a model (module docstring).

    Attributes:
        loss_fn: ``loss_fn(output, target) -> scalar tensor``; None = :func:`cross_entropy`.
        metrics: names reported by evaluation: ``loss``, ``top1``, ``top5`` and the keys of ``custom``.
        custom: user metrics, ``name -> fn(output, target) -> (sum, count)`` (tensors or numbers).
        class_targets: the training targets are class indices (:func:`class_targets`); False
            (soft targets): the training accuracy is not reported (None) and no rule may stop on it.
    Raises (constructor):
        SwapError: an unknown metric name.
    """
    loss_fn: Callable | None = None
    metrics: tuple[str, ...] = ("top1", "loss")
    custom: dict = field(default_factory=dict)
    class_targets: bool = True

    def __post_init__(self):
        unknown = [m for m in self.metrics if m not in METRICS and m not in self.custom]
        if unknown:
            raise SwapError(f"unknown metric {unknown[0]!r} (known: {', '.join(METRICS + tuple(self.custom))}; "
                            f"a metric of your own is a function passed as metrics={{name: fn}})")

    def forward(self, model, x):
        """``model`` on input ``x`` by the data contract."""
        return call_model(model, x)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The scalar loss of a batch.

        Raises:
            SwapError: the loss function returned something other than a scalar tensor.
        """
        loss = cross_entropy(output, target) if self.loss_fn is None else self.loss_fn(output, target)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise SwapError(f"the loss function must return a scalar tensor, got {shape}; reduce it "
                            f"(e.g. .mean()) inside loss_fn")
        return loss

    def predictions(self, output: torch.Tensor, target: torch.Tensor) -> int:
        """Predictions in a batch: one per target element (a sample, or a token)."""
        return target.numel() if isinstance(target, torch.Tensor) else len(target)

    def batch_metrics(self, output: torch.Tensor, target: torch.Tensor,
                      loss: torch.Tensor | None = None) -> dict[str, tuple]:
        """Each configured metric's (sum, count) over a batch, as float64 tensors on the device;
        ``loss`` (the batch's :meth:`loss`) is needed only when ``loss`` is a metric."""
        n = float(self.predictions(output, target))
        out = {}
        for m in self.metrics:
            if m == "loss":
                s = loss.detach().double() * n
            elif m in ("top1", "top5"):
                s = 100.0 * top_k_correct(output, target, 1 if m == "top1" else 5).double()
            else:
                s, count = self.custom[m](output, target)
                out[m] = (torch.as_tensor(s, dtype=torch.float64, device=output.device),
                          torch.as_tensor(count, dtype=torch.float64, device=output.device))
                continue
            out[m] = (s, output.new_full((), n, dtype=torch.float64))
        return out


def check_stop_metric(metric: str) -> str:
    """``metric`` if the train loop computes it (:data:`STOP_METRICS`).

    Raises:
        SwapError: a stop metric that is never computed.
    """
    if metric not in STOP_METRICS and metric != "auto":
        raise SwapError(f"phase1.stop.metric={metric!r} is never computed during training "
                        f"(known: {', '.join(STOP_METRICS)})")
    return metric


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
    return value >= at if STOP_METRICS[check_stop_metric(metric)] == "max" else value <= at
