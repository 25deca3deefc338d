"""Input validation: every error names the file and the fix (issue 3, "Done when")."""

from __future__ import annotations

import re

import numpy as np
import pytest
import SimpleITK as sitk

from ContrastAmplifierLib.imageio import (
    ImageValidationError,
    check_header_payload,
    find_case_inputs,
    read_image,
    write_image_atomic,
)


def _volume(shape=(12, 14, 10), value=None) -> sitk.Image:
    rng = np.random.default_rng(0)
    array = rng.random(shape, dtype=np.float32) if value is None else np.full(shape, value, np.float32)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.0, 1.2, 2.0))
    image.SetOrigin((3.0, -4.0, 5.0))
    return image


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_read_formats_keep_geometry_and_values(tmp_path, suffix):
    image = _volume()
    path = tmp_path / f"t1c{suffix}"
    sitk.WriteImage(image, str(path))
    back = read_image(path, "T1c")
    assert back.GetPixelID() == sitk.sitkFloat32
    np.testing.assert_allclose(back.GetSpacing(), image.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(back.GetOrigin(), image.GetOrigin(), atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))


def test_read_dicom_series_folder(tmp_path):
    image = sitk.Cast(_volume() * 1000, sitk.sitkInt16)
    folder = tmp_path / "t1c"
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        s = image[:, :, k]
        s.SetMetaData("0020|000e", "1.2.826.0.1.3680043.2.1125.1")  # one series UID
        s.SetMetaData("0020|0032", "\\".join(map(str, image.TransformIndexToPhysicalPoint((0, 0, k)))))
        s.SetMetaData("0020|0013", str(k))
        s.SetMetaData("0008|0060", "MR")
        writer.SetFileName(str(folder / f"{k:03d}.dcm"))
        writer.Execute(s)
    back = read_image(folder, "T1c")
    assert back.GetSize() == image.GetSize()
    assert back.GetSpacing()[2] == pytest.approx(2.0, abs=1e-3)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image).astype(np.float32))
    assert find_case_inputs(tmp_path, ("t1c",))["t1c"] == folder


def test_missing_modality_names_it_and_the_folder(tmp_path):
    for name in ("t1", "flair", "t1c"):
        sitk.WriteImage(_volume(), str(tmp_path / f"{name}.nii.gz"))
    with pytest.raises(ImageValidationError, match=r"ADC is missing in .*adc\.nii\.gz"):
        find_case_inputs(tmp_path)


def test_case_names_are_case_insensitive_and_unique(tmp_path):
    for name in ("T1", "FLAIR", "adc", "T1c"):
        sitk.WriteImage(_volume(), str(tmp_path / f"{name}.nii.gz"))
    found = find_case_inputs(tmp_path)
    assert found["t1c"].name == "T1c.nii.gz"
    sitk.WriteImage(_volume(), str(tmp_path / "t1.nrrd"))
    with pytest.raises(ImageValidationError, match="T1 is ambiguous"):
        find_case_inputs(tmp_path)


def test_2d_image(tmp_path):
    path = tmp_path / "adc.nii.gz"
    sitk.WriteImage(_volume((1, 64, 64)), str(path))
    with pytest.raises(ImageValidationError, match=r"ADC \(.*adc\.nii\.gz\) is 2D \(64x64x1\); a 3D volume is required"):
        read_image(path, "ADC")
    flat = sitk.GetImageFromArray(np.random.default_rng(0).random((64, 64), dtype=np.float32))
    with pytest.raises(ImageValidationError, match="is 2D"):
        read_image(flat, "FLAIR")


def test_nans(tmp_path):
    array = sitk.GetArrayFromImage(_volume())
    array[2, 3, 4] = np.nan
    array[5, 5, 5] = np.inf
    image = sitk.GetImageFromArray(array)
    # ITK's NIfTI reader returns NaN and Inf as 0: NIfTI voxels are checked with nibabel as well.
    for suffix in (".nrrd", ".mha", ".nii.gz", ".nii"):
        path = tmp_path / f"t1{suffix}"
        sitk.WriteImage(image, str(path))
        with pytest.raises(ImageValidationError, match=r"T1 \(.*t1\.(nrrd|mha|nii|nii\.gz)\) contains 2 NaN/infinite voxels \(of 1680\); fix the export"):
            read_image(path, "T1")
    with pytest.raises(ImageValidationError, match="contains 2 NaN/infinite voxels"):
        read_image(image, "T1")


