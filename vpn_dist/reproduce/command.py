"""`vpn-dist reproduce`: a paper table's grid (cells x seeds) as Ray Tune trials, reported beside the paper.

    vpn-dist reproduce --table 1|2|3 --data DIR [--data DIR ...] --seeds N --out OUT
        [--bases sr,dnn3,...] [--generators dnn3,resnet18] [--modes ...] [--epochs N] [--set KEY=VALUE ...]
        [--max-concurrent K] [--gpus-per-trial F] [--cpus-per-trial C] [--resume]

OUT/runs/<data>/<base>-<generator>-<mode>/seed<k>/   each run's directory (vpn-dist train's layout)
OUT/runs/data-paths.json   where this machine holds each data set (reproduce.json names it by content instead)
OUT/runs.csv      one row per cell x seed: the results, and the resume state (a finished row never reruns)
OUT/curves.csv    per-epoch loss, train and test accuracy of every run (Figure 2)
OUT/report.md, OUT/figures/   the tables beside the paper's, the paired statistics and a verdict per claim

A thin layer on the sweep driver: one trial per run, no early stopping, trials packed by the resources they
reserve. Trials start seed by seed (so an interrupted grid holds whole seeds); a generator-only run starts from its
seed's finished baseline, so it waits for that one while the other slots take the next runs.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

from vpn_dist.config import GENERATORS
from vpn_dist.errors import UserError
from vpn_dist.launch import check_request
from vpn_dist.lock import hold_directory
from vpn_dist.observe import make_output_dir, write_json_atomic
from vpn_dist.run_dir import RunDir
from vpn_dist.reproduce.grid import TABLES, GridRun, Plan, check_plan, data_fingerprint, data_label, grid, run_config
from vpn_dist.reproduce.report import (CURVE_COLUMNS, FINISHED, RUN_COLUMNS, curve_rows, load_summary,
                                       last_line, mark_unknown_provenance, read_csv, run_rows, write_csv, write_report)
from vpn_dist.sweep import driver


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--table", dest="tables", type=int, action="append", default=[], choices=(1, 2, 3),
                   help="the paper's table: 1 (joint), 2 (generator-only on a trained base), 3 (Tiny ImageNet); "
                        "repeatable")
    p.add_argument("--data", action="append", default=[], metavar="DIR", help="a `vpn-dist prep` output (repeatable)")
    p.add_argument("--seeds", type=int, help="runs per cell (seeds 0..N-1; the paper averages 5)")
    p.add_argument("--out", required=True, help="OUT: runs/, runs.csv, curves.csv, report.md, figures/")
    p.add_argument("--bases", type=_names, help="comma-separated base models (default: the table's)")
    p.add_argument("--generators", type=_names,
                   help=f"comma-separated generators: {', '.join(GENERATORS)} (default: all)")
    rows = dict.fromkeys(mode for table in TABLES.values() for mode in table.modes)
    p.add_argument("--modes", type=_names, help=f"comma-separated rows' modes: {', '.join(rows)}; isotropic (a "
                                                "control in Table 1, with --sigma-from)")
    p.add_argument("--epochs", type=int, help="train.epochs of every run (default: the paper's 40)")
    p.add_argument("--sigma-from", metavar="GRID_DIR",
                   help="--modes isotropic: each seed's noise scale s is the mean sigma its joint run learned in this "
                        "committed grid (its runs.csv)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a config key for every run, e.g. --set train.optimizer=adam (repeatable)")
    p.add_argument("--max-concurrent", type=int, help="runs at once (default: what the cluster's CPUs or GPUs hold)")
    p.add_argument("--gpus-per-trial", type=float, default=0.0,
                   help="GPU share per run, e.g. 0.25: four small runs share a GPU (default: CPU only)")
    p.add_argument("--cpus-per-trial", type=int, default=1, help="CPUs per run (default 1)")
    p.add_argument("--resume", action="store_true",
                   help="finish the grid in OUT (its saved settings): finished runs are not rerun")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite OUT/report.md and OUT/figures/ from runs.csv and curves.csv; train nothing")


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def run(args: argparse.Namespace) -> int:
    out = Path(args.out).resolve()
    with hold_directory(out, "--out"):  # one grid driver at a time in OUT
        return _run(args, out)


def _run(args: argparse.Namespace, out: Path) -> int:
    if args.report_only:
        return _report_only(out)
    plan = _resumed_plan(args, out) if args.resume else _new_plan(args, out)
    runs = grid(plan)
    runs_root = out / "runs"
    previous = {(r["run_id"], r["table"]): r for r in read_csv(out / "runs.csv") if r.get("plan") == plan.fingerprint()}
    finished = {run_id for run_id, _ in previous if previous[(run_id, _)]["status"] == FINISHED}
    pending = [r for r in runs if r.run_id not in finished]
    # generator-only starts from its baseline's checkpoint: retrain a finished baseline whose run dir is gone
    # (runs.csv came from another machine)
    needed = {r.baseline() for r in pending if r.mode == "generator-only"}
    by_id = {r.run_id: r for r in runs}
    retraining = {base_run.run_id for base_run in needed
                  if by_id[base_run.run_id] not in pending and not RunDir(runs_root / base_run.run_id).checkpoint_dirs()}
    pending += [by_id[run_id] for run_id in sorted(retraining)]
    print(f"reproduce: {len(runs)} runs in the grid, {len(runs) - len(pending)} finished, {len(pending)} to run"
          f"{f' ({len(retraining)} finished elsewhere, trained again here)' if retraining else ''}; "
          f"results in {out}", flush=True)
    state = Results(out, plan, runs, previous, retraining)
    state.save(report=True)  # a grid on disk always has its report, before its first run ends too
    # Seed by seed, in the grid's order; a generator-only run waits for its seed's baseline (when that runs too),
    # and starts as soon as it has finished, so no slot idles while anything else could run.
    order = sorted(pending, key=lambda r: (r.seed, r.mode == "generator-only"))
    position = {r.run_id: i for i, r in enumerate(order)}
    waits_for = [{position[r.baseline().run_id]} if r.mode == "generator-only" and r.baseline().run_id in position
                 else set() for r in order]  # a baseline not in `order` has finished already
    if order:
        # trials run in Tune's own working directory: give them the reference grid by an absolute path
        trial_plan = dataclasses.replace(plan, sigma_from=str(Path(plan.sigma_from).resolve())) \
            if plan.sigma_from else plan
        trial = functools.partial(reproduce_trial, plan=trial_plan, runs_root=runs_root)
        try:
            trials = driver.run_trials(
                trial, {}, out, resume=False, experiment=f"tune-{state.next_experiment()}",
                resources=plan.resources(), max_concurrent=args.max_concurrent,
                callbacks=[state.callback()],
                ordered=[({"run_id": r.run_id}, waits) for r, waits in zip(order, waits_for)])
        except UserError:
            if not args.resume and not list(out.glob("tune-*")):  # refused (by the cluster) before any trial
                for name in ("reproduce.json", "runs.csv", "curves.csv"):  # what this new grid wrote
                    (out / name).unlink(missing_ok=True)
            raise
        for t in trials:  # a trial that died before any report still gets its row
            state.record(by_id[t.config["run_id"]], t.status, report=False)
    state.save(report=True)
    unfinished = [r.run_id for r in runs if state.status(r) != FINISHED]
    return last_line("reproduce", out, unfinished, "did not finish", "their run directories")


def _report_only(out: Path) -> int:
    """runs.csv and curves.csv refreshed from the run directories that are here, then the report."""
    saved = out / "reproduce.json"
    if not saved.is_file():
        raise UserError(f"--report-only: {out} holds no reproduction grid (no reproduce.json)")
    plan = _load_plan(saved, "--report-only")
    runs = grid(plan)
    previous = {(r["run_id"], r["table"]): r for r in read_csv(out / "runs.csv") if r.get("plan") == plan.fingerprint()}
    state = Results(out, plan, runs, previous)
    for run in runs:
        if load_summary(out / "runs" / run.run_id):
            state.record(run, "TERMINATED", report=False)
    state.save(report=True)
    print(f"reproduce: report in {out / 'report.md'}")
    return 0


def reproduce_trial(params: dict[str, Any], plan: Plan, runs_root: Path) -> None:
    """One Tune trial: one run of the grid, in its own run directory (resumed from its checkpoint if it has one)."""
    run = next(r for r in grid(plan) if r.run_id == params["run_id"])
    driver.train_in_trial(run_config(plan, run, runs_root))


class Results:
    """runs.csv and curves.csv, rewritten as each run ends (in the driver process, so one writer)."""

    def __init__(self, out: Path, plan: Plan, runs: list[GridRun], previous: dict[tuple[str, int], dict[str, Any]],
                 retraining: set[str] = frozenset()):
        self.out, self.plan, self.runs = out, plan, runs
        # (run_id, table) -> row; rows of earlier sessions stay
        self.rows = {key: mark_unknown_provenance(dict(row)) for key, row in previous.items()}
        self.retraining = set(retraining)  # finished runs trained again from scratch (their run dir is not here)
        self.curves: dict[str, list[dict[str, Any]]] = {}
        for point in read_csv(out / "curves.csv"):
            self.curves.setdefault(point["run_id"], []).append(point)
        for run in runs:
            if run.run_id not in {k[0] for k in self.rows}:
                for row in run_rows(run, None, "pending", plan.fingerprint()):
                    self.rows[(run.run_id, row["table"])] = row

    def status(self, run: GridRun) -> str:
        return self.rows[(run.run_id, run.tables[0])]["status"]

    def record(self, run: GridRun, trial_status: str, report: bool = True) -> None:
        """The run's row from its metrics.json: finished when it has every planned epoch."""
        summary = load_summary(self.out / "runs" / run.run_id)
        done = bool(summary) and summary.get("epochs_completed", 0) >= summary.get("epochs_planned", 1 << 30)
        if self.status(run) == FINISHED and not done:
            return  # finished in an earlier session; its run dir is on another machine
        status = FINISHED if done else ("failed" if trial_status == "ERROR" else "pending")
        retrains = self.rows[(run.run_id, run.tables[0])].get("retrains")
        if done and run.run_id in self.retraining:  # counted once, however many times its trial reports the end
            self.retraining.discard(run.run_id)
            retrains = (retrains if isinstance(retrains, int) else 0) + 1
        elif retrains is None and summary:
            retrains = 0
        for row in run_rows(run, summary, status, self.plan.fingerprint()):
            self.rows[(run.run_id, row["table"])] = {**row, "retrains": retrains}
        if summary:
            self.curves[run.run_id] = curve_rows(run, summary)
        self.save(report=report)  # after every run: an interrupted grid's report is current

    def save(self, report: bool = False) -> None:
        order = {r.run_id: i for i, r in enumerate(self.runs)}
        rows = sorted(self.rows.values(), key=lambda r: (r["table"], order.get(r["run_id"], 1 << 30)))
        write_csv(self.out / "runs.csv", rows, RUN_COLUMNS)
        write_csv(self.out / "curves.csv", [p for run_id in sorted(self.curves) for p in self.curves[run_id]],
                  CURVE_COLUMNS)
        if report:
            write_report(self.out, self.plan, rows, [p for pts in self.curves.values() for p in pts])

    def next_experiment(self) -> int:
        return len(list(self.out.glob("tune-*")))

    def callback(self):
        """A Tune callback that records a run's row when its trial ends (completed or errored)."""
        from ray.tune import Callback

        results, by_id = self, {r.run_id: r for r in self.runs}

        class RecordRun(Callback):
            def on_trial_complete(self, iteration, trials, trial, **info):
                results.record(by_id[trial.config["run_id"]], "TERMINATED")

            def on_trial_error(self, iteration, trials, trial, **info):
                results.record(by_id[trial.config["run_id"]], "ERROR")

        return RecordRun()


