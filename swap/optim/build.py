"""Building a phase's optimizer: its parameter groups (weight decay or none) and the optimizer of its
config section, or the user's own.

One place for what every engine path needs: :func:`param_groups` (the decay groups of ``optim.no_decay``),
:func:`build_optimizer` (``sgd | lars | lamb | adamw | extrap`` from :class:`swap.config.OptimConfig`,
with each optimizer's published defaults where the config says null) and :func:`user_optimizer` (a
user's ``fn(param_groups) -> torch.optim.Optimizer``). The schedule then scales each group's own LR
(:func:`swap.optim.lr.apply_lr`), so per-group LR ratios survive.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import SwapError, printable
from .lr import record_lr_scales
from .lamb import LAMB
from .lars import LARS

#: The (weight decay, eps) where the config says null, from each optimizer's paper or reference code,
#: sgd and extrap from the SWAP paper (Gupta et al. 2020, Sec. 5, 5e-4), lars from You et al. 2017 (5e-4;
#: eps guards the division only), lamb from You et al. 2020, BERT (0.01, 1e-6), adamw from torch.optim.AdamW
#: (0.01, 1e-8).
DEFAULTS = {"sgd": (5e-4, None), "extrap": (5e-4, None), "lars": (5e-4, 1e-9), "lamb": (0.01, 1e-6),
            "adamw": (0.01, 1e-8)}


def weight_decay_of(kind: str, o) -> float:
    """The weight decay ``kind`` trains with under settings ``o``: ``o.weight_decay``, or the
    optimizer's default (:data:`DEFAULTS`) when it is null."""
    return o.weight_decay if o.weight_decay is not None else DEFAULTS[kind][0]


def param_groups(model: nn.Module, weight_decay: float, no_decay: str = "none") -> list[dict]:
    """``model``'s parameters as optimizer groups: the decayed ones with ``weight_decay``, then (when
    there are any) a group with weight decay 0 of those ``no_decay`` names:

    - ``none``: one group, every parameter decayed (Goyal et al. 2017 keep decay on BN weights);
    - ``bn``: BatchNorm scales and shifts undecayed (the DAWNBench ImageNet runs' ``--no-bn-wd``);
    - ``norm_bias``: every 1-D parameter undecayed: biases and every normalisation weight (BatchNorm,
      LayerNorm, GroupNorm), the convention of timm, Hugging Face and the LARS/LAMB reference code.

    Returns a list of dicts ``{"params": [...], "weight_decay": float}`` (parameters in
    ``model.parameters()`` order within each group; tied parameters once).
    """
    params = list(model.parameters())
    if no_decay == "bn":
        bn = {id(p) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for p in m.parameters()}
        skip = [id(p) in bn for p in params]
    elif no_decay == "norm_bias":
        skip = [p.ndim <= 1 for p in params]
    else:
        skip = [False] * len(params)
    groups = [{"params": [p for p, s in zip(params, skip) if not s], "weight_decay": weight_decay}]
    if any(skip):
        groups.append({"params": [p for p, s in zip(params, skip) if s], "weight_decay": 0.0})
    return groups


def sgd(params, momentum: float, nesterov: bool, weight_decay: float = 0.0, lr: float = 0.0) -> torch.optim.SGD:
    """``torch.optim.SGD`` over ``params`` (tensors or parameter groups): every SGD of a run is built
    here (a phase's, the stacked workers' over their stacked tensors, DiLoCo's outer step). ``lr``:
    0 until the schedule sets it before the first update (:func:`swap.optim.lr.apply_lr`)."""
    return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)


