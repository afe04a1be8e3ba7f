"""Shared test helpers: writers for the exact published byte formats, and the real-data path."""
from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# Property-based tests draw the same examples on every run (`make test`, CI): a fixed budget,
# derandomized, no example database. Broad random search is `make fuzz` (profile "fuzz").
settings.register_profile("ci", max_examples=40, derandomize=True, database=None, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture])
settings.register_profile("fuzz", max_examples=500, derandomize=False, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.function_scoped_fixture])
settings.load_profile("ci")

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FORTUNES_DIR = Path("/usr/share/games/fortunes")


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> Path:
    """Write ``array`` (uint8) in IDX format: 0x00 0x00 0x08 ndim, big-endian uint32 sizes, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def write_fashion_files(folder: Path, n_train: int = 20, n_test: int = 10, seed: int = 0) -> tuple:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", labels)
        arrays[split] = (images, labels)
    return arrays


def write_cifar10(folder: Path, per_batch: int = 4, seed: int = 0) -> dict:
    """Tiny CIFAR-10 in the python format: ``cifar-10-batches-py/data_batch_1..5``, ``test_batch``."""
    rng = np.random.default_rng(seed)
    root = folder / "cifar-10-batches-py"
    root.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        with open(root / name, "wb") as fh:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                         b"filenames": [b"x.png"] * per_batch}, fh, protocol=2)
        written[name] = (data, labels)
    return written


def write_cifar100(folder: Path, n: int = 6, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    root = folder / "cifar-100-python"
    root.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in ("train", "test"):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = [int(v) for v in rng.integers(0, 100, n)]
        with open(root / name, "wb") as fh:
            pickle.dump({b"filenames": [b"x.png"] * n, b"fine_labels": fine,
                         b"coarse_labels": [v // 5 for v in fine], b"data": data}, fh, protocol=2)
        written[name] = (data, fine)
    return written


@pytest.fixture
def no_system_data(tmp_path, monkeypatch):
    """Hide $SWAP_DATA and the user cache so only explicitly given folders are searched."""
    monkeypatch.delenv("SWAP_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path


@pytest.fixture(scope="session")
def real_fashion():
    if not (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail(f"Fashion-MNIST missing in {FASHION_DIR}: `make test` installs it (dataset-fashion-mnist)")
    return FASHION_DIR


@pytest.fixture(scope="session")
def real_fortunes():
    if not FORTUNES_DIR.is_dir():
        pytest.fail(f"Debian's fortunes missing in {FORTUNES_DIR}: `make test` installs it (fortunes)")
    return FORTUNES_DIR


def live_processes() -> list[dict]:
    """Live (not zombie) processes from /proc: pid, ppid, pgrp (process group) and cmdline bytes."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if fields[0] != "Z":
            out.append({"pid": int(stat.parent.name), "ppid": int(fields[1]), "pgrp": int(fields[2]), "cmdline": cmdline})
    return out


def error_line(err: str) -> str:
    """The one line of a refused run's standard error: ``swap: error: ...``, after (only when the
    config names code) the run's first line that lists that code."""
    lines = err.strip().splitlines()
    if lines and lines[0].startswith("swap: this config runs code: "):
        lines = lines[1:]
    assert len(lines) == 1 and lines[0].startswith("swap: error:"), err
    return lines[0]


def listening_sockets(root: int) -> set[tuple[str, int, str]]:
    """(address, port, command) of every TCP socket listening in process ``root`` or any process
    under it, read from /proc (the sockets each process holds, matched with /proc/net/tcp{,6})."""
    import socket

    children: dict[int, list[int]] = {}
    for p in live_processes():
        children.setdefault(p["ppid"], []).append(p["pid"])
    tree, todo = set(), [root]
    while todo:
        pid = todo.pop()
        tree.add(pid)
        todo += children.get(pid, [])
    owner = {}
    for pid in tree:
        for fd in Path(f"/proc/{pid}/fd").glob("*") if Path(f"/proc/{pid}/fd").is_dir() else ():
            try:
                link = os.readlink(fd)
            except OSError:
                continue
            if link.startswith("socket:["):
                owner[link[8:-1]] = pid
    found = set()
    for family, table in ((socket.AF_INET, "/proc/net/tcp"), (socket.AF_INET6, "/proc/net/tcp6")):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in owner:          # 0A: LISTEN
                continue
            address, port = fields[1].split(":")
            raw = bytes.fromhex(address)                             # 32-bit words in host (little-endian) order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            try:
                command = (Path(f"/proc/{owner[fields[9]]}/cmdline").read_bytes().split(b"\0")[0]).decode(errors="replace")
            except OSError:
                command = "?"
            found.add((socket.inet_ntop(family, raw), int(port, 16), command))
    return found


class Listening:
    """Within the block, every TCP socket that this process or one under it listens on, sampled
    every 20 ms by a thread (``.seen``: (address, port, command)); a server that lives for more
    than a few sampling periods (a rendezvous, a process group, Ray's servers) is seen."""

    def __enter__(self) -> "Listening":
        import threading

        self.seen: set[tuple[str, int, str]] = set()
        self.stop = threading.Event()

        def sample():
            while not self.stop.wait(0.02):
                self.seen |= listening_sockets(os.getpid())

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")


