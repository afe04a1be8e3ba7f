"""Class-per-folder image trees (ImageNet's ``train/`` and ``val/`` layout), decoded with Pillow.

    ROOT/train/CLASS/*.jpg|jpeg|png     one folder per class (sorted names give the class indices)
    ROOT/val/CLASS/*.jpg|jpeg|png       the same class folders

:class:`ImageFolder` is a map-style ``torch.utils.data.Dataset`` of ``(image, label)``: it runs on
the generic data path (:mod:`swap.data.generic`: DataLoader workers decode, our sampler orders,
every sample's random crop replays exactly on a resume because it draws from torch's generator).

- The side ``size``: ``data.image_size``, or by default the images' own size (the shorter side
  of the training split's first readable image; an image of another size has its shorter side
  resized to it and is centre-cropped to a square).
- Training, crop ``resized``: the Inception-style random resized crop (Szegedy et al., CVPR 2015,
  "Going deeper with convolutions", Sec. 6; the form torchvision's ``RandomResizedCrop`` made
  standard: an area fraction in ``[min_scale, 1]``, an aspect ratio log-uniform in ``[3/4, 4/3]``,
  10 tries, then a centre crop) resized to ``size`` x ``size``, and a horizontal flip with
  probability 1/2. Crop ``padded``, for small images (CIFAR's and Fashion-MNIST's training crop,
  as the in-memory path does it: :class:`swap.data.loader.Augment`): the whole image at ``size``,
  padded with black by ``crop_padding`` pixels, a random ``size`` crop, the flip and a black
  ``cutout`` square. ``data.crop: auto`` takes ``padded`` up to :data:`PADDED_MAX_SIDE` pixels and
  ``resized`` above.
- Evaluation: the shorter side resized to ``size / crop_ratio``, then a centre crop of ``size``
  (ImageNet's 0.875 convention; ``crop_ratio: 1`` keeps the whole image, as crop ``padded`` does).
- Pixels are normalised per channel with ImageNet's mean and std (RGB), once per batch
  (:meth:`ImageFolder.collate_fn`); a tree of greyscale images (the first image's mode ``L``)
  stays 1-channel, normalised with their averages. With the ``padded`` crop (small images, not
  ImageNet's), with the training split's own statistics instead, estimated on up to 10,000 images
  spread over it, as the in-memory path normalises by its training set's.

A file that cannot be decoded (not an image, truncated) either stops the run with one line naming
it (``bad_images: stop``) or is replaced by the next readable sample of the tree and counted
(``skip``); its path goes to ``bad_log`` (one line each) so the count survives DataLoader workers.
"""
from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..config import DataConfig
from ..errors import SwapError
from .loader import Augment

EXTENSIONS = (".jpg", ".jpeg", ".png")
#: ``data.crop: auto`` trains images of at most this side (pixels) with the padded crop
PADDED_MAX_SIDE = 64
MEAN_RGB, STD_RGB = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)     # ImageNet, in [0, 1] pixel units


def unreadable_errors() -> tuple[type[BaseException], ...]:
    """What Pillow raises for a file it cannot or will not decode: not an image, truncated or
    corrupt (``OSError``, ``SyntaxError``, ``ValueError``), or a decompression bomb (a header
    announcing more than twice ``PIL.Image.MAX_IMAGE_PIXELS`` pixels, refused before decoding)."""
    from PIL import Image
    return OSError, SyntaxError, ValueError, Image.DecompressionBombError


def _outside(entry: os.DirEntry, inside: Path | None) -> bool:
    """``entry`` is a symbolic link whose target lies outside the folder ``inside`` (None: any place is fine)."""
    return inside is not None and entry.is_symlink() and not Path(entry.path).resolve().is_relative_to(inside)


