"""A tuning study's results as data (trials.csv, curves.csv, seeds.csv) and as a report (report.md, figures/).

Never imports Ray. Every number in report.md comes from the three CSV files and study.json, so `--report-only`
rebuilds it from the committed files alone.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from vpn_dist.observe import write_text_atomic
from vpn_dist.reproduce.grid import paper_numbers
from vpn_dist.reproduce.report import comparison_cells, difference_cell, save_report_figure
from vpn_dist.reproduce.stats import ALPHA, Comparison, compare, judge
from vpn_dist.study.spec import ARMS, Plan, Study, describe, shown_path

PARAM_COLUMNS = ("optimizer", "lr", "weight_decay", "gamma", "m", "bound", "C", "generator_init_std")
TRIAL_COLUMNS = ("arm", "trial", "seed", *PARAM_COLUMNS, "epochs", "val_acc", "val_acc_no_noise", "best_val_acc",
                 "status", "wall_time_s", "error", "params", "config_id")
CURVE_COLUMNS = ("arm", "trial", "epoch", "val_acc", "train_loss", "train_acc", "epoch_time_s")
SEED_COLUMNS = ("arm", "seed", "winner_trial", "test_acc", "test_acc_alg2", "test_acc_no_noise", "val_acc", "epochs",
                "status", "wall_time_s", "error", "config_id")
# A search trial with one of these statuses is final: never run again. `error` (the trial broke for a reason other
# than its parameters: a killed worker, a full disk) runs again on --resume.
SEARCH_FINAL = ("completed", "early-stopped", "diverged")
RERUN_FINAL = ("finished", "diverged")  # a winner that diverges at a fresh seed is a result, not a failure
BOOTSTRAP_RESAMPLES = 1000
SHOWN_BUDGETS = (1, 5, 10, 20, 40)
ARM_NAMES = {"baseline": "baseline", "vpn": "VPN"}  # as prose names them
# seeds.csv's groups: each arm's winner, and the control for hyperparameters (`rerun_trials`)
RERUNS = ("baseline", "vpn", "matched")


# ---------------------------------------------------------------- rows


def param_values(cfg, num_classes: int) -> dict[str, Any]:
    """trials.csv's parameter columns from a resolved config (VPN's are blank in the baseline arm)."""
    from vpn_dist.config import resolved_gamma

    values = {"optimizer": cfg.train.optimizer, "lr": cfg.train.lr, "weight_decay": cfg.train.weight_decay}
    if cfg.model.generator != "none":
        values |= {"gamma": resolved_gamma(cfg, num_classes), "m": cfg.vpn.m, "bound": cfg.vpn.bound, "C": cfg.vpn.C,
                   "generator_init_std": cfg.model.generator_init_std or "authors"}
    return values


def trial_row(arm: str, index: int, seed: int, params: dict[str, Any], values: dict[str, Any], cid: str,
              summary: dict[str, Any] | None, status: str, error: str | None = None) -> dict[str, Any]:
    summary = summary or {}
    evaluated = [h["val_acc"] for h in summary.get("history", []) if h.get("val_acc") is not None]
    return {"arm": arm, "trial": index, "seed": seed, **values, "epochs": summary.get("epochs_completed"),
            "val_acc": summary.get("val_acc"), "val_acc_no_noise": summary.get("val_acc_no_noise"),
            "best_val_acc": max(evaluated) if evaluated else None, "status": status,
            "wall_time_s": summary.get("wall_time_s"), "error": error, "params": json.dumps(params), "config_id": cid}


def curve_rows(arm: str, index: int, summary: dict[str, Any] | None) -> list[dict[str, Any]]:
    return [{"arm": arm, "trial": index, **{k: epoch.get(k) for k in CURVE_COLUMNS[2:]}}
            for epoch in (summary or {}).get("history", [])]


def seed_row(arm: str, seed: int, winner: int, cid: str, summary: dict[str, Any] | None, status: str,
             error: str | None = None) -> dict[str, Any]:
    summary = summary or {}
    alg2, plain = summary.get("test_acc_alg2"), summary.get("test_acc_no_noise")
    return {"arm": arm, "seed": seed, "winner_trial": winner, "test_acc": alg2 if arm == "vpn" else plain,
            "test_acc_alg2": alg2, "test_acc_no_noise": plain, "val_acc": summary.get("val_acc"),
            "epochs": summary.get("epochs_completed"), "status": status, "wall_time_s": summary.get("wall_time_s"),
            "error": error, "config_id": cid}


def winners(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per arm: the completed trial (every epoch run) with the highest validation accuracy; the lower trial number
    on a tie. Only validation accuracy is read."""
    best: dict[str, dict[str, Any]] = {}
    for row in sorted(rows, key=lambda r: r["trial"]):
        if row["status"] == "completed" and row["val_acc"] is not None:
            if row["arm"] not in best or row["val_acc"] > best[row["arm"]]["val_acc"]:
                best[row["arm"]] = row
    return best


def rerun_trials(best: dict[str, dict[str, Any]]) -> dict[str, tuple[str, int]]:
    """What each re-run group trains: the (arm, trial) whose parameters it takes. Each arm's winner; and, where the
    VPN winner is another trial than the baseline's, `matched`: the baseline arm's trial with the VPN winner's
    number, that is the base alone at the VPN winner's optimizer, learning rate and weight decay (the axes the arms
    share). ASHA may have stopped that baseline trial early, so without it a VPN win could be the win of
    hyperparameters only the VPN arm ran to the end, not of the noise."""
    groups = {arm: (arm, row["trial"]) for arm, row in best.items()}
    if "vpn" in best and best["vpn"]["trial"] != best.get("baseline", {}).get("trial"):
        groups["matched"] = ("baseline", best["vpn"]["trial"])
    return groups


