"""Extrapolated SGD for large batches (Lin, Kong, Stich, Jaggi, "Extrapolation for Large-batch
Training in Deep Learning", ICML 2020): the unified framework, Sec. 3, with EXTRAP-SGD as its main case.

One update t on worker (rank) k, parameters x_t, learning rate eta_t, base optimizer SGD with
(Nesterov) momentum and weight decay::

    1. perturbation, no communication:
         extragradient   u = -gamma_t * g_k(x_t)       the rank's own mini-batch gradient at x_t
                                                        (EXTRAP-SGD, a *local* extragradient)
         past-gradient   u = -gamma_t * G_{t-1}         the previous update's all-reduced gradient
                                                        (no extra backward pass)
         gaussian        u ~ N(0, sigma_t^2 I)          the "perturbed SGD" baseline
    2. G_t = mean over ranks of g_k(x_t + u)            gradient at the extrapolated point, on the
                                                        same mini-batch; all-reduced by DDP
    3. x_{t+1} = SGD-step(x_t, G_t)                     from x_t, not from x_t + u: weight decay and
                                                        momentum act on x_t exactly as in plain SGD

gamma_t = gamma_ratio * eta_t and sigma_t = sigma_ratio * eta_t, so they share the LR's warm-up
and decay. Communicated per update: one all-reduce of G_t, as in plain data-parallel SGD.

BatchNorm: running statistics come only from forward passes at the iterate x_t. The update step
(:class:`ExtrapStep`, plugged into :func:`swap.train.train`) runs the x_t pass first (with backward
for extragradient, without for the other variants: one extra forward), then the extrapolated pass
under :func:`swap.averaging.frozen_bn_stats`.
"""
from __future__ import annotations

import torch

from ..averaging import frozen_bn_stats
from ..config import EXTRAP_VARIANTS as VARIANTS
from ..errors import SwapError
from ..train import DEFAULT_TASK, SGDStep, _pass, unwrap


