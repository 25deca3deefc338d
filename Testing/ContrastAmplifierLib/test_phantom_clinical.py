"""Clinical acquisition protocol of the phantom: grids, ground truth, EPI distortion, storage.

Cases are rendered at 3 mm (2 mm truth grid, about 2 s each); the ranges of the nominal protocol
(0.5-1 mm in-plane, 4-6 mm slices) are checked on the acquisition plans, which cost no rendering.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from ContrastAmplifierLib import phantom
from ContrastAmplifierLib import phantom_clinical as pc

SPACING = 3.0
#: 2D T1c tilted 7 deg, FLAIR tilted 20 deg; a deep 22 mm metastasis and a ring one; storage:
#: t1 int16 with a -1801 offset, t1c/t1c_x4/t1c_vfa int16 with scl_slope/scl_inter, ADC in 1e-3 units.
SEED = 9
PLAN_SEEDS = range(10)
TWO_D = ("t1", "flair")


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("clinical")
    out = {}
    for name, kwargs in (("clean", {"noise": False}), ("noisy", {}),
                         ("undistorted", {"noise": False, "clinical": pc.ClinicalOptions(adc_distortion=False)})):
        out[name] = phantom.generate_case(root / name, SEED, spacing=SPACING, protocol="clinical", **kwargs).case_dir
    return out


@pytest.fixture(scope="module")
def plans() -> dict[int, pc.ClinicalPlan]:
    return {seed: phantom.plan_clinical_case(seed, resolution=2) for seed in PLAN_SEEDS}


def _params(case: Path) -> dict:
    return json.loads((case / "phantom.json").read_text(encoding="utf-8"))


def _read(case: Path, name: str) -> sitk.Image:
    return sitk.ReadImage(str(case / f"{name}.nii.gz"))


def _direction(image: sitk.Image) -> np.ndarray:
    return np.asarray(image.GetDirection()).reshape(3, 3)


# ------------------------------------------------------------------------------------------ default unchanged

#: Digest of every output of the paper protocol's seed-5 case at 4 mm, computed with the code before
#: the clinical protocol existed: voxel arrays + geometry + pixel type (not gzip bytes, which
#: depend on zlib), phantom.json without its version line, lesions.json bytes. Update only for an
#: intended change of the default phantom.
DEFAULT_DIGEST = {
    "adc.nii.gz": "9d28170f945cd056", "brain_mask.nii.gz": "802ad7a454b3e9bc", "flair.nii.gz": "95d9a580d4599755",
    "lesion_labels.nii.gz": "f7248e70bdb9a15e", "lesions.json": "5ffbab59f60cc63d", "phantom.json": "22901921535a5e9a",
    "t1.nii.gz": "dbac511587915070", "t1c.nii.gz": "39d2ed7f67d7aaa7", "t1c_low.nii.gz": "0594f9a416e16fab",
    "t1c_vfa.nii.gz": "e6908b0cdf73ee10", "t1c_x4.nii.gz": "c99b783259077db0",
}


def _digest(case: Path) -> dict[str, str]:
    out = {}
    for path in sorted(case.iterdir()):
        h = hashlib.sha256()
        if path.name.endswith(".nii.gz"):
            img = sitk.ReadImage(str(path))
            h.update(repr((img.GetSize(), img.GetSpacing(), img.GetOrigin(), img.GetDirection(),
                           img.GetPixelIDTypeAsString())).encode())
            h.update(np.ascontiguousarray(sitk.GetArrayFromImage(img)).tobytes())
        elif path.name == "phantom.json":
            doc = json.loads(path.read_text())
            doc.pop("generator")
            h.update(json.dumps(doc, sort_keys=True).encode())
        else:
            h.update(path.read_bytes())
        out[path.name] = h.hexdigest()[:16]
    return out


@pytest.fixture(scope="module")
def paper5(tmp_path_factory) -> Path:
    return phantom.generate_case(tmp_path_factory.mktemp("paper") / "case", 5, spacing=4.0).case_dir


def test_default_protocol_unchanged(paper5):
    assert _digest(paper5) == DEFAULT_DIGEST
    params = _params(paper5)
    assert "acquisition_protocol" not in params and "storage" not in params["sequences"]["t1c"]


# ------------------------------------------------------------------------------------------ plans (nominal resolution)

def test_plan_ranges_across_seeds(plans):
    """Nominal clinical grids: 2D 0.5-1 mm x 4-6 mm (+ gap), 3D T1c 0.8-1.2 mm, ADC >= 2 x 2 x 5 mm,
    tilts <= 20 deg, FOV offsets <= 40 mm, FOVs differing between sequences, truncated slabs."""
    seen = {"gap": 0, "tilted": 0, "truncated": 0, "3d": 0, "2d": 0, "sagittal": 0, "max_tilt": 0.0, "max_offset": 0.0}
    for seed, plan in plans.items():
        grids, acq = plan.grids, plan.acquisition
        assert grids["t1c_low"] == grids["t1c"] == grids["t1c_x4"]
        seen[plan.t1c_mode] += 1
        two_d = TWO_D + (("t1c",) if plan.t1c_mode == "2d" else ())
        for name in two_d:
            g = grids[name]
            assert 0.5 - 1e-9 <= g.spacing[0] == g.spacing[1] <= 1.0 + 1e-9, (seed, name, g.spacing)
            thickness = g.profile_mm[2]
            assert 4.0 <= thickness <= 6.0 and g.spacing[2] == pytest.approx(thickness + acq[name]["slice_gap_mm"])
            seen["gap"] += acq[name]["slice_gap_mm"] > 0
        if plan.t1c_mode == "3d":
            assert all(0.8 - 1e-9 <= s <= 1.2 + 1e-9 for s in grids["t1c"].spacing)
        adc = grids["adc"]
        assert adc.spacing[0] >= 2.0 - 1e-9 and adc.spacing[1] >= 2.0 - 1e-9 and adc.profile_mm[2] >= 5.0
        fovs = set()
        for name in ("t1", "flair", "adc", "t1c", "t1c_vfa"):
            g = grids[name]
            d = g.direction_matrix
            np.testing.assert_allclose(d.T @ d, np.eye(3), atol=1e-9)
            assert np.linalg.det(d) == pytest.approx(1.0)
            section = acq[name]["section"]
            seen["sagittal"] += section == "sagittal"
            tilt = pc.tilt_deg(d, section)  # measured on the matrix, not read from the record
            assert tilt <= pc.MAX_TILT_DEG + 1e-6 and tilt == pytest.approx(acq[name]["tilt_deg"], abs=1e-4)
            seen["tilted"] += tilt > 5.0
            seen["max_tilt"] = max(seen["max_tilt"], tilt)
            # FOV centre relative to the head centre, along the grid's own axes, from the geometry.
            centre = g.index_to_physical((np.asarray(g.size) - 1) / 2.0)
            offset = d.T @ (centre - plan.centre_scanner)
            np.testing.assert_allclose(offset, acq[name]["fov_centre_offset_mm"], atol=1e-3)
            assert np.all(np.abs(offset) <= pc.MAX_FOV_OFFSET_MM + 1e-6), (seed, name, offset)
            seen["max_offset"] = max(seen["max_offset"], float(np.abs(offset).max()))
            seen["truncated"] += acq[name]["truncation"] != "none"
            fovs.add(tuple(round(g.size[a] * g.spacing[a]) for a in (0, 1)))
        assert len(fovs) >= 3, (seed, fovs)  # in-plane FOVs differ between sequences
    assert seen["2d"] and seen["3d"] and seen["sagittal"] and seen["gap"] >= 3 and seen["truncated"] >= 3, seen
    assert seen["tilted"] >= 10 and seen["max_tilt"] > 15.0 and seen["max_offset"] > 20.0, seen


def test_plan_truncation_cuts_the_brain(plans):
    """A 'vertex' slab stops below the top of the brain, a 'skull_base' one starts above its bottom."""
    anatomy = phantom.load_template_anatomy(2)
    checked = 0
    for seed, plan in plans.items():
        case_pose = plan.poses["t1c"]  # t1c has no motion: its pose is the case pose
        brain = pc.brain_points_scanner(anatomy, case_pose)
        for name, acq in plan.acquisition.items():
            if acq["truncation"] == "none" or name in ("t1c_low", "t1c_x4"):
                continue
            g = plan.grids[name]
            k_mm = g.physical_to_index(brain)[:, 2] * g.spacing[2]  # along the slice normal, from slice 0
            half = g.profile_mm[2] / 2.0
            if acq["truncation"] == "vertex":  # brain above the top slice's slab
                assert k_mm.max() - ((g.size[2] - 1) * g.spacing[2] + half) > 3.0, (seed, name)
            else:  # brain below the bottom slice's slab
                assert -half - k_mm.min() > 3.0, (seed, name)
            checked += 1
    assert checked >= 3


def test_plan_motion_relative_to_t1c(plans):
    angles, shifts = [], []
    for plan in plans.values():
        assert np.array_equal(plan.poses["t1c_x4"], plan.poses["t1c"])
        for name in ("t1", "flair", "adc", "t1c_vfa", "t1c_low"):
            m = plan.poses[name] @ np.linalg.inv(plan.poses["t1c"])
            np.testing.assert_allclose(m[:3, :3].T @ m[:3, :3], np.eye(3), atol=1e-8)  # rigid
            angle = pc.rotation_angle_deg(m[:3, :3])
            limit = pc.DOSE_SERIES_MOTION[0] if name == "t1c_low" else pc.MOTION_MAX_DEG
            assert angle <= limit + 1e-6
            record = plan.motion[name]
            assert isinstance(record, dict) and record["translation_norm_mm"] <= (
                pc.DOSE_SERIES_MOTION[1] if name == "t1c_low" else pc.MOTION_MAX_MM) + 1e-6
            angles.append(angle)
            shifts.append(record["translation_norm_mm"])
    assert max(angles) > 7.0 and max(shifts) > 10.0


def test_t1c_acquisition_option():
    for mode in ("2d", "3d"):
        plan = phantom.plan_clinical_case(SEED, resolution=2, clinical=pc.ClinicalOptions(t1c_acquisition=mode))
        assert plan.t1c_mode == mode
        assert (plan.grids["t1c"].spacing[2] >= 4.0) == (mode == "2d")
    sized = phantom.plan_clinical_case(SEED, spacing=4.0, size=(40, 44, 30), resolution=2)
    assert sized.grids["t1c"].size == sized.grids["t1c_x4"].size == (40, 44, 30)
    with pytest.raises(ValueError, match="t1c-acquisition"):
        pc.ClinicalOptions(t1c_acquisition="4d")
    with pytest.raises(ValueError, match="--protocol"):
        phantom.generate_case("/nonexistent", 0, protocol="hospital")
    with pytest.raises(ValueError, match="need --protocol clinical"):
        phantom.generate_case("/nonexistent", 0, clinical=pc.ClinicalOptions())


# ------------------------------------------------------------------------------------------ written case

def test_written_grids_match_plan(cases):
    case = cases["clean"]
    params = _params(case)
    assert params["acquisition_protocol"] == "clinical" and params["clinical"]["t1c_acquisition"] == "2d"
    plan = phantom.plan_clinical_case(SEED, spacing=SPACING)
    for name, entry in params["sequences"].items():
        img = _read(case, name)
        grid = plan.grids[name]
        assert img.GetSize() == grid.size
        np.testing.assert_allclose(img.GetSpacing(), grid.spacing, atol=1e-5)
        np.testing.assert_allclose(img.GetOrigin(), grid.origin, atol=1e-3)
        np.testing.assert_allclose(_direction(img), grid.direction_matrix, atol=1e-6)  # NIfTI keeps the oblique axes
        np.testing.assert_allclose(np.ravel(entry["grid"]["direction"]), grid.direction, atol=1e-9)
        np.testing.assert_allclose(entry["world_to_native_lps"], plan.poses[name], atol=1e-8)
        assert min(img.GetSpacing()) >= SPACING - 1e-6  # --spacing floors every voxel dimension
    for name in ("t1c_low", "t1c_x4", "brain_mask", "lesion_labels"):
        img, t1c = _read(case, name), _read(case, "t1c")
        assert img.GetSize() == t1c.GetSize() and img.GetOrigin() == t1c.GetOrigin()
        assert img.GetDirection() == t1c.GetDirection()
    assert params["sequences"]["flair"]["acquisition"]["tilt_deg"] > 15  # this seed's FLAIR is oblique
    # Only the ADC depends on the distortion option: every other output is the same bytes.
    for path in sorted(case.iterdir()):
        same = path.read_bytes() == (cases["undistorted"] / path.name).read_bytes()
        assert same == (path.name not in ("adc.nii.gz", "phantom.json")), path.name


def _enhancement_centroid(case: Path, lesion_id: int) -> np.ndarray:
    """Physical centroid of a lesion's enhancement (t1c_x4 - t1c: same grid and pose) on T1c."""
    labels = sitk.GetArrayFromImage(_read(case, "lesion_labels"))
    enhancement = np.clip(phantom.read_signal(case, "t1c_x4") - phantom.read_signal(case, "t1c"), 0.0, None)
    weights = enhancement * ndimage.binary_dilation(labels == lesion_id, iterations=1)
    k, j, i = np.nonzero(weights)
    w = weights[k, j, i]
    index = [float((w * v).sum() / w.sum()) for v in (i, j, k)]
    return np.asarray(_read(case, "t1c").TransformContinuousIndexToPhysicalPoint(index))


