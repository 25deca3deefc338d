"""What the analysis reads from study.json and volumes.csv (LesionReaderLib.studyinfo)."""

from __future__ import annotations

import pytest

from LesionReaderLib.results import AnalysisError, StudyInfo
from LesionReaderLib.studyinfo import load_study_info, volumes_from_csv


def test_bare_folder_gives_empty_info(tmp_path):
    assert load_study_info(tmp_path) == StudyInfo()


def test_volumes_csv_paths_names_and_roi_files(tmp_path):
    case = tmp_path / "c1"
    case.mkdir()
    (case / "brain_mask.nii.gz").write_bytes(b"x")
    (case / "lesion-labels.nrrd").write_bytes(b"x")
    elsewhere = tmp_path / "elsewhere" / "t1.nii.gz"
    (tmp_path / "volumes.csv").write_text(
        f"case,t1c_pro,T1c,T1,healthy_brain\nc1,c1/pro.nii.gz,{case / 't1c.nii.gz'},,\nc2,,,{elsewhere},\n", encoding="utf-8")
    vols = volumes_from_csv(tmp_path / "volumes.csv")
    assert vols["c1"] == {"T1c-pro": tmp_path / "c1" / "pro.nii.gz", "T1c": case / "t1c.nii.gz"}  # empty cells skipped
    assert vols["c2"] == {"T1": elsewhere}  # absolute paths kept
    info = load_study_info(tmp_path)
    # Beside the T1c: the brain mask and the lesion labels (first key that has a file), no healthy-brain label.
    assert info.volumes["c1"]["brain_mask"] == case / "brain_mask.nii.gz"
    assert info.volumes["c1"]["lesion_labels"] == case / "lesion-labels.nrrd"
    assert "healthy_brain" not in info.volumes["c1"] and "brain_mask" not in info.volumes["c2"]  # c2 has no T1c


def test_volumes_csv_refuses_duplicate_and_empty_cases(tmp_path):
    path = tmp_path / "volumes.csv"
    path.write_text("case,T1c\nc1,a.nii.gz\nc1,b.nii.gz\n", encoding="utf-8")
    with pytest.raises(AnalysisError, match=r"volumes\.csv, line 3, column 'case': case 'c1' has a second row"):
        volumes_from_csv(path)
    path.write_text("case,T1c\n,a.nii.gz\n", encoding="utf-8")
    with pytest.raises(AnalysisError, match=r"line 2, column 'case': is empty"):
        volumes_from_csv(path)


def test_study_json_gives_reference_orders_markers_and_volumes(make_study):
    study_dir = make_study(n_cases=2, readers=("R1", "R2"))
    info = load_study_info(study_dir)
    assert (info.reference_phase, info.reference_reader) == ("T1c-vfa", "R2")
    assert info.phase_order == ["T1c", "T1c-pro", "T1c-vfa"] and info.reader_order == ["R1", "R2"]
    assert set(info.markers) == set(info.phase_order)
    assert len(info.volumes) == 2 and all("T1c" in v for v in info.volumes.values())
    (study_dir / "study.json").write_text("{", encoding="utf-8")
    with pytest.raises(AnalysisError):
        load_study_info(study_dir)
