"""Library entry points: SWAP and the SGD baseline on a user's own model factory and data: image
tensors (the in-memory fast path) or any map-style ``torch.utils.data.Dataset`` of ``(input, target)``
samples, with the user's loss and metrics (:mod:`swap.task`)."""
from __future__ import annotations

import ast
import copy
import dataclasses
import multiprocessing
import os
# bandit B403 (pickle): only pickle.dumps, to check that what goes to the ranks pickles; nothing is loaded
import pickle  # nosec B403
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import distributed
from .config import Config, SwapError, code_line, load_config
from .data import ImageDataset, augment_for
from .data.generic import check_sample, split_batch, subset
from .imports import install_hint
from .rundir import RunDir
from .task import METRICS, Task, class_targets


def _as_dataset(data, num_classes: int | None) -> ImageDataset:
    if isinstance(data, ImageDataset):
        return data
    images, labels = data
    if images.ndim != 4 or len(images) != len(labels):
        raise SwapError(f"expected images (N, C, H, W) and labels (N,), got {tuple(images.shape)} and {tuple(labels.shape)}")
    return ImageDataset(images, labels.long(), num_classes or int(labels.max()) + 1)


GUARD_FIX = ('put the call under `if __name__ == "__main__":` (the worker processes start with multiprocessing\'s '
             'spawn and import your script again, which would run it again)')


def _is_main_guard(node: ast.stmt) -> bool:
    """``if __name__ == "__main__":`` (either operand order)."""
    if not (isinstance(node, ast.If) and isinstance(node.test, ast.Compare) and len(node.test.comparators) == 1
            and isinstance(node.test.ops[0], ast.Eq)):
        return False
    sides = [node.test.left, node.test.comparators[0]]
    return (any(isinstance(s, ast.Name) and s.id == "__name__" for s in sides)
            and any(isinstance(s, ast.Constant) and s.value == "__main__" for s in sides))


def check_main_guard(entry: str) -> None:
    """Refuse, before any work, a library call that worker processes would repeat.

    Our processes start with multiprocessing's spawn, which imports the user's ``__main__`` script
    in every child. A script that calls ``entry`` at module level without an
    ``if __name__ == "__main__":`` guard would run again in each child (multiprocessing then stops
    it with an unclear error, after the parent's work is lost). This finds the script's module-level
    statement that is running now and checks that it is such a guard. Inside a spawned child that
    is importing the script, the call is refused at once.

    Raises:
        SwapError: the call is not guarded, naming the script, the line and the fix.
    """
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise SwapError(f"swap.{entry} was called while a worker process was importing your script: {GUARD_FIX}")
    main = sys.modules.get("__main__")
    frame = sys._getframe(1)
    while frame is not None and not (frame.f_code.co_name == "<module>" and frame.f_globals.get("__name__") == "__main__"):
        frame = frame.f_back
    if frame is None or getattr(main, "__file__", None) is None:
        return                               # not during a script's top-level code (or no file to re-import)
    path, line = frame.f_code.co_filename, frame.f_lineno
    try:
        tree = ast.parse(Path(path).read_text(), path)
    except (OSError, SyntaxError, ValueError):
        return
    for node in tree.body:
        if node.lineno <= line <= (node.end_lineno or node.lineno):
            if not _is_main_guard(node):
                raise SwapError(f"{path}:{line} calls swap.{entry} at the top level of the script: {GUARD_FIX}")
            return


def check_task(model_fn, dataset, task: Task, collate_fn=None) -> bool:
    """Run the model, the loss and every metric once on a batch of the first two samples, made by
    the run's collate function (``collate_fn``, else the dataset's own ``collate_fn`` attribute,
    else torch's ``default_collate``), before any training, so that a model that does not take
    the input, a loss that is not a scalar or a metric that fails is a one-line error and not a
    failed rank.

    Returns:
        whether the batch's targets are class indices of the model's output
        (:func:`swap.task.class_targets`; False for soft targets such as mixup's).
    Raises:
        SwapError: naming what failed.
    """
    collate = collate_fn or getattr(dataset, "collate_fn", None) or torch.utils.data.default_collate   # as the run
    x, y = split_batch(collate([dataset[i] for i in range(min(2, len(dataset)))]))
    try:
        model = model_fn()
    except Exception as exc:                 # the user's factory: any error
        raise SwapError(f"model_fn() failed: {type(exc).__name__}: {exc}{install_hint(exc)}") from None
    model.eval()
    try:
        with torch.no_grad():
            out = task.forward(model, x)
    except Exception as exc:                 # the user's model on the user's input: any error
        raise SwapError(f"model_fn()'s model cannot take a batch of the dataset: {type(exc).__name__}: {exc}") from None
    try:
        loss = task.loss(out, y)             # SwapError if not a scalar
    except SwapError:
        raise
    except Exception as exc:                 # the user's loss on the user's output: any error
        raise SwapError(f"the loss failed on a batch of the dataset: {type(exc).__name__}: {exc}") from None
    try:
        task.batch_metrics(out, y, loss)
    except Exception as exc:
        raise SwapError(f"a metric failed on a batch of the dataset: {type(exc).__name__}: {exc}") from None
    return class_targets(out, y)


