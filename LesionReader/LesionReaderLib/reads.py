"""Reading and validating the reads: ``grades.csv``, ``lesions.csv`` or a study's reads database.

Inputs are part 1's export format (long format, RAS mm), so reads made with other tools can be
analysed too:

- ``grades.csv``: ``reader,phase,case,grade,seconds,excluded``
- ``lesions.csv``: ``reader,phase,case,lesion,long_mm,short_mm,long_x1..long_z2,
  short_x1..short_z2,center_x,center_y,center_z``

Every value is validated before any computation: a value that is not finite or not possible (a
grade outside 1-4, a negative time or length, a short axis longer than the long one, a
coordinate beyond :data:`MAX_ABS_COORDINATE_MM`...) is refused with the file, line and column;
see :func:`parse_reads`. The reference read is chosen here too (:func:`select_reference`).
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NoReturn, Optional, Union

from .export import GRADES_HEADER, LESIONS_HEADER, collect_rows
from .geometry import LesionGeometry, Point
from .results import (
    AVERAGE,
    AXIS_COLUMNS,
    CENTER_COLUMNS,
    DEFAULT_REFERENCE_PHASE,
    GRADES_COLUMNS,
    KNOWN_PHASE_ORDER,
    LESIONS_COLUMNS,
    AnalysisError,
    Mark,
    ReadKey,
    Reads,
    Reference,
    StudyInfo,
)
from .study import StudyError, read_text_file

PathLike = Union[str, os.PathLike]
#: The rows of grades.csv and lesions.csv as exported from a reads database (without headers).
ExportedRows = tuple[list[list[str]], list[list[str]]]

#: Largest |coordinate| accepted in lesions.csv, in RAS mm. World coordinates of a head scan lie
#: within a few hundred mm of the scanner's isocentre (no MR bore is 1 m wide); 10 m leaves room
#: for any shifted origin while catching unit mix-ups (micrometres written as mm) and garbage
#: such as 1e308, whose squares overflow to inf in the centre distances of the matching.
MAX_ABS_COORDINATE_MM = 10_000.0
#: Largest active reading time of one case accepted in grades.csv (one year, in seconds). The
#: paper's means are 1-3 minutes per case; a reader who leaves Slicer open over a weekend is an
#: outlier that is kept, a value above a year is not a reading time (a clock or unit error).
MAX_READING_SECONDS = 365 * 86_400.0
#: Largest difference (mm) between ``long_mm``/``short_mm`` and the distance between the axis
#: end points, and by which a short axis may exceed the long one: a quarter of the paper's 1 mm
#: voxel. It covers rounding (the exporter writes lengths to 0.001 mm and coordinates to
#: 0.0001 mm; another tool may write 0.1 mm) and is small against the matching radius
#: ``(L + S) / 8``, so a length that disagrees with its axis is refused rather than guessed.
AXIS_LENGTH_TOLERANCE_MM = 0.25

_EXPORT_FIX = "export the reads again with 'lesion-reader export STUDY_DIR OUT_DIR' or write it as a UTF-8 CSV file"
_COORDINATE_FIX = (
    f"lesion end points and centre are RAS millimetres (|value| <= {MAX_ABS_COORDINATE_MM:g}; a head lies within a few "
    "hundred mm of the origin): fix the value or drop the row"
)
_GRADE_FIX = "grade image quality 1-4 (1 poor, 2 average, 3 good, 4 excellent; paper, 'Reader study protocol': 4-point scale)"
_SECONDS_FIX = (
    f"write the active reading time of the case in seconds (0 to {MAX_READING_SECONDS:.0f}, one year), or leave it empty if it was not recorded"
)


# --------------------------------------------------------------------------- CSV rows


@dataclass(frozen=True)
class CsvRow:
    """One data row of an input CSV file and where it is, for messages that name file, line and column.

    Attributes:
        source: the file as named in messages.
        line: 1-based line of the row as a text editor shows it (the header is line 1).
        values: column -> stripped cell text (missing cells are ``""``).
    """

    source: str
    line: int
    values: Mapping[str, str]

    def __getitem__(self, column: str) -> str:
        return self.values.get(column) or ""

    def fail(self, column: str, problem: str, fix: str) -> NoReturn:
        """Raise an :class:`AnalysisError` naming the file, line and column, the problem and the fix."""
        raise AnalysisError(f"{self.source}, line {self.line}, column '{column}': {problem}; {fix}.")

    def require(self, columns: Sequence[str], fix: str) -> None:
        """Refuse the row when one of ``columns`` is empty (the first empty one is named)."""
        for column in columns:
            if not self[column]:
                self.fail(column, "is empty", fix)

    def number(self, column: str, fix: str, low: float = -math.inf, high: float = math.inf, blank_ok: bool = False) -> float:
        """The cell as a finite number within ``[low, high]`` (``nan`` for an empty cell when ``blank_ok``).

        Raises:
            AnalysisError: empty (unless ``blank_ok``), not a number, ``nan``/``inf``, or out of range.
        """
        text = self[column]
        if text == "":
            if blank_ok:
                return math.nan
            self.fail(column, "is empty", fix)
        try:
            value = float(text)
        except ValueError:
            self.fail(column, f"holds {text!r}, not a number", fix)
        if not math.isfinite(value):
            self.fail(column, f"holds {text!r}, not a finite number", fix)
        if value < low:
            self.fail(column, f"holds {text}, below the minimum {low:g}", fix)
        if value > high:
            self.fail(column, f"holds {text}, above the maximum {high:g}", fix)
        return value


def read_csv(path: Path, columns: Sequence[str], fix: str = _EXPORT_FIX) -> list[CsvRow]:
    """The rows of an input CSV with their line numbers.

    Args:
        path: the CSV file.
        columns: columns the header must hold (others are kept).
        fix: how to repair a binary or unreadable file, for the message.

    Raises:
        AnalysisError: the file is missing, binary, unreadable, lacks a column or is not valid CSV.
    """
    if not path.exists():
        raise AnalysisError(
            f"{path} is missing; export the reads with 'lesion-reader export STUDY_DIR OUT_DIR' or provide it in part 1's format (columns {','.join(columns)})."
        )
    try:
        text = read_text_file(path, fix)
    except StudyError as exc:
        raise AnalysisError(str(exc)) from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in columns if c not in header]
        if missing:
            raise AnalysisError(f"{path}, line 1 (header): lacks column(s) {', '.join(missing)}; the header must be {','.join(columns)}.")
        # line_num after a row is the line it ends on: right for blank lines skipped before it.
        rows = [CsvRow(str(path), reader.line_num, {(k or "").strip(): (v or "").strip() for k, v in row.items()}) for row in reader]
    except csv.Error as exc:
        raise AnalysisError(f"{path}, line {reader.line_num}: not valid CSV ({exc}); {fix}.") from None
    return rows


def _order_phases(phases: Iterable[str], preferred: Optional[Sequence[str]] = None) -> list[str]:
    """Phases in reading order: ``preferred`` first, then :data:`KNOWN_PHASE_ORDER`, then as seen."""
    seen = list(dict.fromkeys(phases))
    order = list(preferred or []) + [p for p in KNOWN_PHASE_ORDER if p not in (preferred or [])]
    return sorted(seen, key=lambda p: (order.index(p) if p in order else len(order), seen.index(p)))


# --------------------------------------------------------------------------- grades.csv


@dataclass
class _GradeRows:
    """The parsed rows of grades.csv (see :func:`parse_reads`)."""

    grades: dict[ReadKey, dict[str, tuple[float, float]]] = field(default_factory=dict)
    excluded: set[str] = field(default_factory=set)
    readers: list[str] = field(default_factory=list)
    phases: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _excluded_flag(row: CsvRow) -> bool:
    """The ``excluded`` cell: 1/true/yes or 0/false/no/empty."""
    flag = row["excluded"].lower()
    if flag in ("1", "true", "yes"):
        return True
    if flag not in ("", "0", "false", "no"):
        row.fail("excluded", f"holds {row['excluded']!r}", "use 1 for a case with more than 20 lesions, else 0")
    return False


def _grade_row(row: CsvRow, first_line: dict[tuple[str, str, str], int]) -> tuple[bool, float, float]:
    """Validate one grades row; returns (excluded flag, grade, seconds), ``nan`` where empty."""
    row.require(("reader", "phase", "case"), "every grades row needs its reader, phase and case")
    if row["reader"] == AVERAGE:
        row.fail("reader", f"'{AVERAGE}' is reserved for the reader-average rows", "rename the reader")
    ident = (row["reader"], row["phase"], row["case"])
    if ident in first_line:
        row.fail("case", f"a second grades row for reader {ident[0]}, phase {ident[1]}, case {row['case']} (first on line {first_line[ident]})",
                 "keep one row per read")
    first_line[ident] = row.line
    excluded = _excluded_flag(row)
    grade = row.number("grade", _GRADE_FIX, low=1.0, high=4.0, blank_ok=True)
    if not math.isnan(grade) and grade != int(grade):
        row.fail("grade", f"holds {row['grade']}, not a whole grade", _GRADE_FIX)
    seconds = row.number("seconds", _SECONDS_FIX, low=0.0, high=MAX_READING_SECONDS, blank_ok=True)
    return excluded, grade, seconds


def _parse_grades(grade_rows: Sequence[CsvRow]) -> _GradeRows:
    """grades.csv rows -> grades per read; only excluded cases may lack a grade."""
    out = _GradeRows()
    first_line: dict[tuple[str, str, str], int] = {}
    ungraded: list[CsvRow] = []
    untimed: list[CsvRow] = []
    for row in grade_rows:
        excluded, grade, seconds = _grade_row(row, first_line)
        if excluded:
            out.excluded.add(row["case"])
        if math.isnan(grade):
            ungraded.append(row)
        if math.isnan(seconds):
            untimed.append(row)
        out.grades.setdefault((row["reader"], row["phase"]), {})[row["case"]] = (grade, seconds)
        out.readers.append(row["reader"])
        out.phases.append(row["phase"])
    # Paper, "Reader study protocol": cases with more than 20 lesions "were not annotated and were
    # excluded", so only they may lack a grade; the flag may sit on any row of the case.
    for row in ungraded:
        if row["case"] not in out.excluded:
            row.fail("grade", "is empty", _GRADE_FIX + ", or set 'excluded' to 1 if the case has more than 20 lesions")
    untimed = [row for row in untimed if row["case"] not in out.excluded]
    if untimed:
        out.notes.append(f"{untimed[0].source}: {len(untimed)} grades row(s) have no reading time ('seconds' empty, e.g. line "
                         f"{untimed[0].line}); they are left out of Table 6 (reading times).")
    return out


# --------------------------------------------------------------------------- lesions.csv


def _stated_length(row: CsvRow, column: str, measured: float) -> Optional[float]:
    """``long_mm``/``short_mm`` as stated: ``None`` when empty (the end points' distance is used), else a value that agrees with it."""
    value = row.number(column, f"write the axis length in mm (>= 0), or leave {column} empty to use the end points' distance",
                       low=0.0, blank_ok=True)
    if math.isnan(value):
        return None
    if abs(value - measured) > AXIS_LENGTH_TOLERANCE_MM:
        row.fail(column, f"is {value:g} mm but the axis end points are {measured:.3f} mm apart",
                 f"write the distance between the end points, or leave {column} empty to use it")
    return value


def _axes(row: CsvRow) -> LesionGeometry:
    """The long and short axes' end points of a lesion row, each coordinate within the head's range."""
    pts = {c: row.number(c, _COORDINATE_FIX, -MAX_ABS_COORDINATE_MM, MAX_ABS_COORDINATE_MM) for c in AXIS_COLUMNS}
    la = ((pts["long_x1"], pts["long_y1"], pts["long_z1"]), (pts["long_x2"], pts["long_y2"], pts["long_z2"]))
    sa = ((pts["short_x1"], pts["short_y1"], pts["short_z1"]), (pts["short_x2"], pts["short_y2"], pts["short_z2"]))
    return LesionGeometry(la, sa, row["lesion"])


def _stated_center(row: CsvRow, middle: Point, long_mm: float) -> Optional[Point]:
    """The centre as stated: ``None`` when empty (the axes' middle is used), else one within a long axis of that middle."""
    x, y, z = (row.number(c, _COORDINATE_FIX, -MAX_ABS_COORDINATE_MM, MAX_ABS_COORDINATE_MM, blank_ok=True) for c in CENTER_COLUMNS)
    center = (x, y, z)
    blank = [c for c, v in zip(CENTER_COLUMNS, center) if math.isnan(v)]
    if len(blank) == len(CENTER_COLUMNS):
        return None
    if blank:
        row.fail(blank[0], "is empty while other centre columns are not", "give center_x, center_y and center_z, or leave all three empty to use the mean of the end points")
    if math.dist(center, middle) > long_mm + AXIS_LENGTH_TOLERANCE_MM:
        row.fail("center_x", f"the centre is {math.dist(center, middle):.1f} mm from the middle of the axes, farther than the "
                 f"long axis ({long_mm:g} mm)", "write the mean of the four end points, or leave center_x..center_z empty to use it")
    return center


def _mark(row: CsvRow, seen: dict[tuple[str, str, str, str], int]) -> Mark:
    """Validate one lesions row (ids, uniqueness, coordinates, lengths, centre) into a :class:`Mark`."""
    row.require(("reader", "phase", "case", "lesion"), "every lesion row needs its reader, phase, case and lesion id")
    ident = (row["reader"], row["phase"], row["case"], row["lesion"])
    if ident in seen:
        row.fail("lesion", f"lesion {row['lesion']!r} appears twice for reader {ident[0]}, phase {ident[1]}, case {ident[2]} "
                 f"(first on line {seen[ident]})", "lesion ids must be unique per read")
    seen[ident] = row.line
    axes = _axes(row)
    stated_long = _stated_length(row, "long_mm", axes.measured_long_mm)
    stated_short = _stated_length(row, "short_mm", axes.measured_short_mm)
    long_mm = axes.measured_long_mm if stated_long is None else stated_long
    short_mm = axes.measured_short_mm if stated_short is None else stated_short
    if long_mm <= 0:
        row.fail("long_mm", "the long axis has zero length", "draw the long axis across the lesion's largest extent")
    if short_mm > long_mm + AXIS_LENGTH_TOLERANCE_MM:
        row.fail("short_mm", f"the short axis ({short_mm:g} mm) is longer than the long axis ({long_mm:g} mm)",
                 "the short (minor) axis is never the longer one (paper, 'Reader study protocol': major and minor axes); swap the two axes")
    center = _stated_center(row, axes.measured_center, long_mm)
    geometry = replace(axes, recorded_long_mm=stated_long, recorded_short_mm=stated_short, recorded_center=center)
    return Mark(row["reader"], row["phase"], row["case"], geometry)


def _parse_lesions(lesion_rows: Sequence[CsvRow], grades: Mapping[ReadKey, Mapping[str, object]]) -> tuple[dict[ReadKey, dict[str, list[Mark]]], list[str]]:
    """lesions.csv rows -> marks per read and case, and a note on lesions of cases without a grades row."""
    marks: dict[ReadKey, dict[str, list[Mark]]] = {}
    seen: dict[tuple[str, str, str, str], int] = {}
    orphans: list[CsvRow] = []
    for row in lesion_rows:
        mark = _mark(row, seen)
        marks.setdefault((mark.reader, mark.phase), {}).setdefault(mark.case, []).append(mark)
        if (mark.reader, mark.phase) in grades and mark.case not in grades[(mark.reader, mark.phase)]:
            orphans.append(row)
    notes: list[str] = []
    if orphans:
        o = orphans[0]
        notes.append(f"{o.source}: {len(orphans)} lesion row(s) of cases without a grades row for their reader and phase are ignored "
                     f"(e.g. line {o.line}: reader {o['reader']}, phase {o['phase']}, case {o['case']}); the cases of a read are those "
                     "with a grades row.")
    return marks, notes


def parse_reads(
    grade_rows: Sequence[CsvRow],
    lesion_rows: Sequence[CsvRow],
    phase_order: Optional[Sequence[str]] = None,
    reader_order: Optional[Sequence[str]] = None,
) -> Reads:
    """Validate and parse the rows of ``grades.csv`` and ``lesions.csv``; nothing is dropped silently.

    Refused (:class:`AnalysisError` naming file, line, column and the fix): empty ids, the reserved
    reader id ``average``, duplicated rows, an ``excluded`` flag other than 0/1, a grade that is
    not a whole number 1-4 (paper, "Reader study protocol": 4-point scale; an empty grade only in
    an excluded case), a reading time that is negative, non-finite or above
    :data:`MAX_READING_SECONDS`; a coordinate that is non-finite or beyond
    :data:`MAX_ABS_COORDINATE_MM`, an axis length that is negative or disagrees with its end points
    by more than :data:`AXIS_LENGTH_TOLERANCE_MM`, a zero-length long axis, a short (minor) axis
    longer than the long (major) one ("Reader study protocol": readers marked "the major and
    minor axes"), a centre farther from the axes' middle than the long axis. Empty ``seconds``,
    lengths and centres are allowed (no time recorded; lengths and centre from the end points).

    Args:
        grade_rows, lesion_rows: the rows of the two files (see :func:`read_csv`).
        phase_order: reading order of the phases (the study's), before :data:`KNOWN_PHASE_ORDER`.
        reader_order: readers listed first (the study's), in this order.
    """
    graded = _parse_grades(grade_rows)
    marks, lesion_notes = _parse_lesions(lesion_rows, graded.grades)
    # Every lesion row became a mark (or was refused): its ids count, in file order.
    readers = list(reader_order or []) + graded.readers + [row["reader"] for row in lesion_rows]
    phases = graded.phases + [row["phase"] for row in lesion_rows]
    return Reads(
        grades=graded.grades, marks=marks, excluded=graded.excluded,
        readers=list(dict.fromkeys(readers)), phases=_order_phases(phases, phase_order), notes=graded.notes + lesion_notes,
    )


def read_reads(folder: PathLike, phase_order: Optional[Sequence[str]] = None, reader_order: Optional[Sequence[str]] = None) -> Reads:
    """Read ``grades.csv`` and ``lesions.csv`` from ``folder`` (part 1's export format).

    Raises:
        AnalysisError: see :func:`parse_reads`; also a missing, binary or unreadable file, or a
            missing column.
    """
    folder = Path(folder)
    return parse_reads(
        read_csv(folder / "grades.csv", GRADES_COLUMNS), read_csv(folder / "lesions.csv", LESIONS_COLUMNS),
        phase_order, reader_order,
    )


# --------------------------------------------------------------------------- a study's reads


@dataclass
class LoadedReads:
    """The reads of a study folder and, for a reads database, the rows exported from it.

    Attributes:
        reads: the validated reads.
        exported: grades and lesions rows exported from ``reads.sqlite`` (written to
            ``OUT_DIR/reads/``), ``None`` for a folder of CSV files.
        notes: where the reads came from, then :attr:`Reads.notes`.
    """

    reads: Reads
    exported: Optional[ExportedRows]
    notes: list[str]


def load_reads(study_dir: Path, info: StudyInfo) -> LoadedReads:
    """The reads of ``study_dir``: exported afresh from a study's database, else its CSV files.

    A study with a reads database is exported afresh (CSV files lying in the folder may be
    stale) and validated in memory; the export is written to ``OUT_DIR/reads/`` with the results.

    Raises:
        AnalysisError: the database cannot be exported, or any invalid value (:func:`parse_reads`).
    """
    if not ((study_dir / "study.json").is_file() and (study_dir / "reads.sqlite").is_file()):
        reads = read_reads(study_dir, info.phase_order, info.reader_order)
        return LoadedReads(reads, None, list(reads.notes))
    try:
        exported = collect_rows(study_dir)
    except StudyError as exc:
        raise AnalysisError(f"could not export the reads of {study_dir}: {exc}") from exc
    source = f"{study_dir / 'reads.sqlite'} exported as %s (see it with 'lesion-reader export')"

    def csv_rows(name: str, header: Sequence[str], rows: list[list[str]]) -> list[CsvRow]:
        return [CsvRow(source % name, line, dict(zip(header, row))) for line, row in enumerate(rows, start=2)]

    reads = parse_reads(
        csv_rows("grades.csv", GRADES_HEADER, exported[0]), csv_rows("lesions.csv", LESIONS_HEADER, exported[1]),
        info.phase_order, info.reader_order,
    )
    return LoadedReads(reads, exported, ["Reads exported from the study database to reads/grades.csv and lesions.csv."] + reads.notes)


# --------------------------------------------------------------------------- reference


def _reference_reader(reads: Reads, phase: str, reader: Optional[str]) -> str:
    """``reader``, else the only reader with marks in the reference phase."""
    if reader is not None:
        return reader
    markers = [r for (r, p) in reads.marks if p == phase]
    if len(markers) != 1:
        raise AnalysisError(
            f"cannot tell the reference reader: {len(markers)} readers marked lesions in phase {phase!r} "
            f"({', '.join(markers) or 'none'}); pass --reference-reader ID."
        )
    return markers[0]


def select_reference(reads: Reads, info: StudyInfo, phase: Optional[str] = None, reader: Optional[str] = None) -> Reference:
    """The reference read (paper, "Performance metrics": S.A.'s lesions on T1c-vfa) and its lesions.

    Args:
        reads: the validated reads.
        info: the study's reference, when it gives one.
        phase: reference phase (default: the study's, else :data:`DEFAULT_REFERENCE_PHASE`).
        reader: reference reader (default: the study's, else the only reader with marks in ``phase``).

    Raises:
        AnalysisError: the phase has no reads, the reader is ambiguous, or the reference reader
            has no grades row in that phase.
    """
    phase = phase or info.reference_phase or DEFAULT_REFERENCE_PHASE
    if phase not in reads.phases:
        raise AnalysisError(
            f"reference phase {phase!r} has no reads (phases in the reads: {', '.join(reads.phases) or 'none'}); pass --reference-phase NAME."
        )
    reader = _reference_reader(reads, phase, reader or info.reference_reader)
    if (reader, phase) not in reads.grades:
        raise AnalysisError(
            f"reference reader {reader!r} has no grades.csv row in phase {phase!r}; the cases of a read are those with a grades row. "
            f"Check --reference-reader/--reference-phase or add the grades rows."
        )
    cases = sorted(set(reads.grades[(reader, phase)]) - reads.excluded)
    lesions = {c: reads.marks.get((reader, phase), {}).get(c, []) for c in cases}
    return Reference(phase=phase, reader=reader, cases=cases, lesions=lesions)


def reference_notes(reference: Reference, reads: Reads) -> list[str]:
    """Notes on an empty reference read and on the cases left out of every analysis."""
    notes: list[str] = []
    if reference.n_lesions == 0:
        notes.append("The reference read has no lesion: detection metrics are undefined.")
    excluded = sorted(reads.excluded)
    if excluded:
        notes.append(f"{len(excluded)} case(s) flagged 'excluded' (e.g. more than 20 lesions) are left out of every analysis: {', '.join(excluded)}.")
    return notes
