"""``--simulate-low-dose``: a T1c-low for cohorts without a second, low-dose injection.

Beyond the paper (which acquired a real 0.025 mmol/kg T1c-low). Signal model, an
approximation: with the pre-contrast T1 rigidly aligned to the routine T1c (0.1 mmol/kg),

    T1c-low = T1 + r * (T1c - T1) + n,    r = low dose / routine dose = 0.25,

i.e. the post-minus-pre difference scaled linearly by the dose ratio, plus Gaussian noise ``n``
that restores the T1c's noise level (the weighted average of two noisy images is smoother than
either). Known limits: the T1 shortening saturates with concentration (the true low-dose
enhancement is more than a quarter of the full-dose one), and it assumes the T1 and T1c are the
same sequence with the same scaling. Documented in the README as an approximation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

#: Paper, "Data acquisition": T1c-low at 0.025 mmol/kg, routine T1c at 0.1 mmol/kg.
DOSE_RATIO = 0.025 / 0.1


def estimate_noise_sigma(array: np.ndarray, mask: Optional[np.ndarray] = None) -> float:
    """Robust noise standard deviation: MAD of a high-pass residual, calibrated on white noise."""
    residual = array - ndimage.gaussian_filter(array, 1.0)
    values = residual[mask] if mask is not None else residual.ravel()
    calibration = np.random.default_rng(0).standard_normal((32, 32, 32))
    factor = np.std((calibration - ndimage.gaussian_filter(calibration, 1.0))[4:-4, 4:-4, 4:-4])
    return float(1.4826 * np.median(np.abs(values - np.median(values))) / factor)


def simulate_low_dose_arrays(
    t1: np.ndarray, t1c: np.ndarray, ratio: float = DOSE_RATIO, seed: int = 0, mask: Optional[np.ndarray] = None
) -> np.ndarray:
    """T1c-low from aligned T1 and T1c arrays (same grid); see the module docstring."""
    if t1.shape != t1c.shape:
        raise ValueError(f"T1 {t1.shape} and T1c {t1c.shape} must be on one grid to simulate a low dose")
    t1 = t1.astype(np.float64)
    t1c = t1c.astype(np.float64)
    low = t1 + ratio * (t1c - t1)
    sigma_t1 = estimate_noise_sigma(t1, mask)
    sigma_t1c = estimate_noise_sigma(t1c, mask)
    sigma_low = np.sqrt(((1 - ratio) * sigma_t1) ** 2 + (ratio * sigma_t1c) ** 2)
    missing = np.sqrt(max(sigma_t1c**2 - sigma_low**2, 0.0))
    low += missing * np.random.default_rng(seed).standard_normal(low.shape)
    return low.astype(np.float32)


def simulate_low_dose_images(t1: sitk.Image, t1c: sitk.Image, ratio: float = DOSE_RATIO, seed: int = 0) -> sitk.Image:
    """T1c-low on the T1c grid: register the T1 rigidly to the T1c, then :func:`simulate_low_dose_arrays`."""
    from ContrastAmplifierLib.registration import register_rigid, resample

    transform = register_rigid(t1c, t1, seed=seed)
    t1_on_t1c = resample(t1, t1c, transform)
    low = simulate_low_dose_arrays(sitk.GetArrayFromImage(t1_on_t1c), sitk.GetArrayFromImage(t1c), ratio, seed)
    image = sitk.GetImageFromArray(np.maximum(low, 0.0))
    image.CopyInformation(t1c)
    return image


def simulate_low_dose_file(t1_path: Path, t1c_path: Path, out_path: Path, ratio: float = DOSE_RATIO, seed: int = 0) -> Path:
    """Write a simulated T1c-low next to the cache and return its path."""
    from ContrastAmplifierLib.imageio import read_image, write_image_atomic

    low = simulate_low_dose_images(read_image(t1_path, "T1"), read_image(t1c_path, "T1c"), ratio, seed)
    return write_image_atomic(low, out_path)
