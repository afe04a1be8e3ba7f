"""A user's own optimizer, written as a user would: ``fn(param_groups) -> torch.optim.Optimizer``.
Importable as ``user_optim:two_group_adamw`` (tests put this folder on the path), for the config's
``optimizer: package.module:function`` form as well as the library's ``optimizer=`` argument."""
from __future__ import annotations

import torch

SEEN: list[tuple[float, ...]] = []        # each update's group LRs, in this process


class RecordingAdamW(torch.optim.AdamW):
    """torch's AdamW that records its groups' LRs at every step (in :data:`SEEN`)."""

    def step(self, closure=None):
        SEEN.append(tuple(float(g["lr"]) for g in self.param_groups))
        return super().step(closure)


def two_group_adamw(param_groups):
    """Matrices and kernels at the default LR with weight decay 0.05; vectors (biases, norms) at a
    tenth of it without decay: layer-wise LRs whose ratio the schedule must keep."""
    params = [p for g in param_groups for p in g["params"]]
    return RecordingAdamW([{"params": [p for p in params if p.ndim > 1]},
                           {"params": [p for p in params if p.ndim <= 1], "lr": 2e-4, "weight_decay": 0.0}],
                          lr=2e-3, weight_decay=0.05)
