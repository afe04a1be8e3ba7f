"""A real text corpus as next-character prediction samples: Debian's ``fortunes`` package
(``/usr/share/games/fortunes``, about 2.5 MB of plain English text), read as bytes. The same
corpus is also a real classification set: a fortune's category is the file it comes from
(:func:`read_fortune_categories`).

Each sample is a window of ``seq_len`` bytes and the same window shifted by one: input int64
(T,), target int64 (T,), a vocabulary of the 256 byte values (the corpus is ASCII but for a few
UTF-8 characters; a byte model needs no tokenizer). The test split is a contiguous held-out tail
of the corpus (the last ``test_fraction``), so no test window overlaps a training one.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..errors import SwapError

VOCAB = 256


def fortune_files(folder: str | Path) -> list[Path]:
    """The fortune files of ``folder``: the files without an extension, in name order (``.dat``
    indexes and ``.u8`` links skipped).

    Raises:
        SwapError: no fortune file.
    """
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.is_symlink() and not p.suffix)
    if not files:
        raise SwapError(f"no fortune files in {folder} (install Debian's fortunes package: apt-get install fortunes)")
    return files


def read_fortunes(folder: str | Path) -> bytes:
    """The corpus: every fortune file of ``folder`` (:func:`fortune_files`), concatenated.

    Raises:
        SwapError: no fortune file, or an empty corpus.
    """
    text = b"".join(p.read_bytes() for p in fortune_files(folder))
    if not text:
        raise SwapError(f"the fortune files in {folder} are empty")
    return text


class TextChars(Dataset):
    """Next-byte samples of a corpus: sample i = (bytes [i*T, i*T + T), bytes [i*T + 1, i*T + T + 1)),
    non-overlapping windows of ``seq_len`` = T bytes; both int64 (T,).

    Attributes:
        num_classes: 256 (byte values). model_kwargs: ``{"seq_len": T}`` for the model factory.
        predictions: ``"next tokens"``: the targets are the inputs shifted by one (the run's tables
            name their accuracy next-token top-1).
    """
    predictions = "next tokens"

    def __init__(self, data: torch.Tensor, seq_len: int):
        if seq_len < 1 or len(data) < seq_len + 1:
            raise SwapError(f"a text of {len(data)} bytes cannot hold a window of data.seq_len={seq_len} + 1")
        self.data, self.seq_len = data, seq_len
        self.num_classes, self.model_kwargs = VOCAB, {"seq_len": seq_len}

    def __len__(self) -> int:
        return (len(self.data) - 1) // self.seq_len

    def __getitem__(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(i)
        start = i * self.seq_len
        window = self.data[start:start + self.seq_len + 1].long()
        return window[:-1], window[1:]


def load_text_char(folder: str | Path, seq_len: int, test_fraction: float = 0.1) -> tuple[TextChars, TextChars]:
    """(train, test) of the corpus in ``folder``: the first 1 - ``test_fraction`` of the bytes and
    the contiguous tail.

    Raises:
        SwapError: missing or empty corpus, or one too short for a window.
    """
    data = torch.frombuffer(bytearray(read_fortunes(folder)), dtype=torch.uint8)
    cut = int(len(data) * (1 - test_fraction))
    return TextChars(data[:cut].clone(), seq_len), TextChars(data[cut:].clone(), seq_len)


def read_fortune_categories(folder: str | Path, categories: tuple[str, ...] | None = None
                            ) -> tuple[list[bytes], list[int], list[str]]:
    """Fortunes as a classification set: each fortune (the text between two ``%`` lines of a
    fortune file, stripped) labelled with its file, the category.

    Args:
        categories: the file names to read, in label order (None = every fortune file).
    Returns:
        ``(texts, labels, names)``, texts as bytes and labels int in [0, len(names)), the
        fortunes in file order, then order within the file, empty fortunes skipped.
    Raises:
        SwapError: no fortune file, or a category that is not a file of ``folder``.
    """
    files = {p.name: p for p in fortune_files(folder)}
    names = list(categories) if categories is not None else sorted(files)
    missing = [n for n in names if n not in files]
    if missing:
        raise SwapError(f"no fortune file {missing[0]!r} in {folder} (categories: {', '.join(sorted(files))})")
    texts, labels = [], []
    for label, name in enumerate(names):
        for fortune in re.split(rb"^%\r?$", files[name].read_bytes(), flags=re.M):
            fortune = fortune.strip()
            if fortune:
                texts.append(fortune)
                labels.append(label)
    return texts, labels, names


__all__ = ["VOCAB", "fortune_files", "read_fortunes", "TextChars", "load_text_char",
           "read_fortune_categories"]
