"""amplify_case end to end on a small phantom: geometry, intensity mapping, cancel, bad bundles."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from ContrastAmplifierLib.bundle import BundleError
from ContrastAmplifierLib.inference import amplify_case
from ContrastAmplifierCommon.progress import CancelToken, Cancelled

torch.set_num_threads(1)
MODALITIES = ["t1", "flair", "adc", "t1c"]


@pytest.fixture()
def case_dir(small_case_dir) -> Path:
    return small_case_dir


@pytest.fixture()
def bundle_dir(random_bundle_dir) -> Path:
    return random_bundle_dir


def _inputs(case_dir: Path) -> dict:
    return {m: case_dir / f"{m}.nii.gz" for m in MODALITIES}


def test_output_lands_on_the_native_t1c_grid_and_keeps_the_t1c_outside_the_brain(case_dir, bundle_dir, tmp_path):
    out = tmp_path / "pro" / "T1c-pro.nii.gz"
    result = amplify_case(**_inputs(case_dir), bundle=bundle_dir, out_path=out, n_mirrorings=2, device="cpu",
                          brain_mask=case_dir / "brain_mask.nii.gz", threads=1)
    t1c = sitk.ReadImage(str(case_dir / "t1c.nii.gz"), sitk.sitkFloat32)
    written = sitk.ReadImage(str(out))
    assert written.GetSize() == t1c.GetSize()
    np.testing.assert_allclose(written.GetOrigin(), t1c.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(written.GetSpacing(), t1c.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(written.GetDirection(), t1c.GetDirection(), atol=1e-6)
    pro = sitk.GetArrayFromImage(written)
    assert np.isfinite(pro).all()
    assert result.n_predictions == 4
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(case_dir / "brain_mask.nii.gz"))) > 0
    original = sitk.GetArrayFromImage(t1c)
    np.testing.assert_array_equal(pro[~mask], original[~mask])  # outside the brain: the input T1c
    # inside the brain: the T1c's own scale (z-scores of the clip range around its brain mean)
    mean, sd = original[mask].mean(), original[mask].std()
    assert pro[mask].min() >= mean - 2.0 * sd - 1e-3 and pro[mask].max() <= mean + 3.0 * sd + 1e-3
    assert not list(out.parent.glob(".*"))  # no temporary file left


def test_intensity_mapping_round_trips_an_identity_prediction(case_dir, bundle_dir):
    """Feeding the normalised T1c back as the 'prediction' must reproduce the T1c inside the brain."""
    from ContrastAmplifierLib.inference import prediction_to_native_intensity
    from ContrastAmplifierLib.preprocessing import Geometry, preprocess_case

    geometry = Geometry(spacing=(3.0, 3.0, 3.0), crop_size=(56, 64, 56), percentiles={"t1c": (-20.0, 20.0)})
    case = preprocess_case({"t1c": case_dir / "t1c.nii.gz"}, geometry, brain_mask=case_dir / "brain_mask.nii.gz")
    t1c = sitk.ReadImage(str(case_dir / "t1c.nii.gz"), sitk.sitkFloat32)
    back = sitk.GetArrayFromImage(prediction_to_native_intensity(case.arrays["t1c"], case, t1c, (-20.0, 20.0)))
    original = sitk.GetArrayFromImage(t1c)
    inner = sitk.GetArrayFromImage(sitk.BinaryErode(sitk.ReadImage(str(case_dir / "brain_mask.nii.gz"), sitk.sitkUInt8), [2, 2, 2])) > 0
    sd = original[inner].std()
    # same brain mean and SD (the mapping is affine in z), and voxel-wise the same image up to the
    # smoothing of two interpolations (B-spline there, linear back) at 3 mm
    assert abs(back[inner].mean() - original[inner].mean()) < 0.05 * sd
    assert np.corrcoef(back[inner], original[inner])[0, 1] > 0.9


def test_residual_mapping_returns_the_native_t1c_exactly_for_an_unchanged_prediction(case_dir):
    """Residual mapping: where the network changes nothing, T1c-pro is the native T1c, voxel for
    voxel (no interpolation blur, no clip), and a change in z units lands as change x SD."""
    from ContrastAmplifierLib.inference import brain_statistics, prediction_to_native_intensity
    from ContrastAmplifierLib.preprocessing import Geometry, preprocess_case

    clip = (-2.0, 2.0)  # clips the brightest voxels: the direct mapping caps them, the residual does not
    geometry = Geometry(spacing=(6.0, 6.0, 6.0), crop_size=(28, 32, 28), percentiles={"t1c": clip})
    case = preprocess_case({"t1c": case_dir / "t1c.nii.gz"}, geometry, brain_mask=case_dir / "brain_mask.nii.gz")
    t1c = sitk.ReadImage(str(case_dir / "t1c.nii.gz"), sitk.sitkFloat32)
    original = sitk.GetArrayFromImage(t1c)
    brain = sitk.GetArrayFromImage(case.native_brain_mask) > 0
    unchanged = case.arrays["t1c"]
    residual = sitk.GetArrayFromImage(prediction_to_native_intensity(unchanged, case, t1c, clip, mapping="residual"))
    np.testing.assert_array_equal(residual, original)
    direct = sitk.GetArrayFromImage(prediction_to_native_intensity(unchanged, case, t1c, clip, mapping="direct"))
    _, sd = brain_statistics(t1c, case.native_brain_mask)
    assert np.abs(direct[brain] - original[brain]).max() > 0.5 * sd  # the 6 mm round trip and the clip
    # a uniform +0.1 change on the [0, 1] scale is +0.1 x (hi - lo) z = +0.4 SD wherever the crop covers the brain
    raised = np.where(case.mask_array, np.clip(unchanged + 0.1, 0.0, 1.0), 0.0).astype(np.float32)
    inner = (unchanged > 0.05) & (unchanged < 0.85) & case.mask_array
    shifted = sitk.GetArrayFromImage(prediction_to_native_intensity(np.where(inner, raised, unchanged), case, t1c, clip, mapping="residual"))
    gain = (shifted - original)[brain] / sd
    assert gain.max() == pytest.approx(0.4, abs=1e-4) and gain.min() >= -1e-5
    assert np.median(gain[gain > 0]) == pytest.approx(0.4, abs=0.05)


def test_mapping_auto_is_residual_only_for_a_coarser_model():
    from ContrastAmplifierLib.inference import resolve_mapping

    assert resolve_mapping("auto", (3.0, 3.0, 3.0), (1.0, 1.0, 1.0)) == "residual"  # phantom demo on a 1 mm T1c
    assert resolve_mapping("auto", (1.0, 1.0, 1.0), (1.0, 1.0, 1.0)) == "direct"  # the paper's model
    assert resolve_mapping("auto", (1.0, 1.0, 1.0), (0.9, 0.9, 5.0)) == "direct"
    assert resolve_mapping("auto", (3.0, 3.0, 3.0), (3.0, 3.0, 3.0)) == "direct"
    assert resolve_mapping("auto", (3.0, 3.0, 3.0), (2.0, 2.0, 5.5)) == "residual"  # exactly 1.5 x: residual
    assert resolve_mapping("auto", (3.0, 3.0, 3.0), (2.1, 2.1, 5.5)) == "direct"
    assert resolve_mapping("residual", (1.0,) * 3, (1.0,) * 3) == "residual"
    with pytest.raises(ValueError, match="--mapping must be one of auto, direct, residual"):
        resolve_mapping("sharp", (1.0,) * 3, (1.0,) * 3)


def test_cancel_leaves_no_output(case_dir, bundle_dir, tmp_path):
    token = CancelToken()
    out = tmp_path / "T1c-pro.nii.gz"

    def cancel_in_ensemble(stage, fraction, message=""):
        if stage == "ensemble":
            token.cancel()

    with pytest.raises(Cancelled):
        amplify_case(**_inputs(case_dir), bundle=bundle_dir, out_path=out, n_mirrorings=8, device="cpu",
                     brain_mask=case_dir / "brain_mask.nii.gz", progress=cancel_in_ensemble, cancel=token, threads=1)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_corrupted_bundle_is_refused_before_any_work(case_dir, bundle_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(bundle_dir, broken)
    data = (broken / "fold1.safetensors").read_bytes()
    (broken / "fold1.safetensors").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(BundleError, match="fold1.safetensors"):
        amplify_case(**_inputs(case_dir), bundle=broken, device="cpu")
    manifest = json.loads((bundle_dir / "bundle.json").read_text(encoding="utf-8"))
    manifest["network"]["in_channels"] = 3
    (broken / "bundle.json").write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(BundleError, match="input channels"):
        amplify_case(**_inputs(case_dir), bundle=broken, device="cpu")
