"""Fixtures for the LesionReaderLib tests: tiny studies on real NIfTI files and a real SQLite database.

Case folders are named like patient ids and files keep tell-tale names, so blinding tests can
check that none of them reaches what a reader sees.
"""

from __future__ import annotations

import os
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, List

import numpy as np
import pytest
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[2]

#: Identifying strings planted in case folder names; none may reach the reader.
PATIENT_IDS = [f"PAT{1000 + i}_DOE" for i in range(12)]
VOLUME_FILES = {"T1c": "t1c.nii.gz", "T1c-pro": "t1c_pro.nii.gz", "T1c-vfa": "t1c_vfa.nii.gz", "T2-FLAIR": "flair.nii.gz"}


def write_volume(path: Path, value: float = 0.0) -> None:
    """A 6x5x4 float volume with 1 mm spacing (enough for a reader study fixture)."""
    image = sitk.GetImageFromArray(np.full((4, 5, 6), value, np.float32))
    image.SetSpacing((1.0, 1.0, 1.0))
    sitk.WriteImage(image, str(path))


def make_case_folders(root: Path, n: int) -> List[Path]:
    folders = []
    for i in range(n):
        folder = root / PATIENT_IDS[i]
        folder.mkdir(parents=True, exist_ok=True)
        for j, name in enumerate(VOLUME_FILES.values()):
            write_volume(folder / name, value=float(j))
        folders.append(folder)
    return folders


@pytest.fixture
def case_folders(tmp_path: Path) -> List[Path]:
    return make_case_folders(tmp_path / "cases", 6)


@pytest.fixture
def make_study(tmp_path: Path) -> Callable[..., Path]:
    """``make_study(n_cases=6, readers=("R1", "R2"), **init_kwargs) -> study_dir``."""
    from LesionReaderLib.study import init_study

    def _make(n_cases: int = 6, readers=("R1", "R2"), name: str = "study", **kwargs) -> Path:
        folders = make_case_folders(tmp_path / f"cases-{name}", n_cases)
        study_dir = tmp_path / name
        init_study(study_dir, folders, list(readers), **kwargs)
        return study_dir

    return _make


@pytest.fixture
def clock():
    from LesionReaderLib.study import ManualClock

    return ManualClock(datetime(2024, 3, 1, 9, 0, tzinfo=timezone.utc))


@pytest.fixture
def subprocess_env() -> dict:
    """Environment for child Python processes that import LesionReaderLib from this checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "LesionReader"), str(REPO / "ContrastAmplifierCommon"), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env
