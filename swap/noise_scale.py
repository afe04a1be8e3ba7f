"""The gradient noise scale of a data-parallel phase, measured for free from DDP's all-reduce.

McCandlish, Kaplan, Amodei et al., "An Empirical Model of Large-Batch Training" (arXiv 1812.06162,
Sec. 2.2 and Appendix A): the simple noise scale ``B_simple = tr(Sigma) / |G|^2`` predicts the
critical batch size, above which a larger batch buys few fewer updates. With gradients of two batch
sizes, B_small (one rank's share) and B_big (the global batch, after the all-reduce), unbiased
estimates are::

    |G|^2    ~ (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
    tr(Sigma) ~ (|G_small|^2 - |G_big|^2) / (1 / B_small - 1 / B_big)

averaged over an epoch's updates (and the ranks) before their ratio is taken, as the paper advises.
``|G_small|^2`` is read inside DDP's communication hook, before the all-reduce (the hook then does
what DDP's default does: divide by the world size and all-reduce the sum); ``|G_big|^2`` is the norm the
train loop already computes for its divergence guard.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from .callbacks import Callback, LoopState


class NoiseScale(Callback):
    """Per-epoch B_simple of a DDP model (module docstring). Attach it with ``attach`` before
    the first update, feed it each update's all-reduced gradient norm (:meth:`observe`), read
    :meth:`epoch_value` at each epoch's end (collective)."""

    def __init__(self, batch_size: int, world_size: int, device: torch.device):
        self.b_big, self.b_small, self.world = batch_size, batch_size / world_size, world_size
        self.local = torch.zeros((), dtype=torch.float64, device=device)        # this update, this rank
        self.sums = torch.zeros(2, dtype=torch.float64, device=device)          # sum of |G_small|^2, |G_big|^2
        self.updates = 0

    def attach(self, model: DDP) -> "NoiseScale":
        model.register_comm_hook(self, _hook)
        return self

    def observe(self, norm: torch.Tensor) -> None:
        """After an update's gradients: ``norm`` (scalar tensor) of the all-reduced gradient."""
        self.sums += torch.stack([self.local, norm.double().reshape(()) ** 2])
        self.local.zero_()
        self.updates += 1

    def on_update_end(self, state: LoopState) -> None:
        """The train loop's hook (:mod:`swap.callbacks`): :meth:`observe` the update's norm."""
        self.observe(state.norms)

    def on_epoch_end(self, record: dict) -> None:
        """The train loop's hook: the epoch's estimate into its record, ``noise_scale`` (collective)."""
        record["noise_scale"] = self.epoch_value()

    def epoch_value(self, group=None) -> float | None:
        """B_simple over the updates since the last call, in samples (None when not estimable);
        collective over ``group``. Resets the sums."""
        sums = self.sums / max(1, self.updates)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums, group=group)
            sums /= self.world
        small, big = sums.tolist()
        self.sums.zero_()
        self.updates = 0
        g2 = (self.b_big * big - self.b_small * small) / (self.b_big - self.b_small)
        trace = (small - big) / (1 / self.b_small - 1 / self.b_big)
        return trace / g2 if g2 > 0 else None


def _hook(state: NoiseScale, bucket):          # no annotations: DDP compares them as objects
    """DDP's default all-reduce (divide by the world size, sum), after adding the bucket's local
    squared norm to ``state.local``. Returns a Future of the reduced bucket."""
    buffer = bucket.buffer()
    state.local += buffer.double().pow(2).sum()
    buffer.div_(state.world)
    return dist.all_reduce(buffer, async_op=True).get_future().then(lambda fut: fut.value()[0])


__all__ = ["NoiseScale"]
