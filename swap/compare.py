"""`swap compare`: the SWAP paper's Tables 1, 2 and 4 measured side by side on one machine.

Methods (Gupta et al., ICLR 2020, Sec. 5)::

    sgd-small   small-batch SGD ("SGD (small-batch)"), config section ``sgd_small``
    sgd-large   large-batch SGD ("SGD (large-batch)"), config section ``sgd_large``
    swap        SWAP; reported before averaging (mean of workers) and after
    swa-large   SWAP's phase 1, then large-batch SWA cycles ("Large-batch SWA")
    swa-lb-sb   SWAP's phase 1, then small-batch SWA cycles ("Large-batch followed by small-batch SWA")
    swa-small   sgd-small's model, then small-batch SWA cycles ("Small-batch SWA")
    extrap-large  large-batch SGD with extrapolated SGD (Lin et al., ICML 2020), section ``sgd_large``
    swap-extrap   SWAP whose phase 1 uses extrapolated SGD (section ``extrap``)
    lars-large, lamb-large, adamw-large  the large-batch baseline with LARS (You et al. 2017), LAMB (You
                  et al., ICLR 2020) or AdamW, sections ``lars_large``, ``lamb_large``, ``adamw_large``
    swap-lars, swap-lamb  SWAP whose phase 1 uses that section's optimizer and peak LR
    swap-cycles   SWAP whose workers each run phase2.cycles (>= 2) LR cycles, one sample per cycle (Table 4)
    abs         adaptive batch size from the top Hessian eigenvalue (Yao et al. 2018), section ``abs``
    absa        abs plus FGSM adversarial training

Methods averaging along one trajectory (:mod:`swap.trajectory`)::

    ema-large, lawa-large  sgd-large ending as its EMA or LAWA (the last iterate reported beside it)
    swap-ema, swap-lawa    SWAP whose workers each end as their EMA or LAWA before phase 3

At equal time (``equal_time``, ``swap compare --equal-time swap``): every SGD baseline (each method
that trains one data-parallel model: sgd-small, sgd-large, ema-large, lars-large, ...) is given the
reference method's critical-path updates of the same seed (or a stated budget in updates) instead of
its epochs: its section's ``updates`` is set, the LR schedule spans them. The reference runs first in
each seed. The report then answers "at the time I can afford, which method?" on the critical path;
its figure draws accuracy against critical-path updates and against wall time.

Each method and seed is an ordinary run directory ``OUT/METHOD/seedS`` (finished ones are reused,
so a compare resumes). Seeds are interleaved: seed 0 of every method, then seed 1, ... so that
machine drift spreads evenly. The SWA methods start from the phase-1 (or sgd-small) checkpoint of
the same seed: the same computation a separate run would repeat bit for bit, so it is reused and
its wall time, updates and samples are added to the SWA method's.
"""
from __future__ import annotations

import copy
import json
import statistics
from pathlib import Path

from .config import Config, SwapError
from . import launch
from .launch import DirMode
from .methods import COMPARED, METHODS
from .rundir import RunDir

# The compare's methods, in run order (each SWA method after the run it starts from).
STARTS = {name: m.start for name, m in METHODS.items() if m.start}


def plan(methods: list[str]) -> list[str]:
    """Methods in run order, with the runs the SWA methods start from added first.

    Raises:
        SwapError: unknown method.
    """
    unknown = [m for m in methods if m not in COMPARED]
    if unknown:
        raise SwapError(f"unknown method '{unknown[0]}' (known: {', '.join(COMPARED)})")
    needed = set(methods) | {STARTS[m][0] for m in methods if m in STARTS}
    return [m for m in COMPARED if m in needed]


def budgeted(name: str) -> bool:
    """Whether method ``name`` is an SGD baseline that an equal-time compare gives a budget in updates."""
    return METHODS[name].summary == "sgd"


def equal_time_order(order: list[str], equal_time: str | int | None) -> list[str]:
    """``order`` with the equal-time reference method first (its budget is known before the baselines run).

    Raises:
        SwapError: a reference that is not compared, or that is itself an SGD baseline.
    """
    if not isinstance(equal_time, str):
        return order
    if equal_time not in order or budgeted(equal_time) or METHODS[equal_time].start:
        raise SwapError(f"--equal-time {equal_time}: the reference must be one of the compared methods that is not an "
                        f"SGD baseline nor an SWA method (e.g. swap), compared: {', '.join(order)}")
    return [equal_time] + [m for m in order if m != equal_time]


def budget(out: Path, equal_time: str | int, seed: int) -> int:
    """The updates an SGD baseline of seed ``seed`` gets: the reference's critical-path updates, or
    ``equal_time`` itself when it is a number."""
    if isinstance(equal_time, int):
        return equal_time
    return RunDir(out / equal_time / f"seed{seed}").read_summary()["updates"]["critical_path"]


