"""LAMB: layer-wise adaptive moments for batch training (You, Li, Reddi, Hseu, Kumar, Bhojanapalli, Song,
Demmel, Keutzer, Hsieh, ICLR 2020, "Large Batch Optimization for Deep Learning: Training BERT in 76
minutes", Algorithm 2, the final version).

For each parameter tensor x with gradient g at step t (from 1), betas (b1, b2), weight decay lambda::

    m = b1 m + (1 - b1) g                 v = b2 v + (1 - b2) g^2          (Adam's moments)
    r = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)                    (bias-corrected)
    u = r + lambda x
    x = x - lr * (phi(||x||) / ||u||) * u                                  (the trust ratio, phi = identity)

Choices where implementations differ, written down:

- **Bias correction**: on, as in the paper's Algorithm 2 (some implementations, e.g. NVIDIA's for BERT,
  drop it).
- **eps** (1e-6, the paper's) is added to sqrt(v-hat), outside the square root, as Adam does.
- **phi**: the identity, unclipped (the paper allows clipping ||x|| to [gamma_l, gamma_u]; no
  reference setting was published); a tensor whose weight or update norm is 0 gets trust ratio 1.
- **1-D parameters** (biases, normalisation weights): with ``exclude_1d=True`` (default, as in the
  reference BERT code) they are neither decayed nor adapted: a plain Adam step at the global LR.

Defaults: betas (0.9, 0.999), eps 1e-6, weight decay 0.01 (the paper's BERT setting). The step runs on
lists of tensors (``torch._foreach_*``), trust ratios on the device.
"""
from __future__ import annotations

import math

import torch

from ..errors import SwapError
from .base import LayerwiseOptimizer


class LAMB(LayerwiseOptimizer):
    """LAMB (module docstring), a ``torch.optim.Optimizer``: per parameter group ``lr``, ``betas``,
    ``eps``, ``weight_decay``, ``exclude_1d``. State per parameter: ``step`` (int, updates taken),
    ``exp_avg`` and ``exp_avg_sq`` (same shape and dtype as the parameter).

    Raises (constructor):
        SwapError: a negative LR, eps or weight decay, or a beta outside [0, 1).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.01, exclude_1d: bool = True):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise SwapError(f"LAMB needs lr >= 0, eps >= 0, weight_decay >= 0 and betas in [0, 1); got lr={lr}, "
                            f"betas={tuple(betas)}, eps={eps}, weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      exclude_1d=exclude_1d))

    def _update(self, group: dict, params: list[torch.Tensor]) -> None:
        """One LAMB update of ``params`` (the group's tensors with a gradient)."""
        (b1, b2), lr, wd, eps = group["betas"], group["lr"], group["weight_decay"], group["eps"]
        for p in params:
            state = self.state[p]
            if not state:
                state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
            state["step"] += 1
        grads = [p.grad for p in params]
        m = [self.state[p]["exp_avg"] for p in params]
        v = [self.state[p]["exp_avg_sq"] for p in params]
        torch._foreach_lerp_(m, grads, 1 - b1)                                    # m = b1 m + (1 - b1) g
        torch._foreach_mul_(v, b2)
        torch._foreach_addcmul_(v, grads, grads, value=1 - b2)                    # v = b2 v + (1 - b2) g^2
        t = [self.state[p]["step"] for p in params]
        bc1 = [1 - b1 ** k for k in t]
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, [math.sqrt(1 - b2 ** k) for k in t])
        torch._foreach_add_(denom, eps)                                           # sqrt(v-hat) + eps
        torch._foreach_reciprocal_(denom)           # in place: a fresh buffer would cost a page-faulting allocation
        torch._foreach_mul_(denom, m)
        scaled = denom                                                            # r * (1 - b1^t)
        adapt = [self.adapted(group, p) for p in params]
        owners = [p for p, a in zip(params, adapt) if a]
        if owners:
            # u = r + lambda x = (scaled + lambda (1 - b1^t) x) / (1 - b1^t): the trust ratio
            # ||x|| / ||u|| times u is ||x|| / ||u'|| times u' with u' = scaled + lambda (1 - b1^t) x
            u = [r for r, a in zip(scaled, adapt) if a]
            c = [k for k, a in zip(bc1, adapt) if a]
            if wd and len(set(c)) == 1:
                torch._foreach_add_(u, owners, alpha=wd * c[0])
            elif wd:
                for x, r, k in zip(owners, u, c):
                    r.add_(x, alpha=wd * k)
            w_norm = torch.stack(torch._foreach_norm(owners))
            u_norm = torch.stack(torch._foreach_norm(u))
            ratio = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm,
                                1 / torch.tensor(c, dtype=w_norm.dtype, device=w_norm.device))   # trust 1
            torch._foreach_addcmul_(owners, u, list((-lr * ratio).to(owners[0].dtype).unbind()))
        plain = [(p, r, k) for p, r, k, a in zip(params, scaled, bc1, adapt) if not a]
        if plain:                                                                 # Adam's step: lr r
            steps = [r for _, r, _ in plain]
            torch._foreach_mul_(steps, [lr / k for _, _, k in plain])
            torch._foreach_sub_([p for p, _, _ in plain], steps)


__all__ = ["LAMB"]
