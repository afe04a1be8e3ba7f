"""swap compare: time-to-target logic on synthetic records, and a tiny real compare."""
from __future__ import annotations

import json

import pytest

from swap.cli import main
from swap.compare import build_report, plan, time_to_target
from swap.report import compare_table


def test_time_to_target_reached_late_and_never():
    points = [(10.0, 80.0), (20.0, 90.5), (30.0, 91.2), (40.0, 90.9)]
    assert time_to_target(points, 90.0) == 20.0                # reached at the second evaluation
    assert time_to_target(points, 91.0) == 30.0                # reached late
    assert time_to_target(points, 91.5) is None                # never reached
    assert time_to_target([(30.0, 92.0), (10.0, 93.0)], 92.5) == 10.0   # order of records does not matter


def test_plan_adds_start_runs_and_refuses_unknown():
    assert plan(["swa-small"]) == ["sgd-small", "swa-small"]
    assert plan(["swa-lb-sb", "sgd-large"]) == ["sgd-large", "swap", "swa-lb-sb"]
    with pytest.raises(Exception, match="unknown method 'sgd-huge'"):
        plan(["sgd-huge"])


def test_tiny_compare_writes_a_complete_report(tmp_path, real_fashion, capsys):
    out = tmp_path / "cmp"
    args = ["compare", "--config", "fashion_mnist_compare", "--seeds", "2",
            "--methods", "sgd-small,swap,swa-lb-sb,extrap-large,swap-extrap,absa",
            "--out", str(out), "--data-dir", str(real_fashion), "--procs", "1",
            "--set", "data.train_subset=1024", "--set", "data.test_subset=500", "--set", "workers=2",
            "--set", "phase1.batch_size=512", "--set", "phase1.max_epochs=2", "--set", "phase1.warmup_epochs=1",
            "--set", "phase2.epochs=1", "--set", "sgd_small.epochs=1",
            "--set", "sgd_large.batch_size=512", "--set", "sgd_large.epochs=1", "--set", "sgd_large.warmup_epochs=0",
            "--set", "abs.epochs=2", "--set", "abs.fallback_epochs=1", "--set", "abs.max_batch_factor=8",
            "--set", "phase2.layout=sequential"]          # workers in turn: no process start-ups (tested elsewhere)
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert [r["method"] for r in report["rows"]] == ["sgd-small", "swap", "swa-lb-sb", "extrap-large", "swap-extrap", "absa"]
    absa = json.loads((out / "absa" / "seed0" / "summary.json").read_text())
    assert absa["batch_size"]["per_epoch"] == [128, 256]                # fallback doubling after epoch 1
    assert [h["adv_fraction"] for h in absa["history"]] == [0.2, 0.0]   # none in the second half
    assert absa["updates"]["critical_path"] == 1024 // 128 + 1024 // 256
    for method, key in (("extrap-large", "optimizer"), ("swap-extrap", "phase1_optimizer")):
        assert json.loads((out / method / "seed0" / "summary.json").read_text())[key] == "extrap"
    for row in report["rows"]:
        assert len(row["per_seed"]["test_acc"]) == 2 and all(a > 10 for a in row["per_seed"]["test_acc"])
    swa = json.loads((out / "swa-lb-sb" / "seed1" / "summary.json").read_text())
    swap_s = json.loads((out / "swap" / "seed1" / "summary.json").read_text())
    assert swa["models_averaged"] == 2                                  # one sample per cycle, W cycles
    assert swa["updates"]["start"] == swap_s["updates"]["phase1"]       # starts from SWAP's phase 1
    assert swa["wall_s"]["start"] == pytest.approx(swap_s["wall_s"]["phase1"])
    md = (out / "report.md").read_text()
    assert "swap (before averaging)" in md and "swap-extrap (before averaging)" in md and "Critical-path updates" in md
    assert (out / "report.png").stat().st_size > 10_000
    # a second invocation reuses every finished run
    mtime = (out / "swap" / "seed0" / "summary.json").stat().st_mtime
    assert main(args) == 0
    assert (out / "swap" / "seed0" / "summary.json").stat().st_mtime == mtime
    # without sgd-small there is no target: the table says so instead of failing
    alone = build_report(out, ["swap"], 2)
    assert alone["target_acc"] is None and alone["rows"][0]["reached"] == 0
    assert "| swap |" in compare_table(alone) and "no target (sgd-small not run)" in compare_table(alone)


def test_equal_time_gives_each_baseline_the_references_critical_path_updates(tmp_path, real_fashion, capsys):
    """``--equal-time swap``: the reference runs first in each seed; sgd-large and ema-large (its EMA,
    with the last iterate beside it) each train exactly SWAP's critical-path updates of that seed,
    their LR schedule ending there; the report and its table say so; a finished baseline of another
    budget is refused in one line."""
    out = tmp_path / "cmp"
    args = ["compare", "--config", "fashion_mnist_compare", "--seeds", "1", "--methods", "sgd-large,ema-large,swap",
            "--out", str(out), "--data-dir", str(real_fashion), "--procs", "1", "--equal-time", "swap",
            "--set", "data.train_subset=1024", "--set", "data.test_subset=300", "--set", "workers=2",
            "--set", "phase1.batch_size=256", "--set", "phase1.max_epochs=2", "--set", "phase1.warmup_epochs=1",
            "--set", "phase1.stop_acc=99", "--set", "phase2.epochs=1", "--set", "phase2.layout=sequential",
            "--set", "sgd_large.batch_size=256", "--set", "sgd_large.micro_batch_size=0",
            "--set", "sgd_large.warmup_epochs=1", "--set", "ema.decay=0.9"]
    assert main(args) == 0
    swap_s = json.loads((out / "swap" / "seed0" / "summary.json").read_text())
    budget = swap_s["updates"]["critical_path"]
    assert budget == 2 * (1024 // 256) + 1024 // 128                 # phase 1 + one worker's phase 2
    for method in ("sgd-large", "ema-large"):
        s = json.loads((out / method / "seed0" / "summary.json").read_text())
        assert s["updates"]["critical_path"] == budget and s["samples"] == budget * 256
        records = [json.loads(x) for x in (out / method / "seed0" / "metrics.jsonl").read_text().splitlines()]
        last = [r for r in records if r["phase"] == "sgd"][-1]
        assert last["update"] == budget and last["epoch"] == -(-budget // 4)      # the last epoch cut short
    ema = json.loads((out / "ema-large" / "seed0" / "summary.json").read_text())
    plain = json.loads((out / "sgd-large" / "seed0" / "summary.json").read_text())
    assert ema["test_acc"]["last_iterate"] == plain["test_acc"]["final"]   # the same trajectory; the EMA beside it
    assert ema["average"]["samples"] == budget
    report = json.loads((out / "report.json").read_text())
    assert report["equal_time"] == {"reference": "swap", "updates": [budget]}
    assert [r["method"] for r in report["rows"]] == ["sgd-large", "ema-large", "swap"]
    assert "last_iterate" in report["rows"][1] and "last_iterate" not in report["rows"][0]
    md = (out / "report.md").read_text()
    assert "ema-large (last iterate)" in md and f"swap's critical-path updates of the same seed ({budget} updates" in md
    assert (out / "report.png").stat().st_size > 10_000
    capsys.readouterr()
    other = [*args]
    other[other.index("--equal-time") + 1] = "7"
    assert main(other) == 2                                  # sgd-large was trained for another budget
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"was trained for {budget} updates, not the equal-time budget of 7" in err[0]