def test_empty_image(tmp_path):
    path = tmp_path / "flair.nii.gz"
    sitk.WriteImage(_volume(value=0.0), str(path))
    with pytest.raises(ImageValidationError, match=r"FLAIR .* is empty \(every voxel equals 0\); load the right series"):
        read_image(path, "FLAIR")


def test_unreadable_and_missing_file(tmp_path):
    path = tmp_path / "t1c.nii.gz"
    path.write_bytes(b"this is not a NIfTI file")
    with pytest.raises(ImageValidationError, match=r"T1c file .*t1c\.nii\.gz could not be read .*Supported: NIfTI"):
        read_image(path, "T1c")
    with pytest.raises(ImageValidationError, match=r"T1c volume not found: .*nope\.nii\.gz"):
        read_image(tmp_path / "nope.nii.gz", "T1c")


def test_implausible_spacing():
    image = _volume()
    image.SetSpacing((0.001, 0.001, 0.001))
    with pytest.raises(ImageValidationError, match="implausible voxel spacing"):
        read_image(image, "T1")


def test_atomic_write_leaves_no_temporary_file(tmp_path):
    path = write_image_atomic(_volume(), tmp_path / "sub" / "x.nii.gz")
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.nii.gz"]


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_truncated_nifti_is_refused(tmp_path, suffix):
    """ITK reads a truncated NIfTI without complaint (the missing voxels become 0): nibabel does not."""
    whole = tmp_path / f"whole{suffix}"
    sitk.WriteImage(_volume((40, 40, 40)), str(whole))
    data = whole.read_bytes()
    path = tmp_path / f"t1c{suffix}"
    path.write_bytes(data[: len(data) // 2])
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(path))).size == 40 ** 3  # what used to pass
    with pytest.raises(ImageValidationError, match=r"T1c file .*t1c\.nii(\.gz)? is truncated or corrupted: only part of its 40x40x40 voxels"):
        read_image(path, "T1c")


def _data_file(path):
    """The file holding the voxels: the header itself (.mha, .nrrd) or the detached data file (.mhd, .nhdr)."""
    if path.suffix in (".mha", ".nrrd"):
        return path
    text = path.read_text(encoding="latin-1")
    name = (re.search(r"ElementDataFile = (.+)", text) or re.search(r"data file: (.+)", text)).group(1).strip()
    return path.parent / name


TRUNCATED = r"T1c file .*t1c\.(mha|mhd|nrrd|nhdr) is truncated or corrupted: its 40x40x40 voxels need 256000 bytes of image data"


@pytest.mark.parametrize("compress", [True, False], ids=["compressed", "raw"])
@pytest.mark.parametrize("suffix", [".mha", ".mhd", ".nrrd", ".nhdr"])
def test_truncated_metaimage_and_nrrd_are_refused_whatever_simpleitk_does(tmp_path, suffix, compress):
    """SimpleITK 2.2/2.3 (Slicer 5.6/5.8) read a truncated compressed .mha without error (2.4+ raise):
    read_image checks the payload against the header itself, so every SimpleITK gives the same answer."""
    path = tmp_path / f"t1c{suffix}"
    sitk.WriteImage(_volume((40, 40, 40)), str(path), compress)
    data_file = _data_file(path)
    data = data_file.read_bytes()
    data_file.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ImageValidationError, match=TRUNCATED + ".*Copy or export the file again"):
        read_image(path, "T1c")
    with pytest.raises(ImageValidationError, match=TRUNCATED):
        check_header_payload(path, "T1c")  # the check alone, before SimpleITK sees the file


@pytest.mark.parametrize("suffix", [".mha", ".nrrd"])
def test_damaged_compressed_data_is_refused(tmp_path, suffix):
    path = tmp_path / f"t1c{suffix}"
    sitk.WriteImage(_volume((40, 40, 40)), str(path), True)
    data = bytearray(path.read_bytes())
    middle = len(data) - (len(data) - 400) // 2
    data[middle:middle + 64] = bytes(64)
    path.write_bytes(bytes(data))
    with pytest.raises(ImageValidationError, match=r"T1c file .* is truncated or corrupted: .*damaged"):
        check_header_payload(path, "T1c")