def selection_values(rows: list[dict[str, Any]], arm: str, num_classes: int) -> list[float]:
    """The validation accuracy each finished trial of `arm` ended with: a completed trial's on the whole val split,
    an early-stopped one's at the epoch ASHA stopped it; a diverged trial counts at chance (1/K), as what it left
    is no model. Errored and unfinished trials are not draws of the search and are left out."""
    values = []
    for row in rows:
        if row["arm"] != arm or row["status"] not in SEARCH_FINAL:
            continue
        values.append(1.0 / num_classes if row["status"] == "diverged" else row["val_acc"])
    return [v for v in values if v is not None]


# ---------------------------------------------------------------- expected best (Dodge et al. 2019)


def expected_best(values: list[float], n_max: int | None = None) -> np.ndarray:
    """E[max of n trials] for n = 1..n_max (default N): the expected best of n trials drawn with replacement from the
    N observed ones, sum_i v_(i) [(i/N)^n - ((i-1)/N)^n] over the sorted values v_(1) <= ... <= v_(N)."""
    v = np.sort(np.asarray(values, dtype=float))
    big_n = len(v)
    i = np.arange(1, big_n + 1)
    n = np.arange(1, (n_max or big_n) + 1)[:, None]
    return ((i / big_n) ** n - ((i - 1) / big_n) ** n) @ v


def bootstrap_expected_best(values: list[float], n_max: int | None = None, resamples: int = BOOTSTRAP_RESAMPLES,
                            seed: int = 0) -> np.ndarray:
    """expected_best of each of `resamples` bootstrap resamples of the N trials (drawn with replacement), one row each."""
    values = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    return np.stack([expected_best(rng.choice(values, size=len(values)), n_max) for _ in range(resamples)])


