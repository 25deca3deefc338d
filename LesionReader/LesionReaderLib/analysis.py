"""The ``analyze`` pipeline: from ``grades.csv`` + ``lesions.csv`` to the paper's Tables 3-6.

Paper sections "Performance metrics" and "Statistical analysis". Inputs are part 1's export
format (long format, RAS mm), so reads made with other tools can be analysed too:

- ``grades.csv``: ``reader,phase,case,grade,seconds,excluded``
- ``lesions.csv``: ``reader,phase,case,lesion,long_mm,short_mm,long_x1..long_z2,
  short_x1..short_z2,center_x,center_y,center_z``

Inputs are validated before any computation: a value that is not finite or not possible
(a grade outside 1-4, a negative time or length, a short axis longer than the long one, a
coordinate beyond :data:`MAX_ABS_COORDINATE_MM`...) is refused with the file, line and column;
see :func:`parse_reads`.

Reference lesions are the reference reader's marks in the reference phase (paper: S.A. on
T1c-vfa). Outputs (all in ``OUT_DIR``):

- ``detection.csv`` (Table 5), ``comparisons.csv`` (every test of Tables 3-6),
- ``quality.csv`` (Table 3), ``contrast.csv`` (Table 4, per case), ``times.csv`` (Table 6),
- ``matches.csv`` (every reference lesion / mark pairing, for audit), ``analysis.json``;
- beyond the paper: ``agreement.csv`` (weighted Cohen's kappa between readers' grades) and
  ``bootstrap.csv`` (case-level bootstrap interval of the reader-average sensitivity).

Choices the paper leaves open, made here and listed in the README:

- a case flagged ``excluded`` in any row is left out of every analysis (paired tests stay paired);
- a false positive counts at a size threshold when its own long axis reaches it;
- reader-average rows: sensitivity = mean TP count / reference count with the Clopper-Pearson
  interval on these (non-integer) counts; false detections per case = the per-case mean over
  readers, with its Student-t interval; PPV = mean TP / (mean TP + mean FP); grades and times =
  per-case means over readers; the reader-average McNemar test pools the readers' lesion pairs
  and the reader-average Wilcoxon test uses the per-case means.
"""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Mapping, NoReturn, Optional, Sequence, Tuple, Union

import numpy as np

from ContrastAmplifierLib.atomicfile import atomic_path
from ContrastAmplifierLib.outputs import OutputPathError, folders_to_create, staged_folder

from . import stats
from .matching import Lesion, match_lesions
from .study import StudyError, read_text_file

PathLike = Union[str, os.PathLike]
Axis = Tuple[Tuple[float, float, float], Tuple[float, float, float]]

GRADES_COLUMNS = ("reader", "phase", "case", "grade", "seconds", "excluded")
LESIONS_COLUMNS = (
    "reader", "phase", "case", "lesion", "long_mm", "short_mm",
    "long_x1", "long_y1", "long_z1", "long_x2", "long_y2", "long_z2",
    "short_x1", "short_y1", "short_z1", "short_x2", "short_y2", "short_z2",
    "center_x", "center_y", "center_z",
)
CENTER_COLUMNS = LESIONS_COLUMNS[18:]
DETECTION_COLUMNS = (
    "threshold_mm", "reader", "phase", "tp", "fn", "fp", "n_cases", "sensitivity",
    "sensitivity_ci_low", "sensitivity_ci_high", "fdr_per_case", "fdr_ci_low", "fdr_ci_high", "ppv", "f1",
)
COMPARISON_COLUMNS = (
    "table", "threshold_mm", "metric", "phase_a", "reader_a", "phase_b", "reader_b", "test", "statistic", "p_value",
)
CONTRAST_COLUMNS = (
    "case", "volume", "cnr", "lbr", "cep", "si_lesion", "si_brain", "sd_brain", "si_lesion_pre",
    "n_lesions", "n_lesion_voxels", "n_brain_voxels", "brain_roi",
)
QUALITY_COLUMNS = ("reader", "phase", "n_cases", "mean_grade", "sd_grade", "n_grade_1", "n_grade_2", "n_grade_3", "n_grade_4")
TIMES_COLUMNS = (
    "reader", "phase", "n_cases", "mean_seconds", "sd_seconds", "total_seconds", "n_marks",
    "seconds_per_mark", "paper_seconds_per_lesion",
)
AGREEMENT_COLUMNS = ("phase", "reader_a", "reader_b", "n_cases", "kappa_linear", "kappa_quadratic")
BOOTSTRAP_COLUMNS = ("threshold_mm", "reader", "phase", "n_cases", "sensitivity", "ci_low", "ci_high", "n_boot", "seed")
#: Case-level bootstrap replicates for the reader-average sensitivity (beyond the paper).
DEFAULT_N_BOOT = 2000
MATCHES_COLUMNS = ("reader", "phase", "case", "reference_lesion", "reference_long_mm", "mark_lesion", "mark_long_mm", "distance_mm")

#: Size thresholds on the long axis, in mm (paper, "Performance metrics": 10, 5 and 0 mm).
DEFAULT_THRESHOLDS_MM = (0.0, 5.0, 10.0)
#: Reference phase when nothing else says (paper: T1c-vfa).
DEFAULT_REFERENCE_PHASE = "T1c-vfa"
#: Reader id of the reader-average rows.
AVERAGE = "average"
#: Known phase order, used when the study does not give one.
KNOWN_PHASE_ORDER = ("T1c-low", "T1c", "T1c-pro", "T1c-vfa")
#: Post-contrast volumes scored for CNR/LBR/CEP when the study has them (Table 4 + extras).
CONTRAST_VOLUMES = ("T1c-low", "T1c", "T1c-pro", "T1c-vfa", "T1c-x4")
#: Volume keys (study.json ``volumes`` or volumes.csv columns) of the contrast ROI inputs.
PRE_KEYS = ("T1",)
HEALTHY_KEYS = ("healthy_brain", "healthy-brain", "brain_roi")
BRAIN_MASK_KEYS = ("brain_mask", "brain-mask", "brainmask")
LESION_LABEL_KEYS = ("lesion_labels", "lesion-labels", "lesions_label", "lesion_label")


