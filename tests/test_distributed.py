"""Phase 1 equivalence: 2 gloo processes with DDP take the same step as 1 process accumulating
the same global batch in the same two micro-batches; with gradient clipping and LARS as well."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from swap import distributed
from swap.callbacks import On
from swap.data import Augment, Loader
from swap.models import build_model
from swap.optim import LARS
from swap.train import SGDStep, train

from conftest import ddp_rank_setup

TOL = 1e-5      # float32; measured differences are ~4e-7 (summation order of the all-reduce)


CLIP = 0.05     # below the gradient norms of these updates (asserted), so clipping binds


def take_steps(micro_batch_size: int) -> dict:
    """Two updates of a global batch of 64 on every rank, with Nesterov SGD, then from the same start
    with LARS and the gradient clipped to CLIP; returns each rank's weights and grads of both."""
    d, data, mean, std, model, wrapped = ddp_rank_setup(data_seed=1)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    loader = Loader(data, 64, (0, "phase1", 0), (mean, std), Augment(2, True, 8), (d.rank, d.world_size))
    out = {}
    for name, opt, clip in (("sgd", torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                                                    weight_decay=5e-4), 0.0),
                            ("lars_clipped", LARS(model.parameters(), lr=2.0), CLIP)):
        model.load_state_dict(start)
        norms = []
        train(SGDStep(wrapped, opt, micro_batch_size, clip_grad_norm=clip), loader, lambda s: 0.1, epochs=1,
              callbacks=[On(update_end=lambda u: norms.append(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])))])
        out[name] = {"weights": {k: v.detach().clone() for k, v in model.named_parameters()},
                     "grads": {k: v.grad.detach().clone() for k, v in model.named_parameters()},
                     "norms": [n.item() for n in norms]}
    gathered = distributed.all_gather_objects(out)
    distributed.teardown()
    return gathered


def test_two_process_ddp_equals_one_process_accumulation(monkeypatch):
    # spawned ranks import this module by name: make the tests folder importable for them
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    both = take_steps(micro_batch_size=32)[0]                 # 1 process: 2 micro-batches of 32
    both_ranks = distributed.launch(take_steps, 2, 0)         # 2 processes x 32 samples
    # clipping acts on the whole update's gradient: all-reduced over the ranks, accumulated over the
    # micro-batches; the clipped step of LARS is the same on 2 ranks as in 1 process
    clipped, clipped_ranks = both["lars_clipped"], [r["lars_clipped"] for r in both_ranks]
    assert clipped["norms"] == pytest.approx([CLIP] * 2, rel=1e-5)
    assert clipped_ranks[0]["norms"] == pytest.approx([CLIP] * 2, rel=1e-5)
    assert both["sgd"]["norms"][0] > 2 * CLIP                 # unclipped, the first gradient is larger
    for k in clipped["weights"]:
        torch.testing.assert_close(clipped_ranks[0]["weights"][k], clipped["weights"][k], rtol=0, atol=TOL)
        assert torch.equal(clipped_ranks[0]["weights"][k], clipped_ranks[1]["weights"][k])
    single, ranks = both["sgd"], [r["sgd"] for r in both_ranks]
    for k in single["weights"]:
        torch.testing.assert_close(ranks[0]["grads"][k], single["grads"][k], rtol=0, atol=TOL)
        torch.testing.assert_close(ranks[0]["weights"][k], single["weights"][k], rtol=0, atol=TOL)
        assert torch.equal(ranks[0]["weights"][k], ranks[1]["weights"][k])   # ranks stay identical
    # and the step moved the weights, so equality is not vacuous
    torch.manual_seed(0)
    init = dict(build_model("smallcnn", 10, 1).named_parameters())
    assert max((single["weights"][k] - init[k]).abs().max().item() for k in init) > 1e-3


def sharded_evaluation() -> dict:
    """Three ranks as phase 2's worker groups would be: ranks 0 and 1 one worker's group, rank 2 a
    worker alone. Each evaluates the test images with its group (ranks 0 and 1 a shard each), and
    counts the images its model saw; also one rank's evaluation of all images, for comparison."""
    import torch.distributed as dist

    from swap.data.loader import eval_batches
    from swap.task import Task
    from swap.train import evaluate, evaluate_metrics

    d, data, mean, std, model, _ = ddp_rank_setup(data_seed=2)
    group = dist.new_group([0, 1])                              # every rank creates it, as new_group requires
    mine = group if d.rank < 2 else False
    task = Task(metrics=("top1", "loss"))
    seen = []
    hook = model.register_forward_pre_hook(lambda m, args: seen.append(len(args[0])))
    out = {"group": evaluate(model, data, mean, std, batch_size=20, distributed=mine)}
    rank, world = (d.rank, 2) if d.rank < 2 else (0, 1)
    out["group_metrics"] = evaluate_metrics(model, eval_batches(data, 20, mean, std, rank, world), task, mine)
    out["seen"] = sum(seen)
    hook.remove()
    out["alone"] = evaluate(model, data, mean, std, batch_size=20)
    out["metrics"] = evaluate_metrics(model, eval_batches(data, 20, mean, std), task)
    gathered = distributed.all_gather_objects(out)
    distributed.teardown()
    return gathered


def test_a_worker_groups_ranks_each_evaluate_a_shard_and_get_one_ranks_numbers(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    ranks = distributed.launch(sharded_evaluation, 3)
    assert [r["seen"] for r in ranks] == [64 + 64, 64 + 64, 128 + 128]      # accuracy pass + metrics pass
    for r in ranks:
        assert r["group"] == r["alone"] == ranks[0]["alone"] > 0
        assert r["group_metrics"]["top1"] == r["metrics"]["top1"]
        assert r["group_metrics"]["loss"] == pytest.approx(r["metrics"]["loss"], rel=1e-6)   # float32 batch means


def count_tensors(tensors: list) -> int:
    distributed.teardown()
    return sum(int(t.numel()) for t in tensors)


def test_ranks_whose_arguments_share_many_tensors_still_start(monkeypatch):
    """300 shared tensors exceed what one message to the fork server carries (256 descriptors): the
    ranks are spawned instead and get every tensor."""
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    assert distributed.launch(count_tensors, 2, [torch.ones(1) for _ in range(300)]) == 300
