"""Results tables in the layout of the SWAP paper's Table 1 (method, test accuracy, training time)."""
from __future__ import annotations


# the accuracy column's name by what the predictions are (``summary["predictions"]``)
METRIC_NAMES = {"samples": "Test accuracy (%)", "tokens": "Test top-1 per token (%)",
                "next tokens": "Test next-token top-1 (%)"}


def results_table(summary: dict) -> str:
    """A Markdown table for one run's ``summary.json`` (SWAP or SGD).

    SWAP rows: each worker, "SWAP (before averaging)" = mean of the workers, "SWAP (after
    averaging)"; times are wall seconds (workers: phase 1 + phase 2; averaged: + phase 3). A run
    that averaged along its trajectory (``sgd.average``, ``phase2.average_along``) shows the last
    iterate beside its average (each worker's, for SWAP).
    """
    rows = []
    acc, wall = summary["test_acc"], summary["wall_s"]
    if summary["method"] == "swap":
        before = wall["phase1"] + wall["phase2"]
        rows.append(("SWAP phase 1 (large-batch, at stop)", acc["phase1"], wall["phase1"]))
        along = summary.get("average_along", {}).get("kind", "").upper()
        last = acc.get("workers_last_iterate") or [None] * len(acc["workers"])
        for w, a, raw in zip(summary.get("averaged_workers", range(len(acc["workers"]))), acc["workers"], last):
            if along:
                rows.append((f"SWAP worker {w} (last iterate)", raw, before))
            rows.append((f"SWAP worker {w}" + (f" ({along})" if along else ""), a, before))
        rows.append(("SWAP (before averaging)", acc["workers_mean"], before))
        rows.append(("SWAP (after averaging)", acc["averaged"], wall["total"]))
    elif summary["method"] in ("abs", "absa"):
        b = summary["batch_size"]
        rows.append((f"{summary['method'].upper()} (batch {b['base']} -> {b['final']})", acc["final"], wall["total"]))
    else:
        name = f"SGD (batch {summary['batch_size']['sgd']})"
        if "average" in summary:                 # sgd.average: the last iterate, then the run's model, its average
            rows.append((f"{name}, last iterate", acc["last_iterate"], wall["total"]))
            name += f", {summary['average']['kind'].upper()} of {summary['average']['samples']} samples"
        rows.append((name, acc["final"], wall["total"]))
    unit = summary.get("predictions", "samples")
    lines = [f"| Method | {METRIC_NAMES[unit]} | Training time (s) |", "|---|---:|---:|"]
    lines += [f"| {name} | {'n/a' if a is None else f'{a:.2f}'} | {t:.1f} |" for name, a, t in rows]   # None: no accuracy
    if unit != "samples":
        final = next(iter(summary.get("test_metrics", {}).values()), {})
        loss = f"; the final model's test loss {final['loss']:.4f} nats/token" if "loss" in final else ""
        lines.append("")
        lines.append(f"Accuracy: top-1 of every counted {unit[:-1]} prediction of the test set, in %{loss}.")
    if summary["method"] == "swap":
        u = summary["updates"]
        lines.append("")
        lines.append(f"Phases (s): 1 = {wall['phase1']:.1f} ({summary['epochs']['phase1']} epochs, batch "
                     f"{summary['batch_size']['phase1']}), 2 = {wall['phase2']:.1f} ({summary['epochs']['phase2']} "
                     f"epochs x {summary['workers']} workers, batch {summary['batch_size']['phase2']}), "
                     f"3 = {wall['phase3']:.1f}; total {wall['total']:.1f}. Updates on the critical path: "
                     f"{u['critical_path']} ({u['phase1']} + {u['phase2_per_worker']}).")
    if summary["method"] in ("abs", "absa"):
        lines.append("")
        lines.append(f"Updates: {summary['updates']['critical_path']}; batch per epoch: "
                     f"{', '.join(str(x) for x in summary['batch_size']['per_epoch'])}; pool resizes: "
                     f"{len(summary['resizes'])}, {wall['resize']:.1f} s ({100 * summary['resize_share']:.2f}% of the run).")
        ray = summary.get("launcher", {})
        if ray.get("name") == "ray":
            lines.append(f"Ray: started in {ray['ray_start_s']:.1f} s; its actors started in {ray['actor_start_s']:.1f} s "
                         f"(those of a resize inside the resize's time); {ray['restarts']} restart(s) after a dead actor.")
    if summary.get("failed_workers"):
        lines.append("Failed workers, not averaged (phase3.allow_missing_workers): " +
                     "; ".join(f"{w}: {why}" for w, why in summary["failed_workers"].items()) + ".")
    m = summary["machine"]
    lines.append(f"Machine: {m['cpu']}, {m['cores']} cores, {m['procs']} processes x {m['threads_per_proc']} "
                 f"threads, torch {m['torch']}, device {m['device']}.")
    return "\n".join(lines)


