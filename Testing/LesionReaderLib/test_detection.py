"""Matching, detection rows, bootstrap and Table 5 tests on a hand-built study (LesionReaderLib.detection)."""

from __future__ import annotations

import pytest

from LesionReaderLib import stats
from LesionReaderLib.detection import detect, detection_row, evaluated_reads, mcnemar
from LesionReaderLib.reads import CsvRow, parse_reads, select_reference
from LesionReaderLib.results import GRADES_COLUMNS, LESIONS_COLUMNS, StudyInfo


def _grades(*reads):
    rows = []
    for reader, phase, cases in reads:
        rows += [dict(zip(GRADES_COLUMNS, (reader, phase, c, "3", "60", "0"))) for c in cases]
    return [CsvRow("grades.csv", i + 2, r) for i, r in enumerate(rows)]


def _lesions(*marks):
    """(reader, phase, case, id, x, long_mm): axes crossing at (x, 0, 0), short axis = long / 2."""
    rows = []
    for reader, phase, case, lesion_id, x, long_mm in marks:
        s = long_mm / 2
        values = [reader, phase, case, lesion_id, long_mm, s, x - long_mm / 2, 0, 0, x + long_mm / 2, 0, 0, x, -s / 2, 0, x, s / 2, 0, "", "", ""]
        rows.append(dict(zip(LESIONS_COLUMNS, (str(v) for v in values))))
    return [CsvRow("lesions.csv", i + 2, r) for i, r in enumerate(rows)]


@pytest.fixture
def study():
    """Reference R3 on T1c-vfa: c1 lesions 1 (8 mm, x=0) and 2 (4 mm, x=60); c2 lesion 1 (12 mm, x=0).

    R1/T1c hits c1/1 and adds a 6 mm false positive; R2/T1c hits c1/2 and c2/1 and also graded c3
    (no reference read); R1/T1c-pro marks nothing but is declared a marker; R4 has marks but no grades.
    """
    grades = _grades(("R3", "T1c-vfa", ["c1", "c2"]), ("R1", "T1c", ["c1", "c2"]), ("R2", "T1c", ["c1", "c2", "c3"]),
                     ("R1", "T1c-pro", ["c1", "c2"]), ("R2", "T1c-pro", ["c1", "c2"]))
    lesions = _lesions(("R3", "T1c-vfa", "c1", "1", 0.0, 8.0), ("R3", "T1c-vfa", "c1", "2", 60.0, 4.0),
                       ("R3", "T1c-vfa", "c2", "1", 0.0, 12.0), ("R1", "T1c", "c1", "a", 1.0, 8.0),
                       ("R1", "T1c", "c1", "fp", 200.0, 6.0), ("R2", "T1c", "c1", "a", 60.5, 4.0),
                       ("R2", "T1c", "c2", "a", 0.5, 12.0), ("R4", "T1c", "c1", "a", 0.0, 8.0))
    reads = parse_reads(grades, lesions)
    info = StudyInfo(markers={"T1c-pro": ("R1",)})
    return reads, info, select_reference(reads, info, reader="R3")


def _row(rows, **match):
    hits = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    assert len(hits) == 1, (match, hits)
    return hits[0]


def test_evaluated_reads_follow_marks_and_declared_markers(study):
    reads, info, ref = study
    assert evaluated_reads(reads, info, ref.key) == [("R1", "T1c"), ("R1", "T1c-pro"), ("R2", "T1c")]
    assert evaluated_reads(reads, StudyInfo(), ref.key) == [("R1", "T1c"), ("R2", "T1c")]