class AnalysisError(ValueError):
    """The analysis inputs are unusable; the message names the file or option and the fix."""


@dataclass(frozen=True)
class Mark:
    """One lesion row of lesions.csv."""

    reader: str
    phase: str
    case: str
    lesion: str
    long_mm: float
    short_mm: float
    long_axis: Tuple[Tuple[float, float, float], Tuple[float, float, float]]
    short_axis: Tuple[Tuple[float, float, float], Tuple[float, float, float]]
    center: Tuple[float, float, float]

    def as_lesion(self) -> Lesion:
        return Lesion(center=self.center, long_mm=self.long_mm, short_mm=self.short_mm, lesion_id=self.lesion)


@dataclass
class Reads:
    """Parsed reads: grades/seconds per (reader, phase) and case, marks per (reader, phase) and case.

    ``notes`` say what was read but left out (rows without a reading time, lesions of ungraded cases).
    """

    grades: Dict[Tuple[str, str], Dict[str, Tuple[float, float]]]
    marks: Dict[Tuple[str, str], Dict[str, List[Mark]]]
    excluded: set
    readers: List[str]
    phases: List[str]
    notes: List[str] = field(default_factory=list)


# --------------------------------------------------------------------------- reading

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


def _read_csv(path: Path, columns: Sequence[str], fix: str = _EXPORT_FIX) -> List[CsvRow]:
    """The rows of an input CSV with their line numbers; binary or unreadable files are refused with ``fix``."""
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


def _order_phases(phases: Iterable[str], preferred: Optional[Sequence[str]] = None) -> List[str]:
    seen = list(dict.fromkeys(phases))
    order = list(preferred or []) + [p for p in KNOWN_PHASE_ORDER if p not in (preferred or [])]
    return sorted(seen, key=lambda p: (order.index(p) if p in order else len(order), seen.index(p)))


def read_reads(folder: PathLike, phase_order: Optional[Sequence[str]] = None, reader_order: Optional[Sequence[str]] = None) -> Reads:
    """Read ``grades.csv`` and ``lesions.csv`` from ``folder`` (part 1's export format).

    Raises:
        AnalysisError: see :func:`parse_reads`; also a missing, binary or unreadable file, or a
            missing column.
    """
    folder = Path(folder)
    return parse_reads(
        _read_csv(folder / "grades.csv", GRADES_COLUMNS), _read_csv(folder / "lesions.csv", LESIONS_COLUMNS),
        phase_order, reader_order,
    )


