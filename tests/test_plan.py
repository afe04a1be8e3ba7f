"""`swap plan`'s time model: its arithmetic on synthetic throughput tables, and a calibration run."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from swap.config import load_config
from swap.plan import Hardware, Measure, Throughput, calibrate, chunk_sizes, predict, update_s


def test_ring_allreduce_cost():
    assert Hardware(1).allreduce_s(10**9) == 0.0
    hw = Hardware(4, bandwidth=1e9, latency=1e-5)
    assert hw.allreduce_s(10**9) == pytest.approx(2 * 3 / 4 * 1.0 + 2 * 3 * 1e-5)


def test_throughput_lookup_interpolates_log_linearly():
    thr = Throughput({128: 1000.0, 512: 3000.0}, eval=9000.0, param_bytes=4)
    assert thr.train_at(128) == 1000.0 and thr.train_at(64) == 1000.0 and thr.train_at(4096) == 3000.0
    assert thr.train_at(256) == pytest.approx(2000.0)              # halfway in log2 between 128 and 512


def test_predictions_on_a_synthetic_table():
    cfg = load_config("fashion_mnist_compare", ["workers=8", "eval_every=1"])
    thr = Throughput({64: 1000.0, 128: 2000.0, 256: 4000.0, 1024: 4000.0}, eval=10000.0, param_bytes=4 * 10**6)
    hw = Hardware(2, bandwidth=1e9, latency=0.0)
    comm = 2 * 1 / 2 * 4e6 / 1e9                                     # 4 ms per all-reduce on 2 devices
    # one update of 2048 on 2 devices: share 1024 in micro-batches of 256 at 4000/s, plus the all-reduce
    assert update_s(thr, hw, 2048, 256) == pytest.approx(1024 / 4000 + comm)
    assert update_s(thr, hw, 128, 0) == pytest.approx(64 / 1000 + comm)          # share 64 at 1000/s
    pred = predict(cfg, thr, hw, n_train=60000, n_test=10000, phase1_epochs=12)
    small = pred["sgd-small"]
    assert small["updates"] == 10 * (60000 // 128)
    assert small["train_s"] == pytest.approx(small["updates"] * (64 / 1000 + comm))
    assert small["eval_s"] == pytest.approx(10 * 10000 / 10000 / 2)          # sharded evaluation
    swap = pred["swap"]
    assert swap["phase1_s"] == pytest.approx(12 * (60000 // 2048) * (1024 / 4000 + comm) + 12 * 10000 / 10000 / 2)
    # 8 workers on 2 devices: 4 rounds of one worker's 2 epochs at batch 128 (no communication)
    assert swap["phase2_s"] == pytest.approx(4 * (2 * (60000 // 128) * 128 / 2000 + 2 * 1.0))
    assert swap["total_s"] == pytest.approx(swap["phase1_s"] + swap["phase2_s"] + swap["phase3_s"])
    assert swap["updates"] == 12 * (60000 // 2048) + 2 * (60000 // 128)
    # more devices: phase 2 needs fewer rounds, so SWAP's prediction falls
    assert predict(cfg, thr, Hardware(8, 1e9, 0.0), 60000, 10000, 12)["swap"]["phase2_s"] < swap["phase2_s"] / 3


def test_stacked_phase2_is_one_computation_per_update():
    """phase2.layout vmap: k = ceil(W / D) workers stacked on each device, each update k x 128
    samples at the rate measured for k stacked workers; each worker is still evaluated."""
    cfg = load_config("fashion_mnist_compare", ["workers=8", "eval_every=1", "phase2.layout=vmap"])
    thr = Throughput({128: 2000.0}, eval=10000.0, param_bytes=4, stacked={4: 6000.0})
    swap = predict(cfg, thr, Hardware(2), n_train=60000, n_test=10000, phase1_epochs=12)["swap"]
    u2 = 2 * (60000 // 128)
    assert swap["phase2_s"] == pytest.approx(u2 * 4 * 128 / 6000 + 4 * 2 * 1.0)
    sequential = predict(load_config("fashion_mnist_compare", ["workers=8", "eval_every=1"]), thr, Hardware(2),
                         60000, 10000, 12)["swap"]
    assert sequential["phase2_s"] == pytest.approx(4 * (u2 * 128 / 2000 + 2 * 1.0))  # 4 rounds at 2000/s
    assert swap["phase2_s"] < sequential["phase2_s"] / 2                            # 6000/s vs 2000/s
    with pytest.raises(ValueError, match="3 stacked workers"):                # W=8 on 3 devices: k = 3
        predict(cfg, thr, Hardware(3), 60000, 10000, 12)


def test_calibration_measures_each_size():
    cfg = load_config("fashion_mnist_compare")
    sizes = chunk_sizes(cfg, 2)
    assert sizes == sorted({64, 256, 128})
    thr = calibrate(lambda: nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10)), (1, 28, 28), 10, [16, 64],
                    Measure(torch.device("cpu"), samples=64, eval_batch=64))
    assert set(thr.train) == {16, 64} and all(v > 0 for v in thr.train.values()) and thr.eval > 0
    assert thr.param_bytes == (28 * 28 * 10 + 10) * 4
    assert thr.stacked == {}


def test_calibration_of_stacked_workers():
    model = lambda: nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))
    thr = calibrate(model, (1, 28, 28), 10, [16], Measure(torch.device("cpu"), samples=64, eval_batch=64),
                    stacked=(3, 16))
    assert set(thr.stacked) == {3} and thr.stacked[3] > 0


def test_a_piecewise_schedule_with_progressive_resizing_and_worker_groups():
    """The ImageNet preset on 16 devices: each segment's updates at its batch and image size (the
    rate scaled by pixels from the 224-px calibration), phase 2 as 2 workers of 8 devices each
    from epoch 22 of the small-batch schedule (one round), and the all-reduce over each group."""
    cfg = load_config("imagenet_paper")
    thr = Throughput({512: 100.0}, eval=1000.0, param_bytes=10**8, image_size=224)
    hw = Hardware(16, bandwidth=1e10, latency=0.0)
    n = 1_281_167

    def seconds(parts, devices):
        comm = Hardware(devices, 1e10, 0.0).allreduce_s(10**8)
        return sum(e * (n // b) * (b / devices / (100.0 * (224 / size) ** 2) + comm) for e, b, size in parts)
    pred = predict(cfg, thr, hw, n_train=n, n_test=50_000)
    p1 = [(5, 8192, 128), (9, 8192, 128), (2, 3584, 224), (6, 3584, 224)]
    p2 = [(5, 1792, 224), (5, 1792, 224), (1, 1024, 288), (2, 1024, 288)]         # epochs 22-27, 27-32, 32-33, 33-35
    swap = pred["swap"]
    assert swap["phase1_epochs"] == 22
    assert swap["phase1_s"] == pytest.approx(seconds(p1, 16) + 22 * 50_000 / 1000 / 16)
    assert swap["phase2_s"] == pytest.approx(seconds(p2, 8) + 13 * 50_000 / 1000)
    assert swap["updates"] == sum(e * (n // b) for e, b, _ in p1 + p2)
    assert pred["sgd-large"]["updates"] < pred["sgd-small"]["updates"]
    assert chunk_sizes(cfg, 16) == [64, 112, 128, 224, 256, 512] and chunk_sizes(cfg, 16, largest=8) == [8]
    # phase 1 stopped after 14 epochs: only its first two segments count
    assert predict(cfg, thr, hw, n, 50_000, phase1_epochs=14)["swap"]["phase1_s"] == \
        pytest.approx(seconds(p1[:2], 16) + 14 * 50_000 / 1000 / 16)
