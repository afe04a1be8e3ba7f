"""SWAP phase 2 with a rank's workers stacked into one computation (``phase2.layout: vmap``).

:class:`StackedWorkers` trains the W models as one (``torch.func``: stacked parameters and BN
buffers, one ``vmap`` of ``grad``, one SGD over the stacks); each worker keeps its data stream
("phase2", w), its BN statistics and momentum, so the result equals W sequential runs up to float
rounding (Gupta et al., ICLR 2020, Algorithm 1, phase 2). On a GPU this turns W small batches into
one large computation; on a CPU it is slower than stepping the workers in turn (BENCHMARKS.md),
hence not the CPU default.

:class:`StackedStep` is the train loop's update step for them (:func:`swap.train.train`: one loop
for every layout). Checkpoints have the sequential layout's format (``worker{w}_last`` with a
per-worker SGD state, written by :class:`swap.resumable.Resumable`), so a run may change layout when resumed.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.func import functional_call, grad, stack_module_state, vmap

from ..callbacks import Callback
from ..config import optim_for
from ..context import Context
from ..optim.build import sgd, weight_decay_of
from ..resumable import Resumable, Unit
from ..rundir import RunDir
from ..task import cross_entropy, top_k_correct
from ..train import Evaluation, Guard, UpdateStep, autocast, train


def train_stacked(ctx: Context, model, workers: list[int], resume: bool) -> dict[int, dict]:
    """Phase 2 of ``workers`` (all at the same resume position: :meth:`swap.resumable.Resumable.position`)
    stacked on this rank's device, starting from ``model`` (phase-1 weights and BN buffers), as one
    :class:`swap.resumable.Resumable` of W units. Writes each worker's metrics, ``worker{w}_last`` every
    ``checkpoint_every`` epochs, and ``worker{w}``; returns each worker's metadata as
    :func:`swap.algorithms.swap.train_worker` does.

    Raises:
        SwapError: a worker's gradient norm is non-finite or above ``divergence_grad_norm`` (names it;
            :class:`swap.train.DivergenceGuard`).
        swap.interrupt.Interrupted: SIGINT/SIGTERM, after every worker's mid-epoch checkpoint.
    """
    cfg, p2 = ctx.cfg, ctx.cfg.phase2
    models = [copy.deepcopy(model) for _ in workers]
    units = [Unit(RunDir.worker(w), m, ctx.optimizer(m, "phase2"), {"phase": "phase2", "worker": w})   # per-worker SGD:
             for w, m in zip(workers, models)]                                            # the checkpoint format
    loader = StackedLoader([ctx.loader(p2.batch_size, ("phase2", w), data_parallel=False) for w in workers])
    steps = len(loader)
    phase = Resumable(ctx.saving, units, epochs=p2.epochs, steps=steps, snapshots=p2.track_average)
    start = phase.restore(resume)
    o = optim_for(cfg, "phase2")                         # sgd, no decay groups, no clipping (config.validate)
    step = StackedStep(models, [u.optimizer for u in units], momentum=o.momentum, nesterov=o.nesterov,
                       weight_decay=weight_decay_of("sgd", o), amp_dtype=ctx.amp, loss_fn=ctx.task.loss)
    phase.sync = step.sync
    sinks = _Sinks([ctx.sink("phase2", w, p2.epochs) for w in workers])
    out = train(step, loader, ctx.schedule(p2.peak_lr, p2.warmup_epochs, p2.epochs, steps, p2.schedule),
                epochs=p2.epochs, start=start, evaluate=Evaluation(ctx.evaluate, cfg.eval_every),
                callbacks=[sinks, *ctx.step_log(sinks.step, len(workers)), *ctx.user_callbacks, phase],
                guard=Guard(cfg.divergence_grad_norm, [f"phase2 worker {w}" for w in workers]))
    p = phase.progress(out["updates"])
    metas = phase.finish([{"epoch": p2.epochs, "updates": p["updates"], "train_acc": rec["train_acc"],
                           "test_acc": rec["test_acc"], "wall_s": p["wall_s"]} for rec in out["records"]])
    return dict(zip(workers, metas))


class _Sinks(Callback):
    """Each worker's records to its own sink (:class:`swap.context.Sink`), by the record's ``model``."""

    def __init__(self, sinks: list):
        self.sinks = sinks

    def on_epoch_end(self, record: dict) -> None:
        self.sinks[record["model"]]({k: v for k, v in record.items() if k != "model"})

    def step(self, record: dict) -> None:
        self.sinks[record["model"]].step({k: v for k, v in record.items() if k != "model"})


class StackedLoader:
    """The loaders of W workers as one: ``epoch`` yields every worker's batch of each update at
    once (:func:`stacked_batches`), x float (W, B, C, H, W), y int64 (W, B); ``len()`` is the
    updates per epoch and ``batch_size`` one worker's batch (samples)."""

    def __init__(self, loaders: list):
        self.loaders, self.batch_size = loaders, loaders[0].batch_size

    def __len__(self) -> int:
        return len(self.loaders[0])

    def epoch(self, epoch: int, start: int = 0):
        return stacked_batches(self.loaders, epoch, start)


