"""Training data in memory: cached brain z-scores, train-set percentiles and [0, 1] tensors.

Paper, "Preprocessing": brain signals are "standardized using z-scores, clipped to the global
train-set first and last percentiles, and mapped to the [0, 1] interval". The cache keeps the
z-scores (before clipping) so that the percentiles can be computed on the training cases only
and stored in the bundle; :func:`normalize` then applies the clip and the mapping.

A cached case is one ``<case_id>.npz`` file (read with ``allow_pickle=False``) holding
``zscores`` (5, Z, Y, X) float32 in the order of :data:`CACHE_CHANNELS`, ``mask`` (Z, Y, X) bool,
``case_id``, ``patient_id``, ``spacing`` (x, y, z) and ``crop_size`` (x, y, z). Arrays are in
SimpleITK order (z, y, x).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from ContrastAmplifierCommon.atomicfile import atomic_path

#: Channels of a cached case: the four network inputs (paper, Figure 1) then the target T1c.
CACHE_CHANNELS = ("t1", "flair", "adc", "t1c_low", "t1c")
#: Which percentile pair normalises each cached channel. T1c-low and the target T1c share the
#: "t1c" pair: the post-contrast input and the output then live on one intensity scale, which is
#: what lets the routine T1c replace T1c-low at test time (paper, "Training and evaluating").
PERCENTILE_KEY = {"t1": "t1", "flair": "flair", "adc": "adc", "t1c_low": "t1c", "t1c": "t1c"}
#: Bundle input modalities (the post-contrast channel is called "t1c" at test time).
BUNDLE_MODALITIES = ("t1", "flair", "adc", "t1c")
#: Paper: "clipped to the global train-set first and last percentiles".
PERCENTILE_LEVELS = (1.0, 99.0)
#: Brain voxels sampled per case for the percentiles (bounds memory at 1 mm on big cohorts).
MAX_SAMPLES_PER_CASE = 2_000_000


class CacheError(ValueError):
    """A cached case file is unusable; the message names it and the fix."""


@dataclass
class CachedCase:
    """Z-scored, atlas-space, cropped modalities of one case (see the module docstring)."""

    case_id: str
    patient_id: str
    zscores: np.ndarray
    mask: np.ndarray
    spacing: tuple[float, float, float]
    crop_size: tuple[int, int, int]

    def channel(self, name: str) -> np.ndarray:
        return self.zscores[CACHE_CHANNELS.index(name)]


def save_cached_case(case: CachedCase, path: Path) -> Path:
    """Atomically write ``case`` as an uncompressed ``.npz`` (fast to reload every run)."""
    path = Path(path)
    with atomic_path(path, ".npz") as tmp:
        np.savez(
            tmp,
            zscores=case.zscores.astype(np.float32),
            mask=case.mask.astype(bool),
            case_id=np.str_(case.case_id),
            patient_id=np.str_(case.patient_id),
            spacing=np.asarray(case.spacing, dtype=np.float64),
            crop_size=np.asarray(case.crop_size, dtype=np.int64),
        )
    return path


def load_cached_case(path: Path) -> CachedCase:
    """Read a ``.npz`` written by :func:`save_cached_case` (never unpickles)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            sx, sy, sz = (float(v) for v in data["spacing"])
            cx, cy, cz = (int(v) for v in data["crop_size"])
            case = CachedCase(
                case_id=str(data["case_id"]),
                patient_id=str(data["patient_id"]),
                zscores=np.ascontiguousarray(data["zscores"], dtype=np.float32),
                mask=np.ascontiguousarray(data["mask"], dtype=bool),
                spacing=(sx, sy, sz),
                crop_size=(cx, cy, cz),
            )
    except (OSError, KeyError, ValueError) as exc:
        raise CacheError(f"cached case {path} is unreadable ({exc}); delete it so it is rebuilt.") from None
    if case.zscores.ndim != 4 or case.zscores.shape[0] != len(CACHE_CHANNELS) or case.zscores.shape[1:] != case.mask.shape:
        raise CacheError(
            f"cached case {path} has zscores {case.zscores.shape} and mask {case.mask.shape}; expected "
            f"({len(CACHE_CHANNELS)}, Z, Y, X) and (Z, Y, X). Delete it so it is rebuilt."
        )
    return case


def load_cache_folder(folder: Path) -> list[CachedCase]:
    """Every ``*.npz`` cached case of a folder, sorted by case id."""
    files = sorted(Path(folder).glob("*.npz"))
    if not files:
        raise CacheError(f"{folder} holds no cached cases (*.npz); pass a manifest CSV or a folder of case folders.")
    return sorted((load_cached_case(f) for f in files), key=lambda c: c.case_id)


def train_set_percentiles(
    cases: Sequence[CachedCase], levels: tuple[float, float] = PERCENTILE_LEVELS, seed: int = 0
) -> dict[str, tuple[float, float]]:
    """Per bundle modality, the ``levels`` percentiles of brain z-scores over ``cases``.

    Pass the training cases only (the held-out test set must not leak in). The "t1c" pair is
    computed on the target T1c, whose range covers the T1c-low's.
    """
    if not cases:
        raise ValueError("percentiles need at least one training case")
    rng = np.random.default_rng(seed)
    out: dict[str, tuple[float, float]] = {}
    for modality in BUNDLE_MODALITIES:
        samples = []
        for case in cases:
            values = case.channel(modality)[case.mask]
            if values.size > MAX_SAMPLES_PER_CASE:
                values = rng.choice(values, MAX_SAMPLES_PER_CASE, replace=False)
            samples.append(values)
        pooled = np.concatenate(samples)
        if pooled.size == 0:
            raise ValueError(f"no brain voxels for {modality} in the training cases; check the brain masks.")
        lo, hi = np.percentile(pooled, levels)
        if not hi > lo:
            hi = lo + 1.0
        out[modality] = (float(lo), float(hi))
    return out


def normalize(zscores: np.ndarray, mask: np.ndarray, low: float, high: float) -> np.ndarray:
    """Clip brain z-scores to ``[low, high]`` and map to [0, 1]; 0 outside the brain.

    Uses :func:`ContrastAmplifierLib.normalization.clip_to_unit`, the very mapping inference
    applies, so training and test inputs share one scale.
    """
    from ContrastAmplifierLib.normalization import clip_to_unit

    scaled = clip_to_unit(zscores, float(low), float(high))
    return np.where(mask, scaled, 0.0).astype(np.float32)


@dataclass
class TrainingCase:
    """Network-ready tensors of one case: ``inputs`` (4, Z, Y, X), ``target`` (1, Z, Y, X)."""

    case_id: str
    patient_id: str
    inputs: torch.Tensor
    target: torch.Tensor

    def to(self, device: torch.device) -> TrainingCase:
        return TrainingCase(self.case_id, self.patient_id, self.inputs.to(device), self.target.to(device))


def to_training_case(case: CachedCase, percentiles: Mapping[str, Sequence[float]]) -> TrainingCase:
    """Normalise a cached case with the train-set ``percentiles`` into network tensors."""
    channels = []
    for name in CACHE_CHANNELS:
        lo, hi = percentiles[PERCENTILE_KEY[name]]
        channels.append(normalize(case.channel(name), case.mask, lo, hi))
    stack = torch.from_numpy(np.stack(channels))
    return TrainingCase(case.case_id, case.patient_id, stack[:4].contiguous(), stack[4:].contiguous())
