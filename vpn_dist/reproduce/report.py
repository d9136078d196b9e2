"""The reproduction's results as data (runs.csv, curves.csv) and as a report beside the paper (report.md, figures/).

Never imports Ray. Every number in report.md is computed from runs.csv and curves.csv, so a later session can
rebuild the report from the committed data alone.
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from vpn_dist.observe import save_figure, write_text_atomic
from vpn_dist.reproduce.grid import Plan, GridRun, paper_numbers
from vpn_dist.reproduce.stats import ALPHA, POWER, Comparison, compare, judge

# What can move a number besides the seed: where and how the run computed, and whether it was trained more than once.
# retrains: how many times `reproduce` trained the run again from scratch after it had finished (its run directory
# was gone); resumes: how many times the run continued from a checkpoint (--resume, or Ray's worker recovery).
PROVENANCE_COLUMNS = ("device", "torch_version", "precision", "flush_denormal", "resumes", "retrains")
UNKNOWN = "unknown"  # a finished row from before its column was recorded
RUN_COLUMNS = ("table", "data", "base", "generator", "mode", "seed", "epochs", "test_acc_alg2", "test_acc_no_noise",
               "val_acc", "wall_time_s", "status", "run_id", "train_loss", "train_acc", "sigma_mean", "sigma_max",
               "sigma_bg_auroc", "sigma_between_image_share", "plan", "train_images_per_sec") + PROVENANCE_COLUMNS + (
               "sigma_label_change",)
CURVE_COLUMNS = ("run_id", "epoch", "train_loss", "train_acc", "test_acc_alg2", "test_acc_no_noise", "val_acc",
                 "eval_images", "eval_time_s", "epoch_time_s")
FINISHED = "finished"


# ---------------------------------------------------------------- rows


def run_rows(run: GridRun, summary: dict[str, Any] | None, status: str, plan_id: str) -> list[dict[str, Any]]:
    """runs.csv rows of one run: one per table that shows it. `summary` is its metrics.json (None: not run)."""
    summary = summary or {}
    base = {"data": run.data, "base": run.base, "generator": run.generator, "mode": run.mode, "seed": run.seed,
            "epochs": summary.get("epochs_completed"), "status": status, "run_id": run.run_id, "plan": plan_id}
    for key in ("test_acc_alg2", "test_acc_no_noise", "val_acc", "wall_time_s", "train_loss", "train_acc",
                "sigma_mean", "sigma_max", "sigma_bg_auroc", "sigma_between_image_share", "train_images_per_sec",
                "sigma_label_change"):
        base[key] = summary.get(key)
    if summary:
        for key in ("device", "torch_version", "precision", "flush_denormal"):
            base[key] = summary.get(key, UNKNOWN)
        attempts = summary.get("attempts")
        base["resumes"] = UNKNOWN if attempts is None else sum(a.get("reason") != "start" for a in attempts)
    return [{"table": t, **base} for t in run.tables]


def mark_unknown_provenance(row: dict[str, Any]) -> dict[str, Any]:
    """A finished row written before the provenance columns existed says so, rather than leaving them blank."""
    if row.get("status") == FINISHED:
        for key in PROVENANCE_COLUMNS:
            if row.get(key) is None:
                row[key] = UNKNOWN
    return row


def curve_rows(run: GridRun, summary: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"run_id": run.run_id, **{k: epoch.get(k) for k in CURVE_COLUMNS if k != "run_id"}}
            for epoch in summary.get("history", [])]


# "2.10" is a version, not 2.1; an id of hex digits ("5804269877", "0123e456") is not a number
TEXT_COLUMNS = ("device", "torch_version", "precision", "flush_denormal", "config_id", "plan")


def read_csv(path: Path) -> list[dict[str, Any]]:
    """Rows with numbers parsed back ('' is None)."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{k: (v or None) if k in TEXT_COLUMNS else _parse(v) for k, v in row.items()}
                for row in csv.DictReader(f)]


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
    order = ["baseline", "random", "isotropic", "dnn3", "dnn3 (no noise)", "resnet18", "resnet18 (no noise)"]
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
        "of the row against the baseline across those seeds (scipy.stats.ttest_rel; n < 2: no test). Intervals, "
        "the test against the paper's own gain, the correction for the number of tests and a verdict per claim: "
        "[Statistics](#statistics).", "",
    ]
    cells = metric_rows(rows)
    by_table: dict[int, list] = {}
    for key, name, values in cells:
        by_table.setdefault(key[0], []).append((key, name, values))
    comparisons = _comparisons(cells, paper)
    for table in sorted(by_table):
        lines += [f"## Table {table}", "", "| data | base | row | ours | paper | ours − paper | Δ baseline | p |",
                  "|---|---|---|---|---|---|---|---|"]
        for key, name, values in by_table[table]:
            mean = mean_std(list(values.values()))[0]
            reference = paper.get((table, key[1], key[2], name))
            vs_paper = "" if reference is None else f"{mean - reference:+.2f}"
            delta = p = ""
            if (key, name) in comparisons:
                c = comparisons[(key, name)]
                delta = "" if c.mean is None else f"{c.mean:+.2f} ({c.n})"
                p = "" if c.p is None else f"{c.p:.3g}"
            lines.append(f"| {key[1]} | {key[2]} | {name} | {summary(list(values.values()))} | "
                         f"{'' if reference is None else f'{reference:.2f}'} | {vs_paper} | {delta} | {p} |")
        lines.append("")
    if comparisons:
        lines += statistics_section(comparisons)
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
        label_change = any(r.get("sigma_label_change") is not None for r in sigma)
        if label_change:  # grids from before it was measured keep their table
            lines[-2] += " σ label change (mean |σ(x, y+1) − σ(x, y)| / mean σ) |"
            lines[-1] += "---|"
        for key, members in sorted(groups.items(), key=str):
            level, auroc, share, moved = (summary([m.get(k) for m in members], digits) for k, digits in (
                ("sigma_mean", ".3g"), ("sigma_bg_auroc", ".3f"), ("sigma_between_image_share", ".3g"),
                ("sigma_label_change", ".3g")))
            lines.append(f"| {' | '.join(map(str, key))} | {level} | {auroc} | {share} |" + (f" {moved} |" if label_change
                                                                                            else ""))
        lines.append("")
    if plan.sigma_from and any(name == "isotropic" for _, name, _ in cells):
        lines += isotropic_control_section(plan, cells)
    lines += compute_section(rows)
    figures = write_figures(out / "figures", rows, curves, paper)
    if figures:
        lines += ["## Figures", ""] + [f"- `{p.relative_to(out)}`" for p in figures] + [""]
    lines += ["Runs: `runs.csv` (one row per cell × seed; the resume state), per-epoch curves: `curves.csv`, "
              "the grid: `reproduce.json`.", ""]
    write_text_atomic(out / "report.md", "\n".join(lines))


