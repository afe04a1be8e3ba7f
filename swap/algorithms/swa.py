"""Sequential SWA baselines of the SWAP paper's Table 4 (Gupta et al., ICLR 2020, Sec. 5.3), built on
Stochastic Weight Averaging (Izmailov, Podoprikhin, Garipov, Vetrov, Wilson, UAI 2018, Algorithm 1)::

    start    a trained model: SWAP's phase-1 model (same seed, stopped at the same accuracy) for
             "swa-large" and "swa-lb-sb", or the small-batch SGD model for "swa-small";
    cycles   K = workers cycles of E = phase2.epochs epochs each (the same number of sampled
             models and epochs per sample as SWAP); within a cycle the LR falls linearly from its
             max to its min (cyclic schedule, SWA Eq. 2); data-parallel over the ranks;
    sample   at the end of each cycle the weights join a running uniform average
             (torch.optim.swa_utils.AveragedModel);
    finish   BN statistics of the average are recomputed (swa_utils.update_bn) and it is evaluated.

Variants: "swa-large" runs its cycles at phase 1's large batch and the ``swa.large_lr_*`` LRs;
"swa-lb-sb" and "swa-small" at phase 2's small batch, LR ``phase2.peak_lr`` -> ``swa.lr_min``.
"""
from __future__ import annotations

import time

from torch.optim.swa_utils import AveragedModel

from .. import distributed
from ..callbacks import On
from ..checkpoint import load_checkpoint, save_checkpoint
from ..schedules import cyclic
from ..context import Context
from ..errors import SwapError
from ..methods import RunSpec
from .sgd import DataParallel, train_data_parallel

#: The SWA baselines of ``swap compare`` (SWAP paper Table 4)
VARIANTS = ("swa-large", "swa-lb-sb", "swa-small")


def run_swa(spec: RunSpec, variant: str = "swa-small") -> dict | None:
    """SWA cycles from a start checkpoint on every rank; rank 0 returns the summary.

    Args:
        spec: the run; ``spec.start`` is ``{"checkpoint": base path of the start model, "summary":
            the start run's summary.json}``; its wall time, updates and samples are added to this
            run's, since the SWA method includes the training that produced its start model.
        variant: one of :data:`VARIANTS`.
    Raises:
        SwapError: unknown variant or no start.
        SwapError: the start checkpoint does not match the model.
    """
    cfg, start = spec.cfg, spec.start
    if variant not in VARIANTS or not start:
        raise SwapError(f"run_swa needs a variant in {VARIANTS} and a start checkpoint")
    ctx = Context.for_run(spec)
    d = ctx.dist
    model = ctx.build_model()
    load_checkpoint(start["checkpoint"], model)
    epochs_per_cycle, cycles = cfg.phase2.epochs, cfg.workers
    if variant == "swa-large":
        batch, micro, lr_max, lr_min = cfg.phase1.batch_size, cfg.phase1.micro_batch_size, cfg.swa.large_lr_max, cfg.swa.large_lr_min
    else:
        batch, micro, lr_max, lr_min = cfg.phase2.batch_size, 0, cfg.phase2.peak_lr, cfg.swa.lr_min
    steps = len(ctx.train_set) // batch                   # updates per epoch (last partial batch dropped)
    averaged = AveragedModel(model)

    def sample(record: dict) -> None:
        if record["epoch"] % epochs_per_cycle == 0:        # end of a cycle: the LR is at its minimum
            averaged.update_parameters(model)

    plan = DataParallel("swa", batch, micro, cycles * epochs_per_cycle, lr_at=cyclic(lr_max, lr_min, epochs_per_cycle * steps),
                        optim_section="phase1" if variant == "swa-large" else "phase2")
    out = train_data_parallel(ctx, model, plan, final=False, callbacks=[On(epoch_end=sample)])
    summary = None
    if d.is_main:
        t_bn = time.perf_counter()
        ctx.recompute_bn(averaged.module)
        acc = ctx.evaluate(averaged.module).get("top1")
        bn_s = time.perf_counter() - t_bn
        save_checkpoint(ctx.run.checkpoint("swa"), averaged.module,
                        {"config_hash": cfg.hash(), "phase": variant, "models": int(averaged.n_averaged), "test_acc": acc})
        ctx.log({"phase": "swa_average", "worker": None, "epoch": None, "test_acc": acc,
                     "phase_wall_s": bn_s, "wall_s": time.time() - ctx.t0})
        s0 = start_cost(start["summary"])
        walls = {"start": s0["wall_s"], "swa": out["wall_s"], "bn": bn_s}
        walls["total"] = sum(walls.values())
        summary = {
            "method": variant, "config": cfg.name, "seed": cfg.seed,
            "test_acc": {"final": acc, "last_iterate": out["test_acc"], "start": s0["test_acc"]},
            "wall_s": walls,
            "epochs": {"swa": out["epoch"], "cycles": cycles, "epochs_per_cycle": epochs_per_cycle},
            "models_averaged": int(averaged.n_averaged),
            "updates": {"start": s0["updates"], "swa": out["updates"], "critical_path": s0["updates"] + out["updates"]},
            "samples": s0["samples"] + out["samples"],
            "batch_size": {"swa": batch},
            "lr": {"max": lr_max, "min": lr_min},
            "machine": ctx.machine(),
        }
        ctx.write_summary(summary)
    distributed.teardown()
    return summary


def start_cost(summary: dict) -> dict:
    """What producing the start model cost: for a SWAP run its phase 1 only, for SGD the whole run.

    Returns ``{"wall_s", "updates", "samples", "test_acc"}`` (seconds, counts, percent).
    """
    if summary["method"] == "swap":
        return {"wall_s": summary["wall_s"]["phase1"], "updates": summary["updates"]["phase1"],
                "samples": summary["updates"]["phase1"] * summary["batch_size"]["phase1"],
                "test_acc": summary["test_acc"]["phase1"]}
    return {"wall_s": summary["wall_s"]["total"], "updates": summary["updates"]["critical_path"],
            "samples": summary["samples"], "test_acc": summary["test_acc"]["final"]}


__all__ = ["VARIANTS", "run_swa", "start_cost"]
