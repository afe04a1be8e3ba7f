"""The paper's ImageNet experiment (Table 3) made expressible: class-per-folder image trees,
ResNet-50, piecewise schedules with progressive resizing (resumable across their boundaries), and
phase-2 workers that span several ranks. Image trees are written by the tests (conftest)."""
from __future__ import annotations

import json
import shutil
import signal
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from swap import interrupt
from swap.cli import main
from swap.config import SwapError, load_config
from swap.optim import param_groups
from swap.data.folder import DIRECT, ImageFolder, check_images
from swap.data.generic import DatasetLoader
from swap.interrupt import Interrupted
from swap.models import build_model
from swap.models.resnet50 import Bottleneck
from swap.data.loader import PiecewiseLoader
from swap.schedules import epoch_shape, parse_segments
from swap.callbacks import On
from swap.train import Position, SGDStep, train

from conftest import write_image_tree


class _Fixed:
    """A stand-in inner loader: ``samples // batch`` updates, each yielding its (epoch, i, batch, size)."""

    def __init__(self, samples, batch, size):
        self.batch_size, self.size, self.n = batch, size, samples // batch

    def __len__(self):
        return self.n

    def epoch(self, epoch, start=0):
        return iter([(epoch, i, self.batch_size, self.size) for i in range(start, self.n)])


SEGMENTS = [{"epochs": [0, 2], "batch_size": 100, "lr": [1.0, 2.0], "image_size": 16},
            {"epochs": [2, 3], "batch_size": 50, "lr": 0.5},
            {"epochs": [3, 5], "batch_size": 25, "lr": 0.1, "image_size": 24}]


def test_piecewise_loader_switches_batch_size_image_size_and_lr_at_the_boundaries():
    segs = parse_segments(SEGMENTS, "sgd.segments")
    built = []
    loader = PiecewiseLoader(segs, lambda b, s: built.append((b, s)) or _Fixed(1000, b, s), 1000)
    assert loader.epochs == 5
    assert [epoch_shape(loader, e) for e in range(5)] == [(0, 10, 100), (10, 10, 100), (20, 20, 50), (40, 40, 25),
                                                          (80, 40, 25)]
    assert list(loader.epoch(2, 18)) == [(2, 18, 50, None), (2, 19, 50, None)]
    assert next(iter(loader.epoch(3))) == (3, 0, 25, 24)
    assert built == [(50, None), (25, 24)]                   # built on first use, one at a time
    assert loader.lr_at(0) == 1.0 and loader.lr_at(10) == pytest.approx(1.5)   # the ramp over 2 epochs
    assert loader.lr_at(19) == pytest.approx(1.0 + 19 / 20)                    # update by update
    assert loader.lr_at(20) == 0.5 and loader.lr_at(39) == 0.5 and loader.lr_at(40) == 0.1
    # phase 2 "reverting to the original schedule" at epoch 2: its epoch 0 is the schedule's epoch 2
    late = PiecewiseLoader(segs, lambda b, s: _Fixed(1000, b, s), 1000, start=2)
    assert late.epochs == 3 and epoch_shape(late, 0) == (0, 20, 50) and late.lr_at(20) == 0.1


@pytest.mark.parametrize("segments, message", [
    ([{"epochs": [0, 2], "batch_size": 8, "lr": 0.1}, {"epochs": [1, 3], "batch_size": 8, "lr": 0.1}],
     "overlaps the one before"),
    ([{"epochs": [0, 2], "batch_size": 8, "lr": 0.1}, {"epochs": [3, 4], "batch_size": 8, "lr": 0.1}],
     "leaves a gap after the one before"),
    ([{"epochs": [1, 2], "batch_size": 8, "lr": 0.1}], "leaves a gap at the start"),
    ([{"epochs": [0, 2], "batch_size": 8, "lr": [0.1]}, {"epochs": [2, 2], "batch_size": 8, "lr": 0.1}],
     "0 <= start < end"),
    ([{"epochs": [0, 2], "batch_size": 8, "lr": 0.1, "size": 3}], "needs epochs, batch_size and lr"),
])
def test_segments_that_overlap_or_leave_gaps_are_refused(segments, message):
    with pytest.raises(SwapError, match=message):
        parse_segments(segments, "phase1.segments")


