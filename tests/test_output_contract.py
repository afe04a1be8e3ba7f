"""Issue #25, items 1 and 2: the output contract (tensor, tuple, or a mapping with loss and/or logits
as a transformers ModelOutput is) and the data contract's single-mapping samples and batches (Hugging
Face rows and collator batches), without transformers installed: the models below return what a
transformers model returns."""
from __future__ import annotations

import json
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

import swap
from swap.config import SwapError
from swap.task import Task, class_targets, own_loss, prediction
from swap.train import _pass

from test_api import _quadrant_data


class Output(OrderedDict):
    """A ``transformers.utils.ModelOutput`` look-alike: an ordered dict whose keys are also attributes."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class Rows(Dataset):
    """Hugging Face style rows: one mapping per sample, ``labels`` among the model's inputs."""

    def __init__(self, n: int, seed: int):
        images, labels = _quadrant_data(n, seed)
        self.pixels, self.labels = images.float() / 255, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"pixel_values": self.pixels[i], "labels": self.labels[i]}


class Classifier(nn.Module):
    """``forward(pixel_values, labels=None)`` returning ``Output(loss=..., logits=...)``, its loss
    offset by 10 so that the run's recorded loss shows which loss was trained on."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 4))

    def forward(self, pixel_values, labels=None):
        logits = self.net(pixel_values)
        out = Output(logits=logits)
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels) + 10.0
        return Output(loss=out["loss"], logits=logits) if labels is not None else out


SMALL = {"workers": 2, "eval_every": 100, "data": {"crop_padding": 0, "flip": False, "cutout": 0},
         "phase1": {"batch_size": 128, "micro_batch_size": 64, "peak_lr": 0.4, "warmup_epochs": 1,
                    "max_epochs": 3, "stop": {"metric": "train_loss", "at": 10.2}},
         "phase2": {"batch_size": 32, "peak_lr": 0.05, "epochs": 1, "layout": "sequential"},
         "sgd": {"batch_size": 64, "micro_batch_size": 32, "peak_lr": 0.2, "epochs": 3}}


def test_a_model_output_with_its_own_loss_and_rows_as_mappings_train_without_a_wrapper(tmp_path):
    """Mapping rows collated by torch's default into a mapping batch; the model is called with
    ``model(**batch)`` and trained on the loss it returns (10 + cross-entropy: the records show it);
    top-1 comes from its logits against the batch's labels."""
    model, summary = swap.train_swap(Classifier, Rows(1024, 0), Rows(512, 1), SMALL, out=tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in records if r["phase"] in ("phase1", "phase2")]
    assert all(r["train_loss"] >= 10.0 for r in trained)                      # the model's own loss
    assert summary["test_acc"]["averaged"] > 90.0 and trained[-1]["train_acc"] > 90.0   # chance is 25%
    assert summary["test_metrics"]["averaged"]["loss"] == pytest.approx(10.0, abs=0.3)


def test_tuple_outputs_and_loss_only_outputs():
    logits = torch.randn(4, 3)
    target = torch.tensor([0, 2, 1, 1])
    assert prediction((logits, torch.zeros(1))) is logits and own_loss((logits,)) is None
    out = Output(loss=torch.tensor(1.5))
    assert prediction(out) is None and own_loss(out) == 1.5 and not class_targets(out, target)
    task = Task()
    assert task.loss(out, None) == 1.5                                    # no targets: its own loss
    metrics = task.batch_metrics(out, None, task.loss(out, None), samples=4)
    assert metrics["top1"][1] == 0 and metrics["loss"][1] == 4            # no accuracy, the loss over 4 samples
    with pytest.raises(SwapError, match="neither a loss nor logits"):
        task.loss(Output(hidden=torch.zeros(2)), target)
    with pytest.raises(SwapError, match="the batch has no targets"):
        task.loss(logits, None)


class TokenLM(nn.Module):
    """A bigram model without BN: per-token logits (B, T, V)."""

    def __init__(self, vocab: int = 11):
        super().__init__()
        self.emb = nn.Embedding(vocab, vocab)

    def forward(self, x):
        return self.emb(x)


def test_micro_batches_weight_a_mean_over_counted_tokens_by_their_count():
    """Targets of -100 do not count (torch's ignore index, Hugging Face's masks): two micro-batches
    with 12 and 2 counted tokens accumulate the gradient of the whole batch's mean over its 14 (weighting
    by samples would give the 2 tokens the weight of 12)."""
    torch.manual_seed(0)
    x = torch.randint(0, 11, (4, 6))
    y = torch.randint(0, 11, (4, 6))
    y[2:, 1:] = -100                                                      # micro-batch 2: 2 counted tokens
    whole, parts = TokenLM(), TokenLM()
    parts.load_state_dict(whole.state_dict())
    totals_whole = _pass(whole, x, y, 0, sync=True)
    totals_parts = _pass(parts, x, y, 2, sync=True)
    torch.testing.assert_close(parts.emb.weight.grad, whole.emb.weight.grad, rtol=1e-5, atol=1e-7)
    assert totals_parts[2] == totals_whole[2] == 14
    assert totals_parts[0] == pytest.approx(totals_whole[0].item(), rel=1e-6)     # the same loss sum
