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

Beyond one process:

* ``cluster`` (``--cluster local[:N] | tcp://HOST:PORT | slurm``): the cases run on a Dask cluster
  (:mod:`.cohort_dask`, :mod:`.cluster`), a preprocessing task and an ensemble task per case, with
  the same outputs, skips, failures, summary and progress as here.
* ``num_parts``/``part_id`` (``--num-parts N --part-id K``): this run takes part K (0 to N-1) of the
  sorted case folders, round robin (:func:`select_part`), so an ``sbatch --array=0-(N-1)`` job with
  ``--part-id $SLURM_ARRAY_TASK_ID`` covers every case exactly once, without Dask. Each part
  writes its own ``summary-part-K-of-N.csv`` (:func:`summary_name`), so parts sharing one output
  folder never overwrite each other's summary.
* ``threads``: CPU threads per case, for torch and for ITK (SimpleITK's global default). With one
  thread a case's T1c-pro is the same to the bit from run to run and between the serial and the
  Dask path; with several, ITK's multi-threaded registration metric sums in a varying order and
  two identical runs differ by a few 1e-5 of the T1c's intensity (measured: 6e-5 at 3 mm).
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

from ContrastAmplifierCommon.atomicfile import write_text_atomic
from ContrastAmplifierCommon.outputs import OutputPathError, check_output_folder
from .imageio import find_case_inputs
from ContrastAmplifierCommon.progress import Cancelled, CancelToken, ProgressCallback, SubProgress, check_cancel, null_progress

if TYPE_CHECKING:
    from .cluster import CohortCluster
    from .inference import AmplifyResult

OUTPUT_NAME = "T1c-pro.nii.gz"
#: ``check_registration``: modalities whose registration to the T1c looks wrong (``;``-separated);
#: ``warnings``: every plausibility finding of the case as ``code:modality`` (``;``-separated).
#: ``dicom``: the case's DICOM series folder (with ``out_dicom``).
SUMMARY_COLUMNS = ("case", "status", "seconds", "n_predictions", "output", "error", "check_registration", "warnings",
                   "dicom")
SUMMARY_NAME = "summary.csv"


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
    threads: Optional[int] = None,
    brain_mask: Optional[str] = None,
    num_parts: Optional[int] = None,
    part_id: Optional[int] = None,
    cluster: Union[str, CohortCluster, None] = None,
    cluster_config: Union[str, os.PathLike, None] = None,
) -> list[dict[str, object]]:
    """Amplify every case of ``cases_dir`` into ``out_dir/<case>/T1c-pro.nii.gz``; returns the summary rows.

    ``out_dir`` may exist; only ``<case>/T1c-pro.nii.gz`` and ``summary.csv`` are written there
    (the summary is this command's own and is rewritten after every case). It may not be the
    cases folder, contain it, or be the current directory (checked before any work).
    ``out_dicom`` (optional) receives ``<case>/`` DICOM series folders (module doc); it is checked
    like ``out_dir`` and may not be the same folder. ``backend``: :func:`.inference.amplify_case`'s.

    Args:
        threads: CPU threads per case, torch's and ITK's (module doc). ``None``: serially, torch uses
            every core and ITK its default; on ``local:N``, cores / N; on other clusters, 1.
        brain_mask: the name of a brain mask image in each case folder (``"brain_mask"`` finds
            ``brain_mask.nii.gz`` and the other image endings) that replaces HD-BET, as
            ``predict --brain-mask`` does; a case without it fails.
        num_parts, part_id: run only part ``part_id`` (0 to ``num_parts`` - 1) of the cases (module
            doc); the summary is then ``summary-part-K-of-N.csv``.
        cluster: ``"local"``, ``"local:N"``, ``"tcp://HOST:PORT"`` or ``"slurm"`` (with
            ``cluster_config``), or a started :class:`.cluster.CohortCluster` (left running);
            ``None``: one case after the other in this process.
        cluster_config: the SLURM cluster file of ``cluster="slurm"`` (:func:`.cluster.read_slurm_config`).

    Each returned row also holds ``preprocess_s`` and ``ensemble_s`` (seconds of the two halves of
    the case, when it ran) and, on a cluster, ``preprocess_worker`` and ``ensemble_worker``; the
    summary file keeps :data:`SUMMARY_COLUMNS`.
    """
    from .inference import _resolve_bundle

    _check_part(num_parts, part_id)
    if threads is not None and int(threads) < 1:
        raise ValueError(f"--threads {threads}: give a number of CPU threads >= 1, or leave it out.")
    if isinstance(cluster, str):  # parse it and find Dask (and sbatch) before any work
        from .cluster import check_cluster_request

        check_cluster_request(cluster, cluster_config)
    elif cluster_config is not None:
        raise ValueError("--cluster-config is the SLURM cluster file: it goes with --cluster slurm.")
    if brain_mask:  # "brain_mask.nii.gz" names the same image as "brain_mask"
        from .imagefiles import image_stem

        brain_mask = image_stem(brain_mask) or brain_mask
    cases_dir, out_dir = Path(cases_dir), Path(out_dir)
    folders = select_part(_case_folders(cases_dir), num_parts, part_id)
    out_root = check_output_folder(out_dir, [], inputs=[cases_dir], what="cohort output folder")
    dicom_root = None if out_dicom is None else _check_dicom_root(out_dicom, out_root, cases_dir)
    model = _resolve_bundle(bundle)  # load and hash-check once for all cases
    options = dict(folds=folds, n_mirrorings=n_mirrorings, device=device, precision=precision, compile=compile,
                   mapping=mapping, overwrite=overwrite, strict=strict, backend=backend)
    summary = out_dir / summary_name(num_parts, part_id)
    report = progress or null_progress
    if precision == "int8":  # calibrated and checked once, before any case: a refusal stops the cohort here
        from .ensemble import InferenceSettings
        from .openvino_int8 import int8_settings

        int8_settings(InferenceSettings.create(device, precision, compile=compile, backend=backend), model,
                      model.load_models(folds), n_mirrorings, report, cancel)
    cases = [CohortCase(folder, out_dir / folder.name / OUTPUT_NAME, None if dicom_root is None else dicom_root / folder.name)
             for folder in folders]
    if cluster is not None:
        from .cohort_dask import predict_cohort_on_cluster

        return predict_cohort_on_cluster(cases, model, options, cluster, summary, cluster_config, threads=threads,
                                         brain_mask=brain_mask, progress=report, cancel=cancel)
    rows: list[dict[str, object]] = []
    with itk_threads(threads):
        for index, case in enumerate(cases):
            check_cancel(cancel)
            span = SubProgress(report, index / len(cases), (index + 1) / len(cases))
            rows.append(_run_case(case, model, span, {**options, "cancel": cancel, "threads": threads}, brain_mask))
            write_summary(summary, rows)
    if not cases:
        write_summary(summary, rows)
    return rows


class CohortCase:
    """One case of a cohort: its folder, its T1c-pro file, its DICOM series folder (or ``None``)."""

    def __init__(self, folder: Path, target: Path, series_dir: Optional[Path]) -> None:
        self.folder = folder
        self.target = target
        self.series_dir = series_dir

    @property
    def name(self) -> str:
        return self.folder.name

    def new_row(self) -> dict[str, object]:
        """The case's summary row, before it runs."""
        return {"case": self.name, "status": "", "seconds": "", "n_predictions": "", "output": str(self.target),
                "error": "", "check_registration": "", "warnings": "",
                "dicom": "" if self.series_dir is None else str(self.series_dir)}

    def finished(self, overwrite: bool) -> bool:
        """Both outputs are there (and ``overwrite`` is off): the case is skipped."""
        series_done = self.series_dir is None or (self.series_dir.is_dir() and any(self.series_dir.iterdir()))
        return self.target.exists() and not overwrite and series_done

    def series_only(self, overwrite: bool) -> bool:
        """Its T1c-pro exists but its DICOM series does not: the series is made from the file."""
        return self.target.exists() and not overwrite and self.series_dir is not None

    def inputs(self, brain_mask: Optional[str]) -> dict[str, Path]:
        """The case's t1, flair, adc, t1c (and ``brain_mask``) files; raises naming a missing one."""
        return find_case_inputs(self.folder, ("t1", "flair", "adc", "t1c") + ((brain_mask,) if brain_mask else ()))

    def remove_temporaries(self) -> None:
        """Hidden temporaries of this case's own outputs, left by a process killed mid-write (SIGKILL,
        a Dask worker lost): ``.T1c-pro.nii.gz.*`` (:func:`~ContrastAmplifierCommon.atomicfile.atomic_path`)
        and the series' ``.<case>.tmp-*`` staging folder (:func:`~ContrastAmplifierCommon.outputs.staged_folder`)."""
        import shutil

        leftovers = list(self.target.parent.glob(f".{self.target.name}.*")) if self.target.parent.is_dir() else []
        if self.series_dir is not None and self.series_dir.parent.is_dir():
            leftovers += self.series_dir.parent.glob(f".{self.series_dir.name}.tmp-*")
        for path in leftovers:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def result_fields(result: AmplifyResult) -> dict[str, object]:
    """The summary fields of an amplified case."""
    return dict(status="done", n_predictions=result.n_predictions, check_registration=";".join(result.suspect_registrations),
                warnings=";".join(f"{f.code}:{f.modality}" for f in result.preprocessed.findings),
                preprocess_s=round(result.timings_s.get("preprocess", 0.0), 3),
                ensemble_s=round(result.timings_s.get("ensemble", 0.0), 3))


def failure_fields(exc: BaseException) -> dict[str, object]:
    """The summary fields of a case that failed with ``exc`` (its findings too, for --strict)."""
    from .plausibility import suspect_modalities

    findings = getattr(exc, "findings", ())  # --strict: a PlausibilityError lists them
    return dict(status="failed", error=f"{type(exc).__name__}: {exc}", check_registration=";".join(suspect_modalities(findings)),
                warnings=";".join(f"{f.code}:{f.modality}" for f in findings))


@contextlib.contextmanager
def itk_threads(threads: Optional[int]) -> Iterator[None]:
    """SimpleITK's global default number of threads set to ``threads`` for the block (``None``: unchanged)."""
    if threads is None:
        yield
        return
    import SimpleITK as sitk

    saved = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(threads))
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(saved)


