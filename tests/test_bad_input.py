"""Bad input: one-line error, exit code 2, nothing created or overwritten."""
from __future__ import annotations

import json

import pytest
import torch

from swap.checkpoint import load_checkpoint, save_checkpoint
from swap.cli import main
from swap.config import SwapError
from swap.models import build_model

from conftest import error_line, write_fashion_files


def _train(tmp_path, *extra):
    return main(["train", "--config", "fashion_mnist_quick", "--out", str(tmp_path / "run"), *extra])


@pytest.mark.parametrize("extra, message", [
    (["--procs", "2", "--set", "phase1.batch_size=1001"], "not divisible by the number of processes"),
    (["--set", "phase1.stop_acc=0"], "stop_acc"),
    (["--set", "phase1.stop_acc=101"], "stop_acc"),
    (["--set", "phase2.peak_lr=0"], "phase2.peak_lr must be > 0"),
    (["--set", "phase1.max_epochs=-1"], "phase1.max_epochs must be >= 1"),
    (["--set", "data.train_subset=100"], "exceeds the 100 training samples"),
    # issue #16: schedules, worker groups, ResNet-50
    (["--set", "phase2.ranks_per_worker=2", "--set", "phase2.layout=sequential", "--procs", "2"],
     "phase2.ranks_per_worker=2 x workers=2 needs 4 processes, but the run has 2"),
    (["--set", "phase2.ranks_per_worker=2", "--set", "phase2.layout=vmap"], "use phase2.layout sequential"),
    (["--set", "phase1.segments=[{epochs: [0, 2], batch_size: 8, lr: 0.1}, {epochs: [1, 3], batch_size: 8, lr: 0.1}]"],
     "phase1.segments[1].epochs=[1, 3] overlaps the one before"),
    (["--set", "data.name=imagefolder", "--set", "model.init_bn0=true"], "model.init_bn0 applies to model.name=resnet50"),
    (["--method", "abs", "--set", "phase1.segments=[{epochs: [0, 2], batch_size: 8, lr: 0.1}]"],
     "method abs does not follow piecewise schedules (phase1.segments)"),
    # issue #17: cycles, meetings, soups, the automatic switch
    (["--set", "phase2.sync_every=0"], "phase2.sync_every must be >= 1"),
    (["--set", "phase2.outer_lr=0"], "phase2.outer_lr must be > 0"),
    (["--set", "phase2.outer_momentum=1"], "phase2.outer_momentum must be in [0, 1)"),
    (["--set", "phase2.cycles=0"], "phase2.cycles must be >= 1"),
    (["--set", "phase3.aggregate=greedy", "--set", "data.train_subset=3000", "--set", "data.holdout=2000"],
     "phase1.batch_size=2048 exceeds the 1000 training samples left after the validation split (data.holdout=2000)"),
    (["--set", "phase1.stop.metric=auto", "--set", "phase1.stop.signal=hessian"], "is not an automatic switch signal"),
    (["--set", "phase1.stop.min_delta=-1"], "phase1.stop.min_delta >= 0"),
    (["--set", "phase1.stop.every=0"], "phase1.stop.every must be >= 1"),
    (["--set", "phase1.stop.trial_updates=-1"], "phase1.stop.trial_updates >= 0"),
    (["--set", "phase1.stop=auto", "--set", "phase1.stop.window=2"], "set its keys one by one"),
    (["--set", "phase2.sync_every=4", "--procs", "1"],
     "set procs=2 (the run has 1)"),
    # issue #24: optimizers, clipping, decay groups, schedules
    (["--set", "phase1.optimizer=adam"], "phase1.optimizer must be one of sgd, lars, lamb, adamw, extrap"),
    (["--set", "phase2.optimizer=extrap"], "phase2.optimizer must be one of sgd, lars, lamb, adamw or your own"),
    (["--set", "optim.betas=[0.9, 1.0]"], "optim.betas must be [beta1, beta2], each in [0, 1), got [0.9, 1.0]"),
    (["--set", "phase1.optim={betas: [-0.1, 0.9]}"], "phase1.optim.betas must be [beta1, beta2]"),
    (["--set", "optim.trust_coefficient=-0.001"], "optim.trust_coefficient must be >= 0"),
    (["--set", "phase1.optim={trust_coeff: 0.01}"], "unknown config key 'phase1.optim.trust_coeff'"),
    (["--set", "max_grad_norm=1.0"], "set optim.clip_grad_norm to clip the gradient norm, or divergence_grad_norm"),
    (["--set", "optim.bn_weight_decay=false"], "optim.no_decay: bn"),
    (["--set", "optim.no_decay=biases"], "optim.no_decay must be none, bn, norm_bias"),
    (["--set", "optim.clip_grad_norm=-1"], "optim.clip_grad_norm must be >= 0"),
    (["--set", "phase2.layout=vmap", "--set", "phase2.optimizer=adamw"],
     "phase2.layout vmap stacks the workers into one SGD over every parameter: phase2.optimizer adamw"),
    (["--set", "phase2.layout=vmap", "--set", "optim.clip_grad_norm=1"], "optim.clip_grad_norm 1 need phase2.layout"),
    (["--set", "phase1.warmup_updates=10"], "phase1.warmup_updates=10 and phase1.warmup_epochs=3.0 both set"),
    (["--set", "phase2.min_lr=1"], "phase2.min_lr=1.0 is above phase2.peak_lr"),
    (["--set", "phase1.optimizer=no_such_module:make"], "phase1.optimizer=no_such_module:make: cannot import it"),
])
def test_impossible_runs_exit_2_before_creating_anything(tmp_path, capsys, extra, message):
    assert _train(tmp_path, *extra) == 2
    err = error_line(capsys.readouterr().err)
    assert message in err
    assert not (tmp_path / "run").exists()