def expected_best_band(values: list[float], n_max: int | None = None, resamples: int = BOOTSTRAP_RESAMPLES,
                       level: float = 0.95, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A percentile bootstrap band for expected_best: its (1 - level)/2 and (1 + level)/2 quantiles at every n over
    the bootstrap resamples."""
    curves = bootstrap_expected_best(values, n_max, resamples, seed)
    return np.quantile(curves, (1 - level) / 2, axis=0), np.quantile(curves, (1 + level) / 2, axis=0)


# ---------------------------------------------------------------- the report


def write_report(out: Path, study: Study, plan: Plan, rows: list[dict[str, Any]], curves: list[dict[str, Any]],
                 seed_rows: list[dict[str, Any]]) -> None:
    base = plan.base
    finished = {arm: [r for r in rows if r["arm"] == arm and r["status"] in SEARCH_FINAL] for arm in ARMS}
    lines = [f"# Does tuning rescue VPN? {plan.data_label}, {base} base", "",
             f"Command: `{plan.command(out, study.trials)}` (DATA: where `vpn-dist prep` wrote the data set, with a "
             f"val split); it continues with `--resume` and rewrites this report with `--report-only`.", "",
             study.description, ""]
    status = ", ".join(f"{arm} {len(finished[arm])} of {plan.trials} trials finished" for arm in ARMS)
    groups = rerun_trials(winners(rows))
    reruns = sum(r["status"] == "finished" for r in seed_rows)
    lines += [f"Status: {status}; {reruns} of {max(len(groups), 2) * len(study.rerun_seeds)} re-runs finished.", ""]

    comparisons = _seed_comparisons(plan, seed_rows, groups)
    lines += _verdict_section(comparisons, groups, study, plan, rows, curves)
    lines += _budget_section(study, plan, rows, seed_rows)
    lines += _spaces_section(study)
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    lines += _expected_best_section(figures, rows, plan)
    lines += _winners_section(rows)
    lines += _rungs_section(study, plan, rows, curves)
    lines += _same_trial_section(rows)
    lines += _seeds_section(study, seed_rows, comparisons, groups)
    if finished["vpn"]:
        draw_sensitivity(figures / "sensitivity.png", rows, plan)
        lines += ["## Sensitivity of the VPN arm", "",
                  "![sensitivity](figures/sensitivity.png)", "",
                  "Each point is a finished VPN trial's final validation accuracy (hollow: stopped early by ASHA, so "
                  "at fewer epochs); the dashed line is the baseline arm's best. γ = 0 sits at the left edge of its "
                  "panel, bound `none` at the right edge of C's.", ""]
    lines += ["## Files", "",
              "- `trials.csv`: every search trial of both arms: arm, trial number, seed, parameters (`params`: the "
              "drawn axis values as JSON), epochs reached, final and best validation accuracy, status, wall time "
              "(training + evaluation, seconds), the config id (its run directory's suffix).",
              "- `curves.csv`: per-epoch validation accuracy and training loss of every search trial (what ASHA's "
              "rungs are replayed from on --resume).",
              "- `seeds.csv`: the re-runs, one row per group (`baseline`, `vpn`: each arm's winner; `matched`: the "
              "baseline at the VPN winner's hyperparameters) and seed (test accuracy by the group's rule: Algorithm 2 "
              "for VPN, no noise for the others; both recorded).",
              "- `study.json`: the command's settings (spec, data, trials per arm).",
              f"- TensorBoard (HParams tab, both arms): `tensorboard --logdir {shown_path(out)}/runs/search`, "
              f"where the run directories are (not committed).", ""]
    write_text_atomic(out / "report.md", "\n".join(lines))


def _seed_comparisons(plan: Plan, seed_rows: list[dict[str, Any]],
                      groups: dict[str, tuple[str, int]]) -> list[tuple[str, str, Comparison]]:
    """The VPN winner against the baseline winner, paired by seed, by Algorithm 2 and with no noise, and (where there
    is one) by Algorithm 2 against the matched baseline (test accuracy in %), each with the paper's claimed gain for
    this data set and base (the paper compares VPN and the baseline at the same settings); Holm across them. Each
    as (the row's name, the group VPN is compared with, the comparison)."""
    done = [r for r in seed_rows if r["status"] == "finished"]

    def accuracies(group: str, key: str) -> dict[int, float]:
        return {r["seed"]: 100 * r[key] for r in done if r["arm"] == group and r[key] is not None}

    pairs = [("Algorithm 2", "test_acc_alg2", "baseline", "dnn3"),
             ("no noise", "test_acc_no_noise", "baseline", "dnn3 (no noise)")]
    if "matched" in groups:
        pairs.append(("Algorithm 2 − matched baseline", "test_acc_alg2", "matched", "dnn3"))
    found = [compare(accuracies("vpn", key), accuracies(against, "test_acc_no_noise"), _paper_gain(plan, paper_row))
             for _, key, against, paper_row in pairs]
    return [(rule, against, c) for (rule, _, against, _), c in zip(pairs, judge(found))]


def _paper_gain(plan: Plan, paper_row: str) -> float | None:
    """The paper's Table 1 row (a DNN3 generator: "dnn3" by Algorithm 2, "dnn3 (no noise)") minus its baseline for
    this data set and base, in points; None where the paper has no such cell."""
    paper = paper_numbers()
    paper_vpn = paper.get((1, plan.data_label, plan.base, paper_row))
    paper_base = paper.get((1, plan.data_label, plan.base, "baseline"))
    return paper_vpn - paper_base if paper_vpn is not None and paper_base is not None else None


def _which_is_better(c: Comparison, against: str = "baseline") -> str:
    """The study's own question, read from the two-sided paired test after Holm."""
    if c.p_holm is None:
        return "too few paired seeds"
    if c.p_holm >= ALPHA:
        return "no difference shown"
    if c.mean > 0:
        return "the tuned VPN is better"
    return "the tuned baseline is better" if against == "baseline" else "the matched baseline is better"


def _verdict_section(comparisons, groups: dict[str, tuple[str, int]], study: Study, plan: Plan,
                     rows: list[dict[str, Any]], curves: list[dict[str, Any]]) -> list[str]:
    lines = ["## Verdict", ""]
    _, _, alg2 = comparisons[0]
    if alg2.n < 2:
        lines += ["Not yet: the winners' re-runs have not finished (the verdict needs at least 2 paired seeds).", ""]
        return lines
    claim = ("" if alg2.verdict is None else f" Against the paper's claimed gain ({alg2.claimed_gain:+.2f}): "
             f"**{alg2.verdict}**.")
    lines += [f"With the same budget ({plan.trials} trials per arm, the same ASHA schedule, searcher, data, precision "
              f"and seeds), the VPN arm's winner minus the baseline arm's winner on the test split, over "
              f"{alg2.n} fresh seeds: **{alg2.mean:+.2f} points** (Algorithm 2; {_interval(alg2)}): "
              f"{_which_is_better(alg2)}.{claim}", ""]
    if "matched" not in groups:
        trial = groups["vpn"][1]
        lines += [f"Both winners are trial {trial}: the same optimizer, learning rate and weight decay, so the "
                  f"comparison is already one at matched hyperparameters.", ""]
        return lines
    _, _, matched = comparisons[-1]
    trial = groups["matched"][1]
    ended = _how_the_search_ended(study, rows, curves, trial)
    control = (f"The control for hyperparameters: the base alone at the VPN winner's optimizer, learning rate and "
               f"weight decay (the baseline arm's trial {trial}{ended}), re-run with the same seeds")
    if matched.n < 2:
        lines += [control + ": not yet run.", ""]
        return lines
    if matched.p_holm is None or matched.p_holm >= ALPHA:
        reading = "no difference shown, so the winners' gap may come from the hyperparameters, not from the noise"
    elif matched.mean > 0:
        reading = "the VPN winner beats it too, so its gain is not its hyperparameters' alone"
    else:
        reading = "the matched baseline is better: the noise costs accuracy at these hyperparameters"
    lines += [f"{control}: VPN − matched baseline **{matched.mean:+.2f} points** ({_interval(matched)}): {reading}.",
              ""]
    return lines


def _how_the_search_ended(study: Study, rows: list[dict[str, Any]], curves: list[dict[str, Any]], trial: int) -> str:
    """How the baseline arm's trial `trial` ended in the search, as a clause: why its winner was another trial."""
    row = next((r for r in rows if r["arm"] == "baseline" and r["trial"] == trial), None)
    if row is None or row["status"] not in SEARCH_FINAL:
        return ", not finished in the search"
    if row["status"] == "diverged":
        return ", which diverged in the search"
    val = f"validation accuracy {100 * row['val_acc']:.2f}" if row["val_acc"] is not None else "no validation accuracy"
    if row["status"] == "early-stopped":
        ended = f", which ASHA stopped at epoch {row['epochs']} with {val}"
        images, judged = subset_images(study), rung_accuracies(rows, curves, "baseline", row["epochs"])
        if images and judged and row["val_acc"] is not None:
            best = max(judged.values())
            gap = best - row["val_acc"]
            ended += (f", {100 * gap:.2f} points ({gap / subset_error(best, images):.1f} standard errors) behind the "
                      f"best trial there")
        return ended
    return f", which completed the search with {val}"


def _interval(c: Comparison) -> str:
    return "the same on every seed" if c.ci is None else f"95% CI [{c.ci[0]:+.2f}, {c.ci[1]:+.2f}]"


def _budget_section(study: Study, plan: Plan, rows: list[dict[str, Any]], seed_rows: list[dict[str, Any]]) -> list[str]:
    epochs = plan.epochs
    lines = ["## Budget", "",
             f"Each arm: {plan.trials} trials drawn by the same seeded random searcher (search seed "
             f"{study.search_seed}; trial i of both arms has the same optimizer, learning rate, weight decay and "
             f"seed {study.trial_seed} + i), ASHA on validation accuracy per epoch (grace period "
             f"{study.grace_period} epoch{'s' if study.grace_period > 1 else ''}, reduction factor "
             f"{study.reduction_factor}, at most {epochs} epochs), selection on the "
             f"validation split only (the final epoch's accuracy on the whole val split; test accuracy is never "
             f"read for a choice).", "",
             "| arm | trials finished | completed | stopped by ASHA | diverged | errored | epochs trained | "
             "trial-hours |", "|---|---|---|---|---|---|---|---|"]
    for arm in ARMS:
        mine = [r for r in rows if r["arm"] == arm]
        count = {s: sum(r["status"] == s for r in mine) for s in ("completed", "early-stopped", "diverged", "error")}
        hours = sum(r["wall_time_s"] or 0 for r in mine) / 3600
        trained = sum(r["epochs"] or 0 for r in mine)
        lines.append(f"| {arm} | {sum(count[s] for s in SEARCH_FINAL)} of {plan.trials} | {count['completed']} | "
                     f"{count['early-stopped']} | {count['diverged']} | {count['error']} | {trained} | {hours:.2f} |")
    search_hours = sum(r["wall_time_s"] or 0 for r in rows) / 3600
    rerun_hours = sum(r["wall_time_s"] or 0 for r in seed_rows) / 3600
    amp = study.fixed.get("train.amp", "auto")
    lines += ["", f"Cost: {search_hours:.2f} trial-hours of search and {rerun_hours:.2f} of re-runs (the sum of every "
                  f"trial's training and evaluation time on one CPU or GPU share each; Ray's start-up not counted).",
              "", f"Precision: `train.amp={amp}` in both arms. "
              + ("fp32, on purpose: `auto` resolves per machine (bf16 on GPUs, and on CPUs where a probe finds it "
                 "faster), so a study resumed on another machine could mix precisions between trials; and bf16 rounds "
                 "x + ε to about 3 significant digits, so noise below ~1e-3 of the pixel range vanishes in the "
                 "base's input, which would silence exactly the VPN arm's small-σ trials (the authors' init starts "
                 "σ near 0)." if amp == "off" else
                 "Under bf16, x + ε is rounded to about 3 significant digits, so noise below ~1e-3 of the pixel range "
                 "vanishes in the base's input: the VPN arm's small-σ trials are affected."), ""]
    return lines


def _spaces_section(study: Study) -> list[str]:
    axes = list(dict.fromkeys(k for arm in ARMS for k in study.arms[arm].axes))
    lines = ["## Search spaces", "", "| axis | baseline | vpn |", "|---|---|---|"]
    for key in axes:
        # a | inside a table cell must be escaped, even within code
        shown = [f"`{describe(study.arms[arm].axes[key])}`".replace("|", "\\|") if key in study.arms[arm].axes
                 else "—" for arm in ARMS]
        lines.append(f"| `{key}` | {' | '.join(shown)} |")
    lines += ["", "`optimizer`: the authors' SGD (momentum 0.9, cosine over the epochs) or their Adam switch "
                  "(constant lr). `vpn.gamma_scale`: γ in units of the paper's 0.01/K. `vpn.bound_C`: the bound and "
                  "its C. `model.generator_init_std`: null is the authors' N(0, 0.002²), `pytorch` PyTorch's default "
                  "init. A choice picks each listed value equally often (a value listed k times: k/n of the trials).",
              ""]
    fixed = {**study.fixed}
    lines.append("Fixed in both arms: " + ", ".join(f"`{k}={describe(v)}`" for k, v in fixed.items()) + ".")
    for arm in ARMS:
        lines.append(f"Fixed in the {arm} arm: " + ", ".join(f"`{k}={describe(v)}`"
                                                             for k, v in study.arms[arm].fixed.items()) + ".")
    return lines + [""]


def _expected_best_section(figures: Path, rows: list[dict[str, Any]], plan: Plan) -> list[str]:
    values = {arm: selection_values(rows, arm, plan.num_classes) for arm in ARMS}
    if not all(values.values()):
        return ["## Expected best validation accuracy", "", "Not yet: an arm has no finished trial.", ""]
    curves = {arm: expected_best(values[arm]) for arm in ARMS}
    bands = {arm: expected_best_band(values[arm]) for arm in ARMS}
    hours = {arm: hours_per_trial(rows, arm) for arm in ARMS}
    draw_expected_best(figures / "expected_best.png", curves, bands, hours)
    most = max(len(v) for v in values.values())
    budgets = sorted({n for n in SHOWN_BUDGETS if n < most} | {most})
    lines = ["## Expected best validation accuracy against the number of trials", "",
             "![expected best](figures/expected_best.png)", "",
             "Dodge et al. (2019): the expected best validation accuracy of n trials drawn from the N observed, "
             "Σᵢ v₍ᵢ₎ [(i/N)ⁿ − ((i−1)/N)ⁿ], with a 95% percentile bootstrap band (the N trials "
             "resampled "
             f"{BOOTSTRAP_RESAMPLES} times). A trial enters with the validation accuracy it ended with (ASHA's stopped "
             "ones at their last epoch), a diverged one at chance (1/K).", "",
             "| arm | N | " + " | ".join(f"n = {n}" for n in budgets) + " |", "|---|---|" + "---|" * len(budgets)]
    for arm in ARMS:
        curve, (low, high) = curves[arm], bands[arm]
        cells = [f"{100 * curve[n - 1]:.2f} [{100 * low[n - 1]:.2f}, {100 * high[n - 1]:.2f}]" if n <= len(curve)
                 else "" for n in budgets]
        lines.append(f"| {arm} | {len(values[arm])} | " + " | ".join(cells) + " |")
    common = min(len(c) for c in curves.values())
    ahead = [n for n in range(1, common + 1) if curves["vpn"][n - 1] > curves["baseline"][n - 1]]
    lines += ["", "Expected best in %, [95% bootstrap band]. " + (
        f"The VPN arm's expected best is above the baseline's at {len(ahead)} of the budgets 1..{common} "
        f"({_ranges(ahead)})." if ahead else f"The VPN arm's expected best is below the baseline's at every budget "
                                             f"1..{common}."), ""]
    return (lines + _more_trials_lines(curves, _paper_gain(plan, "dnn3"), plan.trials)
            + _same_compute_lines(values, curves, hours))


def doubling_gains(curve: np.ndarray, n: int) -> list[float]:
    """How much the expected best rose over each doubling of the budget that ends at n: [E[n] - E[n/2],
    E[n/2] - E[n/4], ...] while the smaller budget is at least 1 (integer halves)."""
    gains = []
    while n >= 2:
        gains.append(float(curve[n - 1] - curve[n // 2 - 1]))
        n //= 2
    return gains


def _more_trials_lines(curves: dict[str, np.ndarray], claimed: float | None, budget: int) -> list[str]:
    """Would more trials change the answer? Each doubling of the budget adds less to the expected best than the one
    before it as the curve flattens, so one more doubling is bounded by the last one: the trailing arm gains at most
    that, the leading arm at least nothing."""
    n = min(len(c) for c in curves.values())
    if n < 2:
        return []
    gains = {arm: [100 * g for g in doubling_gains(curves[arm], n)] for arm in ARMS}
    gap = 100 * (curves["vpn"][n - 1] - curves["baseline"][n - 1])
    trailing = "baseline" if gap > 0 else "vpn"
    text = (f"**More trials?** The last doubling of the budget ({n // 2} → {n} trials) raised the expected best by "
            f"{gains['baseline'][0]:+.2f} points (baseline) and {gains['vpn'][0]:+.2f} (VPN)")
    text += (f", after {gains['baseline'][1]:+.2f} and {gains['vpn'][1]:+.2f} over the doubling before it. "
             if n >= 4 else ". ")
    ranking_open = gains[trailing][0] >= abs(gap)
    text += (f"The arms are {abs(gap):.2f} points apart at {n} trials, " + (
        f"within what the trailing {ARM_NAMES[trailing]} arm's last doubling added: the ranking on validation could "
        f"change with more trials." if ranking_open else
        f"more than the trailing {ARM_NAMES[trailing]} arm's last doubling added: if the next adds no more, the "
        f"ranking on validation holds."))
    if n < budget:
        return [text + f" (The search has not reached its {budget} trials per arm yet.)", ""]
    open_questions = ["the ranking holds"] if ranking_open else []
    if claimed is not None:
        reach = gap + gains["vpn"][0]
        text += (f" Another doubling that gives VPN its last gain and the baseline none puts VPN − baseline at "
                 f"{reach:+.2f} points on validation, {'short of' if reach < claimed else 'reaching'} the paper's "
                 f"{claimed:+.2f}.")
        if reach >= claimed:
            open_questions.append("VPN reaches the paper's gain")
    text += (f" Whether {' and '.join(open_questions)} needs more trials (`--resume --trials {2 * n}`)."
             if open_questions else " More trials would not change the answer.")
    return [text, ""]


def hours_per_trial(rows: list[dict[str, Any]], arm: str) -> float | None:
    """An arm's mean trial cost in this search (trial-hours, ASHA's stops included): what one more draw costs."""
    times = [r["wall_time_s"] for r in rows if r["arm"] == arm and r["status"] in SEARCH_FINAL
             and r["wall_time_s"] is not None]
    return sum(times) / len(times) / 3600 if times else None


def same_compute_budgets(hours: dict[str, float | None], n_vpn: int, n_baseline: int) -> list[tuple[int, int]]:
    """(n, k): the most baseline trials, k, that cost no more than n VPN trials, for every n where the search ran
    at least k baseline trials."""
    if not hours["vpn"] or not hours["baseline"]:
        return []
    ratio = hours["vpn"] / hours["baseline"]
    pairs = [(n, math.floor(n * ratio + 1e-9)) for n in range(1, n_vpn + 1)]
    return [(n, k) for n, k in pairs if 1 <= k <= n_baseline]


def _same_compute_lines(values: dict[str, list[float]], curves: dict[str, np.ndarray],
                        hours: dict[str, float | None]) -> list[str]:
    """Dodge et al.'s other budget: compute. A VPN trial costs more than a baseline one (m samples per image, the
    generator), so the same hours buy the baseline more draws."""
    pairs = same_compute_budgets(hours, len(curves["vpn"]), len(curves["baseline"]))
    if not pairs:
        return []
    shown = sorted({(n, k) for n, k in pairs if n in SHOWN_BUDGETS} | {pairs[-1]})
    lines = [f"**The same compute.** A trial cost {hours['vpn']:.3f} trial-hours on average in the VPN arm and "
             f"{hours['baseline']:.3f} in the baseline arm ({hours['vpn'] / hours['baseline']:.1f}×), so what n VPN "
             f"trials cost buys the baseline more of them: k, the most that cost no more (up to the "
             f"{len(curves['baseline'])} the search ran). Expected best validation accuracy in %:", "",
             "| VPN trials (n) | trial-hours | baseline trials (k) | VPN, n trials | baseline, k trials | "
             "VPN − baseline [95% bootstrap] |", "|---|---|---|---|---|---|"]
    # each arm resampled on its own (its own seed): the two searches are independent samples of trials
    resampled = {arm: bootstrap_expected_best(values[arm], seed=seed) for seed, arm in enumerate(ARMS)}
    for n, k in shown:
        vpn, baseline = 100 * curves["vpn"][n - 1], 100 * curves["baseline"][k - 1]
        low, high = 100 * np.quantile(resampled["vpn"][:, n - 1] - resampled["baseline"][:, k - 1], (0.025, 0.975))
        lines.append(f"| {n} | {n * hours['vpn']:.2f} | {k} | {vpn:.2f} | {baseline:.2f} | {vpn - baseline:+.2f} "
                     f"[{low:+.2f}, {high:+.2f}] |")
    ahead = sum(curves["vpn"][n - 1] > curves["baseline"][k - 1] for n, k in pairs)
    return lines + ["", f"At the same compute the VPN arm's expected best is above the baseline's at {ahead} of the "
                        f"{len(pairs)} budgets n = 1..{pairs[-1][0]} (beyond, the baseline arm would need more trials "
                        f"than it ran).", ""]


def _ranges(numbers: list[int]) -> str:
    parts, start = [], None
    for i, n in enumerate(numbers):
        if start is None:
            start = n
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            parts.append(f"n = {start}" if start == n else f"n = {start}..{n}")
            start = None
    return ", ".join(parts)


def _winners_section(rows: list[dict[str, Any]]) -> list[str]:
    best = winners(rows)
    lines = ["## Winners (by validation accuracy)", "", "| arm | trial | seed | val acc | parameters |",
             "|---|---|---|---|---|"]
    for arm in ARMS:
        row = best.get(arm)
        if row is None:
            lines.append(f"| {arm} | (no completed trial yet) | | | |")
            continue
        lines.append(f"| {arm} | {row['trial']} | {row['seed']} | {100 * row['val_acc']:.2f} | "
                     f"{format_params(row)} |")
    return lines + [""]


def asha_rungs(grace_period: int, reduction_factor: int, max_epochs: int) -> list[int]:
    """The epochs at which ASHA (one bracket, as Ray's ASHAScheduler) compares trials and stops the worse ones."""
    rungs, epoch = [], grace_period
    while epoch < max_epochs:
        rungs.append(epoch)
        epoch *= reduction_factor
    return rungs


def subset_images(study: Study) -> int | None:
    """The size of the per-epoch validation subset ASHA judges on, where the spec fixes it (0 or null: the machine's
    or the data's choice, unknown to the report)."""
    images = study.fixed.get("train.epoch_eval_images")
    return images if isinstance(images, int) and images > 0 else None


def subset_error(accuracy: float, images: int) -> float:
    """The binomial standard error of an accuracy measured on `images` images."""
    return math.sqrt(accuracy * (1 - accuracy) / images)


def rung_accuracies(rows: list[dict[str, Any]], curves: list[dict[str, Any]], arm: str, epoch: int) -> dict[int, float]:
    """Each finished trial of `arm` that reached `epoch`: its per-epoch validation accuracy there, what ASHA judged."""
    finished = {r["trial"] for r in rows if r["arm"] == arm and r["status"] in SEARCH_FINAL}
    return {p["trial"]: p["val_acc"] for p in curves
            if p["arm"] == arm and p["epoch"] == epoch and p["trial"] in finished}


def _rungs_section(study: Study, plan: Plan, rows: list[dict[str, Any]], curves: list[dict[str, Any]]) -> list[str]:
    """How many trials each rung had to tell apart within the sampling error of the accuracy it judged them on: where
    the leaders are that close, which of them went on is partly luck, and a winner's edge over a stopped trial may be
    the rung's rather than the method's."""
    images = subset_images(study)
    rungs = asha_rungs(min(study.grace_period, plan.epochs), study.reduction_factor, plan.epochs)
    if not rungs or images is None:
        return []
    stopped = {(r["arm"], r["trial"], r["epochs"]) for r in rows if r["status"] == "early-stopped"}
    table = []
    for arm in ARMS:
        for rung in rungs:
            judged = rung_accuracies(rows, curves, arm, rung)
            if not judged:
                continue
            best = max(judged.values())
            error = subset_error(best, images)
            cells = []
            for k in (1, 2):
                close = [n for n, value in judged.items() if value >= best - k * error]
                cells.append(f"{len(close)} ({sum((arm, n, rung) in stopped for n in close)})")
            table.append(f"| {arm} | {rung} | {len(judged)} | {100 * best:.2f} | {100 * error:.2f} | "
                         + " | ".join(cells) + " |")
    if not table:
        return []
    return ["## How finely ASHA's rungs could rank", "",
            f"ASHA compared trials at epochs {', '.join(map(str, rungs))} on the validation accuracy of a fixed "
            f"{images}-image subset of the val split (`train.epoch_eval_images`). Its standard error at the rung's "
            f"best accuracy p is √(p(1 − p)/{images}), the binomial error of one trial's estimate (two trials "
            "judged on the same images differ by less noise than two independent estimates, but not by none). Trials "
            "within one standard error of the best were not told apart by the measurement, those within two only "
            "weakly: which of them went on was partly the luck of the subset, of the epoch and of the order they "
            "arrived in (ASHA judges a trial against those that reached the rung before it).", "",
            "| arm | rung (epoch) | trials judged | best | standard error | within 1 SE of the best (stopped there) | "
            "within 2 SE (stopped there) |", "|---|---|---|---|---|---|---|", *table, ""]


def _same_trial_section(rows: list[dict[str, Any]]) -> list[str]:
    """Every trial number that completed in both arms: the same optimizer, learning rate, weight decay and seed, VPN
    adding its own axes, so VPN − baseline on validation at many shared settings rather than at the one the winners
    happen to differ in."""
    done = {(r["arm"], r["trial"]): r for r in rows if r["status"] == "completed" and r["val_acc"] is not None}
    both = sorted(n for arm, n in done if arm == "vpn" and ("baseline", n) in done)
    lines = ["## VPN against the baseline at the same hyperparameters (validation)", ""]
    if not both:
        return lines + ["No trial number completed in both arms yet.", ""]
    lines += ["Trial i of both arms shares its optimizer, learning rate, weight decay and seed, so each trial number "
              "that both arms ran to the end compares VPN (with its own γ, m, bound and init) and the base alone at "
              "the same settings. Validation accuracy in %; a description, not one of the report's tests: ASHA let "
              "through only trials that did well in their own arm.", "",
              "| trial | shared | baseline | VPN | VPN's own axes | Δ |", "|---|---|---|---|---|---|"]
    for n in both:
        b, v = done[("baseline", n)], done[("vpn", n)]
        own = format_params(v).removeprefix(format_params(b)).strip()
        lines.append(f"| {n} | {format_params(b)} | {100 * b['val_acc']:.2f} | {100 * v['val_acc']:.2f} | {own} | "
                     f"{100 * (v['val_acc'] - b['val_acc']):+.2f} |")
    c = compare({n: 100 * done[("vpn", n)]["val_acc"] for n in both},
                {n: 100 * done[("baseline", n)]["val_acc"] for n in both})
    return lines + ["", f"VPN − baseline over these trials: {difference_cell(c)} (the mean, its 95% t interval and n)."
                    if c.n else "", ""]


def _seeds_section(study: Study, seed_rows: list[dict[str, Any]], comparisons,
                   groups: dict[str, tuple[str, int]]) -> list[str]:
    done = {(r["arm"], r["seed"]): r for r in seed_rows if r["status"] == "finished"}
    status = {(r["arm"], r["seed"]): r["status"] for r in seed_rows}
    matched = "matched" in groups
    lines = [f"## The winners on the test split, {len(study.rerun_seeds)} fresh seeds", "",
             "Each arm's winner trained again at full epochs with seeds no search trial used; the same seed in both "
             "arms means the same initial base weights and data order (test accuracy in %)."
             + (f" The matched baseline: the base alone at the VPN winner's optimizer, learning rate and weight decay "
                f"(the baseline arm's trial {groups['matched'][1]}), with the same seeds." if matched else ""), "",
             "| seed | baseline | " + ("matched baseline | " if matched else "") + "VPN (Algorithm 2) | VPN (no noise) "
             "| Δ Algorithm 2 | Δ no noise |" + (" Δ Algorithm 2 − matched |" if matched else ""),
             "|---|---|---|---|---|---|" + ("---|---|" if matched else "")]
    for seed in study.rerun_seeds:
        b, v, c = done.get(("baseline", seed)), done.get(("vpn", seed)), done.get(("matched", seed))
        cells = [_pct(b and b["test_acc_no_noise"]) or status.get(("baseline", seed), "")]
        if matched:
            cells.append(_pct(c and c["test_acc_no_noise"]) or status.get(("matched", seed), ""))
        cells += [_pct(v and v["test_acc_alg2"]) or status.get(("vpn", seed), ""), _pct(v and v["test_acc_no_noise"])]
        cells += [f"{100 * (v[k] - b['test_acc_no_noise']):+.2f}" if b and v else ""
                  for k in ("test_acc_alg2", "test_acc_no_noise")]
        if matched:
            cells.append(f"{100 * (v['test_acc_alg2'] - c['test_acc_no_noise']):+.2f}" if c and v else "")
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    lines += ["", "| VPN − baseline | Δ [95% CI] (n) | p (Holm) | which is better | the paper's gain | "
                  "p_excl (Holm) | MDE | verdict on the paper's gain |", "|---|---|---|---|---|---|---|---|"]
    for rule, against, c in comparisons:
        if c.n == 0:
            lines.append(f"| {rule} | (no paired seeds yet) | | | | | | |")
            continue
        cells = comparison_cells(c, no_gain="—")
        cells.insert(2, _which_is_better(c, against))
        lines.append(f"| {rule} | " + " | ".join(cells) + " |")
    lines += ["", "Paired by seed, in accuracy points (`vpn_dist/reproduce/stats.py`, as every reproduction report): "
                  f"the t interval of the mean difference; p, the two-sided paired t-test, Holm-adjusted over this "
                  f"table's {len(comparisons)} tests; the paper's gain, its Table 1 row minus its baseline for this "
                  "data set and base (— where the paper has no such cell); p_excl, the one-sided test of \"our gain ≥ "
                  "the paper's\", Holm-adjusted; MDE, the smallest true difference these seeds detect with 80% power; "
                  "the verdict: excluded, reproduced or inconclusive (docs/reproduction.md).", ""]
    return lines


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.2f}"


def format_params(row: dict[str, Any]) -> str:
    """A trial's parameters in one short line: `sgd lr 3.2e-03 wd 5e-04 γ 1e-03 m 4 norm C 12.3 init pytorch`."""
    parts = [str(row["optimizer"]), f"lr {row['lr']:.2g}", f"wd {row['weight_decay']:.2g}"]
    if row.get("m") is not None:
        bound = row["bound"] if row["C"] is None else f"{row['bound']} C {row['C']:.3g}"
        init = row["generator_init_std"]
        parts += [f"γ {row['gamma']:.2g}", f"m {row['m']}", bound,
                  f"init {init:.2g}" if isinstance(init, float) else f"init {init}"]
    return " ".join(parts)


# ---------------------------------------------------------------- figures


def draw_expected_best(path: Path, curves: dict[str, np.ndarray], bands: dict[str, tuple[np.ndarray, np.ndarray]],
                       hours: dict[str, float | None]) -> None:
    """Expected best against the number of trials and, where the trials' costs are known, against trial-hours."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_hours = all(hours.values())
    fig, axes = plt.subplots(1, 2 if by_hours else 1, figsize=(12, 4.2) if by_hours else (6.5, 4.2), squeeze=False)
    most = max(len(c) for c in curves.values())
    for panel, ax in enumerate(axes[0]):
        for arm, color in zip(ARMS, ("C0", "C3")):
            curve, (low, high) = curves[arm], bands[arm]
            n = np.arange(1, len(curve) + 1) * (hours[arm] if panel else 1)
            ax.plot(n, 100 * curve, color=color, label=f"{arm} ({len(curve)} trials)")
            ax.fill_between(n, 100 * low, 100 * high, color=color, alpha=0.2)
        ax.set_ylabel("expected best validation accuracy (%)")
        ax.set_xscale("log")
        if panel:
            ax.set_xlabel("trial-hours (n × the arm's mean trial cost)")
            ax.set_title("The same, against compute")
        else:
            ax.set_xlabel("trials (budget n)")
            ax.set_xticks([n for n in (1, 2, 3, 5, 10, 20, 40, 80, 160) if n < most] + [most])
            ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.set_title("Expected best of n trials, 95% bootstrap band")
        ax.legend(loc="lower right")
    fig.tight_layout()
    save_report_figure(fig, path)
    plt.close(fig)


def _log_ticks(ax, values: list[float], special: tuple[float, str] | None) -> None:
    """A log x axis with a tick per decade the values span (their own ends when they span less), and the special
    position (γ = 0, bound none) with its label."""
    low, high = min(values), max(values)
    ticks = [10.0 ** k for k in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
             if low / 1.5 <= 10.0 ** k <= high * 1.5]
    if len(ticks) < 2:
        ticks = sorted({float(f"{low:.2g}"), float(f"{high:.2g}")})
    labels = [f"{t:g}" for t in ticks]
    if special is not None:
        ticks.append(special[0])
        labels.append(special[1])
    ax.set_xscale("log")
    ax.set_xticks(ticks, labels)


def draw_sensitivity(path: Path, rows: list[dict[str, Any]], plan: Plan) -> None:
    """The VPN arm's final validation accuracy against γ, m, C and lr; the baseline arm's best as a line. γ = 0 gets
    a tick left of the smallest γ, bound `none` (no C) one right of the largest C: a log axis has no place for them."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vpn = [r for r in rows if r["arm"] == "vpn" and r["status"] in ("completed", "early-stopped")
           and r["val_acc"] is not None]
    baseline = [r["val_acc"] for r in rows if r["arm"] == "baseline" and r["status"] == "completed"
                and r["val_acc"] is not None]
    fig, axes = plt.subplots(1, 4, figsize=(17, 4), sharey=True)
    panels = (("gamma", "γ (conditioning)", "0", lambda x: x == 0, 0.1),
              ("m", "m (noise draws)", None, None, None),
              ("C", "C (bound: elementwise ○, norm △)", "none", lambda x: x is None, 10.0),
              ("lr", "learning rate", None, None, None))
    for ax, (key, title, special, is_special, offset) in zip(axes, panels):
        regular = [r[key] for r in vpn if not (is_special and is_special(r[key]))]
        special_at = None
        if special and regular:
            special_at = min(regular) * offset if offset < 1 else max(regular) * offset
        for row in vpn:
            x = special_at if is_special and is_special(row[key]) else row[key]
            color = "C0" if row["optimizer"] == "sgd" else "C1"
            ax.scatter([x], [100 * row["val_acc"]], marker="^" if row["bound"] == "norm" and key == "C" else "o",
                       s=28, facecolors=color if row["status"] == "completed" else "none", edgecolors=color)
        if baseline:
            ax.axhline(100 * max(baseline), color="k", linestyle="--", linewidth=1, label="baseline arm's best")
        if key == "m":
            ax.set_xscale("log", base=2)
            ax.set_xticks([1, 2, 4, 8], ["1", "2", "4", "8"])
            ax.set_xlim(0.7, 11)
        elif regular:
            _log_ticks(ax, regular, (special_at, special) if special_at is not None else None)
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_title(title)
    axes[0].set_ylabel("final validation accuracy (%)")
    axes[0].scatter([], [], color="C0", label="sgd")
    axes[0].scatter([], [], color="C1", label="adam")
    axes[0].legend(fontsize=8, loc="lower left")
    fig.suptitle("VPN arm: each finished trial (filled: all epochs; hollow: stopped early by ASHA)")
    fig.tight_layout()
    save_report_figure(fig, path)
    plt.close(fig)