def _check_part(num_parts: Optional[int], part_id: Optional[int]) -> None:
    if (num_parts is None) != (part_id is None):
        raise ValueError("--num-parts N and --part-id K go together (K from 0 to N-1, e.g. $SLURM_ARRAY_TASK_ID of an "
                         "sbatch --array=0-(N-1)).")
    if num_parts is None or part_id is None:
        return
    if num_parts < 1:
        raise ValueError(f"--num-parts {num_parts}: give the number of parts, 1 or more.")
    if not 0 <= part_id < num_parts:
        raise ValueError(f"--part-id {part_id} is out of range for --num-parts {num_parts}: use 0 to {num_parts - 1} "
                         f"(sbatch --array=0-{num_parts - 1} gives $SLURM_ARRAY_TASK_ID in that range).")


def select_part(folders: Sequence[Path], num_parts: Optional[int], part_id: Optional[int]) -> list[Path]:
    """Part ``part_id`` of ``num_parts`` of the sorted case folders, round robin (all of them without parts).

    Case ``i`` (in name order) goes to part ``i % num_parts``: every case is in exactly one part, and
    the parts' sizes differ by one at most. A part may be empty (more parts than cases).
    """
    _check_part(num_parts, part_id)
    ordered = sorted(folders, key=lambda p: p.name)
    if num_parts is None or part_id is None:
        return ordered
    return ordered[part_id::num_parts]


