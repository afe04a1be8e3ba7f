"""Any map-style ``torch.utils.data.Dataset`` as training and evaluation batches, through
``torch.utils.data.DataLoader``, keeping the contract of the in-memory fast path
(:class:`swap.data.Loader`):

- a sample is ``(input, target)``: ``input`` a tensor, a tuple of tensors or a dict of tensors,
  ``target`` a tensor (or a number); or a single mapping (a Hugging Face row), whose batch is the
  input and whose ``labels`` are the target (:func:`split_batch`); batches are collated by
  ``collate_fn`` (torch's default);
- each epoch's order is a permutation drawn from (seed, phase, worker, epoch), the same
  permutation :class:`swap.data.Loader` draws for a dataset of the same length;
- in a data-parallel phase every rank takes its slice of each global batch, so W ranks see exactly
  the samples one process sees;
- a mid-epoch resume starts at the same sample, and random per-sample transforms of the dataset
  draw the same numbers: each ``dataset[i]`` runs with torch's default generator (``rngs="torch"``,
  the default: torch-based transforms such as torchvision's) or also Python's ``random`` and
  NumPy's global RNG (``rngs="all"``, for albumentations-style pipelines, at some cost in speed)
  seeded from (seed, phase, worker, epoch, i) (:func:`sample_seed`),
  whatever the worker process or the position it resumed from. (torchdata's ``StatefulDataLoader`` checkpoints the workers' RNG states instead;
  seeding per sample makes that state unnecessary: the sampler's position is all there is.)
"""
from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import SwapError
from .loader import epoch_order, pass_slices, stream_seed, subset_indices


def to_device(x, device: torch.device, non_blocking: bool = False):
    """A tensor, or each tensor of a tuple, list or mapping (a plain dict after), on ``device``."""
    if isinstance(x, Mapping):
        return {k: to_device(v, device, non_blocking) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(v, device, non_blocking) for v in x)
    return x.to(device, non_blocking=non_blocking) if isinstance(x, torch.Tensor) else x


def _is_input(x) -> bool:
    if isinstance(x, torch.Tensor):
        return True
    if isinstance(x, dict):
        return bool(x) and all(isinstance(v, torch.Tensor) for v in x.values())
    if isinstance(x, (tuple, list)):
        return bool(x) and all(isinstance(v, torch.Tensor) for v in x)
    return False


def split_batch(batch) -> tuple:
    """A collated batch as ``(input, target)``: a pair as it is; a single mapping (a Hugging Face
    collator's batch) as ``(dict(batch), batch["labels"])``, the labels staying in the input (the
    model computes its own loss from them), the target None without them.

    Raises:
        SwapError: a batch that is neither.
    """
    if isinstance(batch, Mapping):
        x = dict(batch)
        return x, x.get("labels")
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise SwapError(f"a batch must be (input, target) or a mapping such as a Hugging Face collator's, got "
                    f"{type(batch).__name__}" + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""))


def check_sample(dataset, name: str = "dataset") -> None:
    """Refuse, before any training, a dataset that breaks the data contract (module docstring).
    A sample that is a single mapping (a Hugging Face row, collated by the run's ``collate_fn``)
    is accepted as it is.

    Raises:
        SwapError: empty, or its first sample is neither a non-empty mapping nor ``(input, target)``
            with a tensor / tuple / dict-of-tensors input and a tensor or number target (one line,
            naming what it got).
    """
    try:
        n = len(dataset)
    except TypeError:
        raise SwapError(f"{name} must be a map-style torch Dataset with a length (got {type(dataset).__name__})") from None
    if n == 0:
        raise SwapError(f"{name} is empty")
    sample = dataset[0]
    if isinstance(sample, Mapping) and sample:
        return
    if not (isinstance(sample, (tuple, list)) and len(sample) == 2):
        raise SwapError(f"{name}[0] must be a pair (input, target) or a mapping, got {type(sample).__name__}"
                        + (f" of length {len(sample)}" if isinstance(sample, (tuple, list)) else ""))
    x, y = sample
    if not _is_input(x):
        raise SwapError(f"{name}[0]'s input must be a tensor, a tuple of tensors or a dict of tensors, "
                        f"got {type(x).__name__}")
    if not isinstance(y, (torch.Tensor, int, float)):
        raise SwapError(f"{name}[0]'s target must be a tensor or a number, got {type(y).__name__}")


RNGS = ("torch", "all")