def stacked_batches(loaders: list, epoch: int, start: int = 0):
    """Each worker's batch of every update of ``epoch`` from update ``start``, drawn from its own
    loader (its own data order and augmentation), made for all W workers at once: one gather, one
    augmentation and one normalisation of W x B samples per update instead of W small ones (the
    per-sample operations give each worker exactly its own loader's batch). The loaders differ in
    their stream (``seed_parts``) only: same data, batch, augmentation and normalisation.
    Yields x float (W, B, C, H, W), y int64 (W, B)."""
    plans = [loader.plan(epoch, start) for loader in loaders]
    idx = torch.cat([perm for perm, _ in plans], dim=1)                           # (S, W * B)
    params = {k: torch.cat([p[k] for _, p in plans], dim=1) for k in plans[0][1]}
    n = len(loaders)
    for j in range(len(idx)):
        x, y = loaders[0].batch(idx[j], {k: v[j] for k, v in params.items()})
        yield x.view(n, -1, *x.shape[1:]), y.view(n, -1)


class StackedWorkers:
    """W models of one architecture trained as one computation: parameters and BN buffers stacked
    along a new leading dimension (``torch.func.stack_module_state``), gradients from one ``vmap``
    of ``grad(functional_call(...))`` with each model on its own mini-batch and its own BN running
    statistics (the stacked buffers are vmapped inputs, updated in place in train mode), and one
    ``torch.optim.SGD`` over the stacked tensors, which is W independent SGDs because momentum,
    Nesterov and weight decay act element-wise (the workers share the LR).

    Args:
        models: W modules with identical architecture, on one device (copied, not modified).
        momentum, nesterov, weight_decay: the SGD settings of every worker.
        amp_dtype: forward passes under autocast to this dtype (bfloat16 on GPUs); None = float32.
        loss_fn: ``loss_fn(output, target) -> scalar`` (default cross-entropy, :mod:`swap.task`).
    """

    def __init__(self, models: list, momentum: float, nesterov: bool, weight_decay: float,
                 amp_dtype: torch.dtype | None = None, loss_fn=None):
        self.params, self.buffers = stack_module_state(models)
        loss_fn = loss_fn or cross_entropy
        self.optimizer = sgd(list(self.params.values()), momentum, nesterov, weight_decay)
        base = copy.deepcopy(models[0]).to("meta")        # the architecture only; weights come stacked
        if amp_dtype is not None:
            # vmap's batch-norm rule (stacked running statistics) needs its input in the statistics'
            # dtype, while the unstacked kernels take bf16 input with float32 statistics and compute
            # in float32 inside: normalise in float32 here too; the next layer's autocast casts back.
            for m in base.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.register_forward_pre_hook(lambda _, args: (args[0].float(), *args[1:]))

        def worker_loss(p, b, x, y):
            with autocast(x.device, amp_dtype):
                out = functional_call(base, (p, b), (x,))
            loss = loss_fn(out, y)
            return loss, (loss.detach(), top_k_correct(out, y))

        self._grad = vmap(grad(worker_loss, has_aux=True))

    def gradients(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each worker's gradient on its batch, into the stacked parameters' ``.grad`` (BN buffers updated).

        Args:
            x: float (W, B, C, H, W); worker w's batch is ``x[w], y[w]``.
            y: int64 (W, B).
        Returns:
            Gradient norms float64 (W,), mean losses float (W,) and correct predictions int64
            (W,), all on the device (no host sync).
        """
        # grad() differentiates inside its own transform; under the outer no_grad the results carry
        # no graph back to the stacked (requires_grad) parameters, which would otherwise be kept
        # alive by anything holding them: the guard's on-device record leaked a graph per update.
        with torch.no_grad():
            grads, (loss, correct) = self._grad(self.params, self.buffers, x, y)
        for k, g in grads.items():
            self.params[k].grad = g
        norms = torch.sqrt(sum(g.flatten(1).double().pow(2).sum(1) for g in grads.values()))
        return norms, loss, correct

    def update(self, lr: float) -> None:
        """One SGD step of every worker at learning rate ``lr`` with the gradients of :meth:`gradients`."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()

    def state_dict(self, i: int) -> dict[str, torch.Tensor]:
        """Worker ``i``'s parameters and buffers (views into the stacks), as its module's state_dict."""
        return {**{k: v[i] for k, v in self.params.items()}, **{k: v[i] for k, v in self.buffers.items()}}


class StackedStep(UpdateStep):
    """The train loop's update for W stacked workers (:class:`StackedWorkers`): :meth:`gradients`
    of each worker on its own batch, then one SGD step of all. :meth:`sync` copies each worker's
    weights, BN statistics and momentum back into its own module and optimizer (``models``,
    ``optimizers``: the per-worker SGDs, whose restored momentum the stack starts from), the
    format of its checkpoints.

    Args:
        models, optimizers: the W workers' modules and their ``torch.optim.SGD``.
        momentum, nesterov, weight_decay, amp_dtype, loss_fn: as :class:`StackedWorkers`.
    """

    def __init__(self, models: list, optimizers: list, momentum: float, nesterov: bool, weight_decay: float,
                 amp_dtype: torch.dtype | None = None, loss_fn=None):
        self.models, self.optimizers = models, optimizers
        self.stack = StackedWorkers(models, momentum, nesterov, weight_decay, amp_dtype, loss_fn)
        _stack_momentum(self.stack.optimizer, optimizers)
        self.lr = 0.0

    def gradients(self, x, y, lr):
        self.lr = lr
        norms, loss, correct = self.stack.gradients(x, y)
        samples = y.shape[1]
        totals = torch.stack([loss.double() * samples, correct.double(), norms.new_full((len(norms),), float(samples))],
                             dim=1)
        return totals, norms

    def apply(self) -> None:
        self.stack.update(self.lr)

    def sync(self) -> None:
        with torch.no_grad():
            for i, (m, opt) in enumerate(zip(self.models, self.optimizers)):
                m.load_state_dict(self.stack.state_dict(i))
                _unstack_momentum(self.stack.optimizer, opt, i)


def _stack_momentum(stacked: torch.optim.SGD, singles: list[torch.optim.SGD]) -> None:
    """Momentum buffers of the per-worker optimizers (restored from checkpoints) into the stacked one."""
    params = stacked.param_groups[0]["params"]
    for j, p in enumerate(params):
        bufs = [s.state.get(s.param_groups[0]["params"][j], {}).get("momentum_buffer") for s in singles]
        if all(b is not None for b in bufs):
            stacked.state[p]["momentum_buffer"] = torch.stack(bufs).to(p.device)


def _unstack_momentum(stacked: torch.optim.SGD, single: torch.optim.SGD, i: int) -> None:
    """Worker ``i``'s slice of the stacked momentum buffers into its own optimizer (for checkpoints)."""
    for p, q in zip(stacked.param_groups[0]["params"], single.param_groups[0]["params"]):
        buf = stacked.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            single.state[q]["momentum_buffer"] = buf[i].clone()


__all__ = ["train_stacked", "StackedLoader", "stacked_batches", "StackedWorkers", "StackedStep"]