# ---------------------------------------------------------------- the plan


def _new_plan(args: argparse.Namespace, out: Path) -> Plan:
    if (out / "reproduce.json").exists():
        raise UserError(f"{out} already holds a reproduction grid; finish it with --resume or choose another --out")
    if args.seeds is None:
        raise UserError("give --seeds N (runs per cell; the paper averages 5)")
    data: dict[str, str] = {}
    for raw in args.data:
        label = data_label(raw)
        if label in data:
            raise UserError(f"--data {raw}: two data directories are both {label!r}")
        data[label] = str(Path(raw).resolve())
    plan = Plan(tables=sorted(set(args.tables)), data=data, seeds=args.seeds, bases=args.bases,
                generators=args.generators or list(GENERATORS), modes=args.modes, epochs=args.epochs,
                overrides=list(args.overrides), gpus_per_trial=args.gpus_per_trial, cpus_per_trial=args.cpus_per_trial,
                sigma_from=args.sigma_from,
                data_fingerprints={label: data_fingerprint(path) for label, path in data.items()})
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise UserError(f"--max-concurrent {args.max_concurrent} must be at least 1")
    if args.cpus_per_trial < 1:
        raise UserError(f"--cpus-per-trial {args.cpus_per_trial} must be at least 1")
    check_plan(plan)
    check_request(plan.resources().reserved(), "each run")  # before anything is written
    make_output_dir(out, "--out")
    _save_plan(out, plan)
    return plan


