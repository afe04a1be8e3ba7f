"""The method registry: every training method in one table, read by ``swap train``, ``swap compare``,
the library API and ``swap plan``.

A :class:`Method` says which per-rank function trains it (run on every rank by
:func:`swap.distributed.launch`, or by each process under ``torchrun``), the config sections whose
``batch_size`` is a global batch split over the ranks, the batches that must fit in the training
set, how its run config derives from the user's (``sgd-small`` runs the SGD trainer with section
``sgd_small``), its final checkpoint and the shape of its summary. A :class:`RunSpec` carries what
every rank function receives, in place of positional argument tuples.

Methods: ``sgd`` (``swap train --method sgd``), the paper's baselines ``sgd-small`` and ``sgd-large``
(Gupta et al., ICLR 2020, Table 1), ``swap`` (Algorithm 1), the sequential SWA baselines ``swa-large``,
``swa-lb-sb``, ``swa-small`` (Table 4; Izmailov et al., UAI 2018), extrapolated SGD ``extrap-large``
and ``swap-extrap`` (Lin et al., ICML 2020), the large-batch baseline with LARS, LAMB or AdamW
(``lars-large``, ``lamb-large``, ``adamw-large``; sections of those names) and SWAP with a LARS or LAMB
phase 1 (``swap-lars``, ``swap-lamb``), adaptive batch size ``abs`` and ``absa`` (Yao et al. 2018), and the
averages along one trajectory (:mod:`swap.trajectory`): the large-batch baseline ending as its EMA or
LAWA (``ema-large``, ``lawa-large``; Kaddour 2022, Sanyal et al. 2023) and SWAP whose workers each end
as theirs (``swap-ema``, ``swap-lawa``).
"""
from __future__ import annotations

import copy
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .config import Config, SwapError, check_world, section_batches, validation_size


@dataclass(frozen=True)
class RunSpec:
    """What a rank function receives: ``cfg`` (the method's resolved config), ``run_path`` (its run
    directory), ``t0`` (the run's start, ``time.time()`` seconds, shared by the ranks; None = now),
    ``resume`` (continue from the checkpoints), for the SWA methods their ``start`` model, and the
    user's own ``parts`` (:class:`swap.context.Parts`: model factory, data, task, collate function,
    optimizer functions, callbacks; None = the configured ones)."""
    cfg: Config
    run_path: str | Path
    t0: float | None = None
    resume: bool = False
    start: dict | None = None              # SWA methods: {"checkpoint": base path, "summary": dict} of the start
    parts: Any = None                      # swap.context.Parts, or None


def _sgd_from(section: str, optimizer: str | None = None, average: str | None = None) -> Callable[[Config], None]:
    """A config transform: section ``section`` (e.g. ``sgd_small``) becomes the SGD trainer's
    section ``sgd``, with ``sgd.optimizer`` set to ``optimizer`` and ``sgd.average`` (the average
    along the trajectory: ``ema``, ``lawa``) to ``average`` when given."""
    def configure(cfg: Config) -> None:
        cfg.sgd = copy.deepcopy(getattr(cfg, section))
        if optimizer:
            cfg.sgd.optimizer = optimizer
        if average:
            cfg.sgd.average = average
    return configure


def _along(kind: str) -> Callable[[Config], None]:
    """A config transform: each SWAP phase-2 worker ends as its own average along its trajectory
    (``phase2.average_along``: ``ema`` or ``lawa``) before phase 3 averages the workers."""
    def configure(cfg: Config) -> None:
        cfg.phase2.average_along = kind
    return configure


def _cycles(cfg: Config) -> None:
    """A config transform: each phase-2 worker runs ``phase2.cycles`` cycles (at least 2) and
    contributes a sample per cycle (SWAP paper Table 4, "SWAP (40 small-batch epochs)")."""
    cfg.phase2.cycles = max(2, cfg.phase2.cycles)


def _local_sgd(cfg: Config) -> None:
    """A config transform: phase-2 workers average their weights every ``phase2.sync_every``
    updates (default 8): post-local SGD."""
    cfg.phase2.sync_every = cfg.phase2.sync_every or 8
    cfg.phase2.outer, cfg.phase2.layout = "average", "sequential"


