"""The one train loop (any phase, any batch, with or without DistributedDataParallel) and evaluation.

Gradient accumulation: a rank's share of the global batch is split into micro-batches; each
micro-batch loss is weighted by its fraction of the share, and DDP averages over ranks, so the
update equals one step on the mean loss of the whole global batch. BatchNorm normalises each
micro-batch with its own statistics, as when each micro-batch sits on its own GPU.
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from .algorithms.extrap import frozen_bn_stats
from .config import SwapError
from .data.loader import eval_batches
from .interrupt import CHECK_EVERY, Interrupted, stop_agreed


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside a DDP wrapper (or the model itself)."""
    return model.module if isinstance(model, DDP) else model


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def average_bn_buffers(model: nn.Module) -> None:
    """Make BN running statistics identical on all ranks: the mean over ranks (no-op for 1 rank).

    Phase 1 runs DDP with ``broadcast_buffers=False`` (no per-forward broadcast); this is called
    before every evaluation and at the end of the phase instead.
    """
    world = _world()
    if world == 1:
        return
    for name, buf in unwrap(model).named_buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            buf.div_(world)


def amp_dtype_for(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of config ``precision`` on ``device``: bfloat16 for ``bf16``, and for
    ``auto`` on CUDA; None (float32) otherwise."""
    return torch.bfloat16 if precision == "bf16" or (precision == "auto" and device.type == "cuda") else None


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype`` on ``device``'s type, or a no-op for ``None`` (float32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def evaluate(model: nn.Module, data, mean: torch.Tensor, std: torch.Tensor, batch_size: int = 1024,
             distributed: bool = False, channels_last: bool = False, amp_dtype: torch.dtype | None = None) -> float:
    """Top-1 accuracy in percent of ``model`` (eval mode, running BN statistics) on ``data``.

    With ``distributed=True`` every rank evaluates its shard and the counts are summed with
    all_reduce, so all ranks return the same number. Returns a float in [0, 100].
    """
    model = unwrap(model)
    was_training = model.training
    model.eval()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed and _world() > 1 else (0, 1)
    # correct, samples: kept on the data's device (NCCL reduces only device tensors) and read once
    counts = torch.zeros(2, dtype=torch.float64, device=data.images.device)
    for x, y in eval_batches(data, batch_size, mean, std, rank, world, channels_last):
        with autocast(x.device, amp_dtype):
            counts[0] += (model(x).argmax(1) == y).sum()
        counts[1] += len(y)
    if world > 1:
        dist.all_reduce(counts)
    model.train(was_training)
    return 100.0 * counts[0].item() / max(1.0, counts[1].item())


class DivergenceGuard:
    """Stops a run whose gradient norm is non-finite or above ``max_norm`` (a diverging run: common
    at large-batch peak LRs), naming the run (``label``, e.g. "phase2 worker 3", or one label per
    model when several are stacked), epoch and step.

    The norm is computed on the device after each backward (:meth:`observe`). Checking it needs a
    host sync, which on a GPU stalls the queue of kernels every update; so the first bad
    (epoch, step, model) is kept on the device and read every ``every`` updates and at the end of
    each epoch (:meth:`check`), before anything is evaluated or saved. With ``every=1`` (the CPU
    default) the update with the bad gradient is never applied; otherwise up to ``every - 1``
    more updates run before the stop, and the last checkpoint, written before them, stays good.
    """

    def __init__(self, max_norm: float, label: str | list[str], device: torch.device, every: int = 1):
        self.max_norm, self.every = max_norm, every
        self.labels = [label] if isinstance(label, str) else list(label)
        self.first = torch.full((4,), -1.0, dtype=torch.float64, device=device)   # epoch, step, model, norm
        self.seen = 0

    def observe(self, model: nn.Module, epoch: int, step: int) -> None:
        """Norm of ``model``'s (all-reduced) gradient at update ``step`` of ``epoch`` (both 1-based)."""
        self.observe_norms(torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None]),
                           epoch, step)

    def observe_norms(self, norms: torch.Tensor, epoch: int, step: int) -> None:
        """Gradient norms (one per label, float (n,) or a scalar) of update ``step`` of ``epoch``."""
        norms = norms.reshape(-1).double()
        bad = ~torch.isfinite(norms) | (norms > self.max_norm)
        j = torch.argmax(bad.to(torch.int8))                     # the first bad model, if any
        # new_full fills on the device; torch.tensor(..., device=cuda) would be a synchronous copy
        here = torch.stack([norms.new_full((), float(epoch)), norms.new_full((), float(step)), j.double(), norms[j]])
        self.first = torch.where(bad.any() & (self.first[0] < 0), here, self.first)
        self.seen += 1
        if self.seen % self.every == 0:
            self.check()

    def check(self) -> None:
        """Raise if a bad gradient was observed (a host sync).

        Raises:
            SwapError: naming the label, epoch and step (1-based) of the first bad gradient and its norm.
        """
        epoch, step, j, norm = self.first.tolist()
        if epoch >= 0:
            raise SwapError(f"{self.labels[int(j)]} diverged at epoch {int(epoch)}, step {int(step)}: gradient norm "
                            f"{norm:.3g} (limit max_grad_norm={self.max_norm:g}); lower the peak LR or lengthen the "
                            f"warm-up, then --resume from the last checkpoint")


