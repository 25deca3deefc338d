"""End-to-end preprocessing on a case with known poses (registration round trip, to_native, outputs).

HD-BET is exercised in test_skullstrip.py; here the case's own brain mask is passed in so the
registration and resampling are measured without the 20 s network.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from ContrastAmplifierLib.bench import affine_from_params, synthetic_head_case
from ContrastAmplifierLib.imageio import ImageValidationError
from ContrastAmplifierLib.preprocessing import Geometry, PreprocessedCase, preprocess_case, preprocess_case_dir
from ContrastAmplifierCommon.progress import CancelToken, Cancelled
from ContrastAmplifierLib.registration import mask_points_mm, mean_point_error_mm

SPACING = 2.0
GEOMETRY = Geometry(spacing=(SPACING,) * 3, crop_size=(80, 96, 80), percentiles={"t1c": (-2.0, 4.0)})


@pytest.fixture(scope="module")
def case_dir(tmp_path_factory):
    return synthetic_head_case(tmp_path_factory.mktemp("case") / "case_000", spacing=SPACING, seed=3)


@pytest.fixture(scope="module")
def truth(case_dir):
    return json.loads((case_dir / "truth.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def case(case_dir):
    inputs = {m: case_dir / f"{m}.nii.gz" for m in ("t1", "flair", "adc", "t1c")}
    return preprocess_case(inputs, GEOMETRY, brain_mask=case_dir / "brain_mask.nii.gz")


def test_round_trip_error_below_one_voxel(case, truth, case_dir):
    native_mask = sitk.ReadImage(str(case_dir / "brain_mask.nii.gz"))
    points = mask_points_mm(native_mask, 4000)  # native T1c brain
    true_atlas_to_t1c = affine_from_params(truth["atlas_to_t1c"])
    # native -> atlas with the truth, back to native with the estimate
    atlas = [true_atlas_to_t1c.GetInverse().TransformPoint(tuple(p)) for p in points]
    back = np.array([case.atlas_to_t1c.TransformPoint(a) for a in atlas])
    error = float(np.linalg.norm(back - points, axis=1).mean())
    print(f"\nT1c native -> atlas -> native: mean {error:.3f} mm over the brain ({SPACING} mm voxels)")
    assert error < SPACING
    for name in ("t1", "flair", "adc"):
        err = mean_point_error_mm(case.t1c_to[name], affine_from_params(truth[f"t1c_to_{name}"]), points[:1000])
        print(f"rigid {name} -> T1c: mean {err:.3f} mm")
        assert err < SPACING


def test_to_native_maps_atlas_coordinates_back(case, truth, case_dir):
    # Fill the crop grid with its own atlas x/y/z coordinates, map to native with to_native, and
    # compare with the true atlas coordinates of each native brain voxel (linear fields: exact
    # interpolation, so this measures the mapping only).
    grid = case.brain_mask
    zyx = np.indices(sitk.GetArrayViewFromImage(grid).shape).reshape(3, -1)[::-1].T.astype(float)
    direction = np.array(grid.GetDirection()).reshape(3, 3)
    coords = np.array(grid.GetOrigin()) + (zyx * np.array(grid.GetSpacing())) @ direction.T
    shape = sitk.GetArrayViewFromImage(grid).shape
    native = [sitk.GetArrayFromImage(case.to_native(coords[:, i].reshape(shape).astype(np.float32))) for i in range(3)]
    t1c = sitk.ReadImage(str(case_dir / "t1c.nii.gz"))
    assert native[0].shape == sitk.GetArrayViewFromImage(t1c).shape
    out = case.to_native(case.arrays["t1c"])
    assert out.GetOrigin() == t1c.GetOrigin() and out.GetSpacing() == t1c.GetSpacing()
    assert out.GetDirection() == t1c.GetDirection()
    mask = sitk.ReadImage(str(case_dir / "brain_mask.nii.gz"))
    idx = np.argwhere(sitk.GetArrayViewFromImage(mask) > 0)[::50]
    got = np.stack([n[tuple(idx.T)] for n in native], axis=1)
    points = np.array([t1c.TransformIndexToPhysicalPoint([int(i) for i in v[::-1]]) for v in idx])
    true_inv = affine_from_params(truth["atlas_to_t1c"]).GetInverse()
    expected = np.array([true_inv.TransformPoint(tuple(p)) for p in points])
    error = float(np.linalg.norm(got - expected, axis=1).mean())
    print(f"\nto_native: mean {error:.3f} mm over the native brain")
    assert error < SPACING


def test_outputs_are_normalised_on_the_crop_grid(case):
    mask = case.mask_array
    assert mask.shape == (80, 96, 80)
    for name, array in case.arrays.items():
        assert array.min() >= 0.0 and array.max() <= 1.0, name
        assert np.all(array[~mask] == 0.0)
        z = case.zscores[name][mask]
        assert z.mean() == pytest.approx(0.0, abs=1e-3) and z.std() == pytest.approx(1.0, abs=1e-3)
    z = case.zscores["t1c"][mask]
    np.testing.assert_allclose(case.arrays["t1c"][mask], (np.clip(z, -2, 4) + 2) / 6, atol=1e-6)
    assert case.brain_mask.GetSpacing() == (2.0, 2.0, 2.0)
    assert set(case.timings_s) >= {"read", "skull_strip", "register_affine", "register_rigid", "total"}


def test_case_dir_writes_everything_and_reloads(case_dir, tmp_path):
    stages = []
    out = tmp_path / "out"
    result = preprocess_case_dir(case_dir, out, GEOMETRY, qc=True, brain_mask=case_dir / "brain_mask.nii.gz",
                                 progress=lambda s, f, m="": stages.append((s, f)))
    names = {p.name for p in out.iterdir()}
    assert names >= {"t1.nii.gz", "flair.nii.gz", "adc.nii.gz", "t1c.nii.gz", "brain_mask.nii.gz",
                     "atlas_to_t1c.tfm", "t1c_to_t1.tfm", "t1c_to_flair.tfm", "t1c_to_adc.tfm", "preprocess.json", "qc.png"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    meta = json.loads((out / "preprocess.json").read_text(encoding="utf-8"))
    assert meta["geometry"]["crop_size"] == [80, 96, 80] and meta["timings_s"]["total"] > 0
    assert result.timings_s["total"] >= result.timings_s["registration"]
    fractions = [f for _, f in stages]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert {"read", "register", "resample", "write", "done"} <= {s for s, _ in stages}
    written = sitk.ReadImage(str(out / "t1c.nii.gz"))
    np.testing.assert_allclose(written.GetOrigin(), result.brain_mask.GetOrigin(), atol=1e-4)
    loaded = PreprocessedCase.load(out)
    np.testing.assert_allclose(loaded.atlas_to_t1c.GetParameters(), result.atlas_to_t1c.GetParameters(), atol=1e-6)
    assert loaded.to_native(loaded.arrays["t1c"]).GetSize() == result.native_grid.size


def test_cancel_leaves_nothing(case_dir, tmp_path):
    token = CancelToken()

    def progress(stage, fraction, message=""):
        if stage == "register":
            token.cancel()

    with pytest.raises(Cancelled):
        preprocess_case_dir(case_dir, tmp_path / "out", GEOMETRY, brain_mask=case_dir / "brain_mask.nii.gz",
                            progress=progress, cancel=token)
    assert list(tmp_path.iterdir()) == []


def test_missing_modality_and_bad_input(case_dir, tmp_path):
    for name in ("t1", "flair", "t1c"):
        (tmp_path / f"{name}.nii.gz").symlink_to(case_dir / f"{name}.nii.gz")
    with pytest.raises(ImageValidationError, match="ADC is missing"):
        preprocess_case_dir(tmp_path, tmp_path / "out", GEOMETRY)
    flat = sitk.Image([64, 64, 1], sitk.sitkFloat32) + 1.0
    with pytest.raises(ImageValidationError, match="ADC is 2D"):
        preprocess_case({"t1c": case_dir / "t1c.nii.gz", "adc": flat}, GEOMETRY)
    with pytest.raises(ImageValidationError, match="no T1c given"):
        preprocess_case({"t1": case_dir / "t1.nii.gz"}, GEOMETRY)


def test_cli_preprocess(case_dir, tmp_path):
    from typer.testing import CliRunner

    from ContrastAmplifierLib.cli import app

    result = CliRunner().invoke(app, ["preprocess", str(tmp_path / "missing"), str(tmp_path / "out")])
    assert result.exit_code == 2 and "case folder not found" in result.output


def test_phantom_round_trip_with_known_poses(tmp_path_factory):
    """Issue 3: native -> atlas -> native mean error over the brain below one voxel, on the phantom."""
    from ContrastAmplifierLib.phantom import generate_cohort

    case_dir = generate_cohort(tmp_path_factory.mktemp("phantom"), cases=1, seed=7, spacing=SPACING)[0]
    meta = json.loads((case_dir / "phantom.json").read_text(encoding="utf-8"))
    world_to_native = {k: np.array(v["world_to_native_lps"]) for k, v in meta["sequences"].items()}
    inputs = {m: case_dir / f"{m}.nii.gz" for m in ("t1", "flair", "adc", "t1c")}
    case = preprocess_case(inputs, GEOMETRY, brain_mask=case_dir / "brain_mask.nii.gz")
    native_mask = sitk.ReadImage(str(case_dir / "brain_mask.nii.gz"))
    points = mask_points_mm(native_mask, 3000)
    a_t1c = world_to_native["t1c"]
    world = (np.linalg.inv(a_t1c) @ np.c_[points, np.ones(len(points))].T).T[:, :3]  # truth: native -> atlas
    back = np.array([case.atlas_to_t1c.TransformPoint(tuple(p)) for p in world])  # estimate: atlas -> native
    error = float(np.linalg.norm(back - points, axis=1).mean())
    print(f"\nphantom T1c native -> atlas -> native: mean {error:.3f} mm ({SPACING} mm voxels)")
    assert error < SPACING
    for name in ("t1", "flair", "adc"):
        truth = (world_to_native[name] @ np.linalg.inv(a_t1c) @ np.c_[points, np.ones(len(points))].T).T[:, :3]
        est = np.array([case.t1c_to[name].TransformPoint(tuple(p)) for p in points])
        err = float(np.linalg.norm(est - truth, axis=1).mean())
        print(f"phantom rigid {name} -> T1c: mean {err:.3f} mm")
        assert err < SPACING


# -- outputs never destroy what the user had (issue "Nothing lost, nothing silent") -------------

def _snapshot(folder):
    """Every file under ``folder`` with its bytes (to prove nothing was touched)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _preprocess_cli(*args):
    from typer.testing import CliRunner

    from ContrastAmplifierLib.cli import app

    return CliRunner().invoke(app, ["preprocess", *map(str, args), "--progress", "json"])