def _comparisons(cells: list[tuple[tuple, str, dict[int, float]]],
                 paper: dict[tuple, float]) -> dict[tuple, Comparison]:
    """Every non-baseline row against its cell's baseline, with the paper's claimed gain (the paper's row minus the
    paper's baseline of the same table, data and base; None where the paper has no number)."""
    baselines = {key: values for key, name, values in cells if name == "baseline"}
    found = {}
    for key, name, values in cells:
        if name != "baseline" and key in baselines:
            row, base = paper.get((*key, name)), paper.get((*key, "baseline"))
            claimed = None if row is None or base is None else row - base
            found[(key, name)] = compare(values, baselines[key], claimed)
    return dict(zip(found, judge(list(found.values()))))


def statistics_section(comparisons: dict[tuple, Comparison]) -> list[str]:
    """One table of every row's paired statistics, and the rules that read it."""
    level = f"{1 - ALPHA:.0%}"
    tests = sum(c.p is not None for c in comparisons.values())
    exclusions = sum(c.p_excl is not None for c in comparisons.values())
    lines = ["## Statistics", "",
             f"| table | data | base | row | Δ baseline [{level} CI] (n) | p (Holm) | paper's gain | p_excl (Holm) | "
             f"MDE | verdict |", "|---|---|---|---|---|---|---|---|---|---|"]
    for ((table, data, base), name), c in comparisons.items():
        if c.n == 0:
            continue
        lines.append(f"| {table} | {data} | {base} | {name} | " + " | ".join(comparison_cells(c)) + " |")
    lines += [
        "",
        "Differences in accuracy points; n: seeds with both the row and its baseline.",
        "",
        f"- **Δ baseline [{level} CI]**: the mean of the per-seed differences (row − the same seed's baseline) and its "
        f"t interval, mean ± t({1 - ALPHA / 2:g}; n − 1) · sd / √n. With n ≤ 5 seeds a bootstrap interval is not "
        "better: 5 differences have only 126 distinct resamples, and the percentile bootstrap's interval is too "
        "narrow at such n; the t interval is exact when the differences are normal. Where no seed differs at all (a "
        "base the generator left unchanged: its no-noise accuracy is its baseline's) the difference is known "
        "exactly: the interval is [0, 0], p is 1 and p_excl 0. Where every seed gives the same nonzero difference (a "
        "coincidence of accuracies counted in whole images) t is undefined: no interval and no test.",
        f"- **p**: two-sided paired t-test of the row against its baseline (H0: no difference). In parentheses, Holm's "
        f"adjustment over the {tests} paired tests of this report.",
        "- **paper's gain**: the paper's row minus the paper's baseline, same table, data and base.",
        f"- **p_excl**: one-sided paired t-test of H0: our true gain ≥ the paper's gain, against H1: it is smaller. "
        f"p_excl < {ALPHA:g} excludes the paper's gain at {ALPHA:.0%}. Holm's adjustment in parentheses, over the "
        f"{exclusions} exclusion tests of this report (a second family: it asks another question). \"-\": the paper "
        "claims no gain (its row ≤ its baseline) or has no number for the row, so there is no claim to reject.",
        f"- **MDE**: the minimum detectable effect, the true difference that a two-sided {ALPHA:.0%} paired t-test on "
        f"these n seeds with this sd detects with {POWER:.0%} power (the noncentral t, scipy.stats.nct, solved for its "
        "noncentrality; exact, where the normal approximation is optimistic at a few seeds). A difference below it "
        "could well go undetected: a large p is not evidence of no effect.",
        f"- **verdict**, for each row where the paper claims a gain (> 0): **excluded** if the Holm-adjusted p_excl < "
        f"{ALPHA:g} (the paper's gain is rejected, even where a smaller gain is significant); otherwise **reproduced** "
        f"if the Holm-adjusted p < {ALPHA:g} and the difference is positive (the paper's direction); otherwise "
        "**inconclusive** (these seeds neither confirm a gain nor reject the paper's). \"-\": no claimed gain to "
        "judge, or fewer than 2 seeds.",
        "",
    ]
    return lines


