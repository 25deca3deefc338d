"""A reader's session on one phase of a study: the state machine behind the Slicer module.

Paper, "Reader study protocol": readers "independently graded the general image quality on
4-point scales and marked the major and minor axes of all visible enhancing lesions"; "reading
times were automatically recorded by the annotation tool". Per reader and phase::

    open -> case shown -> grade (1-4) -> mark lesions (long + short axis each) -> next (confirms)
         ^                                                                          |
         +---------------- previous / go_to (revisit until the phase is submitted) -+
    pause / resume at any time; submit_phase() once every case is confirmed.

Every call that changes something is committed to the study database before it returns
(:mod:`LesionReaderLib.storage`). Active reading time accrues to the shown case while the
session is open and not paused; it is flushed into the database with every action, so a crash
loses only the seconds since the last action.

Blinding: nothing a reader sees (:attr:`ReaderSession.case_label`, :meth:`ReaderSession.state`,
:meth:`ReaderSession.lesions`) carries a case id, a file name or another phase's answers. Only
:meth:`ReaderSession.volumes` returns paths, for the viewer to load, not to display.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar, Union

from .geometry import PERPENDICULAR_TOLERANCE_DEG, Axis, LesionGeometry, LesionGeometryError, MeasuredLesion
from .storage import ReadKey, ReadsDatabase, from_iso
from .study import (
    GRADE_LABELS,
    as_utc_aware,
    Clock,
    Study,
    StudyError,
    WashoutError,
    case_label,
    case_order,
    format_duration,
    format_time,
    load_study,
    utc_now,
)


class SessionError(StudyError):
    """A reader action is not possible now; the message says why and what to do."""


class LesionAxisError(SessionError):
    """The drawn long/short axes do not describe a lesion (bidirectional measurement rules)."""


T = TypeVar("T")


@dataclass(frozen=True)
class LesionRecord(MeasuredLesion):
    """One lesion as stored: its database id, its number in the case, and its geometry.

    Attributes:
        id: database id (stable; use it with ``remove_lesion``/``update_lesion``).
        number: 1-based rank within the case for this reader and phase (what the reader sees).
        geometry: long and short axes in RAS mm (:class:`~.geometry.LesionGeometry`, labelled
            with ``number``).
    """

    id: int
    number: int
    geometry: LesionGeometry

    def to_dict(self) -> dict[str, Any]:
        """UI-facing view (no case id)."""
        g = self.geometry
        return {
            "id": self.id, "number": self.number, "long_mm": round(g.long_mm, 2), "short_mm": round(g.short_mm, 2),
            "long_axis": [list(p) for p in g.long_axis], "short_axis": [list(p) for p in g.short_axis],
            "center": list(g.center),
        }


def validate_lesion_axes(long_axis: Any, short_axis: Any, tolerance_deg: float = PERPENDICULAR_TOLERANCE_DEG) -> tuple[Axis, Axis]:
    """Check a bidirectional lesion measurement and return the axes as float tuples.

    Rules (the paper's "major and minor axes", :meth:`.geometry.LesionGeometry.check_bidirectional`):
    both axes at least ``geometry.MIN_AXIS_MM`` long; the short axis no longer than the long one; roughly
    perpendicular (90 deg +/- ``tolerance_deg``); and the short axis crosses or nearly touches the
    long one (within half the long axis), so the two belong to the same lesion.

    Raises:
        LesionAxisError: which rule failed, with the measured values and how to redraw.
    """
    try:
        geometry = LesionGeometry(long_axis, short_axis)
        geometry.check_bidirectional(tolerance_deg)
    except LesionGeometryError as exc:
        raise LesionAxisError(str(exc)) from None
    return geometry.long_axis, geometry.short_axis


def phase_opens_at(db: ReadsDatabase, study: Study, reader: str, phase: str) -> tuple[Optional[datetime], str]:
    """When ``phase`` opens for ``reader``: ``(time, reason)``; time ``None`` = not yet known.

    The first phase is always open. Phase k+1 opens ``washout_days`` after the reader submitted
    phase k (paper: "a minimal delay of 10 days was enforced between each reading phase").
    """
    index = study.phase_index(phase)
    if index == 0:
        return datetime.min.replace(tzinfo=utc_now().tzinfo), "first phase"
    previous = study.phases[index - 1].name
    row = db.phase_read(ReadKey(reader, previous))
    if row is None or row["submitted_at"] is None:
        return None, f"after phase {previous} is submitted, plus {study.washout_days:g} days"
    submitted = from_iso(row["submitted_at"])
    assert submitted is not None
    return submitted + timedelta(days=study.washout_days), f"{study.washout_days:g} days after phase {previous} was submitted on {format_time(submitted)}"


class ReaderSession:
    """One reader reading one phase. Create with :meth:`open`; every mutating call is committed.

    Example:
        >>> session = ReaderSession.open("study", reader="R1", phase="T1c")
        >>> session.grade(3)
        >>> lesion_id = session.add_lesion(long_axis=((0, 0, 0), (10, 0, 0)), short_axis=((5, -3, 0), (5, 3, 0)))
        >>> session.next_case()
    """

    def __init__(self, study: Study, db: ReadsDatabase, reader: str, phase: str, clock: Clock, token: str):
        self.study = study
        self.reader = reader
        self.phase = phase
        self._phase = study.phase(phase)
        self._key = ReadKey(reader, phase)
        self._db: Optional[ReadsDatabase] = db
        self._clock = clock
        self._token = token
        row = db.phase_read(self._key)
        if row is None:
            raise SessionError(f"reader {reader} has not opened phase {phase}; open it with ReaderSession.open")
        self._order: list[str] = json.loads(row["case_order"])
        self._position: int = int(row["position"])
        self._paused = bool(row["paused"])
        self._active_since: Optional[datetime] = None if self._paused else clock()

    # -- opening ---------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        study_dir: Union[str, os.PathLike],
        reader: str,
        phase: str,
        clock: Optional[Clock] = None,
    ) -> ReaderSession:
        """Open (or resume) ``reader``'s reading of ``phase``.

        Args:
            study_dir: the study folder.
            reader: a reader id from ``study.json``.
            phase: a phase name from ``study.json``.
            clock: callable returning the current timezone-aware time (default: UTC now);
                inject a :class:`~LesionReaderLib.study.ManualClock` in tests and simulations.

        Raises:
            StudyError: unknown reader/phase, or the phase was already submitted.
            WashoutError: the previous phase is too recent; ``opens_at`` says when this one opens.
            SessionError: the previous phase has not been submitted.
        """
        base_clock = clock or utc_now
        clock = lambda: as_utc_aware(base_clock())  # noqa: E731  (naive datetimes are taken as UTC)
        study = load_study(study_dir)
        study.check_reader(reader)
        study.phase(phase)
        db = ReadsDatabase(study.database_path)
        try:
            now = clock()
            token = uuid.uuid4().hex
            with db.transaction():
                opens_at, reason = phase_opens_at(db, study, reader, phase)
                if opens_at is None:
                    previous = study.phases[study.phase_index(phase) - 1].name
                    raise SessionError(
                        f"reader {reader} cannot open phase {phase} yet: phase {previous} is not submitted. "
                        f"Finish and submit {previous} first; {phase} then opens {study.washout_days:g} days later"
                    )
                if now < opens_at:
                    raise WashoutError(
                        f"wash-out: reader {reader} cannot open phase {phase} before {format_time(opens_at)} "
                        f"({reason}); {format_duration((opens_at - now).total_seconds())} to go",
                        opens_at,
                    )
                key = ReadKey(reader, phase)
                row = db.phase_read(key)
                ids = sorted(c.id for c in study.cases)
                if row is None:
                    db.create_phase_read(key, case_order(study, reader, phase), opened_at=now, owner=token)
                else:
                    submitted_at = from_iso(row["submitted_at"])
                    if submitted_at is not None:
                        raise StudyError(
                            f"reader {reader} submitted phase {phase} on {format_time(submitted_at)}; "
                            "a submitted phase is final and cannot be reopened"
                        )
                    if sorted(json.loads(row["case_order"])) != ids:
                        raise StudyError(
                            f"the cases in {study.directory / 'study.json'} changed after reader {reader} started phase {phase}; "
                            "restore the original case list (reads refer to it)"
                        )
                    db.take_over_phase_read(key, owner=token)
                session = cls(study, db, reader, phase, clock, token)
                session._touch_case(now)
                db.log(session._case_key, now, "open")
            return session
        except BaseException:
            db.close()
            raise

    # -- read-only views -------------------------------------------------------------------
    @property
    def total(self) -> int:
        return len(self._order)

    @property
    def position(self) -> int:
        """0-based position of the shown case in this reader's order for this phase."""
        return self._position

    @property
    def case_label(self) -> str:
        """Neutral label of the shown case (``Case 07``): no id, no file name."""
        return case_label(self._position, self.total)

    @property
    def marks_lesions(self) -> bool:
        """Whether this reader marks lesions in this phase (else only grades)."""
        return self._phase.reader_marks(self.reader)

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def closed(self) -> bool:
        return self._db is None

    @property
    def progress(self) -> tuple[int, int]:
        """``(done, total)``: confirmed cases and cases in the phase."""
        return self._require_db().phase_totals(self._key).done, self.total

    @property
    def _case_id(self) -> str:
        return self._order[self._position]

    @property
    def _case_key(self) -> ReadKey:
        """The shown case of this reading (the key of every case-level query)."""
        return self._key.of_case(self._case_id)

    def volumes(self) -> dict[str, Path]:
        """What this phase shows for the shown case: ``{volume name: file}`` in layout order.

        The paths are for the viewer to load; they must not be displayed (blinding).
        """
        return {name: self.study.volume_path(self._case_id, name) for name in self._phase.shows}

    def _case_row(self) -> Any:
        return self._require_db().case_read(self._case_key)

    @property
    def current_grade(self) -> Optional[int]:
        row = self._case_row()
        return None if row is None or row["grade"] is None else int(row["grade"])

    @property
    def too_many_lesions(self) -> bool:
        row = self._case_row()
        return bool(row is not None and row["too_many_lesions"])

    @property
    def case_done(self) -> bool:
        row = self._case_row()
        return bool(row is not None and row["status"] == "done")

    def case_seconds(self) -> float:
        """Active reading time of the shown case so far (stored + running)."""
        row = self._case_row()
        stored = float(row["seconds"]) if row is not None else 0.0
        return stored + self._running_seconds(self._clock())

    def phase_seconds(self) -> float:
        """Active reading time over all cases of this phase so far."""
        stored = self._require_db().phase_totals(self._key).seconds
        return stored + self._running_seconds(self._clock())

    def lesions(self) -> list[LesionRecord]:
        """The shown case's lesions for this reader and phase, in drawing order."""
        rows = self._require_db().case_lesions(self._case_key)
        return [lesion_from_row(row, number) for number, row in enumerate(rows, start=1)]

    def state(self) -> dict[str, Any]:
        """Everything the reader's UI shows, as plain data (blinded: no case id, no paths)."""
        done, total = self.progress
        grade = self.current_grade
        return {
            "reader": self.reader,
            "phase": self.phase,
            "case_label": self.case_label,
            "position": self._position,
            "done": done,
            "total": total,
            "progress_text": f"case {self._position + 1} / {total}",
            "case_done": self.case_done,
            "grade": grade,
            "grade_label": None if grade is None else GRADE_LABELS[grade],
            "marks_lesions": self.marks_lesions,
            "too_many_lesions": self.too_many_lesions,
            "max_lesions": self.study.max_lesions,
            "lesions": [lesion.to_dict() for lesion in self.lesions()],
            "case_seconds": self.case_seconds(),
            "phase_seconds": self.phase_seconds(),
            "paused": self._paused,
            "shows": list(self._phase.shows),
        }

    # -- actions ---------------------------------------------------------------------------
    def grade(self, value: int) -> None:
        """Grade the shown case's overall image quality: 1 poor, 2 average, 3 good, 4 excellent.

        Raises:
            SessionError: ``value`` is not an integer from 1 to 4.
        """
        if isinstance(value, bool) or not isinstance(value, int) or value not in GRADE_LABELS:
            raise SessionError(f"grade must be an integer from 1 to 4 ({', '.join(f'{k} {v}' for k, v in GRADE_LABELS.items())}), got {value!r}")

        def apply(db: ReadsDatabase, now: datetime) -> None:
            db.set_grade(self._case_key, value, now)
            db.log(self._case_key, now, "grade", grade=value)

        self._act(apply)

    def add_lesion(self, long_axis: Axis, short_axis: Axis) -> int:
        """Record a lesion on the shown case from its long and short axes in RAS mm.

        Returns:
            The lesion's id (for :meth:`remove_lesion` / :meth:`update_lesion`).

        Raises:
            LesionAxisError: the axes are not a valid bidirectional measurement.
            SessionError: this reader does not mark lesions in this phase, the case is flagged
                "too many lesions", or it already holds ``max_lesions`` lesions.
        """
        long_axis, short_axis = validate_lesion_axes(long_axis, short_axis)
        self._check_can_mark()

        def apply(db: ReadsDatabase, now: datetime) -> int:
            key = self._case_key
            count = db.count_case_lesions(key)
            if count >= self.study.max_lesions:
                raise SessionError(
                    f"{self.case_label} already has {count} lesions, the study's maximum ({self.study.max_lesions}); "
                    "flag it 'too many lesions' instead: it is then excluded from the analysis (paper protocol)"
                )
            lesion_id = db.add_lesion(key, long_axis, short_axis, now)
            db.touch_case_read(key, now)
            db.log(key, now, "add_lesion", lesion=lesion_id, long=long_axis, short=short_axis)
            return lesion_id

        return self._act(apply)

    def update_lesion(self, lesion_id: int, long_axis: Axis, short_axis: Axis) -> None:
        """Replace a lesion's axes (the reader moved an end point).

        Raises:
            LesionAxisError: invalid axes (the stored lesion is kept).
            SessionError: ``lesion_id`` is not a lesion of the shown case.
        """
        long_axis, short_axis = validate_lesion_axes(long_axis, short_axis)
        self._check_can_mark()

        def apply(db: ReadsDatabase, now: datetime) -> None:
            self._check_lesion(db, lesion_id)
            db.update_lesion(lesion_id, long_axis, short_axis, now)
            db.touch_case_read(self._case_key, now)
            db.log(self._case_key, now, "update_lesion", lesion=int(lesion_id), long=long_axis, short=short_axis)

        self._act(apply)

    def remove_lesion(self, lesion_id: int) -> None:
        """Delete a lesion of the shown case.

        Raises:
            SessionError: ``lesion_id`` is not a lesion of the shown case.
        """

        def apply(db: ReadsDatabase, now: datetime) -> None:
            self._check_lesion(db, lesion_id)
            db.delete_lesion(lesion_id)
            db.touch_case_read(self._case_key, now)
            db.log(self._case_key, now, "remove_lesion", lesion=int(lesion_id))

        self._act(apply)

    def flag_too_many_lesions(self, flag: bool = True) -> None:
        """Flag (or unflag) the shown case as having more than ``max_lesions`` lesions.

        Paper: "Cases with more than 20 lesions were not annotated and were excluded from the
        downstream statistical analysis". A flagged case needs a grade but no lesion, and is
        exported with ``excluded = 1``.
        """

        def apply(db: ReadsDatabase, now: datetime) -> None:
            db.set_too_many_lesions(self._case_key, bool(flag), now)
            db.log(self._case_key, now, "too_many_lesions", flag=bool(flag))

        self._act(apply)

    def confirm_case(self) -> None:
        """Confirm the shown case (graded; its lesions, possibly none, are complete).

        Raises:
            SessionError: the case has no grade yet.
        """
        if self.current_grade is None:
            raise SessionError(f"grade {self.case_label} (1-4: poor, average, good, excellent) before confirming it")

        def apply(db: ReadsDatabase, now: datetime) -> None:
            db.confirm_case_read(self._case_key, now)
            db.log(self._case_key, now, "confirm", lesions=len(self.lesions()))

        self._act(apply)

    def next_case(self) -> bool:
        """Confirm the shown case and show the next one.

        Returns:
            ``False`` when the confirmed case was the last one (the session stays on it).

        Raises:
            SessionError: the shown case has no grade yet.
        """
        self.confirm_case()
        if self._position + 1 >= self.total:
            return False
        self.go_to(self._position + 1)
        return True

    def previous_case(self) -> bool:
        """Show the previous case (the shown one keeps its answers, confirmed or not).

        Returns:
            ``False`` on the first case (nothing changes).
        """
        if self._position == 0:
            return False
        self.go_to(self._position - 1)
        return True

    def go_to(self, position: int) -> None:
        """Show the case at 0-based ``position`` (revisiting is allowed until the phase is submitted)."""
        if not 0 <= int(position) < self.total:
            raise SessionError(f"position {position} is out of range; this phase has cases 0 to {self.total - 1}")

        def apply(db: ReadsDatabase, now: datetime) -> None:
            self._position = int(position)
            db.set_position(self._key, self._position)
            self._touch_case(now)
            db.log(self._case_key, now, "show")

        previous = self._position
        try:
            self._act(apply)
        except BaseException:
            self._position = previous
            raise

    def first_unconfirmed(self) -> Optional[int]:
        """Position of the first case not yet confirmed (``None`` when all are)."""
        done = self._require_db().confirmed_case_ids(self._key)
        return next((i for i, case_id in enumerate(self._order) if case_id not in done), None)

    def pause(self) -> None:
        """Stop the reading clock (the reader left the case or took a break); answers are kept."""
        if self._paused:
            return

        def apply(db: ReadsDatabase, now: datetime) -> None:
            db.set_paused(self._key, True)
            db.log(self._case_key, now, "pause")

        self._act(apply, allow_paused=True)
        self._paused = True
        self._active_since = None

    def resume(self) -> None:
        """Restart the reading clock after :meth:`pause`."""
        if not self._paused:
            return

        def apply(db: ReadsDatabase, now: datetime) -> None:
            db.set_paused(self._key, False)
            db.log(self._case_key, now, "resume")

        self._act(apply, allow_paused=True)
        self._paused = False
        self._active_since = self._clock()

    def submit_phase(self) -> datetime:
        """Submit the phase: answers become final and the wash-out to the next phase starts.

        Returns:
            When the reader's next phase opens (the submission time if this was the last phase).

        Raises:
            SessionError: some cases are not confirmed (their labels are listed).
        """
        done = self._require_db().confirmed_case_ids(self._key)
        missing = [case_label(i, self.total) for i, case_id in enumerate(self._order) if case_id not in done]
        if missing:
            shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
            raise SessionError(f"cannot submit phase {self.phase}: {len(missing)} case(s) not confirmed ({shown}); grade and confirm them first")

        def apply(db: ReadsDatabase, now: datetime) -> datetime:
            db.submit_phase_read(self._key, now)
            db.log(self._key, now, "submit")
            return now

        submitted = self._act(apply, allow_paused=True)
        self._release()
        last = self.study.phase_index(self.phase) == len(self.study.phases) - 1
        return submitted if last else submitted + timedelta(days=self.study.washout_days)

    def close(self) -> None:
        """Store the running time and release the session (idempotent; answers are already saved)."""
        if self._db is None:
            return
        try:
            row = self._db.phase_read(self._key)
            if row is None or row["owner"] != self._token:
                return  # taken over elsewhere: the other session owns the clock now

            def apply(db: ReadsDatabase, now: datetime) -> None:
                db.release_phase_read(self._key, owner=self._token)
                db.log(self._case_key, now, "close")

            self._act(apply, allow_paused=True, check_owner=False)
        finally:
            self._release()

    def __enter__(self) -> ReaderSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------------
    def _require_db(self) -> ReadsDatabase:
        if self._db is None:
            raise SessionError(f"this session (reader {self.reader}, phase {self.phase}) is closed; open a new one with ReaderSession.open")
        return self._db

    def _release(self) -> None:
        if self._db is not None:
            self._db.close()
        self._db = None
        self._active_since = None

    def _running_seconds(self, now: datetime) -> float:
        if self._paused or self._active_since is None:
            return 0.0
        return max(0.0, (now - self._active_since).total_seconds())

    def _act(self, apply: Callable[[ReadsDatabase, datetime], T], *, allow_paused: bool = False, check_owner: bool = True) -> T:
        """Run one reader action in one transaction, crediting the running time to the shown case first.

        Args:
            apply: the action, called with the database (inside the transaction) and the time now.
            allow_paused: run it even while the reading is paused (pause, resume, submit, close).
            check_owner: refuse it when the phase was submitted or taken over by another session.

        Returns:
            What ``apply`` returns, once committed.

        Raises:
            SessionError: the session is closed or paused, the phase submitted or taken over.
        """
        db = self._require_db()
        if self._paused and not allow_paused:
            raise SessionError("the reading is paused; resume it first (the Resume button, or session.resume())")
        now = self._clock()
        with db.transaction():
            if check_owner:
                row = db.phase_read(self._key)
                if row is None:
                    raise SessionError(
                        f"reader {self.reader}'s phase {self.phase} is no longer in {db.path}; "
                        "the reads database was replaced since this session opened. Close this one and open the phase again"
                    )
                if row["submitted_at"] is not None:
                    raise SessionError(f"phase {self.phase} was submitted; its answers are final")
                if row["owner"] != self._token:
                    raise SessionError(
                        f"reader {self.reader}'s phase {self.phase} was opened in another window or process since this one; "
                        "close this one and continue there (nothing was lost)"
                    )
            elapsed = self._running_seconds(now)
            if elapsed > 0:
                db.add_case_seconds(self._case_key, elapsed)
            result = apply(db, now)
        if not self._paused:
            self._active_since = now
        return result

    def _touch_case(self, now: datetime) -> None:
        self._require_db().open_case_read(self._case_key, now)

    def _check_can_mark(self) -> None:
        if not self.marks_lesions:
            markers = self._phase.markers
            raise SessionError(
                f"in phase {self.phase} only {', '.join(markers) if markers != 'all' else 'all readers'} mark lesions "
                f"(the reference); reader {self.reader} only grades this phase"
            )
        if self.too_many_lesions:
            raise SessionError(f"{self.case_label} is flagged 'too many lesions' (excluded); unflag it before marking lesions")

    def _check_lesion(self, db: ReadsDatabase, lesion_id: int) -> None:
        if db.lesion_read(lesion_id) != self._case_key:
            raise SessionError(f"lesion {lesion_id} is not a lesion of {self.case_label} in this reading; pick one from session.lesions()")


def lesion_from_row(row: Any, number: int) -> LesionRecord:
    """Build a :class:`LesionRecord` from a ``lesions`` table row (its geometry labelled ``number``)."""
    return LesionRecord(
        id=int(row["id"]),
        number=number,
        geometry=LesionGeometry(
            long_axis=((row["long_x1"], row["long_y1"], row["long_z1"]), (row["long_x2"], row["long_y2"], row["long_z2"])),
            short_axis=((row["short_x1"], row["short_y1"], row["short_z1"]), (row["short_x2"], row["short_y2"], row["short_z2"])),
            lesion_id=str(number),
        ),
    )
