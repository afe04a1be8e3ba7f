"""A user's own model, data and metric as the CLI names them (``model.name: user_parts:Classifier``,
``data.name: user_parts:load``, ``task.metrics: [top1, loss, user_parts:errors]``): a model that
returns what a transformers model returns (a ModelOutput-like mapping with its own loss and logits)
and Hugging Face style rows (one mapping per sample, labels among the inputs). The tests folder is on
the path of the tests and of the processes they start."""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torch.utils.data import Dataset


def quadrant_data(n, seed):
    """Class k = the brightest of the four 4x4 quadrants of an 8x8 image: learnable, not trivial."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 120, (n, 1, 8, 8), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 4, (n,), generator=g)
    for k, (r, c) in enumerate([(0, 0), (0, 4), (4, 0), (4, 4)]):
        images[labels == k, :, r:r + 4, c:c + 4] += 100
    return images, labels


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
        images, labels = quadrant_data(n, seed)
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


def load(data_dir=None):
    """``data.name: user_parts:load``: (train_set, test_set)."""
    return Rows(1024, 0), Rows(512, 1)


def errors(output, target):
    """``task.metrics: [user_parts:errors]``: wrong predictions of a batch, as (sum, count)."""
    wrong = (output["logits"].argmax(-1) != target).sum()
    return wrong, target.numel()
