"""`vpn-dist tune`: a Ray Tune sweep of VPN runs, each trial a Ray Train run, ASHA on validation accuracy.

    vpn-dist tune --space smoke --data DIR [--data DIR ...] --out OUT [--samples N] [--max-concurrent K]
                  [--workers-per-trial W] [--gpu] [--epochs N] [--set KEY=VALUE ...] [--resume]

OUT/trials/<trial_id>/   each trial's run dir (config.yaml, metrics.json, checkpoints/, tb/ with HParams)
OUT/tune/                Ray Tune's experiment state (what --resume restores)
OUT/results.csv, .md     one row per trial: hyperparameters, val/test accuracy (both rules), epochs, stop reason
OUT/best/<data>__<base>-<generator>.yaml   the best trial per data set x architecture, by validation accuracy,
                         as a config `vpn-dist train --config FILE` takes (+ OUT/best_config.yaml for one group)

The test split never selects anything: ASHA and the best-trial choice read `val_acc` (Algorithm 2 accuracy,
or no-noise accuracy without a generator); test accuracy is only reported.
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import random
import re
import time
from pathlib import Path
from typing import Any

import yaml

from vpn_dist.config import RunConfig, apply_overrides, from_dict, validate
from vpn_dist.errors import UserError
from vpn_dist.observe import write_json_atomic

SPECIAL_AXES = ("arch", "vpn.bound_C", "vpn.gamma_scale")
SPACE_FIELDS = ("description", "data", "axes", "fixed", "samples", "grace_period", "reduction_factor", "metric")
SELECTION_METRICS = ("val_acc", "val_acc_alg2", "val_acc_no_noise")
RESULT_METRICS = ("val_acc", "val_acc_alg2", "val_acc_no_noise", "test_acc", "test_acc_alg2", "test_acc_no_noise",
                  "train_loss", "train_acc")
MAX_CHECKED = 3000  # resolved configs checked before the sweep starts
DRIVER_MEMORY = 256 * 1024**2  # bytes reserved per trial driver (a logical reservation)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--space", required=True,
                   help="a named space (smoke, paper, multi: tune_spaces/<name>.py) or a .py file defining SPACE")
    p.add_argument("--data", action="append", default=[], metavar="DIR",
                   help="a `vpn-dist prep` output with a val split (repeatable: one data axis value each)")
    p.add_argument("--out", required=True, help="sweep directory: trials/, tune/, results.csv, results.md, best/")
    p.add_argument("--samples", type=int, help="random draws per grid point (Ray Tune num_samples; default: the space's)")
    p.add_argument("--max-concurrent", type=int,
                   help="trials running at once (default: what the cluster's CPUs or GPUs hold)")
    p.add_argument("--workers-per-trial", type=int, default=1, help="Ray Train workers per trial (default 1)")
    p.add_argument("--cpus-per-worker", type=int, default=1, help="CPUs per Ray Train worker (default 1)")
    p.add_argument("--gpu", action="store_true", help="one GPU per Ray Train worker")
    p.add_argument("--epochs", type=int, help="override the space's train.epochs (and ASHA's max_t)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="fix a config key in every trial, e.g. --set train.amp=bf16 (repeatable)")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted sweep in --out; finished trials are not rerun")


# ---------------------------------------------------------------- spaces


def load_space(name: str) -> dict[str, Any]:
    if name.endswith(".py"):
        path = Path(name)
        if not path.is_file():
            raise UserError(f"--space {name}: no such file")
        scope: dict[str, Any] = {"__file__": str(path), "__name__": f"tune_space_{path.stem}"}
        try:
            exec(compile(path.read_text(), str(path), "exec"), scope)  # noqa: S102 - the user's own space file
        except Exception as err:  # noqa: BLE001
            raise UserError(f"--space {name}: the file does not run: {type(err).__name__}: {err}") from None
        if not isinstance(scope.get("SPACE"), dict):
            raise UserError(f"--space {name}: the file must define a dict named SPACE (see tune_spaces/smoke.py)")
        space = dict(scope["SPACE"])
    else:
        from tune_spaces import get_space

        space = get_space(name)
    unknown = set(space) - set(SPACE_FIELDS)
    if unknown:
        raise UserError(f"space {name}: unknown field(s) {', '.join(sorted(unknown))}; "
                        f"fields are {', '.join(SPACE_FIELDS)}")
    space.setdefault("axes", {})
    space.setdefault("fixed", {})
    space.setdefault("samples", 1)
    space.setdefault("grace_period", 1)
    space.setdefault("reduction_factor", 3)
    space.setdefault("metric", "val_acc")
    if space["metric"] not in SELECTION_METRICS:
        raise UserError(f"space {name}: metric {space['metric']!r} must be a validation metric: "
                        f"{', '.join(SELECTION_METRICS)} (the test split never selects)")
    for field in ("samples", "grace_period", "reduction_factor"):
        if not isinstance(space[field], int) or space[field] < 1:
            raise UserError(f"space {name}: {field} must be an integer >= 1, got {space[field]!r}")
    overlap = set(space["axes"]) & set(space["fixed"])
    if overlap:
        raise UserError(f"space {name}: {', '.join(sorted(overlap))} both fixed and an axis")
    for key in space["fixed"]:
        if key in SPECIAL_AXES or key == "data":
            raise UserError(f"space {name}: put {key!r} under axes (a one-value tune.choice if it is fixed)")
    if "data" in space["axes"]:
        raise UserError(f"space {name}: the data axis is the top-level field 'data' (None or a list of names)")
    return space


def dataset_table(data_dirs: list[str], wanted: list[str] | None) -> dict[str, dict[str, Any]]:
    """label -> {path, num_classes, name} for the --data dirs the space keeps; every one must have a val split."""
    from vpn_dist.data import read_meta

    if not data_dirs:
        raise UserError("give at least one --data DIR (a `vpn-dist prep` output with --val N)")
    table: dict[str, dict[str, Any]] = {}
    for raw in data_dirs:
        path = Path(raw).resolve()
        meta = read_meta(path)
        if not meta.get("splits", {}).get("val") or not (path / "val.beton").is_file():
            raise UserError(f"{raw} has no val split, and the sweep selects on validation accuracy only: prepare it "
                            f"with `vpn-dist prep ... --val N` (e.g. --val 5000)")
        name = str(meta.get("name") or meta.get("dataset") or path.name)
        label = _safe(name)
        if label in table:
            label = _safe(f"{name}-{path.name}")
        n = 2
        while label in table:
            label, n = _safe(f"{name}-{n}"), n + 1
        table[label] = {"path": str(path), "num_classes": int(meta["num_classes"]), "name": name}
    if wanted is not None:
        kept = {k: v for k, v in table.items() if k in wanted or v["name"] in wanted or Path(v["path"]).name in wanted}
        if not kept:
            raise UserError(f"the space keeps data sets {wanted}, none of the given --data ({', '.join(table)})")
        table = kept
    return table


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "data"


def resolve_trial(params: dict[str, Any], ctx: dict[str, Any], run_dir: str) -> RunConfig:
    """A trial's RunConfig: space's fixed < the trial's axis values < sweep flags; raises UserError."""
    data = ctx["datasets"].get(params.get("data"))
    if data is None:
        raise UserError(f"trial data {params.get('data')!r} is not one of the sweep's data sets {list(ctx['datasets'])}")
    values: dict[str, Any] = dict(ctx["fixed"])
    for key, value in params.items():
        if key == "data":
            continue
        if key == "arch":
            if not (isinstance(value, (tuple, list)) and len(value) == 2):
                raise UserError(f"axis 'arch' values are (base, generator) pairs, got {value!r}")
            values["model.base"], values["model.generator"] = value
        elif key == "vpn.bound_C":
            if not (isinstance(value, (tuple, list)) and len(value) == 2):
                raise UserError(f"axis 'vpn.bound_C' values are (bound, C) pairs, e.g. ('norm', 10.0), got {value!r}")
            values["vpn.bound"], values["vpn.C"] = value
        elif key == "vpn.gamma_scale":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise UserError(f"axis 'vpn.gamma_scale' must be a number >= 0 (gamma = scale * 0.01 / K), got {value!r}")
            values["vpn.gamma"] = float(value) * 0.01 / data["num_classes"]
        else:
            values[key] = value
    cfg = from_dict(values)
    apply_overrides(cfg, ctx["overrides"])
    if ctx.get("epochs"):
        cfg.train.epochs = ctx["epochs"]
    cfg.out, cfg.data.path = run_dir, data["path"]
    cfg.dist.workers, cfg.dist.gpu, cfg.dist.cpus_per_worker = ctx["workers"], ctx["gpu"], ctx["cpus_per_worker"]
    validate(cfg)
    if cfg.train.eval_every != 1:
        raise UserError(f"train.eval_every = {cfg.train.eval_every}: a sweep evaluates every epoch (ASHA compares "
                        f"validation accuracy at each rung); leave it at 1")
    return cfg


