"""The method registry: each method's run config, batch checks and per-rank function."""
from __future__ import annotations

import json

import pytest

from swap.config import SwapError, load_config
from swap.methods import METHODS, get_method


def test_each_method_derives_its_run_config_from_the_users():
    cfg = load_config("fashion_mnist_compare", ["seed=5"])
    runs = {name: m.config(cfg, seed=2) for name, m in METHODS.items()}
    assert all(r.seed == 2 for r in runs.values()) and cfg.seed == 5          # a copy; the user's is untouched
    assert runs["sgd-small"].sgd == cfg.sgd_small
    assert runs["sgd-large"].sgd == cfg.sgd_large and runs["sgd-large"].sgd.optimizer == "sgd"
    assert runs["extrap-large"].sgd.batch_size == cfg.sgd_large.batch_size
    assert runs["extrap-large"].sgd.optimizer == "extrap" and cfg.sgd_large.optimizer == "sgd"
    assert runs["swap-extrap"].phase1.optimizer == "extrap" and runs["swap"].phase1.optimizer == "sgd"
    for name in ("sgd", "swap", "swa-large", "swa-lb-sb", "swa-small", "abs", "absa"):
        expected = load_config("fashion_mnist_compare", ["seed=2"])
        assert runs[name].to_dict() == expected.to_dict(), name


def test_batches_are_checked_against_the_processes_and_the_data():
    cfg = load_config("fashion_mnist_compare", ["sgd_small.batch_size=130", "phase2.batch_size=100"])
    with pytest.raises(SwapError, match="sgd_small.batch_size=130 is not divisible by the number of processes"):
        get_method("sgd-small").check(cfg, 4)
    get_method("sgd-large").check(cfg, 4)
    with pytest.raises(SwapError, match="phase2.batch_size=100 is not divisible"):
        get_method("swa-small").check(cfg, 8)
    with pytest.raises(SwapError, match="phase3.bn_batch_size=512 exceeds the 300 training samples"):
        get_method("swap").check(load_config("fashion_mnist_compare", ["phase1.batch_size=256",
                                                                        "phase2.batch_size=128"]), 2, 300)
    elastic = load_config("fashion_mnist_compare", ["abs.batch_size=127"])
    get_method("abs").check(elastic, 2)                                         # the elastic pool sizes itself
    with pytest.raises(SwapError, match="abs.batch_size=127"):
        get_method("absa").check(load_config("fashion_mnist_compare", ["abs.batch_size=127", "abs.elastic=false"]), 2)


def test_every_method_resolves_to_its_functions_and_checkpoint():
    for name, m in METHODS.items():
        assert callable(m.function()) and (m.driver is None or callable(m.function("driver")))
        assert m.summary in ("swap", "sgd", "swa", "abs")
        if m.start:
            assert m.start[0] in METHODS and list(METHODS).index(m.start[0]) < list(METHODS).index(name)
    with pytest.raises(SwapError, match="unknown method 'sgd-tiny'"):
        get_method("sgd-tiny")
    from swap.cli import build_parser
    choices = next(a for a in build_parser()._subparsers._group_actions[0].choices["train"]._actions
                   if a.dest == "method").choices
    assert list(choices) == [n for n, m in METHODS.items() if not m.start] == [
        "sgd", "sgd-small", "sgd-large", "swap", "extrap-large", "lars-large", "lamb-large", "adamw-large",
        "ema-large", "lawa-large", "swap-extrap", "swap-lars", "swap-lamb", "swap-cycles", "swap-ema", "swap-lawa",
        "local-sgd", "diloco", "abs", "absa"]
    compare = build_parser()._subparsers._group_actions[0].choices["compare"]
    assert compare.epilog == "methods: " + ", ".join(n for n in METHODS if n != "sgd")