def run_compare(cfg: Config, seeds: int, methods: list[str], out: str | Path, procs: int,
                equal_time: str | int | None = None) -> dict:
    """Run every (seed, method) not yet finished, then build, write and return the report.

    ``equal_time``: None (each method its own epochs), a reference method's name (every SGD
    baseline gets its critical-path updates, per seed) or a budget in updates (module docstring).

    Raises:
        SwapError: an unknown method, a bad reference, or a batch that does not split over ``procs``
            (before any run); a finished baseline of another budget in ``out``.
    """
    out = Path(out)
    order = equal_time_order(plan(methods), equal_time)
    if isinstance(equal_time, int) and equal_time < 1:
        raise SwapError(f"--equal-time must be a method or a budget of >= 1 update, got {equal_time}")
    for name in order:
        METHODS[name].check(cfg, procs)
    for seed in range(seeds):
        for name in order:
            method = METHODS[name]
            run = RunDir(out / name / f"seed{seed}")
            given = budget(out, equal_time, seed) if equal_time is not None and budgeted(name) else None
            if run.summary_path.is_file():
                done = run.read_summary()["updates"]["critical_path"]
                if given is not None and done != given:
                    raise SwapError(f"{run.path} was trained for {done} updates, not the equal-time budget of {given}: "
                                    f"compare at equal time in another --out")
                continue
            seeded = copy.deepcopy(cfg)
            seeded.seed = seed
            if given is not None:
                getattr(seeded, method.split(seeded)[0]).updates = given
            resume = method.summary == "swap" and run.config_path.is_file()
            start = None
            if method.start:
                source, ckpt = method.start
                src = RunDir(out / source / f"seed{seed}")
                start = {"checkpoint": str(src.checkpoint(ckpt)), "summary": src.read_summary()}
            mode = DirMode(overwrite=not resume and run.path.exists(), resume=resume)
            launch.run(name, seeded, run.path, procs=procs, mode=mode, start=start)     # the one launch path
    report = build_report(out, methods, seeds)
    if equal_time is not None:
        report["equal_time"] = {"reference": equal_time if isinstance(equal_time, str) else None,
                                "updates": [budget(out, equal_time, seed) for seed in range(seeds)]}
    write_report(out, report)
    return report


# ------------------------------------------------------------------------------- measurement

def timeline(run: RunDir, summary: dict, out: Path | None = None, x: str = "wall_s") -> list[tuple[float, float]]:
    """(x, test accuracy %) of the model the method holds, ``x`` being the wall seconds since the
    method started (``wall_s``) or the updates on its critical path (``updates``).

    SGD: every evaluated epoch, then its average along the trajectory if it kept one. SWAP: phase-1
    epochs, then per phase-2 epoch the mean accuracy of the workers (at the slowest worker's time),
    then the averaged model. SWA: the start run's timeline up to its model, then the SWA average
    (shifted by the start's wall time). The SGD iterates of the SWA cycles are not included: with a
    cyclic LR they are not what SWA returns.
    """
    records = [r for r in run.read_metrics() if r.get("test_acc") is not None]
    method = summary["method"]
    timed = x == "wall_s"

    def at(r: dict, base: int = 0) -> float:
        return r["wall_s"] if timed else base + (r.get("update") or 0)

    if method == "swap":
        u = summary["updates"]
        base = u["critical_path"] - u["phase2_per_worker"]          # phase 1 and the switch's trials
        points = [(at(r), r["test_acc"]) for r in records if r["phase"] == "phase1"]
        by_epoch: dict[int, list] = {}
        for r in records:
            if r["phase"] == "phase2":
                by_epoch.setdefault(r["epoch"], []).append(r)
        for epoch in sorted(by_epoch):
            rs = by_epoch[epoch]
            if len(rs) == summary["workers"]:
                points.append((max(at(r, base) for r in rs), statistics.mean(r["test_acc"] for r in rs)))
        points += [(at(r, base), r["test_acc"]) for r in records if r["phase"] == "phase3"]
        return points
    if method in STARTS:
        source, phase = STARTS[method]
        start_run = RunDir((out or run.path.parent.parent) / source / run.path.name)
        start = [(at(r), r["test_acc"]) for r in start_run.read_metrics()
                 if r.get("phase") == phase and r.get("test_acc") is not None]
        end = [(summary["wall_s"]["start"] + r["wall_s"] if timed else summary["updates"]["critical_path"], r["test_acc"])
               for r in records if r["phase"] == "swa_average"]
        return start + end
    return [(at(r), r["test_acc"]) for r in records]


def time_to_target(points: list[tuple[float, float]], target: float) -> float | None:
    """First wall time (s) whose accuracy is >= ``target``; ``None`` when never reached."""
    for wall, acc in sorted(points):
        if acc >= target:
            return wall
    return None


