"""The reproduction's results as data (runs.csv, curves.csv) and as a report beside the paper (report.md, figures/).

Never imports Ray. Every number in report.md is computed from runs.csv and curves.csv, so a later session can
rebuild the report from the committed data alone.
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from vpn_dist.observe import save_figure, write_text_atomic
from vpn_dist.reproduce.grid import Plan, Run, paper_numbers

RUN_COLUMNS = ("table", "data", "base", "generator", "mode", "seed", "epochs", "test_acc_alg2", "test_acc_no_noise",
               "val_acc", "wall_time_s", "status", "run_id", "train_loss", "train_acc", "sigma_mean", "sigma_max",
               "sigma_bg_auroc", "sigma_between_image_share", "plan")
CURVE_COLUMNS = ("run_id", "epoch", "train_loss", "train_acc", "test_acc_alg2", "test_acc_no_noise", "val_acc",
                 "eval_images", "eval_time_s", "epoch_time_s")
FINISHED = "finished"


# ---------------------------------------------------------------- rows


def run_rows(run: Run, summary: dict[str, Any] | None, status: str, plan_id: str) -> list[dict[str, Any]]:
    """runs.csv rows of one run: one per table that shows it. `summary` is its metrics.json (None: not run)."""
    summary = summary or {}
    base = {"data": run.data, "base": run.base, "generator": run.generator, "mode": run.mode, "seed": run.seed,
            "epochs": summary.get("epochs_completed"), "status": status, "run_id": run.run_id, "plan": plan_id}
    for key in ("test_acc_alg2", "test_acc_no_noise", "val_acc", "wall_time_s", "train_loss", "train_acc",
                "sigma_mean", "sigma_max", "sigma_bg_auroc", "sigma_between_image_share"):
        base[key] = summary.get(key)
    return [{"table": t, **base} for t in run.tables]


def curve_rows(run: Run, summary: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"run_id": run.run_id, **{k: epoch.get(k) for k in CURVE_COLUMNS if k != "run_id"}}
            for epoch in summary.get("history", [])]


def read_csv(path: Path) -> list[dict[str, Any]]:
    """Rows with numbers parsed back ('' is None)."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{k: _parse(v) for k, v in row.items()} for row in csv.DictReader(f)]


def write_csv(path: Path, rows: Iterable[dict[str, Any]], columns: tuple[str, ...]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in columns})
    write_text_atomic(path, buffer.getvalue())


def _parse(text: str) -> Any:
    if text == "":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


# ---------------------------------------------------------------- statistics