def _bright_centroid_index(case: Path, name: str, centre: np.ndarray, radius_mm: float, threshold: float) -> np.ndarray:
    """Continuous index of the centroid of (signal - threshold)+ within ``radius_mm`` of ``centre``."""
    img = _read(case, name)
    signal = phantom.read_signal(case, name)
    k, j, i = np.meshgrid(*(np.arange(n) for n in signal.shape), indexing="ij")
    index = np.stack([i, j, k], axis=-1).astype(np.float64)
    physical = np.asarray(img.GetOrigin()) + (index * np.asarray(img.GetSpacing())) @ _direction(img).T
    weights = np.clip(signal - threshold, 0.0, None) * (np.linalg.norm(physical - centre, axis=-1) < radius_mm)
    assert weights.sum() > 0, f"no bright voxel near the lesion in {name}"
    return (weights[..., None] * index).sum(axis=(0, 1, 2)) / weights.sum()


def _model(params: dict) -> phantom.PhysicsModel:
    gd = params["gadolinium"]
    return phantom.PhysicsModel(params["tissues"], phantom.mr.table1_protocols(1.5), 1.5, params["t2star_over_t2"],
                                gd["plasma_conc_mmol_l_at_standard_dose"], gd["plexus_conc_mmol_l_at_standard_dose"])


