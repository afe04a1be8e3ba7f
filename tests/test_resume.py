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

from conftest import live_processes

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


def _assert_resumed_like(reference: Path, out: Path, how: str) -> None:
    """The averaged model equals the reference's bit for bit, and no training epoch was logged twice."""
    ref, got = (load_file(str(d / "checkpoints" / "swap.safetensors")) for d in (reference, out))
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), f"{k} differs after {how}"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    keys = [(r["phase"], r["worker"], r["epoch"]) for r in records if r["phase"] in ("phase1", "phase2")]
    assert len(keys) == len(set(keys)) == 3 + 2 * 2


def _kill_when(out: Path, trigger: str, data_dir: Path, delay_s: float, settings: list[str] = SETTINGS) -> None:
    """Start `swap train` in its own process group; SIGKILL it `delay_s` after `trigger` appears.
    The tests folder is on its path (a user's optimizer, ``user_optim:two_group_adamw``)."""
    here = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here.parent), str(here), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "swap.cli", "train", *settings, "--data-dir", str(data_dir),
                             "--out", str(out)], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=open(out.parent / f"{out.name}.stderr", "w"))
    deadline = time.time() + 120
    while not (out / trigger).exists():
        assert proc.poll() is None, "the run ended before the kill point: " + \
            (out.parent / f"{out.name}.stderr").read_text()[-2000:]
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


OPTIMIZED = ["--config", "fashion_mnist_quick", "--method", "sgd", "--procs", "1", "--set", "data.train_subset=2048",
             "--set", "data.test_subset=300", "--set", "sgd.batch_size=128", "--set", "sgd.micro_batch_size=0",
             "--set", "sgd.epochs=3", "--set", "sgd.warmup_epochs=1", "--set", "eval_every=3"]


@pytest.mark.parametrize("optimizer, peak_lr", [
    ("lars", 8.0), ("lamb", 0.05),
    # torch's AdamW, as the user's own optimizer named in the config (two groups, LR ratio 10): the
    # state that `optimizer: adamw` checkpoints too (the same class), and a user's optimizer besides
    ("user_optim:two_group_adamw", 0.005),
])
def test_a_killed_run_resumes_bit_for_bit_with_each_optimizer(tmp_path, real_fashion, optimizer, peak_lr):
    """LARS's momentum, LAMB's and AdamW's moments and step counts, and a user's optimizer state are
    checkpointed: a run killed in its second epoch and resumed ends with the uninterrupted run's weights."""
    settings = [*OPTIMIZED, "--set", f"sgd.optimizer={optimizer}", "--set", f"sgd.peak_lr={peak_lr}",
                "--set", "sgd.optim={clip_grad_norm: 2.0}"]
    assert main(["train", *settings, "--data-dir", str(real_fashion), "--out", str(tmp_path / "ref")]) == 0
    out = tmp_path / "run"
    _kill_when(out, "checkpoints/sgd_last.json", real_fashion, 0.1, settings)
    assert not (out / "summary.json").exists()
    assert main(["train", *settings, "--data-dir", str(real_fashion), "--out", str(out), "--resume"]) == 0
    ref, got = (load_file(str(d / "checkpoints" / "sgd.safetensors")) for d in (tmp_path / "ref", out))
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    s_ref, s_got = (json.loads((d / "summary.json").read_text()) for d in (tmp_path / "ref", out))
    assert s_got["optimizer"] == s_ref["optimizer"] == ("user:RecordingAdamW" if ":" in optimizer else optimizer)
    assert s_got["updates"] == s_ref["updates"] and s_ref["test_acc"]["final"] > 60.0      # it trained


def _group_members(pgid: int) -> list[int]:
    """Pids of live processes in process group ``pgid``."""
    return [p["pid"] for p in live_processes() if p["pgrp"] == pgid]


@pytest.fixture(scope="module")
def reference_2procs(tmp_path_factory, real_fashion):
    out = tmp_path_factory.mktemp("ref2") / "run"
    assert main(["train", *SETTINGS, "--procs", "2", "--data-dir", str(real_fashion), "--out", str(out)]) == 0
    return out


