"""Averaging along the trajectory (EMA, LAWA) beside SWAP, every method at SWAP's critical path.

The question: at the time a user can afford (SWAP's critical-path updates), does an average along one
large-batch trajectory, or each SWAP worker's own average before the average over workers, beat plain
large-batch training and SWAP? Every compare below runs ``swap compare --equal-time swap``: each SGD
baseline trains exactly the updates of SWAP's critical path of the same seed.

1. **Tune on the validation split** (``data.holdout``; the test set is not read), seed 0: the EMA decay
   and the LAWA k of each family from a grid (decay warm-up off, so the decay is what is chosen):
   ``ema-large`` (EMA of the large-batch SGD run), ``lawa-large`` (latest k epoch snapshots),
   ``adamw-large`` + EMA, ``swap-ema`` and ``swap-lawa`` (each phase-2 worker's EMA, or the mean of
   its latest k snapshots taken every 10 updates). The peak LRs are those chosen on the same
   validation split by ``benchmarks/large_batch.py`` (``benchmarks/results/large_batch_fashion.json``).
2. **Test**: seeds 0-2 on the training set and the test set, each family in its own compare directory
   (the families' ``ema``/``lawa`` settings differ), SWAP's runs shared.

Workload ``fashion``: ``configs/fashion_mnist_compare.yaml`` sized as in ``large_batch.py`` (the first
20,000 Fashion-MNIST training images, batch 1024, SWAP's phase 1 to 88.5% training accuracy, 8 workers
x 2 phase-2 epochs at batch 128).

    .venv/bin/python benchmarks/trajectory.py [--workload fashion|text] [--out runs/trajectory] [--seeds 3]

Workload ``text``: ``configs/text_char_quick.yaml`` (the char transformer on fortunes, AdamW in every
phase; its LRs and phase 1's stopping loss chosen on the validation split by ``large_batch.py``);
scored on the loss.

Finished runs are reused (the script resumes). Prints the grids and the test table and writes
``benchmarks/results/trajectory_WORKLOAD.json`` and the figure ``docs/figures/trajectory_WORKLOAD.png``
(accuracy against critical-path updates and wall time, every method).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from large_batch import FASHION_SIZE, RESULTS  # noqa: E402

CHOSEN_LR = json.loads((RESULTS / "large_batch_fashion.json").read_text())["chosen"]
# workload: config, settings, validation split, score (top1: higher is better; loss: lower), families:
# family -> (methods, config key tuned, grid, fixed settings)
WORKLOADS = {
    "fashion": {
        "config": "fashion_mnist_compare", "holdout": 4000, "score": "top1",
        "sets": [*FASHION_SIZE, *[f"{k}={v}" for k, v in CHOSEN_LR.items()],
                 f"phase1.peak_lr={CHOSEN_LR['sgd_large.peak_lr']}", "ema.warmup_power=0"],
        "families": {
            "ema-large": (["ema-large"], "ema.decay", [0.95, 0.98, 0.99, 0.995], []),
            "lawa-large": (["lawa-large"], "lawa.k", [2, 4, 8], []),
            # AdamW's EMA takes the decay chosen for SGD's (a grid of one: the value ema-large chose)
            "adamw-ema": (["adamw-large"], "ema.decay", "ema-large", ["adamw_large.average=ema"]),
            "swap-ema": (["swap-ema"], "ema.decay", [0.9, 0.95, 0.98], []),
            "swap-lawa": (["swap-lawa"], "lawa.k", [3, 6, 12], ["lawa.unit=updates", "lawa.every=10"]),
        }},
    # the text preset's LRs and phase-1 stopping loss are large_batch.py's, chosen on its validation split;
    # its large batch trains with AdamW already (sgd_large.optimizer: adamw)
    "text": {
        "config": "text_char_quick", "holdout": 819, "score": "loss",
        "sets": ["eval_every=100", "ema.warmup_power=0"],
        "families": {
            "ema-large": (["ema-large"], "ema.decay", [0.9, 0.95, 0.98], []),
            "lawa-large": (["lawa-large"], "lawa.k", [2, 4, 8], []),
            "swap-ema": (["swap-ema"], "ema.decay", [0.95, 0.98], []),
            "swap-lawa": (["swap-lawa"], "lawa.k", [4, 8], ["lawa.unit=updates", "lawa.every=16"]),
        }},
}


def compare(config: str, methods: list[str], seeds: int, sets: list[str], out: Path, equal_time: str | None = "swap"):
    """``swap compare`` at equal time (finished runs reused); raises on failure."""
    if all((out / m / f"seed{s}" / "summary.json").is_file() for m in methods for s in range(seeds)):
        return
    cmd = [sys.executable, "-m", "swap.cli", "compare", "--config", config, "--seeds", str(seeds),
           "--methods", ",".join(methods), "--out", str(out)]
    if equal_time is not None and equal_time in methods:
        cmd += ["--equal-time", equal_time]
    for s in sets:
        cmd += ["--set", s]
    subprocess.run(cmd, cwd=ROOT, check=True)


def with_swap(methods: list[str], swap_dir: Path, out: Path, seeds: int) -> list[str]:
    """The compare's methods at equal time: SWAP's finished runs copied in (the reference), once."""
    if any(m.startswith("swap") for m in methods):
        return methods
    for s in range(seeds):
        target = out / "swap" / f"seed{s}"
        if not (target / "summary.json").is_file():
            shutil.copytree(swap_dir / f"seed{s}", target, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("*.safetensors", "*.pt", "*.lock"))
    return ["swap", *methods]


def summary(out: Path, method: str, seed: int) -> dict:
    return json.loads((out / method / f"seed{seed}" / "summary.json").read_text())


def score(s: dict, metric: str = "top1") -> float:
    """The method's model's top-1 (%) or test loss: SWAP's average, else the final model (the average
    along the trajectory when kept)."""
    if metric == "top1":
        return s["test_acc"].get("averaged", s["test_acc"].get("final"))
    m = s["test_metrics"]
    return (m.get("averaged") or m.get("final"))["loss"]


def tune(w: dict, out: Path) -> tuple[dict, dict]:
    """Stage 1: ``{family: {value: validation score}}`` and each family's chosen value."""
    held = [*w["sets"], f"data.holdout={w['holdout']}"]
    compare(w["config"], ["swap"], 1, held, out / "tune" / "swap", equal_time=None)
    grids, chosen = {}, {}
    for family, (methods, key, values, fixed) in w["families"].items():
        if isinstance(values, str):                    # the value another family chose
            grids[family], chosen[family] = {"key": key, "inherited_from": values}, chosen[values]
            continue
        scores = {}
        for v in values:
            run = out / "tune" / family / f"{key}={v}"
            compare(w["config"], with_swap(methods, out / "tune" / "swap" / "swap", run, 1), 1,
                    [*held, *fixed, f"{key}={v}"], run)
            s = summary(run, methods[0], 0)
            scores[v] = {"average": score(s, w["score"]), "top1": score(s), "last_iterate": s["test_acc"].get("last_iterate"),
                         "workers_last_iterate": s["test_acc"].get("workers_last_iterate")}
        pick = max if w["score"] == "top1" else min
        best = pick(scores, key=lambda v: scores[v]["average"])
        grids[family], chosen[family] = {"key": key, "scores": scores, "chosen": best}, best
        print(f"[tune] {family}: {key} " + ", ".join(f"{v:g} -> {r['average']:.4g}" for v, r in scores.items()) +
              f"; chosen {best:g}", flush=True)
    return grids, chosen


