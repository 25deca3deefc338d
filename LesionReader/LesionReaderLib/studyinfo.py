"""What a study folder tells the analysis beyond the reads: reference, orders, markers, volumes.

Sources: part 1's ``study.json`` and/or a ``volumes.csv`` (``case,<volume>,...``) beside the
reads; neither is needed for a bare CSV analysis. The volumes feed the contrast metrics of
Table 4 (paper, "Performance metrics": CNR, LBR, CEP).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

from ContrastAmplifierLib.imagefiles import ImageValidationError, find_image

from .reads import read_csv
from .results import BRAIN_MASK_KEYS, HEALTHY_KEYS, LESION_LABEL_KEYS, AnalysisError, StudyInfo
from .study import StudyError, canonical_modality, load_study

PathLike = Union[str, os.PathLike]
_VOLUMES_FIX = "write volumes.csv as a UTF-8 CSV file with the header case,T1,T1c,T1c-pro,T1c-vfa,..."


def _canonical(name: str) -> str:
    """A volumes.csv column as part 1 spells the modality (``t1c_pro`` -> ``T1c-pro``), else as written."""
    return canonical_modality(name) or name


def volumes_from_csv(path: Path) -> dict[str, dict[str, Path]]:
    """``volumes.csv``: header ``case,<volume>,...`` (T1, T1c, T1c-pro, T1c-vfa, brain_mask...).

    Returns:
        case -> volume name -> path (relative paths are taken from the file's folder).

    Raises:
        AnalysisError: unreadable file, an empty case id or a case listed twice (file and line named).
    """
    out: dict[str, dict[str, Path]] = {}
    for row in read_csv(path, ("case",), _VOLUMES_FIX):
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


def _info_from_study(study_dir: Path) -> StudyInfo:
    """Reference, orders, markers and volumes of part 1's ``study.json``."""
    try:
        study = load_study(study_dir)
    except StudyError as exc:
        raise AnalysisError(str(exc)) from exc
    info = StudyInfo(
        reference_phase=study.reference_phase,
        reference_reader=study.reference_reader,
        phase_order=[p.name for p in study.phases],
        reader_order=list(study.readers),
        markers={p.name: p.markers for p in study.phases},
    )
    for case in study.cases:
        info.volumes[case.id] = {name: study.volume_path(case.id, name) for name in case.volumes}
    return info


def _add_roi_volumes(vols: dict[str, Path]) -> None:
    """Add the ROI volumes found beside the case's T1c that ``vols`` lacks (one per role)."""
    folder = Path(vols["T1c"]).parent
    for keys in (HEALTHY_KEYS, BRAIN_MASK_KEYS, LESION_LABEL_KEYS):
        if any(k in vols for k in keys):
            continue
        hit = _first_file(folder, keys)
        if hit is not None:
            vols[keys[0]] = hit


def _first_file(folder: Path, keys: tuple[str, ...]) -> Union[Path, None]:
    """The image file ``folder/<key><image suffix>`` of the first key that has one (see :func:`find_image`).

    Raises:
        AnalysisError: two files claim the same key (e.g. ``brain_mask.nii.gz`` and ``brain_mask.nrrd``).
    """
    for key in keys:
        try:
            hit = find_image(folder, key, folders=False)
        except ImageValidationError as exc:
            raise AnalysisError(str(exc)) from None
        if hit is not None:
            return hit
    return None


def load_study_info(study_dir: PathLike) -> StudyInfo:
    """Read ``study.json`` (part 1) and/or ``volumes.csv`` from ``study_dir`` when present.

    A folder with neither gives an empty :class:`StudyInfo` (bare CSV analysis). Roles part 1
    does not list (brain mask, lesion labels, healthy-brain label) are looked for beside the
    case's T1c, named like the phantom's files (``brain_mask.nii.gz`` ...).

    Raises:
        AnalysisError: an invalid ``study.json`` or ``volumes.csv``.
    """
    study_dir = Path(study_dir)
    info = _info_from_study(study_dir) if (study_dir / "study.json").is_file() else StudyInfo()
    if (study_dir / "volumes.csv").exists():
        for case, vols in volumes_from_csv(study_dir / "volumes.csv").items():
            info.volumes.setdefault(case, {}).update(vols)
    for vols in info.volumes.values():
        if "T1c" in vols:
            _add_roi_volumes(vols)
    return info
