"""What LARS and LAMB share: the closure, the parameter groups, and which tensors are adapted."""
from __future__ import annotations

import torch
from torch.optim import Optimizer


class LayerwiseOptimizer(Optimizer):
    """A ``torch.optim.Optimizer`` whose update is computed per group over the tensors with a
    gradient (``_update``), with a layer-wise trust ratio on the tensors ``adapted`` says."""

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter with a gradient; returns ``closure()``'s loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._update(group, params)
        return loss

    @staticmethod
    def adapted(group: dict, p: torch.Tensor) -> bool:
        """Whether ``p`` is decayed and gets a trust ratio: every tensor but, with the group's
        ``exclude_1d`` (the default), 1-D ones (biases, normalisation weights)."""
        return not (group["exclude_1d"] and p.ndim <= 1)

    def _update(self, group: dict, params: list[torch.Tensor]) -> None:
        raise NotImplementedError


__all__ = ["LayerwiseOptimizer"]
