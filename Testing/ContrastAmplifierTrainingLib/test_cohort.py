"""Cohort reading (CSV and case folders) and the patient-wise fold split."""

from __future__ import annotations

import json

import pytest

from ContrastAmplifierTrainingLib.cohort import CaseRecord, CohortError, assign_folds, read_cohort

MODALITIES = ("t1", "flair", "adc", "t1c_low", "t1c")


def _case_folder(root, name, modalities=MODALITIES, patient=None):
    folder = root / name
    folder.mkdir(parents=True)
    for m in modalities:
        (folder / f"{m}.nii.gz").write_bytes(b"x")
    if patient:
        (folder / "case.json").write_text(json.dumps({"patient_id": patient}), encoding="utf-8")
    return folder


def test_folder_of_case_folders_with_patient_ids(tmp_path):
    _case_folder(tmp_path, "case_000", patient="p1")
    _case_folder(tmp_path, "case_001", patient="p1")
    _case_folder(tmp_path, "case_002", modalities=MODALITIES + ("brain_mask",))
    records = read_cohort(tmp_path)
    assert [r.case_id for r in records] == ["case_000", "case_001", "case_002"]
    assert [r.patient_id for r in records] == ["p1", "p1", "case_002"]
    assert "brain_mask" in records[2].paths and "brain_mask" not in records[0].paths


def test_csv_manifest_relative_paths_and_test_rows(tmp_path):
    for name in ("a", "b", "c"):
        _case_folder(tmp_path, name)
    rows = ["case_id,patient_id,t1,flair,adc,t1c_low,t1c,split"]
    for name, split in (("a", "train"), ("b", ""), ("c", "test")):
        rows.append(",".join([name, f"P{name}"] + [f"{name}/{m}.nii.gz" for m in MODALITIES] + [split]))
    (tmp_path / "cohort.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    records = read_cohort(tmp_path / "cohort.csv")
    assert [r.case_id for r in records] == ["a", "b"]
    assert records[0].paths["t1c"] == tmp_path / "a" / "t1c.nii.gz"


def test_clear_errors(tmp_path):
    with pytest.raises(CohortError, match="does not exist"):
        read_cohort(tmp_path / "missing")
    _case_folder(tmp_path, "case_000", modalities=("t1", "flair", "adc", "t1c"))
    with pytest.raises(CohortError, match=r"no t1c_low image.*--simulate-low-dose"):
        read_cohort(tmp_path)
    assert len(read_cohort(tmp_path, require_low_dose=False)) == 1
    (tmp_path / "bad.csv").write_text("case_id,t1\nx,y\n", encoding="utf-8")
    with pytest.raises(CohortError, match="lacks columns"):
        read_cohort(tmp_path / "bad.csv")


def test_folds_split_by_patient_balanced_and_seeded():
    records = [CaseRecord(f"c{i:02d}", f"p{i // 2}", {}) for i in range(20)]  # two scans per patient
    folds = assign_folds(records, n_folds=5, seed=3)
    assert folds == assign_folds(records, n_folds=5, seed=3)
    assert folds != assign_folds(records, n_folds=5, seed=4)
    for i in range(0, 20, 2):
        assert folds[f"c{i:02d}"] == folds[f"c{i + 1:02d}"], "scans of one patient must share a fold"
    sizes = [list(folds.values()).count(k) for k in range(5)]
    assert sizes == [4] * 5
    with pytest.raises(CohortError, match="cannot be split"):
        assign_folds(records[:6], n_folds=5)


def test_case_folder_images_any_suffix_any_case_and_ambiguity_named(tmp_path):
    """Images are found by ContrastAmplifierLib.imagefiles.find_image: every suffix, any case, DICOM folders."""
    folder = _case_folder(tmp_path, "case_000", modalities=("t1", "flair", "t1c"))
    (folder / "ADC.mhd").write_bytes(b"x")
    (folder / "T1c_low").mkdir()  # a DICOM series folder
    record = read_cohort(tmp_path)[0]
    assert record.paths["adc"].name == "ADC.mhd" and record.paths["t1c_low"].name == "T1c_low"
    (folder / "adc.nhdr").write_bytes(b"x")
    with pytest.raises(CohortError, match=r"case_000: adc is ambiguous .*ADC\.mhd, adc\.nhdr"):
        read_cohort(tmp_path)
