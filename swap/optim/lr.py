"""How a schedule's LR reaches an optimizer: every parameter group gets the schedule's LR times its
own ``lr_scale``, so one schedule (:mod:`swap.schedules`) drives any ``torch.optim.Optimizer`` and
keeps the ratios of a user's per-group LRs (layer-wise LR decay; ``lr_scale`` is timm's key)."""
from __future__ import annotations


def record_lr_scales(optimizer) -> None:
    """Give each parameter group of ``optimizer`` (any ``torch.optim.Optimizer``) its ``lr_scale``:
    its LR at construction (``initial_lr``, which torch's LR schedulers record, else its LR now) over
    the optimizer's default LR (``defaults["lr"]``), unless the group already carries one (timm's
    convention for layer-wise LR decay). Groups at the default LR get none (scale 1). Call once,
    before any :func:`apply_lr`."""
    base = float(optimizer.defaults.get("lr", 0.0) or 0.0)
    for group in optimizer.param_groups:
        lr = float(group.get("initial_lr", group["lr"]))
        if "lr_scale" not in group and base > 0 and lr != base:
            group["lr_scale"] = lr / base


def apply_lr(optimizer, lr: float) -> None:
    """Set the LR of every parameter group of ``optimizer`` for the next update: ``lr`` times the
    group's ``lr_scale`` (:func:`record_lr_scales`; 1 when it has none)."""
    for group in optimizer.param_groups:
        scale = group.get("lr_scale")
        group["lr"] = lr if scale is None else lr * scale


__all__ = ["record_lr_scales", "apply_lr"]