# DiLoCo's inner optimizer (Douillard et al. 2023, Sec. 3: AdamW, weight decay 0.1, betas (0.9, 0.95), LR 4e-4
# for their 150M-1B-parameter language models). The LR is scaled to our presets' small models.
DILOCO_INNER = {"optimizer": "adamw", "peak_lr": 1e-3, "optim": {"weight_decay": 0.1, "betas": [0.9, 0.95]}}


def _diloco(cfg: Config) -> None:
    """A config transform: DiLoCo in phase 2 (Douillard et al. 2023): each worker trains with inner
    AdamW (:data:`DILOCO_INNER`, unless ``phase2.optimizer`` was set: then the user's optimizer,
    LR and settings), keeping its own AdamW state across meetings, and meets every
    ``phase2.sync_every`` updates (default 8) for an outer Nesterov step, outer LR 0.7 and momentum
    0.9 unless set."""
    p2 = cfg.phase2
    p2.sync_every, p2.outer, p2.layout = p2.sync_every or 8, "nesterov", "sequential"
    if p2.outer_lr == 1.0 and p2.outer_momentum == 0.0:
        p2.outer_lr, p2.outer_momentum = 0.7, 0.9
    if not cfg.is_set("phase2.optimizer"):
        p2.optimizer, p2.peak_lr = DILOCO_INNER["optimizer"], DILOCO_INNER["peak_lr"]
        p2.optim = {**DILOCO_INNER["optim"], **p2.optim}


def _large_batch_phase1(section: str) -> Callable[[Config], None]:
    """A config transform: SWAP's phase 1 trains with the optimizer, peak LR and settings of the
    large-batch baseline section ``section`` (``lars_large``: LARS, ``lamb_large``: LAMB), keeping
    phase 1's batch, warm-up, schedule and stopping rule."""
    def configure(cfg: Config) -> None:
        sec = getattr(cfg, section)
        cfg.phase1.optimizer, cfg.phase1.peak_lr = sec.optimizer, sec.peak_lr
        cfg.phase1.optim = {**sec.optim, **cfg.phase1.optim}
    return configure


def _extrapolated_phase1(cfg: Config) -> None:
    """A config transform: SWAP's phase 1 uses extrapolated SGD (section ``extrap``)."""
    cfg.phase1.optimizer = "extrap"


