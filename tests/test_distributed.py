"""Phase 1 equivalence: 2 gloo processes with DDP take the same step as 1 process accumulating
the same global batch in the same two micro-batches."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from swap import distributed
from swap.data import Augment, Loader
from swap.models import build_model
from swap.train import SGDStep, train

from conftest import ddp_rank_setup

TOL = 1e-5      # float32; measured differences are ~4e-7 (summation order of the all-reduce)


def take_steps(micro_batch_size: int) -> dict:
    """Two updates of a global batch of 64 on every rank; returns each rank's weights and grads."""
    d, data, mean, std, model, wrapped = ddp_rank_setup(data_seed=1)
    loader = Loader(data, 64, (0, "phase1", 0), mean, std, Augment(2, True, 8), d.rank, d.world_size)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    train(SGDStep(wrapped, opt, micro_batch_size), loader, lambda s: 0.1, epochs=1)
    out = {"weights": {k: v.detach().clone() for k, v in model.named_parameters()},
           "grads": {k: v.grad.detach().clone() for k, v in model.named_parameters()}}
    gathered = distributed.all_gather_objects(out)
    distributed.teardown()
    return gathered


def test_two_process_ddp_equals_one_process_accumulation(monkeypatch):
    # spawned ranks import this module by name: make the tests folder importable for them
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    single = take_steps(micro_batch_size=32)[0]               # 1 process: 2 micro-batches of 32
    ranks = distributed.launch(take_steps, 2, 0)              # 2 processes x 32 samples
    for k in single["weights"]:
        torch.testing.assert_close(ranks[0]["grads"][k], single["grads"][k], rtol=0, atol=TOL)
        torch.testing.assert_close(ranks[0]["weights"][k], single["weights"][k], rtol=0, atol=TOL)
        assert torch.equal(ranks[0]["weights"][k], ranks[1]["weights"][k])   # ranks stay identical
    # and the step moved the weights, so equality is not vacuous
    torch.manual_seed(0)
    init = dict(build_model("smallcnn", 10, 1).named_parameters())
    assert max((single["weights"][k] - init[k]).abs().max().item() for k in init) > 1e-3
