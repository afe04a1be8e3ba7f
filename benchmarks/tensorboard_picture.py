"""The picture of a run in TensorBoard for the README: TensorBoard started on the loopback interface
over a run's ``RUN/tensorboard``, its Custom Scalars tab (the W phase-2 workers and their average
in one chart per metric) photographed by headless Chromium (Debian's ``chromium`` package).

    .venv/bin/swap train --config fashion_mnist_quick --logger tensorboard \\
        --set phase2.track_average=true --set data.train_subset=20000 --out /tmp/tbrun
    .venv/bin/python benchmarks/tensorboard_picture.py /tmp/tbrun [--out docs/figures/tensorboard.png]

Writes the PNG (default ``docs/figures/tensorboard.png``).
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a run directory written with --logger tensorboard")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "figures" / "tensorboard.png")
    ap.add_argument("--size", default="1500,1100", help="window width,height in pixels")
    args = ap.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        print("needs Chromium: apt-get install chromium", file=sys.stderr)
        return 2
    port = free_port()
    board = subprocess.Popen([str(Path(sys.executable).parent / "tensorboard"), "--logdir", str(args.run / "tensorboard"),
                              "--host", "127.0.0.1", "--port", str(port)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                with urllib.request.urlopen(url + "/data/runs", timeout=2) as r:
                    if r.status == 200 and len(r.read()) > 2:
                        break
            except OSError:
                time.sleep(0.25)
        else:
            print("TensorBoard did not answer within 60 s", file=sys.stderr)
            return 1
        args.out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--window-size={args.size}", "--virtual-time-budget=20000",
                        f"--screenshot={args.out.resolve()}", f"{url}/#custom_scalars&_smoothingWeight=0"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
    finally:
        os.killpg(board.pid, signal.SIGTERM)
        board.wait(timeout=15)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
