"""Throughput of our train loop against a bare PyTorch loop, the cost of phase 3, and phase-2 scaling.

1. Training samples/s: ``swap.train`` (LR schedule, metrics, divergence guard, stop checks,
   records) against the minimal PyTorch loop (zero_grad, forward + backward per micro-batch, SGD
   step), both on the same batches of the same real loader (permutation, gather, batched
   augmentation, normalisation: the data work counted on both sides), same model (smallcnn,
   channels_last), same initial weights, same warm-up epoch, same threads, at the phase-1 (2048 as
   8 x 256 micro-batches) and phase-2 (128) batch sizes; the two loops run in lockstep, one update
   each in turn, each side timed separately (:func:`compare_loops`), over several epochs of about
   5 s each; the median and spread of the per-epoch ratios. Then a cProfile breakdown of our loop
   (``--loop-only`` stops here). 1b: the same loop with TensorBoard and MLflow on and a record
   every 10 updates, against it without them (:func:`compare_logging`; ``--logging-only``). 1c: the
   same loop with an EMA of the weights updated after every update, against it without (:func:`compare_ema`;
   ``--ema-only``).
2. Phase 3: averaging W=8 state dicts + one BN-recompute pass over 60,000 images + test evaluation,
   in seconds and as a share of a SWAP run's wall time (``--swap-run``, default runs/demo).
3. Phase-2 scaling: 2 workers x 1 epoch in 1 process (2 threads, workers in turn) against
   2 processes (1 thread each, workers in parallel).

    .venv/bin/python benchmarks/throughput.py [--reps 5] [--loop-only] [--logging-only] [--ema-only]

Prints a table and writes ``benchmarks/results/throughput.json`` (``throughput-loop.json`` with ``--loop-only``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def lockstep_epoch(step, loader, epoch: int, batches, bare_update, **train_kwargs) -> tuple[float, float]:
    """One epoch of our loop (``swap.train.train`` with ``step`` over ``loader``, and
    ``train_kwargs``) in lockstep with a bare loop (``bare_update(batch)`` over ``batches``): after
    each of our updates (the loop's ``on_step``) the bare loop takes one. Each side's time is summed
    separately: ours is everything between two of its updates but the bare update, so its epoch end
    counts too. Returns (our seconds, bare seconds)."""
    from swap.callbacks import On
    from swap.train import Position, train

    spent = {"ours": 0.0, "bare": 0.0}
    batches = iter(batches)
    mark = [time.perf_counter()]

    def bare(_: int) -> None:
        now = time.perf_counter()
        spent["ours"] += now - mark[0]
        bare_update(next(batches))
        mark[0] = time.perf_counter()
        spent["bare"] += mark[0] - now

    train(step, loader, lambda s: 0.01, epochs=epoch + 1, start=Position(epoch),
          callbacks=[*train_kwargs.get("callbacks", ()), On(update_end=bare)])
    spent["ours"] += time.perf_counter() - mark[0]
    return spent["ours"], spent["bare"]


def model() -> torch.nn.Module:
    """The timed model: the small CNN, channels_last, the same initial weights every time."""
    from swap.models import build_model
    torch.manual_seed(0)
    return build_model("smallcnn", 10, 1).to(memory_format=torch.channels_last)


def sgd(m) -> torch.optim.Optimizer:
    """The timed optimizer: Nesterov SGD with weight decay."""
    return torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)


def bench_loader(data, batch: int, mean, std):
    """A loader of the timed batches: the same permutation, augmentation and normalisation every time."""
    from swap.data import Augment, Loader
    return Loader(data, batch, (0, "bench", 0), (mean, std), Augment(2, True, 8), channels_last=True)


def bare_sgd(model, opt, micro: int = 0):
    """The minimal PyTorch update that our loop is timed against: ``update((x, y))`` = zero_grad,
    forward + backward of the cross-entropy (per micro-batch of ``micro`` samples, weighted by its
    share, when 0 < ``micro`` < the batch), optimizer step; nothing else."""
    def update(batch_xy) -> None:
        x, y = batch_xy
        opt.zero_grad(set_to_none=True)
        if 0 < micro < len(y):
            for xc, yc in zip(x.split(micro), y.split(micro)):
                (F.cross_entropy(model(xc), yc) * (len(yc) / len(y))).backward()
        else:
            F.cross_entropy(model(x), y).backward()
        opt.step()
    return update


def lockstep(step, loader, bare_batches, bare_update, reps: int) -> dict[str, list[float]]:
    """Seconds per epoch of our loop and of a bare loop in lockstep (:func:`lockstep_epoch`; the
    bare loop's batches of epoch e are ``bare_batches(e)``). Epoch 0 is an untimed warm-up, then
    ``reps`` epochs. Returns {"ours", "bare"}: lists."""
    times = {"ours": [], "bare": []}
    for epoch in range(reps + 1):
        ours, bare = lockstep_epoch(step, loader, epoch, bare_batches(epoch), bare_update)
        if epoch > 0:
            times["ours"].append(ours)
            times["bare"].append(bare)
    return times


def compare_loops(train_set, mean, std, batch: int, micro: int, steps: int, reps: int) -> dict:
    """Our loop against the bare loop at one batch size, in lockstep.

    Ours is ``swap.train.train`` with :class:`swap.train.SGDStep` (LR schedule, metrics on the
    device, divergence guard, stop-signal checks, the epoch's record; no evaluation). The bare loop
    is the minimal PyTorch loop: zero_grad, forward + backward per micro-batch, SGD step, nothing
    else. Both draw their batches from their own copy of the same loader (the same batches, and the
    same data work: permutation, gather, augmentation, normalisation), from the same initial
    weights. After each of our updates (the loop's ``on_step``) the bare loop takes its update on
    its own model; each side's time is summed separately (ours: everything between two of its
    updates but the bare update, so its epoch end is counted too). Interleaving update by update
    cancels the drift of a shared machine's speed, which between two runs of several seconds is
    larger here than the difference measured. One untimed warm-up epoch, then ``reps`` timed
    epochs of ``steps`` updates. Returns samples/s of each side per epoch and the ratio ours /
    bare per epoch, with medians and spreads ((max - min) / median)."""
    from swap.train import SGDStep

    data = train_set.subset(steps * batch)
    loaders = [bench_loader(data, batch, mean, std) for _ in range(2)]
    ours, bare = model(), model()
    step, bare_update = SGDStep(ours, sgd(ours), micro), bare_sgd(bare, sgd(bare), micro)

    times = lockstep(step, loaders[0], lambda epoch: loaders[1].epoch(epoch), bare_update, reps)
    rate = {k: [steps * batch / t for t in v] for k, v in times.items()}
    ratios = [o / b for o, b in zip(rate["ours"], rate["bare"])]
    spread = lambda v: (max(v) - min(v)) / statistics.median(v)        # noqa: E731
    return {"batch": batch, "micro_batch": micro, "steps": steps, "reps": reps,
            "threads": torch.get_num_threads(), "seconds_per_epoch_each": statistics.median(times["bare"]),
            "ours_samples_per_s": statistics.median(rate["ours"]), "bare_samples_per_s": statistics.median(rate["bare"]),
            "ratio": statistics.median(ratios), "ratio_spread": spread(ratios), "ratios": ratios,
            "ours_all": rate["ours"], "bare_all": rate["bare"]}


def compare_logging(train_set, mean, std, batch: int, steps: int, reps: int, every: int = 10,
                    loggers: tuple = ("tensorboard", "mlflow")) -> dict:
    """The cost of the loggers: our loop with TensorBoard and MLflow on and a record every ``every``
    updates (``logging.log_every``), and our loop without them (both writing metrics.jsonl per
    epoch, as every run does). A 1% difference is below the drift of a shared machine's speed
    between two runs, so each is timed against a bare PyTorch loop in lockstep
    (:func:`lockstep_epoch`, the bare update after each of ours), epochs alternating between the two
    configurations; the cost is the ratio of their median (ours / bare) ratios. Same batches, model
    and initial weights everywhere; one untimed warm-up epoch each, then ``reps`` timed epochs of
    ``steps`` updates."""
    from swap import tracking
    from swap.config import load_config
    from swap.rundir import RunDir
    from swap.callbacks import On
    from swap.train import SGDStep, StepLog

    def loader():
        return bench_loader(data, batch, mean, std)

    data = train_set.subset(steps * batch)
    bare, bare_loader = model(), loader()
    bare_update = bare_sgd(bare, sgd(bare))

    ratios = {"plain": [], "logged": []}
    with tempfile.TemporaryDirectory() as tmp:
        runs = {"plain": RunDir(Path(tmp) / "plain"), "logged": RunDir(Path(tmp) / "logged")}
        for r in runs.values():
            r.path.mkdir()
        cfg = load_config(None, {"logging": {"loggers": list(loggers), "log_every": every}})
        tracking.prepare(runs["logged"].path, cfg)
        tracked = {"plain": None, "logged": tracking.start(runs["logged"].path, cfg.logging.loggers)}
        sides = {}
        for side in runs:
            m = model()
            sides[side] = (SGDStep(m, sgd(m), batch), loader())
        for epoch in range(reps + 1):
            for side in (("plain", "logged") if epoch % 2 else ("logged", "plain")):
                step, ours_loader = sides[side]

                def sink(rec, run=runs[side], tracks=tracked[side]):
                    run.log({"phase": "phase1", "worker": None, **rec})
                    if tracks is not None:                     # as the run's Context does
                        tracks.record({"phase": "phase1", "worker": None, **rec})
                logs = [StepLog(every, sink, 1)] if side == "logged" else []
                ours, bare_s = lockstep_epoch(step, ours_loader, epoch, bare_loader.epoch(2 * epoch + (side == "logged")),
                                              bare_update, callbacks=[On(epoch_end=sink), *logs])
                if epoch > 0:
                    ratios[side].append(bare_s / ours)          # our samples/s over the bare loop's
        logged_records = len(runs["logged"].read_metrics(steps=True))
        tracked["logged"].close()
    plain, logged = statistics.median(ratios["plain"]), statistics.median(ratios["logged"])
    return {"batch": batch, "steps": steps, "reps": reps, "log_every": every, "loggers": list(loggers),
            "records_logged": logged_records, "plain_over_bare": plain, "logged_over_bare": logged,
            "ratio": logged / plain, "plain_ratios": ratios["plain"], "logged_ratios": ratios["logged"]}


def compare_ema(train_set, mean, std, batch: int, micro: int, steps: int, reps: int, device: str = "same") -> dict:
    """The cost of an EMA of the weights updated after every update (``swap.EMA``, decay 0.999, one
    foreach ``lerp_`` over the parameters; ``device``: where it lives): our loop with it against our
    loop without it, each timed against a bare PyTorch loop in lockstep (:func:`lockstep_epoch`),
    epochs alternating between the two; the cost is the ratio of their median (ours / bare) ratios,
    as for the loggers (:func:`compare_logging`). Same batches, model and initial weights; one
    untimed warm-up epoch each, then ``reps`` timed epochs of ``steps`` updates."""
    from swap import EMA
    from swap.train import SGDStep

    def loader():
        return bench_loader(data, batch, mean, std)

    data = train_set.subset(steps * batch)
    bare, bare_loader = model(), loader()
    bare_update = bare_sgd(bare, sgd(bare), micro)
    sides = {}
    for side in ("plain", "ema"):
        m = model()
        sides[side] = (SGDStep(m, sgd(m), micro), loader(), [EMA(m, 0.999, device=device)] if side == "ema" else [])
    ratios = {"plain": [], "ema": []}
    for epoch in range(reps + 1):
        for side in (("plain", "ema") if epoch % 2 else ("ema", "plain")):
            step, ours_loader, callbacks = sides[side]
            ours, bare_s = lockstep_epoch(step, ours_loader, epoch, bare_loader.epoch(2 * epoch + (side == "ema")),
                                          bare_update, callbacks=callbacks)
            if epoch > 0:
                ratios[side].append(bare_s / ours)              # our samples/s over the bare loop's
    plain, ema = statistics.median(ratios["plain"]), statistics.median(ratios["ema"])
    return {"batch": batch, "micro_batch": micro, "steps": steps, "reps": reps, "device": device,
            "ema_updates": sides["ema"][2][0].count, "plain_over_bare": plain, "ema_over_bare": ema,
            "cost": 1 - ema / plain, "plain_ratios": ratios["plain"], "ema_ratios": ratios["ema"]}


def profile_loop(train_set, mean, std, batch: int, micro: int, steps: int) -> dict:
    """Where our loop's time goes (cProfile, one epoch of ``steps`` updates after a warm-up):
    cumulative seconds of the data path, forward + backward, the optimizer step, the metrics, the
    divergence guard's norm and check, the stop-signal check; the rest is the loop's own Python."""
    import cProfile
    import pstats

    from swap.data import Augment, Loader
    from swap.models import build_model
    from swap.train import Position, SGDStep, train

    torch.manual_seed(0)
    model = build_model("smallcnn", 10, 1).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    loader = Loader(train_set.subset(steps * batch), batch, (0, "bench", 0), (mean, std), Augment(2, True, 8),
                    channels_last=True)
    train(SGDStep(model, opt, micro), loader, lambda s: 0.01, epochs=1)             # warm-up
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.runcall(train, SGDStep(model, opt, micro), loader, lambda s: 0.01, epochs=2, start=Position(1))
    total = time.perf_counter() - t
    stats = pstats.Stats(prof).stats
    cum = {}
    for (file, _, func), (_, _, _, ct, _) in stats.items():
        cum[(Path(file).name, func)] = cum.get((Path(file).name, func), 0.0) + ct
    parts = {
        "data (permutation, gather, augment, normalise)": cum.get(("loader.py", "epoch"), 0.0),
        "forward + loss": cum.get(("module.py", "_wrapped_call_impl"), 0.0),
        "backward": cum.get(("_tensor.py", "backward"), 0.0),
        "optimizer step": cum.get(("optimizer.py", "wrapper"), 0.0),
        "guard: gradient norm": cum.get(("train.py", "gradient_norm"), 0.0),
        "guard: check (host sync)": cum.get(("train.py", "observe_norms"), 0.0),
        "stop-signal check": cum.get(("interrupt.py", "stop_agreed"), 0.0),
    }
    passes = cum.get(("train.py", "_pass"), 0.0)
    parts["metrics (loss, correct, samples on the device)"] = max(0.0, passes - parts["forward + loss"]
                                                                  - parts["backward"])
    parts["loop's own Python, LR, records"] = max(0.0, total - sum(parts.values()))
    return {"batch": batch, "micro_batch": micro, "steps": steps, "profiled_total_s": total,
            "seconds": parts, "share": {k: v / total for k, v in parts.items()}}


def phase2_worker(run_dir: str, epochs: int, workers: int) -> float:
    """Rank function: train this rank's share of ``workers`` phase-2 workers; return wall seconds."""
    from swap import distributed
    from swap.context import Context
    from swap.config import load_config
    from swap.train import train

    cfg = load_config("fashion_mnist_quick", ["eval_every=100"])
    ctx = Context.create(cfg, run_dir)
    t = time.perf_counter()
    for w in range(ctx.dist.rank, workers, ctx.dist.world_size):
        model = ctx.build_model()
        loader = ctx.loader(128, ("phase2", w), data_parallel=False)
        train(ctx.update_step(model, ctx.optimizer(model, "phase2")), loader, lambda s: 0.05, epochs=epochs)
    wall = max(distributed.all_gather_objects(time.perf_counter() - t))
    distributed.teardown()
    return wall


def _write(results: dict, name: str = "throughput.json") -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / name).write_text(json.dumps(results, indent=1))
    if not results["loop"]:
        return
    for r in results.get("ema", []):
        print(f"EMA every update, batch {r['batch']} ({r['micro_batch']}), device {r['device']}: "
              f"{100 * r['cost']:.2f}% of the loop's throughput")
    print("\n| batch (micro) | ours samples/s | bare samples/s | ours / bare (median of per-epoch ratios) | spread |"
          "\n|---:|---:|---:|---:|---:|")
    for r in results["loop"]:
        print(f"| {r['batch']} ({r['micro_batch']}) | {r['ours_samples_per_s']:.0f} | {r['bare_samples_per_s']:.0f} "
              f"| {r['ratio']:.3f} | {100 * r['ratio_spread']:.1f}% |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--loop-only", action="store_true", help="only part 1 (our loop against the bare loop)")
    ap.add_argument("--swap-run", default=str(ROOT / "runs" / "demo"))
    ap.add_argument("--logging-only", action="store_true", help="only the loggers' cost (part 1b)")
    ap.add_argument("--ema-only", action="store_true", help="only the cost of an EMA updated every update (part 1c)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from swap import distributed
    from swap.averaging import average_state_dicts, bn_buffer_names, recompute_bn
    from swap.data import Loader, load_dataset
    from swap.models import build_model
    from swap.distributed import machine_info
    from swap.train import evaluate

    torch.set_num_threads(os.cpu_count() or 1)
    train_set, test_set = load_dataset("fashion-mnist")
    mean, std = train_set.channel_stats()
    results: dict = {"machine": machine_info(torch.device("cpu"), torch.get_num_threads(), 1), "loop": []}

    # 1c. an EMA of the weights after every update, against none
    results["ema"] = [] if args.logging_only else [
        compare_ema(train_set, mean, std, b, m, n, args.reps, dev) for b, m, n, dev in
        ((128, 0, 256, "same"), (2048, 256, 16, "same"), (128, 0, 256, "cpu"))]
    for r in results["ema"]:
        print(json.dumps({k: v for k, v in r.items() if not k.endswith("ratios")}), flush=True)
    if args.ema_only:
        _write(results, "throughput-ema.json")
        return
    # 1. our loop vs the bare loop on the same batches, same warm-up, interleaved repetitions
    for batch, micro, steps in (() if args.logging_only else ((2048, 256, 16), (128, 128, 256))):
        row = compare_loops(train_set, mean, std, batch, micro, steps, args.reps)
        results["loop"].append(row)
        print(json.dumps({k: v for k, v in row.items() if not isinstance(v, list)}), flush=True)
    # 1b. the loggers' cost: TensorBoard + MLflow, a record every 10 updates, against none
    results["logging"] = compare_logging(train_set, mean, std, 128, 256, args.reps)
    print(json.dumps({k: v for k, v in results["logging"].items() if not k.endswith("ratios")}), flush=True)
    if args.logging_only:
        _write(results, "throughput-logging.json")
        return
    results["profile"] = [profile_loop(train_set, mean, std, b, m, n) for b, m, n in ((128, 128, 256), (2048, 256, 16))]
    for p in results["profile"]:
        print(f"profile, batch {p['batch']} ({p['micro_batch']}), {p['profiled_total_s']:.2f} s under cProfile:")
        for k, v in p["seconds"].items():
            print(f"  {k:48s} {v:6.2f} s  {100 * p['share'][k]:5.1f}%")
    if args.loop_only:
        _write(results, "throughput-loop.json")
        return

    # 2. phase 3 cost
    torch.manual_seed(0)
    models = [build_model("smallcnn", 10, 1).to(memory_format=torch.channels_last) for _ in range(8)]
    t = time.perf_counter()
    avg_state = average_state_dicts([m.state_dict() for m in models], bn_buffer_names(models[0]))
    t_avg = time.perf_counter() - t
    averaged = models[0]
    averaged.load_state_dict(avg_state)
    t = time.perf_counter()
    from swap.data import Augment
    recompute_bn(averaged, (x for x, _ in Loader(train_set, 512, (0, "phase3", 0), (mean, std), Augment(2, True, 8),
                                                channels_last=True).epoch(0)))
    t_bn = time.perf_counter() - t
    t = time.perf_counter()
    evaluate(averaged, test_set, mean, std, channels_last=True)
    t_eval = time.perf_counter() - t
    phase3 = {"average_s": t_avg, "bn_recompute_s": t_bn, "evaluate_s": t_eval, "total_s": t_avg + t_bn + t_eval}
    summary_path = Path(args.swap_run) / "summary.json"
    if summary_path.is_file():
        s = json.loads(summary_path.read_text())
        phase3["swap_run"] = str(args.swap_run)
        phase3["swap_run_total_s"] = s["wall_s"]["total"]
        phase3["swap_run_phase3_s"] = s["wall_s"]["phase3"]
        phase3["share_of_swap_run"] = s["wall_s"]["phase3"] / s["wall_s"]["total"]
    results["phase3"] = phase3
    print(json.dumps(phase3), flush=True)

    # 3. phase-2 scaling, 1 -> 2 processes (2 workers x 1 epoch)
    os.environ["PYTHONPATH"] = str(ROOT / "benchmarks") + os.pathsep + os.environ.get("PYTHONPATH", "")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import throughput as me  # the spawned ranks import this module by this name
    scaling = {}
    with tempfile.TemporaryDirectory() as tmp:
        for procs in (1, 2):
            walls = [distributed.launch(me.phase2_worker, procs, tmp, 1, 2) for _ in range(args.reps)]
            scaling[f"procs_{procs}_wall_s"] = statistics.median(walls)
    scaling["speedup"] = scaling["procs_1_wall_s"] / scaling["procs_2_wall_s"]
    results["phase2_scaling"] = scaling
    print(json.dumps(scaling), flush=True)

    _write(results)
    print(f"\nPhase 3: average {t_avg:.2f} s + BN recompute {t_bn:.2f} s + evaluate {t_eval:.2f} s"
          + (f"; in {phase3['swap_run']}: {phase3['swap_run_phase3_s']:.1f} s of {phase3['swap_run_total_s']:.1f} s "
             f"= {100 * phase3['share_of_swap_run']:.1f}%" if "share_of_swap_run" in phase3 else ""))
    print(f"Phase-2 scaling (2 workers x 1 epoch): 1 process {scaling['procs_1_wall_s']:.1f} s, "
          f"2 processes {scaling['procs_2_wall_s']:.1f} s, speed-up {scaling['speedup']:.2f}x")


if __name__ == "__main__":
    main()
