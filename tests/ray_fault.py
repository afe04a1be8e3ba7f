"""A model for the Ray pool's dead-actor test: the small CNN (same class, parameters and computation
as ``model.name: smallcnn``) whose rank 1 kills its own process with SIGKILL at its DIE_AT-th training
forward while the file named by ``SWAP_TEST_DIE`` exists (the file is removed first, so the
restarted pool trains on)."""
from __future__ import annotations

import os
import signal

from swap.models import small_cnn

DIE_AT = 5          # rank 1's 5th training forward: the middle of the run's second epoch (8 steps at batch 128)
_forwards = [0]


def cnn():
    model = small_cnn(num_classes=10, in_channels=1)
    model.register_forward_pre_hook(_maybe_die)
    return model


def _maybe_die(module, args) -> None:
    marker = os.environ.get("SWAP_TEST_DIE", "")
    if module.training and os.environ.get("RANK") == "1" and marker and os.path.exists(marker):
        _forwards[0] += 1
        if _forwards[0] == DIE_AT:
            os.unlink(marker)
            os.kill(os.getpid(), signal.SIGKILL)
