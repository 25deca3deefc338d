"""Reads database: WAL, one transaction per action, crash safety and concurrent readers (real processes)."""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Tuple

import pytest

import LesionReaderLib
from LesionReaderLib import ReaderSession
from LesionReaderLib.storage import PhaseTotals, ReadKey, ReadsDatabase
from LesionReaderLib.study import case_order, load_study

# A reader in a child process: every line it prints describes an action that has returned,
# i.e. (by the API contract) been committed.
WRITER = r"""
import json, sys, time
from pathlib import Path
from LesionReaderLib import ReaderSession
study_dir, reader, go = sys.argv[1], sys.argv[2], Path(sys.argv[3])
linger, pace = float(sys.argv[4]), float(sys.argv[5])
(go.parent / f"ready-{reader}").touch()
while not go.exists():
    time.sleep(0.005)
session = ReaderSession.open(study_dir, reader, "T1c")
for _ in range(session.total):
    position = session.position
    grade = 1 + position % 4
    session.grade(grade)
    time.sleep(pace)
    print(json.dumps({"action": "grade", "position": position, "grade": grade}), flush=True)
    for k in range(3):
        long_axis = ((position, k, 0.0), (position + 10.0, k, 0.0))
        short_axis = ((position + 5.0, k - 2.0, 0.0), (position + 5.0, k + 2.0, 0.0))
        lesion = session.add_lesion(long_axis, short_axis)
        time.sleep(pace)
        print(json.dumps({"action": "lesion", "position": position, "id": lesion, "long": long_axis}), flush=True)
    session.next_case()
    print(json.dumps({"action": "next", "position": position}), flush=True)
print(json.dumps({"action": "finished"}), flush=True)
time.sleep(linger)
"""


def start_writer(study_dir: Path, reader: str, go: Path, env: dict, linger: float = 0.0, pace: float = 0.0) -> subprocess.Popen:
    """Start a writer child; it touches ``ready-<reader>`` beside ``go`` and waits for ``go`` to exist."""
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, str(study_dir), reader, str(go), str(linger), str(pace)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


def test_database_is_wal_with_busy_timeout(make_study):
    study_dir = make_study(n_cases=2)
    with ReadsDatabase(study_dir / "reads.sqlite", timeout_s=7) as db:
        assert db.row("PRAGMA journal_mode")[0] == "wal"
        assert db.row("PRAGMA busy_timeout")[0] == 7000
        assert db.row("SELECT value FROM meta WHERE key = 'schema_version'")[0] == "1"


def test_failed_action_rolls_back(make_study, clock):
    study_dir = make_study(n_cases=2, max_lesions=1)
    session = ReaderSession.open(study_dir, "R1", "T1c", clock=clock)
    session.add_lesion(((0, 0, 0), (10, 0, 0)), ((5, -1, 0), (5, 1, 0)))
    before = sqlite3.connect(study_dir / "reads.sqlite").execute("SELECT COUNT(*) FROM events").fetchone()[0]
    with pytest.raises(ValueError):
        session.add_lesion(((0, 0, 0), (10, 0, 0)), ((5, -1, 0), (5, 1, 0)))  # over max_lesions
    after = sqlite3.connect(study_dir / "reads.sqlite").execute("SELECT COUNT(*) FROM events").fetchone()[0]
    assert after == before and len(session.lesions()) == 1
    session.close()


def test_kill_9_mid_session_keeps_every_committed_action(make_study, subprocess_env, tmp_path):
    study_dir = make_study(n_cases=12)
    go = tmp_path / "go"
    go.touch()
    child = start_writer(study_dir, "R1", go, subprocess_env, linger=60)
    reported = []
    assert child.stdout is not None
    for line in child.stdout:
        reported.append(json.loads(line))
        if len(reported) == 23:  # mid-way through case 5, between actions or inside one
            break
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    assert not any(r["action"] == "finished" for r in reported)

    with ReadsDatabase(study_dir / "reads.sqlite") as db:
        assert db.row("PRAGMA integrity_check")[0] == "ok"
    session = ReaderSession.open(study_dir, "R1", "T1c")  # reopening after the crash just works
    order_labels = {}
    for record in reported:
        if record["action"] == "grade":
            session.go_to(record["position"])
            assert session.current_grade == record["grade"]
        elif record["action"] == "lesion":
            session.go_to(record["position"])
            stored = {r.id: r for r in session.lesions()}
            assert record["id"] in stored
            assert stored[record["id"]].long_axis == tuple(tuple(p) for p in record["long"])
        elif record["action"] == "next":
            session.go_to(record["position"])
            assert session.case_done
            order_labels[record["position"]] = session.case_label
    done, total = session.progress
    assert done >= sum(r["action"] == "next" for r in reported) and total == 12
    session.close()


