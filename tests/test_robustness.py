"""Divergence stops a phase with a message naming it; one process owns a run directory."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from swap.checkpoint import checkpoint_exists
from swap.cli import main
from swap.config import SwapError, load_config
from swap.rundir import RunDir

TINY = ["--config", "fashion_mnist_quick", "--workers", "2", "--procs", "1", "--set", "data.train_subset=1024",
        "--set", "data.test_subset=200", "--set", "phase1.batch_size=256", "--set", "phase1.max_epochs=2",
        "--set", "phase1.warmup_epochs=1", "--set", "phase2.epochs=1", "--set", "sgd.batch_size=256", "--set", "sgd.epochs=1"]


@pytest.mark.parametrize("layout", ["processes", "vmap"])
def test_divergence_in_phase2_names_worker_epoch_step_and_keeps_phase1(tmp_path, real_fashion, capsys, layout):
    out = tmp_path / "run"
    code = main(["train", *TINY, "--data-dir", str(real_fashion), "--out", str(out), "--set", "phase2.peak_lr=1e4",
                 "--set", f"phase2.layout={layout}"])
    err = capsys.readouterr().err
    assert code == 2
    line = [x for x in err.splitlines() if x.startswith("swap: error:")][0]
    assert "phase2 worker 0 diverged at epoch 1, step" in line and "gradient norm" in line
    assert checkpoint_exists(out / "checkpoints" / "phase1")          # the last good checkpoint stays
    assert not (out / "summary.json").exists()


def test_gradient_limit_stops_at_the_first_step(tmp_path, real_fashion, capsys):
    code = main(["train", *TINY, "--method", "sgd", "--data-dir", str(real_fashion), "--out", str(tmp_path / "r"),
                 "--set", "divergence_grad_norm=1e-9"])
    assert code == 2 and "sgd diverged at epoch 1, step 1" in capsys.readouterr().err


def test_a_live_owner_blocks_and_a_stale_lock_is_taken_over(tmp_path, capsys):
    cfg = load_config("fashion_mnist_quick")
    run = RunDir.prepare(tmp_path / "run", cfg)
    run.lock_path.write_text(f"{os.getppid()}\n")                     # a live process (pytest's parent)
    with pytest.raises(SwapError, match=f"in use by process {os.getppid()}"):
        RunDir.prepare(tmp_path / "run", cfg, resume=True)
    assert main(["train", "--config", "fashion_mnist_quick", "--out", str(tmp_path / "run"), "--overwrite"]) == 2
    assert (tmp_path / "run" / "config.yaml").exists()                  # --overwrite did not delete it
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run.lock_path.write_text(f"{dead.pid}\n")
    capsys.readouterr()
    RunDir.prepare(tmp_path / "run", cfg, resume=True)
    assert "stale" in capsys.readouterr().err and not run.lock_path.exists()
    with run.locked():
        assert json.loads("1") == 1 and run.lock_path.read_text().strip() == str(os.getpid())
    assert not run.lock_path.exists()


def test_deferred_divergence_guard_names_the_first_bad_update():
    """The GPU setting (no host sync per update): a bad gradient at update 3 is reported at the next
    check, with its own epoch, step and norm, not a later one's."""
    import torch
    from torch import nn

    from swap.config import SwapError
    from swap.train import DivergenceGuard

    layer = nn.Linear(2, 1, bias=False)
    guard = DivergenceGuard(max_norm=10.0, label="phase1", device=torch.device("cpu"), every=4)
    for step, g in enumerate([1.0, 2.0, 50.0, float("nan")], start=1):
        layer.weight.grad = torch.full((1, 2), g)
        if step < 4:
            guard.observe(layer, 2, step)                   # no check yet: nothing raised
    with pytest.raises(SwapError, match=r"phase1 diverged at epoch 2, step 3: gradient norm 70\.7"):
        guard.observe(layer, 2, 4)                          # 4th update: the deferred check
    ok = DivergenceGuard(10.0, "x", torch.device("cpu"), every=1)
    layer.weight.grad = torch.ones(1, 2)
    ok.observe(layer, 1, 1)
    ok.check()                                              # a good gradient passes


