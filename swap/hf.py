"""SWAP inside the Hugging Face ``transformers.Trainer``: :class:`SWAPTrainer`, a drop-in for ``Trainer``.

Stochastic Weight Averaging in Parallel (Gupta, Akle Serrano, DeCoste, ICLR 2020, Algorithm 1) on the
user's model, ``TrainingArguments``, datasets, data collator, ``compute_metrics`` and ``report_to``
loggers; the one change to a script is the class and one argument::

    trainer = SWAPTrainer(model=model, args=TrainingArguments(num_train_epochs=6, ...),
                          train_dataset=train, eval_dataset=test,
                          swap_args=SWAPArguments(switch_epoch=4, phase2_lr=3e-4))
    trainer.train()              # torchrun --nproc-per-node W script.py: every rank ends with the average
    trainer.save_model("out")    # the averaged model

Why a ``Trainer`` subclass and not a ``TrainerCallback``: the Trainer all-reduces the gradients on the
last micro-batch of every accumulation window, and no callback hook runs around that backward pass;
phase 2 needs :meth:`SWAPTrainer.training_step` to run inside ``accelerator.no_sync(model)``, its own
training data loader and LR schedule, and checkpoints that hold every worker.

- **Phase 1** is ``Trainer.train`` as it is, on the Trainer's own data-parallel data loader, optimizer and
  LR scheduler, for the phase-1 budget: ``switch_epoch`` epochs, ``switch_step`` updates, or at most
  ``num_train_epochs - phase2_epochs`` epochs ending after the first evaluation whose ``switch_metric``
  reaches ``stop_value`` (the paper's stopping accuracy). The user's LR schedule spans that budget.
- **Phase 2** continues in the same ``train()`` call: every rank is a worker with no gradient all-reduce
  (``no_sync``), no buffer broadcast and no token count shared across ranks
  (``average_tokens_across_devices`` off), an order of its own over every training sample each epoch
  (:class:`swap.data.loader.WorkerOrder`, seeded by ``(seed, "phase2", worker, epoch)``), its own
  dropout stream, ``phase2_batch_size`` samples per update and ``phase2_epochs`` epochs; the user's
  optimizer (its state carried over) follows the phase-2 LR schedule from ``phase2_lr`` (each parameter
  group keeps its ratio to the first group's LR). The global step and the logged epoch go on from
  phase 1's. An evaluation in phase 2 evaluates every worker (``eval_worker{r}_*``) and logs their mean
  under the usual names.
- **Phase 3**, after the last update of phase 2: with ``average_along`` each worker first becomes its
  own EMA or LAWA average (:mod:`swap.trajectory`); each worker is evaluated, the weights are averaged
  over the ranks (:func:`swap.averaging.distributed_average_`), BN statistics are recomputed exactly over
  the training data if the model has BN layers (:func:`swap.averaging.recompute_bn`, sharded over the
  ranks), and the average is evaluated (``eval_average_*``). The last checkpoint, ``trainer.evaluate()``,
  ``save_model`` and ``push_to_hub`` then see the averaged model; the metrics are also in
  :attr:`SWAPTrainer.swap_metrics`.

Checkpoints (``save_steps`` / ``save_strategy``) are the Trainer's, plus ``swap.json`` (the phase and
where phase 2 began) and, in phase 2, every worker's weights (``swap_worker{r}.safetensors``) with its
optimizer and trajectory-average state (``swap_worker{r}.pt``), each written by its rank before the
Trainer's ``trainer_state.json`` marks the checkpoint complete. ``trainer.train(resume_from_checkpoint=...)``
gives each rank its worker back and continues its data order, so a resumed run ends with the
uninterrupted run's weights, bit for bit on CPU.

Refused before any update, in one line (:class:`swap.errors.SwapError`): DeepSpeed, FSDP,
``nn.DataParallel`` (several GPUs in one process), one process, a switch that leaves no phase 1 or no
phase 2, ``max_steps`` (the budget is in epochs), ``load_best_model_at_end`` (it would replace the
average), a training dataset without a length, a second ``train()`` of the same trainer (its model
is already the average). The Trainer internals this relies on are those of
``transformers`` 5.x; :class:`SWAPTrainer` names the version if they moved. Needs
``pip install 'swap[hf]'`` (``transformers`` and ``accelerate``).
"""
from __future__ import annotations