@pytest.mark.parametrize("method, optimizer", [("lars-large", "lars"), ("swap-lamb", "lamb")])
def test_a_method_of_the_registry_trains_from_swap_train(tmp_path, real_fashion, capsys, method, optimizer):
    """Methods that were only reachable through `swap compare` run from `swap train --method`."""
    from swap.cli import main
    args = ["train", "--config", "fashion_mnist_quick", "--method", method, "--procs", "1",
            "--data-dir", str(real_fashion), "--out", str(tmp_path / "run"), "--set", "data.train_subset=1024",
            "--set", "data.test_subset=200", "--set", "lars_large.epochs=1", "--set", "lars_large.batch_size=256",
            "--set", "lars_large.warmup_epochs=0", "--set", "lamb_large.batch_size=256", "--set", "phase1.max_epochs=1",
            "--set", "phase1.warmup_epochs=0", "--set", "phase2.epochs=1", "--set", "phase1.batch_size=256"]
    assert main(args) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary.get("optimizer", summary.get("phase1_optimizer")) == optimizer, summary
    assert 10 < (summary["test_acc"].get("averaged") or summary["test_acc"]["final"]) <= 100


def test_the_large_batch_optimizer_methods_take_their_sections():
    """lars-large, lamb-large, adamw-large train their own sections (batch, LR, optimizer); swap-lars
    and swap-lamb keep phase 1's batch and stopping rule with that section's optimizer, peak LR and
    settings; diloco's workers get inner AdamW unless phase2.optimizer was set."""
    from swap.config import load_config, optim_for
    cfg = load_config("fashion_mnist_compare", ["lars_large.peak_lr=6.0", "lars_large.optim={trust_clip: true}",
                                                "lamb_large.batch_size=1024"])
    for method, section, kind in (("lars-large", "lars_large", "lars"), ("lamb-large", "lamb_large", "lamb"),
                                  ("adamw-large", "adamw_large", "adamw"), ("sgd-large", "sgd_large", "sgd")):
        run = METHODS[method].config(cfg)
        assert run.sgd == getattr(cfg, section) and run.sgd.optimizer == kind
        assert METHODS[method].batches(cfg) == [(f"{section}.batch_size", getattr(cfg, section).batch_size)]
    lars = METHODS["swap-lars"].config(cfg)
    assert (lars.phase1.optimizer, lars.phase1.peak_lr, lars.phase1.batch_size) == ("lars", 6.0, cfg.phase1.batch_size)
    assert optim_for(lars, "phase1").trust_clip and lars.phase1.stop_rule() == cfg.phase1.stop_rule()
    assert METHODS["swap-lamb"].config(cfg).phase1.optimizer == "lamb" and cfg.phase1.optimizer == "sgd"
    diloco = METHODS["diloco"].config(cfg)
    assert (diloco.phase2.optimizer, diloco.phase2.peak_lr) == ("adamw", 1e-3)
    assert optim_for(diloco, "phase2").betas == [0.9, 0.95] and optim_for(diloco, "phase2").weight_decay == 0.1
    mine = METHODS["diloco"].config(load_config("fashion_mnist_compare", ["phase2.optimizer=lamb"]))
    assert (mine.phase2.optimizer, mine.phase2.peak_lr) == ("lamb", cfg.phase2.peak_lr)


def test_under_torchrun_the_cli_fits_and_checks_as_a_local_run(tmp_path, real_fashion, monkeypatch, capsys):
    """A rank started by torchrun fits the defaults the user did not set to the data (here ABS's
    largest batch to the 2048 samples) and refuses impossible batches, as a local run does."""
    from swap import methods
    from swap.cli import main
    seen = []
    monkeypatch.setattr(methods, "run_ranked", lambda name, spec, *flags: seen.append(spec.cfg))
    args = ["train", "--config", "fashion_mnist_quick", "--method", "abs", "--data-dir", str(real_fashion),
            "--out", str(tmp_path / "run"), "--set", "data.train_subset=2048", "--set", "abs.batch_size=64"]
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "2")):
        monkeypatch.setenv(key, value)
    assert main(args) == 0
    assert seen[0].abs.max_batch_factor == 32
    assert "abs fitted to the data: abs.max_batch_factor=32" in capsys.readouterr().err
    args[args.index("abs")] = "swap"
    assert main(args + ["--set", "phase1.batch_size=1001"]) == 2        # 1001 does not split over 2 ranks
    assert "not divisible by the number of processes" in capsys.readouterr().err and len(seen) == 1
