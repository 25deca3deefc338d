"""Batch amplification of a folder of cases (``contrast-amplifier predict-cohort``).

Each case folder holds t1, flair, adc and t1c images. Finished cases (output present) are
skipped, so an interrupted run resumes; a failing case is recorded in ``summary.csv`` with its
error and does not stop the others. ``summary.csv`` also names, per case, the modalities whose
registration to the T1c looks wrong (``check_registration``) and every plausibility warning.

With ``out_dicom``, each case's T1c-pro is also written as a DICOM series into
``<out_dicom>/<case>/`` (:mod:`.dicom_series`). A case is finished when both outputs exist; one
whose T1c-pro file exists but whose series folder is missing or empty (a run without
``--out-dicom`` before, or a series write that failed) gets its series from that file, without
recomputing it. Like the skip, this takes the existing T1c-pro as this run's model's
(``--overwrite`` recomputes).
"""

from __future__ import annotations

import csv
import io
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union

from ContrastAmplifierCommon.atomicfile import write_text_atomic
from ContrastAmplifierCommon.outputs import OutputPathError, check_output_folder
from .imageio import find_case_inputs
from ContrastAmplifierCommon.progress import Cancelled, CancelToken, ProgressCallback, SubProgress, check_cancel, null_progress

OUTPUT_NAME = "T1c-pro.nii.gz"
#: ``check_registration``: modalities whose registration to the T1c looks wrong (``;``-separated);
#: ``warnings``: every plausibility finding of the case as ``code:modality`` (``;``-separated).
#: ``dicom``: the case's DICOM series folder (with ``out_dicom``).
SUMMARY_COLUMNS = ("case", "status", "seconds", "n_predictions", "output", "error", "check_registration", "warnings",
                   "dicom")


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
    out_dicom: Union[str, os.PathLike, None] = None,
    backend: str = "auto",
) -> list[dict[str, object]]:
    """Amplify every case of ``cases_dir`` into ``out_dir/<case>/T1c-pro.nii.gz``; returns the summary rows.

    ``out_dir`` may exist; only ``<case>/T1c-pro.nii.gz`` and ``summary.csv`` are written there
    (the summary is this command's own and is rewritten after every case). It may not be the
    cases folder, contain it, or be the current directory (checked before any work).
    ``out_dicom`` (optional) receives ``<case>/`` DICOM series folders (module doc); it is checked
    like ``out_dir`` and may not be the same folder. ``backend``: :func:`.inference.amplify_case`'s.
    """
    from .inference import _resolve_bundle

    cases_dir, out_dir = Path(cases_dir), Path(out_dir)
    folders = _case_folders(cases_dir)
    out_root = check_output_folder(out_dir, [], inputs=[cases_dir], what="cohort output folder")
    dicom_root = None if out_dicom is None else _check_dicom_root(out_dicom, out_root, cases_dir)
    model = _resolve_bundle(bundle)  # load and hash-check once for all cases
    options = dict(folds=folds, n_mirrorings=n_mirrorings, device=device, precision=precision, compile=compile,
                   mapping=mapping, cancel=cancel, overwrite=overwrite, strict=strict, backend=backend)
    report = progress or null_progress
    rows: list[dict[str, object]] = []
    for index, folder in enumerate(folders):
        check_cancel(cancel)
        span = SubProgress(report, index / len(folders), (index + 1) / len(folders))
        rows.append(_run_case(folder, out_dir, None if dicom_root is None else dicom_root / folder.name, model, span, options))
        _write_summary(out_dir / "summary.csv", rows)
    return rows


def _check_dicom_root(out_dicom: Union[str, os.PathLike], out_root: Path, cases_dir: Path) -> Path:
    """The cohort's DICOM folder, checked before any work (pydicom there, not an input, not ``out_dir``)."""
    from .dicom_series import require_pydicom

    require_pydicom()
    root = check_output_folder(out_dicom, [], inputs=[cases_dir], what="cohort DICOM output folder")
    if root == out_root:
        raise OutputPathError(f"cohort DICOM output folder {root} is the same folder as the T1c-pro output folder; each "
                              "case's series folder must hold the series alone. Choose another folder (e.g. a sibling "
                              f"{root.parent / (root.name + '-dicom')}).")
    return root


def _run_case(folder: Path, out_dir: Path, series_dir: Optional[Path], model, span: ProgressCallback,
              options: dict[str, Any]) -> dict[str, object]:
    """One case: skip it, complete its missing DICOM series from its T1c-pro file, or amplify it."""
    from .inference import amplify_case
    from .plausibility import suspect_modalities

    target = out_dir / folder.name / OUTPUT_NAME
    row: dict[str, object] = {"case": folder.name, "status": "", "seconds": "", "n_predictions": "", "output": str(target),
                              "error": "", "check_registration": "", "warnings": "",
                              "dicom": "" if series_dir is None else str(series_dir)}
    overwrite = bool(options["overwrite"])
    series_done = series_dir is None or (series_dir.is_dir() and any(series_dir.iterdir()))
    if target.exists() and not overwrite and series_done:
        row["status"] = "skipped"
        span("skip", 1.0, f"{folder.name}: already done")
        return row
    start = time.perf_counter()
    try:
        inputs = find_case_inputs(folder)
        if target.exists() and not overwrite and series_dir is not None:
            span("write DICOM", 0.5, f"{folder.name}: DICOM series from the existing {OUTPUT_NAME}")
            _series_from_file(target, series_dir, inputs, model)
            row["status"] = "done"
        else:
            result = amplify_case(inputs["t1"], inputs["flair"], inputs["adc"], inputs["t1c"], bundle=model,
                                  out_path=target, progress=span, out_dicom=series_dir, **options)
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
    return row


def _series_from_file(target: Path, series_dir: Path, inputs: dict[str, Path], model) -> None:
    """The DICOM series of a case whose T1c-pro file exists (into a missing or empty series folder)."""
    from .dicom_series import write_t1c_pro_series

    write_t1c_pro_series(target, series_dir, t1c=inputs["t1c"], model=model,
                         sources={m: inputs[m] for m in ("t1", "flair", "adc")},
                         details=f"from the existing {target.name} of this case")


def _write_summary(path: Path, rows: list[dict[str, object]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SUMMARY_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(buffer.getvalue(), path)
