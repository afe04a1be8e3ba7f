"""Extrapolated SGD (Lin et al., ICML 2020): updates by hand on a quadratic, DDP equivalence,
BN statistics untouched by the extrapolated pass, and a short real-data run."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from swap import distributed
from swap.optim.extrap import ExtrapSGD, ExtrapStep
from swap.averaging import frozen_bn_stats
from swap.cli import main
from swap.data import ImageDataset, Loader
from swap.models import build_model
from swap.train import train

from conftest import ddp_rank_setup

LR, MOM, WD, GAMMA, SIGMA = 0.1, 0.9, 0.01, 0.5, 0.3
A = torch.tensor([[3.0, 0.5, 0.0], [0.5, 2.0, 0.2], [0.0, 0.2, 1.0]], dtype=torch.float64)
X0 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)


def _quadratic_steps(variant: str, steps: int = 3) -> torch.Tensor:
    """Steps of ExtrapSGD on f(x) = 1/2 x^T A x, gradients by autograd, as the train loop drives it."""
    x = nn.Parameter(X0.clone())
    opt = ExtrapSGD(torch.optim.SGD([x], lr=LR, momentum=MOM, nesterov=True, weight_decay=WD), variant,
                    gamma_ratio=GAMMA, sigma_ratio=SIGMA, generator=torch.Generator().manual_seed(7))
    for _ in range(steps):
        opt.zero_grad()
        if opt.needs_local_gradient:
            (0.5 * x @ A @ x).backward()
        opt.extrapolate()
        opt.zero_grad()
        (0.5 * x @ A @ x).backward()
        opt.step()
    return x.detach()


def _by_hand(variant: str, steps: int = 3) -> torch.Tensor:
    """The same updates written out: u from the variant, G = A (x + u), then Nesterov SGD from x."""
    x, buf, past = X0.clone(), None, None
    gen = torch.Generator().manual_seed(7)
    for _ in range(steps):
        if variant == "extragradient":
            u = -GAMMA * LR * (A @ x)
        elif variant == "past-gradient":
            u = torch.zeros(3, dtype=torch.float64) if past is None else -GAMMA * LR * past
        else:
            u = SIGMA * LR * torch.randn(3, generator=gen, dtype=torch.float64)
        g = A @ (x + u)
        past = g
        d = g + WD * x                                    # weight decay at x_t, not at x_t + u
        buf = d if buf is None else MOM * buf + d
        x = x - LR * (d + MOM * buf)                      # Nesterov
    return x


@pytest.mark.parametrize("variant", ["extragradient", "past-gradient", "gaussian"])
def test_quadratic_updates_equal_the_hand_computation(variant):
    torch.testing.assert_close(_quadratic_steps(variant), _by_hand(variant), rtol=0, atol=1e-12)


def test_zero_extrapolation_is_plain_sgd():
    x = nn.Parameter(X0.clone())
    y = nn.Parameter(X0.clone())
    ex = ExtrapSGD(torch.optim.SGD([x], lr=LR, momentum=MOM, nesterov=True, weight_decay=WD), "extragradient", 0.0)
    sgd = torch.optim.SGD([y], lr=LR, momentum=MOM, nesterov=True, weight_decay=WD)
    for _ in range(3):
        ex.zero_grad(); (0.5 * x @ A @ x).backward(); ex.extrapolate(); ex.zero_grad(); (0.5 * x @ A @ x).backward(); ex.step()
        sgd.zero_grad(); (0.5 * y @ A @ y).backward(); sgd.step()
    torch.testing.assert_close(x.detach(), y.detach(), rtol=0, atol=1e-12)


def _data():
    g = torch.Generator().manual_seed(3)
    return ImageDataset(torch.randint(0, 256, (128, 1, 28, 28), generator=g, dtype=torch.uint8),
                        torch.randint(0, 10, (128,), generator=g), 10)


def extrap_steps(_: int = 0) -> list:
    """Two extragradient updates of a global batch of 64 on every rank of the launch."""
    d, data, mean, std, model, wrapped = ddp_rank_setup(data_seed=3)
    loader = Loader(data, 64, (0, "phase1", 0), (mean, std), None, (d.rank, d.world_size))
    opt = ExtrapSGD(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4),
                    "extragradient", gamma_ratio=1.0)
    train(ExtrapStep(wrapped, opt), loader, lambda s: 0.1, epochs=1)
    out = distributed.all_gather_objects({k: v.detach().clone() for k, v in model.named_parameters()})
    distributed.teardown()
    return out


def test_two_processes_equal_one_process_averaging_the_rank_gradients(monkeypatch):
    """Reference: one process computes, for each rank's share r, G_r = grad f_r(x - gamma grad f_r(x))
    (a *local* extragradient per rank), averages the G_r and takes the SGD step."""
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    ranks = distributed.launch(extrap_steps, 2, 0)
    data = _data()
    mean, std = data.channel_stats()
    torch.manual_seed(0)
    model = build_model("smallcnn", 10, 1)
    params = list(model.parameters())
    sgd = torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    shares = [Loader(data, 64, (0, "phase1", 0), (mean, std), None, (r, 2)) for r in range(2)]
    for (x0, y0), (x1, y1) in zip(shares[0].epoch(0), shares[1].epoch(0)):
        start = [p.detach().clone() for p in params]
        grads = []
        for xs, ys in ((x0, y0), (x1, y1)):
            model.zero_grad()
            nn.functional.cross_entropy(model(xs), ys).backward()
            with torch.no_grad():
                for p in params:
                    p.add_(p.grad, alpha=-0.1)
            model.zero_grad()
            with frozen_bn_stats(model):
                nn.functional.cross_entropy(model(xs), ys).backward()
            grads.append([p.grad.clone() for p in params])
            with torch.no_grad():
                for p, s in zip(params, start):
                    p.copy_(s)
        for i, p in enumerate(params):
            p.grad = (grads[0][i] + grads[1][i]) / 2
        sgd.step()
    for (name, p) in model.named_parameters():
        torch.testing.assert_close(ranks[0][name], p.detach(), rtol=0, atol=1e-5, msg=name)   # measured ~1e-7
        assert torch.equal(ranks[0][name], ranks[1][name])


def test_bn_statistics_come_from_the_iterate_only():
    data = _data()
    mean, std = data.channel_stats()
    torch.manual_seed(0)
    model = build_model("smallcnn", 10, 1)
    reference = build_model("smallcnn", 10, 1)
    reference.load_state_dict(model.state_dict())
    loader = Loader(data, 128, (0, "x", 0), (mean, std))
    opt = ExtrapSGD(torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9), "extragradient", gamma_ratio=1.0)
    train(ExtrapStep(model, opt), loader, lambda s: 0.5, epochs=1)         # one update
    x, _ = next(iter(loader.epoch(0)))
    reference.train()
    with torch.no_grad():
        reference(x)                                                        # one forward at x_t
    for (name, a), b in zip(model.named_buffers(), reference.buffers()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_short_real_run_learns_and_records_the_variant(tmp_path, real_fashion):
    out = tmp_path / "run"
    assert main(["train", "--config", "fashion_mnist_quick", "--method", "sgd", "--procs", "1", "--out", str(out),
                 "--data-dir", str(real_fashion), "--set", "data.train_subset=2048", "--set", "data.test_subset=500",
                 "--set", "sgd.batch_size=256", "--set", "sgd.epochs=3", "--set", "sgd.peak_lr=0.2",
                 "--set", "sgd.optimizer=extrap", "--set", "extrap.variant=extragradient"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["optimizer"] == "extrap:extragradient" for r in records)
    assert records[-1]["train_loss"] < records[0]["train_loss"] - 0.2
    assert json.loads((out / "summary.json").read_text())["optimizer"] == "extrap"


def test_gaussian_noise_stream_survives_a_checkpoint():
    """The optimizer state carries the noise generator's position: a resumed gaussian run draws the
    perturbations the uninterrupted one would have drawn."""
    def fresh():
        p = nn.Parameter(torch.zeros(5))
        opt = ExtrapSGD(torch.optim.SGD([p], lr=0.1), "gaussian", sigma_ratio=1.0,
                        generator=torch.Generator().manual_seed(7))
        return p, opt

    p, opt = fresh()
    for _ in range(3):                               # advance the stream
        opt.extrapolate()
        p.grad = torch.zeros_like(p)
        opt.step()
    saved = opt.state_dict()
    opt.extrapolate()
    expected = p.detach().clone()                    # x_t + u for the 4th update
    q, resumed = fresh()
    with torch.no_grad():
        q.copy_(opt._x[0])                           # x_t of the 4th update
    resumed.load_state_dict(saved)
    resumed.extrapolate()
    assert torch.equal(q.detach(), expected)
