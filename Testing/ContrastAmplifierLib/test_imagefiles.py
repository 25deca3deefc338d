"""Bad clinical DICOM series are refused before reading, with the numbers and the fix.

SimpleITK's series reader builds a wrong volume from a series with missing slices (it only warns
and averages the spacing), a 4D series (several images per slice position), a multi-plane
localiser or a single slice; :func:`ContrastAmplifierLib.imagefiles.dicom_slice_layout` reads
every file's header first. The series here are real DICOM files written by SimpleITK.
"""

from __future__ import annotations

import math
import random
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import SimpleITK as sitk

from ContrastAmplifierLib.imagefiles import (
    ImageValidationError,
    dicom_series_files,
    dicom_slice_layout,
    read_dicom_series,
)
from ContrastAmplifierLib.imageio import read_image

SERIES_UID = "1.2.826.0.1.3680043.2.1125.7"
AXIAL = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0))
CORONAL = ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0))
SAGITTAL = ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0))


def _cross(a, b):
    return (a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0])


def _write_series(
    folder: Path,
    positions: Sequence[Sequence[float]],
    orientations=None,
    tags: Optional[Sequence[dict]] = None,
    names: Optional[Sequence[str]] = None,
    slice_mm: float = 5.0,
) -> list[np.ndarray]:
    """One DICOM file per slice (``positions``: Image Position Patient of each); returns the pixel arrays.

    ``orientations``: one ``(row, column)`` for all slices or a list of one per slice (default axial).
    """
    folder.mkdir(parents=True, exist_ok=True)
    orientations = orientations or AXIAL
    if isinstance(orientations[0][0], float):
        orientations = [orientations] * len(positions)
    writer = sitk.ImageFileWriter()
    writer.SetImageIO("GDCMImageIO")  # also for names without a suffix (IM0001, as scanners write them)
    writer.KeepOriginalImageUIDOn()
    arrays = []
    for k, position in enumerate(positions):
        array = (np.arange(8 * 9, dtype=np.int16).reshape(8, 9) + 100 * k).astype(np.int16)
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((0.9, 0.9))
        row, column = orientations[k]
        image.SetMetaData("0020|000e", SERIES_UID)
        image.SetMetaData("0020|0032", "\\".join(f"{v:.6f}" for v in position))
        image.SetMetaData("0020|0037", "\\".join(f"{v:.6f}" for v in (*row, *column)))
        image.SetMetaData("0020|0013", str(k + 1))
        image.SetMetaData("0008|0060", "MR")
        image.SetMetaData("0018|0050", f"{slice_mm:g}")
        image.SetMetaData("0018|0088", f"{slice_mm:g}")
        for key, value in (tags[k] if tags else {}).items():
            image.SetMetaData(key, value)
        writer.SetFileName(str(folder / (names[k] if names else f"{k:03d}.dcm")))
        writer.Execute(image)
        arrays.append(array)
    return arrays


def _axial_positions(count: int, step: float = 5.0, skip=()) -> list[tuple[float, float, float]]:
    return [(-10.0, -20.0, -40.0 + k * step) for k in range(count) if k not in skip]


def _message(excinfo) -> str:
    return str(excinfo.value)


# -- missing slices ------------------------------------------------------------------------------


def test_missing_slice_is_named_with_the_gap_and_slice_numbers(tmp_path):
    folder = tmp_path / "flair"
    _write_series(folder, _axial_positions(20, skip={11}))
    expected = (
        f"T2-FLAIR DICOM series in {folder} has non-uniform slice positions: 5.0 mm apart except 10.0 mm between "
        "slices 11 and 12 (1 missing slice?). Export or send the complete series again."
    )
    with pytest.raises(ImageValidationError) as excinfo:
        read_image(folder, "T2-FLAIR")
    assert _message(excinfo) == expected
    with pytest.raises(ImageValidationError) as excinfo:
        dicom_series_files(folder, "T2-FLAIR")
    assert _message(excinfo) == expected


def test_several_gaps_are_counted_and_listed(tmp_path):
    folder = tmp_path / "t1"
    _write_series(folder, _axial_positions(20, skip={5, 6, 14}))
    with pytest.raises(ImageValidationError) as excinfo:
        read_dicom_series(folder, "T1")
    assert _message(excinfo) == (
        f"T1 DICOM series in {folder} has non-uniform slice positions: 5.0 mm apart except 15.0 mm between slices 5 "
        "and 6 (2 missing slices?), 10.0 mm between slices 12 and 13 (1 missing slice?). Export or send the complete "
        "series again."
    )


