"""Bad input: one-line error, exit code 2, nothing created or overwritten."""
from __future__ import annotations

import json

import pytest
import torch

from swap.checkpoint import load_checkpoint, save_checkpoint
from swap.cli import main
from swap.config import SwapError
from swap.models import build_model

from conftest import write_fashion_files


def _train(tmp_path, *extra):
    return main(["train", "--config", "fashion_mnist_quick", "--out", str(tmp_path / "run"), *extra])


@pytest.mark.parametrize("extra, message", [
    (["--procs", "2", "--set", "phase1.batch_size=1001"], "not divisible by the number of processes"),
    (["--set", "phase1.stop_acc=0"], "stop_acc"),
    (["--set", "phase1.stop_acc=101"], "stop_acc"),
    (["--set", "phase2.peak_lr=0"], "phase2.peak_lr must be > 0"),
    (["--set", "phase1.max_epochs=-1"], "phase1.max_epochs must be >= 1"),
    (["--set", "data.train_subset=100"], "exceeds the 100 training samples"),
])
def test_impossible_runs_exit_2_before_creating_anything(tmp_path, capsys, extra, message):
    assert _train(tmp_path, *extra) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("swap: error:")
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
