"""Second-order information about the training loss: top Hessian eigenvalues by power iteration on
Hessian-vector products, and Hutchinson's estimate of the Hessian trace.

A Hessian-vector product Hv is the gradient of (g . v), g = dL/dw built with ``create_graph``
(Pearlmutter 1994, "Fast exact multiplication by the Hessian"): one double backward, never the
Hessian itself. Power iteration with a Rayleigh quotient and deflation for the next eigenvalues is
the method of Yao, Gholami, Keutzer, Mahoney, "Large batch size training of neural networks with
adversarial training and second-order information" (arXiv 1810.01021, Sec. 3 and Alg. 1), whose
reference defaults are 10 iterations, relative tolerance 1e-2 and one batch of 128 samples.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .errors import SwapError
from .task import cross_entropy


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))


def _normalised(v: list[torch.Tensor]) -> list[torch.Tensor]:
    norm = torch.sqrt(_dot(v, v))
    return [x / (norm + 1e-12) for x in v]


def _hvp_fn(loss_fn: Callable[[], torch.Tensor], params: list[torch.Tensor]):
    loss = loss_fn()
    grads = torch.autograd.grad(loss, params, create_graph=True)

    def hvp(v: list[torch.Tensor]) -> list[torch.Tensor]:
        return [h.detach() for h in torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True)]
    return hvp


def top_eigenvalues(loss_fn: Callable[[], torch.Tensor], params: list[torch.Tensor], k: int = 1, iters: int = 10,
                    tol: float = 1e-2, generator: torch.Generator | None = None) -> tuple[list[float], list[int]]:
    """The ``k`` largest-magnitude eigenvalues of the Hessian of ``loss_fn()`` w.r.t. ``params``.

    Power iteration from a random normalised start (drawn from ``generator``): ``v <- Hv / |Hv|``,
    eigenvalue estimate = Rayleigh quotient v.Hv; stops when the relative change of the estimate
    is below ``tol`` or after ``iters`` products. Eigenvalue j > 1 deflates the ones found before
    (Hv - sum_i lambda_i (u_i . v) u_i). ``loss_fn`` is evaluated once; its graph is reused.

    Args:
        loss_fn: returns a scalar loss (float32/64) that depends on ``params`` twice-differentiably.
        params: the tensors (requires_grad) that span the Hessian, e.g. ``model.parameters()``.
    Returns:
        (eigenvalues, iterations used for each), lists of length ``k``.
    Raises:
        SwapError: ``k`` or ``iters`` < 1, or ``tol`` < 0.
    """
    if k < 1 or iters < 1 or tol < 0:
        raise SwapError(f"need k >= 1, iters >= 1, tol >= 0; got k={k}, iters={iters}, tol={tol}")
    params = list(params)
    hvp = _hvp_fn(loss_fn, params)
    values, vectors, used = [], [], []
    for _ in range(k):
        v = _normalised([torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) for p in params])
        estimate, n = None, 0
        for n in range(1, iters + 1):
            hv = hvp(v)
            for lam, u in zip(values, vectors):                # deflation
                c = lam * _dot(u, v)
                hv = [h - c * x for h, x in zip(hv, u)]
            new = float(_dot(v, hv))
            v = _normalised(hv)
            converged = estimate is not None and abs(new - estimate) <= tol * (abs(estimate) + 1e-12)
            estimate = new
            if converged:
                break
        values.append(estimate)
        vectors.append(v)
        used.append(n)
    return values, used


def hutchinson_trace(loss_fn: Callable[[], torch.Tensor], params: list[torch.Tensor], samples: int = 100,
                     generator: torch.Generator | None = None) -> float:
    """Hutchinson's estimate of tr(H) = E[v^T H v] with Rademacher (+-1) vectors v, averaged over
    ``samples`` draws (Hutchinson 1990; used for the Hessian trace by Yao et al. 2020, PyHessian).

    Raises:
        SwapError: ``samples`` < 1.
    """
    if samples < 1:
        raise SwapError(f"need samples >= 1, got {samples}")
    params = list(params)
    hvp = _hvp_fn(loss_fn, params)
    total = 0.0
    for _ in range(samples):
        v = [(torch.randint(0, 2, p.shape, generator=generator) * 2 - 1).to(p.device, p.dtype) for p in params]
        total += float(_dot(v, hvp(v)))
    return total / samples


def model_top_eigenvalue(model: nn.Module, x: torch.Tensor, y: torch.Tensor, iters: int = 10, tol: float = 1e-2,
                         generator: torch.Generator | None = None, loss_fn=None) -> tuple[float, int]:
    """Top Hessian eigenvalue of the loss (``loss_fn(output, target)``, default the mean
    cross-entropy) of ``model`` on (x float (N, C, H, W), y int64 (N,)) w.r.t. its parameters, in
    eval mode: BN uses (and keeps) its running statistics.

    Returns:
        (eigenvalue, power iterations used).
    """
    was_training = model.training
    model.eval()
    try:
        params = [p for p in model.parameters() if p.requires_grad]
        loss_fn = loss_fn or cross_entropy
        values, used = top_eigenvalues(lambda: loss_fn(model(x), y), params, 1, iters, tol, generator)
    finally:
        model.train(was_training)
    return values[0], used[0]


__all__ = ["top_eigenvalues", "hutchinson_trace", "model_top_eigenvalue"]
