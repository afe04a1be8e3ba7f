"""Phase 2 with periodic synchronisation (swap.algorithms.local_sgd): local SGD every update is
synchronous SGD, DiLoCo with outer LR 1 and no momentum is local SGD, and a resume in the middle of
a round continues bit for bit."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from swap import distributed
from swap.algorithms.local_sgd import OuterSync
from swap.cli import main
from swap.data import Augment, Loader
from swap.train import SGDStep, train

from conftest import ddp_rank_setup, train_quick

TOL = 1e-5      # float32: DDP averages gradients, local SGD weights (in float64); the rounding differs by
                # CPU model (measured 6e-8 on one AMD EPYC, 1.3e-6 on another); a meeting that did not
                # average would differ by the 1e-3 the weights move
LR = 0.01       # at 0.05 the two orders of rounding drift apart to 1e-5 in 4 updates (BN on 32 samples)


def local_against_synchronous(outer: str) -> dict:
    """Two ranks: 4 updates of local SGD (each rank a worker on its slice of the same global batch,
    meeting after every update) and, from the same start, 4 updates of DDP on the same global batches."""
    d, data, mean, std, model, wrapped = ddp_rank_setup(data_seed=2)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    loader = Loader(data, 64, (0, "phase2", 0), (mean, std), Augment(2, True, 0), (d.rank, d.world_size))

    def sgd(m):
        return torch.optim.SGD(m.parameters(), lr=LR, momentum=0.9, nesterov=True, weight_decay=5e-4)
    inner = sgd(model)
    meet = OuterSync(model, inner, 1, outer, 1.0, 0.0)
    train(SGDStep(model, inner), loader, lambda s: LR, epochs=2, callbacks=[meet])          # not DDP-wrapped
    local = {k: v.detach().clone() for k, v in model.named_parameters()}
    model.load_state_dict(start)
    train(SGDStep(wrapped, sgd(model)), loader, lambda s: LR, epochs=2)
    out = {"local": local, "sync": {k: v.detach().clone() for k, v in model.named_parameters()},
           "rounds": meet.rounds, "bytes": meet.bytes, "start": {k: v for k, v in start.items()}}
    gathered = distributed.all_gather_objects(out)
    distributed.teardown()
    return gathered


@pytest.mark.parametrize("outer", ["average", "nesterov"])
def test_meeting_after_every_update_is_synchronous_sgd(monkeypatch, outer):
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    ranks = distributed.launch(local_against_synchronous, 2, outer)
    r = ranks[0]
    assert r["rounds"] == 4 and r["bytes"] > 0
    for k in r["local"]:
        torch.testing.assert_close(r["local"][k], r["sync"][k], rtol=0, atol=TOL)
        assert torch.equal(ranks[0]["local"][k], ranks[1]["local"][k])          # the workers agree after a meeting
    assert max((r["local"][k] - r["start"][k]).abs().max().item() for k in r["local"]) > 1e-3    # it moved


def test_diloco_with_outer_lr_1_and_no_momentum_is_averaging():
    """Without a process group the workers' mean is this worker: an outer step with LR 1 and no
    momentum lands on it; with momentum the anchor overshoots along the outer gradient."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    meet = OuterSync(model, torch.optim.SGD(model.parameters(), lr=0.1), 2, "nesterov", 1.0, 0.0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    moved = [p.detach().clone() for p in model.parameters()]
    meet(1)
    assert meet.rounds == 0                                        # update 1 of a round of 2: no meeting
    meet(2)
    assert meet.rounds == 1 and all(torch.allclose(p, m, atol=1e-6) for p, m in zip(model.parameters(), moved))
    state = meet.state_dict()
    again = OuterSync(model, torch.optim.SGD(model.parameters(), lr=0.1), 2, "nesterov", 1.0, 0.0)
    again.load_state_dict(state)
    assert again.rounds == 1 and all(torch.equal(a, b) for a, b in zip(again.anchor, meet.anchor))
    with pytest.raises(ValueError):
        OuterSync(model, torch.optim.SGD(model.parameters(), lr=0.1), 0)


