"""Contrast metrics of the paper ("Performance metrics") from ROI masks.

    CNR = (SI_lesion - SI_brain) / SD_brain
    LBR = SI_lesion / SI_brain
    CEP = (SI_lesion - SI_lesion_pre) / SI_lesion_pre        (in %, as in Table 4)

The reader study (LesionReaderLib.contrast) builds its lesion ROIs from the reference axes; the
demo and the benchmarks use the phantom's true lesion labels. Both use :func:`contrast_metrics`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
from scipy import ndimage


def contrast_metrics(si_lesion: float, si_brain: float, sd_brain: float, si_lesion_pre: float) -> tuple[float, float, float]:
    """(CNR, LBR, CEP %) from ROI statistics (paper, "Performance metrics" formulae)."""
    cnr = (si_lesion - si_brain) / sd_brain if sd_brain > 0 else math.nan
    lbr = si_lesion / si_brain if si_brain != 0 else math.nan
    cep = 100.0 * (si_lesion - si_lesion_pre) / si_lesion_pre if si_lesion_pre != 0 else math.nan
    return cnr, lbr, cep


@dataclass(frozen=True)
class RoiContrast:
    """CNR/LBR (and CEP when a pre-contrast image is given) of one image."""

    cnr: float
    lbr: float
    cep: float
    si_lesion: float
    si_brain: float
    sd_brain: float


def healthy_brain_roi(brain_mask: np.ndarray, lesion_mask: np.ndarray, margin_voxels: int = 3) -> np.ndarray:
    """Brain mask minus the lesions dilated by ``margin_voxels`` (an automatic healthy-brain ROI)."""
    dilated = ndimage.binary_dilation(lesion_mask, iterations=margin_voxels) if margin_voxels > 0 else lesion_mask
    return np.asarray(brain_mask, bool) & ~dilated


def roi_contrast(image: np.ndarray, lesion_mask: np.ndarray, brain_roi: np.ndarray, pre: Optional[np.ndarray] = None) -> RoiContrast:
    """Contrast metrics of ``image`` with the lesion ROI pooled over all lesions (paper)."""
    lesion_mask = np.asarray(lesion_mask, bool)
    brain_roi = np.asarray(brain_roi, bool)
    if lesion_mask.sum() == 0 or brain_roi.sum() < 2:
        raise ValueError("contrast metrics need a non-empty lesion ROI and a healthy-brain ROI of at least 2 voxels")
    data = np.asarray(image, dtype=np.float64)
    si_lesion = float(data[lesion_mask].mean())
    si_brain = float(data[brain_roi].mean())
    sd_brain = float(data[brain_roi].std(ddof=1))
    si_pre = float(np.asarray(pre, dtype=np.float64)[lesion_mask].mean()) if pre is not None else math.nan
    cnr, lbr, cep = contrast_metrics(si_lesion, si_brain, sd_brain, si_pre)
    return RoiContrast(cnr, lbr, cep, si_lesion, si_brain, sd_brain)
