"""Grades, reading times, agreement and contrast summaries with their t-tests (LesionReaderLib.summaries)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from LesionReaderLib import stats
from LesionReaderLib.geometry import LesionGeometry
from LesionReaderLib.reads import CsvRow, parse_reads
from LesionReaderLib.results import GRADES_COLUMNS, Mark, StudyInfo
from LesionReaderLib.summaries import (
    agreement_rows,
    contrast_comparisons,
    mean_sd,
    paired_or_independent,
    per_case_values,
    summarise,
    summarise_contrast,
    summarise_reads,
    times_rows,
)

GRADES = {  # (reader, phase) -> case -> grade
    ("R1", "T1c"): {"c1": 2, "c2": 3, "c3": 4}, ("R2", "T1c"): {"c1": 3, "c2": 3, "c3": 4}, ("R3", "T1c"): {"c1": 1, "c2": 2},
    ("R1", "T1c-pro"): {"c1": 3, "c2": 4, "c3": 4}, ("R2", "T1c-pro"): {"c1": 4, "c2": 4, "c3": 4},
}


@pytest.fixture
def reads():
    rows = []
    for (reader, phase), cases in GRADES.items():
        for case, g in cases.items():
            seconds = 30.0 * g + (10.0 if phase == "T1c-pro" else 0.0)
            rows.append(CsvRow("grades.csv", len(rows) + 2, dict(zip(GRADES_COLUMNS, (reader, phase, case, str(g), str(seconds), "0")))))
    return parse_reads(rows, [])


def test_reader_averages_and_which_series_are_compared(reads):
    values = per_case_values(reads)
    series, tests = summarise(values["grade"], list(reads.grades), "grade", "table3", reads)
    assert series[("average", "T1c")] == pytest.approx({"c1": 2.0, "c2": 8 / 3})  # R1-R3 on their common cases
    assert series[("average", "T1c-pro")] == pytest.approx({"c1": 3.5, "c2": 4.0, "c3": 4.0})
    pairs = [(t["reader_a"], t["phase_a"], t["reader_b"], t["phase_b"]) for t in tests]
    # The two averages stand on different reader sets: not compared. R3 has no T1c-pro.
    assert pairs == [("R1", "T1c", "R1", "T1c-pro"), ("R2", "T1c", "R2", "T1c-pro"), ("R1", "T1c", "R2", "T1c"),
                     ("R1", "T1c", "R3", "T1c"), ("R2", "T1c", "R3", "T1c"), ("R1", "T1c-pro", "R2", "T1c-pro")]
    assert all(t["table"] == "table3" and t["metric"] == "grade" and t["threshold_mm"] == "" for t in tests)
    assert tests[0]["p_value"] == pytest.approx(stats.ttest_rel([2, 3, 4], [3, 4, 4]).p_value)


def test_quality_and_times_rows(reads):
    out = summarise_reads(reads, timed=[("R1", "T1c"), ("R1", "T1c-pro")])
    assert [(q["reader"], q["phase"]) for q in out.quality] == [
        ("R1", "T1c"), ("R2", "T1c"), ("R3", "T1c"), ("average", "T1c"), ("R1", "T1c-pro"), ("R2", "T1c-pro"), ("average", "T1c-pro")]
    r1 = out.quality[0]
    assert (r1["mean_grade"], r1["sd_grade"], r1["n_grade_2"], r1["n_grade_4"]) == (3.0, 1.0, 1, 1)
    assert out.quality[3]["n_grade_1"] == ""  # per-case means are not grades
    assert [(t["reader"], t["phase"]) for t in out.times] == [("R1", "T1c"), ("R1", "T1c-pro")]  # timed reads only
    assert out.times[0]["total_seconds"] == 270.0 and out.times[0]["n_marks"] == 0.0 and math.isnan(out.times[0]["seconds_per_mark"])
    assert [t["table"] for t in out.comparisons] == ["table3"] * 6 + ["table6"]
    assert set(out.per_case) == {"grade", "seconds"}


def test_times_per_mark_and_average(reads):
    values = per_case_values(reads)
    series, _ = summarise(values["seconds"], list(reads.grades), "seconds", "table6", reads)
    marks = {key: {c: 2.0 for c in cases} for key, cases in values["marks"].items()}
    rows = times_rows(series, marks, reads)
    r1 = next(r for r in rows if r["reader"] == "R1" and r["phase"] == "T1c")
    assert (r1["n_marks"], r1["seconds_per_mark"], r1["paper_seconds_per_lesion"]) == (6.0, 270.0 / 6, 90.0 / 6)
    avg = next(r for r in rows if r["reader"] == "average" and r["phase"] == "T1c")
    assert avg["n_cases"] == 2 and avg["n_marks"] == 4.0  # mean over the readers of their marks on the common cases


def test_agreement_rows_and_skipped_pairs(reads):
    rows, notes = agreement_rows(per_case_values(reads)["grade"], reads)
    assert [(r["phase"], r["reader_a"], r["reader_b"]) for r in rows] == [
        ("T1c", "R1", "R2"), ("T1c", "R1", "R3"), ("T1c", "R2", "R3"), ("T1c-pro", "R1", "R2")]
    assert rows[0]["kappa_quadratic"] == pytest.approx(stats.weighted_kappa([2, 3, 4], [3, 3, 4]))
    assert notes == []
    rows, notes = agreement_rows({("R1", "T1c"): {"a": 2.5, "b": 3.0}, ("R2", "T1c"): {"a": 2.0, "b": 3.0}}, reads)
    assert rows == [] and notes == ["Weighted kappa skipped for R1 vs R2 on T1c: grades are not all integers 1-4."]


def test_mean_sd_and_test_choice():
    assert mean_sd([]) == (pytest.approx(math.nan, nan_ok=True), pytest.approx(math.nan, nan_ok=True))
    mean, sd = mean_sd([4.0])
    assert mean == 4.0 and math.isnan(sd)
    assert mean_sd([1.0, 3.0]) == (2.0, pytest.approx(np.std([1.0, 3.0], ddof=1)))
    assert paired_or_independent({"a": 1.0, "b": 2.0, "c": 4.0}, {"a": 2.0, "b": 2.5, "c": 5.0}).test == "ttest_rel"
    assert paired_or_independent({"a": 1.0, "b": 2.0}, {"b": 2.5, "c": 5.0, "d": 4.0}).test == "ttest_ind"  # one common case


def test_contrast_comparisons_follow_the_volume_order():
    rows = [{"case": c, "volume": v, "cnr": 1.0 + i + k, "lbr": 1.1 + 0.1 * i + 0.01 * k, "cep": 0.5 * i + k}
            for k, c in enumerate(("c1", "c2", "c3")) for i, v in enumerate(("T1c-pro", "T1c", "Other"))]
    tests = contrast_comparisons(rows)
    assert len(tests) == 9
    assert [(t["phase_a"], t["phase_b"]) for t in tests[:3]] == [("T1c", "T1c-pro"), ("T1c", "Other"), ("T1c-pro", "Other")]
    assert [t["metric"] for t in tests[::3]] == ["cnr", "lbr", "cep"]
    assert all(t["table"] == "table4" and t["reader_a"] == "" for t in tests)


def test_contrast_skipped_without_volumes():
    axis = ((0.0, 0.0, 0.0), (8.0, 0.0, 0.0))
    reference = {"c1": [Mark("R2", "T1c-vfa", "c1", LesionGeometry(axis, axis, "1", 8.0, 4.0, (4.0, 0.0, 0.0)))], "c2": []}
    said = []
    out = summarise_contrast(StudyInfo(), reference, 5.0, lambda *a: said.append(a))
    assert out.rows == [] and out.comparisons == [] and "Contrast metrics (Table 4) skipped" in out.notes[0]
    out = summarise_contrast(StudyInfo(volumes={"c9": {}}), reference, 5.0, lambda *a: said.append(a))
    assert out.notes == ["Contrast metrics skipped for 1 case(s): c1 (no volumes listed)"]  # c2 has no reference lesion
    assert said == []
