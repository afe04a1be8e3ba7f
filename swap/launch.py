"""The one way a run starts. ``swap train`` (:mod:`swap.cli`) and :func:`swap.train_swap` /
:func:`swap.train_sgd` (:mod:`swap.api`) are adapters that turn their arguments into a config, a
run directory and the user's :class:`~swap.context.Parts`, then call :func:`run`, which, in order:

1. applies the method's own settings (``swap-cycles``, ``diloco``, ...) and checks the loggers;
2. joins torchrun's ranks when torchrun started this process, else counts the local processes
   (and, for the library, refuses a call that the worker processes would repeat);
3. checks that what goes to the worker processes can be sent (the user's functions and callbacks);
4. reads the data once (every image decoded: under torchrun once per machine), fits the defaults
   the user did not set to it, checks the batches against it and runs the model, the loss and the
   metrics once on a batch (:func:`checked`);
5. prepares the run directory and its lock (:func:`swap.methods.prepare`), and launches the ranks.

A local run and a torchrun run go through the same steps, so defaults are fitted to the data alike.
"""
from __future__ import annotations

import ast
import dataclasses
import multiprocessing
import os
# bandit B403 (pickle): only pickle.dumps, to check that what goes to the ranks pickles; nothing is loaded
import pickle  # nosec B403
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import distributed, methods, tracking
from .config import Config
from .context import Parts, configured_parts
from .data import ImageDataset, augment_for, load_configured
from .data.generic import split_batch
from .errors import SwapError
from .imports import install_hint
from .task import Task, class_targets


@dataclasses.dataclass(frozen=True)
class DirMode:
    """How a run uses its directory: ``overwrite`` an existing run, ``resume`` it (``--resume``),
    or ``auto_resume`` (``--auto-resume``: continue it if it holds one, else start it); at most one."""
    overwrite: bool = False
    resume: bool = False
    auto_resume: bool = False


def local_procs(cfg: Config) -> int:
    """Local processes: ``procs`` if set, else min(W, CPU cores) so processes never oversubscribe;
    with worker groups (``phase2.ranks_per_worker`` k > 1), W x k."""
    k = cfg.phase2.ranks_per_worker
    return cfg.procs or (cfg.workers * k if k > 1 else min(cfg.workers, os.cpu_count() or 1))


def run(name: str, cfg: Config, out: str | Path | None, parts: Parts | None = None, *, procs: int = 0,
        mode: DirMode = DirMode(), entry: str | None = None, start: dict | None = None):
    """Train method ``name`` (:data:`swap.methods.METHODS`) with ``cfg`` into run directory ``out``
    (None: a new temporary folder, library only), on the user's ``parts`` (None: the configured
    model and data), in ``procs`` local processes (0: :func:`local_procs`; under torchrun: its world
    size). ``entry`` names the library call (``train_swap``) for its messages; None for the CLI
    (``swap train``, ``swap compare``), which prints the run's first line. ``start``: an SWA
    method's start (:class:`swap.methods.RunSpec`). Steps: the module docstring.

    Returns:
        ``(summary, run directory)``, the summary rank 0's (None on the other ranks under
        torchrun; ``{"interrupted": ...}`` after a stop signal in a local run's ranks).
    Raises:
        SwapError: any check before the work (nothing is created before them).
        swap.interrupt.Interrupted: a stop signal in this process.
    """
    method = methods.get_method(name)
    cfg = method.config(cfg)                       # the method's own settings (swap-cycles, diloco, ...)
    tracking.check_loggers(cfg.logging.loggers)    # a logger's package missing: one line, before any work
    parts = parts or Parts()
    ranked = distributed.under_launcher()          # torchrun started this process: it is one rank
    procs = int(os.environ["WORLD_SIZE"]) if ranked else procs or local_procs(cfg)
    method.check(cfg, procs)
    spawns = not ranked and method.starts_processes(cfg, procs)
    if spawns:
        if entry:
            check_main_guard(entry)
        distributed.start_server()                 # processes will start: their fork server, meanwhile
        check_sendable(parts)
    parts, fitted = checked(method, cfg, parts, procs, verify=not ranked or os.environ.get("LOCAL_RANK", "0") == "0")
    if ranked and out is None:
        raise SwapError(f"under torchrun, {entry} needs out=DIR: every rank writes into the same run directory")
    out = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix=f"swap-{name}-"))
    # With auto_resume every rank runs as a resume: one that finds no checkpoint starts from scratch
    # (so ranks need not agree whether the directory held a run before the first of them prepared it).
    spec = methods.RunSpec(cfg, out, None, mode.resume or mode.auto_resume, start=start, parts=parts)
    fitted = f"fitted to the data: {', '.join(fitted)}" if fitted else ""
    if ranked:
        if fitted and os.environ.get("RANK", "0") == "0":
            print(f"swap: {entry or name} {fitted}", file=sys.stderr)
        return methods.run_ranked(name, spec, mode.overwrite, mode.resume, mode.auto_resume), out
    run_dir = methods.prepare(out, cfg, mode.overwrite, mode.resume, mode.auto_resume)
    if entry and fitted:
        print(f"swap: {entry} {fitted}", file=sys.stderr)
    elif not entry:
        threads = cfg.threads or distributed.default_threads(procs)
        pool = (f"an elastic pool of up to {cfg.abs.max_workers or cfg.procs or os.cpu_count()} processes"
                if method.driver and cfg.abs.elastic else f"{cfg.workers} workers in {procs} processes")
        print(f"swap: {name} on {cfg.data.name}, {pool} x {threads} threads, run directory {out}"
              + (f"; {fitted}" if fitted else ""), file=sys.stderr)
    with run_dir.locked():
        return methods.launch(name, dataclasses.replace(spec, t0=time.time()), procs), out


