"""Per-case summaries and their tests: grades (Table 3), contrast (Table 4), reading times (Table 6).

Paper, "Statistical analysis": average image quality grades, contrast enhancement metrics and
reading times are compared across readers and sequences with two-tailed t-tests (paired here on
the cases both series share, independent otherwise). Beyond the paper: weighted Cohen's kappa
between the readers' grades (``agreement.csv``).

Choices the paper leaves open (listed in the README): reader-average grades and times are the
per-case means over the readers; averages of different reader sets are not compared.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np

from . import stats
from .results import (
    AVERAGE,
    BRAIN_MASK_KEYS,
    CONTRAST_VOLUMES,
    HEALTHY_KEYS,
    LESION_LABEL_KEYS,
    PRE_KEYS,
    CaseValues,
    Mark,
    ReadKey,
    Reads,
    StudyInfo,
    comparison_row,
    ordered_volumes,
)

if TYPE_CHECKING:  # annotations only: contrast imports SimpleITK, loaded only when contrast metrics are computed
    from .contrast import CaseVolumes

#: (reader, phase) -> case -> value; reader :data:`AVERAGE` for the per-case reader means.
Series = dict[ReadKey, CaseValues]
#: ``progress(stage, fraction, message)`` callback of :func:`.analysis.analyze`.
Progress = Callable[[str, float, str], None]


def mean_sd(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample SD (``nan`` for no value; SD ``nan`` for one value)."""
    x = np.asarray(list(values), dtype=float)
    if x.size == 0:
        return math.nan, math.nan
    return float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else math.nan


def paired_or_independent(a: Mapping[str, float], b: Mapping[str, float]) -> stats.TestResult:
    """Two-tailed t-test (paper, "Statistical analysis"): paired on >= 2 common cases, else independent."""
    common = sorted(set(a) & set(b))
    if len(common) >= 2:
        return stats.ttest_rel([a[c] for c in common], [b[c] for c in common])
    return stats.ttest_ind(list(a.values()), list(b.values()))


# --------------------------------------------------------------------------- grades and times


def per_case_values(reads: Reads) -> dict[str, Series]:
    """Per read, the non-excluded cases' ``grade``, ``seconds`` (both without blanks) and ``marks`` count."""
    per_case: dict[str, Series] = {"grade": {}, "seconds": {}, "marks": {}}
    for key, rows in reads.grades.items():
        per_case["grade"][key] = {c: g for c, (g, _) in rows.items() if c not in reads.excluded and not math.isnan(g)}
        per_case["seconds"][key] = {c: s for c, (_, s) in rows.items() if c not in reads.excluded and not math.isnan(s)}
        per_case["marks"][key] = {c: float(len(reads.marks.get(key, {}).get(c, []))) for c in rows if c not in reads.excluded}
    return per_case


def _add_averages(series: Series, phases: Sequence[str], readers: Sequence[str]) -> dict[str, list[str]]:
    """Add, per phase read by >= 2 readers, the per-case reader mean on their common cases.

    Returns:
        phase -> the readers behind its average.
    """
    average_sets: dict[str, list[str]] = {}
    for phase in phases:
        rs = [r for r in readers if (r, phase) in series]
        if len(rs) >= 2:
            average_sets[phase] = rs
            cases = sorted(set.intersection(*[set(series[(r, phase)]) for r in rs]))
            series[(AVERAGE, phase)] = {c: float(np.mean([series[(r, phase)][c] for r in rs])) for c in cases}
    return average_sets


def _with_averages(values: Series, keys: Iterable[ReadKey], reads: Reads) -> tuple[Series, dict[str, list[str]], list[str], list[str]]:
    """The non-empty series of ``keys`` plus the reader averages (:func:`_add_averages`).

    Returns:
        series, reader set of each average, phases, readers (study order).
    """
    keys = [k for k in keys if values.get(k)]
    series = {k: values[k] for k in keys}
    phases = [p for p in reads.phases if any(k[1] == p for k in keys)]
    readers = [r for r in reads.readers if any(k[0] == r for k in keys)]
    return series, _add_averages(series, phases, readers), phases, readers


def summarise(values: Series, keys: Iterable[ReadKey], metric: str, table: str, reads: Reads) -> tuple[Series, list[dict]]:
    """Per-case series per (reader, phase) plus the reader averages, and their t-tests.

    Args:
        values: per-case values of every read (see :func:`per_case_values`).
        keys: the reads to summarise.
        metric, table: names written in comparisons.csv (``grade``/``table3``, ``seconds``/``table6``).
        reads: for the reader and phase order.

    Returns:
        the series, and the comparisons: phase vs phase per reader and for the average (same
        reader set only), then reader vs reader within each phase.
    """
    series, average_sets, phases, readers = _with_averages(values, keys, reads)
    tests: list[dict] = []
    for reader in readers + [AVERAGE]:
        for pa, pb in itertools.combinations(phases, 2):
            if (reader, pa) not in series or (reader, pb) not in series:
                continue
            if reader == AVERAGE and average_sets.get(pa) != average_sets.get(pb):
                continue  # different reader sets: the averages are not comparable
            tests.append(comparison_row(table, "", metric, pa, reader, pb, reader, paired_or_independent(series[(reader, pa)], series[(reader, pb)])))
    for phase in phases:
        rs = [r for r in readers if (r, phase) in series]
        for ra, rb in itertools.combinations(rs, 2):
            tests.append(comparison_row(table, "", metric, phase, ra, phase, rb, paired_or_independent(series[(ra, phase)], series[(rb, phase)])))
    return series, tests


