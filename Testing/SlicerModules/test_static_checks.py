"""Static checks of the Slicer side, runnable without Slicer.

For each module folder (ContrastAmplifier, ContrastAmplifierTraining, LesionReader; a missing
module file or Lib fails): the CMakeLists lists every file, the .ui
file holds every widget and parameter the module code uses, the module file has the four
classes and compiles, and the ``*Lib`` packages stay free of Qt. Also the extension-level
CMakeLists and the ExtensionsIndex description file.
"""

from __future__ import annotations

import ast
import json
import py_compile
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Set

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULES = ("ContrastAmplifier", "ContrastAmplifierTraining", "LesionReader")
FORBIDDEN_IN_LIB = ("qt", "ctk", "slicer.ScriptedLoadableModule", "PythonQt")
#: vtkMRMLScriptedModuleNode methods whose first argument is a parameter-node key.
PARAMETER_METHODS = {"GetParameter", "SetParameter", "UnsetParameter"}
REFERENCE_METHODS = {"GetNodeReference", "GetNodeReferenceID", "SetNodeReferenceID", "SetAndObserveNodeReferenceID"}


# -- helpers -------------------------------------------------------------------------------------


@dataclass
class Module:
    name: str
    folder: Path

    @property
    def script(self) -> Path:
        return self.folder / f"{self.name}.py"

    @property
    def lib(self) -> Path:
        return self.folder / f"{self.name}Lib"

    @property
    def ui_file(self) -> Path:
        return self.folder / "Resources" / "UI" / f"{self.name}.ui"

    @property
    def icon(self) -> Path:
        return self.folder / "Resources" / "Icons" / f"{self.name}.png"


def existing_module(name: str) -> Module:
    module = Module(name, REPO / name)
    assert module.script.is_file(), f"{name}/{name}.py is missing"
    assert module.lib.is_dir(), f"{name}/{name}Lib is missing"
    return module


def _strip_cmake_comments(text: str) -> str:
    return "\n".join(line.split("#", 1)[0] if not line.lstrip().startswith("#") else "" for line in text.splitlines())


def cmake_lists(module: Module) -> Dict[str, List[str]]:
    """The ``set(VAR ...)`` lists of a module CMakeLists, with ``${MODULE_NAME}`` substituted."""
    path = module.folder / "CMakeLists.txt"
    assert path.is_file(), f"{path} is missing: each module folder needs its own CMakeLists.txt"
    text = _strip_cmake_comments(path.read_text(encoding="utf-8"))
    variables: Dict[str, List[str]] = {}
    for var, body in re.findall(r"set\(\s*(\w+)\s+(.*?)\)", text, flags=re.S):
        variables[var] = body.split()
    name = variables.get("MODULE_NAME", [module.name])[0]
    return {k: [v.replace("${MODULE_NAME}", name) for v in vals] for k, vals in variables.items()}


def ui_tree(module: Module) -> ET.Element:
    assert module.ui_file.is_file(), f"{module.ui_file} is missing"
    return ET.parse(module.ui_file).getroot()


def ui_widget_names(root: ET.Element) -> Set[str]:
    names = {w.get("name") for w in root.iter("widget")}
    names |= {a.get("name") for a in root.iter("action")}
    names |= {lay.get("name") for lay in root.iter("layout")}
    return {n for n in names if n}


def ui_parameter_names(root: ET.Element) -> Dict[str, str]:
    """SlicerParameterName dynamic property -> widget name."""
    found = {}
    for widget in root.iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                found[prop.findtext("string")] = widget.get("name")
    return found


def module_ast(module: Module) -> ast.Module:
    return ast.parse(module.script.read_text(encoding="utf-8"), filename=str(module.script))


def self_ui_names(tree: ast.AST) -> Set[str]:
    """Every ``X`` in ``self.ui.X``."""
    names = set()
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "ui"
                and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"):
            names.add(node.attr)
    return names


