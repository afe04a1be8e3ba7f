"""Weight averaging and BatchNorm-statistics recomputation (SWAP phase 3; also SWA).

SWAP (Gupta et al., ICLR 2020, Algorithm 1, phase 3) averages the W workers' parameters uniformly
and then recomputes BN running statistics with one pass over the training data, because the
statistics of the averaged weights are not the average of the workers' statistics (as in SWA,
Izmailov et al. 2018, Sec. 3.2). Both steps use ``torch.optim.swa_utils``. This module owns the
averages (of models, of state dicts, and across the ranks of a process group) and the BN helpers
(which statistics exist, recomputing them, and freezing them during extrapolated SGD's extra pass).
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Mapping

import torch
import torch.distributed as dist
from torch import nn
from torch.optim.swa_utils import AveragedModel, update_bn


def average_models(models: Iterable[nn.Module]) -> nn.Module:
    """Uniform average of the parameters of models of one architecture.

    Returns a new module (a copy of the first model) whose parameters are the mean of all
    models' parameters, computed with ``AveragedModel.update_parameters`` (a running mean).
    Buffers (BN running statistics) are the first model's: recompute them with :func:`recompute_bn`.

    Raises:
        ValueError: no models given.
    """
    models = list(models)
    if not models:
        raise ValueError("average_models needs at least one model")
    averaged = AveragedModel(models[0])          # a deep copy, so the inputs stay untouched
    for m in models:                             # n_averaged starts at 0: the first call copies models[0]
        averaged.update_parameters(m)
    return averaged.module


def average_state_dicts(state_dicts: Iterable[Mapping[str, torch.Tensor]],
                        buffer_names: set[str] | None = None) -> dict[str, torch.Tensor]:
    """Uniform mean of state dicts with identical keys and shapes, entry by entry.

    Floating-point entries named in ``buffer_names`` (e.g. BN running statistics) and all
    integer entries (e.g. ``num_batches_tracked``) are taken from the first dict instead of
    averaged: they are to be recomputed, not averaged.

    Raises:
        ValueError: no dicts, or keys/shapes differ.
    """
    dicts = list(state_dicts)
    if not dicts:
        raise ValueError("average_state_dicts needs at least one state dict")
    keys = list(dicts[0])
    buffer_names = buffer_names or set()
    out = {}
    for k in keys:
        first = dicts[0][k]
        for d in dicts[1:]:
            if k not in d or d[k].shape != first.shape:
                raise ValueError(f"state dicts differ at '{k}'")
        if first.is_floating_point() and k not in buffer_names:
            out[k] = torch.stack([d[k].to(torch.float64) for d in dicts]).mean(0).to(first.dtype)
        else:
            out[k] = first.clone()
    return out


def distributed_average_(model: nn.Module, states: list[Mapping[str, torch.Tensor]], count: int) -> nn.Module:
    """Set ``model``'s parameters to the uniform mean of ``count`` state dicts spread over the ranks
    of the process group, of which this rank holds ``states`` (possibly none): SWAP's phase-3
    average (Gupta et al., ICLR 2020, Algorithm 1) of W workers trained on several ranks.

    Each rank sums its states (their mean x their number, in the parameters' dtype), the sums are
    all-reduced in float64 and divided by ``count``. BN statistics and integer buffers keep
    ``model``'s values: recompute them (:func:`recompute_bn`). Collective: every rank calls it,
    and all end with the same parameters. Without a process group it is the local mean.
    Returns ``model`` (modified in place).

    Raises:
        ValueError: ``count`` < 1, or the states' keys or shapes differ.
    """
    if count < 1:
        raise ValueError(f"distributed_average_ needs count >= 1, got {count}")
    buffers = bn_buffer_names(model)
    target = model.state_dict()
    params = [k for k, v in target.items() if v.is_floating_point() and k not in buffers]
    local_mean = average_state_dicts(states, buffers) if states else None
    sums = [(local_mean[k] * len(states) if states else torch.zeros_like(target[k])).to(torch.float64) for k in params]
    if dist.is_available() and dist.is_initialized():
        for s in sums:
            dist.all_reduce(s)
    with torch.no_grad():
        for k, s in zip(params, sums):
            target[k].copy_(s / count)
    return model


def recompute_bn(model: nn.Module, batches: Iterable[torch.Tensor | tuple]) -> nn.Module:
    """Reset and recompute every BatchNorm layer's running mean/var with one pass over ``batches``.

    Uses ``torch.optim.swa_utils.update_bn``: running statistics become the cumulative average
    of the per-batch statistics (BN momentum ``None``), so with equal batches the running mean is
    exactly the data mean. ``batches`` yields float tensors (N, C, H, W) or (x, y) tuples.
    Returns ``model`` (modified in place, mode restored).
    """
    with torch.no_grad():
        update_bn(batches, model)
    return model


def bn_buffer_names(model: nn.Module) -> set[str]:
    """State-dict names of all BatchNorm running statistics in ``model``."""
    names = set()
    for prefix, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            for b in ("running_mean", "running_var", "num_batches_tracked"):
                names.add(f"{prefix}.{b}" if prefix else b)
    return names


@contextlib.contextmanager
def frozen_bn_stats(model: nn.Module):
    """BatchNorm layers normalise with batch statistics as usual, but their running mean, var and
    counter are restored on exit: the extrapolated pass leaves no trace in them."""
    saved = [(m, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
             for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, mean, var, count in saved:
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)