def _axis_length(row: CsvRow, column: str, axis: Axis) -> float:
    """``long_mm``/``short_mm``: the end points' distance when empty, else a value that agrees with it."""
    measured = math.dist(*axis)
    value = row.number(column, f"write the axis length in mm (>= 0), or leave {column} empty to use the end points' distance",
                       low=0.0, blank_ok=True)
    if math.isnan(value):
        return measured
    if abs(value - measured) > AXIS_LENGTH_TOLERANCE_MM:
        row.fail(column, f"is {value:g} mm but the axis end points are {measured:.3f} mm apart",
                 f"write the distance between the end points, or leave {column} empty to use it")
    return value


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
    """
    grades: Dict[Tuple[str, str], Dict[str, Tuple[float, float]]] = {}
    first_line: Dict[Tuple[str, str, str], int] = {}
    excluded = set()
    ungraded: List[CsvRow] = []
    untimed: List[CsvRow] = []
    readers: List[str] = list(reader_order or [])
    phases: List[str] = []
    for row in grade_rows:
        for column in ("reader", "phase", "case"):
            if not row[column]:
                row.fail(column, "is empty", "every grades row needs its reader, phase and case")
        if row["reader"] == AVERAGE:
            row.fail("reader", f"'{AVERAGE}' is reserved for the reader-average rows", "rename the reader")
        key = (row["reader"], row["phase"])
        ident = (*key, row["case"])
        if ident in first_line:
            row.fail("case", f"a second grades row for reader {key[0]}, phase {key[1]}, case {row['case']} (first on line {first_line[ident]})",
                     "keep one row per read")
        first_line[ident] = row.line
        flag = row["excluded"].lower()
        if flag in ("1", "true", "yes"):
            excluded.add(row["case"])
        elif flag not in ("", "0", "false", "no"):
            row.fail("excluded", f"holds {row['excluded']!r}", "use 1 for a case with more than 20 lesions, else 0")
        grade = row.number("grade", _GRADE_FIX, low=1.0, high=4.0, blank_ok=True)
        if math.isnan(grade):
            ungraded.append(row)
        elif grade != int(grade):
            row.fail("grade", f"holds {row['grade']}, not a whole grade", _GRADE_FIX)
        seconds = row.number("seconds", _SECONDS_FIX, low=0.0, high=MAX_READING_SECONDS, blank_ok=True)
        if math.isnan(seconds):
            untimed.append(row)
        grades.setdefault(key, {})[row["case"]] = (grade, seconds)
        readers.append(row["reader"])
        phases.append(row["phase"])
    # Paper, "Reader study protocol": cases with more than 20 lesions "were not annotated and were
    # excluded", so only they may lack a grade; the flag may sit on any row of the case.
    for row in ungraded:
        if row["case"] not in excluded:
            row.fail("grade", "is empty", _GRADE_FIX + ", or set 'excluded' to 1 if the case has more than 20 lesions")
    notes: List[str] = []
    untimed = [row for row in untimed if row["case"] not in excluded]
    if untimed:
        notes.append(f"{untimed[0].source}: {len(untimed)} grades row(s) have no reading time ('seconds' empty, e.g. line "
                     f"{untimed[0].line}); they are left out of Table 6 (reading times).")
    marks: Dict[Tuple[str, str], Dict[str, List[Mark]]] = {}
    seen: Dict[Tuple[str, str, str, str], int] = {}
    orphans: List[CsvRow] = []
    for row in lesion_rows:
        for column in ("reader", "phase", "case", "lesion"):
            if not row[column]:
                row.fail(column, "is empty", "every lesion row needs its reader, phase, case and lesion id")
        ident = (row["reader"], row["phase"], row["case"], row["lesion"])
        if ident in seen:
            row.fail("lesion", f"lesion {row['lesion']!r} appears twice for reader {ident[0]}, phase {ident[1]}, case {ident[2]} "
                     f"(first on line {seen[ident]})", "lesion ids must be unique per read")
        seen[ident] = row.line
        pts = {c: row.number(c, _COORDINATE_FIX, -MAX_ABS_COORDINATE_MM, MAX_ABS_COORDINATE_MM) for c in LESIONS_COLUMNS[6:18]}
        la = ((pts["long_x1"], pts["long_y1"], pts["long_z1"]), (pts["long_x2"], pts["long_y2"], pts["long_z2"]))
        sa = ((pts["short_x1"], pts["short_y1"], pts["short_z1"]), (pts["short_x2"], pts["short_y2"], pts["short_z2"]))
        long_mm = _axis_length(row, "long_mm", la)
        short_mm = _axis_length(row, "short_mm", sa)
        if long_mm <= 0:
            row.fail("long_mm", "the long axis has zero length", "draw the long axis across the lesion's largest extent")
        if short_mm > long_mm + AXIS_LENGTH_TOLERANCE_MM:
            row.fail("short_mm", f"the short axis ({short_mm:g} mm) is longer than the long axis ({long_mm:g} mm)",
                     "the short (minor) axis is never the longer one (paper, 'Reader study protocol': major and minor axes); swap the two axes")
        middle = tuple(float(v) for v in np.mean(np.array(la + sa), axis=0))
        center = tuple(row.number(c, _COORDINATE_FIX, -MAX_ABS_COORDINATE_MM, MAX_ABS_COORDINATE_MM, blank_ok=True) for c in CENTER_COLUMNS)
        blank = [c for c, v in zip(CENTER_COLUMNS, center) if math.isnan(v)]
        if len(blank) == len(CENTER_COLUMNS):
            center = middle
        elif blank:
            row.fail(blank[0], "is empty while other centre columns are not", "give center_x, center_y and center_z, or leave all three empty to use the mean of the end points")
        elif math.dist(center, middle) > long_mm + AXIS_LENGTH_TOLERANCE_MM:
            row.fail("center_x", f"the centre is {math.dist(center, middle):.1f} mm from the middle of the axes, farther than the "
                     f"long axis ({long_mm:g} mm)", "write the mean of the four end points, or leave center_x..center_z empty to use it")
        mark = Mark(row["reader"], row["phase"], row["case"], row["lesion"], long_mm, short_mm, la, sa, center)
        marks.setdefault((mark.reader, mark.phase), {}).setdefault(mark.case, []).append(mark)
        if (mark.reader, mark.phase) in grades and mark.case not in grades[(mark.reader, mark.phase)]:
            orphans.append(row)
        readers.append(mark.reader)
        phases.append(mark.phase)
    if orphans:
        o = orphans[0]
        notes.append(f"{o.source}: {len(orphans)} lesion row(s) of cases without a grades row for their reader and phase are ignored "
                     f"(e.g. line {o.line}: reader {o['reader']}, phase {o['phase']}, case {o['case']}); the cases of a read are those "
                     "with a grades row.")
    return Reads(
        grades=grades, marks=marks, excluded=excluded,
        readers=list(dict.fromkeys(readers)), phases=_order_phases(phases, phase_order), notes=notes,
    )


# --------------------------------------------------------------------------- study


@dataclass
class StudyInfo:
    """What the analysis needs from a study: reference, order, marking readers, case volumes."""

    reference_phase: Optional[str] = None
    reference_reader: Optional[str] = None
    phase_order: List[str] = field(default_factory=list)
    reader_order: List[str] = field(default_factory=list)
    markers: Dict[str, Union[str, Tuple[str, ...]]] = field(default_factory=dict)
    volumes: Dict[str, Dict[str, Path]] = field(default_factory=dict)


def _volumes_from_csv(path: Path) -> Dict[str, Dict[str, Path]]:
    """``volumes.csv``: header ``case,<volume>,...`` (T1, T1c, T1c-pro, T1c-vfa, brain_mask...)."""
    out: Dict[str, Dict[str, Path]] = {}
    for row in _read_csv(path, ("case",), "write volumes.csv as a UTF-8 CSV file with the header case,T1,T1c,T1c-pro,T1c-vfa,..."):
        if not row["case"]:
            row.fail("case", "is empty", "give the case id of every volumes row (as in grades.csv)")
        if row["case"] in out:
            row.fail("case", f"case {row['case']!r} has a second row", "keep one row per case")
        vols = {}
        for column, value in row.values.items():
            if column == "case" or not column or not value:
                continue
            p = Path(value)
            vols[_canonical(column)] = p if p.is_absolute() else (path.parent / p)
        out[row["case"]] = vols
    return out


def _canonical(name: str) -> str:
    try:
        from .study import canonical_modality
    except ImportError:  # part 1 absent: keep the spelling
        return name
    return canonical_modality(name) or name


def load_study_info(study_dir: PathLike) -> StudyInfo:
    """Read ``study.json`` (part 1) and/or ``volumes.csv`` from ``study_dir`` when present.

    A folder with neither gives an empty :class:`StudyInfo` (bare CSV analysis).
    """
    study_dir = Path(study_dir)
    info = StudyInfo()
    if (study_dir / "study.json").is_file():
        from .study import StudyError, load_study

        try:
            study = load_study(study_dir)
        except StudyError as exc:
            raise AnalysisError(str(exc)) from exc
        info.reference_phase = study.reference_phase
        info.reference_reader = study.reference_reader
        info.phase_order = [p.name for p in study.phases]
        info.reader_order = list(study.readers)
        info.markers = {p.name: p.markers for p in study.phases}
        for case in study.cases:
            info.volumes[case.id] = {name: study.volume_path(case.id, name) for name in case.volumes}
    if (study_dir / "volumes.csv").exists():
        for case, vols in _volumes_from_csv(study_dir / "volumes.csv").items():
            info.volumes.setdefault(case, {}).update(vols)
    # Roles part 1 does not list (brain mask, lesion labels, healthy-brain label) are looked for
    # beside the case's T1c, named like the phantom's files (brain_mask.nii.gz ...).
    for case, vols in info.volumes.items():
        if "T1c" not in vols:
            continue
        folder = Path(vols["T1c"]).parent
        for keys in (HEALTHY_KEYS, BRAIN_MASK_KEYS, LESION_LABEL_KEYS):
            if any(k in vols for k in keys):
                continue
            for key in keys:
                hits = [folder / f"{key}{suffix}" for suffix in (".nii.gz", ".nii", ".nrrd", ".mha")]
                hits = [h for h in hits if h.is_file()]
                if hits:
                    vols[keys[0]] = hits[0]
                    break
    return info


# --------------------------------------------------------------------------- detection


@dataclass
class PairDetection:
    """Detection outcome of one (reader, phase) against the reference, per lesion and per case."""

    reader: str
    phase: str
    cases: List[str]
    detected: Dict[Tuple[str, str], bool]
    fp_long: Dict[str, List[float]]
    marks_per_case: Dict[str, int]


def _ref_keys(reference: Mapping[str, List[Mark]], cases: Iterable[str], threshold: float) -> List[Tuple[str, str]]:
    return [(c, m.lesion) for c in cases for m in reference.get(c, []) if m.long_mm >= threshold]


def _fp_counts(pd: PairDetection, cases: Sequence[str], threshold: float) -> np.ndarray:
    return np.array([sum(1 for length in pd.fp_long.get(c, []) if length >= threshold) for c in cases], dtype=float)


def _fmt(value: float) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if math.isnan(value):
        return ""
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.10g}"


def _write_csv(path: Path, columns: Sequence[str], rows: Iterable[Mapping]) -> Path:
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_fmt(row.get(c)) for c in columns])
    return path


@dataclass
class AnalysisResult:
    """Everything ``analyze`` computed; :mod:`report` renders it."""

    out_dir: Path
    reference_phase: str
    reference_reader: str
    readers: List[str]
    phases: List[str]
    thresholds: List[float]
    n_reference_cases: int
    n_reference_lesions: int
    reference_long_mm: List[float]
    excluded_cases: List[str]
    detection: List[dict]
    comparisons: List[dict]
    quality: List[dict]
    times: List[dict]
    contrast: List[dict]
    per_case: Dict[str, Dict[Tuple[str, str], Dict[str, float]]]
    notes: List[str]
    agreement: List[dict] = field(default_factory=list)
    bootstrap: List[dict] = field(default_factory=list)
    files: Dict[str, Path] = field(default_factory=dict)


def _detection_row(threshold: float, reader: str, phase: str, tp: float, n_ref: int, fp: float, fdr_values: np.ndarray) -> dict:
    """One detection.csv row (paper, "Performance metrics" and Table 5)."""
    fn = n_ref - tp
    if n_ref > 0:
        se = tp / n_ref
        lo, hi = stats.clopper_pearson(tp, n_ref)
    else:
        se = lo = hi = math.nan
    fdr, flo, fhi = stats.student_t_ci(fdr_values)
    pp = stats.ppv(tp, fp)
    return {
        "threshold_mm": threshold, "reader": reader, "phase": phase, "tp": tp, "fn": fn, "fp": fp,
        "n_cases": len(fdr_values), "sensitivity": se, "sensitivity_ci_low": lo, "sensitivity_ci_high": hi,
        "fdr_per_case": fdr, "fdr_ci_low": flo, "fdr_ci_high": fhi, "ppv": pp, "f1": stats.f1_score(se, pp),
    }


def _comparison(table: str, threshold, metric: str, phase_a: str, reader_a: str, phase_b: str, reader_b: str, result: stats.TestResult) -> dict:
    return {
        "table": table, "threshold_mm": threshold, "metric": metric, "phase_a": phase_a, "reader_a": reader_a,
        "phase_b": phase_b, "reader_b": reader_b, "test": result.test, "statistic": result.statistic, "p_value": result.p_value,
    }


def _mcnemar(pairs_a: Sequence[bool], pairs_b: Sequence[bool]) -> stats.TestResult:
    b = sum(1 for x, y in zip(pairs_a, pairs_b) if x and not y)
    c = sum(1 for x, y in zip(pairs_a, pairs_b) if y and not x)
    return stats.mcnemar_midp(b, c)


def _values(grades: Mapping[str, Tuple[float, float]], cases: Sequence[str], index: int) -> np.ndarray:
    return np.array([grades[c][index] for c in cases], dtype=float)


def _paired_or_independent(a: Mapping[str, float], b: Mapping[str, float]) -> stats.TestResult:
    common = sorted(set(a) & set(b))
    if len(common) >= 2:
        return stats.ttest_rel([a[c] for c in common], [b[c] for c in common])
    return stats.ttest_ind(list(a.values()), list(b.values()))


def _mean_sd(values: Sequence[float]) -> Tuple[float, float]:
    x = np.asarray(list(values), dtype=float)
    if x.size == 0:
        return math.nan, math.nan
    return float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else math.nan


def analyze(
    study_dir: PathLike,
    out_dir: PathLike,
    reference_phase: Optional[str] = None,
    reference_reader: Optional[str] = None,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS_MM,
    contrast: bool = True,
    brain_margin_mm: float = 5.0,
    report: bool = True,
    n_boot: int = DEFAULT_N_BOOT,
    seed: int = 0,
    progress: Optional[Callable[[str, float, str], None]] = None,
) -> AnalysisResult:
    """Run the paper's analysis on a study folder and write the tables and the report.

    Args:
        study_dir: a part-1 study (``study.json`` + reads database) or a folder holding only
            ``grades.csv`` and ``lesions.csv`` (optionally ``volumes.csv`` for the contrast metrics).
        out_dir: receives the CSV tables, ``report.md``, ``report.html`` and the PNG plots.
        reference_phase: phase of the reference lesions (default: study.json, else ``T1c-vfa``).
        reference_reader: reader of the reference lesions (default: study.json, else the only
            reader with marks in the reference phase).
        thresholds: long-axis size thresholds in mm (paper: 0, 5, 10).
        contrast: compute CNR/LBR/CEP when the volumes are known.
        brain_margin_mm: margin of the automatic healthy-brain ROI (deviation, see contrast.py).
        report: also write report.md / report.html / plots.
        n_boot: case-level bootstrap replicates of the reader-average sensitivity (beyond the
            paper; 0 to skip).
        seed: seed of the bootstrap.
        progress: optional ``(stage, fraction, message)`` callback.

    Raises:
        AnalysisError: missing, unreadable or binary inputs, an invalid value (named by file,
            line and column; see :func:`parse_reads`), an unknown or ambiguous reference, an
            ``out_dir`` that is a file or cannot be created, a failed write. All inputs are
            checked before any computation; ``out_dir`` is created only when the results are
            written, and a failed run leaves nothing in it (files already there are kept).
    """
    say = progress or (lambda stage, fraction, message="": None)
    study_dir, out_dir = Path(study_dir), Path(out_dir)
    # Every input is checked before any long work, and nothing is written before the results exist.
    if not study_dir.is_dir():
        raise AnalysisError(f"study folder {study_dir} does not exist; pass a study folder or a folder holding grades.csv and lesions.csv.")
    try:
        folders_to_create(out_dir, "--out")  # a file, below a file, or not writable: before any work
    except OutputPathError as exc:
        raise AnalysisError(str(exc)) from None
    bad = [t for t in thresholds if not (math.isfinite(float(t)) and float(t) >= 0)]
    if bad:
        raise AnalysisError(f"--threshold {bad[0]!r} is not a size in mm; give finite long-axis thresholds >= 0 (paper: 0, 5, 10).")
    if not (math.isfinite(brain_margin_mm) and brain_margin_mm >= 0):
        raise AnalysisError(f"--brain-margin {brain_margin_mm!r} is not a margin in mm; give a finite number >= 0 (default 5).")
    thresholds = sorted(float(t) for t in thresholds)
    notes: List[str] = []
    say("read", 0.0, "reading the study")
    info = load_study_info(study_dir)
    exported: Optional[Tuple[list, list]] = None
    # A study with a reads database is exported afresh (CSV files lying in the folder may be stale),
    # validated in memory and written to OUT_DIR/reads/ with the results.
    if (study_dir / "study.json").is_file() and (study_dir / "reads.sqlite").is_file():
        from .export import GRADES_HEADER, LESIONS_HEADER, collect_rows

        try:
            exported = collect_rows(study_dir)
        except StudyError as exc:
            raise AnalysisError(f"could not export the reads of {study_dir}: {exc}") from exc
        source = f"{study_dir / 'reads.sqlite'} exported as %s (see it with 'lesion-reader export')"
        reads = parse_reads(
            *[[CsvRow(source % name, line, dict(zip(header, row))) for line, row in enumerate(rows, start=2)]
              for name, header, rows in (("grades.csv", GRADES_HEADER, exported[0]), ("lesions.csv", LESIONS_HEADER, exported[1]))],
            info.phase_order, info.reader_order,
        )
        notes.append("Reads exported from the study database to reads/grades.csv and lesions.csv.")
    else:
        reads = read_reads(study_dir, info.phase_order, info.reader_order)
    notes.extend(reads.notes)

    # ---- reference
    ref_phase = reference_phase or info.reference_phase or DEFAULT_REFERENCE_PHASE
    if ref_phase not in reads.phases:
        raise AnalysisError(
            f"reference phase {ref_phase!r} has no reads (phases in the reads: {', '.join(reads.phases) or 'none'}); pass --reference-phase NAME."
        )
    markers_in_ref = [r for (r, p) in reads.marks if p == ref_phase]
    ref_reader = reference_reader or info.reference_reader
    if ref_reader is None:
        if len(markers_in_ref) != 1:
            raise AnalysisError(
                f"cannot tell the reference reader: {len(markers_in_ref)} readers marked lesions in phase {ref_phase!r} "
                f"({', '.join(markers_in_ref) or 'none'}); pass --reference-reader ID."
            )
        ref_reader = markers_in_ref[0]
    ref_key = (ref_reader, ref_phase)
    if ref_key not in reads.grades:
        raise AnalysisError(
            f"reference reader {ref_reader!r} has no grades.csv row in phase {ref_phase!r}; the cases of a read are those with a grades row. "
            f"Check --reference-reader/--reference-phase or add the grades rows."
        )
    excluded = sorted(reads.excluded)
    ref_cases = sorted(set(reads.grades[ref_key]) - reads.excluded)
    reference = {c: reads.marks.get(ref_key, {}).get(c, []) for c in ref_cases}
    n_ref_lesions = sum(len(v) for v in reference.values())
    if n_ref_lesions == 0:
        notes.append("The reference read has no lesion: detection metrics are undefined.")
    if excluded:
        notes.append(f"{len(excluded)} case(s) flagged 'excluded' (e.g. more than 20 lesions) are left out of every analysis: {', '.join(excluded)}.")

    # ---- detection
    say("detection", 0.2, "matching marks to the reference lesions")
    evaluated: List[Tuple[str, str]] = []
    for reader in reads.readers:
        for phase in reads.phases:
            key = (reader, phase)
            if key == ref_key or key not in reads.grades:
                continue
            marker = info.markers.get(phase)
            marks_here = key in reads.marks
            declared = marker is not None and (marker == "all" or reader in marker)
            if marks_here or declared:
                evaluated.append(key)
    for key in reads.marks:
        if key not in reads.grades and key != ref_key:
            notes.append(f"Reader {key[0]} has marks but no grades rows in phase {key[1]}: that read is ignored (the cases of a read are those with a grades row).")
    detections: Dict[Tuple[str, str], PairDetection] = {}
    match_rows: List[dict] = []
    for reader, phase in evaluated:
        graded = set(reads.grades[(reader, phase)]) - reads.excluded
        cases = sorted(graded & set(ref_cases))
        if graded - set(ref_cases):
            notes.append(f"Reader {reader}, phase {phase}: {len(graded - set(ref_cases))} case(s) without a reference read are left out of detection.")
        detected: Dict[Tuple[str, str], bool] = {}
        fp_long: Dict[str, List[float]] = {}
        marks_per_case: Dict[str, int] = {}
        for case in cases:
            ref = reference[case]
            marks = reads.marks.get((reader, phase), {}).get(case, [])
            marks_per_case[case] = len(marks)
            result = match_lesions([m.as_lesion() for m in ref], [m.as_lesion() for m in marks])
            matched = result.mark_for_reference()
            for i, r in enumerate(ref):
                detected[(case, r.lesion)] = i in matched
            fp_long[case] = [marks[j].long_mm for j in result.unmatched_marks]
            for i, j, d in result.pairs:
                match_rows.append({"reader": reader, "phase": phase, "case": case, "reference_lesion": ref[i].lesion,
                                   "reference_long_mm": ref[i].long_mm, "mark_lesion": marks[j].lesion,
                                   "mark_long_mm": marks[j].long_mm, "distance_mm": d})
            for i in result.unmatched_reference:
                match_rows.append({"reader": reader, "phase": phase, "case": case, "reference_lesion": ref[i].lesion,
                                   "reference_long_mm": ref[i].long_mm})
            for j in result.unmatched_marks:
                match_rows.append({"reader": reader, "phase": phase, "case": case, "mark_lesion": marks[j].lesion,
                                   "mark_long_mm": marks[j].long_mm})
        detections[(reader, phase)] = PairDetection(reader, phase, cases, detected, fp_long, marks_per_case)

    detection_rows: List[dict] = []
    comparisons: List[dict] = []
    bootstrap_rows: List[dict] = []
    det_phases = [p for p in reads.phases if any(k[1] == p for k in detections)]
    det_readers = [r for r in reads.readers if any(k[0] == r for k in detections)]
    for t in thresholds:
        for reader in det_readers:
            for phase in det_phases:
                pd = detections.get((reader, phase))
                if pd is None:
                    continue
                keys = _ref_keys(reference, pd.cases, t)
                tp = sum(pd.detected[k] for k in keys)
                fpc = _fp_counts(pd, pd.cases, t)
                detection_rows.append(_detection_row(t, reader, phase, tp, len(keys), float(fpc.sum()), fpc))
        # reader-average rows (Table 5, "Reader Average")
        avg_readers: Dict[str, List[str]] = {}
        for phase in det_phases:
            rs = [r for r in det_readers if (r, phase) in detections]
            if len(rs) < 2:
                continue
            avg_readers[phase] = rs
            cases = sorted(set.intersection(*[set(detections[(r, phase)].cases) for r in rs]))
            keys = _ref_keys(reference, cases, t)
            tps = [sum(detections[(r, phase)].detected[k] for k in keys) for r in rs]
            fps = np.array([_fp_counts(detections[(r, phase)], cases, t) for r in rs])
            detection_rows.append(_detection_row(
                t, AVERAGE, phase, float(np.mean(tps)), len(keys), float(fps.sum(axis=1).mean()),
                fps.mean(axis=0) if len(cases) else np.array([]),
            ))
            if n_boot > 0 and cases:
                # Beyond the paper: case-level bootstrap (lesions cluster within cases).
                ref_n = np.array([sum(1 for m in reference[c] if m.long_mm >= t) for c in cases], dtype=float)
                tp_case = np.array([[sum(detections[(r, phase)].detected[(c, m.lesion)] for m in reference[c] if m.long_mm >= t)
                                     for c in cases] for r in rs], dtype=float)

                def boot_stat(idx, ref_n=ref_n, tp_case=tp_case):
                    n = ref_n[idx].sum()
                    return tp_case[:, idx].sum(axis=1).mean() / n if n > 0 else math.nan

                lo, hi = stats.bootstrap_ci(boot_stat, len(cases), n_boot=n_boot, seed=seed)
                bootstrap_rows.append({"threshold_mm": t, "reader": AVERAGE, "phase": phase, "n_cases": len(cases),
                                       "sensitivity": float(np.mean(tps)) / len(keys) if keys else math.nan,
                                       "ci_low": lo, "ci_high": hi, "n_boot": n_boot, "seed": seed})
        # phase vs phase, per reader and for the average
        for reader in det_readers + [AVERAGE]:
            for pa, pb in itertools.combinations(det_phases, 2):
                if reader == AVERAGE:
                    if pa not in avg_readers or pb not in avg_readers or avg_readers[pa] != avg_readers[pb]:
                        continue
                    rs = avg_readers[pa]
                else:
                    if (reader, pa) not in detections or (reader, pb) not in detections:
                        continue
                    rs = [reader]
                cases = sorted(set.intersection(*[set(detections[(r, p)].cases) for r in rs for p in (pa, pb)]))
                keys = _ref_keys(reference, cases, t)
                xa = [detections[(r, pa)].detected[k] for r in rs for k in keys]
                xb = [detections[(r, pb)].detected[k] for r in rs for k in keys]
                comparisons.append(_comparison("table5", t, "sensitivity", pa, reader, pb, reader, _mcnemar(xa, xb)))
                fa = np.mean([_fp_counts(detections[(r, pa)], cases, t) for r in rs], axis=0) if cases else []
                fb = np.mean([_fp_counts(detections[(r, pb)], cases, t) for r in rs], axis=0) if cases else []
                comparisons.append(_comparison("table5", t, "fdr_per_case", pa, reader, pb, reader, stats.wilcoxon_signed_rank(fa, fb)))
        # reader vs reader within a phase (Table 5, "R1 vs. R2")
        for phase in det_phases:
            rs = [r for r in det_readers if (r, phase) in detections]
            for ra, rb in itertools.combinations(rs, 2):
                da, db = detections[(ra, phase)], detections[(rb, phase)]
                cases = sorted(set(da.cases) & set(db.cases))
                keys = _ref_keys(reference, cases, t)
                comparisons.append(_comparison("table5", t, "sensitivity", phase, ra, phase, rb,
                                               _mcnemar([da.detected[k] for k in keys], [db.detected[k] for k in keys])))
                comparisons.append(_comparison("table5", t, "fdr_per_case", phase, ra, phase, rb,
                                               stats.wilcoxon_signed_rank(_fp_counts(da, cases, t), _fp_counts(db, cases, t))))

    # ---- grades (Table 3) and reading times (Table 6)
    say("grades", 0.5, "image quality grades and reading times")
    per_case: Dict[str, Dict[Tuple[str, str], Dict[str, float]]] = {"grade": {}, "seconds": {}, "marks": {}}
    for key, rows in reads.grades.items():
        per_case["grade"][key] = {c: g for c, (g, _) in rows.items() if c not in reads.excluded and not math.isnan(g)}
        per_case["seconds"][key] = {c: s for c, (_, s) in rows.items() if c not in reads.excluded and not math.isnan(s)}
        per_case["marks"][key] = {c: float(len(reads.marks.get(key, {}).get(c, []))) for c in rows if c not in reads.excluded}
    timed_keys = set(evaluated) | {ref_key}
    quality_rows, times_rows = [], []

    def summarise(metric: str, keys: Iterable[Tuple[str, str]], table: str) -> Dict[Tuple[str, str], Dict[str, float]]:
        """Per-case values per (reader, phase) plus the reader-average series; comparisons appended."""
        keys = [k for k in keys if per_case[metric].get(k)]
        series = {k: per_case[metric][k] for k in keys}
        phases = [p for p in reads.phases if any(k[1] == p for k in keys)]
        readers = [r for r in reads.readers if any(k[0] == r for k in keys)]
        avg_sets: Dict[str, List[str]] = {}
        for phase in phases:
            rs = [r for r in readers if (r, phase) in series]
            if len(rs) >= 2:
                avg_sets[phase] = rs
                cases = sorted(set.intersection(*[set(series[(r, phase)]) for r in rs]))
                series[(AVERAGE, phase)] = {c: float(np.mean([series[(r, phase)][c] for r in rs])) for c in cases}
        for reader in readers + [AVERAGE]:
            for pa, pb in itertools.combinations(phases, 2):
                if (reader, pa) not in series or (reader, pb) not in series:
                    continue
                if reader == AVERAGE and avg_sets.get(pa) != avg_sets.get(pb):
                    continue  # different reader sets: the averages are not comparable
                comparisons.append(_comparison(table, "", metric, pa, reader, pb, reader,
                                               _paired_or_independent(series[(reader, pa)], series[(reader, pb)])))
        for phase in phases:
            rs = [r for r in readers if (r, phase) in series]
            for ra, rb in itertools.combinations(rs, 2):
                comparisons.append(_comparison(table, "", metric, phase, ra, phase, rb,
                                               _paired_or_independent(series[(ra, phase)], series[(rb, phase)])))
        return series

    grade_series = summarise("grade", list(reads.grades), "table3")
    for (reader, phase), values in _sorted_series(grade_series, reads):
        mean, sd = _mean_sd(values.values())
        row = {"reader": reader, "phase": phase, "n_cases": len(values), "mean_grade": mean, "sd_grade": sd}
        for g in range(1, 5):
            # Per-case reader means are not grades: no distribution for the average rows.
            row[f"n_grade_{g}"] = "" if reader == AVERAGE else sum(1 for v in values.values() if v == g)
        quality_rows.append(row)
    agreement_rows: List[dict] = []
    for phase in reads.phases:
        rs = [r for r in reads.readers if per_case["grade"].get((r, phase))]
        for ra, rb in itertools.combinations(rs, 2):
            ga, gb = per_case["grade"][(ra, phase)], per_case["grade"][(rb, phase)]
            common = sorted(set(ga) & set(gb))
            if len(common) < 2:
                continue
            xa, xb = [ga[c] for c in common], [gb[c] for c in common]
            if any(float(g) not in (1.0, 2.0, 3.0, 4.0) for g in xa + xb):
                notes.append(f"Weighted kappa skipped for {ra} vs {rb} on {phase}: grades are not all integers 1-4.")
                continue
            agreement_rows.append({"phase": phase, "reader_a": ra, "reader_b": rb, "n_cases": len(common),
                                   "kappa_linear": stats.weighted_kappa(xa, xb, weights="linear"),
                                   "kappa_quadratic": stats.weighted_kappa(xa, xb, weights="quadratic")})
    time_series = summarise("seconds", [k for k in reads.grades if k in timed_keys], "table6")
    for (reader, phase), values in _sorted_series(time_series, reads):
        mean, sd = _mean_sd(values.values())
        if reader == AVERAGE:
            rs = [r for r in reads.readers if (r, phase) in time_series]
            n_marks = float(np.mean([sum(per_case["marks"][(r, phase)].get(c, 0) for c in values) for r in rs]))
        else:
            n_marks = float(sum(per_case["marks"][(reader, phase)].get(c, 0) for c in values))
        total = float(sum(values.values()))
        times_rows.append({
            "reader": reader, "phase": phase, "n_cases": len(values), "mean_seconds": mean, "sd_seconds": sd,
            "total_seconds": total, "n_marks": n_marks,
            "seconds_per_mark": total / n_marks if n_marks else math.nan,
            "paper_seconds_per_lesion": mean / n_marks if n_marks else math.nan,
        })

    # ---- contrast (Table 4)
    say("contrast", 0.7, "contrast metrics")
    contrast_rows: List[dict] = []
    if contrast:
        contrast_rows = _contrast_table(info, reference, brain_margin_mm, notes, say)
        by_volume: Dict[str, Dict[str, Dict[str, float]]] = {}
        for row in contrast_rows:
            by_volume.setdefault(row["volume"], {})[row["case"]] = row
        vols = [v for v in CONTRAST_VOLUMES if v in by_volume] + [v for v in by_volume if v not in CONTRAST_VOLUMES]
        for metric in ("cnr", "lbr", "cep"):
            for va, vb in itertools.combinations(vols, 2):
                a = {c: r[metric] for c, r in by_volume[va].items()}
                b = {c: r[metric] for c, r in by_volume[vb].items()}
                comparisons.append(_comparison("table4", "", metric, va, "", vb, "", _paired_or_independent(a, b)))
    else:
        notes.append("Contrast metrics were not requested (--no-contrast).")

    result = AnalysisResult(
        out_dir=out_dir, reference_phase=ref_phase, reference_reader=ref_reader, readers=det_readers or reads.readers,
        phases=reads.phases, thresholds=list(thresholds), n_reference_cases=len(ref_cases),
        n_reference_lesions=n_ref_lesions, reference_long_mm=[m.long_mm for v in reference.values() for m in v],
        excluded_cases=excluded, detection=detection_rows, comparisons=comparisons, quality=quality_rows,
        times=times_rows, contrast=contrast_rows, per_case={"grade": grade_series, "seconds": time_series}, notes=notes,
        agreement=agreement_rows, bootstrap=bootstrap_rows,
    )
    say("write", 0.9, "writing tables")
    with _output_folder(out_dir) as stage:
        result.out_dir = stage  # the report writes into result.out_dir
        if exported is not None:
            from .export import write_reads

            write_reads(stage / "reads", *exported)
        result.files["detection"] = _write_csv(stage / "detection.csv", DETECTION_COLUMNS, detection_rows)
        result.files["comparisons"] = _write_csv(stage / "comparisons.csv", COMPARISON_COLUMNS, comparisons)
        result.files["contrast"] = _write_csv(stage / "contrast.csv", CONTRAST_COLUMNS, contrast_rows)
        result.files["quality"] = _write_csv(stage / "quality.csv", QUALITY_COLUMNS, quality_rows)
        result.files["times"] = _write_csv(stage / "times.csv", TIMES_COLUMNS, times_rows)
        result.files["matches"] = _write_csv(stage / "matches.csv", MATCHES_COLUMNS, match_rows)
        result.files["agreement"] = _write_csv(stage / "agreement.csv", AGREEMENT_COLUMNS, agreement_rows)
        result.files["bootstrap"] = _write_csv(stage / "bootstrap.csv", BOOTSTRAP_COLUMNS, bootstrap_rows)
        summary = {
            "reference_phase": ref_phase, "reference_reader": ref_reader, "reference_cases": len(ref_cases),
            "reference_lesions": n_ref_lesions, "excluded_cases": excluded, "thresholds_mm": list(thresholds),
            "readers": result.readers, "phases": reads.phases, "notes": notes,
        }
        (stage / "analysis.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        result.files["summary"] = stage / "analysis.json"
        if report:
            from .report import write_report

            result.files.update(write_report(result))
    result.out_dir = out_dir
    result.files = {key: out_dir / path.relative_to(stage) for key, path in result.files.items()}
    say("done", 1.0, f"wrote {out_dir}")
    return result


@contextlib.contextmanager
def _output_folder(out_dir: Path) -> Iterator[Path]:
    """Write into a hidden staging folder; on success its files are moved into ``out_dir`` by name.

    ``out_dir`` (and its missing parents) is created only now, when the results exist; only this
    run's own file names are written into it and other files there are never touched; a failed
    run leaves nothing behind (:func:`ContrastAmplifierLib.outputs.staged_folder`).

    Raises:
        AnalysisError: an ``OSError`` while writing (disk full, permissions, a folder in the way),
            naming the path.
    """
    stage: Optional[Path] = None
    try:
        with staged_folder(out_dir) as stage:
            yield stage
    except OSError as exc:
        where = Path(exc.filename2 or exc.filename or out_dir)
        if stage is not None and stage in where.parents:
            where = out_dir / where.relative_to(stage)
        raise AnalysisError(f"cannot write the results: {where}: {exc.strerror or exc}; free disk space, fix the permissions or "
                            f"move what is in the way, or choose another --out. Nothing of this run was left in {out_dir}.") from exc


def _sorted_series(series: Mapping[Tuple[str, str], Mapping[str, float]], reads: Reads):
    order_r = reads.readers + [AVERAGE]
    return sorted(series.items(), key=lambda kv: (reads.phases.index(kv[0][1]) if kv[0][1] in reads.phases else 99,
                                                   order_r.index(kv[0][0]) if kv[0][0] in order_r else 99))


def _contrast_table(info: StudyInfo, reference: Mapping[str, List[Mark]], margin_mm: float, notes: List[str], say) -> List[dict]:
    """CNR/LBR/CEP rows for every case with a reference lesion and known volumes (Table 4)."""
    from .contrast import CaseVolumes, ContrastInputError, LesionAxes, case_contrast

    cases = [c for c, marks in reference.items() if marks]
    if not info.volumes:
        notes.append(
            "Contrast metrics (Table 4) skipped: the study gives no volumes. Analyse a study with study.json, or put a "
            "volumes.csv (case,T1,T1c,T1c-pro,T1c-vfa,brain_mask or healthy_brain) beside grades.csv."
        )
        return []
    rows: List[dict] = []
    skipped: List[str] = []
    for n, case in enumerate(cases):
        vols = info.volumes.get(case)
        if not vols:
            skipped.append(f"{case} (no volumes listed)")
            continue
        post = {name: vols[name] for name in CONTRAST_VOLUMES if name in vols}
        pick = lambda keys: next((vols[k] for k in keys if k in vols), None)  # noqa: E731
        cv = CaseVolumes(case=case, post=post, pre=pick(PRE_KEYS), healthy_brain=pick(HEALTHY_KEYS),
                         brain_mask=pick(BRAIN_MASK_KEYS), lesion_labels=pick(LESION_LABEL_KEYS))
        lesions = [LesionAxes(m.long_axis, m.short_axis, m.lesion) for m in reference[case]]
        try:
            results = case_contrast(cv, lesions, margin_mm=margin_mm)
        except ContrastInputError as exc:
            skipped.append(f"{case} ({exc})")
            continue
        rows.extend(asdict(r) for r in results)
        say("contrast", 0.7 + 0.2 * (n + 1) / max(len(cases), 1), f"contrast metrics: case {case}")
    if skipped:
        notes.append(f"Contrast metrics skipped for {len(skipped)} case(s): " + "; ".join(skipped))
    kinds = {r["brain_roi"] for r in rows}
    if "automatic" in kinds:
        notes.append(
            f"Healthy-brain ROI: automatic (brain mask minus a {margin_mm:g} mm margin around the lesions) where no "
            "healthy-brain label was given; the paper drew it by hand. CNR depends on this ROI."
        )
    return rows