@dataclass(frozen=True)
class Method:
    """One training method of the registry (see the module docstring).

    Attributes:
        name: the method's name (``swap compare --methods``, ``swap train --method``).
        rank_fn: ``"module:function"`` of its per-rank function ``fn(spec: RunSpec, **options)``,
            which returns the summary on rank 0 (imported when run).
        split: config sections whose ``batch_size`` is a global batch split over the ranks.
        sized: dotted keys of further batches (besides ``split``'s) that must not exceed the
            training samples.
        checkpoint: name of its final checkpoint in ``RUN/checkpoints`` (the trained model).
        summary: the shape of its ``summary.json``: ``swap`` | ``sgd`` | ``swa`` | ``abs``.
        options: keyword options of ``rank_fn`` (e.g. the SWA variant).
        configure: turns the user's config (a copy) into the method's run config, in place.
        start: ``(method, checkpoint)`` an SWA method starts from (trained first by a compare).
        driver: ``"module:function"`` that launches the ranks itself (ABS's elastic pool), else None.
    """
    name: str
    rank_fn: str
    split: Callable[[Config], tuple[str, ...]]
    sized: tuple[str, ...]
    checkpoint: str
    summary: str
    options: dict = field(default_factory=dict)
    configure: Callable[[Config], None] | None = None
    start: tuple[str, str] | None = None
    driver: str | None = None

    def config(self, cfg: Config, seed: int | None = None) -> Config:
        """The run config of this method: a copy of ``cfg`` (with ``seed``), transformed by ``configure``."""
        out = copy.deepcopy(cfg)
        if seed is not None:
            out.seed = seed
        if self.configure is not None:
            self.configure(out)
        return out

    def batches(self, cfg: Config) -> list[tuple[str, int]]:
        """(config key, global batch) of every batch split over the ranks, from the user's config
        (each segment's, for a piecewise schedule)."""
        return [kb for s in self.split(cfg) for kb in section_batches(cfg, s)]

    def _sized(self, cfg: Config, procs: int) -> list[tuple[str, int, int]]:
        """(config key, value, the ranks it must split over) of every batch that must fit in the
        training set: the global batches split over ``procs`` ranks, then :attr:`sized`'s."""
        out = [(key, batch, procs) for key, batch in self.batches(cfg)]
        for key in self.sized:
            section, name = key.split(".")
            ranks = cfg.phase2.ranks_per_worker if key == "phase2.batch_size" else 1
            pairs = section_batches(cfg, section) if name == "batch_size" else [(key, getattr(getattr(cfg, section), name))]
            out += [(k, value, ranks) for k, value in pairs]
        if self.summary == "abs":       # the eigenvalue's sample; an elastic pool's base batch is not a split one
            out += [("abs.eig_samples", cfg.abs.eig_samples, 1)] + \
                   ([("abs.batch_size", cfg.abs.batch_size, 1)] if cfg.abs.elastic else [])
        return out

    @staticmethod
    def trainable(cfg: Config, train_samples: int) -> int:
        """The samples left to train on of ``train_samples`` once the validation split, if the run
        decides on one, is held out."""
        return train_samples - cfg.data.holdout if cfg.uses_validation() else train_samples

    def fit(self, cfg: Config, procs: int, train_samples: int) -> list[str]:
        """Fit the settings the user did not set (:meth:`swap.config.Config.is_set`) to a training
        set of ``train_samples`` samples, in place, so that a default never refuses a small
        dataset: a run that decides on a validation split without ``data.holdout`` holds out
        :func:`swap.config.validation_size` samples; a batch larger than the samples left to train
        on (a global batch, ``phase2.batch_size``, the BN pass's ``phase3.bn_batch_size``) becomes
        the largest multiple of the ranks sharing it that fits (the whole training set for the BN
        pass). Values the user set are left to :meth:`check`, which refuses impossible ones.

        Returns:
            one note per change, ``"key=value (why)"``, for the run's first line.
        """
        notes = []
        if cfg.uses_validation() and not cfg.data.holdout:
            cfg.data.holdout = validation_size(cfg.data, train_samples)
            notes.append(f"data.holdout={cfg.data.holdout} (the validation split: the last {cfg.data.holdout} training "
                         f"samples, 10% up to 5,000; set data.holdout to choose)")
        n = self.trainable(cfg, train_samples)
        for key, value, ranks in self._sized(cfg, procs):
            if value > n >= ranks and "segments" not in key and not cfg.is_set(key):
                section, name = key.split(".")
                setattr(getattr(cfg, section), name, n - n % ranks)
                notes.append(f"{key}={n - n % ranks} (the default {value} exceeds the {n} training samples)")
        a = cfg.abs                     # ABS doubles its batch up to max_batch_factor x the base batch
        largest = a.batch_size * a.max_batch_factor
        if self.summary == "abs" and largest > n >= a.batch_size and not cfg.is_set("abs.max_batch_factor"):
            a.max_batch_factor = n // a.batch_size
            notes.append(f"abs.max_batch_factor={a.max_batch_factor} (the default lets the batch grow to "
                         f"{largest}, beyond the {n} training samples)")
        return notes

    def starts_processes(self, cfg: Config, procs: int) -> bool:
        """Whether a local run of this method on ``procs`` processes starts processes of its own:
        its ranks, or SWAP's isolated phase-2 workers (``phase2.layout: processes``)."""
        return procs > 1 or (self.summary == "swap" and cfg.phase2.layout == "processes")

    def check(self, cfg: Config, procs: int, train_samples: int | None = None) -> None:
        """Refuse, before any work, batches that do not split over ``procs`` processes or that
        exceed the ``train_samples`` (less the validation split, :meth:`trainable`).

        Raises:
            SwapError: naming the key, its value and the limit.
        """
        for key, batch in self.batches(cfg):
            check_world(cfg, procs, batch, key.rsplit(".", 1)[0])
        run = self.config(cfg)
        for section in ("phase1", "phase2", "sgd"):
            if ":" in getattr(run, section).optimizer and (section == "sgd") == (self.summary == "sgd"):
                from .imports import import_object
                import_object(getattr(run, section).optimizer, f"{section}.optimizer")
        if self.summary == "abs" and cfg.abs.launcher == "ray":       # Ray installed, its cluster answering
            from .ray_pool import preflight
            preflight(cfg.abs.ray_address)
        piecewise = [f"{s}.segments" for s in ("phase1", "phase2") if getattr(cfg, s).segments]
        if self.summary in ("swa", "abs") and piecewise:
            raise SwapError(f"method {self.name} does not follow piecewise schedules ({', '.join(piecewise)}); "
                            f"sgd, sgd-small, sgd-large, swap and swap-extrap do")
        k = cfg.phase2.ranks_per_worker
        if self.summary == "swap" and run.phase2.sync_every and run.workers * k != procs:
            raise SwapError(f"phase2.sync_every has the {run.workers} workers meet while they train: it needs one "
                            f"worker per {'group of ' + str(k) + ' ranks' if k > 1 else 'process'}; set procs="
                            f"{run.workers * k} (the run has {procs})")
        if self.summary == "swap" and k > 1 and cfg.workers * k > procs:
            raise SwapError(f"phase2.ranks_per_worker={k} x workers={cfg.workers} needs {cfg.workers * k} processes, "
                            f"but the run has {procs}; set procs={cfg.workers * k} or lower one of them")
        if train_samples is not None:
            n = self.trainable(cfg, train_samples)
            a = cfg.abs
            if self.summary == "abs" and a.batch_size * a.max_batch_factor > n:
                raise SwapError(f"abs.max_batch_factor={a.max_batch_factor} lets the batch grow to {a.batch_size} x "
                                f"{a.max_batch_factor} = {a.batch_size * a.max_batch_factor}, which exceeds the {n} "
                                f"training samples")
            for key, value, _ in self._sized(cfg, procs):
                if value > n:
                    raise SwapError(f"{key}={value} exceeds the {n} training samples" +
                                    (f" left after the validation split (data.holdout={cfg.data.holdout})"
                                     if n < train_samples else ""))

    def function(self, which: str = "rank_fn") -> Callable[..., Any]:
        """The per-rank function (or the driver) of this method, imported."""
        module, name = getattr(self, which).split(":")
        return getattr(importlib.import_module(module), name)