def test_detection_counts_per_threshold(study):
    reads, info, ref = study
    out = detect(reads, info, ref, [0.0, 5.0, 10.0], n_boot=0, seed=0)
    assert out.readers == ["R1", "R2"]
    assert [(r["threshold_mm"], r["reader"], r["phase"]) for r in out.rows[:4]] == [
        (0.0, "R1", "T1c"), (0.0, "R1", "T1c-pro"), (0.0, "R2", "T1c"), (0.0, "average", "T1c")]
    expected = {  # (threshold, reader, phase): (tp, n_ref, fp)
        (0.0, "R1", "T1c"): (1, 3, 1.0), (5.0, "R1", "T1c"): (1, 2, 1.0), (10.0, "R1", "T1c"): (0, 1, 0.0),
        (0.0, "R2", "T1c"): (2, 3, 0.0), (5.0, "R2", "T1c"): (1, 2, 0.0), (10.0, "R2", "T1c"): (1, 1, 0.0),
        (0.0, "R1", "T1c-pro"): (0, 3, 0.0), (0.0, "average", "T1c"): (1.5, 3, 0.5),
    }
    for (t, reader, phase), (tp, n_ref, fp) in expected.items():
        row = _row(out.rows, threshold_mm=t, reader=reader, phase=phase)
        assert (row["tp"], row["tp"] + row["fn"], row["fp"]) == (tp, n_ref, fp), (t, reader, phase)
        assert row["n_cases"] == 2
    avg = _row(out.rows, threshold_mm=0.0, reader="average", phase="T1c")
    assert (avg["sensitivity_ci_low"], avg["sensitivity_ci_high"]) == pytest.approx(stats.clopper_pearson(1.5, 3))
    assert not [r for r in out.rows if r["reader"] == "average" and r["phase"] == "T1c-pro"]  # one reader only
    assert out.bootstrap == []


def test_table5_comparisons_and_matches(study):
    reads, info, ref = study
    out = detect(reads, info, ref, [0.0, 5.0, 10.0], n_boot=50, seed=1)
    at0 = [c for c in out.comparisons if c["threshold_mm"] == 0.0]
    assert [(c["reader_a"], c["phase_a"], c["reader_b"], c["phase_b"], c["metric"]) for c in at0] == [
        ("R1", "T1c", "R1", "T1c-pro", "sensitivity"), ("R1", "T1c", "R1", "T1c-pro", "fdr_per_case"),
        ("R1", "T1c", "R2", "T1c", "sensitivity"), ("R1", "T1c", "R2", "T1c", "fdr_per_case")]
    # R1 vs R2 on T1c: R1 alone finds c1/1, R2 alone finds c1/2 and c2/1.
    assert at0[2]["p_value"] == pytest.approx(stats.mcnemar_midp(1, 2).p_value)
    assert len(out.comparisons) == 12
    assert [(b["threshold_mm"], b["phase"]) for b in out.bootstrap] == [(0.0, "T1c"), (5.0, "T1c"), (10.0, "T1c")]
    assert out.bootstrap[0]["sensitivity"] == pytest.approx(0.5)
    assert len(out.matches) == 10
    pair = _row(out.matches, reader="R1", phase="T1c", case="c1", reference_lesion="1")
    assert pair["mark_lesion"] == "a" and pair["distance_mm"] == pytest.approx(1.0)
    fp = _row([m for m in out.matches if "reference_lesion" not in m], reader="R1", phase="T1c")
    assert (fp["mark_lesion"], fp["mark_long_mm"]) == ("fp", 6.0)
    assert out.notes == [
        "Reader R4 has marks but no grades rows in phase T1c: that read is ignored (the cases of a read are those with a grades row).",
        "Reader R2, phase T1c: 1 case(s) without a reference read are left out of detection.",
    ]


def test_mcnemar_counts_discordant_pairs():
    res = mcnemar([True, True, False, False, True], [False, True, True, True, True])
    assert res == stats.mcnemar_midp(1, 2)


def test_detection_row_without_reference_lesions():
    import numpy as np

    row = detection_row(5.0, "R1", "T1c", 0, 0, 2.0, np.array([1.0, 1.0]))
    assert row["fn"] == 0 and row["n_cases"] == 2 and row["fdr_per_case"] == 1.0
    assert all(row[k] != row[k] for k in ("sensitivity", "sensitivity_ci_low", "sensitivity_ci_high"))  # nan
