"""LARS and LAMB (issue #24, first part): each step equals the papers' formulas written out tensor by
tensor (You et al. 2017, Alg. 1; You et al., ICLR 2020, Alg. 2), 1-D parameters are neither decayed
nor adapted, the trust clip caps the local LR, and a resumed optimizer continues bit for bit."""
from __future__ import annotations

import io

import pytest
import torch

from swap.config import SwapError
from swap.optim import LAMB, LARS


def _params(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(4, 3, generator=g, dtype=torch.float64).requires_grad_()
    bias = torch.randn(4, generator=g, dtype=torch.float64).requires_grad_()
    zero = torch.zeros(2, 2, dtype=torch.float64, requires_grad=True)       # a zero-initialised layer
    return [weight, bias, zero]


def _grads(step: int, seed: int = 0):
    g = torch.Generator().manual_seed(100 + 10 * seed + step)
    return [torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64),
            torch.randn(2, 2, generator=g, dtype=torch.float64)]


def _run(opt_cls, steps: int = 3, **kw):
    """The parameters after ``steps`` updates of ``opt_cls(params, **kw)`` on the fixed gradients."""
    return _run_with(lambda params: opt_cls(params, **kw), steps)


def _run_with(make, steps: int = 3):
    params = _params()
    opt = make(params)
    for t in range(steps):
        for p, g in zip(params, _grads(t)):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in params]


def _lars_by_hand(steps, lr, m, wd, eta, eps=1e-9, clip=False, nesterov=False):
    ws = [p.detach().clone() for p in _params()]
    bufs = [torch.zeros_like(w) for w in ws]
    for t in range(steps):
        for k, (w, g) in enumerate(zip(ws, _grads(t))):
            if w.ndim <= 1:                                   # bias: plain momentum SGD, no decay
                local, d = lr, g
            else:
                wn, gn = w.norm().item(), g.norm().item()
                ratio = eta * wn / (gn + wd * wn + eps) if wn > 0 and gn > 0 else 1.0
                local, d = lr * (min(ratio, 1.0) if clip else ratio), g + wd * w
            bufs[k] = m * bufs[k] + local * d
            ws[k] = w - (local * d + m * bufs[k] if nesterov else bufs[k])
    return ws


@pytest.mark.parametrize("clip, nesterov", [(False, False), (True, False), (False, True)])
def test_lars_is_algorithm_1_of_the_paper(clip, nesterov):
    kw = dict(lr=0.5, momentum=0.9, weight_decay=1e-2, trust_coefficient=0.02)
    got = _run(LARS, clip=clip, nesterov=nesterov, **kw)
    want = _lars_by_hand(3, 0.5, 0.9, 1e-2, 0.02, clip=clip, nesterov=nesterov)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_lars_trust_clip_caps_the_local_lr_at_the_global_lr():
    """With a trust coefficient so large that every ratio exceeds 1, the clipped weight matrix takes
    exactly the SGD step of the global LR (with decay); unclipped it moves further."""
    big = dict(lr=0.1, momentum=0.0, weight_decay=1e-3, trust_coefficient=100.0)
    w0, g = _params()[0].detach(), _grads(0)[0]
    clipped, free = _run(LARS, steps=1, clip=True, **big)[0], _run(LARS, steps=1, clip=False, **big)[0]
    torch.testing.assert_close(clipped, w0 - 0.1 * (g + 1e-3 * w0), rtol=1e-12, atol=1e-12)
    assert (free - w0).norm() > 10 * (clipped - w0).norm()


def _lamb_by_hand(steps, lr, b1, b2, eps, wd):
    ws = [p.detach().clone() for p in _params()]
    ms = [torch.zeros_like(w) for w in ws]
    vs = [torch.zeros_like(w) for w in ws]
    for t in range(1, steps + 1):
        for k, (w, g) in enumerate(zip(ws, _grads(t - 1))):
            ms[k] = b1 * ms[k] + (1 - b1) * g
            vs[k] = b2 * vs[k] + (1 - b2) * g * g
            r = (ms[k] / (1 - b1 ** t)) / ((vs[k] / (1 - b2 ** t)).sqrt() + eps)
            if w.ndim <= 1:                                   # bias: Adam's step, no decay, no trust ratio
                ws[k] = w - lr * r
                continue
            u = r + wd * w
            wn, un = w.norm().item(), u.norm().item()
            ws[k] = w - lr * (wn / un if wn > 0 and un > 0 else 1.0) * u
    return ws


