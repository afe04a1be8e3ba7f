"""Library entry points: SWAP and the SGD baseline on a user's own model factory and tensors."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Callable

from torch import nn

from . import distributed
from .checkpoint import load_checkpoint
from .config import Config, SwapError, load_config
from .data import ImageDataset
from .rundir import RunDir


def _as_dataset(data, num_classes: int | None) -> ImageDataset:
    if isinstance(data, ImageDataset):
        return data
    images, labels = data
    if images.ndim != 4 or len(images) != len(labels):
        raise SwapError(f"expected images (N, C, H, W) and labels (N,), got {tuple(images.shape)} and {tuple(labels.shape)}")
    return ImageDataset(images, labels.long(), num_classes or int(labels.max()) + 1)


def _run(method: str, model_fn, train_set, test_set, config, out, procs, overwrite):
    from .algorithms.sgd import run_sgd
    from .algorithms.swap import run_swap

    cfg = config if isinstance(config, Config) else load_config(None, config)
    num_classes = train_set.num_classes if isinstance(train_set, ImageDataset) else None
    train_set = _as_dataset(train_set, num_classes)
    test_set = _as_dataset(test_set, train_set.num_classes)
    out = Path(out) if out else Path(tempfile.mkdtemp(prefix=f"swap-{method}-"))
    RunDir.prepare(out, cfg, overwrite=overwrite)
    fn = run_swap if method == "swap" else run_sgd
    summary = distributed.launch(fn, procs, cfg, out, time.time(), False, model_fn, (train_set, test_set),
                                 log_dir=RunDir(out).logs_dir)
    model = model_fn()
    load_checkpoint(RunDir(out).checkpoint(method), model)
    return model, summary


def train_swap(model_fn: Callable[[], nn.Module], train_set, test_set, config: Config | dict | None = None,
               out: str | Path | None = None, procs: int = 1, overwrite: bool = False) -> tuple[nn.Module, dict]:
    """Train ``model_fn()`` with SWAP (Gupta et al., ICLR 2020, Algorithm 1) and return the averaged model.

    Args:
        model_fn: builds a fresh ``nn.Module`` mapping float (N, C, H, W) to logits (N, classes);
            a module-level function when ``procs > 1`` (the processes import it by name).
        train_set, test_set: ``swap.data.ImageDataset`` or ``(images, labels)``: images uint8
            (or float) (N, C, H, W) in pixel units, labels int (N,). Normalisation statistics come
            from ``train_set``; augmentation as configured (``data.crop_padding/flip/cutout``).
        config: a :class:`swap.config.Config` or a nested dict of overrides of the defaults,
            e.g. ``{"workers": 4, "phase1": {"batch_size": 1024, "stop_acc": 95}}``.
        out: run directory (default: a new temporary folder); must not hold a run unless ``overwrite``.
        procs: local processes (phase 1 data-parallel ranks; phase-2 workers are spread over them).
    Returns:
        (averaged model on CPU with recomputed BN statistics, summary dict as in ``summary.json``).
    Raises:
        SwapError: invalid config or data, existing run directory, batch not divisible by procs.
    """
    return _run("swap", model_fn, train_set, test_set, config, out, procs, overwrite)


def train_sgd(model_fn: Callable[[], nn.Module], train_set, test_set, config: Config | dict | None = None,
              out: str | Path | None = None, procs: int = 1, overwrite: bool = False) -> tuple[nn.Module, dict]:
    """Plain data-parallel SGD with the ``sgd`` config section (the paper's baselines); as :func:`train_swap`."""
    return _run("sgd", model_fn, train_set, test_set, config, out, procs, overwrite)


__all__ = ["train_swap", "train_sgd"]
