"""study.json: creation, validation, seeded per-reader/per-phase case order, neutral labels."""

from __future__ import annotations

import gzip
import json
import os

import pytest

from LesionReaderLib.session import ReaderSession
from LesionReaderLib.study import (
    Phase,
    StudyError,
    canonical_modality,
    case_label,
    case_order,
    init_study,
    load_study,
    parse_phase_spec,
)


def test_init_writes_paper_defaults(make_study):
    study = load_study(make_study())
    assert [p.name for p in study.phases] == ["T1c", "T1c-pro", "T1c-vfa"]
    assert study.phase("T1c").shows == ("T1c", "T2-FLAIR")
    assert study.phase("T1c-pro").shows == ("T1c-pro", "T1c", "T2-FLAIR")
    assert study.phase("T1c-vfa").shows == ("T1c-vfa", "T1c", "T2-FLAIR")
    assert study.washout_days == 10 and study.max_lesions == 20
    # Paper: T1c-vfa lesions marked once, by one reader, who defines the reference.
    assert study.reference_phase == "T1c-vfa" and study.reference_reader == "R2"
    assert study.phase("T1c-vfa").markers == ("R2",)
    assert study.phase("T1c").reader_marks("R1") and not study.phase("T1c-vfa").reader_marks("R1")
    assert (study.directory / "reads.sqlite").exists()


def test_init_from_csv_manifest(tmp_path, case_folders):
    manifest = tmp_path / "cases.csv"
    lines = ["case,T1c,t1c_pro,T1c-vfa,FLAIR"] + [
        f"c{i},{f.relative_to(tmp_path)}/t1c.nii.gz,{f.relative_to(tmp_path)}/t1c_pro.nii.gz,{f}/t1c_vfa.nii.gz,{f}/flair.nii.gz"
        for i, f in enumerate(case_folders)
    ]
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    study = init_study(tmp_path / "s", [manifest], ["A"], reference_reader="A")
    assert [c.id for c in study.cases] == [f"c{i}" for i in range(len(case_folders))]
    assert study.volume_path("c0", "T1c-pro") == case_folders[0] / "t1c_pro.nii.gz"