def checked(method: methods.Method, cfg: Config, parts: Parts, procs: int, verify: bool) -> tuple[Parts, list]:
    """The checks against the data, before anything is created: the code the config names is
    imported and the data read (the configured data unless ``parts`` carry the user's; with
    ``verify`` every image decoded), the defaults the user did not set fitted to it (``cfg`` is
    changed in place), the batches checked against it; the methods that need in-memory images
    (ABS/ABSA, stacked phase-2 workers) refused on a dataset of the generic path; there, with a
    model of the user's, the model, the loss and every metric run once (:func:`check_task`) and
    the stopping rule checked (:func:`check_stop_rule`).

    Returns:
        (the parts with their checked task, the fitted settings as ``key=value`` strings).
    Raises:
        SwapError: naming what failed.
    """
    model_fn, task, collate_fn = configured_parts(cfg, parts.model_fn, parts.task, parts.collate_fn)
    if parts.data is None:
        train_set, _, *val = load_configured(cfg.data, verify=verify, validation=cfg.uses_validation())
        samples = len(train_set) + sum(map(len, val))         # the training set, a validation split included
    else:
        train_set = parts.data[0]
        samples = len(train_set)
    fitted = method.fit(cfg, procs, samples)
    method.check(cfg, procs, samples)
    if isinstance(train_set, ImageDataset):
        augment_for(cfg.data, train_set)                      # an augmentation impossible for the images fails here
        if task is not None:
            check_stop_rule(cfg, task, method)
        return parts, fitted
    if method.summary == "abs":
        raise SwapError("ABS/ABSA need the in-memory image path (a fixed clean sample for the Hessian, FGSM in "
                        "pixel range)")
    if method.summary == "swap" and cfg.phase2.layout == "vmap":
        raise SwapError("phase2.layout=vmap stacks the in-memory image path only; use processes or sequential "
                        "with a dataset of your own")
    if model_fn is not None:
        parts = dataclasses.replace(parts, task=checked_task(cfg, method, (model_fn, task, collate_fn), train_set))
    return parts, fitted


def checked_task(cfg: Config, method: methods.Method, own: tuple, train_set) -> Task:
    """The task of a run with a model of the user's on a dataset of the generic path, checked:
    ``own`` is (model_fn, task or None, collate_fn or None); the model, the loss and every metric
    run once on a batch of ``train_set`` (:func:`check_task`), and a stopping rule on training
    accuracy is refused where the targets are not class indices (:func:`check_stop_rule`).

    Raises:
        SwapError: naming what failed.
    """
    model_fn, task, collate_fn = own
    task = task or Task()
    if not check_task(model_fn, train_set, task, collate_fn):
        task = dataclasses.replace(task, class_targets=False)
    check_stop_rule(cfg, task, method)
    return task


def check_sendable(parts: Parts) -> None:
    """The user's optimizer functions and callbacks go to the worker processes by pickling: refuse,
    before any work, one that does not pickle (a lambda, a local function or class).

    Raises:
        SwapError: naming the function or callback and the fix.
    """
    for key, fn in (parts.optimizer or {}).items():
        try:
            pickle.dumps(fn)
        except Exception:
            raise SwapError(f"the optimizer function for {key} cannot be sent to the worker processes (a lambda "
                            f"or a local function): define it at the top level of a module, or use "
                            f"functools.partial of one") from None
    for cb in parts.callbacks:
        try:
            pickle.dumps(cb)
        except Exception:
            raise SwapError(f"callback {type(cb).__name__} cannot be sent to the worker processes (it holds "
                            f"something that does not pickle, or its class is local): define its class at the "
                            f"top level of a module, or use procs=1 with phase2.layout sequential") from None


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


__all__ = ["DirMode", "local_procs", "run", "checked", "checked_task", "check_sendable", "GUARD_FIX", "check_main_guard",
           "check_task", "check_stop_rule"]
