"""Issue #25, items 1 and 2: the output contract (tensor, tuple, or a mapping with loss and/or logits
as a transformers ModelOutput is) and the data contract's single-mapping samples and batches (Hugging
Face rows and collator batches), without transformers installed: the models below return what a
transformers model returns."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import swap
from swap.config import SwapError
from swap.task import Task, class_targets, own_loss, prediction
from swap.train import _pass

from conftest import error_line
from user_parts import Classifier, Output, Rows


SMALL = {"workers": 2, "eval_every": 100, "data": {"crop_padding": 0, "flip": False, "cutout": 0},
         "phase1": {"batch_size": 128, "micro_batch_size": 64, "peak_lr": 0.4, "warmup_epochs": 1,
                    "max_epochs": 3, "stop": {"metric": "train_loss", "at": 10.2}},
         "phase2": {"batch_size": 32, "peak_lr": 0.05, "epochs": 1, "layout": "sequential"},
         "sgd": {"batch_size": 64, "micro_batch_size": 32, "peak_lr": 0.2, "epochs": 3}}


def test_a_model_output_with_its_own_loss_and_rows_as_mappings_train_without_a_wrapper(tmp_path):
    """Mapping rows collated by torch's default into a mapping batch; the model is called with
    ``model(**batch)`` and trained on the loss it returns (10 + cross-entropy: the records show it);
    top-1 comes from its logits against the batch's labels."""
    model, summary = swap.train_swap(Classifier, Rows(1024, 0), Rows(512, 1), SMALL, out=tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in records if r["phase"] in ("phase1", "phase2")]
    assert all(r["train_loss"] >= 10.0 for r in trained)                      # the model's own loss
    assert summary["test_acc"]["averaged"] > 90.0 and trained[-1]["train_acc"] > 90.0   # chance is 25%
    assert summary["test_metrics"]["averaged"]["loss"] == pytest.approx(10.0, abs=0.3)


def test_tuple_outputs_and_loss_only_outputs():
    logits = torch.randn(4, 3)
    target = torch.tensor([0, 2, 1, 1])
    assert prediction((logits, torch.zeros(1))) is logits and own_loss((logits,)) is None
    out = Output(loss=torch.tensor(1.5))
    assert prediction(out) is None and own_loss(out) == 1.5 and not class_targets(out, target)
    task = Task()
    assert task.loss(out, None) == 1.5                                    # no targets: its own loss
    metrics = task.batch_metrics(out, None, task.loss(out, None), samples=4)
    assert metrics["top1"][1] == 0 and metrics["loss"][1] == 4            # no accuracy, the loss over 4 samples
    with pytest.raises(SwapError, match="neither a loss nor logits"):
        task.loss(Output(hidden=torch.zeros(2)), target)
    with pytest.raises(SwapError, match="the batch has no targets"):
        task.loss(logits, None)


class TokenLM(nn.Module):
    """A bigram model without BN: per-token logits (B, T, V)."""

    def __init__(self, vocab: int = 11):
        super().__init__()
        self.emb = nn.Embedding(vocab, vocab)

    def forward(self, x):
        return self.emb(x)


def test_micro_batches_weight_a_mean_over_counted_tokens_by_their_count():
    """Targets of -100 do not count (torch's ignore index, Hugging Face's masks): two micro-batches
    with 12 and 2 counted tokens accumulate the gradient of the whole batch's mean over its 14 (weighting
    by samples would give the 2 tokens the weight of 12)."""
    torch.manual_seed(0)
    x = torch.randint(0, 11, (4, 6))
    y = torch.randint(0, 11, (4, 6))
    y[2:, 1:] = -100                                                      # micro-batch 2: 2 counted tokens
    whole, parts = TokenLM(), TokenLM()
    parts.load_state_dict(whole.state_dict())
    totals_whole = _pass(whole, x, y, 0, sync=True)
    totals_parts = _pass(parts, x, y, 2, sync=True)
    torch.testing.assert_close(parts.emb.weight.grad, whole.emb.weight.grad, rtol=1e-5, atol=1e-7)
    assert totals_parts[2] == totals_whole[2] == 14
    assert totals_parts[0] == pytest.approx(totals_whole[0].item(), rel=1e-6)     # the same loss sum


