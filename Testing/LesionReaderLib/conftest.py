"""Fixtures for the LesionReaderLib tests. The study fixtures (``make_study``, ``case_folders``,
``clock``) live in ``Testing/conftest.py``: the LesionReader module tests use them too."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Helper modules beside the tests (not test files): simulated_reads.
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture
def subprocess_env() -> dict:
    """Environment for child Python processes that import LesionReaderLib from this checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "LesionReader"), str(REPO / "ContrastAmplifierCommon"), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env