COMMON = ["--config", "fashion_mnist_quick", "--workers", "2", "--procs", "2",
          "--set", "data.train_subset=2048", "--set", "data.test_subset=300", "--set", "phase1.batch_size=512",
          "--set", "phase1.max_epochs=1", "--set", "phase1.warmup_epochs=1", "--set", "phase2.epochs=2",
          "--set", "phase2.batch_size=64", "--set", "phase2.sync_every=5"]


def test_diloco_counts_its_meetings_and_resumes_mid_round_bit_for_bit(tmp_path, real_fashion):
    """DiLoCo (inner AdamW, outer Nesterov 0.7 / 0.9, H = 5): 32 updates per worker per epoch, so the Ctrl-C after
    epoch 1 lands inside a round; the resumed run ends with the uninterrupted run's weights."""
    from test_resume import _stop_run
    args = ["train", *COMMON, "--method", "diloco", "--data-dir", str(real_fashion)]
    ref = tmp_path / "ref"
    assert main(args + ["--out", str(ref)]) == 0
    summary = json.loads((ref / "summary.json").read_text())
    comm = summary["communication"]
    assert comm["phase2"]["rounds"] == 2 * 32 // 5 and comm["phase2"]["bytes"] > 0 and comm["phase1"]["rounds"] == 4
    # DiLoCo's inner AdamW (Douillard et al. 2023: weight decay 0.1, betas (0.9, 0.95)): each worker keeps
    # its own moments across the meetings (never averaged), checkpointed with the worker
    assert summary["phase2_optimizer"] == "adamw"
    inner = [torch.load(ref / "checkpoints" / f"worker{w}_last.optim.pt", weights_only=True)["inner"] for w in (0, 1)]
    assert inner[0]["param_groups"][0]["betas"] == (0.9, 0.95) and inner[0]["param_groups"][0]["weight_decay"] == 0.1
    assert all(float(s["step"]) == 32 for s in inner[0]["state"].values())      # the checkpoint after epoch 1
    assert not torch.equal(inner[0]["state"][0]["exp_avg_sq"], inner[1]["state"][0]["exp_avg_sq"])
    assert summary["test_acc"]["averaged"] > summary["test_acc"]["phase1"] + 15     # phase 2 trained
    out = tmp_path / "run"
    _stop_run(args + ["--out", str(out)], out, "checkpoints/worker0_last.json", signal.SIGINT, to_group=True,
              delay_s=0.05)
    assert main(args + ["--out", str(out), "--resume"]) == 0
    for name in ("worker0", "worker1", "swap"):
        a, b = (load_file(str(d / "checkpoints" / f"{name}.safetensors")) for d in (ref, out))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert json.loads((out / "summary.json").read_text())["communication"] == comm




def test_the_plateau_rule_stops_after_the_first_small_gain_past_the_warm_up():
    from swap.stopping import Plateau
    rule = Plateau(window=2, min_gain=0.05, after_epoch=2)
    losses = [2.0, 1.99, 1.5, 1.2, 1.0, 0.99, 0.985]
    decisions = [rule(e, loss) for e, loss in enumerate(losses, start=1)]
    assert decisions == [False] * 6 + [True]          # epoch 7: 1.0 -> 0.985 over 2 epochs, a 1.5% gain
    assert rule.gain == pytest.approx((1.0 - 0.985) / 1.0)
    resumed = Plateau(window=2, min_gain=0.05, after_epoch=2, history=losses[:5])
    assert [resumed(6, 0.99), resumed(7, 0.985)] == [False, True]


def test_the_holdout_rule_stops_after_window_epochs_without_a_new_best_past_the_warm_up():
    from swap.stopping import HeldOutPeak
    accuracies = [50.0, 70.0, 69.0, 68.0, 75.0, 75.05, 74.0, 75.08, 75.0]
    rule = HeldOutPeak(window=3, min_delta=0.1, after_epoch=3)
    decisions = [rule(e, a) for e, a in enumerate(accuracies, start=1)]
    # epoch 4 is the third epoch without a new best, but inside the warm-up; 75.05 and 75.08 are
    # within min_delta of 75.0, so epochs 6, 7 and 8 count as no progress
    assert decisions == [False] * 7 + [True, True]
    assert (rule.best, rule.last) == (75.0, 75.0)
    resumed = HeldOutPeak(window=3, min_delta=0.1, after_epoch=3, history=accuracies[:6])
    assert [resumed(7, 74.0), resumed(8, 75.08)] == [False, True]


