"""Averaging along one trajectory: the exponential moving average of the weights (EMA) and the
latest-weights average (LAWA), as callbacks of the train loop.

SWAP averages *across* workers; these average *along* one model's own path, so they run in any
phase: a large-batch baseline (``sgd_large.average: ema``, the methods ``ema-large`` and
``lawa-large``) or each SWAP phase-2 worker before the average over workers
(``phase2.average_along``).

- :class:`EMA`: ``avg <- decay x avg + (1 - decay) x weights`` after every ``every``-th update from
  update ``start`` on (Polyak & Juditsky 1992; the ``ModelEma`` of timm and ``EMA`` of Composer). The
  update is ``torch.optim.swa_utils.get_ema_multi_avg_fn`` (one foreach ``lerp_`` over all tensors).
  Options as practitioners use them: a half-life in updates instead of the decay (Composer), a
  decay warm-up ``min(decay, 1 - (1 + t) ** -power)`` at the t-th EMA update (timm's
  ``ModelEmaV3``; Karras et al. 2024 use power 2/3 to 3/4), the average kept on the CPU.
- :class:`LAWA`: the uniform mean of the latest ``k`` snapshots, one every ``every`` epochs or
  updates (Kaddour, "Stop Wasting My Time!", 2022; Sanyal et al., "Early Weight Averaging meets High
  Learning Rates for LLM Pre-training", 2023).

BN statistics: with ``buffers="recompute"`` (the default) an average holds parameters only; its
BN running statistics are recomputed by the exact pass (:func:`swap.averaging.recompute_bn`) before
any evaluation, as for SWA and SWAP's phase 3. With ``buffers="average"`` floating-point buffers
are averaged like the parameters (integer ones, such as ``num_batches_tracked``, are the model's).

An average is never evaluated before its first update (:meth:`Along.averaged_model` refuses).
Its state (:meth:`Along.state_dict`) travels in the resumable checkpoint beside the optimizer's
(:class:`Carried`), so a killed and resumed phase ends with the uninterrupted run's average, bit
for bit on CPU.
"""
from __future__ import annotations

import copy
from collections import deque
from typing import Callable

import torch
from torch import nn
from torch.optim.swa_utils import get_ema_multi_avg_fn

from .averaging import bn_buffer_names
from .callbacks import Callback, LoopState
from .config import ALONG_BUFFERS as BUFFERS, ALONG_DEVICES as DEVICES
from .errors import SwapError


