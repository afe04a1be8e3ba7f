"""The three figure commands on a small real SWAP run that tracked its average and saved iterates."""
from __future__ import annotations

import csv

import numpy as np
import pytest

from swap.cli import main


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, real_fashion):
    out = tmp_path_factory.mktemp("fig") / "run"
    assert main(["train", "--config", "fashion_mnist_quick", "--workers", "2", "--procs", "1", "--out", str(out),
                 "--data-dir", str(real_fashion), "--set", "data.train_subset=2048", "--set", "data.test_subset=500",
                 "--set", "phase1.batch_size=512", "--set", "phase1.max_epochs=3", "--set", "phase1.warmup_epochs=1",
                 "--set", "phase2.epochs=3", "--set", "phase2.track_average=true", "--set", "phase2.save_every=8"]) == 0
    return out


def test_plot_has_the_average_curve(tracked_run):
    assert main(["plot", str(tracked_run)]) == 0
    rows = list(csv.DictReader(open(tracked_run / "figures" / "curves.csv")))
    averages = [r for r in rows if r["phase"] == "average"]
    assert [r["epoch"] for r in averages] == ["1", "2", "3"]
    final = [r for r in rows if r["phase"] == "phase3"][0]
    assert averages[-1]["test_acc"] == final["test_acc"]           # the last point is the SWAP model
    assert (tracked_run / "figures" / "curves.png").stat().st_size > 20_000


def test_landscape_grid_contains_the_points_and_caches(tracked_run, capsys):
    args = ["landscape", str(tracked_run), "--points", "phase1", "worker0", "worker1", "--grid", "3",
            "--subset", "512", "--procs", "1"]
    assert main(args) == 0
    grid = np.load(tracked_run / "figures" / "landscape_phase1_worker0_worker1.npz")
    assert grid["train_err"].shape == (3, 3) and (grid["test_err"] > 0).all() and (grid["test_err"] < 100).all()
    assert tuple(grid["coords"][0]) == (0.0, 0.0)                   # phase1 is the origin
    assert (tracked_run / "figures" / "landscape_phase1_worker0_worker1.png").stat().st_size > 20_000
    capsys.readouterr()
    assert main(args) == 0
    assert "using cached" in capsys.readouterr().err


def test_cosine_rows_per_worker_and_step(tracked_run):
    assert main(["cosine", str(tracked_run), "--batch-size", "128"]) == 0
    rows = list(csv.DictReader(open(tracked_run / "figures" / "cosine.csv")))
    steps_per_worker = 2048 // 128 * 3                              # 48 updates, saved every 8 + the start
    assert {r["worker"] for r in rows} == {"0", "1"}
    assert sorted(int(r["step"]) for r in rows if r["worker"] == "0") == list(range(0, steps_per_worker + 1, 8))
    assert all(-1.0 <= float(r["cosine"]) <= 1.0 for r in rows)
    assert (tracked_run / "figures" / "cosine.png").stat().st_size > 10_000


def test_missing_checkpoint_and_iterates_exit_2(tmp_path, tracked_run, capsys):
    assert main(["landscape", str(tracked_run), "--points", "phase1", "worker0", "worker7"]) == 2
    assert "no checkpoint 'worker7'" in capsys.readouterr().err
    assert main(["plot", str(tmp_path)]) == 2