def test_corrupt_data_exits_2_and_leaves_nothing(tmp_path, no_system_data, capsys):
    write_fashion_files(tmp_path / "fm", n_train=600, n_test=100)
    bad = tmp_path / "fm" / "train-labels-idx1-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:-20])
    assert _train(tmp_path, "--data-dir", str(tmp_path / "fm")) == 2
    assert "train-labels-idx1-ubyte.gz" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_missing_data_exits_2(tmp_path, no_system_data, capsys):
    assert _train(tmp_path, "--set", "data.name=cifar10", "--data-dir", str(tmp_path / "none")) == 2
    assert "swap data fetch cifar10" in capsys.readouterr().err


def test_checkpoint_that_does_not_match_is_refused(tmp_path):
    small = build_model("smallcnn", 10, 1)
    save_checkpoint(tmp_path / "c", small, {"config_hash": "abc"})
    with pytest.raises(SwapError, match="does not match the model"):
        load_checkpoint(tmp_path / "c", build_model("smallcnn", 10, 3))        # shape differs
    with pytest.raises(SwapError, match="does not match the model: missing"):
        load_checkpoint(tmp_path / "c", build_model("resnet9", 10, 1))         # keys differ
    with pytest.raises(SwapError, match="config"):
        load_checkpoint(tmp_path / "c", build_model("smallcnn", 10, 1), config_hash="other")
    weights = tmp_path / "c.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0xFF
    weights.write_bytes(bytes(blob))
    with pytest.raises(SwapError, match="corrupt"):
        load_checkpoint(tmp_path / "c", build_model("smallcnn", 10, 1))


def test_checkpoint_roundtrip(tmp_path):
    torch.manual_seed(3)
    a, b = build_model("smallcnn", 10, 1), build_model("smallcnn", 10, 1)
    save_checkpoint(tmp_path / "c", a, {"config_hash": "h", "epoch": 4})
    meta = load_checkpoint(tmp_path / "c", b, config_hash="h")
    assert meta["epoch"] == 4 and json.loads((tmp_path / "c.json").read_text())["epoch"] == 4
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.fixture
def no_training(monkeypatch):
    """A test of refused input fails at once, instead of training, if the input is accepted."""
    import swap.distributed

    def refuse(*args, **kwargs):
        raise AssertionError("the bad input was accepted and a run started")
    monkeypatch.setattr(swap.distributed, "launch", refuse)


def _config_keys(obj=None, prefix: str = "") -> list[str]:
    """Every dotted key of :class:`swap.config.Config`."""
    import dataclasses

    from swap.config import Config
    obj = Config() if obj is None else obj
    keys = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        keys += _config_keys(value, f"{prefix}{f.name}.") if dataclasses.is_dataclass(value) else [prefix + f.name]
    return keys