def _phase1(cfg: Config) -> tuple[str, ...]:
    return ("phase1",)


def _abs(cfg: Config) -> tuple[str, ...]:
    return () if cfg.abs.elastic else ("abs",)      # an elastic pool sizes itself to the batch


def _section(name: str) -> Callable[[Config], tuple[str, ...]]:
    return lambda cfg: (name,)


SWAP_SIZED = ("phase2.batch_size", "phase3.bn_batch_size")
_SWA = "swap.algorithms.swa:run_swa"
_ABS = "swap.algorithms.adaptive_batch:run_abs"
_DRIVER = "swap.algorithms.adaptive_batch:train_abs"

#: Every method by name, in run order (a compare trains each SWA method's start before it).
METHODS: dict[str, Method] = {m.name: m for m in (
    Method("sgd", "swap.algorithms.sgd:run_sgd", _section("sgd"), (), "sgd", "sgd"),
    Method("sgd-small", "swap.algorithms.sgd:run_sgd", _section("sgd_small"), (), "sgd", "sgd",
           configure=_sgd_from("sgd_small")),
    Method("sgd-large", "swap.algorithms.sgd:run_sgd", _section("sgd_large"), (), "sgd", "sgd",
           configure=_sgd_from("sgd_large")),
    Method("swap", "swap.algorithms.swap:run_swap", _phase1, SWAP_SIZED, "swap", "swap"),
    Method("swa-large", _SWA, _phase1, (), "swa", "swa", {"variant": "swa-large"}, start=("swap", "phase1")),
    Method("swa-lb-sb", _SWA, _section("phase2"), (), "swa", "swa", {"variant": "swa-lb-sb"}, start=("swap", "phase1")),
    Method("swa-small", _SWA, _section("phase2"), (), "swa", "swa", {"variant": "swa-small"}, start=("sgd-small", "sgd")),
    Method("extrap-large", "swap.algorithms.sgd:run_sgd", _section("sgd_large"), (), "sgd",
           "sgd", configure=_sgd_from("sgd_large", optimizer="extrap")),
    Method("lars-large", "swap.algorithms.sgd:run_sgd", _section("lars_large"), (), "sgd", "sgd",
           configure=_sgd_from("lars_large")),
    Method("lamb-large", "swap.algorithms.sgd:run_sgd", _section("lamb_large"), (), "sgd", "sgd",
           configure=_sgd_from("lamb_large")),
    Method("adamw-large", "swap.algorithms.sgd:run_sgd", _section("adamw_large"), (), "sgd", "sgd",
           configure=_sgd_from("adamw_large")),
    Method("ema-large", "swap.algorithms.sgd:run_sgd", _section("sgd_large"), (), "sgd", "sgd",
           configure=_sgd_from("sgd_large", average="ema")),
    Method("lawa-large", "swap.algorithms.sgd:run_sgd", _section("sgd_large"), (), "sgd", "sgd",
           configure=_sgd_from("sgd_large", average="lawa")),
    Method("swap-extrap", "swap.algorithms.swap:run_swap", _phase1, SWAP_SIZED, "swap", "swap",
           configure=_extrapolated_phase1),
    Method("swap-lars", "swap.algorithms.swap:run_swap", _phase1, SWAP_SIZED, "swap", "swap",
           configure=_large_batch_phase1("lars_large")),
    Method("swap-lamb", "swap.algorithms.swap:run_swap", _phase1, SWAP_SIZED, "swap", "swap",
           configure=_large_batch_phase1("lamb_large")),
    Method("swap-cycles", "swap.algorithms.swap:run_swap", _phase1, SWAP_SIZED, "swap", "swap", configure=_cycles),
    Method("swap-ema", "swap.algorithms.swap:run_swap", _phase1, SWAP_SIZED, "swap", "swap", configure=_along("ema")),
    Method("swap-lawa", "swap.algorithms.swap:run_swap", _phase1, SWAP_SIZED, "swap", "swap", configure=_along("lawa")),
    Method("local-sgd", "swap.algorithms.swap:run_swap", _phase1, SWAP_SIZED, "swap", "swap", configure=_local_sgd),
    Method("diloco", "swap.algorithms.swap:run_swap", _phase1, SWAP_SIZED, "swap", "swap", configure=_diloco),
    Method("abs", _ABS, _abs, (), "abs", "abs", {"adversarial": False}, driver=_DRIVER),
    Method("absa", _ABS, _abs, (), "absa", "abs", {"adversarial": True}, driver=_DRIVER),
)}


