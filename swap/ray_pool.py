"""The ABS/ABSA elastic pool on Ray actors: ``abs.launcher: ray`` (the ``swap[ray]`` extra).

Yao, Gholami, Keutzer, Mahoney (arXiv 1810.01021, Sec. 4) run ABS with autoscaling on Ray. Each rank
of the pool is a Ray actor that reserves its resources (``threads`` CPUs, or 1; one GPU on CUDA), so
a pool larger than the cluster waits for Ray's autoscaler to add nodes. The actors of a group form a
torch.distributed process group (gloo on CPU, NCCL on CUDA) from the variables torchrun sets
(RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and run the rank function
the torch launcher runs (:func:`swap.distributed.run_rank`), so the two pools compute the same
thing: same ranks, batches, threads and rule decisions, the same weights bit for bit on CPU.

A resize (the rank function checkpoints and returns ``{"resize": n}``) keeps the actors: the next
group reuses the first ``n`` live processes and starts only the missing ones. An actor that dies (a
killed process, a lost node) ends its group: :class:`RankDied` is raised, the other actors are
killed and the driver (:func:`swap.algorithms.adaptive_batch.train_abs`) starts a new pool from the
last checkpoint. This module is the only one that imports Ray. Why plain actors and not Ray Train:
``docs/design.md``.
"""
from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable

from . import distributed, interrupt
from .errors import SwapError, printable

GRACE_S = 30.0          # after a rank fails, how long the others get to report (a death) before they are killed
PLACE_WARN_S = 30.0     # new actors not placed after this long: say that the pool waits for resources
EXIT_WAIT_S = 10.0      # how long the actors' processes on this node get to exit after being killed
STOP_WAIT_S = 30.0      # after a stop signal, how long the ranks get to write their checkpoints
LOOPBACK = "127.0.0.1"  # where a local Ray instance listens (its GCS, raylet, workers, agents)


class RankDied(SwapError):
    """An actor of the pool died (its process was killed, its node was lost); the run can continue
    from its last checkpoint."""


def import_ray():
    """The ``ray`` module.

    Raises:
        SwapError: Ray is not installed (one line naming the extra).
    """
    try:
        import ray
    except ModuleNotFoundError:
        raise SwapError("abs.launcher=ray needs Ray; pip install 'swap[ray]'") from None
    return ray


def cluster_address(configured: str) -> str:
    """The Ray cluster to join: ``abs.ray_address``, else ``RAY_ADDRESS``, else '' (a local Ray)."""
    return configured or os.environ.get("RAY_ADDRESS", "")


def check_address(address: str, timeout_s: float = 5.0) -> None:
    """Refuse a cluster address (``host:port`` or ``ray://host:port``, the form
    ``swap.config.check`` accepts; ``RAY_ADDRESS`` is checked here) where nothing answers
    within ``timeout_s`` seconds; ``auto`` and ``local`` are left to Ray.

    Raises:
        SwapError: the address is not host:port, or no server accepts a connection there.
    """
    if address in ("", "auto", "local"):
        return
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        raise SwapError(f"RAY_ADDRESS={printable(address)}: give host:port or ray://host:port")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise SwapError(f"abs.ray_address={printable(address)}: no Ray cluster answers there ({exc})") from None


def preflight(address: str) -> None:
    """The checks :class:`RayPool` makes on entering, made before any work (by
    :meth:`swap.methods.Method.check`): Ray is installed, the cluster address answers.

    Raises:
        SwapError: as :func:`import_ray` and :func:`check_address`.
    """
    import_ray()
    check_address(cluster_address(address))


