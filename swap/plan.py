"""`swap plan`: predict the wall time of sgd-small, sgd-large and SWAP on D devices before renting them.

The model is the standard data-parallel one: an update of a global batch B on D devices costs the
slowest device's compute on its share B/D (processed in micro-batches, at the throughput measured
for that micro-batch size on ONE device) plus one ring all-reduce of the gradients,

    t_allreduce(D, bytes) = 2 (D - 1) / D * bytes / bandwidth + 2 (D - 1) * latency

(Patarasuk & Yuan 2009, "Bandwidth optimal all-reduce algorithms"), 0 for D = 1. SWAP's phase 2 runs
W independent workers with no communication, k = ceil(W / D) per device: in turn (k rounds of one
worker) for the ``sequential`` and ``processes`` layouts, or stacked into one computation per update
for ``vmap``, at the samples/s measured for k stacked workers (the GPU case, where one small batch
leaves the device idle and k of them fill it); a worker of ``phase2.ranks_per_worker`` r devices is a
data-parallel group (r devices, its own all-reduce; ceil(W r / D) rounds). Phase 3 is one forward
pass over the training set, sharded over the devices, and one evaluation. A piecewise schedule's
segments are timed one by one, at their batch and image size (the rate scaled by pixels). Each evaluation is a forward pass over the test set (sharded over the
devices where the phase is data-parallel). Throughputs come from a short calibration of the user's
model on the user's device through the real data path and train loop (:func:`calibrate`); nothing
else is measured, so the prediction is only as good as "throughput depends on the per-device batch
and nothing else". Process start-up and data loading (seconds per launch) are not modelled.

Defaults of the communication model: bandwidth 12.5e9 bytes/s and latency 20e-6 s (a 100 Gb/s
network); pass measured values for other hardware (on one machine with NVLink, ~1e11 B/s).
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .config import Config, OptimConfig, section_epochs, segments
from .errors import SwapError
from .methods import METHODS
from .optim.build import build_optimizer, weight_decay_of
from .data import Augment, ImageDataset, Loader
from .train import SGDStep, evaluate, train
from .algorithms.stacked import StackedLoader, StackedStep


@dataclass(frozen=True)
class Hardware:
    """D devices, their all-reduce bandwidth (bytes/s) and per-message latency (s)."""
    devices: int
    bandwidth: float = 12.5e9
    latency: float = 20e-6

    def allreduce_s(self, nbytes: int) -> float:
        """Seconds of one ring all-reduce of ``nbytes`` over the devices (0 for one device)."""
        d = self.devices
        if d == 1:
            return 0.0
        return 2 * (d - 1) / d * nbytes / self.bandwidth + 2 * (d - 1) * self.latency


@dataclass(frozen=True)
class Throughput:
    """Measured single-device throughputs: ``train`` maps micro-batch size -> training samples/s
    (forward, backward, SGD step), ``eval`` is forward-only samples/s; ``param_bytes`` the gradient
    size; ``stacked`` maps k -> training samples/s of k workers stacked at the phase-2 batch
    (all k workers' samples; measured only for ``phase2.layout: vmap``); ``image_size`` the side
    (pixels) of the calibration's images, when square."""
    train: dict[int, float]
    eval: float
    param_bytes: int
    stacked: dict[int, float] = field(default_factory=dict)
    image_size: int | None = None

    def train_at(self, batch: int, image_size: int | None = None) -> float:
        """Samples/s at ``batch``: the measured value, else log-linear interpolation between the
        nearest measured sizes (constant beyond the ends). At another ``image_size`` (progressive
        resizing), scaled by :meth:`pixel_ratio`."""
        sizes = sorted(self.train)
        if batch in self.train:
            rate = self.train[batch]
        elif batch <= sizes[0]:
            rate = self.train[sizes[0]]
        elif batch >= sizes[-1]:
            rate = self.train[sizes[-1]]
        else:
            hi = next(s for s in sizes if s > batch)
            lo = max(s for s in sizes if s < batch)
            f = (math.log(batch) - math.log(lo)) / (math.log(hi) - math.log(lo))
            rate = self.train[lo] + f * (self.train[hi] - self.train[lo])
        return rate * self.pixel_ratio(image_size)

    def pixel_ratio(self, image_size: int | None) -> float:
        """(calibrated side / ``image_size``)^2, the model's rule that a convolutional net's compute
        per sample grows with H x W; 1 when either side is unknown."""
        return (self.image_size / image_size) ** 2 if image_size and self.image_size else 1.0


def update_s(thr: Throughput, hw: Hardware, batch: int, micro_batch: int, image_size: int | None = None) -> float:
    """Seconds of one data-parallel update of global ``batch`` on ``hw``: each device's share in
    micro-batches of ``micro_batch`` (0 = whole share) plus the gradient all-reduce; images of
    side ``image_size`` (None: the calibrated size)."""
    share = batch / hw.devices
    chunk = micro_batch if 0 < micro_batch < share else share
    return share / thr.train_at(int(chunk), image_size) + hw.allreduce_s(thr.param_bytes)


def stages(cfg: Config, section: str, epochs: int | None = None) -> list[tuple[int, int, int, int | None]]:
    """(epochs, global batch, micro-batch, image side or None) of each stretch of config
    ``section`` with one batch and image size: its segments (phase 2 from ``start_epoch``), or one
    stretch; cut after ``epochs`` epochs when given (phase 1's stopping point)."""
    sec = getattr(cfg, section)
    micro = getattr(sec, "micro_batch_size", 0)
    start = cfg.phase2.start_epoch if section == "phase2" else 0
    out = [(s.end - max(s.start, start), s.batch_size, micro, s.image_size)
           for s in segments(cfg, section) if s.end > start] or \
        [(section_epochs(cfg, section), sec.batch_size, micro, None)]
    if epochs is not None:
        left, cut = epochs, []
        for e, b, m, size in out:
            if left > 0:
                cut.append((min(e, left), b, m, size))
            left -= e
        out = cut
    return out


def predict(cfg: Config, thr: Throughput, hw: Hardware, n_train: int, n_test: int,
            phase1_epochs: int | None = None) -> dict[str, dict]:
    """Predicted wall seconds of sgd-small, sgd-large and SWAP (sections ``sgd_small``,
    ``sgd_large``, ``phase1-3``) for ``n_train``/``n_test`` samples on ``hw``.

    ``phase1_epochs``: epochs until the stopping accuracy (e.g. from an earlier run); default
    ``phase1.max_epochs``, an upper bound. Returns {method: {"total_s", "updates", parts...}}.
    """
    def evals(epochs: int, sharded: bool) -> float:
        n = math.ceil(epochs / cfg.eval_every)
        return n * n_test / thr.eval / (hw.devices if sharded else 1)

    def run(parts: list, hardware: Hardware) -> tuple[int, float]:         # (updates, training seconds)
        updates = [e * (n_train // b) for e, b, _, _ in parts]
        return sum(updates), sum(u * update_s(thr, hardware, b, m, size) for u, (_, b, m, size) in zip(updates, parts))

    out = {}
    for method in ("sgd-small", "sgd-large"):
        mcfg = METHODS[method].config(cfg)                            # the section the method trains with: sgd
        updates, train_s = run(stages(mcfg, "sgd"), hw)
        out[method] = {"train_s": train_s, "eval_s": evals(section_epochs(mcfg, "sgd"), True), "updates": updates}
    p2 = cfg.phase2
    e1 = phase1_epochs or section_epochs(cfg, "phase1")
    u1, t1 = run(stages(cfg, "phase1", e1), hw)
    phase1 = t1 + evals(e1, True)
    e2, ranks = section_epochs(cfg, "phase2"), p2.ranks_per_worker
    # each worker on `ranks` devices (its own group; phase2.micro_batch_size chunks per device)
    u2, t2 = run([(e, b, p2.micro_batch_size, size) for e, b, _, size in stages(cfg, "phase2")],
                 Hardware(ranks, hw.bandwidth, hw.latency))
    k = math.ceil(cfg.workers * ranks / hw.devices)                  # rounds of workers per device
    if p2.layout == "vmap":
        if k not in thr.stacked:
            raise SwapError(f"phase2.layout vmap: no throughput measured for {k} stacked workers "
                             f"(calibrate with stacked=({k}, {p2.batch_size}))")
        phase2 = u2 * k * p2.batch_size / thr.stacked[k] + k * evals(e2, False)
    else:
        phase2 = k * (t2 + evals(e2, False))
    phase3 = n_train / thr.eval / hw.devices + n_test / thr.eval     # BN pass (sharded) + final evaluation (rank 0)
    out["swap"] = {"phase1_s": phase1, "phase2_s": phase2, "phase3_s": phase3, "updates": u1 + u2,
                   "phase1_epochs": e1}
    for row in out.values():
        row["total_s"] = sum(v for k, v in row.items() if k.endswith("_s"))
    return out


@dataclass(frozen=True)
class Measure:
    """How :func:`calibrate` and :func:`calibrate_dataset` measure: on ``device``, about
    ``samples`` training samples per epoch (at least 3 updates), evaluation batches of
    ``eval_batch`` samples, forward passes at ``amp_dtype`` (None: float32), images in
    ``channels_last`` memory format."""
    device: torch.device
    samples: int = 4096
    eval_batch: int = 1024
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False


def calibrate(model_fn: Callable[[], nn.Module], sample_shape: tuple[int, int, int], num_classes: int,
              batches: list[int], how: Measure, augment: Augment | None = None,
              stacked: tuple[int, int] | None = None) -> Throughput:
    """Measure training samples/s at each size in ``batches`` through the real data path and train
    loop (:class:`swap.data.Loader` with ``augment``, :func:`swap.train.train`, Nesterov SGD) on
    synthetic uint8 images of ``sample_shape`` (C, H, W), and forward-only samples/s of
    :func:`swap.train.evaluate`, as ``how`` says (:class:`Measure`). Each size trains 2 epochs of
    about ``how.samples`` samples (at least 3 updates) and keeps the second (warm) epoch's rate,
    which the train loop times after a device sync. ``stacked=(k, b)`` also measures k workers of
    batch b stacked into one computation (:class:`swap.algorithms.stacked.StackedStep`, each with
    its own loader), the same way.
    """
    device, samples, eval_batch, amp_dtype, channels_last = (how.device, how.samples, how.eval_batch, how.amp_dtype,
                                                             how.channels_last)
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    mean, std = torch.full((sample_shape[0],), 128.0), torch.full((sample_shape[0],), 64.0)
    train_rates = {}
    for b in sorted(set(batches)):
        model = model_fn().to(device).to(memory_format=fmt)
        data = _synthetic(b * max(3, samples // b), sample_shape, num_classes, device)
        loader = Loader(data, b, (0, "calibrate", b), (mean, std), augment, channels_last=channels_last)
        train_rates[b] = _warm_rate(SGDStep(model, _sgd(model), 0, amp_dtype), loader)
    data = _synthetic(eval_batch * 3, sample_shape, num_classes, device)
    evaluate(model, data, mean, std, eval_batch, channels_last=channels_last, amp_dtype=amp_dtype)     # warm-up
    t = time.perf_counter()
    evaluate(model, data, mean, std, eval_batch, channels_last=channels_last, amp_dtype=amp_dtype)    # syncs (.item())
    eval_rate = len(data) / (time.perf_counter() - t)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    stacked_rates = {}
    if stacked is not None:
        k, b = stacked
        data = _synthetic(b * max(3, samples // b), sample_shape, num_classes, device)
        loaders = [Loader(data, b, (0, "calibrate", b, w), (mean, std), augment, channels_last=channels_last)
                   for w in range(k)]
        models = [model_fn().to(device).to(memory_format=fmt) for _ in range(k)]
        o = OptimConfig()
        step = StackedStep(models, [_sgd(m) for m in models], momentum=o.momentum, nesterov=o.nesterov,
                           weight_decay=weight_decay_of("sgd", o), amp_dtype=amp_dtype)
        stacked_rates[k] = _warm_rate(step, StackedLoader(loaders))
    side = sample_shape[1] if sample_shape[1] == sample_shape[2] else None
    return Throughput(train_rates, eval_rate, param_bytes, stacked_rates, side)


def _sgd(model: nn.Module) -> torch.optim.SGD:
    """The calibration's optimizer, the default SGD of a phase (:func:`swap.optim.build.build_optimizer`;
    its update's cost, not its result, is measured)."""
    return build_optimizer("sgd", model, OptimConfig())


def _warm_rate(step, loader) -> float:
    """Training samples/s of ``step`` over ``loader``: the second (warm) of 2 epochs."""
    return train(step, loader, lambda s: 1e-3, epochs=2)["samples_per_s"]


def calibrate_dataset(model_fn: Callable[[], nn.Module], dataset, task, collate_fn, batches: list[int],
                      how: Measure) -> Throughput:
    """:func:`calibrate` for a model and dataset of your own (the generic path: any map-style
    ``Dataset``, ``model.name``/``data.name`` import paths): training samples/s at each size in
    ``batches`` on the dataset's own first samples (about ``how.samples`` per epoch, at least 3
    updates, fewer where the dataset is smaller), batched by ``collate_fn`` through
    :class:`swap.data.generic.DatasetLoader` and the train loop with ``task``'s loss; forward-only
    samples/s of :func:`swap.train.evaluate_metrics` on up to 3 evaluation batches. No stacked
    workers and no image-size scaling (``side`` None).

    Raises:
        SwapError: the dataset holds fewer samples than the largest batch.
    """
    from .errors import SwapError
    from .data.generic import DatasetLoader, eval_loader
    from .train import evaluate_metrics

    device, samples, eval_batch, amp_dtype = how.device, how.samples, how.eval_batch, how.amp_dtype
    torch.manual_seed(0)
    train_rates = {}
    for b in sorted(set(batches)):
        if len(dataset) < b:
            raise SwapError(f"swap plan: the training set ({len(dataset)} samples) is smaller than a batch of {b}")
        n = min(len(dataset), b * max(3, samples // b))
        model = model_fn().to(device)
        loader = DatasetLoader(torch.utils.data.Subset(dataset, range(n)), b, (0, "calibrate", b), device=device,
                               collate_fn=collate_fn)
        train_rates[b] = _warm_rate(SGDStep(model, _sgd(model), 0, amp_dtype, task), loader)
    data = torch.utils.data.Subset(dataset, range(min(len(dataset), 3 * eval_batch)))
    batches_ = list(eval_loader(data, eval_batch, device=device, collate_fn=collate_fn))
    evaluate_metrics(model, batches_, task, amp_dtype=amp_dtype)                       # warm-up
    t = time.perf_counter()
    evaluate_metrics(model, batches_, task, amp_dtype=amp_dtype)                       # syncs (.item())
    eval_rate = len(data) / (time.perf_counter() - t)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return Throughput(train_rates, eval_rate, param_bytes, {}, None)


def _synthetic(n: int, shape: tuple[int, int, int], num_classes: int, device: torch.device) -> ImageDataset:
    g = torch.Generator().manual_seed(n)
    images = torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)
    return ImageDataset(images, torch.randint(0, num_classes, (n,), generator=g), num_classes).to(device)


def plan_table(pred: dict[str, dict], measured: dict[str, list[float]]) -> str:
    """Markdown table of :func:`predict`'s rows, with the median of ``measured`` wall seconds per
    method (robust to a run slowed by other work) and the prediction's relative error."""
    lines = ["| Method | Predicted (s) | Parts (s) | Updates | Measured (s, median) | Error |",
             "|---|---:|---|---:|---:|---:|"]
    for method, row in pred.items():
        parts = ", ".join(f"{k[:-2]} {v:.0f}" for k, v in row.items() if k.endswith("_s") and k != "total_s")
        got = measured.get(method)
        m = statistics.median(got) if got else None
        err = f"{100 * (row['total_s'] - m) / m:+.0f}%" if m else ""
        lines.append(f"| {method} | {row['total_s']:.0f} | {parts} | {row['updates']} | {f'{m:.0f}' if m else ''} | {err} |")
    return "\n".join(lines)


def stacked_shape(cfg: Config, devices: int) -> tuple[int, int] | None:
    """(workers per device, phase-2 batch): the stacked throughput a plan on ``devices`` devices
    needs for ``phase2.layout: vmap``; None for the other layouts."""
    return (math.ceil(cfg.workers / devices), cfg.phase2.batch_size) if cfg.phase2.layout == "vmap" else None


def chunk_sizes(cfg: Config, devices: int, largest: int | None = None) -> list[int]:
    """The micro-batch sizes a plan on ``devices`` devices needs throughputs for, capped at
    ``largest`` (a calibration on a small device: the rate is then taken as constant above it)."""
    def chunk(batch: int, micro: int, d: int) -> int:
        share = batch // d
        return micro if 0 < micro < share else share
    parts = [p for m in ("sgd-small", "sgd-large") for p in stages(METHODS[m].config(cfg), "sgd")]
    parts += stages(cfg, "phase1")
    p2 = cfg.phase2
    sizes = {chunk(b, m, devices) for _, b, m, _ in parts}
    sizes |= {chunk(b, p2.micro_batch_size, p2.ranks_per_worker) for _, b, _, _ in stages(cfg, "phase2")}
    return sorted({min(s, largest) if largest else s for s in sizes})


__all__ = ["Hardware", "Throughput", "update_s", "stages", "predict", "Measure", "calibrate", "calibrate_dataset",
           "plan_table", "stacked_shape", "chunk_sizes"]