def test_truth_maps_t1c_lesion_into_flair_within_half_a_voxel(cases):
    """A lesion's centre measured in T1c (enhancement centroid), mapped by the true transform, falls
    within half a FLAIR voxel (per native axis: 3 x 3 x 5.5 mm, 20 deg oblique) of the centroid of its
    FLAIR hyperintensity measured in the FLAIR image.

    Oedema spreads along white matter and stops at the cortex, so the hyperintensity of a lesion
    near the cortex is lopsided (its centroid is off by up to ~1 voxel whatever the geometry): the
    check takes the lesions whose oedema lies inside the brain (depth from brain_mask > oedema
    radius + 8 mm).
    """
    case = cases["clean"]
    params = _params(case)
    flair_signal = _model(params).per_tissue("flair", 0.0, black_blood=True)
    threshold = (flair_signal["gm"] + flair_signal["oedema"]) / 2.0  # oedema, not grey matter
    truth = phantom.true_rigid_to_t1c(case, "flair")
    flair = _read(case, "flair")
    mask = _read(case, "brain_mask")
    depth = sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(mask, insideIsPositive=True, squaredDistance=False,
                                                                useImageSpacing=True))
    checked = 0
    for lesion in params["lesions_truth"]:
        p_t1c = _enhancement_centroid(case, lesion["id"])
        idx = np.rint(mask.TransformPhysicalPointToContinuousIndex(p_t1c.tolist())).astype(int)
        oedema_radius = lesion["semi_axes_mm"][0] * lesion["oedema_scale"]
        if depth[idx[2], idx[1], idx[0]] < oedema_radius + 8.0:
            continue
        predicted = phantom.apply_affine(truth, p_t1c)
        measured = _bright_centroid_index(case, "flair", predicted, oedema_radius + 2 * max(flair.GetSpacing()), threshold)
        error = np.asarray(flair.TransformPhysicalPointToContinuousIndex(predicted.tolist())) - measured
        print(f"\nlesion {lesion['id']}: T1c -> FLAIR error {np.round(error, 2)} voxels (i, j, k)")
        assert np.all(np.abs(error) <= 0.5), error
        checked += 1
    assert checked >= 1, "no deep lesion in this case: pick another SEED"