def _pass(model: nn.Module, x: torch.Tensor, y: torch.Tensor, micro_batch_size: int, sync: bool,
          backward: bool = True, amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Forward (and backward) over ``x`` in micro-batches; each loss weighted by its share of the
    batch, so accumulated gradients are those of the batch's mean loss. With DDP, gradients are
    all-reduced on the last micro-batch only if ``sync`` (DDP's ``no_sync`` otherwise). With
    ``amp_dtype`` (e.g. bfloat16) the forward runs under autocast; gradients stay float32.
    Returns float64 (3,): loss sum, correct predictions, samples."""
    is_ddp = isinstance(model, DDP)
    chunk = micro_batch_size if 0 < micro_batch_size < len(y) else len(y)
    n_chunks = (len(y) + chunk - 1) // chunk
    totals = torch.zeros(3, dtype=torch.float64, device=x.device)
    for j in range(n_chunks):
        xc, yc = x[j * chunk:(j + 1) * chunk], y[j * chunk:(j + 1) * chunk]
        reduce = sync and j == n_chunks - 1
        comm = model.no_sync() if is_ddp and not reduce else contextlib.nullcontext()
        with comm, (contextlib.nullcontext() if backward else torch.no_grad()):
            with autocast(x.device, amp_dtype):
                out = model(xc)
                loss = F.cross_entropy(out.float(), yc)
            if backward:
                (loss * (len(yc) / len(y))).backward()
        totals += torch.stack([loss.detach().double() * len(yc), (out.argmax(1) == yc).sum().double(),
                               totals.new_full((), float(len(yc)))])
    return totals


def train(model: nn.Module, loader, optimizer: torch.optim.Optimizer, lr_at: Callable[[int], float],
          epochs: int, *, start_epoch: int = 0, start_step: int = 0, start_totals: list[float] | None = None,
          micro_batch_size: int = 0, stop_acc: float | None = None,
          evaluate_fn: Callable[[nn.Module], float] | None = None, eval_every: int = 1,
          on_epoch: Callable[[dict], None] | None = None, on_step: Callable[[int], None] | None = None,
          progress=None, max_grad_norm: float = float("inf"), label: str = "training",
          on_interrupt: Callable[[dict], None] | None = None, amp_dtype: torch.dtype | None = None) -> dict:
    """Train ``model`` for epochs ``start_epoch .. epochs-1`` (or until ``stop_acc``).

    Args:
        model: a module, or a DDP-wrapped module whose ranks all run this loop in step.
        optimizer: any torch optimizer, or :class:`swap.algorithms.extrap.ExtrapSGD` (then each
            update takes the extrapolation steps of Lin et al. 2020).
        loader: a :class:`swap.data.Loader` yielding this rank's share of each global batch.
        lr_at: schedule over the global update index ``epoch * len(loader) + i``.
        start_step, start_totals: continue epoch ``start_epoch`` at update ``start_step`` with the
            epoch's partial (loss sum, correct, samples) of this rank, as saved by ``on_interrupt``.
        micro_batch_size: split each share into chunks of this many samples (0 = one chunk).
        stop_acc: stop after the first epoch whose training accuracy (percent, over that epoch's
            augmented batches, summed over ranks) reaches it (SWAP phase 1's stopping rule).
        evaluate_fn: ``model -> test accuracy %``, called every ``eval_every`` epochs and at the end.
        on_epoch: receives one record per epoch: epoch (1-based), lr (last update's), batch_size
            (global), train_loss, train_acc, test_acc (None when not evaluated), samples_per_s
            (training samples per second of that epoch, this process), wall_s (since start), eval_s,
            stopped (the stopping accuracy was reached: this is the last epoch).
        on_step: called with the global update index (1-based, ``epoch * len(loader) + i + 1``)
            after each optimizer step.
        progress: an optional tqdm-like bar; ``update(1)`` per update.
        max_grad_norm: divergence guard (:class:`DivergenceGuard`): the norm of each (all-reduced)
            gradient is checked, and a non-finite or larger norm raises; ``label`` (e.g. "phase2
            worker 3") names the run in that message. The gradient is identical on all ranks, so
            all stop. Checked before every update on CPU, every ``CHECK_EVERY`` updates and at
            each epoch end on a GPU (no host sync per update).
        on_interrupt: after SIGINT/SIGTERM (see :mod:`swap.interrupt`; checked after every update,
            with DDP after every ``CHECK_EVERY``-th, where all ranks agree on it), called with
            ``epoch`` (0-based, in progress), ``step`` (updates done in it),
            ``totals`` (this rank's partial loss sum, correct, samples) and ``updates`` (this call),
            so the caller can write a checkpoint; then :class:`~swap.interrupt.Interrupted` is raised.
        amp_dtype: forward passes under autocast to this dtype (bfloat16 on GPUs); None = float32.
    Returns:
        The last epoch's record, plus ``stopped_early`` (bool) and ``updates`` (int, this call).
    Raises:
        SwapError: divergence (non-finite or exploding gradient norm), naming epoch and step.
        Interrupted: a stop signal, after ``on_interrupt``.
    """
    is_ddp = isinstance(model, DDP)
    extrapolated = hasattr(optimizer, "extrapolate")       # swap.algorithms.extrap.ExtrapSGD
    steps = len(loader)
    world = _world() if is_ddp else 1
    t_start = time.perf_counter()
    record: dict = {}
    updates = 0
    device = next(model.parameters()).device
    guard = DivergenceGuard(max_grad_norm, label, device, every=1 if device.type == "cpu" else CHECK_EVERY)
    for epoch in range(start_epoch, epochs):
        model.train()
        t_epoch = time.perf_counter()
        # loss sum, correct, samples (this rank), kept on the device: no host sync per update
        totals = torch.zeros(3, dtype=torch.float64, device=device)
        first = start_step if epoch == start_epoch else 0
        carried = start_totals if first and start_totals is not None else [0.0, 0.0, 0.0]
        totals += torch.tensor(carried, dtype=torch.float64, device=device)
        lr = 0.0
        for i, (x, y) in enumerate(loader.epoch(epoch, first), start=first):
            lr = lr_at(epoch * steps + i)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            if extrapolated:
                # Pass at the iterate x_t: metrics and BN statistics, and for extragradient the
                # rank's local gradient (no all-reduce). Then the all-reduced gradient at x_t + u.
                totals += _pass(model, x, y, micro_batch_size, sync=False, backward=optimizer.needs_local_gradient,
                                amp_dtype=amp_dtype)
                optimizer.extrapolate()
                optimizer.zero_grad(set_to_none=True)
                with frozen_bn_stats(unwrap(model)):
                    _pass(model, x, y, micro_batch_size, sync=True, amp_dtype=amp_dtype)
            else:
                totals += _pass(model, x, y, micro_batch_size, sync=True, amp_dtype=amp_dtype)
            guard.observe(model, epoch + 1, i + 1)
            optimizer.step()
            updates += 1
            if on_step is not None:
                on_step(epoch * steps + i + 1)
            if progress is not None:
                progress.update(1)
            check = not is_ddp or (epoch * steps + i + 1) % CHECK_EVERY == 0
            signum = stop_agreed(is_ddp, device) if check else 0
            if signum:
                guard.check()                                # never checkpoint a diverged model
                if on_interrupt is not None:
                    on_interrupt({"epoch": epoch, "step": i + 1, "totals": totals.tolist(), "updates": updates})
                raise Interrupted(signum, f"in {label} at epoch {epoch + 1}, step {i + 1} of {steps}")
        guard.check()
        samples = totals[2].item() - carried[2]             # waits for the device, then time it
        train_s = time.perf_counter() - t_epoch
        if is_ddp:
            dist.all_reduce(totals)
        train_acc = 100.0 * totals[1].item() / totals[2].item()
        stopping = stop_acc is not None and train_acc >= stop_acc
        last = epoch == epochs - 1 or stopping
        test_acc, eval_s = None, 0.0
        if evaluate_fn is not None and ((epoch + 1) % eval_every == 0 or last):
            t_eval = time.perf_counter()
            if is_ddp:
                average_bn_buffers(model)
            test_acc = evaluate_fn(model)
            eval_s = time.perf_counter() - t_eval
        record = {
            "epoch": epoch + 1, "lr": lr, "batch_size": loader.batch_size,
            "train_loss": totals[0].item() / totals[2].item(), "train_acc": train_acc, "test_acc": test_acc,
            "samples_per_s": samples / train_s * world if train_s > 0 else 0.0,
            "wall_s": time.perf_counter() - t_start, "eval_s": eval_s, "stopped": stopping,
        }
        if on_epoch is not None:
            on_epoch(record)
        if stopping:
            break
    if is_ddp:
        average_bn_buffers(model)
    return {**record, "stopped_early": record.get("stopped", False), "updates": updates}