def test_preprocess_into_an_existing_folder_writes_only_its_own_files(case_dir, tmp_path):
    import os
    import stat

    from ContrastAmplifierCommon.outputs import OutputPathError
    from ContrastAmplifierLib.preprocessing import preprocess_output_names

    out = tmp_path / "results"
    (out / "earlier").mkdir(parents=True)
    (out / "notes.txt").write_text("my notes", encoding="utf-8")
    (out / "earlier" / "t1c.nii.gz").write_bytes(b"an older analysis")
    theirs = _snapshot(out)
    mode = stat.S_IMODE(os.stat(out).st_mode)
    preprocess_case_dir(case_dir, out, GEOMETRY, brain_mask=case_dir / "brain_mask.nii.gz")
    names = set(preprocess_output_names())
    assert {p.name for p in out.iterdir()} == names | {"notes.txt", "earlier"}  # no staging folder left
    assert {k: v for k, v in _snapshot(out).items() if k in theirs} == theirs
    assert stat.S_IMODE(os.stat(out).st_mode) == mode
    # a second run would replace this command's files: only with overwrite
    with pytest.raises(OutputPathError, match=r"already holds .*pass --overwrite"):
        preprocess_case_dir(case_dir, out, GEOMETRY, brain_mask=case_dir / "brain_mask.nii.gz")
    first = (out / "preprocess.json").read_bytes()
    preprocess_case_dir(case_dir, out, GEOMETRY, brain_mask=case_dir / "brain_mask.nii.gz", overwrite=True)
    assert (out / "preprocess.json").read_bytes() != first  # new timings
    assert {k: v for k, v in _snapshot(out).items() if k in theirs} == theirs


