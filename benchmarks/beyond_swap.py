"""SWAP's phase 2 as one end of a family, and the automatic phase-1 -> phase-2 switch (issue #17).

    .venv/bin/python benchmarks/beyond_swap.py --part methods      # ~20 min: 6 variants x 3 seeds
    .venv/bin/python benchmarks/beyond_swap.py --part transition   # ~35 min: 4 fixed stopping accuracies + 4 auto signals, x 3 seeds

Every run: ``swap train --config fashion_mnist_quick --procs 2`` on the first 10,000 training images
of the fixed shuffle, the full 10,000-image test set, 2 workers, seeds 0-2, one after the other.

``methods``: at equal phase-2 epochs (4 per worker): swap; swap-cycles (2 cycles of 2 epochs, 4
samples); swap-cycles with the greedy soup (12,000 images of which the last 2,000 are the validation
split: the same 10,000 training images; its summary also holds the uniform average's test
accuracy); local-sgd with H = 4 and 32 updates; diloco with H = 32 (outer Nesterov 0.7 / 0.9).
``transition``: SWAP with phase1.stop_acc at 4 fixed points (the grid a user would search), and
``phase1.stop: auto`` with each signal of :mod:`swap.algorithms.transition`, its settings fixed
before these runs and not tuned on them: ``plateau`` (training loss, defaults), and on the
validation split (12,000 images of which the last 2,000 are held out, so the same 10,000 training
images): ``holdout`` (defaults: patience 3 epochs), ``trials`` (a trial every 3 epochs, one
phase-2 epoch per copy, patience 2 trials) and ``barrier`` (a trial every 3 epochs, 2 points). The verdict
line compares each auto variant with the grid's best point (mean test accuracy) and the grid's
total wall time (what the search costs).

``transition_full`` (``--seeds 1``, ~25 min): the same question on the whole training set, where
phase 1 reaches its stopping accuracies early: a grid of 86-92% and ``auto trials``.

``--only NAME`` (repeatable) runs those variants only and merges their rows into the results file.

Prints mean +- std over seeds of the test accuracy, critical-path updates, phase-2 communication
(rounds, bytes per rank) and wall seconds; writes ``benchmarks/results/beyond_swap_PART.json``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
BASE = ["--config", "fashion_mnist_quick", "--procs", "2", "--workers", "2", "--set", "data.train_subset=10000"]
VALIDATION = ["--set", "data.train_subset=12000", "--set", "data.holdout=2000"]    # the same 10,000 training images
GREEDY = ["--set", "phase3.aggregate=greedy", *VALIDATION]
VARIANTS = {
    "methods": {
        "swap": ["--method", "swap"],
        "swap-cycles": ["--method", "swap-cycles", "--set", "phase2.epochs=2"],
        "swap-cycles greedy": ["--method", "swap-cycles", "--set", "phase2.epochs=2", *GREEDY],
        "local-sgd H=4": ["--method", "local-sgd", "--set", "phase2.sync_every=4"],
        "local-sgd H=32": ["--method", "local-sgd", "--set", "phase2.sync_every=32"],
        "diloco H=32": ["--method", "diloco", "--set", "phase2.sync_every=32"],
    },
    "transition": {
        **{f"stop_acc {a}": ["--method", "swap", "--set", f"phase1.stop_acc={a}"] for a in (80, 84, 87, 90)},
        "auto plateau": ["--method", "swap", "--set", "phase1.stop.metric=auto", "--set", "phase1.stop.signal=plateau",
                         "--set", "phase1.stop.window=3", "--set", "phase1.stop.min_gain=0.05"],
        "auto holdout": ["--method", "swap", "--set", "phase1.stop.metric=auto", "--set", "phase1.stop.signal=holdout",
                         "--set", "phase1.stop.window=3", *VALIDATION],
        "auto trials": ["--method", "swap", "--set", "phase1.stop.metric=auto", "--set", "phase1.stop.signal=trials",
                        "--set", "phase1.stop.every=3", "--set", "phase1.stop.window=2", *VALIDATION],
        "auto barrier": ["--method", "swap", "--set", "phase1.stop.metric=auto", "--set", "phase1.stop.signal=barrier",
                         "--set", "phase1.stop.every=3", "--set", "phase1.stop.max_barrier=2", *VALIDATION],
    },
    # the whole training set: the same 58,000 images train in every run (the first 58,000 of the
    # fixed shuffle: auto's 59,999 less the 1,999 held out; a subset of all 60,000 would be the
    # unshuffled file order), the 10,000-image test set
    "transition_full": {
        **{f"stop_acc {a}": ["--method", "swap", "--set", "data.train_subset=58000", "--set", f"phase1.stop_acc={a}"]
           for a in (86, 88, 90, 92)},
        "auto trials": ["--method", "swap", "--set", "phase1.stop.metric=auto", "--set", "phase1.stop.signal=trials",
                        "--set", "phase1.stop.every=3", "--set", "phase1.stop.window=2",
                        "--set", "data.train_subset=59999", "--set", "data.holdout=1999"],
    },
}


def run(name: str, extra: list[str], seed: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "swap.cli", "train", *BASE, *extra, "--set", f"seed={seed}", "--out", str(out),
           "--overwrite"]
    t = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    s = json.loads((out / "summary.json").read_text())
    comm = s.get("communication", {}).get("phase2", {"rounds": 0, "bytes": 0})
    row = {"variant": name, "seed": seed, "test_acc": s["test_acc"]["averaged"],
           "workers_mean": s["test_acc"]["workers_mean"], "phase1_test_acc": s["test_acc"]["phase1"],
           "phase1_epochs": s["epochs"]["phase1"], "updates": s["updates"]["critical_path"],
           "rounds": comm["rounds"], "bytes": comm["bytes"], "wall_s": s["wall_s"]["total"],
           "command_s": time.time() - t, "switch": s.get("switch")}
    if "soup" in s:
        row.update(uniform_test_acc=s["soup"]["uniform_test_acc"], kept=s["soup"]["kept"])
    return row


def _ms(values: list[float]) -> str:
    return f"{statistics.mean(values):.2f} +- {statistics.stdev(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=list(VARIANTS), required=True)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", default="/tmp/swap-beyond")
    ap.add_argument("--only", action="append", default=[], help="run only this variant (repeatable); merge its rows")
    args = ap.parse_args()
    variants = {k: v for k, v in VARIANTS[args.part].items() if not args.only or k in args.only}
    if args.only and len(variants) != len(set(args.only)):
        ap.error(f"--only: known variants of {args.part}: {', '.join(VARIANTS[args.part])}")
    results = RESULTS / f"beyond_swap_{args.part}.json"
    rows = [r for r in json.loads(results.read_text()) if r["variant"] not in variants] if args.only else []
    for seed in range(args.seeds):                         # seeds interleaved: drifts of the machine spread evenly
        for name, extra in variants.items():
            rows.append(run(name, extra, seed, Path(args.out) / args.part / name.replace(" ", "_") / f"seed{seed}"))
            print(json.dumps(rows[-1]), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(rows, indent=1))
    print("| variant | test % | workers mean % | phase-1 epochs | critical-path updates | rounds | MB per rank | wall s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in dict.fromkeys(x["variant"] for x in rows):
        r = [x for x in rows if x["variant"] == name]
        print(f"| {name} | {_ms([x['test_acc'] for x in r])} | {_ms([x['workers_mean'] for x in r])} | "
              f"{_ms([x['phase1_epochs'] for x in r])} | {_ms([x['updates'] for x in r])} | {r[0]['rounds']} | "
              f"{r[0]['bytes'] / 1e6:.1f} | {_ms([x['wall_s'] for x in r])} |")
        if "uniform_test_acc" in r[0]:
            print(f"| {name}: uniform average of the same samples | {_ms([x['uniform_test_acc'] for x in r])} | | | | | | |")
    if args.part.startswith("transition"):
        verdict(rows)


def verdict(rows: list[dict]) -> None:
    """Each auto variant against the grid: its mean test accuracy minus the best grid point's, and
    its mean wall time against the grid's total (the sum over its points of their mean wall time)."""
    mean = lambda name, key: statistics.mean(x[key] for x in rows if x["variant"] == name)   # noqa: E731
    grid = [n for n in dict.fromkeys(x["variant"] for x in rows) if n.startswith("stop_acc")]
    best = max(grid, key=lambda n: mean(n, "test_acc"))
    total = sum(mean(n, "wall_s") for n in grid)
    for name in dict.fromkeys(x["variant"] for x in rows):
        if name.startswith("auto"):
            gap = mean(name, "test_acc") - mean(best, "test_acc")
            print(f"{name}: {gap:+.2f} points against the grid's best ({best}, {mean(best, 'test_acc'):.2f}); "
                  f"{mean(name, 'wall_s'):.0f} s against the grid's {total:.0f} s; target (>= -0.10 points and "
                  f"cheaper) {'met' if gap >= -0.1 and mean(name, 'wall_s') < total else 'missed'}")


if __name__ == "__main__":
    main()
