"""Study status: cases done / total, time spent, when the next phase opens."""

from __future__ import annotations

from LesionReaderLib import ReaderSession
from LesionReaderLib.status import format_status, study_status


def test_status_through_a_phase_and_its_washout(make_study, clock):
    study_dir = make_study(n_cases=3)
    rows = {(r.reader, r.phase): r for r in study_status(study_dir, clock=clock)}
    assert rows["R1", "T1c"].state == "not opened" and rows["R1", "T1c-pro"].state == "locked"

    session = ReaderSession.open(study_dir, "R1", "T1c", clock=clock)
    for _ in range(3):
        clock.advance(60)
        session.grade(3)
        session.add_lesion(((0, 0, 0), (10, 0, 0)), ((5, -2, 0), (5, 2, 0)))
        session.next_case()
        if session.progress[0] == 1:
            session.pause()
            mid = {(r.reader, r.phase): r for r in study_status(study_dir, clock=clock)}
            assert mid["R1", "T1c"].state == "paused" and mid["R1", "T1c"].done == 1
            session.resume()
    opens = session.submit_phase()
    clock.advance(days=2)
    rows = {(r.reader, r.phase): r for r in study_status(study_dir, clock=clock)}
    t1c, pro = rows["R1", "T1c"], rows["R1", "T1c-pro"]
    assert (t1c.state, t1c.done, t1c.total, t1c.lesions) == ("submitted", 3, 3, 3)
    assert t1c.seconds == 180
    assert pro.state == "wash-out" and pro.opens_at == opens
    text = format_status(list(rows.values()), now=clock())
    assert "3 / 3" in text and "3 min 00 s" in text
    assert f"opens {opens:%Y-%m-%d %H:%M} UTC (in 8 d 0 h)" in text
    clock.advance(days=8)
    assert {(r.reader, r.phase): r for r in study_status(study_dir, clock=clock)}["R1", "T1c-pro"].state == "not opened"
    # Status never shows case ids.
    assert "PAT" not in text
