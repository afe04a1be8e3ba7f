"""Train and test error on the plane through three weight vectors (SWAP paper Figs. 2-3).

The plane through theta_1, theta_2, theta_3 gets an orthonormal basis by Gram-Schmidt, as in
Garipov et al. 2018 ("Loss Surfaces, Mode Connectivity, and Fast Ensembling of DNNs", Sec. 4) and
Izmailov et al. 2018 (SWA, Sec. 3.3)::

    u = (theta_2 - theta_1) / |theta_2 - theta_1|
    v = w / |w|,  w = (theta_3 - theta_1) - <theta_3 - theta_1, u> u

and a grid point (alpha, beta) is the weight vector theta_1 + alpha u + beta v. Only parameters
span the plane; at every grid point the BatchNorm statistics are recomputed with one pass over
(a fixed subset of) the training data before train and test error are measured, as the paper does.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..errors import SwapError


def flat_params(model: nn.Module) -> torch.Tensor:
    """All parameters of ``model`` as one float64 vector (P,), in logical (NCHW) order whatever the
    memory format (channels_last weights cannot be viewed flat); buffers are not included."""
    return torch.cat([p.detach().reshape(-1).to(torch.float64) for p in model.parameters()])


@dataclass
class Plane:
    """The plane through three weight vectors: origin (P,), orthonormal u, v (P,), all float64."""
    origin: torch.Tensor
    u: torch.Tensor
    v: torch.Tensor

    @classmethod
    def through(cls, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> "Plane":
        """Plane with origin ``a`` and basis from Gram-Schmidt on (b - a, c - a).

        Raises:
            SwapError: the three points are (nearly) collinear or two coincide.
        """
        a, b, c = (x.to(torch.float64) for x in (a, b, c))
        du = b - a
        if du.norm() < 1e-12:
            raise SwapError("the first two points coincide: no plane through them")
        u = du / du.norm()
        w = (c - a) - torch.dot(c - a, u) * u
        if w.norm() < 1e-9 * max(1.0, (c - a).norm().item()):
            raise SwapError("the three points are collinear: no unique plane")
        return cls(a, u, w / w.norm())

    def coords(self, x: torch.Tensor) -> tuple[float, float]:
        """(alpha, beta) of the projection of ``x`` onto the plane."""
        d = x.to(torch.float64) - self.origin
        return float(torch.dot(d, self.u)), float(torch.dot(d, self.v))

    def point(self, alpha: float, beta: float) -> torch.Tensor:
        """The weight vector origin + alpha u + beta v (float64, (P,))."""
        return self.origin + alpha * self.u + beta * self.v


def grid_axes(coords: list[tuple[float, float]], size: int, margin: float) -> tuple[np.ndarray, np.ndarray]:
    """``size`` alpha and beta values spanning the points' coordinates plus ``margin`` x the span each side."""
    al, be = np.array([c[0] for c in coords]), np.array([c[1] for c in coords])
    out = []
    for vals in (al, be):
        lo, hi = vals.min(), vals.max()
        span = max(hi - lo, 1e-3)
        out.append(np.linspace(lo - margin * span, hi + margin * span, size))
    return out[0], out[1]


def load_point(model: nn.Module, vector: torch.Tensor) -> nn.Module:
    """Write a vector from :func:`flat_params` back into ``model`` (in place; dtype and memory format kept).

    Raises:
        SwapError: the vector's length differs from the model's parameter count.
    """
    params = list(model.parameters())
    if vector.numel() != sum(p.numel() for p in params):
        raise SwapError(f"vector of {vector.numel()} values for a model of {sum(p.numel() for p in params)} parameters")
    offset = 0
    with torch.no_grad():
        for p in params:
            p.copy_(vector[offset:offset + p.numel()].view(p.shape))
            offset += p.numel()
    return model


def _error(model: nn.Module, data, mean, std, channels_last: bool) -> float:
    from ..train import evaluate
    return 100.0 - evaluate(model, data, mean, std, channels_last=channels_last)


