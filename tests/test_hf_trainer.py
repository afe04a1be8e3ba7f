"""SWAP in the Hugging Face Trainer (swap.hf.SWAPTrainer): two ranks on CPU (gloo) on Debian's fortunes,
in a ``torchrun`` and an ``accelerate launch`` shared by the tests (tests/hf_ranks.py; the example
script's SWAP run is the last training of the second); misuse refused in this process; the example
without SWAP in this process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import TrainingArguments

from examples.hf_fortunes import gpt2
from swap.errors import SwapError
from swap.hf import SWAPArguments, SWAPTrainer

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


# the example script's arguments in the tests: phase 1 two epochs of 8 updates at 2 x 64, phase 2 one
# worker epoch of 16 updates at 64
SMALL = ["--epochs", "3", "--switch-epoch", "2", "--train-subset", "1024", "--eval-subset", "256"]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, real_fortunes):
    """What rank 0 of tests/hf_ranks.py wrote: GPT-2 trained with SWAPTrainer on 2 ranks on CPU (gloo),
    part ``runs`` started by ``torchrun --nproc-per-node 2``, part ``options`` (the example's SWAP run
    among them) by ``accelerate launch --multi_gpu --num_processes 2``."""
    out = tmp_path_factory.mktemp("hf_trainer")
    script = str(ROOT / "tests" / "hf_ranks.py")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    accelerate = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    results = {"out": out}
    for launch, part in ((torchrun, "runs"), (accelerate, "options")):
        done = subprocess.run([*launch, script, str(out), part, *SMALL], cwd=ROOT, env=ENV, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "terminate called" not in done.stderr
        results.update(torch.load(out / f"{part}.pt", weights_only=False))
    results["printed"] = json.loads(done.stdout.strip().splitlines()[-1])    # rank 0's line, as users see it
    return results


def test_the_average_is_evaluated_saved_and_not_worse_than_its_workers(ranks):
    """Phase 3 evaluates both workers and their average with the Trainer; the average's held-out loss
    is below the workers' mean (and below each); the saved model, reloaded with from_pretrained and
    scored by a loop of our own, is that average."""
    full = ranks["full"]
    workers, average = [w["loss"] for w in full["metrics"]["workers"]], full["metrics"]["average"]["loss"]
    assert full["phase"] == 3 and len(workers) == 2
    assert average < sum(workers) / 2 and average < min(workers), (workers, average)
    assert average < 3.0                      # nats per byte after 80 updates; a uniform guess is 5.5
    assert abs(full["reloaded_loss"] - average) < 1e-5


def test_phase_2_sends_no_gradient_all_reduce_and_its_workers_differ(ranks):
    """A DDP communication hook sees every phase-1 update's gradients and none of phase 2's; the two
    workers' weights in the last phase-2 checkpoint differ; phase 3's checkpoint holds the average only."""
    full = ranks["full"]
    assert full["counts"] == {1: 16, 2: 0, 3: 0}           # one bucket per update of phase 1 (0.13 M parameters)
    w0, w1 = full["workers_at_72"]
    assert set(w0) == set(w1) and any(not torch.equal(w0[k], w1[k]) for k in w0)
    assert "swap_worker0.safetensors" not in full["files_80"] and "model.safetensors" in full["files_80"]
    state = json.loads((ranks["out"] / "full" / "checkpoint-80" / "swap.json").read_text())
    assert state["phase"] == 3 and state["start_step"] == 16 and state["world_size"] == 2
    files = {p.name for p in (ranks["out"] / "full" / "checkpoint-72").iterdir()}
    assert {"swap_worker0.safetensors", "swap_worker1.safetensors", "swap_worker0.pt", "swap_worker1.pt",
            "swap.json", "trainer_state.json"} <= files


@pytest.mark.parametrize("name", ["resumed_mid", "resumed_edge"])
def test_a_run_resumed_in_phase_2_ends_with_the_uninterrupted_weights_bit_for_bit(ranks, name):
    """New trainers resumed from the uninterrupted run's checkpoints of updates 72 (mid phase-2 epoch: the
    last file a run killed after it leaves) and 48 (an epoch's end, before that epoch's evaluation)."""
    full, resumed = ranks["full"]["weights"], ranks[name]["weights"]
    assert ranks[name]["phase"] == 3 and set(full) == set(resumed)
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_the_step_and_the_epoch_go_on_across_phases_and_each_worker_is_logged(ranks):
    log = ranks["full"]["log"]
    assert ranks["full"]["steps"] == 16 + 2 * 32
    steps = [e["step"] for e in log if "loss" in e]
    assert steps == sorted(steps) and steps[-1] == 80 and len(set(steps)) == len(steps)
    assert max(e["epoch"] for e in log) == 3.0
    assert [e["step"] for e in log if "eval_worker1_loss" in e] == [48, 80]
    assert [e["step"] for e in log if "eval_average_loss" in e] == [80]


def test_the_switch_at_a_stopping_loss_with_each_worker_its_own_ema(ranks):
    """switch_metric eval_loss <= 4.5: the first evaluation (update 8) reaches it; phase 2 is one worker
    epoch at phase2_batch_size 64 (16 updates), each an EMA sample; phase 3 averages the workers' EMAs."""
    run = ranks["metric_ema"]
    first = next(e["step"] for e in run["log"] if e.get("eval_loss", 9.0) <= 4.5)
    assert run["start_step"] == first == 8
    assert run["samples"] == 16 and run["steps"] == 8 + 16
    workers = [w["loss"] for w in run["metrics"]["workers"]]
    assert run["metrics"]["average"]["loss"] <= sum(workers) / 2


