"""Intensity normalisation on the atlas crop grid (paper, "Preprocessing").

"Brain signals were standardized using z-scores, clipped to the global train-set first and last
percentiles, and mapped to the [0, 1] interval." The percentiles are data: they come from the
model bundle (``Geometry.clip_percentiles``); :func:`compute_clip_percentiles` computes them over
a training set. Arrays are SimpleITK order (z, y, x) throughout.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

__all__ = [
    "DEFAULT_CLIP",
    "center_crop",
    "zscore_in_mask",
    "clip_to_unit",
    "normalize",
    "compute_clip_percentiles",
]

#: Fallback clip range in brain z-score units, used when no bundle provides training-set
#: percentiles (about the 0.1st/99.9th percentile of a normal distribution).
DEFAULT_CLIP: tuple[float, float] = (-3.0, 3.0)


def center_crop(array: np.ndarray, size: Sequence[int], fill: float = 0.0) -> np.ndarray:
    """Crop (or pad with ``fill``) ``array`` symmetrically about its centre to ``size`` (same axis order)."""
    if len(size) != array.ndim:
        raise ValueError(f"crop size {tuple(size)} does not match a {array.ndim}D array")
    out = np.full(tuple(int(s) for s in size), fill, dtype=array.dtype)
    src, dst = [], []
    for n, m in zip(array.shape, size):
        start = (n - m) // 2  # > 0: crop; < 0: pad
        s0, s1 = max(start, 0), min(start + m, n)
        src.append(slice(s0, s1))
        dst.append(slice(s0 - start, s1 - start))
    out[tuple(dst)] = array[tuple(src)]
    return out


def zscore_in_mask(array: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``(array - mean) / std`` with mean and std taken over ``mask`` (float32 result)."""
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != array.shape:
        raise ValueError(f"mask shape {mask.shape} differs from image shape {array.shape}")
    if mask.sum() < 2:
        raise ValueError("the brain mask is empty: skull stripping or registration failed; check the QC picture")
    values = array[mask].astype(np.float64)
    std = float(values.std())
    if std == 0.0:
        raise ValueError("the image is constant inside the brain mask; it cannot be z-scored")
    return ((array - values.mean()) / std).astype(np.float32)


def clip_to_unit(z: np.ndarray, low: float, high: float) -> np.ndarray:
    """Clip ``z`` to ``[low, high]`` and map that interval linearly onto [0, 1]."""
    if not high > low:
        raise ValueError(f"clip percentiles must satisfy low < high, got ({low}, {high})")
    return ((np.clip(z, low, high) - low) / (high - low)).astype(np.float32)


def normalize(array: np.ndarray, mask: np.ndarray, clip: tuple[float, float] = DEFAULT_CLIP) -> np.ndarray:
    """Z-score inside the brain, clip to ``clip`` (z units), map to [0, 1], zero outside the brain.

    The one brain mask (from the T1c) is applied to every modality, as in the paper.
    """
    mask = np.asarray(mask, dtype=bool)
    out = clip_to_unit(zscore_in_mask(array, mask), float(clip[0]), float(clip[1]))
    out[~mask] = 0.0
    return out


def compute_clip_percentiles(
    arrays: Iterable[np.ndarray], masks: Iterable[np.ndarray], q: tuple[float, float] = (1.0, 99.0)
) -> tuple[float, float]:
    """Global training-set percentiles of brain z-scores (the paper's "first and last percentiles").

    Args:
        arrays: one modality's images of every training case (atlas crop grid).
        masks: the matching brain masks.
        q: percentiles to return (paper: 1st and 99th).
    """
    pooled = [zscore_in_mask(a, m)[np.asarray(m, dtype=bool)] for a, m in zip(arrays, masks)]
    if not pooled:
        raise ValueError("no training images given")
    low, high = np.percentile(np.concatenate(pooled), q)
    return float(low), float(high)
