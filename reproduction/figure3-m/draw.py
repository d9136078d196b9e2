"""Figure 3, the effect of m (the noise draws per image in Algorithm 1): joint training of the DNN3 base with the DNN3
generator on Fashion-MNIST under the authors' Adam, at m = 1, 2, 4 and 8, each m against m = 1 on the same seeds.

    python reproduction/figure3-m/draw.py [M=GRID_DIR ...]

Default: 1=reproduction/fashion-mnist-adam and M=reproduction/fashion-mnist-adam-mM for M = 2, 4, 8 (the grids that
reproduction/run-all.sh runs). The paper (its Figure 3, a ResNet-18 base) claims that every m reaches a similar final
accuracy and that a larger m converges faster. Writes report.md (both claims tested, and what m costs) and figure3.png
here; every number is recomputed from the grids' runs.csv and curves.csv.
"""
from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
from scipy import stats

from vpn_dist.observe import save_figure, write_text_atomic
from vpn_dist.reproduce.grid import paper_numbers
from vpn_dist.reproduce.report import FINISHED, FULL_TEST, difference_cell, p_with_holm, read_csv, summary
from vpn_dist.reproduce.stats import ALPHA, POWER, Comparison, compare, holm, paired_differences

HERE = Path(__file__).resolve().parent
REPRODUCTION = HERE.parent
DEFAULT_GRIDS = {1: REPRODUCTION / "fashion-mnist-adam"} | {
    m: REPRODUCTION / f"fashion-mnist-adam-m{m}" for m in (2, 4, 8)}
DATA, BASE, GENERATOR = "fashion-mnist", "dnn3", "dnn3"
EARLY_EPOCHS = 10  # "faster convergence": the mean of the per-epoch test accuracy over these first epochs


def grid_m(folder: Path) -> int:
    """The m a grid trained with: its `--set vpn.m=M`, else the default 1."""
    settings = folder / "reproduce.json"
    if not settings.is_file():
        raise SystemExit(f"figure3: {settings} is missing: not a `vpn-dist reproduce` grid")
    overrides = json.loads(settings.read_text()).get("overrides") or []
    return int(next((o.split("=", 1)[1] for o in overrides if o.startswith("vpn.m=")), 1))


def load(m: int, folder: Path) -> dict:
    """A grid's finished Table 1 runs of the base: {"joint": {seed: row}, "baseline": {seed: row},
    "curves": {seed: [per-epoch points of the joint run]}}."""
    if grid_m(folder) != m:
        raise SystemExit(f"figure3: {folder} trained with m = {grid_m(folder)}, not the m = {m} it was given as")
    rows = [r for r in read_csv(folder / "runs.csv")
            if r["status"] == FINISHED and r["table"] == 1 and r["base"] == BASE]
    joint = {r["seed"]: r for r in rows if r["mode"] == "joint" and r["generator"] == GENERATOR}
    if not joint:
        raise SystemExit(f"figure3: {folder}/runs.csv has no finished {BASE} joint run with the {GENERATOR} generator")
    run_seed = {r["run_id"]: seed for seed, r in joint.items()}
    curves: dict[int, list] = {}
    for point in read_csv(folder / "curves.csv"):
        if point["run_id"] in run_seed:
            curves.setdefault(run_seed[point["run_id"]], []).append(point)
    return {"joint": joint, "curves": curves,
            "baseline": {r["seed"]: r for r in rows if r["mode"] == "baseline" and r["generator"] == "none"}}


def final_accuracy(grid: dict) -> dict[int, float]:
    """{seed: the last epoch's Algorithm 2 test accuracy on the whole test split, in %}."""
    return {seed: 100 * r["test_acc_alg2"] for seed, r in grid["joint"].items()}


def subset_curve(points: list[dict]) -> dict[int, float]:
    """{epoch: Algorithm 2 test accuracy in %} of the per-epoch points, which read one fixed test subset (the last
    epoch's whole-split point is left out: it reads other images)."""
    return {p["epoch"]: 100 * p["test_acc_alg2"] for p in points
            if p.get("eval_images") != FULL_TEST and p.get("test_acc_alg2") is not None}


def early_accuracy(grid: dict) -> dict[int, float]:
    """{seed: mean per-epoch subset test accuracy over epochs 1..EARLY_EPOCHS}: higher where a run converges faster."""
    found = {}
    for seed, points in grid["curves"].items():
        curve = subset_curve(points)
        if all(e in curve for e in range(1, EARLY_EPOCHS + 1)):
            found[seed] = float(np.mean([curve[e] for e in range(1, EARLY_EPOCHS + 1)]))
    return found


def paper_gain() -> float:
    """The gain the paper claims for VPN in this cell (Table 1: the row minus the baseline), in points: "similar"
    final accuracy is a difference smaller than the effect VPN itself is claimed to have."""
    paper = paper_numbers()
    return paper[(1, DATA, BASE, GENERATOR)] - paper[(1, DATA, BASE, "baseline")]


