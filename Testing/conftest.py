"""Shared pytest set-up: keep tests off the user's folders and within the CI machine's 2 cores, and
the fixtures that more than one test folder uses (the Lib suites and Testing/SlicerModules)."""

from __future__ import annotations

import atexit
import locale
import os
import shutil
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import pytest

REPO = Path(__file__).resolve().parents[1]

# HD-BET creates a per-user data folder at import and the model registry uses platformdirs:
# point both at a throw-away HOME/XDG tree before anything imports them.
_SANDBOX = Path(tempfile.mkdtemp(prefix="ca-test-home-"))
atexit.register(shutil.rmtree, _SANDBOX, True)
os.environ.setdefault("XDG_DATA_HOME", str(_SANDBOX / "data"))
os.environ.setdefault("XDG_CACHE_HOME", str(_SANDBOX / "cache"))
os.environ.setdefault("XDG_CONFIG_HOME", str(_SANDBOX / "config"))
os.environ["HOME"] = str(_SANDBOX)
os.environ.setdefault("MPLBACKEND", "Agg")
# Two pytest-xdist workers share two cores: one intra-op thread each.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Module folders (ContrastAmplifier/ ...) hold the *Lib packages; make them importable from a
# plain checkout too (the editable install does the same).
for module_dir in ("ContrastAmplifierCommon", "ContrastAmplifier", "ContrastAmplifierTraining", "LesionReader"):
    path = str(REPO / module_dir)
    if path not in sys.path:
        sys.path.insert(0, path)


@pytest.fixture(autouse=True)
def _restore_locale():
    """GDCM's DICOM *writer* (used by test fixtures only: the product only reads DICOM, which
    leaves the locale alone) sets the C library's LC_CTYPE to "C"; Python's default text encoding
    then becomes ASCII for every later test of that worker (torch.compile's Inductor, for one,
    then fails to read its own templates). Restore the locale after every test."""
    saved = locale.setlocale(locale.LC_ALL)
    yield
    if locale.setlocale(locale.LC_ALL) != saved:
        locale.setlocale(locale.LC_ALL, saved)


# -- ContrastAmplifierLib: a small phantom case and a tiny random bundle ---------------------------
# (used by Testing/ContrastAmplifierLib and by the module Logic tests in Testing/SlicerModules)

CA_MODALITIES = ["t1", "flair", "adc", "t1c"]


@pytest.fixture(scope="session")
def small_case_dir(tmp_path_factory) -> Path:
    """One 3 mm phantom case (seed 31: a test seed, not used for training the demo model)."""
    from ContrastAmplifierLib.phantom import generate_cohort

    return generate_cohort(tmp_path_factory.mktemp("phantom"), cases=1, seed=31, spacing=3.0)[0]


@pytest.fixture(scope="session")
def random_bundle_dir(tmp_path_factory) -> Path:
    """A two-fold bundle of a 2-level, 2-channel UNet with random weights, 4 mm geometry."""
    import torch

    from ContrastAmplifierLib.bundle import write_bundle
    from ContrastAmplifierLib.network import NetworkConfig, build_network

    config = NetworkConfig(base_channels=2, levels=2)
    torch.manual_seed(0)
    states = {k: build_network(config).state_dict() for k in (0, 1)}
    out = tmp_path_factory.mktemp("bundle")
    write_bundle(out, states, name="random-tiny", version="0", description="random weights", intended_use="tests only",
                 training_data="none", modalities=CA_MODALITIES, spacing=(4.0, 4.0, 4.0), crop_size=(40, 48, 40),
                 percentiles={m: (-2.0, 3.0) for m in CA_MODALITIES}, network=config)
    return out


# -- a throw-away Orthanc PACS (Testing/ContrastAmplifierLib/orthanc_server.py) ------------------
# (used by Testing/ContrastAmplifierLib/test_pacs.py and Testing/LesionReaderLib/test_pacs_cases.py)

