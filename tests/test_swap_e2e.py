"""End to end on a real Fashion-MNIST subset with 2 worker processes: the run directory is
complete, phase 1 stops on training accuracy, workers diverge, phase 3 is the exact parameter
average with recomputed BN statistics, and averaging does not hurt."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from swap.cli import main

AVG_TOLERANCE = 1.0     # points of test accuracy (2000 test images: 1 point = 20 images)
STOP_ACC = 70.0


@pytest.fixture(scope="module")
def swap_run(tmp_path_factory, real_fashion):
    out = tmp_path_factory.mktemp("e2e") / "run"
    args = ["train", "--config", "fashion_mnist_quick", "--workers", "2", "--out", str(out),
            "--data-dir", str(real_fashion),
            "--set", "data.train_subset=4000", "--set", "data.test_subset=2000",
            "--set", "phase1.batch_size=512", "--set", "phase1.max_epochs=10", "--set", "phase1.warmup_epochs=1",
            "--set", f"phase1.stop_acc={STOP_ACC}", "--set", "phase2.epochs=2", "--set", "phase2.batch_size=128"]
    assert main(args) == 0
    return out, args


def test_run_directory_is_complete(swap_run):
    out, _ = swap_run
    for name in ("config.yaml", "metrics.jsonl", "summary.json"):
        assert (out / name).is_file()
    for ckpt in ("phase1", "worker0", "worker1", "swap"):
        assert (out / "checkpoints" / f"{ckpt}.safetensors").is_file()
        assert json.loads((out / "checkpoints" / f"{ckpt}.json").read_text())["sha256"]
    s = json.loads((out / "summary.json").read_text())
    assert s["method"] == "swap"
    assert len(s["test_acc"]["workers"]) == 2
    assert set(s["wall_s"]) == {"phase1", "phase2", "phase3", "total"}
    assert s["wall_s"]["total"] == pytest.approx(sum(s["wall_s"][k] for k in ("phase1", "phase2", "phase3")))
    assert {"cpu", "threads_per_proc", "torch", "device"} <= set(s["machine"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for w in (0, 1):
        per_worker = [r for r in records if r["phase"] == "phase2" and r["worker"] == w]
        assert [r["epoch"] for r in per_worker] == [1, 2]
        assert all({"lr", "batch_size", "train_loss", "train_acc", "test_acc", "samples_per_s", "wall_s"} <= set(r)
                    for r in per_worker)


def test_phase1_stops_at_the_stopping_accuracy(swap_run):
    out, _ = swap_run
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    p1 = [r for r in records if r["phase"] == "phase1"]
    assert p1[-1]["train_acc"] >= STOP_ACC
    assert all(r["train_acc"] < STOP_ACC for r in p1[:-1])
    assert len(p1) < 10 and p1[-1]["lr"] > 0.1          # stopped while the LR is still high


def test_phase3_is_the_parameter_average_with_recomputed_bn(swap_run):
    out, _ = swap_run
    w0, w1, avg = (load_file(str(out / "checkpoints" / f"{n}.safetensors")) for n in ("worker0", "worker1", "swap"))
    params = [k for k in avg if "running" not in k and "num_batches" not in k]
    for k in params:
        torch.testing.assert_close(avg[k], (w0[k] + w1[k]) / 2, rtol=0, atol=1e-6)
    # workers diverged (own data order), so the average is not one of them
    assert max((w0[k] - w1[k]).abs().max().item() for k in params) > 1e-3
    # BN statistics were recomputed, not averaged
    means = [k for k in avg if k.endswith("running_mean")]
    assert max((avg[k] - (w0[k] + w1[k]) / 2).abs().max().item() for k in means) > 1e-3


def test_averaged_model_not_worse_than_workers(swap_run):
    out, _ = swap_run
    s = json.loads((out / "summary.json").read_text())
    assert s["test_acc"]["averaged"] >= s["test_acc"]["workers_mean"] - AVG_TOLERANCE
    assert s["test_acc"]["averaged"] > 70.0


def test_existing_run_directory_is_refused_and_resume_retrains_nothing(swap_run, capsys):
    out, args = swap_run
    before = (out / "metrics.jsonl").read_text().splitlines()
    summary = json.loads((out / "summary.json").read_text())
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(args + ["--resume"]) == 0
    after = (out / "metrics.jsonl").read_text().splitlines()
    training = [line for line in before if json.loads(line)["phase"] != "phase3"]
    assert after[:len(training)] == training                                           # nothing retrained
    assert [json.loads(line)["phase"] for line in after[len(training):]] == ["phase3"]  # phase 3 re-ran, once
    resumed = json.loads((out / "summary.json").read_text())
    assert resumed["test_acc"]["averaged"] == pytest.approx(summary["test_acc"]["averaged"], abs=1e-9)
    assert main(args + ["--resume", "--set", "seed=9"]) == 2                            # config differs
