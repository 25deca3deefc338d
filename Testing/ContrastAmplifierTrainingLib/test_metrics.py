"""Validation metrics checked against independent implementations (scikit-image, hand-worked values)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from ContrastAmplifierTrainingLib.metrics import mse, nrmse, psnr, ssim3d


def _pair(shape=(24, 26, 22), noise=0.1, seed=0):
    rng = np.random.default_rng(seed)
    target = rng.random(shape)
    prediction = np.clip(target + noise * rng.standard_normal(shape), 0.0, 1.0)
    return prediction, target


@pytest.mark.parametrize("noise", [0.02, 0.1, 0.4])
def test_ssim3d_matches_scikit_image(noise):
    """Same definition as skimage's Gaussian-weighted SSIM (sigma 1.5, population covariance, its
    border crop equals our valid convolution): equal to float32 precision."""
    prediction, target = _pair(noise=noise)
    ours = ssim3d(torch.from_numpy(prediction), torch.from_numpy(target))
    theirs = structural_similarity(prediction, target, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                   use_sample_covariance=False)
    assert ours == pytest.approx(theirs, abs=2e-6)


def test_psnr_mse_nrmse_against_references():
    prediction, target = _pair(noise=0.05, seed=1)
    p, t = torch.from_numpy(prediction), torch.from_numpy(target)
    assert psnr(p, t) == pytest.approx(peak_signal_noise_ratio(target, prediction, data_range=1.0), abs=1e-4)
    assert mse(p, t) == pytest.approx(float(np.mean((prediction - target) ** 2)), rel=1e-6)
    assert nrmse(p, t) == pytest.approx(math.sqrt(np.mean((prediction - target) ** 2) / np.mean(target**2)), rel=1e-6)
    # hand-worked: a constant error of 0.1 is an MSE of 0.01 and a PSNR of 20 dB
    zeros = torch.zeros(4, 4, 4)
    assert psnr(zeros + 0.1, zeros) == pytest.approx(20.0) and psnr(zeros, zeros) == math.inf
    assert ssim3d(t, t) == pytest.approx(1.0)
