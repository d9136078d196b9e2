"""The reproduction's paired statistics against scipy's tests, hand computation and simulation."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from vpn_dist.reproduce.stats import Comparison, compare, holm, judge, minimum_detectable_effect

ROW = {0: 81.9, 1: 82.4, 2: 81.1, 3: 82.8, 4: 81.7, 7: 99.0}  # seed 7 has no baseline: not paired
BASELINE = {0: 81.5, 1: 81.6, 2: 81.3, 3: 81.9, 4: 81.2, 9: 10.0}
DIFFS = np.array([0.4, 0.8, -0.2, 0.9, 0.5])  # ROW - BASELINE over seeds 0-4


def test_compare_pairs_by_seed_and_matches_scipys_paired_t_test():
    c = compare(ROW, BASELINE, claimed_gain=1.2)
    rows, bases = [ROW[s] for s in range(5)], [BASELINE[s] for s in range(5)]
    assert c.n == 5 and c.mean == pytest.approx(DIFFS.mean()) and c.sd == pytest.approx(DIFFS.std(ddof=1))
    assert c.p == pytest.approx(stats.ttest_rel(rows, bases).pvalue, rel=1e-12)
    # one-sided against the claimed gain: H1 is "the gain is smaller than 1.2"
    assert c.p_excl == pytest.approx(stats.ttest_rel(np.array(rows) - 1.2, bases, alternative="less").pvalue)


def test_confidence_interval_and_exclusion_p_by_hand():
    c = compare(ROW, BASELINE, claimed_gain=1.2)
    mean, sd, n = 0.48, math.sqrt(0.187), 5  # sum of squared deviations from 0.48: 0.748, over n - 1
    half_width = 2.7764451051977987 * sd / math.sqrt(n)  # t(0.975; 4), from a t table
    assert c.ci == pytest.approx((mean - half_width, mean + half_width))
    t = (mean - 1.2) / (sd / math.sqrt(n))
    assert c.p_excl == pytest.approx(stats.t.cdf(t, n - 1))
    assert c.p_excl < 0.05 < c.p  # gain 0.48 points: not significant, and the paper's 1.2 is excluded


def test_a_gain_the_paper_does_not_claim_has_no_exclusion_test_or_verdict():
    for claimed in (None, 0.0, -2.1):
        c = judge([compare(ROW, BASELINE, claimed_gain=claimed)])[0]
        assert c.p is not None and c.p_excl is None and c.p_excl_holm is None and c.verdict is None


def test_too_few_seeds_give_no_test():
    assert compare({0: 1.0}, {1: 0.5}) == Comparison(0, None, None, None, None, None, None, None)
    one = compare({0: 1.0}, {0: 0.5}, claimed_gain=0.3)
    assert (one.n, one.mean, one.p, one.ci, one.p_excl, one.mde, one.verdict) == (1, 0.5, None, None, None, None, None)


def test_no_difference_at_all_is_known_exactly_and_a_repeated_nonzero_one_is_not_tested():
    frozen = compare({0: 81.0, 1: 82.0, 2: 83.0}, {0: 81.0, 1: 82.0, 2: 83.0}, claimed_gain=0.2)
    assert (frozen.mean, frozen.sd, frozen.ci, frozen.p, frozen.p_excl, frozen.mde) == (0, 0, (0, 0), 1, 0, 0)
    # two seeds that each gained exactly 0.1 points (accuracies move in whole images): no spread, so no evidence
    # of anything beyond the two numbers, not p = 0
    coincidence = compare({0: 83.74, 1: 83.40}, {0: 83.64, 1: 83.30}, claimed_gain=0.5)
    assert coincidence.mean == pytest.approx(0.1) and coincidence.sd == 0
    assert (coincidence.ci, coincidence.p, coincidence.p_excl, coincidence.mde, coincidence.verdict) == (
        None, None, None, None, None)


def test_holm_by_hand():
    # sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> 0.06 (never below the previous)
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, None, 0.4]) == [pytest.approx(0.8), None, pytest.approx(0.8)]  # None: not a test, not counted
    assert holm([0.9, 0.6]) == [1.0, 1.0] and holm([]) == []


def test_judge_corrects_the_two_families_separately():
    rng = np.random.default_rng(1)
    comparisons = [compare(dict(enumerate(rng.normal(shift, 1, 4))), dict(enumerate(np.zeros(4))), claimed)
                   for shift, claimed in ((0.1, 1.0), (2.0, None), (3.0, 0.5), (-1.0, -0.3))]
    judged = judge(comparisons)
    assert [c.p_holm for c in judged] == holm([c.p for c in comparisons])
    exclusions = [c.p_excl for c in comparisons if c.p_excl is not None]
    assert len(exclusions) == 2  # the claims of +1.0 and +0.5
    assert [c.p_excl_holm for c in judged if c.p_excl is not None] == pytest.approx(holm(exclusions))
    assert all(a.p_excl_holm is None for a in judged if a.p_excl is None)


def _judged(mean, p_holm, p_excl_holm, claimed=0.5):
    return Comparison(5, mean, 0.1, (mean - 0.1, mean + 0.1), p_holm, claimed, p_excl_holm, 0.2, p_holm, p_excl_holm)


@pytest.mark.parametrize("mean, p_holm, p_excl_holm, verdict", [
    (0.6, 0.01, 0.7, "reproduced"),  # significant, positive, the paper's gain not rejected
    (0.2, 0.01, 0.01, "excluded"),  # a real but smaller gain: the paper's is still rejected
    (-0.3, 0.001, 0.0001, "excluded"),
    (0.6, 0.2, 0.6, "inconclusive"),
    (-0.6, 0.01, 0.06, "inconclusive"),  # significant, but against the paper's direction, and not excluded
    (0.4, 0.049, 0.051, "reproduced"),
])
def test_verdict_rule(mean, p_holm, p_excl_holm, verdict):
    assert _judged(mean, p_holm, p_excl_holm).verdict == verdict


@pytest.mark.parametrize("n", [2, 3, 5])
def test_minimum_detectable_effect_has_80_percent_power_in_simulation(n):
    sd = 0.7
    mde = minimum_detectable_effect(sd, n)
    rng = np.random.default_rng(n)
    diffs = rng.normal(mde, sd, size=(100_000, n))
    power = (stats.ttest_1samp(diffs, 0.0, axis=1).pvalue < 0.05).mean()
    assert power == pytest.approx(0.8, abs=0.006)


def test_minimum_detectable_effect_scales_with_sd_and_nears_the_normal_formula_at_many_seeds():
    assert minimum_detectable_effect(2.0, 5) == pytest.approx(2 * minimum_detectable_effect(1.0, 5))
    normal = (stats.norm.ppf(0.975) + stats.norm.ppf(0.8)) / math.sqrt(400)
    assert minimum_detectable_effect(1.0, 400) == pytest.approx(normal, rel=0.005)
    assert minimum_detectable_effect(1.0, 5) > 1.3 * (stats.norm.ppf(0.975) + stats.norm.ppf(0.8)) / math.sqrt(5)
    assert minimum_detectable_effect(1.0, 1) is None and minimum_detectable_effect(0.0, 3) == 0.0
