"""phase2.layout=vmap (workers stacked with torch.func) equals W sequential workers with the same
seeds: weights, BN running statistics and per-epoch metrics."""
from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from swap.cli import main

SETTINGS = ["train", "--config", "fashion_mnist_quick", "--workers", "3", "--procs", "1",
            "--set", "threads=1", "--set", "channels_last=false",
            "--set", "data.train_subset=256", "--set", "data.test_subset=200",
            "--set", "phase1.batch_size=256", "--set", "phase1.max_epochs=1", "--set", "phase1.warmup_epochs=1",
            "--set", "phase2.epochs=2", "--set", "phase2.batch_size=256", "--set", "phase3.bn_batch_size=128"]
# float32: a vmapped convolution is a grouped one and rounds differently from W separate ones
# (~1e-6 after one update); early training amplifies that by a factor that depends on the CPU (2x per
# update on one AMD EPYC model, 5-10x on another: 1e-5 after 2 updates, 2e-4 after 4), so the runs
# are short: 2 epochs of 1 update, one thread, no channels_last, while phase 2 moves the weights by
# more than 1e-3.
TOL = 5e-5


def test_vmap_layout_equals_sequential_workers(tmp_path, real_fashion):
    runs = {}
    for layout in ("sequential", "vmap"):
        out = tmp_path / layout
        assert main(SETTINGS + ["--data-dir", str(real_fashion), "--out", str(out), "--set", f"phase2.layout={layout}"]) == 0
        runs[layout] = out
    for w in range(3):
        a, b = (load_file(str(runs[k] / "checkpoints" / f"worker{w}.safetensors")) for k in ("sequential", "vmap"))
        assert a.keys() == b.keys()
        for k in a:                                     # parameters and BN running statistics
            torch.testing.assert_close(b[k].double(), a[k].double(), rtol=0, atol=TOL, msg=f"worker {w} {k}")
    start = load_file(str(runs["vmap"] / "checkpoints" / "phase1.safetensors"))
    moved = load_file(str(runs["vmap"] / "checkpoints" / "worker0.safetensors"))
    assert max((moved[k] - start[k]).abs().max().item() for k in start if k.endswith("weight")) > 1e-3
    records = {k: [r for r in map(json.loads, (runs[k] / "metrics.jsonl").read_text().splitlines())
                   if r["phase"] == "phase2"] for k in runs}
    key = lambda r: (r["worker"], r["epoch"])                                       # noqa: E731
    for a, b in zip(sorted(records["sequential"], key=key), sorted(records["vmap"], key=key)):
        assert key(a) == key(b) and abs(a["train_loss"] - b["train_loss"]) < 1e-5 and a["test_acc"] == b["test_acc"]
    s = {k: json.loads((runs[k] / "summary.json").read_text()) for k in runs}
    assert s["vmap"]["updates"] == s["sequential"]["updates"]


def test_stacked_guard_reports_the_first_bad_worker():
    import pytest as _pytest

    from swap.config import SwapError
    from swap.train import DivergenceGuard

    guard = DivergenceGuard(10.0, ["phase2 worker 4", "phase2 worker 6"], torch.device("cpu"), every=2)
    guard.observe_norms(torch.tensor([1.0, 3.0]), 1, 1)
    with _pytest.raises(SwapError, match="phase2 worker 6 diverged at epoch 1, step 2: gradient norm inf"):
        guard.observe_norms(torch.tensor([2.0, float("inf")]), 1, 2)    # worker 6 at step 2; checked now


def test_stacked_updates_keep_no_graph_alive():
    """Stacked gradients carry no autograd graph back to the stacked parameters: the guard keeps
    norms across updates, and a graph per update held that way grew a phase 2 by ~0.5 GB/s until
    the OOM killer stopped it. Memory stays flat over 30 updates with the guard attached."""
    import copy
    import resource

    from swap.algorithms.stacked import StackedWorkers
    from swap.models import build_model
    from swap.train import DivergenceGuard

    torch.manual_seed(0)
    model = build_model("smallcnn", 10, 1)
    stack = StackedWorkers([copy.deepcopy(model) for _ in range(3)], momentum=0.9, nesterov=True, weight_decay=5e-4)
    guard = DivergenceGuard(1e6, ["w0", "w1", "w2"], torch.device("cpu"), every=1000)
    x, y = torch.randn(3, 64, 1, 28, 28), torch.randint(0, 10, (3, 64))
    rss = []
    for step in range(1, 31):
        norms, loss, correct = stack.gradients(x, y)
        guard.observe_norms(norms, 1, step)
        stack.update(0.01)
        rss.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)      # KiB, peak so far
    assert norms.grad_fn is None and not norms.requires_grad and loss.grad_fn is None
    assert all(p.grad.grad_fn is None for p in stack.params.values())
    assert guard.first.grad_fn is None
    assert rss[-1] - rss[9] < 50 * 1024                          # < 50 MiB growth over 20 updates (leak: ~150 MiB each)


def test_stacked_gradients_match_each_model_in_fp32_and_bf16():
    """StackedWorkers' gradient of worker w is model w's own gradient on its batch: to float
    rounding in float32; under bf16 autocast (the GPU default) as close to the float32 gradient as
    the unstacked bf16 gradient is. Before vmap's batch norm got its input in float32 the bf16 case
    failed ("expected scalar type BFloat16 but found Float")."""
    import copy

    import torch.nn.functional as F

    from swap.algorithms.stacked import StackedWorkers
    from swap.models import build_model
    from swap.train import autocast

    torch.manual_seed(0)
    models = [build_model("smallcnn", 10, 1) for _ in range(2)]
    x, y = torch.randn(2, 32, 1, 28, 28), torch.randint(0, 10, (2, 32))

    def own_gradient(w: int, amp) -> torch.Tensor:
        m = copy.deepcopy(models[w])
        with autocast(torch.device("cpu"), amp):
            F.cross_entropy(m(x[w]).float(), y[w]).backward()
        return torch.cat([p.grad.flatten() for p in m.parameters()])

    def stacked_gradients(amp) -> list[torch.Tensor]:
        stack = StackedWorkers(models, momentum=0.9, nesterov=True, weight_decay=0.0, amp_dtype=amp)
        stack.gradients(x, y)
        names = [n for n, _ in models[0].named_parameters()]
        return [torch.cat([stack.params[n].grad[w].flatten() for n in names]) for w in range(2)]

    rel = lambda a, b: float((a - b).norm() / b.norm())                   # noqa: E731
    fp32, bf16 = stacked_gradients(None), stacked_gradients(torch.bfloat16)
    for w in range(2):
        exact = own_gradient(w, None)
        assert rel(fp32[w], exact) < 1e-5
        own_bf16 = rel(own_gradient(w, torch.bfloat16), exact)             # bf16's own error (~0.2 at init)
        assert rel(bf16[w], exact) < 1.5 * own_bf16 and rel(bf16[w], exact) < 0.5
