"""Batch amplification of a folder of cases (``contrast-amplifier predict-cohort``).

Each case folder holds t1, flair, adc and t1c images. Finished cases (output present) are
skipped, so an interrupted run resumes; a failing case is recorded in ``summary.csv`` with its
error and does not stop the others. ``summary.csv`` also names, per case, the modalities whose
registration to the T1c looks wrong (``check_registration``) and every plausibility warning.
"""

from __future__ import annotations

import csv
import io
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Optional, Union

from ContrastAmplifierCommon.atomicfile import write_text_atomic
from .imageio import find_case_inputs
from ContrastAmplifierCommon.progress import Cancelled, CancelToken, ProgressCallback, SubProgress, check_cancel, null_progress

OUTPUT_NAME = "T1c-pro.nii.gz"
#: ``check_registration``: modalities whose registration to the T1c looks wrong (``;``-separated);
#: ``warnings``: every plausibility finding of the case as ``code:modality`` (``;``-separated).
SUMMARY_COLUMNS = ("case", "status", "seconds", "n_predictions", "output", "error", "check_registration", "warnings")


def _case_folders(cases_dir: Path) -> list[Path]:
    if not cases_dir.is_dir():
        raise ValueError(f"cases folder not found: {cases_dir}; pass a folder holding one sub-folder per case.")
    folders = sorted(p for p in cases_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise ValueError(f"{cases_dir} holds no case sub-folders (each with t1, flair, adc, t1c images).")
    return folders


def predict_cohort(
    cases_dir: Union[str, os.PathLike],
    out_dir: Union[str, os.PathLike],
    bundle=None,
    folds: Optional[Sequence[int]] = None,
    n_mirrorings: int = 8,
    device: str = "auto",
    precision: str = "auto",
    overwrite: bool = False,
    compile: Optional[bool] = None,
    mapping: str = "auto",
    strict: bool = False,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> list[dict[str, object]]:
    """Amplify every case of ``cases_dir`` into ``out_dir/<case>/T1c-pro.nii.gz``; returns the summary rows.

    ``out_dir`` may exist; only ``<case>/T1c-pro.nii.gz`` and ``summary.csv`` are written there
    (the summary is this command's own and is rewritten after every case). It may not be the
    cases folder, contain it, or be the current directory (checked before any work).
    """
    from .inference import _resolve_bundle, amplify_case
    from .plausibility import suspect_modalities
    from ContrastAmplifierCommon.outputs import check_output_folder

    report = progress or null_progress
    cases_dir, out_dir = Path(cases_dir), Path(out_dir)
    folders = _case_folders(cases_dir)
    check_output_folder(out_dir, [], inputs=[cases_dir], what="cohort output folder")
    model = _resolve_bundle(bundle)  # load and hash-check once for all cases
    rows: list[dict[str, object]] = []
    for index, folder in enumerate(folders):
        check_cancel(cancel)
        target = out_dir / folder.name / OUTPUT_NAME
        row: dict[str, object] = {"case": folder.name, "status": "", "seconds": "", "n_predictions": "", "output": str(target),
                                  "error": "", "check_registration": "", "warnings": ""}
        span = SubProgress(report, index / len(folders), (index + 1) / len(folders))
        if target.exists() and not overwrite:
            row["status"] = "skipped"
            span("skip", 1.0, f"{folder.name}: already done")
        else:
            start = time.perf_counter()
            try:
                inputs = find_case_inputs(folder)
                result = amplify_case(inputs["t1"], inputs["flair"], inputs["adc"], inputs["t1c"], bundle=model,
                                      out_path=target, folds=folds, n_mirrorings=n_mirrorings, device=device,
                                      precision=precision, compile=compile, mapping=mapping, progress=span, cancel=cancel,
                                      overwrite=overwrite, strict=strict)
                row.update(status="done", n_predictions=result.n_predictions,
                           check_registration=";".join(result.suspect_registrations),
                           warnings=";".join(f"{f.code}:{f.modality}" for f in result.preprocessed.findings))
            except (Cancelled, KeyboardInterrupt):
                raise
            except Exception as exc:  # one bad case must not stop the cohort
                row.update(status="failed", error=f"{type(exc).__name__}: {exc}")
                findings = getattr(exc, "findings", ())  # --strict: a PlausibilityError lists them
                row.update(check_registration=";".join(suspect_modalities(findings)),
                           warnings=";".join(f"{f.code}:{f.modality}" for f in findings))
            row["seconds"] = round(time.perf_counter() - start, 2)
        rows.append(row)
        _write_summary(out_dir / "summary.csv", rows)
    return rows


def _write_summary(path: Path, rows: list[dict[str, object]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SUMMARY_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(buffer.getvalue(), path)
