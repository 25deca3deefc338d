"""Atomic writes: the old file or the whole new one, never half a file; a plain file's permissions."""

from __future__ import annotations

import os
import stat

import pytest

from ContrastAmplifierCommon.atomicfile import apply_umask, atomic_path, write_text_atomic


def test_success_replaces_the_file_with_umask_permissions(tmp_path):
    old = os.umask(0o027)
    try:
        target = write_text_atomic("first\n", tmp_path / "sub" / "notes.csv")
        write_text_atomic("second: é\n", target)
    finally:
        os.umask(old)
    assert target.read_text(encoding="utf-8") == "second: é\n"
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o640  # not mkstemp's 0600
    assert sorted(p.name for p in target.parent.iterdir()) == ["notes.csv"]  # no temporary left


def test_mode_keeps_a_rewritten_files_own_permissions(tmp_path):
    """``mode``: the new file appears with the given bits (a rewrite keeps the old file's), whatever the umask."""
    target = write_text_atomic("first\n", tmp_path / "bundle.json")
    os.chmod(target, 0o664)
    old = os.umask(0o077)
    try:
        write_text_atomic("second\n", target, mode=stat.S_IMODE(os.stat(target).st_mode))
    finally:
        os.umask(old)
    assert target.read_text(encoding="utf-8") == "second\n" and stat.S_IMODE(os.stat(target).st_mode) == 0o664
    assert [p.name for p in tmp_path.iterdir()] == ["bundle.json"]


def test_failure_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    target = write_text_atomic("kept", tmp_path / "a.json")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target, ".json") as tmp:
            tmp.write_text("half", encoding="utf-8")
            assert tmp.name.startswith(".a.json.") and tmp.name.endswith(".json") and tmp.parent == tmp_path
            raise KeyboardInterrupt  # a cancel in the middle of writing
    assert target.read_text(encoding="utf-8") == "kept"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_apply_umask_for_folders(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir(mode=0o700)
    old = os.umask(0o022)
    try:
        apply_umask(folder, directory=True)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o755
