"""SWAP as a Lightning callback (swap.lightning.SWAP): two ranks on CPU (gloo) on Fashion-MNIST
subsets, in one torchrun launch shared by the tests (tests/lightning_ranks.py); the README's example
runs through Lightning's own launcher in tests/test_readme.py."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from swap.errors import SwapError
from swap.lightning import SWAP

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, real_fashion):
    """What rank 0 of tests/lightning_ranks.py wrote: five fits of the example module on 2 ranks."""
    out = tmp_path_factory.mktemp("lightning")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(ROOT / "tests" / "lightning_ranks.py"), str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "terminate called" not in done.stderr
    return torch.load(out / "results.pt", weights_only=False)


def _gain(metrics: dict) -> tuple[float, float]:
    """(averaged - mean worker) in validation accuracy points, (mean worker - averaged) in loss."""
    workers = metrics["workers"]
    acc = sum(w["val_acc"] for w in workers) / len(workers)
    loss = sum(w["val_loss"] for w in workers) / len(workers)
    return metrics["average"]["val_acc"] - acc, loss - metrics["average"]["val_loss"]


def test_the_averaged_model_is_better_than_its_workers(ranks):
    """Dict batches and AdamW: the average of the 2 workers (BN recomputed) beats their mean in
    validation accuracy and each of them in validation loss."""
    full = ranks["full"]
    assert full["phase"] == 3 and len(full["metrics"]["workers"]) == 2
    acc_gain, loss_gain = _gain(full["metrics"])
    assert acc_gain > 0 and loss_gain > 0, full["metrics"]
    assert full["metrics"]["average"]["val_loss"] < min(w["val_loss"] for w in full["metrics"]["workers"])
    assert full["metrics"]["average"]["val_acc"] > 75.0          # 2,048 images, 3 epochs; chance is 10%


def test_the_switch_comes_after_the_first_epoch_at_the_stopping_accuracy_and_the_fit_ends_with_phase_2(ranks):
    full = ranks["full"]
    first = next(e for e, acc in enumerate(full["val_acc"]) if acc >= 60.0)
    assert full["switch_epoch"] == first + 1 == 1, full["val_acc"]
    assert full["epochs"] == 3 and len(full["val_acc"]) == 3             # max_epochs=5; 2 phase-2 epochs
    assert full["steps"] == 2048 // 128 + 2 * 2048 // 64                 # phase 1 on 2 ranks x 64, workers at 64


def test_workers_train_at_their_own_batch_size(ranks):
    run = ranks["phase2_batch"]
    assert run["steps"] == 2048 // 128 + 2048 // 32                     # 1 phase-1 epoch at 2 x 64, 1 at 32
    assert run["metrics"]["average"]["val_loss"] < min(w["val_loss"] for w in run["metrics"]["workers"])


def test_the_bn_pass_takes_a_set_that_leaves_one_sample_over(ranks):
    """449 images at batch 32 on 2 ranks (the user's loader drops its last batch): the BN pass's
    one-sample remainder joins the last batch, no train-mode BN sees one value per channel, and the
    statistics are those of every sample (a float64 pass over all 449)."""
    run = ranks["bn1d"]
    assert run["n"] == 449 and 449 % 32 == 1
    (mean, var), (ref_mean, ref_var) = run["running"], run["reference"]
    assert torch.allclose(mean, ref_mean, rtol=0, atol=1e-5) and torch.allclose(var, ref_var, rtol=1e-5, atol=1e-5)


class _Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 2)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_ddp_spawn_is_refused_in_one_line_before_any_rank_starts(tmp_path):
    """ddp_spawn would train in processes that send only rank 0's weights back: the callback's
    metrics and workers would stay there. Refused in the launching process, before a rank starts."""
    data = torch.utils.data.TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,)))
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=2, logger=False,
                        callbacks=[SWAP(switch_epoch=1, phase2_lr=0.1)], enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path)
    with pytest.raises(SwapError, match=r"^SWAP needs Trainer\(strategy='ddp'\), whose ranks are the script's own "
                                        r"processes; strategy ddp_spawn trains in processes that return only "
                                        r"rank 0's weights to this one$"):
        trainer.fit(_Tiny(), torch.utils.data.DataLoader(data, batch_size=8))
    assert trainer.global_step == 0


def test_a_monitor_the_module_does_not_log_is_one_error_at_the_first_validated_epoch_end():
    from types import SimpleNamespace
    callback = SWAP(monitor="val_accuracy", stop_value=90.0, phase2_epochs=2, phase2_lr=0.1)
    trainer = SimpleNamespace(sanity_checking=False, callback_metrics={"val_acc": 80.0, "train_loss": 0.5},
                              current_epoch=0, fit_loop=SimpleNamespace(max_epochs=5),
                              strategy=SimpleNamespace(broadcast=lambda value, src: value))
    callback.on_train_epoch_end(trainer, None)                          # no validation yet: not refused
    callback.on_validation_end(trainer, None)
    with pytest.raises(SwapError, match=re.escape("monitor 'val_accuracy' is not a logged metric; "
                                                  "logged after this epoch: train_loss, val_acc")):
        callback.on_train_epoch_end(trainer, None)


def test_bn_statistics_are_one_process_pass_over_all_the_training_data(ranks):
    """The callback's sharded recompute (2 ranks, all-reduced sums) equals the mean and unbiased
    variance of each BN layer's inputs, collected by hooks in one process over every batch."""
    full = ranks["full"]
    assert len(full["bn"]) == 5
    for name, (mean, var) in full["bn"].items():
        ref_mean, ref_var = full["bn_reference"][name]
        torch.testing.assert_close(mean, ref_mean, rtol=1e-6, atol=1e-6, msg=name)
        torch.testing.assert_close(var, ref_var, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("how", ["interrupted", "killed"])
def test_a_phase_2_checkpoint_resumes_to_the_uninterrupted_weights_bit_for_bit(ranks, how):
    """KeyboardInterrupt mid-epoch in phase 2 (Lightning's OnExceptionCheckpoint), or the last
    ModelCheckpoint file a killed run leaves (step 44, mid-epoch in phase 2), then fit(ckpt_path=...)."""
    full, resumed = ranks["full"]["weights"], ranks[how]["weights"]
    assert full.keys() == resumed.keys()
    for name, value in full.items():
        assert torch.equal(value, resumed[name]), name
    assert ranks[how]["metrics"] == ranks["full"]["metrics"]


class _Tiny(L.LightningModule):
    def __init__(self, manual: bool = False):
        super().__init__()
        self.automatic_optimization = not manual
        self.layer = torch.nn.Linear(2, 2)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("trainer_kwargs, callback_kwargs, module, message", [
    ({"devices": 1}, {"switch_epoch": 1}, _Tiny(), "strategy='ddp'"),
    ({"devices": 1, "strategy": "ddp"}, {"switch_epoch": 1}, _Tiny(), "at least 2 ranks"),
    ({"devices": 2, "strategy": "ddp", "max_epochs": 3}, {"switch_epoch": 3}, _Tiny(), "leaves no room"),
    ({"devices": 2, "strategy": "ddp", "max_epochs": 3}, {"monitor": "val_acc", "stop_value": 90.0,
                                                         "phase2_epochs": 3}, _Tiny(), "leaves no room"),
    ({"devices": 2, "strategy": "ddp", "max_epochs": 3, "max_steps": 100}, {"switch_epoch": 1}, _Tiny(), "max_steps"),
    ({"devices": 2, "strategy": "ddp", "max_epochs": 3}, {"switch_epoch": 1}, _Tiny(manual=True), "automatic optim"),
])
def test_misuse_is_one_clear_error_before_any_work(trainer_kwargs, callback_kwargs, module, message):
    """What ``setup`` (the first hook of fit, before any step) refuses, checked on the Trainer."""
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, **trainer_kwargs)
    with pytest.raises(SwapError, match=re.escape(message)) as err:
        SWAP(phase2_lr=0.1, **callback_kwargs).setup(trainer, module, "fit")
    assert "\n" not in str(err.value)


def test_a_sharded_strategy_is_refused():
    """FSDP (Lightning runs it on GPUs only, so its strategy object is handed over directly)."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy
    with pytest.raises(SwapError, match="sharded strategies such as FSDP"):
        SWAP(switch_epoch=1, phase2_lr=0.1).setup(SimpleNamespace(strategy=FSDPStrategy(), world_size=2), _Tiny(), "fit")


def test_a_one_device_fit_is_refused_before_its_first_step():
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, callbacks=[SWAP(switch_epoch=1, phase2_lr=0.1)])
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 2)), batch_size=4)
    with pytest.raises(SwapError, match="strategy='ddp'"):
        trainer.fit(_Tiny(), data)
    assert trainer.global_step == 0


@pytest.mark.parametrize("kwargs, message", [
    ({"switch_epoch": 0}, "switch_epoch must be an integer >= 1"),
    ({}, "either switch_epoch or monitor"),
    ({"switch_epoch": 2, "monitor": "val_acc"}, "either switch_epoch or monitor"),
    ({"monitor": "val_acc", "stop_value": 90.0}, "needs stop_value and phase2_epochs"),
    ({"switch_epoch": 2, "phase2_schedule": "step"}, "phase2_schedule must be one of"),
    ({"switch_epoch": 2, "phase2_min_lr": 1.0}, "phase2_min_lr"),
])
def test_bad_arguments_are_refused_at_construction(kwargs, message):
    with pytest.raises(SwapError, match=re.escape(message)):
        SWAP(phase2_lr=0.1, **kwargs)


def test_the_docs_show_the_example_file_as_it_is():
    """The Lightning page's example is examples/lightning_fashion.py, line for line (test_readme runs it)."""
    page = (ROOT / "docs" / "guide" / "lightning.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, flags=re.S)
    example = (ROOT / "examples" / "lightning_fashion.py").read_text()
    assert example in blocks


def test_the_extras_stay_out_of_import_swap_and_a_missing_one_is_one_line(monkeypatch):
    done = subprocess.run([sys.executable, "-c", "import sys, swap, swap.cli; "
                           "print(sorted(m for m in ('lightning', 'transformers', 'tensorboard', 'mlflow', 'ray') "
                           "if m in sys.modules))"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr
    monkeypatch.delitem(sys.modules, "swap.lightning")
    monkeypatch.setitem(sys.modules, "lightning", None)
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)
    with pytest.raises(ModuleNotFoundError) as err:
        import swap.lightning  # noqa: F401
    assert str(err.value) == "swap.lightning needs Lightning; pip install 'swap[lightning]'"