def sorted_series(series: Mapping[ReadKey, CaseValues], reads: Reads) -> list[tuple[ReadKey, CaseValues]]:
    """Series in phase order, then reader order (the average last)."""
    order_r = reads.readers + [AVERAGE]
    return sorted(series.items(), key=lambda kv: (reads.phases.index(kv[0][1]) if kv[0][1] in reads.phases else 99,
                                                   order_r.index(kv[0][0]) if kv[0][0] in order_r else 99))


def quality_rows(grade_series: Series, reads: Reads) -> list[dict]:
    """quality.csv (Table 3): mean (SD) grade and, per reader, the count of each grade 1-4."""
    rows = []
    for (reader, phase), values in sorted_series(grade_series, reads):
        mean, sd = mean_sd(values.values())
        row = {"reader": reader, "phase": phase, "n_cases": len(values), "mean_grade": mean, "sd_grade": sd}
        for g in range(1, 5):
            # Per-case reader means are not grades: no distribution for the average rows.
            row[f"n_grade_{g}"] = "" if reader == AVERAGE else sum(1 for v in values.values() if v == g)
        rows.append(row)
    return rows


def agreement_rows(grades: Series, reads: Reads) -> tuple[list[dict], list[str]]:
    """Beyond the paper: weighted Cohen's kappa (linear, quadratic) between readers, per phase.

    Returns:
        agreement.csv rows, and notes on reader pairs skipped (grades not all integers 1-4).
    """
    rows: list[dict] = []
    notes: list[str] = []
    for phase in reads.phases:
        rs = [r for r in reads.readers if grades.get((r, phase))]
        for ra, rb in itertools.combinations(rs, 2):
            ga, gb = grades[(ra, phase)], grades[(rb, phase)]
            common = sorted(set(ga) & set(gb))
            if len(common) < 2:
                continue
            xa, xb = [ga[c] for c in common], [gb[c] for c in common]
            if any(float(g) not in (1.0, 2.0, 3.0, 4.0) for g in xa + xb):
                notes.append(f"Weighted kappa skipped for {ra} vs {rb} on {phase}: grades are not all integers 1-4.")
                continue
            rows.append({"phase": phase, "reader_a": ra, "reader_b": rb, "n_cases": len(common),
                         "kappa_linear": stats.weighted_kappa(xa, xb, weights="linear"),
                         "kappa_quadratic": stats.weighted_kappa(xa, xb, weights="quadratic")})
    return rows, notes


def times_rows(time_series: Series, marks: Series, reads: Reads) -> list[dict]:
    """times.csv (Table 6 and paper, "Reading times"): mean (SD) and total seconds, marks, seconds per mark.

    ``paper_seconds_per_lesion`` is the mean time per case divided by the total marks, as the
    paper's per-lesion figures are computed; ``seconds_per_mark`` is total time / total marks.
    """
    rows = []
    for (reader, phase), values in sorted_series(time_series, reads):
        mean, sd = mean_sd(values.values())
        if reader == AVERAGE:
            rs = [r for r in reads.readers if (r, phase) in time_series]
            n_marks = float(np.mean([sum(marks[(r, phase)].get(c, 0) for c in values) for r in rs]))
        else:
            n_marks = float(sum(marks[(reader, phase)].get(c, 0) for c in values))
        total = float(sum(values.values()))
        rows.append({
            "reader": reader, "phase": phase, "n_cases": len(values), "mean_seconds": mean, "sd_seconds": sd,
            "total_seconds": total, "n_marks": n_marks,
            "seconds_per_mark": total / n_marks if n_marks else math.nan,
            "paper_seconds_per_lesion": mean / n_marks if n_marks else math.nan,
        })
    return rows


@dataclass
class ReadSummaries:
    """Tables 3 and 6 and the agreement between readers.

    Attributes:
        quality, times, agreement: rows of quality.csv, times.csv, agreement.csv.
        comparisons: Table 3 then Table 6 tests (comparisons.csv rows).
        per_case: ``grade`` and ``seconds`` series, reader averages included.
        notes: reader pairs left out of the agreement.
    """

    quality: list[dict] = field(default_factory=list)
    times: list[dict] = field(default_factory=list)
    agreement: list[dict] = field(default_factory=list)
    comparisons: list[dict] = field(default_factory=list)
    per_case: dict[str, Series] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def summarise_reads(reads: Reads, timed: Iterable[ReadKey]) -> ReadSummaries:
    """Grades of every read (Table 3) and reading times of the ``timed`` reads (Table 6).

    Args:
        reads: the validated reads.
        timed: reads whose times are compared (paper, Table 6: the reads that marked lesions).
    """
    values = per_case_values(reads)
    grade_series, grade_tests = summarise(values["grade"], list(reads.grades), "grade", "table3", reads)
    agreement, notes = agreement_rows(values["grade"], reads)
    timed = set(timed)
    time_series, time_tests = summarise(values["seconds"], [k for k in reads.grades if k in timed], "seconds", "table6", reads)
    return ReadSummaries(
        quality=quality_rows(grade_series, reads), times=times_rows(time_series, values["marks"], reads), agreement=agreement,
        comparisons=grade_tests + time_tests, per_case={"grade": grade_series, "seconds": time_series}, notes=notes,
    )