class Along(Callback):
    """Base of :class:`EMA` and :class:`LAWA`: which tensors of ``model`` are averaged, where they
    live, the averaged copy, and the state a checkpoint carries.

    Args:
        model: the trained model (plain, not DDP-wrapped); its parameters are read, never written.
        start: updates of the phase (1-based global index) before the average takes its first
            sample; an update ``u <= start`` is not sampled.
        buffers: ``recompute`` or ``average`` (:data:`swap.config.ALONG_BUFFERS`).
        device: ``same`` (the model's) or ``cpu`` (:data:`swap.config.ALONG_DEVICES`).
    Raises:
        SwapError: a bad option (one line naming it).
    """
    kind = "along"

    def __init__(self, model: nn.Module, *, start: int = 0, buffers: str = "recompute", device: str = "same"):
        if buffers not in BUFFERS or device not in DEVICES or start < 0:
            raise SwapError(f"{self.kind}: buffers must be one of {BUFFERS}, device one of {DEVICES} and start >= 0 "
                            f"(updates), got {buffers!r}, {device!r}, {start}")
        self.model, self.start, self.buffers, self.device = model, start, buffers, device
        self.names = [n for n, _ in model.named_parameters()]
        if buffers == "average":
            self.names += [n for n, b in model.named_buffers() if b.is_floating_point()]
        state = dict(model.named_parameters())
        state.update(model.named_buffers())
        self.sources = [state[n] for n in self.names]     # the model's tensors, found once (updated in place)
        self.count = 0                          # samples taken (EMA updates, LAWA snapshots)

    # ------------------------------------------------------------------ the averaged tensors
    def current(self) -> list[torch.Tensor]:
        """The model's tensors that are averaged, detached, on the average's device."""
        out = [t.detach() for t in self.sources]
        return [t.to("cpu", copy=True) for t in out] if self.device == "cpu" else out

    def averaged(self) -> list[torch.Tensor]:
        """The average's tensors, in the order of ``names`` (the averaged parameters, then buffers)."""
        raise NotImplementedError

    def averaged_model(self) -> nn.Module:
        """A copy of the model holding the average: averaged parameters (and floating buffers
        with ``buffers="average"``); the other buffers are the model's, to be recomputed
        (:func:`evaluate_average` runs the BN pass).

        Raises:
            SwapError: the average has no sample yet (it is never evaluated before its first update).
        """
        if not self.count:
            raise SwapError(f"the {self.kind} average has no sample yet (its start is update {self.start}); "
                            f"it cannot be evaluated before its first update")
        out = copy.deepcopy(self.model)
        state = dict(out.named_parameters())
        state.update(out.named_buffers())
        with torch.no_grad():
            for name, value in zip(self.names, self.averaged()):
                state[name].copy_(value)
        return out

    def due(self, update: int, every: int) -> bool:
        """Whether update ``update`` (1-based) is sampled: past ``start``, every ``every``-th after it."""
        return update > self.start and (update - self.start) % every == 0

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """``{"kind", "count", "names", "tensors"}``: what a checkpoint carries (tensors, ints and
        strings only: :func:`torch.load` with ``weights_only`` reads it back)."""
        return {"kind": self.kind, "count": self.count, "names": list(self.names), "tensors": self._tensors()}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s ``state``.

        Raises:
            SwapError: a state of another kind or model.
        """
        if state.get("kind") != self.kind or state.get("names") != self.names:
            raise SwapError(f"the checkpoint's trajectory average ({state.get('kind')}) does not match this run's "
                            f"{self.kind} over this model")
        self.count = state["count"]
        self._load(state["tensors"])

    def _tensors(self):
        raise NotImplementedError

    def _load(self, tensors) -> None:
        raise NotImplementedError


class EMA(Along):
    """Exponential moving average of the weights (module docstring), a train-loop callback.

    After update ``u`` (1-based) with ``u > start`` and ``(u - start) % every == 0``: the first
    sample copies the weights; the t-th after it (t = 1, 2, ...) does
    ``avg <- d_t avg + (1 - d_t) w`` (``torch._foreach_lerp_``, via
    ``swa_utils.get_ema_multi_avg_fn(d_t)``), with ``d_t = decay``, or ``0.5 ** (every / half_life)``
    when ``half_life`` (updates) is given, capped by the warm-up ``1 - (1 + t) ** -warmup_power``
    when ``warmup_power > 0``.

    Args:
        model: as :class:`Along`; decay in [0, 1); half_life > 0 or None; warmup_power >= 0; every >= 1.
    Raises:
        SwapError: a bad option.
    """
    kind = "ema"

    def __init__(self, model: nn.Module, decay: float = 0.999, *, half_life: float | None = None,
                 warmup_power: float = 0.0, start: int = 0, every: int = 1, buffers: str = "recompute",
                 device: str = "same"):
        super().__init__(model, start=start, buffers=buffers, device=device)
        if not 0 <= decay < 1 or (half_life is not None and half_life <= 0) or warmup_power < 0 or every < 1:
            raise SwapError(f"ema: decay must be in [0, 1), half_life > 0 (updates), warmup_power >= 0 and every >= 1, "
                            f"got {decay}, {half_life}, {warmup_power}, {every}")
        self.decay = 0.5 ** (every / half_life) if half_life else decay
        self.warmup_power, self.every = warmup_power, every
        self.values: list[torch.Tensor] = []

    def decay_at(self, t: int) -> float:
        """The decay of the t-th EMA update after the first sample (t >= 1)."""
        if self.warmup_power:
            return min(self.decay, 1.0 - (1.0 + t) ** -self.warmup_power)
        return self.decay

    @torch.no_grad()
    def update(self) -> None:
        """Fold the model's current weights into the average (one sample)."""
        current = self.current()
        if not self.count:
            self.values = [t.clone() for t in current]
        else:
            get_ema_multi_avg_fn(self.decay_at(self.count))(self.values, current, self.count)
        self.count += 1

    def on_update_end(self, state: LoopState) -> None:
        if self.due(state.update, self.every):
            self.update()

    def averaged(self) -> list[torch.Tensor]:
        return self.values

    def _tensors(self):
        return self.values

    def _load(self, tensors) -> None:
        self.values = [t.to(v.device) for t, v in zip(tensors, self.current())]


