"""Readers for CIFAR-10 and CIFAR-100 in their published "python version" format (Krizhevsky 2009).

CIFAR-10 (``cifar-10-batches-py/``): pickled dicts ``data_batch_1`` .. ``data_batch_5`` and
``test_batch``, each with ``b"data"`` (uint8, N x 3072, row = 1024 R, 1024 G, 1024 B values of a
32x32 image, row-major) and ``b"labels"`` (list of N ints in [0, 10)).
CIFAR-100 (``cifar-100-python/``): ``train`` and ``test`` with ``b"data"`` and ``b"fine_labels"``
(ints in [0, 100)).
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from ..config import SwapError

CIFAR10_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR10_TEST = ["test_batch"]


def read_cifar_batch(path: Path, label_key: bytes, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Read one pickled batch.

    Returns:
        images uint8 (N, 3, 32, 32), labels int64 (N,).
    Raises:
        SwapError: missing, truncated or unpickleable file; missing keys; wrong row length;
            image/label count mismatch; label out of range.
    """
    try:
        with open(path, "rb") as fh:
            batch = pickle.load(fh, encoding="bytes")
    except FileNotFoundError:
        raise SwapError(f"{path}: file missing") from None
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
        SwapError: as :func:`read_cifar_batch`.
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