def test_truth_maps_t1c_lesions_into_t1c_vfa_within_half_a_voxel(cases):
    """Same feature on both sides: the enhancing lesion (T1c enhancement centroid vs T1c-vfa's
    bright lesion), every lesion of >= 12 label voxels, T1c-vfa a 13 deg oblique sagittal slab
    that moved 6 deg / 13 mm."""
    case = cases["clean"]
    params = _params(case)
    vfa_signal = _model(params).per_tissue("t1c_vfa", 0.1, black_blood=True)
    threshold = 1.05 * max(vfa_signal["wm"], vfa_signal["gm"], vfa_signal["csf"])
    truth = phantom.true_rigid_to_t1c(case, "t1c_vfa")
    vfa = _read(case, "t1c_vfa")
    labels = sitk.GetArrayFromImage(_read(case, "lesion_labels"))
    errors = []
    for lesion in params["lesions_truth"]:
        if (labels == lesion["id"]).sum() < 12:
            continue
        predicted = phantom.apply_affine(truth, _enhancement_centroid(case, lesion["id"]))
        measured = _bright_centroid_index(case, "t1c_vfa", predicted,
                                          lesion["semi_axes_mm"][0] + 2 * max(vfa.GetSpacing()), threshold)
        errors.append(np.asarray(vfa.TransformPhysicalPointToContinuousIndex(predicted.tolist())) - measured)
    print(f"\nT1c -> T1c-vfa lesion errors (voxels): {np.round(errors, 2).tolist()}")
    assert len(errors) >= 2 and np.all(np.abs(errors) <= 0.5)


