"""One rank's view of a run: process set-up, data on the device, model factory, optimizer, loaders,
evaluation and the metrics sink. The algorithms compose these; the analysis commands rebuild a
finished run's context with :meth:`Context.from_run_dir`.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from . import distributed, tracking
from .callbacks import Callback
from .config import Config, SwapError, check_world, optim_for, segments, validation_size
from .data.loader import PiecewiseLoader, UpdateBudget
from .data import Augment, ImageDataset, Loader, augment_for, eval_batches, load_configured, split_holdout, stream_seed
from .data.generic import DatasetLoader, check_sample, eval_loader
from .models import configured_model
from .rundir import RunDir
from .schedules import warmup_decay
from .averaging import recompute_bn
from .resumable import Resumable, Saving
from .task import Task
from .train import DEFAULT_TASK, SGDStep, StepLog, UpdateStep, amp_dtype_for, autocast, evaluate, evaluate_metrics, shard_of
from .imports import import_object, is_import_path
from .optim.build import build_optimizer, label, user_optimizer
from .optim.extrap import ExtrapSGD, ExtrapStep


IMAGENET_TASK = Task(metrics=("top1", "top5", "loss"))     # an image folder reports top-1 and top-5 (ImageNet's)


class Sink(Callback):
    """Per-epoch records of one phase (and worker): one metrics.jsonl record and one progress line
    each (:meth:`on_epoch_end`, or a call), and the records between epochs (:meth:`step`,
    ``logging.log_every``). Records name the ``optimizer`` (:meth:`Context.optimizer_label`:
    ``sgd``, ``lars``, ``extrap:VARIANT``, ``user:AdamW``) and carry the run's wall seconds."""

    def __init__(self, ctx: "Context", phase: str, worker: int | None, epochs: int, optimizer: str):
        self.ctx, self.phase, self.worker, self.epochs, self.optimizer = ctx, phase, worker, epochs, optimizer
        self.label = f"{phase}" + (f" worker {worker}" if worker is not None else "")

    def __call__(self, rec: dict) -> None:
        rec = {"phase": self.phase, "worker": self.worker, "optimizer": self.optimizer, **rec,
               "phase_wall_s": rec["wall_s"], "wall_s": time.time() - self.ctx.t0}
        self.ctx.log(rec)
        test = f" test {rec['test_acc']:.2f}%" if rec["test_acc"] is not None else ""
        train = f" train {rec['train_acc']:.2f}%" if rec["train_acc"] is not None else ""
        rate = f"{rec['tokens_per_s']:.0f} tokens/s" if "tokens_per_s" in rec else f"{rec['samples_per_s']:.0f} samples/s"
        tqdm.write(f"[{self.label}] epoch {rec['epoch']}/{self.epochs} lr {rec['lr']:.4f} loss {rec['train_loss']:.3f}"
                   f"{train}{test} ({rate})", file=sys.stderr)

    def on_epoch_end(self, record: dict) -> None:
        self(record)

    def step(self, rec: dict) -> None:
        """A record between epochs (``logging.log_every``): metrics.jsonl only, no progress line."""
        self.ctx.log({"phase": self.phase, "worker": self.worker, **rec, "wall_s": time.time() - self.ctx.t0})


def configured_parts(cfg: Config, model_fn=None, task: Task | None = None, collate_fn=None) -> tuple:
    """(model_fn, task, collate_fn) of a run: those given (library use), else the config's import
    paths (``model.name``, ``task.loss``/``task.metrics``, ``data.collate``: a model and data of
    your own in the CLI), else None for the built-in ones.

    Raises:
        SwapError: an import path that fails (:func:`swap.imports.import_object`); an unknown metric.
    """
    if model_fn is None and is_import_path(cfg.model.name):
        model_fn = import_object(cfg.model.name, "model.name")
    if collate_fn is None and cfg.data.collate:
        collate_fn = import_object(cfg.data.collate, "data.collate")
    t = cfg.task
    if task is None and (t.loss or t.metrics):
        custom = {m.rsplit(":", 1)[1]: import_object(m, "task.metrics") for m in t.metrics if is_import_path(m)}
        names = tuple(m.rsplit(":", 1)[1] if is_import_path(m) else m for m in t.metrics) or ("top1", "loss")
        task = Task(import_object(t.loss, "task.loss") if t.loss else None, names, custom)
    return model_fn, task, collate_fn


