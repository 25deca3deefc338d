"""Fixtures shared by the module tests: a fresh MRML scene, private temporary and models folders, and a
T1c DICOM series indexed by a stand-in for Slicer's DICOM database."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest


@pytest.fixture()
def scene(monkeypatch):
    """A fresh scene installed as ``slicer.mrmlScene``, as inside the application (slicer-core)."""
    slicer = pytest.importorskip("slicer", reason="slicer-core wheel (test extra) is required")
    scene = slicer.vtkMRMLScene()
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    return scene


@pytest.fixture()
def exchange_root(tmp_path: Path, monkeypatch) -> Path:
    """Temporary folders (exported patient data, generated phantoms) go here, so tests can see them removed."""
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


@pytest.fixture()
def user_models(tmp_path: Path, monkeypatch) -> Path:
    """An empty per-user models folder (CONTRAST_AMPLIFIER_MODELS), so nothing touches the real one."""
    folder = tmp_path / "user-models"
    monkeypatch.setenv("CONTRAST_AMPLIFIER_MODELS", str(folder))
    return folder


# -- DICOM: a T1c "loaded from DICOM" and Slicer's DICOM database -------------------------------------


class FakeDicomDatabase:
    """Stands in for Slicer's C++ ``ctkDICOMDatabase`` (``slicer.dicomDatabase``), which slicer-core lacks.

    Only what the module asks of it: ``isOpen`` and ``fileForInstance(uid)`` ("" for an unknown UID, as
    Slicer's answers). The files it names are real DICOM files written by :func:`write_dicom_series`.
    """

    def __init__(self, files: dict[str, Path]) -> None:
        self.files = dict(files)
        self.isOpen = True
        self.asked: list = []

    def fileForInstance(self, uid: str) -> str:  # noqa: N802 (Slicer's name)
        self.asked.append(uid)
        path = self.files.get(uid)
        return str(path) if path is not None else ""


def write_dicom_series(image, folder: Path, study_uid: str = "1.2.826.0.1.3680043.8.498.4711",
                       frame_uid: str = "1.2.826.0.1.3680043.8.498.4712",
                       series_uid: str = "1.2.826.0.1.3680043.8.498.4713") -> dict[str, Path]:
    """Write a SimpleITK image as an MR Image Storage series (one uint16 file per slice), like a scanner's export.

    Returns:
        SOP Instance UID -> file, in slice order (what Slicer lists in ``DICOM.instanceUIDs``).
    """
    import numpy as np
    import pydicom
    import SimpleITK as sitk
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    mr_image_storage = "1.2.840.10008.5.1.4.1.1.4"
    folder.mkdir(parents=True, exist_ok=True)
    voxels = np.clip(np.rint(sitk.GetArrayFromImage(image)), 0, 65535).astype("<u2")  # z, y, x
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    spacing = image.GetSpacing()
    files: dict[str, Path] = {}
    for k in range(voxels.shape[0]):
        uid = f"{series_uid}.{k + 1}"
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "TEST^SLICER", "PAT-SLICER-1", "19700101", "F"
        ds.SOPClassUID, ds.SOPInstanceUID = mr_image_storage, uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240102", "101500", "S1", "ACC-1"
        ds.ReferringPhysicianName, ds.PositionReferenceIndicator = "", ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber, ds.SeriesDescription = "MR", 7, k + 1, "T1 post Gd"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint((0, 0, k))]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*direction[:, 0], *direction[:, 1])]
        ds.PixelSpacing = [f"{spacing[1]:g}", f"{spacing[0]:g}"]
        ds.SliceThickness = f"{spacing[2]:g}"
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "GR", "SP", "", "3D"
        ds.RepetitionTime, ds.EchoTime, ds.EchoTrainLength = "2300", "2.98", "1"
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.Rows, ds.Columns = 1, "MONOCHROME2", voxels.shape[1], voxels.shape[2]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = np.ascontiguousarray(voxels[k]).tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = mr_image_storage, uid
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"{uid}.dcm"
        if int(pydicom.__version__.split(".")[0]) >= 3:
            pydicom.dcmwrite(str(path), ds, enforce_file_format=True)
        else:
            ds.is_little_endian, ds.is_implicit_VR = True, False
            pydicom.dcmwrite(str(path), ds, write_like_original=False)
        files[uid] = path
    return files


@pytest.fixture()
def dicom_database(monkeypatch):
    """Install a :class:`FakeDicomDatabase` as ``slicer.dicomDatabase`` for the files a test writes; returns a
    function ``(image, folder) -> (database, uids)`` writing the series (:func:`write_dicom_series`) and indexing it."""
    slicer = pytest.importorskip("slicer", reason="slicer-core wheel (test extra) is required")
    pytest.importorskip("pydicom")

    def make(image, folder: Path):
        files = write_dicom_series(image, folder)
        database = FakeDicomDatabase(files)
        monkeypatch.setattr(slicer, "dicomDatabase", database, raising=False)
        return database, list(files)

    return make
