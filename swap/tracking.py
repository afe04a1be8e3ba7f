"""Where a run's records go besides ``metrics.jsonl``: TensorBoard, MLflow and your own callbacks.

Every record of a run passes through :meth:`swap.rundir.RunDir.log` in the process that writes it
(rank 0 for phase 1, phase 3 and the baselines; each phase-2 worker's own process, or its group's
first rank), which hands it to this process's :class:`Tracking`. So under ``torchrun`` and with
several processes each stream is written by one process only.

One tag scheme for every logger (``swap train --logger tensorboard --logger mlflow``,
``logging.loggers``)::

    phase1/train_loss   phase1/test_acc   sgd/test_loss            a phase's epoch records
    phase2/worker3/test_acc                                        phase-2 worker 3
    average/test_acc                                               the averaged model (phase 3, and
                                                                   phase2.track_average's per epoch)
    phase1/step/train_loss  phase2/worker3/step/lr                 records between epochs (log_every):
                                                                   train_loss, lr, grad_norm, samples_per_s

The step axis is updates on the critical path (the measure of SWAP's speed-up, Gupta et al. 2020,
Sec. 4): phase 1's updates (and the automatic switch's trial updates), then phase 2 continues that
axis, every worker on the same one (workers run in parallel), and the averaged model sits at the
end of the path.

TensorBoard (``torch.utils.tensorboard``): one event-file directory per stream under
``RUN/tensorboard/`` (``phase1``, ``worker3``, ``average``), shown by TensorBoard as runs of one
experiment. MLflow: one run, in ``MLFLOW_TRACKING_URI`` when it is set, else in the run
directory's own SQLite store ``RUN/mlflow.db`` (the local store MLflow opens without settings:
``mlflow ui --backend-store-uri sqlite:///RUN/mlflow.db``) with its artifacts in
``RUN/mlflow-artifacts``; its id is kept in
``RUN/mlflow_run_id``. A resumed run continues both:
TensorBoard purges the steps the resume writes again (``purge_step``), and MLflow skips steps it
already holds, so no step is recorded twice.

A logger that fails mid-run (disk full, a tracking server that stops answering) gives one warning
and is dropped; training goes on and ``metrics.jsonl`` stays complete. A callback's failure is the
user's error, as any of their code: it propagates.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import math
import os
import re
import sys
from pathlib import Path
from typing import Callable

from .errors import SwapError
from .errors import printable
from .imports import EXTRAS

# logger -> the package it needs (its extra: swap.imports.EXTRAS)
LOGGERS = {"tensorboard": "tensorboard", "mlflow": "mlflow"}
# record fields that are not values to plot
NOT_VALUES = {"phase", "worker", "epoch", "update", "step", "model", "kind", "optimizer", "stopped",
              "phase_wall_s", "eval_s", "cost_s"}


def check_loggers(names) -> list[str]:
    """The loggers ``names`` (``tensorboard``, ``mlflow``) after checking, before any work, that
    each is known and its package installed.

    Raises:
        SwapError: an unknown logger, or one whose package is missing (one line naming the extra).
    """
    names = list(names or [])
    for name in names:
        if name not in LOGGERS:
            raise SwapError(f"unknown logger {name!r} (known: {', '.join(LOGGERS)})")
        module = LOGGERS[name]
        try:
            importlib.import_module(module)
        except ImportError:
            raise SwapError(f"logger {name} needs the {module} package: pip install 'swap[{EXTRAS[module]}]'") from None
        if name == "mlflow" and not os.environ.get("MLFLOW_TRACKING_URI"):
            for package in ("sqlalchemy", "alembic"):        # the run directory's SQLite store
                if importlib.util.find_spec(package) is None:
                    raise SwapError(f"logger mlflow keeps its runs in RUN/mlflow.db, which needs the {package} "
                                    f"package: pip install 'swap[mlflow]'")
    return names


def stream_of(record: dict) -> tuple[str, str]:
    """(stream, tag prefix) of a record: ``("worker3", "phase2/worker3/")``, ``("phase1", "phase1/")``,
    ``("average", "average/")`` for the averaged model's records (``average``, ``phase3``)."""
    phase, worker = record.get("phase", "run"), record.get("worker")
    if phase == "phase2" and worker is not None:
        return f"worker{worker}", f"phase2/worker{worker}/"
    if phase in ("average", "phase3"):
        return "average", "average/"
    return phase, f"{phase}/"


