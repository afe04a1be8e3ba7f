"""Every knob of a run, as dataclasses; YAML presets, ``--set KEY=VALUE`` overrides, validation.

A config is resolved once, validated before any work starts, and saved with the run
(``config.yaml`` in the run directory). Names follow the SWAP paper (Gupta, Akle Serrano, DeCoste,
ICLR 2020): phase 1 is the large-batch data-parallel phase, phase 2 the independent small-batch
workers, phase 3 the averaging. Units: batch sizes in samples, epochs in passes over the training
set, learning rates per update, accuracies in percent (0-100).
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import SwapError, printable  # noqa: F401  (re-exported: `from swap.config import SwapError`)
from .imports import is_import_path
from .models import MODELS
from .schedules import SHAPES, parse_segments

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


#: ``data.name``: the built-in datasets (swap.data.sources)
DATASETS = ("fashion-mnist", "mnist", "cifar10", "cifar100", "text-char", "imagefolder")
#: ``phase2.layout``
LAYOUTS = ("processes", "sequential", "vmap")
#: ``extrap.variant`` (swap.optim.extrap)
EXTRAP_VARIANTS = ("extragradient", "past-gradient", "gaussian")
#: The sections that train a model with their own batch, LR schedule and optimizer
TRAINING_SECTIONS = ("phase1", "phase2", "sgd", "sgd_small", "sgd_large", "lars_large", "lamb_large", "adamw_large")
#: ``sgd.average`` and ``phase2.average_along``: the averages along one trajectory (swap.trajectory)
ALONG = ("none", "ema", "lawa")
#: ``ema.buffers`` and ``lawa.buffers``: BN statistics recomputed by one pass, or averaged like the weights
ALONG_BUFFERS = ("recompute", "average")
#: ``ema.device`` and ``lawa.device``: the average on the model's device, or in host memory
ALONG_DEVICES = ("same", "cpu")


@dataclass
class DataConfig:
    """Dataset and augmentation. ``dir`` is searched first, then ``$SWAP_DATA``, then system paths."""
    name: str = "fashion-mnist"          # fashion-mnist | mnist | cifar10 | cifar100 | text-char (fortunes) |
                                         # imagefolder (dir/train/CLASS/*.jpg|png and dir/val/CLASS/..., Pillow) |
                                         # package.module:function, yours: function() or function(data.dir)
                                         # returns (train_set, test_set), map-style Datasets
    collate: str | None = None           # package.module:function building a batch from samples (default: the
                                         # dataset's own collate_fn attribute, else torch's default_collate)
    dir: str | None = None                # folder with the dataset files (searched first; null = the search order)
    train_subset: int = 0                # 0 = all training samples; else the first N of a fixed shuffle
    test_subset: int = 0                  # 0 = all test samples; else the first N of a fixed shuffle
    crop_padding: int = 2                # random crop after zero padding, pixels per side (0 = off)
    flip: bool = True                    # random horizontal flip
    cutout: int = 8                      # cutout square side in pixels (DeVries & Taylor 2017; 0 = off)
    holdout: int = 0                     # > 0: the last N training samples become the evaluation set
                                         # (a validation split for tuning); the test set is not touched. A run
                                         # that decides on a validation split (phase1.stop: auto, greedy soup)
                                         # holds them out as that split; 0 there = 10% of the training
                                         # samples, at most 5,000 (named in the run's first line)
    num_workers: int = 0                 # DataLoader worker processes of a generic Dataset (0 = in-process)
    seq_len: int = 64                    # text-char: bytes per sample (context length of the model)
    sample_rngs: str = "torch"           # a Dataset's random transforms replay exactly (resume, ranks) when they
                                         # draw from: torch (torch's RNG) | all (+ Python random, NumPy)
    image_size: int | None = None        # imagefolder: evaluation side in pixels (and training side where no
                                         # segment sets image_size); null = the images' own (the shorter side of
                                         # the first training image; other sizes are resized and centre-cropped)
    crop: str = "auto"                   # imagefolder training crop: resized (Inception's random resized crop,
                                         # min_scale; ImageNet) | padded (crop_padding, flip, cutout, as the
                                         # in-memory path; small images) | auto (padded up to 64 px, else resized)
    min_scale: float = 0.08              # imagefolder: smallest area fraction of a random resized crop
    crop_ratio: float = 0.875            # imagefolder: evaluation centre crop / resized shorter side (crop
                                         # resized; padded evaluates the whole image)
    bad_images: str = "stop"             # imagefolder: an unreadable image stops the run | skip (counted, in
                                         # RUN/logs/bad_images.txt)
    verify_images: bool = True           # imagefolder: decode every image once before training (`swap train`,
                                         # `swap compare`), so a bad one stops the run before any work
    follow_links: bool = False           # imagefolder: follow symbolic links that lead out of data.dir (a tree
                                         # of links to images kept elsewhere); off, such a link stops the run


@dataclass
class ModelConfig:
    """``resnet9``: the DAWNBench cifar10-fast ResNet-9; ``smallcnn``: early-downsampling CPU net;
    ``resnet50``: the bottleneck ResNet-50 (He et al. 2016); ``torchvision:NAME``: any torchvision
    classification model, where torchvision can be imported."""
    name: str = "smallcnn"               # resnet9 | smallcnn | resnet50 | char-transformer | torchvision:NAME |
                                         # package.module:function, yours: function() returns an nn.Module
    width: float = 1.0                   # channel multiplier
    init_bn0: bool = False               # resnet50: zero-init the last BN scale of each residual block (Goyal et al. 2017)


OPTIMIZERS = ("sgd", "lars", "lamb", "adamw", "extrap")   # the values of every section's `optimizer`
NO_DECAY = ("none", "bn", "norm_bias")


@dataclass
class OptimConfig:
    """Optimizer settings of every phase (``swap.optim``). A section that trains (``phase1``,
    ``phase2``, ``sgd``, ``sgd_small``, ``sgd_large``, ``lars_large``, ...) picks its ``optimizer`` and may override any of
    these for itself with its own ``optim`` mapping (``phase1.optim: {weight_decay: 0.01}``).
    ``null`` means the optimizer's own default, from its paper or reference implementation:
    weight decay 5e-4 for sgd, extrap and lars (SWAP paper; You et al. 2017), 0.01 for lamb (You et al.
    2020, BERT) and adamw (torch.optim.AdamW); eps 1e-9 (lars), 1e-6 (lamb), 1e-8 (adamw)."""
    momentum: float = 0.9                # sgd, extrap, lars (paper: Nesterov momentum 0.9)
    nesterov: bool = True                # sgd, extrap, lars
    weight_decay: float | None = None    # null = the optimizer's default (class docstring)
    betas: list = field(default_factory=lambda: [0.9, 0.999])   # adamw, lamb: Adam's (beta1, beta2), each in [0, 1)
    eps: float | None = None             # adamw, lamb, lars: added to the denominator (null = the optimizer's)
    trust_coefficient: float = 0.001     # lars: eta, the trust coefficient (You et al. 2017, Alg. 1)
    trust_clip: bool = False             # lars: LARC clipping, local LR = min(eta x trust ratio, 1) x LR
    no_decay: str = "none"               # parameters without weight decay: none | bn (BatchNorm scales and shifts,
                                         # DAWNBench --no-bn-wd) | norm_bias (every bias and normalisation weight,
                                         # i.e. every 1-D parameter: timm, Hugging Face, LARS/LAMB reference code)
    clip_grad_norm: float = 0.0          # clip the L2 norm of each update's whole gradient (all ranks, all
                                         # micro-batches) to this (0 = off); torch.nn.utils.clip_grad_norm_'s rule


@dataclass
class TaskConfig:
    """The loss and the metrics (:class:`swap.task.Task`), for a model of your own in the CLI; the
    library takes ``loss_fn=`` and ``metrics=`` instead."""
    loss: str | None = None              # package.module:function, loss(output, target) -> scalar (null: the
                                         # output's own loss, else cross-entropy of its prediction)
    metrics: list = field(default_factory=list)   # names among top1, top5, loss, and package.module:function
                                         # entries fn(output, target) -> (sum, count), reported under the
                                         # function's name ([] = top1 and loss)


@dataclass
class LoggingConfig:
    """Where the run's records go besides metrics.jsonl (:mod:`swap.tracking`)."""
    loggers: list = field(default_factory=list)   # tensorboard and/or mlflow (swap train --logger NAME)
    log_every: int = 0                   # also record the training loss, LR, gradient norm and samples/s every
                                         # N updates (a metrics.jsonl record of kind "step"; 0 = per epoch only)


