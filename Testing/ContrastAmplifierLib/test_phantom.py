"""Synthetic phantom end to end: outputs, determinism, dose physics, poses, lesions.json.

Cases are generated at 3 mm (2 mm truth grid) so the whole file runs in well under a minute on
one core; the physics is the same as at 1 mm.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from ContrastAmplifierLib import phantom
from ContrastAmplifierCommon.progress import CancelToken, Cancelled

SPACING = 3.0
SEED_METS = 5  # 5 metastases
SEED_GLIOMA = 1  # one glioma
SEED_NONE = 3  # no lesion
FILES = [f"{s}.nii.gz" for s in phantom.SEQUENCES] + [
    "brain_mask.nii.gz", "lesion_labels.nii.gz", "lesions.json", "phantom.json"]


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("phantom")
    phantom.generate_cohort(root / "noisy", cases=1, seed=SEED_METS, spacing=SPACING)
    phantom.generate_cohort(root / "clean", cases=1, seed=SEED_METS, spacing=SPACING, noise=False)
    phantom.generate_cohort(root / "glioma", cases=1, seed=SEED_GLIOMA, spacing=SPACING)
    return root


def _read(case: Path, name: str) -> sitk.Image:
    return sitk.ReadImage(str(case / f"{name}.nii.gz"))


def _arr(case: Path, name: str) -> np.ndarray:
    return sitk.GetArrayFromImage(_read(case, name)).astype(np.float64)


def _params(case: Path) -> dict:
    return json.loads((case / "phantom.json").read_text(encoding="utf-8"))


def _on_t1c_grid(case: Path, name: str, interpolator=sitk.sitkLinear, pose_of: str | None = None) -> np.ndarray:
    """Resample sequence ``name`` onto the T1c grid with the ground-truth poses of phantom.json."""
    seqs = _params(case)["sequences"]
    a_s = np.asarray(seqs[pose_of or name]["world_to_native_lps"])
    a_t1c = np.asarray(seqs["t1c"]["world_to_native_lps"])
    m = a_s @ np.linalg.inv(a_t1c)  # t1c physical -> sequence physical
    tx = sitk.AffineTransform(3)
    tx.SetMatrix(m[:3, :3].ravel().tolist())
    tx.SetTranslation(m[:3, 3].tolist())
    img = sitk.Cast(_read(case, name), sitk.sitkFloat32)
    return sitk.GetArrayFromImage(sitk.Resample(img, _read(case, "t1c"), tx, interpolator, 0.0)).astype(np.float64)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------ outputs

def test_outputs_grids_and_labelling(out):
    case = out / "noisy" / "case_000"
    assert sorted(p.name for p in case.iterdir()) == sorted(FILES)
    params = _params(case)
    assert params["label"] == "synthetic phantom \u2014 not clinical data"
    assert params["seed"] == SEED_METS and params["field_strength_t"] == 1.5
    t1c = _read(case, "t1c")
    for name in ("t1c_x4", "brain_mask", "lesion_labels"):
        img = _read(case, name)
        assert img.GetSize() == t1c.GetSize() and img.GetOrigin() == t1c.GetOrigin()
        assert img.GetSpacing() == t1c.GetSpacing() and img.GetDirection() == t1c.GetDirection()
    seqs = params["sequences"]
    assert seqs["t1c_x4"]["world_to_native_lps"] == seqs["t1c"]["world_to_native_lps"]
    assert seqs["t1"]["world_to_native_lps"] != seqs["t1c"]["world_to_native_lps"]
    expected = {"t1": (3, 3, 3), "t1c": (3, 3, 3), "flair": (3, 3, 5), "adc": (3, 3, 4), "t1c_vfa": (3, 3, 3)}
    for name, spacing in expected.items():
        assert _read(case, name).GetSpacing() == pytest.approx(spacing)
        assert seqs[name]["grid"]["spacing_mm"] == pytest.approx(spacing)
    for name, entry in seqs.items():
        a = np.asarray(entry["world_to_native_lps"])
        np.testing.assert_allclose(a @ np.asarray(entry["native_to_world_lps"]), np.eye(4), atol=1e-6)
    assert _read(case, "lesion_labels").GetPixelID() == sitk.sitkUInt8
    assert set(np.unique(_arr(case, "brain_mask"))) == {0.0, 1.0}


def test_native_fov_includes_skull_and_scalp(out):
    case = out / "clean" / "case_000"
    t1c, mask = _arr(case, "t1c"), _arr(case, "brain_mask") > 0
    from scipy import ndimage

    outside = ndimage.binary_dilation(mask, iterations=6) & ~ndimage.binary_dilation(mask, iterations=1)
    assert (t1c[outside] > 0).mean() > 0.5, "a head shell must surround the brain"
    wm_level = np.median(t1c[ndimage.binary_erosion(mask, iterations=3)])
    assert t1c[outside].max() > 1.5 * wm_level, "scalp fat is bright on T1"
    assert (t1c[outside] < 0.2 * wm_level).any(), "skull is dark"
    assert t1c[0].max() == 0 or np.percentile(t1c[0], 50) < 0.1 * wm_level  # air at the FOV edge


def test_same_seed_same_bytes(out, tmp_path):
    again = phantom.generate_cohort(tmp_path, cases=1, seed=SEED_METS, spacing=SPACING)[0]
    for name in FILES:
        assert _sha(again / name) == _sha(out / "noisy" / "case_000" / name), name
    other = phantom.generate_cohort(tmp_path / "other", cases=1, seed=SEED_METS + 100, spacing=SPACING)[0]
    assert _sha(other / "t1c.nii.gz") != _sha(again / "t1c.nii.gz")


def test_cohort_grows_with_skip_existing(tmp_path):
    """``skip_existing`` keeps finished cases (a demo-model cohort can grow from 20 to 60 cases)."""
    first = phantom.generate_cohort(tmp_path, cases=1, seed=SEED_METS, spacing=SPACING)[0]
    stamp = (first / "t1c.nii.gz").stat().st_mtime_ns
    both = phantom.generate_cohort(tmp_path, cases=2, seed=SEED_METS, spacing=SPACING, skip_existing=True)
    assert [p.name for p in both] == ["case_000", "case_001"]
    assert (first / "t1c.nii.gz").stat().st_mtime_ns == stamp  # not regenerated
    assert (both[1] / "t1c.nii.gz").is_file() and not list(tmp_path.glob(".case_*"))


# ------------------------------------------------------------------------------------------ physics

def _lesion_means(case: Path) -> dict:
    labels = _arr(case, "lesion_labels")
    images = {"t1c": _arr(case, "t1c"), "t1c_x4": _arr(case, "t1c_x4"),
              "t1c_low": _on_t1c_grid(case, "t1c_low"), "t1": _on_t1c_grid(case, "t1")}
    return {i: {k: v[labels == i].mean() for k, v in images.items()} | {"n": int((labels == i).sum())}
            for i in np.unique(labels)[1:]}


@pytest.mark.parametrize("which", ["clean", "noisy", "glioma"])
def test_lesion_signal_increases_with_dose(out, which):
    means = _lesion_means(out / which / "case_000")
    assert means, "the test case must have lesions"
    pooled = {k: np.mean([m[k] for m in means.values()]) for k in ("t1", "t1c_low", "t1c", "t1c_x4")}
    assert pooled["t1c_x4"] > pooled["t1c"] > pooled["t1c_low"] > pooled["t1"]
    for m in means.values():
        if m["n"] >= 8:
            assert m["t1c_x4"] > m["t1c"] > m["t1c_low"], m
            if which == "clean":
                assert m["t1c_low"] > m["t1"], m


def test_lesion_cnr_increases_with_dose(out):
    """Paper's CNR = (SI_lesion - SI_brain) / SD_brain, pooled over the lesions of the case."""
    case = out / "noisy" / "case_000"
    from scipy import ndimage

    labels = _arr(case, "lesion_labels")
    brain = ndimage.binary_erosion(_arr(case, "brain_mask") > 0, iterations=2)
    healthy = brain & ~ndimage.binary_dilation(labels > 0, iterations=4)
    cnr = {}
    for name in ("t1c_low", "t1c", "t1c_x4"):
        img = _on_t1c_grid(case, name) if name == "t1c_low" else _arr(case, name)
        cnr[name] = (img[labels > 0].mean() - img[healthy].mean()) / img[healthy].std()
    assert cnr["t1c_x4"] > cnr["t1c"] > cnr["t1c_low"]
    assert cnr["t1c_x4"] - cnr["t1c"] > 0.2


