"""GPT-2 on Debian's fortunes with the Hugging Face Trainer, and the same script with SWAP.

The model is the small byte-level GPT-2 of :mod:`examples.hf_fortunes` (built from its config: nothing
is downloaded); the rows are windows of 65 bytes whose labels are their inputs (the model computes its
own causal-LM loss). ``--swap`` changes two things: the class (``SWAPTrainer`` for ``Trainer``) and one
argument (``swap_args``)::

    torchrun --nproc-per-node 2 examples/hf_trainer_fortunes.py OUT               # the Trainer alone
    torchrun --nproc-per-node 2 examples/hf_trainer_fortunes.py OUT --swap        # SWAP in the Trainer
    accelerate launch --cpu --num_processes 2 examples/hf_trainer_fortunes.py OUT --swap

Rank 0 prints one JSON line: the held-out loss (nats per byte) of the final model, with SWAP each
worker's too, the updates, and the training's wall-clock seconds. Run from the repository root.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import transformers
from torch.utils.data import Subset
from transformers import Trainer, TrainingArguments

from examples.hf_fortunes import byte_windows, gpt2
from swap.hf import SWAPArguments, SWAPTrainer


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out")
    p.add_argument("--swap", action="store_true", help="SWAPTrainer: phase 2 from --switch-epoch at --phase2-lr")
    p.add_argument("--epochs", type=int, default=6, help="epochs of the whole run (default 6)")
    p.add_argument("--max-steps", type=int, default=-1, help="the Trainer alone: stop after this many updates")
    p.add_argument("--batch", type=int, default=64, help="per-device batch, samples (default 64)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak LR of AdamW, linear decay after 2%% warm-up")
    p.add_argument("--switch-epoch", type=int, default=4, help="SWAP: phase 1's epochs (default 4)")
    p.add_argument("--phase2-lr", type=float, default=1e-3, help="SWAP: phase 2's constant LR (default 1e-3)")
    p.add_argument("--train-subset", type=int, default=8192, help="training windows (default 8192)")
    p.add_argument("--eval-subset", type=int, default=1024, help="held-out windows (default 1024)")
    p.add_argument("--validation", action="store_true",
                   help="hold out the last --eval-subset training windows instead of the test tail (tuning)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    transformers.logging.set_verbosity_error()
    train, test = byte_windows()
    if a.validation:
        test = Subset(train, range(len(train) - a.eval_subset, len(train)))
    train, test = Subset(train, range(a.train_subset)), Subset(test, range(a.eval_subset))
    args = TrainingArguments(output_dir=a.out, num_train_epochs=a.epochs, max_steps=a.max_steps,
                             per_device_train_batch_size=a.batch, ddp_find_unused_parameters=False,
                             per_device_eval_batch_size=256, learning_rate=a.lr, weight_decay=0.1,
                             adam_beta2=0.95, warmup_steps=0.02, max_grad_norm=1.0, lr_scheduler_type="linear",
                             logging_steps=50, eval_strategy="no", save_strategy="no", report_to="none",
                             use_cpu=True, seed=a.seed, disable_tqdm=True, log_level="error")
    torch.manual_seed(a.seed)
    common = dict(model=gpt2(), args=args, train_dataset=train, eval_dataset=test)
    if a.swap:
        trainer = SWAPTrainer(**common, swap_args=SWAPArguments(switch_epoch=a.switch_epoch, phase2_lr=a.phase2_lr,
                                                                phase2_schedule="constant"))
    else:
        trainer = Trainer(**common)
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    result = {"method": "swap" if a.swap else "trainer", "eval_loss": trainer.evaluate()["eval_loss"],
              "steps": trainer.state.global_step, "wall_s": round(wall, 2), "seed": a.seed}
    if a.swap:   # each worker's loss, and phase 1's updates and seconds (its train() summary, at the switch)
        result["workers_eval_loss"] = [w["loss"] for w in trainer.swap_metrics["workers"]]
        phase1 = next(e for e in trainer.state.log_history if "train_runtime" in e)
        result["phase1"] = {"steps": phase1["step"], "train_s": phase1["train_runtime"]}
    else:
        result["train_s"] = next(e for e in reversed(trainer.state.log_history) if "train_runtime" in e)["train_runtime"]
    if trainer.is_world_process_zero():
        print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    from swap.distributed import teardown
    main()
    teardown()      # leave the process group while the interpreter is whole (else gloo can abort at exit)