# --------------------------------------------------------------------------- contrast


@dataclass
class ContrastSummary:
    """Table 4: contrast.csv rows, their t-tests, and notes (volumes missing, ROI choices)."""

    rows: list[dict] = field(default_factory=list)
    comparisons: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _case_volumes(case: str, vols: Mapping[str, Path]) -> CaseVolumes:
    """The :class:`.contrast.CaseVolumes` of a case from its named volumes."""
    from .contrast import CaseVolumes  # SimpleITK: imported only when contrast metrics are computed

    def pick(keys: Sequence[str]) -> Optional[Path]:
        return next((vols[k] for k in keys if k in vols), None)

    post = {name: vols[name] for name in CONTRAST_VOLUMES if name in vols}
    return CaseVolumes(case=case, post=post, pre=pick(PRE_KEYS), healthy_brain=pick(HEALTHY_KEYS),
                       brain_mask=pick(BRAIN_MASK_KEYS), lesion_labels=pick(LESION_LABEL_KEYS))


def contrast_rows(info: StudyInfo, reference: Mapping[str, list[Mark]], margin_mm: float, say: Progress) -> tuple[list[dict], list[str]]:
    """CNR/LBR/CEP rows for every case with a reference lesion and known volumes (Table 4).

    Paper, "Performance metrics": lesion ROIs are the parallelograms of the reference axes,
    pooled per case; the healthy-brain ROI is the given label, else automatic (brain mask minus
    ``margin_mm`` around the lesions; see :mod:`.contrast`).

    Returns:
        contrast.csv rows, and notes on skipped cases and on the automatic ROI.
    """
    from .contrast import ContrastInputError, case_contrast  # SimpleITK: only when asked

    if not info.volumes:
        return [], [
            "Contrast metrics (Table 4) skipped: the study gives no volumes. Analyse a study with study.json, or put a "
            "volumes.csv (case,T1,T1c,T1c-pro,T1c-vfa,brain_mask or healthy_brain) beside grades.csv."
        ]
    cases = [c for c, marks in reference.items() if marks]
    rows: list[dict] = []
    skipped: list[str] = []
    for n, case in enumerate(cases):
        vols = info.volumes.get(case)
        if not vols:
            skipped.append(f"{case} (no volumes listed)")
            continue
        lesions = [m.geometry for m in reference[case]]
        try:
            results = case_contrast(_case_volumes(case, vols), lesions, margin_mm=margin_mm)
        except ContrastInputError as exc:
            skipped.append(f"{case} ({exc})")
            continue
        rows.extend(asdict(r) for r in results)
        say("contrast", 0.7 + 0.2 * (n + 1) / max(len(cases), 1), f"contrast metrics: case {case}")
    notes = [f"Contrast metrics skipped for {len(skipped)} case(s): " + "; ".join(skipped)] if skipped else []
    if "automatic" in {r["brain_roi"] for r in rows}:
        notes.append(
            f"Healthy-brain ROI: automatic (brain mask minus a {margin_mm:g} mm margin around the lesions) where no "
            "healthy-brain label was given; the paper drew it by hand. CNR depends on this ROI."
        )
    return rows, notes


def contrast_comparisons(rows: Sequence[Mapping]) -> list[dict]:
    """Table 4 tests: every metric (CNR, LBR, CEP), every pair of volumes, t-test over cases."""
    by_volume: dict[str, dict[str, Mapping]] = {}
    for row in rows:
        by_volume.setdefault(row["volume"], {})[row["case"]] = row
    vols = ordered_volumes(by_volume)
    tests = []
    for metric in ("cnr", "lbr", "cep"):
        for va, vb in itertools.combinations(vols, 2):
            a = {c: r[metric] for c, r in by_volume[va].items()}
            b = {c: r[metric] for c, r in by_volume[vb].items()}
            tests.append(comparison_row("table4", "", metric, va, "", vb, "", paired_or_independent(a, b)))
    return tests


def summarise_contrast(info: StudyInfo, reference: Mapping[str, list[Mark]], margin_mm: float, say: Progress) -> ContrastSummary:
    """Table 4: the contrast rows of every case and the t-tests between volumes."""
    rows, notes = contrast_rows(info, reference, margin_mm, say)
    return ContrastSummary(rows=rows, comparisons=contrast_comparisons(rows), notes=notes)
