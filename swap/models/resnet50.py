"""ResNet-50 (He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition", CVPR 2016,
Table 1, the 50-layer column): a 7x7/2 stem with 3x3/2 max-pooling, then 3, 4, 6 and 3 bottleneck
blocks (1x1 reduce, 3x3, 1x1 expand x4) at 64, 128, 256 and 512 channels, a global average pool
and a linear head; 25.6 M parameters for 1000 classes. The stride sits on the 3x3 convolution of a
stage's first block ("ResNet v1.5", as in torchvision and the DAWNBench ImageNet runs), and a
projection (1x1 conv + BN) shortcut wherever the shape changes.

``init_bn0`` zero-initialises the scale of the last BN of every residual branch, so each block
starts as the identity (Goyal et al. 2017, "Accurate, Large Minibatch SGD", Sec. 5.1; the
``--init-bn0`` flag of the DAWNBench ImageNet schedule the SWAP paper's Table 3 uses).
"""
from __future__ import annotations

import torch
from torch import nn


class Bottleneck(nn.Module):
    """relu(x + bn(1x1 expand(relu(bn(3x3/stride(relu(bn(1x1 reduce(x))))))))), with a projection
    shortcut when the stride or the channel count changes."""
    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int = 1):
        super().__init__()
        c_out = width * self.expansion
        self.body = nn.Sequential(
            nn.Conv2d(c_in, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
        self.shortcut = (nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))
                         if stride != 1 or c_in != c_out else nn.Identity())
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


def resnet50(num_classes: int = 1000, in_channels: int = 3, width: float = 1.0, init_bn0: bool = False,
             blocks: tuple[int, ...] = (3, 4, 6, 3)) -> nn.Sequential:
    """ResNet-50 (module docstring); ``width`` multiplies every channel count, ``blocks`` the
    bottleneck blocks per stage (``(3, 4, 6, 3)``: ResNet-50; ``(3, 4, 23, 3)``: ResNet-101).

    Input: float (N, in_channels, H, W), H, W >= 32 for the full depth of downsampling (any size
    works: the pool is adaptive). Output: logits float (N, num_classes).
    Weights: He (fan-out) normal for convolutions, BN scale 1 and shift 0 (0 for the last BN of
    each residual branch with ``init_bn0``), PyTorch's default for the linear head.
    """
    base = [max(1, round(c * width)) for c in (64, 128, 256, 512)]
    stem = max(1, round(64 * width))
    layers: list[nn.Module] = [nn.Conv2d(in_channels, stem, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(stem),
                               nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2, padding=1)]
    c_in = stem
    for stage, (w, n) in enumerate(zip(base, blocks)):
        for j in range(n):
            layers.append(Bottleneck(c_in, w, stride=2 if stage > 0 and j == 0 else 1))
            c_in = w * Bottleneck.expansion
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes))
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    if init_bn0:
        for m in model.modules():
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.body[-1].weight)
    return model


def torchvision_model(name: str, num_classes: int, in_channels: int = 3, **_) -> nn.Module:
    """``torchvision.models.get_model(name, num_classes=...)``, freshly initialised, for
    ``model.name: torchvision:NAME`` (3-channel input only).

    Raises:
        SwapError: torchvision cannot be imported here, or has no model ``name``, or the data is not RGB.
    """
    from ..errors import SwapError
    try:
        import torchvision
    except Exception as exc:                  # ImportError, or its operators failing to register
        raise SwapError(f"model.name=torchvision:{name} needs torchvision, which cannot be imported here "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); use "
                        f"model.name=resnet50") from None
    if in_channels != 3:
        raise SwapError(f"torchvision:{name} takes RGB images; the data has {in_channels} channel(s)")
    try:
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    except (ValueError, KeyError) as exc:
        raise SwapError(f"torchvision has no model '{name}' ({exc})") from None


__all__ = ["Bottleneck", "resnet50", "torchvision_model"]
