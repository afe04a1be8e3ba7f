"""Averages along one trajectory (swap.trajectory): EMA and LAWA against a hand computation over the
recorded weights, their BN pass before any evaluation, no evaluation before a first sample, and a
killed and resumed run that ends with the uninterrupted run's average, bit for bit."""
from __future__ import annotations

import json
import signal

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from swap import EMA, LAWA, SwapError, recompute_bn
from swap.callbacks import LoopState
from swap.cli import main
from swap.trajectory import Carried, evaluate_average

from test_resume import OPTIMIZED, SETTINGS, _kill_when, _stop_run


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))


def _trajectory(model: nn.Module, callbacks, updates: int = 20, per_epoch: int = 5) -> list[list[torch.Tensor]]:
    """Train ``model`` by SGD for ``updates`` updates, calling the callbacks' hooks as the loop does
    (``on_update_end`` after every update, ``on_updates_end`` after each epoch's last); return the
    parameters after every update (index u - 1 for update u), in float64."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    recorded = []
    for u in range(1, updates + 1):
        x, y = torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        recorded.append([p.detach().double().clone() for p in model.parameters()])
        state = LoopState(epoch=(u - 1) // per_epoch + 1, update=u)
        for cb in callbacks:
            cb.on_update_end(state)
            if u % per_epoch == 0:
                cb.on_updates_end(state)
    return recorded


@pytest.mark.parametrize("options", [
    {"decay": 0.9},                                               # every update from the first
    {"decay": 0.95, "start": 3, "every": 2},                      # from update 5 on, every second one
    {"decay": 0.99, "warmup_power": 0.75},                        # timm's decay warm-up
    {"half_life": 4.0, "every": 2},                               # Composer's half-life, in updates
])
def test_ema_equals_the_hand_computation_over_the_recorded_weights(options):
    model = _model()
    ema = EMA(model, **{"decay": 0.999, **options})
    recorded = _trajectory(model, [ema])
    start, every = options.get("start", 0), options.get("every", 1)
    decay = 0.5 ** (every / options["half_life"]) if "half_life" in options else options["decay"]
    hand, t = None, 0
    for u in range(1, len(recorded) + 1):
        if u <= start or (u - start) % every:
            continue
        w = recorded[u - 1]
        if hand is None:
            hand = [x.clone() for x in w]
        else:
            t += 1
            d = min(decay, 1 - (1 + t) ** -options["warmup_power"]) if "warmup_power" in options else decay
            hand = [d * a + (1 - d) * x for a, x in zip(hand, w)]
    assert ema.count == t + 1 == len([u for u in range(start + 1, 21) if (u - start) % every == 0])
    averaged = ema.averaged_model()
    for a, b in zip(averaged.parameters(), hand):
        assert torch.allclose(a.double(), b, rtol=0, atol=1e-6)
    # the model itself is untouched: it holds the last iterate
    assert all(torch.equal(p.double(), w) for p, w in zip(model.parameters(), recorded[-1]))
    assert not torch.equal(next(averaged.parameters()), next(model.parameters()))


@pytest.mark.parametrize("k, unit, every", [(3, "epochs", 1), (2, "epochs", 2), (4, "updates", 3)])
def test_lawa_is_the_mean_of_the_latest_k_snapshots(k, unit, every):
    model = _model()
    lawa = LAWA(model, k, every=every, unit=unit)
    recorded = _trajectory(model, [lawa], updates=20, per_epoch=5)
    taken = [u for u in range(1, 21) if (u % every == 0 if unit == "updates" else u % 5 == 0 and (u // 5) % every == 0)]
    assert lawa.count == len(taken)
    latest = [recorded[u - 1] for u in taken[-k:]]
    for i, p in enumerate(lawa.averaged_model().parameters()):
        total = latest[0][i].float().clone()
        for snap in latest[1:]:                                    # the same order of sums, in float32
            total += snap[i].float()
        assert torch.equal(p, total / len(latest))


def test_buffers_averaged_or_recomputed():
    """``buffers="average"`` averages the BN running statistics too; ``recompute`` leaves the model's
    (to be recomputed), and its parameters are the same."""
    a, b = _model(), _model()
    avg, rec = EMA(a, 0.5, buffers="average"), EMA(b, 0.5)
    _trajectory(a, [avg], updates=4)
    _trajectory(b, [rec], updates=4)
    ma, mb = avg.averaged_model(), rec.averaged_model()
    assert all(torch.equal(p, q) for p, q in zip(ma.parameters(), mb.parameters()))
    assert torch.equal(mb[1].running_mean, b[1].running_mean)          # the model's, to be recomputed
    assert not torch.equal(ma[1].running_mean, a[1].running_mean)      # averaged along the trajectory


def test_an_average_with_bn_is_evaluated_only_after_its_bn_pass():
    model = _model()
    ema = EMA(model, 0.8)
    _trajectory(model, [ema], updates=6)
    batches = [torch.randn(32, 4, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    seen = []

    def evaluate(m):
        seen.append(m[1].running_mean.clone())
        return {"top1": 50.0}

    averaged, tested = evaluate_average(ema, lambda m: recompute_bn(m, batches), evaluate)
    expected = recompute_bn(ema.averaged_model(), batches)       # the exact pass, independently
    assert tested == {"top1": 50.0} and len(seen) == 1
    assert torch.equal(seen[0], expected[1].running_mean)
    assert not torch.equal(seen[0], model[1].running_mean)        # not the last iterate's statistics
    # an average of buffers is evaluated as it is: no pass
    carried = EMA(model, 0.8, buffers="average")
    carried.update()
    evaluate_average(carried, lambda m: pytest.fail("a BN pass over averaged buffers"), evaluate)


def test_an_average_is_never_evaluated_before_its_first_sample():
    model = _model()
    ema = EMA(model, 0.9, start=50)                # the run ends before update 50
    lawa = LAWA(model, 3, unit="updates", every=7)
    _trajectory(model, [ema, lawa], updates=6)
    for average in (ema, lawa):
        assert average.count == 0
        assert evaluate_average(average, pytest.fail, pytest.fail) == (None, None)
        with pytest.raises(SwapError, match="before its first update"):
            average.averaged_model()


def test_the_checkpointed_state_restores_the_average():
    """``Carried`` puts the average beside the optimizer state; a new run restores both, and the
    two continue identically."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    lawa = LAWA(model, 3, unit="updates")
    _trajectory(model, [lawa], updates=5)
    state = Carried(opt, lawa).state_dict()
    other = LAWA(model, 3, unit="updates")
    Carried(torch.optim.SGD(model.parameters(), lr=0.1), other).load_state_dict(state)
    assert other.count == lawa.count == 5 and len(other.snapshots) == 3
    assert all(torch.equal(a, b) for a, b in zip(other.averaged(), lawa.averaged()))
    with pytest.raises(SwapError, match="does not match"):
        EMA(model).load_state_dict(lawa.state_dict())


