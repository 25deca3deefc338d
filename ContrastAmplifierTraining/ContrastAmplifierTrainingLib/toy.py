"""Toy cached cases for unit tests and throughput benchmarks (not the physics phantom).

Each case is a smooth random "tissue" field inside an ellipsoidal brain mask with a few
enhancing blobs: T1c-low carries a quarter of the T1c's enhancement (0.025 vs 0.1 mmol/kg), so
a network can learn the T1c-low -> T1c mapping in a few epochs. Already z-scored, like the
training cache. Use :mod:`ContrastAmplifierLib.phantom` for anything that must look like MRI.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from .data import CachedCase


def _zscore(array: np.ndarray, mask: np.ndarray) -> np.ndarray:
    values = array[mask]
    return np.where(mask, (array - values.mean()) / (values.std() + 1e-6), 0.0).astype(np.float32)


def toy_case(case_id: str, patient_id: str, shape: Sequence[int] = (32, 32, 32), seed: int = 0) -> CachedCase:
    """One toy case of ``shape`` (z, y, x), deterministic for ``seed``."""
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    mask = (grid**2).sum(0) < 0.8
    tissue = ndimage.gaussian_filter(rng.standard_normal(shape), 2.0)
    tissue /= tissue.std() + 1e-6
    enhancement = np.zeros(shape)
    for _ in range(int(rng.integers(1, 4))):
        centre = rng.uniform(-0.5, 0.5, size=3)
        radius = rng.uniform(0.1, 0.25)
        enhancement += np.exp(-((grid - centre[:, None, None, None]) ** 2).sum(0) / (2 * radius**2))
    enhancement *= mask
    noise = lambda: 0.05 * rng.standard_normal(shape)  # noqa: E731
    t1 = 1.0 + 0.3 * tissue + noise()
    flair = 1.0 - 0.2 * tissue + 0.5 * enhancement + noise()
    adc = 1.0 + 0.1 * tissue - 0.3 * enhancement + noise()
    t1c_low = t1 + 0.25 * enhancement + noise()
    t1c = t1 + 1.0 * enhancement + noise()
    zscores = np.stack([_zscore(a, mask) for a in (t1, flair, adc, t1c_low, t1c)])
    return CachedCase(case_id, patient_id, zscores, mask, spacing=(2.0, 2.0, 2.0), crop_size=(shape[2], shape[1], shape[0]))


def toy_cohort(n_cases: int, shape: Sequence[int] = (32, 32, 32), seed: int = 0, scans_per_patient: int = 1) -> list[CachedCase]:
    """``n_cases`` toy cases; consecutive cases share a patient when ``scans_per_patient`` > 1."""
    return [
        toy_case(f"toy_{i:03d}", f"patient_{i // scans_per_patient:03d}", shape, seed=seed * 10_000 + i)
        for i in range(n_cases)
    ]