# what `swap train --method` runs: every method but those that start from another method's run (SWA)
TRAINED = tuple(name for name, m in METHODS.items() if not m.start)
# what `swap compare --methods` takes: every method but plain `sgd` (its sgd_small/sgd_large forms instead)
COMPARED = tuple(name for name in METHODS if name != "sgd")


def get_method(name: str) -> Method:
    """The registry entry of ``name``.

    Raises:
        SwapError: unknown method (the message lists the known ones).
    """
    if name not in METHODS:
        raise SwapError(f"unknown method {name!r} (known: {', '.join(METHODS)})")
    return METHODS[name]


def _rank(name: str, spec: RunSpec) -> Any:
    """Body of one rank (picklable by name for the launcher): the method's function on ``spec``."""
    method = METHODS[name]
    return method.function()(spec, **method.options)


def launch(name: str, spec: RunSpec, procs: int) -> Any:
    """Train method ``name`` as ``spec`` says, in ``procs`` local processes (through the method's
    driver if it has one); return rank 0's summary, or ``{"interrupted": ...}`` after a stop signal.
    A failed rank's traceback goes to ``RUN/logs``.

    Raises:
        SwapError: a rank failed (one line; see :func:`swap.distributed.launch`).
    """
    from . import distributed
    from .rundir import RunDir

    method = get_method(name)
    if method.driver is not None:
        return method.function("driver")(spec, procs, **method.options)
    return distributed.launch(_rank, procs, name, spec, log_dir=RunDir(spec.run_path).logs_dir)


