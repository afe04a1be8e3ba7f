"""The run directory: resolved config, metrics.jsonl, summary.json, checkpoints/.

Layout::

    RUN/config.yaml          the resolved config (every knob, after presets and --set)
    RUN/metrics.jsonl        one JSON object per epoch per worker (and per phase event)
    RUN/summary.json         the final table: accuracies, wall time per phase, machine
    RUN/checkpoints/NAME.safetensors + NAME.json
    RUN/logs/rankR.log       full tracebacks of failures (the terminal gets one line naming the file)

Nothing already written is overwritten unless the user asks (``overwrite``); ``resume``
continues in place.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from pathlib import Path

import yaml

from .checkpoint import atomic_write_bytes, recover
from .config import Config, SwapError, config_from_dict
from .errors import printable


def _inside(name: str, doc: str) -> property:
    """A path of the run directory: ``RUN/name``."""
    return property(lambda self: self.path / name, doc=doc)


class RunDir:
    """Paths and writers of one run directory (exists once :meth:`prepare` has run)."""

    config_path = _inside("config.yaml", "``config.yaml``: the resolved config.")
    metrics_path = _inside("metrics.jsonl", "``metrics.jsonl``: one JSON record per line.")
    summary_path = _inside("summary.json", "``summary.json``: the run's final table.")
    lock_path = _inside("run.lock", "``run.lock``: the pid of the process training the run.")
    logs_dir = _inside("logs", "``logs/``: full tracebacks of failed ranks (``rankR.log``) and phase-2 workers "
                               "(``workerN.log``).")

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def checkpoint(self, name: str) -> Path:
        """Base path (no suffix) of checkpoint ``name``, e.g. ``phase1``, ``worker0``, ``swap``: a
        finished phase, worker or method (weights and metadata, no optimizer state)."""
        return self.path / "checkpoints" / name

    def last_checkpoint(self, name: str) -> Path:
        """Base path of the resumable checkpoint of ``name`` (``NAME_last``: weights, optimizer state,
        epoch and, after a stop signal, the position inside the epoch); see :mod:`swap.resumable`."""
        return self.checkpoint(f"{name}_last")

    @staticmethod
    def worker(w: int) -> str:
        """Checkpoint name of phase-2 worker ``w`` (``worker3``)."""
        return f"worker{w}"

    def worker_error(self, w: int) -> Path:
        """``checkpoints/workerW.error``: one line saying why worker ``w`` failed, kept for resumes."""
        return self.checkpoint(self.worker(w)).with_suffix(".error")

    def track_checkpoint(self, name: str, epoch: int) -> Path:
        """The weights of ``name`` (e.g. ``worker3``) at the end of epoch ``epoch`` (1-based;
        ``phase2.track_average``: ``track/worker3_epoch2``)."""
        return self.checkpoint(f"track/{name}_epoch{epoch}")

    def cycle_checkpoint(self, name: str, cycle: int) -> Path:
        """The sample of ``name`` (e.g. ``worker3``) at the end of its cycle ``cycle`` (1-based, every
        cycle but the last, whose sample is ``NAME``; ``phase2.cycles``: ``worker3_cycle1``)."""
        return self.checkpoint(f"{name}_cycle{cycle}")

    def iterate_checkpoint(self, name: str, step: int) -> Path:
        """The weights of ``name`` after update ``step`` (``phase2.save_every``, ``swap cosine``:
        ``iterates/worker3_step40``)."""
        return self.checkpoint(f"iterates/{name}_step{step}")

    @classmethod
    def prepare(cls, path: str | Path, cfg: Config, overwrite: bool = False, resume: bool = False,
                auto_resume: bool = False) -> "RunDir":
        """Create the run directory and save the resolved config, before any training (the run's
        logged runs start in :func:`swap.methods.prepare`).

        ``auto_resume`` (``--auto-resume``, for restarts under ``torchrun --max-restarts`` or a
        scheduler that requeues): continue when the directory holds a run of the same config
        (as ``resume``), start when it holds no run (no ``config.yaml``) and is empty or absent.
        When continuing, checkpoint writes that a killed run left half done are finished or
        discarded first (:func:`swap.checkpoint.recover`).

        Raises:
            SwapError: the directory exists and holds files but neither ``overwrite`` nor
                ``resume`` is set; ``resume`` on a directory without a config, or whose saved
                config differs from ``cfg``; more than one of the flags.
        """
        run = cls(path)
        if overwrite + resume + auto_resume > 1:
            raise SwapError("--overwrite, --resume and --auto-resume exclude each other")
        if auto_resume:
            resume = run.config_path.is_file()
        run.check_lock()
        exists = run.path.exists() and any(run.path.iterdir())
        if resume:
            if not run.config_path.is_file():
                raise SwapError(f"cannot resume: {run.config_path} not found (start the run without --resume)")
            run.check_links()
            saved = run.load_config()
            if saved.hash() != cfg.hash():
                diff = _first_difference(saved.to_dict(), cfg.to_dict())
                raise SwapError(f"cannot resume {run.path}: config differs from the saved one ({diff}); "
                                f"resume with the same settings or use a new --out")
            if saved.to_dict() != cfg.to_dict():       # only keys of config.NOT_HASHED changed
                atomic_write_bytes(run.config_path, yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode())
            if (run.path / "checkpoints").is_dir():     # writes that a killed run left half done
                rolled = recover(run.path / "checkpoints")
                if rolled:
                    print(f"swap: finished the interrupted write of checkpoint(s) {', '.join(rolled)}", file=sys.stderr)
            return run
        if exists and not overwrite:
            raise SwapError(f"run directory {run.path} already exists; pass --overwrite to replace it, "
                            f"--resume to continue it, or choose another --out")
        if exists:
            shutil.rmtree(run.path)
        (run.path / "checkpoints").mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(run.config_path, yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode())
        return run

    def check_links(self) -> None:
        """Refuse a run directory that holds a symbolic link to a place outside it. A run writes,
        renames and deletes only inside its run directory; a link in one copied from elsewhere
        (``checkpoints/`` or ``metrics.jsonl`` pointing at another folder or file) would take its
        resume's writes there. Links that stay inside are followed as usual.

        Raises:
            SwapError: the first link whose target lies outside, and where it points.
        """
        root = self.path.resolve()
        for folder, dirs, files in os.walk(self.path):          # does not descend into linked folders
            for name in sorted(dirs + files):
                link = Path(folder) / name
                target = link.resolve() if link.is_symlink() else None
                if target is not None and not target.is_relative_to(root):
                    raise SwapError(f"cannot resume {self.path}: {printable(str(link))} links to "
                                    f"{printable(str(target))}, outside the run directory; a run writes only "
                                    f"inside its own: replace the link by what it points to")

    def check_lock(self) -> None:
        """Refuse a run directory that a live process owns; report and clear a stale lock.

        Raises:
            SwapError: ``run.lock`` names a process that is still running.
        """
        try:
            pid = int(self.lock_path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return
        if pid == os.getpid():
            return
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            print(f"swap: {self.lock_path} is stale (pid {pid} is not running); taking the run over", file=sys.stderr)
            self.lock_path.unlink(missing_ok=True)
            return
        except PermissionError:
            pass
        raise SwapError(f"run directory {self.path} is in use by process {pid} ({self.lock_path}); "
                        f"wait for it or stop it, or choose another --out")

    @contextlib.contextmanager
    def locked(self):
        """Hold ``run.lock`` (this pid) while the block runs: one ``swap train`` per run directory.

        Raises:
            SwapError: another live process took the lock first.
        """
        self.check_lock()
        try:
            fd = os.open(self.lock_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            self.check_lock()
            fd = os.open(self.lock_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.close(fd)
        try:
            yield self
        finally:
            self.lock_path.unlink(missing_ok=True)

    def load_config(self) -> Config:
        """The config saved with this run.

        Raises:
            SwapError: missing or invalid config.yaml.
        """
        try:
            return config_from_dict(yaml.safe_load(self.config_path.read_text()))
        except (OSError, yaml.YAMLError) as exc:
            raise SwapError(f"cannot read {self.config_path}: {exc}") from None

    def log(self, record: dict) -> None:
        """Append one JSON line to metrics.jsonl. Lines under 4 KiB written with O_APPEND do not
        interleave, so several processes may log to one file.
        (:meth:`swap.context.Context.log` also hands it to the run's tracking.)"""
        line = (json.dumps(record) + "\n").encode()
        fd = os.open(self.metrics_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def rewrite_metrics(self, keep) -> None:
        """Keep only the records (of every kind) for which ``keep(record)`` is true (atomic rewrite)."""
        lines = [json.dumps(r) + "\n" for r in self.read_metrics(steps=True) if keep(r)]
        atomic_write_bytes(self.metrics_path, "".join(lines).encode())

    def read_metrics(self, steps: bool = False) -> list[dict]:
        """The records of metrics.jsonl: per epoch and per event; with ``steps`` also the records
        between epochs (``kind: step``, ``logging.log_every``)."""
        if not self.metrics_path.is_file():
            return []
        records = []
        for number, line in enumerate(self.metrics_path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):
                record = None
            if not isinstance(record, dict):
                raise SwapError(f"{self.metrics_path}: line {number} is not a record that swap writes (one JSON "
                                f"object per line); the file was altered")
            records.append(record)
        return records if steps else [r for r in records if r.get("kind") != "step"]

    @property
    def bad_images_log(self) -> Path:
        """``logs/bad_images.txt``: one line per unreadable image skipped (``data.bad_images: skip``)."""
        return self.logs_dir / "bad_images.txt"

    def write_summary(self, summary: dict) -> None:
        """Write ``summary.json`` (with ``skipped_images``, the count of distinct unreadable images
        skipped, when there were any)."""
        if self.bad_images_log.is_file():
            summary = {**summary, "skipped_images": len(set(self.bad_images_log.read_text().splitlines()))}
        atomic_write_bytes(self.summary_path, json.dumps(summary, indent=1).encode())

    def read_summary(self) -> dict:
        return json.loads(self.summary_path.read_text())


def _first_difference(a: dict, b: dict, prefix: str = "") -> str:
    for k in a:
        if isinstance(a[k], dict) and isinstance(b.get(k), dict):
            found = _first_difference(a[k], b[k], f"{prefix}{k}.")
            if found:
                return found
        elif a[k] != b.get(k):
            return f"{prefix}{k}: saved {a[k]!r}, now {b.get(k)!r}"
    return ""


__all__ = ["RunDir"]