#: Training metrics the train loop computes every epoch, and which way is better (the stop rule's direction)
STOP_METRICS = {"train_acc": "max", "train_loss": "min"}
AUTO_SIGNALS = ("plateau", "holdout", "trials", "barrier")   # phase1.stop: auto (swap.algorithms.transition)


@dataclass
class StopConfig:
    """Phase 1's stopping rule on a training metric of each epoch: ``train_acc`` (percent) reaching
    at least ``at``, or ``train_loss`` falling to at most ``at``. ``at: null`` keeps
    ``phase1.stop_acc`` (training accuracy)."""
    metric: str = "train_acc"            # train_acc | train_loss | auto (`phase1.stop: auto` for short): a rule
                                         # decides the switch, no threshold to search (swap.algorithms.transition)
    at: float | None = None              # threshold in the metric's unit (null = phase1.stop_acc)
    signal: str = "trials"               # auto: trials (two short small-batch trial copies of the phase-1 weights,
                                         # averaged every `every` epochs; their validation accuracy, data.holdout,
                                         # beats its best by <= min_delta for `window` trials in a row) | holdout
                                         # (the same for the
                                         # phase-1 model itself, every epoch) | barrier (the trial copies' error
                                         # barrier <= max_barrier) | plateau (the training loss gains < min_gain
                                         # over `window` epochs; needs no validation split)
    window: int = 2                      # auto: patience, in trials (trials) or epochs (holdout) | epochs the gain
                                         # is measured over (plateau)
    min_gain: float = 0.05               # auto, plateau: relative training-loss gain below which phase 1 stops
    min_delta: float = 0.0               # auto, holdout | trials: accuracy points a reading must beat the best by
    every: int = 3                       # auto, trials | barrier: epochs between two trials
    trial_updates: int = 0               # auto, trials | barrier: small-batch updates of each of the 2 trial
                                         # copies (0 = one phase-2 epoch); they count on the critical path
    max_barrier: float = 2.0             # auto, barrier: error barrier (accuracy points) at or below which the
                                         # trial copies count as one basin (swap.algorithms.transition)

    @property
    def watches_validation(self) -> bool:
        """The automatic switch on a signal that reads the validation split (all but ``plateau``)."""
        return self.metric == "auto" and self.signal != "plateau"


@dataclass
class DDPConfig:
    """torch's DistributedDataParallel, wherever ranks train one model (phase 1, the SGD baselines,
    ABS, a phase-2 worker group)."""
    find_unused_parameters: bool = False  # true: a model whose forward pass leaves some parameters out (a
                                         # skipped branch, a gated expert) trains on several ranks; costs a
                                         # graph traversal per update


@dataclass
class Phase1Config:
    """Large-batch synchronous data-parallel phase (SWAP Algorithm 1, phase 1)."""
    batch_size: int = 4096               # global batch, split evenly over the ranks
    micro_batch_size: int = 256          # per-rank gradient-accumulation chunk (0 = whole share)
    peak_lr: float = 1.2                  # the LR after the warm-up (scaled per parameter group, swap.optim.lr)
    warmup_epochs: float = 30.0           # linear warm-up from ~0 to peak_lr over these epochs
    max_epochs: int = 150                # the LR schedule spans max_epochs; stopping usually comes first
    stop_acc: float = 98.0               # stopping accuracy: training accuracy over the last epoch, %
    schedule: str = "linear"             # warm-up then linear | cosine decay to min_lr at max_epochs
    min_lr: float = 0.0                  # the LR the decay ends at
    warmup_updates: int = 0              # > 0: warm-up in updates, instead of warmup_epochs
    optimizer: str = "sgd"               # sgd | lars | lamb | adamw | extrap (extrapolated SGD, section `extrap`) |
                                         # package.module:function, your own: fn(param_groups) -> torch optimizer
    optim: dict = field(default_factory=dict)   # this section's overrides of `optim` ({weight_decay: 0.01})
    stop: StopConfig = field(default_factory=StopConfig)   # stopping rule on any training metric
    segments: list = field(default_factory=list)   # piecewise schedule, replacing batch_size, peak_lr, warmup,
                                         # schedule and the epochs when given: [{epochs: [start, end], batch_size,
                                         # lr: x | [from, to] (linear ramp), image_size: pixels (optional)}, ...]

    def stop_rule(self) -> tuple[str, float | None]:
        """(metric, threshold) of the stopping rule: ``stop`` if its ``at`` is set, else
        (``train_acc``, ``stop_acc``); (``auto``, None) for the automatic switch."""
        if self.stop.metric == "auto":
            return "auto", None
        return (self.stop.metric, self.stop.at) if self.stop.at is not None else ("train_acc", self.stop_acc)


@dataclass
class TrainingSection:
    """The keys of a section that trains with its own batch, LR schedule and optimizer (phase 2,
    the SGD baselines)."""
    batch_size: int = 512                # global batch (phase 2: per worker, split over its ranks_per_worker ranks)
    micro_batch_size: int = 0            # per-rank gradient-accumulation chunk (0 = whole share)
    peak_lr: float = 0.12                 # the LR after the warm-up (scaled per parameter group, swap.optim.lr)
    warmup_epochs: float = 0.0            # linear warm-up from ~0 to peak_lr over these epochs
    epochs: int = 30                      # epochs the LR schedule spans and the section trains
    schedule: str = "linear"             # warm-up then linear | cosine decay to min_lr at the last epoch
    min_lr: float = 0.0                   # the LR the decay ends at
    warmup_updates: int = 0              # > 0: warm-up in updates, instead of warmup_epochs
    optimizer: str = "sgd"               # sgd | lars | lamb | adamw | extrap (not in phase 2: each worker steps
                                         # alone) | package.module:function, your own: fn(param_groups)
    optim: dict = field(default_factory=dict)   # this section's overrides of `optim` ({weight_decay: 0.01})
    segments: list = field(default_factory=list)   # piecewise schedule, replacing batch_size, peak_lr, warmup,
                                         # schedule and the epochs when given: [{epochs: [start, end], batch_size,
                                         # lr: x | [from, to] (linear ramp), image_size: pixels (optional)}, ...]


