"""Lesion detection against the reference (paper, "Performance metrics", Table 5).

A reader's mark matches a reference lesion when their centres are closer than half the average
of the two lesions' long and short axes (:mod:`.matching`). Per reader and phase, and for the
reader average, this gives sensitivity (SE), false detections per case (FDR), PPV and F1,
stratified by long-axis size thresholds (paper: 10, 5 and 0 mm). Intervals and tests follow
"Statistical analysis": Clopper-Pearson (SE) and Student t (FDR) 95% intervals, McNemar mid-p
(SE) and Wilcoxon signed-rank (FDR) two-tailed tests.

Choices the paper leaves open (listed in the README):

- a false positive counts at a size threshold when its own long axis reaches it;
- reader-average rows: sensitivity = mean TP count / reference count with the Clopper-Pearson
  interval on these (non-integer) counts; false detections per case = the per-case mean over
  readers, with its Student-t interval; PPV = mean TP / (mean TP + mean FP); the reader-average
  McNemar test pools the readers' lesion pairs and the reader-average Wilcoxon test uses the
  per-case means;
- beyond the paper: a case-level bootstrap interval of the reader-average sensitivity (lesions
  cluster within cases), in ``bootstrap.csv``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from . import stats
from .matching import match_lesions
from .results import AVERAGE, Mark, ReadKey, Reads, Reference, StudyInfo, comparison_row

#: (case, reference lesion id).
LesionKey = tuple[str, str]


@dataclass
class PairDetection:
    """Detection outcome of one (reader, phase) against the reference, per lesion and per case.

    Attributes:
        reader, phase: the read.
        cases: cases of the read that have a reference read, sorted.
        detected: (case, reference lesion) -> matched by a mark.
        fp_long: case -> long axes of the marks that matched no reference lesion.
        marks_per_case: case -> number of marks.
    """

    reader: str
    phase: str
    cases: list[str]
    detected: dict[LesionKey, bool]
    fp_long: dict[str, list[float]]
    marks_per_case: dict[str, int]

    def fp_counts(self, cases: Sequence[str], threshold: float) -> np.ndarray:
        """False positives per case whose own long axis reaches ``threshold``."""
        return np.array([sum(1 for length in self.fp_long.get(c, []) if length >= threshold) for c in cases], dtype=float)


@dataclass
class DetectionTables:
    """Everything the detection stage computed.

    Attributes:
        evaluated: the reads compared with the reference, in reader then phase order.
        readers: readers of ``evaluated``, in study order.
        rows: detection.csv rows; per threshold: the readers' rows, then the reader averages.
        comparisons: Table 5 tests (comparisons.csv rows).
        bootstrap: bootstrap.csv rows (beyond the paper).
        matches: matches.csv rows (every reference lesion / mark pairing, for audit).
        notes: reads left out, cases without a reference read.
    """

    evaluated: list[ReadKey] = field(default_factory=list)
    readers: list[str] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)
    comparisons: list[dict] = field(default_factory=list)
    bootstrap: list[dict] = field(default_factory=list)
    matches: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- matching


def evaluated_reads(reads: Reads, info: StudyInfo, reference: ReadKey) -> list[ReadKey]:
    """Graded reads other than the reference that marked lesions or were asked to (study.json markers)."""
    evaluated: list[ReadKey] = []
    for reader in reads.readers:
        for phase in reads.phases:
            key = (reader, phase)
            if key == reference or key not in reads.grades:
                continue
            marker = info.markers.get(phase)
            declared = marker is not None and (marker == "all" or reader in marker)
            if key in reads.marks or declared:
                evaluated.append(key)
    return evaluated


def _match_case(reader: str, phase: str, case: str, ref: list[Mark], marks: list[Mark], detection: PairDetection) -> list[dict]:
    """Match the marks of one case to its reference lesions; fills ``detection``, returns matches.csv rows."""
    detection.marks_per_case[case] = len(marks)
    result = match_lesions([m.geometry for m in ref], [m.geometry for m in marks])
    matched = result.mark_for_reference()
    for i, r in enumerate(ref):
        detection.detected[(case, r.lesion)] = i in matched
    detection.fp_long[case] = [marks[j].long_mm for j in result.unmatched_marks]
    where = {"reader": reader, "phase": phase, "case": case}
    rows = [{**where, "reference_lesion": ref[i].lesion, "reference_long_mm": ref[i].long_mm, "mark_lesion": marks[j].lesion,
             "mark_long_mm": marks[j].long_mm, "distance_mm": d} for i, j, d in result.pairs]
    rows += [{**where, "reference_lesion": ref[i].lesion, "reference_long_mm": ref[i].long_mm} for i in result.unmatched_reference]
    rows += [{**where, "mark_lesion": marks[j].lesion, "mark_long_mm": marks[j].long_mm} for j in result.unmatched_marks]
    return rows


def match_read(reads: Reads, reference: Reference, key: ReadKey) -> tuple[PairDetection, list[dict], list[str]]:
    """Match one read's marks to the reference lesions, case by case.

    Returns:
        the detection outcome, its matches.csv rows, and a note when cases lack a reference read.
    """
    reader, phase = key
    graded = set(reads.grades[key]) - reads.excluded
    cases = sorted(graded & set(reference.cases))
    notes = []
    if graded - set(reference.cases):
        notes.append(f"Reader {reader}, phase {phase}: {len(graded - set(reference.cases))} case(s) without a reference read are left out of detection.")
    detection = PairDetection(reader, phase, cases, {}, {}, {})
    rows: list[dict] = []
    for case in cases:
        rows += _match_case(reader, phase, case, reference.lesions[case], reads.marks.get(key, {}).get(case, []), detection)
    return detection, rows, notes


# --------------------------------------------------------------------------- detection.csv


def detection_row(threshold: float, reader: str, phase: str, tp: float, n_ref: int, fp: float, fdr_values: np.ndarray) -> dict:
    """One detection.csv row (paper, "Performance metrics" and Table 5).

    Args:
        threshold: long-axis size threshold in mm.
        reader, phase: the read (reader :data:`AVERAGE` for the reader average).
        tp: true positives (a mean over readers for the average).
        n_ref: reference lesions at this threshold.
        fp: false positives (a mean over readers for the average).
        fdr_values: false positives per case, for the FDR and its Student-t interval.
    """
    fn = n_ref - tp
    if n_ref > 0:
        se = tp / n_ref
        lo, hi = stats.clopper_pearson(tp, n_ref)
    else:
        se = lo = hi = math.nan
    fdr, flo, fhi = stats.student_t_ci(fdr_values)
    pp = stats.ppv(tp, fp)
    return {
        "threshold_mm": threshold, "reader": reader, "phase": phase, "tp": tp, "fn": fn, "fp": fp,
        "n_cases": len(fdr_values), "sensitivity": se, "sensitivity_ci_low": lo, "sensitivity_ci_high": hi,
        "fdr_per_case": fdr, "fdr_ci_low": flo, "fdr_ci_high": fhi, "ppv": pp, "f1": stats.f1_score(se, pp),
    }


class _Detections:
    """The matched reads of one analysis, with the reference, for the rows and tests of Table 5."""

    def __init__(self, detections: dict[ReadKey, PairDetection], reference: Reference, readers: list[str], phases: list[str]):
        self.by_read = detections
        self.reference = reference
        self.readers = readers
        self.phases = phases
        # Reader-average sets (Table 5, "Reader Average"): phases read by at least two readers.
        self.average_sets: dict[str, list[str]] = {}
        for phase in phases:
            rs = [r for r in readers if (r, phase) in detections]
            if len(rs) >= 2:
                self.average_sets[phase] = rs

    def common_cases(self, readers: Sequence[str], phases: Sequence[str]) -> list[str]:
        """Cases read by every one of ``readers`` in every one of ``phases``, sorted."""
        return sorted(set.intersection(*[set(self.by_read[(r, p)].cases) for r in readers for p in phases]))

    def reader_rows(self, t: float) -> list[dict]:
        """detection.csv rows of every reader and phase at threshold ``t``."""
        rows = []
        for reader in self.readers:
            for phase in self.phases:
                pd = self.by_read.get((reader, phase))
                if pd is None:
                    continue
                keys = self.reference.keys(pd.cases, t)
                tp = sum(pd.detected[k] for k in keys)
                fpc = pd.fp_counts(pd.cases, t)
                rows.append(detection_row(t, reader, phase, tp, len(keys), float(fpc.sum()), fpc))
        return rows

    def average_row(self, t: float, phase: str) -> dict:
        """The reader-average detection.csv row of ``phase`` at threshold ``t`` (see the module notes)."""
        rs = self.average_sets[phase]
        cases = self.common_cases(rs, [phase])
        keys = self.reference.keys(cases, t)
        tps = [sum(self.by_read[(r, phase)].detected[k] for k in keys) for r in rs]
        fps = np.array([self.by_read[(r, phase)].fp_counts(cases, t) for r in rs])
        return detection_row(t, AVERAGE, phase, float(np.mean(tps)), len(keys), float(fps.sum(axis=1).mean()),
                             fps.mean(axis=0) if len(cases) else np.array([]))

    def bootstrap_row(self, t: float, phase: str, n_boot: int, seed: int) -> Optional[dict]:
        """Beyond the paper: case-level bootstrap interval of the reader-average sensitivity.

        Lesions cluster within cases, so cases (with all their lesions) are resampled; ``None``
        when ``n_boot`` is 0 or no case is common to the readers.
        """
        rs = self.average_sets[phase]
        cases = self.common_cases(rs, [phase])
        if n_boot <= 0 or not cases:
            return None
        keys = self.reference.keys(cases, t)
        tps = [sum(self.by_read[(r, phase)].detected[k] for k in keys) for r in rs]
        lesions = self.reference.lesions
        ref_n = np.array([sum(1 for m in lesions[c] if m.long_mm >= t) for c in cases], dtype=float)
        tp_case = np.array([[sum(self.by_read[(r, phase)].detected[(c, m.lesion)] for m in lesions[c] if m.long_mm >= t)
                             for c in cases] for r in rs], dtype=float)

        def boot_stat(idx: np.ndarray) -> float:
            n = ref_n[idx].sum()
            return tp_case[:, idx].sum(axis=1).mean() / n if n > 0 else math.nan

        lo, hi = stats.bootstrap_ci(boot_stat, len(cases), n_boot=n_boot, seed=seed)
        return {"threshold_mm": t, "reader": AVERAGE, "phase": phase, "n_cases": len(cases),
                "sensitivity": float(np.mean(tps)) / len(keys) if keys else math.nan,
                "ci_low": lo, "ci_high": hi, "n_boot": n_boot, "seed": seed}

    # ------------------------------------------------------------------- Table 5 tests

    def _compared_readers(self, reader: str, pa: str, pb: str) -> Optional[list[str]]:
        """Readers behind ``reader``'s series in both phases; ``None`` when not comparable."""
        if reader != AVERAGE:
            return [reader] if (reader, pa) in self.by_read and (reader, pb) in self.by_read else None
        if pa not in self.average_sets or pb not in self.average_sets or self.average_sets[pa] != self.average_sets[pb]:
            return None  # different reader sets: the averages are not comparable
        return self.average_sets[pa]

    def _phase_tests(self, t: float, reader: str, pa: str, pb: str, rs: list[str]) -> list[dict]:
        """McNemar mid-p on the pooled lesion pairs and Wilcoxon on per-case mean FPs, phase ``pa`` vs ``pb``."""
        cases = self.common_cases(rs, [pa, pb])
        keys = self.reference.keys(cases, t)
        xa = [self.by_read[(r, pa)].detected[k] for r in rs for k in keys]
        xb = [self.by_read[(r, pb)].detected[k] for r in rs for k in keys]
        fa = np.mean([self.by_read[(r, pa)].fp_counts(cases, t) for r in rs], axis=0) if cases else []
        fb = np.mean([self.by_read[(r, pb)].fp_counts(cases, t) for r in rs], axis=0) if cases else []
        return [comparison_row("table5", t, "sensitivity", pa, reader, pb, reader, mcnemar(xa, xb)),
                comparison_row("table5", t, "fdr_per_case", pa, reader, pb, reader, stats.wilcoxon_signed_rank(fa, fb))]

    def _reader_tests(self, t: float, phase: str, ra: str, rb: str) -> list[dict]:
        """Reader ``ra`` vs ``rb`` within ``phase`` (Table 5, "R1 vs. R2") on their common cases."""
        da, db = self.by_read[(ra, phase)], self.by_read[(rb, phase)]
        cases = sorted(set(da.cases) & set(db.cases))
        keys = self.reference.keys(cases, t)
        return [comparison_row("table5", t, "sensitivity", phase, ra, phase, rb,
                               mcnemar([da.detected[k] for k in keys], [db.detected[k] for k in keys])),
                comparison_row("table5", t, "fdr_per_case", phase, ra, phase, rb,
                               stats.wilcoxon_signed_rank(da.fp_counts(cases, t), db.fp_counts(cases, t)))]

    def comparisons(self, t: float) -> list[dict]:
        """Table 5 tests at threshold ``t``: phase vs phase per reader and for the average, then reader vs reader."""
        rows: list[dict] = []
        for reader in self.readers + [AVERAGE]:
            for pa, pb in itertools.combinations(self.phases, 2):
                rs = self._compared_readers(reader, pa, pb)
                if rs is not None:
                    rows += self._phase_tests(t, reader, pa, pb, rs)
        for phase in self.phases:
            rs = [r for r in self.readers if (r, phase) in self.by_read]
            for ra, rb in itertools.combinations(rs, 2):
                rows += self._reader_tests(t, phase, ra, rb)
        return rows


