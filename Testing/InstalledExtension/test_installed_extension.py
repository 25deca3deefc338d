"""The extension as 3D Slicer 5.8 installs it, run by a Python that holds only what Slicer ships.

``build_installed_tree.py`` copies exactly the files the CMakeLists.txt files name into
``lib/Slicer-5.8/qt-scripted-modules/`` (Slicer's install layout); ``slicer_env.py`` builds, once,
a cached environment holding Slicer 5.8's own Python packages (``slicer-5.8-packages.txt``) plus
the ``slicer-core`` wheel; ``slicer_python_runner.py`` runs each check in a child process started
from that environment in isolated mode, whose ``sys.path`` is the standard library, that
site-packages and the installed tree - never this checkout, never the project's venv.

This is the state right after the user installs the extension and restarts Slicer, before any
first-use ``pip install``: Slicer loads the three module files, the module panels open, the
model selector is filled. What the Libs need after the first-use install (torch, nibabel, ...)
is checked by ``test_first_use.py`` (the install itself, Apply, the modules' self-tests); here only
Lib code that needs nothing beyond Slicer's own packages (registration and image reading: numpy +
SimpleITK) runs, on Slicer's versions of them. The fixtures are in ``conftest.py``; the env is
built at the repository root (``.slicer-env-5.8/``, git-ignored, ``make clean`` removes it).

Set ``CA_SLICER_SERIES=5.6`` to mimic Slicer 5.6 instead (its own cached env).

Known differences from the real application: Python 3.11 instead of Slicer's 3.9.10
(``slicer-core`` needs >= 3.10; :func:`test_installed_scripts_compile_with_python_39` covers the
syntax), and no ``slicer.app``/Qt (the modules use ContrastAmplifierCommon.slicer_compat's
headless stand-ins, the Widget classes are not exercised).
"""

from __future__ import annotations

import ast
import glob
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Optional

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
#: Which Slicer to mimic ("5.8", or "5.6" with CA_SLICER_SERIES=5.6: its own cached env and lib/Slicer-5.6 tree).
SLICER_SERIES = os.environ.get("CA_SLICER_SERIES", "5.8")
MODULES = ("ContrastAmplifier", "ContrastAmplifierTraining", "LesionReader")
PROJECT_PACKAGES = ("ContrastAmplifierCommon", "ContrastAmplifierLib", "ContrastAmplifierTrainingLib", "LesionReaderLib")


# The helpers (build_installed_tree, slicer_env) and the fixtures env, installed and run_check
# are in conftest.py (shared with test_first_use.py).


# -- the installed tree (no child process) ---------------------------------------------------


def test_module_files_are_at_the_top_of_qt_scripted_modules(installed):
    """Slicer's scripted-module factory loads every ``*.py`` directly in qt-scripted-modules (not
    recursively) as a module: exactly the three module files must be there, nothing else."""
    top = sorted(p.name for p in installed.scripted_modules_dir.glob("*.py"))
    assert top == sorted(f"{name}.py" for name in MODULES)


