"""Model shapes and sizes."""
from __future__ import annotations

import torch

from swap.models import build_model


def test_resnet9_serves_both_input_sizes():
    for c, size in ((3, 32), (1, 28)):
        net = build_model("resnet9", 10, c)
        assert net(torch.randn(2, c, size, size)).shape == (2, 10)
    n = sum(p.numel() for p in build_model("resnet9", 10, 3).parameters())
    assert 6_500_000 < n < 6_700_000                   # the cifar10-fast ResNet-9 has ~6.57M


def test_width_multiplier_and_small_cnn():
    half = sum(p.numel() for p in build_model("resnet9", 100, 3, width=0.5).parameters())
    full = sum(p.numel() for p in build_model("resnet9", 100, 3).parameters())
    assert 0.2 < half / full < 0.3                     # conv weights scale with width^2
    small = build_model("smallcnn", 10, 1)
    assert 40_000 < sum(p.numel() for p in small.parameters()) < 46_000
    assert small(torch.randn(3, 1, 28, 28)).shape == (3, 10)
