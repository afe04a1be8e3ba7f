"""Issue #24 wired in: every section's optimizer and its overrides, decay groups, clipping, the
schedule's minimum LR and warm-up in updates, per-group LR ratios, and the user's own optimizer
through the library."""
from __future__ import annotations

import json
import math
import pickle

import pytest
import torch
from torch import nn

import swap
from swap.config import SwapError, load_config, optim_for
from swap.context import Context
from swap.optim import LAMB, LARS, build_optimizer, param_groups
from swap.optim.extrap import ExtrapSGD
from swap.optim.lr import apply_lr, record_lr_scales
from swap.schedules import warmup_decay
from swap.train import Guard, SGDStep

import user_optim
from test_api import _quadrant_data, tiny_net


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 8),
                         nn.LayerNorm(8), nn.Linear(8, 3))


def test_each_section_builds_its_optimizer_with_its_own_overrides_and_the_published_defaults():
    cfg = load_config("fashion_mnist_quick", [
        "phase1.optimizer=lamb", "phase1.optim={weight_decay: 0.01}",
        "phase2.optimizer=adamw", "phase2.optim={weight_decay: 0.1, betas: [0.9, 0.95]}",
        "sgd.optimizer=lars", "optim.trust_clip=true", "sgd_large.optimizer=extrap"])
    model = _net()
    p1 = build_optimizer("lamb", model, optim_for(cfg, "phase1"))
    p2 = build_optimizer("adamw", model, optim_for(cfg, "phase2"))
    lars = build_optimizer("lars", model, optim_for(cfg, "sgd"))
    assert isinstance(p1, LAMB) and p1.param_groups[0]["weight_decay"] == 0.01 and p1.param_groups[0]["eps"] == 1e-6
    assert isinstance(p2, torch.optim.AdamW) and p2.param_groups[0]["betas"] == (0.9, 0.95)
    assert p2.param_groups[0]["weight_decay"] == 0.1 and p2.param_groups[0]["eps"] == 1e-8
    assert isinstance(lars, LARS) and lars.param_groups[0]["clip"] and lars.param_groups[0]["weight_decay"] == 5e-4
    assert optim_for(cfg, "sgd").weight_decay is None and cfg.optim.betas == [0.9, 0.999]   # overrides stay local
    # the defaults where the config says null: AdamW's and LAMB's 0.01, SGD's 5e-4 (the SWAP paper's)
    plain = load_config(None)
    assert build_optimizer("adamw", model, plain.optim).param_groups[0]["weight_decay"] == 0.01
    assert build_optimizer("sgd", model, plain.optim).param_groups[0]["weight_decay"] == 5e-4
    extrap = build_optimizer("extrap", model, plain.optim, plain.extrap, torch.Generator())
    assert isinstance(extrap, ExtrapSGD) and extrap.variant == plain.extrap.variant


def test_decay_groups_none_bn_and_norm_bias():
    model = _net()
    vectors = [p for p in model.parameters() if p.ndim == 1]
    bn = list(model[1].parameters())
    assert len(param_groups(model, 0.1, "none")) == 1
    for mode, undecayed in (("bn", bn), ("norm_bias", vectors)):
        decayed, free = param_groups(model, 0.1, mode)
        assert decayed["weight_decay"] == 0.1 and free["weight_decay"] == 0.0
        assert {id(p) for p in free["params"]} == {id(p) for p in undecayed}
        assert len(decayed["params"]) + len(free["params"]) == len(list(model.parameters()))
    # norm_bias leaves the conv and linear weights decayed: an AdamW step moves them by the decay
    opt = build_optimizer("adamw", model, load_config(None, {"optim": {"no_decay": "norm_bias", "weight_decay": 0.5}}).optim)
    apply_lr(opt, 0.1)
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b) == (p.ndim == 1)          # zero gradient: only decay moves a tensor