@dataclass
class Phase2Config(TrainingSection):
    """Independent small-batch refinement (SWAP Algorithm 1, phase 2), one model per worker."""
    ranks_per_worker: int = 1            # each worker a DistributedDataParallel group of this many ranks (its
                                         # own process group; SWAP paper Sec. 5.2: 2 workers x 8 GPUs); > 1
                                         # trains workers in their ranks (layout processes acts as sequential)
                                         # and needs workers x ranks_per_worker <= ranks
    track_average: bool = False          # after training: test accuracy of the workers' average (BN
                                         # recomputed) at every phase-2 epoch, for `swap plot` (Fig. 1)
    save_every: int = 0                  # save each worker's weights every N updates (0 = off), for `swap cosine`
    layout: str = "processes"            # processes: each worker in its own child process (one that dies costs
                                         # only its own work; the others finish, the failure is reported);
                                         # sequential: in turn inside the rank; vmap: the rank's workers stacked
                                         # into one computation (torch.func; for GPUs)
    cycles: int = 1                      # C: each worker runs C cycles of `epochs` epochs with the LR schedule
                                         # restarted, and is sampled at the end of each; phase 3 averages all W x C
                                         # samples (SWAP paper Table 4, "SWAP (40 small-batch epochs)": C = 2)
    sync_every: int | None = None        # H: the workers meet every H updates (null: never, SWAP); needs one worker
                                         # per rank (or worker group); workers train in their ranks (layout
                                         # processes acts as sequential)
    outer: str = "average"               # at a meeting: average (local SGD) | nesterov (DiLoCo's outer step on the
                                         # averaged change of the weights, outer_lr and outer_momentum)
    outer_lr: float = 1.0                # DiLoCo's outer learning rate (Douillard et al. 2023: 0.7)
    outer_momentum: float = 0.0          # DiLoCo's outer Nesterov momentum, in [0, 1) (Douillard et al. 2023: 0.9)
    start_epoch: int = 0                 # with segments: the schedule epoch phase 2 starts at ("reverting to the
                                         # original schedule" at the transition, SWAP paper Sec. 5.2)
    average_along: str = "none"          # none | ema | lawa: each worker ends as its own average along its
                                         # trajectory (sections ema, lawa), which phase 3 then averages over workers


@dataclass
class Phase3Config:
    """Averaging and BN-statistics recomputation (SWAP Algorithm 1, phase 3)."""
    bn_batch_size: int = 512             # batch size of the one pass that recomputes BN statistics
    bn_augment: bool = True              # pass augmented training batches, as training saw them
    allow_missing_workers: bool = False  # average the workers that finished when some failed (else stop and
                                         # report; --resume then trains only the missing ones)
    aggregate: str = "uniform"           # uniform: average every sample | greedy: the greedy soup (Wortsman et al.
                                         # 2022), chosen on the validation split (the last data.holdout training
                                         # samples; the test set stays the test set)


@dataclass
class SGDConfig(TrainingSection):
    """Plain data-parallel SGD baseline (the paper's rows 'SGD (small-batch)' and 'SGD (large-batch)')."""
    micro_batch_size: int = 256           # per-rank gradient-accumulation chunk (0 = whole share)
    average: str = "none"                # none | ema | lawa: the run's model is the average along its trajectory
                                         # (sections ema, lawa); the last iterate is reported beside it
    updates: int = 0                     # > 0: train exactly this many updates instead of `epochs` (the LR
                                         # schedule spans them, the last epoch is cut short); swap compare
                                         # --equal-time sets it to the reference's critical-path updates


@dataclass
class AlongConfig:
    """What both averages along a trajectory share (:mod:`swap.trajectory`)."""
    start: int = 0                        # updates of the phase before the first sample (EMA update, LAWA snapshot)
    buffers: str = "recompute"           # recompute: BN statistics by one exact pass before any evaluation |
                                         # average: floating-point buffers averaged like the weights
    device: str = "same"                 # same: the average on the model's device | cpu: in host memory


@dataclass
class EMAConfig(AlongConfig):
    """Exponential moving average of the weights (timm ModelEmaV3, Composer EMA; swap.trajectory.EMA)."""
    decay: float = 0.999                  # per EMA update: avg <- decay x avg + (1 - decay) x weights
    half_life: float = 0.0                # > 0: the decay from a half-life in updates, 0.5 ** (every / half_life)
    warmup_power: float = 0.6667          # > 0: decay warm-up, min(decay, 1 - (1 + t) ** -power) at the t-th EMA
                                         # update (timm; Karras et al. 2024: 2/3 to 3/4); 0: off
    every: int = 1                        # updates between EMA updates


@dataclass
class LAWAConfig(AlongConfig):
    """Latest weights average (Kaddour 2022; Sanyal et al. 2023; swap.trajectory.LAWA)."""
    k: int = 5                            # the mean of the latest k snapshots
    every: int = 1                        # a snapshot every N epochs (or updates, with unit: updates)
    unit: str = "epochs"                 # epochs | updates


@dataclass
class ExtrapConfig:
    """Extrapolated SGD (Lin, Kong, Stich, Jaggi, ICML 2020), used where an ``optimizer`` is ``extrap``.
    gamma_t = gamma_ratio * eta_t, sigma_t = sigma_ratio * eta_t (same warm-up and decay as the LR)."""
    variant: str = "extragradient"       # extragradient | past-gradient | gaussian
    gamma_ratio: float = 1.0              # extrapolation step gamma_t = gamma_ratio x LR_t
    sigma_ratio: float = 0.01             # gaussian: noise scale sigma_t = sigma_ratio x LR_t


@dataclass
class SWAConfig:
    """Sequential SWA baselines of ``swap compare`` (Izmailov et al. 2018; SWAP paper Sec. 5.3).

    As the SWAP paper specifies, SWA samples as many models as SWAP has workers (``workers``) and
    trains as many epochs per sample as a SWAP worker (``phase2.epochs``). Each cycle's LR falls
    linearly from its max to its min; a model is sampled at the end of each cycle.
    Small-batch cycles use ``phase2.batch_size`` and LR ``phase2.peak_lr`` -> ``lr_min``;
    large-batch cycles use ``phase1.batch_size`` and LR ``large_lr_max`` -> ``large_lr_min``.
    """
    lr_min: float = 0.005                 # small-batch cycles: LR at the end of each cycle (phase2.peak_lr at its start)
    large_lr_max: float = 0.4             # large-batch cycles: LR at the start of each cycle
    large_lr_min: float = 0.04            # large-batch cycles: LR at the end of each cycle


@dataclass
class ABSConfig:
    """Adaptive batch size from Hessian information (ABS), and with FGSM adversarial training (ABSA):
    Yao, Gholami, Keutzer, Mahoney, arXiv 1810.01021. Defaults are the reference implementation's
    (power iteration 10 iterations, tolerance 1e-2, 128 samples; double when the top eigenvalue
    halves; fallback after 10 epochs; cap 128x the base batch; 20% FGSM examples, eps 0.005)."""
    batch_size: int = 128                # base (starting) global batch
    micro_batch_size: int = 0            # per-rank chunks of the share (0 = one chunk)
    peak_lr: float = 0.05                # peak LR at the base batch; scaled linearly with the batch
    warmup_epochs: float = 0.0            # linear warm-up of the LR over these epochs
    epochs: int = 10                      # epochs of the run (the batch changes between epochs)
    schedule: str = "linear"             # LR shape over epochs, before the batch scaling
    max_batch_factor: int = 128          # the batch never exceeds this many times the base batch
    decay_ratio: float = 0.5             # double when eigenvalue <= decay_ratio x reference (reset then)
    fallback_epochs: int = 10            # double anyway after this many epochs without one (0 = never)
    eig_every: int = 1                   # epochs between top-eigenvalue evaluations
    eig_samples: int = 128               # fixed training sample for the eigenvalue (clean images)
    eig_iters: int = 10                   # power-iteration steps for the top Hessian eigenvalue, at most
    eig_tol: float = 1.0e-2               # power iteration stops at this relative change of the eigenvalue
    adv_fraction: float = 0.2            # ABSA: share of each batch replaced by FGSM examples; halves with
                                         # every doubling, 0 after half of the epochs (method abs: 0)
    adv_eps: float = 0.005               # FGSM step, normalised input units; inputs clamped to the data range
    elastic: bool = True                 # data-parallel processes follow the batch (resize = checkpoint,
    per_worker_batch: int = 128          # new process group, restore): batch / per_worker_batch of them,
    max_workers: int = 0                 # at most max_workers (0 = procs, else CPU cores)
    launcher: str = "torch"              # the pool's processes: torch (torch.distributed's elastic launcher, this
                                         # machine) | ray (Ray actors: swap[ray], swap.ray_pool)
    ray_address: str = ""                # ray: the cluster to join (host:port, ray://host:port, auto); '' = RAY_ADDRESS,
                                         # else a local Ray with the pool's CPUs
    max_restarts: int = 3                # ray: new pools from the last checkpoint after an actor died, at most


