"""Device-resident batches: a per-epoch permutation, augmentation on whole batches, normalisation.

Every random stream derives from (run seed, phase, worker, epoch) through ``stream_seed``, so
a run is reproducible and data-parallel ranks agree on the global batch without communicating:
each rank draws the same permutation and augmentation parameters for the whole global batch and
then keeps its own slice. A W-rank run therefore sees exactly the samples a 1-rank run sees.
"""
from __future__ import annotations

import hashlib
import itertools
import math
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Sampler

from ..errors import SwapError
from ..schedules import Segment


def stream_seed(*parts: int | str) -> int:
    """A 63-bit seed from any tuple such as (seed, "phase2", worker, epoch); stable across runs."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class WorkerOrder(Sampler[int]):
    """A phase-2 worker's order in a map-style dataset (the Lightning callback's and the Hugging Face
    Trainer's phase 2): every index of a dataset of ``size`` samples, permuted anew each epoch by
    ``(seed, "phase2", worker, epoch)`` (:func:`swap.data.loader.stream_seed`).

    ``epoch`` is set before each epoch; ``skip`` samples are left out of the next pass only (a
    resumed epoch continues where its checkpoint was written).
    """

    def __init__(self, size: int, seed: int, worker: int):
        self.size, self.seed, self.worker = size, seed, worker
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch (0-based) of the next pass (``DistributedSampler``'s name, which data loaders call)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        gen = torch.Generator().manual_seed(stream_seed(self.seed, "phase2", self.worker, self.epoch))
        start, self.skip = self.skip, 0
        return iter(torch.randperm(self.size, generator=gen)[start:].tolist())


def epoch_order(seed_parts: tuple, epoch: int, n: int) -> tuple[torch.Generator, torch.Tensor]:
    """The generator of stream ``(*seed_parts, epoch)`` and the epoch's permutation of ``n`` samples
    drawn from it first (int64 (n,)); the generator goes on to draw the epoch's augmentation."""
    gen = torch.Generator().manual_seed(stream_seed(*seed_parts, epoch))
    return gen, torch.randperm(n, generator=gen)


def pass_slices(n: int, batch_size: int) -> list[slice]:
    """Batches of one ordered pass over ``n`` samples that keeps every sample: consecutive runs of
    ``batch_size``, the last one the remainder; a remainder of a single sample joins the batch before
    it (a BatchNorm layer in train mode cannot normalise one value per channel), so no batch holds one
    sample unless ``n`` is 1. Used by every BN-statistics pass and evaluation.

    Returns:
        slices into the pass's order, e.g. ``n=449, batch_size=32``: 13 of 32 samples, then one of 33.
    Raises:
        SwapError: ``batch_size`` < 1.
    """
    if batch_size < 1:
        raise SwapError(f"batch_size must be >= 1, got {batch_size}")
    bounds = list(range(0, n, batch_size)) + [n]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
        del bounds[-2]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


def subset_indices(size: int, n: int) -> torch.Tensor | None:
    """Indices int64 (n,) of the first ``n`` of ``size`` samples in a fixed shuffle (seed 0,
    independent of the run seed), so every run and method sees the same subset; None (keep all)
    when ``n <= 0`` or ``n >= size``."""
    if n <= 0 or n >= size:
        return None
    return torch.randperm(size, generator=torch.Generator().manual_seed(0))[:n]


