"""A sweep's results from its trials: OUT/results.csv and .md (one row per trial), the best trial per data set x
architecture by validation metric as a config `vpn-dist train --config FILE` takes, HParams for stopped runs.

Works on anything with trial_id, config, last_result and status (Tune's Trial objects or plain stand-ins):
no Ray import here, so it runs and is tested without a cluster.
"""
from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any

import yaml

from vpn_dist.observe import write_text_atomic

RESULT_METRICS = ("val_acc", "val_acc_alg2", "val_acc_no_noise", "test_acc", "test_acc_alg2", "test_acc_no_noise",
                  "train_loss", "train_acc")
UNFINISHED = ("pending", "running", "paused")


def collect_rows(trials: list, out: Path, max_epochs: int | None) -> list[dict[str, Any]]:
    """One row per trial: its axis values, metrics (last report, else metrics.json), epochs and status.
    `max_epochs` stands in for the planned epochs of a trial that never wrote its config.yaml."""
    from vpn_dist.run_dir import RunDir

    rows = []
    for trial in trials:
        params = dict(trial.config)
        last = dict(trial.last_result or {})
        run_dir = RunDir(out / "trials" / trial.trial_id)
        summary = _read_json(run_dir.metrics)
        cfg = _read_yaml(run_dir.config)
        epochs_run = int(last.get("epoch") or summary.get("epochs_completed") or 0)
        planned = cfg.get("train", {}).get("epochs") or max_epochs
        if trial.status == "ERROR":
            status = "error"
            reason = f"error: {_short_error(trial)}"
        elif trial.status == "TERMINATED":
            status = "completed" if planned and epochs_run >= planned else "early-stopped"
            reason = "completed" if status == "completed" else f"early-stopped (ASHA) at epoch {epochs_run}"
        else:
            status = trial.status.lower()
            reason = f"{status} (sweep interrupted)"
        base, generator = params["arch"] if "arch" in params else (None, None)
        row: dict[str, Any] = {"trial_id": trial.trial_id, "data": params.get("data"),
                               "base": base or cfg.get("model", {}).get("base"),
                               "generator": generator or cfg.get("model", {}).get("generator")}
        row["arch"] = f"{row['base']}-{row['generator']}"
        for key, value in params.items():
            if key not in ("data", "arch"):
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


def _short_error(trial) -> str:
    """The exception line of a trial's error (the last `SomeError: message` line of its traceback)."""
    text = error_text(trial)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    pattern = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception|Interrupt)|ray\.\S+Error)\b.*?:")
    found = [ln for ln in lines if pattern.match(ln)]
    wanted = [ln for ln in found if "UserError" in ln] or found  # our own message says what to change
    message = wanted[-1] if wanted else (lines[-1] if lines else "unknown error")
    return message[:400]


def error_text(trial) -> str:
    """A failed trial's whole error as Tune saved it (its error.txt, else its error message)."""
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
    return text or str(getattr(trial, "error_msg", "") or "unknown error")


def best_rows(rows: list[dict[str, Any]], metric: str) -> dict[tuple[str, str], dict[str, Any]]:
    """Per data set x architecture: the trial with the best validation metric (completed trials first).
    Only `metric` is read, so the test split never chooses."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        if row["status"] in ("completed", "early-stopped") and row.get(metric) is not None:
            groups.setdefault((str(row["data"]), row["arch"]), []).append(row)
    best = {}
    for key, members in groups.items():
        done = [r for r in members if r["status"] == "completed"] or members
        best[key] = max(done, key=lambda r: r[metric])
    return best


def write_results(rows: list[dict[str, Any]], out: Path, *, space: str, metric: str) -> None:
    """OUT/results.csv, OUT/results.md, OUT/best/<data>__<arch>.yaml (+ OUT/best_config.yaml for one group)."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(out / "results.csv", text.getvalue())

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
        write_text_atomic(out / "best_config.yaml", path.read_text())
    else:  # several groups (or none yet): only the per-group files; drop one left by an earlier, partial pass
        (out / "best_config.yaml").unlink(missing_ok=True)
    write_hparams_for_stopped(rows)

    lines = results_markdown(rows, columns, best, written, out, space=space, metric=metric)
    write_text_atomic(out / "results.md", "\n".join(lines))
    print("\n".join(lines[:8 + len(best)]), flush=True)
    print(f"results: {out / 'results.csv'}, {out / 'results.md'}; best configs in {best_dir}", flush=True)


def results_markdown(rows: list[dict[str, Any]], columns: list[str], best: dict, written: dict, out: Path, *,
                     space: str, metric: str) -> list[str]:
    """results.md's lines: the best trial per group first, then every trial."""
    hidden = ("trial_id", "data", "arch", "base", "generator", "run_dir", "status", "stop_reason", "epochs_planned",
              "epochs_run", *RESULT_METRICS)
    shown = ["trial_id", "data", "arch"] + [c for c in columns if c not in hidden] + [
        "val_acc", "val_acc_alg2", "val_acc_no_noise", "test_acc_alg2", "test_acc_no_noise", "epochs_run",
        "stop_reason"]
    lines = [f"# Sweep `{space}`", "",
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
    return lines


def write_best_config(run_dir: Path, path: Path, new_out: Path) -> None:
    """The trial's resolved config, with a fresh --out so `vpn-dist train --config FILE` starts a new run."""
    from vpn_dist.run_dir import RunDir

    cfg = _read_yaml(RunDir(run_dir).config)
    if not cfg:
        return
    cfg["out"] = str(new_out)
    cfg["train"]["fault"] = None
    write_text_atomic(path, f"# best trial {run_dir.name} of a vpn-dist tune sweep; train it with\n"
                            f"#   vpn-dist train --config {path} [--out DIR] [--data DIR]\n"
                            + yaml.safe_dump(cfg, sort_keys=False))


def write_hparams_for_stopped(rows: list[dict[str, Any]]) -> None:
    """Runs that ASHA stopped (or that failed after an epoch) never reached the train loop's HParams summary:
    write it here so TensorBoard's HParams view compares every trial."""
    from vpn_dist.config import load_yaml
    from vpn_dist.observe import RunLog
    from vpn_dist.observe import hparams_of
    from vpn_dist.run_dir import RunDir

    for row in rows:
        run_dir = RunDir(row["run_dir"])
        if row["status"] == "completed" or (run_dir.tensorboard / "hparams").exists() or not run_dir.config.exists():
            continue
        summary = _read_json(run_dir.metrics)
        if not summary:
            continue
        cfg = load_yaml(run_dir.config)
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
