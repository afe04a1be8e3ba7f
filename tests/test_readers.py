"""Readers on tiny files in the exact published formats, plus corrupt and mismatched files."""
from __future__ import annotations

import functools
import gzip
import http.server
import shutil
import threading

import numpy as np
import pytest
import torch

from swap.config import SwapError
from swap.data import fetch, find_data_dir, load_dataset, read_idx
from swap.data.sources import IDX_FILES

from conftest import FASHION_DIR, write_cifar10, write_cifar100, write_fashion_files, write_idx


def test_idx_roundtrip_gz_and_raw(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(read_idx(write_idx(tmp_path / "a.gz", a)), a)
    assert np.array_equal(read_idx(write_idx(tmp_path / "a", a, gz=False)), a)


def test_a_file_read_again_comes_from_the_cache_until_its_bytes_change(tmp_path):
    """The second read of the same bytes returns the kept read-only array; the same path rewritten
    with other bytes of the same size (and the same timestamp) is read anew; at most CACHED files
    are kept."""
    import os

    from swap.data import idx
    a = np.arange(60, dtype=np.uint8).reshape(3, 4, 5)
    path = write_idx(tmp_path / "a.gz", a)
    first = read_idx(path)
    assert read_idx(path) is first and not first.flags.writeable and np.array_equal(first, a)
    with pytest.raises(ValueError):
        first[0, 0, 0] = 1                                   # a shared array cannot be changed by a caller
    stat = path.stat()
    write_idx(path, a[::-1].copy())
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    again = read_idx(path)
    assert again is not first and np.array_equal(again, a[::-1]) and np.array_equal(first, a)
    for n in range(idx.CACHED + 1):
        read_idx(write_idx(tmp_path / f"b{n}.gz", a + n))
    assert len(idx._cache) == idx.CACHED
    assert read_idx(tmp_path / f"b{idx.CACHED}.gz") is read_idx(tmp_path / f"b{idx.CACHED}.gz")


def test_fashion_loader_matches_written_arrays(tmp_path, no_system_data):
    arrays = write_fashion_files(tmp_path / "fm", n_train=20, n_test=10)
    train, test = load_dataset("fashion-mnist", str(tmp_path / "fm"))
    assert train.images.shape == (20, 1, 28, 28) and train.images.dtype == torch.uint8
    assert train.labels.dtype == torch.int64
    assert np.array_equal(train.images[:, 0].numpy(), arrays["train"][0])
    assert np.array_equal(test.labels.numpy(), arrays["t10k"][1])


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(p.read_bytes()[:-50]), "cannot read"),                       # truncated gzip
    (lambda p: p.write_bytes(gzip.compress(gzip.decompress(p.read_bytes())[:-7])), "truncated"),
    (lambda p: p.write_bytes(gzip.compress(b"\x01\x02" + gzip.decompress(p.read_bytes())[2:])), "magic"),
    (lambda p: p.write_bytes(gzip.compress(b"\x00\x00\x0d" + gzip.decompress(p.read_bytes())[3:])), "type code"),
])
def test_corrupt_idx_raises(tmp_path, no_system_data, damage, message):
    write_fashion_files(tmp_path / "fm")
    damage(tmp_path / "fm" / "train-images-idx3-ubyte.gz")
    with pytest.raises(SwapError, match=message):
        load_dataset("fashion-mnist", str(tmp_path / "fm"))


def test_label_file_not_matching_images(tmp_path, no_system_data):
    write_fashion_files(tmp_path / "fm", n_train=20)
    write_idx(tmp_path / "fm" / "train-labels-idx1-ubyte.gz", np.zeros(19, dtype=np.uint8))
    with pytest.raises(SwapError, match="do not belong together"):
        load_dataset("fashion-mnist", str(tmp_path / "fm"))


def test_label_out_of_range_and_wrong_dims(tmp_path, no_system_data):
    write_fashion_files(tmp_path / "fm", n_train=20)
    write_idx(tmp_path / "fm" / "train-labels-idx1-ubyte.gz", np.full(20, 10, dtype=np.uint8))
    with pytest.raises(SwapError, match="outside"):
        load_dataset("fashion-mnist", str(tmp_path / "fm"))
    write_fashion_files(tmp_path / "fm2", n_train=20)
    write_idx(tmp_path / "fm2" / "train-images-idx3-ubyte.gz", np.zeros((20, 784), dtype=np.uint8))
    with pytest.raises(SwapError, match="3 dimensions"):
        load_dataset("fashion-mnist", str(tmp_path / "fm2"))


def test_cifar10_reader(tmp_path, no_system_data):
    written = write_cifar10(tmp_path, per_batch=4)
    train, test = load_dataset("cifar10", str(tmp_path))
    assert train.images.shape == (20, 3, 32, 32) and test.images.shape == (4, 3, 32, 32)
    # Row layout: 1024 red, then green, then blue values of a row-major 32x32 image.
    data, labels = written["data_batch_2"]
    img = train.images[4 + 1]
    assert torch.equal(img[0].flatten(), torch.from_numpy(data[1, :1024]))
    assert torch.equal(img[2, 5, 7], torch.tensor(data[1, 2048 + 5 * 32 + 7]))
    assert train.labels[4 + 1].item() == labels[1]
    assert train.num_classes == 10


