"""Preprocess a cohort once into a cache of brain z-scores (reusing ContrastAmplifierLib).

Every case goes through :func:`ContrastAmplifierLib.preprocessing.preprocess_case` with the
T1c as reference: T1, FLAIR, ADC *and T1c-low* are registered rigidly to the T1c and all five
images share the T1c's affine mapping to the atlas, its brain mask and one B-spline
resampling, so input 4 and the target are aligned voxel for voxel. The z-scores (before the
percentile clip) are cached; see :mod:`.data`.

A case is rebuilt only when its inputs (paths, sizes, modification times) or the geometry
change: the key is stored next to the ``.npz``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ContrastAmplifierCommon.atomicfile import write_text_atomic
from ContrastAmplifierCommon.progress import CancelToken, ProgressCallback, SubProgress, check_cancel, null_progress

from .cohort import CaseRecord, read_cohort
from .data import CACHE_CHANNELS, CachedCase, load_cache_folder, load_cached_case, save_cached_case

CACHE_VERSION = 1


def _file_signature(path: Path) -> list[Any]:
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return [str(path.resolve()), len(files), sum(p.stat().st_size for p in files), max((p.stat().st_mtime_ns for p in files), default=0)]
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def cache_key(record: CaseRecord, spacing: Sequence[float], crop_size: Sequence[int], simulate_low_dose: bool, skull_strip: str) -> str:
    """Hash of everything a cached case depends on."""
    payload = {
        "version": CACHE_VERSION,
        "inputs": {m: _file_signature(p) for m, p in sorted(record.paths.items()) if not (simulate_low_dose and m == "t1c_low")},
        "patient_id": record.patient_id,
        "spacing": [float(s) for s in spacing],
        "crop_size": [int(s) for s in crop_size],
        "simulate_low_dose": simulate_low_dose,
        "skull_strip": skull_strip if "brain_mask" not in record.paths else "given",
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def preprocess_record(
    record: CaseRecord,
    spacing: Sequence[float],
    crop_size: Sequence[int],
    work_dir: Path,
    simulate_low_dose: bool = False,
    skull_strip: str = "fast",
    device: str = "cpu",
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> CachedCase:
    """Run the shared preprocessing on one case and return its cached z-scores.

    Args:
        record: the case (``brain_mask`` in its paths skips HD-BET, e.g. for phantoms).
        spacing, crop_size: atlas geometry (x, y, z).
        work_dir: where a simulated T1c-low is written.
        simulate_low_dose: build T1c-low from T1 and T1c (:mod:`.simulate`) instead of reading it.
        skull_strip, device: HD-BET mode and device.
    """
    from ContrastAmplifierLib.preprocessing import Geometry, preprocess_case

    paths = dict(record.paths)
    mask = paths.pop("brain_mask", None)
    if simulate_low_dose:
        from .simulate import simulate_low_dose_file

        seed = int(hashlib.sha256(record.case_id.encode()).hexdigest()[:8], 16)
        paths["t1c_low"] = simulate_low_dose_file(paths["t1"], paths["t1c"], Path(work_dir) / f"{record.case_id}_t1c_low_simulated.nii.gz", seed=seed)
    inputs = {m: paths[m] for m in CACHE_CHANNELS}
    sx, sy, sz = spacing
    cx, cy, cz = crop_size
    geometry = Geometry(spacing=(sx, sy, sz), crop_size=(cx, cy, cz))
    result = preprocess_case(
        inputs, geometry, skull_strip_mode=skull_strip,
        device=device, brain_mask=mask, progress=progress, cancel=cancel,
    )
    mask_array = result.mask_array
    zscores = np.stack([np.where(mask_array, result.zscores[m], 0.0).astype(np.float32) for m in CACHE_CHANNELS])
    return CachedCase(record.case_id, record.patient_id, zscores, mask_array,
                      spacing=geometry.spacing, crop_size=geometry.crop_size)


def _case_progress(progress: ProgressCallback, case_id: str) -> ProgressCallback:
    """One case's progress, reported under the cohort's ``"cache"`` stage with the case id."""

    def report(stage: str, fraction: float, message: str = "") -> None:
        progress("cache", fraction, f"{case_id}: {message or stage}")

    return report


def prepare_cases(
    source: Path,
    cache_dir: Path,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    crop_size: Sequence[int] = (160, 192, 160),
    simulate_low_dose: bool = False,
    skull_strip: str = "fast",
    device: str = "cpu",
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> list[CachedCase]:
    """Cached cases of a cohort, preprocessing those that are missing or stale.

    Args:
        source: manifest CSV, folder of case folders, or a folder of ``*.npz`` cached cases
            (used as they are, e.g. a cache copied to a cluster).
        cache_dir: where ``<case_id>.npz`` + ``<case_id>.key`` go.
        spacing, crop_size: atlas geometry (x, y, z); paper: 1 mm and 160 x 192 x 160.
        simulate_low_dose: see :mod:`.simulate`.
        skull_strip, device: HD-BET settings (cases with a ``brain_mask`` skip HD-BET).
        progress: ``(stage, fraction, message)`` over the whole cohort (stage ``"cache"``).
        cancel: checked between and inside cases; finished cases stay cached.
    """
    source = Path(source)
    progress = progress or null_progress
    if source.is_dir() and any(source.glob("*.npz")):
        return load_cache_folder(source)
    records = read_cohort(source, require_low_dose=not simulate_low_dose)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    cases = []
    for i, record in enumerate(records):
        check_cancel(cancel)
        npz = cache_dir / f"{record.case_id}.npz"
        key_path = cache_dir / f"{record.case_id}.key"
        key = cache_key(record, spacing, crop_size, simulate_low_dose, skull_strip)
        if npz.is_file() and key_path.is_file() and key_path.read_text(encoding="utf-8").strip() == key:
            cases.append(load_cached_case(npz))
            progress("cache", (i + 1) / len(records), f"{record.case_id} cached")
            continue
        sub = SubProgress(_case_progress(progress, record.case_id), i / len(records), (i + 1) / len(records))
        case = preprocess_record(record, spacing, crop_size, cache_dir, simulate_low_dose, skull_strip, device, sub, cancel)
        save_cached_case(case, npz)
        write_text_atomic(key + "\n", key_path)
        cases.append(case)
        progress("cache", (i + 1) / len(records), f"{record.case_id} preprocessed")
    return cases
