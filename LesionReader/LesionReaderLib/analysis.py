"""The ``analyze`` pipeline: from ``grades.csv`` + ``lesions.csv`` to the paper's Tables 3-6.

Paper sections "Performance metrics" and "Statistical analysis". :func:`analyze` checks the
options, then runs the stages, each in its own module:

1. :mod:`.studyinfo` and :mod:`.reads`: the study's reference, orders and volumes; the reads,
   validated (file, line and column of any impossible value; see :func:`.reads.parse_reads`);
   the reference read (paper: S.A.'s lesions on T1c-vfa).
2. :mod:`.detection`: matching and Table 5 (sensitivity, false detections per case, PPV, F1,
   their intervals and tests; beyond the paper, the case-level bootstrap).
3. :mod:`.summaries`: Table 3 (grades), Table 6 (reading times), agreement between readers
   (beyond the paper), Table 4 (CNR, LBR, CEP).
4. :mod:`.tables`: every CSV and ``analysis.json``, atomically, in a staged output folder;
   with ``report=True`` also :func:`.report.write_report` (``report.md``, ``report.html``, plots).

Result types and column layouts are in :mod:`.results` (re-exported here, so
``from LesionReaderLib.analysis import analyze, AnalysisError, GRADES_COLUMNS`` keeps working).

Choices the paper leaves open, made here and listed in the README (details in the stage modules):

- a case flagged ``excluded`` in any row is left out of every analysis (paired tests stay paired);
- matching is one-to-one and optimal (:mod:`.matching`);
- a false positive counts at a size threshold when its own long axis reaches it (:mod:`.detection`);
- reader-average rows (:mod:`.detection`, :mod:`.summaries`): sensitivity = mean TP count /
  reference count with the Clopper-Pearson interval on these (non-integer) counts; false
  detections per case = the per-case mean over readers, with its Student-t interval; PPV = mean
  TP / (mean TP + mean FP); grades and times = per-case means over readers; the reader-average
  McNemar test pools the readers' lesion pairs and the reader-average Wilcoxon test uses the
  per-case means.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Callable, Optional, Union

from ContrastAmplifierCommon.outputs import OutputPathError, folders_to_create

from . import report as report_module
from .detection import DetectionTables, PairDetection, detect
from .reads import (
    AXIS_LENGTH_TOLERANCE_MM,
    MAX_ABS_COORDINATE_MM,
    MAX_READING_SECONDS,
    CsvRow,
    load_reads,
    parse_reads,
    read_reads,
    reference_notes,
    select_reference,
)
from .results import (
    AGREEMENT_COLUMNS,
    AVERAGE,
    BOOTSTRAP_COLUMNS,
    BRAIN_MASK_KEYS,
    CENTER_COLUMNS,
    COMPARISON_COLUMNS,
    CONTRAST_COLUMNS,
    CONTRAST_VOLUMES,
    DEFAULT_N_BOOT,
    DEFAULT_REFERENCE_PHASE,
    DEFAULT_THRESHOLDS_MM,
    DETECTION_COLUMNS,
    GRADES_COLUMNS,
    HEALTHY_KEYS,
    KNOWN_PHASE_ORDER,
    LESION_LABEL_KEYS,
    LESIONS_COLUMNS,
    MATCHES_COLUMNS,
    PRE_KEYS,
    QUALITY_COLUMNS,
    TIMES_COLUMNS,
    AnalysisError,
    AnalysisResult,
    Mark,
    Reads,
    Reference,
    StudyInfo,
)
from .studyinfo import load_study_info
from .summaries import ContrastSummary, ReadSummaries, summarise_contrast, summarise_reads
from .tables import write_outputs

__all__ = [
    "AGREEMENT_COLUMNS", "AVERAGE", "AXIS_LENGTH_TOLERANCE_MM", "BOOTSTRAP_COLUMNS", "BRAIN_MASK_KEYS", "CENTER_COLUMNS",
    "COMPARISON_COLUMNS", "CONTRAST_COLUMNS", "CONTRAST_VOLUMES", "DEFAULT_N_BOOT", "DEFAULT_REFERENCE_PHASE",
    "DEFAULT_THRESHOLDS_MM", "DETECTION_COLUMNS", "GRADES_COLUMNS", "HEALTHY_KEYS", "KNOWN_PHASE_ORDER", "LESION_LABEL_KEYS",
    "LESIONS_COLUMNS", "MATCHES_COLUMNS", "MAX_ABS_COORDINATE_MM", "MAX_READING_SECONDS", "PRE_KEYS", "QUALITY_COLUMNS",
    "TIMES_COLUMNS", "AnalysisError", "AnalysisResult", "CsvRow", "Mark", "PairDetection", "Reads", "StudyInfo", "analyze",
    "load_study_info", "parse_reads", "read_reads",
]

PathLike = Union[str, os.PathLike]
Progress = Callable[[str, float, str], None]


def _silent(stage: str, fraction: float, message: str = "") -> None:
    """The progress callback when none is given."""


def check_options(study_dir: Path, out_dir: Path, thresholds: Sequence[float], brain_margin_mm: float) -> list[float]:
    """Refuse unusable options before any work; returns the thresholds as ascending floats.

    Raises:
        AnalysisError: no study folder; ``out_dir`` is a file, lies below one or cannot be
            created; a threshold or the brain margin that is not a finite size >= 0 in mm.
    """
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
    return sorted(float(t) for t in thresholds)


def _contrast(info: StudyInfo, reference: Reference, contrast: bool, brain_margin_mm: float, say: Progress) -> ContrastSummary:
    """Table 4 when asked for, else a note saying it was not."""
    if not contrast:
        return ContrastSummary(notes=["Contrast metrics were not requested (--no-contrast)."])
    return summarise_contrast(info, reference.lesions, brain_margin_mm, say)


def _result(out_dir: Path, reads: Reads, reference: Reference, thresholds: list[float], detection: DetectionTables,
            summaries: ReadSummaries, table4: ContrastSummary, notes: list[str]) -> AnalysisResult:
    """The stages' outputs as one :class:`AnalysisResult`."""
    return AnalysisResult(
        out_dir=out_dir, reference_phase=reference.phase, reference_reader=reference.reader,
        readers=detection.readers or reads.readers, phases=reads.phases, thresholds=list(thresholds),
        n_reference_cases=len(reference.cases), n_reference_lesions=reference.n_lesions,
        reference_long_mm=reference.long_mm(), excluded_cases=sorted(reads.excluded), detection=detection.rows,
        comparisons=detection.comparisons + summaries.comparisons + table4.comparisons, quality=summaries.quality,
        times=summaries.times, contrast=table4.rows, per_case=summaries.per_case, notes=notes,
        agreement=summaries.agreement, bootstrap=detection.bootstrap, matches=detection.matches,
    )


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
    progress: Optional[Progress] = None,
) -> AnalysisResult:
    """Run the paper's analysis on a study folder and write the tables (and the report).

    Args:
        study_dir: a part-1 study (``study.json`` + reads database) or a folder holding only
            ``grades.csv`` and ``lesions.csv`` (optionally ``volumes.csv`` for the contrast metrics).
        out_dir: receives the CSV tables, ``analysis.json`` and, with ``report``, ``report.md``,
            ``report.html`` and the PNG plots.
        reference_phase: phase of the reference lesions (default: study.json, else ``T1c-vfa``).
        reference_reader: reader of the reference lesions (default: study.json, else the only
            reader with marks in the reference phase).
        thresholds: long-axis size thresholds in mm (paper, "Performance metrics": 0, 5, 10).
        contrast: compute CNR/LBR/CEP when the volumes are known.
        brain_margin_mm: margin of the automatic healthy-brain ROI (deviation, see contrast.py).
        report: also write report.md / report.html / plots (:func:`.report.write_report`),
            in the same staged folder as the tables.
        n_boot: case-level bootstrap replicates of the reader-average sensitivity (beyond the
            paper; 0 to skip).
        seed: seed of the bootstrap.
        progress: optional ``(stage, fraction, message)`` callback.

    Returns:
        The result; ``result.files`` names every file written.

    Raises:
        AnalysisError: missing, unreadable or binary inputs, an invalid value (named by file,
            line and column; see :func:`.reads.parse_reads`), an unknown or ambiguous reference,
            an ``out_dir`` that is a file or cannot be created, a failed write. All inputs are
            checked before any computation; ``out_dir`` is created only when the results are
            written, and a failed run leaves nothing in it (files already there are kept).
    """
    say = progress or _silent
    study_dir, out_dir = Path(study_dir), Path(out_dir)
    thresholds = check_options(study_dir, out_dir, thresholds, brain_margin_mm)
    say("read", 0.0, "reading the study")
    info = load_study_info(study_dir)
    loaded = load_reads(study_dir, info)
    reads = loaded.reads
    reference = select_reference(reads, info, reference_phase, reference_reader)
    notes = loaded.notes + reference_notes(reference, reads)
    say("detection", 0.2, "matching marks to the reference lesions")
    detection = detect(reads, info, reference, thresholds, n_boot, seed)
    say("grades", 0.5, "image quality grades and reading times")
    summaries = summarise_reads(reads, timed=set(detection.evaluated) | {reference.key})
    say("contrast", 0.7, "contrast metrics")
    table4 = _contrast(info, reference, contrast, brain_margin_mm, say)
    notes += detection.notes + summaries.notes + table4.notes
    result = _result(out_dir, reads, reference, thresholds, detection, summaries, table4, notes)
    say("write", 0.9, "writing tables")
    # Looked up at call time, so a caller (or a test) may replace report.write_report.
    write_outputs(result, out_dir, loaded.exported, extra=[report_module.write_report] if report else [])
    say("done", 1.0, f"wrote {out_dir}")
    return result