def test_min_lr_and_warmup_in_updates():
    lin, cos = warmup_decay(1.0, 0, 10, "linear", min_lr=0.1), warmup_decay(1.0, 0, 10, "cosine", min_lr=0.1)
    assert lin(0) == 1.0 and lin(5) == pytest.approx(0.55) and lin(10) == pytest.approx(0.1)
    assert cos(0) == 1.0 and cos(5) == pytest.approx(0.55) and cos(10) == pytest.approx(0.1)
    # min_lr 0 is the old schedule, bit for bit
    for shape in ("linear", "cosine"):
        a, b = warmup_decay(0.8, 30, 300, shape), warmup_decay(0.8, 30, 300, shape, 0.0)
        assert all(a(s) == b(s) for s in range(300))
    # warm-up in updates: 7 updates of a 10-update-per-epoch, 3-epoch schedule
    lr_at = Context.schedule(0.5, 0.0, 3, 10, "linear", min_lr=0.05, warmup_updates=7)
    assert [lr_at(s) for s in (0, 6)] == [pytest.approx(0.5 / 7), 0.5] and lr_at(30) == pytest.approx(0.05)
    with pytest.raises(ValueError, match="min_lr"):
        warmup_decay(0.1, 0, 10, min_lr=0.2)


def test_the_schedule_keeps_each_groups_lr_ratio():
    model = _net()
    opt = user_optim.two_group_adamw(param_groups(model, 0.0))
    record_lr_scales(opt)
    assert [g.get("lr_scale") for g in opt.param_groups] == [None, pytest.approx(0.1)]
    for lr in (0.0, 1e-3, 0.37):
        apply_lr(opt, lr)
        assert opt.param_groups[0]["lr"] == lr and opt.param_groups[1]["lr"] == pytest.approx(0.1 * lr, rel=1e-12)
    sgd = build_optimizer("sgd", model, load_config(None).optim)
    apply_lr(sgd, 0.3)
    assert all(g["lr"] == 0.3 and "lr_scale" not in g for g in sgd.param_groups)     # ours: exactly the schedule's


@pytest.mark.parametrize("micro", [0, 8])
def test_clipping_scales_the_whole_gradient_to_the_norm_and_the_guard_sees_it_before(micro):
    torch.manual_seed(0)
    x, y = torch.randn(16, 1, 8, 8) * 30, torch.randint(0, 3, (16,))
    ref = _net()
    work = pickle.loads(pickle.dumps(ref))
    # the whole update's gradient (micro-batches: each normalised by BN on its own, losses weighted by
    # their share), then torch's clip_grad_norm_ of it: the reference
    for xc, yc in zip(x.split(micro or 16), y.split(micro or 16)):
        (nn.functional.cross_entropy(ref(xc), yc) * len(yc) / 16).backward()
    norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
    assert norm > 0.5
    step = SGDStep(work, torch.optim.SGD(work.parameters(), lr=0.0), micro_batch_size=micro, clip_grad_norm=0.5)
    _, seen = step.gradients(x, y, 0.1)
    assert seen == pytest.approx(norm.item(), rel=1e-5)                   # what the divergence guard reads
    got = torch.nn.utils.get_total_norm([p.grad for p in work.parameters()])
    assert got == pytest.approx(0.5, rel=1e-5)
    for p, q in zip(work.parameters(), ref.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-7)     # micro-batches: the whole update's


def test_a_clipped_run_survives_a_spike_that_the_guard_alone_would_not_see():
    """Clipping bounds each update; the divergence guard still stops a run whose norm is non-finite
    or past divergence_grad_norm (before clipping), naming the new key."""
    model = _net()
    step = SGDStep(model, torch.optim.SGD(model.parameters(), lr=0.0), clip_grad_norm=1.0)
    x, y = torch.randn(8, 1, 8, 8) * 1e4, torch.randint(0, 3, (8,))
    loader = type("L", (), {"batch_size": 8, "__len__": lambda s: 1, "epoch": lambda s, e, start=0: iter([(x, y)])})()
    with pytest.raises(SwapError, match="limit divergence_grad_norm=1e-06.*optim.clip_grad_norm"):
        swap.train(step, loader, lambda s: 0.1, epochs=1, guard=Guard(1e-6))
    out = swap.train(step, loader, lambda s: 0.1, epochs=1, guard=Guard(1e12))
    assert math.isfinite(out["train_loss"])