def _stats(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "median": None, "n": 0}
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "median": statistics.median(values), "n": len(values)}


def build_report(out: str | Path, methods: list[str], seeds: int, target: float | None = None) -> dict:
    """Collect every run's summary into the report (see module docstring for the rows).

    ``target`` defaults to the mean final accuracy of sgd-small minus 0.1 points.

    Raises:
        SwapError: a run has no summary.json (it did not finish).
    """
    out = Path(out)
    runs: dict[str, list[tuple[RunDir, dict]]] = {}
    for method in methods:
        for seed in range(seeds):
            run = RunDir(out / method / f"seed{seed}")
            if not run.summary_path.is_file():
                raise SwapError(f"{run.path} has no summary.json: run `swap compare` again to finish it")
            runs.setdefault(method, []).append((run, run.read_summary()))

    def final(summary):
        return summary["test_acc"]["averaged"] if summary["method"] == "swap" else summary["test_acc"]["final"]

    if target is None and "sgd-small" in runs:
        target = statistics.mean(final(s) for _, s in runs["sgd-small"]) - 0.1
    rows = []
    for method in methods:
        entries = runs[method]
        ttt = [time_to_target(timeline(r, s, out), target) if target is not None else None for r, s in entries]
        row = {"method": method, "test_acc": _stats([final(s) for _, s in entries]),
               "wall_s": _stats([s["wall_s"]["total"] for _, s in entries]),
               "time_to_target_s": _stats(ttt), "reached": sum(t is not None for t in ttt),
               "per_seed": {"test_acc": [final(s) for _, s in entries], "wall_s": [s["wall_s"]["total"] for _, s in entries],
                            "time_to_target_s": ttt},
               "critical_path_updates": _stats([s["updates"]["critical_path"] for _, s in entries]),
               "samples": _stats([s["samples"] for _, s in entries])}
        if all("last_iterate" in s["test_acc"] for _, s in entries):     # averaged along the trajectory
            row["last_iterate"] = _stats([s["test_acc"]["last_iterate"] for _, s in entries])
        if all(s["test_acc"].get("workers_last_iterate") for _, s in entries):     # each worker averaged along its own
            row["workers_last_iterate"] = _stats([statistics.mean(s["test_acc"]["workers_last_iterate"])
                                                  for _, s in entries])
        rows.append(row)
        if summary_method(entries) == "swap":
            before = [s["test_acc"]["workers_mean"] for _, s in entries]
            best = [max(s["test_acc"]["workers"]) for _, s in entries]
            row["before_averaging"] = _stats(before)
            row["best_worker"] = _stats(best)
            row["above_best_worker"] = sum(final(s) > max(s["test_acc"]["workers"]) for _, s in entries)
    base = next((r for r in rows if r["method"] == "sgd-small"), None)
    for row in rows:
        if base:
            row["wall_ratio"] = row["wall_s"]["mean"] / base["wall_s"]["mean"]
            a, b = row["time_to_target_s"]["median"], base["time_to_target_s"]["median"]
            row["time_to_target_ratio"] = a / b if a is not None and b else None
            row["updates_ratio"] = row["critical_path_updates"]["mean"] / base["critical_path_updates"]["mean"]
    first = runs[methods[0]][0][1]
    return {"target_acc": target, "seeds": seeds, "methods": methods, "rows": rows, "machine": first["machine"],
            "config": first["config"], "eval_set": "validation" if _holdout(runs[methods[0]][0][0]) else "test",
            "predictions": first.get("predictions", "samples")}


def summary_method(entries: list) -> str:
    """The algorithm behind a compare method's runs (``swap`` or ``sgd`` or an SWA variant)."""
    return entries[0][1]["method"]


def _holdout(run: RunDir) -> bool:
    cfg = run.load_config()
    return cfg.data.holdout > 0 and not cfg.uses_validation()


def write_report(out: str | Path, report: dict) -> None:
    """``report.json``, ``report.md`` and ``report.png`` (accuracy against critical-path updates and
    against wall time) in ``out``."""
    from .analysis.plots import plot_compare
    from .report import compare_table

    out = Path(out)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(compare_table(report) + "\n")
    curves: dict[str, dict[str, list]] = {"updates": {}, "wall_s": {}}
    for method in report["methods"]:
        for seed in range(report["seeds"]):
            run = RunDir(out / method / f"seed{seed}")
            for x, by_method in curves.items():
                by_method.setdefault(method, []).append(timeline(run, run.read_summary(), out, x))
    plot_compare(curves["wall_s"], report["target_acc"], out / "report.png", eval_set=report["eval_set"],
                 by_updates=curves["updates"])


__all__ = ["COMPARED", "STARTS", "plan", "budgeted", "equal_time_order", "budget", "run_compare", "timeline",
           "time_to_target", "build_report", "summary_method", "write_report"]
