"""Reads database: WAL, one transaction per action, crash safety and concurrent readers (real processes)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from LesionReaderLib import ReaderSession
from LesionReaderLib.storage import ReadsDatabase

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
