"""LR schedules at warm-up start, peak and end."""
from __future__ import annotations

import pytest

from swap.errors import SwapError
from swap.schedules import cyclic, warmup_decay


def test_warmup_then_linear_decay():
    lr = warmup_decay(1.2, warmup_steps=30, total_steps=150)
    assert lr(0) == pytest.approx(1.2 / 30)            # ~0 at the first update
    assert lr(14) == pytest.approx(1.2 * 15 / 30)
    assert lr(29) == pytest.approx(1.2)                # peak at the end of warm-up
    assert lr(30) == pytest.approx(1.2)
    assert lr(90) == pytest.approx(0.6)                # half way down
    assert lr(149) == pytest.approx(1.2 / 120)
    assert lr(150) == 0.0                              # 0 at max epochs
    assert all(lr(s) >= lr(s + 1) for s in range(30, 150))


def test_no_warmup_starts_at_peak_and_cosine_shape():
    lr = warmup_decay(0.1, 0, 100, "cosine")
    assert lr(0) == pytest.approx(0.1)
    assert lr(50) == pytest.approx(0.05)
    assert lr(100) == pytest.approx(0.0, abs=1e-12)


def test_bad_schedule_arguments():
    with pytest.raises(ValueError):
        warmup_decay(0.1, 10, 5)
    with pytest.raises(ValueError):
        warmup_decay(0.1, 0, 10, "step")


def test_cyclic_reaches_min_at_cycle_end():
    lr = cyclic(0.05, 0.005, 10)
    assert lr(9) == pytest.approx(0.005) and lr(19) == pytest.approx(0.005)
    assert lr(10) == pytest.approx(0.05 - 0.045 / 10)
    assert lr(0) == lr(10) == lr(20)


def test_the_phase2_schedule_decays_from_the_peak_without_warm_up_or_stays_constant():
    """Phase 2 of the Trainer integrations: linear/cosine are warmup_decay with no warm-up (the peak
    at update 0, min_lr at the last), constant is the peak at every update; other shapes refused."""
    from swap.schedules import PHASE2_SHAPES, phase2_schedule, warmup_decay
    assert PHASE2_SHAPES == ("linear", "cosine", "constant")
    for shape in ("linear", "cosine"):
        lr, ref = phase2_schedule(0.1, 10, shape, 0.01), warmup_decay(0.1, 0, 10, shape, 0.01)
        assert [lr(s) for s in range(12)] == [ref(s) for s in range(12)]
        assert lr(0) == 0.1 and abs(lr(10) - 0.01) < 1e-12
    assert {phase2_schedule(0.1, 10, "constant")(s) for s in range(12)} == {0.1}
    with pytest.raises(SwapError, match="unknown schedule shape 'step'"):
        phase2_schedule(0.1, 10, "step")
