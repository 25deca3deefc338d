"""Paper contrast metrics on hand-worked ROIs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ContrastAmplifierLib.metrics import contrast_metrics, healthy_brain_roi, roi_contrast


def test_formulae_by_hand():
    cnr, lbr, cep = contrast_metrics(si_lesion=3.0, si_brain=1.0, sd_brain=0.5, si_lesion_pre=2.0)
    assert (cnr, lbr, cep) == (4.0, 3.0, 50.0)
    assert math.isnan(contrast_metrics(1.0, 1.0, 0.0, 1.0)[0])


def test_roi_contrast_pools_lesions_and_uses_sample_sd():
    image = np.zeros((4, 4, 4))
    brain = np.ones_like(image, bool)
    lesions = np.zeros_like(brain)
    lesions[0, 0, 0] = lesions[3, 3, 3] = True
    image[0, 0, 0], image[3, 3, 3] = 10.0, 20.0  # pooled mean 15
    roi = healthy_brain_roi(brain, lesions, margin_voxels=0)
    image[roi] = np.tile([1.0, 3.0], roi.sum() // 2)  # mean 2, sample SD known
    expected_sd = np.std(np.tile([1.0, 3.0], roi.sum() // 2), ddof=1)
    pre = np.full_like(image, 5.0)
    result = roi_contrast(image, lesions, roi, pre)
    assert result.si_lesion == 15.0 and result.si_brain == 2.0
    assert result.cnr == pytest.approx(13.0 / expected_sd)
    assert result.lbr == 7.5 and result.cep == pytest.approx(200.0)


def test_healthy_roi_excludes_dilated_lesions():
    brain = np.ones((9, 9, 9), bool)
    lesion = np.zeros_like(brain)
    lesion[4, 4, 4] = True
    roi = healthy_brain_roi(brain, lesion, margin_voxels=2)
    assert not roi[4, 4, 6] and roi[4, 4, 7] and roi.sum() == 9**3 - 25  # 3D cross-shaped dilation
    with pytest.raises(ValueError, match="non-empty lesion ROI"):
        roi_contrast(np.zeros((2, 2, 2)), np.zeros((2, 2, 2), bool), np.ones((2, 2, 2), bool))