def build_optimizer(kind: str, model: nn.Module, o, extrap=None, generator: torch.Generator | None = None):
    """The optimizer ``kind`` over ``model``'s parameters with settings ``o`` (a
    :class:`swap.config.OptimConfig`, a section's own: :func:`swap.config.optim_for`); its LR is 0
    until the schedule sets it (:func:`swap.optim.lr.apply_lr`).

    ``sgd``: ``torch.optim.SGD`` (momentum, Nesterov); ``lars``: :class:`swap.optim.LARS` (trust
    coefficient, LARC clipping with ``trust_clip``, Nesterov); ``lamb``: :class:`swap.optim.LAMB`;
    ``adamw``: ``torch.optim.AdamW`` (Loshchilov & Hutter, ICLR 2019; decoupled weight decay);
    ``extrap``: :class:`swap.optim.extrap.ExtrapSGD` around SGD, with ``extrap`` (a
    :class:`swap.config.ExtrapConfig`) and its gaussian noise drawn from ``generator``. LARS and LAMB
    neither decay nor adapt 1-D parameters whatever ``o.no_decay`` says (their papers' rule).
    The optimizer carries ``swap_kind`` (its name in the run's records).

    Raises:
        SwapError: an unknown ``kind``.
    """
    if kind not in DEFAULTS:
        raise SwapError(f"unknown optimizer {printable(kind)!r} (known: {', '.join(DEFAULTS)})")
    wd = weight_decay_of(kind, o)
    eps = o.eps if o.eps is not None else DEFAULTS[kind][1]
    groups = param_groups(model, wd, o.no_decay)
    if kind in ("sgd", "extrap"):
        opt = sgd(groups, o.momentum, o.nesterov, wd)
    elif kind == "lars":
        opt = LARS(groups, lr=0.0, momentum=o.momentum, weight_decay=wd, trust_coefficient=o.trust_coefficient,
                   eps=eps, nesterov=o.nesterov, clip=o.trust_clip)
    elif kind == "lamb":
        opt = LAMB(groups, lr=0.0, betas=tuple(o.betas), eps=eps, weight_decay=wd)
    else:
        opt = torch.optim.AdamW(groups, lr=0.0, betas=tuple(o.betas), eps=eps, weight_decay=wd, foreach=True)
    if kind == "extrap":
        from .extrap import ExtrapSGD                 # imports the train loop: only where it is used
        opt = ExtrapSGD(opt, extrap.variant, extrap.gamma_ratio, extrap.sigma_ratio, generator)
    opt.swap_kind = kind
    return opt


def user_optimizer(fn, model: nn.Module, o, where: str):
    """The user's optimizer ``fn(param_groups)`` over ``model`` (``param_groups``: as
    :func:`param_groups` with ``o``'s ``no_decay``; the decayed group's ``weight_decay`` is left to
    the optimizer's own setting), with each group's LR ratio recorded for the schedule
    (:func:`swap.optim.lr.record_lr_scales`). ``where`` names it in errors (``phase1``, ...).

    Raises:
        SwapError: ``fn`` does not return a ``torch.optim.Optimizer``, or leaves out some of the
            model's trainable parameters.
    """
    groups = param_groups(model, 0.0, o.no_decay)
    groups[0].pop("weight_decay")
    try:
        opt = fn(groups)
    except Exception as exc:
        raise SwapError(f"the optimizer function for {where} failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(opt, torch.optim.Optimizer):
        raise SwapError(f"the optimizer function for {where} must return a torch.optim.Optimizer, got "
                        f"{type(opt).__name__}")
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in held]
    if missing:
        raise SwapError(f"the optimizer for {where} leaves out {len(missing)} trainable parameter(s) of the model "
                        f"(first: {printable(missing[0])}); give it every parameter of param_groups")
    record_lr_scales(opt)
    opt.swap_kind = f"user:{type(opt).__name__}"
    return opt


def kind_of(optimizer) -> str:
    """The optimizer's name in summaries: the config's value (``sgd``, ``lars``, ``lamb``,
    ``adamw``, ``extrap``), or ``user:CLASS`` for the user's."""
    inner = getattr(optimizer, "inner", optimizer)            # local SGD / DiLoCo's wrapper
    return getattr(inner, "swap_kind", None) or f"user:{type(inner).__name__}"


def label(optimizer) -> str:
    """The optimizer's name in the per-epoch records: :func:`kind_of`, with extrapolated SGD's
    variant (``extrap:extragradient``)."""
    kind = kind_of(optimizer)
    return f"extrap:{optimizer.variant}" if kind == "extrap" else kind


__all__ = ["sgd", "DEFAULTS", "weight_decay_of", "param_groups", "build_optimizer", "user_optimizer", "kind_of",
           "label"]
