"""Paired statistics of a reproduction: each row against the same seeds' baseline, and against the paper's own claim.

Seed k of a row and seed k of its baseline share the initial base weights and the data order, so every test here
works on the per-seed differences d_k = row_k - baseline_k (a paired t-test is a one-sample t-test on them).
Pure numpy and scipy: the report and any later study of runs can use it without torch or Ray.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from scipy import optimize, stats

ALPHA = 0.05  # the level of every test, interval (1 - ALPHA) and the minimum detectable effect
POWER = 0.8  # the power the minimum detectable effect is computed for


@dataclass(frozen=True)
class Comparison:
    """One row against the same seeds' baseline, and against the gain the paper claims for it.

    mean, sd: of the per-seed differences (sd None below 2 seeds); ci: the t-based (1 - ALPHA) interval of the mean;
    p: two-sided paired t-test of "no difference"; p_excl: one-sided paired t-test of H0 "the true gain is at least the
    paper's" against H1 "it is smaller" (None where the paper claims no gain); mde: the smallest true difference a
    two-sided paired t-test at ALPHA detects with POWER, for this sd and n; ci, p, p_excl and mde are None where
    every seed gave the same nonzero difference (`compare`). p_holm, p_excl_holm: set by `judge`.
    """

    n: int
    mean: float | None
    sd: float | None
    ci: tuple[float, float] | None
    p: float | None
    claimed_gain: float | None
    p_excl: float | None
    mde: float | None
    p_holm: float | None = None
    p_excl_holm: float | None = None

    @property
    def verdict(self) -> str | None:
        """For a claimed gain > 0: excluded (the paper's gain is rejected after Holm, even where a smaller gain is
        significant), else reproduced (a significant difference after Holm, in the paper's direction), else
        inconclusive. None where there is no claim to judge or fewer than 2 seeds."""
        if self.claimed_gain is None or self.claimed_gain <= 0 or self.p is None:
            return None
        if self.p_excl_holm is not None and self.p_excl_holm < ALPHA:
            return "excluded"
        if self.p_holm is not None and self.p_holm < ALPHA and self.mean > 0:
            return "reproduced"
        return "inconclusive"


def paired_differences(row: dict[int, float], baseline: dict[int, float]) -> np.ndarray:
    """row - baseline over the seeds both have, in seed order."""
    return np.array([row[s] - baseline[s] for s in sorted(set(row) & set(baseline))], dtype=float)


def compare(row: dict[int, float], baseline: dict[int, float], claimed_gain: float | None = None) -> Comparison:
    """The paired statistics of `row` against `baseline` ({seed: value}), and of the claim that the row gains
    `claimed_gain` over the baseline (the paper's row minus the paper's baseline; None: no claim)."""
    d = paired_differences(row, baseline)
    n = len(d)
    if n == 0:
        return Comparison(0, None, None, None, None, claimed_gain, None, None)
    mean = float(d.mean())
    if n == 1:
        return Comparison(1, mean, None, None, None, claimed_gain, None, None)
    claimed = claimed_gain is not None and claimed_gain > 0  # a gain <= 0 is no claim of improvement to reject
    if np.allclose(d, d[0]):  # every seed gave the same difference: t is undefined
        if not np.allclose(d, 0):
            # a coincidence of accuracies counted in whole images, not a difference known exactly: no test
            return Comparison(n, mean, 0.0, None, None, claimed_gain, None, None)
        # no difference at all: a frozen base's no-noise accuracy is its baseline's, exactly
        sd, p, p_excl = 0.0, 1.0, (0.0 if claimed else None)
    else:
        sd = float(d.std(ddof=1))
        p = float(stats.ttest_1samp(d, 0.0).pvalue)
        p_excl = float(stats.ttest_1samp(d, claimed_gain, alternative="less").pvalue) if claimed else None
    half_width = stats.t.ppf(1 - ALPHA / 2, n - 1) * sd / math.sqrt(n)
    return Comparison(n, mean, sd, (mean - half_width, mean + half_width), p, claimed_gain, p_excl,
                      minimum_detectable_effect(sd, n))


def minimum_detectable_effect(sd: float, n: int, alpha: float = ALPHA, power: float = POWER) -> float | None:
    """The true mean difference that a two-sided paired t-test at `alpha` on n pairs with this sd rejects with
    probability `power`: the noncentrality δ·√n/sd at which the noncentral t (n - 1 df) falls beyond the critical
    values with that probability, solved exactly (scipy.stats.nct), not by the normal approximation, which is
    optimistic at a few seeds. None below 2 pairs."""
    if n < 2:
        return None
    if sd == 0:
        return 0.0
    df = n - 1
    critical = stats.t.ppf(1 - alpha / 2, df)

    def power_minus_target(noncentrality: float) -> float:
        # P(T < -critical) written as P(T > critical) at the mirrored noncentrality: scipy's nct.cdf returns nan
        # deep in that tail, where nct.sf returns its ~0
        rejected = stats.nct.sf(critical, df, noncentrality) + stats.nct.sf(critical, df, -noncentrality)
        return rejected - power

    high = critical + 1.0
    while power_minus_target(high) < 0:  # power grows with the noncentrality: bracket the root
        high *= 2
    noncentrality = optimize.brentq(power_minus_target, 0.0, high, xtol=1e-10)
    return noncentrality * sd / math.sqrt(n)


def holm(pvalues: list[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values of one family (None: no test, not counted): the k-th smallest of m is
    multiplied by m - k + 1, then made non-decreasing in that order, capped at 1. It keeps the chance of any false
    rejection in the family at most the level, under any dependence between the tests."""
    present = sorted((p, i) for i, p in enumerate(pvalues) if p is not None)
    adjusted: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(present):
        running = max(running, min(1.0, (len(present) - rank) * p))
        adjusted[i] = running
    return adjusted


def judge(comparisons: list[Comparison]) -> list[Comparison]:
    """Holm across the list, separately for the difference tests (p) and for the exclusion tests (p_excl): two
    families, as they answer different questions. The list is the family: pass every comparison of one report."""
    p_holm = holm([c.p for c in comparisons])
    p_excl_holm = holm([c.p_excl for c in comparisons])
    return [replace(c, p_holm=a, p_excl_holm=b) for c, a, b in zip(comparisons, p_holm, p_excl_holm)]