def values_of(record: dict) -> dict[str, float]:
    """The record's finite numeric values by tag (module docstring), without its identifiers."""
    _, prefix = stream_of(record)
    if record.get("kind") == "step":
        prefix += "step/"
    return {prefix + k: float(v) for k, v in record.items()
            if k not in NOT_VALUES and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def flat(d: dict, prefix: str = "") -> dict:
    """A nested dict as ``{"a.b.c": leaf}``."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class TensorBoardLogger:
    """Event files under ``RUN/tensorboard/STREAM`` (:mod:`torch.utils.tensorboard`), one writer per
    stream of this process, made at the stream's first record; on a resumed run with
    ``purge_step`` = that record's step, so the steps written again replace the old ones."""

    name = "tensorboard"

    def __init__(self, run_path: Path, resumed: bool):
        from torch.utils.tensorboard import SummaryWriter

        self.root, self.resumed, self.writers, self.cls = Path(run_path) / "tensorboard", resumed, {}, SummaryWriter

    def _writer(self, stream: str, step: int):
        if stream not in self.writers:
            if self.resumed:
                self._after_earlier_files(self.root / stream)
            self.writers[stream] = self.cls(str(self.root / stream), purge_step=step if self.resumed else None,
                                            flush_secs=30)
        return self.writers[stream]

    @staticmethod
    def _after_earlier_files(folder: Path) -> None:
        """TensorBoard reads a run's event files in name order, whose first field is the second they
        were created in, then host and pid: a resumed stream's file must be named after the ones
        before it, so wait (under a second) until the clock has passed their second."""
        import time

        seconds = [int(f.name.split(".")[3]) for f in folder.glob("events.out.tfevents.*")
                   if f.name.split(".")[3].isdigit()] if folder.is_dir() else []
        while seconds and time.time() < max(seconds) + 1:
            time.sleep(0.05)

    def log(self, stream: str, values: dict[str, float], step: int) -> None:
        writer = self._writer(stream, step)
        for tag, value in values.items():
            writer.add_scalar(tag, value, step)

    def params(self, config: dict) -> None:
        """The config as text, and SWAP's own views as TensorBoard's custom-scalar charts: the W
        workers' curves in one chart per metric, beside the averaged model's."""
        import yaml
        writer = self._writer("run", 0)
        writer.add_text("config", "```\n" + yaml.safe_dump(config, sort_keys=False) + "\n```", 0)
        writer.add_custom_scalars({"SWAP phase 2: the workers and their average": {
            metric: ["Multiline", [rf"phase2/worker\d+/{metric}", f"average/{metric}"]]
            for metric in ("test_acc", "test_loss", "train_loss", "train_acc", "lr")}})

    def finish(self, summary: dict, step: int, files: list[Path], figures: list) -> None:
        writer = self._writer("run", 0)
        for key, value in flat(summary).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                writer.add_scalar(f"summary/{key}", float(value), step)
        for name, fig in figures:
            writer.add_figure(f"figures/{name}", fig, step)
        self.flush()

    def flush(self) -> None:
        for w in self.writers.values():
            w.flush()

    def close(self) -> None:
        for w in self.writers.values():
            w.close()
        self.writers = {}


class MLflowLogger:
    """One MLflow run for the whole run directory, shared by its processes (each logs its own
    streams' keys). Rank 0 creates it (:meth:`create`) and keeps its id in ``RUN/mlflow_run_id``;
    every other process (and a resumed run) logs to that id. On a resumed run each key's history
    is read once and steps it already holds are skipped."""

    name = "mlflow"

    def __init__(self, run_path: Path, resumed: bool):
        self.run_id = (Path(run_path) / "mlflow_run_id").read_text().strip()
        if not re.fullmatch(r"[0-9a-f]{32}", self.run_id):          # MLflow's run ids: 32 hex digits
            raise SwapError(f"{Path(run_path) / 'mlflow_run_id'}: {printable(self.run_id)[:80]!r} is not an MLflow "
                            f"run id; the file was altered")
        self.client = self.connect(run_path)
        self.resumed, self.last = resumed, {}

    @staticmethod
    def uri(run_path: Path) -> str:
        """``MLFLOW_TRACKING_URI``, else the run directory's own SQLite store ``RUN/mlflow.db``
        (an absolute ``sqlite:////...`` URI)."""
        if os.environ.get("MLFLOW_TRACKING_URI"):
            return os.environ["MLFLOW_TRACKING_URI"]
        return "sqlite:///" + str(Path(run_path).resolve() / "mlflow.db")

    @classmethod
    def connect(cls, run_path: Path):
        """An ``MlflowClient`` of the run's store, MLflow's own INFO lines (the database's creation
        and migrations) kept off the terminal."""
        from mlflow.tracking import MlflowClient

        for name in ("mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)
        return MlflowClient(tracking_uri=cls.uri(run_path))

    @classmethod
    def create(cls, run_path: Path, name: str) -> bool:
        """Start the run's MLflow run (experiment ``swap``) unless ``RUN/mlflow_run_id`` names one;
        whether it started one."""
        path = Path(run_path) / "mlflow_run_id"
        if path.is_file():
            return False
        client = cls.connect(run_path)
        experiment = client.get_experiment_by_name("swap")
        own = not os.environ.get("MLFLOW_TRACKING_URI")         # the run's own store keeps artifacts beside it
        where = (Path(run_path).resolve() / "mlflow-artifacts").as_uri() if own else None
        eid = experiment.experiment_id if experiment is not None else client.create_experiment("swap", where)
        path.write_text(client.create_run(eid, run_name=name).info.run_id)
        return True

    def _new(self, key: str, step: int) -> bool:
        if key not in self.last:
            history = self.client.get_metric_history(self.run_id, key) if self.resumed else []
            self.last[key] = max((m.step for m in history), default=-1)
        if step <= self.last[key]:
            return False
        self.last[key] = step
        return True

    def log(self, stream: str, values: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in values.items() if self._new(k, step)]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def params(self, config: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in flat(config).items()]
        for i in range(0, len(items), 100):          # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def finish(self, summary: dict, step: int, files: list[Path], figures: list) -> None:
        self.log("run", {f"summary/{k}": float(v) for k, v in flat(summary).items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}, step)
        for f in files:
            self.client.log_artifact(self.run_id, str(f))
        for name, fig in figures:
            self.client.log_figure(self.run_id, fig, f"figures/{name}.png")
        self.client.set_terminated(self.run_id)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


BACKENDS = {"tensorboard": TensorBoardLogger, "mlflow": MLflowLogger}


class Tracking:
    """This process's destinations for the run's records: the configured loggers and the library's
    callbacks (objects with any of ``on_record(record)``, ``on_phase_end(phase, result)``,
    ``on_run_end(summary)``). Build with :func:`start`."""

    def __init__(self, run_path: Path, loggers: list, callbacks: list):
        self.run_path, self.loggers, self.callbacks = Path(run_path), loggers, list(callbacks)
        self.base: int | None = None                 # phase 1's critical-path updates, read once
        self.last_step = 0

    # ---------------------------------------------------------------- the step axis
    def phase2_base(self) -> int:
        """Phase 1's updates on the critical path (its own and the switch's trials), from its final
        checkpoint's metadata; 0 before phase 1 has ended or without a phase 1."""
        if self.base is None:
            meta = self.run_path / "checkpoints" / "phase1.json"
            try:
                m = json.loads(meta.read_text())
                self.base = int(m.get("updates", 0)) + int(m.get("switch", {}).get("trial_updates", 0))
            except (OSError, ValueError):
                return 0
        return self.base

    def step_of(self, record: dict) -> int:
        """The record's position on the critical path, in updates (module docstring)."""
        if "step" in record:
            return int(record["step"])
        if "update" not in record:
            return self.last_step                     # an event between updates: where the run is
        base = self.phase2_base() if str(record.get("phase")).startswith(("phase2", "average", "phase3")) else 0
        return base + int(record["update"])

    # ---------------------------------------------------------------- what the run calls
    def _each(self, what: str, call) -> None:
        for logger in list(self.loggers):
            try:
                call(logger)
            except Exception as exc:                  # disk full, a tracking server gone: never cost training
                self.loggers.remove(logger)
                print(f"swap: warning: logger {logger.name} stopped ({what}: {type(exc).__name__}: "
                      f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}); training goes on, "
                      f"metrics.jsonl stays complete", file=sys.stderr, flush=True)

    def record(self, record: dict) -> None:
        """A record that was just appended to metrics.jsonl."""
        step = self.step_of(record)
        self.last_step = max(self.last_step, step)
        if self.loggers:
            stream, _ = stream_of(record)
            values = values_of(record)
            if values:
                self._each("record", lambda lg: lg.log(stream, values, step))
            if record.get("kind") != "step":          # an epoch's record: on disk before its checkpoint, so
                self._each("flush", lambda lg: lg.flush())   # a killed run loses none that a resume keeps
        for cb in self.callbacks:
            if hasattr(cb, "on_record"):
                cb.on_record(dict(record, step=step))

    def params(self, config: dict) -> None:
        """The resolved config, as hyperparameters (TensorBoard text) and params (MLflow)."""
        self._each("config", lambda lg: lg.params(config))

    def phase_end(self, phase: str, result: dict) -> None:
        for cb in self.callbacks:
            if hasattr(cb, "on_phase_end"):
                cb.on_phase_end(phase, result)
        self._each("flush", lambda lg: lg.flush())

    def run_end(self, summary: dict, records: Callable[[], list[dict]]) -> None:
        """At the end of the run (rank 0): the summary's figures as final metrics; ``summary.json``,
        ``config.yaml`` and the run's figures (curves drawn from ``records()``, metrics.jsonl's,
        read only when there is a logger to show them) as artifacts (MLflow) and images (TensorBoard)."""
        for cb in self.callbacks:
            if hasattr(cb, "on_run_end"):
                cb.on_run_end(summary)
        if not self.loggers:
            return
        step = int(summary.get("updates", {}).get("critical_path", self.last_step)) \
            if isinstance(summary.get("updates"), dict) else self.last_step
        files = [p for p in (self.run_path / "summary.json", self.run_path / "config.yaml") if p.is_file()]
        figures = self._figures(records())
        self._each("end", lambda lg: lg.finish(summary, step, files, figures))
        if figures:
            import matplotlib.pyplot as plt
            for _, fig in figures:
                plt.close(fig)
        self.close()

    @staticmethod
    def _figures(records: list[dict]) -> list:
        """The run's curves (``swap plot``'s figure) as a matplotlib figure, for the loggers."""
        from .analysis.plots import run_figure

        return [("curves", run_figure(records))] if records else []

    def close(self) -> None:
        self._each("close", lambda lg: lg.close())


