"""All-reduce cost on this machine, fitted to the ring model `swap plan` uses, then `swap plan`
checked against the compare's measured runs with those parameters.

Two gloo processes (the CPU "devices" of our compares) time ``all_reduce`` of float32 tensors from
1 KB to 8 MB (median of repetitions); a least-squares line t = a + b * bytes gives, for D = 2
(t = bytes / bandwidth + 2 * latency), bandwidth = 1 / b and latency = a / 2. A DistributedDataParallel
update costs more than its bare all-reduce (hooks, buckets, gloo's threads competing with one compute
thread per process), so the same processes also time updates of the compare's model at a share of
64 with and without DDP; the difference, less the bandwidth term, gives an *effective* latency.
The plan is printed with both parameter sets.

    .venv/bin/python benchmarks/allreduce.py [--compare runs/compare]

Prints the fit and the plan, and writes ``benchmarks/results/allreduce.json``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

from swap import distributed  # noqa: E402

SIZES = [2 ** k for k in (10, 14, 16, 18, 20, 23)]        # bytes


def timings(reps: int) -> dict[int, float]:
    """Median seconds of one all_reduce per size, on every rank (rank 0's returned)."""
    distributed.setup("cpu", 1)
    out = {}
    for nbytes in SIZES:
        t = torch.ones(nbytes // 4)
        for _ in range(3):
            dist.all_reduce(t)
        samples = []
        for _ in range(reps):
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(t)
            samples.append(time.perf_counter() - start)
        out[nbytes] = statistics.median(samples)
    out["ddp_overhead_s"] = _ddp_overhead(reps)
    distributed.teardown()
    return out


def _ddp_overhead(steps: int) -> float:
    """Seconds per update that DDP adds: the compare's model, share 64, DDP vs the same model alone."""
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP

    from swap.models import build_model

    torch.manual_seed(0)
    x, y = torch.randn(64, 1, 28, 28).contiguous(memory_format=torch.channels_last), torch.randint(0, 10, (64,))
    def per_update(ddp: bool) -> float:
        model = build_model("smallcnn", 10, 1).to(memory_format=torch.channels_last)
        net = DDP(model) if ddp else model
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, nesterov=True)
        for i in range(steps + 5):
            if i == 5:
                dist.barrier()
                start = time.perf_counter()
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
        return (time.perf_counter() - start) / steps

    # interleaved pairs; the median difference (gloo's timing on a shared CPU is noisy)
    return statistics.median(per_update(True) - per_update(False) for _ in range(5))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=100)
    parser.add_argument("--compare", default=str(ROOT / "runs" / "compare"), help="measured compare directory")
    args = parser.parse_args()
    times = distributed.launch(timings, 2, args.reps)
    overhead = times.pop("ddp_overhead_s")
    xs, ys = list(times), list(times.values())
    mx, my = statistics.mean(xs), statistics.mean(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    a = my - b * mx
    bandwidth, latency = 1 / b, max(a, 0.0) / 2
    print("bytes      seconds")
    for x, y in times.items():
        print(f"{x:>9d}  {y:.6f}")
    print(f"fit: {a * 1e3:.3f} ms + bytes / {bandwidth / 1e9:.3f} GB/s -> --bandwidth {bandwidth:.3g} --latency {latency:.3g}")
    grad_bytes = 4 * 43_000                                           # the small CNN's gradients, ~43k float32
    effective = max(overhead - grad_bytes / bandwidth, 0.0) / 2
    print(f"DDP adds {overhead * 1e3:.2f} ms per update -> effective --latency {effective:.3g}")
    result = {"times_s": times, "bandwidth": bandwidth, "latency": latency, "ddp_overhead_s": overhead,
              "effective_latency": effective, "plans": {}}
    if Path(args.compare).is_dir():
        for name, lat in (("raw all-reduce", latency), ("effective DDP latency", effective)):
            plan = subprocess.run([str(ROOT / ".venv" / "bin" / "swap"), "plan", "--config", "fashion_mnist_compare",
                                   "--devices", "2", "--bandwidth", f"{bandwidth:.6g}", "--latency", f"{lat:.6g}",
                                   "--measured", args.compare], cwd=ROOT, capture_output=True, text=True, check=True)
            print(f"\n{name} (--latency {lat:.3g}): {plan.stderr.strip()}")
            print(plan.stdout)
            result["plans"][name] = plan.stdout
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "allreduce.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
