"""Lesion sampling, rasterising and radiologist-style measurement."""

from __future__ import annotations

import numpy as np
import pytest

from ContrastAmplifierLib import phantom_lesions as pl
from ContrastAmplifierLib.phantom_anatomy import load_template_anatomy


def test_lesion_count_distribution_over_seeds():
    counts = [pl.sample_lesion_count(np.random.default_rng(s))[1] for s in range(300)]
    assert min(counts) == 0 and max(counts) <= pl.MAX_LESIONS
    assert sum(c == 0 for c in counts) >= 10  # some cases without enhancing lesions
    assert max(counts) >= 10


@pytest.mark.parametrize("kind", ["metastasis", "glioma"])
def test_lesion_shapes_in_range(kind):
    rng = np.random.default_rng(3)
    for i in range(200):
        lesion = pl.sample_lesion_shape(rng, kind, i + 1)
        long_mm = 2 * lesion.semi_axes_mm[0]
        assert 2.0 <= long_mm <= 40.0
        assert np.all(np.diff(lesion.semi_axes_mm) <= 0)
        np.testing.assert_allclose(lesion.rotation @ lesion.rotation.T, np.eye(3), atol=1e-9)
        assert np.linalg.det(lesion.rotation) == pytest.approx(1.0)
        if kind == "metastasis" and long_mm <= pl.RING_THRESHOLD_MM:
            assert lesion.pattern == "solid"
        assert 0.1 <= lesion.conc_standard_dose <= 0.4


def test_rasterised_lesions_fractions_and_placement():
    anatomy = load_template_anatomy(2)
    rng = np.random.default_rng(7)
    from ContrastAmplifierLib.phantom_anatomy import head_distance_maps

    _, depth = head_distance_maps(2)
    shapes = [pl.sample_lesion_shape(rng, "metastasis", i + 1) for i in range(6)]
    shapes.append(pl.sample_lesion_shape(rng, "glioma", 7))
    lesions = pl.place_lesions(rng, anatomy, depth, shapes, lambda p, m: np.ones(len(p), bool))
    assert len(lesions) >= 5 and [l.id for l in lesions] == list(range(1, len(lesions) + 1))
    maps = pl.rasterise_lesions(anatomy, lesions)
    total = maps.enhancing + maps.necrosis + maps.oedema
    assert maps.enhancing.min() >= 0 and maps.necrosis.min() >= 0 and total.max() <= 1 + 1e-5
    assert not total[~anatomy.brain].any(), "lesions must stay inside the brain mask"
    for lesion in lesions:
        idx = np.rint((lesion.centre_lps - np.asarray(anatomy.origin)) / anatomy.spacing).astype(int)
        assert anatomy.brain[idx[2], idx[1], idx[0]]
        assert (maps.owner == lesion.id).any()
    assert (maps.conc_standard_dose[maps.enhancing > 0] > 0).all()


def _disk_labels(radius_vox: float, shape=(5, 40, 40)) -> np.ndarray:
    labels = np.zeros(shape, np.uint8)
    yy, xx = np.mgrid[: shape[1], : shape[2]]
    labels[2][(yy - 20) ** 2 + ((xx - 18) / 1.5) ** 2 <= radius_vox ** 2] = 3
    labels[1][(yy - 20) ** 2 + (xx - 18) ** 2 <= 4] = 3
    return labels


def test_measure_lesion_on_largest_axial_section():
    labels = _disk_labels(6)
    entry = pl.measure_lesion(labels, 3, origin=(10.0, -5.0, 2.0), spacing=(1.0, 1.0, 2.0))
    assert entry["center_ras"][2] == pytest.approx(2.0 + 2 * 2.0)  # slice 2 is the largest
    assert entry["long_mm"] == pytest.approx(19.0, abs=1.2)  # ellipse 2 x 9 mm wide + 1 voxel
    assert entry["short_mm"] == pytest.approx(13.0, abs=1.2)
    for key in ("long", "short"):
        a, b = np.asarray(entry[f"{key}_axis_ras"])
        assert np.linalg.norm(a - b) == pytest.approx(entry[f"{key}_mm"], abs=1e-2)
    la, lb = np.asarray(entry["long_axis_ras"])
    sa, sb = np.asarray(entry["short_axis_ras"])
    assert abs(np.dot(lb - la, sb - sa)) < 1e-6 * entry["long_mm"] * entry["short_mm"] + 1e-6
    # RAS centre back to LPS index is inside the label.
    x, y = -entry["center_ras"][0], -entry["center_ras"][1]
    assert labels[2, int(round(y + 5.0)), int(round(x - 10.0))] == 3
    assert pl.measure_lesion(labels, 9, (0, 0, 0), (1, 1, 1)) is None


def test_measure_single_voxel_lesion():
    labels = np.zeros((3, 5, 5), np.uint8)
    labels[1, 2, 2] = 1
    entry = pl.measure_lesion(labels, 1, (0.0, 0.0, 0.0), (2.0, 2.0, 3.0))
    assert entry["long_mm"] == pytest.approx(2.0) and entry["short_mm"] <= entry["long_mm"]
    assert entry["center_ras"] == [-4.0, -4.0, 3.0]


def test_lps_to_ras():
    assert pl.lps_to_ras([1.0, 2.0, 3.0]) == [-1.0, -2.0, 3.0]


def test_small_lesion_profile_skews_metastases_below_10_mm():
    """Training profile: long axes log-uniform over 2-20 mm, so P(< 10 mm) = ln 5 / ln 10 and
    P(< 5 mm) = ln 2.5 / ln 10; more metastases cases with more lesions than the default."""
    import math

    small = pl.lesion_profile("small")
    rng = np.random.default_rng(11)
    n = 4000
    longs = np.array([2 * pl.sample_lesion_shape(rng, "metastasis", 1, small).semi_axes_mm[0] for _ in range(n)])
    assert longs.min() >= 2.0 and longs.max() <= 20.0
    for cut, p in ((10.0, math.log(5) / math.log(10)), (5.0, math.log(2.5) / math.log(10))):
        tolerance = 4 * math.sqrt(p * (1 - p) / n)  # 4 binomial standard errors
        assert abs(float(np.mean(longs < cut)) - p) < tolerance
    draws = [pl.sample_lesion_count(np.random.default_rng(s), small) for s in range(2000)]
    kinds = [k for k, _ in draws]
    assert abs(kinds.count("none") / 2000 - 0.05) < 0.02 and abs(kinds.count("glioma") / 2000 - 0.10) < 0.03
    mean_count = np.mean([c for k, c in draws if k == "metastases"])
    default_mean = np.mean([c for k, c in (pl.sample_lesion_count(np.random.default_rng(s)) for s in range(2000))
                            if k == "metastases"])
    assert mean_count > default_mean + 1.5  # about 6.5 against 4.5 (the cap at 25 trims a little)


def test_default_profile_draws_what_the_phantom_always_drew():
    """Same random numbers consumed, same lesions: the default phantom's bytes do not move."""
    for seed in range(50):
        a, b = np.random.default_rng(seed), np.random.default_rng(seed)
        assert pl.sample_lesion_count(a) == pl.sample_lesion_count(b, pl.LESION_PROFILES["default"])
        x = pl.sample_lesion_shape(a, "metastasis", 1)
        y = pl.sample_lesion_shape(b, "metastasis", 1, pl.LESION_PROFILES["default"])
        assert np.array_equal(x.semi_axes_mm, y.semi_axes_mm) and a.uniform() == b.uniform()
    with pytest.raises(ValueError, match="--lesions 'tiny': use one of default, small"):
        pl.lesion_profile("tiny")
