"""DICOM SR export (beyond the paper): TID 1500 long/short axes of each reader's lesions.

A small axial MR series is written with SimpleITK; one case uses it as its T1c volume (a DICOM
series folder ``t1c/`` in the case folder), another keeps NIfTI files. A reader marks two
lesions with known axes; the SR read back must hold the marked lengths, the end points in LPS,
and the source series' UIDs; the NIfTI case is skipped with a note.
"""

from __future__ import annotations

import locale
import math
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
import SimpleITK as sitk

hd = pytest.importorskip("highdicom")
pydicom = pytest.importorskip("pydicom")
from pydicom.sr.codedict import codes  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from LesionReaderLib import ReaderSession  # noqa: E402
from LesionReaderLib.cli import app  # noqa: E402
from LesionReaderLib.dicom_sr import GRADE_SCHEME, export_dicom_sr, ras_to_lps, sr_file_name  # noqa: E402
from LesionReaderLib.export import export_study  # noqa: E402
from LesionReaderLib.study import (  # noqa: E402
    discover_case_folder,
    init_study,
    is_dicom_series_folder,
    load_study,
    read_volume,
)

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
ORIGIN_LPS = (-10.0, -20.0, 30.0)
SPACING = (1.0, 1.0, 2.0)
SIZE = (12, 10, 6)  # x, y, slices

#: RAS mm; lengths 5 and 3 (lesion 1), 6 and 2.5 (lesion 2), inside the DICOM volume
#: (LPS x -10..1, y -20..-11, z 30..40, i.e. RAS x -1..10, y 11..20, z 30..40).
LESION_1 = (((4.0, 14.0, 32.0), (9.0, 14.0, 32.0)), ((6.5, 12.5, 32.0), (6.5, 15.5, 32.0)))
LESION_2 = (((5.0, 18.0, 38.0), (5.0, 18.0, 32.0)), ((3.75, 18.0, 35.0), (6.25, 18.0, 35.0)))


def write_dicom_series(folder: Path, uids: Dict[str, str]) -> None:
    """An axial (identity orientation) MR series, one file per slice, with the tags an SR refers to.

    GDCM's writer leaves the C library's LC_CTYPE at "C" (Python's default text encoding then
    becomes ASCII for the rest of the test process); the locale is restored afterwards.
    """
    saved = locale.setlocale(locale.LC_ALL)
    try:
        _write_dicom_series(folder, uids)
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def _write_dicom_series(folder: Path, uids: Dict[str, str]) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    volume = rng.integers(0, 1000, size=(SIZE[2], SIZE[1], SIZE[0])).astype(np.int16)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(SIZE[2]):
        image = sitk.GetImageFromArray(volume[k][None])[:, :, 0]
        image.SetSpacing(SPACING[:2])
        position = (ORIGIN_LPS[0], ORIGIN_LPS[1], ORIGIN_LPS[2] + k * SPACING[2])
        tags = {
            "0008|0016": MR_IMAGE_STORAGE,
            "0008|0018": f"{uids['series']}.{k + 1}",
            "0008|0060": "MR",
            "0010|0010": "PHANTOM^DICOM",
            "0010|0020": "PAT-DCM-1",
            "0020|000d": uids["study"],
            "0020|000e": uids["series"],
            "0020|0052": uids["frame"],
            "0020|0011": "3",
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:g}" for v in position),
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0028|0030": f"{SPACING[1]:g}\\{SPACING[0]:g}",
            "0018|0050": f"{SPACING[2]:g}",
        }
        for key, value in tags.items():
            image.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"IM{k:04d}.dcm"))
        writer.Execute(image)


def write_nifti(path: Path) -> None:
    image = sitk.GetImageFromArray(np.zeros((4, 5, 6), np.float32))
    sitk.WriteImage(image, str(path))


