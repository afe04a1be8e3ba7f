"""Datasets in memory as uint8 tensors: readers (IDX, CIFAR pickle), search order, batched loader."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .cifar import load_cifar
from .idx import load_idx_pair, read_idx
from .loader import Augment, Loader, eval_batches, stream_seed, subset_indices
from ..config import DataConfig, SwapError, printable, validation_size
from ..imports import import_object, is_import_path
from .sources import fetch, find_data_dir, get_source


@dataclass
class ImageDataset:
    """Images and labels held as tensors.

    Attributes:
        images: uint8 (N, C, H, W), raw pixel values 0-255.
        labels: int64 (N,), class indices in [0, num_classes).
    """
    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device | str) -> "ImageDataset":
        return ImageDataset(self.images.to(device), self.labels.to(device), self.num_classes)

    def subset(self, n: int) -> "ImageDataset":
        """The first ``n`` samples of a fixed shuffle (seed 0, independent of the run seed), so
        every run and method sees the same subset; ``n <= 0`` or ``n >= N`` keeps all."""
        idx = subset_indices(len(self), n)
        if idx is None:
            return self
        return ImageDataset(self.images[idx], self.labels[idx], self.num_classes)

    def channel_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean and std of the pixel values (float32, shape (C,)), for normalisation."""
        x = self.images.float()
        return x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3))


def augment_for(data_cfg, dataset: ImageDataset) -> Augment:
    """The training augmentation of config section ``data`` (``crop_padding``, ``flip``,
    ``cutout``), checked against the images of ``dataset`` (:meth:`Augment.check`).

    Raises:
        SwapError: a setting impossible for the image size.
    """
    h, w = dataset.images.shape[2:]
    return Augment(data_cfg.crop_padding, data_cfg.flip, data_cfg.cutout).check(int(h), int(w))


def load_dataset(name: str, data_dir: str | None = None, train_subset: int = 0, test_subset: int = 0,
                 device: torch.device | str = "cpu", holdout: int = 0, options=None, bad_log=None) -> tuple:
    """Find, read and check a dataset; return (train, test): :class:`ImageDataset` on ``device``,
    or for ``text-char`` two :class:`swap.data.text.TextChars` (the generic path; ``options.seq_len``
    bytes per sample, the test split the corpus's contiguous tail).

    ``imagefolder`` returns two :class:`swap.data.folder.ImageFolder` (train/ and val/ of
    ``data_dir``; the generic path), with the settings of ``options`` and skipped images listed in
    ``bad_log``. ``options``: config section ``data`` (a :class:`swap.config.DataConfig`; None = its
    defaults).

    Args:
        name: fashion-mnist | mnist | cifar10 | cifar100 | text-char | imagefolder.
        data_dir: searched first (see :mod:`swap.data.sources` for the order).
        train_subset, test_subset: keep the first N of a fixed shuffle (0 = all).
        holdout: if > 0, return (first N - holdout, last holdout) of the training samples (after
            ``train_subset``) instead of (train, test): a validation split for tuning (every
            dataset: a text corpus's training windows, an image folder's train/).
    Raises:
        SwapError: files missing (with how to get them), corrupt, truncated or mismatched.
    """
    if is_import_path(name):                  # the user's own datasets: the generic path
        from .generic import subset
        train_set, test_set = own_datasets(name, data_dir)
        train_set, test_set = subset(train_set, train_subset), subset(test_set, test_subset)
        return split_holdout(train_set, holdout) if holdout > 0 else (train_set, test_set)
    src = get_source(name)
    folder = find_data_dir(name, data_dir)
    if name == "imagefolder":                 # decoded by DataLoader workers: the generic path
        from .folder import load_image_folder
        from .generic import subset
        train_set, test_set = load_image_folder(folder, options or DataConfig(name), bad_log)
        train_set, test_set = subset(train_set, train_subset), subset(test_set, test_subset)
        return split_holdout(train_set, holdout) if holdout > 0 else (train_set, test_set)
    if name == "text-char":                   # any map-style Dataset: the generic path
        from .generic import subset
        from .text import load_text_char
        train_set, test_set = load_text_char(folder, (options or DataConfig(name)).seq_len)
        train_set, test_set = subset(train_set, train_subset), subset(test_set, test_subset)
        return split_holdout(train_set, holdout) if holdout > 0 else (train_set, test_set)
    if name in ("fashion-mnist", "mnist"):
        train = load_idx_pair(folder / "train-images-idx3-ubyte.gz", folder / "train-labels-idx1-ubyte.gz")
        test = load_idx_pair(folder / "t10k-images-idx3-ubyte.gz", folder / "t10k-labels-idx1-ubyte.gz")
    else:
        train, test = load_cifar(folder / src.required[0].split("/")[0], src.num_classes)
    train_set = ImageDataset(*train, src.num_classes).subset(train_subset)
    test_set = ImageDataset(*test, src.num_classes).subset(test_subset)
    if holdout > 0:
        train_set, test_set = split_holdout(train_set, holdout)
    return train_set.to(device), test_set.to(device)


