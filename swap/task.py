"""What training optimises and reports, for any model: how a batch's input reaches the model, the
loss and the metrics (the stopping rules over them: :mod:`swap.stopping`).

The data contract: a sample is ``(input, target)``; ``input`` is a tensor, a tuple of tensors or a
dict of tensors, and the model is called as ``model(x)``, ``model(*x)`` or ``model(**x)``
(:func:`call_model`); ``target`` is any tensor. A sample (and a batch) may also be a
single mapping, a Hugging Face row or collator batch (``input_ids``, ``attention_mask``, ``labels``):
the model is called with ``model(**batch)`` and the target is its ``labels`` (None without them).

The output contract: a model returns a tensor (the prediction), a tuple or list (its first element
is the prediction), or a mapping or object with ``loss`` and/or ``logits`` (a ``transformers``
``ModelOutput``): :func:`prediction` and ``own_loss``. The loss is ``loss_fn(output, target) ->
scalar`` (given the output as the model returned it), else the output's own ``loss`` when it carries
one, else cross-entropy of the prediction over its last dimension (a classifier's (B, K) logits with
(B,) labels and a language model's (B, T, V) logits with (B, T) tokens both work; targets equal to
-100, torch's and Hugging Face's ignore index, do not count).

A causal language model that computes its own loss (a ``transformers`` ``...ForCausalLM``, given
``labels`` equal to its ``input_ids``) scores position t's logits against the label at t + 1. Which
alignment an output uses is found once per :class:`Task`, on the first output that carries both its
own loss and (B, T, V) logits for (B, T) labels: the alignment whose cross-entropy equals the
model's own loss (:meth:`Task.align`). Top-1, top-5 and the counted targets then follow it, so
next-token accuracy needs no setting.

Metrics are counted per target that counts (a sample for a classifier, a token not equal to -100
for a language model): ``loss`` (mean loss), ``top1`` and ``top5`` (accuracy in percent, only where
the output has a prediction and the targets are class indices of it: elsewhere they have no value,
None, never 0%), or a user function ``fn(output, target) -> (sum, count)`` whose value is ``sum /
count``. Micro-batches are weighted by the same count, so a mean loss over counted targets (ours,
or a model's own) accumulates to the mean over the whole batch.
"""
from __future__ import annotations

from collections.abc import Mapping
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import SwapError

METRICS = ("loss", "top1", "top5")
IGNORE_INDEX = -100          # targets that do not count (torch's cross_entropy and Hugging Face's default)


def model_input(batch):
    """The model input of a batch: ``batch`` itself (a tensor or a dict of tensors), or the first
    element of an ``(input, target)`` tuple or list."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def call_model(model: nn.Module, x):
    """``model`` on input ``x`` by the data contract: ``model(x)`` for a tensor, ``model(*x)`` for
    a tuple or list of tensors, ``model(**x)`` for a mapping (a dict, a Hugging Face batch)."""
    if isinstance(x, Mapping):
        return model(**x)
    if isinstance(x, (tuple, list)):
        return model(*x)
    return model(x)


def _field(output, name: str):
    """``output[name]`` of a mapping, or ``output.name`` of an object; None when absent."""
    value = output.get(name) if isinstance(output, Mapping) else getattr(output, name, None)
    return value if isinstance(value, torch.Tensor) else None


def prediction(output) -> torch.Tensor | None:
    """The prediction tensor of a model's output (module docstring): the output itself if it is a
    tensor, a tuple's or list's first element, a mapping's or object's ``logits``; None when it has
    none (an output that carries only its ``loss``)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return prediction(output[0]) if output else None
    return _field(output, "logits")


def own_loss(output) -> torch.Tensor | None:
    """The loss a model computed itself and returned in its output (a mapping's or object's
    ``loss``, as a ``transformers`` model does when given ``labels``); None otherwise."""
    if isinstance(output, (torch.Tensor, tuple, list)):
        return None
    return _field(output, "loss")


