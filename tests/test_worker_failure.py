"""A phase-2 worker process killed on purpose (SIGKILL, as the OOM killer would): the other workers
finish, the run names the failed worker and why, ``--resume`` trains only that worker and ends
with the uninterrupted run's weights; ``phase3.allow_missing_workers=true`` averages the survivors."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from swap.cli import main

from conftest import live_processes

SETTINGS = ["--config", "fashion_mnist_quick", "--workers", "3", "--procs", "1",
            "--set", "data.train_subset=1024", "--set", "data.test_subset=300",
            "--set", "phase1.batch_size=256", "--set", "phase1.max_epochs=2", "--set", "phase1.warmup_epochs=1",
            "--set", "phase1.stop_acc=99", "--set", "phase2.epochs=3", "--set", "phase2.batch_size=128"]


def _children(pid: int) -> list[int]:
    """Live worker processes of ``pid``: children of its fork server (not the server itself, nor the
    resource tracker)."""
    live = live_processes()
    servers = {p["pid"] for p in live if p["ppid"] == pid and b"forkserver" in p["cmdline"]}
    return [p["pid"] for p in live if p["ppid"] in servers]


def _files(run: Path, w: int) -> dict:
    d = run / "checkpoints"
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in d.glob(f"worker{w}.*")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, real_fashion):
    """(uninterrupted reference, run whose worker 1 was killed) directories."""
    base = tmp_path_factory.mktemp("failure")
    reference, failed = base / "ref", base / "failed"
    assert main(["train", *SETTINGS, "--data-dir", str(real_fashion), "--out", str(reference)]) == 0
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "swap.cli", "train", *SETTINGS, "--data-dir", str(real_fashion),
                             "--out", str(failed)], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (failed / "checkpoints" / "worker1_last.json").exists():    # worker 1 is in its epoch 2
        assert proc.poll() is None and time.time() < deadline, "the run ended before worker 1's epoch 2"
        time.sleep(0.02)
    victims = _children(proc.pid)
    assert len(victims) == 1, victims
    os.kill(victims[0], signal.SIGKILL)
    _, stderr = proc.communicate(timeout=120)
    return reference, failed, proc.returncode, stderr


def test_survivors_finish_and_the_failure_is_reported(runs):
    _, failed, returncode, stderr = runs
    assert returncode == 2
    last = [line for line in stderr.splitlines() if line.startswith("swap: error:")][-1]
    assert "worker 1" in last and "SIGKILL" in last and "--resume" in last and "allow_missing_workers" in last, last
    noise = [line for line in stderr.splitlines() if not line.startswith(("swap: ", "["))]
    assert noise == [], noise          # our lines and progress lines only: no log line of torch's
    ckpts = failed / "checkpoints"
    assert (ckpts / "worker0.json").exists() and (ckpts / "worker2.json").exists()     # the others finished
    assert not (ckpts / "worker1.json").exists() and "SIGKILL" in (ckpts / "worker1.error").read_text()
    assert not (failed / "summary.json").exists()


def test_resume_trains_only_the_failed_worker(runs, tmp_path, real_fashion):
    reference, failed, _, _ = runs
    run = tmp_path / "run"
    shutil.copytree(failed, run)
    kept = {w: _files(run, w) for w in (0, 2)}
    assert main(["train", *SETTINGS, "--data-dir", str(real_fashion), "--out", str(run), "--resume"]) == 0
    assert {w: _files(run, w) for w in (0, 2)} == kept, "a finished worker was trained again"
    ref, got = (load_file(str(d / "checkpoints" / "swap.safetensors")) for d in (reference, run))
    for k in ref:
        assert torch.equal(ref[k], got[k]), f"{k} differs from the uninterrupted run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    keys = [(r["phase"], r["worker"], r["epoch"]) for r in records if r["phase"] == "phase2"]
    assert len(keys) == len(set(keys)) == 3 * 3                      # no epoch logged twice
    summary = json.loads((run / "summary.json").read_text())
    assert summary["averaged_workers"] == [0, 1, 2] and summary["failed_workers"] == {}


def test_allow_missing_workers_averages_the_survivors(runs, tmp_path, real_fashion):
    _, failed, _, _ = runs
    run = tmp_path / "run"
    shutil.copytree(failed, run)
    assert main(["train", *SETTINGS, "--data-dir", str(real_fashion), "--out", str(run), "--resume",
                 "--set", "phase3.allow_missing_workers=true"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["averaged_workers"] == [0, 2] and "SIGKILL" in summary["failed_workers"]["1"]
    assert not (run / "checkpoints" / "worker1.json").exists()       # not retrained
    w0, w2, avg = (load_file(str(run / "checkpoints" / f"{n}.safetensors")) for n in ("worker0", "worker2", "swap"))
    for k in avg:
        if "running" not in k and "num_batches" not in k:          # parameters: the mean of the two survivors
            torch.testing.assert_close(avg[k], (w0[k] + w2[k]) / 2, rtol=0, atol=1e-6)
