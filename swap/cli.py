"""Command line: ``swap train``, ``swap data``. Errors print one line and exit with status 2."""
from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import signal
import sys
import time
from pathlib import Path

from .config import SwapError, announce_code, load_config
from .interrupt import Interrupted
from .methods import COMPARED, TRAINED

EPILOG = """examples:
  swap train --config fashion_mnist_quick --workers 2
  swap train --config fashion_mnist_quick --method sgd --set sgd.batch_size=128
  swap train --config cifar10_paper --data-dir ~/data --workers 8 --out runs/c10
  torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
      -m swap.cli train --config cifar10_paper --workers 8 --out runs/c10
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swap", description="Large-batch training that generalizes: SWAP "
                                     "(Gupta et al., ICLR 2020) and its SGD baselines.", epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_train_parser, _compare_parser, _analysis_parsers, _plan_parser, _data_parser):
        add(sub)
    return parser


def _train_parser(sub) -> None:
    t = sub.add_parser("train", help="train with SWAP or plain SGD; writes a run directory",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    t.add_argument("--config", required=True, help="preset name under configs/ (e.g. fashion_mnist_quick) or a YAML path")
    t.add_argument("--method", choices=TRAINED, default="swap", metavar="METHOD",
                   help=f"one of {', '.join(TRAINED)} (default swap); the SWA methods start from another method's "
                        f"run: train them with `swap compare`")
    t.add_argument("--workers", type=int, help="W: phase-2 workers (SWAP) / data-parallel ranks (SGD); config key 'workers'")
    t.add_argument("--procs", type=int, help="local processes (default min(W, CPU cores)); config key 'procs'")
    t.add_argument("--data-dir", help="folder with the dataset files, searched first; config key 'data.dir'")
    t.add_argument("--out", help="run directory (default runs/CONFIG-METHOD-seedSEED)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, dotted (e.g. phase1.batch_size=4096); repeatable")
    t.add_argument("--verbose", action="store_true", help="show torch's own log lines and full tracebacks "
                   "(same as SWAP_LOG=debug); by default a failure is one line naming RUN/logs/rankR.log")
    t.add_argument("--logger", dest="loggers", action="append", choices=["tensorboard", "mlflow"],
                   help="also log to TensorBoard (RUN/tensorboard) or MLflow (MLFLOW_TRACKING_URI, else RUN/mlflow.db); "
                        "repeatable; config key 'logging.loggers' (metrics.jsonl is always written)")
    g = t.add_mutually_exclusive_group()
    g.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    g.add_argument("--resume", action="store_true", help="continue a run from its last checkpoint (every checkpoint_every epochs): "
                   "finished phases and workers are loaded, not retrained; the result is the uninterrupted run's")
    g.add_argument("--auto-resume", action="store_true", help="continue the run in --out if it holds one of the same "
                   "config, else start it: one command line for the first start and every restart "
                   "(torchrun --max-restarts N, a requeued scheduler job)")


def _compare_parser(sub) -> None:
    c = sub.add_parser("compare", help="the paper's Tables 1, 2, 4: several methods x seeds, one report",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=f"methods: {', '.join(COMPARED)}")
    c.add_argument("--config", required=True, help="preset name or YAML path (e.g. fashion_mnist_compare)")
    c.add_argument("--seeds", type=int, default=3, help="number of seeds, 0..S-1, interleaved across methods")
    c.add_argument("--methods", default="sgd-small,sgd-large,swap,swa-large,swa-lb-sb,swa-small",
                   help="comma-separated methods (default: the paper's six; every method is listed below)")
    c.add_argument("--out", help="compare directory (default runs/compare-CONFIG); finished runs are reused")
    c.add_argument("--equal-time", metavar="METHOD|UPDATES",
                   help="give every SGD baseline the critical-path updates of METHOD's run of the same seed (e.g. "
                        "swap), or UPDATES updates, instead of its epochs: the compare at equal time")
    c.add_argument("--procs", type=int, help="local processes per run (default min(workers, CPU cores))")
    c.add_argument("--data-dir", help="folder with the dataset files")
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key (applies to every method)")
    c.add_argument("--verbose", action="store_true", help="show torch's own log lines and full tracebacks")


def _analysis_parsers(sub) -> None:
    pl = sub.add_parser("plot", help="Fig. 1: LR and test accuracy per worker against epochs and wall time")
    pl.add_argument("run_dir")
    pl.add_argument("--svg", action="store_true", help="also write SVG")
    ls = sub.add_parser("landscape", help="Figs. 2-3: train/test error on the plane through three models")
    ls.add_argument("run_dir")
    ls.add_argument("--points", nargs=3, default=["phase1", "worker0", "swap"], metavar=("A", "B", "C"),
                    help="checkpoint names: phase1, workerN, swap (default: phase1 worker0 swap)")
    ls.add_argument("--grid", type=int, default=9, help="grid points per axis (default 9)")
    ls.add_argument("--margin", type=float, default=0.3, help="grid margin beyond the points, as a fraction of their span")
    ls.add_argument("--subset", type=int, default=10000,
                    help="training samples for the BN pass and the train error (0 = all; default 10000)")
    ls.add_argument("--procs", type=int, help="processes sharing the grid points (default: CPU cores)")
    ls.add_argument("--recompute", action="store_true", help="ignore the cached .npz")
    ls.add_argument("--svg", action="store_true")
    co = sub.add_parser("cosine", help="Fig. 4: cosine between -gradient and the direction to the SWAP average")
    co.add_argument("run_dir")
    co.add_argument("--batch-size", type=int, default=512, help="mini-batch for the gradient (default 512)")
    co.add_argument("--svg", action="store_true")


def _plan_parser(sub) -> None:
    pn = sub.add_parser("plan", help="predict sgd-small / sgd-large / SWAP wall time on D devices from a calibration")
    pn.add_argument("--config", required=True, help="preset name or YAML path")
    pn.add_argument("--devices", type=int, default=1, help="D: devices (GPUs, or CPU processes) of the prediction")
    pn.add_argument("--bandwidth", type=float, default=12.5e9, help="all-reduce bandwidth, bytes/s (default 12.5e9)")
    pn.add_argument("--latency", type=float, default=20e-6, help="all-reduce latency per step, s (default 20e-6)")
    pn.add_argument("--phase1-epochs", type=int, help="epochs phase 1 takes to its stopping accuracy (default: max_epochs)")
    pn.add_argument("--measured", help="a `swap compare` directory: compare the prediction with its runs")
    pn.add_argument("--data-dir", help="folder with the dataset files")
    pn.add_argument("--train-samples", type=int, help="plan for this many training samples without reading the data "
                    "(e.g. 1281167 for ImageNet); calibrates on synthetic images of data.image_size")
    pn.add_argument("--test-samples", type=int, default=50000, help="with --train-samples: test samples (default 50000)")
    pn.add_argument("--classes", type=int, default=1000, help="with --train-samples: classes (default 1000)")
    pn.add_argument("--calibration-batch", type=int, help="largest micro-batch to calibrate (a small device: the rate "
                    "is taken as constant above it)")
    pn.add_argument("--calibration-samples", type=int, default=4096, help="samples per calibration epoch (default 4096)")
    pn.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")


def _data_parser(sub) -> None:
    dsub = sub.add_parser("data", help="find or fetch datasets").add_subparsers(dest="data_command", required=True)
    f = dsub.add_parser("fetch", help="download a dataset with checksum verification")
    f.add_argument("name", choices=["fashion-mnist", "mnist", "cifar10", "cifar100"])
    f.add_argument("--dest", help="target folder (default: the user cache)")
    f.add_argument("--url", help="base URL instead of the canonical one (a mirror)")
    fd = dsub.add_parser("find", help="print the folder a dataset would be read from")
    fd.add_argument("name", choices=["fashion-mnist", "mnist", "cifar10", "cifar100", "text-char"])
    fd.add_argument("--data-dir")


def config_from_args(args: argparse.Namespace):
    """The validated config of ``--config`` with ``--set`` and the option shortcuts applied
    (``--workers``, ``--procs``, ``--data-dir`` are the keys workers, procs, data.dir)."""
    overrides = list(args.overrides)
    for option, key in (("workers", "workers"), ("procs", "procs"), ("data_dir", "data.dir")):
        if getattr(args, option, None) is not None:
            overrides.append(f"{key}={getattr(args, option)}")
    if getattr(args, "loggers", None):
        overrides.append(f"logging.loggers=[{', '.join(args.loggers)}]")
    cfg = load_config(args.config, overrides)
    announce_code(cfg)
    return cfg


def cmd_train(args: argparse.Namespace) -> int:
    from . import methods
    from .context import configured_parts
    from .launch import DirMode, run
    from .report import results_table

    method = methods.get_method(args.method)
    cfg = config_from_args(args)
    named = method.config(cfg)                            # the method's own settings (swap-cycles, ...)
    out = Path(args.out or f"runs/{named.name}-{args.method}-seed{named.seed}")
    try:
        summary, out = run(args.method, cfg, out, mode=DirMode(args.overwrite, args.resume, args.auto_resume))
    except Interrupted as exc:
        summary = {"interrupted": {"signal": exc.signum, "where": exc.where}}
    if summary is not None and "interrupted" in summary:
        stop = summary["interrupted"]
        again = [a for a in args.argv if a not in ("--overwrite", "--resume", "--auto-resume")]
        if not args.out:
            again += ["--out", str(out)]
        print(f"swap: stopped by {signal.Signals(stop['signal']).name} {stop['where']}; every process wrote its "
              f"checkpoint. Continue with:\n  swap {shlex.join(again + ['--resume'])}", file=sys.stderr)
        return 128 + stop["signal"]
    if summary is not None:
        print(results_table(summary))
        model_fn = configured_parts(cfg)[0]
        pretrained = model_fn is not None and hasattr(methods.final_model(args.method, out, model_fn), "save_pretrained")
        print(f"\nRun directory: {out} (summary.json, metrics.jsonl, checkpoints/"
              + (", pretrained/: the model for from_pretrained" if pretrained else "") + ")")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .compare import plan, run_compare
    from .launch import local_procs

    cfg = config_from_args(args)
    if args.seeds < 1:
        raise SwapError(f"--seeds must be >= 1, got {args.seeds}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    plan(methods)
    procs = local_procs(cfg)
    out = Path(args.out or f"runs/compare-{cfg.name}")
    from .report import compare_table
    equal_time = args.equal_time
    if equal_time is not None and equal_time.strip().lstrip("-").isdigit():
        equal_time = int(equal_time)
    report = run_compare(cfg, args.seeds, methods, out, procs, equal_time)
    print(compare_table(report))
    print(f"\nReport: {out}/report.md, report.json, report.png")
    return 0


def _figures(run_dir: str) -> Path:
    from .rundir import RunDir

    run = RunDir(run_dir)
    if not run.config_path.is_file():
        raise SwapError(f"{run.path} is not a run directory (no config.yaml)")
    (run.path / "figures").mkdir(exist_ok=True)
    return run.path / "figures"


def _write_csv(path: Path, rows: list[dict]) -> None:
    import csv

    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def cmd_plot(args: argparse.Namespace) -> int:
    from .analysis.plots import plot_run
    from .rundir import RunDir

    figs = _figures(args.run_dir)
    records = RunDir(args.run_dir).read_metrics()
    if not records:
        raise SwapError(f"{args.run_dir} has no metrics.jsonl records yet")
    keys = ["phase", "worker", "epoch", "lr", "batch_size", "train_loss", "train_acc", "test_acc", "wall_s"]
    _write_csv(figs / "curves.csv", [{k: r.get(k) for k in keys} for r in records])
    files = plot_run(records, figs / "curves", args.svg)
    if not any(r["phase"] == "average" for r in records):
        print("swap: note: no per-epoch average recorded; train with --set phase2.track_average=true for that curve",
              file=sys.stderr)
    print("\n".join(str(f) for f in files + [figs / "curves.csv"]))
    return 0


def cmd_landscape(args: argparse.Namespace) -> int:
    import numpy as np

    from . import distributed
    from .analysis.landscape import landscape_rank
    from .analysis.plots import plot_landscape
    from .checkpoint import checkpoint_exists
    from .rundir import RunDir

    figs = _figures(args.run_dir)
    run = RunDir(args.run_dir)
    for name in args.points:
        if not checkpoint_exists(run.checkpoint(name)):
            raise SwapError(f"no checkpoint '{name}' in {run.path}/checkpoints (names: phase1, workerN, swap)")
    if args.grid < 2:
        raise SwapError(f"--grid must be >= 2, got {args.grid}")
    stem = figs / f"landscape_{'_'.join(args.points)}"
    cache = stem.with_suffix(".npz")
    settings = np.array([args.grid, args.margin, args.subset])
    grid = None
    if cache.is_file() and not args.recompute:
        loaded = dict(np.load(cache))
        if np.array_equal(loaded.get("settings"), settings):
            grid = loaded
            print(f"swap: using cached {cache} (--recompute to evaluate again)", file=sys.stderr)
    if grid is None:
        procs = args.procs or (os.cpu_count() or 1)
        t = time.time()
        grid = distributed.launch(landscape_rank, procs, str(run.path), list(args.points), args.grid, args.margin,
                                  args.subset, log_dir=run.logs_dir)
        grid["settings"], grid["seconds"] = settings, np.array(time.time() - t)
        np.savez(cache, **grid)
        print(f"swap: {args.grid}x{args.grid} grid in {float(grid['seconds']):.0f} s on {procs} processes", file=sys.stderr)
    files = plot_landscape(grid, stem, args.svg)
    print("\n".join(str(f) for f in files + [cache]))
    return 0


def cmd_cosine(args: argparse.Namespace) -> int:
    from .analysis.cosine import cosine_rows
    from .analysis.plots import plot_cosine

    figs = _figures(args.run_dir)
    rows = cosine_rows(args.run_dir, args.batch_size)
    _write_csv(figs / "cosine.csv", rows)
    files = plot_cosine(rows, figs / "cosine", args.svg)
    print("\n".join(str(f) for f in files + [figs / "cosine.csv"]))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    import torch

    from . import distributed
    from .plan import Hardware, plan_table, predict

    cfg = config_from_args(args)
    if args.devices < 1 or args.bandwidth <= 0 or args.latency < 0:
        raise SwapError("--devices must be >= 1, --bandwidth > 0 and --latency >= 0")
    data = _plan_data(cfg, args)
    measured, phase1_epochs = _measured_runs(args)
    device = distributed.resolve_device(cfg.device)
    threads = cfg.threads or distributed.default_threads(args.devices) if device.type == "cpu" else torch.get_num_threads()
    torch.set_num_threads(threads)
    t = time.time()
    thr = _calibrated(cfg, args, data, device)
    shape = data["shape"]
    pred = predict(cfg, thr, Hardware(args.devices, args.bandwidth, args.latency), data["train"], data["test"],
                   phase1_epochs)
    print(f"swap plan: {cfg.name} on {args.devices} x {device.type} ({threads} threads each on CPU); calibration "
          f"{time.time() - t:.0f} s: " + ", ".join(f"batch {b}: {v:.0f}/s" for b, v in thr.train.items())
          + "".join(f", {k} stacked x {cfg.phase2.batch_size}: {v:.0f}/s" for k, v in thr.stacked.items())
          + f", eval {thr.eval:.0f}/s" + (f" at {shape[1]}x{shape[2]} px" if shape else "") + f"; phase 1 epochs {pred['swap']['phase1_epochs']}. "
          f"A model: {args.devices} devices each as fast as the calibrated one, compute per sample scaled by "
          f"pixels at other image sizes, ring all-reduce at {args.bandwidth:.3g} B/s", file=sys.stderr)
    print(plan_table(pred, {m: [s["wall_s"]["total"] for s in runs] for m, runs in measured.items()}))
    return 0


def _plan_data(cfg, args: argparse.Namespace) -> dict:
    """What ``swap plan`` calibrates on: ``train``, ``test`` (sample counts), ``classes``,
    ``shape`` ((C, H, W) of an image, None for a model of your own on your dataset's batches),
    ``augment``, and for the generic path ``train_set`` and ``own`` (model_fn, task, collate_fn).
    Synthetic images of ``--train-samples`` need no data."""
    from .context import configured_parts
    from .data import ImageDataset, augment_for, load_configured

    if args.train_samples:                         # no data needed: sizes given, synthetic images
        if args.train_samples < 1 or args.test_samples < 1 or args.classes < 2:
            raise SwapError("--train-samples and --test-samples must be >= 1 and --classes >= 2")
        side = cfg.data.image_size or 224               # synthetic images: ImageNet's side unless set
        return {"train": args.train_samples, "test": args.test_samples, "classes": args.classes,
                "shape": (3, side, side), "augment": None}
    train_set, test_set = load_configured(cfg.data)
    data = {"train": len(train_set), "test": len(test_set), "classes": getattr(train_set, "num_classes", 0),
            "shape": None, "augment": None, "train_set": train_set, "own": configured_parts(cfg)}
    if isinstance(train_set, ImageDataset):
        data.update(shape=tuple(train_set.images.shape[1:]), augment=augment_for(cfg.data, train_set))
    elif hasattr(train_set, "channels"):          # an image folder: its channels at its side
        data.update(shape=(train_set.channels, train_set.size, train_set.size))
    elif data["own"][0] is None:
        raise SwapError(f"swap plan calibrates image models and models of your own (model.name: "
                        f"package.module:function); data.name={cfg.data.name} with model.name={cfg.model.name} "
                        f"is neither")
    return data


def _measured_runs(args: argparse.Namespace) -> tuple[dict, int | None]:
    """The summaries of ``--measured``'s runs by method, and phase 1's epochs (``--phase1-epochs``,
    else the mean of the measured SWAP runs', else None)."""
    import statistics

    from .rundir import RunDir

    measured: dict[str, list[dict]] = {}
    if args.measured:
        for method in ("sgd-small", "sgd-large", "swap"):
            runs = sorted(Path(args.measured, method).glob("seed*"))
            measured[method] = [RunDir(r).read_summary() for r in runs if (r / "summary.json").is_file()]
    phase1_epochs = args.phase1_epochs
    if phase1_epochs is None and measured.get("swap"):
        phase1_epochs = round(statistics.mean(s["epochs"]["phase1"] for s in measured["swap"]))
    return measured, phase1_epochs


def _calibrated(cfg, args: argparse.Namespace, data: dict, device):
    """The measured throughput (:class:`swap.plan.Throughput`) of ``data`` (:func:`_plan_data`)."""
    from . import methods
    from .launch import checked_task
    from .models import configured_model
    from .plan import Measure, calibrate, calibrate_dataset, chunk_sizes, stacked_shape
    from .train import amp_dtype_for

    sizes = chunk_sizes(cfg, args.devices, args.calibration_batch)
    how = Measure(device, args.calibration_samples, min(1024, args.calibration_samples),
                  amp_dtype_for(cfg.precision, device), cfg.channels_last)
    shape, classes = data["shape"], data["classes"]
    if shape is None:
        own, train_set = data["own"], data["train_set"]
        return calibrate_dataset(own[0], train_set, checked_task(cfg, methods.get_method("swap"), own, train_set),
                                 own[2] or getattr(train_set, "collate_fn", None), sizes,
                                 dataclasses.replace(how, channels_last=False))
    return calibrate(lambda: configured_model(cfg.model, classes, in_channels=shape[0]), shape, classes, sizes, how,
                     augment=data["augment"], stacked=stacked_shape(cfg, args.devices))


def cmd_data(args: argparse.Namespace) -> int:
    from .data import fetch, find_data_dir

    if args.data_command == "fetch":
        print(fetch(args.name, Path(args.dest) if args.dest else None, args.url))
    else:
        print(find_data_dir(args.name, args.data_dir))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if getattr(args, "verbose", False):
        os.environ["SWAP_LOG"] = "debug"                 # inherited by every rank and worker process
    try:
        if args.command == "train":
            return cmd_train(args)
        if args.command == "compare":
            return cmd_compare(args)
        if args.command == "plan":
            return cmd_plan(args)
        if args.command in ("plot", "landscape", "cosine"):
            return {"plot": cmd_plot, "landscape": cmd_landscape, "cosine": cmd_cosine}[args.command](args)
        return cmd_data(args)
    except SwapError as exc:
        print(f"swap: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("swap: interrupted; continue with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["EPILOG", "build_parser", "config_from_args", "cmd_train", "cmd_compare",
           "cmd_plot", "cmd_landscape", "cmd_cosine", "cmd_plan", "cmd_data", "main"]