def _stop_run(args: list[str], out: Path, trigger: str, signum: int, to_group: bool, delay_s: float = 0.1) -> None:
    """Run `swap ARGS` in its own session; send ``signum`` ``delay_s`` after ``trigger`` appears (to the
    whole process group, as Ctrl-C does, or to the launcher only); check the clean stop: exit status
    128 + signal, the resume command, a mid-epoch checkpoint, no summary and no process left."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "swap.cli", *args], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / trigger).exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before the signal point"
        time.sleep(0.02)
    time.sleep(delay_s)
    (os.killpg if to_group else os.kill)(proc.pid, signum)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, stderr
    assert f"stopped by {signal.Signals(signum).name}" in stderr and "--resume" in stderr
    deadline = time.time() + 5                   # helpers such as the resource tracker exit on their own
    while _group_members(proc.pid) and time.time() < deadline:
        time.sleep(0.1)
    left = [Path(f"/proc/{pid}/cmdline").read_bytes()[:120] for pid in _group_members(proc.pid)]
    assert left == [], f"processes left behind: {left}"
    stops = [json.loads(p.read_text()).get("partial") for p in (out / "checkpoints").glob("*_last.json")]
    assert any(s and s["step"] > 0 for s in stops), "no mid-epoch checkpoint was written"
    assert not (out / "summary.json").exists()


@pytest.mark.parametrize("procs, signum, to_group, trigger", [
    ("1", signal.SIGINT, True, "checkpoints/worker0_last.json"),     # Ctrl-C in phase 2, mid-epoch
    ("2", signal.SIGTERM, False, "checkpoints/phase1_last.json"),     # scheduler stops the launcher in phase 1
])
def test_signal_checkpoints_every_rank_and_resumes(tmp_path, request, real_fashion, procs, signum, to_group, trigger):
    """SIGINT/SIGTERM: all ranks stop after the same update, write a mid-epoch checkpoint, exit with
    128 + signal and a resume command; no process is left; the resumed run equals the reference."""
    reference = request.getfixturevalue("reference" if procs == "1" else "reference_2procs")
    out = tmp_path / "run"
    args = ["train", *SETTINGS, "--procs", procs, "--data-dir", str(real_fashion), "--out", str(out)]
    _stop_run(args, out, trigger, signum, to_group)
    assert main(args + ["--resume"]) == 0
    _assert_resumed_like(reference, out, "the signal and resume")


ABS = ["--method", "abs", "--set", "abs.epochs=3", "--set", "abs.batch_size=64", "--set", "abs.fallback_epochs=1",
       "--set", "abs.eig_samples=64", "--set", "abs.elastic=false", "--set", "data.train_subset=2048"]


@pytest.mark.parametrize("extra, final, trigger, delay_s", [
    (ABS, "abs", "checkpoints/abs_last.json", 0.05),                              # ABS, in its epoch 2
    (["--set", "phase2.layout=vmap"], "swap", "checkpoints/worker0_last.json", 0.05),   # stacked phase 2
])
def test_ctrl_c_and_resume_for_abs_and_the_vmap_layout(tmp_path, real_fashion, extra, final, trigger, delay_s):
    common = ["train", *SETTINGS, "--procs", "1", "--data-dir", str(real_fashion), *extra]
    assert main(common + ["--out", str(tmp_path / "ref")]) == 0
    out = tmp_path / "run"
    _stop_run(common + ["--out", str(out)], out, trigger, signal.SIGINT, to_group=True, delay_s=delay_s)
    assert main(common + ["--out", str(out), "--resume"]) == 0
    ref, got = (load_file(str(d / "checkpoints" / f"{final}.safetensors")) for d in (tmp_path / "ref", out))
    for k in ref:
        assert torch.equal(ref[k], got[k]), f"{k} differs after Ctrl-C and resume"
    s_ref, s_got = (json.loads((d / "summary.json").read_text()) for d in (tmp_path / "ref", out))
    assert s_got["updates"] == s_ref["updates"]


def test_auto_resume_starts_continues_or_refuses(tmp_path):
    """--auto-resume: start in an empty or absent directory, continue a run of the same config,
    refuse one of another config (as --resume does) and a directory that holds other files."""
    from swap.config import SwapError, load_config
    from swap.rundir import RunDir
    cfg = load_config("fashion_mnist_quick")
    run = RunDir.prepare(tmp_path / "new", cfg, auto_resume=True)
    assert run.load_config().hash() == cfg.hash()
    (run.path / "metrics.jsonl").write_text("kept\n")
    RunDir.prepare(tmp_path / "new", cfg, auto_resume=True)                  # continues: nothing replaced
    assert (run.path / "metrics.jsonl").read_text() == "kept\n"
    with pytest.raises(SwapError, match="config differs from the saved one"):
        RunDir.prepare(tmp_path / "new", load_config("fashion_mnist_quick", ["seed=1"]), auto_resume=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(SwapError, match="already exists"):
        RunDir.prepare(tmp_path / "other", cfg, auto_resume=True)
    with pytest.raises(SwapError, match="exclude each other"):
        RunDir.prepare(tmp_path / "new", cfg, resume=True, auto_resume=True)


def _rank_pids(parent: int) -> dict[int, int]:
    """{RANK: pid} of the processes torchrun started (children of ``parent`` with RANK set)."""
    ranks = {}
    for p in live_processes():
        if p["ppid"] != parent:
            continue
        try:
            env = Path(f"/proc/{p['pid']}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for item in env:
            if item.startswith(b"RANK="):
                ranks[int(item[5:])] = p["pid"]
    return ranks


def test_auto_resume_under_torchrun_survives_a_killed_rank(tmp_path, reference_2procs, real_fashion):
    """torchrun --max-restarts 1, one command line with --auto-resume: rank 0 is SIGKILLed in
    phase 1, torchrun restarts the job, which continues from the checkpoint and ends with the
    weights of an uninterrupted 2-process run, bit for bit."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--max-restarts", "1",
           "-m", "swap.cli", "train", *SETTINGS, "--procs", "2", "--data-dir", str(real_fashion), "--out", str(out),
           "--auto-resume"]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.time() + 120
        while not (out / "checkpoints" / "phase1_last.json").exists():
            assert proc.poll() is None and time.time() < deadline, "the run ended before the kill point"
            time.sleep(0.05)
        time.sleep(0.2)
        ranks = _rank_pids(proc.pid)
        assert sorted(ranks) == [0, 1] and not (out / "checkpoints" / "phase1.json").exists()
        os.kill(ranks[0], signal.SIGKILL)
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, stderr[-3000:]
    assert "terminate called" not in stderr, stderr[-3000:]     # no process aborted at exit (issue #23)
    assert "stale" in stderr                        # the restarted rank 0 took over the dead one's lock
    _assert_resumed_like(reference_2procs, out, "the killed rank and torchrun's restart")


