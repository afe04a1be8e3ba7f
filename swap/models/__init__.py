"""Model factories by name."""
from __future__ import annotations

from torch import nn

from .resnet import resnet9, small_cnn
from .transformer import CharTransformer, char_transformer

MODELS = {"resnet9": resnet9, "smallcnn": small_cnn, "char-transformer": char_transformer}


def build_model(name: str, num_classes: int, in_channels: int = 1, width: float = 1.0, **kwargs) -> nn.Module:
    """A freshly initialised model by name (``resnet9`` | ``smallcnn`` for images (N, C, H, W);
    ``char-transformer`` for tokens (N, T), with ``seq_len`` in ``kwargs``).

    Raises:
        KeyError: unknown name (configs are validated before this is reached).
    """
    return MODELS[name](num_classes=num_classes, in_channels=in_channels, width=width, **kwargs)


__all__ = ["build_model", "resnet9", "small_cnn", "char_transformer", "CharTransformer", "MODELS"]