@pytest.mark.parametrize("compress", [True, False], ids=["compressed", "raw"])
@pytest.mark.parametrize("suffix", [".mha", ".mhd", ".nrrd", ".nhdr"])
def test_complete_files_pass_the_payload_check(tmp_path, suffix, compress):
    """No false alarm: scalar, vector (2 components), 4D and integer images, attached and detached data."""
    images = {
        "float": _volume(),
        "int16": sitk.Cast(_volume() * 1000, sitk.sitkInt16),
        "vector": sitk.Compose(_volume(), _volume()),
        "4d": sitk.JoinSeries([_volume(), _volume()]),
        "uint8": sitk.Cast(_volume() * 100, sitk.sitkUInt8),
        "double": sitk.Cast(_volume(), sitk.sitkFloat64),
    }
    for kind, image in images.items():
        path = tmp_path / f"{kind}{suffix}"
        sitk.WriteImage(image, str(path), compress)
        check_header_payload(path, kind)
    back = read_image(tmp_path / f"float{suffix}", "T1c")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(images["float"]))


def test_payload_check_leaves_other_layouts_to_simpleitk(tmp_path):
    """A header the check does not follow (ASCII data, a data file list) is not refused by it."""
    path = tmp_path / "t1c.mha"
    path.write_text("ObjectType = Image\nNDims = 3\nDimSize = 2 2 2\nElementType = MET_FLOAT\nBinaryData = False\n"
                    "ElementDataFile = LOCAL\n1 2 3 4 5 6 7 8\n", encoding="ascii")
    check_header_payload(path, "T1c")
    listed = tmp_path / "t1c.nhdr"
    listed.write_text("NRRD0004\ntype: float\ndimension: 3\nsizes: 2 2 2\nencoding: raw\ndata file: LIST\na.raw\n",
                      encoding="ascii")
    check_header_payload(listed, "T1c")


def test_4d_images(tmp_path):
    import nibabel as nib

    array = np.random.default_rng(1).random((10, 12, 14, 3)).astype(np.float32)
    path = tmp_path / "adc.nii.gz"
    nib.save(nib.Nifti1Image(array, np.diag([1.0, 1.0, 2.0, 1.0])), str(path))
    with pytest.raises(ImageValidationError, match=r"ADC \(.*adc\.nii\.gz\) holds 3 volumes \(10x12x14x3, 4D\); a single 3D volume"):
        read_image(path, "ADC")
    nrrd = tmp_path / "adc.nrrd"  # the same through ITK (no nibabel pre-check for NRRD)
    sitk.WriteImage(sitk.JoinSeries([_volume(), _volume(), _volume()]), str(nrrd))
    with pytest.raises(ImageValidationError, match=r"holds 3 volumes .*4D"):
        read_image(nrrd, "ADC")
    single = tmp_path / "t1.nii.gz"  # one volume stored as 4D is just a 3D image
    nib.save(nib.Nifti1Image(array[..., :1], np.diag([1.0, 1.0, 2.0, 1.0])), str(single))
    image = read_image(single, "T1")
    assert image.GetSize() == (10, 12, 14)
    np.testing.assert_allclose(sitk.GetArrayFromImage(image), array[..., 0].transpose(2, 1, 0), rtol=1e-6)


def test_field_of_view_beyond_a_head():
    """15 mm voxels on a 67-voxel axis are 1 m: HD-BET would resample that to 1.5 mm (tens of GB)."""
    image = sitk.Image([67, 82, 73], sitk.sitkFloat32) + 1.0
    image[5, 5, 5] = 2.0
    image.SetSpacing((15.0, 15.0, 15.0))
    with pytest.raises(ImageValidationError, match=r"T1c covers 1005 x 1230 x 1095 mm .*is not a head MRI. Check the voxel spacing"):
        read_image(image, "T1c")
    image.SetSpacing((3.0, 3.0, 3.0))  # 201 x 246 x 219 mm: a head
    assert read_image(image, "T1c").GetSize() == (67, 82, 73)


# -- one image discovery path: the suffixes and find_image (issue "House in order", point 3) ----------------------


