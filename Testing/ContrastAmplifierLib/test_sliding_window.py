"""Sliding-window inference (sliding_window.py, ensemble window): tiling, Gaussian weights, exact
constants, and agreement with whole-volume prediction."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ContrastAmplifierCommon.progress import CancelToken, Cancelled
from ContrastAmplifierLib.ensemble import InferenceSettings, predict_ensemble
from ContrastAmplifierLib.network import NetworkConfig, ResidualUNet3D
from ContrastAmplifierLib.sliding_window import gaussian_importance_map, sliding_window_predict, tile_origins, window_starts

torch.set_num_threads(1)

SHAPE = (30, 25, 40)
WINDOW = (12, 10, 16)


def _settings(window=None) -> InferenceSettings:
    return InferenceSettings.create("cpu", precision="exact", window=window)


def _inputs(channels: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((channels,) + SHAPE, dtype=np.float32)


def test_tiles_overlap_by_half_and_cover_the_volume():
    assert window_starts(30, 12) == [0, 6, 12, 18]
    assert window_starts(25, 10) == [0, 5, 10, 15]
    assert window_starts(31, 12) == [0, 5, 10, 14, 19]  # evenly spread, steps <= 6
    assert window_starts(16, 16) == [0] and window_starts(10, 16) == [0]
    covered = np.zeros(SHAPE, int)
    origins = tile_origins(SHAPE, WINDOW)
    assert len(origins) == 4 * 4 * 4
    for z, y, x in origins:
        covered[z : z + 12, y : y + 10, x : x + 16] += 1
    assert covered.min() >= 1


def test_gaussian_importance_map_peaks_at_the_centre_and_stays_positive():
    weights = gaussian_importance_map((12, 10, 16))
    assert weights.shape == (12, 10, 16) and weights.dtype == torch.float32
    assert float(weights.max()) == 1.0 and float(weights.min()) > 0
    assert torch.equal(weights, torch.flip(weights, (0, 1, 2)))  # symmetric about the centre
    odd = gaussian_importance_map((5, 5, 5))
    assert float(odd[2, 2, 2]) == 1.0 and float(odd[0, 2, 2]) == pytest.approx(np.exp(-(2**2) / (2 * (5 / 8) ** 2)), rel=1e-6)


@pytest.mark.parametrize("value", [0.25, 0.37, 0.123456, 0.9, 1e-3])
def test_blending_constant_tiles_reproduces_the_constant_exactly(value):
    out = sliding_window_predict(lambda tile, progress: torch.full(tile.shape[2:], value), torch.zeros((1, 2) + SHAPE), WINDOW)
    assert out.shape == SHAPE and out.dtype == torch.float32
    assert torch.equal(out, torch.full(SHAPE, value, dtype=torch.float32))


def test_window_covering_the_volume_is_bit_identical_to_whole_volume():
    torch.manual_seed(0)
    models = [ResidualUNet3D(NetworkConfig(base_channels=4, levels=3)) for _ in range(2)]
    x = _inputs()
    whole = predict_ensemble(models, x, 2, _settings())
    for window in (SHAPE, (64, 64, 64)):
        assert np.array_equal(predict_ensemble(models, x, 2, _settings(window)), whole)
    with torch.inference_mode():
        single = sliding_window_predict(lambda tile, progress: models[0](tile)[0, 0], torch.from_numpy(x)[None], (64, 64, 64))
        assert torch.equal(single, models[0](torch.from_numpy(x)[None])[0, 0])


def test_identity_like_unet_tiles_agree_with_whole_volume():
    """An untrained input-skip UNet returns its post-contrast input voxel by voxel: no border effect,
    so tiles and whole volume agree to float rounding (the tiles' own padding to multiples of 4 included)."""
    torch.manual_seed(1)
    model = ResidualUNet3D(NetworkConfig(base_channels=4, levels=3, input_skip=True))
    x = _inputs(seed=1)
    whole = predict_ensemble([model], x, 4, _settings())
    tiled = predict_ensemble([model], x, 4, _settings((12, 10, 14)))  # 14: tiles the net pads to 16
    np.testing.assert_allclose(tiled, whole, rtol=0, atol=1e-6)
    np.testing.assert_allclose(whole, np.clip(x[3], 1e-3, 1 - 1e-3), atol=1e-6)


def test_small_receptive_field_tiles_agree_with_whole_volume_within_tolerance():
    """A 3x3x3 convolution (receptive field 3) differs only on each tile's outermost voxel layer,
    where the tile's zero padding shows; the Gaussian weights put those voxels last: on random
    inputs the blend stays within 1e-3 of the whole-volume prediction (measured 3e-4)."""
    torch.manual_seed(2)
    conv = torch.nn.Sequential(torch.nn.Conv3d(2, 1, 3, padding=1), torch.nn.Sigmoid())
    x = _inputs(channels=2, seed=2)
    whole = predict_ensemble([conv], x, 2, _settings())
    tiled = predict_ensemble([conv], x, 2, _settings(WINDOW))
    error = np.abs(tiled - whole)
    assert error.max() < 1e-3 and error.mean() < 1e-4
    # a pointwise (1x1x1) model has no border effect at all
    point = torch.nn.Sequential(torch.nn.Conv3d(2, 1, 1), torch.nn.Sigmoid())
    np.testing.assert_allclose(predict_ensemble([point], x, 1, _settings(WINDOW)), predict_ensemble([point], x, 1, _settings()),
                               rtol=0, atol=1e-6)


def test_sliding_window_progress_and_cancel():
    conv = torch.nn.Sequential(torch.nn.Conv3d(2, 1, 1), torch.nn.Sigmoid())
    x = _inputs(channels=2)
    fractions = []
    predict_ensemble([conv], x, 2, _settings(WINDOW), progress=lambda stage, fraction, message="": fractions.append(fraction))
    assert len(fractions) == 64 * 2 and fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    cancel = CancelToken()
    cancel.cancel()
    with pytest.raises(Cancelled):
        predict_ensemble([conv], x, 2, _settings(WINDOW), cancel=cancel)
    with pytest.raises(ValueError, match="window"):
        sliding_window_predict(lambda tile, progress: tile[0, 0], torch.zeros((1, 1) + SHAPE), (0, 4, 4))
