"""ResNet-9 of the DAWNBench "cifar10-fast" family (D. Page, "How to train your ResNet", 2018),
the network SWAP's CIFAR experiments use, and a small early-downsampling CNN for CPU presets.

Both nets are conv-BN-ReLU blocks with residual blocks, max-pooling, a global max-pool and a
bias-free linear head whose logits are multiplied by ``head_scale`` (0.125 in cifar10-fast).
"""
from __future__ import annotations

import torch
from torch import nn


def conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    """3x3 convolution (no bias: BN follows), BatchNorm, ReLU."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class Residual(nn.Module):
    """x + conv_bn(conv_bn(x)), channels unchanged."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(conv_bn(channels, channels), conv_bn(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Head(nn.Module):
    """Global max-pool, flatten, bias-free linear layer, logits scaled by ``scale``."""

    def __init__(self, channels: int, num_classes: int, scale: float):
        super().__init__()
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.linear = nn.Linear(channels, num_classes, bias=False)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.flatten(self.pool(x), 1)) * self.scale


def resnet9(num_classes: int = 10, in_channels: int = 3, width: float = 1.0, head_scale: float = 0.125) -> nn.Sequential:
    """ResNet-9: prep (64) -> stage 1 (128, pool, residual) -> stage 2 (256, pool) ->
    stage 3 (512, pool, residual) -> head. Channel counts are multiplied by ``width``.

    Input: float (N, in_channels, H, W), H and W >= 8 (28x28 and 32x32 both work).
    Output: logits float (N, num_classes). About 6.6M parameters at width 1, 3 input channels.
    """
    c = [max(1, round(k * width)) for k in (64, 128, 256, 512)]
    return nn.Sequential(
        conv_bn(in_channels, c[0]),
        conv_bn(c[0], c[1]), nn.MaxPool2d(2), Residual(c[1]),
        conv_bn(c[1], c[2]), nn.MaxPool2d(2),
        conv_bn(c[2], c[3]), nn.MaxPool2d(2), Residual(c[3]),
        Head(c[3], num_classes, head_scale),
    )


def small_cnn(num_classes: int = 10, in_channels: int = 1, width: float = 1.0, head_scale: float = 0.125) -> nn.Sequential:
    """A CPU-friendly net that downsamples early: conv 16 @ full size -> pool -> conv 32 -> pool ->
    residual block -> conv 64 -> head. About 43k parameters at width 1 on 28x28x1 (~5.9k samples/s
    training on 2 CPU cores, versus ~500 for a full-resolution ResNet).

    Input: float (N, in_channels, H, W). Output: logits float (N, num_classes).
    """
    c = [max(1, round(k * width)) for k in (16, 32, 64)]
    return nn.Sequential(
        conv_bn(in_channels, c[0]), nn.MaxPool2d(2),
        conv_bn(c[0], c[1]), nn.MaxPool2d(2), Residual(c[1]),
        conv_bn(c[1], c[2]),
        Head(c[2], num_classes, head_scale),
    )


__all__ = ["conv_bn", "Residual", "Head", "resnet9", "small_cnn"]