def isotropic_control_section(plan: Plan, cells: list[tuple[tuple, str, dict[int, float]]]) -> list[str]:
    """VPN against noise of its own size: each seed's joint run (in the grid plan.sigma_from) against the isotropic
    run at that seed's learned mean σ (this grid), paired by seed. Each beats its own grid's baseline by some amount;
    this asks whether VPN's per-pixel, per-image σ adds anything over the noise level alone."""
    source = Path(plan.sigma_from)
    lines = ["## The isotropic control", "",
             f"Each seed's isotropic run trains the base on x + N(0, s²·I), s the mean σ that seed's joint run learned "
             f"in `{plan.sigma_from}`. Paired by seed: VPN's rows there minus the isotropic row here. A difference "
             "near 0 says VPN's gain is that of noise of its size; a positive one, that where σ puts the noise "
             "matters.", ""]
    if not (source / "runs.csv").is_file():
        return lines + [f"(`{source / 'runs.csv'}` is not here: run the report from the directory the grid was "
                        "started in.)", ""]
    vpn_cells = {(key[1], key[2], name): values for key, name, values in metric_rows(read_csv(source / "runs.csv"))
                 if key[0] == 1}
    lines += ["| data | base | VPN row | VPN − isotropic [95% CI] (n) | p | MDE |", "|---|---|---|---|---|---|"]
    for key, name, isotropic in cells:
        if name != "isotropic":
            continue
        for vpn_name in [n for n in ("dnn3", "dnn3 (no noise)", "resnet18", "resnet18 (no noise)")
                         if (key[1], key[2], n) in vpn_cells]:
            c = compare(vpn_cells[(key[1], key[2], vpn_name)], isotropic)
            if c.n == 0:
                continue
            lines.append(f"| {key[1]} | {key[2]} | {vpn_name} | {difference_cell(c)} | "
                         f"{'' if c.p is None else f'{c.p:.3g}'} | {'-' if c.mde is None else f'{c.mde:.2f}'} |")
    return lines + ["", "Two-sided paired t-tests (not in the Holm families above: they ask about a control, not a "
                        "paper claim); MDE as in [Statistics](#statistics).", ""]


def comparison_cells(c: Comparison, no_gain: str = "") -> list[str]:
    """A row's paired statistics as table cells, as every report shows them: Δ [CI] (n), p (Holm), the paper's gain
    (`no_gain` where the paper has none), p_excl (Holm), MDE, verdict."""
    return [difference_cell(c), p_with_holm(c.p, c.p_holm),
            no_gain if c.claimed_gain is None else f"{c.claimed_gain:+.2f}", p_with_holm(c.p_excl, c.p_excl_holm),
            "-" if c.mde is None else f"{c.mde:.2f}", c.verdict or "-"]


