"""The ranks of tests/test_lightning.py: ``torchrun --nproc-per-node 2 tests/lightning_ranks.py OUT``.

One launch, five ``trainer.fit`` in the same two processes (torchrun starts them, so an interrupted
fit leaves them alive for its resume). Each fit is the README's example module on dict batches with
AdamW instead of SGD + one-cycle (the README's own example runs in tests/test_readme.py), on a
Fashion-MNIST subset, with the :class:`swap.lightning.SWAP` callback switching on a stopping accuracy
(60% validation accuracy, reached after epoch 0): phase 1 on 2 ranks x 64, then 2 phase-2 epochs
(each worker at batch 64), and the fit ends there (epoch 3 of max_epochs=5). Rank 0 writes what the test asserts on to
``OUT/results.pt``:

- ``full``: the uninterrupted fit: averaged weights, the callback's metrics, and the BN statistics of
  one process's own pass over all the training data (forward hooks, float64), which the callback's
  sharded recompute must equal;
- ``interrupted``: a fit resumed from the uninterrupted fit's checkpoint of step 36 (phase 2),
  stopped by a KeyboardInterrupt on both ranks (epoch 2, batch 5), caught by Lightning, whose
  ``OnExceptionCheckpoint`` writes a checkpoint; then ``fit(ckpt_path=...)`` again;
- ``killed``: ``fit(ckpt_path=...)`` from the uninterrupted fit's checkpoint of step 44 (mid-epoch 1,
  in phase 2), the last file a run killed after it leaves;
- ``phase2_batch``: a short fit whose workers train at ``phase2_batch_size=32``;
- ``bn1d``: a module with a BatchNorm1d layer on 449 training images (batch 32, the user's loader with
  ``drop_last=True``): the BN pass's batches leave one sample over, which joins the last batch; the
  recomputed statistics and a float64 pass over all 449 samples.
"""
from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint

from examples.lightning_fashion import Classifier, FashionMNIST
from swap.lightning import SWAP

OUT = Path(sys.argv[1])
SUBSET, HOLDOUT, BATCH = 3072, 1024, 64          # 2,048 training images: 16 steps per phase-1 epoch, 32 in phase 2
STOP_ACC = 60.0                                  # the stopping accuracy: validation reaches it after epoch 0


class DictBatches(FashionMNIST):
    """The same data as ``{"pixels": (N, 1, 28, 28), "label": (N,)}`` batches."""

    def train_dataloader(self):
        return self._dicts(super().train_dataloader())

    def val_dataloader(self):
        return self._dicts(super().val_dataloader())

    @staticmethod
    def _dicts(dl):
        def collate(samples):
            x, y = torch.utils.data.default_collate(samples)
            return {"pixels": x, "label": y}
        return torch.utils.data.DataLoader(dl.dataset, batch_size=dl.batch_size, shuffle=dl.batch_size == BATCH,
                                           collate_fn=collate)


class AdamWOnDicts(Classifier):
    """The example's module on dict batches, with AdamW and no LR scheduler."""

    def training_step(self, batch, batch_idx):
        return super().training_step((batch["pixels"], batch["label"]), batch_idx)

    def validation_step(self, batch, batch_idx):
        return super().validation_step((batch["pixels"], batch["label"]), batch_idx)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=5e-4)


class ValAcc(L.Callback):
    """Each epoch's logged val_acc, as the SWAP callback reads it."""

    def __init__(self):
        self.history = []

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.history.append(float(trainer.callback_metrics["val_acc"]))


class Interrupt(L.Callback):
    """Ctrl-C on every rank at the start of (epoch, batch)."""

    def __init__(self, epoch: int, batch: int):
        self.at = (epoch, batch)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if (trainer.current_epoch, batch_idx) == self.at:
            raise KeyboardInterrupt


def fit(name: str, *, callbacks=(), ckpt_path=None):
    L.seed_everything(0, verbose=False)
    swap_cb = SWAP(monitor="val_acc", stop_value=STOP_ACC, phase2_epochs=2, phase2_lr=2e-3, phase2_schedule="constant")
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=5, logger=False,
                        callbacks=[swap_cb, *callbacks], enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, default_root_dir=OUT / name)
    model = AdamWOnDicts(lr=3e-3)
    data = DictBatches(batch_size=BATCH, train_subset=SUBSET, holdout=HOLDOUT)
    try:
        trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    except SystemExit:                               # Lightning's answer to a KeyboardInterrupt
        return None, None, trainer
    return model, swap_cb, trainer


