"""SWAP in the Hugging Face Trainer against the Trainer alone: GPT-2 (examples/hf_fortunes.py) on Debian's
fortunes, 2 ranks on CPU (torchrun, gloo), 4,096 training windows of 65 bytes, 1,024 held out.

Methods (per-device batch B, 2 ranks):
- ``trainer-small``: the Trainer at B=32 (global 64) for 4 epochs;
- ``trainer-large``: the Trainer at B=64 (global 128) for 4 epochs;
- ``trainer-large-cp``: the same for SWAP's critical-path updates (96 + 64 = 160);
- ``swap``: SWAPTrainer, phase 1 as ``trainer-large`` for 3 epochs, phase 2 one worker epoch at 64.

Peak LRs are chosen on a validation split (the last 1,024 training windows, seed 0) from a small grid;
then 3 seeds each on the held-out tail. Also the cost of SWAPTrainer per phase-1 update: its phase 1's
seconds per update over ``trainer-large``'s (the same updates), median over the seeds.

    .venv/bin/python benchmarks/hf_trainer.py             # ~20 minutes on 2 cores; writes results/hf_trainer.json
    .venv/bin/python benchmarks/hf_trainer.py --table     # the BENCHMARKS table of the results file
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "hf_trainer.json"
COMMON = ["--train-subset", "4096", "--eval-subset", "1024", "--epochs", "4"]
METHODS = {"trainer-small": ["--batch", "32"], "trainer-large": ["--batch", "64"],
           "trainer-large-cp": ["--batch", "64", "--max-steps", "160"],
           "swap": ["--batch", "64", "--swap", "--switch-epoch", "3"]}
GRID = {"trainer-small": [("--lr", "1e-3"), ("--lr", "3e-3")], "trainer-large": [("--lr", "3e-3"), ("--lr", "6e-3")],
        "swap-phase2": [("--phase2-lr", "3e-4"), ("--phase2-lr", "1e-3")]}
SEEDS = (0, 1, 2)


def run(args: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as out:
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                               str(ROOT / "examples" / "hf_trainer_fortunes.py"), out, *COMMON, *args],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(args, "->", {k: result[k] for k in ("eval_loss", "steps", "wall_s")}, flush=True)
    return result


def measure() -> None:
    tuning = {}
    for name in ("trainer-small", "trainer-large"):
        tuning[name] = {lr: run(METHODS[name] + [flag, lr, "--validation"])["eval_loss"] for flag, lr in GRID[name]}
    lr = {name: min(scores, key=scores.get) for name, scores in tuning.items()}
    base = METHODS["swap"] + ["--lr", lr["trainer-large"]]
    tuning["swap-phase2"] = {p2: run(base + [flag, p2, "--validation"])["eval_loss"] for flag, p2 in GRID["swap-phase2"]}
    lr["swap-phase2"] = min(tuning["swap-phase2"], key=tuning["swap-phase2"].get)
    args = {"trainer-small": METHODS["trainer-small"] + ["--lr", lr["trainer-small"]],
            "trainer-large": METHODS["trainer-large"] + ["--lr", lr["trainer-large"]],
            "trainer-large-cp": METHODS["trainer-large-cp"] + ["--lr", lr["trainer-large"]],
            "swap": base + ["--phase2-lr", lr["swap-phase2"]]}
    results = {name: [run(args[name] + ["--seed", str(s)]) for s in SEEDS] for name in args}
    rows = {}
    for name, runs in results.items():
        losses = [r["eval_loss"] for r in runs]
        rows[name] = {"eval_loss_mean": statistics.mean(losses), "eval_loss_sd": statistics.stdev(losses),
                      "updates": runs[0]["steps"], "wall_s_mean": statistics.mean(r["wall_s"] for r in runs)}
        if name == "swap":
            rows[name]["workers_eval_loss_mean"] = statistics.mean(statistics.mean(r["workers_eval_loss"]) for r in runs)
            rows[name]["average_below_best_worker"] = sum(r["eval_loss"] < min(r["workers_eval_loss"]) for r in runs)
            rows[name]["critical_path_updates"] = runs[0]["steps"]
    cost = [(s["phase1"]["train_s"] / s["phase1"]["steps"]) / (t["train_s"] / t["steps"])
            for s, t in zip(results["swap"], results["trainer-large"])]
    report = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "cpu": _cpu(),
              "transformers": metadata.version("transformers"), "accelerate": metadata.version("accelerate"),
              "command": "python benchmarks/hf_trainer.py", "lr": lr, "tuning": tuning, "rows": rows,
              "phase1_cost_ratio": {"median": statistics.median(cost), "each": cost}, "runs": results}
    RESULTS.write_text(json.dumps(report, indent=1))
    print(table(report))
    print("->", RESULTS)


def table(r: dict) -> str:
    """The BENCHMARKS section of a results file (Markdown)."""
    rows, lr = r["rows"], r["lr"]
    names = {"trainer-small": f"Trainer, small batch (2 x 32), peak LR {lr['trainer-small']}",
             "trainer-large": f"Trainer, large batch (2 x 64), peak LR {lr['trainer-large']}",
             "trainer-large-cp": "Trainer, large batch, for SWAP's critical-path updates",
             "swap": f"SWAPTrainer: phase 1 as the large batch for 3 epochs, 1 worker epoch at 64, "
                     f"constant LR {lr['swap-phase2']}"}
    out = ["| variant | held-out loss (nats/byte) | critical-path updates | wall (s) |", "|---|---:|---:|---:|"]
    for k, name in names.items():
        x = rows[k]
        out.append(f"| {name} | {x['eval_loss_mean']:.4f} +- {x['eval_loss_sd']:.4f} | {x['updates']} "
                   f"| {x['wall_s_mean']:.1f} |")
    s, c = rows["swap"], r["phase1_cost_ratio"]
    out += ["", f"SWAP's workers alone: {s['workers_eval_loss_mean']:.4f} on average; the average is below the "
            f"better worker in {s['average_below_best_worker']} of {len(r['runs']['swap'])} seeds. Seconds per "
            f"phase-1 update of `SWAPTrainer` over the Trainer's at the same batch: median {c['median']:.3f} "
            f"(each seed: {', '.join(f'{v:.3f}' for v in c['each'])}). {r['cpu']}, torch {r['torch']}, "
            f"transformers {r.get('transformers')}, accelerate {r.get('accelerate')}, {r['date']}."]
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--table", action="store_true", help="print the table of the results file; train nothing")
    if p.parse_args().table:
        print(table(json.loads(RESULTS.read_text())))
    else:
        measure()


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


if __name__ == "__main__":
    main()
