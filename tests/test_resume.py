"""Kill-and-resume: a run killed with SIGKILL in phase 1, phase 2 or phase 3 and resumed with
--resume ends with exactly the weights of an uninterrupted run (bitwise, CPU), without redoing
finished epochs."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from swap.cli import main

SETTINGS = ["--config", "fashion_mnist_quick", "--workers", "2", "--procs", "1",
            "--set", "data.train_subset=1024", "--set", "data.test_subset=300",
            "--set", "phase1.batch_size=256", "--set", "phase1.micro_batch_size=128", "--set", "phase1.max_epochs=3",
            "--set", "phase1.warmup_epochs=1", "--set", "phase1.stop_acc=99", "--set", "phase2.epochs=2",
            "--set", "phase2.batch_size=128"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, real_fashion):
    out = tmp_path_factory.mktemp("ref") / "run"
    assert main(["train", *SETTINGS, "--data-dir", str(real_fashion), "--out", str(out)]) == 0
    return out


def _kill_when(out: Path, trigger: str, data_dir: Path, delay_s: float) -> None:
    """Start `swap train` in its own process group; SIGKILL it `delay_s` after `trigger` appears."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "swap.cli", "train", *SETTINGS, "--data-dir", str(data_dir),
                             "--out", str(out)], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / trigger).exists():
        assert proc.poll() is None, "the run ended before the kill point"
        assert time.time() < deadline, f"{trigger} never appeared"
        time.sleep(0.05)
    time.sleep(delay_s)
    assert proc.poll() is None, "the run ended before the kill point"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.parametrize("phase, trigger, delay_s", [
    ("phase 1", "checkpoints/phase1_last.json", 0.2),       # during phase-1 epoch 2
    ("phase 2", "checkpoints/worker0_last.json", 0.2),      # during worker 0's epoch 2
    ("phase 3", "checkpoints/worker1.json", 0.0),           # workers done, averaging under way
])
def test_killed_run_resumes_to_identical_weights(tmp_path, reference, real_fashion, phase, trigger, delay_s):
    out = tmp_path / "run"
    _kill_when(out, trigger, real_fashion, delay_s)
    assert not (out / "summary.json").exists()
    assert main(["train", *SETTINGS, "--data-dir", str(real_fashion), "--out", str(out), "--resume"]) == 0
    ref, got = (load_file(str(d / "checkpoints" / "swap.safetensors")) for d in (reference, out))
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), f"{phase}: {k} differs after resume"
    for w in (0, 1):
        a, b = (load_file(str(d / "checkpoints" / f"worker{w}.safetensors")) for d in (reference, out))
        assert all(torch.equal(a[k], b[k]) for k in a)
    # no epoch was logged twice, and the summary counts the same updates
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    keys = [(r["phase"], r["worker"], r["epoch"]) for r in records if r["phase"] in ("phase1", "phase2")]
    assert len(keys) == len(set(keys)) == 3 + 2 * 2
    s_ref, s_got = (json.loads((d / "summary.json").read_text()) for d in (reference, out))
    assert s_got["updates"] == s_ref["updates"] and s_got["test_acc"] == s_ref["test_acc"]