@dataclass
class Config:
    """A whole run. ``workers`` is W, the number of phase-2 models; ``procs`` the number of local
    processes (0 = min(W, CPU cores) on CPU, so processes x threads never oversubscribes the cores)."""
    name: str = "custom"                  # names run directories (default runs/NAME-METHOD-seedSEED); a preset's file name
    seed: int = 0                         # every random stream derives from (seed, phase, worker, epoch)
    workers: int = 2                      # W: phase-2 workers (SWAP), averaged in phase 3
    procs: int = 0                        # local processes (0 = min(W, CPU cores); with worker groups W x ranks_per_worker)
    threads: int = 0                     # torch threads per process (0 = cores // processes)
    device: str = "auto"                 # cpu | cuda | auto (CUDA when available)
    precision: str = "auto"              # fp32 | bf16 (autocast) | auto (bf16 on CUDA, fp32 on CPU)
    compile: bool = False                # torch.compile the model's forward (nn.Module.compile)
    channels_last: bool = True            # image batches in channels_last memory format (faster convolutions)
    eval_every: int = 1                  # test-set evaluation every N epochs (and always at the end)
    divergence_grad_norm: float = 1.0e4  # the divergence guard: a larger or non-finite gradient norm stops the
                                         # phase (before clipping; optim.clip_grad_norm clips)
    checkpoint_every: int = 1            # resumable checkpoint (weights + optimizer) every N epochs of
                                         # every phase and worker (0 = only at phase ends)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ddp: DDPConfig = field(default_factory=DDPConfig)
    phase1: Phase1Config = field(default_factory=Phase1Config)
    phase2: Phase2Config = field(default_factory=Phase2Config)
    phase3: Phase3Config = field(default_factory=Phase3Config)
    sgd: SGDConfig = field(default_factory=SGDConfig)
    # `swap compare` settings of its baselines: sgd-small and sgd-large run `sgd` with these sections
    sgd_small: SGDConfig = field(default_factory=SGDConfig)
    sgd_large: SGDConfig = field(default_factory=lambda: SGDConfig(batch_size=4096, peak_lr=1.2, warmup_epochs=5.0))
    # the large-batch baseline with each large-batch optimizer (methods lars-large, lamb-large, adamw-large); the
    # LR of lars_large and lamb_large is also phase 1's in swap-lars and swap-lamb
    lars_large: SGDConfig = field(default_factory=lambda: SGDConfig(batch_size=4096, peak_lr=8.0, warmup_epochs=5.0,
                                                                    optimizer="lars"))
    lamb_large: SGDConfig = field(default_factory=lambda: SGDConfig(batch_size=4096, peak_lr=0.01, warmup_epochs=5.0,
                                                                    optimizer="lamb"))
    adamw_large: SGDConfig = field(default_factory=lambda: SGDConfig(batch_size=4096, peak_lr=0.004, warmup_epochs=5.0,
                                                                     optimizer="adamw"))
    swa: SWAConfig = field(default_factory=SWAConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    lawa: LAWAConfig = field(default_factory=LAWAConfig)
    extrap: ExtrapConfig = field(default_factory=ExtrapConfig)
    abs: ABSConfig = field(default_factory=ABSConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def uses_validation(self) -> bool:
        """Whether a choice of the run is made on the validation split (the last ``data.holdout``
        training samples, while the test set stays the test set): the greedy soup of phase 3, or
        phase 1's automatic switch on any signal but ``plateau``."""
        return self.phase3.aggregate == "greedy" or self.phase1.stop.watches_validation

    def is_set(self, key: str) -> bool:
        """Whether the user chose the value of dotted ``key`` (``phase3.bn_batch_size``): it was
        given by a preset, a YAML file, ``--set``, ``SWAP_SET`` or a dict of overrides
        (:func:`load_config`), or it differs from the default (a config built in code). A key
        the user did not set may be fitted to the data (:meth:`swap.methods.Method.fit`); one
        they set is refused when impossible."""
        if key in getattr(self, "given", ()):
            return True
        here, default = self, Config()
        for part in key.split("."):
            here, default = getattr(here, part), getattr(default, part)
        return here != default

    def hash(self) -> str:
        """Short content hash of the resolved config (first 16 hex digits of SHA-256), without the
        keys in :data:`NOT_HASHED`: a run may be resumed with those changed."""
        d = self.to_dict()
        for key in HASHED_WHEN_SET:                  # at their defaults: hashed as before they existed
            section, name = key.split(".") if "." in key else (key, None)
            if name is None and d[section] == dataclasses.asdict(getattr(Config(), section)):
                d.pop(section)
            elif name is not None and d[section][name] == getattr(getattr(Config(), section), name):
                d[section].pop(name)
        for key in NOT_HASHED:
            section, name = key.split(".")
            d[section].pop(name, None)
            if not d[section]:
                d.pop(section)                   # a section of such keys only: hashed as before it existed
        blob = json.dumps(d, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


#: Keys, or whole sections, added after runs were written. At their defaults they change nothing, and
#: a config that leaves them there keeps the hash it had before they existed (its runs still resume).
HASHED_WHEN_SET = ("ema", "lawa", "phase2.average_along",
                   *[f"{s}.{k}" for s in ("sgd", "sgd_small", "sgd_large", "lars_large", "lamb_large", "adamw_large")
                     for k in ("average", "updates")])

#: Keys that change how a run is laid out or copes with failures, not what it computes (up to float
#: rounding); ``--resume`` accepts new values.
NOT_HASHED = ("phase2.layout", "phase3.allow_missing_workers", "logging.loggers", "logging.log_every",
              "abs.launcher", "abs.ray_address", "abs.max_restarts", "data.follow_links")


#: The keys whose value may name code of yours (``package.module:function``), and every section's optimizer
CODE_KEYS = ("model.name", "data.name", "data.collate", "task.loss", "task.metrics")


def code_paths(cfg: "Config") -> list[str]:
    """``KEY=package.module:function`` for every import path that ``cfg`` names (:data:`CODE_KEYS`
    and each section's ``optimizer``): the code of yours that a run with it imports and runs."""
    found = []
    for section, values in cfg.to_dict().items():
        for key, value in values.items() if isinstance(values, dict) else ():
            if f"{section}.{key}" in CODE_KEYS or key == "optimizer":
                found += [f"{section}.{key}={v}" for v in (value if isinstance(value, list) else [value])
                          if is_import_path(v)]
    return found


def code_line(cfg: "Config") -> str | None:
    """The line a run prints first when its config names code (:func:`code_paths`), else None:
    a config that names code is code, to be trusted as much as that code."""
    paths = code_paths(cfg)
    return (f"swap: this config runs code: {', '.join(printable(p) for p in paths)} (imported from the working "
            f"directory or PYTHONPATH)") if paths else None


def announce_code(cfg: "Config") -> None:
    """Print :func:`code_line` on stderr when ``cfg`` names code: first, before any of it is
    imported, and once per job (rank 0 under torchrun)."""
    line = code_line(cfg)
    if line and os.environ.get("RANK", "0") == "0":
        print(line, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- loading and merging

# Keys that were renamed: a config that still uses one is refused with the reason, never silently ignored
RENAMED = {
    "max_grad_norm": "max_grad_norm is gone: it stopped the run, where Hugging Face, timm and torchvision clip "
                     "with a key of that name; set optim.clip_grad_norm to clip the gradient norm, or "
                     "divergence_grad_norm for the norm that stops a diverging run",
    "optim.bn_weight_decay": "optim.bn_weight_decay is gone: set optim.no_decay: bn (no weight decay on BatchNorm "
                             "weights) or norm_bias (none on any bias or normalisation weight)",
}


def _merge(obj: Any, values: dict[str, Any], where: str, given: set | None = None) -> None:
    """Set fields of dataclass ``obj`` from a nested dict, refusing unknown and renamed keys
    (:data:`RENAMED`) and wrong types; the dotted key of every value set is added to ``given``."""
    if not isinstance(values, dict):
        raise SwapError(f"config section '{where or 'top'}' must be a mapping, got {type(values).__name__}")
    known = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in values.items():
        path = f"{where}.{key}" if where else key
        if path in RENAMED:
            raise SwapError(RENAMED[path])
        if key not in known:
            raise SwapError(f"unknown config key '{path}' (known here: {', '.join(sorted(known))})")
        current = getattr(obj, key)
        if isinstance(current, StopConfig) and value == "auto":     # `phase1.stop: auto`, short for metric: auto
            value = {"metric": "auto"}
        if dataclasses.is_dataclass(current):
            _merge(current, value, path, given)
        else:
            setattr(obj, key, _coerce(value, known[key].type, path))
            if given is not None:
                given.add(path)


def _coerce(value: Any, annotation: str, path: str) -> Any:
    """Check ``value`` against the field's type; ints are accepted where floats are expected."""
    annotation = str(annotation)          # the declared type, e.g. "float" or "str | None"
    optional = "None" in annotation
    if value is None:
        if optional:
            return None
        raise SwapError(f"config key '{path}' cannot be null")
    kind = annotation.split("|")[0].strip()
    if kind in ("int", "float") and isinstance(value, str):
        try:                             # YAML 1.1 reads "1e4" as a string; users mean a number
            value = float(value)
        except ValueError:
            pass
    if kind == "bool":
        if isinstance(value, bool):
            return value
    elif kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif kind == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise SwapError(f"config key '{path}' must be a finite number, got {value!r}")
            return float(value)
    elif kind == "str":
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif kind == "list":
        if isinstance(value, list):
            return value                 # its items are checked by validate()
    elif kind == "dict":
        if isinstance(value, dict):
            return value                 # its keys and values are checked by validate()
    raise SwapError(f"config key '{path}' expects {kind}, got {value!r}")


def resolve_preset(name_or_path: str) -> Path:
    """Map a preset name (``fashion_mnist_quick``) or a YAML path to an existing file.

    Raises:
        SwapError: neither a file nor a preset of that name exists.
    """
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    preset = CONFIG_DIR / f"{name_or_path}.yaml"
    if preset.is_file():
        return preset
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise SwapError(f"no config file or preset '{name_or_path}' (presets: {', '.join(names)})")


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """Turn ``["phase1.batch_size=4096", "seed=3"]`` into a nested dict; values are parsed as YAML."""
    nested: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise SwapError(f"--set expects KEY=VALUE, got '{pair}'")
        key, raw = pair.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = nested
        parts = key.strip().split(".")
        for k, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SwapError(f"--set {key}: {'.'.join(parts[:k + 1])} was given the value {node!r} earlier; set its "
                                f"keys one by one instead (e.g. phase1.stop.metric=auto)")
        node[parts[-1]] = value
    return nested


def load_config(name_or_path: str | None = None, overrides: list[str] | dict | None = None) -> Config:
    """Build a validated :class:`Config` from a preset/YAML file and overrides.

    Args:
        name_or_path: preset name under ``configs/`` or a YAML path; ``None`` for the defaults.
        overrides: ``KEY=VALUE`` strings (dotted keys) or a nested dict, applied after the file.

    Raises:
        SwapError: unreadable YAML, unknown key, wrong type, or an impossible value (see ``validate``).
    """
    cfg, given = Config(), set()
    if name_or_path is not None:
        path = resolve_preset(name_or_path)
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise SwapError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
        _merge(cfg, values, "", given)
        if "name" not in values:
            cfg.name = path.stem
    if overrides:
        _merge(cfg, parse_overrides(overrides) if isinstance(overrides, list) else overrides, "", given)
    from_env = env_overrides()
    if from_env:
        _merge(cfg, parse_overrides(from_env), "", given)
    validate(cfg)
    cfg.given = frozenset(given)          # the keys the user chose (Config.is_set); not a field: not saved
    return cfg


def env_overrides() -> list[str]:
    """``KEY=VALUE`` overrides from the environment variable ``SWAP_SET`` (separated by ``;``, e.g.
    ``SWAP_SET="phase1.max_epochs=1;data.train_subset=2000"``), applied after every other source by
    :func:`load_config`: the CLI and the library alike. Meant to shorten a script or an example
    without editing it (smoke tests); the resolved config saved with the run includes them."""
    return [part.strip() for part in os.environ.get("SWAP_SET", "").split(";") if part.strip()]


def config_from_dict(values: dict[str, Any]) -> Config:
    """Rebuild a validated config from ``Config.to_dict`` output (e.g. a saved ``config.yaml``)."""
    cfg = Config()
    _merge(cfg, values, "")
    validate(cfg)
    return cfg


def _need(ok: bool, msg: str) -> None:
    """Raise :class:`SwapError` with ``msg`` unless ``ok``."""
    if not ok:
        raise SwapError(msg)


def _one_of(value: str, legal, key: str) -> None:
    """Refuse ``value`` of config ``key`` unless it is one of ``legal``."""
    names = list(legal)
    _need(value in names, f"{key} must be {', '.join(names[:-1])} or {names[-1]}, got '{value}'")


def validate(cfg: Config) -> None:
    """Refuse impossible settings before any work starts: every section checks its own keys
    (:func:`check_section`), then :func:`check_across` checks the rules that join sections.

    Raises:
        SwapError: naming the key, the bad value and what would be valid.
    """
    _need(cfg.name != "" and cfg.name.isprintable() and "/" not in cfg.name and cfg.name not in (".", ".."),
          f"name must be a non-empty printable name without '/' (it names run directories), got {cfg.name!r}")
    _need(cfg.workers >= 1, f"workers must be >= 1, got {cfg.workers}")
    _need(cfg.procs >= 0, f"procs must be >= 0, got {cfg.procs}")
    _need(cfg.threads >= 0, f"threads must be >= 0, got {cfg.threads}")
    _one_of(cfg.device, ("cpu", "cuda", "auto"), "device")
    _one_of(cfg.precision, ("fp32", "bf16", "auto"), "precision")
    _need(cfg.eval_every >= 1, f"eval_every must be >= 1, got {cfg.eval_every}")
    _need(cfg.divergence_grad_norm > 0, f"divergence_grad_norm must be > 0, got {cfg.divergence_grad_norm}")
    _need(cfg.checkpoint_every >= 0, f"checkpoint_every must be >= 0, got {cfg.checkpoint_every}")
    for f in dataclasses.fields(cfg):
        if dataclasses.is_dataclass(getattr(cfg, f.name)):
            check_section(getattr(cfg, f.name), f.name)
    check_across(cfg)


def check_section(sec: Any, where: str) -> None:
    """The rules of one config section that need no other section (``where``: its key, such as
    ``phase2`` or ``phase1.optim``).

    Raises:
        SwapError: naming the key, the bad value and what would be valid.
    """
    if isinstance(sec, (Phase1Config, TrainingSection)):
        _check_training(sec, where)
    {DataConfig: _check_data, ModelConfig: _check_model, TaskConfig: _check_task, LoggingConfig: _check_logging,
     OptimConfig: _check_optim, StopConfig: _check_stop, Phase1Config: _check_phase1, Phase2Config: _check_phase2,
     Phase3Config: _check_phase3, ExtrapConfig: _check_extrap, SWAConfig: _check_swa, EMAConfig: _check_along,
     LAWAConfig: _check_along,
     ABSConfig: _check_abs}.get(type(sec), lambda s, w: None)(sec, where)


def _check_data(d: DataConfig, where: str) -> None:
    _need(d.name in DATASETS or is_import_path(d.name),
          f"data.name must be {', '.join(DATASETS)} or yours as package.module:function, got {printable(d.name)!r}")
    _need(d.collate is None or is_import_path(d.collate),
          f"data.collate must be package.module:function or null, got {printable(str(d.collate))!r}")
    _need(d.image_size is None or d.image_size >= 1,
          f"data.image_size must be >= 1 (pixels) or null (the images' own), got {d.image_size}")
    _one_of(d.crop, ("auto", "resized", "padded"), "data.crop")
    _need(0 < d.min_scale <= 1, f"data.min_scale must be in (0, 1], got {d.min_scale}")
    _need(0 < d.crop_ratio <= 1, f"data.crop_ratio must be in (0, 1], got {d.crop_ratio}")
    _one_of(d.bad_images, ("stop", "skip"), "data.bad_images")
    _need(d.seq_len >= 1, f"data.seq_len must be >= 1, got {d.seq_len}")
    _need(d.train_subset >= 0 and d.test_subset >= 0, "data.train_subset/test_subset must be >= 0")
    _need(d.crop_padding >= 0 and d.cutout >= 0, "data.crop_padding and data.cutout must be >= 0")
    _need(d.holdout >= 0, f"data.holdout must be >= 0, got {d.holdout}")
    _need(d.num_workers >= 0, f"data.num_workers must be >= 0, got {d.num_workers}")
    _one_of(d.sample_rngs, ("torch", "all"), "data.sample_rngs")


def _check_model(m: ModelConfig, where: str) -> None:
    _need(m.name in MODELS or is_import_path(m.name)
          or m.name.startswith("torchvision:") and len(m.name) > len("torchvision:"),
          f"model.name must be {', '.join(MODELS)}, torchvision:NAME or yours as package.module:function, got "
          f"{printable(m.name)!r}")
    _need(m.width > 0, f"model.width must be > 0, got {m.width}")


def _check_task(t: TaskConfig, where: str) -> None:
    _need(t.loss is None or is_import_path(t.loss),
          f"task.loss must be package.module:function or null, got {printable(str(t.loss))!r}")
    _need(isinstance(t.metrics, list) and all(m in ("top1", "top5", "loss") or is_import_path(m) for m in t.metrics),
          f"task.metrics must be a list of top1, top5, loss and package.module:function entries, got "
          f"{printable(str(t.metrics))}")


def _check_logging(g: LoggingConfig, where: str) -> None:
    _need(isinstance(g.loggers, list) and all(isinstance(x, str) for x in g.loggers),
          f"logging.loggers must be a list of names (tensorboard, mlflow), got {printable(str(g.loggers))}")
    _need(g.log_every >= 0, f"logging.log_every must be >= 0 updates, got {g.log_every}")


def _check_optim(o: OptimConfig, where: str) -> None:
    """Refuse impossible optimizer settings (``where``: ``optim`` or ``phase1.optim``, ...)."""
    def need(ok: bool, msg: str) -> None:
        _need(ok, f"{where}.{msg}")

    need(0 <= o.momentum < 1, f"momentum must be in [0, 1), got {o.momentum}")
    need(not o.nesterov or o.momentum > 0, "nesterov needs momentum > 0 (set nesterov: false for momentum 0)")
    need(o.weight_decay is None or o.weight_decay >= 0, f"weight_decay must be >= 0 or null, got {o.weight_decay}")
    need(isinstance(o.betas, list) and len(o.betas) == 2 and all(isinstance(b, (int, float)) and not isinstance(b, bool)
                                                                 and 0 <= b < 1 for b in o.betas),
         f"betas must be [beta1, beta2], each in [0, 1), got {o.betas!r}")
    need(o.eps is None or o.eps >= 0, f"eps must be >= 0 or null, got {o.eps}")
    need(o.trust_coefficient >= 0, f"trust_coefficient must be >= 0, got {o.trust_coefficient}")
    need(o.no_decay in NO_DECAY, f"no_decay must be {', '.join(NO_DECAY)}, got '{o.no_decay}'")
    need(o.clip_grad_norm >= 0, f"clip_grad_norm must be >= 0 (0 = off), got {o.clip_grad_norm}")


def _check_stop(s: StopConfig, where: str) -> None:
    _need(s.metric in STOP_METRICS or s.metric == "auto",
          f"{where}.metric={s.metric!r} is never computed during training (known: {', '.join(STOP_METRICS)}, or auto)")
    _need(s.signal in AUTO_SIGNALS,
          f"{where}.signal={s.signal!r} is not an automatic switch signal (known: {', '.join(AUTO_SIGNALS)})")
    _need(s.window >= 1 and s.min_gain > 0 and s.min_delta >= 0,
          f"{where}.window must be >= 1, {where}.min_gain > 0 and {where}.min_delta >= 0, got "
          f"{s.window}, {s.min_gain}, {s.min_delta}")
    _need(s.every >= 1 and s.trial_updates >= 0,
          f"{where}.every must be >= 1 and {where}.trial_updates >= 0, got {s.every}, {s.trial_updates}")


def _check_training(sec: Phase1Config | TrainingSection, section: str) -> None:
    """The keys every training section has: batch, LR schedule, epochs, optimizer, segments."""
    _need(sec.batch_size >= 1, f"{section}.batch_size must be >= 1, got {sec.batch_size}")
    _need(sec.peak_lr > 0, f"{section}.peak_lr must be > 0, got {sec.peak_lr}")
    epochs_key = "max_epochs" if isinstance(sec, Phase1Config) else "epochs"
    epochs = getattr(sec, epochs_key)
    _need(epochs >= 1, f"{section}.{epochs_key} must be >= 1, got {epochs}")
    _need(0 <= sec.warmup_epochs <= epochs,
          f"{section}.warmup_epochs must be in [0, {section}.{epochs_key}={epochs}], got {sec.warmup_epochs}")
    _one_of(sec.schedule, SHAPES, f"{section}.schedule")
    _need(sec.min_lr <= sec.peak_lr, f"{section}.min_lr={sec.min_lr} is above {section}.peak_lr={sec.peak_lr}")
    _need(sec.min_lr >= 0 and sec.warmup_updates >= 0, f"{section}.min_lr and {section}.warmup_updates must be "
                                                        f">= 0, got {sec.min_lr}, {sec.warmup_updates}")
    _need(not (sec.warmup_updates and sec.warmup_epochs), f"{section}.warmup_updates={sec.warmup_updates} and "
          f"{section}.warmup_epochs={sec.warmup_epochs} both set the warm-up: keep one (the other 0)")
    legal = [o for o in OPTIMIZERS if section != "phase2" or o != "extrap"]     # workers step on their own
    _need(sec.optimizer in legal or is_import_path(sec.optimizer),
          f"{section}.optimizer must be one of {', '.join(legal)} or your own as package.module:function, got "
          f"{printable(sec.optimizer)!r}")
    _need(isinstance(sec.optim, dict), f"{section}.optim must be a mapping of optim keys, got {sec.optim!r}")
    micro = getattr(sec, "micro_batch_size", 0)
    _need(micro >= 0, f"{section}.micro_batch_size must be >= 0, got {micro}")
    parse_segments(sec.segments, f"{section}.segments")   # a schedule that does not tile its epochs fails here
    if isinstance(sec, SGDConfig):
        _one_of(sec.average, ALONG, f"{section}.average")
        _need(sec.updates >= 0, f"{section}.updates must be >= 0 (0: train {section}.epochs), got {sec.updates}")
        _need(not (sec.updates and sec.segments), f"{section}.updates={sec.updates} and {section}.segments both set "
                                                  f"the length of the run: keep one")


def _check_phase1(p1: Phase1Config, where: str) -> None:
    _need(0 < p1.stop_acc <= 100, f"phase1.stop_acc must be in (0, 100], got {p1.stop_acc}")
    check_section(p1.stop, "phase1.stop")


def _check_phase2(p2: Phase2Config, where: str) -> None:
    segs = parse_segments(p2.segments, "phase2.segments")
    _need(p2.cycles >= 1, f"phase2.cycles must be >= 1, got {p2.cycles}")
    _need(p2.sync_every is None or p2.sync_every >= 1,
          f"phase2.sync_every must be >= 1 (updates) or null, got {p2.sync_every}")
    _one_of(p2.outer, ("average", "nesterov"), "phase2.outer")
    _need(p2.outer_lr > 0, f"phase2.outer_lr must be > 0, got {p2.outer_lr}")
    _need(0 <= p2.outer_momentum < 1, f"phase2.outer_momentum must be in [0, 1), got {p2.outer_momentum}")
    _one_of(p2.layout, LAYOUTS, "phase2.layout")
    _need(p2.sync_every is None or p2.layout != "vmap",
          "phase2.sync_every has the workers meet while they train, each in its rank: use phase2.layout sequential "
          "(processes is taken as sequential then)")
    _need(p2.cycles == 1 or not (segs or p2.layout == "vmap"),
          "phase2.cycles > 1 restarts the LR schedule of phase2.epochs; it needs phase2.layout processes or "
          "sequential and no phase2.segments")
    _need(p2.ranks_per_worker >= 1, f"phase2.ranks_per_worker must be >= 1, got {p2.ranks_per_worker}")
    _one_of(p2.average_along, ALONG, "phase2.average_along")
    _need(p2.average_along == "none" or (p2.layout != "vmap" and p2.cycles == 1),
          f"phase2.average_along={p2.average_along} keeps each worker's average beside it: it needs phase2.layout "
          f"processes or sequential and phase2.cycles 1")
    _need(p2.ranks_per_worker == 1 or p2.layout != "vmap",
          f"phase2.ranks_per_worker={p2.ranks_per_worker} trains each worker inside its group of ranks: use "
          f"phase2.layout sequential (processes is taken as sequential then)")
    for key, batch in _batches(p2, "phase2"):
        _need(batch % p2.ranks_per_worker == 0, f"{key}={batch} is not divisible by phase2.ranks_per_worker="
                                                f"{p2.ranks_per_worker} (each rank of a worker takes an equal share)")
    _need(p2.start_epoch >= 0, f"phase2.start_epoch must be >= 0, got {p2.start_epoch}")
    _need(not p2.start_epoch or segs, "phase2.start_epoch needs phase2.segments (the schedule to revert to)")
    _need(not segs or p2.start_epoch < segs[-1].end,
          f"phase2.start_epoch={p2.start_epoch} is past the end of phase2.segments (epoch {segs[-1].end if segs else 0})")
    _need(p2.save_every >= 0, f"phase2.save_every must be >= 0, got {p2.save_every}")
    _need(not (p2.layout == "vmap" and segs),
          "phase2.segments (a piecewise schedule) needs phase2.layout processes or sequential")
    _need(not (p2.layout == "vmap" and p2.save_every),
          "phase2.save_every (iterates for `swap cosine`) needs phase2.layout processes or sequential")


def _check_phase3(p3: Phase3Config, where: str) -> None:
    _one_of(p3.aggregate, ("uniform", "greedy"), "phase3.aggregate")
    _need(p3.bn_batch_size >= 1, f"phase3.bn_batch_size must be >= 1, got {p3.bn_batch_size}")


def _check_extrap(e: ExtrapConfig, where: str) -> None:
    _one_of(e.variant, EXTRAP_VARIANTS, "extrap.variant")
    _need(e.gamma_ratio >= 0 and e.sigma_ratio >= 0, "extrap.gamma_ratio and extrap.sigma_ratio must be >= 0")


def _check_along(a: EMAConfig | LAWAConfig, where: str) -> None:
    _need(a.start >= 0 and a.every >= 1, f"{where}.start must be >= 0 and {where}.every >= 1 (updates or epochs), "
                                          f"got {a.start}, {a.every}")
    _one_of(a.buffers, ALONG_BUFFERS, f"{where}.buffers")
    _one_of(a.device, ALONG_DEVICES, f"{where}.device")
    if isinstance(a, EMAConfig):
        _need(0 <= a.decay < 1, f"ema.decay must be in [0, 1), got {a.decay}")
        _need(a.half_life >= 0 and a.warmup_power >= 0,
              f"ema.half_life (updates) and ema.warmup_power must be >= 0, got {a.half_life}, {a.warmup_power}")
    else:
        _need(a.k >= 1, f"lawa.k must be >= 1 (snapshots), got {a.k}")
        _one_of(a.unit, ("epochs", "updates"), "lawa.unit")


def _check_swa(s: SWAConfig, where: str) -> None:
    _need(0 < s.lr_min and 0 < s.large_lr_min <= s.large_lr_max,
          "swa.lr_min and swa.large_lr_min must be > 0 and swa.large_lr_min <= swa.large_lr_max")


def _check_abs(a: ABSConfig, where: str) -> None:
    _need(a.batch_size >= 1 and a.peak_lr > 0 and a.epochs >= 1,
          f"abs.batch_size, abs.peak_lr and abs.epochs must be > 0, got {a.batch_size}, {a.peak_lr}, {a.epochs}")
    _need(0 <= a.warmup_epochs <= a.epochs,
          f"abs.warmup_epochs must be in [0, abs.epochs={a.epochs}], got {a.warmup_epochs}")
    _one_of(a.schedule, SHAPES, "abs.schedule")
    _need(a.micro_batch_size >= 0, f"abs.micro_batch_size must be >= 0, got {a.micro_batch_size}")
    _need(a.max_batch_factor >= 1, f"abs.max_batch_factor must be >= 1, got {a.max_batch_factor}")
    _need(0 < a.decay_ratio < 1, f"abs.decay_ratio must be in (0, 1), got {a.decay_ratio}")
    _need(a.fallback_epochs >= 0 and a.eig_every >= 1, "abs.fallback_epochs must be >= 0 and abs.eig_every >= 1")
    _need(a.eig_samples >= 1 and a.eig_iters >= 1 and a.eig_tol >= 0,
          "abs.eig_samples/eig_iters must be >= 1, eig_tol >= 0")
    _need(0 <= a.adv_fraction <= 1, f"abs.adv_fraction must be in [0, 1], got {a.adv_fraction}")
    _need(a.adv_eps >= 0, f"abs.adv_eps must be >= 0, got {a.adv_eps}")
    _need(a.per_worker_batch >= 1 and a.max_workers >= 0,
          "abs.per_worker_batch must be >= 1 and abs.max_workers >= 0")
    _need(a.launcher in ("torch", "ray"), f"abs.launcher must be torch or ray, got {printable(a.launcher)!r}")
    _need(a.ray_address in ("", "auto", "local")
          or re.fullmatch(r"(ray://)?[\w.\-\[\]:]+:\d+", a.ray_address, re.ASCII),
          f"abs.ray_address must be host:port, ray://host:port or auto, got {printable(a.ray_address)!r}")
    _need(a.max_restarts >= 0, f"abs.max_restarts must be >= 0, got {a.max_restarts}")


def check_across(cfg: Config) -> None:
    """The rules of a config that join two sections (the data and the model, a section's
    optimizer overrides and ``optim``, phase 2's layout and its optimizer). The rules against the
    data and the machine are :meth:`swap.methods.Method.check`'s.

    Raises:
        SwapError: naming the keys, their values and what would be valid.
    """
    own = is_import_path(cfg.data.name) or is_import_path(cfg.model.name)
    _need(own or (cfg.data.name == "text-char") == (cfg.model.name == "char-transformer"),
          f"data.name={cfg.data.name} needs an image model and text-char the char-transformer "
          f"(model.name={cfg.model.name})")
    _need(not cfg.model.init_bn0 or cfg.model.name == "resnet50",
          f"model.init_bn0 applies to model.name=resnet50, not {cfg.model.name}")
    for section in TRAINING_SECTIONS:
        optim_for(cfg, section)          # overrides that name no optim key, or bad values, fail here
    check_stacked(cfg, cfg.phase2.optimizer)


def check_stacked(cfg: Config, optimizer: str) -> None:
    """``phase2.layout: vmap`` stacks the workers into one SGD over every parameter: refuse phase 2's
    ``optimizer`` (its name, or ``your own`` for the library's function) when it is not that SGD, or
    phase 2's optimizer settings ask for decay groups or clipping.

    Raises:
        SwapError: naming the optimizer, the settings and the layouts that take them.
    """
    o = optim_for(cfg, "phase2")
    _need(not (cfg.phase2.layout == "vmap" and (optimizer != "sgd" or o.no_decay != "none" or o.clip_grad_norm)),
          f"phase2.layout vmap stacks the workers into one SGD over every parameter: phase2.optimizer "
          f"{optimizer}, optim.no_decay {o.no_decay} and optim.clip_grad_norm {o.clip_grad_norm:g} need "
          f"phase2.layout processes or sequential (or sgd, none and 0)")


def optim_for(cfg: Config, section: str) -> OptimConfig:
    """The optimizer settings of config ``section`` (``phase1``, ``phase2``, ``sgd``, ``abs``, ...):
    ``optim`` with the section's own ``optim`` overrides, if it has any.

    Raises:
        SwapError: an override that names no ``optim`` key, or an impossible value.
    """
    overrides = getattr(getattr(cfg, section), "optim", None) or {}
    if not overrides:
        return cfg.optim
    o = copy.deepcopy(cfg.optim)
    _merge(o, overrides, f"{section}.optim")
    check_section(o, f"{section}.optim")
    return o


def validation_size(data_cfg: DataConfig, train_samples: int) -> int:
    """Samples of the validation split that a run taking decisions on one (:meth:`Config.uses_validation`)
    holds out of ``train_samples``: ``data.holdout`` if set, else 10% of them, at most 5,000 and
    at least 1 (the last samples of the training set; the test set is never used to decide)."""
    return data_cfg.holdout or max(1, min(train_samples // 10, 5000))


def segments(cfg: Config, section: str) -> list:
    """The piecewise schedule (:class:`swap.schedules.Segment` list) of config ``section``
    (``phase1``, ``phase2``, ``sgd``, ...), or ``[]`` when it has none.

    Raises:
        SwapError: segments that overlap, leave gaps or hold a bad value (naming which).
    """
    return parse_segments(getattr(getattr(cfg, section), "segments", []), f"{section}.segments")


def section_batches(cfg: Config, section: str) -> list[tuple[str, int]]:
    """(config key, batch size) of every batch config ``section`` trains with: each segment's, or
    its ``batch_size``."""
    return _batches(getattr(cfg, section), section)


def _batches(sec: Any, section: str) -> list[tuple[str, int]]:
    segs = parse_segments(getattr(sec, "segments", []), f"{section}.segments")
    if segs:
        return [(f"{section}.segments[{k}].batch_size", s.batch_size) for k, s in enumerate(segs)]
    return [(f"{section}.batch_size", sec.batch_size)]


def section_batch(cfg: Config, section: str) -> int | list[int]:
    """Config ``section``'s batch size for a summary: a number, or one per segment."""
    sizes = [b for _, b in section_batches(cfg, section)]
    return sizes[0] if len(sizes) == 1 else sizes


def section_epochs(cfg: Config, section: str) -> int:
    """Epochs that config ``section`` trains: its segments' span (phase 2 from ``start_epoch``),
    else ``max_epochs`` (phase 1) or ``epochs``."""
    segs = segments(cfg, section)
    if segs:
        return segs[-1].end - (cfg.phase2.start_epoch if section == "phase2" else 0)
    sec = getattr(cfg, section)
    return sec.max_epochs if section == "phase1" else sec.epochs


def check_world(cfg: Config, world_size: int, batch_size: int, section: str) -> None:
    """A global batch must split evenly over the ranks, else ranks would see unequal shares.

    Raises:
        SwapError: ``batch_size`` is not divisible by ``world_size``.
    """
    if batch_size % world_size:
        raise SwapError(f"{section}.batch_size={batch_size} is not divisible by the number of processes "
                        f"({world_size}); pick a multiple of {world_size} or set procs")


__all__ = ["CONFIG_DIR", "DataConfig", "ModelConfig", "OPTIMIZERS", "NO_DECAY", "OptimConfig", "TaskConfig",
           "LoggingConfig", "STOP_METRICS", "AUTO_SIGNALS", "StopConfig", "DDPConfig", "Phase1Config", "TrainingSection",
           "Phase2Config", "Phase3Config", "SGDConfig", "AlongConfig", "EMAConfig", "LAWAConfig", "ExtrapConfig", "SWAConfig", "ABSConfig", "Config",
           "NOT_HASHED", "HASHED_WHEN_SET", "CODE_KEYS", "DATASETS", "LAYOUTS", "EXTRAP_VARIANTS", "TRAINING_SECTIONS", "ALONG", "ALONG_BUFFERS",
           "ALONG_DEVICES", "code_paths", "code_line", "announce_code", "RENAMED", "resolve_preset",
           "parse_overrides", "load_config", "env_overrides", "config_from_dict", "validate", "check_section", "check_across", "check_stacked", "optim_for",
           "validation_size", "segments", "section_batches", "section_batch", "section_epochs", "check_world"]
