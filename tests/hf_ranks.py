"""The ranks of tests/test_hf_trainer.py, in two launches as users start them:
``torchrun --nproc-per-node 2 tests/hf_ranks.py OUT runs`` and ``accelerate launch --multi_gpu
--num_processes 2 tests/hf_ranks.py OUT options EXAMPLE_ARGS...``.

Five trainings of the example's GPT-2 (dropout 0.1) on fortunes (1,024 training windows of
65 bytes, 256 held-out) with :class:`swap.hf.SWAPTrainer` in the same two processes. Rank 0 writes
what the tests assert on to ``OUT/{part}.pt``. Part ``runs``:

- ``full``: switch at epoch 1 of 3 (phase 1: 16 updates at 2 x 32; phase 2: 2 worker epochs of 32
  updates at 32, constant LR 3e-3), a checkpoint every 24 updates, an evaluation each epoch (the workers' in phase 2);
  the gradient all-reduces of each phase counted by a DDP communication hook; each worker's weights at
  the end of phase 2 (from the last phase-2 checkpoint's files), the averaged weights, the metrics, the
  log history, and the held-out loss of the saved model reloaded with ``from_pretrained``;
- ``resumed_mid`` / ``resumed_edge``: new trainers resumed from the full run's checkpoints of
  updates 72 (mid phase-2 epoch) and 48 (a phase-2 epoch's end): their final weights.

Part ``options``:

- ``metric_ema``: the switch after the first evaluation (every 8 updates) whose loss is <= 4.5 nats
  per byte, one phase-2 epoch at 64 samples per update (16 updates), each worker its own EMA: the
  switch step, the EMA's samples, metrics.
- ``step_lawa_bn``: a small MLP with a BatchNorm layer (its own loss) on 512 fixed random samples, the
  switch at update 5, two phase-2 epochs of 16 updates, each worker its own LAWA of its two epoch-end
  weights: every worker's weights at each phase-2 epoch's end (gathered from both ranks), the final
  weights, the training inputs.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import Subset
from transformers import GPT2LMHeadModel, TrainerCallback, TrainingArguments

from examples.hf_fortunes import byte_windows, gpt2
from examples.hf_trainer_fortunes import main as example
from swap.hf import SWAPArguments, SWAPTrainer

OUT, PART, EXAMPLE_ARGS = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
TRAIN, HELD_OUT, BATCH = 1024, 256, 32


class CountAllReduce(TrainerCallback):
    """Registers a DDP communication hook at the start of training that counts the gradient buckets
    all-reduced in each phase (then all-reduces them as DDP does)."""

    def __init__(self, trainer):
        self.trainer, self.counts = trainer, {1: 0, 2: 0, 3: 0}

    def on_train_begin(self, args, state, control, **kwargs):
        ddp = self.trainer.model_wrapped
        if isinstance(ddp, torch.nn.parallel.DistributedDataParallel) and not getattr(ddp, "_counted", False):
            ddp.register_comm_hook(None, self.hook)
            ddp._counted = True

    def hook(self, _, bucket):
        self.counts[self.trainer.swap_phase] += 1
        buf = bucket.buffer().div_(dist.get_world_size())
        return dist.all_reduce(buf, async_op=True).get_future().then(lambda fut: fut.value()[0])


def trainer(out: Path, swap_args: SWAPArguments, epochs: int, **extra) -> SWAPTrainer:
    torch.manual_seed(0)
    train, test = byte_windows()
    args = TrainingArguments(output_dir=str(out), num_train_epochs=epochs, per_device_train_batch_size=BATCH,
                             per_device_eval_batch_size=128, learning_rate=3e-3, weight_decay=0.01,
                             lr_scheduler_type="linear", warmup_steps=2, logging_steps=8, report_to="none",
                             use_cpu=True, seed=0, disable_tqdm=True, save_only_model=False, **extra)
    return SWAPTrainer(model=gpt2(), args=args, train_dataset=Subset(train, range(TRAIN)),
                       eval_dataset=Subset(test, range(HELD_OUT)), swap_args=swap_args)


def weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def held_out_loss(model) -> float:
    """The reloaded model's own loss on the held-out rows, in a loop of our own (nats per byte)."""
    _, test = byte_windows()
    rows = torch.utils.data.DataLoader(Subset(test, range(HELD_OUT)), batch_size=128)
    model.eval()
    with torch.no_grad():
        return sum(model(**b).loss.double().item() * len(b["labels"]) for b in rows) / HELD_OUT