def test_every_place_uses_the_same_suffix_tuple():
    """The image suffixes are one tuple object, imported everywhere (identity, not equality)."""
    import ast
    from pathlib import Path

    from ContrastAmplifierLib import imagefiles, imageio
    from ContrastAmplifierTrainingLib import cohort
    from LesionReaderLib import study, studyinfo

    assert imageio.IMAGE_SUFFIXES is imagefiles.IMAGE_SUFFIXES
    assert cohort.IMAGE_SUFFIXES is imagefiles.IMAGE_SUFFIXES
    assert study.IMAGE_SUFFIXES is imagefiles.IMAGE_SUFFIXES
    assert studyinfo.find_image is imagefiles.find_image and imageio.find_image is imagefiles.find_image
    # The Slicer module (needs slicer to import): it imports the tuple and spells no list of its own.
    repo = Path(__file__).resolve().parents[2]
    libs = sorted(p for p in repo.glob("*/*Lib/*.py") if p.parts[-3] != "Testing")
    for source in (repo / "ContrastAmplifier" / "ContrastAmplifier.py", *libs):
        tree = ast.parse(source.read_text(encoding="utf-8"))
        # inference.OUTPUT_SUFFIXES is another thing: the formats an output may be written as.
        allowed = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Assign)
                   and any(isinstance(t, ast.Name) and t.id == "OUTPUT_SUFFIXES" for t in n.targets)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Tuple) and source.name != "imagefiles.py" and id(node) not in allowed:
                values = {e.value for e in node.elts if isinstance(e, ast.Constant)}
                assert not {".nii.gz", ".nrrd"} <= values, f"{source}: a list of image suffixes of its own; use imagefiles"
    module = ast.parse((repo / "ContrastAmplifier" / "ContrastAmplifier.py").read_text(encoding="utf-8"))
    assert any(isinstance(n, ast.ImportFrom) and n.module == "ContrastAmplifierLib.imagefiles"
               and any(a.name == "IMAGE_SUFFIXES" for a in n.names) for n in module.body)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"])
def test_find_image_each_suffix_and_upper_case(tmp_path, suffix):
    from ContrastAmplifierLib.imagefiles import IMAGE_SUFFIXES, find_image

    assert suffix in IMAGE_SUFFIXES
    (tmp_path / f"t1c{suffix}").write_bytes(b"x")
    (tmp_path / "t1.nii.gz").write_bytes(b"x")  # another stem
    (tmp_path / "t1c.txt").write_bytes(b"x")  # not an image
    assert find_image(tmp_path, "t1c") == tmp_path / f"t1c{suffix}"
    assert find_image(tmp_path, "T1C") == tmp_path / f"t1c{suffix}"
    upper = tmp_path / "upper"
    upper.mkdir()
    (upper / f"T1C{suffix.upper()}").write_bytes(b"x")
    assert find_image(upper, "t1c") == upper / f"T1C{suffix.upper()}"
    assert find_image(tmp_path, "adc") is None
    assert find_image(tmp_path / "missing", "t1c") is None


def test_find_image_dicom_folder_and_ambiguity(tmp_path):
    from ContrastAmplifierLib.imagefiles import find_image

    (tmp_path / "T1c").mkdir()
    assert find_image(tmp_path, "t1c") == tmp_path / "T1c"
    assert find_image(tmp_path, "t1c", folders=False) is None
    (tmp_path / "t1c.nrrd").write_bytes(b"x")
    with pytest.raises(ImageValidationError, match=r"t1c is ambiguous in .*: T1c, t1c\.nrrd"):
        find_image(tmp_path, "t1c")
    assert find_image(tmp_path, "t1c", folders=False) == tmp_path / "t1c.nrrd"
    (tmp_path / "T1C.nii.gz").write_bytes(b"x")
    with pytest.raises(ImageValidationError, match=r"T1c is ambiguous in .*T1C\.nii\.gz.*t1c\.nrrd"):
        find_image(tmp_path, "t1c", folders=False, name="T1c")


def test_dicom_series_reader_refuses_empty_and_mixed_folders(tmp_path):
    from ContrastAmplifierLib.imagefiles import dicom_series_files

    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageValidationError, match=r"T1c folder .*empty holds no DICOM series"):
        read_image(tmp_path / "empty", "T1c")
    with pytest.raises(ImageValidationError, match="holds no DICOM series"):
        dicom_series_files(tmp_path / "empty")


def test_series_too_thin_for_a_brain_is_named_with_its_slices():
    from ContrastAmplifierLib.imageio import MIN_SERIES_EXTENT_MM, check_series_extent

    scout = sitk.Image([256, 256, 3], sitk.sitkFloat32)
    scout.SetSpacing((0.9, 0.9, 5.0))
    with pytest.raises(ImageValidationError, match=re.escape(
            "T2-FLAIR covers only 15 mm along its third axis (3 slices of 5 mm; at least 60 mm needed): a localiser")):
        check_series_extent(scout, "T2-FLAIR")
    whole = sitk.Image([256, 256, 12], sitk.sitkFloat32)
    whole.SetSpacing((0.9, 0.9, MIN_SERIES_EXTENT_MM / 12))  # exactly 60 mm: a (short) whole-brain stack
    check_series_extent(whole, "T1")
