"""`vpn-dist tune`: a Ray Tune sweep of VPN runs (one-worker trials train in the trial's process, larger ones are Ray
Train runs), ASHA on validation accuracy.

    vpn-dist tune --space smoke --data DIR [--data DIR ...] --out OUT [--samples N] [--max-concurrent K]
                  [--workers-per-trial W] [--gpu | --gpus-per-trial F] [--epochs N] [--set KEY=VALUE ...] [--resume]

OUT/sweep.json           the sweep's settings (what --resume reuses)
OUT/trials/<trial_id>/   each trial's run dir (config.yaml, metrics.json, checkpoints/, tb/ with HParams)
OUT/tune/                Ray Tune's experiment state (what --resume restores)
OUT/results.csv, .md     one row per trial: hyperparameters, val/test accuracy (both rules), epochs, stop reason
OUT/best/<data>__<base>-<generator>.yaml   the best trial per data set x architecture, by validation accuracy,
                         as a config `vpn-dist train --config FILE` takes (+ OUT/best_config.yaml for one group)

The test split never selects anything: ASHA and the best-trial choice read `val_acc` (Algorithm 2 accuracy,
or no-noise accuracy without a generator); test accuracy is only reported.
The jobs live in vpn_dist/sweep/: space (load and check), driver (run trials on Tune), report (results).
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import json
import time
from pathlib import Path
from typing import Any

from vpn_dist.errors import TrainingFailed, UserError, os_error_text
from vpn_dist.launch import check_request
from vpn_dist.lock import hold_directory
from vpn_dist.observe import make_output_dir, write_json_atomic
from vpn_dist.sweep import driver, report
from vpn_dist.sweep.space import (Space, SweepSettings, check_space, dataset_table, load_space, max_epochs,
                                  resolve_trial)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--space", required=True,
                   help="a named space (smoke, paper, multi: tune_spaces/<name>.py) or a .py file defining SPACE")
    p.add_argument("--data", action="append", default=[], metavar="DIR",
                   help="a `vpn-dist prep` output with a val split (repeatable: one data axis value each)")
    p.add_argument("--out", required=True, help="sweep directory: trials/, tune/, results.csv, results.md, best/")
    p.add_argument("--samples", type=int, help="random draws per grid point (Ray Tune num_samples; default: the space's)")
    p.add_argument("--max-concurrent", type=int,
                   help="trials running at once (default: what the cluster's CPUs and GPUs hold)")
    p.add_argument("--workers-per-trial", type=int, default=1, help="workers per trial (default 1: in the trial's own process; more: a Ray Train run)")
    p.add_argument("--cpus-per-worker", type=int, default=1, help="CPUs per worker (default 1)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker")
    p.add_argument("--gpus-per-trial", type=float, metavar="F",
                   help="GPUs per trial, shared by its workers (implies --gpu; e.g. 0.25: four trials per GPU)")
    p.add_argument("--epochs", type=int, help="override the space's train.epochs (and ASHA's max_t)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="fix a config key in every trial, e.g. --set train.amp=bf16 (repeatable)")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted sweep in --out; finished trials are not rerun")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out).resolve()
    with hold_directory(out, "--out"):  # one sweep driver at a time in OUT
        return _sweep(args, out)


def _sweep(args: argparse.Namespace, out: Path) -> int:
    space, settings = _resumed(args, out) if args.resume else _new(args, out)
    try:
        trials = driver.run_trials(
            functools.partial(run_trial, settings=settings),
            dict(space.axes) | {"data": {"grid_search": list(settings.datasets)}}, out,
            resume=args.resume, max_concurrent=args.max_concurrent, resources=settings.resources(),
            max_failures=settings.max_failures(),
            asha={"time_attr": "epoch", "max_t": settings.max_epochs,
                  "grace_period": min(settings.grace_period, settings.max_epochs),
                  "reduction_factor": settings.reduction_factor},
            metric=settings.metric, num_samples=settings.samples)
        rows = report.collect_rows(trials, out, settings.max_epochs)
        report.write_results(rows, out, space=settings.space, metric=settings.metric)
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = OSError(err.errno, err.strerror, err.filename or str(out))
        raise TrainingFailed(f"{os_error_text(where)}; the sweep's finished trials and Tune's state are whole: once "
                             f"there is room, continue it with `vpn-dist tune --space {args.space} --out {out} "
                             f"--resume`") from None
    except UserError:
        if not args.resume and not (out / "tune").exists():  # refused (by the cluster) before Tune began: undo _new
            (out / "sweep.json").unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                (out / "trials").rmdir()
        raise
    unfinished = [r for r in rows if r["status"] in report.UNFINISHED]
    if unfinished:
        print(f"the sweep stopped with {len(unfinished)} trial(s) unfinished; continue it with the same command "
              f"and --resume", flush=True)
        return 130
    return 0


def _new(args: argparse.Namespace, out: Path) -> tuple[Space, SweepSettings]:
    """The space and the settings from the flags, every trial config checked, saved to OUT/sweep.json."""
    if (out / "sweep.json").exists() or (out / "tune").exists():
        raise UserError(f"{out} already holds a sweep; continue it with --resume or choose another --out")
    space = load_space(args.space)
    for flag, value in (("--samples", args.samples), ("--max-concurrent", args.max_concurrent),
                        ("--workers-per-trial", args.workers_per_trial), ("--cpus-per-worker", args.cpus_per_worker),
                        ("--epochs", args.epochs)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    if args.gpus_per_trial is not None and not args.gpus_per_trial > 0:
        raise UserError(f"--gpus-per-trial must be more than 0, got {args.gpus_per_trial}")
    settings = SweepSettings(
        space=args.space, out=str(out), datasets=dataset_table(args.data, space.data), fixed=dict(space.fixed),
        overrides=list(args.overrides), epochs=args.epochs, workers=args.workers_per_trial,
        cpus_per_worker=args.cpus_per_worker, gpu=bool(args.gpu or args.gpus_per_trial),
        gpus_per_trial=args.gpus_per_trial, samples=args.samples or space.samples, metric=space.metric,
        grace_period=space.grace_period, reduction_factor=space.reduction_factor,
        max_epochs=max_epochs(space, args.epochs))
    checked = check_space(space, settings, out)
    shown = ", ".join(f"{k} ({v['path']})" for k, v in settings.datasets.items())
    print(f"space {args.space}: {checked} resolved trial configs are valid; data sets: {shown}", flush=True)
    print(f"sweep: {settings.samples} sample(s) per grid point, {settings.workers} worker(s) per trial; "
          f"trial run dirs under {out / 'trials'}", flush=True)
    check_request(settings.resources().reserved(), "each trial")  # a request Ray could never meet writes nothing
    make_output_dir(out / "trials", "--out")
    write_json_atomic(out / "sweep.json", {"space_arg": args.space, "settings": settings.to_dict(),
                                           "started": time.time()})
    return space, settings


def _resumed(args: argparse.Namespace, out: Path) -> tuple[Space, SweepSettings]:
    """The space and the settings saved in OUT/sweep.json; the flags may only repeat them."""
    sweep_file = out / "sweep.json"
    if not sweep_file.is_file():
        raise UserError(f"--resume: {out} holds no sweep to resume (no sweep.json); start it without --resume")
    try:
        saved = json.loads(sweep_file.read_text())
        settings = SweepSettings.from_dict(saved.get("settings") or saved["ctx"])  # "ctx": older sweep.json files
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
        raise UserError(f"--resume: {sweep_file} is damaged ({type(err).__name__}: {err}); start a new sweep in "
                        f"another --out") from None
    if args.space != saved.get("space_arg"):
        raise UserError(f"--resume: {out} is a sweep of space {saved['space_arg']!r}, not {args.space!r}")
    paths = [d["path"] for d in settings.datasets.values()]
    given = {str(Path(d).resolve()) for d in args.data}
    if given and not given <= set(paths):
        raise UserError(f"--resume: {out} sweeps {', '.join(paths)}; a resumed sweep keeps its data sets "
                        f"(drop --data or give the same ones)")
    print(f"resuming the sweep in {out} with its saved settings ({sweep_file})", flush=True)
    return load_space(settings.space), settings


def run_trial(params: dict[str, Any], settings: SweepSettings) -> None:
    """One Tune trial: its run dir is OUT/trials/<trial_id>; resolve its RunConfig and run it."""
    from ray import tune

    run_dir = Path(settings.out) / "trials" / tune.get_context().get_trial_id()
    driver.train_in_trial(resolve_trial(params, settings, str(run_dir)))