def mcnemar(pairs_a: Sequence[bool], pairs_b: Sequence[bool]) -> stats.TestResult:
    """McNemar mid-p test on matched detection outcomes (paper, "Statistical analysis")."""
    b = sum(1 for x, y in zip(pairs_a, pairs_b) if x and not y)
    c = sum(1 for x, y in zip(pairs_a, pairs_b) if y and not x)
    return stats.mcnemar_midp(b, c)


def detect(reads: Reads, info: StudyInfo, reference: Reference, thresholds: Sequence[float],
           n_boot: int, seed: int) -> DetectionTables:
    """Match every evaluated read to the reference and build Table 5's rows and tests.

    Args:
        reads: the validated reads.
        info: the study's markers (reads asked to mark lesions are evaluated even without marks).
        reference: the reference lesions.
        thresholds: long-axis size thresholds in mm, ascending (paper: 0, 5, 10).
        n_boot: bootstrap replicates of the reader-average sensitivity (0 skips).
        seed: seed of the bootstrap.
    """
    out = DetectionTables(evaluated=evaluated_reads(reads, info, reference.key))
    for key in reads.marks:
        if key not in reads.grades and key != reference.key:
            out.notes.append(f"Reader {key[0]} has marks but no grades rows in phase {key[1]}: that read is ignored (the cases of a read are those with a grades row).")
    by_read: dict[ReadKey, PairDetection] = {}
    for key in out.evaluated:
        by_read[key], matches, notes = match_read(reads, reference, key)
        out.matches += matches
        out.notes += notes
    phases = [p for p in reads.phases if any(k[1] == p for k in by_read)]
    out.readers = [r for r in reads.readers if any(k[0] == r for k in by_read)]
    table = _Detections(by_read, reference, out.readers, phases)
    for t in thresholds:
        out.rows += table.reader_rows(t)
        for phase in table.average_sets:
            out.rows.append(table.average_row(t, phase))
            boot = table.bootstrap_row(t, phase, n_boot, seed)
            if boot is not None:
                out.bootstrap.append(boot)
        out.comparisons += table.comparisons(t)
    return out