@pytest.mark.parametrize("char", ["\n", "\r", "\x1e", "\x85", "\u2028"])
def test_a_control_character_in_any_key_gives_one_printable_line(tmp_path, no_system_data, capsys, no_training, char):
    """Whatever the user types into any config key, the error is exactly one printable line, exit 2.
    (``x/...`` is refused by every key: names may not hold '/', and no such data folder exists.)"""
    keys = _config_keys()
    assert len(keys) > 60 and "data.dir" in keys and "name" in keys
    for key in keys:
        code = _train(tmp_path, "--set", f"{key}=x/{char}y")
        err = capsys.readouterr().err
        lines = err.splitlines()
        assert code == 2, key
        assert len(lines) == 1 and lines[0].startswith("swap: error:") and lines[0].isprintable(), (key, err)
        assert err == lines[0] + "\n", key
    assert not (tmp_path / "run").exists()


def test_a_missing_data_dir_is_an_error_not_a_fallback(tmp_path, real_fashion, capsys, no_training):
    """Fashion-MNIST is installed system-wide, but --data-dir names another folder: exit 2."""
    assert _train(tmp_path, "--data-dir", str(tmp_path / "nonexistent-dir")) == 2
    err = capsys.readouterr().err
    assert "nonexistent-dir" in err and "does not exist" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("setting, message", [
    ("data.cutout=8", "data.cutout=8 is impossible on 8x8 images"),
    ("data.crop_padding=8", "data.crop_padding=8 is impossible on 8x8 images"),
    ("data.cutout=12", "must be below 8"),
])
def test_augmentation_impossible_for_the_image_size_exits_2(tmp_path, no_system_data, capsys, no_training, setting,
                                                            message):
    """8x8 images (IDX files like Fashion-MNIST's): the preset's cutout of 8 would erase them."""
    import numpy as np

    from conftest import write_idx
    folder = tmp_path / "tiny"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 2500), ("t10k", 100)):
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 8, 8), dtype=np.uint8))
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, n, dtype=np.uint8))
    base = ["--data-dir", str(folder), "--set", "data.cutout=0", "--set", "data.crop_padding=1"]
    assert _train(tmp_path, *base, "--set", setting) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()
    from swap.config import load_config
    from swap.data import augment_for, load_dataset
    train_set, _ = load_dataset("fashion-mnist", str(folder))
    ok = augment_for(load_config("fashion_mnist_quick", ["data.cutout=7", "data.crop_padding=7"]).data, train_set)
    assert (ok.cutout, ok.crop_padding, ok.flip) == (7, 7, True)


def test_a_failed_atomic_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    """Disk full at any of the three file writes of a checkpoint: the error propagates, no *.tmp is
    left, and the checkpoint written before is whole: its weights, metadata and optimizer state."""
    import errno
    import os

    import swap.checkpoint as ck
    torch.manual_seed(0)
    model = build_model("smallcnn", 10, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 1, 28, 28)).sum().backward()
    opt.step()
    save_checkpoint(tmp_path / "c", model, {"epoch": 1}, opt)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt.step()                                                # the weights the failed writes try to save
    real_fsync = os.fsync
    for fail_at in range(3):                                  # optim.pt, safetensors, json
        calls = {"n": 0}

        def full_disk(fd):
            calls["n"] += 1
            if calls["n"] > fail_at:
                raise OSError(errno.ENOSPC, "No space left on device")
            real_fsync(fd)
        monkeypatch.setattr(ck.os, "fsync", full_disk)
        with pytest.raises(OSError, match="No space left"):
            save_checkpoint(tmp_path / "c", model, {"epoch": 2}, opt)
        monkeypatch.setattr(ck.os, "fsync", real_fsync)
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == [], fail_at
        fresh = build_model("smallcnn", 10, 1)                # nothing was replaced: the old checkpoint loads
        fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
        assert load_checkpoint(tmp_path / "c", fresh, optimizer=fresh_opt)["epoch"] == 1
        assert all(torch.equal(a, b) for a, b in zip(before.values(), fresh.state_dict().values()))