def evaluate_point(model: nn.Module, vector: torch.Tensor, bn_set, train_eval_set, test_set, stats: tuple,
                   channels_last: bool = False, bn_batch_size: int = 512) -> tuple[float, float]:
    """Train and test error (%) of the parameter vector, after recomputing BN statistics with one
    pass of clean batches over ``bn_set`` (batches of ``bn_batch_size`` samples); ``stats``: the
    data's (mean, std), float32 (C,) in pixel units. Returns (train error on ``train_eval_set``,
    test error)."""
    from ..averaging import recompute_bn
    from ..data.loader import eval_batches

    mean, std = stats
    load_point(model, vector)
    recompute_bn(model, (x for x, _ in eval_batches(bn_set, bn_batch_size, mean, std, channels_last=channels_last)))
    return (_error(model, train_eval_set, mean, std, channels_last),
            _error(model, test_set, mean, std, channels_last))


def generic_point(ctx, model: nn.Module, subset: int):
    """:func:`evaluate_point` for a dataset of your own (the generic path, ``ctx.generic``):
    ``vector -> (train error, test error)`` in % (100 - top-1 of the run's task), BN statistics
    recomputed over the training subset (the first ``subset`` samples of a fixed shuffle, 0 = all)
    through the run's collate function.

    Raises:
        SwapError: the run's outputs have no top-1 (no logits with class-index targets).
    """
    import dataclasses

    from ..averaging import recompute_bn
    from ..data.generic import eval_loader, subset as take
    from ..train import evaluate_metrics

    sub, size = take(ctx.train_set, subset), ctx.cfg.phase3.bn_batch_size
    task = dataclasses.replace(ctx.task, metrics=("top1",))

    def batches(data):
        return eval_loader(data, size, device=ctx.dist.device, collate_fn=ctx.collate_fn,
                           num_workers=ctx.cfg.data.num_workers)

    def point(vector: torch.Tensor) -> tuple[float, float]:
        load_point(model, vector)
        recompute_bn(model, (x for x, _ in batches(sub)))
        top1 = [evaluate_metrics(model, batches(data), task)["top1"] for data in (sub, ctx.test_set)]
        if None in top1:
            raise SwapError("swap landscape plots error (100 - top-1 %): this run's outputs have no top-1 "
                            "(no logits with class-index targets)")
        return 100.0 - top1[0], 100.0 - top1[1]
    return point


def landscape_rank(run_path: str, names: list[str], size: int, margin: float, subset: int) -> dict | None:
    """Rank function of ``swap landscape``: evaluate grid points ``rank, rank + world, ...``.

    The training subset (the first ``subset`` samples of a fixed shuffle, 0 = all) is used both for
    the BN pass and for the train error. Rank 0 returns the grid: ``alphas`` (size,), ``betas``
    (size,), ``train_err`` and ``test_err`` (size, size) indexed [beta, alpha], the points'
    ``coords`` and ``names``.
    """
    from .. import distributed
    from ..context import Context
    from ..checkpoint import load_checkpoint

    ctx = Context.from_run_dir(run_path)
    run, cfg = ctx.run, ctx.cfg
    model = ctx.build_model()
    vectors = []
    for name in names:
        load_checkpoint(run.checkpoint(name), model)
        vectors.append(flat_params(model))
    plane = Plane.through(*vectors)
    coords = [plane.coords(x) for x in vectors]
    alphas, betas = grid_axes(coords, size, margin)
    if ctx.generic:                                     # a dataset of your own, through its DataLoader
        point = generic_point(ctx, model, subset)
    else:
        sub = ctx.train_set.subset(subset)

        def point(vec):
            return evaluate_point(model, vec, sub, sub, ctx.test_set, (ctx.mean, ctx.std), cfg.channels_last)
    points = [(i, j) for j in range(size) for i in range(size)]
    mine = points[ctx.dist.rank::ctx.dist.world_size]
    bar = ctx.progress(len(mine), f"landscape rank {ctx.dist.rank}", position=ctx.dist.local_rank)
    results = {}
    for i, j in mine:
        vec = plane.point(float(alphas[i]), float(betas[j]))
        results[(i, j)] = point(vec)
        bar.update(1)
    bar.close()
    gathered = distributed.all_gather_objects(results)
    distributed.teardown()
    if ctx.dist.rank != 0:
        return None
    train_err, test_err = np.zeros((size, size)), np.zeros((size, size))
    for part in gathered:
        for (i, j), (tr, te) in part.items():
            train_err[j, i], test_err[j, i] = tr, te
    return {"alphas": alphas, "betas": betas, "train_err": train_err, "test_err": test_err,
            "coords": np.array(coords), "names": np.array(names)}


__all__ = ["flat_params", "Plane", "grid_axes", "load_point", "evaluate_point", "generic_point",
           "landscape_rank"]
