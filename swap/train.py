"""The one train loop (any phase, any batch, any layout) and evaluation.

:func:`train` drives epochs, updates, stop signals, the divergence guard, evaluation and the
per-epoch records. What one update does is an :class:`UpdateStep`: :class:`SGDStep` here (SGD
with micro-batches, with or without DistributedDataParallel), extrapolated SGD in
:mod:`swap.optim.extrap`, W stacked workers in :mod:`swap.algorithms.stacked`. Everything that
watches the loop is a callback (:mod:`swap.callbacks`): the records' sink, the stopping rules,
the progress bar, and the checkpoints of :mod:`swap.resumable`, which decides where a run resumes.

Gradient accumulation: a rank's share of the global batch is split into micro-batches; each
micro-batch loss is weighted by its fraction of the share, and DDP averages over ranks, so the
update equals one step on the mean loss of the whole global batch. BatchNorm normalises each
micro-batch with its own statistics, as when each micro-batch sits on its own GPU.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from .callbacks import Callback, LoopState
from .errors import SwapError
from .data.loader import eval_batches
from .interrupt import CHECK_EVERY, Interrupted, stop_agreed
from .optim.lr import apply_lr
from .schedules import epoch_shape
from .task import Task, token_targets

DEFAULT_TASK = Task()
TOP1_TASK = Task(metrics=("top1",))


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside a DDP wrapper (or the model itself)."""
    return model.module if isinstance(model, DDP) else model


def _world(group=None) -> int:
    """Ranks in ``group`` (None: the whole process group; 1 without one)."""
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def average_bn_buffers(model: nn.Module, group=None) -> None:
    """Make BN running statistics identical on all ranks of ``group`` (None: all ranks): their
    mean (no-op for 1 rank).

    Phase 1 runs DDP with ``broadcast_buffers=False`` (no per-forward broadcast); this is called
    before every evaluation and at the end of the phase instead.
    """
    world = _world(group)
    if world == 1:
        return
    for name, buf in unwrap(model).named_buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
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


def shard_of(distributed) -> tuple[int, int, object]:
    """(rank, ranks, process group) of a sharded evaluation: ``distributed`` False (this process
    alone: ``(0, 1, None)``), True (every rank of the run) or a process group (its ranks: a phase-2
    worker group)."""
    if distributed is False or distributed is None:
        return 0, 1, None
    group = None if distributed is True else distributed
    if _world(group) == 1:
        return 0, 1, None
    return dist.get_rank(group), dist.get_world_size(group), group


def evaluate(model: nn.Module, data, mean: torch.Tensor, std: torch.Tensor, batch_size: int = 1024,
             distributed=False, channels_last: bool = False, amp_dtype: torch.dtype | None = None) -> float:
    """Top-1 accuracy in percent of ``model`` (eval mode, running BN statistics) on the images of
    ``data`` (an :class:`swap.data.ImageDataset`, normalised with ``mean``/``std``):
    ``evaluate_metrics`` over :func:`swap.data.eval_batches` with the ``top1`` metric.

    With ``distributed=True`` (or a process group: its ranks) every rank evaluates its shard and
    the counts are summed with all_reduce, so all ranks return the same number. Returns a float in
    [0, 100] (0 for no data).
    """
    rank, world, _ = shard_of(distributed)
    batches = eval_batches(data, batch_size, mean, std, rank, world, channels_last)
    acc = evaluate_metrics(model, batches, TOP1_TASK, distributed, amp_dtype)["top1"]
    return 0.0 if acc is None else acc                    # None: no samples