def equivalence_p(row: dict[int, float], reference: dict[int, float], margin: float) -> float | None:
    """TOST: the larger of the two one-sided paired t-tests of H0 "the difference is <= -margin" and H0 "it is >=
    +margin". Below ALPHA, the difference is within ±margin (the (1 - 2·ALPHA) interval lies inside it)."""
    d = paired_differences(row, reference)
    if len(d) < 2:
        return None
    if np.allclose(d, d[0]):  # no spread: no test, as in `compare`
        return 0.0 if np.allclose(d, 0) else None
    above = stats.ttest_1samp(d, -margin, alternative="greater").pvalue
    below = stats.ttest_1samp(d, margin, alternative="less").pvalue
    return float(max(above, below))


def seeds_for_equivalence(sd: float, margin: float, power: float = POWER) -> int | None:
    """The seeds a TOST against ±margin needs to call a truly equal m "similar" with this `power`, given the paired
    sd seen so far: the smallest n with (t(1 - ALPHA, n - 1) + t(1 - (1 - power) / 2, n - 1))·sd/√n <= margin (the
    usual sample size of an equivalence test at a true difference of 0; Julious, Statistics in Medicine 2004)."""
    if not sd > 0:
        return None
    n = 2
    while (stats.t.ppf(1 - ALPHA, n - 1) + stats.t.ppf(1 - (1 - power) / 2, n - 1)) * sd / np.sqrt(n) > margin:
        n += 1
    return n


def with_holm(comparisons: list[Comparison]) -> list[Comparison]:
    return [replace(c, p_holm=p) for c, p in zip(comparisons, holm([c.p for c in comparisons]))]


def final_verdict(difference: Comparison, p_equivalent_holm: float | None, margin: float) -> str:
    if p_equivalent_holm is not None and p_equivalent_holm < ALPHA:
        return f"similar (within ±{margin:.2f})"
    if difference.p_holm is not None and difference.p_holm < ALPHA:
        return "different"
    return "inconclusive"


def speed_verdict(difference: Comparison) -> str:
    if difference.p_holm is not None and difference.p_holm < ALPHA:
        return "faster" if difference.mean > 0 else "slower"
    return "no difference detected" if difference.p is not None else "-"


def report(grids: dict[int, dict], folders: dict[int, Path]) -> str:
    m1 = min(grids)
    others = [m for m in sorted(grids) if m != m1]
    final = {m: final_accuracy(g) for m, g in grids.items()}
    early = {m: early_accuracy(g) for m, g in grids.items()}
    final_diff = with_holm([compare(final[m], final[m1]) for m in others])
    margin = paper_gain()
    equivalent = [equivalence_p(final[m], final[m1], margin) for m in others]
    equivalent_holm = holm(equivalent)
    early_diff = with_holm([compare(early[m], early[m1]) for m in others])
    baseline = {seed: 100 * r["test_acc_no_noise"] for seed, r in grids[m1]["baseline"].items()}
    lines = [
        "# Figure 3: the effect of m", "",
        f"Joint training of the {BASE} base with the {GENERATOR} generator ({DATA}, the authors' Adam, 40 "
        f"epochs, fp32, the paper's protocol), m noise draws per image. m = {m1} and its baseline come from the grid "
        f"`{folders[m1].name}`; each other m is a grid of its own. Command: `python reproduction/figure3-m/draw.py` "
        "(the grids: `reproduction/run-all.sh`). Test accuracy in %.", "",
        "![Figure 3](figure3.png)", "",
        "| m | grid | seeds | test acc, Algorithm 2 | no noise | Δ baseline [95% CI] (n) | median run time | "
        "median train images/s |",
        "|---|---|---|---|---|---|---|---|"]
    for m in sorted(grids):
        joint = grids[m]["joint"]
        alg2, no_noise = list(final[m].values()), [100 * r["test_acc_no_noise"] for r in joint.values()]
        speed = [r["train_images_per_sec"] for r in joint.values() if r.get("train_images_per_sec") is not None]
        lines.append(
            f"| {m} | `{folders[m].name}` | {len(joint)} | {summary(alg2)} | {summary(no_noise)} | "
            f"{difference_cell(compare(final[m], baseline))} | "
            f"{np.median([r['wall_time_s'] for r in joint.values()]) / 60:.1f} min | "
            f"{f'{np.median(speed):,.0f}' if speed else 'not recorded'} |")
    lines += [
        "", f"Δ baseline: paired by seed against the {BASE} baseline of `{folders[m1].name}` (no-noise rule), "
        "two-sided t interval.", "",
        f"## The paper's claims, against m = {m1} on the same seeds", "",
        f"| m | final: Δ [95% CI] (n) | p (Holm) | p equivalent (Holm) | seeds to show similar | "
        f"similar final accuracy? | early: Δ [95% CI] (n) | p (Holm) | faster convergence? |",
        "|---|---|---|---|---|---|---|---|---|"]
    for m, f, pe, pe_holm, e in zip(others, final_diff, equivalent, equivalent_holm, early_diff):
        seeds_needed = seeds_for_equivalence(f.sd, margin) if f.ci is not None else None  # no spread: no sizing
        lines.append(f"| {m} | {difference_cell(f)} | {p_with_holm(f.p, f.p_holm)} | {p_with_holm(pe, pe_holm)} | "
                     f"{seeds_needed or '-'} | "
                     f"{final_verdict(f, pe_holm, margin)} | {difference_cell(e)} | {p_with_holm(e.p, e.p_holm)} | "
                     f"{speed_verdict(e)} |")
    lines += [
        "",
        f"- **final**: the last epoch's Algorithm 2 accuracy on the whole test split, m minus m = {m1}, paired by "
        "seed; p: two-sided paired t-test; **p equivalent**: TOST, the larger of the two one-sided paired t-tests "
        f"against ±{margin:.2f} points, the gain the paper claims for VPN in this cell (Table 1), as it gives no "
        "margin for \"similar\": a difference in m smaller than VPN's own effect. Verdict: **similar** if the "
        f"Holm-adjusted p equivalent < {ALPHA}; else "
        f"**different** if the Holm-adjusted p < {ALPHA}; else **inconclusive**. **Seeds to show similar**: how many "
        f"seeds a TOST at {ALPHA} against that margin needs to say \"similar\" with {POWER:.0%} power if m changes "
        "nothing, at the spread of the paired differences seen here (Julious 2004; Holm across the m's asks a little "
        "more).",
        f"- **early**: the mean of the per-epoch test accuracy (Algorithm 2, the fixed per-epoch test subset) over "
        f"epochs 1-{EARLY_EPOCHS}, m minus m = {m1}, paired by seed: a run that converges faster is higher there. "
        f"Verdict: **faster** (or slower) if the Holm-adjusted p < {ALPHA}, else **no difference detected**.",
        "- Holm: across the m's, one family per column.", ""]
    return "\n".join(lines)


