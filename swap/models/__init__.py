"""Model factories by name."""
from __future__ import annotations

from torch import nn

from .resnet import resnet9, small_cnn
from .resnet50 import resnet50, torchvision_model
from .transformer import CharTransformer, char_transformer

#: The built-in models by ``model.name``
MODELS = {"resnet9": resnet9, "smallcnn": small_cnn, "char-transformer": char_transformer, "resnet50": resnet50}


def build_model(name: str, num_classes: int, in_channels: int = 1, width: float = 1.0, **kwargs) -> nn.Module:
    """A freshly initialised model by name (``resnet9`` | ``smallcnn`` | ``resnet50`` (``init_bn0``
    in ``kwargs``) | ``torchvision:NAME`` for images (N, C, H, W); ``char-transformer`` for tokens
    (N, T), with ``seq_len`` in ``kwargs``).

    Raises:
        KeyError: unknown name (configs are validated before this is reached).
        SwapError: ``torchvision:NAME`` where torchvision cannot be imported or has no such model.
    """
    if name.startswith("torchvision:"):
        return torchvision_model(name.split(":", 1)[1], num_classes, in_channels)
    return MODELS[name](num_classes=num_classes, in_channels=in_channels, width=width, **kwargs)


def configured_model(model_cfg, num_classes: int, **kwargs) -> nn.Module:
    """The model of config section ``model`` (its name, width and, for ``resnet50``, ``init_bn0``)
    for ``num_classes``; ``kwargs`` are the data's (``in_channels``, a text model's ``seq_len``).

    Raises:
        SwapError: as :func:`build_model`.
    """
    extra = {"init_bn0": model_cfg.init_bn0} if model_cfg.name == "resnet50" else {}
    return build_model(model_cfg.name, num_classes, width=model_cfg.width, **kwargs, **extra)


__all__ = ["build_model", "configured_model", "resnet9", "small_cnn", "resnet50", "char_transformer", "CharTransformer", "MODELS"]
