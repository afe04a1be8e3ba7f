"""A user's own model and data (issue #23): a padding collate function in every phase, defaults
fitted to a small dataset, soft targets, tied weights, models that skip parameters on several
ranks, image folders at their own size, the automatic switch's own validation split."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

import swap
import swap.launch
from swap.checkpoint import load_checkpoint, save_checkpoint
from swap.config import SwapError, load_config

from conftest import FORTUNES_DIR
from test_generic import Tabular, TabularNet as BNTable      # BatchNorm1d, dict inputs

CATEGORIES = ("computers", "science", "law", "food", "education")      # a fortune's class: the file it is in


class Fortunes(Dataset):
    """Real variable-length text: the first ``max_len`` bytes of up to ``per_class`` fortunes of each
    category file (Debian's ``fortunes``), as int64 byte sequences (1..255; 0 is the padding);
    every 5th fortune of a file is a test sample."""

    def __init__(self, train: bool, per_class: int = 190, max_len: int = 96):
        self.samples = []
        for label, name in enumerate(CATEGORIES):
            texts = [t.strip() for t in (FORTUNES_DIR / name).read_bytes().split(b"\n%\n") if t.strip()][:per_class]
            self.samples += [(torch.tensor(list(t[:max_len]), dtype=torch.int64), label)
                             for k, t in enumerate(texts) if (k % 5 == 4) != train]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]


def pad(samples):
    """Pad byte sequences of different lengths with 0 to the longest: (B, T) int64, labels (B,)."""
    longest = max(len(x) for x, _ in samples)
    x = torch.zeros(len(samples), longest, dtype=torch.int64)
    for k, (seq, _) in enumerate(samples):
        x[k, :len(seq)] = seq
    return x, torch.tensor([y for _, y in samples])


class BytesNet(nn.Module):
    """Byte embedding, a convolution with BatchNorm, a max over the non-padding positions."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(256, 24, padding_idx=0)
        self.conv = nn.Conv1d(24, 48, 3, padding=1)
        self.bn = nn.BatchNorm1d(48)
        self.out = nn.Linear(48, len(CATEGORIES))

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(self.emb(x).transpose(1, 2))))          # (B, 48, T)
        h = h.masked_fill((x == 0)[:, None, :], float("-inf")).amax(2)
        return self.out(h)


@pytest.fixture(scope="module")
def fortunes_run(tmp_path_factory):
    """SWAP on real variable-length text with a padding collate_fn, the default phase-2 layout
    (each worker in its own process), the automatic switch's trial copies and a greedy soup,
    without data.holdout: (summary, run directory, stderr lines)."""
    import contextlib
    import io
    out = tmp_path_factory.mktemp("fortunes") / "run"
    cfg = {"workers": 2, "seed": 0, "threads": 1, "channels_last": False, "eval_every": 3,
           "phase1": {"batch_size": 64, "micro_batch_size": 0, "peak_lr": 0.03, "warmup_epochs": 1, "max_epochs": 10,
                      "stop": {"metric": "auto", "every": 3, "trial_updates": 8}},
           "phase2": {"epochs": 2, "batch_size": 32, "peak_lr": 0.03},
           "phase3": {"aggregate": "greedy"}}
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        _, summary = swap.train_swap(BytesNet, Fortunes(True), Fortunes(False), cfg, out=out, collate_fn=pad)
    return summary, out, err.getvalue().splitlines()


def test_a_padding_collate_fn_reaches_every_phase_2_worker_process(fortunes_run):
    summary, out, _ = fortunes_run
    assert summary["averaged_workers"] == [0, 1] and summary["failed_workers"] == {}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["worker"] for r in records if r["phase"] == "phase2"} == {0, 1}
    acc = summary["test_acc"]
    assert acc["averaged"] > 40.0 and min(acc["workers"]) > 40.0, acc         # 5 categories: chance is 20%


def test_the_automatic_switch_holds_out_its_own_validation_split_and_says_so(fortunes_run):
    summary, out, err = fortunes_run
    n = len(Fortunes(True))
    cfg = yaml_config(out)
    assert cfg["data"]["holdout"] == n // 10                       # 10% of the training samples
    assert any(f"data.holdout={n // 10}" in line for line in err), err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("trial_val_acc" in r for r in records if r["phase"] == "phase1")     # the trial copies ran