def draw(grids: dict[int, dict], path: Path) -> None:
    """Training loss and the per-epoch test accuracy (mean over seeds, min-max band) per m, and the final test
    accuracy against m (each seed, and the mean), the baseline's as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for i, (m, grid) in enumerate(sorted(grids.items())):
        for ax, curve_of in ((axes[0], lambda pts: {p["epoch"]: p["train_loss"] for p in pts}),
                             (axes[1], subset_curve)):
            curves = [curve_of(points) for points in grid["curves"].values()]
            epochs = sorted(set().union(*curves))
            table = np.array([[c.get(e, np.nan) for e in epochs] for c in curves], dtype=float)
            ax.plot(epochs, np.nanmean(table, axis=0), color=f"C{i}", label=f"m = {m} ({len(curves)} seeds)")
            ax.fill_between(epochs, np.nanmin(table, axis=0), np.nanmax(table, axis=0), color=f"C{i}", alpha=0.12)
        final = final_accuracy(grid)
        axes[2].plot([m] * len(final), list(final.values()), "o", color=f"C{i}", mfc="white")
        axes[2].plot([m], [np.mean(list(final.values()))], "D", color=f"C{i}", ms=8)
    reference = grids[min(grids)]["baseline"]
    if reference:
        baseline = [100 * r["test_acc_no_noise"] for r in reference.values()]
        axes[2].axhline(np.mean(baseline), color="gray", ls=":", label=f"baseline, mean of {len(baseline)} seeds")
        axes[2].legend(fontsize=8)
    axes[2].set_xscale("log", base=2)
    axes[2].set_xticks(sorted(grids), [str(m) for m in sorted(grids)])
    for ax, title, xlabel in zip(axes, ("training loss", "test accuracy per epoch\n(Algorithm 2, a fixed test subset)",
                                        "final test accuracy\n(Algorithm 2, whole test split): seeds ○, mean ◆"),
                                 ("epoch", "epoch", "m")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Figure 3 on {DATA}: {BASE} base, {GENERATOR} generator, the authors' Adam", y=1.06)
    save_figure(fig, path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str]) -> int:
    if any("=" not in a for a in argv):
        print(__doc__, file=sys.stderr)
        return 2
    folders = {int(m): Path(d) for m, d in (a.split("=", 1) for a in argv)} if argv else DEFAULT_GRIDS
    missing = [str(d) for d in folders.values() if not (d / "runs.csv").is_file()]
    if missing:
        raise SystemExit(f"figure3: no runs.csv in {', '.join(missing)} (run reproduction/run-all.sh first)")
    grids = {m: load(m, folder) for m, folder in folders.items()}
    draw(grids, HERE / "figure3.png")
    write_text_atomic(HERE / "report.md", report(grids, folders))
    print(f"figure3: wrote {HERE / 'report.md'} and {HERE / 'figure3.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