def prepare(run_path, cfg) -> None:
    """At a run's start, in the process that prepares its directory (before any rank starts): start
    the MLflow run (its id in ``RUN/mlflow_run_id``; kept when resuming) and record the resolved
    config as hyperparameters (TensorBoard text, MLflow params; once, when the run is new to the logger).
    A logger that fails here is dropped with one warning, as later."""
    names = list(cfg.logging.loggers)
    if not names:
        return
    new = [n for n in names if n == "tensorboard" and not (Path(run_path) / "tensorboard" / "run").exists()]
    if "mlflow" in names:
        try:
            if MLflowLogger.create(Path(run_path), cfg.name):
                new.append("mlflow")
        except Exception as exc:
            print(f"swap: warning: logger mlflow could not start ({type(exc).__name__}: {exc}); training goes on",
                  file=sys.stderr, flush=True)
    t = start(run_path, new)                          # only where the run is new to the logger
    if t is not None:
        t.params(cfg.to_dict())
        t.close()


def start(run_path, loggers=(), callbacks=(), resumed: bool = False) -> Tracking | None:
    """This process's tracking of the run in ``run_path`` (None when there is nothing to track):
    the loggers ``loggers`` and the library's ``callbacks``; the :class:`swap.context.Context` of
    the run owns it. Loggers that cannot start are dropped with one warning
    (``Tracking._each``). ``resumed``: the loggers continue the run's earlier records."""
    if not loggers and not callbacks:
        return None
    built = []
    for name in loggers:
        try:
            built.append(BACKENDS[name](Path(run_path), resumed))
        except Exception as exc:
            print(f"swap: warning: logger {name} could not start ({type(exc).__name__}: {exc}); training goes on",
                  file=sys.stderr, flush=True)
    return Tracking(Path(run_path), built, callbacks)


__all__ = ["LOGGERS", "NOT_VALUES", "check_loggers", "stream_of", "values_of", "flat", "TensorBoardLogger",
           "MLflowLogger", "BACKENDS", "Tracking", "prepare", "start"]