import atexit
import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from .averaging import bn_buffer_names, distributed_average_, recompute_bn
from .callbacks import LoopState
from .checkpoint import atomic_paths, atomic_write_bytes
from .data.loader import WorkerOrder, pass_slices, stream_seed
from .distributed import teardown
from .errors import SwapError
from .schedules import PHASE2_SHAPES, phase2_schedule
from .trajectory import EMA, LAWA

try:
    import transformers
    from accelerate.data_loader import BatchSamplerShard
    from accelerate.optimizer import AcceleratedOptimizer
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_callback import ProgressCallback
    from transformers.trainer_utils import get_last_checkpoint
except ModuleNotFoundError as exc:                 # one line naming the extra
    if (exc.name or "").split(".")[0] not in ("transformers", "accelerate"):
        raise
    raise ModuleNotFoundError(f"swap.hf needs {exc.name.split('.')[0]}; pip install 'swap[hf]'",
                              name=exc.name) from None

ALONG = ("none", "ema", "lawa")
STATE_FILE = "swap.json"                 # in every checkpoint: the phase and where phase 2 began
# The Trainer methods this class overrides or calls beyond the public ones (transformers 5.x)
_INTERNALS = ("_init_training_state", "_get_dataloader", "_save_checkpoint", "_inner_training_loop")


@dataclass
class SWAPArguments:
    """SWAP's settings beside the ``TrainingArguments`` (a dataclass, so ``HfArgumentParser`` reads them
    from the command line). Give exactly one switch: ``switch_epoch``, ``switch_step``, or
    ``switch_metric`` with ``stop_value``.

    Args:
        phase2_lr: peak LR of phase 2 (> 0).
        switch_epoch: phase 1 is this many epochs (>= 1); phase 2 then runs
            ``phase2_epochs`` (default: ``num_train_epochs - switch_epoch``).
        switch_step: phase 1 is this many updates (>= 1); needs ``phase2_epochs``.
        switch_metric: an evaluation metric (``eval_accuracy`` or ``accuracy``); phase 1 ends after
            the first evaluation where it is >= ``stop_value`` (``<=`` with ``greater_is_better=False``),
            at the latest after ``num_train_epochs - phase2_epochs`` epochs. Needs ``phase2_epochs``
            and an evaluation during phase 1 (``eval_strategy``).
        stop_value: the stopping value of ``switch_metric`` (the paper's stopping accuracy).
        greater_is_better: whether ``switch_metric`` improves upwards (accuracy) or not (loss).
        phase2_epochs: phase 2's length in worker epochs (each a pass over every training sample).
        phase2_schedule: ``linear`` (from ``phase2_lr`` to ``phase2_min_lr`` at the last update, the
            paper's), ``cosine`` or ``constant``.
        phase2_min_lr: the LR the decay ends at (0 <= it <= ``phase2_lr``).
        phase2_batch_size: each worker's batch in phase 2, in samples (default: the Trainer's
            ``per_device_train_batch_size``, phase 1's per-rank batch).
        average_along: ``none``, ``ema`` or ``lawa``: each worker ends phase 2 as its own average
            along its trajectory (:class:`swap.trajectory.EMA` / :class:`swap.trajectory.LAWA`),
            and phase 3 averages those.
        along_options: keyword arguments of that class (e.g. ``{"decay": 0.998}`` or ``{"k": 4}``).
        bn_batches: recompute BN statistics over at most this many training batches (None: all).
        seed: the phase-2 data orders' and dropout's seed (default: ``TrainingArguments.seed``).

    Raises:
        SwapError: a bad value or combination (one line naming it).
    """
    phase2_lr: float
    switch_epoch: int | None = None
    switch_step: int | None = None
    switch_metric: str | None = None
    stop_value: float | None = None
    greater_is_better: bool = True
    phase2_epochs: int | None = None
    phase2_schedule: str = "linear"
    phase2_min_lr: float = 0.0
    phase2_batch_size: int | None = None
    average_along: str = "none"
    along_options: dict = field(default_factory=dict)
    bn_batches: int | None = None
    seed: int | None = None

    def __post_init__(self):
        def whole(value, least: int) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and value >= least

        if not (isinstance(self.phase2_lr, (int, float)) and self.phase2_lr > 0):
            raise SwapError(f"SWAPArguments: phase2_lr must be a number > 0, got {self.phase2_lr!r}")
        switches = [n for n in ("switch_epoch", "switch_step", "switch_metric") if getattr(self, n) is not None]
        if len(switches) != 1:
            raise SwapError("SWAPArguments: give exactly one switch (switch_epoch, switch_step, or switch_metric "
                            f"with stop_value), got {', '.join(switches) or 'none'}")
        for name in ("switch_epoch", "switch_step"):
            value = getattr(self, name)
            if value is not None and not whole(value, 1):
                raise SwapError(f"SWAPArguments: {name} must be an integer >= 1 (phase 1 needs an update), "
                                f"got {value!r}")
        if self.switch_metric is not None and not isinstance(self.stop_value, (int, float)):
            raise SwapError(f"SWAPArguments: switch_metric '{self.switch_metric}' needs a number stop_value")
        if self.switch_epoch is None and self.phase2_epochs is None:
            raise SwapError("SWAPArguments: a switch at a step or a metric needs phase2_epochs")
        if self.phase2_epochs is not None and not whole(self.phase2_epochs, 1):
            raise SwapError(f"SWAPArguments: phase2_epochs must be an integer >= 1 (a switch must leave a "
                            f"phase 2), got {self.phase2_epochs!r}")
        if self.phase2_schedule not in PHASE2_SHAPES:
            raise SwapError(f"SWAPArguments: phase2_schedule must be one of {', '.join(PHASE2_SHAPES)}, "
                            f"got {self.phase2_schedule!r}")
        if not 0 <= self.phase2_min_lr <= self.phase2_lr:
            raise SwapError(f"SWAPArguments: need 0 <= phase2_min_lr ({self.phase2_min_lr}) <= phase2_lr "
                            f"({self.phase2_lr})")
        for name in ("phase2_batch_size", "bn_batches"):
            value = getattr(self, name)
            if value is not None and not whole(value, 1):
                raise SwapError(f"SWAPArguments: {name} must be an integer >= 1 or None, got {value!r}")
        if self.average_along not in ALONG:
            raise SwapError(f"SWAPArguments: average_along must be one of {', '.join(ALONG)}, "
                            f"got {self.average_along!r}")
        if not isinstance(self.along_options, dict):
            raise SwapError(f"SWAPArguments: along_options must be a dict, got {self.along_options!r}")