class PoolRank:
    """One rank of the pool, in its own process (a Ray actor)."""

    def where(self) -> tuple[str, int]:
        """(node IP address, process id)."""
        import ray

        return ray.util.get_node_ip_address(), os.getpid()

    def free_port(self) -> int:
        """A TCP port free on this node now (the group's store listens on rank 0's)."""
        with socket.socket() as s:
            s.bind(("", 0))
            return s.getsockname()[1]

    def run(self, env: dict, fn: Callable[..., Any], args: tuple, log_dir: str | None, relay: str | None = None) -> Any:
        """``fn(*args)`` as rank ``env["RANK"]`` of a group (:func:`swap.distributed.run_rank`).
        ``relay``: a file that also receives this rank's standard error, which the driver prints
        (:class:`Relay`) instead of Ray's log forwarding."""
        os.environ.update(env)
        if relay is None:
            return distributed.run_rank(fn, *args, log_dir=log_dir)
        saved = sys.stderr
        with open(relay, "w", buffering=1) as copy:
            sys.stderr = _Tee(saved, copy)
            try:
                return distributed.run_rank(fn, *args, log_dir=log_dir)
            finally:
                sys.stderr = saved


class _Tee:
    """A text stream that writes to two (an actor's standard error and its relay file)."""

    def __init__(self, first, second):
        self.first, self.second = first, second

    def write(self, text: str) -> int:
        self.first.write(text)
        self.second.write(text)
        return len(text)

    def flush(self) -> None:
        self.first.flush()
        self.second.flush()

    def __getattr__(self, name: str):
        return getattr(self.first, name)


class Relay:
    """Prints the complete lines the ranks' relay files (``PoolRank.run``'s ``relay``) have gained
    since the last :meth:`pump`, on this process's standard error, without Ray's ``(PoolRank
    pid=N)`` prefix: the pool's ranks print as the torch launcher's do. The files sit in the run's
    log folder, which every node of a multi-node pool shares (its checkpoints are there too)."""

    def __init__(self, paths: list[Path]):
        self.paths, self.done = paths, [0] * len(paths)
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.unlink(missing_ok=True)

    def pump(self) -> None:
        for k, path in enumerate(self.paths):
            try:
                with open(path, "rb") as f:
                    f.seek(self.done[k])
                    text = f.read()
            except FileNotFoundError:
                continue
            complete = text[:text.rfind(b"\n") + 1]
            if complete:
                self.done[k] += len(complete)
                sys.stderr.write(complete.decode(errors="replace"))
                sys.stderr.flush()


