"""Issue #27: TensorBoard and MLflow, records every N updates, and the library's callbacks
(:mod:`swap.tracking`). The CLI with both loggers, killed in phase 2 and resumed, is in
tests/test_output_contract.py (its logged runs equal the uninterrupted run's, every step once)."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

import swap
from swap import tracking
from swap.rundir import RunDir
from swap.config import SwapError


def logged_mlflow(run: Path, uri: str | None = None) -> dict[str, list[tuple[int, float]]]:
    """{key: [(step, value), ...]} of the run's MLflow run, read as a user reads it: MLflow's own
    client on the run's store ``sqlite:///RUN/mlflow.db`` (or on ``uri``, e.g. an ``mlflow ui``
    server), with no MLflow environment variable set."""
    from mlflow.tracking import MlflowClient

    assert not [k for k in os.environ if k.startswith("MLFLOW_")]
    client = MlflowClient(tracking_uri=uri or "sqlite:///" + str(run.resolve() / "mlflow.db"))
    run_id = (run / "mlflow_run_id").read_text()
    experiment = client.get_experiment_by_name("swap")
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [run_id]   # one run
    return {k: [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, k), key=lambda m: m.step)]
            for k in client.get_run(run_id).data.metrics}


@contextlib.contextmanager
def mlflow_ui(store: str, cwd: Path):
    """``mlflow ui --backend-store-uri STORE`` as the README gives it, run from ``cwd`` on a free
    loopback port with no MLflow environment variable; yields the server's URL once it answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "ui", "--backend-store-uri", store,
                             "--host", "127.0.0.1", "--port", str(port)], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                assert proc.poll() is None, "mlflow ui exited"
                time.sleep(0.25)
        else:
            raise AssertionError("mlflow ui did not answer within 60 s")
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def logged_tensorboard(run: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of the run's TensorBoard event files, as TensorBoard reads them
    (a resumed stream's purged steps dropped)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for stream in sorted((run / "tensorboard").iterdir()):
        events = EventAccumulator(str(stream), size_guidance={"scalars": 0})
        events.Reload()
        for tag in events.Tags()["scalars"]:
            out[tag] = [(e.step, e.value) for e in events.Scalars(tag)]
    return out


class Recorder(swap.Callback):
    """A callback that keeps what it is given (a module-level class: it could be pickled): the run's
    hooks, and the loops' ``on_epoch_end`` (the same protocol as the train loop's callbacks)."""

    def __init__(self):
        self.records, self.phases, self.summary, self.epochs = [], [], None, []

    def on_epoch_end(self, record):
        self.epochs.append(record)

    def on_record(self, record):
        self.records.append(record)

    def on_phase_end(self, phase, result):
        self.phases.append((phase, result.get("worker"), result["updates"] if "updates" in result else None))

    def on_run_end(self, summary):
        self.summary = summary


def _quadrants(n, seed):
    from test_api import _quadrant_data
    return _quadrant_data(n, seed)


def _tiny():
    from torch import nn
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(32, 4))


CONFIG = {"workers": 2, "data": {"crop_padding": 0, "flip": False, "cutout": 0},
          "phase1": {"batch_size": 128, "max_epochs": 2, "warmup_epochs": 1},
          "phase2": {"batch_size": 32, "epochs": 1, "layout": "sequential"}, "phase3": {"bn_batch_size": 64},
          "logging": {"log_every": 4}}


def test_callbacks_get_every_record_on_the_critical_path_axis_and_each_phase_and_the_summary(tmp_path):
    rec = Recorder()
    _, summary = swap.train_swap(_tiny, _quadrants(512, 0), _quadrants(128, 1), CONFIG, out=tmp_path / "run",
                                 callbacks=[rec])
    written = RunDir(tmp_path / "run").read_metrics(steps=True)
    assert [{k: v for k, v in r.items() if k != "step"} for r in rec.records] == written     # each, as written
    steps = [r for r in written if r.get("kind") == "step"]
    assert steps and all(r["update"] % 4 == 0 and r["grad_norm"] >= 0 and r["train_loss"] >= 0 for r in steps)
    assert {r["phase"] for r in steps} == {"phase1", "phase2"}
    assert not any(r.get("kind") for r in RunDir(tmp_path / "run").read_metrics())   # epoch records only
    p1 = summary["updates"]["phase1"]                                  # 2 epochs of 512 // 128
    assert p1 == 8
    by = {(r["phase"], r.get("worker"), r.get("kind"), r.get("epoch")): r["step"] for r in rec.records}
    assert by[("phase1", None, None, 2)] == 8
    assert by[("phase2", 0, None, 1)] == by[("phase2", 1, None, 1)] == p1 + 512 // 32   # one axis, continued
    assert by[("phase3", None, None, None)] == summary["updates"]["critical_path"] == 8 + 16
    assert rec.phases == [("phase1", None, 8), ("phase2", 0, 16), ("phase2", 1, 16), ("phase3", None, None)]
    assert rec.summary == summary
    # the loops' hooks: every epoch of phase 1 and of each worker, the records the metrics hold
    epochs = [r for r in written if r["phase"] in ("phase1", "phase2") and not r.get("kind")]
    assert [(r["epoch"], r["train_loss"], r["test_acc"]) for r in rec.epochs] == \
        [(r["epoch"], r["train_loss"], r["test_acc"]) for r in epochs] and len(epochs) == 4
    # step records: the mean loss of the updates since the last one, equal to the epoch's where they tile it
    epoch2 = next(r for r in written if r["phase"] == "phase1" and r["epoch"] == 2 and not r.get("kind"))
    window = next(r for r in steps if r["phase"] == "phase1" and r["update"] == 8)
    assert window["train_loss"] == pytest.approx(epoch2["train_loss"], rel=1e-12)


def test_a_logger_that_fails_mid_run_warns_once_and_training_goes_on(tmp_path, capsys):
    class Broken:
        name = "tensorboard"

        def log(self, *a):
            raise OSError(28, "No space left on device")

        def flush(self):
            pass

        def close(self):
            pass

    rec = Recorder()
    t = tracking.Tracking(tmp_path, [Broken()], [rec])
    for epoch in (1, 2):
        t.record({"phase": "phase1", "worker": None, "epoch": epoch, "update": epoch, "train_loss": 1.0})
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("swap: warning: logger tensorboard stopped (record: OSError")
    assert "training goes on" in err[0] and t.loggers == [] and len(rec.records) == 2


def test_the_tag_scheme():
    assert tracking.values_of({"phase": "phase2", "worker": 3, "epoch": 1, "update": 16, "test_acc": 90.0,
                               "train_acc": None, "stopped": False, "optimizer": "sgd"}) == \
        {"phase2/worker3/test_acc": 90.0}
    assert tracking.values_of({"phase": "phase1", "worker": None, "kind": "step", "lr": 0.1}) == {"phase1/step/lr": 0.1}
    assert tracking.values_of({"phase": "phase3", "worker": None, "test_acc": 91.0}) == {"average/test_acc": 91.0}
    assert tracking.stream_of({"phase": "sgd", "worker": None}) == ("sgd", "sgd/")


def test_a_missing_logger_package_is_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    import importlib

    from swap.cli import main
    real = importlib.import_module
    monkeypatch.setattr(importlib, "import_module",
                        lambda name, *a: (_ for _ in ()).throw(ImportError(name)) if name == "mlflow" else real(name, *a))
    with pytest.raises(SwapError, match=r"^logger mlflow needs the mlflow package: pip install 'swap\[mlflow\]'$"):
        tracking.check_loggers(["tensorboard", "mlflow"])
    assert main(["train", "--config", "fashion_mnist_quick", "--logger", "mlflow", "--out", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err.strip() == "swap: error: logger mlflow needs the mlflow package: " \
                                              "pip install 'swap[mlflow]'"
    assert not (tmp_path / "r").exists()
    with pytest.raises(SwapError, match="unknown logger 'wandb'"):
        tracking.check_loggers(["wandb"])


def test_mlflow_logs_to_the_tracking_uri_when_it_is_set(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    store = "sqlite:///" + str(tmp_path / "server.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    cfg = swap.load_config(None, {"name": "uri", "logging": {"loggers": ["mlflow"]}})
    (tmp_path / "run").mkdir()
    tracking.prepare(tmp_path / "run", cfg)
    t = tracking.start(tmp_path / "run", ["mlflow"])
    t.record({"phase": "phase1", "worker": None, "epoch": 1, "update": 5, "train_loss": 0.5})
    t.close()
    run_id = (tmp_path / "run" / "mlflow_run_id").read_text()
    client = MlflowClient(tracking_uri=store)
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "phase1/train_loss")] == [(5, 0.5)]
    assert client.get_run(run_id).data.params["phase1.batch_size"] == str(cfg.phase1.batch_size)
    assert not (tmp_path / "run" / "mlflow.db").exists()
