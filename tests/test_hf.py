"""Hugging Face ``transformers`` models as they are, through the CLI (``model.name:
examples.hf_fortunes:gpt2``): a GPT-2 language model and a BERT classifier on Debian's fortunes, each
trained with SWAP on its own loss, written to ``RUN/pretrained/`` and checked by an evaluation of our
own over the reloaded ``from_pretrained`` model. (The library path of both models is the README's
examples, run by tests/test_readme.py.) And the causal-LM alignment of top-1 on a model of our own."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import transformers                     # swap[hf]: make test installs every extra
from torch import nn

from swap.task import Task

ROOT = Path(__file__).resolve().parent.parent
SHORT = ["procs=1", "phase2.layout=sequential", "phase1.max_epochs=1", "phase2.epochs=1", "data.test_subset=256"]


def _train(out: Path, config: str, *overrides: str) -> dict:
    """``swap train --config CONFIG`` from the repository root (the examples are imported from it)."""
    from swap.cli import main

    here = os.getcwd()
    os.chdir(ROOT)
    try:
        args = ["train", "--config", config, "--out", str(out)]
        assert main(args + [a for kv in (*SHORT, *overrides) for a in ("--set", kv)]) == 0
    finally:
        os.chdir(here)
    return json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="session")
def hf_runs(tmp_path_factory, real_fortunes):
    base = tmp_path_factory.mktemp("hf")
    return {"gpt2": (base / "gpt2", _train(base / "gpt2", "hf_gpt2_fortunes", "data.train_subset=1024")),
            "bert": (base / "bert", _train(base / "bert", "hf_bert_fortunes", "data.train_subset=1024"))}


def _own_evaluation(model, rows, shift: bool) -> tuple[float, float]:
    """(the model's own loss per counted target, top-1 %) over ``rows``, by a loop of our own:
    a causal LM scored at t against the label at t + 1 when ``shift``."""
    from transformers import default_data_collator

    loss_sum = correct = count = 0.0
    with torch.no_grad():
        for batch in torch.utils.data.DataLoader(rows, 100, collate_fn=default_data_collator):
            out = model(**batch)
            logits, labels = out.logits, batch["labels"]
            if shift:
                logits, labels = logits[:, :-1], labels[:, 1:]
            n = labels.numel()
            loss_sum += out.loss.double().item() * n
            correct += (logits.argmax(-1) == labels).sum().item()
            count += n
    return loss_sum / count, 100.0 * correct / count


def _test_rows(name: str):
    """The run's test rows: the examples' test set, cut as the run cut it (data.test_subset)."""
    from examples import hf_fortunes
    from swap.data.generic import subset

    return subset((hf_fortunes.byte_windows if name == "gpt2" else hf_fortunes.categories)()[1], 256)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_a_hugging_face_model_from_the_cli_reloads_with_from_pretrained(hf_runs, name, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    run, summary = hf_runs[name]
    cls = transformers.GPT2LMHeadModel if name == "gpt2" else transformers.BertForSequenceClassification
    model = cls.from_pretrained(run / "pretrained").eval()
    if name == "gpt2":                                   # tied input and output embeddings stay tied
        assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    averaged = summary["test_metrics"]["averaged"]
    loss, top1 = _own_evaluation(model, _test_rows(name), shift=name == "gpt2")
    assert loss == pytest.approx(averaged["loss"], rel=1e-5)           # the model's own loss, per byte or fortune
    assert top1 == pytest.approx(averaged["top1"], abs=1e-9)           # GPT-2: next-byte accuracy, shifted
    if name == "gpt2":
        assert averaged["loss"] < 3.7                                  # nats per byte; uniform is 5.55
    else:
        assert averaged["top1"] > 31.0                                 # the largest of 5 categories is 26%
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["train_loss"] > 0 and r.get("train_acc") is not None for r in records if "train_loss" in r)


class _Causal(nn.Module):
    """A tiny causal LM returning what a transformers model returns: its own loss, computed with
    the labels shifted (``shift=True``) or as given, and the logits."""

    def __init__(self, shift: bool):
        super().__init__()
        self.shift = shift
        self.emb = nn.Embedding(7, 7)

    def forward(self, input_ids, labels):
        logits = self.emb(input_ids)
        a, b = (logits[:, :-1], labels[:, 1:]) if self.shift else (logits, labels)
        return {"loss": nn.functional.cross_entropy(a.flatten(0, 1), b.flatten()), "logits": logits}


@pytest.mark.parametrize("shift", [True, False])
def test_top1_follows_the_alignment_of_the_models_own_loss(shift):
    torch.manual_seed(0)
    model = _Causal(shift)
    ids = torch.randint(0, 7, (4, 9))
    ids[0, 3] = -100
    task = Task(metrics=("top1", "loss"))
    out = model(ids.clamp(min=0), ids)
    metrics = task.batch_metrics(out, ids, task.loss(out, ids))
    logits, labels = (out["logits"][:, :-1], ids[:, 1:]) if shift else (out["logits"], ids)
    counted = labels != -100
    assert metrics["top1"][1].item() == counted.sum().item()                      # the counted targets
    assert metrics["top1"][0].item() == pytest.approx(100.0 * ((logits.argmax(-1) == labels) & counted).sum().item())
    assert task.shift == {"next_token": shift}
    # found once: a later output without its own loss is aligned the same way
    again = task.align({"logits": out["logits"]}, ids)
    assert again[1].shape[-1] == (8 if shift else 9)


def test_a_missing_extra_is_named_in_one_line(tmp_path, monkeypatch):
    from swap.config import SwapError
    from swap.imports import import_object

    (tmp_path / "needs_hf.py").write_text("import transformers_missing_here\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(__import__("swap.imports").imports.EXTRAS, "transformers_missing_here", "hf")
    with pytest.raises(SwapError) as err:
        import_object("needs_hf:gpt2", "model.name")
    assert str(err.value) == ("model.name=needs_hf:gpt2: cannot import it (ModuleNotFoundError: No module named "
                              "'transformers_missing_here'); pip install 'swap[hf]'")
