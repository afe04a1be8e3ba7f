"""Processes: local launch of W ranks with torch.distributed's elastic launcher, process-group
set-up (gloo on CPU, NCCL on CUDA), threads per process, and small collective helpers.

The same rank function runs under ``torchrun`` across machines: :func:`setup` reads the standard
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) that both launchers set.

A launch on this machine listens on the loopback interface only: its rendezvous and its process
group meet in a file store (:func:`local_group`) instead of a TCP store server, which would listen
on every interface, and gloo's connections bind to ``lo`` (unless ``GLOO_SOCKET_IFNAME`` is set).
"""
from __future__ import annotations

import contextlib
import gc
import multiprocessing
import os
import platform
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from . import interrupt
from .errors import SwapError


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


def setup(device_name: str = "cpu", threads: int = 0, join: bool = True) -> Dist:
    """Join the process group if launched with more than one rank (and ``join``); set device and threads.

    Backend: NCCL on CUDA, gloo on CPU. With one rank, or ``join=False`` (a rank's helper process,
    e.g. an isolated phase-2 worker), no process group is created.
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
    if join and world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if os.environ.get(GROUP_STORE):             # a launch on this machine (local_group)
            dist.init_process_group(backend, store=dist.FileStore(os.environ[GROUP_STORE], world), rank=rank,
                                    world_size=world)
        elif os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            dist.init_process_group(backend, store=_attempt_store(world), rank=rank, world_size=world)
        else:
            dist.init_process_group(backend)
    return Dist(rank, world, local_rank, device, threads)


#: The environment variable naming the file store of a launch on this machine (local_group), read by setup
GROUP_STORE = "SWAP_GROUP_STORE"


@contextlib.contextmanager
def local_group():
    """A launch whose ranks all run on this machine: yields ``(folder, env)``, a fresh private
    folder (removed after the block) and the variables its ranks need: :data:`GROUP_STORE`, the
    file in it where their process group meets (:func:`setup`), and ``GLOO_SOCKET_IFNAME=lo``
    (unless set), so that gloo's connections listen on 127.0.0.1 only. A TCP store server, what
    ``torchrun`` and ``init_process_group`` start, listens on every interface of the machine."""
    folder = tempfile.mkdtemp(prefix="swap-group-")
    try:
        yield folder, {GROUP_STORE: os.path.join(folder, "group"),
                       "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo")}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _attempt_store(world: int) -> "dist.Store":
    """The key-value store of this launch attempt: a client of the elastic agent's store
    (MASTER_ADDR:MASTER_PORT) under the prefix ``swap/attempt{TORCHELASTIC_RESTART_COUNT}/``.

    torch's elastic agent keeps one store for all restarts of a job (the same port, and the keys of
    attempt 0 still there in attempt 1), while the process group's rendezvous keys are not
    namespaced by attempt: a restarted rank could read a dead rank's address from the previous
    attempt and wait on it for the whole gloo timeout. The prefix gives every attempt fresh keys.
    """
    from datetime import timedelta

    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=timedelta(minutes=30))
    return dist.PrefixStore(f"swap/attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", store)


def teardown() -> None:
    """Leave the process group. Unreachable objects that hold it (DDP wrappers in reference cycles,
    with their gloo work) are collected first and after, while the interpreter is whole: freed
    during interpreter finalization instead, gloo's threads can abort the process at exit
    ("terminate called without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
        gc.collect()


def verbose() -> bool:
    """True when the user asked for everything (``--verbose`` or ``SWAP_LOG=debug``): torch's
    own log lines and full tracebacks reach the terminal. Child processes inherit the setting."""
    return os.environ.get("SWAP_LOG", "").lower() == "debug"


# torch.distributed's loggers (elastic agent, rendezvous, c10d) and torch.multiprocessing's (the
# elastic agent starts ranks with its spawn, which logs each process it terminates after a failure):
# silenced in normal runs, where a failure is reported by our own one-line error and the traceback
# goes to the run's log files.
_TORCH_LOGGERS = ("torch.distributed", "c10d", "torch.multiprocessing")


@contextlib.contextmanager
def quiet_torch_logs():
    """Within the block, torch.distributed's, c10d's and torch.multiprocessing's loggers print
    nothing (unless :func:`verbose`); their levels are restored afterwards."""
    import logging

    if verbose():
        yield
        return
    import torch.distributed.launcher.api  # noqa: F401  (creates the elastic loggers first)

    loggers = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
               if name.startswith(_TORCH_LOGGERS)] + [logging.getLogger(n) for n in _TORCH_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def log_failure(exc: BaseException, log_path: str | Path | None, who: str) -> SwapError:
    """Append the full traceback of ``exc`` (being handled) to ``log_path`` and return the
    one-line :class:`SwapError` to report instead: a ``SwapError`` keeps its message; any other
    exception becomes ``WHO failed: Type: message (traceback in LOG)``."""
    import traceback

    where = ""
    if log_path is not None:
        log_path = Path(log_path)
        try:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(log_path, "a") as fh:
                fh.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()} {who}\n")
                fh.write("".join(traceback.format_exception(exc)))
            where = f" (traceback in {log_path})"
        except OSError:
            pass
    if isinstance(exc, SwapError):
        return exc
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return SwapError(f"{who} failed: {type(exc).__name__}: {lines[-1] if lines else ''}{where}")


