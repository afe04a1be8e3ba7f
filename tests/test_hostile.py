"""Nothing a run reads runs code: a hostile file for every reader. Each stops the run with one
printable line and exit 2, runs no payload (its marker file never appears) and writes nothing
outside the run directory (a run that fails on its data creates no run directory at all)."""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pickle
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from swap.cli import main
from swap.config import SwapError
from swap.data.cifar import read_cifar_batch

from conftest import error_line, write_cifar10, write_fashion_files, write_idx, write_image_tree


class Payload:
    """Pickles as a call of ``os.system`` that creates ``marker``: what a hostile pickle carries."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class Eval:
    """Pickles as ``builtins.exec`` of code that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def files_under(root: Path, leave_out: Path | None = None) -> dict[str, bytes]:
    """Every file under ``root`` (but ``leave_out``) with its contents: what a run may not change."""
    return {str(p): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.is_symlink() and (leave_out is None or not p.is_relative_to(leave_out))}


def refused(err: str, *expected: str) -> str:
    """The run's one error line (no traceback), which holds every ``expected`` text."""
    errors = [line for line in err.splitlines() if line.startswith("swap: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert all(e in errors[0] for e in expected), errors[0]
    return errors[0]


def train(out: Path, *extra: str) -> int:
    return main(["train", "--config", "fashion_mnist_quick", "--out", str(out), *extra])


# ---------------------------------------------------------------------------------------- CIFAR

@pytest.mark.parametrize("payload, asked", [(Payload, "posix.system"), (Eval, "__builtin__.exec")])   # protocol 2: Python 2 names
def test_a_cifar_batch_carrying_a_pickle_payload_is_refused_before_anything_runs(tmp_path, no_system_data, capsys,
                                                                                  payload, asked):
    write_cifar10(tmp_path / "data")
    marker = tmp_path / "pwned"
    batch = tmp_path / "data" / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(pickle.dumps({b"data": payload(marker), b"labels": [1]}, protocol=2))
    before = files_under(tmp_path)
    assert train(tmp_path / "run", "--set", "data.name=cifar10", "--data-dir", str(tmp_path / "data")) == 2
    refused(capsys.readouterr().err, f"{batch}: not a CIFAR batch (it asks to load {asked})")
    assert not marker.exists() and not (tmp_path / "run").exists()
    assert files_under(tmp_path) == before


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_real_cifar_batches_still_load_through_the_restricted_unpickler(tmp_path, protocol):
    """The published layout (dict of bytes keys, NumPy uint8 ``data``, list of int labels) in the
    pickle protocols Python 2's cPickle (2) and Python 3 (4, 5: NumPy's in-band buffers) write."""
    rng = np.random.default_rng(protocol)
    data, labels = rng.integers(0, 256, (5, 3072), dtype=np.uint8), [3, 1, 4, 1, 5]
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"batch_label": b"training batch 1 of 5", b"labels": labels, b"data": data,
                                   b"filenames": [b"a.png"] * 5}, protocol=protocol))
    images, read_labels = read_cifar_batch(path, b"labels", 10)
    assert np.array_equal(images.reshape(5, -1), data) and read_labels.tolist() == labels


def test_a_cifar_batch_asking_for_any_other_class_is_refused(tmp_path):
    """Not only the callables of ``os``: a class of any package (here torch's) is refused as well."""
    path = tmp_path / "test_batch"
    path.write_bytes(pickle.dumps({b"data": torch.zeros(2), b"labels": [0, 1]}, protocol=2))
    with pytest.raises(SwapError, match=r"not a CIFAR batch \(it asks to load torch\."):
        read_cifar_batch(path, b"labels", 10)


# ------------------------------------------------------------------------------------------- IDX

def test_an_idx_header_announcing_more_than_the_file_holds_is_refused(tmp_path, no_system_data, capsys):
    """4 billion^3 images announced, 10 held: refused from the file's size (raw) or when the stream
    ends (gzip), before any buffer of the announced size (it would exhaust memory) exists."""
    from swap.data.idx import read_idx
    write_fashion_files(tmp_path / "fm", n_train=600, n_test=100)
    bad = tmp_path / "fm" / "train-images-idx3-ubyte.gz"
    header = bytes([0, 0, 8, 3]) + struct.pack(">3I", 2**32 - 1, 2**32 - 1, 2**32 - 1)
    body = np.zeros((10, 28, 28), np.uint8).tobytes()
    bad.write_bytes(gzip.compress(header + body))
    assert train(tmp_path / "run", "--data-dir", str(tmp_path / "fm")) == 2
    refused(capsys.readouterr().err, str(bad), "IDX header declares", "truncated or corrupt")
    assert not (tmp_path / "run").exists()
    raw = tmp_path / "train-images-idx3-ubyte"
    raw.write_bytes(header + body)
    with pytest.raises(SwapError, match="declares .* bytes but the file holds 7840; the file is truncated"):
        read_idx(raw)