def scan_tree(root: Path, classes: list[str] | None = None,
              inside: Path | None = None) -> tuple[list[str], list[tuple[str, int]]]:
    """The class names (sorted folder names) and ``(path, label)`` of every image under ``root``.
    With ``classes`` (the training split's), ``root`` must hold exactly those folders. With
    ``inside`` (a resolved folder), a class folder or image that is a symbolic link to a place
    outside it is refused (``data.follow_links`` off): a tree copied from elsewhere cannot make a
    run read other files of the machine.

    Raises:
        SwapError: ``root`` missing, no class folders, an empty class folder, other classes than
            ``classes``, a link out of ``inside``.
    """
    def refuse_link(entry: os.DirEntry):
        raise SwapError(f"image folder: {entry.path} links to {Path(entry.path).resolve()}, outside {inside}; "
                        f"set data.follow_links=true if you made that link (a tree of links to images kept elsewhere)")

    if not root.is_dir():
        raise SwapError(f"image folder {root} does not exist (expected ROOT/train/CLASS/*.jpg and ROOT/val/CLASS/*.jpg)")
    entries = sorted((e for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")), key=lambda e: e.name)
    for entry in entries:
        if _outside(entry, inside):
            refuse_link(entry)
    found = [e.name for e in entries]
    if not found:
        raise SwapError(f"image folder {root} has no class folders (expected {root}/CLASS/*.jpg)")
    if classes is not None and found != classes:
        extra, missing = sorted(set(found) - set(classes)), sorted(set(classes) - set(found))
        raise SwapError(f"image folder {root} does not have the training classes: "
                        f"{len(missing)} missing ({', '.join(missing[:3])}), {len(extra)} extra ({', '.join(extra[:3])})")
    samples = []
    for label, name in enumerate(found):
        images = [e for e in os.scandir(root / name) if e.is_file() and e.name.lower().endswith(EXTENSIONS)]
        for entry in images:
            if _outside(entry, inside):
                refuse_link(entry)
        files = sorted(e.name for e in images)
        if not files:
            raise SwapError(f"class folder {root / name} holds no images ({', '.join(EXTENSIONS)}); remove it or add images")
        samples += [(str(root / name / f), label) for f in files]
    return found, samples


#: The options of an ImageFolder built in code without them, Inception's resized crop with every link followed
DIRECT = DataConfig(name="imagefolder", crop="resized", crop_padding=0, cutout=0, follow_links=True)


class ImageFolder(Dataset):
    """One split of a class-per-folder tree (module docstring): ``dataset[i]`` is ``(x, y)``, x
    uint8 (C, size, size), C = 3 (1 for a greyscale tree), y an int label; :meth:`collate_fn`
    makes batches of them, normalised (float32).

    Args:
        root: the split's folder (``ROOT/train`` or ``ROOT/val``).
        train: the training crop + flip (True) or resize + centre crop (False).
        size: output side in pixels; None = the images' own (module docstring).
        options: the config's ``data`` section (:class:`swap.config.DataConfig`), of which this
            reads ``min_scale`` (smallest area fraction of a ``resized`` training crop),
            ``crop_ratio`` (evaluation centre crop / resized shorter side), ``flip``,
            ``bad_images`` (``stop`` or ``skip``, module docstring), ``crop`` (``resized``,
            ``padded`` or ``auto``), ``crop_padding`` and ``cutout`` (a ``padded`` crop's, pixels)
            and ``follow_links`` (off: links out of ``ROOT`` are refused, :func:`scan_tree`);
            None: :data:`DIRECT` (a resized crop, links followed).
        bad_log: file that gets the path of every skipped image (appended; may be None).
        classes: the training split's class names (for ``val``).
        stats: (mean, std) per channel in pixel units, (C,): the training split's, for ``val``.
    Raises:
        SwapError: see :func:`scan_tree`; a ``padded`` crop's padding or cutout impossible for ``size``.
    """

    def __init__(self, root: str | Path, train: bool, size: int | None, options: DataConfig | None = None, *,
                 bad_log: str | Path | None = None, classes: list[str] | None = None,
                 stats: tuple[torch.Tensor, torch.Tensor] | None = None):
        o = options or DIRECT
        self.root = Path(root)
        self.classes, self.samples = scan_tree(self.root, classes, None if o.follow_links else self.root.parent.resolve())
        self.num_classes = len(self.classes)
        self.train, self.min_scale, self.crop_ratio, self.flip = train, o.min_scale, o.crop_ratio, o.flip
        crop, crop_padding, cutout, bad_images = o.crop, o.crop_padding, o.cutout, o.bad_images
        side, self.channels = self._probe()
        self.size = size or side
        if self.size is None:
            raise SwapError(f"no readable image among the first of {self.root}; set data.image_size")
        self.crop = crop if crop != "auto" else "padded" if self.size <= PADDED_MAX_SIDE else "resized"
        self.augment = Augment(crop_padding, self.flip, cutout).check(self.size, self.size) if self.crop == "padded" else None
        self.bad_images, self.bad_log = bad_images, None if bad_log is None else str(bad_log)
        self.skipped: set[str] = set()
        self.model_kwargs = {"in_channels": self.channels}      # for the model factory (swap.models.build_model)
        if stats is not None:
            mean, std = (s.flatten() for s in stats)
        elif self.crop == "padded" and train:                   # small images: their own statistics
            mean, std = self._estimate_stats()
        else:                                                   # ImageNet's
            rgb = self.channels == 3
            mean = torch.tensor(MEAN_RGB if rgb else (sum(MEAN_RGB) / 3,)) * 255
            std = torch.tensor(STD_RGB if rgb else (sum(STD_RGB) / 3,)) * 255
        self.mean, self.std = mean.float().view(-1, 1, 1), std.float().view(-1, 1, 1)

    def _estimate_stats(self, count: int = 10000) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean and std (pixel units, float64 (C,)) of ``count`` images spread evenly
        over the split (each at ``size``, whole), as the in-memory path normalises by its
        training set's statistics; unreadable images are left out."""
        picks = np.linspace(0, len(self.samples) - 1, min(count, len(self.samples))).round().astype(int)
        total = torch.zeros(3, self.channels, dtype=torch.float64)      # pixels, sum, sum of squares
        for k in picks:
            try:
                pixels = self._decode(self.samples[k][0], lambda w, h: self._centre_box(w, h, 1.0))
            except unreadable_errors():
                continue
            x = torch.from_numpy(pixels.astype(np.float64)).reshape(-1, self.channels)
            total += torch.stack([torch.full((self.channels,), float(len(x)), dtype=torch.float64),
                                  x.sum(0), (x * x).sum(0)])
        n = total[0].clamp(min=1)
        mean = total[1] / n
        return mean, ((total[2] / n - mean * mean).clamp(min=0).sqrt()).clamp(min=1.0)

    def _probe(self) -> tuple[int | None, int]:
        """The shorter side (pixels) and the channels of the first readable image: 1 when it is
        greyscale (mode ``L``), else 3; (None, 3) when none of the first 16 can be read."""
        from PIL import Image
        for path, _ in self.samples[:16]:
            try:
                with Image.open(path) as im:
                    return min(im.size), 1 if im.mode in ("L", "1", "I;16", "I") else 3
            except unreadable_errors():
                continue
        return None, 3

    def __len__(self) -> int:
        return len(self.samples)

    def at_size(self, size: int) -> "ImageFolder":
        """This split at another output side (pixels): progressive resizing's segments."""
        out = object.__new__(ImageFolder)
        out.__dict__.update(self.__dict__, size=size)
        return out

    def __getitem__(self, i: int):
        for k in range(len(self.samples)):
            path, label = self.samples[(i + k) % len(self.samples)]
            try:
                return self._load(path), label
            except unreadable_errors() as exc:      # Pillow's errors for unreadable/truncated files, bombs
                self._bad(path, exc)
        raise SwapError(f"no readable image in {self.root}")

    def _bad(self, path: str, exc: Exception) -> None:
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if self.bad_images != "skip":
            raise SwapError(f"unreadable image {path} ({why}); fix or remove it, or set data.bad_images=skip "
                            f"to skip such files (they are counted)")
        if path not in self.skipped:
            self.skipped.add(path)
            if self.bad_log is not None:
                os.makedirs(os.path.dirname(self.bad_log) or ".", exist_ok=True)
                with open(self.bad_log, "a") as fh:                   # one short append per file: atomic
                    fh.write(path.replace("\n", "\\n") + "\n")

    def _load(self, path: str) -> torch.Tensor:
        """The image at ``path``, cropped, resized and flipped: uint8 (C, size, size)."""
        u = torch.rand(23).tolist() if self.train else None      # every draw of the sample at once
        padded = self.augment is not None
        if self.train and not padded:
            x = self._decode(path, lambda w, h: self._crop_box(w, h, u))
            if self.flip and u[22] < 0.5:
                x = x[:, ::-1]
        else:
            x = self._decode(path, lambda w, h: self._centre_box(w, h, 1.0 if padded else None))
        if self.train and padded:               # as the in-memory path: on raw pixels, padding and cutout black
            p, s = self.augment.crop_padding, self.size
            x = self.augment.apply_one(x, (int(u[0] * (2 * p + 1)), int(u[1] * (2 * p + 1))), u[22] < 0.5,
                                       (int(u[2] * s), int(u[3] * s)))
        return torch.from_numpy(x.transpose(2, 0, 1).copy())

    def _decode(self, path: str, box_of) -> np.ndarray:
        """The image at ``path`` in the split's mode (RGB or L), its box ``box_of(width, height)``
        resized to ``size`` x ``size`` (Pillow returns the image itself when that is already all
        of it): uint8 (size, size, C)."""
        from PIL import Image
        with Image.open(path, formats=("PNG", "JPEG")) as im:
            mode = "RGB" if self.channels == 3 else "L"
            if im.mode != mode:
                im = im.convert(mode)
            x = np.asarray(im.resize((self.size, self.size), Image.BILINEAR, box=box_of(*im.size)))
        return x[:, :, None] if x.ndim == 2 else x

    def collate_fn(self, samples: list) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch of samples: x float32 (B, C, size, size) normalised (once per batch, in the
        DataLoader worker), y int64 (B,)."""
        x = torch.stack([s[0] for s in samples]).float().sub_(self.mean).div_(self.std)
        return x, torch.tensor([s[1] for s in samples], dtype=torch.int64)

    def _crop_box(self, w: int, h: int, u: list[float]) -> tuple[float, float, float, float]:
        """A random resized crop's (left, top, right, bottom) from the uniforms ``u`` (10 tries of
        area and aspect ratio, then the position)."""
        area = w * h
        lo, hi = math.log(3 / 4), math.log(4 / 3)
        for k in range(10):
            target = area * (self.min_scale + (1 - self.min_scale) * u[2 * k])
            ratio = math.exp(lo + (hi - lo) * u[2 * k + 1])
            cw, ch = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
            if 0 < cw <= w and 0 < ch <= h:
                left, top = min(int(u[20] * (w - cw + 1)), w - cw), min(int(u[21] * (h - ch + 1)), h - ch)
                return left, top, left + cw, top + ch
        side = min(w, h)                                        # fallback: the centre square
        return (w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2

    def _centre_box(self, w: int, h: int, ratio: float | None = None) -> tuple[float, float, float, float]:
        """The centre crop of side ``ratio`` (default ``crop_ratio``) x the shorter side (resized
        to ``size`` after)."""
        side = min(w, h) * (self.crop_ratio if ratio is None else ratio)
        return (w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2


def unreadable(dataset: ImageFolder, threads: int | None = None) -> list[tuple[str, str]]:
    """(path, reason) of every image of ``dataset`` that Pillow cannot decode completely (not an
    image, truncated, corrupt), found by decoding each once on ``threads`` threads (default: the
    CPU count; Pillow releases the GIL while it decodes)."""
    from concurrent.futures import ThreadPoolExecutor
    from PIL import Image

    def check(path: str) -> str | None:
        try:
            with Image.open(path) as im:
                im.load()
            return None
        except unreadable_errors() as exc:
            return str(exc).splitlines()[0] if str(exc) else type(exc).__name__

    paths = [p for p, _ in dataset.samples]
    with ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:
        reasons = list(pool.map(check, paths, chunksize=256))
    return [(p, r) for p, r in zip(paths, reasons) if r is not None]


def check_images(splits: list[ImageFolder], bad_images: str) -> int:
    """Decode every image of ``splits`` once (:func:`unreadable`) before training: with
    ``bad_images: stop`` any unreadable one stops the run here; with ``skip`` they are counted (the
    training replaces each by the next readable sample). Returns the count.

    Raises:
        SwapError: ``stop`` and unreadable images: their count, the first one and why.
    """
    bad = [b for split in splits for b in unreadable(split)]
    if bad and bad_images != "skip":
        path, why = bad[0]
        raise SwapError(f"{len(bad)} unreadable image(s) in the image folder, first {path} ({why}); fix or remove "
                        f"them, or set data.bad_images=skip to skip them (they are counted)")
    return len(bad)


def load_image_folder(root: str | Path, data_cfg, bad_log: str | Path | None = None) -> tuple[ImageFolder, ImageFolder]:
    """The (train, val) splits of ``root`` with config section ``data``'s settings (``image_size``,
    ``crop``, ``min_scale``, ``crop_ratio``, ``flip``, ``crop_padding``, ``cutout``, ``bad_images``,
    ``follow_links``):
    both at the training split's side (``image_size``, else the images' own), the training crop
    ``padded`` or ``resized`` (``crop: auto``: padded up to :data:`PADDED_MAX_SIDE` pixels).

    Raises:
        SwapError: see :func:`scan_tree`; a padding or cutout impossible for the side.
    """
    root = Path(root)
    train = ImageFolder(root / "train", True, data_cfg.image_size, data_cfg, bad_log=bad_log)
    evaluation = dataclasses.replace(data_cfg, crop_ratio=1.0 if train.crop == "padded" else data_cfg.crop_ratio,
                                     flip=False, crop="resized", crop_padding=0, cutout=0)
    val = ImageFolder(root / "val", False, train.size, evaluation, bad_log=bad_log, classes=train.classes,
                      stats=(train.mean, train.std))
    return train, val


def write_image_folder(root: str | Path, images: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> Path:
    """Write an in-memory image set as one split of a class-per-folder tree, lossless PNG
    (Pillow): ``root/CLASS/NNNNN.png``, ``NNNNN`` the sample's index. The same images through both
    data paths (benchmarks, tests of the folder path against the in-memory one).

    Args:
        images: uint8 (N, C, H, W), C = 1 (greyscale PNG) or 3 (RGB).
        labels: int (N,), indices into ``classes`` (the folder names; sorted, they give the indices back).
    Returns:
        ``root``.
    """
    from PIL import Image

    root = Path(root)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
    pixels = images.permute(0, 2, 3, 1).cpu().numpy()
    for i, (img, y) in enumerate(zip(pixels, labels.tolist())):
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img, "L" if img.shape[-1] == 1 else "RGB").save(
            root / classes[y] / f"{i:05d}.png")
    return root


__all__ = ["EXTENSIONS", "PADDED_MAX_SIDE", "DIRECT", "unreadable_errors", "scan_tree", "ImageFolder", "unreadable",
           "check_images", "load_image_folder", "write_image_folder"]
