"""Sliding-window inference with Gaussian overlap weighting (as nnU-Net), for patch-trained models.

The paper predicts whole 160 x 192 x 160 crops; a network trained on patches (``contrast-amplifier-train
fit --patch-size``) can still do so (it is fully convolutional), or predict tiles of its training
size and blend them: tiles overlap by half a window (:data:`OVERLAP`) and each tile's prediction is
weighted by a Gaussian centred on it (sigma = 1/8 of the window side, :data:`SIGMA_SCALE`), so the
tile borders, where the zero padding of the convolutions shows, count least. The blend is
``sum(weight x prediction) / sum(weight)`` per voxel, summed in float64 on the CPU (two
accumulators: 80 MB at 160 x 192 x 160) and rounded once to float32, so a constant prediction is
returned bit for bit.

Inputs are ``(1, C, Z, Y, X)`` tensors (any device), outputs ``(Z, Y, X)`` float32 on the CPU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import product
from typing import Callable, Optional

import torch

from ContrastAmplifierCommon.progress import ProgressCallback, SubProgress, null_progress

#: Tiles overlap by this fraction of the window (nnU-Net's default ``tile_step_size`` 0.5).
OVERLAP = 0.5
#: Gaussian sigma as a fraction of the window side (nnU-Net: 1/8).
SIGMA_SCALE = 1.0 / 8.0

#: ``predict(tile, progress)``: the tile ``(1, C, z, y, x)`` -> its prediction ``(z, y, x)``.
TilePredictor = Callable[[torch.Tensor, ProgressCallback], torch.Tensor]


def gaussian_importance_map(size: Sequence[int], sigma_scale: float = SIGMA_SCALE) -> torch.Tensor:
    """float32 ``size`` map, maximum 1 at the centre, a Gaussian of sigma ``sigma_scale x side`` per axis.

    Strictly positive everywhere (corner of a cube: about exp(-24) = 4e-11), so every voxel of a
    tiling gets a positive total weight.
    """
    axes = []
    for side in size:
        coords = torch.arange(int(side), dtype=torch.float64) - (int(side) - 1) / 2.0
        sigma = max(float(side) * sigma_scale, 1e-3)
        axes.append(torch.exp(-(coords**2) / (2.0 * sigma**2)))
    weights = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    weights = weights / weights.max()
    return weights.to(torch.float32).clamp_min(torch.finfo(torch.float32).tiny)


def window_starts(length: int, window: int, overlap: float = OVERLAP) -> list[int]:
    """Tile starts along one axis: evenly spaced, at most ``window x (1 - overlap)`` apart, first 0, last ``length - window``."""
    if window >= length:
        return [0]
    target_step = window * (1.0 - overlap)
    n_steps = int(math.ceil((length - window) / target_step)) + 1
    step = (length - window) / (n_steps - 1)
    return [int(round(step * i)) for i in range(n_steps)]


def tile_origins(shape: Sequence[int], window: Sequence[int], overlap: float = OVERLAP) -> list[tuple[int, int, int]]:
    """Every tile corner (z, y, x) of ``shape`` for a ``window`` (clipped to the shape)."""
    starts = [window_starts(int(s), min(int(w), int(s)), overlap) for s, w in zip(shape, window)]
    return [(int(z), int(y), int(x)) for z, y, x in product(*starts)]


def sliding_window_predict(
    predict: TilePredictor,
    inputs: torch.Tensor,
    window: Sequence[int],
    overlap: float = OVERLAP,
    progress: Optional[ProgressCallback] = None,
) -> torch.Tensor:
    """Blend ``predict`` over overlapping tiles of ``inputs`` ``(1, C, Z, Y, X)``; returns ``(Z, Y, X)`` float32.

    Each window side is clipped to the volume's; a window covering the whole volume is one tile,
    i.e. ``predict(inputs)`` itself.
    """
    if inputs.ndim != 5 or inputs.shape[0] != 1:
        raise ValueError(f"sliding-window input must be (1, C, Z, Y, X); got {tuple(inputs.shape)}")
    if len(window) != 3 or min(int(w) for w in window) < 1:
        raise ValueError(f"window must be three positive sides (z, y, x), got {tuple(window)}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    progress = progress or null_progress
    shape = tuple(int(s) for s in inputs.shape[2:])
    size = tuple(min(int(w), s) for w, s in zip(window, shape))
    origins = tile_origins(shape, size, overlap)
    if len(origins) == 1:
        return predict(inputs, progress).detach().to("cpu", torch.float32)
    weights = gaussian_importance_map(size).double()
    total = torch.zeros(shape, dtype=torch.float64)
    norm = torch.zeros(shape, dtype=torch.float64)
    for i, origin in enumerate(origins):
        region = tuple(slice(o, o + s) for o, s in zip(origin, size))
        tile = predict(inputs[(slice(None), slice(None)) + region], SubProgress(progress, i / len(origins), (i + 1) / len(origins)))
        total[region] += weights * tile.detach().to("cpu", torch.float64)
        norm[region] += weights
    return (total / norm).to(torch.float32)
