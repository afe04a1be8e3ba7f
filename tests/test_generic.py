"""Any model, any data, any loss (issue #15): the generic Dataset path keeps the fast path's
contract (permutation from the stream, rank slices of one global batch, exact mid-epoch resume with
random per-sample transforms), the task's loss and metrics, and refuses bad input before training."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

import swap
from swap import distributed
from swap.config import SwapError, load_config
from swap.data import ImageDataset, Loader
from swap.data.generic import DatasetLoader, check_sample
from swap.stopping import stop_reached
from swap.task import Task
from swap.train import SGDStep, evaluate_metrics, train


class Tabular(Dataset):
    """n rows of {"num": float (6,), "cat": int64 ()} -> class in 0..2, with a random per-sample
    jitter drawn from torch's global RNG (a transform the loader must replay exactly)."""

    def __init__(self, n: int = 256, seed: int = 0, jitter: float = 0.0):
        g = torch.Generator().manual_seed(seed)
        self.num = torch.randn(n, 6, generator=g)
        self.cat = torch.randint(0, 4, (n,), generator=g)
        self.y = ((self.num[:, 0] + 0.5 * self.cat.float()) > 0.6).long() + (self.num[:, 1] > 1.0).long()
        self.jitter = jitter

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        num = self.num[i] + self.jitter * torch.randn(6)
        return {"num": num, "cat": self.cat[i]}, self.y[i]


class TabularNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(4, 3)
        self.body = nn.Sequential(nn.Linear(9, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, num, cat):
        return self.body(torch.cat([num, self.emb(cat)], dim=1))


def weighted_ce(output, target):
    return nn.functional.cross_entropy(output, target, weight=torch.tensor([1.0, 2.0, 2.0]))


def test_same_permutation_as_the_fast_path_and_rank_slices_of_one_global_batch():
    data = Tabular(100)
    images = ImageDataset(torch.zeros(100, 1, 2, 2, dtype=torch.uint8), torch.arange(100), 100)
    fast = Loader(images, 20, (0, "phase1", 0), (torch.zeros(1), torch.ones(1)))
    generic = DatasetLoader(data, 20, (0, "phase1", 0))
    assert torch.equal(fast.plan(3)[0], generic.indices(3))
    whole = generic.indices(2)
    halves = [DatasetLoader(data, 20, (0, "phase1", 0), (r, 2)).indices(2) for r in range(2)]
    assert torch.equal(torch.cat(halves, dim=1), whole)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_mid_epoch_resume_replays_the_same_samples_and_random_transforms(num_workers):
    data = Tabular(96, jitter=0.5)
    full = list(DatasetLoader(data, 16, (0, "phase2", 1), num_workers=num_workers).epoch(1))
    again = list(DatasetLoader(data, 16, (0, "phase2", 1), num_workers=0).epoch(1, start=2))
    assert len(full) == 6 and len(again) == 4
    for (xa, ya), (xb, yb) in zip(full[2:], again):
        assert torch.equal(xa["num"], xb["num"]) and torch.equal(ya, yb)
    assert not torch.equal(full[0][0]["num"], data.num[:16])          # the jitter did apply
    other = list(DatasetLoader(data, 16, (0, "phase2", 1)).epoch(2))
    assert not torch.equal(other[0][0]["num"], full[0][0]["num"])      # and differs per epoch


def test_evaluate_metrics_known_values():
    class Fixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))

        def forward(self, x):
            return x + self.w
    logits = torch.tensor([[5.0, 1, 0, 0, 0, 0], [0, 5.0, 4, 0, 0, 0], [0, 3.0, 0, 0, 0, 5], [0, 1, 2, 3, 4, 5.0]])
    target = torch.tensor([0, 2, 1, 0])                           # top1: 1 of 4; top5: 3 of 4 (not the last)
    out = evaluate_metrics(Fixed(), [(logits, target)], Task(metrics=("top1", "top5", "loss")))
    assert out["top1"] == 25.0 and out["top5"] == 75.0
    assert abs(out["loss"] - nn.functional.cross_entropy(logits, target).item()) < 1e-6


def test_sequence_targets_count_per_token():
    logits = torch.zeros(2, 3, 5)
    logits[..., 1] = 1.0
    target = torch.tensor([[1, 1, 0], [1, 2, 1]])
    task = Task(metrics=("top1", "loss"))
    loss = task.loss(logits, target)
    m = task.batch_metrics(logits, target, loss)
    assert m["top1"][0].item() / m["top1"][1].item() == pytest.approx(100 * 4 / 6)
    assert m["top1"][1].item() == 6


def generic_steps(_: int = 0) -> list:
    """Two updates of a global batch of 64 on a generic dict-input dataset, on every rank."""
    d = distributed.setup("cpu")
    data = Tabular(128, seed=3, jitter=0.1)
    torch.manual_seed(0)
    model = TabularNet()
    wrapped = nn.parallel.DistributedDataParallel(model) if d.world_size > 1 else model
    loader = DatasetLoader(data, 64, (0, "phase1", 0), (d.rank, d.world_size))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    train(SGDStep(wrapped, opt, 32, task=Task(weighted_ce)), loader, lambda s: 0.1, epochs=1)
    out = distributed.all_gather_objects({k: v.detach().clone() for k, v in model.named_parameters()})
    distributed.teardown()
    return out