def test_no_change_outside_enhancing_tissue_and_vessels(out):
    clean, noisy = out / "clean" / "case_000", out / "noisy" / "case_000"
    diff_clean = _arr(clean, "t1c_x4") - _arr(clean, "t1c")
    mask = _arr(clean, "brain_mask") > 0
    assert diff_clean.min() >= -1, "gadolinium never lowers the GRE signal here"
    unaffected = diff_clean == 0
    assert unaffected[mask].mean() > 0.9, "only lesions and vessels take up contrast"
    labels = _arr(clean, "lesion_labels")
    assert not unaffected[labels > 0].all()
    # Noisy images: outside enhancing tissue the dose images differ by noise only.
    diff = (_arr(noisy, "t1c_x4") - _arr(noisy, "t1c"))[unaffected & mask]
    assert abs(diff.mean()) < 4 * diff.std() / np.sqrt(diff.size)
    sigma = _params(noisy)["sequences"]["t1c"]["noise_sigma_signal_units"] * phantom.SCANNER_GAIN
    assert diff.std() == pytest.approx(np.sqrt(2) * sigma, rel=0.15)


def test_vfa_black_blood_and_higher_conspicuity(out):
    case = out / "clean" / "case_000"
    params = _params(case)
    assert params["sequences"]["t1c_vfa"]["black_blood"] and not params["sequences"]["t1c"]["black_blood"]
    tissues = params["tissues"]
    model = phantom.PhysicsModel(tissues, phantom.mr.table1_protocols(1.5), 1.5, params["t2star_over_t2"],
                                 params["gadolinium"]["plasma_conc_mmol_l_at_standard_dose"],
                                 params["gadolinium"]["plexus_conc_mmol_l_at_standard_dose"])
    vfa = model.per_tissue("t1c_vfa", 0.1, black_blood=True)
    gre = model.per_tissue("t1c", 0.1)
    assert vfa["vessel"] == 0 and gre["vessel"] > gre["wm"]
    c = np.array([0.25])
    ratio_vfa = model.enhancing_signal(model.protocols["t1c_vfa"], 0.1)(c)[0] / vfa["wm"]
    ratio_gre = model.enhancing_signal(model.protocols["t1c"], 0.1)(c)[0] / gre["wm"]
    assert ratio_vfa > ratio_gre  # T1c-vfa: higher lesion conspicuity
    means = _lesion_means(case)
    big = max(means, key=lambda i: means[i]["n"])
    labels = _arr(case, "lesion_labels")
    vfa_img = _on_t1c_grid(case, "t1c_vfa")
    brain = _arr(case, "brain_mask") > 0
    assert vfa_img[labels == big].mean() > np.median(vfa_img[brain])