def test_a_gzip_idx_that_inflates_past_its_header_is_refused_after_one_byte_more(tmp_path):
    """A decompression bomb: 10 images declared, 200 MB of zeros in the stream (200 kB on disk)."""
    from swap.data.idx import read_idx
    path = tmp_path / "train-images-idx3-ubyte.gz"
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)         # gzip framing
    chunk = bytes(1 << 20)
    blob = packer.compress(bytes([0, 0, 8, 3]) + struct.pack(">3I", 10, 28, 28))
    blob += b"".join(packer.compress(chunk) for _ in range(200)) + packer.flush()
    path.write_bytes(blob)
    with pytest.raises(SwapError, match=r"declares \(10, 28, 28\) = 7840 bytes but the file holds more than that"):
        read_idx(path)
    write_idx(path, (np.arange(7840) % 256).astype(np.uint8).reshape(10, 28, 28))
    assert read_idx(path).shape == (10, 28, 28)


# --------------------------------------------------------------------------------------- configs

def test_a_yaml_config_with_python_tags_is_refused_and_runs_nothing(tmp_path, capsys):
    marker = tmp_path / "pwned"
    config = tmp_path / "evil.yaml"
    config.write_text(f"name: evil\nseed: !!python/object/apply:os.system ['touch {marker}']\n")
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run")]) == 2
    refused(capsys.readouterr().err, "evil.yaml")
    assert main(["train", "--config", "fashion_mnist_quick", "--out", str(tmp_path / "run"),
                 "--set", f"seed=!!python/object/apply:os.system ['touch {marker}']"]) == 2
    refused(capsys.readouterr().err, "seed")
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_a_config_that_names_code_says_so_in_the_runs_first_line(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    assert train(tmp_path / "run", "--set", "model.name=user_parts:no_such_factory",
                 "--set", "task.metrics=[top1, user_parts:no_such_metric]", "--set", "phase2.optimizer=user_optim:two_group_adamw") == 2
    err = capsys.readouterr().err
    assert "model.name=user_parts:no_such_factory: cannot import it" in error_line(err)
    assert not (tmp_path / "run").exists()             # the import is tried before anything is created
    first = err.splitlines()[0]
    assert first == ("swap: this config runs code: model.name=user_parts:no_such_factory, "
                     "task.metrics=user_parts:no_such_metric, phase2.optimizer=user_optim:two_group_adamw "
                     "(imported from the working directory or PYTHONPATH)")


# ---------------------------------------------------------------------------------- image folder

def _bomb_png(path: Path, side: int = 20000) -> None:
    """A valid 8x8 PNG whose header says ``side`` x ``side`` pixels (400 million: beyond twice
    Pillow's MAX_IMAGE_PIXELS), with the header's CRC made right."""
    from PIL import Image
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "PNG")
    png = bytearray(buffer.getvalue())
    ihdr = png.index(b"IHDR")
    png[ihdr + 4:ihdr + 12] = struct.pack(">II", side, side)
    png[ihdr + 17:ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(png[ihdr:ihdr + 17])))
    path.write_bytes(bytes(png))


def test_an_image_folder_holding_a_decompression_bomb_stops_the_run(tmp_path, capsys):
    root = write_image_tree(tmp_path / "tree")
    bomb = sorted((root / "train").rglob("*.png"))[5]
    _bomb_png(bomb)
    assert train(tmp_path / "run", "--set", "data.name=imagefolder", "--data-dir", str(root)) == 2
    refused(capsys.readouterr().err, str(bomb), "decompression bomb")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("what", ["image", "class folder"])
def test_a_link_out_of_the_image_folder_stops_the_run_unless_allowed(tmp_path, capsys, what):
    root = write_image_tree(tmp_path / "tree")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    if what == "image":
        link = root / "train" / sorted(os.listdir(root / "train"))[0] / "linked.png"
        shutil.copy(sorted((root / "val").rglob("*.png"))[0], elsewhere / "private.png")
        link.symlink_to(elsewhere / "private.png")
    else:
        klass = sorted(os.listdir(root / "train"))[-1]
        link = root / "train" / klass
        shutil.move(str(link), str(elsewhere / klass))
        link.symlink_to(elsewhere / klass)
    assert train(tmp_path / "run", "--set", "data.name=imagefolder", "--data-dir", str(root)) == 2
    refused(capsys.readouterr().err, str(link), "outside", "data.follow_links=true")
    assert not (tmp_path / "run").exists()
    from swap.config import DataConfig
    from swap.data.folder import load_image_folder
    train_set, _ = load_image_folder(root, DataConfig("imagefolder", follow_links=True))
    assert any(Path(p).parent == link or Path(p) == link for p, _ in train_set.samples)


# ------------------------------------------------------------------------- checkpoints, run files

@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, real_fashion):
    """A run directory as a run stopped after phase 1's first epoch leaves it (``phase1_last``:
    weights, optimizer state, metadata): a 2-epoch run with every later file removed."""
    base = tmp_path_factory.mktemp("hostile")
    args = ["train", "--config", "fashion_mnist_quick", "--procs", "1", "--data-dir", str(real_fashion),
            "--set", "data.train_subset=1024", "--set", "data.test_subset=200", "--set", "phase1.batch_size=256",
            "--set", "phase1.max_epochs=2", "--set", "phase1.warmup_epochs=0", "--set", "phase2.epochs=1",
            "--set", "phase2.batch_size=128", "--set", "checkpoint_every=1", "--out"]
    assert main(args + [str(base / "run")]) == 0
    for path in (base / "run" / "checkpoints").iterdir():
        if not path.name.startswith("phase1_last."):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    (base / "run" / "summary.json").unlink()
    return base / "run", args


