"""`vpn-dist study`: does tuning rescue VPN? The baseline and VPN searched with the same budget on Ray Tune, each
arm's winner re-run with fresh seeds, and a report with Dodge et al.'s expected-best curves.

    vpn-dist study --spec study_fashion_mnist_dnn3 --data DIR --out OUT [--trials N] [--max-concurrent K]
                   [--cpus-per-trial C] [--gpus-per-trial F]
    vpn-dist study --out OUT --resume [--data DIR] [--trials N]      continue (finished trials never rerun)
    vpn-dist study --out OUT --report-only                           rewrite report.md and figures/ from the CSVs

OUT/trials.csv    every search trial of both arms (the resume state: trial i's parameters are redrawn from the spec,
                  a row whose config id matches is finished)
OUT/curves.csv    per-epoch validation accuracy of every search trial (ASHA's rungs are replayed from it)
OUT/seeds.csv     each arm's winner re-run with the spec's rerun_seeds at full epochs, and the matched baseline (the
                  base alone at the VPN winner's optimizer, lr and weight decay) where the winners differ in those
OUT/report.md, OUT/figures/expected_best.png, OUT/figures/sensitivity.png, OUT/study.json (the settings)
OUT/runs/search/<arm>/<trial>-<config id>/, OUT/runs/seeds/<group>/seed<k>-<config id>/   run directories

Phases, each resumable: the baseline arm's search, the VPN arm's search (each trial a Ray Tune trial that trains in its
own process, ASHA on per-epoch validation accuracy, trials started in their order), then the re-runs of both winners
and of the matched baseline (no early stopping). The jobs live here (the command, the recorder), in spec (the spec,
trial parameters and configs) and report (the CSV rows, the estimator, report.md and figures).
"""
from __future__ import annotations

import argparse
import functools
import json
import shutil
from pathlib import Path
from typing import Any

from vpn_dist.config import RunConfig
from vpn_dist.errors import UserError
from vpn_dist.observe import make_output_dir, write_json_atomic
from vpn_dist.reproduce.report import last_line, load_summary, read_csv, write_csv
from vpn_dist.run_dir import RunDir
from vpn_dist.study import report
from vpn_dist.study.spec import (ARMS, Plan, Study, check_rerun_seeds, check_shared, config_id, draw_params,
                                 load_study, trial_config)
from vpn_dist.sweep import driver
from vpn_dist.sweep.trial import TrialResources

DIVERGED = "non-finite loss"  # the train loop's message when a trial's loss blew up (train.stop_if_diverged)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spec", help="a named study (tune_spaces/study_*.py, e.g. study_fashion_mnist_dnn3) or a .py "
                                  "file defining STUDY (default with --resume: the study's own)")
    p.add_argument("--data", help="a `vpn-dist prep` output with a val split, of the kind the spec names")
    p.add_argument("--out", required=True, help="OUT: trials.csv, curves.csv, seeds.csv, report.md, figures/, runs/")
    p.add_argument("--trials", type=int, help="trials per arm (default: the spec's); with --resume it may grow")
    p.add_argument("--max-concurrent", type=int, help="trials at once (default: what the cluster's CPUs or GPUs hold)")
    p.add_argument("--cpus-per-trial", type=int, default=1, help="CPUs per trial (default 1)")
    p.add_argument("--gpus-per-trial", type=float, default=0.0,
                   help="GPU share per trial, e.g. 0.25: four trials per GPU (default: CPU only)")
    p.add_argument("--resume", action="store_true", help="continue the study in OUT: finished trials never rerun")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite OUT/report.md and OUT/figures/ from the CSV files; train nothing")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out).resolve()
    if args.report_only:
        plan = _saved_plan(out, "--report-only")
        study = load_study(plan.spec)
        Results(out, study, plan, {}).save(report_too=True)
        print(f"study: report in {out / 'report.md'}", flush=True)
        return 0
    plan, study, datasets, configs = _resumed(args, out) if args.resume else _new(args, out)
    results = Results(out, study, plan, configs)
    results.save()
    resources = plan.resources()
    for arm in ARMS:
        if results.search_arm(arm, resources, args.max_concurrent) == "interrupted":
            return _stopped(results, out)
    if results.rerun_winners(datasets, resources, args.max_concurrent) == "interrupted":
        return _stopped(results, out)
    results.save(report_too=True)
    failed = [f"{r['arm']} trial {r['trial']}" for r in results.rows.values() if r["status"] == "error"]
    failed += [f"{r['arm']} re-run seed {r['seed']}" for r in results.seed_rows.values()
               if r["status"] not in report.RERUN_FINAL]
    return last_line("study", out, failed, "failed", "trials.csv and their run directories")