def literal_keys(tree: ast.AST, methods: Set[str]) -> Set[str]:
    keys = set()
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in methods
                and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            keys.add(node.args[0].value)
    return keys


def class_defs(tree: ast.Module) -> Dict[str, ast.ClassDef]:
    return {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}


def declared_parameters(logic: ast.ClassDef) -> Optional[Set[str]]:
    """Keys of the Logic's ``PARAMETERS`` dict and ``NODE_REFERENCES``/``INTERNAL_PARAMETERS`` tuples, or None."""
    declared: Optional[Set[str]] = None
    for node in logic.body:
        targets = []
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        for target in targets:
            if isinstance(target, ast.Name) and target.id in ("PARAMETERS", "NODE_REFERENCES", "INTERNAL_PARAMETERS"):
                literal = ast.literal_eval(value)
                declared = (declared or set()) | set(literal)
    return declared


def internal_parameters(logic: ast.ClassDef) -> Set[str]:
    for node in logic.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == "INTERNAL_PARAMETERS" for t in targets):
                return set(ast.literal_eval(node.value))
    return set()


def imported_modules(tree: ast.AST) -> Set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def lib_files(module: Module) -> List[Path]:
    return sorted(p for p in module.lib.rglob("*") if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc")


# -- per-module checks ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODULES)
def test_cmakelists_lists_every_file(name):
    module = existing_module(name)
    variables = cmake_lists(module)
    text = _strip_cmake_comments((module.folder / "CMakeLists.txt").read_text(encoding="utf-8"))
    call = re.search(r"slicerMacroBuildScriptedModule\((.*?)\)", text, flags=re.S)
    assert call, "CMakeLists must call slicerMacroBuildScriptedModule(...)"
    for keyword in ("NAME", "SCRIPTS", "RESOURCES", "WITH_GENERIC_TESTS"):
        assert re.search(rf"\b{keyword}\b", call.group(1)), f"slicerMacroBuildScriptedModule lacks {keyword}"
    assert variables.get("MODULE_NAME") == [name]
    scripts = set(variables.get("MODULE_PYTHON_SCRIPTS", []))
    resources = set(variables.get("MODULE_PYTHON_RESOURCES", []))
    assert f"{name}.py" in scripts

    rel = lambda p: p.relative_to(module.folder).as_posix()  # noqa: E731
    files = lib_files(module)
    unlisted_py = sorted(rel(p) for p in files if p.suffix == ".py" and rel(p) not in scripts)
    assert not unlisted_py, f"add to MODULE_PYTHON_SCRIPTS in {name}/CMakeLists.txt (or run Testing/SlicerModules/update_cmakelists.py): {unlisted_py}"
    unlisted_data = sorted(rel(p) for p in files if p.suffix != ".py" and rel(p) not in resources)
    assert not unlisted_data, f"add to MODULE_PYTHON_RESOURCES in {name}/CMakeLists.txt: {unlisted_data}"
    module_resources = sorted(rel(p) for p in (module.folder / "Resources").rglob("*") if p.is_file())
    unlisted_res = [r for r in module_resources if r not in resources]
    assert not unlisted_res, f"add to MODULE_PYTHON_RESOURCES in {name}/CMakeLists.txt: {unlisted_res}"
    missing = sorted(f for f in scripts | resources if not (module.folder / f).is_file())
    assert not missing, f"{name}/CMakeLists.txt lists files that do not exist: {missing}"
    assert all(f.endswith(".py") for f in scripts), "SCRIPTS must hold only .py files"


@pytest.mark.parametrize("name", MODULES)
def test_ui_file_holds_every_widget_the_code_uses(name):
    module = existing_module(name)
    root = ui_tree(module)
    assert root.tag == "ui"
    top = root.find("widget")
    assert top is not None and top.get("class") == "qMRMLWidget", "the .ui top widget must be a qMRMLWidget (setMRMLScene)"
    names = ui_widget_names(root)
    used = self_ui_names(module_ast(module))
    assert used, f"{name}.py never uses self.ui: load the .ui with slicer.util.childWidgetVariables"
    missing = sorted(used - names)
    assert not missing, f"{name}.py uses self.ui.{missing} but {module.ui_file.name} has no such widget"


@pytest.mark.parametrize("name", MODULES)
def test_node_selectors_are_wired_to_the_scene(name):
    module = existing_module(name)
    root = ui_tree(module)
    top_name = root.find("widget").get("name")
    receivers = {
        c.findtext("receiver") for c in root.iter("connection")
        if c.findtext("sender") == top_name and c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
        and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"
    }
    for widget in root.iter("widget"):
        if widget.get("class", "").startswith("qMRML") and widget is not root.find("widget"):
            assert widget.get("name") in receivers, f"{widget.get('name')} is not connected to mrmlSceneChanged -> setMRMLScene"
            if widget.get("class") == "qMRMLNodeComboBox":
                types = [s.text for p in widget.findall("property") if p.get("name") == "nodeTypes" for s in p.iter("string")]
                assert types, f"{widget.get('name')} has no nodeTypes"


@pytest.mark.parametrize("name", MODULES)
def test_every_parameter_is_declared_and_bound_in_the_ui(name):
    module = existing_module(name)
    tree = module_ast(module)
    ui_params = ui_parameter_names(ui_tree(module))
    used = literal_keys(tree, PARAMETER_METHODS | REFERENCE_METHODS)
    logic = class_defs(tree).get(f"{name}Logic")
    declared = declared_parameters(logic) if logic is not None else None
    if declared is None:  # no declaration: every key used must be bound to a widget
        missing = sorted(used - set(ui_params))
        assert not missing, f"{name}.py uses parameters {missing} that no widget in the .ui binds (SlicerParameterName)"
        return
    undeclared = sorted(used - declared)
    assert not undeclared, f"{name}.py uses parameters {undeclared} not declared in {name}Logic.PARAMETERS/NODE_REFERENCES"
    unknown_in_ui = sorted(set(ui_params) - declared)
    assert not unknown_in_ui, f"{module.ui_file.name} binds undeclared parameters {unknown_in_ui}"
    unbound = sorted(declared - set(ui_params) - internal_parameters(logic))
    assert not unbound, f"declared parameters {unbound} have no widget in {module.ui_file.name} (SlicerParameterName)"


@pytest.mark.parametrize("name", MODULES)
def test_module_file_has_the_four_classes_and_metadata(name):
    module = existing_module(name)
    tree = module_ast(module)
    classes = class_defs(tree)
    for suffix in ("", "Widget", "Logic", "Test"):
        assert f"{name}{suffix}" in classes, f"{name}.py lacks class {name}{suffix}"
    init = next((f for f in classes[name].body if isinstance(f, ast.FunctionDef) and f.name == "__init__"), None)
    assert init is not None
    assigned: Dict[str, ast.AST] = {}
    for node in ast.walk(init):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Attribute) and target.value.attr == "parent":
                    assigned[target.attr] = node.value
    for attr in ("title", "categories", "contributors", "helpText", "acknowledgementText"):
        assert attr in assigned, f"{name}: self.parent.{attr} is not set"
    source = module.script.read_text(encoding="utf-8")
    help_text = ast.get_source_segment(source, assigned["helpText"]) or ""
    assert re.search(r"research use only", help_text, re.I), f"{name}: helpText must say 'research use only'"
    ack = ast.get_source_segment(source, assigned["acknowledgementText"]) or ""
    assert "PAPER" in ack or "Invest Radiol" in ack, f"{name}: acknowledgementText must cite the paper"
    if "PAPER" in ack:
        assert re.search(r"Invest Radiol.*2022", source, re.S), f"{name}: PAPER must cite Invest Radiol 2022"