LOGGED = ["--logger", "tensorboard", "--logger", "mlflow", "--set", "logging.log_every=8"]
CLI = ["--config", "fashion_mnist_quick", "--workers", "2", "--procs", "1",
       "--set", "model.name=user_parts:Classifier", "--set", "data.name=user_parts:load",
       "--set", "task.metrics=[top1, loss, user_parts:errors]", "--set", "phase1.batch_size=128",
       "--set", "phase1.micro_batch_size=64", "--set", "phase1.max_epochs=2", "--set", "phase1.warmup_epochs=1",
       "--set", "phase1.stop.metric=train_loss", "--set", "phase1.stop.at=0", "--set", "phase2.epochs=4",
       "--set", "phase2.batch_size=32", "--set", "phase2.layout=sequential", "--set", "phase3.bn_batch_size=128"]


def test_a_model_and_data_of_your_own_in_the_cli_resume_compare_and_landscape(tmp_path):
    """`swap train` with model.name, data.name and a metric given as import paths: the run trains the
    user's model on the user's rows with the model's own loss, reports the user's metric, and a run
    killed with SIGKILL in phase 2 ends, after --auto-resume, with the uninterrupted run's weights;
    `swap compare` trains the same weights, and `swap landscape` evaluates a point on the user's data."""
    from safetensors.torch import load_file

    from swap.cli import main
    from test_resume import _kill_when
    data = ["--data-dir", str(tmp_path)]                  # user_parts:load takes data.dir (and ignores it)
    here = data + LOGGED                                   # and both loggers, records every 8 updates (issue #27)
    assert main(["train", *CLI, *here, "--out", str(tmp_path / "ref")]) == 0
    summary = json.loads((tmp_path / "ref" / "summary.json").read_text())
    averaged = summary["test_metrics"]["averaged"]
    assert averaged["top1"] > 90.0 and averaged["errors"] == pytest.approx(1 - averaged["top1"] / 100, abs=1e-6)
    assert averaged["loss"] >= 10.0                                       # the model's own loss
    out = tmp_path / "run"
    _kill_when(out, "checkpoints/worker0_last.json", tmp_path, 0.1, CLI + LOGGED)
    assert not (out / "summary.json").exists()
    assert main(["train", *CLI, *here, "--out", str(out), "--auto-resume"]) == 0
    ref, got = (load_file(str(d / "checkpoints" / "swap.safetensors")) for d in (tmp_path / "ref", out))
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    # the resumed run continued its TensorBoard and MLflow runs: every step once, as the uninterrupted run's
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from test_tracking import logged_mlflow, logged_tensorboard
    layout = EventAccumulator(str(out / "tensorboard" / "run"))
    layout.Reload()                                          # the workers side by side: custom-scalar charts
    assert "custom_scalars__config__" in layout.Tags()["tensors"]
    for logged in (logged_mlflow, logged_tensorboard):
        a, b = logged(tmp_path / "ref"), logged(out)
        assert a.keys() == b.keys() and "phase2/worker1/step/train_loss" in a and "average/test_loss" in a
        for tag in a:
            steps = [step for step, _ in b[tag]]
            assert steps == sorted(set(steps)), (logged.__name__, tag, steps)        # no step twice
            if not tag.endswith(("wall_s", "samples_per_s", "tokens_per_s")) and not tag.startswith("summary/wall_s"):
                assert b[tag] == a[tag], (logged.__name__, tag)
    # the README's command opens the resumed run's store: MLflow's UI server, read with MLflow's client
    from test_tracking import mlflow_ui
    with mlflow_ui("sqlite:///run/mlflow.db", cwd=tmp_path) as url:
        assert logged_mlflow(out, url) == logged_mlflow(out)
        from mlflow.tracking import MlflowClient
        client = MlflowClient(tracking_uri=url)
        artifacts = {a.path for a in client.list_artifacts((out / "mlflow_run_id").read_text())}
        assert {"summary.json", "config.yaml", "figures"} <= artifacts       # kept in the run directory
        assert (out / "mlflow-artifacts").is_dir()
    # swap compare runs the same model and data: its SWAP run of seed 0 is this run, bit for bit
    compare_args = [a for a in CLI if a not in ("--workers", "2")] + ["--set", "workers=2"]
    assert main(["compare", *compare_args, *data, "--methods", "swap", "--seeds", "1",
                 "--out", str(tmp_path / "compare")]) == 0
    compared = load_file(str(tmp_path / "compare" / "swap" / "seed0" / "checkpoints" / "swap.safetensors"))
    assert all(torch.equal(ref[k], compared[k]) for k in ref)
    # swap landscape's evaluation of a point, on the user's data: at the averaged model, with BN
    # statistics recomputed over the whole training set as phase 3 did, the run's own test error
    from swap.analysis.landscape import flat_params, generic_point
    from swap.checkpoint import load_checkpoint
    from swap.context import Context
    ctx = Context.from_run_dir(tmp_path / "ref")
    model = ctx.build_model()
    load_checkpoint(ctx.run.checkpoint("swap"), model)
    train_err, test_err = generic_point(ctx, model, 0)(flat_params(model))
    assert test_err == pytest.approx(100 - averaged["top1"], abs=1e-9) and 0 <= train_err < 10


