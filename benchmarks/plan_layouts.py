"""`swap plan` against measured SWAP runs on one device, for phase 2 in turn and stacked.

The time model predicts phase 2 as k = ceil(W / D) workers per device, either one after another
(``phase2.layout: sequential``) or stacked into one computation per update (``vmap``, timed by
calibrating k stacked workers). This runs one SWAP per layout on one device (W = 4, 1 process, a
20k-sample training subset to keep it short) and `swap plan --devices 1` against each.

    .venv/bin/python benchmarks/plan_layouts.py                  # ~6 minutes on the 2-core CPU
    .venv/bin/python benchmarks/plan_layouts.py --device cuda    # on a GPU

Prints both plans (predicted vs measured, per phase) and writes ``benchmarks/results/plan_layouts.json``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SWAP = str(ROOT / ".venv" / "bin" / "swap")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--train-subset", type=int, default=20000)
    args = parser.parse_args()
    result = {"device": args.device, "workers": args.workers, "train_subset": args.train_subset, "layouts": {}}
    for layout in ("sequential", "vmap"):
        settings = ["--config", "fashion_mnist_compare", "--set", f"device={args.device}", "--set",
                    f"workers={args.workers}", "--set", f"phase2.layout={layout}",
                    "--set", f"data.train_subset={args.train_subset}"]
        out = ROOT / "runs" / f"plan-layouts-{args.device}-{layout}"
        subprocess.run([SWAP, "compare", *settings, "--procs", "1", "--seeds", "1", "--methods", "swap",
                        "--out", str(out)], cwd=ROOT, check=True)
        plan = subprocess.run([SWAP, "plan", *settings, "--devices", "1", "--measured", str(out)],
                              cwd=ROOT, capture_output=True, text=True, check=True)
        summary = json.loads(next((out / "swap").glob("seed*/summary.json")).read_text())
        print(f"\n{layout}: {plan.stderr.strip()}\n{plan.stdout}measured phases (s): {summary['wall_s']}")
        result["layouts"][layout] = {"plan": plan.stdout, "calibration": plan.stderr.strip(),
                                     "measured_wall_s": summary["wall_s"]}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"plan_layouts_{args.device}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