def stats(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0, "all": values}


def test(w: dict, out: Path, chosen: dict, seeds: int) -> dict:
    """Stage 2: every family at its chosen value, seeds 0..seeds-1; the table's rows."""
    swap_dir = out / "test" / "ema-large"
    rows: dict[str, dict] = {}
    for family, (methods, key, _, fixed) in w["families"].items():
        run = out / "test" / family
        compare(w["config"], with_swap(methods, swap_dir / "swap", run, seeds) if family != "ema-large"
                else ["swap", *methods], seeds, [*w["sets"], *fixed, f"{key}={chosen[family]}"], run)
        runs = [summary(run, methods[0], s) for s in range(seeds)]
        cols = {"test_acc": stats([score(r) for r in runs]),
                "critical_path_updates": stats([r["updates"]["critical_path"] for r in runs]),
                "wall_s": stats([r["wall_s"]["total"] for r in runs]), "setting": f"{key}={chosen[family]}"}
        if "last_iterate" in runs[0]["test_acc"]:
            cols["last_iterate"] = stats([r["test_acc"]["last_iterate"] for r in runs])
        if "workers_last_iterate" in runs[0]["test_acc"]:
            cols["best_worker"] = stats([max(r["test_acc"]["workers"]) for r in runs])
            cols["workers_mean"] = stats([r["test_acc"]["workers_mean"] for r in runs])
            cols["workers_last_iterate_mean"] = stats([statistics.mean(r["test_acc"]["workers_last_iterate"])
                                                       for r in runs])
            cols["above_best_worker"] = sum(score(r) > max(r["test_acc"]["workers"]) for r in runs)
        if w["score"] == "loss":
            cols["test_loss"] = stats([score(r, "loss") for r in runs])
        rows[family] = cols
    ref = [summary(swap_dir, "swap", s) for s in range(seeds)]
    rows["swap"] = {"test_acc": stats([score(r) for r in ref]),
                    **({"test_loss": stats([score(r, "loss") for r in ref])} if w["score"] == "loss" else {}),
                    "critical_path_updates": stats([r["updates"]["critical_path"] for r in ref]),
                    "wall_s": stats([r["wall_s"]["total"] for r in ref]), "setting": "",
                    "best_worker": stats([max(r["test_acc"]["workers"]) for r in ref]),
                    "workers_mean": stats([r["test_acc"]["workers_mean"] for r in ref]),
                    "above_best_worker": sum(score(r) > max(r["test_acc"]["workers"]) for r in ref)}
    return rows