def test_new_output_folder_gets_the_users_permissions(case_dir, tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        out = tmp_path / "new" / "out"
        preprocess_case_dir(case_dir, out, GEOMETRY, brain_mask=case_dir / "brain_mask.nii.gz")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o755  # was 0700 (mkdtemp)
    assert stat.S_IMODE(os.stat(out / "t1c.nii.gz").st_mode) == 0o644


def test_preprocess_refuses_destructive_outputs_before_any_work(case_dir, tmp_path, monkeypatch):
    import shutil

    case = tmp_path / "study" / "case"
    shutil.copytree(case_dir, case)
    (case / "report.pdf").write_bytes(b"the radiologist's report")
    before = _snapshot(tmp_path / "study")
    refusals = {
        "the case folder": (case, "is the input"),
        "an ancestor of the case": (tmp_path / "study", "contains the input"),
        "a file": (case / "report.pdf", "is an existing file; name a folder"),
        "below a file": (case / "report.pdf" / "out", "is a file, not a folder"),
    }
    for what, (out, message) in refusals.items():
        result = _preprocess_cli(case, out)
        assert result.exit_code == 2, (what, result.output)
        assert message in result.output, (what, result.output)
        assert '"stage"' not in result.output, f"{what}: work started before the output was checked"
    monkeypatch.chdir(case)
    result = _preprocess_cli(case, ".")
    assert result.exit_code == 2 and "is the current directory" in result.output
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("keep", encoding="utf-8")
    monkeypatch.chdir(elsewhere)
    result = _preprocess_cli(case, ".")
    assert result.exit_code == 2 and "is the current directory" in result.output
    assert _snapshot(tmp_path / "study") == before
    assert [p.name for p in elsewhere.iterdir()] == ["keep.txt"]


def test_preprocess_crop_takes_three_values_like_training():
    result = _preprocess_cli("missing-case", "out", "--crop", "160", "192", "160")
    assert result.exit_code == 2 and "case folder not found" in result.output  # parsed; the case is what is missing


# -- preprocess --model: the bundle's geometry, as predict uses it (the Slicer "Preprocess (QC)") --


def _skull_strip_from_case_mask(case_dir, monkeypatch) -> list:
    """HD-BET replaced by the case's own brain mask (HD-BET itself: test_skullstrip.py and, on OpenVINO,
    test_skullstrip_openvino.py); returns the list of backends it was asked for."""
    from ContrastAmplifierLib import skullstrip

    native_mask = sitk.ReadImage(str(case_dir / "brain_mask.nii.gz"))
    asked = []

    def from_case_mask(image, mode="fast", device="cpu", postprocess=True, backend="torch"):
        asked.append(backend)
        mask = sitk.Cast(sitk.Resample(native_mask, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0) > 0, sitk.sitkUInt8)
        return skullstrip.SkullStripResult(mask, sitk.Mask(image, mask), 0.0, mode, str(device), backend)

    monkeypatch.setattr(skullstrip, "skull_strip", from_case_mask)
    return asked


def test_preprocess_with_model_uses_the_bundle_geometry(case_dir, random_bundle_dir, tmp_path, monkeypatch):
    from ContrastAmplifierLib.bundle import load_bundle

    from ContrastAmplifierLib import openvino_backend

    asked = _skull_strip_from_case_mask(case_dir, monkeypatch)
    out = tmp_path / "out"
    result = _preprocess_cli(case_dir, out, "--model", random_bundle_dir)
    assert result.exit_code == 0, result.output
    bundle = load_bundle(random_bundle_dir)
    meta = json.loads((out / "preprocess.json").read_text(encoding="utf-8"))
    # --backend auto: HD-BET on OpenVINO where it imports, else torch; said in the progress and recorded
    runtime = "openvino" if openvino_backend.available() else "torch"
    assert asked == [runtime] and meta["skull_strip"] == {"mode": "fast", "device": "cpu", "backend": runtime}
    assert f'HD-BET fast on cpu ({"OpenVINO" if runtime == "openvino" else "PyTorch"})' in result.output
    assert meta["geometry"] == bundle.geometry().to_dict()
    assert meta["geometry"]["spacing"] == [4.0, 4.0, 4.0] and meta["geometry"]["crop_size"] == [40, 48, 40]
    assert meta["percentiles_used"]["t1c"] == list(bundle.percentiles["t1c"]) == [-2.0, 3.0]
    t1c = sitk.ReadImage(str(out / "t1c.nii.gz"))
    assert t1c.GetSize() == (40, 48, 40) and t1c.GetSpacing() == pytest.approx((4.0, 4.0, 4.0))


@pytest.mark.parametrize("extra, named", [
    (["--spacing", "2"], "drop --spacing,"),
    (["--crop", "80", "96", "80"], "drop --crop,"),
    (["--spacing", "2", "--crop", "80", "96", "80"], "drop --spacing and --crop,"),
])
def test_preprocess_refuses_model_with_spacing_or_crop(case_dir, random_bundle_dir, tmp_path, extra, named):
    result = _preprocess_cli(case_dir, tmp_path / "out", "--model", random_bundle_dir, *extra)
    assert result.exit_code == 2, result.output
    assert "sets the spacing, crop and clip percentiles from the bundle" in result.output and named in result.output
    assert '"stage"' not in result.output and not (tmp_path / "out").exists()


def test_preprocess_with_an_unknown_model_names_it():
    result = _preprocess_cli("missing-case", "out", "--model", "no-such-model")
    assert result.exit_code == 2 and "unknown model 'no-such-model'" in result.output



def test_preprocess_backend_that_cannot_run_is_refused_before_any_work(case_dir, tmp_path):
    refused = _preprocess_cli(case_dir, tmp_path / "refused", "--backend", "openvino", "--device", "cuda")
    assert refused.exit_code == 2 and "runs on the CPU only, not on cuda" in refused.output
    assert '"stage"' not in refused.output and not (tmp_path / "refused").exists()