def rank_log(log_dir: str | Path | None) -> Path | None:
    """This rank's log file in ``log_dir`` (``rank{RANK}.log``), or None without a log folder."""
    return None if log_dir is None else Path(log_dir) / f"rank{os.environ.get('RANK', '0')}.log"


def run_rank(fn: Callable[..., Any], *args: Any, log_dir: str | Path | None = None) -> Any:
    """One rank's body: ``fn(*args)`` with SIGINT/SIGTERM turned into a clean stop
    (:mod:`swap.interrupt`), after which the checkpoints are written. A stopped rank returns
    ``{"interrupted": {"signal", "where"}}`` when it runs in the caller's process, and exits with
    status 128 + signal number under a launcher (whose agent may be shutting down and no longer
    reading return values). The process group is always left.

    Raises:
        SwapError: ``fn`` failed. Its full traceback is appended to ``log_dir/rank{RANK}.log``
            (when ``log_dir`` is given) and the error is one line naming that file; with
            :func:`verbose`, the original exception propagates instead.
    """
    try:
        with interrupt.handle_signals():
            return fn(*args)
    except interrupt.Interrupted as exc:
        if under_launcher():
            if int(os.environ.get("RANK", "0")) == 0:
                print(f"swap: rank 0 {exc}; checkpoint written", file=sys.stderr, flush=True)
            teardown()
            sys.exit(128 + int(exc.signum))
        return {"interrupted": {"signal": int(exc.signum), "where": exc.where}}
    except Exception as exc:
        error = log_failure(exc, rank_log(log_dir), f"rank {os.environ.get('RANK', '0')}")
        if log_dir is not None and under_launcher():      # for the launcher's report, before our peers see us go
            with contextlib.suppress(OSError):
                Path(log_dir, f"rank{os.environ.get('RANK', '0')}.error").write_text(str(error))
        if verbose() or error is exc:
            raise
        raise error from None
    finally:
        teardown()


def _launched_rank(env: dict, log_dir: str | None, fn: Callable[..., Any], *args: Any) -> Any:
    """Entry point of a rank started by :func:`launch` (the launcher passes arguments by position);
    ``env``: the launching process's environment (:func:`_adopt`)."""
    _adopt(env)
    _die_with_parent()
    return run_rank(fn, *args, log_dir=log_dir)