def summary_name(num_parts: Optional[int], part_id: Optional[int]) -> str:
    """``summary.csv``, or ``summary-part-K-of-N.csv`` for part K of N."""
    return SUMMARY_NAME if num_parts is None else f"summary-part-{part_id}-of-{num_parts}.csv"


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


def _run_case(case: CohortCase, model, span: ProgressCallback, options: dict[str, Any],
              brain_mask: Optional[str] = None) -> dict[str, object]:
    """One case: skip it, complete its missing DICOM series from its T1c-pro file, or amplify it."""
    from .inference import amplify_case

    row = case.new_row()
    overwrite = bool(options["overwrite"])
    if case.finished(overwrite):
        row["status"] = "skipped"
        span("skip", 1.0, f"{case.name}: already done")
        return row
    start = time.perf_counter()
    try:
        inputs = case.inputs(brain_mask)
        if case.series_only(overwrite):
            assert case.series_dir is not None
            span("write DICOM", 0.5, f"{case.name}: DICOM series from the existing {OUTPUT_NAME}")
            _series_from_file(case.target, case.series_dir, inputs, model)
            row["status"] = "done"
        else:
            result = amplify_case(inputs["t1"], inputs["flair"], inputs["adc"], inputs["t1c"], bundle=model,
                                  out_path=case.target, progress=span, out_dicom=case.series_dir,
                                  brain_mask=inputs.get(brain_mask) if brain_mask else None, **options)
            row.update(result_fields(result))
    except (Cancelled, KeyboardInterrupt):
        raise
    except Exception as exc:  # one bad case must not stop the cohort
        row.update(failure_fields(exc))
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def _series_from_file(target: Path, series_dir: Path, inputs: dict[str, Path], model) -> None:
    """The DICOM series of a case whose T1c-pro file exists (into a missing or empty series folder)."""
    from .dicom_series import write_t1c_pro_series

    write_t1c_pro_series(target, series_dir, t1c=inputs["t1c"], model=model,
                         sources={m: inputs[m] for m in ("t1", "flair", "adc")},
                         details=f"from the existing {target.name} of this case")


def write_summary(path: Path, rows: list[dict[str, object]]) -> None:
    """``summary.csv`` (atomically): :data:`SUMMARY_COLUMNS` of ``rows``, in their order."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SUMMARY_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(buffer.getvalue(), path)