def test_cifar100_reader_uses_fine_labels(tmp_path, no_system_data):
    written = write_cifar100(tmp_path, n=6)
    train, test = load_dataset("cifar100", str(tmp_path))
    assert train.num_classes == 100 and train.images.shape == (6, 3, 32, 32)
    assert train.labels.tolist() == written["train"][1]


def test_cifar_corrupt_and_mismatched(tmp_path, no_system_data):
    write_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:100])
    with pytest.raises(SwapError, match="data_batch_3"):
        load_dataset("cifar10", str(tmp_path))
    import pickle
    write_cifar10(tmp_path)
    with open(batch, "wb") as fh:
        pickle.dump({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2]}, fh)
    with pytest.raises(SwapError, match="4 images but 3 labels"):
        load_dataset("cifar10", str(tmp_path))


def test_missing_data_says_how_to_get_it(tmp_path, no_system_data, monkeypatch):
    import dataclasses
    from swap.data import sources
    with pytest.raises(SwapError, match="not found.*swap data fetch cifar10.*--data-dir"):
        find_data_dir("cifar10", None)
    hidden = dataclasses.replace(sources.SOURCES["fashion-mnist"], system_dirs=(str(tmp_path / "no-system"),))
    monkeypatch.setitem(sources.SOURCES, "fashion-mnist", hidden)
    with pytest.raises(SwapError, match="apt-get install -y dataset-fashion-mnist"):
        find_data_dir("fashion-mnist", None)


def test_an_explicit_data_dir_is_binding(tmp_path, real_fashion, monkeypatch):
    """A given --data-dir that does not exist, or lacks files, is an error naming it (and the
    missing files), even though Fashion-MNIST sits in the system folder and $SWAP_DATA."""
    monkeypatch.setenv("SWAP_DATA", str(real_fashion))
    with pytest.raises(SwapError, match="nonexistent-dir.*does not exist"):
        find_data_dir("fashion-mnist", str(tmp_path / "nonexistent-dir"))
    write_fashion_files(tmp_path / "partial")
    (tmp_path / "partial" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(SwapError, match="partial.*lacks fashion-mnist files: t10k-labels-idx1-ubyte.gz$"):
        find_data_dir("fashion-mnist", str(tmp_path / "partial"))
    assert find_data_dir("fashion-mnist", None) == real_fashion            # no folder given: the search order


def test_search_order_data_dir_then_env(tmp_path, no_system_data, monkeypatch):
    write_fashion_files(tmp_path / "a")
    write_fashion_files(tmp_path / "b")
    monkeypatch.setenv("SWAP_DATA", str(tmp_path / "b"))
    assert find_data_dir("fashion-mnist", str(tmp_path / "a")) == tmp_path / "a"
    assert find_data_dir("fashion-mnist", None) == tmp_path / "b"


def _serve(folder):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_fetch_verifies_checksums(tmp_path, real_fashion):
    """`swap data fetch` from a local mirror (loopback): good files land, a corrupt one is refused."""
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for f in IDX_FILES:
        shutil.copy(real_fashion / f, mirror / f)
    server = _serve(mirror)
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        dest = fetch("fashion-mnist", tmp_path / "cache", base_url=url)
        assert all((dest / f).is_file() for f in IDX_FILES)
        # A different payload (one label changed) must be refused and must not land.
        labels = gzip.decompress((mirror / IDX_FILES[3]).read_bytes())
        (mirror / IDX_FILES[3]).write_bytes(gzip.compress(labels[:-1] + bytes([(labels[-1] + 1) % 10])))
        with pytest.raises(SwapError, match="does not match the published"):
            fetch("fashion-mnist", tmp_path / "cache2", base_url=url)
        assert not (tmp_path / "cache2" / IDX_FILES[3]).exists()
    finally:
        server.shutdown()


def test_fetch_without_network_explains(tmp_path):
    with pytest.raises(SwapError, match="cannot download.*--data-dir"):
        fetch("fashion-mnist", tmp_path, base_url="http://127.0.0.1:9/", timeout_s=2)


@pytest.mark.parametrize("url", ["file:///usr/share/datasets/fashion-mnist/", "ftp://127.0.0.1/"])
def test_fetch_takes_only_http_addresses(tmp_path, url):
    """urllib would open file:// (any file of the machine) or ftp://; a mirror is an http(s) server."""
    with pytest.raises(SwapError, match=r"give an http:// or https:// address"):
        fetch("fashion-mnist", tmp_path / "cache", base_url=url)
    assert not (tmp_path / "cache").exists()
