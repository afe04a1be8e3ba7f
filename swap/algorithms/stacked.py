"""SWAP phase 2 with a rank's workers stacked into one computation (``phase2.layout: vmap``).

:class:`StackedWorkers` trains the W models as one (``torch.func``: stacked parameters and BN
buffers, one ``vmap`` of ``grad``, one SGD over the stacks); each worker keeps its data stream
("phase2", w), its BN statistics and momentum, so the result equals W sequential runs up to float
rounding (Gupta et al., ICLR 2020, Algorithm 1, phase 2). On a GPU this turns W small batches into
one large computation; on a CPU it is slower than stepping the workers in turn (measured 0.3-0.6x),
hence not the CPU default.

Checkpoints have the sequential layout's format (``worker{w}_last`` with a per-worker SGD state),
so a run may change layout when resumed.
"""
from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, stack_module_state, vmap

from .. import interrupt
from ..checkpoint import checkpoint_exists, load_checkpoint, read_meta, save_checkpoint
from ..train import DivergenceGuard, autocast
from ..context import Context


def positions(ctx: Context, workers: list[int], resume: bool) -> set[tuple[int, int]]:
    """(epoch, step) at which each worker would continue; stacking needs one common position."""
    out = set()
    for w in workers:
        last = ctx.run.checkpoint(f"worker{w}_last")
        if resume and checkpoint_exists(last):
            meta = read_meta(last)
            out.add((meta["epoch"], (meta.get("partial") or {}).get("step", 0)))
        else:
            out.add((0, 0))
    return out