def _pm(stats: dict, digits: int = 2) -> str:
    if stats["mean"] is None:
        return "not reached"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def compare_table(report: dict) -> str:
    """The compare report as Markdown: the paper's Table 1/2/4 layout plus time to target,
    ratios to sgd-small, critical-path updates, samples processed, and the machine."""
    target = report["target_acc"]                      # None without sgd-small (nor --target)
    acc_name = METRIC_NAMES[report.get("predictions", "samples")]
    if report["eval_set"] == "validation":
        acc_name = acc_name.replace("Test", "Validation")
    to = f"{target:.2f}%" if target is not None else "target"
    lines = [f"| Method | {acc_name} | Training time (s) | Time to {to} (s, median) | "
             "Time ratio vs sgd-small (total / to target) | Critical-path updates | Samples processed |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for row in report["rows"]:
        ttt = row["time_to_target_s"]
        reached = (f"{ttt['median']:.1f} ({row['reached']}/{report['seeds']} seeds)" if ttt["median"] is not None
                   else "-" if target is None else f"not reached (0/{report['seeds']})")
        ratio = (f"{row['wall_ratio']:.2f} / " + (f"{row['time_to_target_ratio']:.2f}" if row.get("time_to_target_ratio") else "-")
                 if "wall_ratio" in row else "-")
        lines.append(f"| {row['method']} | {_pm(row['test_acc'])} | {_pm(row['wall_s'], 1)} | {reached} | {ratio} | "
                     f"{row['critical_path_updates']['mean']:.0f} | {row['samples']['mean']:.3g} |")
        if "before_averaging" in row:
            lines.append(f"| {row['method']} (before averaging) | {_pm(row['before_averaging'])} | | | | | |")
        if "last_iterate" in row:
            lines.append(f"| {row['method']} (last iterate) | {_pm(row['last_iterate'])} | | | | | |")
        if "workers_last_iterate" in row:
            lines.append(f"| {row['method']} (workers' last iterates, mean) | {_pm(row['workers_last_iterate'])} "
                         f"| | | | | |")
    lines.append("")
    swap_row = next((r for r in report["rows"] if r["method"] == "swap"), None)
    if swap_row:
        lines.append(f"SWAP after averaging was above its best worker in {swap_row['above_best_worker']} of "
                     f"{report['seeds']} seeds (best worker {_pm(swap_row['best_worker'])}).")
    if report.get("equal_time"):
        e = report["equal_time"]
        whose = f"{e['reference']}'s critical-path updates of the same seed" if e["reference"] else "a stated budget"
        lines.append(f"At equal time: every SGD baseline trained for {whose} ({', '.join(map(str, e['updates']))} "
                     f"updates by seed) instead of its epochs.")
    m = report["machine"]
    rule = "target = mean sgd-small accuracy - 0.1" if target is not None else "no target (sgd-small not run)"
    lines.append(f"{report['seeds']} seeds, interleaved; mean ± std over seeds; {rule}. "
                 f"Machine: {m['cpu']}, {m['cores']} cores, {m['procs']} processes x {m['threads_per_proc']} threads, "
                 f"torch {m['torch']}, device {m['device']}.")
    return "\n".join(lines)


__all__ = ["METRIC_NAMES", "results_table", "compare_table"]