def _resume_copy(stopped_run, tmp_path: Path) -> tuple[Path, list[str]]:
    run, args = stopped_run
    shutil.copytree(run, tmp_path / "run", symlinks=True)
    return tmp_path / "run", args + [str(tmp_path / "run"), "--resume"]


def _set_meta(run: Path, **fields) -> None:
    meta = run / "checkpoints" / "phase1_last.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), **fields}))


def test_the_untouched_stopped_run_resumes(stopped_run, tmp_path):
    """The hostile variants below differ from this run directory in one file each."""
    run, args = _resume_copy(stopped_run, tmp_path)
    assert main(args) == 0 and (run / "summary.json").is_file()


def test_an_optimizer_state_carrying_a_pickle_payload_is_refused(stopped_run, tmp_path, capsys):
    run, args = _resume_copy(stopped_run, tmp_path)
    marker = tmp_path / "pwned"
    blob = io.BytesIO()
    torch.save({"state": {}, "param_groups": Payload(marker)}, blob)
    optim = run / "checkpoints" / "phase1_last.optim.pt"
    optim.write_bytes(blob.getvalue())
    _set_meta(run, optim_sha256=hashlib.sha256(blob.getvalue()).hexdigest())    # the hash agrees: only the type check is left
    before = files_under(tmp_path, leave_out=run)
    assert main(args) == 2
    refused(capsys.readouterr().err, f"{optim}: not an optimizer state (it asks to load posix.system)")
    assert not marker.exists() and files_under(tmp_path, leave_out=run) == before


@pytest.mark.parametrize("fields, message", [
    ({"tied": {"../../../outside": "fc.weight"}}, "tied="),
    ({"tied": {"features.0.weight": "head.weight"}}, "it ties"),
    ({"epoch": "../../outside"}, "epoch="),
    ({"partial": {"step": "/etc/passwd"}}, "partial.step="),
    ({"sha256": "../weights"}, "sha256="),
])
def test_checkpoint_metadata_with_names_or_paths_is_refused(stopped_run, tmp_path, capsys, fields, message):
    run, args = _resume_copy(stopped_run, tmp_path)
    _set_meta(run, **fields)
    before = files_under(tmp_path, leave_out=run)
    assert main(args) == 2
    refused(capsys.readouterr().err, "phase1_last.json", message)
    assert files_under(tmp_path, leave_out=run) == before


def test_checkpoint_metadata_nested_too_deep_to_parse_is_one_line(stopped_run, tmp_path, capsys):
    run, args = _resume_copy(stopped_run, tmp_path)
    (run / "checkpoints" / "phase1_last.json").write_text("[" * 200000 + "]" * 200000)
    assert main(args) == 2
    refused(capsys.readouterr().err, "phase1_last.json: cannot read (RecursionError")


@pytest.mark.parametrize("linked", ["checkpoints/phase1_last.json", "checkpoints/track", "metrics.jsonl"])
def test_a_link_out_of_the_run_directory_is_refused_before_any_write(stopped_run, tmp_path, capsys, linked):
    """A resume writes, renames and deletes in its run directory (it removes stale ``*.tmp`` files
    of checkpoints, appends to metrics.jsonl): a link would carry that to the folder it points to."""
    run, args = _resume_copy(stopped_run, tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.json.tmp").write_text("a file of someone else's")
    link = run / linked
    if link.exists():
        shutil.move(str(link), str(outside / link.name))
        link.symlink_to(outside / link.name)
    else:
        link.symlink_to(outside)
    before = files_under(outside)
    assert main(args) == 2
    refused(capsys.readouterr().err, f"{link} links to {outside}", "outside the run directory")
    assert files_under(outside) == before


def test_a_run_directorys_config_with_python_tags_is_refused_on_resume(stopped_run, tmp_path, capsys):
    run, args = _resume_copy(stopped_run, tmp_path)
    marker = tmp_path / "pwned"
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("seed: 0", f"seed: !!python/object/apply:os.system ['touch {marker}']"))
    assert "!!python" in config.read_text()
    assert main(args) == 2
    refused(capsys.readouterr().err, "config.yaml")
    assert not marker.exists()


def test_an_altered_mlflow_run_id_is_refused(tmp_path):
    pytest.importorskip("mlflow", reason="swap[mlflow] is not installed")     # `make test` installs it
    from swap.tracking import MLflowLogger
    (tmp_path / "mlflow_run_id").write_text("../../../../tmp/elsewhere")
    with pytest.raises(SwapError, match="is not an MLflow run id"):
        MLflowLogger(tmp_path, resumed=True)
    assert sorted(os.listdir(tmp_path)) == ["mlflow_run_id"]