def _weights(run, name):
    return load_file(str(run / "checkpoints" / f"{name}.safetensors"))


def _equal(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_killed_ema_run_resumes_to_the_uninterrupted_average(tmp_path, real_fashion):
    """``sgd.average: ema`` (every 2nd update after update 3: 5, 7, ..., 47 of 48; on the CPU): SIGKILL in epoch 2, resume;
    the average, the model and the summary equal the uninterrupted run's."""
    settings = [*OPTIMIZED, "--set", "sgd.average=ema", "--set", "ema.decay=0.9", "--set", "ema.start=3",
                "--set", "ema.every=2", "--set", "ema.device=cpu"]
    ref = tmp_path / "ref"
    assert main(["train", *settings, "--data-dir", str(real_fashion), "--out", str(ref)]) == 0
    out = tmp_path / "run"
    _kill_when(out, "checkpoints/sgd_last.json", real_fashion, 0.1, settings)
    assert not (out / "summary.json").exists()
    assert main(["train", *settings, "--data-dir", str(real_fashion), "--out", str(out), "--resume"]) == 0
    assert _equal(_weights(ref, "sgd_average"), _weights(out, "sgd_average"))
    assert _equal(_weights(ref, "sgd"), _weights(out, "sgd"))
    assert not _equal(_weights(ref, "sgd"), _weights(ref, "sgd_average"))
    s_ref, s_got = (json.loads((d / "summary.json").read_text()) for d in (ref, out))
    assert s_got["test_acc"] == s_ref["test_acc"] and s_ref["average"] == {"kind": "ema", "samples": 22,
                                                                            "test_acc": s_ref["test_acc"]["final"]}
    assert s_ref["test_acc"]["final"] > 40.0                   # it trained (10 classes), and the average is a model


def test_a_stopped_swap_with_per_worker_lawa_resumes_to_the_uninterrupted_average(tmp_path, real_fashion):
    """``phase2.average_along: lawa`` (a snapshot every 3 updates): Ctrl-C mid-epoch in phase 2 (a
    mid-epoch checkpoint with the snapshots so far), resume: the workers' averages and SWAP's average
    over them equal the uninterrupted run's, and each worker is its LAWA."""
    common = ["train", *SETTINGS, "--procs", "1", "--data-dir", str(real_fashion), "--set", "phase2.layout=sequential",
              "--set", "phase2.average_along=lawa",
              "--set", "lawa.unit=updates", "--set", "lawa.every=3", "--set", "lawa.k=3"]
    ref = tmp_path / "ref"
    assert main(common + ["--out", str(ref)]) == 0
    out = tmp_path / "run"
    _stop_run(common + ["--out", str(out)], out, "checkpoints/worker0_last.json", signal.SIGINT, to_group=True,
              delay_s=0.05)
    assert main(common + ["--out", str(out), "--resume"]) == 0
    assert _equal(_weights(ref, "swap"), _weights(out, "swap"))
    for w in (0, 1):
        assert _equal(_weights(ref, f"worker{w}"), _weights(out, f"worker{w}"))
        assert _equal(_weights(ref, f"worker{w}"), _weights(ref, f"worker{w}_average"))
    s = json.loads((ref / "summary.json").read_text())
    assert s["average_along"] == {"kind": "lawa", "samples": [5, 5]}        # 16 updates: after 3, 6, ..., 15
    assert len(s["test_acc"]["workers_last_iterate"]) == 2 and s["test_acc"]["averaged"] > 50.0


def test_the_library_returns_the_average_along_the_trajectory(tmp_path):
    """``train_sgd`` with ``sgd.average: lawa`` returns the LAWA model (``checkpoints/sgd_average``),
    not the last iterate; ``train_swap`` with ``phase2.average_along: ema`` averages the workers' EMAs."""
    import swap
    from test_optim_config import CONFIG, _quadrant_data, tiny_net
    cfg = {**CONFIG, "sgd": {**CONFIG["sgd"], "average": "lawa"}, "lawa": {"k": 2}}
    model, summary = swap.train_sgd(tiny_net, _quadrant_data(1024, 0), _quadrant_data(512, 1), cfg, out=tmp_path / "sgd")
    assert summary["average"]["kind"] == "lawa" and summary["average"]["samples"] == 3       # one per epoch
    assert _equal(model.state_dict(), _weights(tmp_path / "sgd", "sgd_average"))
    assert not _equal(model.state_dict(), _weights(tmp_path / "sgd", "sgd"))
    assert summary["test_acc"]["final"] > 90.0 and summary["test_acc"]["last_iterate"] > 90.0   # chance is 25%
    cfg = {**CONFIG, "phase2": {**CONFIG["phase2"], "average_along": "ema"}, "ema": {"decay": 0.9}}
    model, summary = swap.train_swap(tiny_net, _quadrant_data(1024, 0), _quadrant_data(512, 1), cfg, out=tmp_path / "swap")
    assert summary["average_along"] == {"kind": "ema", "samples": [64, 64]}
    for w in (0, 1):
        assert _equal(_weights(tmp_path / "swap", f"worker{w}"), _weights(tmp_path / "swap", f"worker{w}_average"))
    assert _equal(model.state_dict(), _weights(tmp_path / "swap", "swap")) and summary["test_acc"]["averaged"] > 90.0