class _Seeded(Dataset):
    """``dataset[i]`` for keys ``(stream, i)``, with the global RNGs (torch's default CPU
    generator; with ``rngs="all"`` also Python's ``random`` and NumPy's global random state)
    seeded from (*stream, i) for that sample, and restored after the batch: the caller's random
    streams are not disturbed."""

    def __init__(self, dataset, rngs: str = "torch"):
        if rngs not in RNGS:
            raise SwapError(f"rngs must be one of {RNGS}, got {rngs!r}")
        self.dataset, self.all = dataset, rngs == "all"

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list) -> list:
        """The samples of ``keys`` (DataLoader's batched fetch: the RNG states are saved and restored
        once per batch, each sample's seeding costs about 5 microseconds)."""
        gen = torch.default_generator
        saved = gen.get_state(), (random.getstate(), _numpy_state()) if self.all else None
        bases: dict = {}
        try:
            out = []
            for stream, i in keys:
                if stream not in bases:
                    bases[stream] = stream_seed(*stream)
                seed = sample_seed(bases[stream], i)
                gen.manual_seed(seed)
                if self.all:
                    random.seed(seed)
                    _numpy_seed(seed)
                out.append(self.dataset[i])
            return out
        finally:
            gen.set_state(saved[0])
            if self.all:
                random.setstate(saved[1][0])
                _numpy_restore(saved[1][1])


def sample_seed(base: int, i: int) -> int:
    """The 63-bit seed of sample ``i`` in the stream whose ``stream_seed`` is ``base``: the
    SplitMix64 finaliser of ``base + i`` x the golden-ratio increment (Steele et al. 2014), a
    bijection of ``i``, so distinct samples get well-mixed, distinct seeds."""
    z = (base + (i + 1) * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def _numpy_state():
    try:
        import numpy as np
    except ImportError:
        return None
    return np.random.get_state()


def _numpy_seed(seed: int) -> None:
    try:
        import numpy as np
    except ImportError:
        return
    np.random.seed(seed % 2 ** 32)


def _numpy_restore(state) -> None:
    if state is not None:
        import numpy as np
        np.random.set_state(state)


class _Batches:
    """The batch sampler of one epoch (set by :meth:`DatasetLoader.epoch`): lists of keys."""

    def __init__(self):
        self.keys: list[list] = []

    def __iter__(self):
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)


class DatasetLoader:
    """Training batches of any map-style dataset for one phase and worker, sliced to one rank's
    share (module docstring). The interface of :class:`swap.data.Loader`: ``len()`` updates per
    epoch (the last partial global batch is dropped), ``batch_size`` (global, samples) and
    ``epoch``.

    Args:
        dataset: a map-style ``torch.utils.data.Dataset`` of ``(input, target)`` samples.
        batch_size: global batch in samples.
        seed_parts: identifies the stream, e.g. ``(seed, "phase1", 0)``; the epoch is appended.
        share: (rank, world size): this process's slice of each global batch.
        device: where batches go (pinned memory and non-blocking copies on CUDA).
        collate_fn: builds a batch from samples (default ``torch.utils.data.default_collate``).
        num_workers: DataLoader worker processes (0 = load in this process); persistent across epochs.
        rngs: the global RNGs seeded per sample: ``torch`` or ``all`` (module docstring).
    Raises:
        SwapError: the dataset holds fewer samples than one global batch; unknown ``rngs``.
    """

    def __init__(self, dataset, batch_size: int, seed_parts: tuple, share: tuple[int, int] = (0, 1),
                 device: torch.device | str = "cpu", collate_fn: Callable | None = None, num_workers: int = 0,
                 rngs: str = "torch"):
        rank, world_size = share
        if len(dataset) < batch_size:
            raise SwapError(f"training set of {len(dataset)} samples is smaller than one batch of {batch_size}")
        self.dataset, self.batch_size, self.seed_parts = dataset, batch_size, tuple(seed_parts)
        self.rank, self.world_size, self.share = rank, world_size, batch_size // world_size
        self.device = torch.device(device)
        self._batches = _Batches()
        cuda = self.device.type == "cuda"
        self._loader = DataLoader(_Seeded(dataset, rngs), batch_sampler=self._batches, collate_fn=collate_fn,
                                  num_workers=num_workers, pin_memory=cuda, persistent_workers=num_workers > 0)

    def __len__(self) -> int:
        """Updates per epoch."""
        return len(self.dataset) // self.batch_size

    def indices(self, epoch: int, start: int = 0) -> torch.Tensor:
        """This rank's sample indices of updates ``start ..`` of ``epoch``: int64 (S, B/W)."""
        _, perm = epoch_order(self.seed_parts, epoch, len(self.dataset))
        steps, b = len(self), self.batch_size
        lo, hi = self.rank * self.share, (self.rank + 1) * self.share
        return perm[:steps * b].view(steps, b)[start:, lo:hi]

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple]:
        """Batches (input, target) of ``epoch`` from update ``start`` on, on the device: the same
        batches, with the same random transforms, as a full pass yields from there."""
        return self.load(epoch, self.indices(epoch, start))

    def full_pass(self, epoch: int) -> list[torch.Tensor]:
        """Every sample's index once, in ``epoch``'s order, batched by
        ``swap.data.loader.pass_slices`` (the epoch's batches, then the remainder an epoch of
        updates drops; a one-sample remainder joins the last batch): int64 (b,) per batch, for
        :meth:`load`. The pass of a BN-statistics recomputation."""
        _, perm = epoch_order(self.seed_parts, epoch, len(self.dataset))
        return [perm[part] for part in pass_slices(len(perm), self.batch_size)]

    def load(self, epoch: int, rows: torch.Tensor) -> Iterator[tuple]:
        """Batches (input, target) of the sample indices ``rows`` (int64 (S, b) or a list of int64
        (b,): one batch per row, e.g. some rows of :meth:`indices` or of :meth:`full_pass`) of ``epoch``, on the device, each sample with the random
        transforms it gets in that epoch."""
        stream = (*self.seed_parts, epoch)
        self._batches.keys = [[(stream, int(i)) for i in row] for row in rows]
        cuda = self.device.type == "cuda"
        for batch in _unwrapped(self._loader):
            x, y = split_batch(to_device(batch, self.device, cuda))
            yield x, y