def target_count(target, samples: int):
    """The targets of a batch that count: for integer targets the elements not equal to -100 (int64
    tensor on the device: no host sync), for other tensors all of their elements, without targets
    (a model that computes its own loss from its input) the ``samples``."""
    if not isinstance(target, torch.Tensor):
        return samples if target is None else len(target)
    if target.is_floating_point():
        return target.numel()
    return (target != IGNORE_INDEX).sum()


def token_targets(target) -> bool:
    """Whether a batch's targets are class indices per position (an integer tensor (B, T, ...): a
    language model's tokens), so its counted predictions are tokens rather than samples."""
    return isinstance(target, torch.Tensor) and not target.is_floating_point() and target.dim() >= 2


def cross_entropy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits ``output`` (..., K) against class indices ``target`` (...),
    computed in float32 (under autocast the logits may be bfloat16)."""
    if output.dim() > 2:
        return F.cross_entropy(output.float().flatten(0, -2), target.flatten())
    return F.cross_entropy(output.float(), target)


def class_targets(output, target) -> bool:
    """Whether ``target`` holds class indices for the prediction of ``output`` (:func:`prediction`,
    logits (..., K)): an integer tensor shaped like it without its last dimension. Soft or float
    targets (mixup, CutMix, label distributions, regression), missing targets and an output without
    a prediction are not, and have no accuracy."""
    pred = prediction(output)
    return (pred is not None and isinstance(target, torch.Tensor) and not target.is_floating_point()
            and pred.shape[:-1] == target.shape)


def top_k_correct(output, target: torch.Tensor, k: int = 1) -> torch.Tensor:
    """Predictions whose target is among the ``k`` largest logits of the output's prediction
    (int64 scalar, on the device; targets equal to -100 are never correct); 0 when the targets are
    not class indices of it (:func:`class_targets`). The pair as given: :meth:`Task.correct`
    aligns a causal language model's first."""
    if not class_targets(output, target):
        pred = prediction(output)
        device = pred.device if pred is not None else target.device if isinstance(target, torch.Tensor) else None
        return torch.zeros((), dtype=torch.int64, device=device)
    output = prediction(output)
    if k == 1:
        return (output.argmax(-1) == target).sum()
    top = output.topk(min(k, output.shape[-1]), dim=-1).indices
    return (top == target.unsqueeze(-1)).any(-1).sum()


def _next_token_loss(output, target) -> bool | None:
    """Whether the output's own loss scores position t against target t + 1 (a causal language
    model's shift): True when that alignment's cross-entropy equals it (relative 1e-4) and the
    unshifted one does not, else False (a loss of another kind, label smoothing say, keeps the
    targets as given); None when the output cannot tell (no own loss, or not (B, T, V) logits for
    (B, T) integer targets with T >= 2), so that the decision waits for an output that can. Two
    cross-entropies and a host sync, once per :class:`Task`."""
    own, pred = own_loss(output), prediction(output)
    if (own is None or not class_targets(output, target) or pred.dim() < 3 or pred.shape[-2] < 2
            or not (target[..., 1:] != IGNORE_INDEX).any()):
        return None
    with torch.no_grad():
        shifted = cross_entropy(pred[..., :-1, :], target[..., 1:]).item()
        same = cross_entropy(pred, target).item()
    own = own.detach().float().item()
    match = [math.isclose(own, v, rel_tol=1e-4, abs_tol=1e-6) for v in (shifted, same)]
    return match[0] and not match[1]