def yaml_config(run: Path) -> dict:
    import yaml
    return yaml.safe_load((run / "config.yaml").read_text())


def test_the_preflight_check_uses_the_datasets_own_collate_fn():
    class Padded(Fortunes):
        collate_fn = staticmethod(pad)
    # default_collate cannot stack sequences of different lengths: a dataset's own collate_fn is used
    assert swap.launch.check_task(BytesNet, Padded(True), swap.task.Task()) is True
    with pytest.raises(RuntimeError, match="stack expects each tensor to be equal size"):
        swap.launch.check_task(BytesNet, Fortunes(True), swap.task.Task())


# ---------------------------------------------------------------- defaults that fit a small dataset
SMALL = {"workers": 2, "threads": 1, "channels_last": False,
         "phase1": {"batch_size": 64, "micro_batch_size": 0, "peak_lr": 0.2, "warmup_epochs": 1, "max_epochs": 4,
                    "stop": {"metric": "train_loss", "at": 0.3}},
         "phase2": {"epochs": 2, "batch_size": 16, "peak_lr": 0.05, "layout": "sequential"}}


def test_a_default_bn_batch_never_refuses_a_small_dataset_but_a_set_one_is_refused(tmp_path):
    model, summary = swap.train_swap(BNTable, Tabular(450, jitter=0.05), Tabular(200, seed=1), SMALL,
                                     out=tmp_path / "run")
    assert yaml_config(tmp_path / "run")["phase3"]["bn_batch_size"] == 450     # the BN pass: the whole set
    assert summary["test_acc"]["averaged"] > 75.0, summary["test_acc"]
    with pytest.raises(SwapError, match=r"^phase3.bn_batch_size=512 exceeds the 450 training samples$"):
        swap.train_swap(BNTable, Tabular(450), Tabular(200, seed=1), {**SMALL, "phase3": {"bn_batch_size": 512}},
                        out=tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


def test_defaults_are_fitted_only_where_the_user_did_not_set_them():
    method = swap.methods.METHODS["swap"]
    cfg = load_config(None, {"phase2": {"batch_size": 64}, "phase1": {"stop": "auto"}})
    notes = method.fit(cfg, 2, 300)
    assert cfg.data.holdout == 30 and cfg.phase1.batch_size == 270 and cfg.phase3.bn_batch_size == 270
    assert cfg.phase2.batch_size == 64 and len(notes) == 3                 # set by the user: kept
    cfg = load_config(None, {"phase1": {"batch_size": 512}})
    assert method.fit(cfg, 2, 300) == ["phase2.batch_size=300 (the default 512 exceeds the 300 training samples)",
                                       "phase3.bn_batch_size=300 (the default 512 exceeds the 300 training samples)"]
    with pytest.raises(SwapError, match="phase1.batch_size=512 exceeds the 300 training samples"):
        method.check(cfg, 2, 300)
    # ABS: the eigenvalue's sample and the largest batch the rule may double to (the elastic pool's too)
    absm = swap.methods.METHODS["abs"]
    cfg = load_config(None, {"abs": {"batch_size": 64}})
    assert absm.fit(cfg, 2, 100) == [
        "abs.eig_samples=100 (the default 128 exceeds the 100 training samples)",
        "abs.max_batch_factor=1 (the default lets the batch grow to 8192, beyond the 100 training samples)"]
    absm.check(cfg, 2, 100)
    cfg = load_config(None, {})
    assert absm.fit(cfg, 2, 1000)[-1] == \
        "abs.max_batch_factor=7 (the default lets the batch grow to 16384, beyond the 1000 training samples)"
    assert cfg.abs.batch_size * cfg.abs.max_batch_factor <= 1000 and cfg.abs.eig_samples == 128
    for key, value, message in [
            ("eig_samples", 200, "abs.eig_samples=200 exceeds the 100 training samples"),
            ("max_batch_factor", 4, "abs.max_batch_factor=4 lets the batch grow to 64 x 4 = 256, which exceeds "
                                    "the 100 training samples")]:
        cfg = load_config(None, {"abs": {"batch_size": 64, key: value}})
        absm.fit(cfg, 2, 100)                                              # set by the user: kept, then refused
        with pytest.raises(SwapError, match=f"^{re.escape(message)}$"):
            absm.check(cfg, 2, 100)
    big = load_config(None, {"phase1": {"stop": "auto"}})
    method.fit(big, 1, 60000)
    assert big.data.holdout == 5000                                        # at most 5,000


# ---------------------------------------------------------------- soft targets
class SoftTabular(Tabular):
    """Tabular with label distributions as targets (as mixup or label smoothing give): float (3,)."""

    def __getitem__(self, i):
        x, y = super().__getitem__(i)
        return x, torch.full((3,), 0.05).index_fill(0, y.view(1), 0.9)


def test_soft_targets_refuse_a_stop_on_training_accuracy_and_report_no_accuracy(tmp_path):
    with pytest.raises(SwapError, match="phase1.stop.metric: train_loss") as info:
        swap.train_swap(BNTable, SoftTabular(256), SoftTabular(64, seed=1),
                        {**SMALL, "phase1": {**SMALL["phase1"], "stop": {"metric": "train_acc"}}},
                        out=tmp_path / "refused")
    assert len(str(info.value).splitlines()) == 1 and not (tmp_path / "refused").exists()
    _, summary = swap.train_swap(BNTable, SoftTabular(256), SoftTabular(64, seed=1), SMALL, out=tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in records if r["phase"] in ("phase1", "phase2")]
    assert trained and all(r["train_acc"] is None for r in trained)
    assert all(r["train_loss"] < 1.2 for r in trained[-2:])             # it trained: log(3) = 1.10 is chance
    assert summary["train_acc"]["phase1"] is None
    # the test targets are soft too: no test accuracy either (None, not 0.00%), and the loss is reported
    assert summary["test_acc"]["averaged"] is None and summary["test_acc"]["workers_mean"] is None
    assert all(r["test_acc"] is None for r in trained) and trained[-1]["test_loss"] < 1.2


# ---------------------------------------------------------------- tied weights
class TiedLM(nn.Module):
    """A tiny language model whose output layer is its input embedding (GPT-2's and BERT's tie)."""

    def __init__(self, vocab: int = 32, dim: int = 8):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(torch.tanh(self.mix(self.emb(x))))


def _steps(model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
        opt.step()


def test_tied_weights_checkpoint_once_load_tied_and_resume_bitwise(tmp_path):
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 32, (4, 6), generator=g), torch.randint(0, 32, (4, 6), generator=g)) for _ in range(6)]
    torch.manual_seed(0)
    model = TiedLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    _steps(model, opt, batches[:3])
    save_checkpoint(tmp_path / "c", model, {"config_hash": "x"}, opt)
    meta = json.loads((tmp_path / "c.json").read_text())
    assert meta["tied"] == {"head.weight": "emb.weight"}
    _steps(model, opt, batches[3:])                                       # the uninterrupted run
    torch.manual_seed(1)
    resumed = TiedLM()
    opt2 = torch.optim.SGD(resumed.parameters(), lr=0.5, momentum=0.9)
    load_checkpoint(tmp_path / "c", resumed, "x", opt2)
    assert resumed.head.weight is resumed.emb.weight                       # still one tensor
    _steps(resumed, opt2, batches[3:])
    for (k, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


class TokenPairs(Dataset):
    """Real text as (input, next byte) pairs of 16 bytes, bytes folded into 32 tokens."""

    def __init__(self, start: int, n: int):
        data = torch.tensor(list((FORTUNES_DIR / "science").read_bytes()[:20000]), dtype=torch.int64) % 32
        self.x = [data[start + 17 * i:start + 17 * i + 17] for i in range(n)]

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i][:-1], self.x[i][1:]