def test_lamb_is_algorithm_2_of_the_paper():
    got = _run(LAMB, lr=0.01, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1)
    want = _lamb_by_hand(3, 0.01, 0.9, 0.99, 1e-6, 0.1)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_the_trust_ratio_makes_the_step_size_of_a_layer_proportional_to_its_weight_norm():
    """LAMB's defining property (You et al. 2020, Sec. 3): ||step|| = lr * ||x|| for an adapted
    tensor, whatever the gradient's scale."""
    for scale in (1e-3, 1.0, 1e3):
        w = torch.randn(5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_()
        before = w.detach().clone()
        w.grad = scale * torch.randn(5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        LAMB([w], lr=0.01).step()
        assert (w.detach() - before).norm().item() == pytest.approx(0.01 * before.norm().item(), rel=1e-10)


@pytest.mark.parametrize("opt_cls, kw", [(LARS, dict(lr=0.3, trust_coefficient=0.01)), (LAMB, dict(lr=0.01))])
def test_a_resumed_optimizer_continues_bit_for_bit(opt_cls, kw):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    data = [(torch.randn(16, 6), torch.randint(0, 3, (16,))) for _ in range(6)]

    def train(m, opt, batches):
        for x, y in batches:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
    opt = opt_cls(model.parameters(), **kw)
    train(model, opt, data[:3])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    train(model, opt, data[3:])
    saved = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    again = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    again.load_state_dict(saved["model"])
    opt2 = opt_cls(again.parameters(), **kw)
    opt2.load_state_dict(saved["opt"])
    train(again, opt2, data[3:])
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k


def test_bad_settings_are_one_line_errors():
    p = [torch.zeros(2, 2, requires_grad=True)]
    for make, key in ((lambda: LARS(p, trust_coefficient=-1), "trust_coefficient=-1"),
                      (lambda: LARS(p, momentum=1.0), "momentum=1.0"),
                      (lambda: LAMB(p, betas=(0.9, 1.0)), "betas=(0.9, 1.0)"),
                      (lambda: LAMB(p, weight_decay=-0.1), "weight_decay=-0.1")):
        with pytest.raises(SwapError, match=key.replace("(", r"\(").replace(")", r"\)")) as info:
            make()
        assert len(str(info.value).splitlines()) == 1


@pytest.mark.parametrize("foreach", [False, True])
def test_lars_equals_an_independent_implementation(foreach):
    """pytorch-optimizer's LARS keeps the LR outside the momentum buffer and has no eps; at a
    constant LR with eps 0 the two define the same update (a bias neither decayed nor adapted)."""
    import pytorch_optimizer
    kw = dict(lr=0.5, momentum=0.9, weight_decay=1e-2, trust_coefficient=0.02)
    ours = _run(LARS, eps=0.0, **kw)
    theirs = _run_with(lambda ps: pytorch_optimizer.LARS(ps, foreach=foreach, **kw))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-15)


@pytest.mark.parametrize("foreach", [False, True])
def test_lamb_equals_an_independent_implementation(foreach):
    """pytorch-optimizer's Lamb (with Adam's bias correction) adapts every tensor, adds eps at
    another place and decays decoupled; with eps 0, no weight decay and 1-D tensors adapted too, the
    two define the same update."""
    import pytorch_optimizer
    ours = _run(LAMB, lr=0.01, betas=(0.9, 0.99), eps=0.0, weight_decay=0.0, exclude_1d=False)
    theirs = _run_with(lambda ps: pytorch_optimizer.Lamb(ps, lr=0.01, betas=(0.9, 0.99), eps=0.0, weight_decay=0.0,
                                                          adam_debias=True, foreach=foreach))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)