@dataclass(frozen=True)
class Parts:
    """A run's parts of the user's own, given to the library (the CLI's come from the config's
    import paths, :func:`configured_parts`); each None for the configured one. They travel as one
    object from the call through the run spec and the :class:`Context` to every worker process
    (module-level functions and classes there: they are pickled).

    Attributes:
        model_fn: a model factory, ``model_fn() -> nn.Module``.
        data: (train, test) or (train, test, validation) datasets (:class:`swap.data.ImageDataset`
            or any map-style ``Dataset``).
        task: the loss and metrics (:class:`swap.task.Task`).
        collate_fn: builds a batch from a list of samples (generic datasets).
        optimizer: ``{config section: fn(param_groups) -> torch.optim.Optimizer}``.
        callbacks: the run's observers (:mod:`swap.tracking`: ``on_record``, ``on_phase_end``,
            ``on_run_end``).
    """
    model_fn: Callable[[], nn.Module] | None = None
    data: tuple | None = None
    task: Task | None = None
    collate_fn: Callable | None = None
    optimizer: dict | None = None
    callbacks: tuple = ()


@dataclass
class Context:
    """One rank's view of a run. Build with :meth:`create` (inside each process).

    Two data paths: an :class:`ImageDataset` (uint8 images on the device, batched augmentation and
    normalisation: :class:`swap.data.Loader`, the fast path of the presets), or any map-style
    ``torch.utils.data.Dataset`` of ``(input, target)`` samples (:mod:`swap.data.generic`: a
    DataLoader with our deterministic sampler; ``mean``/``std`` are None, the dataset does its own
    transforms) with the user's ``model_fn``, ``task`` and ``collate_fn``."""
    cfg: Config
    dist: distributed.Dist
    run: RunDir
    train_set: ImageDataset
    test_set: ImageDataset
    mean: torch.Tensor | None
    std: torch.Tensor | None
    t0: float                             # run start (time.time()), shared by all ranks
    parts: Parts = Parts()                # the user's parts, resolved (model_fn, task, collate_fn; data None)
    val_set: object = None                # the validation split (last data.holdout samples), when cfg.uses_validation()
    tracking: tracking.Tracking | None = None   # this process's loggers and callbacks (:meth:`track`)

    @property
    def model_fn(self) -> Callable[[], nn.Module] | None:
        return self.parts.model_fn

    @property
    def task(self) -> Task:
        """How the model is called, its loss and metrics."""
        return self.parts.task

    @property
    def collate_fn(self) -> Callable | None:
        """The function that builds a batch from samples (generic datasets)."""
        return self.parts.collate_fn

    @property
    def user_callbacks(self) -> list[Callback]:
        """The library's callbacks that watch the train loops (:class:`swap.callbacks.Callback`
        objects): each loop that writes records here calls their loop hooks after its sink."""
        return [cb for cb in self.parts.callbacks if isinstance(cb, Callback)]

    @property
    def optimizer_fns(self) -> dict | None:
        """The library user's optimizer function per config section (``{"phase1": fn, ...}``)."""
        return self.parts.optimizer

    @property
    def generic(self) -> bool:
        """The data is a user's ``Dataset`` (not the in-memory image fast path)."""
        return not isinstance(self.train_set, ImageDataset)

    @classmethod
    def for_run(cls, spec, join: bool = True) -> "Context":
        """The context of a :class:`swap.methods.RunSpec` (inside each rank), with this process's
        tracking of the run started (:meth:`track`)."""
        ctx = cls.create(spec.cfg, spec.run_path, spec.t0, spec.parts, join)
        ctx.track(spec.resume)
        return ctx

    def track(self, resumed: bool = False) -> None:
        """Start this process's tracking of the run (:class:`swap.tracking.Tracking`): the records
        it logs (:meth:`log`) go to the loggers of ``logging.loggers`` and to the library's
        callbacks; ``resumed``: the loggers continue the run's earlier records."""
        if self.tracking is not None:
            self.tracking.close()
        self.tracking = tracking.start(self.run.path, self.cfg.logging.loggers, self.parts.callbacks, resumed)

    def log(self, record: dict) -> None:
        """Append ``record`` to metrics.jsonl (:meth:`swap.rundir.RunDir.log`), then hand it to this
        process's tracking."""
        self.run.log(record)
        if self.tracking is not None:
            self.tracking.record(record)

    def write_summary(self, summary: dict) -> None:
        """Write ``summary.json`` (:meth:`swap.rundir.RunDir.write_summary`); the run's end for its
        tracking (callbacks' ``on_run_end``, final metrics, artifacts)."""
        self.run.write_summary(summary)
        if self.tracking is not None:
            self.tracking.run_end(summary, self.run.read_metrics)

    def phase_end(self, phase: str, result: dict) -> None:
        """A phase (or worker) finished with ``result``: callbacks' ``on_phase_end``, loggers flushed."""
        if self.tracking is not None:
            self.tracking.phase_end(phase, result)

    @property
    def saving(self) -> Saving:
        """Where this run's resumable units checkpoint (:class:`swap.resumable.Saving`)."""
        return Saving(self.run, self.cfg.hash(), self.cfg.checkpoint_every, self.tracking)

    @classmethod
    def from_run_dir(cls, run_path: str | Path) -> "Context":
        """The context of an existing run directory, from its saved config (for the analysis
        commands: ``swap landscape``, ``swap cosine``).

        Raises:
            SwapError: no readable ``config.yaml``; the data cannot be loaded.
        """
        return cls.create(RunDir(run_path).load_config(), run_path)

    @classmethod
    def create(cls, cfg: Config, run_path: str | Path, t0: float | None = None, parts: Parts | None = None,
               join: bool = True) -> "Context":
        """Join the process group (unless ``join=False``), put the data on the device. The user's
        ``parts`` (:class:`Parts`: library use, :func:`swap.train_swap`) replace the configured
        model, dataset, task and collate function; their ``data`` may be a pair of any map-style
        datasets (the generic path, class docstring); when
        ``cfg.uses_validation()`` its last ``data.holdout`` training samples become the validation
        split, unless ``data`` is already (train, test, validation).

        Raises:
            SwapError: data that breaks the contract; a generic dataset without ``model_fn``.
        """
        d = distributed.setup(cfg.device, cfg.threads, join)
        parts = parts or Parts()
        model_fn, task, collate_fn = configured_parts(cfg, parts.model_fn, parts.task, parts.collate_fn)
        data = parts.data
        val_set = None
        if data is None and cfg.uses_validation():     # train, test and a validation split
            *data, val_set = load_configured(cfg.data, bad_log=RunDir(run_path).bad_images_log, validation=True)
        elif data is None:
            data = load_configured(cfg.data, bad_log=RunDir(run_path).bad_images_log)
        elif len(data) == 3:                                       # already split (an isolated phase-2 worker)
            *data, val_set = data
        elif cfg.uses_validation():                                # a library user's data: its training tail
            train, val_set = split_holdout(data[0], validation_size(cfg.data, len(data[0])))
            data = (train, data[1])
        t0 = distributed.broadcast_object(t0 if t0 is not None else time.time())
        if not isinstance(data[0], ImageDataset):
            for name, dataset in zip(("train_set", "test_set"), data):
                check_sample(dataset, name)
            if model_fn is None and not hasattr(data[0], "model_kwargs"):
                raise SwapError("a dataset of your own needs its model: pass model_fn (library) or set "
                                "model.name: package.module:function")
            if task is None and cfg.data.name == "imagefolder" and model_fn is None:
                task = IMAGENET_TASK
            collate_fn = collate_fn or getattr(data[0], "collate_fn", None)     # a dataset's own batching
            # a task of its own: the run's alignment of outputs and targets (Task.align) is found here
            resolved = dataclasses.replace(parts, model_fn=model_fn, data=None, task=task or Task(), collate_fn=collate_fn)
            return cls(cfg, d, RunDir(run_path), data[0], data[1], None, None, t0, resolved, val_set)
        train_set, test_set = (x.to(d.device) for x in data)
        augment_for(cfg.data, train_set)          # an augmentation impossible for these images fails here
        mean, std = train_set.channel_stats()
        val_set = val_set.to(d.device) if val_set is not None else None
        resolved = dataclasses.replace(parts, model_fn=model_fn, data=None, task=task or DEFAULT_TASK)
        return cls(cfg, d, RunDir(run_path), train_set, test_set, mean, std, t0, resolved, val_set)

    # ------------------------------------------------------------------ building blocks
    def build_model(self) -> nn.Module:
        """The configured model (or ``model_fn()``), initialised from the run seed (identical on every rank)."""
        torch.manual_seed(self.cfg.seed)
        if self.model_fn is not None:
            model = self.model_fn()
        elif self.generic:                  # a built-in generic dataset (text-char, imagefolder) names its model's shape
            model = configured_model(self.cfg.model, self.train_set.num_classes, **self.train_set.model_kwargs)
        else:
            model = configured_model(self.cfg.model, self.train_set.num_classes,
                                     in_channels=self.train_set.images.shape[1])
        model = model.to(self.dist.device)
        if self.cfg.channels_last and not self.generic:
            model = model.to(memory_format=torch.channels_last)
        if self.cfg.compile:
            model.compile()                 # in place: state_dict keys (checkpoints) unchanged
        return model

    def data_parallel(self, model: nn.Module, group=None) -> nn.Module:
        """``model`` wrapped in DistributedDataParallel over ``group`` (None = all ranks), the one
        place every phase builds it: no per-forward buffer broadcast (each rank's BN statistics
        follow its own micro-batches and are averaged over ranks before each evaluation, each
        checkpoint and at the end: the update step's ``sync``), and ``ddp.find_unused_parameters``
        for models whose forward pass skips some parameters."""
        return DistributedDataParallel(model, process_group=group, forward_sync_buffers=False,
                                       find_unused_parameters=self.cfg.ddp.find_unused_parameters)

    @property
    def amp(self) -> torch.dtype | None:
        """The autocast dtype of forward passes, bfloat16 for ``precision: bf16`` (``auto`` on CUDA), else None."""
        return amp_dtype_for(self.cfg.precision, self.dist.device)

    def recompute_bn(self, model: nn.Module, distributed: bool = False) -> None:
        """Phase 3's BN-statistics pass (:func:`swap.averaging.recompute_bn`) over :meth:`bn_batches`;
        with ``distributed`` every rank passes its share of the batches and the statistics are
        all-reduced (collective), giving those of one process over all of them."""
        share = (self.dist.rank, self.dist.world_size) if distributed else (0, 1)
        with autocast(self.dist.device, self.amp):
            recompute_bn(model, self.bn_batches(*share), distributed=distributed)

    def optimizer(self, model: nn.Module, section: str, stream: tuple = ()):
        """The optimizer of config ``section`` (``phase1``, ``phase2``, ``sgd``, ``abs``) over
        ``model``: the user's function for that section when the library was given one
        (:attr:`optimizer_fns`) or the section's ``optimizer`` names one (``package.module:function``),
        else the section's ``optimizer`` (``sgd`` for a section without one) with its settings (:func:`swap.config.optim_for`), built by
        :func:`swap.optim.build.build_optimizer`; extrapolated SGD draws its gaussian noise from the
        stream ``(seed, *stream, rank)``. The LR is set per update by the schedule."""
        o = optim_for(self.cfg, section)
        fn = (self.optimizer_fns or {}).get(section)
        if fn is not None:
            return user_optimizer(fn, model, o, section)
        kind = getattr(getattr(self.cfg, section), "optimizer", "sgd")
        if ":" in kind:                                # package.module:function, the user's
            return user_optimizer(import_object(kind, f"{section}.optimizer"), model, o, section)
        gen = None
        if kind == "extrap":   # on the parameters' device: noise drawn on the CPU would cost a copy per tensor
            gen = torch.Generator(self.dist.device).manual_seed(stream_seed(self.cfg.seed, *stream, "noise", self.dist.rank))
        return build_optimizer(kind, model, o, self.cfg.extrap, gen)

    def update_step(self, model: nn.Module, optimizer, micro_batch_size: int = 0, section: str = "") -> UpdateStep:
        """The train loop's update for ``optimizer`` (from :meth:`optimizer`) on ``model`` (plain or
        DDP-wrapped): extrapolated SGD's two passes for ``extrap``, else one optimizer step on
        micro-batches of ``micro_batch_size`` samples (0 = one pass); forward passes at
        :attr:`amp`; the whole gradient clipped to config ``section``'s ``optim.clip_grad_norm``."""
        kind = ExtrapStep if isinstance(optimizer, ExtrapSGD) else SGDStep
        clip = optim_for(self.cfg, section).clip_grad_norm if section else 0.0
        return kind(model, optimizer, micro_batch_size, self.amp, self.task, clip)

    @staticmethod
    def optimizer_label(optimizer) -> str:
        """The optimizer's name in records and summaries (:func:`swap.optim.build.label`)."""
        return label(optimizer)

    def augment(self) -> Augment:
        return augment_for(self.cfg.data, self.train_set)

    def share(self, data_parallel: bool | tuple[int, int]) -> tuple[int, int]:
        """(rank, ranks) slicing each global batch: all ranks' (True), the whole batch (False), or
        the given (rank, ranks) pair (a phase-2 worker group's)."""
        if isinstance(data_parallel, tuple):
            return data_parallel
        return (self.dist.rank, self.dist.world_size) if data_parallel else (0, 1)

    def loader(self, batch_size: int, seed_parts: tuple, data_parallel: bool | tuple[int, int], augment: bool = True,
               image_size: int | None = None):
        """Training batches (:class:`swap.data.Loader`, or :class:`swap.data.generic.DatasetLoader`
        for a generic dataset); ``data_parallel`` slices each global batch to this rank's share
        (:meth:`share`).
        ``image_size`` (pixels): train at that size (a generic dataset must offer ``at_size(S)``,
        as :class:`swap.data.folder.ImageFolder` does).

        Raises:
            SwapError: an ``image_size`` that the dataset cannot produce.
        """
        rank, world = self.share(data_parallel)
        if self.generic:
            dataset = self.train_set
            if image_size is not None:
                if not hasattr(dataset, "at_size"):
                    raise SwapError(f"a segment's image_size={image_size} needs images the data can resize "
                                    f"(data.name imagefolder or an in-memory image set); "
                                    f"{type(dataset).__name__} has no at_size()")
                dataset = dataset.at_size(image_size)
            return DatasetLoader(dataset, batch_size, (self.cfg.seed, *seed_parts), (rank, world),
                                 self.dist.device, self.collate_fn, self.cfg.data.num_workers,
                                 self.cfg.data.sample_rngs)
        return Loader(self.train_set, batch_size, (self.cfg.seed, *seed_parts), (self.mean, self.std),
                      self.augment() if augment else None, (rank, world), self.cfg.channels_last, image_size)

    def batches(self, plan, seed_parts: tuple, data_parallel: bool | tuple[int, int]):
        """The train loop's (loader, lr_at, epochs) of a phase whose stream is ``seed_parts``, as
        ``plan`` (a :class:`swap.algorithms.sgd.DataParallel`) says.

        When config section ``plan.section`` (``phase1``, ``phase2``, ``sgd``) has ``segments``,
        its piecewise schedule (phase 2 from ``phase2.start_epoch``): a
        :class:`swap.data.loader.PiecewiseLoader`, its ``lr_at`` and its epochs. Otherwise batches of
        ``plan.batch_size`` samples for ``plan.epochs`` epochs with ``plan.lr_at``, or the warm-up
        and decay schedule of ``plan.peak_lr``, ``plan.warmup_epochs`` and ``plan.schedule``
        (:meth:`schedule`); with ``plan.updates`` > 0, exactly that many updates instead of the
        epochs (:class:`swap.data.loader.UpdateBudget`; the schedule spans them).

        Raises:
            SwapError: a global batch not divisible by the ranks sharing it (``data_parallel``).
        """
        section, batch_size, epochs, lr_at = plan.section, plan.batch_size, plan.epochs, plan.lr_at
        segs = segments(self.cfg, section) if section else []
        where = f"{section}.segments" if segs else section or seed_parts[0]
        ranks = self.share(data_parallel)[1]
        if ranks > 1:
            for batch in [s.batch_size for s in segs] or [batch_size]:
                check_world(self.cfg, ranks, batch, where)
        if segs:
            start = self.cfg.phase2.start_epoch if section == "phase2" else 0
            loader = PiecewiseLoader(segs, lambda b, size: self.loader(b, seed_parts, data_parallel, image_size=size),
                                     len(self.train_set), start)
            return loader, loader.lr_at, loader.epochs
        loader = self.loader(batch_size, seed_parts, data_parallel)
        if plan.updates:                                   # a budget in updates: the last epoch cut short
            loader = UpdateBudget(loader, plan.updates)
            epochs = loader.epochs
        if lr_at is None:
            sec = getattr(self.cfg, section) if section else None
            lr_at = self.schedule(plan.peak_lr, plan.warmup_epochs, epochs, len(loader), plan.schedule,
                                  getattr(sec, "min_lr", 0.0), getattr(sec, "warmup_updates", 0), plan.updates)
        return loader, lr_at, epochs

    def prediction_unit(self, record: dict) -> str:
        """What the run's accuracies count, from a training record of it: ``samples`` (a
        classifier), ``next tokens`` (a causal language model's shifted targets, or a dataset whose
        ``predictions`` attribute says so) or ``tokens``."""
        if "tokens_per_s" not in record:
            return "samples"
        if self.task.shift.get("next_token") or getattr(self.train_set, "predictions", None) == "next tokens":
            return "next tokens"
        return "tokens"

    def bn_batches(self, rank: int = 0, world_size: int = 1):
        """Inputs of the one pass over the training data that recomputes BN statistics (phase 3,
        SWA): ``phase3.bn_batch_size`` samples each, augmented if ``phase3.bn_augment``; of the
        pass's batches, rank ``rank`` of ``world_size`` takes every ``world_size``-th (whole
        batches, so each is normalised as in a 1-process pass). The pass holds every training sample
        once (``full_pass``: a one-sample remainder joins the last batch)."""
        p3 = self.cfg.phase3
        loader = self.loader(p3.bn_batch_size, ("phase3", 0), data_parallel=False, augment=p3.bn_augment)
        if self.generic:                        # a DataLoader: only this rank's batches are loaded
            return (x for x, _ in loader.load(0, loader.full_pass(0)[rank::world_size]))
        return (x for j, (x, _) in enumerate(loader.full_pass(0)) if j % world_size == rank)

    @staticmethod
    def schedule(peak_lr: float, warmup_epochs: float, epochs: int, steps_per_epoch: int, shape: str,
                 min_lr: float = 0.0, warmup_updates: int = 0, total_updates: int = 0):
        """Warm-up (``warmup_updates`` updates, or ``warmup_epochs`` epochs) to ``peak_lr``, then
        ``shape`` decay to ``min_lr`` at ``epochs`` (or after ``total_updates`` updates, when > 0:
        an update budget) (:func:`swap.schedules.warmup_decay`)."""
        total = total_updates or epochs * steps_per_epoch
        warmup = min(warmup_updates, total) if warmup_updates else round(warmup_epochs * steps_per_epoch)
        return warmup_decay(peak_lr, warmup, total, shape, min_lr)

    def evaluate(self, model: nn.Module, distributed_eval=False, validation: bool = False) -> dict[str, float | None]:
        """``{metric: value}`` of ``model`` on the test set with running BN statistics: ``top1``
        (test accuracy, %; None where the outputs have no top-1), and where the run reports every
        metric of its task (:attr:`reports_metrics`) each of them (:func:`swap.train.evaluate_metrics`).
        Sharded over the run's ranks if ``distributed_eval`` is True, over a process group's if it
        is one (a phase-2 worker group). With ``validation``, on the validation split
        (:attr:`val_set`) instead of the test set."""
        rank, world, _ = shard_of(distributed_eval)
        data = self.val_set if validation else self.test_set
        if self.generic:
            batches = eval_loader(data, self.cfg.phase3.bn_batch_size, rank, world, self.dist.device,
                                  self.collate_fn, self.cfg.data.num_workers)
            return evaluate_metrics(model, batches, self.task, distributed_eval, self.amp)
        if self.task is not DEFAULT_TASK:
            batches = eval_batches(data, 1024, self.mean, self.std, rank, world, self.cfg.channels_last)
            return evaluate_metrics(model, batches, self.task, distributed_eval, self.amp)
        return {"top1": evaluate(model, data, self.mean, self.std, distributed=distributed_eval,
                                 channels_last=self.cfg.channels_last, amp_dtype=self.amp)}

    @property
    def reports_metrics(self) -> bool:
        """Whether evaluations report every metric of the run's task (a generic dataset, or a task
        given by the library), not only the test accuracy (the fast path's default)."""
        return self.generic or self.task is not DEFAULT_TASK

    def validation_score(self, model: nn.Module) -> float:
        """The model's top-1 accuracy (%) on the validation split, evaluation sharded over the ranks
        (collective; the same value on every rank): what the greedy soup and phase 1's ``holdout``
        switch decide on. A task without ``top1``, or with soft targets, scores minus its loss
        (higher is better)."""
        value = self.evaluate(model, distributed_eval=True, validation=True)
        top1 = value.get("top1") if self.task.class_targets else None
        return top1 if top1 is not None else -value["loss"]

    # ------------------------------------------------------------------ reporting
    def sink(self, phase: str, worker: int | None, epochs: int, optimizer=None) -> "Sink":
        """The run's records of ``phase`` (and ``worker``): ``Sink``."""
        return Sink(self, phase, worker, epochs, self.optimizer_label(optimizer) if optimizer is not None else "sgd")

    def step_log(self, emit, models: int = 1) -> list:
        """``[StepLog]`` handing ``emit`` a record every ``logging.log_every`` updates (one per
        model, of ``models``; :class:`swap.train.StepLog`), or ``[]`` when that is off."""
        return [StepLog(self.log_every, emit, models)] if self.log_every else []

    @property
    def log_every(self) -> int:
        """``logging.log_every``: updates between the records of :meth:`sink`'s ``step`` (0 = none)."""
        return self.cfg.logging.log_every

    def progress(self, total: int, label: str, position: int = 0):
        """A tqdm bar over updates, only on a terminal (per-epoch lines are printed regardless)."""
        return tqdm(total=total, desc=label, position=position, leave=False, dynamic_ncols=True,
                    disable=not sys.stderr.isatty(), file=sys.stderr)

    def prune_metrics_for_resume(self) -> None:
        """Before resuming: drop metrics records of work the resume will redo, i.e. epochs of a
        phase or worker past its latest checkpoint, and every phase-3 / averaging record.
        Rank 0 rewrites metrics.jsonl; all ranks wait for it."""
        def kept_epochs(record: dict) -> float:
            name = RunDir.worker(record["worker"]) if record["phase"] == "phase2" else record["phase"]
            return Resumable.epochs_kept(self.run, name)

        if self.dist.is_main:
            self.run.rewrite_metrics(lambda r: r["phase"] in ("phase1", "phase2", "sgd", "abs", "absa")
                                     and r["epoch"] is not None and r["epoch"] <= kept_epochs(r))
        distributed.barrier()

    def machine(self) -> dict:
        return distributed.machine_info(self.dist.device, self.dist.threads, self.dist.world_size)


__all__ = ["IMAGENET_TASK", "Sink", "configured_parts", "Parts", "Context"]