def test_a_model_with_tied_weights_trains_and_checkpoints_in_a_run(tmp_path):
    cfg = {"threads": 1, "sgd": {"batch_size": 32, "micro_batch_size": 0, "epochs": 2, "peak_lr": 0.5}}
    model, summary = swap.train_sgd(TiedLM, TokenPairs(0, 256), TokenPairs(5000, 64), cfg, out=tmp_path / "run")
    assert model.head.weight is model.emb.weight
    assert json.loads((tmp_path / "run" / "checkpoints" / "sgd.json").read_text())["tied"] == {"head.weight": "emb.weight"}
    assert summary["test_metrics"]["final"]["loss"] < 3.3                 # below the uniform 32 tokens' log(32) = 3.47


# ---------------------------------------------------------------- DDP with parameters a forward pass skips
class SkipNet(nn.Module):
    """A model with a branch no forward pass takes (a gated expert, an unused head)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(9, 16), nn.ReLU(), nn.Linear(16, 3))
        self.emb = nn.Embedding(4, 3)
        self.unused = nn.Linear(16, 3)

    def forward(self, num, cat):
        return self.body(torch.cat([num, self.emb(cat)], dim=1))


SKIPNET_CFG = {"threads": 1, "ddp": {"find_unused_parameters": True},
               "sgd": {"batch_size": 64, "micro_batch_size": 0, "epochs": 2, "peak_lr": 0.1}}

TORCHRUN_SCRIPT = """
import sys
import torch
import swap
from test_user_data import SKIPNET_CFG, SkipNet, Tabular

