"""Output paths: checked before any work, never at the cost of a file the command does not own."""

from __future__ import annotations

import os
import stat

import pytest

from ContrastAmplifierCommon.outputs import (
    OutputPathError,
    check_output_file,
    check_output_folder,
    created_parents,
    staged_folder,
)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _user_folder(tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine", encoding="utf-8")
    (folder / "t1c.nii.gz").write_bytes(b"old output")
    return folder


def test_folder_checks_refuse_inputs_cwd_files_and_clashes(tmp_path, monkeypatch):
    case = tmp_path / "case"
    case.mkdir()
    t1c = case / "t1c.nii.gz"
    t1c.write_bytes(b"input")
    with pytest.raises(OutputPathError, match=r"output folder .*case is the input .*case; .*Choose a new folder"):
        check_output_folder(case, ["t1c.nii.gz"], inputs=[case, t1c])
    with pytest.raises(OutputPathError, match=r"contains the input .*t1c\.nii\.gz"):
        check_output_folder(tmp_path, ["x"], inputs=[t1c])  # an ancestor of the inputs
    monkeypatch.chdir(tmp_path / "case")
    with pytest.raises(OutputPathError, match=r"is the current directory; name a sub-folder"):
        check_output_folder(".", ["x"])
    assert check_output_folder(".", ["x"], allow_current_dir=True) == case.resolve()
    folder = _user_folder(tmp_path)
    with pytest.raises(OutputPathError, match=r"already holds t1c\.nii\.gz; pass --overwrite to replace these files"):
        check_output_folder(folder, ["t1c.nii.gz", "flair.nii.gz"])
    assert check_output_folder(folder, ["t1c.nii.gz"], overwrite=True) == folder.resolve()
    assert check_output_folder(folder, ["flair.nii.gz"]) == folder.resolve()  # no clash: fine
    with pytest.raises(OutputPathError, match=r"notes\.txt is an existing file; name a folder"):
        check_output_folder(folder / "notes.txt", ["x"])
    # not writable (works as root too): the nearest existing "folder" is a file
    with pytest.raises(OutputPathError, match=r"notes\.txt is a file, not a folder"):
        check_output_folder(folder / "notes.txt" / "out", ["x"])
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt", "t1c.nii.gz"]  # nothing created


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes through any permission bits")
def test_folder_that_cannot_be_written(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        with pytest.raises(OutputPathError, match=r"is not writable \(Permission denied\)"):
            check_output_folder(locked / "out", ["x"])
    finally:
        locked.chmod(0o755)


def test_file_checks(tmp_path):
    suffixes = (".nii.gz", ".nrrd")
    t1c = tmp_path / "t1c.nii.gz"
    t1c.write_bytes(b"input")
    with pytest.raises(OutputPathError, match=r"x\.txt has an unsupported ending; use one of \.nii\.gz, \.nrrd"):
        check_output_file(tmp_path / "new" / "x.txt", suffixes)
    assert not (tmp_path / "new").exists()
    with pytest.raises(OutputPathError, match=r"is an existing folder; give a file name"):
        check_output_file(tmp_path, suffixes)
    with pytest.raises(OutputPathError, match=r"is one of the inputs"):
        check_output_file(t1c, suffixes, inputs=[t1c], overwrite=True)
    with pytest.raises(OutputPathError, match=r"already exists; pass --overwrite"):
        check_output_file(t1c, suffixes)
    assert check_output_file(t1c, suffixes, overwrite=True) == t1c.resolve()
    with pytest.raises(OutputPathError, match=r"is a file, not a folder"):
        check_output_file(t1c / "out.nii.gz", suffixes)
    assert check_output_file(tmp_path / "a" / "b" / "out.NRRD", suffixes) == (tmp_path / "a" / "b" / "out.NRRD").resolve()
    assert not (tmp_path / "a").exists()  # checking creates nothing


def test_staged_folder_new_folder_is_published_whole_with_umask_permissions(tmp_path, umask_022):
    out = tmp_path / "a" / "b" / "out"
    with staged_folder(out, last="manifest.json") as staging:
        assert staging.parent == tmp_path / "a" / "b" and staging.name.startswith(".out.tmp-")
        (staging / "image.nii.gz").write_bytes(b"x")
        (staging / "manifest.json").write_text("{}", encoding="utf-8")
        assert not out.exists()
    assert sorted(p.name for p in out.iterdir()) == ["image.nii.gz", "manifest.json"]
    assert _mode(out) == 0o755 and _mode(tmp_path / "a") == 0o755  # not mkdtemp's 0700
    assert sorted(p.name for p in (tmp_path / "a" / "b").iterdir()) == ["out"]  # no staging left


def test_staged_folder_into_existing_folder_touches_only_its_names(tmp_path, umask_022):
    folder = _user_folder(tmp_path)
    before = _mode(folder)
    with staged_folder(folder, last="manifest.json") as staging:
        assert staging.parent == folder
        (staging / "t1c.nii.gz").write_bytes(b"new output")
        (staging / "manifest.json").write_text("{}", encoding="utf-8")
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "notes.txt", "t1c.nii.gz"]
    assert (folder / "notes.txt").read_text(encoding="utf-8") == "mine"
    assert (folder / "t1c.nii.gz").read_bytes() == b"new output"
    assert _mode(folder) == before


def test_staged_folder_failure_leaves_the_disk_as_it_was(tmp_path):
    folder = _user_folder(tmp_path)
    with pytest.raises(RuntimeError):
        with staged_folder(folder) as staging:
            (staging / "t1c.nii.gz").write_bytes(b"half")
            raise RuntimeError("crash mid-write")
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt", "t1c.nii.gz"]
    assert (folder / "t1c.nii.gz").read_bytes() == b"old output"
    with pytest.raises(KeyboardInterrupt):
        with staged_folder(tmp_path / "new" / "deeper" / "out") as staging:
            (staging / "x").write_bytes(b"half")
            raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]  # created parents removed again


def test_created_parents_keeps_folders_that_existed(tmp_path):
    (tmp_path / "kept").mkdir()
    with pytest.raises(ValueError):
        with created_parents(tmp_path / "kept" / "x" / "y") as made:
            assert made == [tmp_path / "kept" / "x" / "y", tmp_path / "kept" / "x"]
            raise ValueError
    assert (tmp_path / "kept").is_dir() and not (tmp_path / "kept" / "x").exists()
