"""Training cohorts: a manifest CSV or a folder of case folders, and the patient-wise fold split.

Paper, "Training and evaluating the model": five networks are trained on the training sample
"repeatedly split in a five-fold fashion". Splits are made by patient, never by scan, so two
examinations of one patient never sit on both sides of a split.

Manifest CSV columns (paths relative to the CSV's folder or absolute)::

    case_id,patient_id,t1,flair,adc,t1c_low,t1c[,brain_mask][,split]

An optional ``brain_mask`` (on the T1c grid) replaces HD-BET skull stripping. ``t1c_low`` may be empty when training with ``--simulate-low-dose``. Rows whose optional
``split`` column is ``test`` are held out of everything (fit, validation and percentiles).

A folder of case folders (``contrast-amplifier phantom`` output or the same layout from real
data) is read as one case per sub-folder, with images named ``t1``, ``flair``, ``adc``,
``t1c_low``, ``t1c`` and optionally ``brain_mask`` (``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha`` or a DICOM sub-folder); the
patient id is the ``patient_id`` of an optional ``case.json``, otherwise the folder name.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from ContrastAmplifierLib.imagefiles import IMAGE_SUFFIXES, ImageValidationError, find_image  # noqa: F401  (IMAGE_SUFFIXES re-exported)

#: Modalities a training case provides. ``t1c_low`` is input 4; ``t1c`` is the target.
INPUT_MODALITIES = ("t1", "flair", "adc", "t1c_low")
TARGET_MODALITY = "t1c"
ALL_MODALITIES = INPUT_MODALITIES + (TARGET_MODALITY,)
#: Optional brain mask on the T1c grid (phantoms ship one): skips HD-BET for that case.
OPTIONAL_IMAGES = ("brain_mask",)


class CohortError(ValueError):
    """The cohort manifest or folder cannot be used; the message names the input and the fix."""


@dataclass(frozen=True)
class CaseRecord:
    """One training case (one examination).

    Attributes:
        case_id: unique name (cache key).
        patient_id: folds are split on this.
        paths: modality -> image path (``t1c_low`` may be missing if it will be simulated).
    """

    case_id: str
    patient_id: str
    paths: Mapping[str, Path] = field(hash=False)


def _find_image(folder: Path, stem: str) -> Optional[Path]:
    """``<stem>.<image suffix>`` or a ``<stem>/`` DICOM folder (case-insensitive), see :func:`find_image`."""
    try:
        return find_image(folder, stem)
    except ImageValidationError as exc:
        raise CohortError(f"case {folder.name}: {exc}") from None


def _check_complete(record: CaseRecord, source: str, require_low_dose: bool) -> None:
    needed = ALL_MODALITIES if require_low_dose else tuple(m for m in ALL_MODALITIES if m != "t1c_low")
    missing = [m for m in needed if m not in record.paths]
    if missing:
        hint = " (or pass --simulate-low-dose to synthesise T1c-low from T1 and T1c)" if missing == ["t1c_low"] else ""
        raise CohortError(f"case {record.case_id!r} in {source} has no {', '.join(missing)} image{hint}.")
    for modality, path in record.paths.items():
        if not Path(path).exists():
            raise CohortError(f"case {record.case_id!r} in {source}: {modality} file {path} does not exist; fix the path.")


def read_cohort(source: Path, require_low_dose: bool = True) -> list[CaseRecord]:
    """Read a manifest CSV or a folder of case folders (see the module docstring).

    Raises:
        CohortError: missing source, missing columns or images, duplicate case ids, no cases.
    """
    source = Path(source)
    if not source.exists():
        raise CohortError(f"cohort {source} does not exist: pass a manifest CSV or a folder of case folders.")
    records = _read_csv(source) if source.is_file() else _read_folder(source)
    if not records:
        raise CohortError(f"cohort {source} holds no cases; each case needs t1, flair, adc, t1c_low and t1c images.")
    seen: dict[str, int] = {}
    for record in records:
        seen[record.case_id] = seen.get(record.case_id, 0) + 1
        _check_complete(record, str(source), require_low_dose)
    duplicates = sorted(k for k, n in seen.items() if n > 1)
    if duplicates:
        raise CohortError(f"cohort {source} has duplicate case ids {duplicates}; case ids must be unique.")
    return sorted(records, key=lambda r: r.case_id)


def _read_csv(path: Path) -> list[CaseRecord]:
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = set(reader.fieldnames or [])
        required = {"case_id", "patient_id", "t1", "flair", "adc", "t1c"}
        if not required <= columns:
            raise CohortError(
                f"manifest {path} lacks columns {sorted(required - columns)}; "
                "expected case_id,patient_id,t1,flair,adc,t1c_low,t1c[,split]."
            )
        records = []
        for row in reader:
            if (row.get("split") or "").strip().lower() == "test":
                continue
            paths = {}
            for modality in ALL_MODALITIES + OPTIONAL_IMAGES:
                value = (row.get(modality) or "").strip()
                if value:
                    p = Path(value)
                    paths[modality] = p if p.is_absolute() else (path.parent / p)
            records.append(CaseRecord(row["case_id"].strip(), row["patient_id"].strip() or row["case_id"].strip(), paths))
    return records


def _read_folder(folder: Path) -> list[CaseRecord]:
    records = []
    for case_dir in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        paths = {m: found for m in ALL_MODALITIES + OPTIONAL_IMAGES if (found := _find_image(case_dir, m)) is not None}
        if not paths:
            continue
        patient_id = case_dir.name
        meta = case_dir / "case.json"
        if meta.is_file():
            patient_id = str(json.loads(meta.read_text(encoding="utf-8")).get("patient_id", patient_id))
        records.append(CaseRecord(case_dir.name, patient_id, paths))
    return records


def assign_folds(records: Sequence[CaseRecord], n_folds: int = 5, seed: int = 0) -> dict[str, int]:
    """Patient-wise fold index of every case (deterministic for a seed).

    Patients are shuffled with ``seed`` and dealt round-robin, largest patients (most scans)
    first, so folds get balanced case counts and one patient's scans share a fold.

    Raises:
        CohortError: fewer patients than folds.
    """
    by_patient: dict[str, list[str]] = {}
    for record in records:
        by_patient.setdefault(record.patient_id, []).append(record.case_id)
    patients = sorted(by_patient)
    if len(patients) < n_folds:
        raise CohortError(
            f"{len(patients)} patients cannot be split into {n_folds} folds; add patients or lower --n-folds."
        )
    order = np.random.default_rng(seed).permutation(len(patients))
    shuffled = [patients[i] for i in order]
    shuffled.sort(key=lambda p: -len(by_patient[p]))  # stable: ties keep the seeded order
    fold_sizes = [0] * n_folds
    folds: dict[str, int] = {}
    for patient in shuffled:
        fold = min(range(n_folds), key=lambda k: (fold_sizes[k], k))
        fold_sizes[fold] += len(by_patient[patient])
        for case_id in by_patient[patient]:
            folds[case_id] = fold
    return folds