def launch(fn: Callable[..., Any], nprocs: int, *args: Any, log_dir: str | Path | None = None) -> Any:
    """Run ``fn(*args)`` in ``nprocs`` local processes (each through :func:`run_rank`); return
    rank 0's return value. A failed rank's traceback goes to ``log_dir/rank{R}.log`` (when
    given); torch's own launcher log lines are not shown unless :func:`verbose`.

    One process runs in this process (no launcher, no process group). More use
    ``torch.distributed.launcher.api.elastic_launch`` with a c10d rendezvous in a file (:func:`local_group`),
    which sets RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT for :func:`setup`. When this process gets
    SIGINT/SIGTERM, the elastic agent forwards it to the ranks and waits (up to 30 s) while they
    write their checkpoints; then no rank process is left.

    Raises:
        SwapError: a rank failed; the message names the rank and its error.
        swap.interrupt.Interrupted: this (parent) process received SIGINT/SIGTERM.
    """
    if nprocs == 1:
        return run_rank(fn, *args, log_dir=log_dir)
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    def start(method: str):
        # the rendezvous meets in a file of the launch's folder, and the agent starts no store
        # server of its own for the ranks (they meet in local_group's file): nothing listens
        with local_group() as (folder, env), environment(TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1"):
            config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nprocs, run_id=f"swap-{uuid.uuid4().hex[:8]}",
                                  rdzv_backend="c10d", rdzv_endpoint=os.path.join(folder, "rendezvous"),
                                  rdzv_configs={"store_type": "file"}, max_restarts=0, monitor_interval=0.2,
                                  start_method=method)
            with quiet_torch_logs():
                return elastic_launch(config, _launched_rank)({**os.environ, **env},
                                                              None if log_dir is None else str(log_dir), fn, *args)

    _context()                                           # the ranks start from the fork server
    started = time.time()
    try:
        try:
            results = start(START_METHOD)
        except ValueError as exc:
            if not _too_many_fds(exc):
                raise
            results = start("spawn")
    except SignalException as exc:
        raise interrupt.Interrupted(int(exc.sigval), "while the ranks were running") from None
    except ChildFailedError as exc:
        stops = {f.exitcode - 128 for f in exc.failures.values()}
        if stops <= {int(signal.SIGINT), int(signal.SIGTERM)}:      # the ranks were stopped by a signal
            raise interrupt.Interrupted(stops.pop(), "while the ranks were running") from None
        raise SwapError(_reported_failure(exc.failures, log_dir, started)) from None
    return results[0]


