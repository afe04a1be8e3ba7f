"""Reader for the IDX format of MNIST and Fashion-MNIST (LeCun et al.; Xiao, Rasul, Vollgraf 2017).

Format: big-endian. Magic number = 0x00 0x00 <type code> <ndim>, type code 0x08 = unsigned byte;
then ``ndim`` uint32 sizes; then the data, row-major. Image files have ndim 3 (N, 28, 28), label
files ndim 1 (N). Files may be gzip-compressed (``.gz``) or raw.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import math
import struct
import zlib
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from ..errors import SwapError

_UBYTE = 0x08
CHUNK = 1 << 24          # bytes read at a time (16 MiB)


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file of unsigned bytes.

    The header is read first and the data only up to the size it declares: a header announcing
    more than the file holds is refused from the file's size (raw) or when the stream ends
    (gzip), before any buffer of the announced size exists, and a gzip stream that inflates beyond
    the declared size (a decompression bomb) is refused after one byte more.

    The arrays read are kept per process, keyed by the file's bytes (a BLAKE2b digest: hashing
    costs a tenth of inflating Fashion-MNIST's 26 MB), for the ``CACHED`` (4) latest distinct
    files: a run's pre-launch check and its in-process rank, or a notebook's next run, read the
    same file again without inflating it; a file whose bytes changed is read anew.

    Returns:
        uint8 array of the shape the header declares, read-only (it may be shared by later reads;
        ``np.array(a)`` gives a writable copy).
    Raises:
        SwapError: unreadable/truncated gzip, bad magic number, wrong type code, or a payload
            shorter or longer than the header declares.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SwapError(f"{path}: cannot read ({exc}); the file is corrupt or truncated, fetch it again") from None
    key = (path.suffix == ".gz", len(raw), hashlib.blake2b(raw, digest_size=32).digest())
    if key in _cache:
        _cache.move_to_end(key)
        return _cache[key]
    array = _parse_idx(path, raw)
    array.setflags(write=False)
    _cache[key] = array
    while len(_cache) > CACHED:
        _cache.popitem(last=False)
    return array


CACHED = 4               # distinct IDX files kept per process (Fashion-MNIST's four: 55 MB)
_cache: OrderedDict[tuple, np.ndarray] = OrderedDict()


def _parse_idx(path: Path, raw: bytes) -> np.ndarray:
    """The array of an IDX file whose bytes are ``raw`` (see :func:`read_idx`)."""
    try:
        with (gzip.GzipFile(fileobj=io.BytesIO(raw), mode="rb") if path.suffix == ".gz" else io.BytesIO(raw)) as fh:
            head = fh.read(4)
            if len(head) < 4 or head[0] != 0 or head[1] != 0:
                raise SwapError(f"{path}: not an IDX file (bad magic number)")
            if head[2] != _UBYTE:
                raise SwapError(f"{path}: IDX type code 0x{head[2]:02x} is not unsigned byte (0x08)")
            ndim = head[3]
            sizes = fh.read(4 * ndim)
            if ndim == 0 or len(sizes) < 4 * ndim:
                raise SwapError(f"{path}: truncated IDX header")
            shape = struct.unpack(f">{ndim}I", sizes)
            expected = math.prod(shape)
            held = len(raw) - 4 - 4 * ndim if path.suffix != ".gz" else None
            if held is not None and held < expected:
                raise SwapError(f"{path}: IDX header declares {shape} = {expected} bytes but the file holds "
                                f"{held}; the file is truncated or corrupt")
            data = bytearray()
            while len(data) <= expected:                  # one byte past the declared size is enough to refuse
                chunk = fh.read(min(CHUNK, expected + 1 - len(data)))
                if not chunk:
                    break
                data += chunk
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise SwapError(f"{path}: cannot read ({exc}); the file is corrupt or truncated, fetch it again") from None
    if len(data) != expected:
        more = "more than" if len(data) > expected else f"{len(data)}, not"
        raise SwapError(f"{path}: IDX header declares {shape} = {expected} bytes but the file holds "
                        f"{more} that; the file is truncated or corrupt")
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)


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


__all__ = ["CACHED", "CHUNK", "read_idx", "load_idx_pair"]