def final_model(name: str, run_path: str | Path, model_fn: Callable[[], Any]):
    """The trained model of method ``name``'s run in ``run_path``: ``model_fn()`` with the final
    checkpoint's weights (the averaged model for SWAP; the average along the trajectory,
    ``NAME_average``, for a run that kept one), on the CPU. A model that has
    ``save_pretrained`` (a Hugging Face ``transformers`` model) is also written to
    ``RUN/pretrained/`` in its own format, for ``from_pretrained``.

    Raises:
        SwapError: the checkpoint is missing or does not fit the model.
    """
    from .checkpoint import load_checkpoint
    from .rundir import RunDir

    from .checkpoint import checkpoint_exists

    model = model_fn()
    run = RunDir(run_path)
    final = get_method(name).checkpoint
    along = run.checkpoint(f"{final}_average")
    load_checkpoint(along if checkpoint_exists(along) else run.checkpoint(final), model)
    if callable(getattr(model, "save_pretrained", None)):
        _save_pretrained(model, run.path / "pretrained")
    return model


def _save_pretrained(model, path: Path) -> None:
    """``model.save_pretrained(path)`` without transformers' progress bar on the terminal."""
    try:
        from transformers.utils import logging as hf_logging
        bar = hf_logging.is_progress_bar_enabled()
    except ImportError:                          # a save_pretrained of some other library
        hf_logging, bar = None, False
    if bar:
        hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(path)
    finally:
        if bar:
            hf_logging.enable_progress_bar()


def prepare(run_path: str | Path, cfg: Config, overwrite: bool = False, resume: bool = False,
            auto_resume: bool = False):
    """The run directory, prepared (:meth:`swap.rundir.RunDir.prepare` with the flags), and the
    run's logged runs started (:func:`swap.tracking.prepare`, for ``logging.loggers``).

    Raises:
        SwapError: as :meth:`swap.rundir.RunDir.prepare`.
    """
    from . import tracking
    from .rundir import RunDir

    run = RunDir.prepare(run_path, cfg, overwrite, resume, auto_resume)
    tracking.prepare(run.path, cfg)
    return run


def run_ranked(name: str, spec: RunSpec, overwrite: bool = False, resume: bool = False,
               auto_resume: bool = False) -> Any:
    """This process is one rank under ``torchrun`` (the CLI's ``swap train``, or a library call in a
    script torchrun started): the first process of each machine prepares that machine's run
    directory (:meth:`swap.rundir.RunDir.prepare` with the flags) and holds its lock while it trains;
    then :func:`run_rank`. Returns rank 0's summary (None on the other ranks)."""
    import os

    if get_method(name).summary == "abs" and spec.cfg.abs.launcher == "ray":
        raise SwapError("abs.launcher=ray starts its own ranks as Ray actors; run it without torchrun")
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        with prepare(spec.run_path, spec.cfg, overwrite, resume, auto_resume).locked():
            return run_rank(name, spec)
    return run_rank(name, spec)


def run_rank(name: str, spec: RunSpec) -> Any:
    """This process is one rank (under ``torchrun``): train method ``name`` here."""
    from . import distributed
    from .rundir import RunDir

    return distributed.run_rank(_rank, name, spec, log_dir=RunDir(spec.run_path).logs_dir)


__all__ = ["RunSpec", "DILOCO_INNER", "Method", "SWAP_SIZED", "METHODS", "TRAINED", "COMPARED", "get_method",
           "launch", "final_model", "prepare", "run_ranked", "run_rank"]