def _candidates(key: str, value: Any, rng: random.Random) -> list[Any]:
    """Every value an axis can take (grid, choice), or a few draws of a continuous one."""
    from ray.tune.search.sample import Categorical, Domain

    if isinstance(value, dict) and set(value) == {"grid_search"}:
        return list(value["grid_search"])
    if isinstance(value, Categorical):
        return list(value.categories)
    if isinstance(value, Domain):
        try:
            drawn = value.sample(size=4, random_state=rng.randrange(2**31))
        except Exception as err:  # noqa: BLE001 - e.g. tune.sample_from, which needs the whole spec
            raise UserError(f"axis {key!r}: cannot draw a value to check it ({type(err).__name__}: {err}); "
                            f"use tune.choice, tune.grid_search or a tune.uniform/loguniform/randint") from None
        values = [v.item() if hasattr(v, "item") else v for v in list(drawn)]  # numpy -> Python numbers
        if getattr(value, "lower", None) is not None:  # the edge a draw may never hit
            values.append(type(values[0])(value.lower))
        return values
    if isinstance(value, dict):
        raise UserError(f"axis {key!r}: a nested dict is not an axis; use dotted RunConfig keys (e.g. 'vpn.m')")
    return [value]


def check_space(space: dict[str, Any], ctx: dict[str, Any], out: Path) -> int:
    """Resolve every combination of grid values and choices (a sample when there are too many) into a RunConfig
    and validate it, before any trial starts. Returns the number of configs checked."""
    rng = random.Random(0)
    keys = list(space["axes"])
    lists = [_candidates(k, space["axes"][k], rng) for k in keys] + [list(ctx["datasets"])]
    keys.append("data")
    total = math.prod(len(v) for v in lists)
    if total <= MAX_CHECKED:
        combos = itertools.product(*lists)
    else:  # every value of every axis at least once, then random combinations
        first = [v[0] for v in lists]
        combos = [tuple(first[:i] + [c] + first[i + 1:]) for i, vals in enumerate(lists) for c in vals]
        combos += [tuple(rng.choice(v) for v in lists) for _ in range(MAX_CHECKED)]
    checked = 0
    for combo in combos:
        params = dict(zip(keys, combo))
        try:
            resolve_trial(params, ctx, str(out / "trials" / "check"))
        except UserError as err:
            shown = {k: v for k, v in params.items()}
            raise UserError(f"space {ctx['space']}: trial config {shown} is invalid: {err}") from None
        checked += 1
    return checked


