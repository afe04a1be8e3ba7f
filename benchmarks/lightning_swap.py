"""SWAP in Lightning side by side (issue #26, item 4): the README's ``LightningModule`` and Fashion-MNIST
``LightningDataModule`` (examples/lightning_fashion.py), 2 DDP ranks on CPU, trained four ways:

- ``small``: Lightning alone at the small batch (2 ranks x 64 = 128), one-cycle LR peaking at 0.2;
- ``large``: Lightning alone at the large batch (2 x 512 = 1024), one-cycle LR peaking at 0.8;
- ``large+swa``: ``large`` with Lightning's ``StochasticWeightAveraging`` from epoch SWITCH
  (``swa_lrs=PHASE2_LR``; its BN update is one more epoch);
- ``swap``: ``large`` with our ``SWAP`` callback: phase 2 from epoch SWITCH, each worker at batch 128,
  constant LR PHASE2_LR, average and exact BN at the end;
- ``swap-linear``: the same with phase 2's LR decaying linearly from PHASE2_LR to 0 (the paper's shape).

For each, over seeds 0..S-1: test accuracy of the final (averaged) model on the 10,000 test images,
optimizer steps on the critical path (``trainer.global_step`` of one rank: phase 1's plus one worker's),
wall seconds of ``fit``, and the callback's cost in phase 1: seconds per step in phase-1 epochs
1..SWITCH-1 of ``swap`` against ``large`` (separate runs: the machine's drift shows too), and the share
of phase 1's time spent inside the callback's hooks (timed around each hook call). Each run is its own
launch (Lightning's launcher starts the second rank)::

    .venv/bin/python benchmarks/lightning_swap.py [--seeds 3] [--train-subset 16384] [--epochs 10]

Prints the table and writes ``benchmarks/results/lightning_swap.json``.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
VARIANTS = ("small", "large", "large+swa", "swap", "swap-linear")
SWITCH, PHASE2_LR = 7, 0.1


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def run_one(variant: str, seed: int, train_subset: int, epochs: int) -> None:
    """One fit (this process is rank 0 of Lightning's launch); rank 0 prints one JSON line."""
    sys.path.insert(0, str(ROOT))
    import lightning as L
    from lightning.pytorch.callbacks import StochasticWeightAveraging

    from examples.lightning_fashion import Classifier, FashionMNIST
    from swap.lightning import SWAP

    class EpochTimes(L.Callback):
        def __init__(self):
            self.times, self.steps = [], []

        def on_train_epoch_start(self, trainer, pl_module):
            self._t, self._s = time.perf_counter(), trainer.global_step

        def on_train_epoch_end(self, trainer, pl_module):
            self.times.append(time.perf_counter() - self._t)
            self.steps.append(trainer.global_step - self._s)

    def timed(name):
        def hook(self, *args, **kwargs):
            start, phase = time.perf_counter(), self.phase
            getattr(SWAP, name)(self, *args, **kwargs)
            if phase == 1:
                self.phase1_hook_s += time.perf_counter() - start
        return hook

    hooks = ("on_train_start", "on_train_epoch_start", "on_train_batch_start", "on_train_batch_end",
             "on_validation_end", "on_train_epoch_end")
    TimedSWAP = type("TimedSWAP", (SWAP,), {"phase1_hook_s": 0.0, **{h: timed(h) for h in hooks}})

    L.seed_everything(seed, verbose=False)
    per_rank, lr = (64, 0.2) if variant == "small" else (512, 0.8)
    timer = EpochTimes()
    callbacks = [timer]
    if variant == "large+swa":
        callbacks.append(StochasticWeightAveraging(swa_lrs=PHASE2_LR, swa_epoch_start=SWITCH))
    if variant.startswith("swap"):
        callbacks.append(TimedSWAP(switch_epoch=SWITCH, phase2_lr=PHASE2_LR,
                                   phase2_schedule="linear" if variant == "swap-linear" else "constant",
                              phase2_batch_size=128))
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=epochs, callbacks=callbacks,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0)
    model, data = Classifier(lr=lr), FashionMNIST(batch_size=per_rank, train_subset=train_subset)
    t0 = time.perf_counter()
    trainer.fit(model, datamodule=data)
    fit_s = time.perf_counter() - t0
    steps = trainer.global_step
    test = trainer.test(model, datamodule=data, verbose=False)[0]
    if trainer.is_global_zero:
        phase1 = range(1, SWITCH)                   # epoch 0 is the cold one
        per_step = sum(timer.times[e] for e in phase1) / sum(timer.steps[e] for e in phase1)
        hook_share = callbacks[-1].phase1_hook_s / sum(timer.times[:SWITCH]) if variant.startswith("swap") else None
        print("RESULT " + json.dumps({"variant": variant, "seed": seed, "test_acc": test["test_acc"],
                                      "critical_path_steps": steps, "fit_s": fit_s,
                                      "phase1_s_per_step": per_step, "phase1_hook_share": hook_share}), flush=True)
    import torch.distributed as dist
    if dist.is_initialized():        # every variant ends its process group (a plain Lightning rank sometimes aborts)
        dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--train-subset", type=int, default=16384)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated; others keep their saved runs")
    p.add_argument("--one", nargs=2, metavar=("VARIANT", "SEED"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        return run_one(args.one[0], int(args.one[1]), args.train_subset, args.epochs)
    chosen = args.variants.split(",")
    saved = RESULTS / "lightning_swap.json"
    rows = [r for r in json.loads(saved.read_text())["runs"] if r["variant"] not in chosen] if saved.exists() else []
    for seed in range(args.seeds):
        for variant in chosen:
            done = subprocess.run([sys.executable, __file__, "--one", variant, str(seed), "--train-subset",
                                   str(args.train_subset), "--epochs", str(args.epochs)],
                                  capture_output=True, text=True, cwd=ROOT)
            line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
            if done.returncode != 0 or line is None:
                sys.exit(f"{variant} seed {seed} failed:\n{done.stderr[-3000:]}")
            rows.append(json.loads(line[len("RESULT "):]))
            print(rows[-1], flush=True)
    table = {}
    for variant in VARIANTS:
        mine = [r for r in rows if r["variant"] == variant]
        if not mine:
            continue
        acc = [r["test_acc"] for r in mine]
        table[variant] = {"test_acc_mean": statistics.mean(acc), "test_acc_std": statistics.pstdev(acc),
                          "critical_path_steps": mine[0]["critical_path_steps"],
                          "fit_s_mean": statistics.mean(r["fit_s"] for r in mine),
                          "phase1_s_per_step_mean": statistics.mean(r["phase1_s_per_step"] for r in mine)}
    ratios = [s["phase1_s_per_step"] / l["phase1_s_per_step"]
              for s, l in zip([r for r in rows if r["variant"] == "swap"], [r for r in rows if r["variant"] == "large"])]
    out = {"cpu": cpu_model(), "seeds": args.seeds, "train_subset": args.train_subset, "epochs": args.epochs,
           "switch_epoch": SWITCH, "phase2_lr": PHASE2_LR, "runs": rows, "table": table,
           "phase1_step_time_swap_over_large": ratios}
    print(f"\nCPU: {out['cpu']}; {args.train_subset} training images less 2,048 held out, {args.epochs} epochs, "
          f"2 ranks; test accuracy over seeds 0-{args.seeds - 1}")
    print("| variant | test accuracy (%) | critical-path steps | fit wall (s) |")
    for variant, t in table.items():
        print(f"| {variant} | {t['test_acc_mean']:.2f} +- {t['test_acc_std']:.2f} | {t['critical_path_steps']} | "
              f"{t['fit_s_mean']:.1f} |")
    print("phase-1 time per step, swap / large:", ", ".join(f"{r:.3f}" for r in ratios))
    shares = [r["phase1_hook_share"] for r in rows if r["variant"].startswith("swap")]
    print("share of phase 1's time spent in the SWAP callback's hooks:", ", ".join(f"{x:.2e}" for x in shares))
    out["phase1_hook_share"] = shares
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "lightning_swap.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
