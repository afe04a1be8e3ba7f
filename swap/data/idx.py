"""Reader for the IDX format of MNIST and Fashion-MNIST (LeCun et al.; Xiao, Rasul, Vollgraf 2017).

Format: big-endian. Magic number = 0x00 0x00 <type code> <ndim>, type code 0x08 = unsigned byte;
then ``ndim`` uint32 sizes; then the data, row-major. Image files have ndim 3 (N, 28, 28), label
files ndim 1 (N). Files may be gzip-compressed (``.gz``) or raw.
"""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch

from ..config import SwapError

_UBYTE = 0x08


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file of unsigned bytes.

    Returns:
        uint8 array of the shape the header declares.
    Raises:
        SwapError: unreadable/truncated gzip, bad magic number, wrong type code, or a payload
            shorter or longer than the header declares.
    """
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise SwapError(f"{path}: cannot read ({exc}); the file is corrupt or truncated, fetch it again") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise SwapError(f"{path}: not an IDX file (bad magic number)")
    if raw[2] != _UBYTE:
        raise SwapError(f"{path}: IDX type code 0x{raw[2]:02x} is not unsigned byte (0x08)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise SwapError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise SwapError(f"{path}: IDX header declares {shape} = {expected} bytes but the file holds "
                        f"{len(raw) - header}; the file is truncated or corrupt")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def load_idx_pair(images_path: Path, labels_path: Path, num_classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Read an image file and its label file.

    Returns:
        images uint8 (N, 1, H, W), labels int64 (N,).
    Raises:
        SwapError: either file is bad, they disagree on N, dimensions are wrong, or a label is
            outside [0, num_classes).
    """
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3:
        raise SwapError(f"{images_path}: expected 3 dimensions (N, H, W), found {images.ndim}")
    if labels.ndim != 1:
        raise SwapError(f"{labels_path}: expected 1 dimension (N,), found {labels.ndim}")
    if len(images) != len(labels):
        raise SwapError(f"{images_path.name} holds {len(images)} images but {labels_path.name} "
                        f"holds {len(labels)} labels; the files do not belong together")
    if len(labels) and labels.max() >= num_classes:
        raise SwapError(f"{labels_path}: label {int(labels.max())} outside [0, {num_classes})")
    return (torch.from_numpy(images.copy()).unsqueeze(1),
            torch.from_numpy(labels.astype(np.int64)))