def test_resuming_mid_epoch_after_a_boundary_gives_the_uninterrupted_weights(tmp_path):
    """A stop signal inside the second segment (batch and image size changed), then the loop
    continued from there, ends with the weights of one uninterrupted run, bit for bit."""
    root = write_image_tree(tmp_path / "tree", classes=3, per_class=12, val_per_class=2, size=(36, 30))
    train_set = ImageFolder(root / "train", True, 24)
    segs = parse_segments([{"epochs": [0, 1], "batch_size": 12, "lr": [0.05, 0.1], "image_size": 16},
                           {"epochs": [1, 3], "batch_size": 6, "lr": 0.02, "image_size": 24}], "sgd.segments")

    def run(stop_at: int | None):
        torch.manual_seed(0)
        model = build_model("smallcnn", 3, 3)
        step = SGDStep(model, torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9))
        loader = PiecewiseLoader(segs, lambda b, s: DatasetLoader(train_set.at_size(s), b, (0, "sgd", 0),
                                                                  collate_fn=train_set.collate_fn), len(train_set))
        saved, records = {}, []

        def on_step(update):
            if update == stop_at:
                interrupt._received.append(signal.SIGINT)
        try:
            train(step, loader, loader.lr_at, epochs=loader.epochs,
                  callbacks=[On(update_end=on_step), On(interrupt=saved.update), On(epoch_end=records.append)])
        except Interrupted:
            interrupt._received.clear()
            train(step, loader, loader.lr_at, epochs=loader.epochs,
                  start=Position(saved["epoch"], saved["step"], saved["totals"]), callbacks=[On(epoch_end=records.append)])
        return model.state_dict(), [(r["epoch"], r["batch_size"], r["train_loss"]) for r in records], saved

    ref, ref_records, _ = run(None)
    got, got_records, saved = run(3 + 2)                    # 3 updates of 12, then 2 of the 6 updates of 6
    assert (saved["epoch"], saved["step"]) == (1, 2)
    assert [r[1] for r in ref_records] == [12, 6, 6]
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert got_records == ref_records


def test_image_folder_reads_labels_crops_and_replays_its_random_crops(tmp_path):
    root = write_image_tree(tmp_path / "tree", classes=3, per_class=4, val_per_class=2, size=(40, 30))
    train_set, val = ImageFolder(root / "train", True, 16), ImageFolder(root / "val", False, 20, replace(DIRECT, crop_ratio=1.0))
    assert train_set.classes == ["c00", "c01", "c02"] and len(train_set) == 12 and len(val) == 6
    assert [y for _, y in train_set.samples] == [0] * 4 + [1] * 4 + [2] * 4
    x, y = val[5]
    assert x.shape == (3, 20, 20) and x.dtype == torch.uint8 and y == 2
    batch, labels = val.collate_fn([val[i] for i in (0, 2, 4)])            # normalised once per batch
    assert batch.dtype == torch.float32 and labels.tolist() == [0, 1, 2]
    assert torch.allclose(batch[0], (x.float() * 0 + val[0][0].float() - val.mean) / val.std)
    # the classes' mean colours order the mean pixel, so a model can learn them
    means = batch.mean(dim=(1, 2, 3)).tolist()
    assert means[0] < means[1] < means[2]
    # the crop's box: centre, resized (crop_ratio 1: the shorter side)
    assert val._centre_box(40, 30) == (5.0, 0.0, 35.0, 30.0)
    loader = DatasetLoader(train_set, 4, (0, "phase2", 1), collate_fn=train_set.collate_fn)
    first, again = list(loader.epoch(0)), list(loader.epoch(0))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again))       # same crops and flips
    other = list(loader.epoch(1))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, other))
    resumed = list(loader.epoch(0, start=2))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first[2:], resumed))
    grey = ImageFolder(write_image_tree(tmp_path / "grey", mode="L") / "train", True, 12)
    assert grey.channels == 1 and grey[0][0].shape == (1, 12, 12) and grey.model_kwargs == {"in_channels": 1}


