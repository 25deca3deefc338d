"""T1c-pro as a DICOM series (issue 16): same study as a DICOM T1c, a de-identified study for a NIfTI T1c.

The DICOM T1c series here are written with pydicom like a scanner's: MR Image Storage, one file
per slice, an oblique stack (tilted 15 and 10 degrees, so a swapped axis or sign shows), int16 or
uint16 pixels, a patient name in ISO_IR 100. T1c-pro is a made-up image on that grid (the network
is not needed to check the writer); one test runs ``predict --out-dicom`` end to end. Every file
written is checked with dciodvfy (dicom3tools) when it is installed, read back with SimpleITK and
pydicom, and compared with the T1c's geometry and T1c-pro's values.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import SimpleITK as sitk

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian  # noqa: E402

from ContrastAmplifierCommon.outputs import OutputPathError  # noqa: E402
from ContrastAmplifierCommon.progress import CancelToken, Cancelled  # noqa: E402
from ContrastAmplifierLib import dicom_series as ds_mod  # noqa: E402
from ContrastAmplifierLib.dicom_series import (  # noqa: E402
    DEIDENTIFIED_PATIENT_NAME,
    MR_IMAGE_STORAGE,
    DicomOutputError,
    ModelLabel,
    check_dicom_output_folder,
    choose_scaling,
    series_description,
    write_t1c_pro_series,
)
from ContrastAmplifierLib.imageio import read_image  # noqa: E402

DEMO_MODEL = ModelLabel("phantom-demo", "1.0", "synthetic phantom demo - not for clinical use")
SIZE = (48, 44, 20)  # x (columns), y (rows), slices
PATIENT = {"PatientName": "MÜLLER^JANE", "PatientID": "PAT-0042", "PatientBirthDate": "19700101", "PatientSex": "F",
           "AccessionNumber": "ACC-77", "StudyID": "S1", "StudyDescription": "MRI brain with contrast"}


def _rotation(tilt_deg: float = 15.0, turn_deg: float = 10.0) -> np.ndarray:
    """Columns: row direction, column direction, slice normal (an oblique axial stack)."""
    a, b = math.radians(tilt_deg), math.radians(turn_deg)
    about_x = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    about_z = np.array([[math.cos(b), -math.sin(b), 0], [math.sin(b), math.cos(b), 0], [0, 0, 1]])
    return about_z @ about_x


def _write_dataset(dataset: Dataset, path: Path) -> None:
    if int(pydicom.__version__.split(".")[0]) >= 3:
        pydicom.dcmwrite(str(path), dataset, enforce_file_format=True)
    else:
        dataset.is_little_endian, dataset.is_implicit_VR = True, False
        pydicom.dcmwrite(str(path), dataset, write_like_original=False)


def write_t1c_series(folder: Path, volume: np.ndarray, spacing=(0.9, 0.8, 2.5), origin=(-20.0, -25.0, -18.0),
                     rotation: Optional[np.ndarray] = None, series_number: int = 7, series_uid: Optional[str] = None,
                     study_uid: str = "1.2.826.0.1.3680043.8.498.161", frame_uid: str = "1.2.826.0.1.3680043.8.498.162",
                     description: str = "T1 MPRAGE post Gd") -> list[Path]:
    """One MR Image Storage file per slice of ``volume`` (z, y, x; int16 or uint16), like a scanner's export."""
    folder.mkdir(parents=True, exist_ok=True)
    rotation = _rotation() if rotation is None else rotation
    series_uid = series_uid or f"1.2.826.0.1.3680043.8.498.{int(hashlib.sha256(str(folder).encode()).hexdigest(), 16) % 10**12}"
    signed = volume.dtype.kind == "i"
    paths = []
    for k in range(volume.shape[0]):
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 100"
        for key, value in PATIENT.items():
            setattr(ds, key, value)
        uid = f"{series_uid}.{k + 1}"
        ds.SOPClassUID, ds.SOPInstanceUID = MR_IMAGE_STORAGE, uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.StudyDate, ds.StudyTime, ds.ReferringPhysicianName, ds.PositionReferenceIndicator = "20240102", "101500", "", ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber, ds.SeriesDescription = "MR", series_number, k + 1, description
        ds.Manufacturer, ds.PatientPosition, ds.BodyPartExamined = "ACME", "HFS", "HEAD"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        position = np.asarray(origin) + k * spacing[2] * rotation[:, 2]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*rotation[:, 0], *rotation[:, 1])]
        ds.PixelSpacing = [f"{spacing[1]:g}", f"{spacing[0]:g}"]
        ds.SliceThickness = f"{spacing[2]:g}"
        ds.SliceLocation = f"{float(position @ rotation[:, 2]):.4f}"
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = ["GR", "IR"], ["SP", "MP"], "", "3D"
        ds.RepetitionTime, ds.EchoTime, ds.EchoTrainLength, ds.InversionTime = "2300", "2.98", "1", "900"
        ds.FlipAngle, ds.MagneticFieldStrength, ds.ContrastBolusAgent = "9", "3", "gadoterate 0.1 mmol/kg"
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[2]
        bits_stored = 12 if not signed and int(volume.max()) < 4096 else 16
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, bits_stored - 1, int(signed)
        ds.WindowCenter, ds.WindowWidth = "600", "1200"
        ds.PixelData = np.ascontiguousarray(volume[k].astype("<i2" if signed else "<u2")).tobytes()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MR_IMAGE_STORAGE, uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        path = folder / f"IM{k + 1:04d}"
        _write_dataset(ds, path)
        paths.append(path)
    return paths