@pytest.mark.parametrize("name", MODULES)
def test_module_and_lib_files_compile(name, tmp_path):
    module = existing_module(name)
    for path in [module.script, *(p for p in lib_files(module) if p.suffix == ".py")]:
        py_compile.compile(str(path), cfile=str(tmp_path / (path.stem + ".pyc")), doraise=True)


@pytest.mark.parametrize("name", MODULES)
def test_lib_never_imports_qt(name):
    module = existing_module(name)
    for path in (p for p in lib_files(module) if p.suffix == ".py"):
        imported = imported_modules(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        bad = sorted(m for m in imported if any(m == f or m.startswith(f + ".") for f in FORBIDDEN_IN_LIB))
        assert not bad, f"{path.relative_to(REPO)} imports {bad}; *Lib packages must run without Qt"


@pytest.mark.parametrize("name", MODULES)
def test_module_file_is_importable_headless_and_installs_nothing_at_import(name):
    """Qt imports sit in functions or a try block; no pip install/ensure call at module level."""
    module = existing_module(name)
    tree = module_ast(module)
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = imported_modules(node)
            bad = sorted(m for m in names if m.split(".")[0] in ("qt", "ctk") or m.startswith("slicer.ScriptedLoadableModule"))
            assert not bad, f"{name}.py imports {bad} at top level outside try/except: the Logic would not load headless"
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            pytest.fail(f"{name}.py calls {ast.unparse(node.value)[:60]} at import time")
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.Expr)):
            for call in (n for n in ast.walk(node) if isinstance(n, ast.Call)):
                text = ast.unparse(call.func)
                assert not re.search(r"pip_install|pip_ensure|ensure_dependencies", text), f"{name}.py installs at import: {text}"


