"""The resumable unit (swap.resumable) and the one train loop with its pluggable update step."""
from __future__ import annotations


import pytest
import torch
from torch import nn

from swap.averaging import average_state_dicts, bn_buffer_names, distributed_average_
from swap.checkpoint import read_meta
from swap.config import SwapError
from swap.data import ImageDataset, Loader
from swap.models import build_model
from swap.resumable import Resumable, Saving, Unit
from swap.rundir import RunDir
from swap.callbacks import On
from swap.train import Position, SGDStep, train


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))


def _phase(tmp_path, model, every=2, epochs=5, name="phase1", units=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    units = units or [Unit(name, model, opt, {"phase": name})]
    return Resumable(Saving(RunDir(tmp_path), "hash0", every), units, epochs=epochs, steps=10), opt


def test_checkpoint_every_rule_is_one_based_and_skips_the_last_epoch(tmp_path):
    phase, _ = _phase(tmp_path, _model(), every=2, epochs=5)
    phase.restore(resume=False)
    wrote = [e for e in range(1, 6) if phase.end_epoch(e)]
    assert wrote == [2, 4]                                      # never after the last epoch: finish() writes NAME
    assert not phase.end_epoch(2, done=True)                    # the stopping accuracy ended the phase
    meta = read_meta(RunDir(tmp_path).last_checkpoint("phase1"))
    assert meta["epoch"] == 4 and meta["progress"]["updates"] == 40 and meta["phase"] == "phase1"
    never, _ = _phase(tmp_path / "b", _model(), every=0, epochs=5)
    assert not any(never.end_epoch(e) for e in range(1, 6))


def test_interrupt_then_restore_continues_inside_the_epoch(tmp_path):
    model = _model()
    phase, opt = _phase(tmp_path, model)
    phase.restore(resume=False)
    opt.state[next(model.parameters())]["momentum_buffer"] = torch.ones(3, 4)
    phase.interrupted({"epoch": 3, "step": 7, "updates": 37, "totals": [1.5, 2.0, 56.0]})
    again = _model(seed=1)
    phase2, opt2 = _phase(tmp_path, again)
    start = phase2.restore(resume=True)
    assert (start.epoch, start.step, start.totals, start.updates, start.result) == (3, 7, [1.5, 2.0, 56.0], 37, None)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert torch.equal(opt2.state[next(again.parameters())]["momentum_buffer"], torch.ones(3, 4))
    assert phase2.updates_at(4) == 3                          # this session: the rest of epoch 4 (1-based)
    assert phase2.progress(3)["updates"] == 37 + 3
    assert Resumable.position(RunDir(tmp_path), "phase1") == (3, 7)
    fresh, _ = _phase(tmp_path, _model())
    assert fresh.restore(resume=False).epoch == 0             # without --resume nothing is read


def test_finished_unit_returns_its_result_and_weights(tmp_path):
    model = _model()
    phase, _ = _phase(tmp_path, model, name="worker3")
    phase.restore(resume=False)
    meta = phase.finish({"epoch": 5, "updates": 50, "test_acc": 81.5})[0]
    assert meta == {"config_hash": "hash0", "phase": "worker3", "epoch": 5, "updates": 50, "test_acc": 81.5}
    again = _model(seed=2)
    start = _phase(tmp_path, again, name="worker3")[0].restore(resume=True)
    assert start.result["test_acc"] == 81.5 and Resumable.finished(RunDir(tmp_path), "worker3")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert Resumable.epochs_kept(RunDir(tmp_path), "worker3") == float("inf")


def test_restore_refuses_another_config(tmp_path):
    phase, _ = _phase(tmp_path, _model())
    phase.restore(resume=False)
    phase.end_epoch(2)
    other = Resumable(Saving(RunDir(tmp_path), "hash1", 2), phase.units, epochs=5)
    with pytest.raises(SwapError, match="config"):
        other.restore(resume=True)


def test_stacked_units_save_one_checkpoint_each_with_their_own_totals(tmp_path):
    models = [_model(0), _model(1)]
    units = [Unit(f"worker{w}", m, torch.optim.SGD(m.parameters(), lr=0.1), {"phase": "phase2", "worker": w})
             for w, m in enumerate(models)]
    phase = Resumable(Saving(RunDir(tmp_path), "hash0", 1), units, epochs=3, steps=4)
    phase.restore(resume=False)
    phase.interrupted({"epoch": 1, "step": 2, "updates": 6, "totals": [[1.0, 2.0, 8.0], [3.0, 4.0, 8.0]]})
    metas = [read_meta(RunDir(tmp_path).last_checkpoint(f"worker{w}")) for w in (0, 1)]
    assert [m["partial"]["totals"] for m in metas] == [[1.0, 2.0, 8.0], [3.0, 4.0, 8.0]]
    assert [m["worker"] for m in metas] == [0, 1]
    start = Resumable(Saving(RunDir(tmp_path), "hash0", 1), units, epochs=3, steps=4).restore(resume=True)
    assert start.totals == [[1.0, 2.0, 8.0], [3.0, 4.0, 8.0]] and (start.epoch, start.step) == (1, 2)


def _data() -> ImageDataset:
    g = torch.Generator().manual_seed(5)
    return ImageDataset(torch.randint(0, 256, (96, 1, 28, 28), generator=g, dtype=torch.uint8),
                        torch.randint(0, 10, (96,), generator=g), 10)


def test_resuming_the_loop_mid_epoch_gives_the_uninterrupted_weights():
    """The loop's own resume contract: epochs start_epoch.., the first from start_step with the
    carried totals, give the weights and records of one uninterrupted call."""
    data = _data()
    mean, std = data.channel_stats()
    seen = {}
    for split in (False, True):
        torch.manual_seed(0)
        model = build_model("smallcnn", 10, 1)
        step = SGDStep(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
        loader = Loader(data, 16, (0, "phase1", 0), (mean, std))         # 6 updates per epoch
        records = []
        if split:
            stop = {}
            train(step, loader, lambda s: 0.05, epochs=1, callbacks=[On(epoch_end=records.append)])
            loader_iter_state = list(loader.epoch(1))[:2]            # the first 2 updates of epoch 2, by hand
            totals = torch.zeros(3, dtype=torch.float64)
            for x, y in loader_iter_state:
                t, _ = step.gradients(x, y, 0.05)
                step.apply()
                totals += t[0]
            stop.update(step=2, totals=totals.tolist())
            train(step, loader, lambda s: 0.05, epochs=3, start=Position(1, stop["step"], stop["totals"]),
                  callbacks=[On(epoch_end=records.append)])
        else:
            train(step, loader, lambda s: 0.05, epochs=3, callbacks=[On(epoch_end=records.append)])
        seen[split] = (model.state_dict(), [(r["epoch"], r["train_loss"], r["train_acc"]) for r in records])
    assert all(torch.equal(seen[False][0][k], seen[True][0][k]) for k in seen[False][0])
    assert seen[False][1] == seen[True][1]


def test_distributed_average_without_a_group_is_the_uniform_mean():
    models = [_model(s) for s in range(3)]
    for m in models:
        m[1].running_mean.fill_(float(len(m[0].weight)))
    states = [m.state_dict() for m in models]
    out = distributed_average_(_model(9), states, count=3)
    expected = average_state_dicts(states, bn_buffer_names(models[0]))
    for k, v in out.state_dict().items():
        if k in bn_buffer_names(out):
            assert torch.equal(v, _model(9).state_dict()[k])      # kept: to be recomputed
        else:
            # (local mean x count), summed in float64, / count: the mean up to float32 rounding
            torch.testing.assert_close(v, expected[k], rtol=1e-6, atol=0)
    with pytest.raises(ValueError):
        distributed_average_(_model(9), [], count=0)


def test_the_loop_knows_no_algorithm():
    """train.py drives any update step; it imports nothing from swap.algorithms (issue #14)."""
    import ast
    from pathlib import Path

    import swap

    tree = ast.parse((Path(swap.__file__).parent / "train.py").read_text())
    imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if "algorithms" in m], imported
