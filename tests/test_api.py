"""Library use: SWAP on a user's own nn.Module factory and tensors, in-process."""
from __future__ import annotations

import torch
from torch import nn

import swap

from user_parts import quadrant_data


def tiny_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 4))


_quadrant_data = quadrant_data          # the learnable toy images of tests/user_parts.py


def test_train_swap_with_custom_model(tmp_path):
    config = {"workers": 3, "eval_every": 100,
              "data": {"crop_padding": 0, "flip": False, "cutout": 0},
              "phase1": {"batch_size": 128, "micro_batch_size": 64, "peak_lr": 0.4, "warmup_epochs": 1,
                         "max_epochs": 6, "stop_acc": 99.0},
              "phase2": {"batch_size": 32, "peak_lr": 0.05, "epochs": 2}}
    model, summary = swap.train_swap(tiny_net, _quadrant_data(1024, 0), _quadrant_data(512, 1), config,
                                     out=tmp_path / "run")
    assert isinstance(model, nn.Sequential) and isinstance(model[0], nn.Conv2d)
    assert len(summary["test_acc"]["workers"]) == 3
    assert summary["test_acc"]["averaged"] > 90.0                     # chance is 25%
    # the returned model is the uniform average of the three workers' parameters
    workers = []
    for w in range(3):
        m = tiny_net()
        swap.checkpoint.load_checkpoint(tmp_path / "run" / "checkpoints" / f"worker{w}", m)
        workers.append(m)
    expected = swap.average_models(workers)
    for (name, p), q in zip(model.named_parameters(), expected.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)
    # and its own evaluation reproduces the reported accuracy
    x_test, y_test = _quadrant_data(512, 1)
    train_x, _ = _quadrant_data(1024, 0)
    mean, std = train_x.float().mean(dim=(0, 2, 3)), train_x.float().std(dim=(0, 2, 3))
    acc = swap.evaluate(model, swap.ImageDataset(x_test, y_test, 4), mean, std)
    assert abs(acc - summary["test_acc"]["averaged"]) < 1e-9


def test_batches_impossible_for_the_processes_or_the_data_are_refused_before_any_work(tmp_path):
    import pytest
    config = {"data": {"crop_padding": 0, "flip": False, "cutout": 0}, "phase1": {"batch_size": 100}}
    with pytest.raises(swap.SwapError, match="phase1.batch_size=100 is not divisible by the number of processes"):
        swap.train_swap(tiny_net, _quadrant_data(1024, 0), _quadrant_data(64, 1), config, out=tmp_path / "a", procs=3)
    with pytest.raises(swap.SwapError, match="phase2.batch_size=512 exceeds the 256 training samples"):
        swap.train_swap(tiny_net, _quadrant_data(256, 0), _quadrant_data(64, 1),     # set by the user: refused
                        {**config, "phase1": {"batch_size": 128}, "phase2": {"batch_size": 512}}, out=tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_library_run_takes_its_validation_split_from_the_tail_of_the_training_data(tmp_path):
    """With choices made on a validation split (the trials switch, the greedy soup), a user's own
    training tensors lose their last ``data.holdout`` samples to it: phase 1 trains on the rest,
    and the switch and the soup read validation accuracies, not test accuracies."""
    config = {"workers": 2, "eval_every": 100,
              "data": {"crop_padding": 0, "flip": False, "cutout": 0, "holdout": 256},
              "phase1": {"batch_size": 128, "micro_batch_size": 64, "peak_lr": 0.4, "warmup_epochs": 1,
                         "max_epochs": 6, "stop": {"metric": "auto", "signal": "trials", "every": 1, "window": 1,
                                                   "trial_updates": 4}},
              "phase2": {"batch_size": 32, "peak_lr": 0.05, "epochs": 1},
              "phase3": {"aggregate": "greedy"}}
    _, summary = swap.train_swap(tiny_net, _quadrant_data(1024, 0), _quadrant_data(512, 1), config, out=tmp_path / "run")
    switch = summary["switch"]
    sequential = 2 if summary["machine"]["procs"] == 1 else 1          # one rank trains both copies
    assert switch["rule"] == "trials" and switch["trials"] >= 1
    assert switch["trial_updates"] == 4 * sequential * switch["trials"] == summary["updates"]["switch_trials"]
    assert summary["updates"]["phase1"] == summary["epochs"]["phase1"] * (1024 - 256) // 128
    assert summary["updates"]["phase2_per_worker"] == (1024 - 256) // 32
    assert set(summary["soup"]["val_acc"]) == {"w0", "w1"} and summary["soup"]["kept"]


def test_a_library_run_resumes_bit_for_bit_from_what_a_kill_in_phase2_leaves(tmp_path):
    """``train_swap(..., resume=True)`` continues the run in ``out``: from the state on disk that
    SIGKILL in worker 1's second epoch leaves (worker 0 finished, worker 1 at its epoch-1
    checkpoint, no average), only worker 1's second epoch is trained again, and the averaged model
    equals the uninterrupted run's bit for bit; ``resume="auto"`` starts a run where there is none."""
    import json

    from safetensors.torch import load_file
    config = {"workers": 2, "eval_every": 100, "data": {"crop_padding": 0, "flip": False, "cutout": 0},
              "phase1": {"batch_size": 128, "micro_batch_size": 64, "peak_lr": 0.4, "warmup_epochs": 1,
                         "max_epochs": 2, "stop_acc": 99.0},
              "phase2": {"batch_size": 32, "peak_lr": 0.05, "epochs": 2, "layout": "sequential"}}
    data = _quadrant_data(512, 0), _quadrant_data(256, 1)
    run = tmp_path / "run"
    _, ref = swap.train_swap(tiny_net, *data, config, out=run)
    averaged = load_file(str(run / "checkpoints" / "swap.safetensors"))
    kept = (run / "checkpoints" / "worker0.safetensors").stat().st_mtime_ns
    for f in [*(run / "checkpoints").glob("worker1.*"), *(run / "checkpoints").glob("swap.*"), run / "summary.json"]:
        f.unlink()
    model, again = swap.train_swap(tiny_net, *data, config, out=run, resume=True)
    got = load_file(str(run / "checkpoints" / "swap.safetensors"))
    assert all(torch.equal(averaged[k], got[k]) for k in averaged)
    assert all(torch.equal(v, got[k]) for k, v in model.state_dict().items() if k in got)
    assert again["updates"] == ref["updates"] and again["test_acc"] == ref["test_acc"]
    assert (run / "checkpoints" / "worker0.safetensors").stat().st_mtime_ns == kept      # not trained again
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    keys = [(r["phase"], r["worker"], r["epoch"]) for r in records if r["phase"] in ("phase1", "phase2")]
    assert len(keys) == len(set(keys)) == 2 + 2 * 2
    _, fresh = swap.train_swap(tiny_net, *data, config, out=tmp_path / "fresh", resume="auto")
    assert fresh["test_acc"] == ref["test_acc"]
