"""Template anatomy from nilearn (offline), CSF derivation, scalp/skull shell."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from ContrastAmplifierLib import phantom_anatomy as pa


def test_csf_derivation_is_non_negative_and_partitions_the_brain():
    rng = np.random.default_rng(1)
    brain = rng.uniform(size=(20, 20, 20)) > 0.3
    gm = rng.uniform(-0.1, 1.1, size=brain.shape).astype(np.float32)
    wm = rng.uniform(-0.1, 1.1, size=brain.shape).astype(np.float32)
    gm2, wm2, csf = pa.derive_tissue_fractions(gm, wm, brain)
    assert csf.min() >= 0 and gm2.min() >= 0 and wm2.min() >= 0
    np.testing.assert_allclose(gm2 + wm2 + csf, brain.astype(np.float32), atol=1e-5)


@pytest.fixture(scope="module")
def anatomy2():
    return pa.load_template_anatomy(2)


def test_template_anatomy_fractions(anatomy2):
    a = anatomy2
    assert a.csf.min() >= 0
    np.testing.assert_allclose((a.wm + a.gm + a.csf)[a.brain], 1.0, atol=1e-4)
    assert not (a.wm + a.gm + a.csf)[~a.brain].any()
    volume_l = a.brain.sum() * a.spacing ** 3 / 1e6
    assert 1.5 < volume_l < 2.2  # ICBM 2009a brain mask, about 1.9 L
    assert a.wm[a.brain].mean() > 0.2 and a.gm[a.brain].mean() > 0.2 and a.csf[a.brain].mean() > 0.05


def test_template_geometry_is_lps_world(anatomy2):
    """Our (z, y, x) LPS arrays agree with SimpleITK reading nilearn's GM file at the same physical points."""
    from pathlib import Path

    from nilearn import datasets

    path = Path(datasets.__file__).parent / "data" / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz"
    if not path.exists():
        pytest.skip(f"nilearn's GM template file is not at {path}")
    ref = sitk.ReadImage(str(path))
    assert sitk.GetArrayViewFromImage(ref).max() == 255
    a = pa.load_template_anatomy(1)
    rng = np.random.default_rng(0)
    idx = np.argwhere(a.gm > 0.5)[rng.integers(0, int((a.gm > 0.5).sum()), 50)]
    for k, j, i in idx:
        p = (a.origin[0] + i * a.spacing, a.origin[1] + j * a.spacing, a.origin[2] + k * a.spacing)
        ci = ref.TransformPhysicalPointToIndex(p)
        assert ref.GetPixel(ci) / 255.0 == pytest.approx(a.gm[k, j, i], abs=1e-3)  # stored as uint8


def test_head_shell_layers(anatomy2):
    signed, depth = pa.head_distance_maps(2)
    shell = pa.head_shell(signed, anatomy2.brain, 2.0, 6.0, 4.0, anatomy2.spacing)
    total = shell["csf"] + shell["skull"] + shell["fat"]
    assert total.max() <= 1.0 + 1e-6 and min(v.min() for v in shell.values()) >= 0
    assert not total[anatomy2.brain].any()
    # Skull volume ~ surface x thickness: thickness estimated from volumes of nested layers.
    voxel = anatomy2.spacing ** 3
    area = shell["fat"].sum() * voxel / 4.0  # fat is 4 mm thick
    assert shell["skull"].sum() * voxel / area == pytest.approx(6.0, rel=0.2)
    assert depth.max() > 40 and depth[~anatomy2.brain].max() == 0


def test_soft_inside_ramp():
    d = np.array([0.0, 4.0, 5.0, 6.0, 9.0])
    np.testing.assert_allclose(pa.soft_inside(d, 5.0, 2.0), [1.0, 1.0, 0.5, 0.0, 0.0])


def test_template_resolution_error():
    with pytest.raises(ValueError, match="1 or 2"):
        pa.load_template_anatomy(3)