@dataclass(frozen=True)
class Augment:
    """Batched augmentation: random crop after zero padding, horizontal flip, cutout.

    Cutout (DeVries & Taylor 2017, "Improved Regularization of CNNs with Cutout") zeroes a
    ``cutout`` x ``cutout`` square at a uniformly random centre, clipped at the borders, as SWAP's
    experiments use. Sizes in pixels; 0 turns a transform off.
    """
    crop_padding: int = 0
    flip: bool = False
    cutout: int = 0

    def check(self, height: int, width: int) -> "Augment":
        """Refuse settings that cannot make sense on ``height`` x ``width`` images (pixels): a
        padding of ``min(H, W)`` or more lets a crop be all padding, and a cutout square of
        ``min(H, W)`` or more erases most of every image. Horizontal flip is the user's choice.
        Returns ``self``.

        Raises:
            SwapError: naming the key, its value and the image size.
        """
        side = min(height, width)
        for key, value in (("data.crop_padding", self.crop_padding), ("data.cutout", self.cutout)):
            if value >= side:
                raise SwapError(f"{key}={value} is impossible on {height}x{width} images: it must be below "
                                f"{side} (the smaller image side), or 0 to turn it off")
        return self

    def draw(self, n: int, height: int, width: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """Random parameters for ``n`` samples (CPU int64/bool tensors), drawn in a fixed order."""
        p = self.crop_padding
        return {
            "shift": torch.randint(0, 2 * p + 1, (n, 2), generator=gen),
            "flip": torch.rand(n, generator=gen) < 0.5,
            "centre": torch.stack([torch.randint(0, height, (n,), generator=gen),
                                   torch.randint(0, width, (n,), generator=gen)], dim=1),
        }

    def apply(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Augment float images ``x`` (N, C, H, W) with parameters from :meth:`draw` (sliced to N)."""
        n, _, h, w = x.shape
        dev = x.device
        if self.crop_padding:
            p = self.crop_padding
            c = x.shape[1]
            padded = F.pad(x, (p, p, p, p))
            shift = params["shift"].to(dev)
            rows = shift[:, 0:1] + torch.arange(h, device=dev)            # (N, H)
            cols = shift[:, 1:2] + torch.arange(w, device=dev)            # (N, W)
            # one gather over each flattened padded image (one index tensor, not four as 4-D indexing builds)
            flat = (rows[:, :, None] * (w + 2 * p) + cols[:, None, :]).view(n, 1, h * w).expand(n, c, h * w)
            x = padded.reshape(n, c, -1).gather(2, flat).view(n, c, h, w)
        if self.flip:
            x = torch.where(params["flip"].to(dev)[:, None, None, None], x.flip(3), x)
        if self.cutout:
            s = self.cutout
            top = params["centre"][:, 0:1].to(dev) - s // 2
            left = params["centre"][:, 1:2].to(dev) - s // 2
            ys = torch.arange(h, device=dev)[None, :]
            xs = torch.arange(w, device=dev)[None, :]
            in_rows = (ys >= top) & (ys < top + s)                       # (N, H)
            in_cols = (xs >= left) & (xs < left + s)                     # (N, W)
            x = x.masked_fill((in_rows[:, :, None] & in_cols[:, None, :])[:, None], 0.0)
        return x.contiguous()

    def apply_one(self, x: np.ndarray, shift: tuple[int, int], flip: bool, centre: tuple[int, int]) -> np.ndarray:
        """``apply`` on one image ``x`` (H, W, C) (NumPy, any dtype: raw uint8 pixels), with one sample's
        parameters as :meth:`draw` gives them (``shift`` in [0, 2 x crop_padding], ``centre`` a
        pixel): the same transform, by slicing instead of a batched gather, for a DataLoader that
        augments a sample at a time (:class:`swap.data.folder.ImageFolder`'s padded crop).
        Returns a new array (H, W, C)."""
        h, w = x.shape[:2]
        if self.crop_padding:                     # out[r, c] = x[r + dy - p, c + dx - p], zero outside
            sy, sx = shift[0] - self.crop_padding, shift[1] - self.crop_padding
            out = np.zeros_like(x)
            out[max(0, -sy):min(h, h - sy), max(0, -sx):min(w, w - sx)] = \
                x[max(0, sy):min(h, h + sy), max(0, sx):min(w, w + sx)]
            x = out
        if self.flip and flip:
            x = x[:, ::-1]
        x = np.ascontiguousarray(x)
        if self.cutout:
            s = self.cutout
            top, left = centre[0] - s // 2, centre[1] - s // 2
            x[max(0, top):max(0, top + s), max(0, left):max(0, left + s)] = 0.0
        return x


def _normalise(x_uint8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (x_uint8.float() - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


class Loader:
    """Training batches of ``data`` for one phase and worker, sliced to one rank's share.

    Each epoch draws a permutation of all N samples and, for each global batch of
    ``batch_size`` samples (the last partial batch is dropped so all updates see equal batches),
    its augmentation parameters; rank ``rank`` of ``world_size`` keeps samples
    ``[rank*B/W, (rank+1)*B/W)`` of every global batch.

    Args:
        data: an ``ImageDataset`` (uint8 images on the training device).
        batch_size: global batch in samples.
        seed_parts: identifies the stream, e.g. ``(seed, "phase1", 0)``; the epoch is appended.
        stats: (mean, std), float32 (C,) normalisation constants, in pixel units 0-255.
        augment: ``Augment`` or ``None`` for clean batches.
        share: (rank, world size): this process's slice of each global batch.
        channels_last: return batches in channels_last memory format.
        image_size: train at ``image_size`` x ``image_size`` pixels: each augmented batch is
            resized (bilinear, antialiased) from the data's size (progressive resizing, a
            piecewise schedule's segments); None = the data's size.
    Yields:
        From ``epoch``, ``(x, y)``, x float32 (B/W, C, S, S) normalised, y int64 (B/W,), S =
        image_size or the data's H, W.
    Raises:
        SwapError: the dataset holds fewer samples than one global batch.
    """

    def __init__(self, data, batch_size: int, seed_parts: tuple, stats: tuple[torch.Tensor, torch.Tensor],
                 augment: Augment | None = None, share: tuple[int, int] = (0, 1), channels_last: bool = False,
                 image_size: int | None = None):
        (mean, std), (rank, world_size) = stats, share
        if len(data) < batch_size:
            raise SwapError(f"training set of {len(data)} samples is smaller than one batch of {batch_size}")
        self.data, self.batch_size, self.seed_parts = data, batch_size, tuple(seed_parts)
        self.mean, self.std = mean.to(data.images.device), std.to(data.images.device)
        self.augment, self.rank, self.world_size = augment, rank, world_size
        self.share = batch_size // world_size
        self.channels_last = channels_last
        self.image_size = image_size if image_size is not None and (image_size, image_size) != \
            tuple(data.images.shape[2:]) else None

    def __len__(self) -> int:
        """Updates per epoch."""
        return len(self.data) // self.batch_size

    def plan(self, epoch: int, start: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """This rank's sample indices and augmentation parameters for updates ``start ..`` of
        ``epoch``, on the data's device: int64 (S, B/W) and {name: (S, B/W, ...)} with S =
        ``len(self) - start``. The epoch's permutation and parameters (drawn batch by batch in the
        stream's order, the skipped updates' too) go to the device in one copy each: a CPU->GPU
        copy per update would make the host wait for the device at every update."""
        gen, perm = epoch_order(self.seed_parts, epoch, len(self.data))
        _, _, h, w = self.data.images.shape
        steps, b = len(self), self.batch_size
        lo, hi, dev = self.rank * self.share, (self.rank + 1) * self.share, self.data.images.device
        perm = perm[:steps * b].view(steps, b)[start:, lo:hi].to(dev)
        params = {}
        if self.augment:
            drawn = [self.augment.draw(b, h, w, gen) for _ in range(steps)]
            params = {k: torch.stack([d[k] for d in drawn])[start:, lo:hi].to(dev) for k in drawn[0]}
        return perm, params

    def batch(self, idx: torch.Tensor, params: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The training batch of samples ``idx`` (int64 (n,)) with their augmentation ``params``
        (from :meth:`plan`): x float32 (n, C, H, W) normalised, y int64 (n,)."""
        if self.augment:
            # Augment raw pixels, then normalise: padding and cutout fill with black (0) pixels.
            x = self.augment.apply(self.data.images[idx].float(), params)
            x = (x - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)
        else:
            x = _normalise(self.data.images[idx], self.mean, self.std)
        if self.image_size is not None:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True,
                              align_corners=False)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, self.data.labels[idx]

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of ``epoch`` from update ``start`` on: the same batches as a full pass yields
        from there (the skipped updates' random draws are made and discarded), so a run resumed
        mid-epoch sees what the uninterrupted run saw."""
        perm, params = self.plan(epoch, start)
        for j in range(len(perm)):
            yield self.batch(perm[j], {k: v[j] for k, v in params.items()})

    def full_pass(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every training sample once, in ``epoch``'s order and with its augmentation: the batches
        of ``epoch`` (all ranks' shares), then the remainder that an epoch of updates drops,
        batched by ``pass_slices`` (a one-sample remainder joins the last batch). The pass of
        a BN-statistics recomputation; the remainder's augmentation is drawn after the epoch's."""
        gen, perm = epoch_order(self.seed_parts, epoch, len(self.data))
        _, _, h, w = self.data.images.shape
        n, b, dev = len(self.data), self.batch_size, self.data.images.device
        params = {}
        if self.augment:
            sizes = [b] * len(self) + ([n - len(self) * b] if n % b else [])
            drawn = [self.augment.draw(size, h, w, gen) for size in sizes]
            params = {k: torch.cat([d[k] for d in drawn]) for k in drawn[0]}
        for part in pass_slices(n, b):
            yield self.batch(perm[part].to(dev), {k: v[part].to(dev) for k, v in params.items()})


def eval_batches(data, batch_size: int, mean: torch.Tensor, std: torch.Tensor, rank: int = 0,
                 world_size: int = 1, channels_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Clean, ordered batches of rank ``rank``'s contiguous shard of ``data`` (all samples kept,
    batched by ``pass_slices``).

    Yields (x float32 (b, C, H, W) normalised, y int64 (b,)), b <= batch_size + 1.
    """
    n = len(data)
    lo, hi = n * rank // world_size, n * (rank + 1) // world_size
    mean, std = mean.to(data.images.device), std.to(data.images.device)
    for part in pass_slices(hi - lo, batch_size):
        x = _normalise(data.images[lo + part.start:lo + part.stop], mean, std)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        yield x, data.labels[lo + part.start:lo + part.stop]


class PiecewiseLoader:
    """The batches of a piecewise schedule (:class:`swap.schedules.Segment` list) from schedule epoch ``start``
    on (SWAP's phase 2 "reverting to the original schedule" at the transition epoch, Gupta et al.
    2020, Sec. 5.2): epoch ``e`` of the phase (0-based) is schedule epoch ``start + e``. At every
    segment boundary the batch size and the image size change: each segment's batches come from
    its own loader, ``make(batch_size, image_size)``, built on first use (one at a time). The data
    stream of epoch ``e`` is the inner loader's epoch ``e`` (seed, phase, worker, epoch), so a
    resume anywhere, across boundaries too, replays the same batches. ``samples``: the training
    set's size (updates per epoch = ``samples // batch_size``).

    The train loop reads it through :func:`swap.schedules.epoch_shape`; :meth:`lr_at` is its LR over the loop's
    global update index (update ``i`` of epoch ``e`` at fractional epoch ``start + e + i / n_e``).

    Raises:
        SwapError: ``start`` outside the schedule.
    """

    def __init__(self, segments: list[Segment], make: Callable, samples: int, start: int = 0):
        if not 0 <= start < segments[-1].end:
            raise SwapError(f"start epoch {start} is outside the schedule's epochs [0, {segments[-1].end})")
        self.segments, self.make, self.samples, self.start = segments, make, samples, start
        self.epochs = segments[-1].end - start
        self._built: tuple[Segment, object] | None = None

    def segment(self, epoch: int) -> Segment:
        """The segment of phase epoch ``epoch`` (0-based)."""
        t = self.start + epoch
        return next(s for s in self.segments if s.start <= t < s.end) if t < self.segments[-1].end else self.segments[-1]

    def loader(self, epoch: int):
        """The inner loader of ``epoch``'s segment."""
        seg = self.segment(epoch)
        if self._built is None or self._built[0] is not seg:
            self._built = None                                # one inner loader alive at a time
            self._built = (seg, self.make(seg.batch_size, seg.image_size))
            if len(self._built[1]) != self.updates(epoch):
                raise SwapError(f"the loader of {seg} has {len(self._built[1])} updates per epoch, "
                                 f"expected {self.updates(epoch)}")
        return self._built[1]

    def updates(self, epoch: int) -> int:
        """Updates of ``epoch``: ``samples // batch_size`` of its segment (the last partial batch is
        dropped, as every loader does)."""
        return self.samples // self.segment(epoch).batch_size

    def shape(self, epoch: int) -> tuple[int, int, int]:
        """(global update index of ``epoch``'s first update, its updates, its global batch)."""
        return sum(self.updates(e) for e in range(epoch)), self.updates(epoch), self.segment(epoch).batch_size

    def epoch(self, epoch: int, start: int = 0):
        return self.loader(epoch).epoch(epoch, start)

    def lr_at(self, update: int) -> float:
        """The LR of global update ``update`` (0-based): the segment's ramp at the update's fractional epoch."""
        e, first = 0, 0
        while e < self.epochs - 1 and first + self.updates(e) <= update:
            first += self.updates(e)
            e += 1
        t = self.start + e + (update - first) / self.updates(e)
        return self.segment(e).lr_at(t)


class UpdateBudget:
    """A train-loop loader cut to exactly ``updates`` updates: the epochs of ``inner`` (``len(inner)``
    updates each, the same batches), the last one cut short, so that a run is given a budget in
    updates rather than epochs (``swap compare --equal-time``: a baseline gets the reference's
    critical-path updates). ``epochs``: how many epochs that takes (the last possibly partial).
    The train loop reads it through :func:`swap.schedules.epoch_shape`.

    Raises:
        SwapError: ``updates`` < 1.
    """

    def __init__(self, inner, updates: int):
        if updates < 1:
            raise SwapError(f"an update budget must be >= 1 update, got {updates}")
        self.inner, self.total = inner, updates
        self.epochs = math.ceil(updates / len(inner))
        self.batch_size = inner.batch_size

    def __len__(self) -> int:
        return len(self.inner)

    def shape(self, epoch: int) -> tuple[int, int, int]:
        """(first global update of ``epoch``, its updates, global batch)."""
        n = len(self.inner)
        return epoch * n, max(0, min(n, self.total - epoch * n)), self.batch_size

    def epoch(self, epoch: int, start: int = 0):
        """The batches of ``epoch`` from update ``start``: ``inner``'s, up to the budget."""
        return itertools.islice(self.inner.epoch(epoch, start), max(0, self.shape(epoch)[1] - start))


__all__ = ["PiecewiseLoader", "UpdateBudget", "WorkerOrder", "stream_seed", "epoch_order", "pass_slices", "subset_indices", "Augment", "Loader", "eval_batches"]