def test_a_switch_at_an_update_with_lawa_workers_and_bn_statistics_recomputed(ranks):
    """switch_step 5, two phase-2 epochs of 16 updates, each worker its LAWA of its two epoch-end weights:
    the averaged parameters are the mean over workers and epochs of those weights (taken independently
    by a callback); the BN layer's running statistics are the exact mean and unbiased variance of its
    inputs over every training sample under the averaged weights."""
    run = ranks["step_lawa_bn"]
    assert run["start_step"] == 5 and run["steps"] == 5 + 2 * 16 and run["phase"] == 3
    ends = run["ends"]
    assert [len(e) for e in ends] == [2, 2]
    final = run["weights"]
    for name in ("fc1.weight", "fc1.bias", "bn.weight", "bn.bias", "fc2.weight", "fc2.bias"):
        expected = torch.stack([e[name] for worker in ends for e in worker]).mean(0)
        assert torch.allclose(final[name], expected, atol=1e-6), name
    assert not torch.equal(ends[0][1]["fc1.weight"], ends[1][1]["fc1.weight"])
    inputs = (run["x"].double() @ final["fc1.weight"].double().T + final["fc1.bias"].double())
    assert torch.allclose(final["bn.running_mean"].double(), inputs.mean(0), atol=1e-5)
    assert torch.allclose(final["bn.running_var"].double(), inputs.var(0), rtol=1e-5)


# ---- misuse: refused before any update, one line ---------------------------------------------------------
def _trainer(tmp_path, swap_args, **args):
    rows = [{"input_ids": w, "labels": w} for w in torch.randint(0, 256, (64, 65), generator=torch.Generator().manual_seed(0))]
    return SWAPTrainer(model=gpt2(), args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none",
                                                            **args),
                       train_dataset=rows, eval_dataset=rows, swap_args=swap_args)


