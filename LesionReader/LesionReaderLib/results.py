"""Types and column layouts shared by the stages of the analysis (paper, Tables 3-6).

Everything here is data: the columns of the input and output CSV files, the defaults taken from
the paper, the parsed reads (:class:`Mark`, whose lesion is a :class:`~.geometry.LesionGeometry`,
and :class:`Reads`), what a study tells the analysis (:class:`StudyInfo`), the reference lesions
(:class:`Reference`), the result of a run (:class:`AnalysisResult`) and the one error type
(:class:`AnalysisError`). No stage imports another stage to reach these, so :mod:`.report` can
render a result without importing the pipeline (:mod:`.analysis`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from . import stats
from .geometry import LesionGeometry, MeasuredLesion

#: A read: (reader, phase).
ReadKey = tuple[str, str]
#: One value per case of a read (a grade, seconds, a count).
CaseValues = dict[str, float]

# --------------------------------------------------------------------------- columns

GRADES_COLUMNS = ("reader", "phase", "case", "grade", "seconds", "excluded")
LESIONS_COLUMNS = (
    "reader", "phase", "case", "lesion", "long_mm", "short_mm",
    "long_x1", "long_y1", "long_z1", "long_x2", "long_y2", "long_z2",
    "short_x1", "short_y1", "short_z1", "short_x2", "short_y2", "short_z2",
    "center_x", "center_y", "center_z",
)
#: The twelve end-point coordinates of the long and short axes in lesions.csv.
AXIS_COLUMNS = LESIONS_COLUMNS[6:18]
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
MATCHES_COLUMNS = ("reader", "phase", "case", "reference_lesion", "reference_long_mm", "mark_lesion", "mark_long_mm", "distance_mm")

# --------------------------------------------------------------------------- defaults

#: Case-level bootstrap replicates for the reader-average sensitivity (beyond the paper).
DEFAULT_N_BOOT = 2000
#: Size thresholds on the long axis, in mm (paper, "Performance metrics": 10, 5 and 0 mm).
DEFAULT_THRESHOLDS_MM = (0.0, 5.0, 10.0)
#: Reference phase when nothing else says (paper, "Performance metrics": lesions identified by
#: S.A. on T1c-vfa).
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


def ordered_volumes(volumes: Iterable[str]) -> list[str]:
    """Volume names in :data:`CONTRAST_VOLUMES` order, then the others as first seen."""
    seen = list(dict.fromkeys(volumes))
    return [v for v in CONTRAST_VOLUMES if v in seen] + [v for v in seen if v not in CONTRAST_VOLUMES]


class AnalysisError(ValueError):
    """The analysis inputs are unusable; the message names the file or option and the fix."""


# --------------------------------------------------------------------------- reads


@dataclass(frozen=True)
class Mark(MeasuredLesion):
    """One lesion row of lesions.csv: a lesion marked by one reader in one phase and case.

    Attributes:
        reader, phase, case: ids of the read.
        geometry: the lesion, labelled with the row's ``lesion`` id; its lengths and centre are
            the row's (``long_mm``, ``short_mm``, ``center_x..z``) where given (paper, "Reader
            study protocol": major and minor axes; "Performance metrics": centres for matching).
    """

    reader: str
    phase: str
    case: str
    geometry: LesionGeometry

    @property
    def lesion(self) -> str:
        """The row's ``lesion`` id."""
        return self.geometry.lesion_id

    def as_lesion(self) -> LesionGeometry:
        """The mark as the matching sees it (kept for callers: the geometry has the old ``Lesion``'s attributes)."""
        return self.geometry


@dataclass
class Reads:
    """Parsed reads: grades/seconds per (reader, phase) and case, marks per (reader, phase) and case.

    Attributes:
        grades: (reader, phase) -> case -> (grade, seconds); ``nan`` where not given.
        marks: (reader, phase) -> case -> marks, in file order.
        excluded: cases flagged ``excluded`` in any row.
        readers: reader ids, study order first, then order of appearance.
        phases: phase names in reading order.
        notes: what was read but left out (rows without a reading time, lesions of ungraded cases).
    """

    grades: dict[ReadKey, dict[str, tuple[float, float]]]
    marks: dict[ReadKey, dict[str, list[Mark]]]
    excluded: set[str]
    readers: list[str]
    phases: list[str]
    notes: list[str] = field(default_factory=list)


