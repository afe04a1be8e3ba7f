"""Your own code named in a config: ``package.module:function`` import paths (a model factory, a
dataset loader, a loss, a metric, a collate function, an optimizer), the one place they are
recognised and imported. The module is imported as ``python -m`` would: from the working directory
or ``PYTHONPATH``."""
from __future__ import annotations

import importlib
import sys

from .errors import SwapError, printable


def is_import_path(value) -> bool:
    """``package.module:function``: dotted identifiers, one colon (``torchvision:NAME`` is the
    model key's own form and is not one)."""
    if not isinstance(value, str) or value.startswith("torchvision:"):
        return False
    module, colon, name = value.partition(":")
    return bool(colon) and name.isidentifier() and all(part.isidentifier() for part in module.split("."))


# Packages of the optional extras: a module that needs one and lacks it is named with the extra to install
EXTRAS = {"transformers": "hf", "accelerate": "hf", "tensorboard": "tensorboard", "mlflow": "mlflow", "lightning": "lightning", "ray": "ray"}


def install_hint(exc: BaseException) -> str:
    """``"; pip install 'swap[EXTRA]'"`` when ``exc`` is a missing package of an optional extra, else ''."""
    name = getattr(exc, "name", None) if isinstance(exc, ModuleNotFoundError) else None
    extra = EXTRAS.get((name or "").split(".")[0])
    return f"; pip install 'swap[{extra}]'" if extra else ""


def import_object(path: str, where: str):
    """The callable that ``path`` (``package.module:function``) names; ``where`` (a config key such
    as ``model.name``) names it in errors.

    Raises:
        SwapError: the module cannot be imported, or has no such callable (one line, naming the
            module and the error).
    """
    module, _, name = path.partition(":")
    if "" not in sys.path and "." not in sys.path:            # as `python -m`: the working directory first
        sys.path.insert(0, "")
    try:
        obj = getattr(importlib.import_module(module), name)
    except Exception as exc:                                  # the user's module: any error while importing
        hint = install_hint(exc) or ("; give package.module:function, importable from the working directory "
                                     "or PYTHONPATH")
        raise SwapError(f"{where}={printable(path)}: cannot import it ({type(exc).__name__}: "
                        f"{printable(str(exc))}){hint}") from None
    if not callable(obj):
        raise SwapError(f"{where}={printable(path)} is not a function")
    return obj


__all__ = ["is_import_path", "EXTRAS", "install_hint", "import_object"]
