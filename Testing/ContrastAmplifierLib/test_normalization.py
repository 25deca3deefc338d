"""Normalisation invariants (paper, "Preprocessing": z-score in brain, clip to percentiles, [0, 1])."""

from __future__ import annotations

import numpy as np
import pytest

from ContrastAmplifierLib.normalization import (
    center_crop,
    clip_to_unit,
    compute_clip_percentiles,
    normalize,
    zscore_in_mask,
)


@pytest.fixture()
def brain():
    rng = np.random.default_rng(1)
    image = rng.gamma(4.0, 50.0, size=(20, 24, 22)).astype(np.float32)
    mask = np.zeros(image.shape, bool)
    mask[4:16, 5:20, 3:18] = True
    image[~mask] = rng.normal(5, 1, size=(~mask).sum())
    return image, mask


def test_zscore_is_standard_inside_brain(brain):
    image, mask = brain
    z = zscore_in_mask(image, mask)
    assert z.dtype == np.float32
    assert z[mask].mean() == pytest.approx(0.0, abs=1e-5)
    assert z[mask].std() == pytest.approx(1.0, abs=1e-5)


def test_normalize_range_background_and_clip_vs_numpy(brain):
    image, mask = brain
    low, high = -1.5, 2.0
    out = normalize(image, mask, (low, high))
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert np.all(out[~mask] == 0.0)
    # numpy reference of the whole chain
    values = image[mask].astype(np.float64)
    ref = np.clip((image - values.mean()) / values.std(), low, high)
    ref = (ref - low) / (high - low)
    np.testing.assert_allclose(out[mask], ref[mask], atol=1e-6)
    # clipped voxels sit exactly on 0 and 1
    z = (image[mask] - values.mean()) / values.std()
    assert np.all(out[mask][z <= low] == 0.0) and np.all(out[mask][z >= high] == 1.0)
    assert (z >= high).sum() > 0 and (z <= low).sum() > 0


def test_percentiles_match_numpy_and_clip_1_99(brain):
    image, mask = brain
    low, high = compute_clip_percentiles([image, image * 3 + 7], [mask, mask], (1.0, 99.0))
    z = (image[mask] - image[mask].mean()) / image[mask].std()
    np.testing.assert_allclose((low, high), np.percentile(np.concatenate([z, z]), [1, 99]), rtol=1e-4)
    out = normalize(image, mask, (low, high))[mask]
    assert (out == 0).mean() == pytest.approx(0.01, abs=0.003)
    assert (out == 1).mean() == pytest.approx(0.01, abs=0.003)


def test_center_crop_and_pad():
    a = np.arange(10 * 12 * 8).reshape(10, 12, 8)
    c = center_crop(a, (6, 12, 10))
    assert c.shape == (6, 12, 10)
    np.testing.assert_array_equal(c[:, :, 1:9], a[2:8])
    assert np.all(c[:, :, 0] == 0) and np.all(c[:, :, 9] == 0)


def test_errors():
    a = np.ones((4, 4, 4), np.float32)
    with pytest.raises(ValueError, match="brain mask is empty"):
        zscore_in_mask(a, np.zeros_like(a, bool))
    with pytest.raises(ValueError, match="constant inside the brain"):
        zscore_in_mask(a, np.ones_like(a, bool))
    with pytest.raises(ValueError, match="low < high"):
        clip_to_unit(a, 2.0, 1.0)