def test_bad_trees_and_bad_images_give_one_line(tmp_path):
    root = write_image_tree(tmp_path / "tree", classes=2, per_class=4)
    (root / "train" / "empty").mkdir()
    with pytest.raises(SwapError, match="class folder .*empty holds no images"):
        ImageFolder(root / "train", True, 16)
    (root / "train" / "empty").rmdir()
    shutil.rmtree(root / "val" / "c01")
    with pytest.raises(SwapError, match="does not have the training classes: 1 missing"):
        ImageFolder(root / "val", False, 16, classes=["c00", "c01"])
    bad = root / "train" / "c01" / "0002.png"
    bad.write_bytes(bad.read_bytes()[:200])                 # a truncated PNG
    train_set = ImageFolder(root / "train", True, 16)
    with pytest.raises(SwapError, match=r"1 unreadable image\(s\) .*0002.png"):
        check_images([train_set], "stop")
    assert check_images([train_set], "skip") == 1
    log = tmp_path / "bad.txt"
    skipping = ImageFolder(root / "train", True, 16, replace(DIRECT, bad_images="skip"), bad_log=log)
    x, y = skipping[6]                                      # replaced by the next readable sample
    assert y == 1 and x.shape == (3, 16, 16)
    assert log.read_text().splitlines() == [str(bad)]
    with pytest.raises(SwapError, match="unreadable image .*0002.png"):
        ImageFolder(root / "train", True, 16)[6]


def test_resnet50_has_its_parameter_count_init_bn0_and_no_bn_weight_decay():
    model = build_model("resnet50", 1000, 3)
    assert sum(p.numel() for p in model.parameters()) == 25_557_032           # He et al. 2016 / torchvision
    small = build_model("resnet50", 10, 3, width=0.25, init_bn0=True).eval()
    blocks = [m for m in small.modules() if isinstance(m, Bottleneck)]
    assert len(blocks) == 16 and all(b.body[-1].weight.abs().sum() == 0 for b in blocks)
    x = torch.rand(2, blocks[1].body[0].in_channels, 8, 8)  # an identity-shortcut block starts as the identity
    assert torch.equal(blocks[1](x), x)
    assert small(torch.randn(2, 3, 40, 40)).shape == (2, 10)
    groups = param_groups(small, 1e-4, "bn")
    bn = sum(p.numel() for m in small.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters())
    assert groups[1]["weight_decay"] == 0.0 and sum(p.numel() for p in groups[1]["params"]) == bn
    assert len(param_groups(small, 1e-4)) == 1