@pytest.fixture
def dicom_study(tmp_path: Path, clock):
    """A study with case DCM (T1c = DICOM folder) and case NIF (NIfTI only); R1 has read both in T1c."""
    uids = {"study": "1.2.826.0.1.3680043.8.498.1001", "series": "1.2.826.0.1.3680043.8.498.1002",
            "frame": "1.2.826.0.1.3680043.8.498.1003"}
    dcm_case = tmp_path / "cases" / "DCM"
    write_dicom_series(dcm_case / "t1c", uids)
    write_nifti(dcm_case / "flair.nii.gz")
    nif_case = tmp_path / "cases" / "NIF"
    nif_case.mkdir(parents=True)
    write_nifti(nif_case / "t1c.nii.gz")
    write_nifti(nif_case / "flair.nii.gz")
    study_dir = tmp_path / "study"
    init_study(study_dir, [dcm_case, nif_case], ["R1"], phases=["T1c"])
    session = ReaderSession.open(study_dir, "R1", "T1c", clock=clock)
    for _ in range(2):
        case_id = load_study(study_dir).case(_current_case(study_dir, session)).id
        session.grade(3 if case_id == "DCM" else 2)
        if case_id == "DCM":
            session.add_lesion(*LESION_1)
            session.add_lesion(*LESION_2)
        else:
            session.add_lesion(((0, 0, 0), (4, 0, 0)), ((2, -1, 0), (2, 1, 0)))
        clock.advance(30)
        session.next_case()
    session.close()
    return study_dir, uids


def _current_case(study_dir: Path, session: ReaderSession) -> str:
    from LesionReaderLib.study import case_order

    return case_order(load_study(study_dir), "R1", "T1c")[session.position]


def test_dicom_case_folder_is_discovered_and_read(tmp_path):
    uids = {"study": "1.2.3.1", "series": "1.2.3.2", "frame": "1.2.3.3"}
    write_dicom_series(tmp_path / "CASE" / "t1c", uids)
    write_nifti(tmp_path / "CASE" / "flair.nii.gz")
    (tmp_path / "CASE" / "notes").mkdir()  # a plain sub-folder is ignored
    assert is_dicom_series_folder(tmp_path / "CASE" / "t1c")
    assert not is_dicom_series_folder(tmp_path / "CASE" / "notes")
    assert not is_dicom_series_folder(tmp_path / "CASE" / "flair.nii.gz")
    case = discover_case_folder(tmp_path / "CASE")
    assert set(case.volumes) == {"T1c", "T2-FLAIR"}
    image = read_volume(case.volumes["T1c"])
    assert image.GetSize() == SIZE
    assert image.GetSpacing() == pytest.approx(SPACING)
    assert image.GetOrigin() == pytest.approx(ORIGIN_LPS)


def test_sr_round_trip(dicom_study, tmp_path):
    study_dir, uids = dicom_study
    notes = []
    result = export_dicom_sr(study_dir, tmp_path / "out", note=notes.append)
    assert result.written == [tmp_path / "out" / "sr" / sr_file_name("R1", "T1c", "DCM")]
    assert result.written[0].name == "R1_T1c_DCM.dcm"
    # The NIfTI case is skipped, with a note naming it.
    assert len(notes) == 1 and "NIF" in notes[0] and "not a DICOM series" in notes[0] and notes == result.notes

    sr = hd.sr.srread(result.written[0])
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.StudyInstanceUID == uids["study"] and sr.PatientID == "PAT-DCM-1"
    # Every slice of the series is named as evidence. highdicom >= 0.23 lists them all as current
    # requested procedure evidence; 0.22 (the last for Python 3.9, with Slicer's pydicom 2.4)
    # moves the instances no measurement references to pertinent other evidence: both are valid.
    referenced = []
    for sequence in ("CurrentRequestedProcedureEvidenceSequence", "PertinentOtherEvidenceSequence"):
        for study in getattr(sr, sequence, []):
            for series in study.ReferencedSeriesSequence:
                assert series.SeriesInstanceUID == uids["series"]
                referenced += [item.ReferencedSOPInstanceUID for item in series.ReferencedSOPSequence]
    assert len(referenced) == len(set(referenced)) == SIZE[2]
    assert sr.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == GRADE_SCHEME

    groups = sr.content.get_image_measurement_groups()
    lesion_groups = [g for g in groups if g.finding_type is not None and g.finding_type == codes.SCT.Lesion]
    assert len(groups) == 3 and len(lesion_groups) == 2
    for number, (group, (long_axis, short_axis)) in enumerate(zip(lesion_groups, (LESION_1, LESION_2)), start=1):
        assert group.tracking_identifier == f"lesion {number}"
        assert group.tracking_uid
        for code, axis in ((codes.SCT.LongAxis, long_axis), (codes.SCT.ShortAxis, short_axis)):
            (measurement,) = group.get_measurements(name=code)
            assert measurement.unit == codes.UCUM.Millimeter
            assert measurement.value == pytest.approx(math.dist(*axis), abs=1e-4)
            (scoord,) = [item for item in measurement[0].ContentSequence if item.ValueType == "SCOORD3D"]
            assert scoord.GraphicType == "POLYLINE"
            assert scoord.ReferencedFrameOfReferenceUID == uids["frame"]
            assert np.asarray(scoord.GraphicData, float).reshape(-1, 3) == pytest.approx(np.array([ras_to_lps(p) for p in axis]))
        sources = group.source_images
        assert sources and all(s.referenced_sop_class_uid == "1.2.840.10008.5.1.4.1.1.4" for s in sources)
        assert all(s.referenced_sop_instance_uid.startswith(uids["series"] + ".") for s in sources)
    # Lesion 1 lies in the slice at z = 32 (slice 2 -> SOP ...1002.2).
    assert [s.referenced_sop_instance_uid for s in lesion_groups[0].source_images] == [uids["series"] + ".2"]
    (quality,) = [g for g in groups if g.tracking_identifier == "image quality"]
    (evaluation,) = quality.get_qualitative_evaluations(name=codes.DCM.ImageQuality)
    assert (evaluation.value.value, evaluation.value.scheme_designator) == ("3", GRADE_SCHEME)
    # Observer = the reader.
    observer = [item for item in sr.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == codes.DCM.PersonObserverName.value]
    assert [item.PersonName.family_name for item in observer] == ["R1"]


