"""Parallelogram lesion ROIs and CNR/LBR/CEP on synthetic volumes with known answers."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from LesionReaderLib.contrast import (
    CaseVolumes,
    ContrastInputError,
    automatic_brain_mask,
    case_contrast,
    contrast_metrics,
    parallelogram_mask,
    ras_to_continuous_index,
)
from LesionReaderLib.geometry import LesionGeometry


def make_image(size=(40, 40, 20), spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=None, value=0.0):
    image = sitk.Image(list(size), sitk.sitkFloat32)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(direction)
    if value:
        image += value
    return image


def ras_of_index(image, index):
    lps = image.TransformContinuousIndexToPhysicalPoint([float(v) for v in index])
    return (-lps[0], -lps[1], lps[2])


def axes_from_index(image, l1, l2, s1, s2):
    return LesionGeometry((ras_of_index(image, l1), ras_of_index(image, l2)), (ras_of_index(image, s1), ras_of_index(image, s2)), "t")


def test_ras_lps_conversion_round_trip():
    image = make_image(spacing=(0.9, 1.1, 2.0), origin=(10.0, -20.0, 5.0), direction=(0, 1, 0, -1, 0, 0, 0, 0, 1))
    idx = np.array([[3.0, 4.5, 7.0], [0.0, 0.0, 0.0]])
    ras = np.array([ras_of_index(image, i) for i in idx])
    assert ras_to_continuous_index(image, ras) == pytest.approx(idx)


@pytest.mark.parametrize("direction,origin,spacing", [
    (None, (0.0, 0.0, 0.0), (1.0, 1.0, 2.0)),
    ((-1, 0, 0, 0, -1, 0, 0, 0, 1), (30.0, 40.0, -12.0), (0.8, 0.8, 1.5)),  # RAS-aligned grid
    ((0, 1, 0, 1, 0, 0, 0, 0, -1), (-5.0, 7.0, 3.0), (1.0, 0.5, 1.0)),
])
def test_axis_aligned_rectangle_voxel_count(direction, origin, spacing):
    image = make_image(spacing=spacing, origin=origin, direction=direction)
    # Long axis across index i 4.5 -> 14.5 at j = 10; short axis across j 7.5 -> 11.5 at i = 9.5;
    # slice k = 5: voxel centres i 5..14 x j 8..11 lie inside -> exactly 40 voxels.
    axes = axes_from_index(image, (4.5, 10, 5), (14.5, 10, 5), (9.5, 7.5, 5), (9.5, 11.5, 5))
    mask = parallelogram_mask(image, [axes])
    assert mask.sum() == 40
    kk, jj, ii = np.nonzero(mask)
    assert set(kk) == {5} and set(ii) == set(range(5, 15)) and set(jj) == set(range(8, 12))


def test_short_axis_off_centre_gives_the_same_parallelogram():
    image = make_image()
    axes = axes_from_index(image, (4.5, 10, 5), (14.5, 10, 5), (6.5, 7.5, 5), (6.5, 11.5, 5))
    assert parallelogram_mask(image, [axes]).sum() == 40


def test_oblique_in_plane_rectangle_matches_area():
    image = make_image(size=(80, 80, 10))
    c = np.array([40.0, 40.0, 5.0])
    theta = math.radians(30)
    e1, e2 = np.array([math.cos(theta), math.sin(theta), 0]), np.array([-math.sin(theta), math.cos(theta), 0])
    L, S = 40.0, 20.0
    axes = axes_from_index(image, c - e1 * L / 2, c + e1 * L / 2, c - e2 * S / 2, c + e2 * S / 2)
    count = parallelogram_mask(image, [axes]).sum()
    assert count == pytest.approx(L * S, rel=0.03)  # lattice points ~ area (1 mm grid)


def test_oblique_plane_counts_one_voxel_per_column_and_matches_projected_area():
    image = make_image(size=(80, 80, 80))
    c = np.array([40.0, 40.0, 40.0])
    n = np.array([1.0, 2.0, 2.0]) / 3.0  # dominant axis z
    e1 = np.cross(n, [1.0, 0, 0])
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(n, e1)
    L, S = 40.0, 24.0
    axes = axes_from_index(image, c - e1 * L / 2, c + e1 * L / 2, c - e2 * S / 2, c + e2 * S / 2)
    mask = parallelogram_mask(image, [axes])
    # Projected area on the xy plane = area * |n_z|.
    assert mask.sum() == pytest.approx(L * S * abs(n[2]), rel=0.03)
    assert mask.sum(axis=0).max() == 1  # one voxel per z-column: a thin digital plane
    kk, jj, ii = np.nonzero(mask)
    offsets = (np.stack([ii, jj, kk], 1) - c) @ n
    assert np.abs(offsets).max() <= 0.5 * 2 / 3 * 1.5 + 1e-9  # within half a voxel (along z) of the plane


def test_anisotropic_grid_oblique_plane():
    image = make_image(size=(60, 60, 30), spacing=(0.5, 0.5, 2.0))
    c_idx = np.array([30.0, 30.0, 15.0])
    c = np.array(ras_of_index(image, c_idx))
    # Rectangle in the RAS x-z plane tilted 20 degrees: dominant index axis is j (y).
    e1 = np.array([math.cos(0.35), 0, math.sin(0.35)])
    e2 = np.array([-math.sin(0.35), 0, math.cos(0.35)])
    L, S = 20.0, 10.0
    axes = LesionGeometry((tuple(c - e1 * L / 2), tuple(c + e1 * L / 2)), (tuple(c - e2 * S / 2), tuple(c + e2 * S / 2)))
    mask = parallelogram_mask(image, [axes])
    # Plane normal is y: one voxel per y-column; columns are 0.5 x 2 mm in x-z.
    assert mask.sum() == pytest.approx(L * S / (0.5 * 2.0), rel=0.06)
    assert mask.sum(axis=1).max() == 1


def test_pooled_union_and_degenerate_axes():
    image = make_image()
    a = axes_from_index(image, (4.5, 10, 5), (14.5, 10, 5), (9.5, 7.5, 5), (9.5, 11.5, 5))
    b = axes_from_index(image, (24.5, 30, 8), (28.5, 30, 8), (26.5, 28.5, 8), (26.5, 31.5, 8))
    assert parallelogram_mask(image, [a, b]).sum() == 40 + 4 * 3
    bad = axes_from_index(image, (4.5, 10, 5), (14.5, 10, 5), (6.5, 10, 5), (8.5, 10, 5))
    with pytest.raises(ContrastInputError, match="parallel"):
        parallelogram_mask(image, [bad])


def test_contrast_metrics_formulae():
    cnr, lbr, cep = contrast_metrics(si_lesion=3.0, si_brain=1.0, sd_brain=0.1, si_lesion_pre=1.5)
    assert (cnr, lbr, cep) == pytest.approx((20.0, 3.0, 100.0))


def _synthetic_case(tmp_path: Path, lesion_value: float, seed: int = 0):
    """Brain = 1 + N(0, 0.1) in a box, one lesion block at ``lesion_value``; pre-contrast lesion 1.5."""
    rng = np.random.default_rng(seed)
    shape = (20, 40, 40)  # z, y, x
    brain = np.zeros(shape, bool)
    brain[2:18, 4:36, 4:36] = True
    post = np.where(brain, 1.0 + rng.normal(0, 0.1, shape), 0.0)
    pre = np.where(brain, 1.0, 0.0)
    post[5, 8:12, 5:15] = lesion_value  # the parallelogram below covers exactly these voxels
    pre[5, 8:12, 5:15] = 1.5
    ref = make_image()

    def save(arr, name):
        img = sitk.GetImageFromArray(arr.astype(np.float32))
        img.CopyInformation(ref)
        path = tmp_path / f"{name}.nii.gz"
        sitk.WriteImage(img, str(path))
        return path

    healthy = np.zeros(shape, np.uint8)
    healthy[10:16, 20:30, 20:30] = 1
    files = {"post": save(post, f"post{lesion_value}"), "pre": save(pre, "pre"), "brain": save(brain.astype(np.uint8), "brain"),
             "healthy": save(healthy, "healthy")}
    axes = axes_from_index(ref, (4.5, 10, 5), (14.5, 10, 5), (9.5, 7.5, 5), (9.5, 11.5, 5))
    sd = post[healthy.astype(bool)].std(ddof=1)
    mean = post[healthy.astype(bool)].mean()
    return files, axes, mean, sd


def test_case_contrast_with_label_and_automatic_roi(tmp_path):
    files, axes, mean, sd = _synthetic_case(tmp_path, 3.0)
    cv = CaseVolumes("c1", {"T1c": files["post"]}, pre=files["pre"], healthy_brain=files["healthy"])
    (res,) = case_contrast(cv, [axes])
    assert res.brain_roi == "label" and res.n_lesion_voxels == 40 and res.n_brain_voxels == 600
    assert res.si_lesion == pytest.approx(3.0)
    assert res.cnr == pytest.approx((3.0 - mean) / sd)
    assert res.lbr == pytest.approx(3.0 / mean)
    assert res.cep == pytest.approx(100.0)
    auto = CaseVolumes("c1", {"T1c": files["post"]}, pre=files["pre"], brain_mask=files["brain"])
    (res2,) = case_contrast(auto, [axes], margin_mm=5.0)
    assert res2.brain_roi == "automatic"
    assert res2.si_brain == pytest.approx(1.0, abs=0.02)  # lesion and its surroundings excluded
    assert 15 < res2.cnr < 25


def test_automatic_mask_excludes_balls_and_dilated_labels():
    image = make_image()
    brain = make_image(value=1.0)
    axes = axes_from_index(image, (4.5, 10, 5), (14.5, 10, 5), (9.5, 7.5, 5), (9.5, 11.5, 5))
    keep = automatic_brain_mask(image, sitk.Cast(brain, sitk.sitkUInt8), [axes], margin_mm=2.0)
    # Ball of radius 10/2 + 2 = 7 mm around the mean of the four end points (index (9.5, 9.75, 5)).
    kk, jj, ii = np.nonzero(~keep)
    d = np.sqrt((ii - 9.5) ** 2 + (jj - 9.75) ** 2 + (kk - 5) ** 2)
    assert d.max() < 7.0 and (~keep).sum() > 4 / 3 * math.pi * 6.5**3
    labels = sitk.Image(image.GetSize(), sitk.sitkUInt8)
    labels.CopyInformation(image)
    labels[30, 30, 10] = 1
    keep2 = automatic_brain_mask(image, sitk.Cast(brain, sitk.sitkUInt8), [], labels, margin_mm=2.0)
    assert (~keep2).sum() == 33  # voxels within 2 mm of one voxel on a 1 mm grid


def test_case_contrast_errors_name_the_missing_input(tmp_path):
    files, axes, _, _ = _synthetic_case(tmp_path, 3.0)
    with pytest.raises(ContrastInputError, match="pre-contrast T1"):
        case_contrast(CaseVolumes("c9", {"T1c": files["post"]}, healthy_brain=files["healthy"]), [axes])
    with pytest.raises(ContrastInputError, match="brain mask"):
        case_contrast(CaseVolumes("c9", {"T1c": files["post"]}, pre=files["pre"]), [axes])
    with pytest.raises(ContrastInputError, match="not found"):
        case_contrast(CaseVolumes("c9", {"T1c": tmp_path / "nope.nii.gz"}, pre=files["pre"], healthy_brain=files["healthy"]), [axes])


# --------------------------------------------------------------------------- phantom


def _to_t1c_grid(case: Path, name: str, params: dict) -> sitk.Image:
    """Resample sequence ``name`` onto the t1c grid with the phantom's known poses (as the paper's
    registration to a common space would): p_s = A_s @ inverse(A_t1c) @ p_t1c (LPS mm)."""
    seqs = params["sequences"]
    a_s = np.array(seqs[name]["world_to_native_lps"])
    a_c = np.array(seqs["t1c"]["world_to_native_lps"])
    m = a_s @ np.linalg.inv(a_c)
    transform = sitk.AffineTransform(m[:3, :3].ravel().tolist(), m[:3, 3].tolist())
    ref = sitk.ReadImage(str(case / "t1c.nii.gz"))
    return sitk.Resample(sitk.ReadImage(str(case / f"{name}.nii.gz"), sitk.sitkFloat32), ref, transform, sitk.sitkLinear, 0.0)


@pytest.fixture(scope="module")
def phantom_case(tmp_path_factory):
    from ContrastAmplifierLib import phantom

    root = tmp_path_factory.mktemp("phantom")
    case = Path(phantom.generate_case(root / "case_000", seed=0, spacing=2.0).case_dir)
    import json

    lesions = json.loads((case / "lesions.json").read_text(encoding="utf-8"))["lesions"]
    if not lesions:
        pytest.skip("phantom seed 0 has no lesion any more; pick a seed with a metastasis")
    params = json.loads((case / "phantom.json").read_text(encoding="utf-8"))
    aligned = {}
    for name in ("t1", "t1c_low"):
        aligned[name] = case / f"{name}_on_t1c.nii.gz"
        sitk.WriteImage(_to_t1c_grid(case, name, params), str(aligned[name]))
    return case, lesions, aligned


def test_phantom_cnr_orders_with_dose(phantom_case, tmp_path):
    case, lesions, aligned = phantom_case
    axes = [LesionGeometry(tuple(map(tuple, l["long_axis_ras"])), tuple(map(tuple, l["short_axis_ras"])), str(l["id"])) for l in lesions]
    post = {"T1c-low": aligned["t1c_low"], "T1c": case / "t1c.nii.gz", "T1c-x4": case / "t1c_x4.nii.gz"}
    cv = CaseVolumes("case_000", post, pre=aligned["t1"], brain_mask=case / "brain_mask.nii.gz", lesion_labels=case / "lesion_labels.nii.gz")
    res = {r.volume: r for r in case_contrast(cv, axes)}
    assert res["T1c-x4"].cnr > res["T1c"].cnr > res["T1c-low"].cnr
    assert res["T1c-x4"].lbr > res["T1c"].lbr > res["T1c-low"].lbr
    assert res["T1c-x4"].cep > res["T1c"].cep > res["T1c-low"].cep
    # The ROI hits the enhancing lesion: every voxel of it lies in the phantom's lesion labels.
    labels = sitk.ReadImage(str(case / "lesion_labels.nii.gz"))
    roi = parallelogram_mask(labels, axes)
    assert roi.sum() == res["T1c"].n_lesion_voxels > 0
    inside = (sitk.GetArrayFromImage(labels) > 0)[roi].mean()
    assert inside > 0.5  # a parallelogram around an ellipse is 79 % lesion at best; partial volume at 2 mm


def test_phantom_contrast_through_analyze(phantom_case, tmp_path):
    """analyze on a bare CSV folder + volumes.csv: the reference axes from lesions.json."""
    from simulated_reads import write_csv

    from LesionReaderLib.analysis import GRADES_COLUMNS, LESIONS_COLUMNS, analyze

    case, lesions, aligned = phantom_case
    folder = tmp_path / "study"
    folder.mkdir()
    rows = []
    for l in lesions:
        (a, b), (c, d) = l["long_axis_ras"], l["short_axis_ras"]
        rows.append(dict(zip(LESIONS_COLUMNS, ["R2", "T1c-vfa", "case_000", l["id"], l["long_mm"], l["short_mm"], *a, *b, *c, *d, *l["center_ras"]])))
        rows.append(dict(zip(LESIONS_COLUMNS, ["R1", "T1c", "case_000", l["id"], l["long_mm"], l["short_mm"], *a, *b, *c, *d, *l["center_ras"]])))
    write_csv(folder / "lesions.csv", LESIONS_COLUMNS, rows)
    write_csv(folder / "grades.csv", GRADES_COLUMNS,
              [{"reader": "R2", "phase": "T1c-vfa", "case": "case_000", "grade": 3, "seconds": 60, "excluded": 0},
               {"reader": "R1", "phase": "T1c", "case": "case_000", "grade": 3, "seconds": 50, "excluded": 0}])
    (folder / "volumes.csv").write_text(
        "case,T1,T1c-low,T1c,T1c-x4,brain_mask,lesion_labels\n"
        f"case_000,{aligned['t1']},{aligned['t1c_low']},{case / 't1c.nii.gz'},{case / 't1c_x4.nii.gz'},"
        f"{case / 'brain_mask.nii.gz'},{case / 'lesion_labels.nii.gz'}\n", encoding="utf-8")
    result = analyze(folder, tmp_path / "out")
    cnr = {r["volume"]: r["cnr"] for r in result.contrast}
    assert cnr["T1c-x4"] > cnr["T1c"] > cnr["T1c-low"]
    det = next(d for d in result.detection if d["reader"] == "R1" and d["threshold_mm"] == 0)
    assert det["tp"] == len(lesions) and det["fp"] == 0
    md = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert "Table 4: contrast enhancement" in md and "CNR" in md and "automatic" in md
    assert (tmp_path / "out" / "contrast_per_case.png").is_file()
