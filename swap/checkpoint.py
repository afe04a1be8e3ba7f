"""Checkpoints: weights as safetensors plus a small JSON of metadata, written atomically.

``NAME.safetensors`` holds the state dict (parameters and BN buffers); ``NAME.json`` holds the
metadata (config hash, phase, worker, epoch, accuracy, a SHA-256 of the weights file, ...). Both
are written to a temporary file, fsynced and renamed, so a crash never leaves a half-written
checkpoint under the real name.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .config import SwapError


@contextlib.contextmanager
def atomic_path(path: Path):
    """Yield a temporary path beside ``path``; when the block succeeds, fsync it and rename it to
    ``path``. When the block (or the fsync or rename) fails, e.g. on a full disk, the temporary file
    is removed and the error re-raised: no ``*.tmp`` is left, and ``path`` keeps its old contents."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (:func:`atomic_path`).

    Raises:
        OSError: the write failed (nothing is left behind; ``path`` is unchanged).
    """
    with atomic_path(Path(path)) as tmp:
        tmp.write_bytes(data)


def save_checkpoint(path: str | Path, model: nn.Module, meta: dict, optimizer=None) -> None:
    """Save ``model.state_dict()`` to ``path.safetensors`` and ``meta`` (+ sha256) to ``path.json``;
    with ``optimizer``, its ``state_dict()`` (momentum buffers, ...) to ``path.optim.pt``. The JSON is
    written last, so a checkpoint whose JSON exists is complete. Each file is written atomically.

    Raises:
        OSError: a write failed (e.g. disk full); no temporary file is left behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if optimizer is not None:
        buffer = io.BytesIO()
        torch.save(optimizer.state_dict(), buffer)
        atomic_write_bytes(path.with_suffix(".optim.pt"), buffer.getvalue())
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path.with_suffix(".safetensors")) as tmp:
        save_file(state, str(tmp))
        digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    atomic_write_bytes(path.with_suffix(".json"), json.dumps({**meta, "sha256": digest}, indent=1).encode())


def checkpoint_exists(path: str | Path) -> bool:
    path = Path(path)
    return path.with_suffix(".safetensors").is_file() and path.with_suffix(".json").is_file()


def read_meta(path: str | Path) -> dict:
    """The metadata (``path.json``) of a checkpoint, without loading or verifying its weights; for
    decisions such as where a resume continues.

    Raises:
        SwapError: the metadata file is missing or not valid JSON.
    """
    meta_path = Path(path).with_suffix(".json")
    try:
        return json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        raise SwapError(f"checkpoint {meta_path}: cannot read ({exc})") from None


def load_checkpoint(path: str | Path, model: nn.Module, config_hash: str | None = None, optimizer=None) -> dict:
    """Load weights into ``model`` (and, if given, the optimizer state) after checking them; return the metadata.

    Raises:
        SwapError: files missing or corrupt, weights hash differs from the metadata, config hash
            differs from ``config_hash``, or keys/shapes do not match ``model`` (naming the first).
    """
    path = Path(path)
    weights, meta_path = path.with_suffix(".safetensors"), path.with_suffix(".json")
    try:
        meta = json.loads(meta_path.read_text())
        blob = weights.read_bytes()
    except (OSError, ValueError) as exc:
        raise SwapError(f"checkpoint {path}: cannot read ({exc})") from None
    if meta.get("sha256") and hashlib.sha256(blob).hexdigest() != meta["sha256"]:
        raise SwapError(f"checkpoint {weights}: contents do not match the hash in {meta_path.name} (corrupt)")
    if config_hash is not None and meta.get("config_hash") != config_hash:
        raise SwapError(f"checkpoint {path} was written with config {meta.get('config_hash')}, this run's config is "
                        f"{config_hash}; resume with the saved config or start a new run directory")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise SwapError(f"checkpoint {weights}: not a readable safetensors file ({exc})") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise SwapError(f"checkpoint {weights} does not match the model: "
                        f"{'missing ' + missing[0] if missing else 'unexpected ' + extra[0]}"
                        f" ({len(missing)} missing, {len(extra)} unexpected keys)")
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise SwapError(f"checkpoint {weights} does not match the model: '{k}' has shape "
                            f"{tuple(v.shape)}, the model expects {tuple(expected[k].shape)}")
    with torch.no_grad():
        model.load_state_dict(state)
    if optimizer is not None:
        try:
            optimizer.load_state_dict(torch.load(path.with_suffix(".optim.pt"), weights_only=True))
        except (OSError, RuntimeError, ValueError, KeyError) as exc:
            raise SwapError(f"checkpoint {path}: optimizer state missing or does not match ({exc})") from None
    return meta
