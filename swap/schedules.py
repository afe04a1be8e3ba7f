"""Learning-rate schedules as plain functions of the update index (0-based): ``lr_at(step) -> float``.

The train loop writes ``lr_at(step)`` into every parameter group before each update, so one
schedule covers any optimizer. Lengths are in updates (steps); callers convert epochs with the
loader's updates per epoch.
"""
from __future__ import annotations

import math
from typing import Callable

Schedule = Callable[[int], float]


def warmup_decay(peak_lr: float, warmup_steps: int, total_steps: int, shape: str = "linear") -> Schedule:
    """Linear warm-up from ~0 to ``peak_lr`` over ``warmup_steps``, then decay to 0 at ``total_steps``.

    The warm-up of Goyal et al. 2017 ("Accurate, Large Minibatch SGD"), used by SWAP's phase 1 and
    with ``warmup_steps=0`` by its phase 2 (Gupta et al., ICLR 2020, Sec. 5 and Tables 5-6).
    Step s < warmup_steps gets ``peak_lr * (s + 1) / warmup_steps``; after it, ``shape`` is
    ``linear`` (straight line to 0 at ``total_steps``) or ``cosine`` (half cosine to 0).

    Raises:
        ValueError: ``total_steps < 1``, ``warmup_steps`` outside [0, total_steps], unknown shape.
    """
    if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"need 0 <= warmup_steps ({warmup_steps}) <= total_steps ({total_steps}), total >= 1")
    if shape not in ("linear", "cosine"):
        raise ValueError(f"unknown schedule shape '{shape}' (linear | cosine)")
    decay_steps = max(1, total_steps - warmup_steps)

    def lr_at(step: int) -> float:
        if step < warmup_steps:
            return peak_lr * (step + 1) / warmup_steps
        frac = min(1.0, (step - warmup_steps) / decay_steps)      # 0 at the peak, 1 at the end
        if shape == "linear":
            return peak_lr * (1.0 - frac)
        return peak_lr * 0.5 * (1.0 + math.cos(math.pi * frac))

    return lr_at


def cyclic(lr_max: float, lr_min: float, cycle_steps: int) -> Schedule:
    """SWA's cyclic schedule (Izmailov et al. 2018, Sec. 3.1, Eq. 2): within each cycle of
    ``cycle_steps`` updates the LR falls linearly from ``lr_max`` to ``lr_min``; a model is
    sampled at the end of each cycle, where the LR is ``lr_min``.

    Raises:
        ValueError: ``cycle_steps < 1``.
    """
    if cycle_steps < 1:
        raise ValueError(f"cycle_steps must be >= 1, got {cycle_steps}")

    def lr_at(step: int) -> float:
        t = ((step % cycle_steps) + 1) / cycle_steps                 # (0, 1], 1 at the cycle's last update
        return (1.0 - t) * lr_max + t * lr_min

    return lr_at
