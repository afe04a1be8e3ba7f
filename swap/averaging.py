"""Weight averaging and BatchNorm-statistics recomputation (SWAP phase 3; also SWA).

SWAP (Gupta et al., ICLR 2020, Algorithm 1, phase 3) averages the W workers' parameters uniformly
and then recomputes BN running statistics with one pass over the training data, because the
statistics of the averaged weights are not the average of the workers' statistics (as in SWA,
Izmailov et al. 2018, Sec. 3.2). Averages use ``torch.optim.swa_utils.AveragedModel``; the BN pass
is ours (exact sums, any input, distributed: ``swa_utils.update_bn`` calls ``model(batch[0])``
only and averages per-batch variances, pytorch/pytorch#49082). This module owns the
averages (of models, of state dicts, and across the ranks of a process group) and the BN helpers
(which statistics exist, recomputing them, and freezing them during extrapolated SGD's extra pass).
"""
from __future__ import annotations

import contextlib
import copy
from typing import Callable, Iterable, Mapping

import torch
import torch.distributed as dist
from torch import nn
from torch.optim.swa_utils import AveragedModel

from .errors import SwapError
from .task import call_model, model_input


def average_models(models: Iterable[nn.Module]) -> nn.Module:
    """Uniform average of the parameters of models of one architecture.

    Returns a new module (a copy of the first model) whose parameters are the mean of all
    models' parameters, computed with ``AveragedModel.update_parameters`` (a running mean).
    Buffers (BN running statistics) are the first model's: recompute them with :func:`recompute_bn`.

    Raises:
        SwapError: no models given.
    """
    models = list(models)
    if not models:
        raise SwapError("average_models needs at least one model")
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
        SwapError: no dicts, or keys/shapes differ.
    """
    dicts = list(state_dicts)
    if not dicts:
        raise SwapError("average_state_dicts needs at least one state dict")
    keys = list(dicts[0])
    buffer_names = buffer_names or set()
    out = {}
    for k in keys:
        first = dicts[0][k]
        for d in dicts[1:]:
            if k not in d or d[k].shape != first.shape:
                raise SwapError(f"state dicts differ at '{k}'")
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
        SwapError: ``count`` < 1, or the states' keys or shapes differ.
    """
    if count < 1:
        raise SwapError(f"distributed_average_ needs count >= 1, got {count}")
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