if __name__ == "__main__":
    model, summary = swap.train_sgd(SkipNet, Tabular(256), Tabular(64, seed=1), SKIPNET_CFG, out=sys.argv[1])
    if model is not None:                     # rank 0 returns the run's model
        torch.save(model.state_dict(), sys.argv[2])
"""


def test_find_unused_parameters_reaches_ddp_and_two_ranks_train_what_one_does(tmp_path, monkeypatch):
    """Two local processes and one train the same weights; so does a script of the library launched
    by ``torchrun --nproc-per-node 2`` (its ranks joined, none spawned: bit for bit the processes' run)."""
    import subprocess
    import sys
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    two, _ = swap.train_sgd(SkipNet, Tabular(256), Tabular(64, seed=1), SKIPNET_CFG, out=tmp_path / "two", procs=2)
    one, _ = swap.train_sgd(SkipNet, Tabular(256), Tabular(64, seed=1), SKIPNET_CFG, out=tmp_path / "one", procs=1)
    for (k, a), b in zip(one.state_dict().items(), two.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=k)
    assert not torch.equal(one.body[0].weight, SkipNet().body[0].weight)    # it trained
    (tmp_path / "script.py").write_text(TORCHRUN_SCRIPT)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(tmp_path / "script.py"), str(tmp_path / "torchrun"), str(tmp_path / "weights.pt")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranked = torch.load(tmp_path / "weights.pt")
    for k, a in two.state_dict().items():
        assert torch.equal(a, ranked[k]), k


# ---------------------------------------------------------------- image folders
def test_an_image_folder_loads_with_the_default_options(tmp_path):
    from conftest import write_image_tree
    root = write_image_tree(tmp_path / "tree", classes=2, per_class=2, val_per_class=1, size=(20, 16))
    train, val = swap.load_dataset("imagefolder", str(root))
    x, _ = train[0]
    assert train.size == val.size == 16 and train.crop == "padded" and x.shape == (3, 16, 16)
    assert val[0][0].shape == (3, 16, 16) and val.crop_ratio == 1.0


def test_the_padded_crop_of_a_sample_is_the_in_memory_paths_batched_one():
    from swap.data import Augment
    aug = Augment(crop_padding=3, flip=True, cutout=5)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 2, 11, 9, generator=g)
    params = aug.draw(6, 11, 9, g)
    batched = aug.apply(x, params)
    for k in range(6):
        one = aug.apply_one(x[k].permute(1, 2, 0).numpy(), tuple(params["shift"][k].tolist()),
                            bool(params["flip"][k]), tuple(params["centre"][k].tolist()))
        assert torch.equal(torch.from_numpy(one).permute(2, 0, 1), batched[k]), k


def _chi2_same(a: torch.Tensor, b: torch.Tensor, cells: int) -> float:
    """Pearson's chi-square statistic of homogeneity of two samples of integers in [0, cells)."""
    counts = torch.stack([torch.bincount(a, minlength=cells), torch.bincount(b, minlength=cells)]).double()
    expected = counts.sum(1, keepdim=True) * counts.sum(0, keepdim=True) / counts.sum()
    keep = expected.sum(0) > 0
    return (((counts - expected) ** 2)[:, keep] / expected[:, keep]).sum().item()