def ddp_rank_setup(data_seed: int):
    """Inside a launched rank (or a single process): join the group, make 128 random 28x28
    images, and a seeded smallcnn wrapped in DDP when there are several ranks.
    Returns (dist, data, mean, std, model, wrapped)."""
    import torch

    from swap import distributed
    from swap.data import ImageDataset
    from swap.models import build_model

    d = distributed.setup("cpu")
    g = torch.Generator().manual_seed(data_seed)
    data = ImageDataset(torch.randint(0, 256, (128, 1, 28, 28), generator=g, dtype=torch.uint8),
                        torch.randint(0, 10, (128,), generator=g), 10)
    mean, std = data.channel_stats()
    torch.manual_seed(0)
    model = build_model("smallcnn", 10, 1)
    wrapped = (torch.nn.parallel.DistributedDataParallel(model, forward_sync_buffers=False)
               if d.world_size > 1 else model)
    return d, data, mean, std, model, wrapped


def write_image_tree(root: Path, classes: int = 3, per_class: int = 4, val_per_class: int = 2, size=(40, 30),
                     seed: int = 0, mode: str = "RGB") -> Path:
    """A tiny ImageNet-layout tree: ``root/train/cNN/*.{jpg,png}`` and ``root/val/cNN/...``,
    random images of ``size`` (W, H), alternately JPEG and PNG, each class a different mean colour
    (so a model can learn them). Returns ``root``."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    channels = 3 if mode == "RGB" else 1
    for split, n in (("train", per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = root / split / f"c{c:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                base = 40 + 170 * c / max(1, classes - 1)
                pixels = np.clip(rng.normal(base, 30, (size[1], size[0], channels)), 0, 255).astype(np.uint8)
                img = Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)
                img.save(folder / f"{i:04d}.{'jpg' if i % 2 else 'png'}")
    return root


def train_quick(out: Path, data_dir: Path, procs: int, *overrides: str) -> tuple[dict, list[dict]]:
    """`swap train --config fashion_mnist_quick --workers 2` with ``procs`` processes and the
    ``KEY=VALUE`` overrides; asserts it succeeds and returns its summary and metrics records."""
    import json

    from swap.cli import main
    args = ["train", "--config", "fashion_mnist_quick", "--workers", "2", "--procs", str(procs), "--out", str(out),
            "--data-dir", str(data_dir)]
    assert main(args + [a for kv in overrides for a in ("--set", kv)]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return json.loads((out / "summary.json").read_text()), records


ABS_RESIZE = ["--config", "fashion_mnist_quick", "--method", "abs", "--set", "data.train_subset=1024",
              "--set", "data.test_subset=200", "--set", "abs.epochs=3", "--set", "abs.batch_size=64",
              "--set", "abs.micro_batch_size=64", "--set", "abs.per_worker_batch=64", "--set", "abs.fallback_epochs=1",
              "--set", "abs.eig_samples=64", "--set", "abs.peak_lr=0.02", "--set", "threads=1"]


@pytest.fixture(scope="session")
def abs_resize_runs(tmp_path_factory, real_fashion):
    """Run directories of one ABS schedule (batch 64, 128, 256: fallback doubling every epoch) in
    1 process (``fixed``) and in the elastic pool of the torch launcher, 1 -> 2 processes
    (``elastic``); shared with tests/test_ray.py. ``listening``: the TCP sockets that the elastic
    run's processes listened on (:class:`Listening`)."""
    base = tmp_path_factory.mktemp("abs-resize")
    from swap.cli import main

    common = ["train", *ABS_RESIZE, "--data-dir", str(real_fashion)]
    assert main(common + ["--procs", "1", "--set", "abs.elastic=false", "--out", str(base / "fixed")]) == 0
    with Listening() as listening:
        assert main(common + ["--procs", "2", "--set", "abs.max_workers=2", "--out", str(base / "elastic")]) == 0
    return {"fixed": base / "fixed", "elastic": base / "elastic", "listening": listening.seen}


# Fixtures that mean a test trains on real data or in several processes: its tests are end to end
# (`make test` runs them; `make test-fast` leaves them out)
END_TO_END_FIXTURES = {"real_fashion", "real_fortunes", "abs_resize_runs"}


def pytest_collection_modifyitems(config, items):
    """Mark every test that uses an end-to-end fixture (:data:`END_TO_END_FIXTURES`, or a
    session- or module-scoped fixture of its own module, which runs a shared training) ``e2e``."""
    for item in items:
        shared = {name for name, defs in getattr(item, "_fixtureinfo").name2fixturedefs.items()
                  if defs and defs[-1].scope in ("session", "module") and defs[-1].baseid.endswith(".py")}
        if END_TO_END_FIXTURES & set(item.fixturenames) or shared:
            item.add_marker(pytest.mark.e2e)
