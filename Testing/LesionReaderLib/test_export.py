"""grades.csv / lesions.csv: exact headers, RAS mm coordinates, exclusion, confirmed cases only."""

from __future__ import annotations

import csv

import pytest

from LesionReaderLib import ReaderSession
from LesionReaderLib.export import GRADES_HEADER, LESIONS_HEADER, export_study
from LesionReaderLib.study import StudyError, case_order, load_study

GRADES = "reader,phase,case,grade,seconds,excluded"
LESIONS = (
    "reader,phase,case,lesion,long_mm,short_mm,long_x1,long_y1,long_z1,long_x2,long_y2,long_z2,"
    "short_x1,short_y1,short_z1,short_x2,short_y2,short_z2,center_x,center_y,center_z"
)


def rows(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_headers_are_exactly_the_issues():
    assert ",".join(GRADES_HEADER) == GRADES
    assert ",".join(LESIONS_HEADER) == LESIONS


def test_export_round_trip(make_study, clock, tmp_path):
    study_dir = make_study(n_cases=3)
    order = case_order(load_study(study_dir), "R1", "T1c")
    session = ReaderSession.open(study_dir, "R1", "T1c", clock=clock)
    clock.advance(42.5)
    session.grade(3)
    session.add_lesion(((-10.5, 20, 30), (-0.5, 20, 30)), ((-5.5, 17, 30), (-5.5, 23, 30)))
    session.add_lesion(((0, 0, 0), (0, 0, 8)), ((-1, 0, 4), (1, 0, 4)))
    session.next_case()  # case 1: two lesions
    clock.advance(10)
    session.grade(1)
    session.next_case()  # case 2: read, no lesion
    session.grade(4)  # case 3: graded but not confirmed -> not exported
    session.add_lesion(((0, 0, 0), (9, 0, 0)), ((4.5, -1, 0), (4.5, 1, 0)))
    session.close()

    grades_path, lesions_path = export_study(study_dir, tmp_path / "out")
    assert grades_path.read_text(encoding="utf-8").splitlines()[0] == GRADES
    assert lesions_path.read_text(encoding="utf-8").splitlines()[0] == LESIONS
    grades = rows(grades_path)
    assert {g["case"] for g in grades} == set(order[:2])
    by_case = {g["case"]: g for g in grades}
    assert by_case[order[0]] == {"reader": "R1", "phase": "T1c", "case": order[0], "grade": "3", "seconds": "42.5", "excluded": "0"}
    assert by_case[order[1]]["seconds"] == "10"
    lesions = rows(lesions_path)
    assert [(l["case"], l["lesion"]) for l in lesions] == [(order[0], "1"), (order[0], "2")]  # no rows for the no-lesion case
    first = lesions[0]
    assert float(first["long_mm"]) == pytest.approx(10) and float(first["short_mm"]) == pytest.approx(6)
    assert [float(first[k]) for k in ("long_x1", "long_y1", "long_z1", "long_x2", "long_y2", "long_z2")] == [-10.5, 20, 30, -0.5, 20, 30]
    assert [float(first[k]) for k in ("short_x1", "short_y1", "short_z1", "short_x2", "short_y2", "short_z2")] == [-5.5, 17, 30, -5.5, 23, 30]
    assert [float(first[k]) for k in ("center_x", "center_y", "center_z")] == [-5.5, 20, 30]


def test_too_many_lesions_excludes_the_case_everywhere(make_study, clock, tmp_path):
    study_dir = make_study(n_cases=2)
    for reader in ("R1", "R2"):
        session = ReaderSession.open(study_dir, reader, "T1c", clock=clock)
        for _ in range(session.total):
            session.grade(2)
            if reader == "R1" and session.position == 0:
                for k in range(20):  # the maximum is allowed...
                    session.add_lesion(((20 * k, 0, 0), (20 * k + 10, 0, 0)), ((20 * k + 5, -2, 0), (20 * k + 5, 2, 0)))
                with pytest.raises(ValueError, match="maximum"):  # ...a 21st is not
                    session.add_lesion(((0, 50, 0), (10, 50, 0)), ((5, 48, 0), (5, 52, 0)))
                session.flag_too_many_lesions()
                flagged = session.volumes()["T1c"].parent.name
            session.next_case()
        session.close()
    grades = rows(export_study(study_dir, tmp_path / "out")[0])
    assert len(grades) == 4
    for row in grades:
        assert row["excluded"] == ("1" if row["case"] == flagged else "0")


def test_export_errors(make_study, tmp_path):
    study_dir = make_study(n_cases=2)
    target = tmp_path / "file.txt"
    target.write_text("x", encoding="utf-8")
    with pytest.raises(StudyError, match="is a file; give a folder"):
        export_study(study_dir, target)
    with pytest.raises(StudyError, match="no study at"):
        export_study(tmp_path / "missing", tmp_path / "out")
    grades, lesions = export_study(study_dir, tmp_path / "empty")  # nothing read yet: headers only
    assert grades.read_text(encoding="utf-8") == GRADES + "\n" and lesions.read_text(encoding="utf-8") == LESIONS + "\n"
