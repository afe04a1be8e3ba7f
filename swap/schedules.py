"""Learning-rate schedules as plain functions of the update index (0-based): ``lr_at(step) -> float``.

Before each update the train loop writes ``lr_at(step)`` into every parameter group, scaled by the
group's ``lr_scale`` (:func:`swap.optim.lr.apply_lr`), so one schedule covers any optimizer and keeps
the ratios of a user's per-group LRs (layer-wise LR decay). Lengths are in updates (steps); callers
convert epochs with the loader's updates per epoch (a piecewise schedule's batches:
:class:`swap.data.loader.PiecewiseLoader`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from .errors import SwapError

SHAPES = ("linear", "cosine")          # the decay after the warm-up (warmup_decay)
PHASE2_SHAPES = (*SHAPES, "constant")  # the phase-2 LR of the Trainer integrations (phase2_schedule)

Schedule = Callable[[int], float]


def warmup_decay(peak_lr: float, warmup_steps: int, total_steps: int, shape: str = "linear",
                 min_lr: float = 0.0) -> Schedule:
    """Linear warm-up from ~0 to ``peak_lr`` over ``warmup_steps``, then decay to ``min_lr`` (default
    0) at ``total_steps``.

    The warm-up of Goyal et al. 2017 ("Accurate, Large Minibatch SGD"), used by SWAP's phase 1 and
    with ``warmup_steps=0`` by its phase 2 (Gupta et al., ICLR 2020, Sec. 5 and Tables 5-6).
    Step s < warmup_steps gets ``peak_lr * (s + 1) / warmup_steps``; after it, ``shape`` is
    ``linear`` (straight line to ``min_lr`` at ``total_steps``) or ``cosine`` (half cosine to
    ``min_lr``, as ``torch.optim.lr_scheduler.CosineAnnealingLR``'s ``eta_min``).

    Raises:
        SwapError: ``total_steps < 1``, ``warmup_steps`` outside [0, total_steps], unknown shape,
            ``min_lr`` outside [0, peak_lr].
    """
    if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
        raise SwapError(f"need 0 <= warmup_steps ({warmup_steps}) <= total_steps ({total_steps}), total >= 1")
    if not 0 <= min_lr <= peak_lr:
        raise SwapError(f"need 0 <= min_lr ({min_lr}) <= peak_lr ({peak_lr})")
    if shape not in SHAPES:
        raise SwapError(f"unknown schedule shape '{shape}' ({' | '.join(SHAPES)})")
    decay_steps = max(1, total_steps - warmup_steps)

    def lr_at(step: int) -> float:
        if step < warmup_steps:
            return peak_lr * (step + 1) / warmup_steps
        frac = min(1.0, (step - warmup_steps) / decay_steps)      # 0 at the peak, 1 at the end
        if shape == "linear":                                     # min_lr 0: peak_lr * (1 - frac) exactly
            return min_lr + (peak_lr - min_lr) * (1.0 - frac)
        return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * frac))

    return lr_at


def phase2_schedule(peak_lr: float, total_steps: int, shape: str, min_lr: float = 0.0) -> Schedule:
    """SWAP's phase-2 LR over ``total_steps`` updates without a warm-up (Gupta et al., ICLR 2020,
    Sec. 5): from ``peak_lr`` down to ``min_lr`` (``linear``, the paper's, or ``cosine``:
    :func:`warmup_decay` with ``warmup_steps=0``), or ``peak_lr`` throughout (``constant``).

    Raises:
        SwapError: as :func:`warmup_decay` for ``linear`` and ``cosine`` (an unknown shape among them).
    """
    if shape == "constant":
        return lambda step: peak_lr
    return warmup_decay(peak_lr, 0, total_steps, shape, min_lr)


def cyclic(lr_max: float, lr_min: float, cycle_steps: int) -> Schedule:
    """SWA's cyclic schedule (Izmailov et al. 2018, Sec. 3.1, Eq. 2): within each cycle of
    ``cycle_steps`` updates the LR falls linearly from ``lr_max`` to ``lr_min``; a model is
    sampled at the end of each cycle, where the LR is ``lr_min``.

    Raises:
        SwapError: ``cycle_steps < 1``.
    """
    if cycle_steps < 1:
        raise SwapError(f"cycle_steps must be >= 1, got {cycle_steps}")

    def lr_at(step: int) -> float:
        t = ((step % cycle_steps) + 1) / cycle_steps                 # (0, 1], 1 at the cycle's last update
        return (1.0 - t) * lr_max + t * lr_min

    return lr_at


# ---------------------------------------------------------------------- piecewise segments
@dataclass(frozen=True)
class Segment:
    """Epochs ``[start, end)`` of a piecewise schedule, with their global batch (samples), their
    training image side (pixels; None = the data's own size) and their LR: ``lr = (a, b)`` ramps
    linearly from ``a`` at ``start`` to ``b`` at ``end`` over the fractional epoch (update by
    update); ``a == b`` is a constant. The form of the DAWNBench ImageNet schedules
    (cybertronai/imagenet18_old ``train.py``: ``{'ep': (0, 5), 'lr': (1.0, 2.0)}``, ``sz``, ``bs``)
    that the SWAP paper's ImageNet experiment follows (Gupta et al., ICLR 2020, Sec. 5.2)."""
    start: int
    end: int
    batch_size: int
    lr: tuple[float, float]
    image_size: int | None = None

    def lr_at(self, t: float) -> float:
        """The LR at fractional schedule epoch ``t`` in ``[start, end]``."""
        a, b = self.lr
        return a + (b - a) * (t - self.start) / (self.end - self.start)


def parse_segments(raw: list, where: str) -> list[Segment]:
    """Segments from their config form: a list of ``{epochs: [start, end], batch_size: B, lr: x or
    [a, b], image_size: S}`` (``image_size`` optional), which must tile ``[0, last end)`` in order,
    without overlaps or gaps.

    Raises:
        SwapError: naming ``where`` (e.g. ``phase1.segments``), the segment and what is wrong.
    """
    out: list[Segment] = []
    for k, seg in enumerate(raw):
        at = f"{where}[{k}]"
        if not isinstance(seg, dict):
            raise SwapError(f"{at} must be a mapping {{epochs: [start, end], batch_size, lr, image_size}}, got {seg!r}")
        unknown = set(seg) - {"epochs", "batch_size", "lr", "image_size"}
        if unknown or not {"epochs", "batch_size", "lr"} <= set(seg):
            raise SwapError(f"{at} needs epochs, batch_size and lr (and optionally image_size), got keys "
                            f"{sorted(seg)}")
        epochs, batch, lr, size = seg["epochs"], seg["batch_size"], seg["lr"], seg.get("image_size")
        if not (isinstance(epochs, list) and len(epochs) == 2 and all(_is_int(e) for e in epochs)
                and 0 <= epochs[0] < epochs[1]):
            raise SwapError(f"{at}.epochs must be [start, end] with integers 0 <= start < end, got {epochs!r}")
        if not (_is_int(batch) and batch >= 1):
            raise SwapError(f"{at}.batch_size must be an integer >= 1, got {batch!r}")
        lrs = lr if isinstance(lr, list) else [lr]
        if not (len(lrs) in (1, 2) and all(_is_num(v) and v >= 0 for v in lrs) and max(lrs) > 0):
            raise SwapError(f"{at}.lr must be a number > 0 or a ramp [start, end] of numbers >= 0, got {lr!r}")
        if size is not None and not (_is_int(size) and size >= 1):
            raise SwapError(f"{at}.image_size must be an integer >= 1 (pixels) or null, got {size!r}")
        want = out[-1].end if out else 0
        if epochs[0] != want:
            what = ("overlaps the one before" if epochs[0] < want else
                    "leaves a gap after the one before" if out else "leaves a gap at the start")
            raise SwapError(f"{at}.epochs={epochs!r} {what}: segments must tile the epochs in order, so this "
                            f"one must start at epoch {want}")
        out.append(Segment(int(epochs[0]), int(epochs[1]), int(batch), (float(lrs[0]), float(lrs[-1])),
                           None if size is None else int(size)))
    return out


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def epoch_shape(loader, epoch: int) -> tuple[int, int, int]:
    """(global update index of ``epoch``'s first update, updates in ``epoch``, global batch) of a
    train-loop loader: a :class:`swap.data.loader.PiecewiseLoader`'s own, else ``len(loader)`` updates every epoch
    of ``loader.batch_size`` samples."""
    if hasattr(loader, "shape"):
        return loader.shape(epoch)
    n = len(loader)
    return epoch * n, n, loader.batch_size


def updates_between(loader, first_epoch: int, end_epoch: int) -> int:
    """Updates of epochs ``first_epoch .. end_epoch - 1`` of a train-loop loader."""
    return sum(epoch_shape(loader, e)[1] for e in range(first_epoch, end_epoch))


def samples_between(loader, first_epoch: int, end_epoch: int) -> int:
    """Training samples (global batches x updates) of epochs ``first_epoch .. end_epoch - 1``."""
    return sum(n * b for _, n, b in (epoch_shape(loader, e) for e in range(first_epoch, end_epoch)))


__all__ = ["SHAPES", "PHASE2_SHAPES", "Schedule", "warmup_decay", "phase2_schedule", "cyclic", "Segment", "parse_segments", "epoch_shape",
           "updates_between", "samples_between"]