def _stopped(results: Results, out: Path) -> int:
    results.save(report_too=True)
    print(f"study: interrupted; finished trials are in {out / 'trials.csv'}. Continue with "
          f"`vpn-dist study --out {out} --resume`", flush=True)
    return 130


# ---------------------------------------------------------------- the plan


def _new(args: argparse.Namespace, out: Path) -> tuple[Plan, Study, dict[str, dict[str, Any]], dict]:
    if (out / "study.json").exists():
        raise UserError(f"{out} already holds a study; continue it with --resume or choose another --out")
    if not args.spec or not args.data:
        raise UserError("give --spec NAME (tune_spaces/study_*.py) and --data DIR")
    study = load_study(args.spec)
    trials = study.trials if args.trials is None else args.trials
    plan, datasets, configs = _plan(study, args.spec, args.data, trials, args, out)
    make_output_dir(out, "--out")
    write_json_atomic(out / "study.json", plan.to_dict())
    print(f"study {args.spec}: {plan.trials} trials per arm on {plan.data_label} ({plan.data}), {plan.epochs} "
          f"epochs at most, {len(study.rerun_seeds)} re-runs per winner; results in {out}", flush=True)
    return plan, study, datasets, configs


def _resumed(args: argparse.Namespace, out: Path) -> tuple[Plan, Study, dict[str, dict[str, Any]], dict]:
    """The saved plan; --data may say where the same data set lives on this machine, --trials may grow the study."""
    saved = _saved_plan(out, "--resume")
    if args.spec and args.spec != saved.spec:
        raise UserError(f"--resume: {out} is a study of spec {saved.spec!r}, not {args.spec!r}")
    if args.trials is not None and args.trials < saved.trials:
        raise UserError(f"--resume --trials {args.trials}: the study already has {saved.trials} trials per arm")
    study = load_study(saved.spec)
    trials = saved.trials if args.trials is None else args.trials
    plan, datasets, configs = _plan(study, saved.spec, args.data or saved.data, trials, args, out)
    if plan.data_label != saved.data_label:
        raise UserError(f"--resume --data {args.data}: it is {plan.data_label}, the study's data is "
                        f"{saved.data_label}")
    write_json_atomic(out / "study.json", plan.to_dict())
    print(f"study: resuming {out} ({plan.trials} trials per arm on {plan.data}); finished trials are kept", flush=True)
    return plan, study, datasets, configs


def _saved_plan(out: Path, flag: str) -> Plan:
    path = out / "study.json"
    if not path.is_file():
        raise UserError(f"{flag}: {out} holds no study (no study.json); start one with --spec and --data")
    try:
        return Plan.from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError) as err:
        raise UserError(f"{flag}: {path} is damaged ({err})") from None


