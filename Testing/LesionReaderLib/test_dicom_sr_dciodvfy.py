"""The LesionReader's DICOM SR documents (TID 1500) pass dciodvfy, the dicom3tools validator.

The SR comes from the study of ``test_dicom_sr.py`` (its ``dicom_study`` fixture: a reader's two
lesions and a grade on a DICOM T1c series). dciodvfy checks the Comprehensive 3D SR IOD, its
modules and the TID 1500 content tree; warnings are allowed, an ``Error`` line is not. Skipped
when dciodvfy is not on PATH (``make system-deps`` installs dicom3tools) or highdicom is missing.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("highdicom")
from test_dicom_sr import dicom_study  # noqa: E402,F401  (a fixture; Testing/LesionReaderLib is on sys.path, conftest.py)

from LesionReaderLib.dicom_sr import export_dicom_sr  # noqa: E402


def dciodvfy_report(path: Path) -> tuple[list[str], list[str]]:
    """dciodvfy's ``Error`` and ``Warning`` lines for one file."""
    done = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    lines = (done.stdout + done.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")], [line for line in lines if line.startswith("Warning")]


@pytest.mark.skipif(shutil.which("dciodvfy") is None,
                    reason="dciodvfy (dicom3tools) is not on PATH: `make system-deps` installs it (apt-get install dicom3tools)")
def test_sr_documents_pass_dciodvfy(dicom_study, tmp_path):
    study_dir, _ = dicom_study
    result = export_dicom_sr(study_dir, tmp_path / "out", note=lambda message: None)
    assert result.written
    for path in result.written:
        errors, _ = dciodvfy_report(path)
        assert not errors, f"{path.name}: {errors}"
