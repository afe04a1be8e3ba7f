"""SWAP inside PyTorch Lightning: one :class:`SWAP` callback in a user's own ``Trainer``.

Stochastic Weight Averaging in Parallel (Gupta, Akle Serrano, DeCoste, ICLR 2020, Algorithm 1) on the
user's ``LightningModule``, ``LightningDataModule`` and ``configure_optimizers``::

    trainer = L.Trainer(accelerator="cpu", devices=4, strategy="ddp", max_epochs=30,
                        callbacks=[SWAP(switch_epoch=24, phase2_lr=0.05)])
    trainer.fit(module, datamodule=dm)       # every rank now holds the averaged model

- **Phase 1** is the user's own DDP training: W ranks, global batch W x the DataLoader's batch.
- **Phase 2** starts at an epoch start: at ``switch_epoch``, or after the first epoch whose
  validation reaches ``stop_value`` on ``monitor`` (the paper's stopping accuracy). Gradients stop
  being all-reduced (DDP's own ``no_sync`` switch, held for the whole phase: no communication, no
  comm hook in phase 1), BN buffers stop being broadcast, each rank becomes a worker that sees every
  training sample each epoch in an order of its own (``(seed, "phase2", worker, epoch)``), and the LR
  of every parameter group follows the phase-2 schedule from ``phase2_lr`` (the user's LR schedulers
  are dropped, as Lightning's ``StochasticWeightAveraging`` takes over the LR). The user's optimizer
  is kept, whatever it is. The torch RNG is seeded at each phase-2 batch from ``(seed, worker,
  epoch, batch)``, so a worker's dropout draws are its own and repeat after a resume.
- **Phase 3**, on the last batch of the last epoch (before its validation): the parameters are
  averaged over the ranks and the BN statistics recomputed exactly over the training data, sharded
  over the ranks with all-reduced sums (:func:`swap.averaging.recompute_bn`), through the module's own
  ``training_step`` (or ``bn_forward``) on the DataModule's batches. The epoch's validation, the
  last checkpoint and ``trainer.test`` then see the averaged model. Each worker's and the averaged
  model's validation metrics (the module's own ``validation_step`` and ``self.log`` names, over the
  whole validation set) go to the Trainer's loggers as ``swap/worker{r}/NAME`` and
  ``swap/average/NAME``, and stay in ``SWAP.metrics``.

Checkpoints hold every worker: in phase 2 the callback's state (saved by any checkpoint: Lightning's
``ModelCheckpoint``, ``OnExceptionCheckpoint``, ``trainer.save_checkpoint``) holds each worker's
weights and optimizer state, gathered from the ranks; ``trainer.fit(..., ckpt_path=...)`` gives
each rank its worker back and continues its data order from the checkpoint's batch, so a resumed
run ends with the uninterrupted run's weights, bit for bit on CPU (Lightning alone replays a plain
DataLoader's epoch from its start).

The Lightning loop internals this touches (the training loader's length, the data fetcher) are
those of Lightning 2.5-2.6; :meth:`SWAP.setup` checks them and names the version if they moved.
"""
from __future__ import annotations

import atexit
import math
import multiprocessing.context
import os
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.utils.data import BatchSampler, DataLoader

from .averaging import distributed_average_, recompute_bn
from .data.loader import WorkerOrder, pass_slices, stream_seed
from .distributed import teardown
from .errors import SwapError
from .optim.lr import apply_lr, record_lr_scales
from .schedules import PHASE2_SHAPES, phase2_schedule

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.strategies import DDPStrategy
    from lightning.pytorch.utilities.data import extract_batch_size
    from lightning.pytorch.utilities.model_helpers import is_overridden
except ModuleNotFoundError as exc:                 # one line naming the extra
    if (exc.name or "").split(".")[0] != "lightning":
        raise
    raise ModuleNotFoundError("swap.lightning needs Lightning; pip install 'swap[lightning]'", name="lightning") from None