class SWAPTrainer(Trainer):
    """``transformers.Trainer`` with SWAP's three phases in :meth:`train` (module docstring; Gupta et
    al., ICLR 2020, Algorithm 1). Takes every argument of ``Trainer`` plus ``swap_args``.

    Args:
        swap_args: :class:`SWAPArguments` (keyword only).

    Attributes:
        swap_phase: 1, 2 or 3 (averaged).
        swap_metrics: after phase 3 with an ``eval_dataset``: ``{"workers": [{name: value}, ...],
            "average": {name: value}}``, the Trainer's evaluation metrics (``eval_loss``,
            ``compute_metrics``'s) of each worker and of the averaged model.

    Raises:
        SwapError: (``__init__``) a ``transformers`` without the internals it uses; (:meth:`train`,
            before any update) the misuses of the module docstring; a checkpoint of another number of
            workers.
    """

    def __init__(self, *args, swap_args: SWAPArguments, **kwargs):
        missing = [name for name in _INTERNALS if not hasattr(Trainer, name)]
        if missing:
            raise SwapError(f"SWAPTrainer was written for transformers 5.x; this transformers "
                            f"({transformers.__version__}) has no Trainer.{missing[0]}")
        if not isinstance(swap_args, SWAPArguments):
            raise SwapError(f"SWAPTrainer: swap_args must be a SWAPArguments, got {type(swap_args).__name__}")
        super().__init__(*args, **kwargs)
        self.swap_args = swap_args
        self.swap_phase = 1
        self.swap_metrics: dict = {}
        self._swap = _Phases(self)
        self.add_callback(self._swap)
        self._edge = False                  # between phase 1's train() and phase 2's: no train end/begin event
        handler = self.callback_handler
        for event in ("on_train_begin", "on_train_end"):
            setattr(handler, event, self._quiet_at_the_edge(getattr(handler, event), event))

    # ---- the run: phase 1, phase 2, phase 3 --------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None,
              **kwargs):
        """Phase 1, phase 2 and phase 3 (module docstring), or their remainder from a checkpoint:
        ``Trainer.train``'s arguments and result (the global step, the mean training loss of phase 2
        or of the resumed remainder, and its metrics)."""
        self._check()
        atexit.register(teardown)       # the process group accelerate opened: else gloo can abort the rank at exit
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise SwapError(f"SWAPTrainer: no checkpoint to resume in {self.args.output_dir}")
        saved = _read_state(resume_from_checkpoint) if resume_from_checkpoint else None
        s = self._swap
        s.seed = self.swap_args.seed if self.swap_args.seed is not None else self.args.seed
        if saved is not None:
            s.load(saved)
        if self.swap_phase == 1:
            s.switch_reached = bool(saved and saved.get("switch_reached"))
            with self._args(**s.phase1_budget()):
                super().train(resume_from_checkpoint, trial, ignore_keys_for_eval, **kwargs)
            resume_from_checkpoint = None
            s.begin_phase2(self.state)
        model_init, self.model_init = self.model_init, None       # phase 2 goes on with the same model
        if isinstance(self.optimizer, AcceleratedOptimizer):      # prepared again by the next train()
            self.optimizer = self.optimizer.optimizer
        self.lr_scheduler = None                                  # phase 2's schedule (create_scheduler)
        try:
            with self._args(num_train_epochs=s.phase2_epochs(), max_steps=-1,
                            average_tokens_across_devices=False, per_device_train_batch_size=s.batch_size):
                self._train_batch_size = s.batch_size
                return super().train(resume_from_checkpoint, trial, ignore_keys_for_eval, **kwargs)
        finally:
            self.model_init = model_init
            self._train_batch_size = self.args.per_device_train_batch_size

    def _check(self) -> None:
        """The misuses refused before any update (module docstring)."""
        a, sw = self.args, self.swap_args
        if self.swap_phase != 1:
            raise SwapError(f"SWAPTrainer: this trainer has trained (it is in phase {self.swap_phase}; its model is "
                            "the average at the end): build a new SWAPTrainer to train or resume again")
        if self.is_deepspeed_enabled or a.deepspeed:
            raise SwapError("SWAPTrainer does not support DeepSpeed: each phase-2 worker needs its whole model "
                            "and optimizer on its own rank (use plain DDP: torchrun without --deepspeed)")
        if self.is_fsdp_enabled or a.fsdp:
            raise SwapError("SWAPTrainer does not support FSDP: each phase-2 worker needs its whole model on its "
                            "own rank (use plain DDP: TrainingArguments without fsdp)")
        if a.n_gpu > 1:
            raise SwapError(f"SWAPTrainer needs one device per process (torchrun --nproc-per-node W), got "
                            f"{a.n_gpu} GPUs in one process (nn.DataParallel)")
        if a.max_steps is not None and a.max_steps > 0:
            raise SwapError(f"SWAPTrainer counts the run in epochs: set num_train_epochs (phase 2 is "
                            f"phase2_epochs worker epochs), not max_steps={a.max_steps}")
        if a.load_best_model_at_end:
            raise SwapError("SWAPTrainer: load_best_model_at_end would replace the averaged model at the end; "
                            "set it to False")
        if self.train_dataset is None or not hasattr(self.train_dataset, "__len__") \
                or isinstance(self.train_dataset, torch.utils.data.IterableDataset):
            raise SwapError("SWAPTrainer needs a map-style train_dataset with a length (each phase-2 worker "
                            "passes over every sample each epoch)")
        if sw.switch_epoch is not None:
            if self._swap.phase2_epochs() < 1:
                raise SwapError(f"SWAPTrainer: switch_epoch {sw.switch_epoch} leaves no phase 2 in "
                                f"num_train_epochs={a.num_train_epochs}")
        if sw.switch_metric is not None:
            if a.num_train_epochs - sw.phase2_epochs < 1:
                raise SwapError(f"SWAPTrainer: phase2_epochs {sw.phase2_epochs} leaves no phase 1 in "
                                f"num_train_epochs={a.num_train_epochs}")
            if a.eval_strategy == "no" or self.eval_dataset is None:
                raise SwapError(f"SWAPTrainer: switch_metric '{sw.switch_metric}' needs an eval_dataset and an "
                                "evaluation during training (eval_strategy 'epoch' or 'steps')")
        if a.world_size < 2:
            raise SwapError(f"SWAPTrainer needs at least 2 processes (one phase-2 worker each): launch with "
                            f"torchrun --nproc-per-node W or accelerate launch, W >= 2; got world size {a.world_size}")

    @contextlib.contextmanager
    def _args(self, **values):
        """``TrainingArguments`` set to ``values`` within the block (a phase's budget), restored after."""
        before = {k: getattr(self.args, k) for k in values}
        for k, v in values.items():
            setattr(self.args, k, v)
        try:
            yield
        finally:
            for k, v in before.items():
                setattr(self.args, k, v)

    def _quiet_at_the_edge(self, event, name):
        """The callback handler's ``name`` event, sent between the phases only to the progress bar and
        to SWAP's own callback: the user's callbacks and loggers see one training."""
        def call(args, state, control, **kwargs):
            quiet = self._edge if name == "on_train_begin" else self.swap_phase == 1
            if not quiet:
                return event(args, state, control, **kwargs)
            if name == "on_train_begin":
                control.should_training_stop, self._edge = False, False
            for cb in self.callback_handler.callbacks:
                if isinstance(cb, (ProgressCallback, _Phases)):
                    getattr(cb, name)(args, state, control, **kwargs)
            return control
        return call

    # ---- the Trainer's hooks, phase by phase ---------------------------------------------------------------
    def _init_training_state(self, max_steps, num_update_steps_per_epoch, num_train_epochs,
                             resume_from_checkpoint, trial):
        before = self.state
        epochs, steps = super()._init_training_state(max_steps, num_update_steps_per_epoch, num_train_epochs,
                                                     resume_from_checkpoint, trial)
        s = self._swap
        if self.swap_phase == 1:
            # a checkpoint written after the switch was decided: phase 1 has no update left
            return (num_train_epochs, 0) if s.switch_reached else (epochs, steps)
        if resume_from_checkpoint is None:     # phase 2 goes on from phase 1's step, epoch and logs
            for name in ("global_step", "log_history", "total_flos", "num_input_tokens_seen", "best_metric",
                         "best_global_step", "best_model_checkpoint"):
                setattr(self.state, name, getattr(before, name))
            self.state.epoch = s.start_epoch
            epochs, steps = 0, 0
        else:
            done = self.state.global_step - s.start_step
            epochs = done // num_update_steps_per_epoch
            steps = 0 if self.args.ignore_data_skip else \
                (done % num_update_steps_per_epoch) * self.args.gradient_accumulation_steps
        self.state.max_steps = s.start_step + max_steps
        s.steps_per_epoch, s.total_steps = num_update_steps_per_epoch, max_steps
        return epochs, steps

    def get_train_dataloader(self):
        """Phase 1: the Trainer's. Phase 2: this worker's own order over every training sample
        (:class:`swap.data.loader.WorkerOrder`) at ``phase2_batch_size``, not sharded over the ranks."""
        if self.swap_phase == 1:
            return super().get_train_dataloader()
        s = self._swap
        s.order = WorkerOrder(len(self.train_dataset), s.seed, self.args.process_index)
        loader = self._get_dataloader(self.train_dataset, "Training", s.batch_size, lambda _: s.order,
                                      is_training=True)
        shard = getattr(loader, "batch_sampler", None)
        if isinstance(shard, BatchSamplerShard):        # the Trainer's own way to keep a rank's sampler whole
            shard.num_processes, shard.process_index = 1, 0
        return loader

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """Phase 1: the Trainer's (over phase 1's updates). Phase 2: the phase-2 schedule from
        ``phase2_lr`` over phase 2's ``num_training_steps`` updates."""
        if self.swap_phase == 1:
            return super().create_scheduler(num_training_steps, optimizer)
        if self.lr_scheduler is None:
            optimizer = optimizer or self.optimizer
            sw = self.swap_args
            lr_at = phase2_schedule(sw.phase2_lr, num_training_steps, sw.phase2_schedule, sw.phase2_min_lr)
            first = optimizer.param_groups[0]
            base = float(first.get("initial_lr", first["lr"]))
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda step: lr_at(min(step, num_training_steps - 1)) / base)
            self._created_lr_scheduler = True
        return self.lr_scheduler

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Phase 2: the Trainer's step inside ``accelerator.no_sync(model)`` (no gradient all-reduce)."""
        if self.swap_phase != 2:
            return super().training_step(model, inputs, num_items_in_batch)
        with self.accelerator.no_sync(model):
            return super().training_step(model, inputs, num_items_in_batch)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        """Phases 1 and 3: the Trainer's. Phase 2: every worker on the whole evaluation set in turn
        (``{prefix}_worker{r}_*``, each logged) and their mean under the usual names (logged)."""
        # The evaluation leaves the training's RNG as it was (a DataLoader draws its workers' seed from
        # it): a run resumed from a checkpoint written just before an evaluation stays bit for bit.
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_initialized() else []):
            if self.swap_phase != 2:
                return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
            return self._evaluate_workers(eval_dataset, ignore_keys, metric_key_prefix)

    def _evaluate_workers(self, eval_dataset, ignore_keys, metric_key_prefix: str) -> dict:
        workers = self._swap.evaluate_workers(eval_dataset, ignore_keys, metric_key_prefix)
        out = {k: v for r, m in enumerate(workers) for k, v in m.items()}
        mean = _mean_metrics([{k.replace(f"{metric_key_prefix}_worker{r}_", f"{metric_key_prefix}_"): v
                               for k, v in m.items()} for r, m in enumerate(workers)])
        self.log(mean)
        out.update(mean)
        return out

    def _save_checkpoint(self, model, trial) -> None:
        """Every rank writes its worker (phase 2) and rank 0 ``swap.json`` into the checkpoint folder,
        then the Trainer writes its own files, ``trainer_state.json`` last."""
        folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
        self._swap.save(folder)
        super()._save_checkpoint(model, trial)


