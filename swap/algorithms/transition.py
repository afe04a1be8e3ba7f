"""The automatic phase-1 -> phase-2 switch of SWAP (``phase1.stop: auto``).

Gupta, Akle Serrano and DeCoste (ICLR 2020, Sec. 6) choose the transition point by a grid search and
name a principled rule as open work. :class:`AutoSwitch` is a stopping rule of the train loop: after each
phase-1 epoch past the warm-up it reads one signal (``phase1.stop.signal``) and decides:

``plateau``  the large-batch training loss gains less than ``min_gain`` (relative) over ``window``
             epochs (:class:`swap.stopping.Plateau`). Free: the loop computes the loss anyway.
``holdout``  the large-batch model's top-1 accuracy on the validation split (``data.holdout``) has
             not beaten its best by more than ``min_delta`` points for ``window`` epochs in a row
             (:class:`swap.stopping.HeldOutPeak`): early stopping of the large-batch phase. One
             evaluation of the validation split per epoch.
``trials``   (the default) every ``every`` epochs, fork two trial copies of the phase-1 weights and train each
             for ``trial_updates`` small-batch updates (phase 2's batch, its peak LR decaying
             linearly to 0), with different data orders; average them and recompute their BN
             statistics, as SWAP's phase 3 does. The switch comes when this miniature SWAP's
             validation accuracy stops improving (:class:`swap.stopping.HeldOutPeak` over the trials,
             ``window`` trials in a row): what a grid search over stopping points measures, at the
             price of a short phase 2 per trial instead of a whole run per point.
``barrier``  the same trials, deciding on basin stability instead (Frankle, Dziugaite, Roy and
             Carbin, "Linear mode connectivity and the lottery ticket hypothesis", ICML 2020,
             Sec. 2): the error barrier on the straight line between the two copies, the mean of
             their validation accuracies minus the accuracy of their midpoint (BN recomputed),
             in points. Switch when it is at most ``max_barrier``: the copies then lie in one
             linearly connected region, the condition under which averaging SWAP's workers works.

BENCHMARKS.md compares the four signals with a grid search of stopping accuracies. The trials' updates count on the critical path (the two copies train in parallel on ranks 0 and 1;
one after the other with one rank) and the rule's seconds in the phase's wall time; both are in
``summary.json``'s ``switch``. The trials leave phase 1 itself untouched: they train copies, on
data streams of their own, (seed, "trial", epoch, copy).
"""
from __future__ import annotations

import copy
import time

import torch
from torch import nn

from .. import distributed
from ..callbacks import Callback
from ..averaging import average_state_dicts, bn_buffer_names
from ..config import SwapError, section_batches
from ..context import Context
from ..schedules import warmup_decay
from ..stopping import HeldOutPeak, Plateau

COPIES = 2