def test_the_imagenet_preset_starts_on_a_tiny_tree_with_top1_and_top5(tmp_path):
    """`swap train --config imagenet_paper` on an ImageNet-layout tree: the preset's own model
    (ResNet-50, init_bn0, no BN weight decay), its phase-2 reversion to the small-batch schedule,
    progressive resizing; shrunk to this CPU by overrides of sizes only."""
    root = write_image_tree(tmp_path / "tree", classes=3, per_class=16, val_per_class=4, size=(48, 40))
    cfg = load_config("imagenet_paper")
    assert (cfg.model.name, cfg.model.init_bn0, cfg.optim.no_decay) == ("resnet50", True, "bn")
    assert cfg.phase2.ranks_per_worker == 8 and cfg.phase2.start_epoch == 22 and cfg.workers == 2
    small = json.dumps([{"epochs": [0, 1], "batch_size": 16, "lr": [0.02, 0.05], "image_size": 24},
                        {"epochs": [1, 3], "batch_size": 8, "lr": 0.02, "image_size": 32}])
    out = tmp_path / "run"
    assert main(["train", "--config", "imagenet_paper", "--data-dir", str(root), "--out", str(out),
                 "--set", "procs=2", "--set", "phase2.ranks_per_worker=1", "--set", "model.width=0.125",
                 "--set", "data.image_size=32", "--set", "data.num_workers=0", "--set", "phase1.micro_batch_size=0",
                 "--set", f"phase1.segments={small}", "--set", f"phase2.segments={small}",
                 "--set", "phase2.start_epoch=1", "--set", "phase3.bn_batch_size=16"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == {"phase1": 3, "phase2": 2} and summary["batch_size"]["phase2"] == [16, 8]
    metrics = summary["test_metrics"]["averaged"]
    assert metrics["top5"] == 100.0 and 0 <= metrics["top1"] <= 100     # 3 classes: top-5 always holds
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["batch_size"] for r in records if r["phase"] == "phase2" and r["worker"] == 0] == [8, 8]
    assert all("test_top5" in r for r in records if r["phase"] in ("phase1", "phase2"))


def test_an_empty_class_folder_or_a_truncated_image_exits_2_before_the_run(tmp_path, capsys):
    root = write_image_tree(tmp_path / "tree", classes=2, per_class=8)
    args = ["train", "--config", "fashion_mnist_quick", "--data-dir", str(root), "--set", "data.name=imagefolder",
            "--set", "data.image_size=16", "--set", "phase1.batch_size=8", "--procs", "1"]
    bad = root / "train" / "c00" / "0001.jpg"
    bad.write_bytes(bad.read_bytes()[:300])
    assert main(args + ["--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "1 unreadable image(s)" in err and "0001.jpg" in err and len(err.splitlines()) == 1
    (root / "val" / "c01").rename(tmp_path / "moved")
    (root / "val" / "c01").mkdir()
    assert main(args + ["--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds no images" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_two_workers_of_two_ranks_equal_two_workers_of_one_rank_with_two_micro_batches(tmp_path, real_fashion):
    """Worker groups (4 gloo processes: each worker a DDP group of 2 ranks, its own process group)
    train exactly what 2 single-rank workers train with micro-batches of half the batch: the same
    samples, normalised in the same halves, the same gradient. Phase 1 runs at a negligible LR so
    both runs start phase 2 from the same weights (its 4-rank and 2-rank all-reduce orders differ
    in the last bits, which SGD at a real LR amplifies). Tolerance 1e-6; measured: bitwise."""
    common = ["train", "--config", "fashion_mnist_quick", "--workers", "2", "--data-dir", str(real_fashion),
              "--set", "data.train_subset=1024", "--set", "data.test_subset=300", "--set", "phase1.batch_size=256",
              "--set", "phase1.micro_batch_size=64", "--set", "phase1.max_epochs=1", "--set", "phase1.warmup_epochs=1",
              "--set", "phase1.peak_lr=1e-6", "--set", "phase2.peak_lr=0.05", "--set", "phase2.epochs=2",
              "--set", "phase2.batch_size=128", "--set", "phase2.layout=sequential", "--set", "threads=1"]
    groups, micro = tmp_path / "groups", tmp_path / "micro"
    assert main(common + ["--procs", "4", "--set", "phase2.ranks_per_worker=2", "--out", str(groups)]) == 0
    assert main(common + ["--procs", "2", "--set", "phase2.micro_batch_size=64", "--out", str(micro)]) == 0
    for name in ("worker0", "worker1", "swap"):
        a, b = (load_file(str(d / "checkpoints" / f"{name}.safetensors")) for d in (groups, micro))
        for k in a:
            if "running" not in k and "num_batches" not in k:         # parameters (BN running statistics:
                assert torch.allclose(a[k], b[k], rtol=0, atol=1e-6), f"{name}.{k}"   # ranks average them)
    # each worker was logged once (by its group's first rank), with the same losses
    records = {r: [json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines()] for r in (groups, micro)}
    losses = {r: sorted((x["worker"], x["epoch"], round(x["train_loss"], 6)) for x in recs if x["phase"] == "phase2")
              for r, recs in records.items()}
    assert losses[groups] == losses[micro] and len(losses[groups]) == 4
    summary = json.loads((groups / "summary.json").read_text())
    assert summary["averaged_workers"] == [0, 1]
