"""Clean stops on SIGINT/SIGTERM: every rank finishes its current update, all ranks agree on the
step to stop at, each writes a resumable checkpoint, and the run exits with a message saying how
to resume.

A handler only sets a flag (nothing is written from inside a signal handler); the train loop
polls :func:`stop_agreed` after every update, or under data parallelism after every
:data:`CHECK_EVERY`-th one. There the ranks may receive the signal between different updates
(Ctrl-C reaches every process of the terminal's group; the elastic agent forwards SIGTERM to its
workers one by one), so the flag is all-reduced with MAX: all ranks stop after the same update and
their checkpoints describe the same point.
"""
from __future__ import annotations

import contextlib
import signal
import threading

import torch
import torch.distributed as dist

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: The data-parallel updates between two agreements on a stop (the all-reduce is tiny but synchronous,
#: so it is not paid on every update).
CHECK_EVERY = 8
_received: list[int] = []            # signal numbers received in this process since install


class Interrupted(Exception):
    """Raised by the train loop after the checkpoint of the stop point is written.

    Attributes:
        signum: the signal that asked for the stop (``signal.SIGINT`` or ``signal.SIGTERM``).
        where: a short text naming phase/worker, epoch and step, for the resume message.
    """

    def __init__(self, signum: int, where: str):
        super().__init__(f"stopped by {signal.Signals(signum).name} {where}")
        self.signum, self.where = signum, where


@contextlib.contextmanager
def handle_signals():
    """Within the block, SIGINT and SIGTERM set a flag instead of killing the process; the
    previous handlers come back on exit. A no-op outside the main thread (Python only delivers
    signals there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _received.clear()
    previous = {s: signal.signal(s, lambda signum, frame: _received.append(signum)) for s in _SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def requested() -> int:
    """The first signal received by this process since :func:`handle_signals` began (0 if none)."""
    return _received[0] if _received else 0


def stop_agreed(group_wide: bool, device: torch.device | str = "cpu", group=None) -> int:
    """The signal to stop for, agreed over the ranks of ``group`` (None: all ranks) when
    ``group_wide`` (an all_reduce of one integer on ``device`` per call, so call it at the same
    point on every rank of the group); 0 means go on."""
    signum = requested()
    if group_wide and dist.is_available() and dist.is_initialized():
        flag = torch.tensor([signum], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        signum = int(flag.item())
    return signum


__all__ = ["CHECK_EVERY", "Interrupted", "handle_signals", "requested", "stop_agreed"]
