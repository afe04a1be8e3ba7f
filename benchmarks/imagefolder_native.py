"""An image folder of small images at their own size (issue #23) beside the in-memory path on the
same images: Fashion-MNIST's first 10,000 training and 2,000 test images of the fixed subset,
written as 28x28 greyscale PNG class folders, trained with ``swap train --method sgd`` (preset
``fashion_mnist_quick``, 4 epochs, 1 process x 2 threads) through both paths, with the preset's
augmentation (padded crop 2, flip, cutout 8: the folder path's ``data.crop: auto`` takes the padded
crop at 28 px) and without it, for several seeds.

    .venv/bin/python benchmarks/imagefolder_native.py [--seeds 3] [--first-seed 0] [--augment-only]
        [--tree /tmp/swap-fmnist-png-10k]

Prints test accuracy per run and the folder / in-memory ratio of training samples/s (median over
epochs); writes ``benchmarks/results/imagefolder_native.json``. Target (issue #23): the folder path
within 1 point of the in-memory path's accuracy, at no less than a third of its samples/s.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
N_TRAIN, N_TEST = 10000, 2000
NO_AUGMENT = ["--set", "data.crop_padding=0", "--set", "data.flip=false", "--set", "data.cutout=0"]


def write_tree(tree: Path) -> None:
    from swap.data import load_dataset
    from swap.data.folder import write_image_folder
    if (tree / "done").is_file():
        return
    train, test = load_dataset("fashion-mnist", None, N_TRAIN, N_TEST)
    classes = [f"class{c}" for c in range(10)]
    write_image_folder(tree / "train", train.images, train.labels, classes)
    write_image_folder(tree / "val", test.images, test.labels, classes)
    (tree / "done").write_text(f"{N_TRAIN} {N_TEST}\n")


def run(path: str, seed: int, augment: bool, tree: Path, out: Path) -> dict:
    data = (["--set", "data.name=imagefolder", "--set", f"data.dir={tree}"] if path == "folder" else
            ["--set", f"data.train_subset={N_TRAIN}", "--set", f"data.test_subset={N_TEST}"])
    args = [sys.executable, "-m", "swap.cli", "train", "--config", "fashion_mnist_quick", "--method", "sgd",
            "--procs", "1", "--set", "threads=2", "--set", "sgd.epochs=4", "--set", f"seed={seed}",
            "--out", str(out), "--overwrite", *data, *([] if augment else NO_AUGMENT)]
    subprocess.run(args, check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"path": path, "seed": seed, "augment": augment, "test_acc": summary["test_acc"]["final"],
            "samples_per_s": statistics.median(r["samples_per_s"] for r in records if r["phase"] == "sgd"),
            "machine": summary["machine"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1")
    ap.add_argument("--augment-only", action="store_true", help="only the runs with the preset's augmentation")
    ap.add_argument("--tree", default="/tmp/swap-fmnist-png-10k")
    args = ap.parse_args()
    tree, out = Path(args.tree), Path(tempfile.mkdtemp(prefix="swap-native-"))
    write_tree(tree)
    rows = []
    variants = (True,) if args.augment_only else (True, False)
    for augment in variants:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            for path in ("folder", "in-memory"):              # interleaved: the same machine state for both
                rows.append(run(path, seed, augment, tree, out / f"{path}-{seed}-{augment}"))
                r = rows[-1]
                print(f"{path:10} seed {seed} augment {str(augment):5} test {r['test_acc']:6.2f}% "
                      f"{r['samples_per_s']:7.0f} samples/s", flush=True)
    summary = {}
    for augment in variants:
        pick = {p: [r for r in rows if r["path"] == p and r["augment"] == augment] for p in ("folder", "in-memory")}
        gaps = [f["test_acc"] - m["test_acc"] for f, m in zip(pick["folder"], pick["in-memory"])]
        ratio = statistics.median(r["samples_per_s"] for r in pick["folder"]) / \
            statistics.median(r["samples_per_s"] for r in pick["in-memory"])
        summary["augment" if augment else "no_augment"] = {"gap_points": gaps, "mean_gap": statistics.mean(gaps),
                                                           "samples_per_s_ratio": ratio}
        print(f"augment {augment}: folder - in-memory accuracy {', '.join(f'{g:+.2f}' for g in gaps)} points "
              f"(mean {statistics.mean(gaps):+.2f}); samples/s ratio {ratio:.2f} (target >= 0.33)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "imagefolder_native" + (f"_seeds{args.first_seed}-{args.first_seed + args.seeds - 1}"
                                   if args.first_seed or args.augment_only else "")
    (RESULTS / f"{name}.json").write_text(json.dumps({"runs": rows, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
