"""Processes: local launch of W ranks with torch.distributed's elastic launcher, process-group
set-up (gloo on CPU, NCCL on CUDA), threads per process, and small collective helpers.

The same rank function runs under ``torchrun`` across machines: :func:`setup` reads the standard
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) that both launchers set.
"""
from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from .config import SwapError


@dataclass(frozen=True)
class Dist:
    """This process's place: ``rank`` of ``world_size`` (``local_rank`` on its machine), device, threads."""
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    threads: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def under_launcher() -> bool:
    """True inside a process started by torchrun or the elastic launcher."""
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def resolve_device(name: str) -> torch.device:
    """``cpu`` | ``cuda`` | ``auto`` (CUDA when available).

    Raises:
        SwapError: ``cuda`` asked for but not available.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SwapError("device=cuda asked for but no CUDA device is available; use --set device=cpu")
    return torch.device(name)


def default_threads(procs_per_machine: int) -> int:
    """Torch threads per process so that processes x threads <= CPU cores."""
    return max(1, (os.cpu_count() or 1) // max(1, procs_per_machine))


def setup(device_name: str = "cpu", threads: int = 0) -> Dist:
    """Join the process group if launched with more than one rank; set device and threads.

    Backend: NCCL on CUDA, gloo on CPU. With one rank no process group is created.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    threads = threads or default_threads(local_world)
    torch.set_num_threads(threads)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local_rank, device, threads)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def launch(fn: Callable[..., Any], nprocs: int, *args: Any) -> Any:
    """Run ``fn(*args)`` in ``nprocs`` local processes; return rank 0's return value.

    One process runs in this process (no launcher, no process group). More use
    ``torch.distributed.launcher.api.elastic_launch`` with a c10d rendezvous on localhost,
    which sets RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT for :func:`setup`.

    Raises:
        SwapError: a rank failed; the message names the rank and its error.
    """
    if nprocs == 1:
        return fn(*args)
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nprocs, run_id=f"swap-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.2)
    try:
        results = elastic_launch(config, fn)(*args)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        message = failure.message if isinstance(failure.message, str) else failure.message.get("message", "")
        last = [line for line in str(message).strip().splitlines() if line.strip()]
        raise SwapError(f"rank {rank} failed: {last[-1] if last else 'exit code ' + str(failure.exitcode)}") from None
    return results[0]


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (a one-item list with one rank)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum_(tensors: list[torch.Tensor]) -> None:
    """In-place sum over ranks of each tensor (no-op with one rank)."""
    if dist.is_available() and dist.is_initialized():
        for t in tensors:
            dist.all_reduce(t)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
