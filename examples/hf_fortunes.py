"""Hugging Face ``transformers`` models trained with SWAP as they are, on Debian's fortunes: the
model and data functions that ``configs/hf_gpt2_fortunes.yaml`` and ``configs/hf_bert_fortunes.yaml``
name (``model.name: examples.hf_fortunes:gpt2``), and that a library user passes to
``swap.train_swap``. Nothing is downloaded: each model is built from its config class, and bytes are
the tokens (a vocabulary of 256, no tokenizer).

- ``gpt2`` + ``byte_windows``: a small GPT-2 (tied input and output embeddings) on next-byte
  prediction; rows ``{"input_ids", "labels"}`` with labels equal to the input, as
  ``DataCollatorForLanguageModeling(mlm=False)`` makes them: the model shifts them and computes its
  own loss, which is what SWAP trains on.
- ``bert`` + ``categories``: a small BERT classifier (``BertForSequenceClassification``) that reads a
  fortune and names its category, the file it comes from; rows ``{"input_ids", "attention_mask",
  "labels"}`` padded to 128 bytes, batched by ``transformers.default_data_collator``.

Needs ``pip install 'swap[hf]'``. Run from the repository root (the CLI imports ``examples`` from
the current directory).
"""
from __future__ import annotations

import torch
from torch.utils.data import Dataset
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

from swap.data.sources import find_data_dir
from swap.data.text import load_text_char, read_fortune_categories

SEQ_LEN = 64                 # predicted bytes per window (the char-level preset's, text_char_quick)
MAX_BYTES = 128              # a fortune's bytes the classifier reads (the median fortune has 106)
CATEGORIES = ("computers", "definitions", "people", "science", "songs-poems")


def gpt2():
    """A 2-layer GPT-2, width 64, 4 heads, over bytes: ``GPT2LMHeadModel`` (0.13 M parameters)."""
    model = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=SEQ_LEN + 1, n_embd=64, n_layer=2, n_head=4,
                                       bos_token_id=0, eos_token_id=0, tie_word_embeddings=True))
    model.loss_type = "ForCausalLM"          # named, so transformers 5 does not warn that it guessed it
    return model


def bert():
    """A 2-layer BERT, width 64, 4 heads, over bytes, with a head over :data:`CATEGORIES`:
    ``BertForSequenceClassification``."""
    return BertForSequenceClassification(BertConfig(
        vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
        max_position_embeddings=MAX_BYTES, pad_token_id=0, num_labels=len(CATEGORIES)))


class ByteWindows(Dataset):
    """Causal-LM rows of a byte corpus: row i is ``{"input_ids": w, "labels": w}`` for the i-th
    window ``w`` of ``SEQ_LEN + 1`` bytes (int64), so the model predicts ``SEQ_LEN`` bytes per row."""

    def __init__(self, windows):
        self.windows = windows                      # swap.data.text.TextChars: (x, x shifted by one)

    def __len__(self):
        return len(self.windows)

    def __getitem__(self, i):
        x, y = self.windows[i]
        w = torch.cat([x, y[-1:]])
        return {"input_ids": w, "labels": w}


def byte_windows(data_dir=None):
    """(train, test) causal-LM rows of the fortunes: the first 90% of the corpus and its tail."""
    train, test = load_text_char(find_data_dir("text-char", data_dir), SEQ_LEN)
    return ByteWindows(train), ByteWindows(test)


class Categories(Dataset):
    """Classification rows: ``{"input_ids": int64 (MAX_BYTES,), "attention_mask": int64
    (MAX_BYTES,), "labels": int64 ()}``, a fortune's first bytes padded with 0 and its category."""

    def __init__(self, texts, labels):
        self.texts, self.labels = texts, labels

    def __len__(self):
        return len(self.texts)

    def __getitem__(self, i):
        ids = torch.zeros(MAX_BYTES, dtype=torch.int64)
        text = torch.frombuffer(bytearray(self.texts[i][:MAX_BYTES]), dtype=torch.uint8)
        ids[:len(text)] = text
        return {"input_ids": ids, "attention_mask": (torch.arange(MAX_BYTES) < len(text)).long(),
                "labels": torch.tensor(self.labels[i])}


def categories(data_dir=None):
    """(train, test) of the fortunes of :data:`CATEGORIES`: every tenth fortune of each file is a
    test fortune; the training fortunes are shuffled once (seed 0)."""
    texts, labels, _ = read_fortune_categories(find_data_dir("text-char", data_dir), CATEGORIES)
    test = [i for i in range(len(texts)) if i % 10 == 9]
    train = [i for i in torch.randperm(len(texts), generator=torch.Generator().manual_seed(0)).tolist()
             if i % 10 != 9]
    return (Categories([texts[i] for i in train], [labels[i] for i in train]),
            Categories([texts[i] for i in test], [labels[i] for i in test]))
