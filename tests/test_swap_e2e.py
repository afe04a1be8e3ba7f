"""End to end on a real Fashion-MNIST subset with 2 worker processes: the run directory is
complete, phase 1 stops on training accuracy, workers diverge, phase 3 is the exact parameter
average with recomputed BN statistics, and averaging does not hurt."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from swap.cli import main

from conftest import train_quick

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


def test_swap_with_two_cycles_per_worker_averages_all_four_samples(tmp_path, real_fashion):
    """phase2.cycles = 2 (swap-cycles): each worker's LR schedule restarts after phase2.epochs, a
    sample is kept at the end of each cycle, and phase 3 averages the W x C = 4 samples."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    summary, records = train_quick(out, real_fashion, 1, "data.train_subset=1024", "data.test_subset=300",
                                   "phase1.batch_size=256", "phase1.max_epochs=1", "phase1.warmup_epochs=1",
                                   "phase2.epochs=2", "phase2.batch_size=128", "phase2.cycles=2")
    assert summary["samples_averaged"] == 4 and summary["epochs"]["phase2"] == 4
    lrs = [r["lr"] for r in records if r["phase"] == "phase2" and r["worker"] == 0]
    assert len(lrs) == 4 and lrs[0] == lrs[2] and lrs[1] == lrs[3] and lrs[1] < lrs[0]    # the schedule restarts
    ck = out / "checkpoints"
    samples = [load_file(str(ck / f)) for f in ("worker0_cycle1.safetensors", "worker0.safetensors",
                                                "worker1_cycle1.safetensors", "worker1.safetensors")]
    averaged = load_file(str(ck / "swap.safetensors"))
    for k in averaged:
        if "running" not in k and "num_batches" not in k:
            mean = torch.stack([s[k].double() for s in samples]).mean(0)
            assert torch.allclose(averaged[k].double(), mean, atol=1e-6), k
    assert not torch.equal(samples[0]["0.0.weight"], samples[1]["0.0.weight"])       # two distinct samples


def test_a_greedy_soup_is_chosen_on_the_validation_split_and_reported(tmp_path, real_fashion):
    """phase3.aggregate = greedy with 2 workers x 2 cycles: the soup starts from the sample with the
    best validation accuracy, keeps what does not lower it, and reports its test accuracy beside
    the uniform average's; the validation split is the last data.holdout training samples."""
    summary, _ = train_quick(tmp_path / "run", real_fashion, 2, "data.train_subset=1324", "data.holdout=300",
                             "data.test_subset=300", "phase1.batch_size=256", "phase1.max_epochs=1",
                             "phase1.warmup_epochs=1", "phase2.epochs=1", "phase2.batch_size=128", "phase2.cycles=2",
                             "phase3.aggregate=greedy")
    soup = summary["soup"]
    assert sorted(soup["val_acc"]) == ["w0", "w0c1", "w1", "w1c1"] and summary["aggregate"] == "greedy"
    best = max(soup["val_acc"], key=lambda k: soup["val_acc"][k])
    assert soup["kept"][0] == best and set(soup["kept"]) <= set(soup["val_acc"]) and len(set(soup["kept"])) == len(soup["kept"])
    assert 0 < soup["uniform_test_acc"] <= 100 and 0 < summary["test_acc"]["averaged"] <= 100
    if len(soup["kept"]) == 4:                                # everything kept: the soup is the uniform average
        assert soup["soup_val_acc"] == soup["uniform_val_acc"]
        assert summary["test_acc"]["averaged"] == soup["uniform_test_acc"]
