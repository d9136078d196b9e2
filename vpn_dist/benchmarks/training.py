"""Training throughput benchmarks, figures and ratios measured side by side in one run.

`vpn-dist bench ray`:   the same fixed job in this process, on 1 Ray Train worker, and on 2 (cluster start-up
                        excluded: Ray starts once before the timed runs).
`vpn-dist bench train`: the in-process path alone (e.g. CIFAR-10, ResNet-18 base, DNN3 generator, bf16,
                        channels_last on a GPU box without Ray).
Figures are the median over epochs after the first (FFCV's JIT and allocator warm-up) of training images/s.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

from vpn_dist.config import RunConfig, choices_of, from_dict, preset


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="a `vpn-dist prep` directory (default: a synthetic set made for the run)")
    p.add_argument("--base", default="dnn3")
    p.add_argument("--generator", default="dnn3", choices=choices_of("model.generator"))
    p.add_argument("--epochs", type=int, default=4, help="timed epochs + 1 warm-up (default 4)")
    p.add_argument("--batch-size", type=int, default=128, help="global batch: split across workers")
    p.add_argument("--amp", default="off", choices=choices_of("train.amp"))
    p.add_argument("--channels-last", action="store_true")


def add_ray_arguments(p: argparse.ArgumentParser) -> None:
    add_common(p)
    p.add_argument("--max-workers", type=int, default=2, help="also time 2..N workers (default 2)")


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    add_common(p)


def job(args: argparse.Namespace, data: str, out: Path, workers: int) -> RunConfig:
    cores = os.cpu_count() or 1
    per_worker = max(1, workers)
    return from_dict({
        "out": str(out), "data.path": data, "model.base": args.base, "model.generator": args.generator,
        "vpn.mode": "joint" if args.generator != "none" else "baseline", "train.epochs": args.epochs,
        "train.batch_size": args.batch_size // per_worker, "train.amp": args.amp,
        "train.channels_last": args.channels_last, "train.eval_every": args.epochs, "train.figure_every": 10**6,
        "dist.workers": workers, "dist.cpus_per_worker": max(1, cores // per_worker),
        # every path gets the machine's cores: in-process torch threads, or split across Ray workers
        "data.num_workers": max(1, cores // per_worker)},
        preset("paper"))  # the optimizer whose figures the docs compare across machines and with the authors' code


def throughput(metrics: dict) -> float:
    rates = [h["train_images_per_sec"] for h in metrics["history"][1:]] or [metrics["train_images_per_sec"]]
    return statistics.median(rates)


def dataset(args: argparse.Namespace, tmp: Path) -> str:
    if args.data:
        return args.data
    from data_prep import prepare

    path = tmp / "synthetic"
    prepare("synthetic", path, train_size=4000, test_size=500)
    return str(path)


def run_ray(args: argparse.Namespace) -> int:
    from vpn_dist.launch import ray_session, train

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data = dataset(args, tmp)
        rows = [("in-process", throughput(train(job(args, data, tmp / "inproc", 0))))]
        with ray_session():  # started before the timed runs: start-up is not timed
            for workers in range(1, args.max_workers + 1):
                rows.append((f"Ray Train, {workers} worker{'s' * (workers > 1)}",
                             throughput(train(job(args, data, tmp / f"ray{workers}", workers)))))
    reference = rows[0][1]
    one_worker = rows[1][1]
    print(f"\njob: {args.base} base, {args.generator} generator, global batch {args.batch_size}, amp {args.amp}, "
          f"{os.cpu_count()} cores; median train images/s over epochs 2..{args.epochs}")
    print("| path | images/s | vs in-process | vs 1 Ray worker |")
    print("|---|---|---|---|")
    for name, rate in rows:
        print(f"| {name} | {rate:,.0f} | {rate / reference:.2f}x | {rate / one_worker:.2f}x |")
    overhead = 1 - one_worker / reference
    print(f"\nRay overhead (1 worker vs in-process): {overhead:+.1%} (target: within 15%)")
    return 0


def run_train(args: argparse.Namespace) -> int:
    import torch

    from vpn_dist.launch import train

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        metrics = train(job(args, dataset(args, tmp), tmp / "run", 0))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    epoch_s = statistics.median(h["epoch_time_s"] for h in metrics["history"][1:] or metrics["history"])
    print(f"\n{args.base} base, {args.generator} generator, batch {args.batch_size}, amp {args.amp}, "
          f"channels_last {args.channels_last}, on {device}")
    print(f"train images/s (median, epochs 2..{args.epochs}): {throughput(metrics):,.0f}")
    print(f"seconds per epoch (median, incl. evaluation when it ran): {epoch_s:.1f}")
    return 0
