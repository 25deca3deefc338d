"""Shared pytest set-up: keep tests off the user's folders and within the CI machine's 2 cores."""

from __future__ import annotations

import atexit
import locale
import os
import shutil
import sys
import tempfile
from pathlib import Path

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
