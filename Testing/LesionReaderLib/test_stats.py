"""LesionReaderLib.stats against hand-worked values, SciPy and statsmodels."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as st

from LesionReaderLib import stats


def test_mcnemar_midp_hand_worked():
    # (1, 7): P(X<=1) = 9/256, mid-p = 2 * 9/256 - 8/256 = 10/256.
    assert stats.mcnemar_midp(1, 7).p_value == pytest.approx(0.0390625, abs=1e-12)
    assert stats.mcnemar_midp(7, 1).p_value == pytest.approx(0.0390625, abs=1e-12)
    # (3, 3): 1 - P(X=3)/2 = 1 - 20/128.
    assert stats.mcnemar_midp(3, 3).p_value == pytest.approx(0.84375, abs=1e-12)
    assert stats.mcnemar_midp(0, 0).p_value == 1.0
    # (0, 1): P(X=0)/2 + P(X=1)/2 = 1/2 ... both outcomes are "as extreme": 0.5 * 1.
    assert stats.mcnemar_midp(0, 1).p_value == pytest.approx(0.5)


@pytest.mark.parametrize("b,c", [(2, 9), (10, 4), (0, 6), (15, 15), (30, 12)])
def test_mcnemar_midp_equals_exact_minus_point_probability(b, c):
    # Fagerland et al. 2013: mid-p = exact two-sided binomial p - P(X = b) when b != c.
    n = b + c
    exact = st.binomtest(min(b, c), n, 0.5).pvalue
    expected = exact - st.binom.pmf(min(b, c), n, 0.5) if b != c else 1 - 0.5 * st.binom.pmf(b, n, 0.5)
    assert stats.mcnemar_midp(b, c).p_value == pytest.approx(expected, rel=1e-10)


def test_mcnemar_rejects_bad_counts():
    with pytest.raises(ValueError, match="non-negative integer"):
        stats.mcnemar_midp(-1, 2)
    with pytest.raises(ValueError):
        stats.mcnemar_midp(1.5, 2)


def test_clopper_pearson_hand_worked_and_statsmodels():
    from statsmodels.stats.proportion import proportion_confint

    low, high = stats.clopper_pearson(7, 8)
    assert low == pytest.approx(0.473490, abs=1e-6)
    assert high == pytest.approx(0.996840, abs=1e-6)
    for k, n in [(0, 10), (10, 10), (106, 187), (1, 79), (50, 100), (3, 4)]:
        ref = proportion_confint(k, n, alpha=0.05, method="beta")
        assert stats.clopper_pearson(k, n) == pytest.approx(ref, abs=1e-10)


def test_clopper_pearson_non_integer_reader_average_matches_paper_table5():
    # Table 5, reader average: (106 + 111) / 2 of 187 -> [51; 65], (138 + 142) / 2 -> [68; 81],
    # (100 + 103) / 2 of 145 -> [62; 77], (77 + 79) / 2 of 89 -> [79; 94], 85 of 89 -> [89; 99].
    for k, n, paper in [(108.5, 187, (51, 65)), (140, 187, (68, 81)), (101.5, 145, (62, 77)),
                        (123.5, 145, (78, 91)), (78, 89, (79, 94)), (85, 89, (89, 99))]:
        low, high = stats.clopper_pearson(k, n)
        assert (round(100 * low), round(100 * high)) == paper
    # Between the neighbouring integer intervals.
    lo, hi = stats.clopper_pearson(108.5, 187)
    assert stats.clopper_pearson(108, 187)[0] < lo < stats.clopper_pearson(109, 187)[0]


def test_clopper_pearson_errors():
    with pytest.raises(ValueError, match="reference lesion"):
        stats.clopper_pearson(0, 0)
    with pytest.raises(ValueError):
        stats.clopper_pearson(5, 4)


def test_student_t_ci_against_scipy():
    x = np.array([0, 0, 1, 0, 2, 0, 0, 1, 0, 0], dtype=float)
    mean, low, high = stats.student_t_ci(x)
    ref = st.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=st.sem(x))
    assert mean == pytest.approx(0.4)
    assert (low, high) == pytest.approx(ref)
    assert stats.student_t_ci([0, 0, 0]) == (0.0, 0.0, 0.0)
    assert all(math.isnan(v) for v in stats.student_t_ci([]))


def test_wilcoxon_against_scipy_and_all_zero():
    rng = np.random.default_rng(0)
    a = rng.poisson(0.3, 40).astype(float)
    b = rng.poisson(0.8, 40).astype(float)
    ours = stats.wilcoxon_signed_rank(a, b)
    ref = st.wilcoxon(a, b)
    assert ours.p_value == pytest.approx(ref.pvalue)
    assert ours.statistic == pytest.approx(ref.statistic)
    x = rng.normal(size=15)
    y = x + rng.normal(0.5, 1, size=15)
    assert stats.wilcoxon_signed_rank(x, y).p_value == pytest.approx(st.wilcoxon(x, y).pvalue)
    zero = stats.wilcoxon_signed_rank([0, 1, 0, 2], [0, 1, 0, 2])
    assert zero.p_value == 1.0 and zero.test == "wilcoxon"
    with pytest.raises(ValueError, match="equal length"):
        stats.wilcoxon_signed_rank([1, 2], [1])


def test_ttests_against_scipy():
    rng = np.random.default_rng(1)
    a, b = rng.normal(2.7, 0.5, 30), rng.normal(3.0, 0.5, 30)
    r = stats.ttest_rel(a, b)
    ref = st.ttest_rel(a, b)
    assert (r.statistic, r.p_value) == pytest.approx((ref.statistic, ref.pvalue))
    i = stats.ttest_ind(a, b[:20])
    ref = st.ttest_ind(a, b[:20])
    assert (i.statistic, i.p_value) == pytest.approx((ref.statistic, ref.pvalue))
    w = stats.ttest_ind(a, b, equal_var=False)
    assert w.p_value == pytest.approx(st.ttest_ind(a, b, equal_var=False).pvalue)
    assert stats.ttest_rel([1, 2, 3], [1, 2, 3]).p_value == 1.0
    assert stats.ttest_rel([1, 2, 3], [2, 3, 4]).p_value == 0.0
    assert math.isnan(stats.ttest_rel([1], [2]).p_value)


def test_ppv_f1_and_p_format():
    assert stats.ppv(106, 3) == pytest.approx(106 / 109)
    assert math.isnan(stats.ppv(0, 0))
    se, pp = 106 / 187, 106 / 109
    assert stats.f1_score(se, pp) == pytest.approx(2 * se * pp / (se + pp))
    assert round(100 * stats.f1_score(se, pp)) == 72  # Table 5, reader 1, T1c, >= 0 mm
    assert stats.f1_score(0, 0) == 0.0
    assert stats.format_p(0.0001) == "P<.001*"
    assert stats.format_p(0.02) == "P=.02*"
    assert stats.format_p(0.62) == "P=.62"
    assert stats.format_p(0.995) == "P>.99"
    assert stats.format_p(0.008) == "P=.008*"
    assert stats.format_p(float("nan")) == "n/a"


@pytest.mark.parametrize("wt", ["linear", "quadratic"])
def test_weighted_kappa_against_statsmodels(wt):
    from statsmodels.stats.inter_rater import cohens_kappa

    rng = np.random.default_rng(5)
    a = rng.integers(1, 5, 60)
    b = np.clip(a + rng.integers(-1, 2, 60), 1, 4)
    table = np.zeros((4, 4))
    for u, v in zip(a, b):
        table[u - 1, v - 1] += 1
    ref = cohens_kappa(table, wt=wt, return_results=False)
    assert stats.weighted_kappa(a, b, weights=wt) == pytest.approx(ref)
    assert stats.weighted_kappa([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
    assert stats.weighted_kappa([3, 3, 3], [3, 3, 3]) == 1.0
    with pytest.raises(ValueError, match="outside the scale"):
        stats.weighted_kappa([0, 1], [1, 1])


def test_bootstrap_ci_is_seeded_and_covers_the_estimate():
    x = np.random.default_rng(2).normal(10, 2, 50)
    stat = lambda idx: float(x[idx].mean())  # noqa: E731
    low, high = stats.bootstrap_ci(stat, len(x), n_boot=1000, seed=3)
    assert (low, high) == stats.bootstrap_ci(stat, len(x), n_boot=1000, seed=3)
    assert low < x.mean() < high
    se = x.std(ddof=1) / np.sqrt(len(x))
    assert high - low == pytest.approx(2 * 1.96 * se, rel=0.2)