@dataclass
class StudyInfo:
    """What the analysis needs from a study: reference, order, marking readers, case volumes."""

    reference_phase: Optional[str] = None
    reference_reader: Optional[str] = None
    phase_order: list[str] = field(default_factory=list)
    reader_order: list[str] = field(default_factory=list)
    markers: dict[str, Union[str, tuple[str, ...]]] = field(default_factory=dict)
    volumes: dict[str, dict[str, Path]] = field(default_factory=dict)


@dataclass
class Reference:
    """The reference lesions (paper, "Performance metrics": S.A.'s lesions on T1c-vfa).

    Attributes:
        phase, reader: the reference read.
        cases: graded, non-excluded cases of the reference read, sorted.
        lesions: case -> the reference reader's marks in that case (empty list: no lesion).
    """

    phase: str
    reader: str
    cases: list[str]
    lesions: dict[str, list[Mark]]

    @property
    def key(self) -> ReadKey:
        """The reference read as (reader, phase)."""
        return (self.reader, self.phase)

    @property
    def n_lesions(self) -> int:
        """Number of reference lesions over all cases."""
        return sum(len(v) for v in self.lesions.values())

    def long_mm(self) -> list[float]:
        """Long axes of every reference lesion, case by case."""
        return [m.long_mm for v in self.lesions.values() for m in v]

    def keys(self, cases: list[str], threshold: float) -> list[tuple[str, str]]:
        """(case, lesion) of the reference lesions of ``cases`` whose long axis reaches ``threshold``
        (paper, "Performance metrics": lesion size is the length of the long axis)."""
        return [(c, m.lesion) for c in cases for m in self.lesions.get(c, []) if m.long_mm >= threshold]


# --------------------------------------------------------------------------- result


@dataclass
class AnalysisResult:
    """Everything ``analyze`` computed; :mod:`.report` renders it and :mod:`.tables` writes it.

    ``out_dir`` is where the files are (while they are being written: the staging folder) and
    ``files`` maps a name (``detection``, ``report_md``...) to each file written. ``matches``
    holds the rows of ``matches.csv``.
    """

    out_dir: Path
    reference_phase: str
    reference_reader: str
    readers: list[str]
    phases: list[str]
    thresholds: list[float]
    n_reference_cases: int
    n_reference_lesions: int
    reference_long_mm: list[float]
    excluded_cases: list[str]
    detection: list[dict]
    comparisons: list[dict]
    quality: list[dict]
    times: list[dict]
    contrast: list[dict]
    per_case: dict[str, dict[ReadKey, CaseValues]]
    notes: list[str]
    agreement: list[dict] = field(default_factory=list)
    bootstrap: list[dict] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)
    matches: list[dict] = field(default_factory=list)


def comparison_row(table: str, threshold: Union[float, str], metric: str, phase_a: str, reader_a: str, phase_b: str,
                   reader_b: str, result: stats.TestResult) -> dict:
    """One comparisons.csv row: which table, which two series, which test and its outcome.

    Args:
        table: ``table3`` (grades), ``table4`` (contrast), ``table5`` (detection) or ``table6`` (times).
        threshold: the size threshold in mm for Table 5, ``""`` elsewhere.
        metric: the compared column (``sensitivity``, ``grade``, ``cnr``...).
        phase_a, reader_a, phase_b, reader_b: the two series (readers ``""`` for Table 4).
        result: the two-tailed test (paper, "Statistical analysis").
    """
    return {
        "table": table, "threshold_mm": threshold, "metric": metric, "phase_a": phase_a, "reader_a": reader_a,
        "phase_b": phase_b, "reader_b": reader_b, "test": result.test, "statistic": result.statistic, "p_value": result.p_value,
    }