def test_truth_centres_and_lesions_json_on_oblique_grid(cases):
    case = cases["clean"]
    params = _params(case)
    labels_img = _read(case, "lesion_labels")
    labels = sitk.GetArrayFromImage(labels_img)
    a_t1c = np.asarray(params["sequences"]["t1c"]["world_to_native_lps"])
    assert pc.tilt_deg(_direction(labels_img), "axial") > 5
    for lesion in params["lesions_truth"]:
        idx = labels_img.TransformPhysicalPointToIndex(phantom.apply_affine(a_t1c, np.asarray(lesion["centre_lps_world"])).tolist())
        assert labels[idx[2], idx[1], idx[0]] == lesion["id"]
    entries = json.loads((case / "lesions.json").read_text())["lesions"]
    assert len(entries) == len(params["lesions_truth"])
    for entry in entries:
        x, y, z = entry["center_ras"]
        idx = labels_img.TransformPhysicalPointToIndex((-x, -y, z))
        assert labels[idx[2], idx[1], idx[0]] == entry["id"]
        for key in ("long_axis_ras", "short_axis_ras"):  # drawn on one acquired (oblique) slice
            ends = [labels_img.TransformPhysicalPointToContinuousIndex((-p[0], -p[1], p[2])) for p in entry[key]]
            assert ends[0][2] == pytest.approx(ends[1][2], abs=1e-3)
            assert np.linalg.norm(np.subtract(*entry[key])) == pytest.approx(entry[key.replace("axis_ras", "mm")], abs=0.01)


def test_registration_error_helpers(cases):
    case = cases["clean"]
    truth = phantom.true_rigid_to_t1c(case, "flair")
    np.testing.assert_allclose(truth[:3, :3].T @ truth[:3, :3], np.eye(3), atol=1e-12)  # rigid
    assert phantom.registration_error_mm(case, "flair", truth).max_mm < 1e-9
    identity = phantom.registration_error_mm(case, "flair", np.eye(4))
    assert identity.mean_mm > 2.0 and identity.n_points == int(sitk.GetArrayFromImage(_read(case, "brain_mask")).sum())
    shifted = truth.copy()
    shifted[:3, 3] += [1.2, -1.6, 0.0]  # 2 mm everywhere
    err = phantom.registration_error_mm(case, "flair", shifted)
    assert err.mean_mm == pytest.approx(2.0) and err.max_mm == pytest.approx(2.0)
    euler = sitk.Euler3DTransform()
    euler.SetMatrix(truth[:3, :3].ravel().tolist())
    euler.SetTranslation(truth[:3, 3].tolist())
    assert phantom.registration_error_mm(case, "flair", euler).max_mm < 1e-6
    rotated = sitk.Euler3DTransform(euler)  # a 2 deg rotation about the T1c brain centre: max > mean
    points = phantom.brain_points_t1c(case)
    tilt = sitk.Euler3DTransform(points.mean(axis=0).tolist(), np.deg2rad(2.0), 0.0, 0.0)
    err = phantom.registration_error_mm(case, "flair", sitk.CompositeTransform([rotated, tilt]))
    assert 0.5 < err.mean_mm < err.max_mm < 5.0
    # A non-linear transform (truth after a random <= 1 mm per axis displacement field): point by point.
    field = sitk.GetImageFromArray(np.random.default_rng(1).uniform(-1.0, 1.0, (8, 8, 8, 3)), isVector=True)
    field.SetOrigin((points.min(axis=0) - 60.0).tolist())
    field.SetSpacing((40.0,) * 3)
    warped = sitk.CompositeTransform([euler, sitk.DisplacementFieldTransform(field)])
    result = phantom.registration_error_mm(case, "flair", warped, max_points=500)
    assert 0.1 < result.mean_mm < result.max_mm <= np.sqrt(3.0) and 400 < result.n_points <= 500
    # The truth aligns the images: T1 resampled onto T1c correlates with it; as they lie, it does not.
    brain = sitk.GetArrayFromImage(_read(case, "brain_mask")) > 0
    t1c = sitk.GetArrayFromImage(sitk.Cast(_read(case, "t1c"), sitk.sitkFloat32))
    t1_truth = phantom.true_rigid_to_t1c(case, "t1")
    tx = sitk.AffineTransform(3)
    tx.SetMatrix(t1_truth[:3, :3].ravel().tolist())
    tx.SetTranslation(t1_truth[:3, 3].tolist())
    t1 = sitk.Cast(_read(case, "t1"), sitk.sitkFloat32)
    good = sitk.GetArrayFromImage(sitk.Resample(t1, _read(case, "t1c"), tx, sitk.sitkLinear, -5000.0))
    bad = sitk.GetArrayFromImage(sitk.Resample(t1, _read(case, "t1c"), sitk.Transform(), sitk.sitkLinear, -5000.0))
    r_good = np.corrcoef(good[brain], t1c[brain])[0, 1]
    r_bad = np.corrcoef(bad[brain], t1c[brain])[0, 1]
    assert r_good > 0.85 and r_good > r_bad + 0.1, (r_good, r_bad)
    with pytest.raises(KeyError, match="dwi"):
        phantom.true_rigid_to_t1c(case, "dwi")