def test_two_processes_equal_one_on_a_generic_dataset(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    single = generic_steps()[0]                       # 1 process: micro-batches of 32
    ranks = distributed.launch(generic_steps, 2, 0)   # 2 processes x 32 samples
    for k, v in single.items():
        torch.testing.assert_close(ranks[0][k], v, rtol=0, atol=1e-5, msg=k)
        assert torch.equal(ranks[0][k], ranks[1][k])


def test_bad_input_is_one_line_before_training(tmp_path):
    class Triples(Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.zeros(3), 0, 1
    with pytest.raises(SwapError, match=r"pair \(input, target\)"):
        check_sample(Triples())
    cfg = {"workers": 2, "phase1": {"batch_size": 64, "max_epochs": 1, "warmup_epochs": 0},
           "phase2": {"epochs": 1, "batch_size": 32}}
    with pytest.raises(SwapError, match="scalar"):
        swap.train_swap(TabularNet, Tabular(128), Tabular(64, seed=1), cfg, out=tmp_path / "a",
                        loss_fn=lambda out, y: nn.functional.cross_entropy(out, y, reduction="none"))
    with pytest.raises(SwapError, match="unknown metric 'top3'"):
        swap.train_swap(TabularNet, Tabular(128), Tabular(64, seed=1), cfg, out=tmp_path / "b", metrics=["top3"])
    with pytest.raises(SwapError, match="cannot take a batch"):
        swap.train_swap(lambda: nn.Linear(3, 3), Tabular(128), Tabular(64, seed=1), cfg, out=tmp_path / "c")
    with pytest.raises(SwapError, match="never computed"):
        load_config(None, {"phase1": {"stop": {"metric": "test_acc", "at": 90}}})
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_stop_rule_directions():
    assert stop_reached("train_acc", 98.5, 98) and not stop_reached("train_acc", 97.0, 98)
    assert stop_reached("train_loss", 1.2, 1.3) and not stop_reached("train_loss", 1.4, 1.3)
    assert not stop_reached("train_loss", 0.1, None)
    cfg = load_config(None, {"phase1": {"stop": {"metric": "train_loss", "at": 1.3}}})
    assert cfg.phase1.stop_rule() == ("train_loss", 1.3)
    assert load_config(None, {"phase1": {"stop_acc": 95}}).phase1.stop_rule() == ("train_acc", 95.0)


def test_swap_on_a_tabular_dict_dataset_with_a_custom_loss_learns(tmp_path):
    cfg = {"workers": 2, "seed": 0, "threads": 1, "eval_every": 2, "channels_last": False,
           "phase1": {"batch_size": 64, "micro_batch_size": 0, "peak_lr": 0.2, "warmup_epochs": 1, "max_epochs": 6,
                      "stop": {"metric": "train_loss", "at": 0.3}},
           "phase2": {"epochs": 2, "batch_size": 16, "peak_lr": 0.05, "layout": "sequential"},
           "phase3": {"bn_batch_size": 64}}
    model, summary = swap.train_swap(TabularNet, Tabular(512, jitter=0.05), Tabular(256, seed=1), cfg,
                                     out=tmp_path / "run", loss_fn=weighted_ce, metrics=["top1", "loss"])
    acc = summary["test_acc"]["averaged"]
    assert acc > 80.0, summary["test_acc"]                 # chance is below 50% (3 unbalanced classes)
    assert summary["test_metrics"]["averaged"]["top1"] == acc
    assert summary["test_metrics"]["averaged"]["loss"] < 0.6
    assert 0 < summary["epochs"]["phase1"] <= 6 and len(summary["test_acc"]["workers"]) == 2
    records = [r for r in map(__import__("json").loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
               if r["phase"] == "phase2" and r["test_acc"] is not None]
    assert all("test_loss" in r for r in records)


def test_library_metrics_are_reported_on_the_image_fast_path_too(tmp_path):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (256, 1, 8, 8), generator=g, dtype=torch.uint8)
    labels = (images.float().mean((1, 2, 3)) > 127.5).long() + 2 * (images[:, 0, 0, 0] > 127).long()

    def net():
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
    cfg = {"channels_last": False, "threads": 1, "data": {"crop_padding": 0, "cutout": 0, "flip": False},
           "sgd": {"batch_size": 32, "micro_batch_size": 0, "peak_lr": 0.1, "warmup_epochs": 0, "epochs": 2}}
    _, summary = swap.train_sgd(net, (images, labels), (images[:128], labels[:128]), cfg, out=tmp_path / "run",
                                metrics=["top1", "top5", "loss"])
    final = summary["test_metrics"]["final"]
    assert final["top1"] == summary["test_acc"]["final"] and final["top5"] == 100.0   # 4 classes: top-5 is all
    assert 0 < final["loss"] < 1.5


class PyNumpyJitter(Dataset):
    """A transform drawing from Python's random and NumPy's global RNG (as albumentations does)."""

    def __len__(self):
        return 64

    def __getitem__(self, i):
        import random

        import numpy as np
        return torch.tensor([float(i), random.random(), float(np.random.rand())]), torch.tensor(i % 3)


def test_python_and_numpy_transforms_replay_with_sample_rngs_all():
    import random

    full = list(DatasetLoader(PyNumpyJitter(), 16, (0, "phase2", 0), rngs="all").epoch(1))
    before = random.getstate()
    again = list(DatasetLoader(PyNumpyJitter(), 16, (0, "phase2", 0), rngs="all").epoch(1, start=2))
    assert random.getstate() == before                           # the caller's stream is left alone
    for (xa, _), (xb, _) in zip(full[2:], again):
        assert torch.equal(xa, xb)
    torch_only = list(DatasetLoader(PyNumpyJitter(), 16, (0, "phase2", 0)).epoch(1, start=2))
    assert not torch.equal(torch_only[0][0], again[0][0])         # the default seeds torch's RNG only
    with pytest.raises(SwapError, match="sample_rngs"):
        load_config(None, {"data": {"sample_rngs": "python"}})