def test_flair_oedema_bright_and_adc_in_range(out):
    case = out / "glioma" / "case_000"
    flair = _on_t1c_grid(case, "flair")
    adc = _on_t1c_grid(case, "adc")
    brain = _arr(case, "brain_mask") > 0
    labels = _arr(case, "lesion_labels") > 0
    from scipy import ndimage

    around = ndimage.binary_dilation(labels, iterations=2) & ~labels & brain
    assert flair[around].mean() > 1.2 * np.median(flair[brain]), "glioma oedema is bright on FLAIR"
    assert 500 < np.median(adc[brain]) < 1300  # 1e-6 mm^2/s: brain parenchyma 0.65-0.9 e-3
    assert adc[around].mean() > np.median(adc[brain])  # oedema has higher ADC


def test_poses_map_sequences_onto_t1c(out):
    """Ground-truth poses: T1 brought onto the T1c grid overlaps it; ignoring the pose does not."""
    case = out / "clean" / "case_000"
    brain = _arr(case, "brain_mask") > 0
    t1c = _arr(case, "t1c")
    good = _on_t1c_grid(case, "t1")
    seqs = _params(case)["sequences"]
    tx = sitk.AffineTransform(3)  # identity: pretend T1 was not moved
    bad = sitk.GetArrayFromImage(sitk.Resample(sitk.Cast(_read(case, "t1"), sitk.sitkFloat32),
                                               _read(case, "t1c"), tx, sitk.sitkLinear, 0.0))
    r_good = np.corrcoef(good[brain], t1c[brain])[0, 1]
    r_bad = np.corrcoef(bad[brain], t1c[brain])[0, 1]
    assert r_good > 0.9 and r_good > r_bad + 0.05, (r_good, r_bad)
    assert seqs["t1"]["world_to_native_lps"] != seqs["t1c"]["world_to_native_lps"]


# ------------------------------------------------------------------------------------------ lesions.json