@pytest.mark.parametrize("args, extra, message", [
    ({"num_train_epochs": 3}, {}, "SWAPTrainer needs at least 2 processes (one phase-2 worker each)"),
    ({"num_train_epochs": 2, "switch_epoch": 2}, {}, "SWAPTrainer: switch_epoch 2 leaves no phase 2"),
    ({"max_steps": 10}, {}, "SWAPTrainer counts the run in epochs"),
    ({"num_train_epochs": 3, "load_best_model_at_end": True, "eval_strategy": "epoch", "save_strategy": "epoch"}, {},
     "SWAPTrainer: load_best_model_at_end would replace the averaged model"),
    ({"num_train_epochs": 3}, {"is_deepspeed_enabled": True}, "SWAPTrainer does not support DeepSpeed"),
    ({"num_train_epochs": 3}, {"is_fsdp_enabled": True}, "SWAPTrainer does not support FSDP"),
    ({"num_train_epochs": 3}, {"swap_phase": 3}, "SWAPTrainer: this trainer has trained (it is in phase 3"),
])
def test_misuse_is_refused_before_any_update_in_one_line(tmp_path, args, extra, message):
    swap_args = SWAPArguments(phase2_lr=1e-3, switch_epoch=args.pop("switch_epoch", 1))
    trainer = _trainer(tmp_path, swap_args, **args)
    for name, value in extra.items():
        setattr(trainer, name, value)
    with pytest.raises(SwapError) as err:
        trainer.train()
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    assert trainer.state.global_step == 0 and not any(tmp_path.iterdir())


@pytest.mark.parametrize("kwargs, message", [
    ({"phase2_lr": 1e-3}, "SWAPArguments: give exactly one switch"),
    ({"phase2_lr": 1e-3, "switch_epoch": 1, "switch_step": 5}, "SWAPArguments: give exactly one switch"),
    ({"phase2_lr": 1e-3, "switch_step": 5}, "SWAPArguments: a switch at a step or a metric needs phase2_epochs"),
    ({"phase2_lr": 1e-3, "switch_epoch": 0}, "SWAPArguments: switch_epoch must be an integer >= 1"),
    ({"phase2_lr": 1e-3, "switch_epoch": 1, "phase2_epochs": 0}, "SWAPArguments: phase2_epochs must be an integer >= 1"),
    ({"phase2_lr": 0.0, "switch_epoch": 1}, "SWAPArguments: phase2_lr must be a number > 0"),
    ({"phase2_lr": 1e-3, "switch_metric": "eval_loss"}, "SWAPArguments: switch_metric 'eval_loss' needs a number"),
    ({"phase2_lr": 1e-3, "switch_epoch": 1, "average_along": "swa"}, "SWAPArguments: average_along must be one of"),
])
def test_bad_swap_arguments_are_named_in_one_line(kwargs, message):
    with pytest.raises(SwapError) as err:
        SWAPArguments(**kwargs)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_a_missing_accelerate_is_named_in_one_line():
    code = ("import sys; sys.modules['accelerate'] = None\n"
            "try:\n    import swap.hf\nexcept ModuleNotFoundError as e:\n    print(e)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "swap.hf needs accelerate; pip install 'swap[hf]'", done.stderr[-2000:]


# ---- the example, as users launch it -----------------------------------------------------------------------
def test_the_example_with_swap_under_accelerate_launch(ranks):
    """The example's SWAP run (its ``main``) in the ``accelerate launch`` of the fixture: 2 x 8 phase-1 updates, 16 of
    phase 2; the averaged model's held-out loss is below its workers' mean; rank 0 printed the result."""
    result = ranks["example"]
    assert ranks["printed"] == result
    assert result["method"] == "swap" and result["steps"] == 2 * 8 + 16
    assert result["phase1"]["steps"] == 16
    assert result["eval_loss"] < sum(result["workers_eval_loss"]) / 2 and result["eval_loss"] < 4.0


def test_the_example_with_the_trainer_alone(tmp_path, real_fortunes, capsys):
    """The same script without ``--swap``, in one process: the Trainer's own run of 3 epochs."""
    from examples.hf_trainer_fortunes import main

    result = main([str(tmp_path), *SMALL, "--batch", "128"])
    assert result["method"] == "trainer" and result["steps"] == 3 * 8 and result["eval_loss"] < 4.5
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
