"""SWAP in your own Lightning Trainer: Fashion-MNIST, 2 ranks on CPU (docs/guide/lightning.md)."""
import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import swap
from swap.lightning import SWAP

EPOCHS, SWITCH_EPOCH, TRAIN_SUBSET = 8, 5, 8192      # phase 1: epochs 0-4 on 2 ranks; phase 2: 5-7


class FashionMNIST(L.LightningDataModule):
    """The first ``train_subset`` training images less ``holdout`` for validation; the test set."""

    def __init__(self, batch_size=128, train_subset=TRAIN_SUBSET, holdout=2048):
        super().__init__()
        self.batch_size, self.train_subset, self.holdout = batch_size, train_subset, holdout

    def setup(self, stage):
        def tensors(d):        # uint8 (N, 1, 28, 28) -> float, mean 0 and std 1
            return TensorDataset((d.images.float() / 255 - 0.286) / 0.353, d.labels)
        train, val = swap.load_dataset("fashion-mnist", train_subset=self.train_subset, holdout=self.holdout)
        self.train, self.val, self.test = tensors(train), tensors(val), tensors(swap.load_dataset("fashion-mnist")[1])

    def train_dataloader(self):
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val, batch_size=512)

    def test_dataloader(self):
        return DataLoader(self.test, batch_size=512)


class Classifier(L.LightningModule):
    """swap's small CNN (BatchNorm after each conv), SGD with Nesterov momentum, one-cycle LR."""

    def __init__(self, lr=0.2):
        super().__init__()
        self.lr, self.net = lr, swap.small_cnn(num_classes=10)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def evaluate(self, batch, split):
        x, y = batch
        logits = self(x)
        self.log(f"{split}_loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log(f"{split}_acc", (logits.argmax(1) == y).float().mean() * 100, sync_dist=True)

    def validation_step(self, batch, batch_idx):
        self.evaluate(batch, "val")

    def test_step(self, batch, batch_idx):
        self.evaluate(batch, "test")

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, self.lr, total_steps=self.trainer.estimated_stepping_batches)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


if __name__ == "__main__":
    L.seed_everything(0)
    swap_callback = SWAP(switch_epoch=SWITCH_EPOCH, phase2_lr=0.1, phase2_schedule="constant")
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=EPOCHS, callbacks=[swap_callback],
                        logger=False, enable_checkpointing=False)
    model, data = Classifier(), FashionMNIST()
    trainer.fit(model, datamodule=data)                  # every rank now holds the averaged model
    test = trainer.test(model, datamodule=data, verbose=False)[0]
    if trainer.is_global_zero:                           # validation accuracy (%) of each worker and of the average
        print({"workers": [round(m["val_acc"], 2) for m in swap_callback.metrics["workers"]],
               "averaged": round(swap_callback.metrics["average"]["val_acc"], 2), "test_acc": round(test["test_acc"], 2)})
