"""`vpn-dist`: one console script, one subcommand per job (prep, train, eval, tune, reproduce, study, bench)."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading

from vpn_dist.config import MODES, PRESETS
from vpn_dist.errors import Interrupted, TrainingFailed, UserError, os_error_text


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="directory written by `vpn-dist prep` (data.path)")
    p.add_argument("--base", help="base model: sr, dnn3, resnet18/34/50 or a torchvision classifier (model.base)")
    p.add_argument("--generator", help="noise generator: dnn3, resnet18 or none (model.generator)")
    p.add_argument("--mode", choices=MODES, help="joint, generator-only, baseline or random (vpn.mode)")
    p.add_argument("--epochs", type=int, help="train.epochs")
    p.add_argument("--out", help="run directory: config.yaml, metrics.json, checkpoints/, tb/")
    p.add_argument("--preset", choices=tuple(PRESETS), help="named settings under --config, flags and --set: paper "
                                                            "(the paper's protocol: SGD, lr 1e-3, cosine, fp32)")
    p.add_argument("--config", help="a YAML run config (configs/*.yaml); flags and --set override it")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set vpn.m=4 --set train.amp=bf16 (repeatable)")
    p.add_argument("--init-from", help="generator-only: run directory of the trained base model")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run to its configured epoch count")
    p.add_argument("--workers", type=int, help="Ray Train workers (dist.workers); omit to train in this process")
    p.add_argument("--gpu", action="store_true", default=None, help="one GPU per Ray worker (dist.gpu)")
    p.add_argument("--cpus-per-worker", type=int, help="CPUs per Ray worker (dist.cpus_per_worker)")
    p.add_argument("--verbose", action="store_true", help="also show Ray Train's own log lines (a report per rank "
                                                          "and epoch, checkpoint notices; always in Ray's log files)")


def run_train(args: argparse.Namespace) -> int:
    from vpn_dist.launch import config_from_args, load_run, train

    flags = {"data.path": args.data, "model.base": args.base, "model.generator": args.generator,
             "vpn.mode": args.mode, "train.epochs": args.epochs, "out": args.out, "train.init_from": args.init_from,
             "dist.workers": args.workers, "dist.gpu": args.gpu, "dist.cpus_per_worker": args.cpus_per_worker}
    if args.resume:
        if args.out and args.out != args.resume:
            raise UserError("--resume continues RUN_DIR in place; drop --out or give the same directory")
        flags["out"] = args.resume
    base = load_run(args.resume) if args.resume else None
    cfg = config_from_args(args.config, flags, args.overrides, base, args.preset)
    final = train(cfg, resume=bool(args.resume), verbose=args.verbose)
    shown = {k: final[k] for k in ("test_acc_alg2", "test_acc_no_noise", "train_loss", "train_acc",
                                   "epochs_completed", "wall_time_s", "train_images_per_sec") if k in final}
    print(json.dumps(shown, indent=2))
    print(f"run directory: {cfg.out}  (TensorBoard: tensorboard --logdir {cfg.out}/tb)")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from vpn_dist.launch import evaluate_run

    print(json.dumps(evaluate_run(args.run, args.data, args.alg2_top_k), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from data_prep import cli as prep_cli
    from vpn_dist.benchmarks import evaluation as bench_eval
    from vpn_dist.benchmarks import loader as bench_loader
    from vpn_dist.benchmarks import roofline as bench_roofline
    from vpn_dist.benchmarks import scale as bench_scale
    from vpn_dist.benchmarks import subnormal as bench_subnormal
    from vpn_dist.benchmarks import training as bench_training

    parser = argparse.ArgumentParser(prog="vpn-dist", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    prep = sub.add_parser("prep", help="convert a data set to FFCV .beton files")
    prep_cli.add_arguments(prep)
    prep.set_defaults(handler=prep_cli.run)

    train = sub.add_parser("train", help="train VPN (or an ablation) in this process or on Ray Train workers")
    add_train_arguments(train)
    train.set_defaults(handler=run_train)

    evaluate = sub.add_parser("eval", help="recompute a run's test metrics from its last checkpoint")
    evaluate.add_argument("--run", required=True, help="run directory")
    evaluate.add_argument("--data", help="data directory (default: the run's)")
    evaluate.add_argument("--alg2-top-k", type=int, metavar="K",
                          help="Algorithm 2 over the K classes most probable under h(x) (0: exact; default: the run's)")
    evaluate.set_defaults(handler=run_eval)

    from vpn_dist import tune as tune_mod

    tune = sub.add_parser("tune", help="a Ray Tune sweep of VPN runs (ASHA on validation accuracy)")
    tune_mod.add_arguments(tune)
    tune.set_defaults(handler=tune_mod.run)

    from vpn_dist import reproduce as reproduce_mod

    reproduce = sub.add_parser("reproduce", help="a paper table's grid (cells x seeds) on Ray Tune, reported beside "
                                                 "the paper")
    reproduce_mod.add_arguments(reproduce)
    reproduce.set_defaults(handler=reproduce_mod.run)

    from vpn_dist import study as study_mod

    study = sub.add_parser("study", help="does tuning rescue VPN? the baseline and VPN tuned with one budget, the "
                                         "winners re-run with fresh seeds, expected-best curves")
    study_mod.add_arguments(study)
    study.set_defaults(handler=study_mod.run)

    bench = sub.add_parser("bench", help="benchmarks that print figures and ratios")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    loader = bench_sub.add_parser("loader", help="FFCV loader vs torchvision ImageFolder vs in-memory")
    bench_loader.add_arguments(loader)
    loader.set_defaults(handler=bench_loader.run)
    scale = bench_sub.add_parser("scale", help="an ImageNet-shaped JPEG tree at N and 2N images: conversion "
                                 "speed and peak memory, .beton size, 224x224 loading, ResNet-50 steps")
    bench_scale.add_arguments(scale)
    scale.set_defaults(handler=bench_scale.run)
    ray_bench = bench_sub.add_parser("ray", help="Ray Train overhead: in-process vs 1 vs 2 workers, same job")
    bench_training.add_ray_arguments(ray_bench)
    ray_bench.set_defaults(handler=bench_training.run_ray)
    eval_bench = bench_sub.add_parser("eval", help="what an evaluation pass costs: Algorithm 2 (with and without "
                                                   "its shared first layer) and no noise")
    bench_eval.add_arguments(eval_bench)
    eval_bench.set_defaults(handler=bench_eval.run)
    roofline = bench_sub.add_parser("roofline", help="a training step and an evaluation pass against this device's "
                                                     "measured GEMM and conv peak (FLOPs by torch's flop counter)")
    bench_roofline.add_arguments(roofline)
    roofline.set_defaults(handler=bench_roofline.run)
    subnormal = bench_sub.add_parser("subnormal", help="a run's training step from its checkpoint with IEEE subnormal "
                                                       "floats vs flushed to zero (CPU)")
    bench_subnormal.add_arguments(subnormal)
    subnormal.set_defaults(handler=bench_subnormal.run)
    train_bench = bench_sub.add_parser("train", help="in-process training throughput (e.g. on a GPU box)")
    bench_training.add_train_arguments(train_bench)
    train_bench.set_defaults(handler=bench_training.run_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    if not os.environ.get("RAY_ADDRESS"):  # no cluster to join: any Ray we start stays on loopback
        from vpn_dist.launch import local_ray_environment

        local_ray_environment()
    args = build_parser().parse_args(argv)
    with clean_stops():
        try:
            return args.handler(args) or 0
        except UserError as err:  # one line, even when a library's message had several
            print(f"vpn-dist {args.command}: error: {' '.join(str(err).split())}", file=sys.stderr)
            return 2
        except FloatingPointError as err:  # a diverged run: say where, without a traceback
            print(f"vpn-dist {args.command}: training diverged: {err}", file=sys.stderr)
            return 1
        except TrainingFailed as err:
            print(f"vpn-dist {args.command}: error: {err}", file=sys.stderr)
            return 1
        except OSError as err:  # the machine, not the input: a full disk, a read-only mount, a vanished file
            print(f"vpn-dist {args.command}: error: {os_error_text(err)}", file=sys.stderr)
            return 1
        except KeyboardInterrupt as err:  # Ctrl-C, SIGTERM: the `finally`s on the way here removed temporary files
            signum = getattr(err, "signum", signal.SIGINT)
            print(f"vpn-dist {args.command}: error: {' '.join(str(err).split()) or 'interrupted (Ctrl-C)'}",
                  file=sys.stderr)
            return 128 + signum


@contextlib.contextmanager
def clean_stops():
    """For the command's life: SIGTERM unwinds like Ctrl-C (Python's default ends the process on the spot, leaving
    temporary files and FFCV's shared memory behind), and a background thread's error that its owner re-raises in
    the main thread (TensorBoard's writer keeps it for the next call) is reported there once, as one line, instead of
    also as the thread's traceback."""
    main_pid = os.getpid()

    def on_sigterm(signum, frame):
        if os.getpid() != main_pid:  # a forked helper (a decode pool, an FFCV writer) just ends
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise Interrupted("terminated (SIGTERM)", signum)

    def thread_error(hook_args):
        if getattr(hook_args.thread, "exception", None) is hook_args.exc_value:
            return  # kept by the thread for its owner to raise
        default_hook(hook_args)

    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, on_sigterm) if in_main else None
    default_hook, threading.excepthook = threading.excepthook, thread_error
    try:
        yield
    finally:
        threading.excepthook = default_hook
        if in_main:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
