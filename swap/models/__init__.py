"""Model factories by name."""
from __future__ import annotations

from torch import nn

from .resnet import resnet9, small_cnn

MODELS = {"resnet9": resnet9, "smallcnn": small_cnn}


def build_model(name: str, num_classes: int, in_channels: int, width: float = 1.0) -> nn.Module:
    """A freshly initialised model by name (``resnet9`` | ``smallcnn``).

    Raises:
        KeyError: unknown name (configs are validated before this is reached).
    """
    return MODELS[name](num_classes=num_classes, in_channels=in_channels, width=width)


__all__ = ["build_model", "resnet9", "small_cnn", "MODELS"]