def bn_reference(model: Classifier, data: FashionMNIST) -> dict:
    """Each BN layer's mean and unbiased variance of its inputs over all the training data, one process."""
    inputs: dict[str, list] = {}
    bns = {n: m for n, m in model.net.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: inputs.setdefault(n, []).append(a[0].double()))
             for n, m in bns.items()]
    model.train()
    with torch.no_grad():
        for x, _ in torch.utils.data.DataLoader(data.train, batch_size=BATCH):
            model(x)
    for h in hooks:
        h.remove()
    out = {}
    for n, xs in inputs.items():
        x = torch.cat([t.transpose(0, 1).reshape(t.shape[1], -1) for t in xs], 1)
        out[n] = (x.mean(1), x.var(1))
    return out


class MLP(Classifier):
    """Flatten -> Linear -> BatchNorm1d -> ReLU -> Linear, SGD; the BN layer's input does not depend on
    how the samples are batched, so its exact statistics are those of one float64 pass."""

    def __init__(self):
        super().__init__(lr=0.05)
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 64), torch.nn.BatchNorm1d(64),
                                       torch.nn.ReLU(), torch.nn.Linear(64, 10))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class DropLast(FashionMNIST):
    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.train, batch_size=self.batch_size, shuffle=True, drop_last=True)


def bn1d() -> dict:
    """A fit whose BN pass leaves one sample over: 449 images, 14 batches of 32 and one of 1."""
    L.seed_everything(0, verbose=False)
    data = DropLast(batch_size=32, train_subset=449 + 512, holdout=512)
    model = MLP()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False,
                        callbacks=[SWAP(switch_epoch=1, phase2_lr=0.01)], enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, enable_checkpointing=False)
    trainer.fit(model, datamodule=data)
    bn = model.net[2]
    with torch.no_grad():
        x = model.net[1](model.net[0](data.train.tensors[0])).double()
    return {"n": len(data.train), "running": (bn.running_mean.double(), bn.running_var.double()),
            "reference": (x.mean(0), x.var(0))}


def main() -> None:
    results = {}
    every = ModelCheckpoint(dirpath=OUT / "steps", every_n_train_steps=4, save_top_k=-1, filename="{step}")
    val_acc = ValAcc()
    model, cb, trainer = fit("full", callbacks=[every, val_acc])
    data = trainer.datamodule
    results["full"] = {"weights": {k: v.clone() for k, v in model.state_dict().items()}, "metrics": cb.metrics,
                       "phase": cb.phase, "switch_epoch": cb._start_epoch, "val_acc": val_acc.history,
                       "epochs": trainer.current_epoch, "steps": trainer.global_step,
                       "bn": {n: (m.running_mean.double(), m.running_var.double()) for n, m in model.net.named_modules()
                              if isinstance(m, torch.nn.BatchNorm2d)}}
    results["full"]["bn_reference"] = bn_reference(model, data)       # (its train-mode pass moves the running stats)
    on_exception = OnExceptionCheckpoint(dirpath=OUT / "interrupt", filename="interrupted")
    fit("interrupted", callbacks=[Interrupt(2, 5), on_exception], ckpt_path=OUT / "steps" / "step=36.ckpt")
    model, cb, _ = fit("resumed", ckpt_path=OUT / "interrupt" / "interrupted.ckpt")
    results["interrupted"] = {"weights": model.state_dict(), "metrics": cb.metrics}
    model, cb, _ = fit("killed", ckpt_path=OUT / "steps" / "step=44.ckpt")
    results["killed"] = {"weights": model.state_dict(), "metrics": cb.metrics}
    # workers at a batch of their own: phase 1 (epoch 0) at 2 x 64, phase 2 (epoch 1) at 32 per worker
    L.seed_everything(0, verbose=False)
    small = SWAP(switch_epoch=1, phase2_lr=1e-3, phase2_batch_size=32)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False, callbacks=[small],
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        enable_checkpointing=False)
    trainer.fit(AdamWOnDicts(lr=3e-3), datamodule=DictBatches(batch_size=BATCH, train_subset=SUBSET, holdout=HOLDOUT))
    results["phase2_batch"] = {"steps": trainer.global_step, "metrics": small.metrics}
    results["bn1d"] = bn1d()
    if trainer.is_global_zero:
        torch.save(results, OUT / "results.pt")


if __name__ == "__main__":
    main()
