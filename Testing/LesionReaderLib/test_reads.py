"""Parsing and validating the reads, and choosing the reference read (LesionReaderLib.reads)."""

from __future__ import annotations

import math

import pytest

from LesionReaderLib.reads import CsvRow, parse_reads, read_csv, reference_notes, select_reference
from LesionReaderLib.results import GRADES_COLUMNS, LESIONS_COLUMNS, AnalysisError, StudyInfo


def grade(line, reader, phase, case, grade="3", seconds="60", excluded="0"):
    return CsvRow("grades.csv", line, dict(zip(GRADES_COLUMNS, (reader, phase, case, grade, seconds, excluded))))


def lesion(line, reader, phase, case, lesion_id, x=0.0, long_mm=8.0, short_mm=4.0, center=None, lengths=True):
    """A lesions.csv row with axes crossing at (x, 0, 0) in the axial plane."""
    values = [reader, phase, case, lesion_id, f"{long_mm}" if lengths else "", f"{short_mm}" if lengths else "",
              x - long_mm / 2, 0, 0, x + long_mm / 2, 0, 0, x, -short_mm / 2, 0, x, short_mm / 2, 0]
    values += list(center) if center is not None else ["", "", ""]
    return CsvRow("lesions.csv", line, dict(zip(LESIONS_COLUMNS, (str(v) for v in values))))


def test_parse_reads_orders_and_defaults():
    grades = [grade(2, "R1", "T1c-pro", "c1"), grade(3, "R2", "T1c-vfa", "c1"), grade(4, "R1", "T1c", "c1")]
    lesions = [lesion(2, "R2", "T1c-vfa", "c1", "1", x=10.0, lengths=False), lesion(3, "R1", "T1c", "c1", "a", x=11.0)]
    reads = parse_reads(grades, lesions, reader_order=["R2"])
    assert reads.readers == ["R2", "R1"]  # the study's order first
    assert reads.phases == ["T1c", "T1c-pro", "T1c-vfa"]  # known reading order
    ref = reads.marks[("R2", "T1c-vfa")]["c1"][0]
    assert ref.long_mm == pytest.approx(8.0) and ref.short_mm == pytest.approx(4.0)  # lengths from the end points
    assert ref.center == pytest.approx((10.0, 0.0, 0.0))  # centre = mean of the end points
    assert reads.grades[("R1", "T1c")]["c1"] == (3.0, 60.0)
    assert reads.notes == []


def test_parse_reads_notes_untimed_rows_and_orphan_lesions():
    grades = [grade(2, "R1", "T1c", "c1", seconds=""), grade(3, "R1", "T1c", "c2", grade="", seconds="", excluded="1")]
    lesions = [lesion(2, "R1", "T1c", "c9", "1")]
    reads = parse_reads(grades, lesions)
    assert reads.excluded == {"c2"}
    assert math.isnan(reads.grades[("R1", "T1c")]["c2"][0])  # an excluded case may lack its grade
    assert len(reads.notes) == 2
    assert "1 grades row(s) have no reading time" in reads.notes[0] and "line 2" in reads.notes[0]  # excluded row not counted
    assert "lesion row(s) of cases without a grades row" in reads.notes[1] and "case c9" in reads.notes[1]


@pytest.mark.parametrize(
    "rows, message",
    [
        ([grade(2, "R1", "T1c", "")], r"grades\.csv, line 2, column 'case': is empty"),
        ([grade(2, "average", "T1c", "c1")], r"column 'reader': 'average' is reserved"),
        ([grade(2, "R1", "T1c", "c1"), grade(5, "R1", "T1c", "c1")], r"line 5, column 'case': a second grades row .*first on line 2"),
        ([grade(2, "R1", "T1c", "c1", excluded="maybe")], r"column 'excluded': holds 'maybe'"),
        ([grade(2, "R1", "T1c", "c1", grade="2.5")], r"column 'grade': holds 2.5, not a whole grade"),
        ([grade(2, "R1", "T1c", "c1", grade="")], r"column 'grade': is empty"),
    ],
)
def test_grade_rows_refused_with_line_and_column(rows, message):
    with pytest.raises(AnalysisError, match=message):
        parse_reads(rows, [])


def test_lesion_rows_refused_with_line_and_column():
    grades = [grade(2, "R1", "T1c", "c1")]
    with pytest.raises(AnalysisError, match=r"lesions\.csv, line 3, column 'lesion': lesion '1' appears twice .*first on line 2"):
        parse_reads(grades, [lesion(2, "R1", "T1c", "c1", "1"), lesion(3, "R1", "T1c", "c1", "1")])
    with pytest.raises(AnalysisError, match=r"line 2, column 'short_mm': the short axis .* is longer than the long axis"):
        parse_reads(grades, [lesion(2, "R1", "T1c", "c1", "1", long_mm=4.0, short_mm=8.0)])
    with pytest.raises(AnalysisError, match=r"line 2, column 'center_x': the centre is 50\.0 mm from the middle"):
        parse_reads(grades, [lesion(2, "R1", "T1c", "c1", "1", center=(50.0, 0.0, 0.0))])


def test_csv_row_require_names_the_first_empty_column():
    row = CsvRow("f.csv", 7, {"a": "1", "b": "", "c": ""})
    with pytest.raises(AnalysisError, match=r"f\.csv, line 7, column 'b': is empty; fix it\."):
        row.require(("a", "b", "c"), "fix it")


def test_read_csv_reports_missing_file_and_columns(tmp_path):
    with pytest.raises(AnalysisError, match="grades.csv is missing"):
        read_csv(tmp_path / "grades.csv", GRADES_COLUMNS)
    (tmp_path / "grades.csv").write_text("reader,phase\nR1,T1c\n", encoding="utf-8")
    with pytest.raises(AnalysisError, match=r"line 1 \(header\): lacks column\(s\) case, grade"):
        read_csv(tmp_path / "grades.csv", GRADES_COLUMNS)


def test_select_reference_defaults_and_errors():
    grades = [grade(2, "R2", "T1c-vfa", "c1"), grade(3, "R2", "T1c-vfa", "c2", excluded="1"), grade(4, "R1", "T1c", "c1")]
    lesions = [lesion(2, "R2", "T1c-vfa", "c1", "1"), lesion(3, "R1", "T1c", "c1", "1")]
    reads = parse_reads(grades, lesions)
    ref = select_reference(reads, StudyInfo())  # default phase T1c-vfa, its only marking reader
    assert (ref.reader, ref.phase, ref.cases, ref.n_lesions) == ("R2", "T1c-vfa", ["c1"], 1)
    assert ref.keys(["c1"], 0.0) == [("c1", "1")] and ref.keys(["c1"], 10.0) == []
    assert reference_notes(ref, reads) == [
        "1 case(s) flagged 'excluded' (e.g. more than 20 lesions) are left out of every analysis: c2."]
    assert select_reference(reads, StudyInfo(reference_phase="T1c")).reader == "R1"
    with pytest.raises(AnalysisError, match="reference phase 'T2' has no reads"):
        select_reference(reads, StudyInfo(), phase="T2")
    with pytest.raises(AnalysisError, match="reference reader 'R1' has no grades.csv row in phase 'T1c-vfa'"):
        select_reference(reads, StudyInfo(), reader="R1")
    two = parse_reads(grades + [grade(5, "R1", "T1c-vfa", "c1")], lesions + [lesion(4, "R1", "T1c-vfa", "c1", "1")])
    with pytest.raises(AnalysisError, match="cannot tell the reference reader: 2 readers"):
        select_reference(two, StudyInfo())