@torch.no_grad()
def evaluate_metrics(model: nn.Module, batches, task: Task = DEFAULT_TASK, distributed=False,
                     amp_dtype: torch.dtype | None = None) -> dict[str, float]:
    """The metrics of ``task`` (:class:`swap.task.Task`: ``loss``, ``top1`` and ``top5`` in
    percent, per prediction, or the user's) of ``model`` in eval mode over ``batches`` of
    ``(input, target)`` (any input of the data contract). With ``distributed=True`` (or a process
    group: its ranks) each rank passes its own shard and the sums are all-reduced, so every rank
    returns the same numbers. Returns
    ``{metric: value}``; None for a metric with no value on this data (no samples, or ``top1`` of an
    output without class-index targets)."""
    model = unwrap(model)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums = {m: torch.zeros(2, dtype=torch.float64, device=device) for m in task.metrics}
    for x, y in batches:
        with autocast(device, amp_dtype):
            out = task.forward(model, x)
            loss = task.loss(out, y) if "loss" in task.metrics else None
        for m, (s, count) in task.batch_metrics(out, y, loss, batch_samples(x, y)).items():
            sums[m] += torch.stack([s, count])
    _, world, group = shard_of(distributed)
    if world > 1:
        for t in sums.values():
            dist.all_reduce(t, group=group)
    model.train(was_training)
    return {m: (t[0] / t[1]).item() if t[1] > 0 else None for m, t in sums.items()}


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
        self.observe_norms(gradient_norm(model), epoch, step)

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
                            f"{norm:.3g} (limit divergence_grad_norm={self.max_norm:g}); lower the peak LR, lengthen the "
                            f"warm-up or clip (optim.clip_grad_norm), then --resume from the last checkpoint")


class StepLog(Callback):
    """Records between epochs (``logging.log_every`` = N): every N updates, per model, the mean
    training loss of the updates since the last record (or the epoch's start), the LR, the last
    update's gradient norm (before clipping) and the samples per second since the last record.

    On a GPU reading those values is a host sync; so each record's values are snapshotted on the
    device at its update and read only right after the divergence guard's own read (every
    ``CHECK_EVERY`` updates, and at the epoch's end), when the device has caught up: no
    synchronisation of its own. On the CPU the guard reads every update and records go out at once.

    Args:
        every: N (updates). emit: receives each record: ``{"kind": "step", "epoch", "update",
            "lr", "batch_size", "train_loss", "grad_norm", "samples_per_s"}`` (plus ``model`` when
            several); samples/s counts the global batch. models: n.
    """

    def __init__(self, every: int, emit: Callable[[dict], None], models: int):
        self.every, self.emit, self.models = every, emit, models
        self.pending: list[tuple] = []
        self.mark = None
        self.t = time.perf_counter()
        self.samples = 0

    def on_epoch_start(self, state: LoopState) -> None:
        self.mark, self.t, self.samples = state.totals.clone(), time.perf_counter(), 0

    def on_update_end(self, state: LoopState) -> None:
        """After update ``state.update`` (1-based, global); ``state.checked``: the guard has just
        read the device."""
        self.samples += state.batch_size
        if state.update % self.every == 0:
            window = state.totals - self.mark
            # loss sum and count of the window, and the last norm, per model: stays on the device
            snap = torch.stack([window[:, 0], window[:, 2], state.norms.reshape(-1).double().expand(self.models)], 1)
            self.pending.append((state.epoch, state.update, state.lr, state.batch_size, snap, self.samples,
                                 time.perf_counter() - self.t))
            self.mark, self.t, self.samples = state.totals.clone(), time.perf_counter(), 0
        if state.checked:
            self.flush()

    def on_updates_end(self, state: LoopState) -> None:
        self.flush()                                      # after the guard's read: no sync of its own

    def flush(self) -> None:
        """Emit the records taken so far (their values read from the device)."""
        for epoch, update, lr, batch_size, snap, samples, seconds in self.pending:
            for k, (loss, count, norm) in enumerate(snap.tolist()):
                self.emit({"kind": "step", **({"model": k} if self.models > 1 else {}), "epoch": epoch,
                           "update": update, "lr": lr, "batch_size": batch_size,
                           "train_loss": loss / count if count else None, "grad_norm": norm,
                           "samples_per_s": samples / seconds if seconds > 0 else 0.0})
        self.pending = []


def gradient_norm(model: nn.Module) -> torch.Tensor:
    """L2 norm (float scalar tensor, on the device: no host sync) of all of ``model``'s gradients."""
    return torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])