@pytest.mark.parametrize("which", ["noisy", "glioma"])
def test_lesions_json_matches_labels(out, which):
    case = out / which / "case_000"
    doc = json.loads((case / "lesions.json").read_text(encoding="utf-8"))
    assert list(doc) == ["lesions"]
    labels_img = _read(case, "lesion_labels")
    labels = sitk.GetArrayFromImage(labels_img)
    assert sorted(l["id"] for l in doc["lesions"]) == sorted(np.unique(labels)[1:].tolist())
    assert 1 <= len(doc["lesions"]) <= 25
    for lesion in doc["lesions"]:
        assert list(lesion) == ["id", "kind", "center_ras", "long_axis_ras", "short_axis_ras", "long_mm", "short_mm"]
        assert lesion["kind"] in ("metastasis", "glioma")
        x, y, z = lesion["center_ras"]
        idx = labels_img.TransformPhysicalPointToIndex((-x, -y, z))  # RAS -> LPS
        assert labels[idx[2], idx[1], idx[0]] == lesion["id"]
        assert lesion["long_mm"] >= lesion["short_mm"] - 1e-3
        for key in ("long", "short"):
            a, b = np.asarray(lesion[f"{key}_axis_ras"])
            assert np.linalg.norm(a - b) == pytest.approx(lesion[f"{key}_mm"], abs=0.01)
            assert a[2] == b[2] == z  # drawn on one axial section
        assert 2.0 <= lesion["long_mm"] <= 50.0
    if which == "glioma":
        assert {l["kind"] for l in doc["lesions"]} == {"glioma"}
    params = _params(case)
    truth = params["lesions_truth"]
    assert len(truth) == len(doc["lesions"])
    # Ground-truth pose: a metastasis' true world centre, mapped by world_to_native_lps, lies in its label.
    a_t1c = np.asarray(params["sequences"]["t1c"]["world_to_native_lps"])
    for lesion in truth:
        np.testing.assert_allclose(lesion["centre_ras_world"], np.multiply(lesion["centre_lps_world"], [-1, -1, 1]))
        if lesion["kind"] == "metastasis":
            p = a_t1c[:3, :3] @ np.asarray(lesion["centre_lps_world"]) + a_t1c[:3, 3]
            idx = labels_img.TransformPhysicalPointToIndex(p.tolist())
            assert labels[idx[2], idx[1], idx[0]] == lesion["id"]


def test_case_without_lesions_and_small_fov(tmp_path):
    case = phantom.generate_cohort(tmp_path, cases=1, seed=SEED_NONE, spacing=4.0, size=(40, 44, 40))[0]
    assert json.loads((case / "lesions.json").read_text(encoding="utf-8")) == {"lesions": []}
    assert _read(case, "t1c").GetSize() == (40, 44, 40)
    assert not _arr(case, "lesion_labels").any()


# ------------------------------------------------------------------------------------------ API / CLI

def test_progress_cancel_and_errors(tmp_path):
    seen = []
    paths = phantom.generate_cohort(tmp_path / "a", cases=2, seed=20, spacing=4.0, size=(32, 32, 32),
                                    field_strength=3, progress=lambda s, f, m="": seen.append(f))
    assert [p.name for p in paths] == ["case_000", "case_001"]
    assert _params(paths[1])["seed"] == 21 and _params(paths[0])["field_strength_t"] == 3.0
    assert seen[-1] == 1.0 and all(0 <= f <= 1 for f in seen) and seen == sorted(seen)
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        phantom.generate_cohort(tmp_path / "b", cases=1, seed=0, spacing=4.0, cancel=token)
    assert list((tmp_path / "b").iterdir()) == []
    with pytest.raises(ValueError, match="1.5 or 3"):
        phantom.generate_cohort(tmp_path / "c", cases=1, seed=0, spacing=4.0, field_strength=2.0)
    assert list((tmp_path / "c").iterdir()) == []
    with pytest.raises(ValueError, match="--spacing"):
        phantom.generate_cohort(tmp_path / "d", cases=1, seed=0, spacing=0.01)


def test_cli_phantom(tmp_path):
    from typer.testing import CliRunner

    from ContrastAmplifierLib.cli import app

    result = CliRunner().invoke(app, ["phantom", str(tmp_path), "--cases", "1", "--seed", "4", "--spacing", "4",
                                      "--size", "30", "34", "30", "--progress", "none"])
    assert result.exit_code == 0, result.output
    assert _read(tmp_path / "case_000", "t1c").GetSize() == (30, 34, 30)
    bad = CliRunner().invoke(app, ["phantom", str(tmp_path / "x"), "--field-strength", "2", "--spacing", "4",
                                   "--progress", "none"])
    assert bad.exit_code == 2 and "1.5 or 3" in bad.output


def test_phantom_never_replaces_a_folder_it_did_not_make(tmp_path):
    from ContrastAmplifierCommon.outputs import OutputPathError

    mine = tmp_path / "case_000"
    mine.mkdir()
    (mine / "t1c.nii.gz").write_bytes(b"a real patient's T1c")
    with pytest.raises(OutputPathError, match=r"case_000 exists and is not a phantom case \(no phantom.json\); it is never replaced"):
        phantom.generate_cohort(tmp_path, cases=1, seed=0, spacing=4.0)
    assert [p.name for p in tmp_path.iterdir()] == ["case_000"]
    assert (mine / "t1c.nii.gz").read_bytes() == b"a real patient's T1c"