def figure(w: dict, out: Path, seeds: int, path: Path) -> None:
    """Accuracy against critical-path updates and wall time of every method of the test stage (the
    compare report's figure, all families in one), written to ``path``."""
    sys.path.insert(0, str(ROOT))
    from swap.analysis.plots import plot_compare
    from swap.compare import timeline
    from swap.rundir import RunDir

    runs = {"swap": out / "test" / "ema-large"}
    runs.update({methods[0] if family != "adamw-ema" else "adamw-large+ema": out / "test" / family
                 for family, (methods, *_) in w["families"].items()})
    curves: dict[str, dict] = {"updates": {}, "wall_s": {}}
    for label, where in runs.items():
        method = label.split("+")[0]
        for seed in range(seeds):
            run = RunDir(where / method / f"seed{seed}")
            for x, by in curves.items():
                by.setdefault(label, []).append(timeline(run, run.read_summary(), where, x))
    plot_compare(curves["wall_s"], None, path, by_updates=curves["updates"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", choices=list(WORKLOADS), default="fashion")
    ap.add_argument("--out", default=str(ROOT / "runs" / "trajectory"))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--tune-only", action="store_true")
    args = ap.parse_args()
    w, out = WORKLOADS[args.workload], Path(args.out) / args.workload
    grids, chosen = tune(w, out)
    if args.tune_only:
        return 0
    rows = test(w, out, chosen, args.seeds)
    machine = summary(out / "test" / "ema-large", "swap", 0)["machine"]
    figure(w, out, args.seeds, ROOT / "docs" / "figures" / f"trajectory_{args.workload}.png")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"trajectory_{args.workload}.json").write_text(json.dumps(
        {"workload": args.workload, **w, "grids": grids, "chosen": chosen, "rows": rows, "machine": machine}, indent=1))
    print(f"\n{args.workload}: {machine.get('cpu')}, {machine.get('cores')} cores, torch {machine.get('torch')}\n"
          "| method | setting | test loss | test top-1 (%) | last iterate (%) | critical-path updates | wall (s) |\n"
          "|---|---|---:|---:|---:|---:|---:|")
    for m, r in rows.items():
        f = lambda k, d=2: f"{r[k]['mean']:.{d}f} +- {r[k]['std']:.{d}f}" if k in r else ""   # noqa: E731
        last = f("last_iterate") or f("workers_last_iterate_mean")
        print(f"| {m} | {r['setting']} | {f('test_loss', 3)} | {f('test_acc')} | {last} | "
              f"{r['critical_path_updates']['mean']:.0f} | {f('wall_s', 0)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