@pytest.mark.parametrize("name", MODULES)
def test_icons_exist(name):
    module = existing_module(name)
    from PIL import Image

    assert module.icon.is_file(), f"{module.icon} is missing"
    with Image.open(module.icon) as image:
        assert image.size == (128, 128), f"{module.icon.name} is {image.size}; Slicer module icons are 128x128"


# -- extension-level checks ----------------------------------------------------------------------


def top_cmake() -> str:
    return _strip_cmake_comments((REPO / "CMakeLists.txt").read_text(encoding="utf-8"))


def test_top_level_cmakelists_is_a_slicer_extension():
    text = top_cmake()
    assert re.search(r"project\(\s*ContrastAmplifier\s*\)", text)
    for var in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert re.search(rf"set\(\s*{var}\s+\S", text), f"top-level CMakeLists lacks set({var} ...)"
    assert re.search(r"set\(\s*EXTENSION_DEPENDS\s+\"?[^)]*PyTorch", text)
    assert re.search(r"find_package\(\s*Slicer\s+REQUIRED\s*\)", text)
    assert "include(${Slicer_USE_FILE})" in text
    assert "include(${Slicer_EXTENSION_GENERATE_CONFIG})" in text
    assert "include(${Slicer_EXTENSION_CPACK})" in text
    icon_url = re.search(r"set\(\s*EXTENSION_ICONURL\s+\"([^\"]+)\"", text).group(1)
    assert icon_url.endswith("Resources/ContrastAmplifier.png")
    assert (REPO / "Resources" / "ContrastAmplifier.png").is_file()


@pytest.mark.parametrize("name", MODULES)
def test_top_level_cmakelists_adds_each_module(name):
    assert re.search(rf"add_subdirectory\(\s*{name}\s*\)", top_cmake()), f"add_subdirectory({name}) missing"
    existing_module(name)
    assert (REPO / name / "CMakeLists.txt").is_file(), f"add_subdirectory({name}) needs {name}/CMakeLists.txt"


def test_extension_description_json():
    path = REPO / "Resources" / "ContrastAmplifier.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    required = {"$schema", "build_dependencies", "build_subdirectory", "category", "scm_revision", "scm_url", "tier"}
    assert required <= data.keys(), f"{path.name} lacks {sorted(required - data.keys())}"
    assert "slicer-extension-catalog-entry-schema" in data["$schema"]
    assert data["scm_url"].startswith("https://") and data["scm_url"].endswith(".git")
    assert isinstance(data["build_dependencies"], list) and "PyTorch" in data["build_dependencies"]
    category = re.search(r"set\(\s*EXTENSION_CATEGORY\s+\"([^\"]+)\"", top_cmake()).group(1)
    assert data["category"] == category, "ExtensionsIndex category must equal EXTENSION_CATEGORY"
    assert data["tier"] in (1, 3, 5)