# ---------------------------------------------------------------- the trial


def run_trial(params: dict[str, Any], ctx: dict[str, Any]) -> None:
    """One Tune trial: resolve its RunConfig and run it as a Ray Train run whose reports reach Tune."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from vpn_dist import checkpoint as ckpt
    from vpn_dist.launch import train

    trial_id = ray.tune.get_context().get_trial_id()
    run_dir = Path(ctx["out"]) / "trials" / trial_id
    cfg = resolve_trial(params, ctx, str(run_dir))
    metrics_file = run_dir / "metrics.json"
    if metrics_file.is_file():  # the sweep was interrupted after (part of) this trial ran
        done = json.loads(metrics_file.read_text())
        if done.get("epochs_completed", 0) >= cfg.train.epochs:  # finished: replay its reports, do not retrain
            for epoch_metrics in done.get("history", []):
                ray.tune.report({k: v for k, v in epoch_metrics.items() if _scalar(v)})
            return
    resume = ckpt.latest_checkpoint(run_dir) is not None
    if not resume and (run_dir / "config.yaml").exists():  # started but no epoch finished: start over
        (run_dir / "config.yaml").unlink()
    train(cfg, resume=resume, ray_callbacks=[TuneReportCallback()])


def _scalar(v: Any) -> bool:
    return isinstance(v, (int, float, str, bool)) or v is None


def make_trainable(ctx: dict[str, Any]):
    from ray import tune

    # The trial only drives a Ray Train run (it and the Train controller need no CPU); the Train workers reserve
    # the CPUs and GPUs, and --max-concurrent keeps the number of drivers to what the cluster can train at once.
    # Ray refuses an empty resource request, so the driver asks for a little memory instead of a CPU.
    return tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), {"CPU": 0, "memory": DRIVER_MEMORY})


# ---------------------------------------------------------------- the sweep


def run(args: argparse.Namespace) -> int:
    out = Path(args.out).resolve()
    sweep_file = out / "sweep.json"
    experiment = out / "tune"
    if args.resume:
        if not sweep_file.is_file():
            raise UserError(f"--resume: {out} holds no sweep to resume (no sweep.json); start it without --resume")
        saved = json.loads(sweep_file.read_text())
        if args.space != saved["space_arg"]:
            raise UserError(f"--resume: {out} is a sweep of space {saved['space_arg']!r}, not {args.space!r}")
        space, ctx = load_space(saved["space_arg"]), saved["ctx"]
        given = {str(Path(d).resolve()) for d in args.data}
        if given and not given <= {d["path"] for d in ctx["datasets"].values()}:
            raise UserError(f"--resume: {out} sweeps {', '.join(d['path'] for d in ctx['datasets'].values())}; "
                            f"a resumed sweep keeps its data sets (drop --data or give the same ones)")
        print(f"resuming the sweep in {out} with its saved settings ({sweep_file})", flush=True)
    else:
        if sweep_file.exists() or experiment.exists():
            raise UserError(f"{out} already holds a sweep; continue it with --resume or choose another --out")
        space = load_space(args.space)
        for flag, value in (("--samples", args.samples), ("--max-concurrent", args.max_concurrent),
                            ("--workers-per-trial", args.workers_per_trial), ("--cpus-per-worker", args.cpus_per_worker),
                            ("--epochs", args.epochs)):
            if value is not None and value < 1:
                raise UserError(f"{flag} must be at least 1, got {value}")
        ctx = {
            "space": args.space, "out": str(out), "fixed": dict(space["fixed"]), "overrides": list(args.overrides),
            "epochs": args.epochs, "workers": args.workers_per_trial, "cpus_per_worker": args.cpus_per_worker,
            "gpu": bool(args.gpu), "datasets": dataset_table(args.data, space.get("data")),
            "samples": args.samples or space["samples"], "metric": space["metric"],
            "grace_period": space["grace_period"], "reduction_factor": space["reduction_factor"],
        }
        checked = check_space(space, ctx, out)
        shown = ", ".join(f"{k} ({v['path']})" for k, v in ctx["datasets"].items())
        ctx["max_epochs"] = max_epochs(space, ctx)
        print(f"space {args.space}: {checked} resolved trial configs are valid; "
              f"data sets: {shown}", flush=True)
        (out / "trials").mkdir(parents=True, exist_ok=True)
        write_json_atomic(sweep_file, {"space_arg": args.space, "ctx": ctx, "started": time.time()})
    return _run_sweep(space, ctx, out, resume=args.resume, max_concurrent=args.max_concurrent)


def max_epochs(space: dict[str, Any], ctx: dict[str, Any]) -> int:
    if ctx.get("epochs"):
        return ctx["epochs"]
    rng = random.Random(0)
    epochs = _candidates("train.epochs", space["axes"]["train.epochs"], rng) if "train.epochs" in space["axes"] \
        else [space["fixed"].get("train.epochs", RunConfig().train.epochs)]
    return int(max(epochs))


def _run_sweep(space: dict[str, Any], ctx: dict[str, Any], out: Path, resume: bool, max_concurrent: int | None) -> int:
    from vpn_dist.launch import init_ray

    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "5")  # experiment state on disk at least every 5 s
    started_here = init_ray(num_cpus=ctx["workers"] * ctx["cpus_per_worker"])  # before Ray's import: loopback
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    try:
        trainable = make_trainable(ctx)
        if resume:
            if not tune.Tuner.can_restore(str(out / "tune")):
                raise UserError(f"--resume: {out / 'tune'} holds no Tune experiment state yet; start again without "
                                f"--resume (remove {out})")
            tuner = tune.Tuner.restore(str(out / "tune"), trainable=trainable, resume_unfinished=True,
                                       restart_errored=False)
        else:
            concurrent = max_concurrent or default_concurrency(ctx)
            param_space = dict(space["axes"]) | {"data": tune.grid_search(list(ctx["datasets"]))}
            scheduler = ASHAScheduler(time_attr="epoch", max_t=ctx["max_epochs"],
                                      grace_period=min(ctx["grace_period"], ctx["max_epochs"]),
                                      reduction_factor=ctx["reduction_factor"])
            tuner = tune.Tuner(
                trainable, param_space=param_space,
                tune_config=tune.TuneConfig(metric=ctx["metric"], mode="max", scheduler=scheduler,
                                            num_samples=ctx["samples"], max_concurrent_trials=concurrent),
                run_config=tune.RunConfig(name="tune", storage_path=str(out),
                                          failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
                                          verbose=1))
            print(f"sweep: {ctx['samples']} sample(s) per grid point, {concurrent} trial(s) at a time, "
                  f"{ctx['workers']} Ray Train worker(s) per trial; trial run dirs under {out / 'trials'}", flush=True)
        tuner.fit()
        # The statuses as saved on disk: after Ctrl-C the in-memory trials all read TERMINATED, while the saved
        # state keeps the unfinished ones PENDING (what --resume runs).
        trials = list(tune.ExperimentAnalysis(str(out / "tune")).trials)
        rows = collect_rows(trials, ctx, out)
    finally:
        if started_here:
            ray.shutdown()
    write_results(rows, ctx, out)
    unfinished = [r for r in rows if r["status"] in ("pending", "running", "paused")]
    if unfinished:
        print(f"the sweep stopped with {len(unfinished)} trial(s) unfinished; continue it with the same command "
              f"and --resume", flush=True)
        return 130
    return 0


def default_concurrency(ctx: dict[str, Any]) -> int:
    import ray

    resources = ray.cluster_resources()
    if ctx["gpu"]:
        return max(1, int(resources.get("GPU", 0)) // ctx["workers"])
    return max(1, int(resources.get("CPU", 1)) // (ctx["workers"] * ctx["cpus_per_worker"]))


# ---------------------------------------------------------------- results


def collect_rows(trials: list, ctx: dict[str, Any], out: Path) -> list[dict[str, Any]]:
    rows = []
    for trial in trials:
        params = dict(trial.config)
        last = dict(trial.last_result or {})
        run_dir = out / "trials" / trial.trial_id
        summary = _read_json(run_dir / "metrics.json")
        epochs_run = int(last.get("epoch") or summary.get("epochs_completed") or 0)
        planned = ctx.get("epochs") or _planned_epochs(run_dir, ctx)
        if trial.status == "ERROR":
            status = "error"
            reason = f"error: {_short_error(trial)}"
        elif trial.status == "TERMINATED":
            status = "completed" if planned and epochs_run >= planned else "early-stopped"
            reason = "completed" if status == "completed" else f"early-stopped (ASHA) at epoch {epochs_run}"
        else:
            status = trial.status.lower()
            reason = f"{status} (sweep interrupted)"
        base, generator = params.get("arch", (None, None)) if "arch" in params else (None, None)
        row: dict[str, Any] = {"trial_id": trial.trial_id, "data": params.get("data"), "base": base,
                               "generator": generator}
        cfg = _read_yaml(run_dir / "config.yaml")
        row["base"] = row["base"] or cfg.get("model", {}).get("base")
        row["generator"] = row["generator"] or cfg.get("model", {}).get("generator")
        row["arch"] = f"{row['base']}-{row['generator']}"
        for key, value in params.items():
            if key in ("data", "arch"):
                continue
            row[key] = json.dumps(list(value)) if isinstance(value, (tuple, list)) else value
        row["gamma"] = cfg.get("vpn", {}).get("gamma")
        for key in RESULT_METRICS:
            value = last.get(key)
            row[key] = value if value is not None else summary.get(key)
        row.update({"epochs_run": epochs_run, "epochs_planned": planned, "status": status, "stop_reason": reason,
                    "run_dir": str(run_dir)})
        rows.append(row)
    rows.sort(key=lambda r: (str(r["data"]), r["arch"], r["trial_id"]))
    return rows


def _planned_epochs(run_dir: Path, ctx: dict[str, Any]) -> int | None:
    cfg = _read_yaml(run_dir / "config.yaml")
    return cfg.get("train", {}).get("epochs") or ctx.get("max_epochs")


def _short_error(trial) -> str:
    """The exception line of a trial's error (the last `SomeError: message` line of its traceback)."""
    text = ""
    candidates = []
    for attr in ("error_file", "path"):
        try:
            candidates.append(getattr(trial, attr))
        except Exception:  # noqa: BLE001 - the paths need a live Ray session and a synced trial
            continue
    for path in candidates:
        path = Path(path) if path else None
        if path is not None and path.is_dir():
            path = path / "error.txt"
        if path is not None and path.is_file():
            text = path.read_text(errors="replace")
            break
    if not text:
        text = str(getattr(trial, "error_msg", "") or "unknown error")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    pattern = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception|Interrupt)|ray\.\S+Error)\b.*?:")
    found = [ln for ln in lines if pattern.match(ln)]
    wanted = [ln for ln in found if "UserError" in ln] or found  # our own message says what to change
    message = wanted[-1] if wanted else (lines[-1] if lines else "unknown error")
    return message[:400]