# ------------------------------------------------------------------------------------------ storage

def test_storage_round_trip(cases):
    """scl_slope/scl_inter, offsets and dtypes: SimpleITK, nibabel and the pipeline's reader all
    read physical values, and read_signal undoes gain and offset."""
    from ContrastAmplifierLib.imageio import read_image

    case = cases["clean"]
    params = _params(case)
    kinds = {name: entry["storage"]["kind"] for name, entry in params["sequences"].items()}
    assert {"int16_offset", "int16_scaled"} <= set(kinds.values()), kinds
    dtypes = {"int16": np.int16, "uint16": np.uint16, "float32": np.float32}
    for name, entry in params["sequences"].items():
        storage = entry["storage"]
        nifti = nib.load(str(case / f"{name}.nii.gz"))
        raw = np.asanyarray(nifti.dataobj.get_unscaled())
        assert raw.dtype == dtypes[storage["dtype"]], name
        slope, inter = storage["scl_slope"], storage["scl_inter"]
        if kinds[name] == "int16_scaled" or (name == "adc" and kinds[name] != "int16"):
            assert slope != 1.0 or inter != 0.0
        if slope != 1.0 or inter != 0.0:
            assert float(nifti.dataobj.slope) == slope and float(nifti.dataobj.inter) == inter
        physical = raw.astype(np.float64) * slope + inter  # (x, y, z)
        by_nibabel = np.asarray(nifti.get_fdata())
        by_sitk = sitk.GetArrayFromImage(sitk.ReadImage(str(case / f"{name}.nii.gz"))).astype(np.float64).T
        by_reader = sitk.GetArrayFromImage(read_image(case / f"{name}.nii.gz", name)).astype(np.float64).T
        tol = 1e-5 * max(1.0, float(np.abs(physical).max()))
        np.testing.assert_allclose(by_nibabel, physical, atol=tol)
        np.testing.assert_allclose(by_sitk, physical, atol=tol)
        np.testing.assert_allclose(by_reader, physical, atol=tol)
    # t1 carries a -1801 offset: negative background, and read_signal gives 0 there again.
    t1 = sitk.GetArrayFromImage(_read(case, "t1")).astype(np.float64)
    assert params["sequences"]["t1"]["storage"]["offset"] < -500 and np.median(t1[0]) < -500
    assert np.abs(np.median(phantom.read_signal(case, "t1")[0])) < 1e-3
    # t1c and t1c_x4 (same grid and pose, stored differently): the same signal wherever no gadolinium
    # went, to within each one's rounding step (scl_slope / gain).
    sig = {n: phantom.read_signal(case, n) for n in ("t1c", "t1c_x4")}
    step = sum(params["sequences"][n]["storage"]["scl_slope"] / params["sequences"][n]["storage"]["gain"] for n in sig)
    brain = sitk.GetArrayFromImage(_read(case, "brain_mask")) > 0
    diff = np.abs(sig["t1c_x4"] - sig["t1c"])[brain]
    assert np.median(diff) <= step and (diff <= step).mean() > 0.8
    wm = _model(params).per_tissue("t1c", 0.1)["wm"]
    assert 0.5 * wm < np.median(sig["t1c"][brain]) < 2.0 * wm  # the phantom's signal units again
    adc = phantom.read_signal(case, "adc")
    assert 0.5e-3 < np.median(adc[adc > 0]) < 1.5e-3  # mm^2/s whatever the stored unit


@pytest.mark.parametrize("kind", ["int16_scaled", "uint16", "float32", "int16_offset"])
def test_encode_and_write_round_trip(tmp_path, kind):
    rng = np.random.default_rng(0)
    physical = (rng.normal(300.0, 150.0, (5, 6, 7)) - (0.0 if kind == "uint16" else 1500.0)).astype(np.float32)
    storage = {"kind": kind, "dtype": {"uint16": "uint16", "float32": "float32"}.get(kind, "int16"), "scl_slope": 1.0,
               "scl_inter": -1024.0 if kind == "int16_scaled" else 0.0, "slope_from_data": kind == "int16_scaled",
               "scaled_target_max": 3000.0, "gain": 1.0, "offset": 0.0}
    if kind == "uint16":
        physical = np.abs(physical)
    stored, record = pc.encode(physical, storage)
    grid = phantom.NativeGrid((7, 6, 5), (1.0, 1.0, 5.0), (1.0, 2.0, 3.0),
                              tuple(pc.axis_angle_matrix((1.0, 0.0, 0.0), 15.0).ravel()))
    path = tmp_path / "x.nii.gz"
    pc.write_stored(phantom.native_image(stored, grid), path, record)
    step = record["scl_slope"] / 2 + 1e-3 if kind != "float32" else 1e-4
    read = sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.float64)
    np.testing.assert_allclose(read, physical, atol=step)
    np.testing.assert_allclose(np.asarray(nib.load(str(path)).get_fdata()).T, physical, atol=step)
    if kind == "int16_scaled":
        assert np.abs(stored).max() == pytest.approx(3000, abs=1) and record["scl_slope"] != 1.0
        assert (read < 0).any()
    np.testing.assert_allclose(_direction(sitk.ReadImage(str(path))), grid.direction_matrix, atol=1e-6)
    again = tmp_path / "y.nii.gz"
    pc.write_stored(phantom.native_image(stored, grid), again, record)
    assert again.read_bytes() == path.read_bytes()  # deterministic gzip (no time stamp)


