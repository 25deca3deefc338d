"""ReaderSession: state machine, timing, wash-out, blinding, lesion rules, exclusion."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from LesionReaderLib import GRADE_LABELS, LesionAxisError, ReaderSession, SessionError, StudyError, WashoutError
from LesionReaderLib.session import validate_lesion_axes
from LesionReaderLib.study import load_study

LONG = ((0.0, 0.0, 0.0), (10.0, 0.0, 0.0))
SHORT = ((5.0, -3.0, 0.0), (5.0, 3.0, 0.0))


def read_phase(study_dir, reader, phase, clock, grade=3, lesions=0):
    """Grade every case (and add ``lesions`` lesions each when allowed), then submit."""
    session = ReaderSession.open(study_dir, reader, phase, clock=clock)
    for _ in range(session.total):
        clock.advance(20)
        session.grade(grade)
        for k in range(lesions if session.marks_lesions else 0):
            session.add_lesion(tuple((x + 20 * k, y, z) for x, y, z in LONG), tuple((x + 20 * k, y, z) for x, y, z in SHORT))
        session.next_case()
    opens = session.submit_phase()
    return opens


def test_grade_labels_are_the_papers():
    assert GRADE_LABELS == {1: "poor", 2: "average", 3: "good", 4: "excellent"}


def test_full_case_cycle(make_study, clock):
    session = ReaderSession.open(make_study(n_cases=3), "R1", "T1c", clock=clock)
    assert session.progress == (0, 3) and session.case_label == "Case 01"
    assert list(session.volumes()) == ["T1c", "T2-FLAIR"]
    with pytest.raises(SessionError, match="grade Case 01"):
        session.next_case()
    session.grade(4)
    lesion = session.add_lesion(long_axis=LONG, short_axis=SHORT)
    [record] = session.lesions()
    assert record.id == lesion and record.number == 1
    assert record.long_mm == pytest.approx(10.0) and record.short_mm == pytest.approx(6.0)
    assert record.center == pytest.approx((5.0, 0.0, 0.0))
    assert session.next_case() is True
    assert session.progress == (1, 3) and session.case_label == "Case 02"
    assert session.lesions() == []  # lesions belong to their case
    assert session.previous_case() is True
    assert session.current_grade == 4 and len(session.lesions()) == 1  # revisit
    session.remove_lesion(lesion)
    assert session.lesions() == []
    assert session.previous_case() is False
    session.go_to(2)
    session.grade(1)
    assert session.next_case() is False  # last case: confirmed, stays
    assert session.progress == (2, 3)
    with pytest.raises(SessionError, match=r"1 case\(s\) not confirmed \(Case 02\)"):
        session.submit_phase()
    session.go_to(session.first_unconfirmed())
    session.grade(2)
    session.confirm_case()
    session.submit_phase()
    assert session.closed
    with pytest.raises(StudyError, match="cannot be reopened"):
        ReaderSession.open(session.study.directory, "R1", "T1c", clock=clock)


def test_grade_validation(make_study, clock):
    session = ReaderSession.open(make_study(n_cases=2), "R1", "T1c", clock=clock)
    for bad in (0, 5, 2.5, "3", True):
        with pytest.raises(SessionError, match="integer from 1 to 4"):
            session.grade(bad)
    session.close()


def test_unknown_reader_or_phase(make_study, clock):
    study_dir = make_study(n_cases=2)
    with pytest.raises(StudyError, match="unknown reader 'R3'.*readers are: R1, R2"):
        ReaderSession.open(study_dir, "R3", "T1c", clock=clock)
    with pytest.raises(StudyError, match="unknown phase 'T2'.*T1c, T1c-pro, T1c-vfa"):
        ReaderSession.open(study_dir, "R1", "T2", clock=clock)


def test_washout_refusal_with_injected_clock(make_study, clock):
    study_dir = make_study(n_cases=2)
    with pytest.raises(SessionError, match="phase T1c is not submitted"):
        ReaderSession.open(study_dir, "R1", "T1c-pro", clock=clock)
    opens = read_phase(study_dir, "R1", "T1c", clock)
    assert opens == clock() + timedelta(days=10)
    clock.advance(days=9, hours=23)
    with pytest.raises(WashoutError) as info:
        ReaderSession.open(study_dir, "R1", "T1c-pro", clock=clock)
    assert info.value.opens_at == opens
    assert opens.strftime("%Y-%m-%d %H:%M UTC") in str(info.value)  # says when it opens
    assert "1 h 00 min to go" in str(info.value)
    # Another reader's wash-out is independent.
    ReaderSession.open(study_dir, "R2", "T1c", clock=clock).close()
    clock.advance(hours=1)
    ReaderSession.open(study_dir, "R1", "T1c-pro", clock=clock).close()


def test_active_time_pauses_and_follows_the_shown_case(make_study, clock):
    study_dir = make_study(n_cases=3)
    session = ReaderSession.open(study_dir, "R1", "T1c", clock=clock)
    clock.advance(30)
    session.grade(3)
    clock.advance(15)
    assert session.case_seconds() == pytest.approx(45)
    session.pause()
    clock.advance(3600)  # coffee: not counted
    assert session.case_seconds() == pytest.approx(45)
    with pytest.raises(SessionError, match="paused; resume"):
        session.grade(2)
    session.resume()
    clock.advance(5)
    session.next_case()  # 50 s go to case 1
    clock.advance(7)
    session.previous_case()  # 7 s go to case 2
    clock.advance(3)
    session.close()  # 3 s more to case 1, flushed on close
    clock.advance(1000)  # closed: not counted
    session = ReaderSession.open(study_dir, "R1", "T1c", clock=clock)
    assert session.case_seconds() == pytest.approx(53)
    assert session.phase_seconds() == pytest.approx(60)
    session.close()


def test_lesion_axis_rules():
    long_axis, short_axis = validate_lesion_axes(LONG, SHORT)
    assert long_axis == LONG and short_axis == SHORT
    with pytest.raises(LesionAxisError, match=r"short axis \(12.0 mm\) is longer than the long axis \(10.0 mm\)"):
        validate_lesion_axes(LONG, ((5, -6, 0), (5, 6, 0)))
    with pytest.raises(LesionAxisError, match="makes 45 deg with the long axis; it must be roughly perpendicular"):
        validate_lesion_axes(LONG, ((3, -2, 0), (7, 2, 0)))
    validate_lesion_axes(LONG, ((4, -3, 0), (6, 3, 0)))  # ~72 deg: roughly perpendicular
    with pytest.raises(LesionAxisError, match="passes .* mm from the long axis"):
        validate_lesion_axes(LONG, ((5, 20, 0), (5, 26, 0)))
    with pytest.raises(LesionAxisError, match="long axis is 0.00 mm"):
        validate_lesion_axes(((1, 1, 1), (1, 1, 1)), SHORT)
    with pytest.raises(LesionAxisError, match="long_axis must be two .*3D points in RAS mm"):
        validate_lesion_axes(((1, 1), (1, 1, 1, 3)), SHORT)
    with pytest.raises(LesionAxisError, match="finite"):
        validate_lesion_axes(((0, 0, float("nan")), (1, 0, 0)), SHORT)


def test_update_lesion_keeps_stored_axes_on_invalid_input(make_study, clock):
    session = ReaderSession.open(make_study(n_cases=2), "R1", "T1c", clock=clock)
    lesion = session.add_lesion(LONG, SHORT)
    session.update_lesion(lesion, ((0, 0, 0), (20, 0, 0)), ((10, -4, 0), (10, 4, 0)))
    assert session.lesions()[0].long_mm == pytest.approx(20)
    with pytest.raises(LesionAxisError):
        session.update_lesion(lesion, LONG, ((0, 0, 0), (10, 0, 0)))
    assert session.lesions()[0].long_mm == pytest.approx(20)
    with pytest.raises(SessionError, match="not a lesion of Case 01"):
        session.remove_lesion(lesion + 100)
    session.close()


def test_reference_phase_only_reference_reader_marks(make_study, clock):
    study_dir = make_study(n_cases=2)
    for reader in ("R1", "R2"):
        read_phase(study_dir, reader, "T1c", clock)
        clock.advance(days=10)
        read_phase(study_dir, reader, "T1c-pro", clock)
        clock.advance(days=10)
    r1 = ReaderSession.open(study_dir, "R1", "T1c-vfa", clock=clock)
    assert not r1.marks_lesions
    r1.grade(3)  # R1 still grades T1c-vfa
    with pytest.raises(SessionError, match="only R2 mark lesions"):
        r1.add_lesion(LONG, SHORT)
    r1.close()
    r2 = ReaderSession.open(study_dir, "R2", "T1c-vfa", clock=clock)
    assert r2.marks_lesions
    r2.add_lesion(LONG, SHORT)
    r2.close()


def test_more_than_max_lesions_means_flag_and_exclusion(make_study, clock):
    study_dir = make_study(n_cases=2, max_lesions=3)
    session = ReaderSession.open(study_dir, "R1", "T1c", clock=clock)
    session.grade(2)
    for k in range(3):
        session.add_lesion(tuple((x + 20 * k, y, z) for x, y, z in LONG), SHORT if k == 0 else tuple((x + 20 * k, y, z) for x, y, z in SHORT))
    with pytest.raises(SessionError, match=r"already has 3 lesions, the study's maximum \(3\); flag it 'too many lesions'"):
        session.add_lesion(LONG, SHORT)
    session.flag_too_many_lesions()
    assert session.too_many_lesions and session.state()["too_many_lesions"]
    with pytest.raises(SessionError, match="flagged 'too many lesions'"):
        session.add_lesion(LONG, SHORT)
    session.close()


def test_blinding_nothing_identifying_reaches_the_reader(make_study, clock):
    study_dir = make_study(n_cases=4)
    study = load_study(study_dir)
    secrets = [c.id for c in study.cases] + [str(p) for c in study.cases for p in c.volumes.values()]
    secrets += ["t1c.nii.gz", "flair.nii.gz", "PAT", "DOE", str(study_dir)]
    session = ReaderSession.open(study_dir, "R1", "T1c", clock=clock)
    for _ in range(session.total):
        session.grade(3)
        session.add_lesion(LONG, SHORT)
        shown = [session.case_label, json.dumps(session.state()), json.dumps([r.to_dict() for r in session.lesions()])]
        for text in shown:
            for secret in secrets:
                assert secret not in text, f"{secret!r} leaked into {text!r}"
        # ... while the viewer does get the files it must load.
        assert session.volumes()["T1c"].name == "t1c.nii.gz"
        session.next_case()
    session.submit_phase()
    # The next phase shows none of the previous phase's answers.
    clock.advance(days=10)
    session = ReaderSession.open(study_dir, "R1", "T1c-pro", clock=clock)
    state = session.state()
    assert state["grade"] is None and state["lesions"] == [] and state["done"] == 0
    session.close()


def test_second_window_takes_over(make_study, clock):
    study_dir = make_study(n_cases=2)
    first = ReaderSession.open(study_dir, "R1", "T1c", clock=clock)
    first.grade(2)
    second = ReaderSession.open(study_dir, "R1", "T1c", clock=clock)
    assert second.current_grade == 2
    with pytest.raises(SessionError, match="opened in another window or process"):
        first.grade(3)
    second.grade(4)
    first.close()
    assert second.current_grade == 4
    second.close()
    with pytest.raises(SessionError, match="closed"):
        second.grade(1)