def difference_cell(c: Comparison) -> str:
    """The mean paired difference, its interval and n: "+0.12 [-0.19, +0.43] (5)"."""
    interval = "" if c.ci is None else f" [{c.ci[0]:+.2f}, {c.ci[1]:+.2f}]"
    return f"{c.mean:+.2f}{interval} ({c.n})"


def p_with_holm(p: float | None, adjusted: float | None) -> str:
    return "-" if p is None else f"{p:.3g} ({adjusted:.3g})"


def compute_section(rows: list[dict[str, Any]]) -> list[str]:
    """What the grid cost (run-hours, images/s) and where its numbers came from (device, software, numerics)."""
    runs = list({r["run_id"]: r for r in rows if r.get("wall_time_s") is not None}.values())  # each run once
    if not runs:
        return []
    groups: dict[tuple, list] = {}
    for r in runs:
        groups.setdefault((r["data"], r["base"], r["generator"], r["mode"]), []).append(r)
    lines = ["## Compute and provenance", "",
             f"{sum(r['wall_time_s'] for r in runs) / 3600:.1f} run-hours: the sum of `wall_time_s` (training and "
             f"evaluation, over every attempt) of the grid's {len(runs)} runs that ran (each once, however many tables "
             "show it; a retrained run counts its last training only).", "",
             "| data | base | generator | mode | runs | run-hours | median train images/s |",
             "|---|---|---|---|---|---|---|"]
    for key, members in sorted(groups.items(), key=str):
        speeds = [m["train_images_per_sec"] for m in members if isinstance(m.get("train_images_per_sec"), (int, float))]
        speed = f"{np.median(speeds):,.0f}" if speeds else "not recorded"
        lines.append(f"| {' | '.join(map(str, key))} | {len(members)} | "
                     f"{sum(m['wall_time_s'] for m in members) / 3600:.2f} | {speed} |")
    lines += ["", "Where and how the runs computed (runs per value; \"unknown\": finished before runs.csv recorded "
              "it):", ""]
    for column, what in (("device", "device"), ("torch_version", "torch"), ("precision", "precision"),
                         ("flush_denormal", "flush-denormal (CPU)"), ("resumes", "resumes from a checkpoint"),
                         ("retrains", "retrained from scratch after finishing")):
        lines.append(f"- {what}: {_tally(r.get(column) for r in runs)}")
    return lines + [""]


def _tally(values: Iterable[Any]) -> str:
    counts: dict[str, int] = {}
    for value in values:
        text = "not run" if value is None else str(value)
        counts[text] = counts.get(text, 0) + 1
    return ", ".join(f"{value} ({n} run{'s' if n != 1 else ''})" for value, n in sorted(counts.items()))


