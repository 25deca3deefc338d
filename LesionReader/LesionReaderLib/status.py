"""Study status: per reader and phase, cases done / total, time spent, when the phase opens.

Paper, "Reader study protocol": successive phases with "a minimal delay of 10 days ... between
each reading phase". The same rows feed ``lesion-reader status`` and the Slicer module's
status box. Status is for the study coordinator and the reader: it shows counts and times only,
never case ids or answers.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any, Optional, Union

from .session import phase_opens_at
from .storage import ReadKey, ReadsDatabase, from_iso
from .study import Clock, as_utc_aware, format_duration, format_time, load_study, utc_now


@dataclass(frozen=True)
class PhaseStatus:
    """Where one reader stands in one phase.

    Attributes:
        state: ``not opened`` (open, never started), ``in progress``, ``paused``, ``submitted``,
            ``wash-out`` (previous phase submitted, delay running) or ``locked`` (previous
            phase not submitted yet).
        opens_at: when the phase opens for the reader (``None`` for the first phase and while locked).
    """

    reader: str
    phase: str
    state: str
    done: int
    total: int
    seconds: float
    lesions: int
    opened_at: Optional[datetime]
    submitted_at: Optional[datetime]
    opens_at: Optional[datetime]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("opened_at", "submitted_at", "opens_at"):
            data[key] = None if data[key] is None else data[key].isoformat()
        return data


def study_status(study_dir: Union[str, os.PathLike], clock: Optional[Clock] = None, reader: Optional[str] = None) -> list[PhaseStatus]:
    """Status rows for every reader (or only ``reader``) and phase, in study order.

    Raises:
        StudyError: no valid study in ``study_dir`` or unknown ``reader``.
    """
    study = load_study(study_dir)
    readers = [study.check_reader(reader)] if reader is not None else list(study.readers)
    now = as_utc_aware((clock or utc_now)())
    total = len(study.cases)
    rows: list[PhaseStatus] = []
    with ReadsDatabase(study.database_path) as db:
        for name in readers:
            for phase in study.phases:
                key = ReadKey(name, phase.name)
                read = db.phase_read(key)
                totals = db.phase_totals(key)
                lesions = db.count_phase_lesions(key)
                opens_at, _ = phase_opens_at(db, study, name, phase.name)
                if study.phase_index(phase.name) == 0:
                    opens_at = None  # the first phase is always open
                if read is not None and read["submitted_at"] is not None:
                    state = "submitted"
                elif read is not None:
                    state = "paused" if read["paused"] else "in progress"
                elif study.phase_index(phase.name) > 0 and opens_at is None:
                    state = "locked"
                elif opens_at is not None and now < opens_at:
                    state = "wash-out"
                else:
                    state = "not opened"
                rows.append(PhaseStatus(
                    reader=name, phase=phase.name, state=state, done=totals.done, total=total,
                    seconds=totals.seconds, lesions=lesions,
                    opened_at=None if read is None else from_iso(read["opened_at"]),
                    submitted_at=None if read is None else from_iso(read["submitted_at"]),
                    opens_at=opens_at,
                ))
    return rows


def describe_opening(row: PhaseStatus, now: Optional[datetime] = None) -> str:
    """One phrase: when the phase opens (``opens 2024-05-11 14:03 UTC (in 3 d 4 h)``) or its state."""
    now = as_utc_aware(now or utc_now())
    if row.state == "locked":
        return "opens after the previous phase is submitted, plus the wash-out"
    if row.state == "wash-out" and row.opens_at is not None:
        return f"opens {format_time(row.opens_at)} (in {format_duration((row.opens_at - now).total_seconds())})"
    if row.state == "submitted" and row.submitted_at is not None:
        return f"submitted {format_time(row.submitted_at)}"
    if row.state == "not opened":
        return "open now"
    return f"started {format_time(row.opened_at)}" if row.opened_at else ""


def format_status(rows: list[PhaseStatus], now: Optional[datetime] = None) -> str:
    """A plain-text table of :func:`study_status` rows (what ``lesion-reader status`` prints)."""
    header = ("reader", "phase", "state", "cases", "time", "lesions", "when")
    table = [header] + [
        (r.reader, r.phase, r.state, f"{r.done} / {r.total}", format_duration(r.seconds), str(r.lesions), describe_opening(r, now))
        for r in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(line)).rstrip() for line in table)


def status_json(study_dir: Union[str, os.PathLike], clock: Optional[Clock] = None) -> str:
    """:func:`study_status` as a JSON document."""
    return json.dumps([row.to_dict() for row in study_status(study_dir, clock)], indent=2)
