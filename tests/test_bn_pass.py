"""The BN-statistics pass on any training-set size: every sample counted once, no train-mode batch of
one sample (a BatchNorm1d layer cannot normalise one value per channel). The Lightning callback's
case (449 images at batch 32 on 2 ranks) is in tests/test_lightning.py."""
from __future__ import annotations

import pytest
import torch

import swap
from swap.data import Augment, ImageDataset, Loader
from swap.data.generic import DatasetLoader, eval_loader
from swap.data.loader import eval_batches, pass_slices

from test_generic import Tabular, TabularNet


@pytest.mark.parametrize("n, b", [(449, 32), (450, 32), (448, 32), (33, 32), (1, 8), (7, 8), (64, 64)])
def test_pass_slices_keep_every_sample_in_order_and_never_a_batch_of_one(n, b):
    parts = pass_slices(n, b)
    assert [i for p in parts for i in range(p.start, p.stop)] == list(range(n))
    sizes = [p.stop - p.start for p in parts]
    assert all(s == b for s in sizes[:-1]) and sizes[-1] <= b + 1
    assert 1 not in sizes or n == 1


def test_the_in_memory_pass_holds_every_sample_once_with_the_epochs_batches_first():
    images = torch.randint(0, 256, (449, 1, 8, 8), dtype=torch.uint8)
    data = ImageDataset(images, torch.arange(449), 449)
    loader = Loader(data, 32, (0, "phase3", 0), (torch.zeros(1), torch.ones(1)), Augment(crop_padding=2, flip=True))
    whole = list(loader.full_pass(0))
    assert [len(y) for _, y in whole] == [32] * 13 + [33]
    assert sorted(torch.cat([y for _, y in whole]).tolist()) == list(range(449))
    for (x, y), (x0, y0) in zip(whole, loader.epoch(0)):      # the epoch's 14 batches, then the 1-sample rest
        if len(y) == 32:
            assert torch.equal(x, x0) and torch.equal(y, y0)
    assert torch.equal(whole[-1][0][:32], x0) and torch.equal(whole[-1][1][:32], y0)


def test_the_generic_pass_and_evaluation_keep_every_sample():
    data = Tabular(449)
    rows = DatasetLoader(data, 32, (0, "phase3", 0)).full_pass(0)
    assert [len(r) for r in rows] == [32] * 13 + [33]
    assert sorted(torch.cat(rows).tolist()) == list(range(449))
    for rank in range(2):                            # a shard of 225 samples: 7 x 32 and a 1-sample rest
        sizes = [len(y) for _, y in eval_loader(data, 32, rank, 2)]
        assert sum(sizes) == (224, 225)[rank] and 1 not in sizes
    images = ImageDataset(torch.zeros(65, 1, 2, 2, dtype=torch.uint8), torch.arange(65), 65)
    assert [len(y) for _, y in eval_batches(images, 32, torch.zeros(1), torch.ones(1))] == [32, 33]


CONFIG = {"workers": 2, "threads": 1, "channels_last": False,
          "phase1": {"batch_size": 64, "micro_batch_size": 0, "peak_lr": 0.2, "warmup_epochs": 1, "max_epochs": 1,
                     "stop": {"metric": "train_loss", "at": 0.0}},
          "phase2": {"epochs": 1, "batch_size": 32, "peak_lr": 0.05, "layout": "sequential"},
          "phase3": {"bn_batch_size": 32}}


@pytest.mark.parametrize("procs", [1, 2])
def test_the_engines_bn_pass_counts_every_sample_of_a_set_that_leaves_one_over(tmp_path, procs):
    """449 rows, BN pass at batch 32 (14 batches and one sample over), BatchNorm1d, 1 and 2 ranks:
    the run ends, and the averaged model's BN statistics are those of a float64 pass over all 449."""
    data = Tabular(449)
    model, summary = swap.train_swap(TabularNet, data, Tabular(200, seed=1), CONFIG, out=tmp_path / "run", procs=procs)
    with torch.no_grad():
        x = torch.cat([data.num, model.emb(data.cat)], dim=1)
        h = model.body[0](x).double()
    bn = model.body[1]
    assert torch.allclose(bn.running_mean.double(), h.mean(0), rtol=0, atol=1e-5)
    assert torch.allclose(bn.running_var.double(), h.var(0), rtol=1e-5, atol=1e-6)
    assert int(bn.num_batches_tracked) == 14