@pytest.mark.parametrize("key, value, message", [
    ("model.name", "user_parts:nothing", "model.name=user_parts:nothing: cannot import it (AttributeError"),
    ("data.name", "no_such_module:load", "data.name=no_such_module:load: cannot import it (ModuleNotFoundError"),
    ("data.name", "user_parts:errors", "data.name=user_parts:errors failed: TypeError"),
    ("task.loss", "user_parts:Rows", "the loss failed on a batch of the dataset: RuntimeError"),
])
def test_an_import_path_that_fails_is_one_line_and_exit_2(tmp_path, capsys, key, value, message):
    from swap.cli import main
    args = [a if not a.startswith(f"{key}=") else f"{key}={value}" for a in CLI]
    if f"{key}={value}" not in args:
        args += ["--set", f"{key}={value}"]
    assert main(["train", *args, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("swap: this config runs code: ") and f"{key}={value}" in err.splitlines()[0], err
    err = error_line(err)
    assert any(m in err for m in message.split("|")), err
    assert not (tmp_path / "run").exists()


def test_swap_plan_calibrates_a_model_and_data_of_your_own_on_their_batches(tmp_path, capsys):
    """`swap plan` with model.name and data.name import paths: calibrated on the dataset's own rows,
    its updates those of the config (1024 rows: phase 1 2 epochs of batch 128, phase 2 4 of 32)."""
    from swap.cli import main
    plan_args = [a for a in CLI if a not in ("--workers", "--procs", "2", "1")] + ["--set", "workers=2"]
    assert main(["plan", *plan_args, "--data-dir", str(tmp_path), "--calibration-samples", "128"]) == 0
    rows = {line.split("|")[1].strip(): line.split("|") for line in capsys.readouterr().out.splitlines()
            if line.startswith("| swap") or line.startswith("| sgd")}
    assert int(rows["swap"][4]) == 2 * 1024 // 128 + 4 * 1024 // 32


def test_a_language_models_records_rate_samples_and_tokens_and_the_plan_takes_samples(monkeypatch):
    """The train loop's epoch record of a causal LM: samples_per_s counts rows and tokens_per_s the
    counted predictions (8 next-token targets per row of 9); a classifier's record has no
    tokens_per_s. The plan's rates are the loop's samples per second."""
    import swap.plan as plan
    from swap.data.generic import DatasetLoader
    from swap.train import SGDStep, train
    from test_hf import _Causal

    class Seqs(torch.utils.data.Dataset):
        def __len__(self):
            return 64

        def __getitem__(self, i):
            ids = torch.arange(9) % 7
            return {"input_ids": ids, "labels": ids}

    model = _Causal(shift=True)
    step = SGDStep(model, torch.optim.SGD(model.parameters(), lr=0.1), 0, None, Task())
    record = train(step, DatasetLoader(Seqs(), 16, (0, "lm", 0)), lambda s: 0.1, epochs=1)
    assert record["tokens_per_s"] == pytest.approx(8 * record["samples_per_s"], rel=1e-9)
    classifier = torch.nn.Linear(6, 3)
    rows = torch.utils.data.TensorDataset(torch.randn(32, 6), torch.randint(0, 3, (32,)))
    step = SGDStep(classifier, torch.optim.SGD(classifier.parameters(), lr=0.1), 0, None, Task())
    assert "tokens_per_s" not in train(step, DatasetLoader(rows, 8, (0, "c", 0)), lambda s: 0.1, epochs=1)
    monkeypatch.setattr(plan, "_warm_rate", lambda step, loader: 1000.0)      # samples/s, as the loop reports
    thr = plan.calibrate_dataset(lambda: _Causal(shift=True), Seqs(), Task(), None, [16],
                                 plan.Measure(torch.device("cpu"), samples=32, eval_batch=16))
    assert thr.train == {16: 1000.0}