def slice_input(x, lo: int, hi: int):
    """Samples ``lo:hi`` of a batch input: a tensor, or each tensor of a tuple, list or mapping."""
    if isinstance(x, Mapping):
        return {k: v[lo:hi] for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(v[lo:hi] for v in x)
    return x[lo:hi]


def batch_samples(x, y) -> int:
    """Samples in a batch: the targets' length, or without targets the input's (its first tensor's
    first dimension)."""
    if y is not None:
        return len(y)
    first = next(iter(x.values())) if isinstance(x, Mapping) else x[0] if isinstance(x, (tuple, list)) else x
    return len(first)


def _pass(model: nn.Module, x, y, micro_batch_size: int, sync: bool,
          backward: bool = True, amp_dtype: torch.dtype | None = None, task: Task = DEFAULT_TASK) -> torch.Tensor:
    """Forward (and backward) over the batch ``x`` (an input of the data contract, :mod:`swap.task`;
    ``y`` its targets, or None for a model that computes its own loss) in micro-batches of samples;
    each loss weighted by its share of the batch's counted targets (:func:`swap.task.target_count`:
    those not equal to -100, or the samples), so accumulated gradients are those of the batch's
    mean loss over them. With DDP, gradients are all-reduced on the last micro-batch only if
    ``sync`` (DDP's ``no_sync`` otherwise), and the ranks' gradients are averaged (equal weight per
    rank). With ``amp_dtype`` (e.g. bfloat16) the forward runs under autocast; gradients stay
    float32. ``task`` gives the call, the loss and what a prediction is. Returns float64 (3,): loss
    sum, correct predictions, predictions (counted targets: samples for a classifier, tokens for a
    language model)."""
    is_ddp = isinstance(model, DDP)
    samples = batch_samples(x, y)
    chunk = micro_batch_size if 0 < micro_batch_size < samples else samples
    n_chunks = (samples + chunk - 1) // chunk
    device = next(unwrap(model).parameters()).device
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    whole = None
    for j in range(n_chunks):
        lo, hi = j * chunk, (j + 1) * chunk
        xc, yc = slice_input(x, lo, hi), (y[lo:hi] if y is not None else None)
        reduce = sync and j == n_chunks - 1
        comm = model.no_sync() if is_ddp and not reduce else contextlib.nullcontext()
        with comm, (contextlib.nullcontext() if backward else torch.no_grad()):
            with autocast(device, amp_dtype):
                out = task.forward(model, xc)
                loss = task.loss(out, yc)
            n = task.predictions(out, yc, min(hi, samples) - lo)      # after the forward: its alignment
            if whole is None and n_chunks > 1:
                whole = task.predictions(out, y, samples)
            if backward:
                (loss * (n / whole) if whole is not None else loss).backward()
        n = torch.as_tensor(n, dtype=torch.float64, device=device)
        totals += torch.stack([loss.detach().double() * n, task.correct(out, yc).to(device).double(), n])
    return totals


# ---------------------------------------------------------------------- update steps
class UpdateStep:
    """One update of training, pluggable into :func:`train`: :meth:`gradients` of a batch, then
    ``apply``. The loop checks the gradient norms in between (the divergence guard), so a bad
    update is never applied.

    Attributes:
        models: the modules trained: one, or W for stacked workers; each is put in train mode every
            epoch, evaluated and given its own per-epoch record.
        group_wide: every rank runs this update in step (DistributedDataParallel): stop signals, the
            epoch's totals and BN statistics are agreed over the ranks.
        group: the process group of those ranks (None: all ranks; a phase-2 worker group's own).
    """
    models: list[nn.Module]
    group_wide: bool = False
    group = None

    def gradients(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradients of the batch (``x``, ``y``: this rank's share, or (W, B, ...) for W models) at
        learning rate ``lr`` (update to come). Returns float64 (n, 3) per model: loss sum, correct
        predictions, samples; and the n gradient norms (float), both on the device (no host sync)."""
        raise NotImplementedError

    def apply(self) -> None:
        """Take the update with the gradients of the last :meth:`gradients`."""
        raise NotImplementedError

    def sync(self) -> None:
        """Bring ``models`` up to date and, when ``group_wide``, identical on every rank (BN
        statistics); called before they are evaluated or saved. Collective when ``group_wide``."""


class SGDStep(UpdateStep):
    """Any torch optimizer's update on the mean loss of the batch, computed in micro-batches of
    ``micro_batch_size`` samples (0 = one pass) with accumulated gradients; ``model`` may be
    DDP-wrapped (gradients all-reduced once, on the last micro-batch). Forward passes run under
    autocast to ``amp_dtype`` (None = float32). ``task`` (:class:`swap.task.Task`): how the model is
    called and its loss (default: cross-entropy). With ``clip_grad_norm > 0`` the whole update's
    gradient (all micro-batches, all-reduced over the ranks) is scaled to at most that L2 norm
    (``torch.nn.utils.clip_grads_with_norm_``, reusing the norm the divergence guard reads: no
    second pass over the gradients, no host sync). The schedule's LR scales each parameter group's
    own (:func:`swap.optim.lr.apply_lr`)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, micro_batch_size: int = 0,
                 amp_dtype: torch.dtype | None = None, task: Task = DEFAULT_TASK, clip_grad_norm: float = 0.0):
        self.model, self.optimizer, self.task = model, optimizer, task
        self.micro_batch_size, self.amp_dtype, self.clip_grad_norm = micro_batch_size, amp_dtype, clip_grad_norm
        self.models, self.group_wide = [model], isinstance(model, DDP)
        self.group = model.process_group if self.group_wide and _world() > 1 else None
        if self.group is not None and _world(self.group) == _world():
            self.group = None                            # the whole world: the default group

    def set_lr(self, lr: float) -> None:
        apply_lr(self.optimizer, lr)

    def clipped_norm(self) -> torch.Tensor:
        """The norm of the model's gradient (before clipping: what the divergence guard reads),
        after clipping the gradient to ``clip_grad_norm`` when that is set."""
        norm = gradient_norm(self.model)
        if self.clip_grad_norm > 0:
            torch.nn.utils.clip_grads_with_norm_([p for p in self.model.parameters() if p.grad is not None],
                                                 self.clip_grad_norm, norm)
        return norm

    def gradients(self, x, y, lr):
        self.set_lr(lr)
        self.optimizer.zero_grad(set_to_none=True)
        totals = _pass(self.model, x, y, self.micro_batch_size, sync=True, amp_dtype=self.amp_dtype, task=self.task)
        return totals.view(1, 3), self.clipped_norm()

    def apply(self) -> None:
        self.optimizer.step()

    def sync(self) -> None:
        if self.group_wide:
            average_bn_buffers(self.model, self.group)


# ---------------------------------------------------------------------- the loop
def _rates(predictions: float, rows: int, seconds: float, tokens: bool) -> dict[str, float]:
    """An epoch's training rates: ``samples_per_s`` (rows of data per second, all ranks and models)
    and, where the predictions are tokens, ``tokens_per_s`` (counted target tokens per second)."""
    if seconds <= 0:
        return {"samples_per_s": 0.0, **({"tokens_per_s": 0.0} if tokens else {})}
    if not tokens:
        return {"samples_per_s": predictions / seconds}
    return {"samples_per_s": rows / seconds, "tokens_per_s": predictions / seconds}


@dataclass
class Evaluation:
    """What the loop evaluates: ``fn(model)`` returns ``{metric: value}`` (``top1``, the test
    accuracy in percent, is recorded as ``test_acc``, any other as ``test_METRIC``); called every
    ``every`` epochs and after the last."""
    fn: Callable[[nn.Module], dict[str, float | None]]
    every: int = 1


@dataclass
class Guard:
    """The divergence guard's settings (``DivergenceGuard``): the largest gradient norm
    allowed (``inf``: only a non-finite one stops the run) and the run's name in its messages
    (e.g. "phase2 worker 3"; one per model when the step trains several)."""
    max_norm: float = float("inf")
    label: str | list[str] = "training"


@dataclass
class Position:
    """Where a loop continues: epoch ``epoch`` (0-based) from update ``step`` of it, with this
    rank's partial sums of that epoch (``totals``: loss sum, correct, samples; one such list per
    model when there are several), as :meth:`swap.callbacks.Callback.on_interrupt` received them.
    (:class:`swap.resumable.Start`, where a resumable phase continues, extends it.)"""
    epoch: int = 0
    step: int = 0
    totals: list | None = None


def train(step: UpdateStep, loader, lr_at: Callable[[int], float], *, epochs: int, start: Position | None = None,
          evaluate: Evaluation | None = None, callbacks: Sequence[Callback] = (), guard: Guard = Guard()) -> dict:
    """Train with ``step`` for epochs ``start.epoch .. epochs-1``, or until a callback stops it.

    Args:
        step: the update (:class:`UpdateStep`), owning the model(s) and optimizer.
        loader: this rank's batches: ``len(loader)`` updates per epoch, ``loader.epoch(epoch,
            start)`` yields the batches of ``epoch`` from update ``start``, ``loader.batch_size``
            is the global batch (samples) for the records (a :class:`swap.data.Loader`); or a
            :class:`swap.data.loader.PiecewiseLoader`, whose updates and batch change by epoch
            (:func:`swap.schedules.epoch_shape`).
        lr_at: schedule over the global update index: ``epoch * len(loader) + i``, or the
            updates of the epochs before plus ``i`` (a piecewise schedule's).
        epochs: the epoch to stop before.
        start: where to continue (:class:`Position`; default the start).
        evaluate: what to evaluate and how often (:class:`Evaluation`; None: nothing).
        callbacks: the watchers (:mod:`swap.callbacks`: the sink of records, ``StepLog``,
            the progress bar, the stopping rules, checkpoints, ...), called in this order.
            Each epoch's records (one per model, with ``model``: its index, when the step trains
            several): epoch (1-based), lr (last update's), batch_size (global), update (global
            index of the epoch's last update), train_loss, train_acc, test_acc (None when not
            evaluated), samples_per_s (training samples per second of that epoch, all ranks and
            models), tokens_per_s (counted target tokens per second, where the targets are tokens:
            :func:`swap.task.token_targets`), wall_s (since start), eval_s, stopped (a callback
            stopped the loop: this is the last epoch).
        guard: the divergence guard (:class:`Guard`, ``DivergenceGuard``): the norm of each
            (all-reduced) gradient is checked before it is applied, and a non-finite or larger
            norm raises. The gradient is identical on all ranks, so all stop. Checked before every
            update on CPU, every ``CHECK_EVERY`` updates and at each epoch end on a GPU.

    A stop signal (SIGINT/SIGTERM, :mod:`swap.interrupt`) is checked after every update (when
    ``step.group_wide``, after every ``CHECK_EVERY``-th, where all ranks agree on it); the
    callbacks' ``on_interrupt`` get the position, then :class:`~swap.interrupt.Interrupted` is raised.

    Returns:
        The last epoch's record of the first model, plus ``records`` (the last epoch's record of
        every model the step trains, a list of one or more; empty when no epoch was left to train),
        ``stopped_early`` (bool) and ``updates`` (int, this call).
    Raises:
        SwapError: divergence (non-finite or exploding gradient norm), naming epoch and step.
        Interrupted: a stop signal, after the callbacks' ``on_interrupt``.
    """
    start = start or Position()
    loop, records = _Loop(step, loader, lr_at, callbacks, guard), []
    for epoch in range(start.epoch, epochs):
        first = start.step if epoch == start.epoch else 0
        records = loop.epoch(epoch, first, start.totals if first else None, epoch == epochs - 1, evaluate)
        if records[0]["stopped"]:
            break
    step.sync()
    record = records[0] if records else {}
    return {**record, "records": records, "stopped_early": record.get("stopped", False), "updates": loop.updates}


class _Loop:
    """One call of :func:`train`: what stays fixed over its epochs, and one epoch of it."""

    def __init__(self, step: UpdateStep, loader, lr_at: Callable[[int], float], callbacks: Sequence[Callback],
                 guard: Guard):
        self.t_start = time.perf_counter()
        self.step, self.loader, self.lr_at, self.callbacks, self.label = step, loader, lr_at, callbacks, guard.label
        self.models, self.n = step.models, len(step.models)
        self.world = _world(step.group) if step.group_wide else 1
        self.device = next(self.models[0].parameters()).device
        self.guard = DivergenceGuard(guard.max_norm, guard.label, self.device,
                                     every=1 if self.device.type == "cpu" else CHECK_EVERY)
        self.tokens = None                    # a language model's predictions are tokens: set at the first batch
        self.updates = 0                      # this call's

    def epoch(self, epoch: int, first: int, carried: list | None, last: bool,
              evaluate: Evaluation | None) -> list[dict]:
        """Epoch ``epoch`` (0-based) from update ``first``, with this rank's partial sums
        ``carried`` of its earlier updates; ``last``: the call's last epoch. Returns its records."""
        n, step = self.n, self.step
        for m in self.models:
            m.train()
        t_epoch = time.perf_counter()
        # loss sum, correct, samples per model (this rank), kept on the device: no host sync per update
        carried = torch.tensor(carried if carried is not None else [0.0, 0.0, 0.0] * n, dtype=torch.float64).view(n, 3)
        offset, steps, batch_size = epoch_shape(self.loader, epoch)    # fixed, or a piecewise schedule's segment
        state = LoopState(epoch + 1, offset + first, 0.0, batch_size, carried.to(self.device, copy=True))
        for cb in self.callbacks:
            cb.on_epoch_start(state)
        self._updates(epoch, first, steps, offset, state)
        self.guard.check()
        for cb in self.callbacks:
            cb.on_updates_end(state)
        totals = state.totals
        samples = totals[:, 2].sum().item() - carried[:, 2].sum().item()    # waits for the device, then time it
        train_s = time.perf_counter() - t_epoch
        if step.group_wide:
            dist.all_reduce(totals, group=step.group)
        train_acc = (100.0 * totals[:, 1] / totals[:, 2]).tolist() if getattr(step, "task", DEFAULT_TASK).class_targets \
            else [None] * n                                        # soft targets: no accuracy to report
        train_loss = [totals[k, 0].item() / totals[k, 2].item() for k in range(n)]
        stopping = any([cb.should_stop(epoch + 1, train_acc, train_loss) for cb in self.callbacks])  # ask every one
        evaluating = evaluate is not None and ((epoch + 1) % evaluate.every == 0 or last or stopping)
        if evaluating:
            step.sync()
        records = []
        for k, model in enumerate(self.models):
            t_eval = time.perf_counter()
            test = evaluate.fn(model) if evaluating else {}
            records.append({
                **({"model": k} if n > 1 else {}),
                "epoch": epoch + 1, "lr": state.lr, "batch_size": batch_size, "update": offset + steps,
                "train_loss": train_loss[k], "train_acc": train_acc[k], "test_acc": test.get("top1"),
                **{f"test_{m}": v for m, v in test.items() if m != "top1"},
                **_rates(samples * self.world, (steps - first) * batch_size * n, train_s, self.tokens),
                "wall_s": time.perf_counter() - self.t_start, "eval_s": time.perf_counter() - t_eval,
                "stopped": stopping,
            })
        for record in records:
            for cb in self.callbacks:
                cb.on_epoch_end(record)
        return records

    def _updates(self, epoch: int, first: int, steps: int, offset: int, state: LoopState) -> None:
        """The updates of ``epoch`` from ``first`` (of ``steps``; global indices from ``offset``),
        each followed by the callbacks' ``on_update_end`` and a check for a stop signal.

        Raises:
            Interrupted: a stop signal, after the callbacks' ``on_interrupt``.
        """
        step, guard, totals = self.step, self.guard, state.totals
        for i, (x, y) in enumerate(self.loader.epoch(epoch, first), start=first):
            if self.tokens is None:
                self.tokens = hasattr(step, "task") and token_targets(y)
            state.lr = self.lr_at(offset + i)
            batch_totals, state.norms = step.gradients(x, y, state.lr)
            totals += batch_totals
            guard.observe_norms(state.norms, epoch + 1, i + 1)
            step.apply()
            self.updates += 1
            state.update, state.checked = offset + i + 1, guard.seen % guard.every == 0
            for cb in self.callbacks:
                cb.on_update_end(state)
            check = not step.group_wide or (offset + i + 1) % CHECK_EVERY == 0
            signum = stop_agreed(step.group_wide, self.device, step.group) if check else 0
            if signum:
                guard.check()                                # never checkpoint a diverged model
                stopped = {"epoch": epoch, "step": i + 1, "updates": self.updates,
                           "totals": totals.tolist() if self.n > 1 else totals[0].tolist()}
                for cb in self.callbacks:
                    cb.on_interrupt(stopped)
                where = self.label if isinstance(self.label, str) else ", ".join(self.label)
                raise Interrupted(signum, f"in {where} at epoch {epoch + 1}, step {i + 1} of {steps}")


__all__ = ["Evaluation", "Guard", "Position", "DEFAULT_TASK", "TOP1_TASK", "unwrap", "average_bn_buffers", "amp_dtype_for", "autocast",
           "shard_of", "evaluate", "evaluate_metrics", "DivergenceGuard", "StepLog", "gradient_norm",
           "slice_input", "batch_samples", "UpdateStep", "SGDStep", "train"]