class LAWA(Along):
    """Latest weights average (module docstring), a train-loop callback: the uniform mean of the
    latest ``k`` snapshots of the weights, one at the end of every ``every``-th epoch
    (``unit="epochs"``) or after every ``every``-th update (``unit="updates"``), counted from update
    ``start``. Fewer than ``k`` snapshots so far: their mean.

    Args:
        model: as :class:`Along`; k >= 1; every >= 1; unit ``epochs`` or ``updates``.
    Raises:
        SwapError: a bad option.
    """
    kind = "lawa"

    def __init__(self, model: nn.Module, k: int = 5, *, every: int = 1, unit: str = "epochs", start: int = 0,
                 buffers: str = "recompute", device: str = "same"):
        super().__init__(model, start=start, buffers=buffers, device=device)
        if k < 1 or every < 1 or unit not in ("epochs", "updates"):
            raise SwapError(f"lawa: k >= 1, every >= 1 and unit epochs or updates, got {k}, {every}, {unit!r}")
        self.k, self.every, self.unit = k, every, unit
        self.snapshots: deque[list[torch.Tensor]] = deque(maxlen=k)

    @torch.no_grad()
    def snapshot(self) -> None:
        """Keep the model's current weights as the newest snapshot (the oldest of k drops out)."""
        self.snapshots.append([t.clone() for t in self.current()])
        self.count += 1

    def on_update_end(self, state: LoopState) -> None:
        if self.unit == "updates" and self.due(state.update, self.every):
            self.snapshot()

    def on_updates_end(self, state: LoopState) -> None:
        if self.unit == "epochs" and state.update > self.start and state.epoch % self.every == 0:
            self.snapshot()

    @torch.no_grad()
    def averaged(self) -> list[torch.Tensor]:
        """The mean of the kept snapshots: their sum, oldest first, divided by their number."""
        total = [t.clone() for t in self.snapshots[0]]
        for snap in list(self.snapshots)[1:]:
            torch._foreach_add_(total, snap)
        torch._foreach_div_(total, len(self.snapshots))
        return total

    def _tensors(self):
        return [list(s) for s in self.snapshots]

    def _load(self, tensors) -> None:
        like = self.current()
        self.snapshots = deque(([t.to(v.device) for t, v in zip(snap, like)] for snap in tensors), maxlen=self.k)


class Carried:
    """An optimizer and the trajectory average that travel together in a resumable checkpoint:
    what :class:`swap.resumable.Unit` saves as its ``optimizer`` (``state_dict`` /
    ``load_state_dict`` of both, in one file written atomically with the weights)."""

    def __init__(self, optimizer, average: Along):
        self.optimizer, self.average = optimizer, average

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "average": self.average.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"optimizer", "average"}:
            raise KeyError("the checkpoint has no trajectory average (it was written by a run without one)")
        self.optimizer.load_state_dict(state["optimizer"])
        self.average.load_state_dict(state["average"])


def build(cfg, kind: str, model: nn.Module) -> Along | None:
    """The average ``kind`` (:data:`swap.config.ALONG`) over ``model`` with the settings of config sections
    ``ema`` or ``lawa`` (:class:`swap.config.EMAConfig`, :class:`swap.config.LAWAConfig`); None for ``none``."""
    if kind == "ema":
        e = cfg.ema
        return EMA(model, e.decay, half_life=e.half_life or None, warmup_power=e.warmup_power, start=e.start,
                   every=e.every, buffers=e.buffers, device=e.device)
    if kind == "lawa":
        a = cfg.lawa
        return LAWA(model, a.k, every=a.every, unit=a.unit, start=a.start, buffers=a.buffers, device=a.device)
    return None


def evaluate_average(average: Along, recompute_bn: Callable[[nn.Module], None],
                     evaluate: Callable[[nn.Module], dict]) -> tuple[nn.Module | None, dict | None]:
    """The averaged model and its evaluation: ``recompute_bn(model)`` first when the average does not
    carry buffers and the model has BN layers (the exact pass), then ``evaluate(model)``. Returns
    ``(None, None)`` when the average has no sample yet: it is never evaluated before its first update."""
    if not average.count:
        return None, None
    model = average.averaged_model()
    if average.buffers == "recompute" and bn_buffer_names(model):
        recompute_bn(model)
    return model, evaluate(model)


def summary_of(average: Along, evaluation: dict | None) -> dict:
    """The record of an average for a result or summary: ``{"kind", "samples", "test_acc"}``
    (percent; None without a sample or an accuracy)."""
    return {"kind": average.kind, "samples": average.count,
            "test_acc": None if evaluation is None else evaluation.get("top1")}


__all__ = ["Along", "EMA", "LAWA", "Carried", "build", "evaluate_average",
           "summary_of"]
