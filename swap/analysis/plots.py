"""Figures (matplotlib, non-interactive Agg backend): PNG, with the data beside them where it matters."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_compare(curves: dict[str, list[list[tuple[float, float]]]], target: float | None, path: str | Path,
                 eval_set: str = "test", by_updates: dict[str, list[list[tuple[float, float]]]] | None = None) -> Path:
    """Accuracy against wall time, and beside it (``by_updates``) against updates on the critical
    path: one colour per method, one line per seed; the target dashed. SWA methods, whose curves
    begin with their start run's, are drawn under the others.

    Args:
        curves: method -> list over seeds of [(wall seconds, accuracy %)].
        by_updates: the same against critical-path updates, or None (one panel).
    """
    panels = [("critical-path updates", by_updates)] if by_updates else []
    panels.append(("wall time (s)", curves))
    fig, axes = plt.subplots(1, len(panels), figsize=(8 * len(panels), 5), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    all_acc = [a for runs in curves.values() for pts in runs for _, a in pts]
    for ax, (xlabel, drawn) in zip(axes[0], panels):
        for i, (method, runs) in enumerate(drawn.items()):
            base = not method.startswith("swa-")     # SWA curves repeat their start run: draw them underneath
            for j, points in enumerate(runs):
                if points:
                    xs, ys = zip(*sorted(points))
                    ax.plot(xs, ys, color=colours[i % len(colours)], alpha=0.9 if base else 0.6, marker=".",
                            markersize=3, linewidth=1.6 if base else 1.0, zorder=3 if base else 2,
                            label=method if j == 0 else None)
        if target is not None:
            ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:.2f}%")
        if all_acc:
            top = max(all_acc)
            ax.set_ylim(max(min(all_acc), top - 12), top + 1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{eval_set} accuracy (%)")
        ax.set_title(f"Accuracy against {xlabel.split(' (')[0]} (one line per seed)")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _save(fig, path: Path, svg: bool) -> list[Path]:
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=110)
    out = [path.with_suffix(".png")]
    if svg:
        fig.savefig(path.with_suffix(".svg"))
        out.append(path.with_suffix(".svg"))
    plt.close(fig)
    return out


def plot_run(records: list[dict], path: str | Path, svg: bool = False) -> list[Path]:
    """SWAP paper Fig. 1 for one run (:func:`run_figure`), written to ``path`` (.png, and .svg
    with ``svg``); returns the files."""
    return _save(run_figure(records), Path(path), svg)


def run_figure(records: list[dict]):
    """SWAP paper Fig. 1 for one run, a matplotlib figure: LR and test accuracy of phase 1 (shared)
    and of every phase-2 worker (diverging), against epochs and against wall time; plus, when the
    run tracked it (``phase2.track_average``), the test accuracy of the average of the workers at
    each phase-2 epoch, and the final averaged model. The caller closes it (``plt.close``).

    Args:
        records: metrics.jsonl records (per epoch). Epochs on the x axis count phase 1 then phase 2.
    """
    p1 = [r for r in records if r["phase"] in ("phase1", "sgd")]
    p1_epochs = max((r["epoch"] for r in p1), default=0)
    workers = sorted({r["worker"] for r in records if r["phase"] == "phase2"})
    tracked = sorted((r for r in records if r["phase"] == "average"), key=lambda r: r["epoch"])
    final = [r for r in records if r["phase"] == "phase3"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    def series(rs, key, offset=0):
        rs = [r for r in rs if r.get(key) is not None]
        return [r["epoch"] + offset for r in rs], [r[key] for r in rs], [r["wall_s"] for r in rs]

    e, lr, _ = series(p1, "lr")
    axes[0].plot(e, lr, color="black", label="phase 1 (shared)")
    e, acc, wall = series(p1, "test_acc")
    axes[1].plot(e, acc, color="black", label="phase 1 (shared)")
    axes[2].plot(wall, acc, color="black", label="phase 1 (shared)")
    for k, w in enumerate(workers):
        rs = [r for r in records if r["phase"] == "phase2" and r["worker"] == w]
        c = colours[k % len(colours)]
        e, lr, _ = series(rs, "lr", p1_epochs)
        axes[0].plot(e, lr, color=c, alpha=0.7, label=f"worker {w}")
        e, acc, wall = series(rs, "test_acc", p1_epochs)
        axes[1].plot(e, acc, color=c, alpha=0.7, label=f"worker {w}")
        axes[2].plot(wall, acc, color=c, alpha=0.7, label=f"worker {w}")
    if tracked:
        e, acc, wall = series(tracked, "test_acc", p1_epochs)
        axes[1].plot(e, acc, color="red", linewidth=2, marker="o", label="average of workers")
        axes[2].plot(wall, acc, color="red", linewidth=2, marker="o", label="average of workers")
    for r in final:
        x_epoch = p1_epochs + max((x["epoch"] for x in records if x["phase"] == "phase2"), default=0)
        axes[1].scatter([x_epoch], [r["test_acc"]], color="red", marker="*", s=150, zorder=5, label="SWAP (final)")
        axes[2].scatter([r["wall_s"]], [r["test_acc"]], color="red", marker="*", s=150, zorder=5, label="SWAP (final)")
    accs = [r["test_acc"] for r in records if r.get("test_acc") is not None]
    for ax in axes[1:]:
        if accs:                         # show phase 1's rise, but keep phase 2's spread readable
            ax.set_ylim(max(min(accs), max(accs) - 25) - 0.5, max(accs) + 0.5)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("learning rate (at epoch end)")
    axes[0].grid(alpha=0.3)
    axes[0].set_xlabel("epoch (phase 1, then phase 2)")
    axes[1].set_xlabel("epoch (phase 1, then phase 2)")
    axes[2].set_xlabel("wall time since the run started (s)")
    axes[0].set_title("Learning-rate schedule per worker")
    axes[1].set_title("Test accuracy against epochs")
    axes[2].set_title("Test accuracy against wall time")
    axes[2].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


LABELS = {"phase1": "LB", "swap": "SWAP", "sgd": "SGD"}


def point_label(name: str) -> str:
    """Paper-style labels: phase1 -> LB, workerN -> SGD(N+1), swap -> SWAP."""
    if name.startswith("worker") and name[6:].isdigit():
        return f"SGD{int(name[6:]) + 1}"
    return LABELS.get(name, name)


def plot_landscape(grid: dict, path: str | Path, svg: bool = False) -> list[Path]:
    """SWAP paper Figs. 2-3: contours of train and test error (%) on the plane through three
    models, the models marked and labelled, and the grid's best test-error point starred."""
    path = Path(path)
    A, B = np.meshgrid(grid["alphas"], grid["betas"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for ax, key, title in ((axes[0], "train_err", "Train error (%)"), (axes[1], "test_err", "Test error (%)")):
        z = grid[key]
        levels = np.unique(np.percentile(z, np.linspace(0, 100, 15)))
        cs = ax.contourf(A, B, z, levels=levels if len(levels) > 2 else 10, cmap="viridis_r")
        ax.contour(A, B, z, levels=cs.levels, colors="k", linewidths=0.3)
        fig.colorbar(cs, ax=ax)
        for (a, b), name in zip(grid["coords"], grid["names"]):
            ax.scatter([a], [b], color="white", edgecolor="black", s=60, zorder=5)
            ax.annotate(point_label(str(name)), (a, b), textcoords="offset points", xytext=(6, 6),
                        color="white", fontsize=10, fontweight="bold")
        j, i = np.unravel_index(np.argmin(grid["test_err"]), grid["test_err"].shape)
        ax.scatter([grid["alphas"][i]], [grid["betas"][j]], marker="*", color="red", s=140, zorder=6,
                   label=f"best test error {grid['test_err'][j, i]:.2f}%")
        ax.set_xlabel("alpha (along u, weight-space units)")
        ax.set_ylabel("beta (along v)")
        ax.set_title(title)
        ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path, svg)


def plot_cosine(rows: list[dict], path: str | Path, svg: bool = False) -> list[Path]:
    """SWAP paper Fig. 4: cosine between -g and theta_swap - theta per worker over phase-2 updates."""
    path = Path(path)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for w in sorted({r["worker"] for r in rows}):
        rs = [r for r in rows if r["worker"] == w]
        ax.plot([r["step"] for r in rs], [r["cosine"] for r in rs], marker=".", label=f"worker {w}")
    ax.axhline(0, color="grey", linewidth=1)
    ax.set_xlabel("phase-2 update (step)")
    ax.set_ylabel("cos(-g, theta_SWAP - theta)")
    ax.set_title("Gradient direction against the direction to the SWAP average")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path, svg)


__all__ = ["plot_compare", "plot_run", "run_figure", "LABELS", "point_label", "plot_landscape", "plot_cosine"]