AUTO_MAX_EPOCHS = 9
AUTO = ["data.train_subset=2560", "data.holdout=512", "data.test_subset=500", "phase1.batch_size=512",
        f"phase1.max_epochs={AUTO_MAX_EPOCHS}", "phase1.warmup_epochs=2", "phase1.stop.metric=auto", "phase1.stop.window=2",
        "phase1.stop.every=2", "phase2.epochs=1", "phase2.batch_size=128", "phase2.layout=sequential"]


@pytest.mark.parametrize("signal_name, key", [("holdout", "val_acc"), ("trials", "trial_val_acc")])
def test_a_validation_switch_stops_where_its_rule_says_and_resumes_to_the_same_switch(tmp_path, real_fashion,
                                                                                     signal_name, key):
    """``phase1.stop.signal`` holdout and trials on 2 ranks: the switch epoch is the first where the
    recorded validation accuracies meet the rule; those are not test accuracies; the training set
    lost the held-out tail; trials come every 2 epochs after the warm-up and their updates are on
    the critical path; a run stopped by SIGTERM in phase 1 resumes to the same switch and weights."""
    from test_resume import _stop_run
    from swap.stopping import HeldOutPeak
    trial = 8                                                   # updates of each trial copy (a phase-2 epoch is 16)
    sets = [*AUTO, f"phase1.stop.signal={signal_name}", f"phase1.stop.trial_updates={trial}"]
    summary, records = train_quick(tmp_path / "ref", real_fashion, 2, *sets)
    phase1 = [r for r in records if r["phase"] == "phase1"]
    stop = summary["epochs"]["phase1"]
    assert summary["switch"]["rule"] == signal_name and summary["switch"]["epoch"] == stop == len(phase1)
    read = [r for r in phase1 if key in r]                      # no reading at phase 1's last epoch
    every = 1 if signal_name == "holdout" else 2
    assert [r["epoch"] for r in read] == [e for e in range(1, min(stop + 1, AUTO_MAX_EPOCHS))
                                          if signal_name == "holdout" or (e > 2 and e % every == 0)]
    rule = HeldOutPeak(window=2, min_delta=0.0, after_epoch=2)
    decisions = [rule(r["epoch"], r[key]) for r in read]
    assert decisions == [False] * (len(read) - 1) + [stop < AUTO_MAX_EPOCHS], decisions
    assert [r[key] for r in read] != [r["test_acc"] for r in read]
    assert summary["updates"]["phase1"] == stop * 2048 // 512            # 2,560 less the 512 held out
    trial_updates = len(read) * trial if signal_name == "trials" else 0
    assert summary["updates"].get("switch_trials", 0) == summary["switch"].get("trial_updates", 0) == trial_updates
    assert summary["updates"]["critical_path"] == stop * 4 + trial_updates + 2048 // 128
    if signal_name == "trials":
        assert all(r["trial_barrier"] == pytest.approx(sum(r["trial_copies_val_acc"]) / 2 - r[key]) for r in read)
    out = tmp_path / "run"
    args = ["train", "--config", "fashion_mnist_quick", "--workers", "2", "--procs", "2", "--data-dir", str(real_fashion),
            *[a for kv in sets for a in ("--set", kv)], "--out", str(out)]
    _stop_run(args, out, "checkpoints/phase1_last.json", signal.SIGTERM, to_group=False)
    assert main(args + ["--resume"]) == 0
    resumed = json.loads((out / "summary.json").read_text())
    assert {k: v for k, v in resumed["switch"].items() if k != "cost_s"} == \
        {k: v for k, v in summary["switch"].items() if k != "cost_s"}
    assert resumed["updates"] == summary["updates"]
    ref, got = (load_file(str(d / "checkpoints" / "swap.safetensors")) for d in (tmp_path / "ref", out))
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def test_trial_copies_leave_phase1_untouched_and_the_barrier_rule_switches_at_a_small_barrier(tmp_path, real_fashion):
    """Phase 1 with trials that never switch (patience 100) ends on the same weights, bit for bit, as
    phase 1 with no rule at all; with ``barrier`` and a 100-point threshold the switch comes at the
    first trial after the warm-up (epoch 4), and the barrier recorded is the copies' mean
    validation accuracy minus their midpoint's."""
    common = ["data.train_subset=2560", "data.holdout=512", "data.test_subset=500", "phase1.batch_size=512",
              "phase1.max_epochs=6", "phase1.warmup_epochs=2", "phase2.epochs=1", "phase2.batch_size=128",
              "phase1.stop.every=2", "phase1.stop.trial_updates=8", "phase2.layout=sequential"]
    # one process (the test above runs trials on 2 ranks)
    train_quick(tmp_path / "plain", real_fashion, 1, *common, "phase1.stop_acc=100")
    trials, records = train_quick(tmp_path / "trials", real_fashion, 1, *common, "phase1.stop.metric=auto",
                                  "phase1.stop.signal=trials", "phase1.stop.window=100")
    assert trials["epochs"]["phase1"] == 6 and trials["switch"]["trials"] == 1     # epoch 4 (6 is phase 1's last)
    a, b = (load_file(str(tmp_path / d / "checkpoints" / "phase1.safetensors")) for d in ("plain", "trials"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    barrier, records = train_quick(tmp_path / "barrier", real_fashion, 1, *common, "phase1.stop.metric=auto",
                                   "phase1.stop.signal=barrier", "phase1.stop.max_barrier=100")
    assert barrier["epochs"]["phase1"] == 4 and barrier["switch"]["trials"] == 1
    r = [r for r in records if r["phase"] == "phase1" and "trial_barrier" in r]
    assert len(r) == 1 and r[0]["trial_barrier"] == pytest.approx(sum(r[0]["trial_copies_val_acc"]) / 2
                                                                   - r[0]["trial_val_acc"])
    assert barrier["switch"]["last_barrier"] == r[0]["trial_barrier"] <= 100


def test_swap_with_the_automatic_switch_stops_where_its_rule_says_and_logs_the_noise_scale(tmp_path, real_fashion):
    """The plateau rule on 2 ranks: the switch comes at the first epoch whose gain is below min_gain;
    phase 1 logs the gradient noise scale (McCandlish et al. 2018) every epoch from DDP's all-reduce."""
    summary, records = train_quick(tmp_path / "run", real_fashion, 2, "data.train_subset=4096", "data.test_subset=300",
                                   "phase1.batch_size=512", "phase1.max_epochs=15", "phase1.warmup_epochs=2",
                                   "phase1.stop.metric=auto", "phase1.stop.signal=plateau", "phase2.epochs=1",
                                   "phase2.batch_size=128", "phase2.layout=sequential")   # phase 1 is tested here
    losses = [r["train_loss"] for r in records if r["phase"] == "phase1"]
    stop = summary["epochs"]["phase1"]
    assert summary["switch"]["rule"] == "plateau" and summary["switch"]["epoch"] == stop == len(losses)
    import yaml
    stop_cfg = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["phase1"]["stop"]
    k, min_gain = stop_cfg["window"], stop_cfg["min_gain"]                  # the gain over k epochs
    gains = {e: (losses[e - 1 - k] - losses[e - 1]) / losses[e - 1 - k] for e in range(k + 1, len(losses) + 1)}
    assert all(g >= min_gain for e, g in gains.items() if 2 < e < stop)     # no earlier epoch met the rule
    if stop < 15:
        assert gains[stop] < min_gain and summary["phase1_stopped_early"]
    scales = [r.get("noise_scale") for r in records if r["phase"] == "phase1"]
    assert len(scales) == stop and all(s is not None and 1 < s < 1e6 for s in scales), scales


def test_the_noise_scale_estimate_recovers_a_known_gradient_noise():
    """McCandlish et al. 2018, App. A: with |G|^2 = 4 and tr(Sigma) = 800, a batch of B has
    E|G_B|^2 = 4 + 800 / B; shares of 64 and a global batch of 256 give B_simple = 200."""
    from swap.noise_scale import NoiseScale
    noise = NoiseScale(256, 4, torch.device("cpu"))
    for _ in range(3):
        noise.local += 4 + 800 / 64                           # what the DDP hook adds: the rank's share
        noise.observe(torch.tensor((4 + 800 / 256) ** 0.5))    # the all-reduced gradient's norm
    assert noise.epoch_value() == pytest.approx(200.0) and noise.updates == 0
