"""Long-format CSV exports of a study's reads: ``grades.csv`` and ``lesions.csv``.

These files are the contract with the analysis (paper sections "Performance metrics" and
"Statistical analysis", ``lesion-reader analyze``) and with other tools. Headers are fixed:

- ``grades.csv``: ``reader,phase,case,grade,seconds,excluded``, one row per confirmed case;
- ``lesions.csv``: ``reader,phase,case,lesion,long_mm,short_mm,`` then the long and short axis
  end points and the lesion centre, in RAS mm; a case read with no lesion has a grades row
  and no lesions rows.

``excluded`` is 1 on every row of a case that any reader flagged "too many lesions" in any
phase (paper: such cases "were excluded from the downstream statistical analysis"; exclusion is
a property of the case, so all readers and phases drop it together and comparisons stay paired).
``case`` is the case id from ``study.json`` (not the blinded label): exports are for the
investigators, not the readers.
"""

from __future__ import annotations

import csv
import os
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Callable, Optional, Union

from ContrastAmplifierCommon.atomicfile import atomic_path

from .session import lesion_from_row
from .storage import ReadKey, ReadsDatabase
from .study import StudyError, load_study

GRADES_HEADER: tuple[str, ...] = ("reader", "phase", "case", "grade", "seconds", "excluded")
LESIONS_HEADER: tuple[str, ...] = (
    "reader", "phase", "case", "lesion", "long_mm", "short_mm",
    "long_x1", "long_y1", "long_z1", "long_x2", "long_y2", "long_z2",
    "short_x1", "short_y1", "short_z1", "short_x2", "short_y2", "short_z2",
    "center_x", "center_y", "center_z",
)


def _fmt(value: float, digits: int = 4) -> str:
    text = f"{value:.{digits}f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def write_reads(out_dir: Union[str, os.PathLike], grades: Iterable[Sequence[object]], lesions: Iterable[Sequence[object]]) -> tuple[Path, Path]:
    """Write rows from :func:`collect_rows` as ``OUT_DIR/grades.csv`` and ``OUT_DIR/lesions.csv`` (atomically).

    Returns:
        The two paths.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    grades_path, lesions_path = out / "grades.csv", out / "lesions.csv"
    _write_csv(grades_path, GRADES_HEADER, grades)
    _write_csv(lesions_path, LESIONS_HEADER, lesions)
    return grades_path, lesions_path


def collect_rows(study_dir: Union[str, os.PathLike]) -> tuple[list[list[str]], list[list[str]]]:
    """The grades and lesions rows of a study (without headers), in study order of readers and phases."""
    study = load_study(study_dir)
    reader_rank = {r: i for i, r in enumerate(study.readers)}
    phase_rank = {p.name: i for i, p in enumerate(study.phases)}
    try:
        with ReadsDatabase(study.database_path) as db:
            reads = db.confirmed_case_reads()
            excluded_cases = db.excluded_cases()
            by_case = db.lesions_by_read()
    except sqlite3.Error as exc:
        raise StudyError(f"reads database {study.database_path} cannot be read ({exc}); restore it from a backup or check the folder's permissions") from None
    key = lambda r: (reader_rank.get(r["reader"], len(reader_rank)), r["reader"], phase_rank.get(r["phase"], len(phase_rank)), r["phase"], r["case_id"])  # noqa: E731
    grades: list[list[str]] = []
    confirmed: set[ReadKey] = set()
    for row in sorted(reads, key=key):
        confirmed.add(ReadKey(row["reader"], row["phase"], row["case_id"]))
        grades.append([
            row["reader"], row["phase"], row["case_id"], str(int(row["grade"])), _fmt(float(row["seconds"]), 3),
            "1" if row["case_id"] in excluded_cases else "0",
        ])
    lesions: list[list[str]] = []
    for case_key in sorted(by_case, key=lambda k: (reader_rank.get(k.reader, 99), k.reader, phase_rank.get(k.phase, 99), k.phase, k.case)):
        if case_key not in confirmed:
            continue  # an unconfirmed case is still being read: neither its grade nor its lesions are exported
        for number, row in enumerate(by_case[case_key], start=1):
            geometry = lesion_from_row(row, number).geometry
            coords = [*(c for p in geometry.end_points for c in p), *geometry.center]
            # case_key.case is set: lesions.case_id is NOT NULL (str() only narrows Optional[str] for the row type)
            lesions.append([case_key.reader, case_key.phase, str(case_key.case), str(number), _fmt(geometry.long_mm, 3), _fmt(geometry.short_mm, 3), *(_fmt(c) for c in coords)])
    return grades, lesions


def export_study(
    study_dir: Union[str, os.PathLike],
    out_dir: Union[str, os.PathLike],
    *,
    dicom_sr: bool = False,
    note: Optional[Callable[[str], None]] = None,
) -> list[Path]:
    """Write ``OUT_DIR/grades.csv`` and ``OUT_DIR/lesions.csv`` (atomically; see module doc).

    Only confirmed cases are exported, so an export taken during a phase holds finished reads only.

    Args:
        study_dir: the study folder.
        out_dir: the export folder.
        dicom_sr: also write one DICOM SR per reader, phase and case read on a DICOM series, in
            ``OUT_DIR/sr/`` (:mod:`LesionReaderLib.dicom_sr`; needs highdicom).
        note: receives notes of the SR export (cases skipped because not DICOM).

    Returns:
        The two CSV paths written, then the SR files.

    Raises:
        StudyError: no valid study in ``study_dir``, ``out_dir`` is a file, or (``dicom_sr``)
            highdicom is missing or a DICOM series is unusable.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise StudyError(f"export folder {out} is a file; give a folder path")
    grades, lesions = collect_rows(study_dir)
    grades_path, lesions_path = write_reads(out, grades, lesions)
    if dicom_sr:
        from .dicom_sr import export_dicom_sr  # optional dependency (highdicom): imported only when asked

        return [grades_path, lesions_path, *export_dicom_sr(study_dir, out, note=note).written]
    return [grades_path, lesions_path]