def test_the_folder_path_and_the_in_memory_path_draw_the_same_augmentation_distribution(tmp_path, monkeypatch):
    """The padded crop's parameters as each path draws them: the folder path per sample (from the
    sample's seeded torch RNG, through the DataLoader), the in-memory path per batch
    (:meth:`Augment.draw`). 3,000 draws each (600 images x 5 epochs); shift offsets, flips and
    cutout centres pass a chi-square test of homogeneity at p = 0.001 (fixed seeds: deterministic)."""
    from conftest import write_image_tree
    from swap.data import Augment
    from swap.config import DataConfig
    from swap.data.folder import ImageFolder
    from swap.data.generic import DatasetLoader
    root = write_image_tree(tmp_path / "tree", classes=2, per_class=300, val_per_class=1, size=(28, 28), mode="L")
    folder = ImageFolder(root / "train", True, None, DataConfig(name="imagefolder", crop="padded", crop_padding=2,
                                                                  cutout=8, flip=True, follow_links=True))
    seen = []
    original = Augment.apply_one

    def record(self, x, shift, flip, centre):
        seen.append((*shift, int(flip), *centre))
        return original(self, x, shift, flip, centre)
    monkeypatch.setattr(Augment, "apply_one", record)
    loader = DatasetLoader(folder, 100, (0, "phase1", 0), collate_fn=folder.collate_fn)
    for epoch in range(5):
        for _ in loader.epoch(epoch):
            pass
    drawn = torch.tensor(seen)
    assert drawn.shape == (3000, 5)
    params = folder.augment.draw(3000, 28, 28, torch.Generator().manual_seed(0))
    memory = torch.cat([params["shift"], params["flip"].long()[:, None], params["centre"]], dim=1)
    critical = {5: 18.47, 2: 10.83, 28: 55.48, 25: 51.18}          # chi-square, p = 0.001, df = cells - 1
    for col, cells in ((0, 5), (1, 5), (2, 2), (3, 28), (4, 28)):
        assert _chi2_same(drawn[:, col], memory[:, col], cells) < critical[cells], col
    joint = lambda d: d[:, 0] * 5 + d[:, 1]                           # the crop's offset pair
    assert _chi2_same(joint(drawn), joint(memory), 25) < critical[25]
    # and a test that can fail: a flip rate of 0.6 instead of 0.5 is told apart
    biased = memory[:, 2].clone()
    biased[:600] = 1                                                # about 0.6
    assert _chi2_same(drawn[:, 2], biased, 2) > critical[2]


@pytest.fixture(scope="module")
def fashion_png(tmp_path_factory, real_fashion):
    """10,000 training and 2,000 test images of Fashion-MNIST (a fixed subset), written as 28x28
    greyscale PNG class folders, and the subset sizes."""
    from swap.data.folder import write_image_folder
    root = tmp_path_factory.mktemp("fashion-png")
    train, test = swap.load_dataset("fashion-mnist", str(real_fashion), 10000, 2000)
    classes = [f"class{c}" for c in range(10)]
    write_image_folder(root / "train", train.images, train.labels, classes)
    write_image_folder(root / "val", test.images, test.labels, classes)
    return root, len(train), len(test)


def test_an_image_folder_of_small_images_trains_at_their_size_as_the_in_memory_path(tmp_path, fashion_png,
                                                                                      real_fashion):
    """Without data.image_size, PNG class folders of 28x28 images train and evaluate at 28x28
    (ImageNet's 224-px defaults gave chance accuracy at 31 samples/s) and reach the in-memory
    path's accuracy on the same images within 1 point. Augmentation off in both: each path draws
    its own random crops (their transforms are equal, the test above), which would add its own
    noise to the comparison. The throughput ratio is measured by benchmarks/imagefolder_native.py."""
    from swap.cli import main
    root, n_train, n_test = fashion_png
    common = ["train", "--config", "fashion_mnist_quick", "--method", "sgd", "--procs", "1", "--set", "threads=2",
              "--set", "sgd.epochs=3", "--set", "data.crop_padding=0", "--set", "data.flip=false",
              "--set", "data.cutout=0"]
    assert main(common + ["--set", "data.name=imagefolder", "--data-dir", str(root), "--out", str(tmp_path / "f")]) == 0
    assert main(common + ["--data-dir", str(real_fashion), "--set", f"data.train_subset={n_train}",
                          "--set", f"data.test_subset={n_test}", "--out", str(tmp_path / "m")]) == 0
    folder, memory = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("f", "m"))
    assert yaml_config(tmp_path / "f")["data"]["image_size"] is None
    assert folder["test_acc"]["final"] > 80.0 and abs(folder["test_acc"]["final"] - memory["test_acc"]["final"]) <= 1.0, \
        (folder["test_acc"], memory["test_acc"])
