"""`vpn-dist`: one console script, one subcommand per job (prep, train, eval, tune, reproduce, study, bench)."""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import signal
import sys
import threading

from vpn_dist.config import PRESETS, train_flags
from vpn_dist.errors import Interrupted, TrainingFailed, UserError, os_error_text


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    for key, f in train_flags().items():  # a flag per key that has one: its help, type and choices from its setting
        help_text = f"{f.metadata['doc']} ({key})"
        if str(f.type) == "bool":
            p.add_argument(f.metadata["flag"], dest=key, action="store_true", default=None, help=help_text)
        else:
            kind = {"int": int, "float": float}.get(str(f.type).split("|")[0].strip(), str)
            p.add_argument(f.metadata["flag"], dest=key, type=kind, choices=f.metadata["choices"], help=help_text,
                           metavar=None if f.metadata["choices"] else f.metadata["flag"][2:].upper().replace("-", "_"))
    p.add_argument("--preset", choices=tuple(PRESETS), help="named settings under --config, flags and --set: paper "
                                                            "(the paper's protocol: SGD, lr 1e-3, cosine, fp32)")
    p.add_argument("--config", help="a YAML run config (configs/*.yaml); flags and --set override it")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set vpn.m=4 --set train.amp=bf16 (repeatable)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run to its configured epoch count")
    p.add_argument("--verbose", action="store_true", help="also show Ray Train's own log lines (a report per rank "
                                                          "and epoch, checkpoint notices; always in Ray's log files)")


def run_train(args: argparse.Namespace) -> int:
    from vpn_dist.launch import config_from_args, train
    from vpn_dist.run_dir import RunDir

    flags = {key: getattr(args, key) for key in train_flags()}
    if args.resume:
        if flags["out"] and flags["out"] != args.resume:
            raise UserError("--resume continues RUN_DIR in place; drop --out or give the same directory")
        flags["out"] = args.resume
    base = RunDir(args.resume).read_config() if args.resume else None
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


# Each command: its help line, and where its arguments and its handler are ("module:adder:handler"). A command's
# module is imported only when the command is parsed, so `vpn-dist --help` and `vpn-dist prep` load no torch or Ray.
COMMANDS = {
    "prep": ("convert a data set to FFCV .beton files", "data_prep.cli:add_arguments:run"),
    "train": ("train VPN (or an ablation) in this process or on Ray Train workers",
              "vpn_dist.cli:add_train_arguments:run_train"),
    "eval": ("recompute a run's test metrics from its last checkpoint", "vpn_dist.cli:add_eval_arguments:run_eval"),
    "tune": ("a Ray Tune sweep of VPN runs (ASHA on validation accuracy)", "vpn_dist.tune:add_arguments:run"),
    "reproduce": ("a paper table's grid (cells x seeds) on Ray Tune, reported beside the paper",
                  "vpn_dist.reproduce.command:add_arguments:run"),
    "study": ("does tuning rescue VPN? the baseline and VPN tuned with one budget, the winners re-run with fresh "
              "seeds, expected-best curves", "vpn_dist.study:add_arguments:run"),
    "bench": ("benchmarks that print figures and ratios", "vpn_dist.cli:add_bench_arguments:"),
}
BENCHMARKS = {
    "loader": ("FFCV loader vs torchvision ImageFolder vs in-memory", "vpn_dist.benchmarks.loader:add_arguments:run"),
    "scale": ("an ImageNet-shaped JPEG tree at N and 2N images: conversion speed and peak memory, .beton size, "
              "224x224 loading, ResNet-50 steps", "vpn_dist.benchmarks.scale:add_arguments:run"),
    "ray": ("Ray Train overhead: in-process vs 1 vs 2 workers, same job",
            "vpn_dist.benchmarks.training:add_ray_arguments:run_ray"),
    "eval": ("what an evaluation pass costs: Algorithm 2 (with and without its shared first layer) and no noise",
             "vpn_dist.benchmarks.evaluation:add_arguments:run"),
    "roofline": ("a training step and an evaluation pass against this device's measured GEMM and conv peak (FLOPs "
                 "by torch's flop counter)", "vpn_dist.benchmarks.roofline:add_arguments:run"),
    "subnormal": ("a run's training step from its checkpoint with IEEE subnormal floats vs flushed to zero (CPU)",
                  "vpn_dist.benchmarks.subnormal:add_arguments:run"),
    "authors": ("the authors' training loop vs vpn-dist train on the paper's protocol (Fashion-MNIST, DNN3), fp32 and "
                "the default precision", "vpn_dist.benchmarks.authors:add_arguments:run"),
    "train": ("in-process training throughput (e.g. on a GPU box)",
              "vpn_dist.benchmarks.training:add_train_arguments:run_train"),
}


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--data", help="data directory (default: the run's)")
    p.add_argument("--alg2-top-k", type=int, metavar="K",
                   help="Algorithm 2 over the K classes most probable under h(x) (0: exact; default: the run's)")


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    _add_commands(p.add_subparsers(dest="bench", required=True), BENCHMARKS, chosen=None)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The whole parser; given the command line, only the command it names is built in full."""
    parser = argparse.ArgumentParser(prog="vpn-dist", description=__doc__)
    chosen = None if argv is None else next((a for a in argv if not a.startswith("-")), "")
    _add_commands(parser.add_subparsers(dest="command", required=True), COMMANDS, chosen)
    return parser


def _add_commands(sub, commands: dict[str, tuple[str, str]], chosen: str | None) -> None:
    for name, (help_text, where) in commands.items():
        command = sub.add_parser(name, help=help_text)
        if chosen is None or name == chosen:
            module, adder, handler = where.split(":")
            loaded = importlib.import_module(module)
            getattr(loaded, adder)(command)
            if handler:
                command.set_defaults(handler=getattr(loaded, handler))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    if not os.environ.get("RAY_ADDRESS") and args.command != "prep":  # (no module above imports Ray at its top)
        from vpn_dist.launch import local_ray_environment

        local_ray_environment()  # no cluster to join: any Ray we start stays on loopback
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