# -- the shared package and the direction of imports ---------------------------------------------

COMMON = "ContrastAmplifierCommon"
LIBS = {name: f"{name}Lib" for name in MODULES}


def _package_imports(folder: Path) -> Dict[Path, Set[str]]:
    return {p: imported_modules(ast.parse(p.read_text(encoding="utf-8"), filename=str(p)))
            for p in sorted(folder.rglob("*.py")) if "__pycache__" not in p.parts}


def _imports_any(imported: Set[str], roots) -> List[str]:
    return sorted(m for m in imported if any(m == r or m.startswith(r + ".") for r in roots))


def test_common_cmakelists_lists_every_file():
    folder = REPO / COMMON
    variables = cmake_lists(Module(COMMON, folder))
    assert variables.get("MODULE_NAME") == [COMMON]
    listed = set(variables.get("MODULE_PYTHON_SCRIPTS", [])) | set(variables.get("MODULE_PYTHON_RESOURCES", []))
    on_disk = {p.relative_to(folder).as_posix() for p in (folder / COMMON).rglob("*")
               if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}
    assert on_disk == listed, f"{COMMON}/CMakeLists.txt: unlisted {sorted(on_disk - listed)}, missing {sorted(listed - on_disk)}"
    top = _strip_cmake_comments((REPO / "CMakeLists.txt").read_text(encoding="utf-8"))
    subdirs = re.findall(r"add_subdirectory\((\w+)\)", top)
    assert subdirs[0] == COMMON and set(MODULES) <= set(subdirs), subdirs


def test_imports_point_one_way():
    """Common imports no module; Libs import no module file and no Qt; ContrastAmplifierLib imports
    neither the training nor the reader Lib; only slicer_compat decides "inside Slicer or headless"."""
    module_files = set(MODULES)
    for path, imported in _package_imports(REPO / COMMON / COMMON).items():
        bad = _imports_any(imported, [*module_files, *LIBS.values()])
        assert not bad, f"{path.relative_to(REPO)} imports {bad}: the shared package imports none of the modules"
        if path.name != "slicer_compat.py":
            assert not _imports_any(imported, FORBIDDEN_IN_LIB), f"{path.relative_to(REPO)} imports Qt/ScriptedLoadableModule"
    for name, lib in LIBS.items():
        others = [LIBS[n] for n in MODULES if n != name] if name == "ContrastAmplifier" else []
        for path, imported in _package_imports(REPO / name / lib).items():
            bad = _imports_any(imported, [*module_files, *others])
            assert not bad, f"{path.relative_to(REPO)} imports {bad}: Libs import no module file, and ContrastAmplifierLib no other Lib"
    for name in MODULES:
        imported = imported_modules(ast.parse((REPO / name / f"{name}.py").read_text(encoding="utf-8")))
        assert not _imports_any(imported, ["slicer.ScriptedLoadableModule"]), f"{name}.py: use {COMMON}.slicer_compat"


def test_modules_declare_the_libs_they_import():
    """A module whose file or Lib imports another module's Lib lists that module in parent.dependencies."""
    for name in MODULES:
        text = (REPO / name / f"{name}.py").read_text(encoding="utf-8")
        imported = imported_modules(ast.parse(text)).union(*_package_imports(REPO / name / LIBS[name]).values())
        needed = sorted(other for other in MODULES if other != name and _imports_any(imported, [LIBS[other]]))
        declared = re.search(r"self\.parent\.dependencies\s*=\s*(\[[^\]]*\])", text)
        assert declared, f"{name}.py sets no parent.dependencies"
        assert sorted(ast.literal_eval(declared.group(1))) == needed, f"{name}.py: parent.dependencies must be {needed}"