DATA_PATHS = Path("runs") / "data-paths.json"  # in OUT: this machine's, like the run directories beside it


def _load_plan(saved: Path, flag: str) -> Plan:
    try:
        plan = Plan.from_dict(json.loads(saved.read_text()))
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
        raise UserError(f"{flag}: {saved} is not a reproduction plan ({type(err).__name__}: {err})") from None
    known_here = _read_data_paths(saved.parent)
    plan.data.update({label: path for label, path in known_here.items() if label in plan.data})
    return plan


def _read_data_paths(out: Path) -> dict[str, str]:
    try:
        found = json.loads((out / DATA_PATHS).read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in found.items() if isinstance(v, str)} if isinstance(found, dict) else {}


def _save_plan(out: Path, plan: Plan) -> None:
    """reproduce.json (the data by name and content: it travels with the results) and where the data is here."""
    (out / DATA_PATHS).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / DATA_PATHS, plan.data)
    write_json_atomic(out / "reproduce.json", plan.to_dict())


def _resumed_plan(args: argparse.Namespace, out: Path) -> Plan:
    """The saved plan. The grid's own flags may be repeated (so the starting command plus --resume works);
    a different value is refused, as it would change results. --seeds may grow the grid."""
    saved = out / "reproduce.json"
    if not saved.is_file():
        raise UserError(f"--resume: {out} holds no reproduction grid (no reproduce.json); start it without --resume")
    plan = _load_plan(saved, "--resume")
    asked_and_saved = (("--table", sorted(set(args.tables)), plan.tables), ("--bases", args.bases, plan.bases),
                       ("--modes", args.modes, plan.modes), ("--generators", args.generators, plan.generators),
                       ("--epochs", args.epochs, plan.epochs), ("--set", args.overrides, plan.overrides),
                       ("--sigma-from", args.sigma_from, plan.sigma_from))
    changed = [flag for flag, asked, kept in asked_and_saved if asked and asked != kept]
    if changed:
        raise UserError(f"--resume keeps the grid's settings ({saved}); {', '.join(changed)} differ from them: drop "
                        f"them, or start a new --out")
    if args.seeds is not None:
        if args.seeds < plan.seeds:
            raise UserError(f"--resume --seeds {args.seeds}: the grid already has {plan.seeds} seeds")
        plan.seeds = args.seeds  # more seeds: the finished ones stay, the new ones run
    if args.data:  # the data may live elsewhere on this machine: same data sets, new paths
        for raw in args.data:
            label = data_label(raw)
            if label not in plan.data:
                raise UserError(f"--resume --data {raw}: {label!r} is not one of the grid's data sets "
                                f"({', '.join(plan.data)})")
            plan.data[label] = str(Path(raw).resolve())
    missing = [f"{label} ({path or 'not known on this machine'})" for label, path in plan.data.items()
               if not path or not Path(path).is_dir()]
    if missing:
        raise UserError(f"--resume: the grid's data is not here: {', '.join(missing)}; give --data DIR for each")
    for label, path in plan.data.items():
        found, expected = data_fingerprint(path), plan.data_fingerprints.get(label)
        if expected is None:  # a grid saved before fingerprints: the data it continues with is the grid's from now on
            plan.data_fingerprints[label] = found
        elif found != expected:
            raise UserError(f"--resume: {path} is not the grid's {label}: its meta.json differs (fingerprint {found}, "
                            f"the grid's {expected}), so it was prepared differently and its runs would not be "
                            f"comparable; give --data DIR of the same preparation, or start a new --out")
    if args.gpus_per_trial:
        plan.gpus_per_trial = args.gpus_per_trial
    check_plan(plan)
    _save_plan(out, plan)
    print(f"resuming the grid in {out} with its saved settings ({saved})", flush=True)
    return plan