def net_failing_on_rank_1():
    """A model factory that raises on rank 1 only: a bug in user code, not a SwapError."""
    from test_api import tiny_net
    if os.environ.get("RANK") == "1":
        raise RuntimeError("user bug on rank 1")
    return tiny_net()


def net_failing_on_rank_0_while_rank_1_waits():
    """Rank 0 raises at once; rank 1 is still busy (a slow start) when the launcher stops the job."""
    import time
    from test_api import tiny_net
    if os.environ.get("RANK") == "0":
        raise RuntimeError("user bug on rank 0")
    time.sleep(3)
    return tiny_net()


STOPPED_RANK_SCRIPT = """
import sys
from pathlib import Path
import swap
from test_api import _quadrant_data
from test_robustness import net_failing_on_rank_0_while_rank_1_waits

if __name__ == "__main__":
    config = {"workers": 2, "data": {"crop_padding": 0, "flip": False, "cutout": 0},
              "phase1": {"batch_size": 128, "max_epochs": 1, "warmup_epochs": 0},
              "phase2": {"batch_size": 32, "epochs": 1}, "phase3": {"bn_batch_size": 64}}
    try:
        swap.train_swap(net_failing_on_rank_0_while_rank_1_waits, _quadrant_data(256, 0), _quadrant_data(64, 1),
                        config, out=sys.argv[1], procs=2)
    except swap.SwapError as exc:
        print(f"swap: error: {exc}", file=sys.stderr)
        sys.exit(2)
"""


def test_a_rank_stopped_by_the_launcher_after_another_failed_leaves_no_log_line_of_torch(tmp_path):
    """Issue #23: when one rank fails while another is still running, torch's spawn terminates the
    survivor and logs "W... torch/multiprocessing/spawn.py:165] Terminating process N via signal
    SIGTERM" (seen on `swap train --resume` of a corrupt checkpoint); the terminal gets our line only.
    A script of its own, as a user runs it (pytest's capture would hide torch's log handler)."""
    script = tmp_path / "script.py"
    script.write_text(STOPPED_RANK_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), str(Path(__file__).parent.parent),
                                                         os.environ.get("PYTHONPATH", "")])}
    env.pop("SWAP_LOG", None)
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "run")], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("swap: error: rank 0 failed: RuntimeError: user bug on rank 0"), done.stderr
    assert all(line.startswith("swap: ") for line in lines), done.stderr     # nothing of torch's


def test_a_failed_rank_is_one_line_naming_its_log_file(tmp_path, capfd):
    """2 processes, rank 1 raises: the terminal gets our one line (naming logs/rank1.log), none of
    torch elastic's log lines; the full traceback is in the log file."""
    import swap
    from test_api import _quadrant_data
    config = {"workers": 2, "data": {"crop_padding": 0, "flip": False, "cutout": 0},
              "phase1": {"batch_size": 128, "max_epochs": 1, "warmup_epochs": 0}, "phase2": {"batch_size": 32, "epochs": 1},
              "phase3": {"bn_batch_size": 64}}
    with pytest.raises(SwapError) as info:
        swap.train_swap(net_failing_on_rank_1, _quadrant_data(256, 0), _quadrant_data(64, 1), config,
                        out=tmp_path / "run", procs=2)
    log = tmp_path / "run" / "logs" / "rank1.log"
    assert str(info.value) == f"rank 1 failed: RuntimeError: user bug on rank 1 (traceback in {log})"
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "net_failing_on_rank_1" in text
    err = capfd.readouterr().err
    # none of torch's log lines: elastic's, c10d's, nor spawn's "Terminating process N via signal SIGTERM"
    # for the rank still alive when the other failed (issue #23)
    assert "torch/" not in err and "Terminating process" not in err and "Traceback" not in err and "E1" not in err, err
