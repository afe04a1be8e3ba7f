"""Bitwise fingerprints of one short run per method: the check that a restructuring changed no result.

Runs ``swap compare`` once (seed 0) over every method of the registry on a small Fashion-MNIST
subset, 2 processes, then prints for each method the SHA-256 of its final weights (every top-level
``checkpoints/*.safetensors`` of its run directory that is not a resumable ``*_last``), its test
accuracy and its update count. Run it before and after a change: equal fingerprints mean the same
weights, bit for bit.

    .venv/bin/python benchmarks/fingerprints.py [--out DIR] [--tag before]

Writes ``benchmarks/results/fingerprints[-TAG].json``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
METHODS = "sgd-small,sgd-large,swap,swa-large,swa-lb-sb,swa-small,extrap-large,swap-extrap,abs,absa"
SETTINGS = ["--config", "fashion_mnist_compare", "--seeds", "1", "--procs", "2", "--methods", METHODS,
            "--set", "workers=2", "--set", "data.train_subset=4096", "--set", "data.test_subset=1000",
            "--set", "phase1.batch_size=512", "--set", "phase1.max_epochs=3", "--set", "phase1.warmup_epochs=1",
            "--set", "phase1.stop_acc=70", "--set", "phase2.epochs=1",
            "--set", "phase2.schedule=linear", "--set", "phase2.min_lr=0",   # the preset's phase 2 before issue #29
            "--set", "sgd_small.epochs=2", "--set", "sgd_large.batch_size=512", "--set", "sgd_large.epochs=2",
            "--set", "sgd_large.warmup_epochs=1", "--set", "abs.epochs=2", "--set", "abs.fallback_epochs=1",
            "--set", "abs.eig_samples=64", "--set", "abs.elastic=false"]


def fingerprint(run: Path) -> str:
    digest = hashlib.sha256()
    for f in sorted((run / "checkpoints").glob("*.safetensors")):
        if not f.stem.endswith("_last"):
            digest.update(f.name.encode() + f.read_bytes())
    return digest.hexdigest()[:16]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="compare directory (default: a new temporary one)")
    parser.add_argument("--tag", default="", help="suffix of the results file, e.g. before / after")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="swap-fingerprints-"))
    t = time.time()
    done = subprocess.run([sys.executable, "-m", "swap.cli", "compare", *SETTINGS, "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True,         # SWAP_SET would change the runs: not inherited
                          env={**{k: v for k, v in os.environ.items() if k != "SWAP_SET"}, "PYTHONPATH": str(ROOT)})
    if done.returncode:
        print(done.stderr[-3000:], file=sys.stderr)
        return 1
    rows = {}
    for method in METHODS.split(","):
        run = out / method / "seed0"
        summary = json.loads((run / "summary.json").read_text())
        acc = summary["test_acc"].get("averaged", summary["test_acc"].get("final"))
        rows[method] = {"weights_sha256": fingerprint(run), "test_acc": acc,
                        "critical_path_updates": summary["updates"]["critical_path"]}
        print(f"{method:13s} {rows[method]['weights_sha256']}  test {acc:.2f}%  "
              f"updates {rows[method]['critical_path_updates']}")
    print(f"({time.time() - t:.0f} s; runs in {out})")
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"fingerprints{'-' + args.tag if args.tag else ''}.json"
    (RESULTS / name).write_text(json.dumps({"settings": SETTINGS, "methods": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