class _Recorder:
    """Stands in for ``LightningModule.log`` / ``log_dict`` during the callback's own passes: keeps the
    batch-size-weighted sum of each logged number (Lightning's on-epoch mean)."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.batch_size = 1

    def log(self, name: str, value, *args, batch_size: int | None = None, **kwargs) -> None:
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                return
            value = value.item()
        if not isinstance(value, (int, float)):          # e.g. a torchmetrics Metric object: not a number here
            return
        n = batch_size or self.batch_size
        self.sums[name] = self.sums.get(name, 0.0) + float(value) * n
        self.counts[name] = self.counts.get(name, 0) + n

    def log_dict(self, values, *args, **kwargs) -> None:
        for name, value in values.items():
            self.log(name, value, *args, **kwargs)


# ddp_spawn / ddp_fork / ddp_notebook run the fit in processes the launching one only hears rank 0's
# weights back from: the callback's metrics, phase and worker checkpoints would stay there.
_LAUNCHED = ("SWAP needs Trainer(strategy='ddp'), whose ranks are the script's own processes; strategy "
             "ddp_{} trains in processes that return only rank 0's weights to this one")


class SWAP(Callback):
    """SWAP's three phases as a Lightning ``Callback`` (module docstring; Gupta et al., ICLR 2020,
    Algorithm 1). Needs ``strategy="ddp"`` with W >= 2 ranks (W workers in phase 2), an epoch
    budget (``max_epochs``), automatic optimization and one map-style training DataLoader that batches
    by ``batch_size``.

    Args:
        phase2_lr: peak LR of phase 2 (each parameter group keeps its ratio to the optimizer's
            default LR, as set in ``configure_optimizers``).
        switch_epoch: the first epoch (0-based) of phase 2; phase 2 runs to ``max_epochs``.
        monitor, stop_value, mode: instead of ``switch_epoch``, phase 2 starts after the first
            epoch whose logged ``monitor`` is >= (mode ``max``) or <= (``min``) ``stop_value`` (the
            paper's stopping accuracy), and at the latest at epoch ``max_epochs - phase2_epochs``.
        phase2_epochs: phase 2's length in epochs (needed with ``monitor``; with ``switch_epoch``
            it is ``max_epochs - switch_epoch``). The fit ends when phase 2 does.
        phase2_schedule: ``linear`` (from ``phase2_lr`` to ``phase2_min_lr`` at the last update, the
            paper's), ``cosine`` (half cosine to ``phase2_min_lr``) or ``constant``.
        phase2_min_lr: the LR the decay ends at (default 0).
        phase2_batch_size: each worker's batch in phase 2, in samples (default: the training
            DataLoader's ``batch_size``, phase 1's per-rank batch). The paper's phase 2 uses a small
            batch: with phase 1 at W x 512, ``phase2_batch_size=128`` gives each worker 4x the updates.
        bn_batches: recompute the BN statistics over at most this many training batches (None: all).
        bn_forward: ``bn_forward(module, batch)`` runs a batch through the model for the BN pass
            (default: the module's ``training_step(batch, i)``, with its ``self.log`` calls kept out
            of the loggers).
        seed: the phase-2 data orders' and RNG's seed (default: ``PL_GLOBAL_SEED``, as set by
            ``seed_everything``, else 0).

    Attributes:
        metrics: after phase 3, ``{"workers": [{name: value}, ...], "average": {name: value}}``,
            the validation metrics the module logs (over the whole validation set), per worker and
            for the averaged model; empty without a validation DataLoader.
        phase: 1, 2 or 3 (averaged).

    Raises:
        SwapError: (``__init__``) bad arguments; (``setup``, before any training) a strategy other
            than DDP, sharded strategies (FSDP, DeepSpeed), fewer than 2 ranks, no ``max_epochs``
            or a ``max_steps`` budget, a switch at or after the last epoch, manual optimization;
            (``on_train_start``) a training loader that is not one map-style DataLoader batching by
            ``batch_size``; a phase-2 checkpoint resumed on another number of ranks; (at the end of
            the first epoch with a validation) a ``monitor`` that the module does not log.
    """

    def __init__(self, *, phase2_lr: float, switch_epoch: int | None = None, monitor: str | None = None,
                 stop_value: float | None = None, mode: str = "max", phase2_epochs: int | None = None,
                 phase2_schedule: str = "linear", phase2_min_lr: float = 0.0, phase2_batch_size: int | None = None,
                 bn_batches: int | None = None,
                 bn_forward: Callable[[Any, Any], Any] | None = None, seed: int | None = None):
        if not (isinstance(phase2_lr, (int, float)) and phase2_lr > 0):
            raise SwapError(f"SWAP: phase2_lr must be a number > 0, got {phase2_lr!r}")
        if (switch_epoch is None) == (monitor is None):
            raise SwapError("SWAP: give either switch_epoch or monitor (with stop_value and phase2_epochs)")
        if switch_epoch is not None and not (isinstance(switch_epoch, int) and switch_epoch >= 1):
            raise SwapError(f"SWAP: switch_epoch must be an integer >= 1 (phase 1 needs an epoch), got {switch_epoch!r}")
        if monitor is not None and (stop_value is None or phase2_epochs is None):
            raise SwapError(f"SWAP: monitor '{monitor}' needs stop_value and phase2_epochs")
        if mode not in ("max", "min"):
            raise SwapError(f"SWAP: mode must be max or min, got {mode!r}")
        if phase2_epochs is not None and not (isinstance(phase2_epochs, int) and phase2_epochs >= 1):
            raise SwapError(f"SWAP: phase2_epochs must be an integer >= 1, got {phase2_epochs!r}")
        if phase2_schedule not in PHASE2_SHAPES:
            raise SwapError(f"SWAP: phase2_schedule must be one of {', '.join(PHASE2_SHAPES)}, "
                            f"got {phase2_schedule!r}")
        if not 0 <= phase2_min_lr <= phase2_lr:
            raise SwapError(f"SWAP: need 0 <= phase2_min_lr ({phase2_min_lr}) <= phase2_lr ({phase2_lr})")
        if phase2_batch_size is not None and not (isinstance(phase2_batch_size, int) and phase2_batch_size >= 1):
            raise SwapError(f"SWAP: phase2_batch_size must be an integer >= 1 or None, got {phase2_batch_size!r}")
        if bn_batches is not None and not (isinstance(bn_batches, int) and bn_batches >= 1):
            raise SwapError(f"SWAP: bn_batches must be an integer >= 1 or None, got {bn_batches!r}")
        self.phase2_lr, self.switch_epoch, self.monitor, self.stop_value = float(phase2_lr), switch_epoch, monitor, stop_value
        self.mode, self.phase2_epochs, self.phase2_schedule = mode, phase2_epochs, phase2_schedule
        self.phase2_min_lr, self.phase2_batch_size = float(phase2_min_lr), phase2_batch_size
        self.bn_batches, self.bn_forward, self.seed = bn_batches, bn_forward, seed
        self.phase = 1
        self.metrics: dict = {}
        self._switch_next = False       # phase 1 ended at the last epoch's end (monitor reached)
        self._validated = False         # a validation ran in this epoch (a missing monitor is an error then)
        self._start_epoch = self._end_epoch = self._start_step = self._total_steps = None
        self._pending: dict | None = None    # this rank's worker state, read from a checkpoint
        self._order: WorkerOrder | None = None
        self._world = self._rank = self._saved_world = self._trainer = None

    # ---- checks before any work -------------------------------------------------------------------
    def __getstate__(self) -> dict:
        # Lightning's ddp_spawn pickles the Trainer, callbacks included, into each new process: refused
        # there, in the launching process before any rank starts (see _LAUNCHED).
        if multiprocessing.context.get_spawning_popen() is not None:
            raise SwapError(_LAUNCHED.format("spawn"))
        return self.__dict__.copy()

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        strategy = trainer.strategy
        name = type(strategy).__name__
        if not isinstance(strategy, DDPStrategy) or "DeepSpeed" in name:
            raise SwapError(f"SWAP needs Trainer(strategy='ddp'), got {name} (sharded strategies such as FSDP "
                            "and DeepSpeed are not supported)")
        start = getattr(strategy, "_start_method", "popen")
        if start != "popen":
            raise SwapError(_LAUNCHED.format(start))
        if trainer.world_size < 2:
            raise SwapError(f"SWAP needs at least 2 ranks (one phase-2 worker each): Trainer(devices=W, "
                            f"strategy='ddp') with W >= 2, got world size {trainer.world_size}")
        loop = trainer.fit_loop
        if loop.max_epochs is None or loop.max_epochs < 1 or trainer.max_steps not in (-1, None):
            raise SwapError("SWAP needs an epoch budget: Trainer(max_epochs=E) without max_steps")
        last = loop.max_epochs - 1 if self.switch_epoch is not None else loop.max_epochs - self.phase2_epochs
        first = self.switch_epoch if self.switch_epoch is not None else 1
        if first > last or last < 1:
            what = (f"switch_epoch {self.switch_epoch}" if self.switch_epoch is not None
                    else f"phase2_epochs {self.phase2_epochs}")
            raise SwapError(f"SWAP: {what} leaves no room in max_epochs={loop.max_epochs} "
                            "(phase 1 and phase 2 need an epoch each)")
        if not pl_module.automatic_optimization:
            raise SwapError("SWAP needs automatic optimization (LightningModule.automatic_optimization = True)")
        for attr in ("_combined_loader", "_data_fetcher", "max_batches"):
            if not hasattr(loop, attr):
                raise SwapError(f"SWAP was written for Lightning 2.5-2.6; this Lightning ({pl.__version__}) "
                                f"has no fit_loop.{attr}")
        self._world, self._rank = trainer.world_size, trainer.global_rank
        atexit.register(teardown)     # else gloo can abort the rank at exit
        if self.seed is None:
            self.seed = int(os.environ.get("PL_GLOBAL_SEED", 0))

    def _train_loader(self, trainer) -> DataLoader:
        loaders = trainer.fit_loop._combined_loader.flattened
        dl = loaders[0] if len(loaders) == 1 else None
        if not isinstance(dl, DataLoader) or not isinstance(dl.batch_sampler, BatchSampler):
            raise SwapError("SWAP needs one training DataLoader of a map-style dataset batched by batch_size "
                            "(no custom batch_sampler, no IterableDataset, no several loaders)")
        return dl

    # ---- phase 1 -> phase 2 -----------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        dl = self._train_loader(trainer)
        if self.phase == 2:                                   # resumed from a phase-2 checkpoint
            self._enter_phase2(trainer, pl_module, dl, resumed=True)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self.phase == 1 and (self._switch_next or trainer.current_epoch == self.switch_epoch):
            self._enter_phase2(trainer, pl_module, self._train_loader(trainer), resumed=False)
        if self._order is not None:               # a new epoch (also the first after an end-of-epoch resume)
            self._order.epoch, self._order.skip = trainer.current_epoch, 0

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._validated = True
            self._decide(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._decide(trainer)
        if self.phase == 1 and self.monitor is not None and self._validated \
                and self.monitor not in trainer.callback_metrics:
            raise SwapError(f"SWAP: monitor '{self.monitor}' is not a logged metric; logged after this epoch: "
                            f"{', '.join(sorted(trainer.callback_metrics)) or 'none'}")
        self._validated = False

    def _decide(self, trainer) -> None:
        """Phase 1 ends after this epoch: its ``monitor`` reached ``stop_value`` (rank 0 decides for
        all), or the latest switch that leaves ``phase2_epochs`` has come."""
        if self.phase != 1 or self.monitor is None or self._switch_next:
            return
        value = trainer.callback_metrics.get(self.monitor)
        reached = value is not None and (float(value) >= self.stop_value if self.mode == "max"
                                         else float(value) <= self.stop_value)
        reached = reached or trainer.current_epoch + 1 >= trainer.fit_loop.max_epochs - self.phase2_epochs
        self._switch_next = bool(trainer.strategy.broadcast(reached, src=0))

    def _enter_phase2(self, trainer, pl_module, dl: DataLoader, resumed: bool) -> None:
        loop = trainer.fit_loop
        if resumed:
            if self._world != self._saved_world:
                raise SwapError(f"SWAP: this checkpoint holds {self._saved_world} phase-2 workers; resume it "
                                f"on {self._saved_world} ranks, not {self._world}")
        ddp = trainer.strategy.model               # DistributedDataParallel: no all-reduce, no buffer broadcast
        ddp.require_backward_grad_sync = False
        ddp.require_forward_param_sync = False
        trainer.strategy.lr_scheduler_configs = []  # phase 2's schedule replaces the user's
        self._order = WorkerOrder(len(dl.dataset), self.seed, self._rank)
        self._order.epoch = trainer.current_epoch
        dl.batch_sampler.sampler = self._order
        if self.phase2_batch_size is not None:
            dl.batch_sampler.batch_size = self.phase2_batch_size
        batches = self._set_epoch_length(trainer, dl)
        if resumed:
            # the batches of this epoch the checkpoint had done (Lightning's count once it restarts)
            self._order.skip = loop.epoch_loop.batch_progress.current.processed * dl.batch_sampler.batch_size
            self._apply_pending(trainer, pl_module)
        else:
            self.phase, self._switch_next = 2, False
            self._start_epoch = trainer.current_epoch
            self._end_epoch = (loop.max_epochs if self.monitor is None
                               else self._start_epoch + self.phase2_epochs)
            self._start_step = trainer.global_step
            self._total_steps = (self._end_epoch - self._start_epoch) * math.ceil(batches / trainer.accumulate_grad_batches)
            for opt in trainer.optimizers:
                record_lr_scales(opt)
        loop.max_epochs = self._end_epoch
        iter(loop._data_fetcher)                    # a new iterator over the worker's order, of the new length

    def _set_epoch_length(self, trainer, dl: DataLoader) -> int:
        """Tell Lightning's loop the new number of batches per epoch (the worker sees every sample)."""
        loop, n = trainer.fit_loop, len(dl)
        limit = trainer.limit_train_batches
        n = int(n * limit) if isinstance(limit, float) else min(n, int(limit))
        loop._combined_loader.limits = [n]
        loop.max_batches = n
        if isinstance(trainer.val_check_interval, float) and getattr(trainer, "_val_check_time_interval", None) is None:
            trainer.val_check_batch = max(1, int(n * trainer.val_check_interval))
        return n

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self.phase != 2:
            return
        torch.manual_seed(stream_seed(self.seed, "phase2", self._rank, trainer.current_epoch, batch_idx))
        step = min(trainer.global_step - self._start_step, self._total_steps - 1)
        lr = self._schedule()(step)
        for opt in trainer.optimizers:
            apply_lr(opt, lr)

    def _schedule(self):
        return phase2_schedule(self.phase2_lr, self._total_steps, self.phase2_schedule, self.phase2_min_lr)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if (self.phase == 2 and trainer.current_epoch == self._end_epoch - 1
                and trainer.fit_loop.epoch_loop.batch_progress.current.ready >= trainer.num_training_batches):
            self._average(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.phase == 2:                 # the fit stopped early (EarlyStopping, should_stop): average now
            self._average(trainer, pl_module)

    # ---- phase 3 ----------------------------------------------------------------------------------
    def _average(self, trainer, pl_module) -> None:
        """Average the workers, recompute BN statistics, evaluate workers and average, log."""
        workers = self._evaluate(trainer, pl_module, sharded=False)
        distributed_average_(pl_module, [pl_module.state_dict()], self._world)
        mine = self._batches(self._train_loader(trainer), self._rank, self._world, self.bn_batches)
        forward = self.bn_forward or (lambda module, batch: module.training_step(batch, 0))
        with _recording(pl_module):              # (batch,): recompute_bn hands forward the whole batch
            recompute_bn(pl_module, ((trainer.strategy.batch_to_device(b),) for _, b in mine),
                         forward=forward, distributed=True)
        average = self._evaluate(trainer, pl_module, sharded=True)
        self.phase = 3
        ddp = trainer.strategy.model
        ddp.require_backward_grad_sync = ddp.require_forward_param_sync = True
        if workers is None:
            return
        gathered = [None] * self._world
        dist.all_gather_object(gathered, workers)
        self.metrics = {"workers": gathered, "average": average}
        logged = {f"swap/worker{r}/{k}": v for r, m in enumerate(gathered) for k, v in m.items()}
        logged.update({f"swap/average/{k}": v for k, v in average.items()})
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(logged, step=trainer.global_step)

    @staticmethod
    def _batches(dl: DataLoader, rank: int, world: int, limit: int | None = None):
        """``(i, batch)`` of rank ``rank``'s share (every ``world``-th batch from ``rank`` on) of the first
        ``limit`` batches (None: all) of ``dl``'s dataset in order, batched (at its batch sampler's
        batch size: phase 2's for the training loader; a one-sample remainder joins the last batch:
        ``swap.data.loader.pass_slices``) and collated as ``dl`` does."""
        order = [range(p.start, p.stop) for p in pass_slices(len(dl.dataset), dl.batch_sampler.batch_size)][:limit]
        mine = list(range(rank, len(order), world))
        loader = DataLoader(dl.dataset, batch_sampler=[order[i] for i in mine], collate_fn=dl.collate_fn,
                            num_workers=dl.num_workers)
        return zip(mine, loader)

    def _evaluate(self, trainer, pl_module, sharded: bool) -> dict | None:
        """The module's logged validation metrics over the whole (first) validation set: this rank's
        model alone (``sharded=False``) or the same model on all ranks, each a share of the batches."""
        loaders = trainer.val_dataloaders
        dl = loaders[0] if isinstance(loaders, (list, tuple)) and loaders else loaders
        if not isinstance(dl, DataLoader) or dl.batch_size is None or not is_overridden("validation_step", pl_module):
            return None
        batches = self._batches(dl, self._rank if sharded else 0, self._world if sharded else 1)
        was_training = pl_module.training
        pl_module.eval()
        with _recording(pl_module) as rec, torch.no_grad():
            for i, batch in batches:
                batch = trainer.strategy.batch_to_device(batch)
                rec.batch_size = extract_batch_size(batch)
                pl_module.validation_step(batch, i)
        pl_module.train(was_training)
        shares = [(rec.sums, rec.counts)]
        if sharded:                                  # (a rank may hold no batch of a small validation set)
            shares = [None] * self._world
            dist.all_gather_object(shares, (rec.sums, rec.counts))
        names = sorted(set().union(*(sums for sums, _ in shares)))
        return {k: sum(sums.get(k, 0.0) for sums, _ in shares) / sum(counts.get(k, 0) for _, counts in shares)
                for k in names}

    # ---- checkpoints: every worker ------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The callback's state; in phase 2 with every worker's weights and optimizer state, gathered
        to rank 0 (collective: Lightning calls it on every rank when it saves a checkpoint)."""
        state = {"phase": self.phase, "switch_next": self._switch_next, "start_epoch": self._start_epoch,
                 "end_epoch": self._end_epoch, "start_step": self._start_step, "total_steps": self._total_steps,
                 "world_size": self._world, "seed": self.seed}
        if self.phase == 2:
            trainer = self._trainer
            mine = {"model": {k: v.detach().cpu().clone() for k, v in trainer.lightning_module.state_dict().items()},
                    "optimizers": [opt.state_dict() for opt in trainer.optimizers]}
            workers = [None] * self._world if self._rank == 0 else None
            dist.gather_object(mine, workers, dst=0)             # only rank 0 writes the checkpoint
            state["workers"] = workers
        return state

    def load_state_dict(self, state: dict) -> None:
        self.phase, self._switch_next = state["phase"], state["switch_next"]
        self._start_epoch, self._end_epoch = state["start_epoch"], state["end_epoch"]
        self._start_step, self._total_steps = state["start_step"], state["total_steps"]
        self._saved_world, self.seed = state["world_size"], state["seed"]
        self._pending = state.get("workers")

    def _apply_pending(self, trainer, pl_module) -> None:
        """This rank's worker from the checkpoint: weights (Lightning restored rank 0's) and optimizer."""
        if self._pending is None:
            return
        mine = self._pending[self._rank]
        pl_module.load_state_dict(mine["model"])
        for opt, saved in zip(trainer.optimizers, mine["optimizers"]):
            opt.load_state_dict(saved)
        self._pending = None

    def on_fit_start(self, trainer, pl_module) -> None:
        self._trainer = trainer


class _recording:
    """Within the block, ``module.log`` / ``module.log_dict`` record into a :class:`_Recorder`."""

    def __init__(self, module):
        self.module, self.recorder = module, _Recorder()

    def __enter__(self) -> _Recorder:
        self.module.__dict__["log"] = self.recorder.log
        self.module.__dict__["log_dict"] = self.recorder.log_dict
        return self.recorder

    def __exit__(self, *exc) -> None:
        self.module.__dict__.pop("log", None)
        self.module.__dict__.pop("log_dict", None)


__all__ = ["SWAP", "WorkerOrder"]