@dataclass(frozen=True)
class Task:
    """The loss and the metrics of a model (module docstring).

    Attributes:
        loss_fn: ``loss_fn(output, target) -> scalar tensor``; None = ``cross_entropy``.
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
    shift: dict = field(default_factory=dict, compare=False, repr=False)    # {"next_token": bool} once found

    def __post_init__(self):
        unknown = [m for m in self.metrics if m not in METRICS and m not in self.custom]
        if unknown:
            raise SwapError(f"unknown metric {unknown[0]!r} (known: {', '.join(METRICS + tuple(self.custom))}; "
                            f"a metric of your own is a function passed as metrics={{name: fn}})")

    def forward(self, model, x):
        """``model`` on input ``x`` by the data contract."""
        return call_model(model, x)

    def loss(self, output, target) -> torch.Tensor:
        """The scalar loss of a batch: ``loss_fn(output, target)``, else the output's own loss
        (``own_loss``), else the cross-entropy of its prediction (module docstring).

        Raises:
            SwapError: the loss function returned something other than a scalar tensor; no loss
                can be formed (an output with neither loss nor prediction, or a batch without
                targets whose output has no loss of its own).
        """
        loss = self.loss_fn(output, target) if self.loss_fn is not None else own_loss(output)
        if loss is None and self.loss_fn is None:
            pred = prediction(output)
            if pred is None or target is None:
                raise SwapError("no loss to train on: " + ("the model's output has neither a loss nor logits"
                                                           if pred is None else "the batch has no targets (labels) "
                                                           "and the model's output no loss of its own")
                                + "; pass loss_fn, or return a loss or logits from the model")
            loss = cross_entropy(pred, target)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise SwapError(f"the loss function must return a scalar tensor, got {shape}; reduce it "
                            f"(e.g. .mean()) inside loss_fn")
        return loss

    def align(self, output, target):
        """``(output, target)`` paired as the model's own loss pairs them: a causal language model's
        logits without their last position and targets without their first (module docstring);
        as given otherwise. The alignment is found on the first output that tells
        (``_next_token_loss``) and kept for every later batch."""
        if "next_token" not in self.shift and output is not None:
            found = _next_token_loss(output, target)
            if found is not None:
                self.shift["next_token"] = found
        if not self.shift.get("next_token") or not isinstance(target, torch.Tensor):
            return output, target
        pred = prediction(output)
        return (pred[..., :-1, :] if pred is not None else None), target[..., 1:]

    def predictions(self, output, target, samples: int = 0):
        """The predictions of a batch that count (``target_count`` of the aligned targets,
        :meth:`align`: one per target element not equal to -100, a sample or a token; ``samples``
        when there are no targets)."""
        return target_count(self.align(output, target)[1], samples)

    def correct(self, output, target, k: int = 1) -> torch.Tensor:
        """Top-``k`` correct predictions of a batch (``top_k_correct`` of the aligned pair)."""
        return top_k_correct(*self.align(output, target), k)

    def batch_metrics(self, output, target, loss: torch.Tensor | None = None, samples: int = 0) -> dict[str, tuple]:
        """Each configured metric's (sum, count) over a batch, as float64 tensors on the device
        (``top1``/``top5`` count 0, so no value, where the targets are not class indices of the
        output's prediction); ``loss`` (the batch's :meth:`loss`) is needed only when ``loss`` is a
        metric; ``samples``: the batch's samples, counted when it has no targets."""
        device = loss.device if loss is not None else _device(output, target)
        n = torch.as_tensor(self.predictions(output, target, samples), dtype=torch.float64, device=device)
        out = {}
        for m in self.metrics:
            if m == "loss":
                s = loss.detach().double() * n
            elif m in ("top1", "top5"):
                if not class_targets(output, target):
                    out[m] = (n.new_zeros(()), n.new_zeros(()))
                    continue
                s = 100.0 * self.correct(output, target, 1 if m == "top1" else 5).double()
            else:
                s, count = self.custom[m](output, target)
                out[m] = (torch.as_tensor(s, dtype=torch.float64, device=device),
                          torch.as_tensor(count, dtype=torch.float64, device=device))
                continue
            out[m] = (s, n)
        return out


def _device(output, target) -> torch.device:
    pred = prediction(output)
    if pred is not None:
        return pred.device
    return target.device if isinstance(target, torch.Tensor) else torch.device("cpu")


__all__ = ["METRICS", "IGNORE_INDEX", "model_input", "call_model", "prediction", "own_loss", "target_count", "token_targets",
           "cross_entropy", "class_targets", "top_k_correct", "Task"]