# ------------------------------------------------------------------------------------------ ADC

def test_adc_distortion_bounded_and_recorded(plans):
    anatomy = phantom.load_template_anatomy(2)
    for seed, plan in plans.items():
        d, grid, pose = plan.distortion, plan.grids["adc"], plan.poses["adc"]
        assert d["applied"] and d["phase_encoding_axis"] == "j"
        np.testing.assert_allclose(d["phase_encoding_direction_lps"], grid.direction_matrix[:, 1], atol=1e-9)
        brain = pc.brain_points_scanner(anatomy, pose)  # the brain in the ADC's native frame (rigid truth)
        u = pc.distortion_mm(d, brain)
        assert np.abs(u).max() <= 3.0 + 1e-9 and np.abs(u).max() >= 0.9, seed
        corners = grid.index_to_physical(np.array([[i, j, k] for i in (0, grid.size[0] - 1)
                                                   for j in (0, grid.size[1] - 1) for k in (0, grid.size[2] - 1)]))
        assert np.abs(pc.distortion_mm(d, corners)).max() <= 3.0 + 1e-9


def test_adc_distortion_in_the_image_is_along_the_phase_axis(cases):
    """Distorted vs undistorted noise-free ADC of the same case: a linearised fit of the difference
    to (field x gradient) along each native axis finds the recorded field along j (phase) only."""
    distorted, undistorted = cases["clean"], cases["undistorted"]
    d = _params(distorted)["sequences"]["adc"]["distortion"]
    img = _read(distorted, "adc")
    a = phantom.read_signal(distorted, "adc")
    b = phantom.read_signal(undistorted, "adc")
    assert np.abs(a - b).max() > 1e-4
    sp = np.asarray(img.GetSpacing())
    k, j, i = np.meshgrid(*(np.arange(n) for n in a.shape), indexing="ij")
    points = np.asarray(img.GetOrigin()) + (np.stack([i, j, k], axis=-1) * sp) @ _direction(img).T
    u = pc.distortion_mm(d, points)
    inside = ndimage.binary_erosion((a > 0) & (b > 0), iterations=1)
    gz, gy, gx = np.gradient((a + b) / 2.0, sp[2], sp[1], sp[0])
    design = np.stack([gx[inside] * u[inside], gy[inside] * u[inside], gz[inside] * u[inside]], axis=1)
    coef = np.linalg.lstsq(design, (a - b)[inside], rcond=None)[0]
    print(f"\nADC distortion fit (read, phase, slice): {np.round(coef, 3)}; max |u| {np.abs(u[inside]).max():.2f} mm")
    assert abs(coef[1] - 1.0) < 0.3 and abs(coef[0]) < 0.15 and abs(coef[2]) < 0.15
    assert 1.0 < np.abs(u[inside]).max() <= 3.0
    np.testing.assert_allclose(phantom.adc_distortion_mm(distorted, points[inside]), u[inside])


def test_adc_is_epi_like_and_noisy(cases):
    params = _params(cases["noisy"])
    adc = params["sequences"]["adc"]
    assert adc["acquisition"]["mode"] == "epi" and adc["acquisition"]["nominal_in_plane_mm"] >= 2.0
    assert adc["acquisition"]["nominal_slice_thickness_mm"] >= 5.0
    assert pc.ADC_SNR[0] <= params["snr_white_matter"]["dwi"] <= pc.ADC_SNR[1]
    noisy, clean = phantom.read_signal(cases["noisy"], "adc"), phantom.read_signal(cases["clean"], "adc")
    inside = ndimage.binary_erosion((clean > 0.5e-3) & (clean < 1.0e-3) & (noisy > 0), iterations=1)
    noise = noisy[inside] - clean[inside]
    spread = 1.4826 * np.median(np.abs(noise - np.median(noise)))
    print(f"\nADC noise in parenchyma: {spread / np.median(clean[inside]):.0%} of the ADC")
    assert spread / np.median(clean[inside]) > 0.08


# ------------------------------------------------------------------------------------------ CLI

