"""Results tables in the layout of the SWAP paper's Table 1 (method, test accuracy, training time)."""
from __future__ import annotations


def results_table(summary: dict) -> str:
    """A Markdown table for one run's ``summary.json`` (SWAP or SGD).

    SWAP rows: each worker, "SWAP (before averaging)" = mean of the workers, "SWAP (after
    averaging)"; times are wall seconds (workers: phase 1 + phase 2; averaged: + phase 3).
    """
    rows = []
    acc, wall = summary["test_acc"], summary["wall_s"]
    if summary["method"] == "swap":
        before = wall["phase1"] + wall["phase2"]
        rows.append(("SWAP phase 1 (large-batch, at stop)", acc["phase1"], wall["phase1"]))
        for w, a in enumerate(acc["workers"]):
            rows.append((f"SWAP worker {w}", a, before))
        rows.append(("SWAP (before averaging)", acc["workers_mean"], before))
        rows.append(("SWAP (after averaging)", acc["averaged"], wall["total"]))
    else:
        rows.append((f"SGD (batch {summary['batch_size']['sgd']})", acc["final"], wall["total"]))
    lines = ["| Method | Test accuracy (%) | Training time (s) |", "|---|---:|---:|"]
    lines += [f"| {name} | {a:.2f} | {t:.1f} |" for name, a, t in rows]
    if summary["method"] == "swap":
        u = summary["updates"]
        lines.append("")
        lines.append(f"Phases (s): 1 = {wall['phase1']:.1f} ({summary['epochs']['phase1']} epochs, batch "
                     f"{summary['batch_size']['phase1']}), 2 = {wall['phase2']:.1f} ({summary['epochs']['phase2']} "
                     f"epochs x {summary['workers']} workers, batch {summary['batch_size']['phase2']}), "
                     f"3 = {wall['phase3']:.1f}; total {wall['total']:.1f}. Updates on the critical path: "
                     f"{u['critical_path']} ({u['phase1']} + {u['phase2_per_worker']}).")
    m = summary["machine"]
    lines.append(f"Machine: {m['cpu']}, {m['cores']} cores, {m['procs']} processes x {m['threads_per_proc']} "
                 f"threads, torch {m['torch']}, device {m['device']}.")
    return "\n".join(lines)
