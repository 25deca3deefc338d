"""Fixtures shared by the module tests: a fresh MRML scene, private temporary and models folders."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest


@pytest.fixture()
def scene(monkeypatch):
    """A fresh scene installed as ``slicer.mrmlScene``, as inside the application (slicer-core)."""
    slicer = pytest.importorskip("slicer", reason="slicer-core wheel (test extra) is required")
    scene = slicer.vtkMRMLScene()
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    return scene


@pytest.fixture()
def exchange_root(tmp_path: Path, monkeypatch) -> Path:
    """Temporary folders (exported patient data, generated phantoms) go here, so tests can see them removed."""
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


@pytest.fixture()
def user_models(tmp_path: Path, monkeypatch) -> Path:
    """An empty per-user models folder (CONTRAST_AMPLIFIER_MODELS), so nothing touches the real one."""
    folder = tmp_path / "user-models"
    monkeypatch.setenv("CONTRAST_AMPLIFIER_MODELS", str(folder))
    return folder
