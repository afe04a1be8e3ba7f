"""The ABS elastic pool on Ray actors (``abs.launcher: ray``, issue #28): the same weights as the torch
launcher's pool bit for bit, a killed actor costing only time, bad input refused in one line, and
no Ray process left behind."""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from swap.cli import main

from conftest import ABS_RESIZE, LOOPBACK, Listening, live_processes

pytest.importorskip("ray", reason="swap[ray] is not installed")     # `make test` installs it

TESTS = Path(__file__).resolve().parent
RAY_PROCESSES = (b"raylet", b"gcs_server", b"ray::", b"default_worker.py", b"dashboard", b"log_monitor")


def ray_processes() -> list[dict]:
    return [p for p in live_processes() if any(name in p["cmdline"] for name in RAY_PROCESSES)]


@pytest.fixture(scope="module")
def ray_run(tmp_path_factory, real_fashion):
    """ABS_RESIZE's 1 -> 2 process pool on Ray actors (a local Ray started by the run, as a user's
    CLI run starts it), the model being the small CNN of ``tests/ray_fault.py``, whose rank 1
    SIGKILLs its own process at its 5th training update (the middle of epoch 2 of 3) so that the
    pool restarts from the last checkpoint. Returns (run directory, marker file, the Ray processes
    left after the run: listed, then killed, so that a failure does not leak them, what the run
    printed on standard output and error, the TCP sockets its processes listened on)."""
    base = tmp_path_factory.mktemp("ray")
    marker = base / "die"
    marker.write_text("")
    saved = {k: os.environ.get(k) for k in ("SWAP_TEST_DIE", "PYTHONPATH")}
    os.environ["SWAP_TEST_DIE"] = str(marker)          # read by the actors, which inherit the driver's environment
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), saved["PYTHONPATH"]]))
    try:
        args = ["train", *ABS_RESIZE, "--data-dir", str(real_fashion), "--procs", "2", "--set", "abs.max_workers=2",
                "--set", "abs.launcher=ray", "--set", "model.name=ray_fault:cnn", "--out", str(base / "run")]
        with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()) as err, \
                Listening() as listening:
            assert main(args) == 0
        leftovers = ray_processes()
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        for p in ray_processes():
            os.kill(p["pid"], 9)
    return base / "run", marker, leftovers, out.getvalue() + err.getvalue(), listening.seen


def test_a_killed_actor_costs_only_time_and_the_ray_pool_ends_with_the_torch_pools_weights(ray_run, abs_resize_runs):
    """The Ray pool, one of its actors killed mid-epoch and the pool restarted from its last
    checkpoint, ends with the weights (BN statistics included) of the torch launcher's pool that
    was never interrupted, bit for bit; the same batches, pool sizes, updates and accuracies."""
    run, marker, *_ = ray_run
    assert not marker.exists()                              # rank 1 did kill itself
    ray_summary, torch_summary = (json.loads((d / "summary.json").read_text())
                                  for d in (run, abs_resize_runs["elastic"]))
    launcher = ray_summary["launcher"]
    assert launcher["name"] == "ray" and launcher["restarts"] == 1 and launcher["address"] == "local"
    assert launcher["ray_start_s"] > 0 and launcher["actor_start_s"] > 0
    assert [h["world_size"] for h in ray_summary["history"]] == [1, 2, 2] and len(ray_summary["resizes"]) == 1
    assert ray_summary["batch_size"]["per_epoch"] == torch_summary["batch_size"]["per_epoch"] == [64, 128, 256]
    assert ray_summary["updates"] == torch_summary["updates"]
    assert [h["test_acc"] for h in ray_summary["history"]] == [h["test_acc"] for h in torch_summary["history"]]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if "test_acc" in r and r.get("phase") == "abs"] == [1, 2, 3]
    a, b = (load_file(str(d / "checkpoints" / "abs.safetensors")) for d in (run, abs_resize_runs["elastic"]))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_no_ray_process_is_left_behind(ray_run):
    assert ray_run[2] == []


def test_servers_of_a_local_ray_run_and_a_two_process_run_listen_on_loopback_only(ray_run, abs_resize_runs):
    """Ray's local instance (GCS, raylet, workers, agents) and the torch launcher's rendezvous and
    process group: every listening socket is on 127.0.0.1, none on all interfaces or the machine's
    address (before, Ray's servers listened on ``::`` and the node's address, and the launcher's
    TCP store on ``::``)."""
    for name, seen in (("ray", ray_run[4]), ("torch", abs_resize_runs["listening"])):
        assert seen, f"{name}: no listening socket seen: the sampling missed the run"
        exposed = sorted({(address, command) for address, _, command in seen if address not in LOOPBACK})
        assert not exposed, f"{name}: listening beyond loopback: {exposed}"
    assert any("raylet" in command or "gcs_server" in command for _, _, command in ray_run[4]), ray_run[4]


def test_the_ray_pool_prints_as_the_torch_pool_does(ray_run):
    """Rank 0's progress lines without Ray's "(PoolRank pid=N)" prefix, no raylet notice of the
    killed actor: the restart is one swap line."""
    printed = ray_run[3]
    assert "PoolRank" not in printed and "(raylet)" not in printed and "A worker died" not in printed, printed
    lines = printed.splitlines()
    assert [line.split(" lr ")[0] for line in lines if line.startswith("[abs]")] == \
        ["[abs] epoch 1/3", "[abs] epoch 2/3", "[abs] epoch 3/3"], printed
    assert [line for line in lines if "died" in line] == \
        ["swap: rank 1 of 2 died (its Ray actor's process ended); restart 1 of 3 from the last checkpoint"]


@pytest.mark.parametrize("extra, message", [
    (["--set", "abs.ray_address=127.0.0.1:9"], "abs.ray_address=127.0.0.1:9: no Ray cluster answers there"),
    (["--set", "abs.ray_address=nowhere"], "abs.ray_address must be host:port, ray://host:port or auto, got 'nowhere'"),
    (["--set", "abs.launcher=slurm"], "abs.launcher must be torch or ray, got 'slurm'"),
])
def test_bad_ray_input_is_one_line_and_exit_2_before_any_work(tmp_path, capsys, extra, message):
    args = ["train", "--config", "fashion_mnist_quick", "--method", "abs", "--set", "abs.launcher=ray", *extra,
            "--out", str(tmp_path / "run")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"swap: error: {message}" or (message in err and len(err.splitlines()) == 1), err
    assert not (tmp_path / "run").exists()


def test_ray_missing_or_under_torchrun_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    args = ["train", "--config", "fashion_mnist_quick", "--method", "absa", "--set", "abs.launcher=ray",
            "--out", str(tmp_path / "run")]
    monkeypatch.setitem(sys.modules, "ray", None)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == "swap: error: abs.launcher=ray needs Ray; pip install 'swap[ray]'"
    monkeypatch.delitem(sys.modules, "ray")
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    assert main(args) == 2
    assert capsys.readouterr().err.strip().endswith("abs.launcher=ray starts its own ranks as Ray actors; run it "
                                                    "without torchrun")
    assert not (tmp_path / "run").exists()