class _Phases(TrainerCallback):
    """SWAP's state and its hooks in the Trainer's loop (the switch, the worker order's epoch, the
    averages along the trajectory, phase 3, the workers in a checkpoint)."""

    def __init__(self, trainer: SWAPTrainer):
        self.trainer = trainer
        self.seed = 0
        self.switch_reached = False
        self.start_step = self.start_epoch = 0          # where phase 2 began (global step, epochs)
        self.steps_per_epoch = self.total_steps = 0      # phase 2's updates per epoch and in all
        self.world = 0
        self.order: WorkerOrder | None = None
        self.along = None
        self.batch_size = 0
        self._pending: str | None = None                 # a checkpoint whose workers are loaded at train begin

    # ---- the plan ------------------------------------------------------------------------------------------
    def phase1_budget(self) -> dict:
        """The ``TrainingArguments`` of phase 1: its epochs or updates (its LR schedule spans them)."""
        a, sw = self.trainer.args, self.trainer.swap_args
        if sw.switch_epoch is not None:
            return {"num_train_epochs": sw.switch_epoch, "max_steps": -1}
        if sw.switch_step is not None:
            return {"max_steps": sw.switch_step}
        return {"num_train_epochs": a.num_train_epochs - sw.phase2_epochs, "max_steps": -1}

    def phase2_epochs(self) -> int:
        """Phase 2's length in worker epochs (``switch_epoch``: the rest of ``num_train_epochs``)."""
        sw = self.trainer.swap_args
        return sw.phase2_epochs if sw.phase2_epochs is not None else \
            int(self.trainer.args.num_train_epochs) - sw.switch_epoch

    def begin_phase2(self, state) -> None:
        """Phase 1 ended (fresh phase 2): where it began, and each worker's own dropout stream."""
        t = self.trainer
        self.start_step, self.start_epoch = state.global_step, state.epoch or 0.0
        t.swap_phase, t._edge = 2, True
        self._setup(state)
        torch.manual_seed(stream_seed(self.seed, "phase2", t.args.process_index))

    def _setup(self, state) -> None:
        t, sw = self.trainer, self.trainer.swap_args
        self.world = t.args.world_size
        self.batch_size = sw.phase2_batch_size or t.args.per_device_train_batch_size
        if sw.average_along == "ema":
            self.along = EMA(t.model, **sw.along_options)
        elif sw.average_along == "lawa":
            self.along = LAWA(t.model, **sw.along_options)

    def load(self, saved: dict) -> None:
        """Continue from a checkpoint's ``swap.json`` (its worker files load at the train's begin)."""
        t = self.trainer
        if saved["phase"] == 1:
            return
        if saved["world_size"] != t.args.world_size:
            raise SwapError(f"SWAPTrainer: this checkpoint holds {saved['world_size']} phase-2 workers; resume "
                            f"it on {saved['world_size']} processes, not {t.args.world_size}")
        t.swap_phase = saved["phase"]
        self.start_step, self.start_epoch, self.seed = saved["start_step"], saved["start_epoch"], saved["seed"]
        self._setup(None)
        self._pending = saved["folder"] if saved["phase"] == 2 else None

    # ---- checkpoints -----------------------------------------------------------------------------------------
    def save(self, folder: str) -> None:
        t = self.trainer
        os.makedirs(folder, exist_ok=True)
        if t.swap_phase == 2:
            rank = t.args.process_index
            weights = {k: v.detach().cpu().clone().contiguous() for k, v in t.model.state_dict().items()}
            extra = {"optimizer": t.optimizer.state_dict(),
                     "along": self.along.state_dict() if self.along is not None else None}
            files = (Path(folder) / f"swap_worker{rank}.safetensors", Path(folder) / f"swap_worker{rank}.pt")
            with atomic_paths(*files) as (weights_tmp, extra_tmp):
                save_file(weights, str(weights_tmp))
                torch.save(extra, extra_tmp)
        if t.args.process_index == 0:
            state = {"phase": t.swap_phase, "switch_reached": self.switch_reached, "start_step": self.start_step,
                     "start_epoch": self.start_epoch, "world_size": t.args.world_size, "seed": self.seed}
            atomic_write_bytes(Path(folder) / STATE_FILE, json.dumps(state).encode())
        if dist.is_initialized():
            dist.barrier()                     # every worker is on disk before trainer_state.json

    def _load_worker(self, folder: str) -> None:
        t = self.trainer
        rank = t.args.process_index
        weights = load_file(os.path.join(folder, f"swap_worker{rank}.safetensors"))
        t.model.load_state_dict(weights)
        extra = torch.load(os.path.join(folder, f"swap_worker{rank}.pt"), map_location="cpu",
                           weights_only=True)
        t.optimizer.load_state_dict(extra["optimizer"])
        if self.along is not None and extra["along"] is not None:
            self.along.load_state_dict(extra["along"])

    # ---- the Trainer's events ----------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        t = self.trainer
        if t.swap_phase == 2:
            ddp = t.model_wrapped
            if isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
                ddp.require_forward_param_sync = False     # no buffer broadcast in phase 2's first forward
            if self._pending is not None:
                self._load_worker(self._pending)
                self._pending = None

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        t, sw = self.trainer, self.trainer.swap_args
        if t.swap_phase != 1 or sw.switch_metric is None or metrics is None or not t.is_in_train:
            return
        name = sw.switch_metric if sw.switch_metric in metrics else f"eval_{sw.switch_metric}"
        if name not in metrics:
            raise SwapError(f"SWAPTrainer: switch_metric '{sw.switch_metric}' is not an evaluation metric; "
                            f"this evaluation has {', '.join(sorted(metrics))}")
        value = float(metrics[name])
        reached = value >= sw.stop_value if sw.greater_is_better else value <= sw.stop_value
        flag = [reached]
        dist.broadcast_object_list(flag, src=0)          # rank 0 decides for all
        if flag[0]:
            self.switch_reached = True
            control.should_training_stop = True

    def on_epoch_begin(self, args, state, control, **kwargs):
        if self.trainer.swap_phase == 2 and self.order is not None:
            self.order.set_epoch(self._epoch(state))

    def _epoch(self, state) -> int:
        """Phase 2's epoch (0-based) of the update after ``state.global_step``."""
        return (state.global_step - self.start_step) // self.steps_per_epoch

    def on_step_end(self, args, state, control, **kwargs):
        t = self.trainer
        if t.swap_phase != 2:
            return
        state.epoch += self.start_epoch                 # the logged epoch goes on from phase 1's
        update = state.global_step - self.start_step
        if self.along is not None:
            self.along.on_update_end(LoopState(epoch=self._epoch(state) + 1, update=update))
        if update >= self.total_steps:
            self.average()

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.trainer.swap_phase == 2 and self.along is not None:
            update = state.global_step - self.start_step
            self.along.on_updates_end(LoopState(epoch=update // self.steps_per_epoch, update=update))

    # ---- phase 3 -------------------------------------------------------------------------------------------
    def average(self) -> None:
        """Each worker (or its average along the trajectory) evaluated, the average over the ranks, its
        BN statistics, its evaluation; the model stays a DDP model of identical ranks."""
        t = self.trainer
        model = t.model
        # its evaluations' events clear the step's pending log and evaluation flags: kept for the step
        flags = (t.control.should_log, t.control.should_evaluate)
        self._average(t, model)
        t.control.should_log, t.control.should_evaluate = flags

    def _average(self, t, model) -> None:
        if self.along is not None:
            if isinstance(self.along, LAWA) and self.along.unit == "epochs":
                self.along.on_updates_end(LoopState(epoch=self.total_steps // self.steps_per_epoch,
                                                    update=self.total_steps))
            if self.along.count:
                with torch.no_grad():
                    state = dict(model.named_parameters())
                    state.update(model.named_buffers())
                    for name, value in zip(self.along.names, self.along.averaged()):
                        state[name].copy_(value)
                self._recompute_bn(sharded=False)
        workers = self.evaluate_workers() if t.eval_dataset is not None else None
        distributed_average_(model, [model.state_dict()], self.world)
        self._recompute_bn(sharded=True)
        t.swap_phase = 3
        ddp = t.model_wrapped
        if isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
            ddp.require_forward_param_sync = True
        if workers is not None:
            average = t.evaluate(metric_key_prefix="eval_average")     # phase 3: the Trainer's evaluation
            t.swap_metrics = {"workers": [_strip(m, f"eval_worker{r}_") for r, m in enumerate(workers)],
                              "average": _strip(average, "eval_average_")}

    def evaluate_workers(self, eval_dataset=None, ignore_keys=None, prefix: str = "eval") -> list[dict]:
        """Each worker's evaluation by the Trainer (metrics ``{prefix}_worker{r}_*``, logged): worker r's
        weights are broadcast to every rank, evaluated over the ranks' shards, then each rank takes its
        own worker back."""
        t = self.trainer
        model = t.model
        mine = {k: v.detach().clone() for k, v in model.state_dict().items()}
        out = []
        for r in range(self.world):
            # the tensors are looked up each time: the Trainer's first evaluation after a train() begins
            # prepares the model and may give its parameters new storage
            model.load_state_dict(mine)
            with torch.no_grad():
                for v in model.state_dict().values():
                    dist.broadcast(v, src=r)
            out.append(Trainer.evaluate(t, eval_dataset, ignore_keys, f"{prefix}_worker{r}"))
        model.load_state_dict(mine)
        return out

    def _recompute_bn(self, sharded: bool) -> None:
        """BN statistics recomputed over the training data (model without BN: nothing): each rank
        over its share of the batches (``sharded``, all-reduced) or over all of them."""
        t = self.trainer
        if not bn_buffer_names(t.model):
            return
        data = t.train_dataset
        collate = t._get_collator_with_removed_columns(t.data_collator, description="Training")
        slices = [range(p.start, p.stop) for p in pass_slices(len(data), self.batch_size)][:t.swap_args.bn_batches]
        rank, world = (t.args.process_index, self.world) if sharded else (0, 1)
        loader = torch.utils.data.DataLoader(data, batch_sampler=slices[rank::world], collate_fn=collate)
        recompute_bn(t.model, (t._prepare_inputs(b) for b in loader), distributed=sharded)


def _read_state(folder: str) -> dict | None:
    path = os.path.join(folder, STATE_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        state = json.load(f)
    state["folder"] = folder
    return state


def _strip(metrics: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in metrics.items() if k.startswith(prefix)}


def _mean_metrics(runs: list[dict]) -> dict:
    """The mean over ``runs`` of every number they all have."""
    names = [k for k in runs[0] if all(isinstance(r.get(k), (int, float)) for r in runs)]
    return {k: sum(r[k] for r in runs) / len(runs) for k in names}


__all__ = ["SWAPArguments", "SWAPTrainer"]