def best_rows(rows: list[dict[str, Any]], metric: str) -> dict[tuple[str, str], dict[str, Any]]:
    """Per data set x architecture: the trial with the best validation metric (completed trials first)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        if row["status"] in ("completed", "early-stopped") and row.get(metric) is not None:
            groups.setdefault((str(row["data"]), row["arch"]), []).append(row)
    best = {}
    for key, members in groups.items():
        done = [r for r in members if r["status"] == "completed"] or members
        best[key] = max(done, key=lambda r: r[metric])
    return best


def write_results(rows: list[dict[str, Any]], ctx: dict[str, Any], out: Path) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with open(out / "results.csv.tmp", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    (out / "results.csv.tmp").replace(out / "results.csv")

    metric = ctx["metric"]
    best = best_rows(rows, metric)
    best_dir = out / "best"
    best_dir.mkdir(exist_ok=True)
    written = {}
    for (data, arch), row in best.items():
        path = best_dir / f"{data}__{arch}.yaml"
        write_best_config(Path(row["run_dir"]), path, out / "best_runs" / f"{data}__{arch}")
        written[(data, arch)] = path
    if len(written) == 1:
        (path,) = written.values()
        (out / "best_config.yaml").write_text(path.read_text())
    else:  # several groups (or none yet): only the per-group files; drop one left by an earlier, partial pass
        (out / "best_config.yaml").unlink(missing_ok=True)
    write_hparams_for_stopped(rows)

    shown = ["trial_id", "data", "arch"] + [c for c in columns if c not in (
        "trial_id", "data", "arch", "base", "generator", "run_dir", "status", "stop_reason", "epochs_planned", "epochs_run",
        *RESULT_METRICS)] + ["val_acc", "val_acc_alg2", "val_acc_no_noise", "test_acc_alg2", "test_acc_no_noise",
                             "epochs_run", "stop_reason"]
    lines = [f"# Sweep `{ctx['space']}`", "",
             f"{len(rows)} trials; selection by `{metric}` on the validation split (Algorithm 2 accuracy, or no-noise "
             f"accuracy without a generator). Test accuracy is reported, never used to choose.", "",
             "## Best trial per data set x architecture", "",
             "| data | arch | trial | " + metric + " | test acc (Alg. 2) | test acc (no noise) | config |",
             "|---|---|---|---|---|---|---|"]
    for (data, arch), row in sorted(best.items()):
        lines.append(f"| {data} | {arch} | {row['trial_id']} | {_fmt(row[metric])} | {_fmt(row['test_acc_alg2'])} | "
                     f"{_fmt(row['test_acc_no_noise'])} | `{written[(data, arch)].relative_to(out)}` |")
    if not best:
        lines.append("| (no trial finished an epoch) | | | | | | |")
    lines += ["", "## All trials", "", "| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c)).replace("|", "/") for c in shown) + " |")
    lines += ["", f"TensorBoard (HParams tab compares trials): `tensorboard --logdir {out / 'trials'}`", ""]
    (out / "results.md").write_text("\n".join(lines))
    print("\n".join(lines[:8 + len(best)]), flush=True)
    print(f"results: {out / 'results.csv'}, {out / 'results.md'}; best configs in {best_dir}", flush=True)


def write_best_config(run_dir: Path, path: Path, new_out: Path) -> None:
    """The trial's resolved config, with a fresh --out so `vpn-dist train --config FILE` starts a new run."""
    cfg = _read_yaml(run_dir / "config.yaml")
    if not cfg:
        return
    cfg["out"] = str(new_out)
    cfg["train"]["fault"] = None
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"# best trial {run_dir.name} of a vpn-dist tune sweep; train it with\n"
                   f"#   vpn-dist train --config {path} [--out DIR] [--data DIR]\n"
                   + yaml.safe_dump(cfg, sort_keys=False))
    tmp.replace(path)


def write_hparams_for_stopped(rows: list[dict[str, Any]]) -> None:
    """Runs that ASHA stopped (or that failed after an epoch) never reached the train loop's HParams summary:
    write it here so TensorBoard's HParams view compares every trial."""
    from vpn_dist.config import load_yaml
    from vpn_dist.observe import RunLog
    from vpn_dist.train import hparams_of

    for row in rows:
        run_dir = Path(row["run_dir"])
        if row["status"] == "completed" or (run_dir / "tb" / "hparams").exists() or not (run_dir / "config.yaml").exists():
            continue
        summary = _read_json(run_dir / "metrics.json")
        if not summary:
            continue
        cfg = load_yaml(run_dir / "config.yaml")
        log = RunLog(run_dir, enabled=True)
        log.hparams(hparams_of(cfg, cfg.vpn.gamma or 0.0), summary)
        log.close()


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        return yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