class RayPool:
    """Ranks as Ray actors, for :func:`swap.algorithms.adaptive_batch.train_abs`. A context manager:
    entering joins the cluster at ``address`` (or starts a local Ray with ``local_cpus`` CPUs, the
    pool's largest size x ``cpus_per_rank``, dashboard and usage reporting off), leaving kills the
    actors and shuts down a Ray it started (a Ray that was already running is left running).

    Attributes:
        start_s: seconds ``ray.init`` took (0.0 when Ray was already running).
        actor_start_s: seconds spent waiting for new actors to start, over the whole run (a
            resize's new actors included: their start is also inside that resize's seconds).

    Raises:
        SwapError: Ray is missing, or the cluster address does not answer (on entering).
    """

    def __init__(self, address: str = "", cpus_per_rank: int = 1, gpus_per_rank: int = 0, local_cpus: int = 1):
        preflight(address)
        self.ray, self.address = import_ray(), cluster_address(address)
        self.cpus_per_rank, self.gpus_per_rank, self.local_cpus = cpus_per_rank, gpus_per_rank, local_cpus
        self.actors: list = []
        self.pids: set[int] = set()        # the actors' processes on this node, checked for at exit
        self.started = False
        self.start_s = self.actor_start_s = 0.0

    def __enter__(self) -> "RayPool":
        ray = self.ray
        if not ray.is_initialized():
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            t = time.perf_counter()
            # the ranks' lines reach the terminal through Relay; Ray's forwarding (its "(PoolRank pid=N)"
            # prefixes, the raylet's notices) only with --verbose
            options = dict(include_dashboard=False, logging_level="ERROR", log_to_driver=distributed.verbose())
            try:
                if self.address:
                    ray.init(address=self.address, **options)
                else:
                    self._start_local(num_cpus=self.local_cpus, **options)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise SwapError(f"Ray did not start{' at ' + self.address if self.address else ''}: "
                                f"{printable(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)}") from None
            self.started, self.start_s = True, time.perf_counter() - t
        self._quiet(not distributed.verbose())
        return self

    def _quiet(self, quiet: bool) -> None:
        """Keep the driver's printing of Ray's own notices (the raylet's multi-line report of a killed
        actor, which the restart's one line replaces) off the terminal while the pool runs. Ray has
        no option for it: its error listener prints unless ``_worker_logs_enabled`` (the flag its
        debugger clears while it holds the terminal) is False; a Ray without the flag prints."""
        worker = getattr(getattr(self.ray, "_private", None), "worker", None)
        if worker is not None and hasattr(worker, "_worker_logs_enabled"):
            if quiet:
                self._logs_were = worker._worker_logs_enabled
                worker._worker_logs_enabled = False
            elif hasattr(self, "_logs_were"):
                worker._worker_logs_enabled = self._logs_were

    def __exit__(self, *exc) -> None:
        self._kill(self.actors)
        self.actors = []
        self._quiet(False)
        if self.started:
            self.ray.shutdown()
        deadline = time.monotonic() + EXIT_WAIT_S       # ray.kill returns before the process has gone
        while self.pids and time.monotonic() < deadline:
            self.pids = {pid for pid in self.pids if _alive(pid)}
            time.sleep(0.05)
        for pid in self.pids:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass

    def info(self) -> dict:
        """What the run's summary records of the launcher."""
        return {"name": "ray", "ray_start_s": self.start_s, "actor_start_s": self.actor_start_s,
                "address": self.address or "local"}

    def _kill(self, actors: list) -> None:
        for a in actors:
            self.ray.kill(a)

    def _start_local(self, **options) -> None:
        """``ray.init(**options)`` of an instance on this machine whose servers (GCS, raylet, the
        workers', the agents') listen on the loopback interface only. Ray binds them to the node's
        address, which is the loopback one where Ray does not form clusters (its macOS and Windows
        default): that switch (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``) is set while Ray starts, in
        the environment its processes inherit and in this process's copy of the constant."""
        from ray._private import ray_constants
        kept = ray_constants.ENABLE_RAY_CLUSTER
        ray_constants.ENABLE_RAY_CLUSTER = False
        try:
            with distributed.environment(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0"):
                self.ray.init(_node_ip_address=LOOPBACK, **options)
        finally:
            ray_constants.ENABLE_RAY_CLUSTER = kept

    def _group(self, n: int) -> list:
        """``n`` live actors: the pool's first ``n``, new ones for the rest; extra ones are released."""
        ray = self.ray
        self._kill(self.actors[n:])
        self.actors = self.actors[:n]
        if len(self.actors) < n:
            cls = ray.remote(num_cpus=self.cpus_per_rank, num_gpus=self.gpus_per_rank)(PoolRank)
            t = time.perf_counter()
            new = [cls.remote() for _ in range(n - len(self.actors))]
            refs = [a.where.remote() for a in new]
            if len(ray.wait(refs, num_returns=len(refs), timeout=PLACE_WARN_S)[0]) < len(refs):
                print(f"swap: waiting for Ray to place {n} ranks of {self.cpus_per_rank} CPU(s)"
                      f"{f' and {self.gpus_per_rank} GPU' if self.gpus_per_rank else ''} each (the cluster has "
                      f"less free; an autoscaler adds nodes)", file=sys.stderr, flush=True)
            here = ray.util.get_node_ip_address()
            self.pids |= {pid for node, pid in ray.get(refs) if node == here}       # started and placed
            self.actor_start_s += time.perf_counter() - t
            self.actors += new
        return self.actors

    def launch(self, fn: Callable[..., Any], nprocs: int, *args: Any, log_dir: str | Path | None = None) -> Any:
        """Run ``fn(*args)`` on ``nprocs`` actors as one process group (the torch launcher's
        :func:`swap.distributed.launch`, same arguments); return rank 0's return value.

        Raises:
            RankDied: an actor died; the others were killed (continue from the last checkpoint).
            SwapError: a rank failed (one line, as the torch launcher's).
            swap.interrupt.Interrupted: this process got SIGINT/SIGTERM; the ranks on this node got
                it too and wrote their checkpoints (up to 30 s), the rest were killed.
        """
        if self.address:                                      # a cluster: the group's store on rank 0's node
            return self._launch(fn, nprocs, args, log_dir, {})
        with distributed.local_group() as (_, group_env):     # this machine: a file store, nothing listens
            return self._launch(fn, nprocs, args, log_dir, group_env)

    def _launch(self, fn: Callable[..., Any], nprocs: int, args: tuple, log_dir: str | Path | None,
                group_env: dict) -> Any:
        """:meth:`launch` with ``group_env`` added to every rank's environment."""
        ray = self.ray
        actors = self._group(nprocs)
        places = ray.get([a.where.remote() for a in actors])
        nodes = [node for node, _ in places]
        master = places[0][0]
        port = ray.get(actors[0].free_port.remote())
        refs = {}
        relay = None
        if log_dir is not None and not distributed.verbose():
            relay = Relay([Path(log_dir) / f"ray_rank{rank}.out" for rank in range(nprocs)])
        for rank, actor in enumerate(actors):
            env = {"RANK": str(rank), "WORLD_SIZE": str(nprocs), "LOCAL_RANK": str(nodes[:rank].count(nodes[rank])),
                   "LOCAL_WORLD_SIZE": str(nodes.count(nodes[rank])), "MASTER_ADDR": master, "MASTER_PORT": str(port),
                   **group_env}
            refs[actor.run.remote(env, fn, args, None if log_dir is None else str(log_dir),
                                  None if relay is None else str(relay.paths[rank]))] = rank
        results, died, failed = {}, [], []
        pending, deadline = list(refs), None
        with interrupt.handle_signals():
            while pending:
                done, pending = ray.wait(pending, num_returns=1, timeout=0.2)
                if relay is not None:
                    relay.pump()
                for ref in done:
                    try:
                        results[refs[ref]] = ray.get(ref)
                    except ray.exceptions.RayActorError:
                        died.append(refs[ref])
                    except ray.exceptions.RayTaskError as exc:
                        failed.append((refs[ref], exc))
                if died:                                      # a restart, whatever the others say
                    break
                if failed and deadline is None:               # a death may explain a failure: wait for it
                    deadline = time.monotonic() + GRACE_S
                if deadline is not None and time.monotonic() > deadline:
                    break
                if interrupt.requested():
                    self._stop(places, pending, interrupt.requested())
        if relay is not None:
            relay.pump()
        if died or failed:
            self._kill(self.actors)
            self.actors = []
        if died:
            raise RankDied(f"rank {min(died)} of {nprocs} died (its Ray actor's process ended)")
        if failed:
            rank, exc = min(failed, key=lambda f: f[0])
            cause = getattr(exc, "cause", None)
            raise SwapError(str(cause) if isinstance(cause, SwapError) else
                            f"rank {rank} failed: {printable(str(cause or exc).strip().splitlines()[-1])}") from None
        return results[0]

    def _stop(self, places: list, pending: list, signum: int) -> None:
        """Forward ``signum`` to the ranks on this node, give them STOP_WAIT_S to checkpoint, kill the rest."""
        here = self.ray.util.get_node_ip_address()
        for node, pid in places:
            if node == here:
                try:
                    os.kill(pid, signum)
                except ProcessLookupError:
                    pass
        self.ray.wait(pending, num_returns=len(pending), timeout=STOP_WAIT_S)
        self._kill(self.actors)
        self.actors = []
        raise interrupt.Interrupted(signum, "while the ranks were running")


def _alive(pid: int) -> bool:
    """True while process ``pid`` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def pool_resources(cfg) -> tuple[int, int]:
    """(CPUs, GPUs) each rank reserves: ``threads`` CPUs (1 when 0), one GPU on CUDA."""
    return max(1, cfg.threads), int(distributed.resolve_device(cfg.device).type == "cuda")


__all__ = ["RayPool", "RankDied", "import_ray", "check_address", "cluster_address", "preflight", "pool_resources"]
