"""SWAP against small- and large-batch SGD on the text workload (issue #15): the char-level
transformer of ``configs/text_char_quick.yaml`` on Debian's fortunes, 3 seeds.

Runs ``swap compare --config text_char_quick --seeds 3 --methods swap,sgd-small,sgd-large`` (unless
``--out`` already holds it), then prints, per method, the validation loss (nats per byte; bits per
character = nats / ln 2), next-byte top-1 accuracy, critical-path updates and wall seconds: mean
+- std over the seeds, and writes ``benchmarks/results/text_char.json``.

    .venv/bin/python benchmarks/text_char.py [--out runs/text-compare] [--seeds 3]
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("swap", "sgd-small", "sgd-large")


def _final(summary: dict) -> dict:
    metrics = summary["test_metrics"]
    return metrics.get("averaged") or metrics.get("final")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "runs" / "text-compare"))
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    out = Path(args.out)
    if not all((out / m / f"seed{s}" / "summary.json").is_file() for m in METHODS for s in range(args.seeds)):
        done = subprocess.run([sys.executable, "-m", "swap.cli", "compare", "--config", "text_char_quick", "--seeds",
                               str(args.seeds), "--methods", ",".join(METHODS), "--out", str(out)], cwd=ROOT)
        if done.returncode:
            return done.returncode
    rows = {}
    for m in METHODS:
        runs = [json.loads((out / m / f"seed{s}" / "summary.json").read_text()) for s in range(args.seeds)]
        cols = {"val_loss": [_final(r)["loss"] for r in runs],
                "top1": [r["test_acc"].get("averaged", r["test_acc"].get("final")) for r in runs],
                "critical_path_updates": [r["updates"]["critical_path"] for r in runs],
                "wall_s": [r["wall_s"]["total"] for r in runs]}
        rows[m] = {k: {"mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0, "all": v}
                   for k, v in cols.items()}
    machine = json.loads((out / METHODS[0] / "seed0" / "summary.json").read_text())["machine"]
    (ROOT / "benchmarks" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "benchmarks" / "results" / "text_char.json").write_text(json.dumps({"machine": machine, "rows": rows},
                                                                              indent=1))
    print("| method | val loss (nats/byte) | bits/char | next-byte top-1 (%) | critical-path updates | wall (s) |\n"
          "|---|---:|---:|---:|---:|---:|")
    for m, r in rows.items():
        f = lambda k, d=2: f"{r[k]['mean']:.{d}f} +- {r[k]['std']:.{d}f}"          # noqa: E731
        print(f"| {m} | {f('val_loss', 3)} | {r['val_loss']['mean'] / math.log(2):.3f} | {f('top1')} | "
              f"{r['critical_path_updates']['mean']:.0f} | {f('wall_s', 0)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