def test_init_errors_name_the_input_and_fix(tmp_path, case_folders):
    with pytest.raises(StudyError, match="not one of the readers"):
        init_study(tmp_path / "a", case_folders, ["R1"], reference_reader="R9")
    (case_folders[0] / "t1c_vfa.nii.gz").unlink()
    with pytest.raises(StudyError, match=r"lacks T1c-vfa.*add the files or change the phases"):
        init_study(tmp_path / "b", case_folders, ["R1"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(StudyError, match="holds no image named after a modality"):
        init_study(tmp_path / "c", [empty], ["R1"])
    with pytest.raises(StudyError, match="no study at"):
        load_study(tmp_path / "nowhere")


def test_init_refuses_to_overwrite(make_study, case_folders, clock):
    study_dir = make_study()
    with pytest.raises(StudyError, match="already exists; pass --force"):
        init_study(study_dir, case_folders, ["R1"])
    init_study(study_dir, case_folders, ["R1", "R2"], force=True)  # no reads yet: allowed
    ReaderSession.open(study_dir, "R1", "T1c", clock=clock).close()
    with pytest.raises(StudyError, match="already has reads"):
        init_study(study_dir, case_folders, ["R1"], force=True)


def test_validation_of_hand_edited_json(make_study):
    study_dir = make_study()
    data = json.loads((study_dir / "study.json").read_text(encoding="utf-8"))
    data["cases"].append(dict(data["cases"][0]))
    (study_dir / "study.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(StudyError, match="case ids repeat"):
        load_study(study_dir)
    (study_dir / "study.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(StudyError, match="not valid JSON"):
        load_study(study_dir)


def test_case_order_seeded_per_reader_and_phase(make_study):
    study = load_study(make_study(n_cases=12))
    order = case_order(study, "R1", "T1c")
    assert sorted(order) == sorted(c.id for c in study.cases)
    assert case_order(load_study(study.directory), "R1", "T1c") == order  # same on reload
    assert case_order(study, "R2", "T1c") != order  # different per reader
    assert case_order(study, "R1", "T1c-pro") != order  # and per phase


def test_case_order_depends_on_seed(make_study):
    a = load_study(make_study(n_cases=12, name="a", seed=1))
    b = load_study(make_study(n_cases=12, name="b", seed=2))
    assert case_order(a, "R1", "T1c") != case_order(b, "R1", "T1c")


def test_order_stable_across_session_restarts(make_study, clock):
    study_dir = make_study(n_cases=8)
    seen = []
    for _ in range(2):  # two "restarts" of the reading tool
        session = ReaderSession.open(study_dir, "R1", "T1c", clock=clock)
        while session.position > 0:
            session.previous_case()
        labels = []
        for _ in range(session.total):
            labels.append(session.volumes()["T1c"].parent.name)
            session.grade(2)
            session.next_case()
        seen.append(labels)
        session.close()
    assert seen[0] == seen[1]
    assert seen[0] == case_order(load_study(study_dir), "R1", "T1c")


def test_neutral_labels():
    assert case_label(0, 79) == "Case 01"
    assert case_label(11, 79) == "Case 12"
    assert case_label(99, 120) == "Case 100"


def test_modality_names_and_phase_specs():
    assert canonical_modality("t1c_pro") == "T1c-pro"
    assert canonical_modality("FLAIR") == "T2-FLAIR"
    assert canonical_modality("T1c-vfa") == "T1c-vfa"
    assert canonical_modality("notes") is None
    assert parse_phase_spec("T1c-pro") == Phase("T1c-pro", ("T1c-pro", "T1c", "T2-FLAIR"))
    assert parse_phase_spec("X=T1c+ADC").shows == ("T1c", "ADC")
    with pytest.raises(StudyError, match="NAME=VOL1"):
        parse_phase_spec("X=")


def test_init_refuses_a_file_or_unwritable_place_before_any_work(tmp_path, case_folders):
    target = tmp_path / "study.txt"
    target.write_text("mine", encoding="utf-8")
    with pytest.raises(StudyError, match=r"study\.txt is an existing file; name a folder"):
        init_study(target, case_folders, ["R1"])
    # A parent that is a regular file makes the folder unwritable for everyone, root included.
    with pytest.raises(StudyError, match=r"cannot create study folder .*: .*study\.txt is a file, not a folder"):
        init_study(target / "sub" / "study", case_folders, ["R1"])
    assert target.read_text(encoding="utf-8") == "mine"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="permission bits do not stop root (covered above by a parent that is a file)")
def test_init_refuses_a_read_only_folder(tmp_path, case_folders):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(StudyError, match="is not writable"):
            init_study(locked / "study", case_folders, ["R1"])
        with pytest.raises(StudyError, match="is not writable"):
            init_study(locked, case_folders, ["R1"])
    finally:
        locked.chmod(0o700)
    assert list(locked.iterdir()) == []


def test_failed_init_leaves_no_folder_behind(tmp_path, case_folders):
    (case_folders[0] / "t1c_vfa.nii.gz").unlink()
    with pytest.raises(StudyError, match="lacks T1c-vfa"):
        init_study(tmp_path / "new" / "study", case_folders, ["R1"])
    assert not (tmp_path / "new").exists()
    with pytest.raises(StudyError, match="neither a case folder nor a .csv manifest"):
        init_study(tmp_path / "new" / "study", [tmp_path / "no-such-case"], ["R1"])
    assert not (tmp_path / "new").exists()


def test_failed_write_removes_only_what_init_created(tmp_path, case_folders):
    study_dir = tmp_path / "study"
    (study_dir / "reads.sqlite").mkdir(parents=True)  # in the way of the database: the write fails, even as root
    (study_dir / "notes.txt").write_text("keep me", encoding="utf-8")
    with pytest.raises(StudyError, match=r"cannot write the study into .*study \(.*\); check that the folder is writable"):
        init_study(study_dir, case_folders, ["R1"])
    assert sorted(p.name for p in study_dir.iterdir()) == ["notes.txt", "reads.sqlite"]  # study.json written then removed
    assert (study_dir / "notes.txt").read_text(encoding="utf-8") == "keep me"


def test_binary_inputs_name_the_file_and_fix(make_study, tmp_path, case_folders):
    study_dir = make_study(n_cases=2)
    (study_dir / "study.json").write_bytes(b'{"format": "\xff\xfe"}')
    with pytest.raises(StudyError, match=r"study\.json, line 1: byte 0xff is not UTF-8 text.*lesion-reader init --force"):
        load_study(study_dir)
    manifest = tmp_path / "cases.csv"
    manifest.write_bytes(gzip.compress(b"case,T1c\nc1,a.nii.gz\n"))
    with pytest.raises(StudyError, match=r"cases\.csv is gzip-compressed"):
        init_study(tmp_path / "s", [manifest], ["R1"])
    assert not (tmp_path / "s").exists()
    (study_dir / "reads.sqlite").write_bytes(b"not a database" * 100)
    for suffix in ("-wal", "-shm"):
        (study_dir / f"reads.sqlite{suffix}").unlink(missing_ok=True)
    (study_dir / "study.json").write_text("{}", encoding="utf-8")
    with pytest.raises(StudyError, match=r"reads\.sqlite is not a readable reads database"):
        init_study(study_dir, case_folders, ["R1"], force=True)
    (study_dir / "study.json").unlink()
    with pytest.raises(StudyError, match="file is not a database"):
        init_study(study_dir, case_folders, ["R1"])
    assert sorted(p.name for p in study_dir.iterdir()) == ["reads.sqlite"]  # the study.json it wrote is gone again


def test_case_folder_uses_the_one_suffix_list(tmp_path):
    """Case folders accept every suffix of ContrastAmplifierLib.imagefiles (the same tuple), in any case."""
    from ContrastAmplifierLib import imagefiles
    from LesionReaderLib import study
    from LesionReaderLib.study import collect_cases

    assert study.IMAGE_SUFFIXES is imagefiles.IMAGE_SUFFIXES
    folder = tmp_path / "case1"
    folder.mkdir()
    (folder / "T1C.MHD").write_bytes(b"x")
    (folder / "flair.nhdr").write_bytes(b"x")
    (case,) = collect_cases([folder])
    assert {k: os.path.basename(v) for k, v in case.volumes.items()} == {"T1c": "T1C.MHD", "T2-FLAIR": "flair.nhdr"}


def test_read_volume_refuses_a_folder_without_series(tmp_path):
    pytest.importorskip("SimpleITK")
    from LesionReaderLib.study import dicom_series_files, read_volume

    (tmp_path / "t1c").mkdir()
    with pytest.raises(StudyError, match="holds no DICOM series"):
        read_volume(tmp_path / "t1c")
    with pytest.raises(StudyError, match="holds no DICOM series"):
        dicom_series_files(tmp_path / "t1c")