class BNNet(torch.nn.Module):
    """16 features -> Linear(32) -> BatchNorm1d -> ReLU -> Linear(4), its cross-entropy as ``loss``."""

    def __init__(self):
        super().__init__()
        self.fc1, self.bn, self.fc2 = torch.nn.Linear(16, 32), torch.nn.BatchNorm1d(32), torch.nn.Linear(32, 4)

    def forward(self, x, labels=None):
        logits = self.fc2(torch.relu(self.bn(self.fc1(x))))
        return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}


class EpochEnds(TrainerCallback):
    """Each phase-2 epoch's end weights of this rank's worker, taken before SWAP's own callback runs."""

    def __init__(self, trainer):
        self.trainer, self.ends = trainer, []

    def on_step_end(self, args, state, control, **kwargs):
        s = self.trainer._swap
        if self.trainer.swap_phase == 2 and (state.global_step - s.start_step) % s.steps_per_epoch == 0:
            self.ends.append(weights(self.trainer.model))


def runs() -> dict:
    """The full run, its checkpoints, and two runs resumed from them."""
    results = {}
    full_args = SWAPArguments(switch_epoch=1, phase2_lr=3e-3, phase2_schedule="constant")
    run = trainer(OUT / "full", full_args, 3, save_strategy="steps", save_steps=24, eval_strategy="epoch")
    count = CountAllReduce(run)
    run.add_callback(count)
    run.train()
    run.save_model(str(OUT / "full" / "final"))
    dist.barrier()
    if dist.get_rank() == 0:
        from safetensors.torch import load_file
        last = OUT / "full" / "checkpoint-72"
        results["full"] = {
            "counts": count.counts, "phase": run.swap_phase, "metrics": run.swap_metrics,
            "weights": weights(run.model), "log": run.state.log_history, "steps": run.state.global_step,
            "workers_at_72": [load_file(last / f"swap_worker{r}.safetensors") for r in range(2)],
            "reloaded_loss": held_out_loss(GPT2LMHeadModel.from_pretrained(OUT / "full" / "final")),
            "files_80": sorted(p.name for p in (OUT / "full" / "checkpoint-80").iterdir())}

    for name, step in (("resumed_mid", 72), ("resumed_edge", 48)):
        again = trainer(OUT / name, full_args, 3, save_strategy="steps", save_steps=24, eval_strategy="epoch")
        again.train(resume_from_checkpoint=str(OUT / "full" / f"checkpoint-{step}"))
        results[name] = {"weights": weights(again.model), "phase": again.swap_phase}
    return results


def options() -> dict:
    """The metric switch with EMA workers, the step switch with LAWA workers on a BN model, the example."""
    results = {}
    ema = trainer(OUT / "metric_ema", SWAPArguments(switch_metric="eval_loss", stop_value=4.5, greater_is_better=False,
                                                   phase2_epochs=1, phase2_lr=1e-3, phase2_batch_size=64,
                                                   average_along="ema",
                                                   along_options={"decay": 0.9}), 3,
                  eval_strategy="steps", eval_steps=8, save_strategy="no")
    ema.train()
    results["metric_ema"] = {"log": ema.state.log_history, "start_step": ema._swap.start_step,
                             "samples": ema._swap.along.count, "metrics": ema.swap_metrics,
                             "steps": ema.state.global_step}

    g = torch.Generator().manual_seed(0)
    xs = torch.randn(512, 16, generator=g) * 3 + 1
    ys = (xs @ torch.randn(16, 4, generator=g)).argmax(1)
    rows = [{"x": x, "labels": y} for x, y in zip(xs, ys)]
    torch.manual_seed(0)
    bn_run = SWAPTrainer(model=BNNet(), args=TrainingArguments(
        output_dir=str(OUT / "step_lawa_bn"), num_train_epochs=3, per_device_train_batch_size=32, learning_rate=1e-2,
        report_to="none", use_cpu=True, seed=0, disable_tqdm=True, save_strategy="no", eval_strategy="no"),
        train_dataset=rows, swap_args=SWAPArguments(switch_step=5, phase2_epochs=2, phase2_lr=1e-2,
                                                    average_along="lawa", along_options={"k": 2}))
    ends = EpochEnds(bn_run)
    bn_run.callback_handler.callbacks.insert(0, ends)
    bn_run.train()
    every_ends = [None] * dist.get_world_size()
    dist.all_gather_object(every_ends, ends.ends)
    results["step_lawa_bn"] = {"start_step": bn_run._swap.start_step, "steps": bn_run.state.global_step,
                               "phase": bn_run.swap_phase, "ends": every_ends, "weights": weights(bn_run.model),
                               "x": xs}
    results["example"] = example([str(OUT / "example"), "--swap", *EXAMPLE_ARGS])
    return results


results = {"runs": runs, "options": options}[PART]()
if dist.get_rank() == 0:
    torch.save(results, OUT / f"{PART}.pt")