def _volume(dtype=np.int16, slices: int = SIZE[2], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[0:slices, 0:SIZE[1], 0:SIZE[0]]
    head = ((x - SIZE[0] / 2) ** 2 / 400 + (y - SIZE[1] / 2) ** 2 / 350 + (z - slices / 2) ** 2 / 80) < 1
    values = np.where(head, 500 + 4 * x + 3 * y + 10 * z, 8) + rng.integers(0, 20, head.shape)
    if dtype == np.int16:
        values = values - 200  # negative values too
    return values.astype(dtype)


def _t1c_pro(t1c: sitk.Image, seed: int = 1) -> sitk.Image:
    """A made-up T1c-pro on the T1c's grid: brighter, with fractional values and a hot 'lesion'."""
    array = sitk.GetArrayFromImage(t1c).astype(np.float32)
    rng = np.random.default_rng(seed)
    pro = array * 1.37 + rng.normal(0, 3, array.shape).astype(np.float32) + 0.25
    pro[8:11, 20:24, 20:26] += 900.5
    image = sitk.GetImageFromArray(pro.astype(np.float32))
    image.CopyInformation(t1c)
    return image


def _dciodvfy_errors(path: Path) -> list[str]:
    done = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error")]


def assert_dciodvfy_clean(files) -> None:
    """Every file passes dciodvfy without an Error line (warnings allowed: dciodvfy notes that the MR
    IOD has no Modality LUT module, i.e. Rescale Slope/Intercept, which every reader applies), and
    dcentvfy finds the patient, study and series attributes consistent across the files. Skipped
    when dicom3tools is absent."""
    if shutil.which("dciodvfy") is None or shutil.which("dcentvfy") is None:
        pytest.skip("dciodvfy (dicom3tools) is not on PATH: `make system-deps` installs it (apt-get install dicom3tools)")
    for path in files:
        errors = _dciodvfy_errors(Path(path))
        assert not errors, f"{path}: {errors}"
    done = subprocess.run(["dcentvfy", *map(str, files)], capture_output=True, text=True, timeout=120)
    entity_errors = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error")]
    assert done.returncode == 0 and not entity_errors, entity_errors


def _read_back(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def _assert_same_grid(image: sitk.Image, reference: sitk.Image) -> None:
    assert image.GetSize() == reference.GetSize()
    np.testing.assert_allclose(image.GetOrigin(), reference.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(image.GetSpacing(), reference.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(image.GetDirection(), reference.GetDirection(), atol=1e-4)


def _headers(result) -> list:
    return [pydicom.dcmread(str(path)) for path in result.files]


def _decoded(ds) -> np.ndarray:
    return ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


@pytest.fixture(scope="module")
def dicom_t1c(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("dicom") / "t1c"
    write_t1c_series(folder, _volume(np.int16))
    return folder


# -- a DICOM T1c: the T1c's study ------------------------------------------------------------------


@pytest.mark.parametrize("dtype, spacing", [(np.int16, (0.9, 0.8, 2.5)), (np.uint16, (0.9, 0.8, 2.5)),
                                            (np.uint16, (0.9, 0.9, 5.0))], ids=["int16", "uint16", "5mm"])
def test_dicom_t1c_gives_a_new_series_of_its_study_on_its_grid(tmp_path, dtype, spacing):
    folder = tmp_path / "t1c"
    sources = write_t1c_series(folder, _volume(dtype, slices=12 if spacing[2] == 5.0 else SIZE[2]), spacing=spacing)
    t1c = read_image(folder, "T1c")
    pro = _t1c_pro(t1c)
    out = tmp_path / "pro-dicom"
    result = write_t1c_pro_series(pro, out, t1c=folder, model=DEMO_MODEL, details="5 folds x 8 mirrorings")
    assert result.from_dicom and result.folder == out.resolve()
    assert [p.name for p in sorted(out.iterdir())] == [f"T1c-pro_{k:04d}.dcm" for k in range(1, len(sources) + 1)]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left
    assert_dciodvfy_clean(result.files)

    source = [pydicom.dcmread(str(p), stop_before_pixels=True) for p in sources]
    headers = _headers(result)
    for k, (ds, src) in enumerate(zip(headers, source)):
        assert ds.SOPClassUID == MR_IMAGE_STORAGE and ds.Modality == "MR"
        assert list(ds.ImageType) == ["DERIVED", "SECONDARY", "OTHER"]
        for keyword in ("StudyInstanceUID", "FrameOfReferenceUID", "PatientID", "PatientBirthDate", "AccessionNumber",
                        "SpecificCharacterSet", "StudyDescription"):
            assert ds[keyword].value == src[keyword].value, keyword
        assert str(ds.PatientName) == "MÜLLER^JANE"
        assert ds.SeriesInstanceUID != src.SeriesInstanceUID and ds.SeriesInstanceUID == result.series_uid
        assert ds.InstanceNumber == k + 1 and ds.SeriesNumber == 701
        assert list(ds.ImagePositionPatient) == list(src.ImagePositionPatient)  # the T1c's own values, verbatim
        assert list(ds.ImageOrientationPatient) == list(src.ImageOrientationPatient)
        assert (ds.BitsAllocated, ds.BitsStored, ds.PixelRepresentation) == (16, 16, src.PixelRepresentation)
        (reference,) = ds.SourceImageSequence
        assert (reference.ReferencedSOPClassUID, reference.ReferencedSOPInstanceUID) == (src.SOPClassUID, src.SOPInstanceUID)
        assert reference.PurposeOfReferenceCodeSequence[0].CodeValue == "121322"
        assert ds.RelatedSeriesSequence[0].SeriesInstanceUID == src.SeriesInstanceUID
        assert ds.SeriesDescription == "T1c-pro (contrast amplified, phantom-demo) NOT FOR CLINICAL USE"
        assert "synthetic phantom demo - not for clinical use" in ds.ImageComments
        assert src.SeriesInstanceUID in ds.DerivationDescription and "5 folds x 8 mirrorings" in ds.DerivationDescription
        assert (list(ds.ScanningSequence), ds.RepetitionTime, ds.ContrastBolusAgent) == (["GR", "IR"], src.RepetitionTime, src.ContrastBolusAgent)
        assert (ds.WindowCenter, ds.WindowWidth) == (600, 1200)
    uids = [ds.SOPInstanceUID for ds in headers]
    assert len(set(uids)) == len(uids) and not set(uids) & {s.SOPInstanceUID for s in source}

    expected = sitk.GetArrayFromImage(pro).astype(np.float64)
    slope = result.scaling.slope
    decoded = np.stack([_decoded(ds) for ds in headers])
    assert np.abs(decoded - expected).max() <= slope / 2 + 1e-6 * np.abs(expected).max()
    stored = np.stack([ds.pixel_array for ds in headers])
    low, high = np.iinfo(stored.dtype).min, np.iinfo(stored.dtype).max
    assert stored.min() == low + 1 and stored.max() >= high - 2  # the whole range is used
    back = _read_back(out)
    _assert_same_grid(back, t1c)
    assert np.abs(sitk.GetArrayFromImage(back) - expected).max() <= slope / 2 + 1e-3


def test_uids_are_reproducible_and_follow_the_content(tmp_path, dicom_t1c):
    t1c = read_image(dicom_t1c, "T1c")
    pro = _t1c_pro(t1c)
    first = write_t1c_pro_series(pro, tmp_path / "a", t1c=dicom_t1c, model=DEMO_MODEL)
    again = write_t1c_pro_series(pro, tmp_path / "b", t1c=dicom_t1c, model=DEMO_MODEL)
    assert (again.series_uid, again.sop_instance_uids) == (first.series_uid, first.sop_instance_uids)
    # A rerun of the same prediction differs in float rounding in a few voxels (multi-threaded ITK):
    # the UIDs stay, so a rerun sends no second copy. A real change of one voxel gives new UIDs.
    values = sitk.GetArrayFromImage(pro)
    step = 2.0 ** np.floor(np.log2(float(values.max() - values.min()) / ds_mod.UID_CONTENT_LEVELS))
    rounding = sitk.Image(pro)
    for index in ((10, 10, 3), (5, 7, 1), (20, 3, 2)):
        value = float(rounding[index])
        rounding[index] = value + (3e-5 if np.floor((value + 3e-5) / step) == np.floor(value / step) else -3e-5)
    rerun = write_t1c_pro_series(rounding, tmp_path / "r", t1c=dicom_t1c, model=DEMO_MODEL)
    assert (rerun.series_uid, rerun.sop_instance_uids) == (first.series_uid, first.sop_instance_uids)
    changed = sitk.Image(pro)
    changed[10, 10, 3] = changed[10, 10, 3] + 2 * step
    other = write_t1c_pro_series(changed, tmp_path / "c", t1c=dicom_t1c, model=DEMO_MODEL)
    assert other.series_uid != first.series_uid
    assert not set(other.sop_instance_uids) & set(first.sop_instance_uids)
    assert (other.study_uid, other.frame_of_reference_uid) == (first.study_uid, first.frame_of_reference_uid)
    relabelled = write_t1c_pro_series(pro, tmp_path / "d", t1c=dicom_t1c, model=ModelLabel("other", "2", "research"))
    assert relabelled.series_uid != first.series_uid
    saved = tmp_path / "T1c-pro.nii.gz"  # the same voxels from the T1c-pro file (float32 geometry): same UIDs
    sitk.WriteImage(pro, str(saved))
    from_file = write_t1c_pro_series(saved, tmp_path / "e", t1c=dicom_t1c, model=DEMO_MODEL)
    assert (from_file.series_uid, from_file.sop_instance_uids) == (first.series_uid, first.sop_instance_uids)


def test_other_dicom_inputs_are_referenced(tmp_path, dicom_t1c):
    """A T1 series on the T1c's frame: each instance names the T1 slice nearest to it; a T2-FLAIR on
    another frame is named at series level only; a NIfTI ADC not at all."""
    rotation = _rotation(0.0, 0.0)
    t1 = tmp_path / "t1"
    write_t1c_series(t1, _volume(np.int16, slices=8), spacing=(1.0, 1.0, 5.0), origin=(-20.0, -25.0, -20.0),
                     rotation=rotation, series_number=3, description="T1 SE")
    flair = tmp_path / "flair"
    write_t1c_series(flair, _volume(np.int16, slices=8), spacing=(1.0, 1.0, 5.0), rotation=rotation, series_number=4,
                     frame_uid="1.2.826.0.1.3680043.8.498.999", description="FLAIR")
    adc = tmp_path / "adc.nii.gz"
    sitk.WriteImage(sitk.Image(8, 8, 8, sitk.sitkFloat32), str(adc))
    t1c = read_image(dicom_t1c, "T1c")
    result = write_t1c_pro_series(_t1c_pro(t1c), tmp_path / "out", t1c=dicom_t1c, model=DEMO_MODEL,
                                  sources={"t1": t1, "flair": flair, "adc": adc})
    assert_dciodvfy_clean(result.files[:3])
    t1_headers = {pydicom.dcmread(str(p), stop_before_pixels=True).SOPInstanceUID: p for p in sorted(t1.iterdir())}
    headers = _headers(result)
    related = [item.SeriesInstanceUID for item in headers[0].RelatedSeriesSequence]
    assert len(related) == 3  # T1c, T1, T2-FLAIR
    referenced_t1 = [[r.ReferencedSOPInstanceUID for r in ds.SourceImageSequence[1:]] for ds in headers]
    assert all(len(refs) <= 1 for refs in referenced_t1) and any(referenced_t1)
    assert {uid for refs in referenced_t1 for uid in refs} <= set(t1_headers)
    assert "T1 series" in headers[0].DerivationDescription and "T2-FLAIR series" in headers[0].DerivationDescription


# -- a NIfTI T1c: a new, de-identified study ---------------------------------------------------------


@pytest.mark.parametrize("pixel", [sitk.sitkInt16, sitk.sitkFloat32])
def test_nifti_t1c_gives_a_deidentified_new_study(tmp_path, pixel):
    t1c_array = _volume(np.int16).astype(np.float32)
    t1c = sitk.Cast(sitk.GetImageFromArray(t1c_array), pixel)
    t1c.SetSpacing((0.9, 0.8, 2.5))
    t1c.SetOrigin((31.0, -12.0, 7.5))
    t1c.SetDirection(_rotation(-20.0, 30.0).flatten().tolist())
    path = tmp_path / "t1c.nii.gz"
    sitk.WriteImage(t1c, str(path))
    native = read_image(path, "T1c")
    pro = _t1c_pro(native)
    result = write_t1c_pro_series(pro, tmp_path / "out", t1c=path, model=DEMO_MODEL)
    assert not result.from_dicom
    assert_dciodvfy_clean(result.files)
    headers = _headers(result)
    first = headers[0]
    assert str(first.PatientName) == DEIDENTIFIED_PATIENT_NAME and first.PatientIdentityRemoved == "YES"
    assert first.DeidentificationMethod and "non-DICOM" in first.ImageComments
    assert first.PatientID.startswith("CA-") and first.PatientBirthDate == "" and "SourceImageSequence" not in first
    assert len({(ds.StudyInstanceUID, ds.FrameOfReferenceUID, ds.SeriesInstanceUID) for ds in headers}) == 1
    assert (first.BitsAllocated, first.PixelRepresentation) == (16, 1)
    assert float(first.SliceThickness) == pytest.approx(2.5) and float(first.SpacingBetweenSlices) == pytest.approx(2.5)
    back = _read_back(result.folder)
    _assert_same_grid(back, native)  # LPS both sides: no sign change
    expected = sitk.GetArrayFromImage(pro).astype(np.float64)
    assert np.abs(sitk.GetArrayFromImage(back) - expected).max() <= result.scaling.slope / 2 + 1e-3
    again = write_t1c_pro_series(_t1c_pro(native, seed=5), tmp_path / "again", t1c=path, model=DEMO_MODEL)
    assert (again.study_uid, again.frame_of_reference_uid) == (result.study_uid, result.frame_of_reference_uid)
    assert again.series_uid != result.series_uid


def test_uint16_nifti_t1c_is_stored_unsigned(tmp_path):
    t1c = sitk.GetImageFromArray(_volume(np.uint16, slices=6))
    path = tmp_path / "t1c.nrrd"
    sitk.WriteImage(t1c, str(path))
    result = write_t1c_pro_series(_t1c_pro(read_image(path, "T1c")), tmp_path / "out", t1c=path)
    assert (result.scaling.bits, result.scaling.signed) == (16, False)
    first = pydicom.dcmread(str(result.files[0]))
    assert first.PixelRepresentation == 0 and first.SeriesDescription == "T1c-pro (contrast amplified, unknown model)"
    assert_dciodvfy_clean(result.files[:2])


# -- the output folder -------------------------------------------------------------------------------


def test_existing_folder_is_refused_before_any_work_unless_overwrite(tmp_path, dicom_t1c, monkeypatch):
    t1c = read_image(dicom_t1c, "T1c")
    pro = _t1c_pro(t1c)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep", encoding="utf-8")
    monkeypatch.setattr(ds_mod, "read_source_series", lambda *a, **k: pytest.fail("work started before the check"))
    with pytest.raises(OutputPathError, match=rf"DICOM output folder {out} is not empty \(notes.txt\); pass --overwrite"):
        write_t1c_pro_series(pro, out, t1c=dicom_t1c)
    with pytest.raises(OutputPathError, match=r"holds notes.txt, which this command did not write; --overwrite only"):
        write_t1c_pro_series(pro, out, t1c=dicom_t1c, overwrite=True)
    with pytest.raises(OutputPathError, match="contains the input"):
        check_dicom_output_folder(dicom_t1c.parent, inputs=[dicom_t1c], overwrite=True)
    with pytest.raises(OutputPathError, match="would hold the T1c-pro file"):
        check_dicom_output_folder(tmp_path / "new", outputs=[tmp_path / "new" / "T1c-pro.nii.gz"])
    (tmp_path / "file").write_text("x", encoding="utf-8")
    with pytest.raises(OutputPathError, match="is an existing file"):
        check_dicom_output_folder(tmp_path / "file")
    assert (out / "notes.txt").read_text(encoding="utf-8") == "keep" and len(list(out.iterdir())) == 1


def test_overwrite_replaces_an_earlier_series_whole(tmp_path, dicom_t1c):
    t1c = read_image(dicom_t1c, "T1c")
    out = tmp_path / "out"
    write_t1c_pro_series(_t1c_pro(t1c), out, t1c=dicom_t1c)
    (out / "T1c-pro_0099.dcm").write_bytes((out / "T1c-pro_0001.dcm").read_bytes())  # a longer earlier series
    with pytest.raises(OutputPathError, match="not empty"):
        write_t1c_pro_series(_t1c_pro(t1c, seed=2), out, t1c=dicom_t1c)
    result = write_t1c_pro_series(_t1c_pro(t1c, seed=2), out, t1c=dicom_t1c, overwrite=True)
    assert sorted(out.iterdir()) == result.files  # nothing of the earlier series is left
    assert {pydicom.dcmread(str(p)).SeriesInstanceUID for p in result.files} == {result.series_uid}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert len(write_t1c_pro_series(_t1c_pro(t1c), empty, t1c=dicom_t1c).files) == SIZE[2]


@pytest.mark.parametrize("existing", [False, True])
def test_a_failure_or_cancel_leaves_no_half_written_series(tmp_path, dicom_t1c, monkeypatch, existing):
    t1c = read_image(dicom_t1c, "T1c")
    out = tmp_path / "out"
    if existing:
        write_t1c_pro_series(_t1c_pro(t1c), out, t1c=dicom_t1c)
    before = {p.name: p.read_bytes() for p in out.iterdir()} if existing else None
    calls = {"n": 0}
    real = ds_mod._write_dataset

    def failing(dataset, path):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(28, "No space left on device", str(path))
        real(dataset, path)

    monkeypatch.setattr(ds_mod, "_write_dataset", failing)
    with pytest.raises(OSError, match="No space left"):
        write_t1c_pro_series(_t1c_pro(t1c, seed=3), out, t1c=dicom_t1c, overwrite=True)
    monkeypatch.setattr(ds_mod, "_write_dataset", real)
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        write_t1c_pro_series(_t1c_pro(t1c, seed=3), out, t1c=dicom_t1c, overwrite=True, cancel=token)
    if existing:
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the earlier series, untouched
    else:
        assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_t1c_pro_off_the_t1c_grid_is_refused(tmp_path, dicom_t1c):
    pro = _t1c_pro(read_image(dicom_t1c, "T1c"))
    shifted = sitk.Image(pro)
    shifted.SetOrigin(tuple(np.asarray(pro.GetOrigin()) + 1.0))
    with pytest.raises(DicomOutputError, match=r"T1c-pro does not lie on the grid of the T1c series .*t1c: slice 1"):
        write_t1c_pro_series(shifted, tmp_path / "out", t1c=dicom_t1c)
    with pytest.raises(DicomOutputError, match="T1c-pro has 10 slices but the T1c series"):
        write_t1c_pro_series(pro[:, :, :10], tmp_path / "out", t1c=dicom_t1c)
    assert not (tmp_path / "out").exists()


# -- pieces ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("low, high", [(0.0, 1000.0), (-350.25, 4000.75), (1e6, 1e6 + 0.003), (5.0, 5.0), (-1e-4, 2e-4)])
@pytest.mark.parametrize("signed", [True, False])
def test_scaling_uses_the_whole_range_and_keeps_values_within_half_a_step(low, high, signed):
    values = np.concatenate([[low, high], np.random.default_rng(0).uniform(low, high, 5000)])
    scaling = choose_scaling(values, 16, signed)
    assert len(scaling.slope_text) <= 16 and len(scaling.intercept_text) <= 16
    assert float(scaling.slope_text) == scaling.slope and float(scaling.intercept_text) == scaling.intercept
    stored = scaling.to_stored(values)
    decoded = scaling.to_real(stored)
    assert np.abs(decoded - values).max() <= scaling.max_error + 4 * np.spacing(np.abs(values).max())  # + float rounding
    low_limit, high_limit = scaling.limits
    assert stored.min() == low_limit + 1
    if high > low:
        assert stored.max() >= high_limit - 2
    with pytest.raises(DicomOutputError, match="non-finite"):
        choose_scaling(np.array([0.0, np.nan]))


def test_series_description_keeps_the_warning_within_64_characters():
    assert series_description(DEMO_MODEL) == "T1c-pro (contrast amplified, phantom-demo) NOT FOR CLINICAL USE"
    short = ModelLabel("m", "1", "research only - not for clinical use")
    assert series_description(short) == "T1c-pro (m) - research only - not for clinical use"  # the label itself, when it fits
    long = ModelLabel("a-very-long-model-name-that-goes-on-and-on-and-on-forever", "3", "tests only - not for clinical use")
    text = series_description(long)
    assert len(text) <= 64 and text.endswith("NOT FOR CLINICAL USE") and text.startswith("T1c-pro (a-very-long")
    assert series_description(ModelLabel("clinic-model", "2", "clinical use (CE)")) == "T1c-pro (contrast amplified, clinic-model)"
    assert len(series_description(ModelLabel("x" * 90))) <= 64
    assert ModelLabel.of({"name": "n", "version": "1", "intended_use": "u"}) == ModelLabel("n", "1", "u")


def test_model_label_of_a_bundle():
    from ContrastAmplifierLib.registry import list_models

    shipped = [entry for entry in list_models() if entry.source == "builtin"]
    if not shipped:
        pytest.skip("no shipped bundle in this installation")
    label = ModelLabel.of(shipped[0])
    assert label.name == shipped[0].name and label.intended_use == shipped[0].intended_use
    from ContrastAmplifierLib.bundle import ModelBundle

    bundle = ModelBundle(shipped[0].path, {"name": "b", "version": "2", "intended_use": "synthetic phantom demo - not for clinical use"})
    assert ModelLabel.of(bundle).not_for_clinical_use


def test_missing_pydicom_is_named_with_the_fix(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "pydicom", None)
    with pytest.raises(DicomOutputError, match=r"needs pydicom.*pip install 'SlicerContrastAmplifier\[dicom\]'"):
        check_dicom_output_folder(tmp_path / "out")


# -- through amplify_case, predict and predict-cohort -------------------------------------------------


def _dicom_case(tmp_path: Path, case_dir: Path) -> Path:
    """The small phantom case with its T1c as a DICOM series folder (uint16, like many scanners)."""
    case = tmp_path / "case"
    case.mkdir()
    for name in ("t1", "flair", "adc", "brain_mask"):
        shutil.copy(case_dir / f"{name}.nii.gz", case / f"{name}.nii.gz")
    t1c = sitk.ReadImage(str(case_dir / "t1c.nii.gz"), sitk.sitkFloat32)
    array = np.clip(np.rint(sitk.GetArrayFromImage(t1c)), 0, 65535).astype(np.uint16)
    direction = np.asarray(t1c.GetDirection()).reshape(3, 3)
    spacing = t1c.GetSpacing()
    write_t1c_series(case / "t1c", array, spacing=spacing, origin=t1c.GetOrigin(), rotation=direction)
    return case


@pytest.fixture
def orthanc_server_or_skip(request):
    """The test PACS (:func:`conftest.orthanc`), or None where Orthanc is not installed: the end-to-end
    test then leaves its --send part out instead of being skipped whole."""
    try:
        return request.getfixturevalue("orthanc")
    except pytest.skip.Exception:
        return None


def _predict_cli(case: Path, bundle: Path, *extra: str, env: Optional[dict] = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "ContrastAmplifierLib.cli", "predict", *[
        arg for m in ("t1", "flair", "adc") for arg in (f"--{m}", str(case / f"{m}.nii.gz"))], "--t1c", str(case / "t1c"),
        "--model", str(bundle), "--flips", "1", "--folds", "0", "--device", "cpu",
        "--brain-mask", str(case / "brain_mask.nii.gz"), "--threads", "1", "--progress", "json", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                          timeout=300)


def test_predict_refuses_a_non_empty_dicom_folder_before_any_work(tmp_path, small_case_dir, random_bundle_dir):
    case = _dicom_case(tmp_path, small_case_dir)
    out = tmp_path / "series"
    out.mkdir()
    (out / "old.dcm").write_bytes(b"x")
    done = _predict_cli(case, random_bundle_dir, "--out", str(tmp_path / "pro.nii.gz"), "--out-dicom", str(out))
    assert done.returncode == 2, done.stderr
    assert f"DICOM output folder {out} is not empty (old.dcm); pass --overwrite" in done.stderr
    assert done.stdout == "" and "Traceback" not in done.stderr  # no progress: refused before any work
    assert not (tmp_path / "pro.nii.gz").exists() and [p.name for p in out.iterdir()] == ["old.dcm"]
    nothing = _predict_cli(case, random_bundle_dir)
    assert nothing.returncode == 2 and "give --out FILE, --out-dicom DIR or both" in nothing.stderr
    for extra, message in ((["--send", "http://127.0.0.1:9/dicom-web"], "--send sends the DICOM series: add --out-dicom DIR"),
                           (["--out-dicom", str(tmp_path / "new"), "--send", "nosuchname"], "nosuchname")):
        refused = _predict_cli(case, random_bundle_dir, "--out", str(tmp_path / "pro.nii.gz"), *extra)
        assert refused.returncode == 2 and message in refused.stderr and refused.stdout == "", refused.stderr
    lonely = _predict_cli(case, random_bundle_dir, "--out", str(tmp_path / "pro.nii.gz"), "--t1c-dicom", str(case / "t1c"))
    assert lonely.returncode == 2 and "is only used for a DICOM output; add an output folder (--out-dicom DIR)" in lonely.stderr


@pytest.mark.slow
def test_predict_writes_the_dicom_series_end_to_end(tmp_path, small_case_dir, random_bundle_dir, orthanc_server_or_skip):
    case = _dicom_case(tmp_path, small_case_dir)
    out = tmp_path / "series"
    done = _predict_cli(case, random_bundle_dir, "--out", str(tmp_path / "pro.nii.gz"), "--out-dicom", str(out))
    assert done.returncode == 0, done.stderr
    assert f"wrote {tmp_path / 'pro.nii.gz'}" in done.stderr and f"and the DICOM series {out}" in done.stderr
    files = sorted(out.iterdir())
    t1c = read_image(case / "t1c", "T1c")
    assert len(files) == t1c.GetSize()[2]
    assert_dciodvfy_clean(files)
    pro = sitk.ReadImage(str(tmp_path / "pro.nii.gz"))
    back = _read_back(out)
    _assert_same_grid(back, t1c)
    first = pydicom.dcmread(str(files[0]))
    assert np.abs(sitk.GetArrayFromImage(back) - sitk.GetArrayFromImage(pro)).max() <= float(first.RescaleSlope) / 2 + 1e-3
    source = pydicom.dcmread(str(sorted((case / "t1c").iterdir())[0]), stop_before_pixels=True)
    assert (first.StudyInstanceUID, first.PatientID) == (source.StudyInstanceUID, source.PatientID)
    assert first.PixelRepresentation == 0 and "random-tiny" in first.SeriesDescription
    assert "1 predictions" in first.DerivationDescription and "tests only" in first.ImageComments
    again = _predict_cli(case, random_bundle_dir, "--out-dicom", str(out), "--overwrite")
    assert again.returncode == 0, again.stderr
    assert [pydicom.dcmread(str(p)).SOPInstanceUID for p in sorted(out.iterdir())] == \
        [pydicom.dcmread(str(p)).SOPInstanceUID for p in files]  # same prediction, same UIDs
    # --send: the series goes to a real PACS (Orthanc over DICOMweb, credentials in the environment).
    if orthanc_server_or_skip is not None:
        pacs = orthanc_server_or_skip
        before = len(pacs.rest("/instances"))
        env = {"CA_PACS_USER": pacs.user, "CA_PACS_PASSWORD": pacs.password}
        sent = _predict_cli(case, random_bundle_dir, "--out-dicom", str(out), "--overwrite", "--send", pacs.dicomweb_url,
                            env=env)
        assert sent.returncode == 0, sent.stderr
        assert f"sent {len(files)} of {len(files)} instances to" in sent.stderr and pacs.password not in sent.stderr + sent.stdout
        stored = {pacs.rest(f"/instances/{i}/simplified-tags")["SOPInstanceUID"] for i in pacs.rest("/instances")}
        assert len(stored) == before + len(files) and {pydicom.dcmread(str(p)).SOPInstanceUID for p in files} <= stored
    # Slicer's way: the T1c exported to NRRD from its node, the DICOM series it was loaded from beside it.
    sitk.WriteImage(t1c, str(tmp_path / "t1c.nrrd"))
    slicer = _predict_cli(case, random_bundle_dir, "--t1c", str(tmp_path / "t1c.nrrd"),  # the last --t1c counts
                          "--out-dicom", str(tmp_path / "from-slicer"), "--t1c-dicom", str(case / "t1c"))
    assert slicer.returncode == 0, slicer.stderr
    joined = pydicom.dcmread(str(sorted((tmp_path / "from-slicer").iterdir())[0]))
    assert (joined.StudyInstanceUID, joined.PatientID, joined.FrameOfReferenceUID) == (
        source.StudyInstanceUID, source.PatientID, source.FrameOfReferenceUID)


def _nifti_cohort(tmp_path: Path, case_dir: Path) -> Path:
    cases = tmp_path / "cases"
    (cases / "case_a").mkdir(parents=True)
    for name in ("t1", "flair", "adc", "t1c", "brain_mask"):
        shutil.copy(case_dir / f"{name}.nii.gz", cases / "case_a" / f"{name}.nii.gz")
    return cases


def test_cohort_completes_a_missing_series_from_the_existing_t1c_pro(tmp_path, small_case_dir, random_bundle_dir, monkeypatch):
    """A case done before (T1c-pro file there) gets its series from that file, without recomputing."""
    import csv

    from ContrastAmplifierLib import inference
    from ContrastAmplifierLib.cohort import predict_cohort

    cases = _nifti_cohort(tmp_path, small_case_dir)
    out, dicom = tmp_path / "out", tmp_path / "dicom"
    (out / "case_a").mkdir(parents=True)
    shutil.copy(small_case_dir / "t1c.nii.gz", out / "case_a" / "T1c-pro.nii.gz")  # stands in for an earlier run's
    monkeypatch.setattr(inference, "amplify_case", lambda *a, **k: pytest.fail("finished predictions are not recomputed"))
    rows = predict_cohort(cases, out, bundle=random_bundle_dir, out_dicom=dicom)
    assert [(r["status"], r["dicom"], r["error"]) for r in rows] == [("done", str(dicom / "case_a"), "")]
    with open(out / "summary.csv", newline="", encoding="utf-8") as handle:
        assert [r["dicom"] for r in csv.DictReader(handle)] == [str(dicom / "case_a")]
    files = sorted((dicom / "case_a").iterdir())
    first = pydicom.dcmread(str(files[0]))
    assert str(first.PatientName) == DEIDENTIFIED_PATIENT_NAME and "random-tiny" in first.SeriesDescription
    assert "from the existing T1c-pro.nii.gz" in first.DerivationDescription
    assert_dciodvfy_clean(files[:2])
    back = _read_back(dicom / "case_a")
    _assert_same_grid(back, read_image(small_case_dir / "t1c.nii.gz", "T1c"))
    assert [r["status"] for r in predict_cohort(cases, out, bundle=random_bundle_dir, out_dicom=dicom)] == ["skipped"]
    with pytest.raises(OutputPathError, match="the same folder as the T1c-pro output folder"):
        predict_cohort(cases, out, bundle=random_bundle_dir, out_dicom=out)


@pytest.mark.slow
def test_cohort_writes_each_case_series(tmp_path, small_case_dir, random_bundle_dir):
    from ContrastAmplifierLib.cohort import predict_cohort

    cases = _nifti_cohort(tmp_path, small_case_dir)
    out, dicom = tmp_path / "out", tmp_path / "dicom"
    (dicom / "case_a").mkdir(parents=True)  # an empty series folder is fine
    rows = predict_cohort(cases, out, bundle=random_bundle_dir, n_mirrorings=1, device="cpu", folds=[0], out_dicom=dicom)
    assert [(r["status"], r["n_predictions"]) for r in rows] == [("done", 1)], rows
    files = sorted((dicom / "case_a").iterdir())
    assert len(files) == read_image(small_case_dir / "t1c.nii.gz", "T1c").GetSize()[2]
    pro = sitk.ReadImage(str(out / "case_a" / "T1c-pro.nii.gz"))
    back = _read_back(dicom / "case_a")
    _assert_same_grid(back, pro)
    first = pydicom.dcmread(str(files[0]))
    assert np.abs(sitk.GetArrayFromImage(back) - sitk.GetArrayFromImage(pro)).max() <= float(first.RescaleSlope) / 2 + 1e-3
    assert "1 predictions averaged" in first.DerivationDescription


def test_file_hash_key_is_the_file_content(tmp_path):
    a, b = tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"
    a.write_bytes(b"same")
    b.write_bytes(b"same")
    assert ds_mod._file_key(a) == ds_mod._file_key(b) == f"file sha256 {hashlib.sha256(b'same').hexdigest()}"