def write_figures(folder: Path, rows: list[dict[str, Any]], curves: list[dict[str, Any]],
                  paper: dict[tuple, float]) -> list[Path]:
    """Figure 2 (loss, train and test accuracy per epoch; mean and min-max band over seeds) for every joint cell and
    its base's baseline, and Table 1's cells as bars with error bars beside the paper's values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = [figure2(folder, data, cells, plt) for data, cells in sorted(_figure2_cells(rows, curves).items())]
    table1 = [(key, name, values) for key, name, values in metric_rows(rows) if key[0] == 1]
    for data in sorted({key[1] for key, _, _ in table1}):
        cells = [(key, name, values) for key, name, values in table1 if key[1] == data]
        bases = sorted({key[2] for key, _, _ in cells}, key=lambda b: ("sr", "dnn3").index(b) if b in ("sr", "dnn3")
                       else 9)
        names = [n for n in ("baseline", "random", "isotropic", "dnn3", "dnn3 (no noise)", "resnet18", "resnet18 (no noise)")
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
        written.append(save_report_figure(fig, folder / f"table1_{data}.png"))
        plt.close(fig)
    return written


FULL_TEST = "all"  # curves.csv's eval_images of the last epoch: the whole split, where other epochs read a subset
GENERATOR_LINE_STYLES = {"none": ":", "dnn3": "-", "resnet18": "-."}


def _figure2_cells(rows: list[dict[str, Any]], curves: list[dict[str, Any]]) -> dict[str, dict[tuple, dict]]:
    """data -> (base, generator, mode) -> {run_id: its curve points}: the finished joint runs, and the baselines of
    the bases that have joint runs."""
    finished = {r["run_id"]: r for r in rows if r["status"] == FINISHED}
    joint = {(r["data"], r["base"]) for r in finished.values() if r["mode"] == "joint"}
    found: dict[str, dict[tuple, dict]] = {}
    for point in curves:
        run = finished.get(point["run_id"])
        if run is not None and run["mode"] in ("joint", "baseline") and (run["data"], run["base"]) in joint:
            cell = found.setdefault(run["data"], {}).setdefault((run["base"], run["generator"], run["mode"]), {})
            cell.setdefault(point["run_id"], []).append(point)
    return found


def figure2(folder: Path, data: str, cells: dict[tuple, dict], plt) -> Path:
    """Training loss, training accuracy and test accuracy per epoch: a line per cell (colour: base; style: baseline
    dotted, generators solid or dash-dotted), mean and min-max band over seeds. The per-epoch test points read a
    fixed subset of the test split and the last epoch reads all of it, so the line stops at the subset's points and
    the whole-set result is a separate marker (joining them would draw a step that is only sampling noise)."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    bases = sorted({base for base, _, _ in cells})
    subset_sizes = sorted({p["eval_images"] for runs in cells.values() for pts in runs.values() for p in pts
                           if p.get("eval_images") not in (None, FULL_TEST)})
    for i, ((base, generator, mode), runs) in enumerate(sorted(cells.items())):
        color = f"C{bases.index(base)}"
        style = GENERATOR_LINE_STYLES.get(generator, "--")
        label = f"{base}: {'baseline' if mode == 'baseline' else f'VPN, {generator} generator'} ({len(runs)} seeds)"
        test_key = "test_acc_no_noise" if generator == "none" else "test_acc_alg2"
        for ax, key in zip(axes, ("train_loss", "train_acc", test_key)):
            points = [[p for p in pts if p.get(key) is not None] for pts in runs.values()]
            if key == test_key:  # the full-test-set points are drawn apart, below
                points = [[p for p in pts if p.get("eval_images") != FULL_TEST] for pts in points]
            epochs, low, mean, high = _band(points, key)
            if epochs:
                ax.plot(epochs, mean, style, color=color, label=label if ax is axes[0] else None)
                ax.fill_between(epochs, low, high, alpha=0.15, color=color)
        final = [[p for p in pts if p.get("eval_images") == FULL_TEST and p.get(test_key) is not None]
                 for pts in runs.values()]
        epochs, low, mean, high = _band(final, test_key)
        if epochs:  # side by side, not on top of each other
            axes[2].errorbar(np.array(epochs) + 0.4 * i, mean, yerr=[mean - low, high - mean], fmt="D", color=color,
                             mfc="white", capsize=3)
    subset = f"{', '.join(map(str, subset_sizes))} test images" if subset_sizes else "a test subset"
    axes[2].plot([], [], "D", color="gray", mfc="white", label="last epoch, whole test set (min-max bar)")
    axes[2].plot([], [], "-", color="gray", label=f"per epoch, the same {subset}")
    for ax, title in zip(axes, ("training loss", "training accuracy",
                                "test accuracy (Algorithm 2; baseline: no noise)")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
    axes[0].legend(fontsize=8, loc="upper right")
    axes[2].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"Figure 2 on {data}: joint training and its baseline, mean and min-max over seeds")
    path = save_report_figure(fig, folder / f"figure2_{data}.png")
    plt.close(fig)
    return path


def _band(runs: list[list[dict[str, Any]]], key: str) -> tuple[list[int], np.ndarray, np.ndarray, np.ndarray]:
    """Epochs with a value in any run, and the min, mean and max over runs at each (a run without it: skipped)."""
    epochs = sorted({p["epoch"] for pts in runs for p in pts})
    if not epochs:
        return [], np.array([]), np.array([]), np.array([])
    table = np.array([[next((p[key] for p in pts if p["epoch"] == e), np.nan) for e in epochs] for pts in runs],
                     dtype=float)
    return epochs, np.nanmin(table, axis=0), np.nanmean(table, axis=0), np.nanmax(table, axis=0)


def save_report_figure(fig, path: Path) -> Path:
    return save_figure(fig, path, dpi=110, bbox_inches="tight")


def last_line(command: str, out: Path, unfinished: list[str], how: str, errors_in: str) -> int:
    """A grid command's closing line and exit code: where its report is (0), or which runs did not finish, where
    their errors are and how to continue (1)."""
    if unfinished:
        shown = ", ".join(unfinished[:5]) + (" ..." if len(unfinished) > 5 else "")
        print(f"{command}: {len(unfinished)} run(s) {how} ({shown}); their errors are in {errors_in}. Continue with "
              f"`vpn-dist {command} --out {out} --resume`", flush=True)
        return 1
    print(f"{command}: report in {out / 'report.md'}", flush=True)
    return 0


def load_summary(run_dir: Path) -> dict[str, Any] | None:
    try:
        from vpn_dist.run_dir import RunDir

        return RunDir(run_dir).read_metrics()
    except (OSError, ValueError):
        return None
