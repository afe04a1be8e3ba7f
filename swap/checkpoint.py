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
# bandit B403 (pickle): for pickle.UnpicklingError; the state is read by torch.load(weights_only=True)
import pickle  # nosec B403
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import SwapError
from .errors import printable


def _tmp(path: Path) -> Path:
    """Where :func:`atomic_paths` stages ``path`` (and where :func:`recover` looks for it)."""
    return path.with_name(path.name + ".tmp")


@contextlib.contextmanager
def atomic_paths(*paths: Path):
    """Yield one temporary path beside each of ``paths`` (a list); when the block succeeds, fsync
    them all, then rename each to its path, in order. When the block or an fsync fails, e.g. on a
    full disk, every temporary file is removed and the error re-raised: no ``*.tmp`` is left and
    every path keeps its old contents. Only the renames, which allocate no space, remain between
    the old and the new set of files."""
    tmps = [_tmp(Path(p)) for p in paths]
    try:
        yield tmps
        for tmp in tmps:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        for tmp, path in zip(tmps, paths):
            os.replace(tmp, path)
    except BaseException:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (:func:`atomic_paths`).

    Raises:
        OSError: the write failed (nothing is left behind; ``path`` is unchanged).
    """
    with atomic_paths(Path(path)) as (tmp,):
        tmp.write_bytes(data)


def tied_names(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """``{name: first name}`` of every entry of a state dict that is the very tensor of an earlier
    entry (same storage, offset, shape and strides): tied weights, such as a language model's
    input embedding shared with its output layer (GPT-2, BERT). Empty tensors are never tied."""
    first: dict[tuple, str] = {}
    tied = {}
    for name, t in state.items():
        if t.numel() == 0:
            continue
        key = (t.device, t.dtype, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
        if key in first:
            tied[name] = first[key]
        else:
            first[key] = name
    return tied


def _to_save(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of ``state`` that a safetensors file holds: one entry per tied group
    (:func:`tied_names`; the others are restored from the model on load), on the CPU, each in
    memory of its own (a tensor that only overlaps another's storage is copied)."""
    tied = tied_names(state)
    out, seen = {}, set()
    for name, t in state.items():
        if name in tied:
            continue
        t = t.detach().contiguous().cpu()
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def save_checkpoint(path: str | Path, model: nn.Module, meta: dict, optimizer=None) -> None:
    """Save ``model.state_dict()`` to ``path.safetensors`` and ``meta`` (+ sha256) to ``path.json``;
    tied weights are stored once (:func:`tied_names`; their names in ``meta["tied"]``); with
    ``optimizer``, its ``state_dict()`` (momentum buffers, ...) to ``path.optim.pt``. All files are
    written and fsynced under temporary names first, then renamed, the JSON last, so a
    checkpoint whose JSON exists is complete, and a failed write leaves the previous one whole.

    Raises:
        OSError: a write failed (e.g. disk full); no temporary file is left behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    targets = ([path.with_suffix(".optim.pt")] if optimizer is not None else []) + [
        path.with_suffix(".safetensors"), path.with_suffix(".json")]
    full = model.state_dict()
    state, tied = _to_save(full), tied_names(full)
    if tied:
        meta = {**meta, "tied": tied}
    with atomic_paths(*targets) as tmps:
        hashes = {}
        if optimizer is not None:
            buffer = io.BytesIO()
            torch.save(optimizer.state_dict(), buffer)
            tmps[0].write_bytes(buffer.getvalue())
            hashes["optim_sha256"] = hashlib.sha256(buffer.getvalue()).hexdigest()
        save_file(state, str(tmps[-2]))
        digest = hashlib.sha256(tmps[-2].read_bytes()).hexdigest()
        tmps[-1].write_bytes(json.dumps({**meta, "sha256": digest, **hashes}, indent=1).encode())


def _sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def recover(folder: str | Path) -> list[str]:
    """Finish or discard checkpoint writes that a killed process left half done, before a resume.

    :func:`save_checkpoint` writes every file of a checkpoint under a temporary name, then renames
    them, the JSON last. A process killed between two renames leaves a checkpoint whose files come
    from two saves (e.g. the new optimizer state beside the old weights), and resuming from it
    would not continue the run it came from. Here, a complete ``NAME.json.tmp`` whose hashes match
    the files (temporary or already renamed) is rolled forward: its remaining renames are done.
    Any other temporary file is a write that never reached its renames and is removed. Call it
    only while no process is writing checkpoints (``RunDir.prepare`` does, when resuming).

    Returns:
        the base names of the checkpoints rolled forward.
    """
    folder = Path(folder)
    done = []
    for meta_tmp in sorted(folder.rglob("*.json.tmp")):
        base = meta_tmp.with_name(meta_tmp.name[: -len(".json.tmp")])
        parts = [(base.with_suffix(".safetensors"), "sha256"), (base.with_suffix(".optim.pt"), "optim_sha256")]
        try:
            meta = json.loads(meta_tmp.read_text())
        except (OSError, ValueError):
            continue                                     # torn metadata: the renames never began
        # each file of the save: still staged (its rename not done yet) or already renamed
        staged = [(p, _tmp(p) if _tmp(p).is_file() else p, meta[key]) for p, key in parts if key in meta]
        if "sha256" not in meta or any(_sha256(source) != want for _, source, want in staged):
            continue
        for path, source, _ in staged:
            if source != path:
                os.replace(source, path)
        os.replace(meta_tmp, base.with_suffix(".json"))
        done.append(base.name)
    for tmp in folder.rglob("*.tmp"):
        tmp.unlink(missing_ok=True)
    return done


# fields of a checkpoint's metadata that the code reads back, and the type each must have
_COUNTS = ("epoch", "updates")
_HEX = ("sha256", "optim_sha256")


def _meta_of(meta_path: Path) -> dict:
    """The metadata JSON at ``meta_path``, checked: an object whose counts are integers >= 0, whose
    hashes are SHA-256 hex digests and whose ``tied`` maps names to names (a state dict's keys:
    dotted identifiers, never paths), its position (``partial.step``, ``progress.updates``)
    integers >= 0.

    Raises:
        SwapError: unreadable, not JSON (or nested too deeply to parse), or a field of another
            type; one line naming the file and the field.
    """
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise SwapError(f"checkpoint {meta_path}: cannot read ({type(exc).__name__}: "
                        f"{printable(str(exc).splitlines()[0] if str(exc) else '')})") from None

    def bad(field: str, value) -> SwapError:
        return SwapError(f"checkpoint {meta_path}: {field}={printable(repr(value))[:80]} is not what swap writes "
                         f"there; the file was not written by swap, or was altered")

    if not isinstance(meta, dict):
        raise bad("the file", type(meta).__name__)
    count = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0       # noqa: E731
    for key in _COUNTS:
        if key in meta and not count(meta[key]):
            raise bad(key, meta[key])
    for key in _HEX:
        if key in meta and not (isinstance(meta[key], str) and re.fullmatch(r"[0-9a-f]{64}", meta[key])):
            raise bad(key, meta[key])
    tied = meta.get("tied", {})
    if not (isinstance(tied, dict) and all(isinstance(n, str) and re.fullmatch(r"[\w.\-]+", n)
                                           for pair in tied.items() for n in pair)):
        raise bad("tied", tied)
    for section, key in (("partial", "step"), ("progress", "updates")):
        part = meta.get(section) or {}
        if not isinstance(part, dict) or key in part and not count(part[key]):
            raise bad(f"{section}.{key}", part.get(key) if isinstance(part, dict) else part)
    return meta


def checkpoint_exists(path: str | Path) -> bool:
    path = Path(path)
    return path.with_suffix(".safetensors").is_file() and path.with_suffix(".json").is_file()


def read_meta(path: str | Path) -> dict:
    """The metadata (``path.json``) of a checkpoint, without loading or verifying its weights; for
    decisions such as where a resume continues.

    Raises:
        SwapError: the metadata file is missing, not valid JSON, or not what swap writes
            (``_meta_of``).
    """
    return _meta_of(Path(path).with_suffix(".json"))


def load_checkpoint(path: str | Path, model: nn.Module, config_hash: str | None = None, optimizer=None) -> dict:
    """Load weights into ``model`` (and, if given, the optimizer state) after checking them; return the metadata.
    Weights tied in ``model`` stay tied (the file holds one copy; it is copied into the shared tensor).

    Raises:
        SwapError: files missing or corrupt, weights hash differs from the metadata, config hash
            differs from ``config_hash``, or keys/shapes do not match ``model`` (naming the first).
    """
    path = Path(path)
    weights, meta_path = path.with_suffix(".safetensors"), path.with_suffix(".json")
    meta = _meta_of(meta_path)
    try:
        blob = weights.read_bytes()
    except OSError as exc:
        raise SwapError(f"checkpoint {path}: cannot read ({exc})") from None
    if meta.get("sha256") and hashlib.sha256(blob).hexdigest() != meta["sha256"]:
        raise SwapError(f"checkpoint {weights}: contents do not match the hash in {meta_path.name} (corrupt)")
    optim_path = path.with_suffix(".optim.pt")
    optim_blob = None
    if optimizer is not None:
        try:
            optim_blob = optim_path.read_bytes()
        except OSError as exc:
            raise SwapError(f"checkpoint {path}: optimizer state missing or does not match ({exc})") from None
        if meta.get("optim_sha256") and hashlib.sha256(optim_blob).hexdigest() != meta["optim_sha256"]:
            raise SwapError(f"checkpoint {optim_path}: contents do not match the hash in {meta_path.name} (corrupt, "
                            f"or from another save)")
    if config_hash is not None and meta.get("config_hash") != config_hash:
        raise SwapError(f"checkpoint {path} was written with config {meta.get('config_hash')}, this run's config is "
                        f"{config_hash}; resume with the saved config or start a new run directory")
    state = _state_for(model, weights, meta, meta_path)
    with torch.no_grad():
        model.load_state_dict(state)
    if optimizer is not None:
        saved = _optimizer_state(optim_path, optim_blob)
        try:
            optimizer.load_state_dict(saved)
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            raise SwapError(f"checkpoint {path}: optimizer state missing or does not match ({exc})") from None
    return meta


def _state_for(model: nn.Module, weights: Path, meta: dict, meta_path: Path) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file ``weights``, checked against ``model``'s state dict
    (names and shapes), tied entries (``meta["tied"]``, stored once) filled in.

    Raises:
        SwapError: not a readable safetensors file; a tie, key or shape the model does not have.
    """
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise SwapError(f"checkpoint {weights}: not a readable safetensors file ({exc})") from None
    expected = model.state_dict()
    unknown = sorted(n for pair in meta.get("tied", {}).items() for n in pair if n not in expected)
    if unknown:
        raise SwapError(f"checkpoint {meta_path} does not match the model: it ties {printable(unknown[0])[:80]}, "
                        f"which the model does not have")
    for name, first in tied_names(expected).items():      # tied weights are stored once
        if name not in state and first in state:
            state[name] = state[first]
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
    return state


def _optimizer_state(optim_path: Path, blob: bytes) -> dict:
    """The optimizer state in ``blob`` (the bytes of ``optim_path``), read with
    ``torch.load(weights_only=True)``: tensors, numbers, strings and containers; no other object
    is built, nothing is run.

    Raises:
        SwapError: anything else in it (naming what it asks to load), or unreadable bytes.
    """
    try:
        return torch.load(io.BytesIO(blob), weights_only=True)
    except pickle.UnpicklingError as exc:
        asked = re.search(r"GLOBAL ([\w.]+)", str(exc))
        raise SwapError(f"checkpoint {optim_path}: not an optimizer state (it asks to load "
                        f"{printable(asked.group(1)) if asked else 'objects other than tensors'}); nothing in it was "
                        f"run") from None
    except (OSError, RuntimeError, ValueError, KeyError, EOFError) as exc:
        raise SwapError(f"checkpoint {optim_path}: not a readable optimizer state ({type(exc).__name__})") from None


__all__ = ["atomic_paths", "atomic_write_bytes", "tied_names", "save_checkpoint", "recover",
           "checkpoint_exists", "read_meta", "load_checkpoint"]