def _saved_pair(tmp_path):
    """A model + optimizer saved at 'epoch 1' as checkpoint A, and one more update later, at
    'epoch 2', as checkpoint B (both with their optimizer state)."""
    from swap.checkpoint import save_checkpoint
    from swap.models import build_model
    torch.manual_seed(0)
    model = build_model("smallcnn", 10, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    states = []
    for epoch, name in ((1, "a"), (2, "b")):
        opt.zero_grad()
        model(torch.randn(4, 1, 28, 28)).sum().backward()
        opt.step()
        save_checkpoint(tmp_path / "ck" / name, model, {"epoch": epoch}, opt)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    return states


def _load(base):
    from swap.checkpoint import load_checkpoint
    from swap.models import build_model
    model = build_model("smallcnn", 10, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    meta = load_checkpoint(base, model, optimizer=opt)
    return meta, model.state_dict(), opt.state_dict()


def test_a_write_killed_between_its_renames_is_rolled_forward(tmp_path):
    """SIGKILL after the new optimizer state was renamed into place but before the weights and the
    metadata were: resuming from that mix would not continue the run (the flaky phase-1 kill test
    hit exactly this). recover() finishes the write, so A becomes the epoch-2 checkpoint, whole."""
    import shutil

    from swap.checkpoint import recover
    states = _saved_pair(tmp_path)
    ck = tmp_path / "ck"
    shutil.copy(ck / "b.optim.pt", ck / "a.optim.pt")                  # renamed before the kill
    shutil.copy(ck / "b.safetensors", ck / "a.safetensors.tmp")        # still waiting for their renames
    shutil.copy(ck / "b.json", ck / "a.json.tmp")
    with pytest.raises(Exception, match="optim.pt: contents do not match"):
        _load(ck / "a")                                                # the torn mix is refused
    assert recover(ck) == ["a"]
    meta, weights, optim = _load(ck / "a")
    assert meta["epoch"] == 2 and not list(ck.glob("*.tmp"))
    assert all(torch.equal(weights[k], states[1][k]) for k in weights)
    assert all(torch.equal(x["momentum_buffer"], y["momentum_buffer"])
               for x, y in zip(optim["state"].values(), _load(ck / "b")[2]["state"].values()))


def test_a_write_killed_before_its_renames_is_discarded(tmp_path):
    """Killed while the temporary files were being written (metadata incomplete): the previous
    checkpoint is whole and stays; the temporary files go."""
    import shutil

    from swap.checkpoint import recover
    states = _saved_pair(tmp_path)
    ck = tmp_path / "ck"
    shutil.copy(ck / "b.optim.pt", ck / "a.optim.pt.tmp")
    shutil.copy(ck / "b.safetensors", ck / "a.safetensors.tmp")
    (ck / "a.json.tmp").write_text((ck / "b.json").read_text()[:40])
    assert recover(ck) == [] and not list(ck.glob("*.tmp"))
    meta, weights, _ = _load(ck / "a")
    assert meta["epoch"] == 1 and all(torch.equal(weights[k], states[0][k]) for k in weights)


def test_a_corrupt_checkpoint_on_resume_is_one_line_and_no_log_of_torch(tmp_path, reference_2procs, real_fashion):
    """Issue #23: `--resume` of a 2-process run whose phase1.safetensors is corrupt prints our start
    line and our one-line error, and nothing of torch's (the elastic agent's spawn logged
    "Terminating process ... via signal SIGTERM" for the rank still alive when the other failed)."""
    import shutil
    run = tmp_path / "run"
    shutil.copytree(reference_2procs, run)
    weights = run / "checkpoints" / "phase1.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64] + bytes(64))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("SWAP_LOG", None)
    done = subprocess.run([sys.executable, "-m", "swap.cli", "train", *SETTINGS, "--procs", "2", "--data-dir",
                           str(real_fashion), "--out", str(run), "--resume"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 2 and lines[0].startswith("swap: swap on fashion-mnist"), done.stderr
    assert lines[1].startswith("swap: error: checkpoint") and "phase1.safetensors" in lines[1], done.stderr
