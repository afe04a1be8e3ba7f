"""Library entry points: SWAP and the SGD baseline on a user's own model factory and data: image
tensors (the in-memory fast path) or any map-style ``torch.utils.data.Dataset`` of ``(input, target)``
samples, with the user's loss and metrics (:mod:`swap.task`)."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import methods
from .callbacks import Callback
from .config import Config, SwapError, announce_code, check_stacked, load_config
from .data import ImageDataset
from .data.generic import check_sample, subset
from .task import METRICS, Task


def _as_dataset(data, num_classes: int | None) -> ImageDataset:
    if isinstance(data, ImageDataset):
        return data
    images, labels = data
    if images.ndim != 4 or len(images) != len(labels):
        raise SwapError(f"expected images (N, C, H, W) and labels (N,), got {tuple(images.shape)} and {tuple(labels.shape)}")
    return ImageDataset(images, labels.long(), num_classes or int(labels.max()) + 1)


# The config sections a user's optimizer may be given for, by method
OPTIMIZER_SECTIONS = {"swap": ("phase1", "phase2"), "sgd": ("sgd",)}


def optimizer_fns(optimizer, method: str, cfg: Config) -> dict | None:
    """The user's ``optimizer`` argument as ``{config section: fn}``: one function for every
    section of ``method`` (:data:`OPTIMIZER_SECTIONS`), or a dict naming some of them (the others
    keep the config's optimizer). Processes receive them by pickling
    (:func:`swap.launch.check_sendable`).

    Raises:
        SwapError: a value that is not callable, a key that is not a section of the method, or
            phase 2 stacked (``vmap``: its SGD only).
    """
    if optimizer is None:
        return None
    sections = OPTIMIZER_SECTIONS[method]
    fns = optimizer if isinstance(optimizer, dict) else {s: optimizer for s in sections}
    for key, fn in fns.items():
        if key not in sections:
            raise SwapError(f"optimizer={{{key!r}: ...}}: train_{method} takes an optimizer for "
                            f"{' and '.join(sections)}, not {key!r}")
        if not callable(fn):
            raise SwapError(f"optimizer for {key} must be a function param_groups -> torch.optim.Optimizer, got "
                            f"{type(fn).__name__}")
    if "phase2" in fns:
        check_stacked(cfg, "your own")
    return fns


def check_callbacks(callbacks) -> tuple:
    """The library's ``callbacks`` as a tuple, each a :class:`swap.Callback` or an object with at
    least one of ``on_record``, ``on_phase_end``, ``on_run_end`` (:mod:`swap.tracking`). Processes
    receive them by pickling
    (:func:`swap.launch.check_sendable`).

    Raises:
        SwapError: an object with none of them.
    """
    callbacks = tuple(callbacks or ())
    for cb in callbacks:
        if not isinstance(cb, Callback) and not any(callable(getattr(cb, h, None))
                                                    for h in ("on_record", "on_phase_end", "on_run_end")):
            raise SwapError(f"callback {type(cb).__name__} has none of on_record(record), on_phase_end(phase, result), "
                            f"on_run_end(summary)")
    return callbacks


def _run(method: str, model_fn, data: tuple, config, out, procs: int, mode, **given):
    """The library's adapter of :func:`swap.launch.run`: the user's arguments (``given``: loss_fn,
    metrics, collate_fn, optimizer, callbacks) as :class:`swap.context.Parts`."""
    from .context import Parts
    from .launch import run

    cfg = copy.deepcopy(config) if isinstance(config, Config) else load_config(None, config)
    announce_code(cfg)
    metrics = given.get("metrics")
    custom = {k: v for k, v in metrics.items() if k not in METRICS} if isinstance(metrics, dict) else {}
    task = Task(given.get("loss_fn"), tuple(metrics) if metrics is not None else ("top1", "loss"), custom)
    parts = Parts(model_fn, _user_data(cfg, *data), task, given.get("collate_fn"),
                  optimizer_fns(given.get("optimizer"), method, cfg), check_callbacks(given.get("callbacks")))
    summary, out = run(method, cfg, out, parts, procs=procs, mode=mode, entry=f"train_{method}")
    if summary is None:
        return None, None                    # under torchrun the run's model and summary are rank 0's
    return methods.final_model(method, out, model_fn), summary


def _user_data(cfg: Config, train_set, test_set) -> tuple:
    """The user's (train, test): image tensors as :class:`swap.data.ImageDataset` (the fast path),
    any other map-style ``Dataset`` checked against the data contract; ``data.train_subset`` /
    ``data.test_subset`` applied."""
    if isinstance(train_set, (ImageDataset, tuple)) and not isinstance(train_set, torch.utils.data.Dataset):
        num_classes = train_set.num_classes if isinstance(train_set, ImageDataset) else None
        train_set = _as_dataset(train_set, num_classes).subset(cfg.data.train_subset)
        return train_set, _as_dataset(test_set, train_set.num_classes).subset(cfg.data.test_subset)
    for name, dataset in (("train_set", train_set), ("test_set", test_set)):    # the generic path
        check_sample(dataset, name)
    return subset(train_set, cfg.data.train_subset), subset(test_set, cfg.data.test_subset)


def _mode(resume, overwrite: bool, out):
    """``resume`` of :func:`train_swap` (False, True or ``"auto"``) and ``overwrite`` as a
    :class:`swap.launch.DirMode`.

    Raises:
        SwapError: another ``resume`` value, or a resume without ``out``.
    """
    from .launch import DirMode

    if resume not in (False, True, "auto"):
        raise SwapError(f"resume must be False, True or 'auto', got {resume!r}")
    if resume and not out:
        raise SwapError("resume needs out=DIR, the run directory to continue")
    return DirMode(overwrite=overwrite, resume=resume is True, auto_resume=resume == "auto")


def train_swap(model_fn: Callable[[], nn.Module], train_set, test_set, config: Config | dict | None = None,
               out: str | Path | None = None, procs: int = 1, overwrite: bool = False, *, loss_fn=None,
               metrics=None, collate_fn=None, optimizer=None, resume: bool | str = False,
               callbacks=None) -> tuple[nn.Module, dict]:
    """Train ``model_fn()`` with SWAP (Gupta et al., ICLR 2020, Algorithm 1) and return the averaged model.

    Args:
        model_fn: builds a fresh ``nn.Module`` mapping float (N, C, H, W) to logits (N, classes);
            a module-level function when ``procs > 1`` (the processes import it by name). On a
            dataset of your own, any model of the output contract (:mod:`swap.task`): it returns a
            tensor, a tuple (the first element is the prediction) or a mapping or object with
            ``loss`` and/or ``logits`` (a ``transformers`` ``ModelOutput``, trained on its own loss).
        train_set, test_set: ``swap.data.ImageDataset`` or ``(images, labels)``: images uint8
            (or float) (N, C, H, W) in pixel units, labels int (N,). Normalisation statistics come
            from ``train_set``; augmentation as configured (``data.crop_padding/flip/cutout``).
            Or any map-style ``torch.utils.data.Dataset`` of ``(input, target)`` samples: input a
            tensor, a tuple or a dict of tensors (the model is called as ``model(x)``,
            ``model(*x)``, ``model(**x)``), target a tensor; or of single mappings (a Hugging Face
            row: the model is called with ``model(**row)``, the target is its ``labels``). It does
            its own transforms, loaded by a DataLoader (``data.num_workers``) in a deterministic,
            resumable order.
        loss_fn: ``loss_fn(output, target) -> scalar``; default the output's own ``loss``, else
            cross-entropy over the last dimension (classifiers, and language models with (B, T, V)
            logits).
        metrics: names among ``top1``, ``top5``, ``loss`` (default ``top1``, ``loss``), or a
            dict ``name -> fn(output, target) -> (sum, count)`` of your own (plus those names);
            reported by every evaluation (``test_METRIC`` in metrics.jsonl; the summary's
            ``test_metrics`` for a generic dataset).
        collate_fn: builds a batch from a list of samples (default torch's ``default_collate``).
        optimizer: your own optimizer, ``fn(param_groups) -> torch.optim.Optimizer``, for every
            phase, or a dict ``{"phase1": fn1, "phase2": fn2}`` (a phase left out keeps the config's
            ``phase1.optimizer`` / ``phase2.optimizer``). ``param_groups`` are the model's
            parameters as groups (``optim.no_decay``: a second group with ``weight_decay`` 0);
            you may regroup them, but must give the optimizer every one. The schedule (config:
            peak LR, warm-up, decay) scales each group's own LR: a group built with ``lr`` equal to
            the optimizer's default LR follows it, a group with ``lr=0.1 * default`` (or
            ``lr_scale=0.1``, timm's key) gets a tenth of it at every update. Its state is
            checkpointed with the run (each phase-2 worker keeps its own). A module-level function
            (or a ``functools.partial`` of one) when processes are started.
        config: a :class:`swap.config.Config` or a nested dict of overrides of the defaults,
            e.g. ``{"workers": 4, "phase1": {"batch_size": 1024, "stop_acc": 95}}``.
        out: run directory (default: a new temporary folder); must not hold a run unless ``overwrite``
            or ``resume``.
        resume: ``True`` continues the run in ``out`` from its last checkpoints (``--resume``: the
            same config; finished phases and workers are not trained again, and the result is the
            uninterrupted run's, bit for bit on one machine); ``"auto"`` continues it if ``out``
            holds one, else starts it (``--auto-resume``).
        callbacks: :class:`swap.Callback` objects (the protocol of :mod:`swap.callbacks`), or
            any objects with some of its run hooks: ``on_record(record)`` (each metrics.jsonl
            record, with ``step``: updates on the critical path), ``on_phase_end(phase, result)``
            (phase1, phase2 per worker, phase3; sgd) and ``on_run_end(summary)``, called in the
            process that writes the records (:mod:`swap.tracking`); a :class:`swap.Callback` also
            gets the loop's hooks (``on_epoch_end(record)``, ...) of every phase, worker or
            baseline, where its records are written. Module-level classes when processes are
            started (they are pickled to them). The config's ``logging.loggers``
            (tensorboard, mlflow) and ``logging.log_every`` work as in the CLI.
        procs: local processes (phase 1 data-parallel ranks; phase-2 workers are spread over them).
            Under ``torchrun`` (a script launched by ``torchrun --nproc-per-node N script.py``) no
            process is started: the call joins torchrun's ranks (``procs`` is its world size),
            needs ``out``, and returns ``(None, None)`` on every rank but rank 0.

    ``data.train_subset`` / ``data.test_subset`` keep the first N samples of a fixed shuffle, as for
    the built-in datasets. With ``procs > 1`` or ``phase2.layout: processes`` (the default) worker
    processes import the calling script again: call this under ``if __name__ == "__main__":``.

    Returns:
        (averaged model on CPU with recomputed BN statistics, summary dict as in ``summary.json``).
        A model with ``save_pretrained`` (``transformers``) is also written to ``OUT/pretrained/``.
    Raises:
        SwapError: invalid config or data (a sample that is not ``(input, target)``, a model that
            cannot take the input, a loss that is not a scalar, an unknown metric), existing run
            directory, batch not divisible by procs, augmentation impossible for the image size, a
            call from a script's top level without the ``__main__`` guard (:func:`swap.launch.check_main_guard`).
            All before any training.
    """
    return _run("swap", model_fn, (train_set, test_set), config, out, procs, _mode(resume, overwrite, out),
                loss_fn=loss_fn, metrics=metrics, collate_fn=collate_fn, optimizer=optimizer, callbacks=callbacks)


def train_sgd(model_fn: Callable[[], nn.Module], train_set, test_set, config: Config | dict | None = None,
              out: str | Path | None = None, procs: int = 1, overwrite: bool = False, *, loss_fn=None,
              metrics=None, collate_fn=None, optimizer=None, resume: bool | str = False,
              callbacks=None) -> tuple[nn.Module, dict]:
    """Data-parallel training with the ``sgd`` config section (the paper's baselines; its
    ``optimizer``: sgd, lars, lamb, adamw or extrap), or with ``optimizer``, your own
    (``fn(param_groups)``, as in :func:`train_swap`); otherwise as :func:`train_swap`."""
    return _run("sgd", model_fn, (train_set, test_set), config, out, procs, _mode(resume, overwrite, out),
                loss_fn=loss_fn, metrics=metrics, collate_fn=collate_fn, optimizer=optimizer, callbacks=callbacks)


__all__ = ["train_swap", "train_sgd"]