@contextlib.contextmanager
def environment(**variables: str):
    """Within the block, this process's environment holds ``variables`` (restored after)."""
    old = {k: os.environ.get(k) for k in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _reported_failure(failures: dict, log_dir: str | Path | None, since: float) -> str:
    """The one line a failed launch reports. Each failed rank wrote its own line (``rankR.error``
    in ``log_dir``) before its exit could break the others' collectives, so a rank killed by the
    launcher before it exited still has its say; torch elastic's record of each exited rank fills in.
    A rank's own error comes before the errors its exit caused in its peers (a collective that lost
    its peer: they can come within the same second), then the earliest, then the lowest rank."""
    lines = {}
    for rank, failure in failures.items():
        last = [line for line in _failure_text(failure).strip().splitlines() if line.strip()]
        if last and last[-1].startswith("SwapError: "):      # our rank's own line
            lines[rank] = (last[-1][len("SwapError: "):], failure.timestamp)
        else:
            lines[rank] = (f"rank {rank} failed: {last[-1] if last else 'exit code ' + str(failure.exitcode)}",
                           failure.timestamp)
    for path in Path(log_dir).glob("rank*.error") if log_dir is not None else []:
        with contextlib.suppress(OSError, ValueError):
            written = path.stat().st_mtime
            if written >= since:
                lines[int(path.stem[4:])] = (path.read_text(), written)
    rank = min(lines, key=lambda r: (any(m in lines[r][0] for m in PEER_LOST), lines[r][1], r))
    return lines[rank][0]


# what a rank's error says when it is a consequence of another rank's exit (its collective lost its peer)
PEER_LOST = ("closed by peer", "reset by peer", "remote worker", "Broken pipe", "DistBackendError")


def _failure_text(failure) -> str:
    """A failed rank's error message, as torch elastic recorded it."""
    message = failure.message
    return message if isinstance(message, str) else str(message.get("message", "")) if isinstance(message, dict) else ""


def _die_with_parent() -> None:
    """Linux: have the kernel send SIGTERM to this process when its parent dies, so a killed rank
    leaves no orphan behind (the SIGTERM makes the orphan checkpoint and exit)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))      # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


# The environment of the process that imported this module: in a child of the fork server
# (``_context``), the server's, which tells the variables a launcher set in the child apart.
_BOOT_ENV, _BOOT_PID = dict(os.environ), os.getpid()
START_METHOD = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


def _context():
    """The multiprocessing context of the processes swap starts (the ranks of :func:`launch`, the
    isolated phase-2 workers of :func:`run_isolated`): a fork server that has imported torch (with
    ``torch._dynamo``, which the first optimizer of a process imports) and swap once, so that a
    child starts in a fraction of a second instead of importing them anew (about 3 s each on 2
    cores). The server only imports and runs nothing, so a forked child starts from a clean torch;
    it inherits the server's environment, which :func:`_adopt` replaces with the parent's of the
    moment. Where the platform has no fork server (Windows), spawn."""
    ctx = torch.multiprocessing.get_context(START_METHOD)
    if START_METHOD == "forkserver":
        ctx.set_forkserver_preload(["torch", "torch._dynamo", "swap"])
    return ctx


def _too_many_fds(exc: ValueError) -> bool:
    """Whether starting a process from the fork server failed because its arguments share more
    tensors than one message to the server carries (each shared tensor is a file descriptor; the
    limit is 256): such a process is spawned instead, which passes them one by one."""
    return "too many fds" in str(exc)


def start_server() -> None:
    """Start the fork server now (it imports torch and swap in the background), so that its imports
    overlap the caller's own preparation (reading the data) before the first process is started."""
    if START_METHOD == "forkserver":
        import multiprocessing.forkserver

        _context()
        multiprocessing.forkserver.ensure_running()


def _adopt(env: dict) -> None:
    """In a child of the fork server: take the parent's environment ``env`` (as a spawned child
    would have it), keeping the variables the launcher set in this child (RANK, LOCAL_RANK, ...:
    those that differ from the server's own)."""
    if os.getpid() == _BOOT_PID:                 # not forked from the server that imported this module
        return
    mine = {k: v for k, v in os.environ.items() if _BOOT_ENV.get(k) != v}
    os.environ.clear()
    os.environ.update({**env, **mine})


def _isolated_main(fn: Callable[..., Any], args: tuple, error_path: str, log_path: str | None,
                   env: dict) -> None:
    _adopt(env)
    _die_with_parent()
    # tqdm's default lock is a multiprocessing semaphore, registered with the parent's resource
    # tracker: a worker killed by SIGKILL would leave it there, and the tracker would print a
    # "leaked semaphore" warning when the run exits. The child's progress output needs no lock
    # shared with other processes.
    from tqdm import tqdm
    tqdm.set_lock(threading.RLock())
    try:
        with interrupt.handle_signals():
            fn(*args)
    except interrupt.Interrupted as exc:
        sys.exit(128 + int(exc.signum))
    except Exception as exc:                     # reported by the parent, which carries on
        who = Path(log_path).stem if log_path else f"process {os.getpid()}"
        Path(error_path).write_text(str(log_failure(exc, log_path, who)))
        sys.exit(1)


def run_isolated(fn: Callable[..., Any], args: tuple, error_path: str | Path,
                 log_path: str | Path | None = None) -> str | None:
    """Run ``fn(*args)`` in a fresh child process (forked from the fork server, ``_context``) and wait; ``None`` if it succeeded,
    else one line saying why it failed: its exception's message, or the signal that killed it, or
    its exit status. After a failure ``error_path`` holds that line, and ``log_path`` (when
    given) the full traceback of an exception.

    The child joins no process group; tensors in ``args`` travel through shared memory. A
    SIGINT/SIGTERM received by this process is forwarded to the child, which checkpoints and
    stops; the child gets SIGTERM if this process dies.

    Raises:
        swap.interrupt.Interrupted: the child stopped on SIGINT/SIGTERM.
    """
    error_path = Path(error_path)
    error_path.unlink(missing_ok=True)
    child_args = (fn, args, str(error_path), None if log_path is None else str(log_path), dict(os.environ))
    child = _context().Process(target=_isolated_main, args=child_args)
    try:
        child.start()
    except ValueError as exc:
        if not _too_many_fds(exc):
            raise
        child = torch.multiprocessing.get_context("spawn").Process(target=_isolated_main, args=child_args)
        child.start()
    forwarded = 0
    while child.exitcode is None:
        child.join(0.2)
        signum = interrupt.requested()
        if signum and not forwarded and child.exitcode is None:
            os.kill(child.pid, signum)
            forwarded = signum
    code = child.exitcode
    if code == 0:
        return None
    if code - 128 in (int(signal.SIGINT), int(signal.SIGTERM)):
        raise interrupt.Interrupted(code - 128, f"in process {child.pid}")
    if error_path.is_file():                   # the child's own exception message
        return error_path.read_text()
    why = (f"process {child.pid} was killed by {signal.Signals(-code).name}" if code < 0 else
           f"process {child.pid} exited with status {code}")
    error_path.write_text(why)
    return why


def all_gather_objects(obj: Any, group=None) -> list[Any]:
    """Every rank's ``obj`` (of ``group``; None: all ranks), in rank order (a one-item list with one rank)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


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


def rank(group=None) -> int:
    """This process's rank in ``group`` (None: the whole process group; 0 without one)."""
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


@dataclass(frozen=True)
class WorkerGroup:
    """This rank's place in phase 2 when every worker spans ``size`` ranks (``phase2.ranks_per_worker``;
    SWAP paper Sec. 5.2: 2 workers of 8 GPUs each): ranks ``[g * size, (g + 1) * size)`` form
    worker group ``g``, a process group of its own (``torch.distributed.new_group``) that trains
    worker ``g`` with DistributedDataParallel; ranks past ``workers x size`` have no worker.

    Attributes:
        worker: this rank's worker (None: none). rank: its rank in the group (0 leads: it reports
            the worker and contributes its weights to the average). size: ranks per worker.
        group: the group's process group (None when ``size`` is 1).
    """
    worker: int | None
    rank: int
    size: int
    group: Any = None

    @property
    def leads(self) -> bool:
        return self.worker is not None and self.rank == 0


def worker_groups(workers: int, size: int) -> WorkerGroup:
    """Form phase 2's worker groups of ``size`` ranks (collective: every rank calls it; each group
    is created on all ranks, in order, as ``new_group`` requires) and return this rank's.

    Raises:
        SwapError: ``workers x size`` exceeds the world size.
    """
    world, me = (dist.get_world_size(), dist.get_rank()) if dist.is_available() and dist.is_initialized() else (1, 0)
    if workers * size > world:
        raise SwapError(f"phase2.ranks_per_worker={size} x workers={workers} needs {workers * size} ranks, but the "
                        f"run has {world}; set procs (or torchrun's --nproc-per-node x nodes) to at least "
                        f"{workers * size}, or lower one of them")
    mine = None
    for g in range(workers):
        ranks = list(range(g * size, (g + 1) * size))
        pg = dist.new_group(ranks)
        if me in ranks:
            mine = WorkerGroup(g, me - g * size, size, pg)
    return mine or WorkerGroup(None, 0, size)


def machine_info(device: torch.device, threads: int, procs: int) -> dict:
    """CPU model, cores, processes, threads per process, torch version and device name."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"cpu": cpu, "cores": os.cpu_count(), "procs": procs, "threads_per_proc": threads,
            "torch": torch.__version__, "device": dev, "python": platform.python_version()}


__all__ = ["machine_info", "Dist", "under_launcher", "resolve_device", "default_threads", "setup", "GROUP_STORE",
           "local_group", "teardown", "verbose", "quiet_torch_logs", "log_failure", "rank_log", "run_rank",
           "launch", "environment", "PEER_LOST", "START_METHOD", "start_server", "run_isolated",
           "all_gather_objects", "barrier", "broadcast_object", "rank", "WorkerGroup", "worker_groups"]