def mean_std(values: list[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (ddof 1; 0 for one value) and n."""
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0, len(arr)


def summary(values: list[float | None], digits: str = ".2f") -> str:
    """"mean ± std (n)"; "mean (1)" for one value (no spread to show); "n/a" when nothing was measured (e.g. σ's
    background AUROC on a set without object masks)."""
    measured = [v for v in values if v is not None and not math.isnan(v)]
    if not measured:
        return "n/a"
    mean, std, n = mean_std(measured)
    return f"{mean:{digits}} ({n})" if n == 1 else f"{mean:{digits}} ± {std:{digits}} ({n})"


def paired_test(vpn: dict[int, float], baseline: dict[int, float]) -> tuple[float | None, float | None, int]:
    """Mean of (VPN - baseline) over the seeds both have, and the two-sided p-value of a paired t-test across
    those seeds (same seed: same initial base weights and data order). p is None below 2 pairs."""
    from scipy import stats

    seeds = sorted(set(vpn) & set(baseline))
    if not seeds:
        return None, None, 0
    diffs = np.array([vpn[s] - baseline[s] for s in seeds])
    if len(seeds) < 2:
        return float(diffs.mean()), None, 1
    if np.allclose(diffs, diffs[0]):  # no spread: the t statistic is undefined
        return float(diffs.mean()), (1.0 if diffs[0] == 0 else 0.0), len(seeds)
    return float(diffs.mean()), float(stats.ttest_rel([vpn[s] for s in seeds], [baseline[s] for s in seeds]).pvalue), \
        len(seeds)


def metric_rows(rows: list[dict[str, Any]]) -> list[tuple[tuple, str, dict[int, float]]]:
    """Per table cell and paper row: (cell key, row name, {seed: accuracy in %}) from finished runs.
    Baseline and random read no-noise accuracy; a generator gives two rows, Algorithm 2 and no noise."""
    cells: dict[tuple, dict[str, dict[int, float]]] = {}
    for row in rows:
        if row["status"] != FINISHED:
            continue
        key = (row["table"], row["data"], row["base"])
        found = cells.setdefault(key, {})
        if row["generator"] in (None, "none"):
            found.setdefault(row["mode"], {})[row["seed"]] = 100 * row["test_acc_no_noise"]
        else:
            found.setdefault(row["generator"], {})[row["seed"]] = 100 * row["test_acc_alg2"]
            found.setdefault(f"{row['generator']} (no noise)", {})[row["seed"]] = 100 * row["test_acc_no_noise"]
    order = ["baseline", "random", "dnn3", "dnn3 (no noise)", "resnet18", "resnet18 (no noise)"]
    return [(key, name, cells[key][name]) for key in sorted(cells, key=str) for name in order if name in cells[key]]


# ---------------------------------------------------------------- the report


def write_report(out: Path, plan: Plan, rows: list[dict[str, Any]], curves: list[dict[str, Any]]) -> None:
    paper = paper_numbers()
    finished = sum(r["status"] == FINISHED for r in rows)
    lines = [
        "# Reproduction of the VPN paper's tables", "",
        f"Command: `{plan.command(out.name)}` (DATA: where `vpn-dist prep` wrote each data set)", "",
        f"{finished} of {len(rows)} cell x seed rows finished (runs.csv). Test accuracy in %, of the last epoch "
        "(nothing is selected on the test split). Rows are the paper's: baseline and random read the no-noise "
        "rule; a generator row reads Algorithm 2, its \"(no noise)\" row the base model alone.", "",
        "- **ours**: mean ± sample std (n seeds);",
        "- **paper**: the paper's number (5 runs averaged);",
        "- **Δ baseline**: mean over seeds of (row − the same seed's baseline), and **p**: two-sided paired t-test "
        "of the row against the baseline across those seeds (scipy.stats.ttest_rel; n < 2: no test).", "",
    ]
    cells = metric_rows(rows)
    by_table: dict[int, list] = {}
    for key, name, values in cells:
        by_table.setdefault(key[0], []).append((key, name, values))
    baselines = {key: values for key, name, values in cells if name == "baseline"}
    for table in sorted(by_table):
        lines += [f"## Table {table}", "", "| data | base | row | ours | paper | ours − paper | Δ baseline | p |",
                  "|---|---|---|---|---|---|---|---|"]
        for key, name, values in by_table[table]:
            mean = mean_std(list(values.values()))[0]
            reference = paper.get((table, key[1], key[2], name))
            vs_paper = "" if reference is None else f"{mean - reference:+.2f}"
            delta = p = ""
            if name != "baseline" and key in baselines:
                d, pvalue, pairs = paired_test(values, baselines[key])
                delta = "" if d is None else f"{d:+.2f} ({pairs})"
                p = "" if pvalue is None else f"{pvalue:.3g}"
            lines.append(f"| {key[1]} | {key[2]} | {name} | {summary(list(values.values()))} | "
                         f"{'' if reference is None else f'{reference:.2f}'} | {vs_paper} | {delta} | {p} |")
        lines.append("")
    sigma = [r for r in rows if r["status"] == FINISHED and r.get("sigma_between_image_share") is not None]
    if sigma:
        lines += ["## Where the noise goes", "",
                  "σ on the test images: its mean (pixels are in [0, 1]); the AUROC of σ as a score for \"this pixel is "
                  "background\" (sets with object masks; 0.5: σ ignores the object, 1: all noise on the background); "
                  "and the share of σ's variance that varies across images (~0: the generator ignores its input).", "",
                  "| data | base | generator | mode | σ mean | σ background AUROC | σ between-image variance share |",
                  "|---|---|---|---|---|---|---|"]
        groups: dict[tuple, list] = {}
        for r in {r["run_id"]: r for r in sigma}.values():  # each run once, whichever tables show it
            groups.setdefault((r["data"], r["base"], r["generator"], r["mode"]), []).append(r)
        for key, members in sorted(groups.items(), key=str):
            level, auroc, share = (summary([m.get(k) for m in members], digits) for k, digits in (
                ("sigma_mean", ".3g"), ("sigma_bg_auroc", ".3f"), ("sigma_between_image_share", ".3g")))
            lines.append(f"| {' | '.join(map(str, key))} | {level} | {auroc} | {share} |")
        lines.append("")
    figures = write_figures(out / "figures", rows, curves, paper)
    if figures:
        lines += ["## Figures", ""] + [f"- `{p.relative_to(out)}`" for p in figures] + [""]
    lines += ["Runs: `runs.csv` (one row per cell × seed; the resume state), per-epoch curves: `curves.csv`, "
              "the grid: `reproduce.json`.", ""]
    write_text_atomic(out / "report.md", "\n".join(lines))


def write_figures(folder: Path, rows: list[dict[str, Any]], curves: list[dict[str, Any]],
                  paper: dict[tuple, float]) -> list[Path]:
    """Figure 2 (loss, train and test accuracy per epoch; mean and min-max band over seeds) for every joint
    cell, and Table 1's cells as bars with error bars beside the paper's values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    finished = {r["run_id"]: r for r in rows if r["status"] == FINISHED}
    by_cell: dict[str, dict[str, list[dict]]] = {}
    for point in curves:
        run = finished.get(point["run_id"])
        if run is not None and run["mode"] == "joint":
            cell = run["run_id"].rsplit("/", 1)[0]
            by_cell.setdefault(cell, {}).setdefault(point["run_id"], []).append(point)
    for data in sorted({cell.split("/")[0] for cell in by_cell}):
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        for cell, runs in sorted(by_cell.items()):
            if not cell.startswith(f"{data}/"):
                continue
            for ax, key in zip(axes, ("train_loss", "train_acc", "test_acc_alg2")):
                epochs = sorted({p["epoch"] for pts in runs.values() for p in pts})
                table = np.array([[next((p[key] for p in pts if p["epoch"] == e), np.nan) for e in epochs]
                                  for pts in runs.values()], dtype=float)
                line, = ax.plot(epochs, np.nanmean(table, axis=0), label=f"{cell.split('/')[1]} ({len(runs)} seeds)")
                ax.fill_between(epochs, np.nanmin(table, axis=0), np.nanmax(table, axis=0), alpha=0.2,
                                color=line.get_color())
        for ax, title in zip(axes, ("training loss", "training accuracy", "test accuracy (Algorithm 2)")):
            ax.set_title(title)
            ax.set_xlabel("epoch")
        axes[0].legend(fontsize=8)
        fig.suptitle(f"Figure 2 on {data}: joint training, mean and min-max over seeds")
        written.append(_save(fig, folder / f"figure2_{data}.png"))
        plt.close(fig)
    table1 = [(key, name, values) for key, name, values in metric_rows(rows) if key[0] == 1]
    for data in sorted({key[1] for key, _, _ in table1}):
        cells = [(key, name, values) for key, name, values in table1 if key[1] == data]
        bases = sorted({key[2] for key, _, _ in cells}, key=lambda b: ("sr", "dnn3").index(b) if b in ("sr", "dnn3")
                       else 9)
        names = [n for n in ("baseline", "random", "dnn3", "dnn3 (no noise)", "resnet18", "resnet18 (no noise)")
                 if any(name == n for _, name, _ in cells)]
        fig, axes = plt.subplots(1, len(bases), figsize=(4.5 * len(bases), 4), squeeze=False)
        for ax, base in zip(axes[0], bases):
            for i, name in enumerate(names):
                values = next((v for k, n, v in cells if k[2] == base and n == name), None)
                if values is None:
                    continue
                mean, std, _ = mean_std(list(values.values()))
                ax.bar(i, mean, yerr=std, capsize=3, color="C0", alpha=0.7, label="ours" if i == 0 else None)
                reference = paper.get((1, data, base, name))
                if reference is not None:
                    ax.plot(i, reference, "k_", markersize=22, mew=2, label="paper" if i == 0 else None)
            ax.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=8)
            ax.set_title(f"{data}, base {base}")
            ax.set_ylabel("test accuracy (%)")
            lows = [v for k, n, vs in cells if k[2] == base for v in vs.values()]
            lows += [paper[(1, data, base, n)] for n in names if (1, data, base, n) in paper]
            ax.set_ylim(max(0, min(lows) - 5), min(100, max(lows) + 3))
            ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(_save(fig, folder / f"table1_{data}.png"))
        plt.close(fig)
    return written


def _save(fig, path: Path) -> Path:
    return save_figure(fig, path, dpi=110, bbox_inches="tight")


def load_summary(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
