"""FGSM adversarial examples mixed into training batches (ABSA; Yao, Gholami, Keutzer, Mahoney,
"Large batch size training of neural networks with adversarial training and second-order
information", arXiv 1810.01021, Sec. 3.2), after Goodfellow, Shlens, Szegedy 2015 ("Explaining and
Harnessing Adversarial Examples"): x_adv = clip(x + eps * sign(grad_x loss(x, y)), data range).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .errors import SwapError
from .task import cross_entropy


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, lo: torch.Tensor, hi: torch.Tensor,
         loss_fn: Callable | None = None) -> torch.Tensor:
    """FGSM examples of (x float (N, C, H, W) normalised, y int64 (N,)), made in eval mode so BN
    running statistics are neither used from the batch nor updated; parameter gradients untouched.

    Every coordinate moves by exactly ``eps`` (normalised input units) before being clamped to
    [``lo``, ``hi``] (float (C,): the data range, e.g. pixel 0 and 255 normalised).
    ``loss_fn(output, target)`` is the loss whose input gradient is followed (default
    cross-entropy: :func:`swap.task.cross_entropy`). Returns a new tensor shaped like ``x`` (no graph).
    """
    was_training = model.training
    model.eval()
    try:
        x = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad((loss_fn or cross_entropy)(model(x), y), x)
    finally:
        model.train(was_training)
    shape = (1, -1, 1, 1)
    return torch.max(torch.min(x.detach() + eps * grad.sign(), hi.view(shape)), lo.view(shape))


def adversarial_mask(lo: int, hi: int, fraction: float, device=None) -> torch.Tensor:
    """bool (hi - lo,): which positions ``lo .. hi-1`` of a global batch are replaced, spread evenly
    so that any contiguous slice holds its share: position j is chosen when floor((j + 1) f)
    > floor(j f). A whole batch of B gets round-down(B f) or so, each rank's slice its own part,
    so a W-rank run replaces the same samples as a 1-rank run."""
    j = torch.arange(lo, hi, device=device, dtype=torch.float64)
    return torch.floor((j + 1) * fraction) > torch.floor(j * fraction)


class AdversarialBatches:
    """A :class:`swap.data.Loader` whose batches have a ``fraction`` of samples replaced by their
    FGSM examples against ``model`` (the current weights at each update) for ``loss_fn`` (default
    cross-entropy).

    Yields (x float (b, C, H, W), y int64 (b,)) like the wrapped loader; ``batch_size``,
    ``len()``, ``rank``/``share`` pass through.
    """

    def __init__(self, loader, model: nn.Module, fraction: float, eps: float, lo: torch.Tensor, hi: torch.Tensor,
                 loss_fn: Callable | None = None):
        if not 0.0 <= fraction <= 1.0:
            raise SwapError(f"adversarial fraction must be in [0, 1], got {fraction}")
        self.loader, self.model, self.fraction, self.eps, self.lo, self.hi = loader, model, fraction, eps, lo, hi
        self.loss_fn = loss_fn
        self.batch_size = loader.batch_size

    def __len__(self) -> int:
        return len(self.loader)

    def epoch(self, epoch: int, start: int = 0):
        offset = self.loader.rank * self.loader.share          # this rank's slice of the global batch
        # Every batch of the epoch has the same share: its positions are found once, on the CPU,
        # and sent to the device once (a boolean mask on the device would sync at every update).
        mask = adversarial_mask(offset, offset + self.loader.share, self.fraction)
        picked = mask.nonzero().flatten().to(self.loader.data.images.device)
        for x, y in self.loader.epoch(epoch, start):
            if len(picked):
                x = x.clone()
                x[picked] = fgsm(self.model, x[picked], y[picked], self.eps, self.lo, self.hi, self.loss_fn).to(x.dtype)
            yield x, y


__all__ = ["fgsm", "adversarial_mask", "AdversarialBatches"]
