"""Validation metrics on [0, 1] volumes: MSE (the paper's loss), PSNR and 3D SSIM.

Computed over the whole crop, like the training loss (paper, "Training and evaluating the
model": mean square error). The data range is 1 because every image is mapped to [0, 1].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def mse(prediction: torch.Tensor, target: torch.Tensor) -> float:
    """Mean square error."""
    return float(torch.mean((prediction.float() - target.float()) ** 2))


def psnr(prediction: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB (infinite for identical volumes)."""
    error = mse(prediction, target)
    return math.inf if error == 0 else 10.0 * math.log10(data_range**2 / error)


def nrmse(prediction: torch.Tensor, target: torch.Tensor) -> float:
    """Root mean square error divided by the target's root mean square."""
    return math.sqrt(mse(prediction, target)) / max(float(torch.sqrt(torch.mean(target.float() ** 2))), 1e-12)


def _gaussian_window(sigma: float, radius: int, device: torch.device) -> torch.Tensor:
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    w = torch.exp(-(x**2) / (2 * sigma**2))
    return w / w.sum()


def _blur(volume: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    k = window.numel()
    for dim in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + dim] = k
        volume = F.conv3d(volume, window.view(shape))
    return volume


def ssim3d(prediction: torch.Tensor, target: torch.Tensor, data_range: float = 1.0, sigma: float = 1.5) -> float:
    """Mean structural similarity (Wang et al. 2004) with a separable 3D Gaussian window.

    Args:
        prediction, target: volumes of identical shape ``(Z, Y, X)``, ``(1, Z, Y, X)`` or ``(1, 1, Z, Y, X)``.
        sigma: Gaussian window width in voxels (the usual 1.5, radius 3 sigma capped by the size).
    """
    x = prediction.float().reshape((1, 1) + tuple(prediction.shape[-3:]))
    y = target.float().reshape((1, 1) + tuple(target.shape[-3:]))
    radius = max(1, min(int(3 * sigma + 0.5), (min(x.shape[2:]) - 1) // 2))
    window = _gaussian_window(sigma, radius, x.device)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = _blur(x, window), _blur(y, window)
    sxx = _blur(x * x, window) - mu_x**2
    syy = _blur(y * y, window) - mu_y**2
    sxy = _blur(x * y, window) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return float(ssim_map.mean())
