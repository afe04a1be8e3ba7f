"""LARS: layer-wise adaptive rate scaling (You, Gitman, Ginsburg 2017, "Large Batch Training of
Convolutional Networks" / "Scaling SGD Batch Size to 32K for ImageNet Training", Algorithm 1).

For each parameter tensor w (a "layer") with gradient g, weight decay beta and trust coefficient eta::

    local_lr = lr * eta * ||w|| / (||g|| + beta * ||w|| + eps)          (Alg. 1, line 5, times the global LR)
    v        = m * v + local_lr * (g + beta * w)                          (Alg. 1, line 6)
    w        = w - v                                                     (Alg. 1, line 7)

Choices where implementations differ, written down:

- **Where the LR enters**: inside the momentum buffer, as in the paper's Algorithm 1 (torch's SGD keeps
  it outside: ``v = m v + g; w -= lr v``). A schedule's change of LR then does not rescale the momentum
  already accumulated.
- **Trust clipping** (``clip=True``, NVIDIA apex's LARC "clip" mode): the local LR is
  ``min(lr * eta * ratio, lr)`` written as ``lr * min(eta * ratio, 1)``, so no layer steps faster than
  the global LR; off by default (the paper's form).
- **eps** (1e-9) only guards the division; a tensor whose weight or gradient norm is 0 (a fresh
  zero-initialised layer) gets trust ratio 1, as in the reference implementations.
- **1-D parameters** (biases, normalisation scales and shifts): with ``exclude_1d=True`` (default, as
  in every reference implementation) they are neither decayed nor adapted: plain momentum SGD at the
  global LR.
- ``nesterov=True`` applies Nesterov's look-ahead to the same buffer: ``w -= local_lr * d + m * v``.

Defaults: trust coefficient 0.001 (the paper's eta), momentum 0.9, weight decay 5e-4. The step runs on
lists of tensors (``torch._foreach_*``) with the trust ratios kept on the device: no host sync per step.
"""
from __future__ import annotations

import torch

from ..errors import SwapError
from .base import LayerwiseOptimizer


def _check(lr: float, momentum: float, weight_decay: float, trust_coefficient: float, eps: float) -> None:
    if lr < 0 or not 0 <= momentum < 1 or weight_decay < 0 or trust_coefficient < 0 or eps < 0:
        raise SwapError(f"LARS needs lr >= 0, momentum in [0, 1), weight_decay >= 0, trust_coefficient >= 0 and "
                        f"eps >= 0; got lr={lr}, momentum={momentum}, weight_decay={weight_decay}, "
                        f"trust_coefficient={trust_coefficient}, eps={eps}")


class LARS(LayerwiseOptimizer):
    """LARS (module docstring), a ``torch.optim.Optimizer``: per parameter group ``lr``,
    ``momentum``, ``weight_decay``, ``trust_coefficient``, ``eps``, ``nesterov``, ``clip``,
    ``exclude_1d``. State per parameter: ``momentum_buffer`` (same shape and dtype).

    Raises (constructor):
        SwapError: a negative LR, weight decay, trust coefficient or eps, or momentum outside [0, 1).
    """

    def __init__(self, params, *, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 5e-4,
                 trust_coefficient: float = 0.001, eps: float = 1e-9, nesterov: bool = False, clip: bool = False,
                 exclude_1d: bool = True):
        _check(lr, momentum, weight_decay, trust_coefficient, eps)
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      trust_coefficient=trust_coefficient, eps=eps, nesterov=nesterov, clip=clip,
                                      exclude_1d=exclude_1d))

    def _update(self, group: dict, params: list[torch.Tensor]) -> None:
        """One LARS update of ``params`` (the group's tensors with a gradient)."""
        lr, wd = group["lr"], group["weight_decay"]
        adapted = [p for p in params if self.adapted(group, p)]
        plain = [p for p in params if not self.adapted(group, p)]
        if adapted:
            grads = [p.grad for p in adapted]
            w_norm = torch.stack(torch._foreach_norm(adapted))
            g_norm = torch.stack(torch._foreach_norm(grads))
            ratio = group["trust_coefficient"] * w_norm / (g_norm + wd * w_norm + group["eps"])
            ratio = torch.where((w_norm > 0) & (g_norm > 0), ratio, torch.ones_like(ratio))
            if group["clip"]:
                ratio = ratio.clamp(max=1.0)                      # local LR at most the global LR
            direction = torch._foreach_add(grads, adapted, alpha=wd) if wd else grads     # g + beta w
            self._momentum_step(adapted, direction, list((lr * ratio).to(adapted[0].dtype).unbind()), group)
        if plain:
            self._momentum_step(plain, [p.grad for p in plain], lr, group)

    def _momentum_step(self, params: list, direction: list, local_lr, group: dict) -> None:
        """``v = m v + local_lr d``, then ``w -= v`` (or Nesterov's ``w -= local_lr d + m v``), for
        ``params`` with directions ``direction``; ``local_lr`` a float or one 0-d tensor per parameter."""
        m = group["momentum"]
        bufs = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            bufs.append(state["momentum_buffer"])
        scalar = isinstance(local_lr, float)
        if m:
            torch._foreach_mul_(bufs, m)
        if scalar:
            torch._foreach_add_(bufs, direction, alpha=local_lr)
        else:
            torch._foreach_addcmul_(bufs, direction, local_lr)
        if not group["nesterov"]:
            torch._foreach_sub_(params, bufs)
            return
        if scalar:
            torch._foreach_add_(params, direction, alpha=-local_lr)
        else:
            torch._foreach_addcmul_(params, direction, torch._foreach_neg(local_lr))
        torch._foreach_add_(params, bufs, alpha=-m)


__all__ = ["LARS"]