def test_at_most_three_gaps_are_listed(tmp_path):
    folder = tmp_path / "t1"
    _write_series(folder, _axial_positions(30, step=2.0, skip={3, 8, 13, 18, 23}))
    with pytest.raises(ImageValidationError) as excinfo:
        dicom_series_files(folder, "T1")
    message = _message(excinfo)
    assert "2.0 mm apart except 4.0 mm between slices 3 and 4 (1 missing slice?), 4.0 mm between slices 7 and 8" in message
    assert "4.0 mm between slices 11 and 12 (1 missing slice?) and 2 more irregular steps." in message
    assert "slices 15 and 16" not in message


def test_an_extra_slice_between_two_is_misplaced(tmp_path):
    positions = _axial_positions(12, step=4.0)
    positions.insert(6, (-10.0, -20.0, -40.0 + 5 * 4.0 + 1.5))  # 1.5 mm above slice 6
    folder = tmp_path / "t1c"
    _write_series(folder, positions)
    with pytest.raises(ImageValidationError) as excinfo:
        dicom_series_files(folder, "T1c")
    assert _message(excinfo) == (
        f"T1c DICOM series in {folder} has non-uniform slice positions: 4.0 mm apart except 1.5 mm between slices 6 "
        "and 7 (an extra or misplaced slice?), 2.5 mm between slices 7 and 8 (an extra or misplaced slice?). Export "
        "or send the complete series again."
    )


def test_rounding_jitter_within_tolerance_passes(tmp_path):
    rng = np.random.default_rng(3)
    positions = [(x, y, z + float(rng.uniform(-0.2, 0.2))) for x, y, z in _axial_positions(16)]  # < 10% of 5 mm
    folder = tmp_path / "t1"
    _write_series(folder, positions)
    layout = dicom_slice_layout(sorted(str(p) for p in folder.iterdir()), "T1", folder)
    assert len(layout.files) == 16
    assert layout.step_mm == pytest.approx(5.0, abs=0.4)


# -- several images per slice position (4D) ------------------------------------------------------


def test_diffusion_series_given_as_adc_is_named(tmp_path):
    folder = tmp_path / "adc"
    b_values = ("0", "500", "1000")
    positions, tags = [], []
    for b in b_values:  # one full stack per b-value, as scanners send them
        for position in _axial_positions(24):
            positions.append(position)
            tags.append({"0018|9087": b})
    _write_series(folder, positions, tags=tags)
    with pytest.raises(ImageValidationError) as excinfo:
        read_image(folder, "ADC")
    assert _message(excinfo) == (
        f"ADC DICOM series in {folder} holds 3 images at each of 24 slice positions (a 4D series: several b-values, "
        "echoes or time points; b-values found: 0, 500, 1000); this looks like the diffusion-weighted series, not the "
        "ADC map: export the ADC map (one image per slice)."
    )


def test_multi_echo_series_for_another_input(tmp_path):
    folder = tmp_path / "flair"
    positions, tags = [], []
    for position in _axial_positions(10):
        for echo in ("1", "2"):
            positions.append(position)
            tags.append({"0018|0086": echo})
    _write_series(folder, positions, tags=tags)
    with pytest.raises(ImageValidationError) as excinfo:
        dicom_series_files(folder, "T2-FLAIR")
    assert _message(excinfo) == (
        f"T2-FLAIR DICOM series in {folder} holds 2 images at each of 10 slice positions (a 4D series: several "
        "b-values, echoes or time points; echo numbers found: 1, 2); export the single 3D volume this input needs "
        "(one image per slice position)."
    )


def test_a_slice_sent_twice(tmp_path):
    positions = _axial_positions(12)
    positions.append(positions[4])
    folder = tmp_path / "t1"
    _write_series(folder, positions)
    with pytest.raises(ImageValidationError) as excinfo:
        dicom_series_files(folder, "T1")
    assert _message(excinfo) == (
        f"T1 DICOM series in {folder} holds 13 images at 12 slice positions, 1 to 2 at each (1 position holds more "
        "than one: a 4D series, or slices sent twice); export the single 3D volume this input needs (one image per "
        "slice position)."
    )


# -- orientations, single slice, headers ---------------------------------------------------------