class ExtrapSGD:
    """Extrapolated SGD around a base ``torch.optim.SGD`` (optimizer-style: ``param_groups``,
    ``zero_grad``, ``step``, ``state_dict``), usable with any model.

    Per update the caller: (a) for ``extragradient``, backpropagates the rank's local loss at x_t
    (no all-reduce); (b) calls :meth:`extrapolate`; (c) zeroes gradients and backpropagates at the
    extrapolated point with the all-reduce; (d) calls :meth:`step`.

    Args:
        base: the SGD optimizer over the model's parameters; its LR (set per update by the
            schedule) is eta_t.
        variant: one of :data:`swap.config.EXTRAP_VARIANTS`.
        gamma_ratio: gamma_t / eta_t for the gradient variants (>= 0).
        sigma_ratio: sigma_t / eta_t for ``gaussian`` (>= 0).
        generator: random stream for ``gaussian``, on the parameters' device (seeded by the caller
            for reproducibility).
    Raises:
        SwapError: unknown variant or negative ratio.
    """

    def __init__(self, base: torch.optim.SGD, variant: str = "extragradient", gamma_ratio: float = 1.0,
                 sigma_ratio: float = 0.01, generator: torch.Generator | None = None):
        if variant not in VARIANTS:
            raise SwapError(f"unknown extrapolation variant '{variant}' ({', '.join(VARIANTS)})")
        if gamma_ratio < 0 or sigma_ratio < 0:
            raise SwapError("gamma_ratio and sigma_ratio must be >= 0")
        self.base, self.variant = base, variant
        self.gamma_ratio, self.sigma_ratio = gamma_ratio, sigma_ratio
        self.generator = generator
        self._x: list[torch.Tensor] | None = None      # x_t while the parameters sit at x_t + u
        self._past: list[torch.Tensor | None] | None = None

    @property
    def needs_local_gradient(self) -> bool:
        """True when the pass at x_t must backpropagate (the extragradient variant)."""
        return self.variant == "extragradient"

    @property
    def param_groups(self):
        return self.base.param_groups

    def _params(self):
        return [p for g in self.base.param_groups for p in g["params"]]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def extrapolate(self) -> None:
        """Move the parameters from x_t to x_t + u_t (keeping x_t).

        ``extragradient`` reads the local gradient at x_t from ``p.grad``; a parameter without a
        gradient is not moved.
        """
        params = self._params()
        self._x = [p.detach().clone() for p in params]
        eta = self.base.param_groups[0]["lr"]
        for i, p in enumerate(params):
            if self.variant == "extragradient":
                if p.grad is not None:
                    p.add_(p.grad, alpha=-self.gamma_ratio * eta)
            elif self.variant == "past-gradient":
                if self._past is not None and self._past[i] is not None:
                    p.add_(self._past[i], alpha=-self.gamma_ratio * eta)
            else:
                noise = torch.randn(p.shape, generator=self.generator, dtype=p.dtype, device=p.device)
                p.add_(noise, alpha=self.sigma_ratio * eta)

    @torch.no_grad()
    def step(self) -> None:
        """Return to x_t and take the base SGD step with the gradient found at x_t + u_t.

        Raises:
            RuntimeError: :meth:`extrapolate` was not called for this update.
        """
        if self._x is None:
            raise RuntimeError("ExtrapSGD.step() needs extrapolate() first in every update")
        params = self._params()
        if self.variant == "past-gradient":
            self._past = [None if p.grad is None else p.grad.detach().clone() for p in params]
        for p, x in zip(params, self._x):
            p.copy_(x)
        self._x = None
        self.base.step()

    def state_dict(self) -> dict:
        """Base SGD state, the past gradient and the noise stream's position (so a resumed
        ``gaussian`` run draws the noise the uninterrupted run would have drawn)."""
        rng = self.generator.get_state() if self.generator is not None else None
        return {"base": self.base.state_dict(), "variant": self.variant, "past": self._past, "noise_rng": rng}

    def load_state_dict(self, state: dict) -> None:
        self.base.load_state_dict(state["base"])
        self._past = state.get("past")
        if self.generator is not None and state.get("noise_rng") is not None:
            self.generator.set_state(state["noise_rng"])


class ExtrapStep(SGDStep):
    """One extrapolated-SGD update for :func:`swap.train.train` (Lin et al. 2020, Sec. 3; steps 1-3
    of the module docstring): the pass at the iterate x_t (metrics and BN statistics, and for
    extragradient the rank's local gradient, not all-reduced), :meth:`ExtrapSGD.extrapolate`, then
    the all-reduced gradient at x_t + u with BN statistics frozen; ``apply`` steps from x_t.

    Args:
        model: the module, or its DDP wrapper.
        optimizer: an :class:`ExtrapSGD` over its parameters.
        micro_batch_size, amp_dtype, task, clip_grad_norm: as :class:`swap.train.SGDStep` (the
            clipped gradient is G_t, the one at the extrapolated point).
    """

    def __init__(self, model, optimizer: ExtrapSGD, micro_batch_size: int = 0, amp_dtype: torch.dtype | None = None,
                 task=DEFAULT_TASK, clip_grad_norm: float = 0.0):
        super().__init__(model, optimizer, micro_batch_size, amp_dtype, task, clip_grad_norm)

    def gradients(self, x, y, lr):
        opt = self.optimizer
        self.set_lr(lr)
        opt.zero_grad(set_to_none=True)
        totals = _pass(self.model, x, y, self.micro_batch_size, sync=False, backward=opt.needs_local_gradient,
                       amp_dtype=self.amp_dtype, task=self.task)
        opt.extrapolate()
        opt.zero_grad(set_to_none=True)
        with frozen_bn_stats(unwrap(self.model)):
            _pass(self.model, x, y, self.micro_batch_size, sync=True, amp_dtype=self.amp_dtype, task=self.task)
        return totals.view(1, 3), self.clipped_norm()


__all__ = ["VARIANTS", "ExtrapSGD", "ExtrapStep"]
