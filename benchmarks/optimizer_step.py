"""The cost of one optimizer step (issue #24, item 10): our LARS against ``torch.optim.SGD(foreach=True)``
(Nesterov momentum, weight decay) and our LAMB against ``torch.optim.AdamW(foreach=True)``, on the
parameters of our ResNet-9 (CIFAR-10 shape) and of the char-level transformer (text-char preset), with
random gradients. Also one whole update (forward, backward, step) of each model with SGD, to give the
step's share of an update.

    .venv/bin/python benchmarks/optimizer_step.py [--repeats 30]

Prints median milliseconds per step (after 5 warm-up steps; the four optimizers take turns step by
step) and the ratios; writes
``benchmarks/results/optimizer_step.json``. Targets: LARS within 1.3x of SGD, LAMB within 1.3x of AdamW.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"


def models() -> dict:
    from swap.models import build_model
    torch.manual_seed(0)
    resnet = build_model("resnet9", 10, 3)
    text = build_model("char-transformer", 256)
    return {"resnet9": (resnet, lambda: (torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,)))),
            "char-transformer": (text, lambda: (torch.randint(0, 256, (32, 64)), torch.randint(0, 256, (32, 64))))}


def time_steps(makers: dict, model, repeats: int) -> dict[str, float]:
    """Median seconds of ``opt.step()`` per optimizer over ``repeats`` steps each, gradients fixed;
    the optimizers take turns step by step (each on its own copy of the parameters), so they share
    the machine's state."""
    import copy
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(p.shape, generator=g) * 1e-2 for p in model.parameters()]
    opts = {}
    for name, make in makers.items():
        params = [p for p in copy.deepcopy(model).parameters()]
        for p, grad in zip(params, grads):
            p.grad = grad.clone()
        opts[name] = make(params)
    times: dict[str, list[float]] = {name: [] for name in makers}
    for k in range(repeats + 5):
        for name, opt in opts.items():
            t = time.perf_counter()
            opt.step()
            if k >= 5:
                times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def time_update(model, batch, repeats: int) -> float:
    """Median seconds of one whole update (forward, backward, SGD step) of ``model`` on ``batch()``."""
    from swap.task import cross_entropy
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, nesterov=True, weight_decay=5e-4, foreach=True)
    x, y = batch()
    times = []
    for k in range(max(5, repeats // 3) + 3):
        t = time.perf_counter()
        opt.zero_grad()
        cross_entropy(model(x), y).backward()
        opt.step()
        if k >= 3:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    from swap.optim import LAMB, LARS
    from swap.distributed import machine_info
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=100)
    args = ap.parse_args()
    torch.set_num_threads(2)
    makers = {
        "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4, foreach=True),
        "lars": lambda ps: LARS(ps, lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True),
        "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01, foreach=True),
        "lamb": lambda ps: LAMB(ps, lr=1e-3, weight_decay=0.01),
    }
    out = {"machine": machine_info(torch.device("cpu"), 2, 1), "models": {}}
    for name, (model, batch) in models().items():
        row = time_steps(makers, model, args.repeats)
        row["update_sgd"] = time_update(model, batch, args.repeats)
        row["params"] = sum(p.numel() for p in model.parameters())
        row["tensors"] = sum(1 for _ in model.parameters())
        row["lars_over_sgd"], row["lamb_over_adamw"] = row["lars"] / row["sgd"], row["lamb"] / row["adamw"]
        out["models"][name] = row
        print(f"{name:16} {row['params']:>9,} params in {row['tensors']} tensors | step ms: sgd {1e3 * row['sgd']:.2f} "
              f"lars {1e3 * row['lars']:.2f} ({row['lars_over_sgd']:.2f}x) adamw {1e3 * row['adamw']:.2f} "
              f"lamb {1e3 * row['lamb']:.2f} ({row['lamb_over_adamw']:.2f}x) | whole update {1e3 * row['update_sgd']:.1f} "
              f"ms: LARS step {100 * row['lars'] / row['update_sgd']:.1f}%, LAMB step "
              f"{100 * row['lamb'] / row['update_sgd']:.1f}%")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "optimizer_step.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
