"""The image-folder path on real images: Fashion-MNIST written as PNG class folders, trained with
SWAP (piecewise schedules, progressive resizing 20 -> 24 -> 28 px, 2 workers x 1 rank), beside the
in-memory path on the same images with the same schedules.

    .venv/bin/python benchmarks/imagefolder_fmnist.py [--tree /tmp/swap-fmnist-png] [--num-workers 0]

1. Writes the 70,000 images once as ``TREE/train/CLASS/NNNNN.png`` and ``TREE/val/CLASS/NNNNN.png``
   (8-bit greyscale PNG, Pillow; 10 class folders) unless they are there.
2. Runs ``swap train`` twice, one after the other, with the same config (preset
   ``fashion_mnist_quick``, 2 processes) and the same segments: ``data.name=imagefolder`` (Pillow
   decoding in DataLoader workers, random resized crop + flip) and ``fashion-mnist`` (uint8 tensors
   in memory, batched pad-crop + flip + cutout, batches resized on the fly). The augmentations
   differ (each path's own); the images, model, schedules and seeds are the same.
3. Prints test accuracy (phase 1, workers, averaged), training samples/s (median over each phase's
   epochs, all ranks) and wall seconds; the folder/in-memory throughput ratio. Writes
   ``benchmarks/results/imagefolder_fmnist.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
CLASSES = ["0-tshirt", "1-trouser", "2-pullover", "3-dress", "4-coat", "5-sandal", "6-shirt", "7-sneaker",
           "8-bag", "9-boot"]
PHASE1 = ("[{epochs: [0, 3], batch_size: 2048, lr: [0.1, 0.8], image_size: 20},"
          " {epochs: [3, 8], batch_size: 2048, lr: 0.8, image_size: 24},"
          " {epochs: [8, 10], batch_size: 2048, lr: 0.4, image_size: 28}]")
PHASE2 = ("[{epochs: [0, 2], batch_size: 128, lr: 0.05, image_size: 24},"
          " {epochs: [2, 4], batch_size: 128, lr: [0.05, 0.0], image_size: 28}]")


def write_tree(tree: Path) -> float:
    """Fashion-MNIST as PNG class folders; returns the seconds it took (0 when already there)."""
    from swap.data import load_dataset
    from swap.data.folder import write_image_folder
    if (tree / "done").is_file():
        return 0.0
    t = time.perf_counter()
    train, test = load_dataset("fashion-mnist")
    for split, data in (("train", train), ("val", test)):
        write_image_folder(tree / split, data.images, data.labels, CLASSES)
    (tree / "done").write_text("70000\n")
    return time.perf_counter() - t


def run(name: str, extra: list[str], out: Path) -> dict:
    args = [sys.executable, "-m", "swap.cli", "train", "--config", "fashion_mnist_quick", "--procs", "2",
            "--out", str(out), "--overwrite", "--set", "phase1.stop_acc=100", "--set", f"phase1.segments={PHASE1}",
            "--set", f"phase2.segments={PHASE2}", *extra]
    t = time.perf_counter()
    subprocess.run(args, check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - t
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rate = {p: statistics.median(r["samples_per_s"] for r in records if r["phase"] == p) for p in ("phase1", "phase2")}
    acc = summary["test_acc"]
    return {"path": name, "test_acc": {"phase1": acc["phase1"], "workers": acc["workers"], "averaged": acc["averaged"]},
            "samples_per_s": rate, "wall_s": summary["wall_s"], "command_wall_s": wall,
            "updates_critical_path": summary["updates"]["critical_path"], "machine": summary["machine"],
            "skipped_images": summary.get("skipped_images", 0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", default="/tmp/swap-fmnist-png")
    ap.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes per rank (0: decode in "
                    "the training process: on 2 cores no core is free for a loader process)")
    ap.add_argument("--out", default="/tmp/swap-imagefolder-bench")
    args = ap.parse_args()
    tree, out = Path(args.tree), Path(args.out)
    written_s = write_tree(tree)
    folder = run("imagefolder", ["--set", "data.name=imagefolder", "--set", f"data.dir={tree}",
                                 "--set", "data.image_size=28", "--set", "data.crop=resized", "--set", "data.crop_ratio=1.0",
                                 "--set", "data.min_scale=0.5", "--set", f"data.num_workers={args.num_workers}"],
                 out / "imagefolder")
    memory = run("in-memory", [], out / "in-memory")
    ratio = {p: folder["samples_per_s"][p] / memory["samples_per_s"][p] for p in ("phase1", "phase2")}
    print(f"{'path':12} {'phase 1 %':>9} {'workers %':>15} {'averaged %':>10} {'p1 samples/s':>12} "
          f"{'p2 samples/s':>12} {'total s':>8}")
    for r in (folder, memory):
        print(f"{r['path']:12} {r['test_acc']['phase1']:9.2f} {'/'.join(f'{a:.2f}' for a in r['test_acc']['workers']):>15} "
              f"{r['test_acc']['averaged']:10.2f} {r['samples_per_s']['phase1']:12.0f} {r['samples_per_s']['phase2']:12.0f} "
              f"{r['wall_s']['total']:8.1f}")
    print(f"throughput folder / in-memory: phase 1 {ratio['phase1']:.2f}, phase 2 {ratio['phase2']:.2f} "
          f"(target: >= 0.5, within 2x); tree written in {written_s:.0f} s")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "imagefolder_fmnist.json").write_text(json.dumps(
        {"runs": [folder, memory], "ratio": ratio, "num_workers": args.num_workers, "tree_written_s": written_s,
         "phase1_segments": PHASE1, "phase2_segments": PHASE2}, indent=1))


if __name__ == "__main__":
    main()