def test_three_plane_localiser(tmp_path):
    positions, orientations = [], []
    for plane, count in ((AXIAL, 3), (CORONAL, 2), (SAGITTAL, 3)):
        normal = _cross(*plane)
        for k in range(count):
            positions.append(tuple(-100.0 + 10.0 * k * n for n in normal))
            orientations.append(plane)
    folder = tmp_path / "t1c"
    _write_series(folder, positions, orientations)
    with pytest.raises(ImageValidationError) as excinfo:
        read_image(folder, "T1c")
    assert _message(excinfo) == (
        f"T1c DICOM series in {folder} holds slices in 3 different orientations (3 axial, 3 sagittal, 2 coronal "
        "slices): a localiser/scout or a multi-plane series. Choose the whole-brain series in one orientation (axial, "
        "or sagittal or coronal) and export it alone."
    )


def test_two_differently_tilted_stacks(tmp_path):
    tilt = math.radians(20)
    tilted = ((1.0, 0.0, 0.0), (0.0, math.cos(tilt), math.sin(tilt)))
    folder = tmp_path / "t1"
    _write_series(folder, _axial_positions(4) + _axial_positions(3), [AXIAL] * 4 + [tilted] * 3)
    with pytest.raises(ImageValidationError, match=r"holds slices in 2 different orientations \(4 axial, 3 axial tilted 20 deg slices\)"):
        dicom_series_files(folder, "T1")


def test_single_slice(tmp_path):
    folder = tmp_path / "t1c"
    _write_series(folder, _axial_positions(1))
    with pytest.raises(ImageValidationError) as excinfo:
        read_image(folder, "T1c")
    assert _message(excinfo) == (
        f"T1c DICOM series in {folder} holds a single slice: a localiser or one image exported by mistake; export "
        "the whole series."
    )


def test_missing_image_position_is_refused(tmp_path):
    pydicom = pytest.importorskip("pydicom", reason="pydicom removes a tag that SimpleITK always writes")
    folder = tmp_path / "t1"
    _write_series(folder, _axial_positions(6))
    dataset = pydicom.dcmread(str(folder / "002.dcm"))
    del dataset.ImagePositionPatient
    dataset.save_as(str(folder / "002.dcm"))
    with pytest.raises(ImageValidationError) as excinfo:
        dicom_slice_layout(sorted(str(p) for p in folder.iterdir()), "T1", folder)
    assert _message(excinfo) == (
        f"T1 DICOM series in {folder}: 1 of 6 files lack a valid Image Position/Orientation Patient (0020,0032 / "
        "0020,0037), e.g. 002.dcm, so the slices cannot be placed. Export the series again with complete headers."
    )


def test_unreadable_file_is_named(tmp_path):
    folder = tmp_path / "t1"
    _write_series(folder, _axial_positions(3))
    (tmp_path / "junk.dcm").write_bytes(b"not dicom at all")
    files = sorted(str(p) for p in folder.iterdir()) + [str(tmp_path / "junk.dcm")]
    with pytest.raises(ImageValidationError, match=r"T1 DICOM series in .*t1: file junk\.dcm could not be read \(.*\); export or send"):
        dicom_slice_layout(files, "T1", folder)


def test_existing_errors_are_kept(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageValidationError, match=r"ADC folder .*empty holds no DICOM series"):
        dicom_series_files(tmp_path / "empty", "ADC")
    folder = tmp_path / "two"
    _write_series(folder, _axial_positions(3))
    writer = sitk.ImageFileWriter()
    other = sitk.GetImageFromArray(np.ones((8, 9), np.int16))
    other.SetMetaData("0020|000e", SERIES_UID + ".2")
    writer.KeepOriginalImageUIDOn()
    writer.SetFileName(str(folder / "other.dcm"))
    writer.Execute(other)
    with pytest.raises(ImageValidationError, match=r"T1 folder .*two holds 2 DICOM series .*; put one series per folder"):
        dicom_series_files(folder, "T1")


# -- series that pass ----------------------------------------------------------------------------