def test_two_readers_write_at_once_from_two_processes(make_study, subprocess_env, tmp_path):
    study_dir = make_study(n_cases=12)
    go = tmp_path / "go"
    children = [start_writer(study_dir, reader, go, subprocess_env, pace=0.01) for reader in ("R1", "R2")]
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"ready-{r}").exists() for r in ("R1", "R2")) and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()  # release both at once
    outputs = [child.communicate(timeout=120) for child in children]
    for child, (out, err) in zip(children, outputs):
        assert child.returncode == 0, err
        assert out.strip().splitlines()[-1] == json.dumps({"action": "finished"})
    with ReadsDatabase(study_dir / "reads.sqlite") as db:
        for reader in ("R1", "R2"):
            assert db.row("SELECT COUNT(*) FROM case_reads WHERE reader = ? AND status = 'done'", (reader,))[0] == 12
            assert db.row("SELECT COUNT(*) FROM lesions WHERE reader = ?", (reader,))[0] == 36
        # Both interleaved in time: neither waited for the other to finish.
        spans = {
            reader: db.row("SELECT MIN(id), MAX(id) FROM events WHERE reader = ? AND action != 'close'", (reader,))
            for reader in ("R1", "R2")
        }
        assert spans["R1"][0] < spans["R2"][1] and spans["R2"][0] < spans["R1"][1]


# -- one query layer: SQL lives in storage.py only ------------------------------------------
#: An SQL statement inside a string: a statement keyword in capitals followed by a space.
SQL_IN_TEXT = re.compile(r"\b(SELECT|INSERT|UPDATE|DELETE|REPLACE INTO|CREATE (TABLE|INDEX)|DROP|ALTER TABLE|PRAGMA|BEGIN|COMMIT|ROLLBACK)\s")


def sql_strings(source: str) -> List[Tuple[int, str]]:
    """``(line, text)`` of every string literal (f-string parts included) that holds SQL."""
    return [
        (node.lineno, node.value)
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and SQL_IN_TEXT.search(node.value)
    ]


def test_sql_detector_finds_plain_and_f_string_sql():
    assert sql_strings('db.row("SELECT * FROM lesions WHERE id = ?", (1,))')
    assert sql_strings('db.execute(f"UPDATE case_reads SET grade = {g} WHERE x")')
    assert sql_strings('db.execute("DELETE FROM lesions")')
    assert not sql_strings('raise ValueError("select a lesion to update, then delete it")')


def test_no_sql_outside_storage():
    lib = Path(LesionReaderLib.__file__).parent
    found = [
        f"{path.name}:{line}: {text[:60]!r}"
        for path in sorted(lib.glob("*.py"))
        if path.name != "storage.py"
        for line, text in sql_strings(path.read_text(encoding="utf-8"))
    ]
    assert not found, "SQL outside LesionReaderLib/storage.py; add a named ReadsDatabase method instead:\n" + "\n".join(found)


def test_read_key_addresses_a_phase_or_one_case(make_study):
    key = ReadKey("R1", "T1c")
    assert key.case is None and key.of_case("c1") == ReadKey("R1", "T1c", "c1")
    with ReadsDatabase(make_study(n_cases=2) / "reads.sqlite") as db:
        with pytest.raises(ValueError, match="names no case"):
            db.case_read(key)  # a case-level query needs the case
        assert db.phase_read(key) is None and db.phase_totals(key) == PhaseTotals(0, 0.0)


def test_named_queries_see_what_the_session_wrote(make_study, clock):
    study_dir = make_study(n_cases=3)
    order = case_order(load_study(study_dir), "R1", "T1c")
    phase_key = ReadKey("R1", "T1c")
    session = ReaderSession.open(study_dir, "R1", "T1c", clock=clock)
    session.grade(2)
    clock.advance(seconds=30)
    lesion_id = session.add_lesion(((0, 0, 0), (10, 0, 0)), ((5, -2, 0), (5, 2, 0)))
    session.next_case()
    session.grade(4)
    session.flag_too_many_lesions()
    session.next_case()
    with ReadsDatabase(study_dir / "reads.sqlite") as db:
        first = phase_key.of_case(order[0])
        assert db.phase_read(phase_key)["position"] == 2
        assert json.loads(db.phase_read(phase_key)["case_order"]) == order
        assert db.case_read(first)["grade"] == 2 and db.case_read(first)["status"] == "done"
        assert db.confirmed_case_ids(phase_key) == {order[0], order[1]}
        assert db.phase_totals(phase_key) == PhaseTotals(done=2, seconds=30.0)
        assert db.count_case_lesions(first) == 1 and db.count_phase_lesions(phase_key) == 1
        assert db.lesion_read(lesion_id) == first and db.lesion_read(lesion_id + 1000) is None
        assert [row["id"] for row in db.case_lesions(first)] == [lesion_id]
        assert list(db.lesions_by_read()) == [first]
        assert {row["case_id"] for row in db.confirmed_case_reads()} == {order[0], order[1]}
        assert db.excluded_cases() == {order[1]}
        assert db.has_reads()
    session.close()