def train_stacked(ctx: Context, model, workers: list[int], resume: bool) -> dict[int, dict]:
    """Phase 2 of ``workers`` (all at the same resume position) stacked on this rank's device,
    starting from ``model`` (phase-1 weights and BN buffers). Writes each worker's metrics,
    ``worker{w}_last`` every ``checkpoint_every`` epochs, and ``worker{w}``; returns each worker's
    metadata as :func:`swap.algorithms.swap._train_worker` does.

    Raises:
        SwapError: a worker's gradient norm is non-finite or above ``max_grad_norm`` (names it;
            :class:`swap.train.DivergenceGuard`).
        swap.interrupt.Interrupted: SIGINT/SIGTERM, after every worker's mid-epoch checkpoint.
    """
    cfg, p2, run = ctx.cfg, ctx.cfg.phase2, ctx.run
    config_hash = cfg.hash()
    models = [copy.deepcopy(model) for _ in workers]
    singles = [ctx.optimizer(m) for m in models]             # per-worker SGD: the checkpoint format
    start_epoch, start_step, before, carried = 0, 0, {"updates": 0, "wall_s": 0.0}, None
    device = next(model.parameters()).device
    if resume:
        metas = [load_checkpoint(run.checkpoint(f"worker{w}_last"), m, config_hash, o)
                 for w, m, o in zip(workers, models, singles) if checkpoint_exists(run.checkpoint(f"worker{w}_last"))]
        if metas:
            start_epoch, before = metas[0]["epoch"], metas[0]["progress"]
            partial = metas[0].get("partial") or {}
            start_step = partial.get("step", 0)
            if partial:
                carried = torch.tensor([m["partial"]["totals"] for m in metas], dtype=torch.float64, device=device)
    o = cfg.optim
    stack = StackedWorkers(models, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay,
                           amp_dtype=ctx.amp)
    _stack_momentum(stack.optimizer, singles)
    loaders = [ctx.loader(p2.batch_size, ("phase2", w), data_parallel=False) for w in workers]
    steps, n = len(loaders[0]), len(workers)
    lr_at = ctx.schedule(p2.peak_lr, p2.warmup_epochs, p2.epochs, steps, p2.schedule)
    sinks = [ctx.sink("phase2", w, p2.epochs) for w in workers]
    guard = DivergenceGuard(cfg.max_grad_norm, [f"phase2 worker {w}" for w in workers], device,
                            every=1 if device.type == "cpu" else interrupt.CHECK_EVERY)
    t = time.perf_counter()
    updates = 0

    def unstack() -> None:
        with torch.no_grad():
            for i, m in enumerate(models):
                m.load_state_dict(stack.state_dict(i))
                _unstack_momentum(stack.optimizer, singles[i], i)

    def save_last(epoch: int, extra: dict) -> None:
        unstack()
        progress = {"updates": before["updates"] + updates, "wall_s": before["wall_s"] + time.perf_counter() - t}
        for i, w in enumerate(workers):
            meta = {"config_hash": config_hash, "phase": "phase2", "worker": w, "epoch": epoch, "progress": progress}
            if extra:
                meta["partial"] = {"step": extra["step"], "totals": extra["totals"][i]}
            save_checkpoint(run.checkpoint(f"worker{w}_last"), models[i], meta, singles[i])

    final: dict[int, dict] = {}                    # each worker's last epoch record
    for epoch in range(start_epoch, p2.epochs):
        t_epoch = time.perf_counter()
        first = start_step if epoch == start_epoch else 0
        totals = (carried.clone() if first and carried is not None else
                  torch.zeros(n, 3, dtype=torch.float64, device=device))      # on the device: no sync per update
        lr = 0.0
        for i, (x, y) in enumerate(stacked_batches(loaders, epoch, first), start=first):
            lr = lr_at(epoch * steps + i)
            norms, loss, correct = stack.gradients(x, y)
            guard.observe_norms(norms, epoch + 1, i + 1)          # raises as the train loop does
            stack.update(lr)
            updates += 1
            totals += torch.stack([loss.double() * y.shape[1], correct.double(),
                                   totals.new_full((n,), float(y.shape[1]))], dim=1)
            if interrupt.stop_agreed(False):
                guard.check()                                    # never checkpoint a diverged worker
                save_last(epoch, {"step": i + 1, "totals": totals.tolist()})
                raise interrupt.Interrupted(interrupt.requested(), f"in phase2 workers {workers} at epoch "
                                            f"{epoch + 1}, step {i + 1} of {steps}")
        guard.check()
        train_s = time.perf_counter() - t_epoch
        unstack()
        last = epoch == p2.epochs - 1
        for k, (w, m) in enumerate(zip(workers, models)):
            test_acc = ctx.evaluate(m) if (epoch + 1) % cfg.eval_every == 0 or last else None
            tot = totals[k]
            record = {"epoch": epoch + 1, "lr": lr, "batch_size": p2.batch_size, "train_loss": float(tot[0] / tot[2]),
                      "train_acc": float(100 * tot[1] / tot[2]), "test_acc": test_acc,
                      "samples_per_s": float(totals[:, 2].sum()) / train_s, "wall_s": time.perf_counter() - t,
                      "eval_s": 0.0, "stopped": False}
            sinks[k](record)
            if p2.track_average and not last:
                save_checkpoint(run.checkpoint(f"track/worker{w}_epoch{epoch + 1}"), m, {"worker": w, "epoch": epoch + 1})
            final[w] = record
        if cfg.checkpoint_every and (epoch + 1) % cfg.checkpoint_every == 0 and not last:
            save_last(epoch + 1, {})
    out = {}
    for w, m in zip(workers, models):
        rec = final.get(w, {})
        meta = {"config_hash": config_hash, "phase": "phase2", "worker": w, "epoch": p2.epochs,
                "updates": before["updates"] + updates, "train_acc": rec.get("train_acc"),
                "test_acc": rec.get("test_acc"), "wall_s": before["wall_s"] + time.perf_counter() - t}
        save_checkpoint(run.checkpoint(f"worker{w}"), m, meta)
        out[w] = meta
    return out


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
    """

    def __init__(self, models: list, momentum: float, nesterov: bool, weight_decay: float,
                 amp_dtype: torch.dtype | None = None):
        self.params, self.buffers = stack_module_state(models)
        self.optimizer = torch.optim.SGD(list(self.params.values()), lr=0.0, momentum=momentum, nesterov=nesterov,
                                         weight_decay=weight_decay)
        base = copy.deepcopy(models[0]).to("meta")        # the architecture only; weights come stacked
        if amp_dtype is not None:
            # vmap's batch-norm rule (stacked running statistics) needs its input in the statistics'
            # dtype, while the unstacked kernels take bf16 input with float32 statistics and compute
            # in float32 inside: normalise in float32 here too; the next layer's autocast casts back.
            for m in base.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.register_forward_pre_hook(lambda _, args: (args[0].float(), *args[1:]))

        def loss_fn(p, b, x, y):
            with autocast(x.device, amp_dtype):
                out = functional_call(base, (p, b), (x,))
            loss = F.cross_entropy(out.float(), y)
            return loss, (loss.detach(), (out.argmax(1) == y).sum())

        self._grad = vmap(grad(loss_fn, has_aux=True))

    def gradients(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each worker's gradient on its batch, into the stacked ``.grad``s (BN buffers updated).

        Args: x float (W, B, C, H, W), y int64 (W, B): worker w's batch is ``x[w], y[w]``.
        Returns: gradient norms float64 (W,), mean losses float (W,), correct predictions int64 (W,),
            all on the device (no host sync).
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
