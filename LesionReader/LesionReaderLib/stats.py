"""Statistics of the reader study (paper, "Statistical analysis" and Tables 3-6).

Every function here is a thin, documented layer over SciPy so that each number in the report
can be traced to one formula:

- sensitivity differences: two-tailed McNemar mid-p test (paper ref. 37, Fagerland et al.);
- false detections per case: Wilcoxon signed-rank test;
- sensitivity intervals: Clopper-Pearson 95 %, also for the reader-average rows whose counts
  are non-integer (mean of the readers' true-positive counts, Table 5);
- false detections per case intervals: Student-t 95 % ("[+-0.04]" in Table 5);
- image quality grades, contrast metrics and reading times: two-tailed t-tests.

All tests are two-tailed and intervals are at the 5 % level, as in the paper.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

import numpy as np
from scipy import stats as _st

#: One value per case (or per pair member): a sequence, or a 1-D array such as
#: ``PairDetection.fp_counts``; every function converts it with ``np.asarray(..., dtype=float)``.
Samples = Union[Sequence[float], np.ndarray]

#: Two-tailed significance level used for every interval and test (paper, "Statistical analysis").
ALPHA = 0.05


@dataclass(frozen=True)
class TestResult:
    """Outcome of one hypothesis test.

    Attributes:
        test: ``mcnemar_midp``, ``wilcoxon``, ``ttest_rel`` or ``ttest_ind`` (the names used in
            ``comparisons.csv``).
        statistic: the test statistic (McNemar: the smaller discordant count; Wilcoxon: the
            smaller signed-rank sum as SciPy reports it; t-tests: t).
        p_value: two-tailed p-value, NaN when the test is undefined (too few observations).
        n: number of paired observations (or of discordant pairs for McNemar).
    """

    test: str
    statistic: float
    p_value: float
    n: int


def mcnemar_midp(b: int, c: int) -> TestResult:
    """Two-tailed McNemar mid-p test from the discordant counts of binary matched pairs.

    Paper, "Statistical analysis": sensitivities are compared with the McNemar mid-p test "as
    appropriate for moderate sample sizes of binary matched-pairs data" (Fagerland, Lydersen and
    Laake, BMC Med Res Methodol 2013). Under H0 the ``b`` discordant pairs of one kind are
    Binomial(b + c, 1/2); the mid-p value is P(outcomes more extreme than observed) plus half of
    P(outcomes exactly as extreme), extremeness being the distance to (b + c) / 2. For b != c it
    equals ``2 * P(X <= min) - P(X = min)``; for b == c it is ``1 - P(X = b) / 2``.

    Args:
        b: pairs positive in A and negative in B (e.g. lesions detected on T1c only).
        c: pairs negative in A and positive in B.

    Returns:
        TestResult with statistic = min(b, c); p = 1 when there is no discordant pair.

    Raises:
        ValueError: a negative or non-integer count.
    """
    for name, value in (("b", b), ("c", c)):
        if value < 0 or int(value) != value:
            raise ValueError(f"McNemar discordant count {name}={value!r} must be a non-negative integer.")
    b, c = int(b), int(c)
    n = b + c
    if n == 0:
        return TestResult("mcnemar_midp", 0.0, 1.0, 0)
    ks = np.arange(n + 1)
    pmf = _st.binom.pmf(ks, n, 0.5)
    dist = np.abs(ks - n / 2.0)
    observed = abs(b - n / 2.0)
    # Integer counts keep these distances exact multiples of 1/2: == is safe.
    more = pmf[dist > observed].sum()
    same = pmf[dist == observed].sum()
    p = float(min(1.0, more + 0.5 * same))
    return TestResult("mcnemar_midp", float(min(b, c)), p, n)


def clopper_pearson(k: float, n: float, alpha: float = ALPHA) -> tuple[float, float]:
    """Clopper-Pearson ("exact") confidence interval of a binomial proportion k / n.

    Paper, "Statistical analysis": sensitivity intervals use the Clopper-Pearson method. The
    beta-quantile form is used, ``[B(alpha/2; k, n-k+1), B(1-alpha/2; k+1, n-k)]``, which is
    also defined for non-integer k: the reader-average rows of Table 5 apply it to the readers'
    mean true-positive count (e.g. (106 + 111) / 2 = 108.5 of 187 gives [51 %; 65 %]).

    Args:
        k: successes (true positives), 0 <= k <= n, may be non-integer.
        n: trials (reference lesions), > 0.
        alpha: two-tailed level (0.05 gives the 95 % interval).

    Returns:
        (low, high), with low = 0 when k = 0 and high = 1 when k = n.

    Raises:
        ValueError: n <= 0 or k outside [0, n].
    """
    if not n > 0:
        raise ValueError(f"Clopper-Pearson needs n > 0 trials, got n={n!r}; a sensitivity needs at least one reference lesion.")
    if not 0 <= k <= n:
        raise ValueError(f"Clopper-Pearson needs 0 <= k <= n, got k={k!r}, n={n!r}.")
    low = 0.0 if k == 0 else float(_st.beta.ppf(alpha / 2.0, k, n - k + 1))
    high = 1.0 if k == n else float(_st.beta.ppf(1.0 - alpha / 2.0, k + 1, n - k))
    return low, high


def student_t_ci(values: Samples, alpha: float = ALPHA) -> tuple[float, float, float]:
    """Mean and Student-t confidence interval (paper, "Statistical analysis": FDR intervals).

    ``mean +- t_{1-alpha/2, n-1} * sd / sqrt(n)``, sd with n - 1 degrees of freedom. Table 5
    reports it as "0.05 [+-0.04]" false detections per case.

    Args:
        values: one value per case (e.g. false detections of the case).
        alpha: two-tailed level.

    Returns:
        (mean, low, high); low = high = mean for a single value or zero spread, NaNs when empty.
    """
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(x.mean())
    if x.size < 2:
        return mean, mean, mean
    half = float(_st.t.ppf(1.0 - alpha / 2.0, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return mean, mean - half, mean + half


def _paired(a: Samples, b: Samples, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Both samples as float arrays; ``ValueError`` (starting with ``what``) unless they pair up."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"{what} of equal length, got {x.size} and {y.size}.")
    return x, y


def wilcoxon_signed_rank(a: Samples, b: Samples) -> TestResult:
    """Two-tailed Wilcoxon signed-rank test on paired values (paper: FDR comparisons, Table 5).

    Uses :func:`scipy.stats.wilcoxon` with its defaults (zero differences dropped, the
    "wilcox" convention of the SciPy version the paper used; exact or normal-approximation
    p-value chosen by SciPy). When every difference is zero (common for false detections per
    case, most cases having none) SciPy has nothing to rank; the samples are then identical and
    p = 1 is returned.

    Args:
        a: per-case values for condition A.
        b: per-case values for condition B, same cases in the same order.

    Raises:
        ValueError: the two samples differ in length.
    """
    x, y = _paired(a, b, "Wilcoxon signed-rank needs paired samples")
    d = x - y
    if d.size == 0:
        return TestResult("wilcoxon", math.nan, math.nan, 0)
    if np.all(d == 0):
        return TestResult("wilcoxon", 0.0, 1.0, int(d.size))
    res = _st.wilcoxon(x, y)
    return TestResult("wilcoxon", float(res.statistic), float(res.pvalue), int(d.size))


def ttest_rel(a: Samples, b: Samples) -> TestResult:
    """Two-tailed paired t-test (paper: grades, contrast metrics and reading times, Tables 3, 4, 6).

    Wraps :func:`scipy.stats.ttest_rel`. When all differences are zero the t statistic is 0/0;
    the samples are identical and p = 1 is returned (SciPy would return NaN).

    Args:
        a: per-case values for condition A.
        b: per-case values for condition B, same cases in the same order.

    Raises:
        ValueError: the two samples differ in length.
    """
    x, y = _paired(a, b, "Paired t-test needs samples")
    if x.size < 2:
        return TestResult("ttest_rel", math.nan, math.nan, int(x.size))
    d = x - y
    if np.all(d == 0):
        return TestResult("ttest_rel", 0.0, 1.0, int(x.size))
    if np.all(d == d[0]):
        # Constant non-zero difference: zero variance, the difference is certain.
        return TestResult("ttest_rel", math.copysign(math.inf, d[0]), 0.0, int(x.size))
    res = _st.ttest_rel(x, y)
    return TestResult("ttest_rel", float(res.statistic), float(res.pvalue), int(x.size))


def ttest_ind(a: Samples, b: Samples, equal_var: bool = True) -> TestResult:
    """Two-tailed independent-samples t-test (used when two conditions share no case).

    Wraps :func:`scipy.stats.ttest_ind` (Student's pooled-variance test by default, as SciPy's
    default the paper used). Identical constant samples give p = 1.

    Args:
        a: values of condition A.
        b: values of condition B.
        equal_var: False for Welch's test.
    """
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    n = int(x.size + y.size)
    if x.size < 2 or y.size < 2:
        return TestResult("ttest_ind", math.nan, math.nan, n)
    if np.all(x == x[0]) and np.all(y == y[0]):
        if x[0] == y[0]:
            return TestResult("ttest_ind", 0.0, 1.0, n)
        return TestResult("ttest_ind", math.copysign(math.inf, x[0] - y[0]), 0.0, n)
    res = _st.ttest_ind(x, y, equal_var=equal_var)
    return TestResult("ttest_ind", float(res.statistic), float(res.pvalue), n)


def ppv(tp: float, fp: float) -> float:
    """Positive predictive value TP / (TP + FP) (paper, "Performance metrics"); NaN without marks."""
    return float(tp) / (tp + fp) if tp + fp > 0 else math.nan


def f1_score(sensitivity: float, positive_predictive_value: float) -> float:
    """F1 = harmonic mean of sensitivity and PPV (paper, "Performance metrics").

    Returns 0 when both are 0 and NaN when either is undefined.
    """
    se, pp = float(sensitivity), float(positive_predictive_value)
    if math.isnan(se) or math.isnan(pp):
        return math.nan
    return 0.0 if se + pp == 0 else 2.0 * se * pp / (se + pp)


def format_p(p: float) -> str:
    """Format a p-value in the paper's style: ``P<.001*``, ``P=.02*``, ``P=.62``, ``P>.99``.

    An asterisk marks significance at the 5 % level (Tables 3-6).
    """
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "n/a"
    star = "*" if p < ALPHA else ""
    if p < 0.001:
        return f"P<.001{star}"
    if p > 0.99:
        return "P>.99"
    text = f"{p:.2f}" if p >= 0.01 else f"{p:.3f}"
    return f"P={text.lstrip('0')}{star}"


# --------------------------------------------------------------------------- beyond the paper


def weighted_kappa(a: Sequence[float], b: Sequence[float], categories: Sequence[float] = (1, 2, 3, 4), weights: str = "quadratic") -> float:
    """Weighted Cohen's kappa between two readers' ordinal grades (beyond the paper).

    ``kappa_w = 1 - sum(w * O) / sum(w * E)`` with disagreement weights
    ``w_ij = |i - j|`` (``linear``) or ``(i - j)^2`` (``quadratic``, Fleiss-Cohen) over the
    category scores, O the observed joint proportions and E the product of the marginals. The
    paper compares readers' grades with t-tests only (Table 3); kappa adds their agreement.

    Args:
        a: grades of reader A, one per case.
        b: grades of reader B, same cases in the same order.
        categories: the scale (paper: 1-4).
        weights: ``linear`` or ``quadratic``.

    Returns:
        kappa in [-1, 1]; 1.0 when the readers agree on every case and NaN when the expected
        disagreement is zero otherwise (a single category used by both).

    Raises:
        ValueError: unequal lengths, an unknown weighting, or a grade outside ``categories``.
    """
    x, y = list(a), list(b)
    if len(x) != len(y):
        raise ValueError(f"weighted kappa needs paired grades of equal length, got {len(x)} and {len(y)}.")
    if weights not in ("linear", "quadratic"):
        raise ValueError(f"weights must be 'linear' or 'quadratic', got {weights!r}.")
    cats = list(categories)
    index = {c: i for i, c in enumerate(cats)}
    table = np.zeros((len(cats), len(cats)))
    for u, v in zip(x, y):
        if u not in index or v not in index:
            raise ValueError(f"grade pair ({u}, {v}) is outside the scale {cats}.")
        table[index[u], index[v]] += 1
    if table.sum() == 0:
        return math.nan
    observed = table / table.sum()
    expected = np.outer(observed.sum(axis=1), observed.sum(axis=0))
    scores = np.asarray(cats, dtype=float)
    diff = np.abs(scores[:, None] - scores[None, :])
    w = diff if weights == "linear" else diff**2
    denominator = float((w * expected).sum())
    if denominator == 0:
        return 1.0 if float((w * observed).sum()) == 0 else math.nan
    return 1.0 - float((w * observed).sum()) / denominator


def bootstrap_ci(
    statistic, n_units: int, n_boot: int = 2000, alpha: float = ALPHA, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of a statistic of resampled units (beyond the paper).

    Used for a case-level bootstrap of the reader-average sensitivity: cases (with all their
    lesions and both readers' detections) are drawn with replacement, so the interval accounts
    for lesions clustering within cases, which the paper's Clopper-Pearson interval ignores.

    Args:
        statistic: ``f(indices) -> float`` evaluated on an array of resampled unit indices.
        n_units: number of units (cases).
        n_boot: bootstrap replicates.
        alpha: two-tailed level.
        seed: random seed (same seed, same interval).

    Returns:
        (low, high) percentiles; NaNs when no replicate is defined.
    """
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        v = statistic(rng.integers(0, n_units, n_units))
        if v is not None and not math.isnan(v):
            values.append(v)
    if not values:
        return math.nan, math.nan
    low, high = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high)