# -- typed parameter nodes: node selectors ------------------------------------------------------------
# (which widget binds which field type is checked in test_parameter_binding.py)


def _node_fields(tree: ast.Module) -> Dict[str, str]:
    """Field -> MRML class name, for the node-typed fields of the module's ``@parameterNodeWrapper`` classes."""
    found = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and any(
                (d.id if isinstance(d, ast.Name) else getattr(d, "attr", None)) == "parameterNodeWrapper"
                for d in (dec.func if isinstance(dec, ast.Call) else dec for dec in node.decorator_list)):
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    annotation = item.annotation
                    name = annotation.id if isinstance(annotation, ast.Name) else getattr(annotation, "attr", "")
                    if name.startswith("vtkMRML"):
                        found[item.target.id] = name
    return found


@pytest.mark.parametrize("name", MODULES)
def test_node_selectors_list_the_type_connect_gui_sets(name):
    """Slicer's qMRMLNodeComboBox connector overwrites a selector's nodeTypes with the field's class:
    nodeTypes written in the .ui must be exactly that (subclasses such as label maps come with
    showChildNodeTypes), or the .ui shows something connectGui silently takes back."""
    module = existing_module(name)
    fields = _node_fields(module_ast(module))
    root = ui_tree(module)
    widgets = {w.get("name"): w for w in root.iter("widget")}
    for parameter, widget_name in ui_parameter_names(root).items():
        widget = widgets[widget_name]
        if parameter not in fields or widget.get("class") != "qMRMLNodeComboBox":
            continue
        types = [s.text for p in widget.findall("property") if p.get("name") == "nodeTypes" for s in p.iter("string")]
        assert types == [fields[parameter]], (f"{widget_name}: nodeTypes {types} in the .ui, but connectGui sets them to "
                                              f"[{fields[parameter]!r}] (the type of {parameter}); use showChildNodeTypes for subclasses")


# -- the shipped models are installed -----------------------------------------------------------------


def test_shipped_models_are_listed_for_install():
    """Slicer installs only what MODULE_PYTHON_RESOURCES names: every file the registry reads from
    ``Resources/Models`` beside ContrastAmplifierLib (Models.json, each listed bundle's manifest and weights)."""
    module = existing_module("ContrastAmplifier")
    models = module.folder / "Resources" / "Models"
    assert (models / "Models.json").is_file(), "the shipped models live in ContrastAmplifier/Resources/Models"
    assert not (REPO / "Resources" / "Models").exists(), "top-level Resources/ is not installed: keep models in the module"
    resources = set(cmake_lists(module).get("MODULE_PYTHON_RESOURCES", []))
    needed = {"Resources/Models/Models.json"}
    for item in json.loads((models / "Models.json").read_text(encoding="utf-8"))["models"]:
        manifest = json.loads((models / item["folder"] / "bundle.json").read_text(encoding="utf-8"))
        needed |= {f"Resources/Models/{item['folder']}/{f}" for f in ["bundle.json", *manifest["files"]]}
    missing = sorted(needed - resources)
    assert not missing, f"not installed (run Testing/SlicerModules/update_cmakelists.py): {missing}"


def _update_cmakelists():
    import importlib.util

    spec = importlib.util.spec_from_file_location("_update_cmakelists", Path(__file__).with_name("update_cmakelists.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


@pytest.mark.parametrize("name", MODULES)
def test_generated_cmakelists_are_current(name):
    """A CMakeLists.txt carrying the generator's marker is exactly what update_cmakelists.py writes."""
    tool = _update_cmakelists()
    path = REPO / name / "CMakeLists.txt"
    if tool.MARKER not in path.read_text(encoding="utf-8"):
        pytest.skip(f"{name}/CMakeLists.txt is hand-written")
    assert path.read_text(encoding="utf-8") == tool.render(name), f"run: python Testing/SlicerModules/update_cmakelists.py {name}"
