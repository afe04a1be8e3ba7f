"""The text workload: the fortunes reader on files written in the package's format, next-byte
windows with a contiguous held-out tail, a causal transformer, and the preset end to end."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch
import yaml

from swap.cli import main
from swap.config import SwapError
from swap.data.text import TextChars, load_text_char, read_fortunes
from swap.models import CharTransformer


def _corpus(folder):
    """Two fortune files ('%' lines between fortunes), their strfile index and a .u8 link, as the
    Debian package installs them."""
    folder.mkdir()
    (folder / "b-science").write_bytes(b"E = mc^2\n%\nThe universe is big.\n%\n")
    (folder / "a-art").write_bytes(b"Art is long.\n%\nLife is short.\n%\n")
    (folder / "a-art.dat").write_bytes(b"\x00\x00\x00\x02binary index")
    os.symlink(folder / "a-art", folder / "a-art.u8")
    return folder


def test_reader_concatenates_the_fortune_files_in_name_order(tmp_path):
    folder = _corpus(tmp_path / "fortunes")
    assert read_fortunes(folder) == b"Art is long.\n%\nLife is short.\n%\nE = mc^2\n%\nThe universe is big.\n%\n"
    with pytest.raises(SwapError, match="apt-get install fortunes"):
        (tmp_path / "empty").mkdir()
        read_fortunes(tmp_path / "empty")


def test_windows_shift_by_one_and_the_test_split_is_the_tail(tmp_path):
    folder = _corpus(tmp_path / "fortunes")
    text = read_fortunes(folder)
    train, test = load_text_char(folder, seq_len=8, test_fraction=0.25)
    cut = int(len(text) * 0.75)
    assert bytes(train.data.tolist()) == text[:cut] and bytes(test.data.tolist()) == text[cut:]
    x, y = train[2]
    assert x.dtype == torch.int64 and bytes(x.tolist()) == text[16:24] and bytes(y.tolist()) == text[17:25]
    assert len(train) == (cut - 1) // 8 and train.num_classes == 256
    with pytest.raises(SwapError, match="seq_len"):
        TextChars(torch.zeros(5, dtype=torch.uint8), 8)


def test_a_holdout_is_the_tail_of_the_training_windows_never_the_test_split():
    """data.holdout holds out training windows as the evaluation set for tuning (as for every
    dataset), so a grid tuned with it never reads the corpus's test tail."""
    from swap.config import DataConfig
    from swap.data import load_dataset
    windows = DataConfig("text-char", seq_len=16)
    train, _ = load_dataset("text-char", None, train_subset=64, options=windows)      # Debian's fortunes
    fit, val = load_dataset("text-char", None, train_subset=64, options=windows, holdout=8)
    assert len(fit) == 56 and len(val) == 8
    assert all(torch.equal(val[k][0], train[56 + k][0]) for k in range(8))


def test_the_transformer_is_causal():
    torch.manual_seed(0)
    model = CharTransformer(256, seq_len=16).eval()
    x = torch.randint(0, 256, (2, 16))
    y = x.clone()
    y[:, 10:] = (y[:, 10:] + 7) % 256                   # change the future only
    with torch.no_grad():
        a, b = model(x), model(y)
    assert a.shape == (2, 16, 256)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_text_preset_runs_end_to_end_from_the_cli(tmp_path, capsys):
    pytest.importorskip("swap.data.text")
    out = tmp_path / "run"
    code = main(["train", "--config", "text_char_quick", "--out", str(out), "--set", "data.train_subset=2048",
                 "--set", "data.test_subset=256", "--set", "phase1.max_epochs=2", "--set", "phase2.epochs=1",
                 "--set", "threads=1"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    loss = summary["test_metrics"]["averaged"]["loss"]
    assert loss < math.log(256) - 1.0, summary["test_metrics"]          # well below a uniform guess
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("test_loss" in r for r in records if r["phase"] == "phase2" and r["test_acc"] is not None)
    assert summary["epochs"]["phase1"] == 2
    # the records rate samples and tokens; the table names its metric and the loss's unit
    phase1 = [r for r in records if r["phase"] == "phase1"]
    seq_len = yaml.safe_load((out / "config.yaml").read_text())["data"]["seq_len"]
    assert all(r["tokens_per_s"] == pytest.approx(seq_len * r["samples_per_s"], rel=1e-6) for r in phase1)
    assert summary["predictions"] == "next tokens"
    table = capsys.readouterr().out
    assert "| Method | Test next-token top-1 (%) | Training time (s) |" in table
    assert f"the final model's test loss {loss:.4f} nats/token" in table
