"""The reads database: one SQLite file per study, WAL mode, one transaction per reader action.

Paper, "Reader study protocol": "Reading times were automatically recorded by the annotation
tool". Here every action (grade, lesion added/changed/removed, case confirmed, pause...) is
committed before the call returns, so killing Slicer at any moment loses at most the lesion
being drawn. WAL mode lets several readers read the same study at the same time from separate
processes (one writer at a time; writers wait up to ``timeout_s`` for each other, which at
human speed is never noticed). The file must sit on a local disk: SQLite's locking is not
reliable on network shares (NFS/SMB).

This module is the only one that holds SQL: the session, status and exports call the named
methods of :class:`ReadsDatabase`, addressing a reader's reading with a :class:`ReadKey`.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Optional, Union

if TYPE_CHECKING:  # annotations only: storage needs nothing else of the study at run time
    from .study import Axis

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


#: The WHERE condition of a reader's reading of a phase, and of one case in it (the only copies).
_PHASE_WHERE = "reader = ? AND phase = ?"
_CASE_WHERE = "reader = ? AND phase = ? AND case_id = ?"
#: The twelve coordinates of a lesion's long then short axis, in the order of ``(*p1, *p2)``.
_AXIS_COLUMNS = (
    "long_x1", "long_y1", "long_z1", "long_x2", "long_y2", "long_z2",
    "short_x1", "short_y1", "short_z1", "short_x2", "short_y2", "short_z2",
)


def to_iso(moment: datetime) -> str:
    """Store times as ISO 8601 UTC strings (sortable, readable in any SQLite browser)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).isoformat(timespec="microseconds")


def from_iso(text: Optional[str]) -> Optional[datetime]:
    """Inverse of :func:`to_iso` (``None`` stays ``None``)."""
    return None if text is None else datetime.fromisoformat(text)


class ReadKey(NamedTuple):
    """Which read a query addresses: one reader's reading of one phase, or of one case in it.

    :class:`ReadsDatabase` is the one place that spells the matching SQL condition; everything
    else passes a key. Phase-level methods ignore ``case``; case-level methods require it.

    Attributes:
        reader: a reader id from ``study.json``.
        phase: a phase name from ``study.json``.
        case: a case id from ``study.json``, or ``None`` for the whole phase.
    """

    reader: str
    phase: str
    case: Optional[str] = None

    def of_case(self, case: str) -> ReadKey:
        """The same reader and phase, narrowed to ``case``."""
        return ReadKey(self.reader, self.phase, case)


class PhaseTotals(NamedTuple):
    """Sums over one reader's reading of one phase.

    Attributes:
        done: confirmed cases.
        seconds: active reading time stored for all its cases.
    """

    done: int
    seconds: float


def _phase_params(key: ReadKey) -> tuple[str, str]:
    return (key.reader, key.phase)


def _case_params(key: ReadKey) -> tuple[str, str, str]:
    if key.case is None:
        raise ValueError(f"{key!r} names no case; this query addresses one case (use key.of_case(case_id))")
    return (key.reader, key.phase, key.case)


