"""Writing the results: every CSV table and ``analysis.json``, atomically, into a staged folder.

Outputs (all in ``OUT_DIR``): ``detection.csv`` (Table 5), ``comparisons.csv`` (every test of
Tables 3-6), ``quality.csv`` (Table 3), ``contrast.csv`` (Table 4, per case), ``times.csv``
(Table 6), ``matches.csv`` (every reference lesion / mark pairing, for audit), ``analysis.json``;
beyond the paper: ``agreement.csv`` (weighted Cohen's kappa between readers' grades) and
``bootstrap.csv`` (case-level bootstrap interval of the reader-average sensitivity). A study
read from its database also gets ``reads/grades.csv`` and ``reads/lesions.csv``.

Each file is written atomically (:func:`ContrastAmplifierCommon.atomicfile.atomic_path`) into a
hidden staging folder whose files are moved into ``OUT_DIR`` when all are written
(:func:`ContrastAmplifierCommon.outputs.staged_folder`): a failed run leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np

from ContrastAmplifierCommon.atomicfile import atomic_path, write_text_atomic
from ContrastAmplifierCommon.outputs import staged_folder

from .export import write_reads
from .reads import ExportedRows
from .results import (
    AGREEMENT_COLUMNS,
    BOOTSTRAP_COLUMNS,
    COMPARISON_COLUMNS,
    CONTRAST_COLUMNS,
    DETECTION_COLUMNS,
    MATCHES_COLUMNS,
    QUALITY_COLUMNS,
    TIMES_COLUMNS,
    AnalysisError,
    AnalysisResult,
)

#: Writes more files of a result into ``result.out_dir`` (the report); returns name -> path.
ExtraWriter = Callable[[AnalysisResult], Mapping[str, Path]]

#: Result field -> (file name, columns), in the order the files are written and listed.
CSV_TABLES = {
    "detection": ("detection.csv", DETECTION_COLUMNS),
    "comparisons": ("comparisons.csv", COMPARISON_COLUMNS),
    "contrast": ("contrast.csv", CONTRAST_COLUMNS),
    "quality": ("quality.csv", QUALITY_COLUMNS),
    "times": ("times.csv", TIMES_COLUMNS),
    "matches": ("matches.csv", MATCHES_COLUMNS),
    "agreement": ("agreement.csv", AGREEMENT_COLUMNS),
    "bootstrap": ("bootstrap.csv", BOOTSTRAP_COLUMNS),
}


def format_cell(value: Union[None, str, int, float, np.integer, np.floating]) -> str:
    """A CSV cell: empty for ``None``/``nan``, integers as such, floats with 10 significant digits."""
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


def write_csv(path: Path, columns: Sequence[str], rows: Iterable[Mapping]) -> Path:
    """Write ``rows`` (dicts; missing keys are empty cells) under the header ``columns``, atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([format_cell(row.get(c)) for c in columns])
    return path


def summary(result: AnalysisResult) -> dict:
    """The content of ``analysis.json``: the reference, the cases left out, readers, phases, notes."""
    return {
        "reference_phase": result.reference_phase, "reference_reader": result.reference_reader,
        "reference_cases": result.n_reference_cases, "reference_lesions": result.n_reference_lesions,
        "excluded_cases": result.excluded_cases, "thresholds_mm": list(result.thresholds),
        "readers": result.readers, "phases": result.phases, "notes": result.notes,
    }


def write_tables(result: AnalysisResult, folder: Path) -> dict[str, Path]:
    """Write every CSV table and ``analysis.json`` of ``result`` into ``folder``.

    Returns:
        name -> path of every file written (``summary`` for ``analysis.json``).
    """
    files = {key: write_csv(folder / name, columns, getattr(result, key)) for key, (name, columns) in CSV_TABLES.items()}
    files["summary"] = write_text_atomic(json.dumps(summary(result), indent=2) + "\n", folder / "analysis.json")
    return files


@contextlib.contextmanager
def output_folder(out_dir: Path) -> Iterator[Path]:
    """Write into a hidden staging folder; on success its files are moved into ``out_dir`` by name.

    ``out_dir`` (and its missing parents) is created only now, when the results exist; only this
    run's own file names are written into it and other files there are never touched; a failed
    run leaves nothing behind (:func:`ContrastAmplifierCommon.outputs.staged_folder`).

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


def write_outputs(result: AnalysisResult, out_dir: Path, exported: Optional[ExportedRows] = None,
                  extra: Sequence[ExtraWriter] = ()) -> dict[str, Path]:
    """Write the tables of ``result`` (and ``extra`` files such as the report) into ``out_dir``.

    While writing, ``result.out_dir`` is the staging folder (the ``extra`` writers write into
    ``result.out_dir``); afterwards it is ``out_dir`` and ``result.files`` lists the final paths.

    Args:
        result: the analysis result.
        out_dir: the output folder (created now, with its missing parents).
        exported: rows exported from a reads database, written to ``reads/``.
        extra: more writers, called in order after the tables.

    Returns:
        ``result.files``.

    Raises:
        AnalysisError: a failed write; nothing of this run is left in ``out_dir``.
    """
    with output_folder(out_dir) as stage:
        result.out_dir = stage
        if exported is not None:
            write_reads(stage / "reads", *exported)
        result.files.update(write_tables(result, stage))
        for writer in extra:
            result.files.update(writer(result))
    result.out_dir = out_dir
    result.files = {key: out_dir / path.relative_to(stage) for key, path in result.files.items()}
    return result.files