def test_ras_to_lps():
    assert ras_to_lps((1.5, -2.0, 3.0)) == (-1.5, 2.0, 3.0)


def test_sr_uids_are_stable(dicom_study, tmp_path):
    study_dir, _ = dicom_study
    first = pydicom.dcmread(export_dicom_sr(study_dir, tmp_path / "a", note=lambda m: None).written[0])
    second = pydicom.dcmread(export_dicom_sr(study_dir, tmp_path / "b", note=lambda m: None).written[0])
    assert first.SOPInstanceUID == second.SOPInstanceUID and first.SeriesInstanceUID == second.SeriesInstanceUID


def test_export_option_and_cli(dicom_study, tmp_path):
    study_dir, _ = dicom_study
    paths = export_study(study_dir, tmp_path / "lib", dicom_sr=True, note=lambda m: None)
    assert [p.name for p in paths] == ["grades.csv", "lesions.csv", "R1_T1c_DCM.dcm"]
    assert [p.name for p in export_study(study_dir, tmp_path / "plain")] == ["grades.csv", "lesions.csv"]
    assert not (tmp_path / "plain" / "sr").exists()

    result = CliRunner().invoke(app, ["export", str(study_dir), str(tmp_path / "cli"), "--dicom-sr"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cli" / "sr" / "R1_T1c_DCM.dcm").is_file()
    assert "note: DICOM SR" in result.output and "NIF" in result.output


def test_nifti_only_study_writes_no_sr(make_study, clock, tmp_path):
    study_dir = make_study(n_cases=2, readers=("R1",), phases=["T1c"])
    session = ReaderSession.open(study_dir, "R1", "T1c", clock=clock)
    session.grade(4)
    session.next_case()
    session.close()
    notes = []
    result = export_dicom_sr(study_dir, tmp_path / "out", note=notes.append)
    assert result.written == [] and len(notes) == 1 and "1 case(s) skipped" in notes[0]
    assert not (tmp_path / "out" / "sr").exists()


def test_dicom_case_volume_loads_into_the_scene_with_the_series_geometry(tmp_path):
    """The reading module opens a DICOM series folder like a NIfTI file (slicer-core MRML)."""
    import numpy as np
    import slicer

    from LesionReaderLib import mrml_bridge as bridge
    from LesionReaderLib.study import read_volume

    folder = tmp_path / "PAT123_t1c"
    write_dicom_series(folder, {"study": "1.2.826.0.1.3680043.8.498.1", "series": "1.2.826.0.1.3680043.8.498.2",
                                "frame": "1.2.826.0.1.3680043.8.498.3"})
    scene = slicer.vtkMRMLScene()
    node = bridge.load_blinded_volume(scene, folder, "Case 01", "T1c")
    reference = read_volume(folder)
    assert node.GetImageData().GetDimensions() == reference.GetSize()
    ijk_to_ras = __import__("vtk").vtkMatrix4x4()
    node.GetIJKToRASMatrix(ijk_to_ras)
    origin_ras = [ijk_to_ras.GetElement(i, 3) for i in range(3)]
    lps = reference.GetOrigin()
    np.testing.assert_allclose(origin_ras, [-lps[0], -lps[1], lps[2]], atol=1e-3)
    np.testing.assert_allclose(sorted(node.GetSpacing()), sorted(reference.GetSpacing()), atol=1e-4)
    assert "PAT123" not in node.GetName() and node.GetStorageNode() is None  # blinded: no file name left
