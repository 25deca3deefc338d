"""The loop a hospital runs from a worklist (issue 16): fetch a study's inputs from a PACS, amplify,
send T1c-pro back (``contrast-amplifier pacs amplify``).

1. The study's T1, T2-FLAIR, ADC and T1c series are picked by SeriesDescription and retrieved
   (:func:`.pacs_fetch.fetch_study`, DICOMweb) into ``OUT/inputs/<modality>/``. A rerun reuses
   inputs already fetched for the same study (``inputs/series.json`` names it), unless
   ``overwrite``.
2. :func:`.inference.amplify_case` writes ``OUT/T1c-pro.nii.gz`` and the DICOM series
   ``OUT/T1c-pro-dicom/``: a new series of the T1c's own study (:mod:`.dicom_series`).
3. The series goes to ``target`` (:func:`.pacs_send.send_instances`); its UIDs follow its content,
   so sending again after a failure stores nothing twice.

Every output, and the device, precision and backend, is checked before the PACS is asked
anything, so a second run into a finished folder fails at once unless ``overwrite``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from ContrastAmplifierCommon.progress import CancelToken, ProgressCallback, SubProgress, check_cancel, null_progress

from .pacs_config import Endpoint, PacsError, RetryPolicy
from .pacs_fetch import SERIES_FILE, FetchResult, fetch_study
from .pacs_rules import MODALITIES, SeriesRules
from .pacs_send import SendReport, resend_command, send_instances

PathLike = Union[str, "os.PathLike[str]"]

#: Names of the outputs inside ``OUT``.
INPUTS_FOLDER = "inputs"
T1C_PRO_FILE = "T1c-pro.nii.gz"
T1C_PRO_SERIES = "T1c-pro-dicom"


@dataclass(frozen=True)
class StudyAmplification:
    """What :func:`amplify_study` did.

    Attributes:
        inputs: the input series folders (modality -> folder).
        fetched: the fetch, or None when the inputs of an earlier run were reused.
        result: the :class:`.inference.AmplifyResult` (T1c-pro file and DICOM series).
        sent: what the PACS acknowledged, or None when nothing was sent.
    """

    inputs: Mapping[str, Path]
    fetched: Optional[FetchResult]
    result: Any
    sent: Optional[SendReport]


def fetched_inputs(folder: Path, study_uid: str) -> Optional[dict[str, Path]]:
    """The four input folders of an earlier fetch of ``study_uid`` into ``folder``, or None."""
    try:
        record = json.loads((folder / SERIES_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    folders = {m: folder / m for m in MODALITIES}
    if record.get("study_instance_uid") != study_uid or not all(f.is_dir() and any(f.iterdir()) for f in folders.values()):
        return None
    return folders


def amplify_study(
    study_uid: str,
    out_dir: PathLike,
    source: Endpoint,
    target: Optional[Endpoint],
    rules: Optional[SeriesRules] = None,
    overrides: Optional[Mapping[str, str]] = None,
    policy: Optional[RetryPolicy] = None,
    overwrite: bool = False,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
    **predict: Any,
) -> StudyAmplification:
    """Fetch, amplify and send back one study (module docstring).

    Args:
        study_uid: the Study Instance UID on ``source``.
        out_dir: receives ``inputs/``, ``T1c-pro.nii.gz`` and ``T1c-pro-dicom/``.
        source: the DICOMweb endpoint the inputs come from.
        target: where the T1c-pro series goes (often ``source``); None keeps it here.
        rules, overrides: series picking (:func:`.pacs_rules.pick_series`).
        policy: retries of every PACS request.
        overwrite: fetch again and replace this command's earlier outputs.
        predict: options of :func:`.inference.amplify_case` (``bundle``, ``folds``, ``n_mirrorings``,
            ``device``, ``precision``, ``backend``, ``brain_mask``, ``threads``...).

    Raises:
        PacsError: as :func:`.pacs_fetch.fetch_study` and :func:`.pacs_send.send_instances` (a
            send that fails leaves T1c-pro and its series written).
        OutputPathError: an output exists (without ``overwrite``) or cannot be written.
        ValueError, ImageValidationError: as :func:`.inference.amplify_case`.
    """
    from ContrastAmplifierCommon.outputs import check_output_file

    from .dicom_series import check_dicom_output_folder
    from .ensemble import InferenceSettings
    from .inference import OUTPUT_SUFFIXES, amplify_case

    report = progress or null_progress
    # a device, precision or backend that cannot run is refused before anything is fetched
    InferenceSettings.create(predict.get("device", "auto"), predict.get("precision", "auto"),
                             compile=predict.get("compile"), backend=predict.get("backend", "auto"))
    out = Path(out_dir)
    out_path = check_output_file(out / T1C_PRO_FILE, OUTPUT_SUFFIXES, overwrite=overwrite, what="T1c-pro output")
    check_dicom_output_folder(out / T1C_PRO_SERIES, overwrite=overwrite, outputs=[out_path])
    inputs_dir = out / INPUTS_FOLDER
    reused = None if overwrite else fetched_inputs(inputs_dir, study_uid)
    fetched = None
    if reused is None:
        fetched = fetch_study(study_uid, inputs_dir, source, rules=rules, overrides=overrides, policy=policy,
                              overwrite=overwrite, progress=SubProgress(report, 0.0, 0.15), cancel=cancel)
        inputs = dict(fetched.folders)
    else:
        report("fetch", 0.15, f"inputs of study {study_uid} already in {inputs_dir}")
        inputs = reused
    check_cancel(cancel)
    result = amplify_case(inputs["t1"], inputs["flair"], inputs["adc"], inputs["t1c"], out_path=out_path,
                          out_dicom=out / T1C_PRO_SERIES, overwrite=overwrite, progress=SubProgress(report, 0.15, 0.95),
                          cancel=cancel, **predict)
    series = result.dicom_series
    if series is None:  # amplify_case writes it whenever out_dicom is given
        raise RuntimeError(f"no DICOM series was written into {out / T1C_PRO_SERIES}")
    sent = None
    if target is not None:
        report("send", 0.95, f"T1c-pro series to {target.display()}")
        try:
            sent = send_instances(series.folder, target, policy, cancel=cancel)
        except PacsError as exc:
            raise type(exc)(f"{exc} T1c-pro and its series are written ({out}); send them later with "
                            f"`{resend_command([series.folder], target)}`.", exc.attempts, exc.report) from None
    report("done", 1.0, "study amplified" + (f", {sent.summary()}" if sent is not None else ""))
    return StudyAmplification(inputs=inputs, fetched=fetched, result=result, sent=sent)
