"""Where each dataset's files are found, and how to fetch them.

A folder given explicitly (``data.dir`` / ``--data-dir``) is binding: the dataset is read from it
(or its subfolder ``<name>``) or not at all. Without one, the search order is (first hit wins):
``$SWAP_DATA``, system folders (Debian's ``dataset-fashion-mnist`` puts Fashion-MNIST in
``/usr/share/datasets/fashion-mnist``), then the user cache ``$XDG_CACHE_HOME/swap/<name>``
(default ``~/.cache/swap/<name>``) that :func:`fetch` fills from the dataset's canonical location,
verifying checksums.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SwapError
from ..errors import printable

IDX_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


@dataclass(frozen=True)
class Source:
    """A dataset's files. ``payload_sha256``: SHA-256 of each file's *decompressed* bytes (survives
    re-compression, e.g. by Debian); ``md5``: MD5 of the downloaded archive as its publisher lists it."""
    name: str
    num_classes: int
    required: tuple[str, ...]            # paths relative to the dataset folder that must exist
    base_url: str
    downloads: tuple[str, ...]           # file names under base_url
    system_dirs: tuple[str, ...] = ()
    payload_sha256: dict = field(default_factory=dict)
    md5: dict = field(default_factory=dict)
    archive_dir: str = ""                # folder a tarball unpacks to (CIFAR)


SOURCES = {
    "fashion-mnist": Source(
        "fashion-mnist", 10, IDX_FILES,
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/", IDX_FILES,
        system_dirs=("/usr/share/datasets/fashion-mnist",),
        payload_sha256={
            "train-images-idx3-ubyte.gz": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            "train-labels-idx1-ubyte.gz": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            "t10k-images-idx3-ubyte.gz": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            "t10k-labels-idx1-ubyte.gz": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        }),
    "mnist": Source(
        "mnist", 10, IDX_FILES, "https://ossci-datasets.s3.amazonaws.com/mnist/", IDX_FILES,
        system_dirs=("/usr/share/datasets/mnist",),
        md5={"train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
             "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
             "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
             "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"}),
    "cifar10": Source(
        "cifar10", 10,
        tuple(f"cifar-10-batches-py/{f}" for f in ("data_batch_1", "data_batch_2", "data_batch_3",
                                                   "data_batch_4", "data_batch_5", "test_batch")),
        "https://www.cs.toronto.edu/~kriz/", ("cifar-10-python.tar.gz",),
        md5={"cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a"}, archive_dir="cifar-10-batches-py"),
    "cifar100": Source(
        "cifar100", 100, ("cifar-100-python/train", "cifar-100-python/test"),
        "https://www.cs.toronto.edu/~kriz/", ("cifar-100-python.tar.gz",),
        md5={"cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85"}, archive_dir="cifar-100-python"),
    # Debian's `fortunes` package: plain text, read byte by byte (swap.data.text); no download
    "text-char": Source("text-char", 256, ("fortunes", "computers", "science"), "", (),
                        system_dirs=("/usr/share/games/fortunes",)),
    # a class-per-folder image tree of your own (ImageNet's layout; swap.data.folder); no download
    "imagefolder": Source("imagefolder", 0, ("train/", "val/"), "", ()),
}


def get_source(name: str) -> Source:
    if name not in SOURCES:
        raise SwapError(f"unknown dataset '{name}' (known: {', '.join(SOURCES)})")
    return SOURCES[name]


def cache_dir(name: str) -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "swap" / name


def candidate_dirs(name: str, data_dir: str | None = None) -> list[Path]:
    """The folders searched for ``name``, in order (see module docstring): only ``data_dir`` and
    ``data_dir/name`` when ``data_dir`` is given."""
    src = get_source(name)
    if data_dir:
        return [Path(data_dir), Path(data_dir) / name]
    dirs = []
    if os.environ.get("SWAP_DATA"):
        dirs += [Path(os.environ["SWAP_DATA"]), Path(os.environ["SWAP_DATA"]) / name]
    dirs += [Path(d) for d in src.system_dirs]
    dirs.append(cache_dir(name))
    return dirs


def find_data_dir(name: str, data_dir: str | None = None) -> Path:
    """First folder holding all of the dataset's files; with ``data_dir``, that folder (or its
    subfolder ``name``) and no other.

    Raises:
        SwapError: none found; the message lists the folders searched and how to get the files.
            With ``data_dir``: it does not exist, or it lacks files (named in the message).
    """
    src = get_source(name)
    searched = candidate_dirs(name, data_dir)
    for d in searched:
        if all(_present(d, f) for f in src.required):
            return d
    how = f"run `swap data fetch {name}`"
    if name == "fashion-mnist":
        how = "run `apt-get install -y dataset-fashion-mnist` (Debian/Ubuntu, as root) or " + how
    if name == "text-char":
        how = "run `apt-get install -y fortunes` (Debian/Ubuntu, as root)"
    if name == "imagefolder":
        how = "pass --data-dir ROOT (data.dir) holding ROOT/train/CLASS/*.jpg and ROOT/val/CLASS/*.jpg"
    if data_dir:
        given = Path(data_dir)
        if not given.is_dir():
            raise SwapError(f"data directory {str(given)!r} (--data-dir / data.dir) does not exist; pass the "
                            f"folder that holds the {name} files, or leave it out and {how}")
        best = max(searched, key=lambda d: sum(_present(d, f) for f in src.required))
        missing = [f for f in src.required if not _present(best, f)]
        raise SwapError(f"data directory {str(best)!r} (--data-dir / data.dir) lacks {name} files: "
                        f"{', '.join(missing)}")
    how += f", or put {', '.join(src.required)} in a folder and pass --data-dir (or set SWAP_DATA)"
    raise SwapError(f"{name} not found (searched {', '.join(map(str, searched))}); {how}")


def _present(folder: Path, required: str) -> bool:
    """``folder/required`` exists: a folder if ``required`` ends with ``/``, else a file."""
    path = folder / required
    return path.is_dir() if required.endswith("/") else path.is_file()


def _digest(path: Path, algo: str, decompress: bool) -> str:
    h = hashlib.new(algo)
    opener = gzip.open if decompress and path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(name: str, folder: Path, filename: str) -> None:
    """Check one downloaded file against its published checksum.

    Raises:
        SwapError: the checksum differs (the file is corrupt or not the published one).
    """
    src = get_source(name)
    path = folder / filename
    checks = []
    if filename in src.payload_sha256:
        checks.append(("sha256", True, src.payload_sha256[filename]))
    if filename in src.md5:
        checks.append(("md5", False, src.md5[filename]))
    for algo, decompress, want in checks:
        try:
            got = _digest(path, algo, decompress)
        except (OSError, EOFError) as exc:
            raise SwapError(f"{path}: unreadable ({exc})") from None
        if got != want:
            raise SwapError(f"{path}: {algo} {got} does not match the published {want}; delete it and fetch again")


def fetch(name: str, dest: Path | None = None, base_url: str | None = None, timeout_s: float = 60.0) -> Path:
    """Download ``name`` into ``dest`` (default: the user cache), verify checksums, unpack archives.

    Files go to a temporary folder first and move into place only once verified, so a failed
    download leaves nothing half-written. Returns the dataset folder.

    Raises:
        SwapError: a base URL that is not http(s); network failure (with instructions for an
            offline machine) or checksum mismatch.
    """
    src = get_source(name)
    dest = Path(dest) if dest else cache_dir(name)
    base_url = base_url or src.base_url
    if urllib.parse.urlsplit(base_url).scheme not in ("http", "https"):
        raise SwapError(f"--url {printable(base_url)}: give an http:// or https:// address (files already on this "
                        f"machine need no fetch: pass their folder as --data-dir)")
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        tmp = Path(tmp)
        for filename in src.downloads:
            url = base_url.rstrip("/") + "/" + filename
            try:
                # bandit B310 (urlopen of any scheme): the scheme is http(s), checked above
                with urllib.request.urlopen(url, timeout=timeout_s) as resp, open(tmp / filename, "wb") as out:  # nosec B310
                    shutil.copyfileobj(resp, out)
            except OSError as exc:
                hint = (" On Debian/Ubuntu, as root: apt-get install -y dataset-fashion-mnist."
                        if name == "fashion-mnist" else "")
                raise SwapError(f"cannot download {url} ({exc}). Without network, copy the files "
                                f"{', '.join(src.downloads)} into {dest} or a folder passed as --data-dir.{hint}") from None
            verify(name, tmp, filename)
            if filename.endswith(".tar.gz"):
                with tarfile.open(tmp / filename) as tar:
                    tar.extractall(tmp, filter="data")
                shutil.rmtree(dest / src.archive_dir, ignore_errors=True)
                (tmp / src.archive_dir).rename(dest / src.archive_dir)
            else:
                (tmp / filename).replace(dest / filename)
    return dest


__all__ = ["IDX_FILES", "Source", "SOURCES", "get_source", "cache_dir", "candidate_dirs", "find_data_dir",
           "verify", "fetch"]