ORTHANC_HELPER_DIR = REPO / "Testing" / "ContrastAmplifierLib"


def import_orthanc_server():
    """The ``orthanc_server`` helper module (its folder is put on ``sys.path``)."""
    if str(ORTHANC_HELPER_DIR) not in sys.path:
        sys.path.insert(0, str(ORTHANC_HELPER_DIR))
    import orthanc_server

    return orthanc_server


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """A running Orthanc for the test module (DICOMweb and DIMSE on loopback, HTTP basic auth);
    skipped with the reason when Orthanc is not installed."""
    helper = import_orthanc_server()
    reason = helper.missing()
    if reason:
        pytest.skip(reason)
    server = helper.start_orthanc(tmp_path_factory.mktemp("orthanc"))
    yield server
    server.stop()


@pytest.fixture
def empty_orthanc(orthanc):
    """:func:`orthanc`, emptied of every study."""
    orthanc.clear()
    assert orthanc.instance_count() == 0
    return orthanc


@pytest.fixture
def no_pacs_env(monkeypatch):
    """No PACS endpoint, credentials or config file from the environment ($CA_PACS_*)."""
    from ContrastAmplifierLib import pacs

    for name in (pacs.ENV_URL, pacs.ENV_USER, pacs.ENV_PASSWORD, pacs.ENV_TOKEN, pacs.ENV_CALLING_AET, pacs.ENV_CONFIG):
        monkeypatch.delenv(name, raising=False)


# -- LesionReaderLib: tiny reader studies on real NIfTI files, a manual clock ----------------------
# (used by Testing/LesionReaderLib and by the LesionReader module test in Testing/SlicerModules).
# Case folders are named like patient ids, so blinding tests can check none of them reaches a reader.

#: Identifying strings planted in case folder names; none may reach the reader.
PATIENT_IDS = [f"PAT{1000 + i}_DOE" for i in range(12)]
VOLUME_FILES = {"T1c": "t1c.nii.gz", "T1c-pro": "t1c_pro.nii.gz", "T1c-vfa": "t1c_vfa.nii.gz", "T2-FLAIR": "flair.nii.gz"}


def _write_volume(path: Path, value: float = 0.0) -> None:
    """A 6x5x4 float volume with 1 mm spacing (enough for a reader study fixture)."""
    import numpy as np
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.full((4, 5, 6), value, np.float32))
    image.SetSpacing((1.0, 1.0, 1.0))
    sitk.WriteImage(image, str(path))


def _make_case_folders(root: Path, n: int) -> list[Path]:
    folders = []
    for i in range(n):
        folder = root / PATIENT_IDS[i]
        folder.mkdir(parents=True, exist_ok=True)
        for j, name in enumerate(VOLUME_FILES.values()):
            _write_volume(folder / name, value=float(j))
        folders.append(folder)
    return folders


@pytest.fixture
def case_folders(tmp_path: Path) -> list[Path]:
    """Six case folders named like patient ids, each with T1c, T1c-pro, T1c-vfa and T2-FLAIR volumes."""
    return _make_case_folders(tmp_path / "cases", 6)


@pytest.fixture
def make_study(tmp_path: Path) -> Callable[..., Path]:
    """``make_study(n_cases=6, readers=("R1", "R2"), **init_kwargs) -> study_dir``."""
    from LesionReaderLib.study import init_study

    def _make(n_cases: int = 6, readers=("R1", "R2"), name: str = "study", **kwargs) -> Path:
        folders = _make_case_folders(tmp_path / f"cases-{name}", n_cases)
        study_dir = tmp_path / name
        init_study(study_dir, folders, list(readers), **kwargs)
        return study_dir

    return _make


@pytest.fixture
def clock():
    from LesionReaderLib.study import ManualClock

    return ManualClock(datetime(2024, 3, 1, 9, 0, tzinfo=timezone.utc))