def recompute_bn(model: nn.Module, batches: Iterable, *, forward: Callable | None = None,
                 max_batches: int | None = None, distributed: bool = False) -> nn.Module:
    """Recompute every BatchNorm layer's running mean and variance as the exact statistics of its
    inputs over all ``batches``: SWAP's phase 3 (Gupta et al., ICLR 2020, Algorithm 1) and SWA's
    BN update (Izmailov et al., UAI 2018, Sec. 3.2).

    One pass in train mode (each BN layer normalises with the batch's own statistics, as in
    training; the model's mode is restored after). For each ``_BatchNorm`` layer with running
    statistics (BatchNorm1d/2d/3d, SyncBatchNorm, with or without affine) the per-channel sum, sum
    of squares and count of its input are accumulated in float64; afterwards ``running_mean`` is
    their mean and ``running_var`` their unbiased variance over all samples (and positions), and
    ``num_batches_tracked`` the number of batches. ``torch.optim.swa_utils.update_bn`` instead
    averages per-batch variances, which equals this only for equal batches of infinite size.

    Args:
        model: the module (its parameters are not changed).
        batches: inputs (a tensor, or a dict of tensors), or ``(input, target)`` tuples, e.g.
            float (N, C, H, W) images.
        forward: ``forward(model, input)``; default :func:`swap.task.call_model` (the data contract).
        max_batches: use at most this many batches (None = all).
        distributed: every rank of the process group passes over its own shard of the batches and
            the sums and counts are all-reduced, so R ranks give the statistics of one process over
            all R shards (collective: every rank calls it). SyncBatchNorm layers synchronise their
            forward across ranks: give every rank the same number of batches then.
    Returns:
        ``model``, modified in place. A model without BatchNorm is returned unchanged, with no pass.
    Raises:
        SwapError: ``max_batches`` < 1, or no batch reached a BN layer.
    """
    if max_batches is not None and max_batches < 1:
        raise SwapError(f"max_batches must be >= 1 or None, got {max_batches}")
    layers = [m for m in model.modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None]
    if not layers:
        return model
    forward = forward or call_model
    sums: dict[nn.Module, torch.Tensor] = {}         # per layer: float64 (3, C): sum, sum of squares, count

    def record(module: nn.Module, args) -> None:
        x = args[0].detach().double()
        dims = [d for d in range(x.dim()) if d != 1]
        stats = torch.stack([x.sum(dims), x.pow(2).sum(dims), x.new_full((x.shape[1],), x.numel() / x.shape[1])])
        sums[module] = sums[module] + stats if module in sums else stats

    hooks = [m.register_forward_pre_hook(record) for m in layers]
    was_training = model.training
    model.train()
    n_batches = 0
    try:
        with torch.no_grad():
            for batch in batches:
                if max_batches is not None and n_batches >= max_batches:
                    break
                forward(model, model_input(batch))
                n_batches += 1
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    group = distributed and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    totals = [sums.get(m, torch.zeros(3, m.num_features, dtype=torch.float64,
                                      device=m.running_mean.device)) for m in layers]
    counts = torch.tensor([float(n_batches)], dtype=torch.float64, device=totals[0].device)
    if group:
        for t in totals + [counts]:
            dist.all_reduce(t)
    if counts.item() == 0 or any(t[2, 0].item() < 2 for t in totals):
        raise SwapError("recompute_bn: no batch (or a single value per channel) reached a BatchNorm layer")
    with torch.no_grad():
        for m, t in zip(layers, totals):
            n = t[2]
            mean = t[0] / n
            var = (t[1] - n * mean * mean).clamp_min(0) / (n - 1)
            m.running_mean.copy_(mean.to(m.running_mean.dtype))
            m.running_var.copy_(var.to(m.running_var.dtype))
            if m.num_batches_tracked is not None:
                m.num_batches_tracked.fill_(int(counts.item()))
    return model


def greedy_soup(template: nn.Module, candidates: list[Mapping[str, torch.Tensor]], score: Callable[[nn.Module], float],
                prepare: Callable[[nn.Module], None]) -> tuple[nn.Module, list[int], list[float], float]:
    """The greedy soup of Wortsman et al., "Model soups", ICML 2022, Recipe 1: order the
    ``candidates`` (state dicts of ``template``'s architecture) by their own held-out ``score``,
    start the soup with the best one, and add each next one if the uniform average of the soup
    with it scores at least as well as the soup without it.

    Every soup (an average of parameters; BN statistics are not averaged) is ``prepare``-d before it
    is scored: SWAP's phase 3 recomputes its BN statistics there. ``score(model)`` is a held-out
    metric where higher is better (a validation accuracy in percent, never the test set).

    Returns:
        the final soup (a new module, prepared), the indices of the candidates kept (in the order
        they were added), every candidate's own score, and the soup's score.
    Raises:
        SwapError: no candidates.
    """
    if not candidates:
        raise SwapError("greedy_soup needs at least one candidate")
    buffers = bn_buffer_names(template)

    def soup_of(indices: list[int]) -> nn.Module:
        model = copy.deepcopy(template)
        model.load_state_dict(average_state_dicts([candidates[i] for i in indices], buffers))
        prepare(model)
        return model

    singles = []
    for state in candidates:
        model = copy.deepcopy(template)
        model.load_state_dict(state)
        singles.append(score(model))
    order = sorted(range(len(candidates)), key=lambda i: -singles[i])
    kept = [order[0]]
    soup = soup_of(kept)
    best = score(soup)
    for i in order[1:]:
        trial = soup_of(kept + [i])
        value = score(trial)
        if value >= best:
            kept, soup, best = kept + [i], trial, value
    return soup, kept, singles, best


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


__all__ = ["average_models", "average_state_dicts", "distributed_average_",
           "recompute_bn", "greedy_soup", "bn_buffer_names", "frozen_bn_stats"]