def check_stop_rule(cfg: Config, task: Task, method) -> None:
    """Refuse, before any work, a phase-1 stopping rule on training accuracy when the training
    targets are not class indices (``task.class_targets`` False): the accuracy would read 0 and
    phase 1 would run to ``phase1.max_epochs`` whatever happened.

    Raises:
        SwapError: naming ``phase1.stop.metric: train_loss`` and ``phase1.stop: auto``.
    """
    if not task.class_targets and method.summary == "swap" and cfg.phase1.stop_rule()[0] == "train_acc":
        raise SwapError("the training targets are not class indices (soft or float targets, e.g. mixup), so the "
                        "training accuracy has no meaning and phase1.stop_acc can never be reached: stop on the loss "
                        "(phase1.stop.metric: train_loss with phase1.stop.at: LOSS) or set phase1.stop: auto")


# The config sections a user's optimizer may be given for, by method
OPTIMIZER_SECTIONS = {"swap": ("phase1", "phase2"), "sgd": ("sgd",)}


def optimizer_fns(optimizer, method: str, cfg: Config, spawns: bool) -> dict | None:
    """The user's ``optimizer`` argument as ``{config section: fn}``: one function for every
    section of ``method`` (:data:`OPTIMIZER_SECTIONS`), or a dict naming some of them (the others
    keep the config's optimizer). ``spawns``: the run starts processes, which receive the functions
    by pickling (a module-level function, or a ``functools.partial`` of one).

    Raises:
        SwapError: a value that is not callable, a key that is not a section of the method, a
            function the processes cannot receive, or phase 2 stacked (``vmap``: its SGD only).
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
        if spawns:
            try:
                pickle.dumps(fn)
            except Exception:
                raise SwapError(f"the optimizer function for {key} cannot be sent to the worker processes (a lambda "
                                f"or a local function): define it at the top level of a module, or use "
                                f"functools.partial of one") from None
    if "phase2" in fns and cfg.phase2.layout == "vmap":
        raise SwapError("phase2.layout vmap stacks the workers into one SGD: a phase-2 optimizer of your own needs "
                        "phase2.layout processes or sequential")
    return fns


def check_callbacks(callbacks, spawns: bool) -> tuple:
    """The library's ``callbacks`` as a tuple, each an object with at least one of ``on_record``,
    ``on_phase_end``, ``on_run_end`` (:mod:`swap.tracking`).

    Raises:
        SwapError: an object with none of them, or one the worker processes cannot receive.
    """
    callbacks = tuple(callbacks or ())
    for cb in callbacks:
        if not any(callable(getattr(cb, h, None)) for h in ("on_record", "on_phase_end", "on_run_end")):
            raise SwapError(f"callback {type(cb).__name__} has none of on_record(record), on_phase_end(phase, result), "
                            f"on_run_end(summary)")
        if spawns:
            try:
                pickle.dumps(cb)
            except Exception:
                raise SwapError(f"callback {type(cb).__name__} cannot be sent to the worker processes (it holds "
                                f"something that does not pickle, or its class is local): define its class at the "
                                f"top level of a module, or use procs=1 with phase2.layout sequential") from None
    return callbacks


def _run(method: str, model_fn, train_set, test_set, config, out, procs, overwrite, loss_fn=None, metrics=None,
         collate_fn=None, optimizer=None, resume: bool | str = False, callbacks=None):
    from . import methods, tracking

    if resume not in (False, True, "auto"):
        raise SwapError(f"resume must be False, True or 'auto', got {resume!r}")
    if resume and not out:
        raise SwapError("resume needs out=DIR, the run directory to continue")
    cfg = copy.deepcopy(config) if isinstance(config, Config) else load_config(None, config)
    line = code_line(cfg)
    if line and os.environ.get("RANK", "0") == "0":         # before any of it is imported; once per job
        print(line, file=sys.stderr, flush=True)
    ranked = distributed.under_launcher()                   # torchrun started this script: join its ranks
    if ranked:
        procs = int(os.environ["WORLD_SIZE"])
    spawns = not ranked and methods.METHODS[method].starts_processes(cfg, procs)
    if spawns:
        check_main_guard(f"train_{method}")
        distributed.start_server()                        # processes will start: their fork server, meanwhile
    fns = optimizer_fns(optimizer, method, cfg, spawns)
    callbacks = check_callbacks(callbacks, spawns)
    tracking.check_loggers(cfg.logging.loggers)
    custom = {k: v for k, v in metrics.items() if k not in METRICS} if isinstance(metrics, dict) else {}
    names = tuple(metrics) if metrics is not None else ("top1", "loss")
    task = Task(loss_fn, names, custom)                      # SwapError: an unknown metric name
    if isinstance(train_set, (ImageDataset, tuple)) and not isinstance(train_set, torch.utils.data.Dataset):
        num_classes = train_set.num_classes if isinstance(train_set, ImageDataset) else None
        train_set = _as_dataset(train_set, num_classes).subset(cfg.data.train_subset)
        test_set = _as_dataset(test_set, train_set.num_classes).subset(cfg.data.test_subset)
        augment_for(cfg.data, train_set)
    else:                                                    # any map-style Dataset: the generic path
        for name, dataset in (("train_set", train_set), ("test_set", test_set)):
            check_sample(dataset, name)
        train_set, test_set = subset(train_set, cfg.data.train_subset), subset(test_set, cfg.data.test_subset)
        if not check_task(model_fn, train_set, task, collate_fn):
            task = dataclasses.replace(task, class_targets=False)
    check_stop_rule(cfg, task, methods.METHODS[method])
    fitted = methods.METHODS[method].fit(cfg, procs, len(train_set))     # defaults the user did not set
    methods.METHODS[method].check(cfg, procs, len(train_set))
    if fitted:
        print(f"swap: train_{method} fitted to the data: {', '.join(fitted)}", file=sys.stderr)
    if ranked and not out:
        raise SwapError("under torchrun, train_swap needs out=DIR: every rank writes into the same run directory")
    out = Path(out) if out else Path(tempfile.mkdtemp(prefix=f"swap-{method}-"))
    # as --auto-resume: every rank runs as a resume; one that finds no checkpoint starts from scratch
    spec = methods.RunSpec(cfg, out, time.time(), bool(resume), model_fn, (train_set, test_set), task=task,
                           collate_fn=collate_fn, optimizer=fns, callbacks=callbacks)
    if ranked:                               # as `torchrun -m swap.cli train`
        summary = methods.run_ranked(method, dataclasses.replace(spec, t0=None), overwrite, resume is True,
                                     resume == "auto")
        if int(os.environ["RANK"]) != 0:
            return None, None                # the run's model and summary are rank 0's
    else:
        RunDir.prepare(out, cfg, overwrite=overwrite, resume=resume is True, auto_resume=resume == "auto")
        summary = methods.launch(method, spec, procs)
    return methods.final_model(method, out, model_fn), summary


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
        callbacks: objects with any of ``on_record(record)`` (each metrics.jsonl record, with
            ``step``: updates on the critical path), ``on_phase_end(phase, result)`` (phase1,
            phase2 per worker, phase3; sgd) and ``on_run_end(summary)``, called in the process
            that writes the records (:mod:`swap.tracking`); module-level classes when processes
            are started (they are pickled to them). The config's ``logging.loggers``
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
            call from a script's top level without the ``__main__`` guard (:func:`check_main_guard`).
            All before any training.
    """
    return _run("swap", model_fn, train_set, test_set, config, out, procs, overwrite, loss_fn, metrics, collate_fn,
                optimizer, resume, callbacks)


def train_sgd(model_fn: Callable[[], nn.Module], train_set, test_set, config: Config | dict | None = None,
              out: str | Path | None = None, procs: int = 1, overwrite: bool = False, *, loss_fn=None,
              metrics=None, collate_fn=None, optimizer=None, resume: bool | str = False,
              callbacks=None) -> tuple[nn.Module, dict]:
    """Data-parallel training with the ``sgd`` config section (the paper's baselines; its
    ``optimizer``: sgd, lars, lamb, adamw or extrap), or with ``optimizer``, your own
    (``fn(param_groups)``, as in :func:`train_swap`); otherwise as :func:`train_swap`."""
    return _run("sgd", model_fn, train_set, test_set, config, out, procs, overwrite, loss_fn, metrics, collate_fn,
                optimizer, resume, callbacks)


__all__ = ["train_swap", "train_sgd"]
