"""Phase 2 with periodic synchronisation: post-local SGD and DiLoCo as knobs of SWAP's phase 2.

Every ``phase2.sync_every`` = H updates, the W workers (one per rank, or per worker group) meet:

    outer: average    every worker's parameters become their mean (local SGD / periodic model
                      averaging; Lin, Stich, Patel, Jaggi, "Don't Use Large Mini-Batches, Use Local
                      SGD", ICLR 2020; torch's PeriodicModelAverager)
    outer: nesterov   DiLoCo (Douillard et al. 2023, arXiv 2311.08105, Algorithm 1): the outer
                      gradient is the anchor (the weights after the last sync) minus the workers'
                      mean; an outer SGD step with Nesterov momentum (``outer_lr``,
                      ``outer_momentum``; the paper's 0.7 and 0.9) moves the anchor, and every
                      worker restarts from it. Outer LR 1 and momentum 0 is ``average``.

BN running statistics are averaged at every sync as well (no outer step on them); each worker keeps
its own inner optimizer state (momentum). SWAP is H = never; H = 1 with ``average`` and plain SGD is
synchronous data-parallel SGD over the W workers' batches. The outer state (anchor, outer momentum)
travels with the inner optimizer's in the worker's checkpoint (:class:`OuterSync` is the optimizer
a :class:`swap.resumable.Unit` saves), so a resume in the middle of a round continues bit for bit.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..callbacks import Callback, LoopState
from ..errors import SwapError
from ..optim.build import sgd


class OuterSync(Callback):
    """The sync of one worker's model every ``every`` updates (module docstring), collective over
    all ranks of the process group (every rank holds one worker, or one rank's copy of its
    group's worker: the mean over ranks is then the mean over workers).

    Use: a callback of the train loop (:mod:`swap.callbacks`), or ``hook(update)`` after each
    update (1-based update index).
    It also stands in for the worker's optimizer in its checkpoints: ``state_dict`` holds the
    inner optimizer's state, the anchor, the outer momentum and the communication counters.

    Args:
        model: the worker's plain module (not DDP-wrapped).
        inner: its optimizer.
        every: H, updates between syncs (>= 1).
        outer: ``average`` or ``nesterov``.
        outer_lr, outer_momentum: DiLoCo's outer SGD (``nesterov`` only).
    Attributes:
        rounds: syncs done.
        bytes: bytes this rank sent into all-reduces (parameters and BN buffers, one all-reduce
            each per sync).
    Raises:
        SwapError: ``every < 1`` or an unknown ``outer``.
    """

    def __init__(self, model: nn.Module, inner: torch.optim.Optimizer, every: int, outer: str = "average",
                 outer_lr: float = 1.0, outer_momentum: float = 0.0):
        if every < 1 or outer not in ("average", "nesterov"):
            raise SwapError(f"need every >= 1 and outer average | nesterov, got {every}, {outer!r}")
        self.model, self.inner, self.every, self.outer = model, inner, every, outer
        self.params = [p for p in model.parameters()]
        self.buffers = [b for b in model.buffers() if b.is_floating_point()]
        self.anchor = [p.detach().clone() for p in self.params]
        for a in self.anchor:
            a.requires_grad_(True)
        self.outer_opt = sgd(self.anchor, outer_momentum, outer_momentum > 0, lr=outer_lr)   # DiLoCo's outer step
        self.rounds, self.bytes = 0, 0

    def __call__(self, update: int) -> None:
        if update % self.every == 0:
            self.sync()

    def on_update_end(self, state: LoopState) -> None:
        """The train loop's hook (:mod:`swap.callbacks`): a meeting every ``every`` updates."""
        self(state.update)

    @torch.no_grad()
    def sync(self) -> None:
        """One sync (collective): parameters to the workers' mean (``average``) or to the anchor
        after an outer Nesterov step on (anchor - mean) (``nesterov``); BN buffers to their mean."""
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        mean = _mean_over_ranks([p.detach() for p in self.params], world)
        buffers = _mean_over_ranks(self.buffers, world)
        self.bytes += sum(t.numel() * t.element_size() for t in self.params + self.buffers) if world > 1 else 0
        self.rounds += 1
        for b, m in zip(self.buffers, buffers):
            b.copy_(m)
        if self.outer == "average":
            for p, a, m in zip(self.params, self.anchor, mean):
                p.copy_(m)
                a.copy_(m)
            return
        for a, m in zip(self.anchor, mean):
            a.grad = a.detach() - m                       # the outer gradient: how far the workers moved
        with torch.enable_grad():
            self.outer_opt.step()
        for p, a in zip(self.params, self.anchor):
            p.copy_(a)

    # the worker's "optimizer" in its checkpoints: inner state + outer state
    @property
    def param_groups(self):
        return self.inner.param_groups

    def state_dict(self) -> dict:
        return {"inner": self.inner.state_dict(), "anchor": [a.detach().clone() for a in self.anchor],
                "outer": self.outer_opt.state_dict(), "rounds": self.rounds, "bytes": self.bytes}

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state["inner"])
        with torch.no_grad():
            for a, saved in zip(self.anchor, state["anchor"]):
                a.copy_(saved)
        self.outer_opt.load_state_dict(state["outer"])
        self.rounds, self.bytes = state["rounds"], state["bytes"]


def _mean_over_ranks(tensors: list[torch.Tensor], world: int) -> list[torch.Tensor]:
    """Each tensor's mean over the ranks (float64 sums, one all-reduce of them all), as new tensors."""
    if not tensors:
        return []
    flat = torch.cat([t.detach().reshape(-1).double() for t in tensors])
    if world > 1:
        dist.all_reduce(flat)
        flat /= world
    out, i = [], 0
    for t in tensors:
        out.append(flat[i:i + t.numel()].view_as(t).to(t.dtype))
        i += t.numel()
    return out


__all__ = ["OuterSync"]
