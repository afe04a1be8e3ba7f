"""Figures (matplotlib, non-interactive Agg backend): PNG, with the data beside them where it matters."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_compare(curves: dict[str, list[list[tuple[float, float]]]], target: float | None, path: str | Path,
                 eval_set: str = "test") -> Path:
    """Accuracy against wall time: one colour per method, one line per seed; the target dashed.

    Args:
        curves: method -> list over seeds of [(wall seconds, accuracy %)].
    """
    fig, ax = plt.subplots(figsize=(8, 5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (method, runs) in enumerate(curves.items()):
        for j, points in enumerate(runs):
            if points:
                xs, ys = zip(*sorted(points))
                ax.plot(xs, ys, color=colours[i % len(colours)], alpha=0.8, marker=".", markersize=3,
                        label=method if j == 0 else None)
    if target is not None:
        ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:.2f}%")
    all_acc = [a for runs in curves.values() for pts in runs for _, a in pts]
    if all_acc:
        top = max(all_acc)
        ax.set_ylim(max(min(all_acc), top - 12), top + 1)
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel(f"{eval_set} accuracy (%)")
    ax.set_title("Accuracy against wall time (one line per seed)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
