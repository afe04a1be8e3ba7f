"""Print the measured tables for BENCHMARKS.md from the result files (no measurement here).

    .venv/bin/python benchmarks/render.py [--compare runs/compare] [--extrap runs/compare-extrap]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--compare", default=str(ROOT / "runs" / "compare"))
    ap.add_argument("--extrap", default=str(ROOT / "runs" / "compare-extrap"))
    args = ap.parse_args()
    results = ROOT / "benchmarks" / "results"
    for title, path in (("Compare (six methods, 3 seeds)", Path(args.compare) / "report.md"),
                        ("Large-batch extrapolation (3 seeds)", Path(args.extrap) / "lb_report.md"),
                        ("SWAP with an extrapolated phase 1 (1 seed)", Path(args.extrap) / "report.md")):
        if path.is_file():
            print(f"### {title}\n\n{path.read_text()}")
    t = results / "throughput.json"
    if t.is_file():
        r = json.loads(t.read_text())
        print("### Throughput\n\n| batch (micro-batch) | ours samples/s | bare loop samples/s | ours / bare |\n|---:|---:|---:|---:|")
        for row in r["loop"]:
            print(f"| {row['batch']} ({row['micro_batch']}) | {row['ours_samples_per_s']:.0f} | "
                  f"{row['bare_samples_per_s']:.0f} | {row['ratio']:.3f} |")
        p3, sc = r["phase3"], r["phase2_scaling"]
        print(f"\nPhase 3: average {p3['average_s']:.3f} s + BN recompute {p3['bn_recompute_s']:.2f} s + "
              f"evaluation {p3['evaluate_s']:.2f} s = {p3['total_s']:.2f} s"
              + (f"; in a compare SWAP run: {p3['swap_run_phase3_s']:.1f} s of {p3['swap_run_total_s']:.1f} s = "
                 f"{100 * p3['share_of_swap_run']:.1f}%." if "share_of_swap_run" in p3 else "."))
        print(f"Phase-2 scaling, 2 workers x 1 epoch: 1 process (2 threads) {sc['procs_1_wall_s']:.1f} s, "
              f"2 processes (1 thread each) {sc['procs_2_wall_s']:.1f} s: {sc['speedup']:.2f}x.\n")
    e = results / "extrap_cost.json"
    if e.is_file():
        r = json.loads(e.read_text())
        print(f"### Cost per update (batch {r['batch']} as {r['batch'] // r['micro_batch']} x {r['micro_batch']})\n\n"
              "| optimizer | s per update | ratio to SGD |\n|---|---:|---:|")
        for row in r["rows"]:
            print(f"| {row['optimizer']} | {row['s_per_update']:.3f} | {row['ratio_to_sgd']:.2f} |")
        print()


if __name__ == "__main__":
    main()