def test_cli_clinical_and_same_patient(tmp_path, paper5):
    from typer.testing import CliRunner

    from ContrastAmplifierLib.cli import app

    result = CliRunner().invoke(app, ["phantom", str(tmp_path), "--seed", "5", "--spacing", "6", "--protocol", "clinical",
                                      "--t1c-acquisition", "3d", "--progress", "none"])
    assert result.exit_code == 0, result.output
    params = _params(tmp_path / "case_000")
    assert params["acquisition_protocol"] == "clinical" and params["clinical"]["t1c_acquisition"] == "3d"
    assert _read(tmp_path / "case_000", "t1c").GetSpacing() == pytest.approx((6.0, 6.0, 6.0))
    paper = _params(paper5)  # the same seed is the same patient, acquired differently
    assert params["tissues"] == paper["tissues"] and params["pose"]["case_pose"] == paper["pose"]["case_pose"]
    for args, message in ((["--t1c-acquisition", "3d"], "need --protocol clinical"), (["--protocol", "x"], "--protocol"),
                          (["--protocol", "clinical", "--t1c-acquisition", "4d"], "t1c-acquisition")):
        bad = CliRunner().invoke(app, ["phantom", str(tmp_path / "x"), "--spacing", "6", "--progress", "none", *args])
        assert bad.exit_code == 2 and message in bad.output, bad.output


# ------------------------------------------------------------------------------------------ resampling

def test_general_resampling_matches_the_paper_path():
    """The oblique/gap/warp code path gives the paper protocol's result on a plain grid."""
    from ContrastAmplifierLib.phantom_acquisition import _bias_field_oblique, resample_to_native, world_image

    grid = phantom.NativeGrid((30, 40, 20), (2.0, 2.5, 5.0), (-30.0, -50.0, -40.0))
    world = world_image(np.random.default_rng(1).random((60, 70, 50)).astype(np.float32), (-60.0, -70.0, -60.0), 2.0)
    pose = np.eye(4)
    pose[:3, 3] = [1.0, -2.0, 0.5]
    plain = resample_to_native(world, grid, pose, sub=(1, 2, 3))
    general = resample_to_native(world, grid, pose, sub=(1, 2, 3), native_warp=sitk.Transform())
    np.testing.assert_allclose(general, plain, atol=1e-6)
    centre = np.array([1.0, 2.0, 3.0])
    coefficients = np.random.default_rng(0).normal(0.0, 0.07, 9)
    np.testing.assert_allclose(phantom.bias_field(grid, centre, coefficients),
                               _bias_field_oblique(grid, centre, coefficients), rtol=1e-6)


def test_oblique_grid_with_gap_samples_the_right_points():
    """A linear world image f(p) = g . p + 5 sampled on a 17 deg oblique grid with a slice gap and a
    moved pose: every voxel holds f at inverse(pose) of its centre (averaging a linear function over
    the slab profile keeps its centre value), so origin, direction, gap and pose are all exact."""
    from ContrastAmplifierLib.phantom_acquisition import resample_to_native, world_image

    g = np.array([0.01, -0.02, 0.03])
    n = 80
    origin = np.array([-80.0, -80.0, -80.0])
    k, j, i = np.meshgrid(*(np.arange(n, dtype=np.float64),) * 3, indexing="ij")
    values = (origin[0] + 2 * i) * g[0] + (origin[1] + 2 * j) * g[1] + (origin[2] + 2 * k) * g[2] + 5.0
    world = world_image(values.astype(np.float32), origin, 2.0)
    direction = pc.axis_angle_matrix((0.9, 0.3, 0.0), 17.0) @ pc.axis_angle_matrix((0.0, 0.0, 1.0), 5.0)
    grid = phantom.NativeGrid((20, 22, 9), (3.0, 3.0, 7.0), (-25.0, -30.0, -28.0),
                              tuple(direction.ravel()), slice_thickness=5.0)
    pose = np.eye(4)
    pose[:3, :3] = pc.axis_angle_matrix((0.0, 1.0, 0.0), 6.0)
    pose[:3, 3] = [4.0, -3.0, 2.0]
    sampled = resample_to_native(world, grid, pose, sub=(2, 2, 3))
    kk, jj, ii = np.meshgrid(*(np.arange(s) for s in grid.size[::-1]), indexing="ij")
    centres = grid.index_to_physical(np.stack([ii, jj, kk], axis=-1).astype(np.float64))
    expected = phantom.apply_affine(np.linalg.inv(pose), centres) @ g + 5.0
    np.testing.assert_allclose(sampled, expected, atol=1e-4)
    assert grid.to_json()["slice_thickness_mm"] == 5.0 and grid.to_json()["slice_gap_mm"] == 2.0
    np.testing.assert_allclose(grid.physical_to_index(centres), np.stack([ii, jj, kk], axis=-1), atol=1e-9)
