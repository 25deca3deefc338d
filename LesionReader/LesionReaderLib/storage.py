"""The reads database: one SQLite file per study, WAL mode, one transaction per reader action.

Paper, "Reader study protocol": "Reading times were automatically recorded by the annotation
tool". Here every action (grade, lesion added/changed/removed, case confirmed, pause...) is
committed before the call returns, so killing Slicer at any moment loses at most the lesion
being drawn. WAL mode lets several readers read the same study at the same time from separate
processes (one writer at a time; writers wait up to ``timeout_s`` for each other, which at
human speed is never noticed). The file must sit on a local disk: SQLite's locking is not
reliable on network shares (NFS/SMB).
"""

from __future__ import annotations

import json
import os
import sqlite3
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, List, Optional, Sequence, Union

SCHEMA_VERSION = "1"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
-- One row per (reader, phase) once the reader opened it.
CREATE TABLE IF NOT EXISTS phase_reads (
    reader TEXT NOT NULL,
    phase TEXT NOT NULL,
    case_order TEXT NOT NULL,          -- JSON list of case ids, fixed at first opening
    position INTEGER NOT NULL DEFAULT 0,
    opened_at TEXT NOT NULL,
    submitted_at TEXT,
    owner TEXT,                         -- token of the session holding it (last opener wins)
    paused INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (reader, phase)
);
-- One row per (reader, phase, case) once the case was shown.
CREATE TABLE IF NOT EXISTS case_reads (
    reader TEXT NOT NULL,
    phase TEXT NOT NULL,
    case_id TEXT NOT NULL,
    grade INTEGER CHECK (grade IS NULL OR grade BETWEEN 1 AND 4),
    seconds REAL NOT NULL DEFAULT 0,
    too_many_lesions INTEGER NOT NULL DEFAULT 0,
    status TEXT NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'done')),
    first_opened_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    confirmed_at TEXT,
    PRIMARY KEY (reader, phase, case_id)
);
-- Lesion axes in RAS millimetres (world coordinates of the Slicer scene).
CREATE TABLE IF NOT EXISTS lesions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    reader TEXT NOT NULL,
    phase TEXT NOT NULL,
    case_id TEXT NOT NULL,
    long_x1 REAL NOT NULL, long_y1 REAL NOT NULL, long_z1 REAL NOT NULL,
    long_x2 REAL NOT NULL, long_y2 REAL NOT NULL, long_z2 REAL NOT NULL,
    short_x1 REAL NOT NULL, short_y1 REAL NOT NULL, short_z1 REAL NOT NULL,
    short_x2 REAL NOT NULL, short_y2 REAL NOT NULL, short_z2 REAL NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS lesions_by_case ON lesions (reader, phase, case_id);
-- Audit trail: every committed action, in order.
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL,
    reader TEXT NOT NULL,
    phase TEXT NOT NULL,
    case_id TEXT,
    action TEXT NOT NULL,
    detail TEXT
);
"""


def to_iso(moment: datetime) -> str:
    """Store times as ISO 8601 UTC strings (sortable, readable in any SQLite browser)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).isoformat(timespec="microseconds")


def from_iso(text: Optional[str]) -> Optional[datetime]:
    """Inverse of :func:`to_iso` (``None`` stays ``None``)."""
    return None if text is None else datetime.fromisoformat(text)


class ReadsDatabase:
    """A connection to a study's reads database (created on first use).

    Args:
        path: the ``reads.sqlite`` file.
        timeout_s: how long a writer waits for another process's transaction (busy timeout).

    Raises:
        sqlite3.OperationalError: the folder is not writable or the file is not a database.
    """

    def __init__(self, path: Union[str, os.PathLike], timeout_s: float = 30.0):
        self.path = Path(path)
        # isolation_level=None: we issue BEGIN IMMEDIATE / COMMIT ourselves, one per action.
        self.connection = sqlite3.connect(str(self.path), timeout=timeout_s, isolation_level=None)
        self.connection.row_factory = sqlite3.Row
        self.connection.execute(f"PRAGMA busy_timeout = {int(timeout_s * 1000)}")
        mode = self.connection.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise sqlite3.OperationalError(
                f"{self.path}: SQLite refused WAL mode (got {mode!r}); put the study folder on a local disk, not a network share"
            )
        # FULL: a committed action survives a power cut too, not only a killed process.
        self.connection.execute("PRAGMA synchronous = FULL")
        with self.transaction() as db:
            db.executescript_in_transaction(SCHEMA)
            db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)", (SCHEMA_VERSION,))

    # -- transactions -----------------------------------------------------------------------
    @contextmanager
    def transaction(self) -> Iterator["ReadsDatabase"]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` (rolled back on any exception).

        IMMEDIATE takes the write lock up front, so two processes never both read a state and
        then race to write it.
        """
        self.connection.execute("BEGIN IMMEDIATE")
        try:
            yield self
        except BaseException:
            self.connection.execute("ROLLBACK")
            raise
        self.connection.execute("COMMIT")

    def executescript_in_transaction(self, script: str) -> None:
        # executescript() would COMMIT first; run the statements one by one instead.
        for statement in script.split(";"):
            if statement.strip():
                self.connection.execute(statement)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        return self.connection.execute(sql, params)

    def rows(self, sql: str, params: Sequence[Any] = ()) -> List[sqlite3.Row]:
        return self.connection.execute(sql, params).fetchall()

    def row(self, sql: str, params: Sequence[Any] = ()) -> Optional[sqlite3.Row]:
        return self.connection.execute(sql, params).fetchone()

    def log(self, at: datetime, reader: str, phase: str, case_id: Optional[str], action: str, **detail: Any) -> None:
        """Append to the audit trail (inside the caller's transaction)."""
        self.execute(
            "INSERT INTO events (at, reader, phase, case_id, action, detail) VALUES (?, ?, ?, ?, ?, ?)",
            (to_iso(at), reader, phase, case_id, action, json.dumps(detail) if detail else None),
        )

    def has_reads(self) -> bool:
        """Whether any reader has opened any phase."""
        return self.row("SELECT 1 FROM phase_reads LIMIT 1") is not None

    def close(self) -> None:
        """Close the connection (idempotent)."""
        if self.connection is not None:
            self.connection.close()
            self.connection = None  # type: ignore[assignment]

    def __enter__(self) -> "ReadsDatabase":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