def own_datasets(path: str, data_dir: str | None) -> tuple:
    """(train_set, test_set) of ``data.name: package.module:function``: ``function(data.dir)`` when it
    takes an argument, else ``function()``; each checked against the data contract.

    Raises:
        SwapError: it cannot be imported, fails, or does not return two datasets of the contract.
    """
    import inspect

    from .generic import check_sample
    fn = import_object(path, "data.name")
    try:
        takes = bool(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        takes = False
    try:
        out = fn(data_dir) if takes else fn()
    except SwapError:
        raise
    except Exception as exc:                  # the user's loader: any error
        raise SwapError(f"data.name={path} failed: {type(exc).__name__}: {printable(str(exc))}") from None
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise SwapError(f"data.name={path} must return (train_set, test_set), got {type(out).__name__}")
    for dataset, what in zip(out, ("train_set", "test_set")):
        check_sample(dataset, f"data.name={path}'s {what}")
    return tuple(out)


def split_holdout(train_set, holdout: int) -> tuple:
    """(the first N - ``holdout``, the last ``holdout``) samples of ``train_set`` (an
    :class:`ImageDataset`, or any dataset: ``torch.utils.data.Subset`` views).

    Raises:
        SwapError: ``holdout`` leaves no training samples.
    """
    if holdout >= len(train_set):
        raise SwapError(f"data.holdout={holdout} leaves no training samples (of {len(train_set)})")
    cut = len(train_set) - holdout
    if isinstance(train_set, ImageDataset):
        return (ImageDataset(train_set.images[:cut], train_set.labels[:cut], train_set.num_classes),
                ImageDataset(train_set.images[cut:], train_set.labels[cut:], train_set.num_classes))
    from .generic import Subset
    return Subset(train_set, range(cut)), Subset(train_set, range(cut, len(train_set)))


def load_configured(data_cfg, device: torch.device | str = "cpu", bad_log=None, verify: bool = False,
                    validation: bool = False) -> tuple:
    """(train, test) of config section ``data`` (:func:`load_dataset` with its settings). With
    ``verify`` (the CLI, before a run starts), an image folder's files are decoded once when
    ``data.verify_images`` (:func:`swap.data.folder.check_images`); skipped ones are reported.
    With ``validation`` (a greedy soup's or an automatic switch's decisions): (train, test,
    validation), the last :func:`swap.config.validation_size` training samples (``data.holdout``,
    or its default) held out while the test set stays the test set.

    Raises:
        SwapError: as :func:`load_dataset`; unreadable images with ``data.bad_images: stop``.
    """
    d = data_cfg
    holdout = 0 if validation else d.holdout
    train, test = load_dataset(d.name, d.dir, d.train_subset, d.test_subset, device, holdout, d, bad_log)
    if verify and d.name == "imagefolder" and d.verify_images:
        import sys
        from .folder import check_images
        bad = check_images([getattr(train, "dataset", train), getattr(test, "dataset", test)], d.bad_images)
        if bad:
            print(f"swap: {bad} unreadable image(s) will be skipped (data.bad_images=skip); "
                  f"each is listed in RUN/logs/bad_images.txt when met", file=sys.stderr)
    if validation:
        train, val = split_holdout(train, validation_size(d, len(train)))
        return train, test, val
    return train, test


__all__ = ["ImageDataset", "load_dataset", "load_configured", "augment_for", "Loader", "Augment", "eval_batches", "stream_seed",
           "fetch", "find_data_dir", "read_idx", "load_idx_pair", "load_cifar"]
