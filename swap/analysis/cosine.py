"""Cosine between each worker's descent direction and the direction to the average (SWAP paper Fig. 4).

For a phase-2 worker i with saved iterates theta_i(t) and the final SWAP model theta_swap::

    cos(t) = < -g_i(t), theta_swap - theta_i(t) > / (|g_i(t)| |theta_swap - theta_i(t)|)

where g_i(t) is the mini-batch gradient of the training loss at theta_i(t) (train mode, as during
training). The paper finds it close to 0 late in phase 2: the workers move roughly orthogonally to
the direction that would take them to the average, so averaging makes progress SGD cannot.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from ..errors import SwapError
from ..task import cross_entropy

from .landscape import flat_params


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two flat vectors, in [-1, 1] (float64 arithmetic).

    Raises:
        SwapError: either vector is zero.
    """
    a, b = a.to(torch.float64).flatten(), b.to(torch.float64).flatten()
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        raise SwapError("cosine of a zero vector is undefined")
    return float(torch.dot(a, b) / (na * nb))


def minibatch_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn=None) -> torch.Tensor:
    """Flat float64 gradient (P,) of the loss (``loss_fn``, default mean cross-entropy) on (x, y), in train mode; BN running
    statistics are restored afterwards so the model is left as it was."""
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    was_training = model.training
    model.train()
    model.zero_grad(set_to_none=True)
    (loss_fn or cross_entropy)(model(x), y).backward()
    grad = torch.cat([p.grad.detach().to(torch.float64).flatten() for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        for k, v in model.named_buffers():
            v.copy_(buffers[k])
    model.train(was_training)
    return grad


ITERATE = re.compile(r"worker(\d+)_step(\d+)$")


def cosine_rows(run_path: str, batch_size: int = 512) -> list[dict]:
    """For every saved phase-2 iterate (``checkpoints/iterates/workerW_stepS``): worker, step,
    ``cosine(-g, theta_swap - theta)``, ``|g|``, ``|theta_swap - theta|``. One fixed mini-batch per worker
    and step, drawn from the run's training data with the worker's own augmentation stream.

    Raises:
        SwapError: no iterates saved (run with ``phase2.save_every`` > 0) or no SWAP checkpoint.
    """
    from ..context import Context
    from ..checkpoint import load_checkpoint
    from ..rundir import RunDir

    run = RunDir(run_path)
    folder = run.path / "checkpoints" / "iterates"
    names = sorted(p.stem for p in folder.glob("*.safetensors")) if folder.is_dir() else []
    if not names:
        raise SwapError(f"{run.path} has no saved phase-2 iterates; train with --set phase2.save_every=K (updates)")
    ctx = Context.from_run_dir(run_path)
    model = ctx.build_model()
    load_checkpoint(run.checkpoint("swap"), model)
    target = flat_params(model)
    rows = []
    for name in names:
        m = ITERATE.match(name)
        if not m:
            continue
        worker, step = int(m.group(1)), int(m.group(2))
        load_checkpoint(folder / name, model)
        theta = flat_params(model)
        loader = ctx.loader(batch_size, ("cosine", worker, step), data_parallel=False)
        x, y = next(iter(loader.epoch(0)))
        g = minibatch_gradient(model, x, y, ctx.task.loss)
        rows.append({"worker": worker, "step": step, "cosine": cosine(-g, target - theta),
                     "grad_norm": float(g.norm()), "distance": float((target - theta).norm())})
    return sorted(rows, key=lambda r: (r["worker"], r["step"]))


__all__ = ["cosine", "minibatch_gradient", "ITERATE", "cosine_rows"]