def _plan(study: Study, spec: str, data: str, trials: int, args, out: Path) -> tuple[Plan, dict, dict]:
    """The plan, the data table and every search trial's config, each resolved and checked before anything starts."""
    from vpn_dist.reproduce.grid import data_label
    from vpn_dist.sweep.space import dataset_table

    for flag, value in (("--trials", trials), ("--cpus-per-trial", args.cpus_per_trial),
                        ("--max-concurrent", args.max_concurrent)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    if args.gpus_per_trial < 0:
        raise UserError(f"--gpus-per-trial must be >= 0, got {args.gpus_per_trial}")
    check_rerun_seeds(study, trials)
    table = dataset_table([data], None)  # checks the data and its val split
    label = data_label(data)
    if study.data is not None and label != study.data:
        raise UserError(f"--data {data} is {label}; study {spec} is for {study.data}")
    (info,) = table.values()
    datasets = {label: info}
    plan = Plan(spec=spec, data=info["path"], data_label=label, num_classes=info["num_classes"], base="", epochs=0,
                trials=trials, cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial)
    configs = {}
    for arm in ARMS:
        for i in range(trials):
            try:
                configs[(arm, i)] = _search_config(study, plan, datasets, out, arm, i)
            except UserError as err:
                raise UserError(f"study {spec}: {arm} trial {i} ({draw_params(study, arm, i)}) is invalid: {err}") \
                    from None
    check_shared(configs)
    plan.base, plan.epochs = configs[(ARMS[0], 0)].model.base, configs[(ARMS[0], 0)].train.epochs
    return plan, datasets, configs


def _search_config(study: Study, plan: Plan, datasets: dict[str, dict[str, Any]], out: Path, arm: str,
                   index: int) -> RunConfig:
    cfg = trial_config(study, arm, draw_params(study, arm, index), seed=study.trial_seed_of(index),
                       run_dir=Path("/unset"), datasets=datasets, resources=plan.resources())
    cfg.out = str(out / "runs" / "search" / arm / f"{index:03d}-{config_id(cfg, plan.data_label)}")
    return cfg


# ---------------------------------------------------------------- running and recording


def study_trial(params: dict[str, Any], configs: dict[str, RunConfig]) -> None:
    """One Tune trial: one run of the study (a search trial or a re-run), resumed from its checkpoint if it has one."""
    driver.train_in_trial(configs[params["key"]])


class Results:
    """trials.csv, curves.csv and seeds.csv, rewritten as each run ends (in the driver process: one writer), and the
    console's line per finished run."""

    def __init__(self, out: Path, study: Study, plan: Plan, configs: dict[tuple[str, int], RunConfig]):
        self.out, self.study, self.plan, self.configs = out, study, plan, configs
        ids = {key: config_id(cfg, plan.data_label) for key, cfg in configs.items()}
        rows = read_csv(out / "trials.csv")
        # report-only (no configs): every row as it is; otherwise a row counts only for the config it was run with
        self.rows = {(r["arm"], r["trial"]): r for r in rows if not configs or ids.get((r["arm"], r["trial"])) ==
                     r["config_id"]}
        self.curves: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for point in read_csv(out / "curves.csv"):
            if (point["arm"], point["trial"]) in self.rows:
                self.curves.setdefault((point["arm"], point["trial"]), []).append(point)
        self.seed_rows = {(r["arm"], r["seed"]): r for r in read_csv(out / "seeds.csv")}
        self.recorded: set[str] = set()  # the runs recorded in this session
        dropped = len(rows) - len(self.rows)
        if dropped:
            print(f"study: {dropped} row(s) of trials.csv were run with other settings (the spec changed); those "
                  f"trials run again", flush=True)

    # ------------------------------------------------------------ the search

    def search_arm(self, arm: str, resources: TrialResources, max_concurrent: int | None) -> str:
        """Run the arm's unfinished trials in their order; "done" or "interrupted"."""
        pending = [i for i in range(self.plan.trials) if self.rows.get((arm, i), {}).get("status")
                   not in report.SEARCH_FINAL]
        finished = self.plan.trials - len(pending)
        # ASHA's rungs start with every finished trial's curve, so new trials meet the same competition
        history = [[{"epoch": p["epoch"], "val_acc": p["val_acc"]} for p in points if p["val_acc"] is not None]
                   for (a, n), points in sorted(self.curves.items())
                   if a == arm and self.rows[(a, n)]["status"] in report.SEARCH_FINAL]
        print(f"study: {arm} arm: {self.plan.trials} trials, {finished} finished, {len(pending)} to run (ASHA: grace "
              f"{self.study.grace_period}, reduction {self.study.reduction_factor}, at most {self.plan.epochs} epochs; "
              f"{len(history)} finished trial(s) replayed into its rungs)", flush=True)
        if not pending:
            return "done"
        keyed = {f"search/{arm}/{i}": self.configs[(arm, i)] for i in pending}
        trials = driver.run_trials(
            functools.partial(study_trial, configs=keyed), {}, self.out, resume=False,
            experiment=f"tune-{arm}-{self._sessions()}", resources=resources, max_concurrent=max_concurrent,
            asha={"time_attr": "epoch", "max_t": self.plan.epochs,
                  "grace_period": min(self.study.grace_period, self.plan.epochs),
                  "reduction_factor": self.study.reduction_factor},
            metric="val_acc", callbacks=[self._callback()], asha_history=history, verbose=0,
            ordered=[({"key": f"search/{arm}/{i}"}, set()) for i in pending])
        return self._record_the_rest(trials)

    def _record_the_rest(self, trials: list) -> str:
        """Rows for the trials the callback did not record (one that never started, or died unreported), from the
        statuses Tune saved; "interrupted" if any did not finish."""
        interrupted = False
        for trial in trials:
            interrupted |= how_it_ended(trial, saved=True) == "interrupted"
            if trial.config["key"] not in self.recorded:
                self.record(trial.config["key"], trial, saved=True)
        self.save()
        return "interrupted" if interrupted else "done"

    def record(self, key: str, trial, saved: bool = False) -> None:
        """A run's row when its trial ended, from its metrics.json and how the trial ended (`saved`: a trial as Tune
        saved it, not as a callback sees it)."""
        self.recorded.add(key)
        phase, arm, n = key.split("/")
        n = int(n)
        cfg = self.configs[(arm, n)] if phase == "search" else self.rerun_configs[(arm, n)]
        summary = load_summary(Path(cfg.out))
        ended = how_it_ended(trial, saved)
        error = error_line(trial) if ended == "error" else None
        epochs = (summary or {}).get("epochs_completed", 0)
        if ended == "interrupted":
            status = "pending"
        elif error is not None:
            status = "diverged" if DIVERGED in error else "error"
        elif phase == "search":
            status = "completed" if epochs >= cfg.train.epochs else "early-stopped"
        else:
            status = "finished" if epochs >= cfg.train.epochs else "pending"
        cid = config_id(cfg, self.plan.data_label)
        if phase == "search":
            values = report.param_values(cfg, self.plan.num_classes)
            params = draw_params(self.study, arm, n)
            self.rows[(arm, n)] = report.trial_row(arm, n, cfg.train.seed, params, values, cid, summary, status, error)
            self.curves[(arm, n)] = report.curve_rows(arm, n, summary)
            if status in report.SEARCH_FINAL:
                # never resumed again: its checkpoints (tens of MB each, x trials) only fill the disk
                shutil.rmtree(RunDir(cfg.out).checkpoints, ignore_errors=True)
                _write_hparams(cfg, status)
            if status != "pending":
                self._print_trial(self.rows[(arm, n)])
        else:
            row = report.seed_row(arm, n, self.rerun_from[arm][1], cid, summary, status, error)
            self.seed_rows[(arm, n)] = row
            shown = f"test {row['test_acc']:.4f}" if row["test_acc"] is not None else status
            print(f"study: re-run {arm:<8} seed {n}: {shown} ({row['epochs'] or 0} epochs, {status}, "
                  f"{row['wall_time_s'] or 0:.0f} s)", flush=True)
        self.save()

    def _print_trial(self, row: dict[str, Any]) -> None:
        """One line per finished trial, and the best of each arm so far."""
        shown = f"val {row['val_acc']:.4f}" if row["val_acc"] is not None else "no val acc"
        best = report.winners(list(self.rows.values()))
        leaders = ", ".join(f"{arm} {best[arm]['val_acc']:.4f} (#{best[arm]['trial']})" if arm in best
                            else f"{arm} -" for arm in ARMS)
        error = f": {row['error']}" if row["status"] == "error" else ""
        print(f"study: {row['arm']:<8} #{row['trial']:<3} {report.format_params(row)} seed {row['seed']} | {shown} "
              f"after {row['epochs'] or 0}/{self.plan.epochs} epochs, {row['status']}{error}, "
              f"{row['wall_time_s'] or 0:.0f} s | best: {leaders}", flush=True)

    # ------------------------------------------------------------ the winners' re-runs

    def rerun_winners(self, datasets: dict[str, dict[str, Any]], resources: TrialResources,
                      max_concurrent: int | None) -> str:
        """Each arm's winner, and the matched baseline, with every rerun seed at full epochs, no early stopping;
        "done" or "interrupted"."""
        self.winners = report.winners(list(self.rows.values()))
        self.rerun_from = report.rerun_trials(self.winners)
        self.rerun_configs = {}
        for group, (arm, trial) in self.rerun_from.items():
            params = draw_params(self.study, arm, trial)
            for seed in self.study.rerun_seeds:
                cfg = trial_config(self.study, arm, params, seed=seed, run_dir=Path("/unset"), datasets=datasets,
                                   resources=self.plan.resources())
                cid = config_id(cfg, self.plan.data_label)
                cfg.out = str(self.out / "runs" / "seeds" / group / f"seed{seed}-{cid}")
                self.rerun_configs[(group, seed)] = cfg
        current = {key: config_id(cfg, self.plan.data_label) for key, cfg in self.rerun_configs.items()}
        stale = [key for key, row in self.seed_rows.items() if current.get(key) != row["config_id"]]
        for key in stale:  # the winner changed (more trials, or a trial rerun): its old re-runs no longer count
            del self.seed_rows[key]
        missing = [arm for arm in ARMS if arm not in self.winners]
        if missing:
            print(f"study: no re-runs for {', '.join(missing)}: no trial of that arm completed every epoch", flush=True)
        pending = [key for key in self.rerun_configs
                   if self.seed_rows.get(key, {}).get("status") not in report.RERUN_FINAL]
        matched = (f"; matched baseline: baseline trial {self.rerun_from['matched'][1]}"
                   if "matched" in self.rerun_from else "")
        print(f"study: winners: " + ", ".join(f"{arm} trial {w['trial']} (val {w['val_acc']:.4f})"
                                              for arm, w in self.winners.items())
              + f"{matched}; {len(self.rerun_configs) - len(pending)} re-runs finished, {len(pending)} to run",
              flush=True)
        self.save()
        if not pending:
            return "done"
        keyed = {f"seeds/{group}/{seed}": self.rerun_configs[(group, seed)] for group, seed in pending}
        trials = driver.run_trials(
            functools.partial(study_trial, configs=keyed), {}, self.out, resume=False,
            experiment=f"tune-seeds-{self._sessions()}", resources=resources, max_concurrent=max_concurrent,
            callbacks=[self._callback()], ordered=[({"key": key}, set()) for key in keyed], verbose=0)
        return self._record_the_rest(trials)

    # ------------------------------------------------------------ files

    def save(self, report_too: bool = False) -> None:
        rows = sorted(self.rows.values(), key=lambda r: (ARMS.index(r["arm"]), r["trial"]))
        write_csv(self.out / "trials.csv", rows, report.TRIAL_COLUMNS)
        write_csv(self.out / "curves.csv", [p for key in sorted(self.curves, key=lambda k: (ARMS.index(k[0]), k[1]))
                                            for p in self.curves[key]], report.CURVE_COLUMNS)
        seeds = sorted(self.seed_rows.values(), key=lambda r: (report.RERUNS.index(r["arm"]), r["seed"]))
        write_csv(self.out / "seeds.csv", seeds, report.SEED_COLUMNS)
        if report_too:
            report.write_report(self.out, self.study, self.plan, rows,
                                [p for points in self.curves.values() for p in points], seeds)

    def _sessions(self) -> int:
        return len(list(self.out.glob("tune-*")))

    def _callback(self):
        """A Tune callback that records a run when its trial ends: completed, stopped by ASHA, or failed."""
        from ray.tune import Callback

        results = self

        class RecordRun(Callback):
            def on_trial_complete(self, iteration, trials, trial, **info):
                results.record(trial.config["key"], trial)

            def on_trial_error(self, iteration, trials, trial, **info):
                results.record(trial.config["key"], trial)

        return RecordRun()


def how_it_ended(trial, saved: bool = False) -> str:
    """"error"; "finished": it ran to its end or ASHA stopped it; or "interrupted": stopped with the experiment
    (Ctrl-C). Tune's callbacks call an interrupted trial complete too, but its last result is not marked done (as
    a finished or stopped one's is); in the statuses Tune saved (`saved`) an interrupted trial is left pending."""
    if trial.status == "ERROR":
        return "error"
    if saved:
        return "finished" if trial.status == "TERMINATED" else "interrupted"
    return "finished" if (getattr(trial, "last_result", None) or {}).get("done") else "interrupted"


def error_line(trial) -> str:
    """The line that says why the trial failed: where its loss diverged (however deep Ray wrapped that), or its
    exception line."""
    from vpn_dist.sweep.report import _short_error, error_text

    diverged = [line.strip() for line in error_text(trial).splitlines() if DIVERGED in line]
    return diverged[-1][:400] if diverged else _short_error(trial)


def _write_hparams(cfg: RunConfig, status: str) -> None:
    """TensorBoard's HParams view compares trials of both arms; a stopped run never reached the train loop's own."""
    from vpn_dist.sweep.report import write_hparams_for_stopped

    write_hparams_for_stopped([{"run_dir": cfg.out, "status": status}])