# ---------------------------------------------------------------------------------- the user's optimizer
CONFIG = {"workers": 2, "eval_every": 100, "data": {"crop_padding": 0, "flip": False, "cutout": 0},
          "phase1": {"batch_size": 128, "micro_batch_size": 64, "peak_lr": 0.4, "warmup_epochs": 1,
                     "max_epochs": 4, "stop_acc": 99.0},
          "phase2": {"batch_size": 32, "peak_lr": 2e-3, "epochs": 2, "layout": "sequential"},
          "sgd": {"batch_size": 64, "micro_batch_size": 32, "peak_lr": 4e-3, "warmup_epochs": 1, "epochs": 3,
                  "schedule": "cosine", "min_lr": 4e-4}}


def test_train_sgd_with_the_users_adamw_keeps_its_group_lr_ratio_at_every_update(tmp_path):
    user_optim.SEEN.clear()
    model, summary = swap.train_sgd(tiny_net, _quadrant_data(1024, 0), _quadrant_data(512, 1), CONFIG,
                                    out=tmp_path / "run", optimizer=user_optim.two_group_adamw)
    assert summary["optimizer"] == "user:RecordingAdamW"
    assert len(user_optim.SEEN) == summary["updates"]["sgd"] == 3 * 1024 // 64
    assert all(b == pytest.approx(0.1 * a, rel=1e-12) and a > 0 for a, b in user_optim.SEEN)
    assert max(a for a, _ in user_optim.SEEN) == pytest.approx(4e-3) and user_optim.SEEN[-1][0] >= 4e-4
    assert summary["test_acc"]["final"] > 90.0                            # chance is 25%
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {r["optimizer"] for r in records if r["phase"] == "sgd"} == {"user:RecordingAdamW"}


def test_train_swap_takes_a_phase2_optimizer_of_the_users_and_keeps_phase1s(tmp_path):
    user_optim.SEEN.clear()
    model, summary = swap.train_swap(tiny_net, _quadrant_data(1024, 0), _quadrant_data(512, 1), CONFIG,
                                     out=tmp_path / "run", optimizer={"phase2": user_optim.two_group_adamw})
    assert (summary["phase1_optimizer"], summary["phase2_optimizer"]) == ("sgd", "user")
    assert len(user_optim.SEEN) == 2 * summary["updates"]["phase2_per_worker"] == 2 * 2 * 1024 // 32
    assert all(b == pytest.approx(0.1 * a, rel=1e-12) for a, b in user_optim.SEEN)
    assert summary["test_acc"]["averaged"] > 90.0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {r["optimizer"] for r in records if r["phase"] == "phase1"} == {"sgd"}
    assert {r["optimizer"] for r in records if r["phase"] == "phase2"} == {"user:RecordingAdamW"}


@pytest.mark.parametrize("optimizer, config, message", [
    ({"phase3": user_optim.two_group_adamw}, {}, "train_swap takes an optimizer for phase1 and phase2, not 'phase3'"),
    (lambda groups: torch.optim.AdamW(groups), {}, "cannot be sent to the worker processes"),
    (user_optim.two_group_adamw, {"phase2": {"layout": "vmap"}}, "phase2.optimizer your own, optim.no_decay none"),
    ("adamw", {}, "must be a function param_groups -> torch.optim.Optimizer"),
])
def test_a_users_optimizer_that_cannot_run_is_refused_before_any_work(tmp_path, optimizer, config, message):
    with pytest.raises(SwapError, match=message):
        swap.train_swap(tiny_net, _quadrant_data(256, 0), _quadrant_data(64, 1), config, out=tmp_path / "run",
                        optimizer=optimizer)
    assert not (tmp_path / "run").exists()


def test_a_users_optimizer_must_hold_every_parameter():
    from swap.optim import user_optimizer
    cfg = load_config(None)
    with pytest.raises(SwapError, match="leaves out 2 trainable parameter"):
        model = _net()                      # the conv layer's weight and bias are left out
        user_optimizer(lambda groups: torch.optim.SGD(list(model.parameters())[2:]), model, cfg.optim, "phase1")
    with pytest.raises(SwapError, match="must return a torch.optim.Optimizer"):
        user_optimizer(lambda groups: None, _net(), cfg.optim, "phase1")