def _module_of(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _project_imports(path: Path, root: Path) -> list[tuple]:
    """``(line, imported module)`` for every import of a project package in ``path`` (relative ones resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = _module_of(path, root) if path.name == "__init__.py" else _module_of(path, root).rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            # "from pkg import name": name may be a submodule
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names if alias.name != "*"]
    return [(line, name) for line, name in found if name.split(".")[0] in PROJECT_PACKAGES]


def _exists_in_tree(module: str, root: Path) -> bool:
    path = root.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def test_every_project_import_resolves_inside_the_installed_tree(installed):
    """Each ``ContrastAmplifierCommon``/``*Lib`` module an installed file imports is installed too
    (a file missing from a CMake list is a ModuleNotFoundError in Slicer only)."""
    root = installed.scripted_modules_dir
    missing = []
    for path in sorted(root.rglob("*.py")):
        for line, name in _project_imports(path, root):
            if _exists_in_tree(name, root):
                continue
            parent = name.rpartition(".")[0]
            if _source_module_exists(name):
                missing.append(f"{path.relative_to(root)}:{line} imports {name}")
            elif not (parent and _source_module_exists(parent)):  # neither a module nor "from module import attr"
                missing.append(f"{path.relative_to(root)}:{line} imports {name} (not in the source either)")
    assert not missing, "imported but not installed (add them to the module's CMakeLists.txt):\n" + "\n".join(missing)


#: Source folder of each project package, to tell an imported attribute from a module left out of the install.
REPO_SOURCE_OF = {
    "ContrastAmplifierCommon": REPO / "ContrastAmplifierCommon",
    "ContrastAmplifierLib": REPO / "ContrastAmplifier",
    "ContrastAmplifierTrainingLib": REPO / "ContrastAmplifierTraining",
    "LesionReaderLib": REPO / "LesionReader",
}


def _source_module_exists(module: str) -> bool:
    return _exists_in_tree(module, REPO_SOURCE_OF[module.split(".")[0]])


def test_files_the_code_reads_next_to_itself_are_installed(installed):
    """Data files the installed code opens relative to its own ``__file__`` (or Slicer's ``resourcePath``)."""
    root = installed.scripted_modules_dir
    wanted = ["ContrastAmplifierLib/bundle-schema.json",  # bundle.load_schema()
              "ContrastAmplifierCommon/requirements.txt"]  # dependencies.REQUIREMENTS_FILE
    for name in MODULES:  # ScriptedLoadableModuleWidget.resourcePath("UI/<name>.ui"), the module icon
        wanted += [f"Resources/UI/{name}.ui", f"Resources/Icons/{name}.png"]
    # registry.builtin_models_dir(): Models.json and every file of each listed bundle; the Sample Data thumbnail
    models = _models_source_dir()
    wanted += ["Resources/Models/Models.json", "Resources/Icons/ContrastAmplifierPhantom.png"]
    for item in json.loads((models / "Models.json").read_text(encoding="utf-8"))["models"]:
        manifest = json.loads((models / item["folder"] / "bundle.json").read_text(encoding="utf-8"))
        wanted += [f"Resources/Models/{item['folder']}/{f}" for f in ["bundle.json", *manifest["files"]]]
    missing = [name for name in wanted if not (root / name).is_file()]
    assert not missing, f"not installed: {missing}"


# -- the Slicer-like environment -------------------------------------------------------------


def test_environment_holds_exactly_slicer_packages(env):
    """The env is what Slicer 5.8 ships (pins) plus slicer-core and its vtk: nothing the project
    needs after its first-use install (torch, nibabel, nilearn, platformdirs, ...) leaked in."""
    code = ("import importlib.metadata as m, json\n"
            "print(json.dumps(sorted((d.metadata['Name'], d.version) for d in m.distributions())))")
    proc = subprocess.run([str(env.python), "-I", "-c", code], capture_output=True, text=True, check=True)
    installed = {re.sub(r"[-_.]+", "-", name).lower(): version for name, version in json.loads(proc.stdout)}
    expected = {}
    for requirement in env.requirements:
        name, version = re.match(r"([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==(\S+)", requirement).groups()
        expected[re.sub(r"[-_.]+", "-", name).lower()] = version
    assert installed == expected


# -- Slicer loads the modules ----------------------------------------------------------------


@pytest.mark.parametrize("name", MODULES)
def test_module_file_loads_and_describes_itself(run_check, name):
    """What Slicer does at start-up for each module file: load it by path, instantiate the module class."""
    result = run_check(f"""
new_scene()
module = load_module({name!r})
parent = module_parent()
getattr(module, {name!r})(parent)
emit({{"title": parent.title, "categories": parent.categories, "logic": hasattr(module, {name + "Logic"!r})}})
""")
    assert result["title"] and result["categories"] and result["logic"]


@pytest.mark.parametrize("name", MODULES)
def test_logic_instantiates_with_its_parameter_node(run_check, name):
    result = run_check(f"""
scene = new_scene()
module = load_module({name!r})
logic = getattr(module, {name + "Logic"!r})()
node = logic.getParameterNode()
if hasattr(logic, "setDefaultParameters"):
    logic.setDefaultParameters(node)
node = getattr(node, "parameterNode", node)  # a parameterNodeWrapper instance wraps the MRML node
emit({{"node_class": node.GetClassName(), "in_scene": scene.GetNodeByID(node.GetID()) is not None}})
""")
    assert result == {"node_class": "vtkMRMLScriptedModuleNode", "in_scene": True}


def test_common_package_imports_with_slicer_packages_only(run_check):
    """ContrastAmplifierCommon is imported by the module files at start-up: no package beyond
    Slicer's (cliapp, used by the command lines only, may need typer)."""
    result = run_check("""
import importlib, pkgutil, ContrastAmplifierCommon
names = sorted(m.name for m in pkgutil.iter_modules(ContrastAmplifierCommon.__path__) if m.name != "cliapp")
for name in names:
    importlib.import_module("ContrastAmplifierCommon." + name)
emit(names)
""")
    assert "dependencies" in result and "slicer_compat" in result


# -- first-use install -----------------------------------------------------------------------


def test_requirements_are_read_from_the_installed_file(run_check, installed):
    result = run_check("""
from ContrastAmplifierCommon import dependencies
emit({"file": str(dependencies.REQUIREMENTS_FILE), "requirements": dependencies.load_requirements()})
""")
    installed_file = installed.scripted_modules_dir / "ContrastAmplifierCommon" / "requirements.txt"
    assert Path(result["file"]) == installed_file
    lines = (line.split("#", 1)[0].strip() for line in installed_file.read_text(encoding="utf-8").splitlines())
    assert result["requirements"] == [line for line in lines if line]


def test_first_use_install_leaves_slicer_packages_alone(run_check, env):
    """Every requirement on a package Slicer ships is already met by Slicer's own version: the
    first-use install never pip-upgrades numpy/scipy under Slicer, and never tries SimpleITK
    (which dependencies.py refuses to install: it would report it as still missing)."""
    missing = run_check("""
from ContrastAmplifierCommon import dependencies
emit(dependencies.missing_requirements())
""")
    shipped = {re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.\-]+", r).group(0)).lower() for r in env.requirements}
    clashing = [r for r in missing if re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.\-]+", r).group(0)).lower() in shipped]
    assert not clashing, f"needs a newer version of what Slicer {SLICER_SERIES} ships: {clashing}"


# -- the shipped demo model ------------------------------------------------------------------


def _models_source_dir() -> Path:
    """The shipped models' source folder: the module's own resources, installed beside ContrastAmplifierLib."""
    return REPO / "ContrastAmplifier" / "Resources" / "Models"


def _demo_manifest() -> dict:
    """bundle.json of the shipped default (the first entry of Models.json), read from the source tree."""
    models = _models_source_dir()
    registry = json.loads((models / "Models.json").read_text(encoding="utf-8"))
    folder = registry["models"][0]["folder"]
    return json.loads((models / folder / "bundle.json").read_text(encoding="utf-8"))


def _demo_name() -> str:
    return _demo_manifest()["name"]


def _demo_folds() -> list:
    return sorted(int(k) for k in _demo_manifest()["folds"])


def test_registry_finds_the_installed_models_folder(run_check, installed):
    """``registry.builtin_models_dir()`` finds ``Resources/Models`` inside the installed extension."""
    found = run_check("""
from ContrastAmplifierLib import registry
emit(registry.builtin_models_dir())
""")
    assert found is not None, "registry.builtin_models_dir() is None: Resources/Models is not installed"
    # the module's resources land in qt-scripted-modules/Resources/, beside ContrastAmplifierLib/
    assert Path(found) == installed.scripted_modules_dir / "Resources" / "Models"


def test_registry_shipped_default_is_the_demo(run_check):
    assert run_check("""
from ContrastAmplifierLib import registry
emit(registry.shipped_default_name())
""") == _demo_name()


def test_registry_lists_models_before_the_first_use_install(run_check, installed):
    """The model selector is filled when the panel opens, before any pip install: ``list_models()``
    must run on Slicer's packages alone and list the shipped demo from the installed tree."""
    entries = run_check("""
from ContrastAmplifierLib import registry
emit([{"name": e.name, "source": e.source, "path": str(e.path), "folds": list(e.folds)} for e in registry.list_models()])
""")
    demo = [e for e in entries if e["name"] == _demo_name()]
    assert demo and demo[0]["source"] == "builtin", entries
    assert installed.root.resolve() in Path(demo[0]["path"]).resolve().parents
    assert demo[0]["folds"] == _demo_folds()


def test_logic_fills_the_model_selector_before_the_first_use_install(run_check):
    """What ContrastAmplifierWidget.refreshModels/setParameterNode call when the panel opens."""
    result = run_check("""
new_scene()
module = load_module("ContrastAmplifier")
logic = module.ContrastAmplifierLogic()
models = logic.availableModels()
emit({"models": [m.name for m in models], "summaries": [logic.modelSummary(m) for m in models],
      "default": logic.defaultModelName()})
""")
    assert _demo_name() in result["models"], result
    assert result["default"] == _demo_name()


def test_panel_describes_models_before_the_first_use_install(run_check):
    """The line under the model selector and Quick's fold come from bundle.json read as plain JSON:
    Slicer ships neither jsonschema (the full manifest check) nor platformdirs (the user's folder)."""
    result = run_check("""
import sys
new_scene()
module = load_module("ContrastAmplifier")
logic = module.ContrastAmplifierLogic()
entry = logic.findModel(None)
emit({"info": logic.modelInfo(entry), "quick": logic.ensembleChoice("quick", None),
      "imported": sorted(m for m in ("jsonschema", "platformdirs", "torch", "SimpleITK") if m in sys.modules)})
""")
    folds = ", ".join(map(str, _demo_folds()))
    assert result["info"].startswith(f"{_demo_name()} ") and f"folds {folds} - " in result["info"], result
    assert "not for clinical use" in result["info"]
    assert result["quick"] == [[0], 1]
    assert result["imported"] == [], f"describing models imported {result['imported']}"


def test_bundles_the_command_line_imported_are_listed_in_slicer(run_check, tmp_path, monkeypatch):
    """A bundle put where platformdirs says (the command line's ``models import``, or Slicer after its
    first-use install) is listed by Slicer's registry before platformdirs is installed, and back."""
    import platformdirs

    home = tmp_path / "home"  # run_check's HOME; XDG_DATA_HOME = HOME/.local/share
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_DATA_HOME", str(home / ".local/share"))
    user_models = Path(platformdirs.user_data_dir("SlicerContrastAmplifier", appauthor=False)) / "models"
    manifest = json.loads((_models_source_dir() / "phantom-demo" / "bundle.json").read_text(encoding="utf-8"))
    manifest["name"] = "imported-elsewhere"
    (user_models / "imported-elsewhere").mkdir(parents=True)
    (user_models / "imported-elsewhere" / "bundle.json").write_text(json.dumps(manifest), encoding="utf-8")
    result = run_check("""
from ContrastAmplifierLib import registry
emit({"folder": registry.user_models_dir(), "models": [(e.name, e.source) for e in registry.list_models()]})
""")
    assert Path(result["folder"]) == user_models
    assert result["models"][0] == ["imported-elsewhere", "user"], result


def test_module_file_loads_without_importing_simpleitk(run_check):
    """Slicer loads every module file at start-up; SimpleITK (Slicer's own) is imported when a button needs it."""
    imported = run_check("""
import sys, types
new_scene()
module = load_module("ContrastAmplifier")
module.ContrastAmplifier(module_parent())
module.ContrastAmplifierLogic().getParameterNode()
emit(sorted(m for m in ("SimpleITK", "ContrastAmplifierLib.mrml_bridge") if m in sys.modules))
""")
    assert imported == []


def test_training_panel_opens_before_the_first_use_install(run_check, tmp_path):
    """What ContrastAmplifierTrainingWidget._updateButtons calls: available (Start installs the
    packages first) and a message naming what is missing; run status of an empty folder."""
    result = run_check(f"""
new_scene()
module = load_module("ContrastAmplifierTraining")
logic = module.ContrastAmplifierTrainingLogic()
available, reason = logic.trainingAvailability()
emit({{"available": available, "reason": reason, "hasRun": logic.hasRun({str(tmp_path)!r})}})
""")
    assert result["available"] is True, result
    assert result["hasRun"] is False


# -- Lib code that needs only what Slicer ships, on Slicer's versions ------------------------


def test_rigid_registration_runs_on_slicers_simpleitk(run_check):
    """registration.py needs only numpy and SimpleITK, both shipped by Slicer (SimpleITK 2.3.1 in 5.8):
    preprocessing (Preprocess and Apply) registers T1/FLAIR/ADC to the T1c with it."""
    result = run_check("""
import numpy as np, SimpleITK as sitk
from ContrastAmplifierLib.registration import register_rigid
z, y, x = np.mgrid[:40, :40, :40].astype(np.float32)
def head(cx, cy, cz):
    r2 = (x - cx) ** 2 / 120 + (y - cy) ** 2 / 160 + (z - cz) ** 2 / 100
    inner = (x - cx - 3) ** 2 / 20 + (y - cy) ** 2 / 30 + (z - cz + 2) ** 2 / 25
    return sitk.GetImageFromArray((1000 * np.exp(-r2) + 500 * np.exp(-inner)).astype(np.float32))
fixed, moving = head(20, 20, 20), head(21, 19, 20)
for image in (fixed, moving):
    image.SetSpacing((2.0, 2.0, 2.0))
transform = register_rigid(fixed, moving)
emit({"simpleitk": sitk.Version_VersionString(), "parameters": list(transform.GetParameters())})
""")
    assert len(result["parameters"]) == 6, result


def test_truncated_compressed_mha_is_refused_on_slicers_simpleitk(run_check, tmp_path):
    """imageio.read_image promises to refuse a truncated or corrupted file before any work starts."""
    result = run_check(f"""
import numpy as np, SimpleITK as sitk
from pathlib import Path
from ContrastAmplifierLib.imageio import read_image
from ContrastAmplifierLib.imagefiles import ImageValidationError
folder = Path({str(tmp_path)!r})
whole = folder / "whole.mha"
sitk.WriteImage(sitk.GetImageFromArray(np.random.default_rng(0).random((40, 40, 40)).astype(np.float32)), str(whole), True)
data = whole.read_bytes()
truncated = folder / "t1c.mha"
truncated.write_bytes(data[: len(data) * 2 // 3])
try:
    read_image(truncated, "T1c")
    emit({{"simpleitk": sitk.Version_VersionString(), "refused": False}})
except ImageValidationError as exc:
    emit({{"simpleitk": sitk.Version_VersionString(), "refused": True, "message": str(exc)}})
""")
    assert result["refused"], f"a truncated compressed .mha was read without error under SimpleITK {result['simpleitk']}"


# -- Slicer's own interpreter ----------------------------------------------------------------


def _python39() -> Optional[str]:
    """A Python 3.9 interpreter (Slicer 5.6/5.8 embed 3.9.10): $SLICER_PYTHON39, pyenv's 3.9.x, or python3.9 on PATH."""
    import pwd

    pyenv_roots = [os.environ.get("PYENV_ROOT", ""), os.path.join(pwd.getpwuid(os.getuid()).pw_dir, ".pyenv")]
    candidates = [os.environ.get("SLICER_PYTHON39", "")]
    for pyenv_root in filter(None, pyenv_roots):  # $HOME may be a test sandbox: the account's home is used
        candidates += sorted(glob.glob(os.path.join(pyenv_root, "versions", "3.9.*", "bin", "python")), reverse=True)
    candidates += [shutil.which("python3.9") or ""]
    for candidate in filter(None, candidates):
        try:
            proc = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2] == (3, 9))"],
                                  capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if proc.stdout.strip() == "True":
            return candidate
    return None


def test_installed_scripts_compile_with_python_39(installed):
    """Slicer's build byte-compiles every installed script with its Python 3.9.10 (ctk_compile_python_scripts):
    a 3.10+ syntax error is only printed there, and the module then fails to load in Slicer."""
    python = _python39()
    assert python, "no Python 3.9 found (set SLICER_PYTHON39, or install 3.9 with pyenv)"
    code = ("import sys, pathlib\n"
            "errors = []\n"
            "for p in sorted(pathlib.Path(sys.argv[1]).rglob('*.py')):\n"
            "    try:\n"
            "        compile(p.read_bytes(), str(p), 'exec', dont_inherit=True)\n"
            "    except SyntaxError as e:\n"
            "        errors.append(f'{p}:{e.lineno}: {e.msg}')\n"
            "print(sys.version.split()[0]); print('\\n'.join(errors)); sys.exit(1 if errors else 0)\n")
    proc = subprocess.run([python, "-I", "-c", code, str(installed.scripted_modules_dir)], capture_output=True, text=True)
    assert proc.stdout.startswith("3.9."), proc.stdout + proc.stderr
    assert proc.returncode == 0, proc.stdout + proc.stderr