class AutoSwitch(Callback):
    """``phase1.stop: auto`` as a callback of the train loop (:mod:`swap.callbacks`): its
    ``should_stop`` asks ``self(epoch, train_loss)``, and each epoch's readings go to its record.

    ``model``: phase 1's model (not DDP-wrapped), ``sync``: makes its BN statistics identical on all
    ranks (collective), ``after_epoch``: the warm-up's last epoch (no switch up to it),
    ``last_epoch``: phase 1's last epoch (nothing measured there: the phase ends anyway). On a
    resume (``resumed_epochs`` > 0) the rule is first fed the readings that metrics.jsonl kept for
    those epochs. ``reading`` holds the latest epoch's readings for its metrics record.
    Collective for every signal but ``plateau``.

    Raises:
        SwapError: a signal that needs the validation split without one.
    """

    def __init__(self, ctx: Context, phase: str, model: nn.Module, sync, after_epoch: int, last_epoch: int,
                 resumed_epochs: int = 0):
        s = ctx.cfg.phase1.stop
        self.ctx, self.model, self.sync, self.s, self.signal = ctx, model, sync, s, s.signal
        self.after, self.last_epoch = after_epoch, last_epoch
        self.batch = section_batches(ctx.cfg, "phase2")[0][1]           # a trial copy's batch: phase 2's
        self.per_copy = s.trial_updates or len(ctx.train_set) // self.batch
        kept = [r for r in ctx.run.read_metrics() if r["phase"] == phase and r["epoch"] is not None
                and r["epoch"] <= resumed_epochs] if resumed_epochs else []
        self.trials = sum("trial_val_acc" in r for r in kept)
        self.cost_s = sum(r.get("switch_s", 0.0) for r in kept)
        self.reading: dict = {}
        if s.signal == "plateau":
            self.rule = Plateau(s.window, s.min_gain, after_epoch, [r["train_loss"] for r in kept])
            return
        if ctx.val_set is None:
            raise SwapError(f"phase1.stop.signal={s.signal} needs a validation split: set data.holdout=N")
        key = "val_acc" if s.signal == "holdout" else "trial_val_acc"
        self.rule = HeldOutPeak(s.window, s.min_delta, after_epoch, [r[key] for r in kept if key in r])
        self.barrier = None

    def should_stop(self, epoch: int, train_acc: list, train_loss: list) -> bool:
        """The train loop's hook (:mod:`swap.callbacks`): the worst model's loss decides."""
        return self(epoch, max(train_loss))

    def on_epoch_end(self, record: dict) -> None:
        """The train loop's hook: the epoch's readings into its metrics record."""
        record.update(self.reading)

    def __call__(self, epoch: int, train_loss: float) -> bool:
        """Whether phase 1 stops after ``epoch`` (1-based), whose training loss is ``train_loss``."""
        self.reading = {}
        if self.signal == "plateau":
            return self.rule(epoch, train_loss)
        if epoch >= self.last_epoch or (self.signal != "holdout" and (epoch <= self.after or epoch % self.s.every)):
            return False
        t = time.perf_counter()
        self.sync()
        if self.signal == "holdout":
            self.reading = {"val_acc": self.ctx.validation_score(self.model)}
            stop = self.rule(epoch, self.reading["val_acc"])
        else:
            self.reading = self.measure(epoch)
            self.trials += 1
            self.barrier = self.reading["trial_barrier"]
            stop = self.rule(epoch, self.reading["trial_val_acc"])
            if self.signal == "barrier":
                stop = self.barrier <= self.s.max_barrier
        self.reading["switch_s"] = time.perf_counter() - t
        self.cost_s += self.reading["switch_s"]
        return stop

    def measure(self, epoch: int) -> dict:
        """Train the two trial copies of the current weights (rank c trains copy c, or rank 0 both),
        gather them on every rank and score them on the validation split: each copy, and their
        midpoint with BN statistics recomputed. Returns ``trial_val_acc`` (the midpoint's, %),
        ``trial_barrier`` (the copies' mean minus the midpoint's, points) and ``trial_copies_val_acc``."""
        ctx, d = self.ctx, self.ctx.dist
        mine = {c: self._train_copy(epoch, c) for c in range(COPIES) if c % d.world_size == d.rank}
        states = {c: s for part in distributed.all_gather_objects(mine) for c, s in part.items()}
        copies = []
        for c in range(COPIES):
            m = copy.deepcopy(self.model)
            m.load_state_dict(states[c])
            copies.append(m)
        mid = copy.deepcopy(self.model)
        mid.load_state_dict(average_state_dicts([states[c] for c in range(COPIES)], bn_buffer_names(mid)))
        ctx.recompute_bn(mid, distributed=True)
        ends = [ctx.validation_score(m) for m in copies]
        middle = ctx.validation_score(mid)
        return {"trial_val_acc": middle, "trial_barrier": sum(ends) / COPIES - middle, "trial_copies_val_acc": ends}

    def _train_copy(self, epoch: int, c: int) -> dict[str, torch.Tensor]:
        """Copy ``c``'s state dict (on the CPU) after :attr:`per_copy` small-batch updates
        (``phase1.stop.trial_updates``, or one phase-2 epoch's; phase 2's optimizer, peak LR, decay shape and
        minimum LR) from the current weights, on data
        stream (seed, "trial", epoch, c)."""
        ctx, cfg = self.ctx, self.ctx.cfg
        trial = copy.deepcopy(self.model).train()
        stream = ("trial", epoch, c)
        loader = ctx.loader(self.batch, stream, data_parallel=False)
        step = ctx.update_step(trial, ctx.optimizer(trial, "phase2", stream), section="phase2")
        total = self.per_copy
        p2 = cfg.phase2                     # a miniature phase 2: its optimizer, peak LR, decay shape and minimum
        lr_at = warmup_decay(p2.peak_lr, 0, total, p2.schedule, p2.min_lr)
        done, pass_ = 0, 0
        while done < total:
            for x, y in loader.epoch(pass_):
                step.gradients(x, y, lr_at(done))
                step.apply()
                done += 1
                if done == total:
                    break
            pass_ += 1
        return {k: v.detach().cpu() for k, v in trial.state_dict().items()}

    def summary(self) -> dict:
        """``summary.json``'s ``switch``: the rule, its settings, its last readings and its cost
        (``trial_updates`` on the critical path, ``cost_s`` seconds over all sessions)."""
        s = self.s
        if self.signal == "plateau":
            return {"rule": "plateau", "window": s.window, "min_gain": s.min_gain, "last_gain": self.rule.gain}
        out = {"rule": self.signal, "window": s.window, "min_delta": s.min_delta, "last_acc": self.rule.last,
               "best_acc": self.rule.best, "cost_s": self.cost_s}
        if self.signal in ("trials", "barrier"):
            parallel = 1 if self.ctx.dist.world_size >= COPIES else COPIES
            out.update(every=s.every, trials=self.trials, trial_updates=self.trials * self.per_copy * parallel,
                       last_barrier=self.barrier)
            if self.signal == "barrier":
                out["max_barrier"] = s.max_barrier
        return out


__all__ = ["COPIES", "AutoSwitch"]