def test_oblique_series_reads_with_its_geometry(tmp_path):
    tilt = math.radians(17)
    row, column = (1.0, 0.0, 0.0), (0.0, math.cos(tilt), math.sin(tilt))
    normal = _cross(row, column)
    origin = (-30.0, 12.0, -55.0)
    step = 3.3
    positions = [tuple(o + k * step * n for o, n in zip(origin, normal)) for k in range(12)]
    folder = tmp_path / "t1c"
    arrays = _write_series(folder, positions, (row, column), slice_mm=step)
    layout = dicom_slice_layout(sorted(str(p) for p in folder.iterdir()), "T1c", folder)
    assert layout.step_mm == pytest.approx(step, abs=1e-4)
    image = read_dicom_series(folder, "T1c")
    assert image.GetSize() == (9, 8, 12)
    np.testing.assert_allclose(image.GetSpacing(), (0.9, 0.9, step), atol=1e-4)
    np.testing.assert_allclose(image.GetOrigin(), origin, atol=1e-4)
    np.testing.assert_allclose(np.array(image.GetDirection()).reshape(3, 3).T, [row, column, normal], atol=1e-5)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), np.stack(arrays))


def test_shuffled_file_names_are_sorted_by_position(tmp_path):
    count = 14
    order = list(range(count))
    random.Random(7).shuffle(order)
    names = [f"IM{order[k]:04d}" for k in range(count)]  # file name order is not slice order
    tags = [{"0020|0013": str(order[k] + 1)} for k in range(count)]  # neither are the instance numbers
    folder = tmp_path / "t2"
    arrays = _write_series(folder, _axial_positions(count, step=2.5), tags=tags, names=names)
    files = dicom_series_files(folder, "T2-FLAIR")
    assert [Path(f).name for f in files] == names
    shuffled = sorted(str(p) for p in folder.iterdir())
    assert dicom_slice_layout(shuffled, "T2-FLAIR", folder) == (files, pytest.approx(2.5))
    image = read_dicom_series(folder, "T2-FLAIR")
    assert image.GetSpacing()[2] == pytest.approx(2.5, abs=1e-4)
    np.testing.assert_allclose(image.GetOrigin(), (-10.0, -20.0, -40.0), atol=1e-4)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), np.stack(arrays))


def test_descending_positions_read_bottom_up(tmp_path):
    """A series sent head-to-feet is read in ascending order along the normal (as ITK expects)."""
    folder = tmp_path / "t1"
    arrays = _write_series(folder, list(reversed(_axial_positions(8))))
    image = read_dicom_series(folder, "T1")
    np.testing.assert_allclose(image.GetOrigin(), (-10.0, -20.0, -40.0), atol=1e-4)
    np.testing.assert_allclose(image.GetSpacing()[2], 5.0, atol=1e-4)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), np.stack(arrays[::-1]))


# -- 4D NIfTI as ADC, and import without SimpleITK -------------------------------------------------


def test_4d_nifti_given_as_adc_says_diffusion_series(tmp_path):
    nib = pytest.importorskip("nibabel")
    array = np.random.default_rng(1).random((10, 12, 14, 3)).astype(np.float32)
    path = tmp_path / "adc.nii.gz"
    nib.save(nib.Nifti1Image(array, np.diag([1.0, 1.0, 2.0, 1.0])), str(path))
    with pytest.raises(ImageValidationError) as excinfo:
        read_image(path, "ADC")
    assert _message(excinfo) == (
        f"ADC ({path}) holds 3 volumes (10x12x14x3, 4D); a single 3D volume is required. This looks like the "
        "diffusion-weighted series (one volume per b-value), not the ADC map: export the ADC map (one 3D volume) "
        "instead."
    )
    with pytest.raises(ImageValidationError) as excinfo:
        read_image(path, "T1c")
    assert _message(excinfo).endswith(
        "Export the single 3D volume this input needs, not a series of b-values, echoes or time points."
    )
    nrrd = tmp_path / "adc.nrrd"  # through ITK's 4D image (no nibabel pre-check), loaded first
    volume = sitk.GetImageFromArray(np.random.default_rng(2).random((6, 7, 8)).astype(np.float32))
    sitk.WriteImage(sitk.JoinSeries([volume, volume]), str(nrrd))
    with pytest.raises(ImageValidationError, match=r"^ADC holds 2 volumes \(8x7x6x2, 4D\).*This looks like the diffusion-weighted"):
        read_image(sitk.ReadImage(str(nrrd)), "ADC")


def test_imagefiles_imports_without_simpleitk():
    code = (
        "import sys; sys.modules['SimpleITK'] = None\n"
        "from ContrastAmplifierLib import imagefiles\n"
        "assert imagefiles.is_adc_name('ADC') and not imagefiles.is_adc_name('T1c')\n"
        "print('ok')\n"
    )
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                            env={"PYTHONPATH": str(root / "ContrastAmplifier"), "PATH": ""}, check=False)
    assert result.stdout.strip() == "ok", result.stderr