def _unwrapped(loader):
    """Iterate a DataLoader; a :class:`SwapError` raised in one of its worker processes comes back
    as its own one-line message (DataLoader re-raises it wrapped in the worker's traceback)."""
    try:
        yield from loader
    except SwapError as exc:
        text = str(exc)
        if "Original Traceback" not in text:
            raise
        marker = "SwapError: "
        raise SwapError(text[text.rindex(marker) + len(marker):].removesuffix("\\n").strip()) from None


def subset(dataset, n: int):
    """The first ``n`` samples of a fixed shuffle (seed 0, whatever the run seed) of a dataset, as
    :meth:`swap.data.ImageDataset.subset` does for images (``subset_indices``); ``n <= 0`` or
    ``n >= len`` keeps all. The subset shows the dataset's public attributes (``num_classes``,
    ``model_kwargs``, ...) and, if it has one, its ``at_size(S)`` (a subset of the resized dataset)."""
    idx = subset_indices(len(dataset), n)
    return dataset if idx is None else Subset(dataset, idx.tolist())


class Subset(torch.utils.data.Subset):
    """``torch.utils.data.Subset`` that shows its dataset's public attributes (:func:`subset`)."""

    def __getattr__(self, name: str):
        base = self.__dict__.get("dataset")                  # absent while unpickling
        if base is None or name.startswith("_"):
            raise AttributeError(name)
        value = getattr(base, name)
        if name == "at_size":
            return lambda size: Subset(value(size), self.indices)
        return value


def eval_loader(dataset, batch_size: int, rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu",
                collate_fn: Callable | None = None, num_workers: int = 0) -> Iterator[tuple]:
    """Ordered batches (input, target) of rank ``rank``'s contiguous shard of ``dataset`` (all
    samples kept, batched by ``swap.data.loader.pass_slices``: b <= batch_size + 1), on ``device``."""
    n = len(dataset)
    lo, hi = n * rank // world_size, n * (rank + 1) // world_size
    shard = torch.utils.data.Subset(dataset, range(lo, hi))
    device = torch.device(device)
    cuda = device.type == "cuda"
    order = [range(part.start, part.stop) for part in pass_slices(hi - lo, batch_size)]
    for batch in _unwrapped(DataLoader(shard, batch_sampler=order, collate_fn=collate_fn, num_workers=num_workers,
                                       pin_memory=cuda)):
        yield split_batch(to_device(batch, device, cuda))


__all__ = ["to_device", "split_batch", "check_sample", "RNGS", "sample_seed", "DatasetLoader", "subset",
           "Subset", "eval_loader"]
