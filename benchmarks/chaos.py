"""Chaos check: a SWAP run killed with SIGKILL at K random moments, each time continued with
``--auto-resume``, must end with the weights of an uninterrupted run, bit for bit.

A small SWAP run (2 processes, a real Fashion-MNIST subset) is first run without interruption
(the reference). Then the same command line, with ``--auto-resume``, is started again and again;
each attempt is killed (SIGKILL to its whole process group: launcher, ranks and phase-2 worker
processes at once, like the OOM killer or a lost machine) at a moment drawn from ``--seed``: a
uniform delay after the start, or (the last ``--phase3-kills``) in phase 3, which is too short for
uniform delays to hit. After K kills the last attempt runs to the end. The phase each kill hit is read from
the run directory at the moment of the kill. Finally every tensor of the averaged model and of the
workers is compared with the reference.

    .venv/bin/python benchmarks/chaos.py [--kills 12] [--seed 0] [--max-delay 9]

Prints one line per kill and the result, and writes ``benchmarks/results/chaos.json``. A benchmark,
not a unit test: it takes a few minutes and its kill moments depend on this machine's speed.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from swap.distributed import machine_info  # noqa: E402

WORKERS = 2
SETTINGS = ["--config", "fashion_mnist_quick", "--workers", str(WORKERS), "--procs", "2",
            "--set", "data.train_subset=6000", "--set", "data.test_subset=1000",
            "--set", "phase1.batch_size=512", "--set", "phase1.micro_batch_size=256", "--set", "phase1.max_epochs=6",
            "--set", "phase1.warmup_epochs=1", "--set", "phase1.stop_acc=99", "--set", "phase2.epochs=4",
            "--set", "phase2.batch_size=128"]


def command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "swap.cli", "train", *SETTINGS, "--out", str(out), *extra]


def phase_of(out: Path) -> str:
    """Where a run stands, from its files: the phase a kill at this moment interrupts."""
    ck = out / "checkpoints"
    if not (out / "config.yaml").is_file():
        return "start-up"
    if not (ck / "phase1.json").is_file():
        return "phase 1"
    if not all((ck / f"worker{w}.json").is_file() for w in range(WORKERS)):
        return "phase 2"
    return "phase 3"


def start(out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen(command(out, *extra), env=env, cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def max_abs_diff(a_dir: Path, b_dir: Path) -> tuple[float, int]:
    """Largest |difference| over every tensor of the averaged model and the workers, and the
    number of tensors compared."""
    worst, count = 0.0, 0
    for name in ["swap"] + [f"worker{w}" for w in range(WORKERS)]:
        a, b = (load_file(str(d / "checkpoints" / f"{name}.safetensors")) for d in (a_dir, b_dir))
        if a.keys() != b.keys():
            return float("inf"), count
        for k in a:
            count += 1
            if a[k].shape != b[k].shape:
                return float("inf"), count
            if a[k].is_floating_point():
                worst = max(worst, float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0)
            elif not torch.equal(a[k], b[k]):
                worst = max(worst, float((a[k] - b[k]).abs().max()))
    return worst, count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=12, help="K: SIGKILLs to land before the run may finish")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill delays")
    parser.add_argument("--min-delay", type=float, default=1.0, help="shortest delay after a (re)start, s")
    parser.add_argument("--max-delay", type=float, default=9.0, help="longest delay after a (re)start, s")
    parser.add_argument("--phase3-kills", type=int, default=2,
                        help="the last N kills aim at phase 3 (workers done, averaging under way): 0-0.3 s "
                             "after it starts, or 0.5-3 s after a restart that goes straight to it")
    parser.add_argument("--workdir", help="folder for the two run directories (default: a temporary one)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="swap-chaos-"))
    ref, out = work / "reference", work / "chaos"

    t = time.time()
    done = subprocess.run(command(ref, "--overwrite"), cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode:
        print(done.stderr[-2000:], file=sys.stderr)
        return 1
    ref_wall = time.time() - t
    print(f"chaos: reference run {ref_wall:.0f} s -> {ref}", flush=True)

    kills, attempts, t = [], 0, time.time()
    while True:
        attempts += 1
        proc = start(out, "--auto-resume")
        if len(kills) >= args.kills:                 # K kills landed: let this attempt finish
            _, stderr = proc.communicate()
            break
        delay = rng.uniform(args.min_delay, args.max_delay)
        after_trigger = rng.uniform(0.0, 0.3)
        t_start = time.time()
        if len(kills) >= args.kills - args.phase3_kills:     # phase 3 lasts about a second: aim at it
            if phase_of(out) == "phase 3":                   # a restart that goes straight to phase 3
                delay = rng.uniform(0.5, 3.0)
            else:
                while proc.poll() is None and phase_of(out) != "phase 3":
                    time.sleep(0.01)
                delay = time.time() - t_start + after_trigger
        try:
            proc.wait(timeout=max(0.0, t_start + delay - time.time()))
        except subprocess.TimeoutExpired:
            where = phase_of(out)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            kills.append({"after_s": round(delay, 2), "phase": where})
            print(f"chaos: kill {len(kills)}/{args.kills} after {delay:.1f} s, in {where}", flush=True)
            continue
        stderr = proc.stderr.read()
        break                                        # finished before the kill: stop here
    chaos_wall = time.time() - t
    if proc.returncode != 0:
        print(f"chaos: the last attempt failed (status {proc.returncode}):\n{stderr[-2000:]}", file=sys.stderr)
        return 1
    diff, tensors = max_abs_diff(ref, out)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    keys = [(r["phase"], r["worker"], r["epoch"]) for r in records if r["phase"] in ("phase1", "phase2")]
    phases = sorted({k["phase"] for k in kills})
    result = {
        "kills": len(kills), "attempts": attempts, "seed": args.seed, "phases_hit": phases,
        "kills_per_phase": {p: sum(k["phase"] == p for k in kills) for p in phases},
        "max_abs_diff": diff, "tensors_compared": tensors, "bit_identical": diff == 0.0,
        "metrics_epochs_logged_once": len(keys) == len(set(keys)),
        "reference_wall_s": round(ref_wall, 1), "chaos_wall_s": round(chaos_wall, 1),
        "kill_log": kills, "settings": SETTINGS, "machine": machine_info(torch.device("cpu"), 1, 2),
    }
    print(f"chaos: {len(kills)} kills ({', '.join(f'{p}: {n}' for p, n in result['kills_per_phase'].items())}), "
          f"{attempts} starts; max |diff| over {tensors} tensors = {diff}; "
          f"{'BIT-IDENTICAL' if diff == 0.0 else 'DIFFERENT'}; epochs logged once: {result['metrics_epochs_logged_once']}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "chaos.json").write_text(json.dumps(result, indent=1))
    print(f"chaos: written {RESULTS / 'chaos.json'}")
    return 0 if diff == 0.0 and len(kills) >= args.kills else 1


if __name__ == "__main__":
    sys.exit(main())