def _axis_values(long_axis: Axis, short_axis: Axis) -> tuple[float, ...]:
    return (*long_axis[0], *long_axis[1], *short_axis[0], *short_axis[1])


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
    def transaction(self) -> Iterator[ReadsDatabase]:
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
        """Run ``;``-separated statements inside the open transaction.

        ``executescript()`` would COMMIT first; the statements are run one by one instead.
        """
        for statement in script.split(";"):
            if statement.strip():
                self.connection.execute(statement)

    # -- raw access (tests and ad-hoc inspection; the library uses the named queries below) --
    def execute(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        """Run one SQL statement and return its cursor."""
        return self.connection.execute(sql, params)

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        """All result rows of one SQL query."""
        return self.connection.execute(sql, params).fetchall()

    def row(self, sql: str, params: Sequence[Any] = ()) -> Optional[sqlite3.Row]:
        """The first result row of one SQL query (``None`` if there is none)."""
        return self.connection.execute(sql, params).fetchone()

    # -- audit trail ----------------------------------------------------------------------
    def log(self, key: ReadKey, at: datetime, action: str, **detail: Any) -> None:
        """Append an action to the audit trail (inside the caller's transaction).

        Args:
            key: whose reading; ``key.case`` is stored as the event's case (``None`` for the phase).
            at: when the action happened.
            action: what happened (``grade``, ``add_lesion``, ``submit`` ...).
            **detail: stored as a JSON object (nothing when empty).
        """
        self.execute(
            "INSERT INTO events (at, reader, phase, case_id, action, detail) VALUES (?, ?, ?, ?, ?, ?)",
            (to_iso(at), key.reader, key.phase, key.case, action, json.dumps(detail) if detail else None),
        )

    # -- phase reads: one row per (reader, phase) -----------------------------------------
    def has_reads(self) -> bool:
        """Whether any reader has opened any phase."""
        return self.row("SELECT 1 FROM phase_reads LIMIT 1") is not None

    def phase_read(self, key: ReadKey) -> Optional[sqlite3.Row]:
        """The ``phase_reads`` row of ``key``'s reader and phase (``None`` until first opened)."""
        return self.row(f"SELECT * FROM phase_reads WHERE {_PHASE_WHERE}", _phase_params(key))

    def create_phase_read(self, key: ReadKey, case_order: Sequence[str], opened_at: datetime, owner: str) -> None:
        """Record the first opening of a phase: its case order, at position 0, held by ``owner``."""
        self.execute(
            "INSERT INTO phase_reads (reader, phase, case_order, position, opened_at, owner) VALUES (?, ?, ?, 0, ?, ?)",
            (*_phase_params(key), json.dumps(list(case_order)), to_iso(opened_at), owner),
        )

    def take_over_phase_read(self, key: ReadKey, owner: str) -> None:
        """Hand the phase to session ``owner`` (last opener wins) and unpause it."""
        self.execute(f"UPDATE phase_reads SET owner = ?, paused = 0 WHERE {_PHASE_WHERE}", (owner, *_phase_params(key)))

    def release_phase_read(self, key: ReadKey, owner: str) -> None:
        """Clear the phase's owner if it still is ``owner`` (a newer session keeps it)."""
        self.execute(f"UPDATE phase_reads SET owner = NULL WHERE {_PHASE_WHERE} AND owner = ?", (*_phase_params(key), owner))

    def set_position(self, key: ReadKey, position: int) -> None:
        """Store the 0-based position of the shown case in the reader's order."""
        self.execute(f"UPDATE phase_reads SET position = ? WHERE {_PHASE_WHERE}", (int(position), *_phase_params(key)))

    def set_paused(self, key: ReadKey, paused: bool) -> None:
        """Store whether the reading clock is paused."""
        self.execute(f"UPDATE phase_reads SET paused = ? WHERE {_PHASE_WHERE}", (int(bool(paused)), *_phase_params(key)))

    def submit_phase_read(self, key: ReadKey, at: datetime) -> None:
        """Mark the phase submitted at ``at`` (answers final) and release its owner."""
        self.execute(f"UPDATE phase_reads SET submitted_at = ?, owner = NULL WHERE {_PHASE_WHERE}", (to_iso(at), *_phase_params(key)))

    # -- case reads: one row per (reader, phase, case) -------------------------------------
    def case_read(self, key: ReadKey) -> Optional[sqlite3.Row]:
        """The ``case_reads`` row of ``key`` (``None`` until the case was shown)."""
        return self.row(f"SELECT * FROM case_reads WHERE {_CASE_WHERE}", _case_params(key))

    def open_case_read(self, key: ReadKey, at: datetime) -> None:
        """Create the case's row when it is first shown (an existing row is kept as it is)."""
        self.execute(
            "INSERT OR IGNORE INTO case_reads (reader, phase, case_id, first_opened_at, updated_at) VALUES (?, ?, ?, ?, ?)",
            (*_case_params(key), to_iso(at), to_iso(at)),
        )

    def add_case_seconds(self, key: ReadKey, seconds: float) -> None:
        """Add active reading time to the case."""
        self.execute(f"UPDATE case_reads SET seconds = seconds + ? WHERE {_CASE_WHERE}", (float(seconds), *_case_params(key)))

    def set_grade(self, key: ReadKey, grade: int, at: datetime) -> None:
        """Store the case's image quality grade (1-4)."""
        self.execute(f"UPDATE case_reads SET grade = ?, updated_at = ? WHERE {_CASE_WHERE}", (grade, to_iso(at), *_case_params(key)))

    def set_too_many_lesions(self, key: ReadKey, flag: bool, at: datetime) -> None:
        """Flag (or unflag) the case as having too many lesions (excluded from the analysis)."""
        self.execute(
            f"UPDATE case_reads SET too_many_lesions = ?, updated_at = ? WHERE {_CASE_WHERE}", (int(bool(flag)), to_iso(at), *_case_params(key))
        )

    def confirm_case_read(self, key: ReadKey, at: datetime) -> None:
        """Mark the case confirmed (status ``done``) at ``at``."""
        self.execute(
            f"UPDATE case_reads SET status = 'done', confirmed_at = ?, updated_at = ? WHERE {_CASE_WHERE}", (to_iso(at), to_iso(at), *_case_params(key))
        )

    def touch_case_read(self, key: ReadKey, at: datetime) -> None:
        """Set the case's ``updated_at`` (its lesions changed)."""
        self.execute(f"UPDATE case_reads SET updated_at = ? WHERE {_CASE_WHERE}", (to_iso(at), *_case_params(key)))

    def confirmed_case_ids(self, key: ReadKey) -> set[str]:
        """Ids of the cases confirmed in ``key``'s reader and phase."""
        rows = self.rows(f"SELECT case_id FROM case_reads WHERE {_PHASE_WHERE} AND status = 'done'", _phase_params(key))
        return {row["case_id"] for row in rows}

    def phase_totals(self, key: ReadKey) -> PhaseTotals:
        """Confirmed cases and stored reading time of ``key``'s reader and phase."""
        row = self.row(
            "SELECT COALESCE(SUM(status = 'done'), 0) AS done, COALESCE(SUM(seconds), 0) AS seconds "
            f"FROM case_reads WHERE {_PHASE_WHERE}",
            _phase_params(key),
        )
        assert row is not None  # an aggregate always yields one row
        return PhaseTotals(done=int(row["done"]), seconds=float(row["seconds"]))

    # -- lesions -----------------------------------------------------------------------------
    def case_lesions(self, key: ReadKey) -> list[sqlite3.Row]:
        """The ``lesions`` rows of ``key``'s case, in drawing (id) order."""
        return self.rows(f"SELECT * FROM lesions WHERE {_CASE_WHERE} ORDER BY id", _case_params(key))

    def count_case_lesions(self, key: ReadKey) -> int:
        """How many lesions ``key``'s case holds."""
        row = self.row(f"SELECT COUNT(*) AS n FROM lesions WHERE {_CASE_WHERE}", _case_params(key))
        assert row is not None
        return int(row["n"])

    def count_phase_lesions(self, key: ReadKey) -> int:
        """How many lesions ``key``'s reader marked in the phase, all cases together."""
        row = self.row(f"SELECT COUNT(*) AS n FROM lesions WHERE {_PHASE_WHERE}", _phase_params(key))
        assert row is not None
        return int(row["n"])

    def add_lesion(self, key: ReadKey, long_axis: Axis, short_axis: Axis, at: datetime) -> int:
        """Store a lesion of ``key``'s case from its long and short axes (RAS mm).

        Returns:
            The new lesion's id.
        """
        columns = ", ".join(_AXIS_COLUMNS)
        marks = ", ".join("?" * (3 + len(_AXIS_COLUMNS) + 2))
        cursor = self.execute(
            f"INSERT INTO lesions (reader, phase, case_id, {columns}, created_at, updated_at) VALUES ({marks})",
            (*_case_params(key), *_axis_values(long_axis, short_axis), to_iso(at), to_iso(at)),
        )
        if cursor.lastrowid is None:  # never after a successful INSERT; checked rather than int(None)
            raise sqlite3.OperationalError(f"{self.path}: storing a lesion of {key!r} returned no row id")
        return int(cursor.lastrowid)

    def lesion_read(self, lesion_id: int) -> Optional[ReadKey]:
        """The read (reader, phase, case) a lesion belongs to (``None`` if there is no such lesion)."""
        row = self.row("SELECT reader, phase, case_id FROM lesions WHERE id = ?", (int(lesion_id),))
        return None if row is None else ReadKey(row["reader"], row["phase"], row["case_id"])

    def update_lesion(self, lesion_id: int, long_axis: Axis, short_axis: Axis, at: datetime) -> None:
        """Replace a lesion's axes (RAS mm)."""
        assignments = ", ".join(f"{column} = ?" for column in _AXIS_COLUMNS)
        self.execute(
            f"UPDATE lesions SET {assignments}, updated_at = ? WHERE id = ?",
            (*_axis_values(long_axis, short_axis), to_iso(at), int(lesion_id)),
        )

    def delete_lesion(self, lesion_id: int) -> None:
        """Delete a lesion."""
        self.execute("DELETE FROM lesions WHERE id = ?", (int(lesion_id),))

    # -- whole study (exports) ---------------------------------------------------------------
    def confirmed_case_reads(self) -> list[sqlite3.Row]:
        """Every confirmed ``case_reads`` row, all readers and phases (in no particular order)."""
        return self.rows("SELECT * FROM case_reads WHERE status = 'done'")

    def excluded_cases(self) -> set[str]:
        """Ids of the cases any reader flagged "too many lesions" in any phase."""
        return {row["case_id"] for row in self.rows("SELECT DISTINCT case_id FROM case_reads WHERE too_many_lesions = 1")}

    def lesions_by_read(self) -> dict[ReadKey, list[sqlite3.Row]]:
        """Every ``lesions`` row, grouped by read (reader, phase, case), each group in drawing (id) order."""
        grouped: dict[ReadKey, list[sqlite3.Row]] = {}
        for row in self.rows("SELECT * FROM lesions ORDER BY id"):
            grouped.setdefault(ReadKey(row["reader"], row["phase"], row["case_id"]), []).append(row)
        return grouped

    # -- lifetime ----------------------------------------------------------------------------
    def close(self) -> None:
        """Close the connection (idempotent)."""
        if self.connection is not None:
            self.connection.close()
            self.connection = None  # type: ignore[assignment]

    def __enter__(self) -> ReadsDatabase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
