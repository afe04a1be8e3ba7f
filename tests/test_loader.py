"""Loader: augmentation geometry, determinism of the streams, rank slices of the global batch."""
from __future__ import annotations

import pytest
import torch

from swap.data import Augment, ImageDataset, Loader, stream_seed


def _data(n=64, c=1, size=8):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, c, size, size), generator=g, dtype=torch.uint8)
    return ImageDataset(images, torch.arange(n) % 10, 10)


def test_crop_shift_matches_manual_padding():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4) + 1
    aug = Augment(crop_padding=1)
    params = {"shift": torch.tensor([[0, 2], [1, 1]]), "flip": torch.tensor([False, False]),
              "centre": torch.zeros(2, 2, dtype=torch.long)}
    out = aug.apply(x, params)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    assert torch.equal(out[0], padded[0, :, 0:4, 2:6])   # shift (dy, dx) = (0, 2)
    assert torch.equal(out[1], x[1])                     # shift (1, 1) = the original image
    rgb = torch.rand(2, 3, 5, 5)                          # every channel shifted alike
    out3 = aug.apply(rgb, params)
    assert torch.equal(out3[0], torch.nn.functional.pad(rgb, (1, 1, 1, 1))[0, :, 0:5, 2:7])


def test_flip_and_cutout():
    x = torch.ones(3, 2, 8, 8)
    aug = Augment(flip=True, cutout=4)
    params = {"shift": torch.zeros(3, 2, dtype=torch.long), "flip": torch.tensor([True, False, False]),
              "centre": torch.tensor([[4, 4], [0, 0], [7, 7]])}
    out = aug.apply(x, params)
    assert (out[0] == 0).sum() == 2 * 16                  # full 4x4 square in each channel
    assert torch.equal(out[0, :, 2:6, 2:6], torch.zeros(2, 4, 4))
    assert (out[1] == 0).sum() == 2 * 4                   # clipped at the top-left corner: 2x2
    assert (out[2] == 0).sum() == 2 * 9                   # clipped at the bottom-right: rows/cols 5..7
    y = torch.arange(8.0).expand(1, 1, 8, 8).clone()
    flipped = Augment(flip=True).apply(y, {"flip": torch.tensor([True]), "shift": torch.zeros(1, 2, dtype=torch.long),
                                           "centre": torch.zeros(1, 2, dtype=torch.long)})
    assert torch.equal(flipped[0, 0, 0], torch.arange(7.0, -1, -1))


def test_streams_are_deterministic_and_distinct():
    data = _data()
    mean, std = data.channel_stats()
    a = Loader(data, 16, (0, "phase2", 0), (mean, std), Augment(2, True, 4))
    b = Loader(data, 16, (0, "phase2", 0), (mean, std), Augment(2, True, 4))
    c = Loader(data, 16, (0, "phase2", 1), (mean, std), Augment(2, True, 4))
    xa = torch.cat([x for x, _ in a.epoch(3)])
    assert torch.equal(xa, torch.cat([x for x, _ in b.epoch(3)]))
    assert not torch.equal(xa, torch.cat([x for x, _ in c.epoch(3)]))      # worker 1: own data order
    assert not torch.equal(xa, torch.cat([x for x, _ in a.epoch(4)]))      # next epoch: new order
    assert stream_seed(0, "phase2", 0, 3) != stream_seed(0, "phase2", 1, 3)


def test_rank_shares_concatenate_to_the_single_process_batch():
    data = _data(n=70)
    mean, std = data.channel_stats()
    whole = Loader(data, 32, (5, "phase1", 0), (mean, std), Augment(2, True, 4))
    shares = [Loader(data, 32, (5, "phase1", 0), (mean, std), Augment(2, True, 4), share=(r, 2))
              for r in range(2)]
    assert len(whole) == 2                                # 70 // 32: the partial batch is dropped
    for (x, y), (x0, y0), (x1, y1) in zip(whole.epoch(0), shares[0].epoch(0), shares[1].epoch(0)):
        assert torch.equal(x, torch.cat([x0, x1])) and torch.equal(y, torch.cat([y0, y1]))


def test_normalised_batches_have_zero_mean_unit_std():
    data = _data(n=256)
    mean, std = data.channel_stats()
    x = torch.cat([x for x, _ in Loader(data, 64, (0,), (mean, std)).epoch(0)])
    assert abs(x.mean().item()) < 1e-4 and abs(x.std().item() - 1) < 1e-2


def test_stacked_batches_are_each_workers_own_batches():
    """The vmap layout makes all workers' batches in one gather and one augmentation: bit for bit
    each worker's own loader's batch, also from a mid-epoch start and in channels_last."""
    from swap.algorithms.stacked import stacked_batches

    data = _data(n=100)
    mean, std = data.channel_stats()
    loaders = [Loader(data, 16, (0, "phase2", w), (mean, std), Augment(2, True, 4), channels_last=True)
               for w in range(3)]
    for start in (0, 2):
        got = list(stacked_batches(loaders, 1, start))
        want = list(zip(*(loader.epoch(1, start) for loader in loaders)))
        assert len(got) == len(want) == 6 - start
        for (x, y), per_worker in zip(got, want):
            assert x.shape == (3, 16, 1, 8, 8) and y.shape == (3, 16)
            for w, (xw, yw) in enumerate(per_worker):
                assert torch.equal(x[w], xw) and torch.equal(y[w], yw)


def test_evaluation_builds_no_autograd_graph():
    """evaluate() runs without autograd (its no_grad had slipped onto a neighbouring helper):
    no forward output requires grad, and the accuracy is the share of correct argmaxes."""
    from torch import nn

    from swap.train import evaluate

    data = _data(n=40)
    mean, std = data.channel_stats()
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    outputs = []
    model.register_forward_hook(lambda _m, _i, out: outputs.append(out))
    acc = evaluate(model, data, mean, std, batch_size=16)
    assert len(outputs) == 3 and not any(o.requires_grad for o in outputs)
    preds = torch.cat(outputs).argmax(1)
    assert acc == pytest.approx(100.0 * (preds == data.labels).float().mean().item())
