"""Readers for CIFAR-10 and CIFAR-100 in their published "python version" format (Krizhevsky 2009).

CIFAR-10 (``cifar-10-batches-py/``): pickled dicts ``data_batch_1`` .. ``data_batch_5`` and
``test_batch``, each with ``b"data"`` (uint8, N x 3072, row = 1024 R, 1024 G, 1024 B values of a
32x32 image, row-major) and ``b"labels"`` (list of N ints in [0, 10)).
CIFAR-100 (``cifar-100-python/``): ``train`` and ``test`` with ``b"data"`` and ``b"fine_labels"``
(ints in [0, 100)).

The files are pickles, and a pickle can name any function to call while it loads: they are read
by :class:`BatchUnpickler`, which builds only what the format holds and refuses the rest before
calling anything.
"""
from __future__ import annotations

import codecs
# bandit B403 (pickle): batches are read by BatchUnpickler, which builds only the format's types
import pickle  # nosec B403
from pathlib import Path

import numpy as np
import torch

from ..errors import SwapError
from ..errors import printable


class Refused(pickle.UnpicklingError):
    """A pickle asked for an object that a CIFAR batch does not hold (``.name``: what it asked for)."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


def _latin1(text: str, encoding: str) -> bytes:
    """``_codecs.encode`` as pickle protocol 2 writes ``bytes`` under Python 3 (latin-1 only)."""
    if encoding not in ("latin1", "latin-1"):
        raise Refused(f"_codecs.encode(..., {encoding!r})")
    return codecs.encode(text, "latin1")


def _numpy_loaders() -> dict[tuple[str, str], object]:
    """The NumPy functions a pickled array, dtype or scalar is rebuilt by, under the module names
    that NumPy 1 (``numpy.core``) and NumPy 2 (``numpy._core``) write; taken from NumPy's own
    ``__reduce__`` so that they are the functions this NumPy pickles with."""
    array = np.zeros(1, np.uint8)
    made = {"multiarray": {"_reconstruct": array.__reduce__()[0], "scalar": np.uint8(0).__reduce__()[0]},
            "numeric": {"_frombuffer": array.__reduce_ex__(5)[0]}}
    loaders = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): _latin1}
    for module, names in made.items():
        for package in ("numpy.core", "numpy._core"):
            loaders.update({(f"{package}.{module}", name): fn for name, fn in names.items()})
    return loaders


class BatchUnpickler(pickle.Unpickler):
    """An unpickler that builds only what a CIFAR batch holds: dicts, lists, tuples, bytes,
    strings, numbers (pickle builds these without looking up any name) and NumPy arrays, dtypes
    and scalars (``_numpy_loaders``). Any other name a pickle asks for (``os.system``,
    ``builtins.eval``, a class of any package) raises :class:`Refused` before it is imported or
    called; persistent ids are refused by :class:`pickle.Unpickler` itself."""

    LOADERS = _numpy_loaders()

    def find_class(self, module: str, name: str):
        try:
            return self.LOADERS[(module, name)]
        except KeyError:
            raise Refused(f"{module}.{name}") from None

CIFAR10_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR10_TEST = ["test_batch"]


def read_cifar_batch(path: Path, label_key: bytes, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Read one pickled batch.

    Returns:
        images uint8 (N, 3, 32, 32), labels int64 (N,).
    Raises:
        SwapError: missing, truncated or unpickleable file; a pickle that asks for anything but
            the format's types (:class:`BatchUnpickler`); missing keys; wrong row length;
            image/label count mismatch; label out of range.
    """
    try:
        with open(path, "rb") as fh:
            batch = BatchUnpickler(fh, encoding="bytes").load()
    except FileNotFoundError:
        raise SwapError(f"{path}: file missing") from None
    except Refused as exc:
        raise SwapError(f"{path}: not a CIFAR batch (it asks to load {printable(exc.name)}); nothing in it was "
                        f"run. Fetch the data set again from its publisher") from None
    except Exception as exc:  # pickle raises many types on corrupt input
        raise SwapError(f"{path}: not a readable CIFAR batch ({type(exc).__name__}); the file is corrupt "
                        f"or truncated, fetch it again") from None
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        raise SwapError(f"{path}: CIFAR batch lacks b'data' or {label_key!r}")
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise SwapError(f"{path}: expected data of shape (N, 3072), found {data.shape}")
    if len(data) != len(labels):
        raise SwapError(f"{path}: {len(data)} images but {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise SwapError(f"{path}: label outside [0, {num_classes})")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar(root: Path, num_classes: int) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Load train and test splits from ``cifar-10-batches-py`` or ``cifar-100-python``.

    Returns:
        ((train_images uint8 (50000, 3, 32, 32), train_labels int64), (test_images, test_labels)).
    Raises:
        SwapError: as ``read_cifar_batch``.
    """
    if num_classes == 10:
        train_files, test_files, key = CIFAR10_TRAIN, CIFAR10_TEST, b"labels"
    else:
        train_files, test_files, key = ["train"], ["test"], b"fine_labels"

    def read(files):
        parts = [read_cifar_batch(root / f, key, num_classes) for f in files]
        return (torch.from_numpy(np.concatenate([p[0] for p in parts])),
                torch.from_numpy(np.concatenate([p[1] for p in parts])))

    return read(train_files), read(test_files)


__all__ = ["Refused", "BatchUnpickler", "CIFAR10_TRAIN", "CIFAR10_TEST", "read_cifar_batch", "load_cifar"]
