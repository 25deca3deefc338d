"""Every module's typed parameter node (Slicer 5.x ``parameterNodeWrapper``) against its .ui, checked
without Slicer, and its values round-tripped through a real MRML node (slicer-core).

Static part, for ContrastAmplifier, ContrastAmplifierTraining and LesionReader:

* the module file has one class decorated ``@parameterNodeWrapper`` (imported from
  ``ContrastAmplifierCommon.slicer_compat``), its Logic's ``getParameterNode`` returns it and its
  widget binds it with ``connectGui`` / ``disconnectGui`` (Slicer 5.8 scripted-module template,
  Utilities/Templates/Modules/Scripted/TemplateKey.py);
* every widget of the .ui with the dynamic property ``SlicerParameterName`` names a field of that
  class, and no two widgets name the same one;
* every field has a widget, except the ones in :data:`ALLOWED_WITHOUT_WIDGET` (with the reason);
* each widget's class is one Slicer's GUI connectors bind to the field's type (:data:`CONNECTORS`,
  from Slicer's Base/Python/slicer/parameterNodeWrapper/guiConnectors.py), in every Slicer the
  extension supports, with the annotations the connector demands (``Choice`` for a combo box over
  strings or numbers, a range for sliders);
* no module still uses the hand-written ``slicer.util.addParameterEditWidgetConnections`` /
  ``updateParameterEditWidgetsFromNode`` pair.

Round trip: each module's wrapper (the headless stand-in of slicer_compat, storing values the way
Slicer's serializers do) on a fresh vtkMRMLScriptedModuleNode of a real scene; every field is set to
a valid value other than its default and read back through a second wrapper on the same node.
"""

from __future__ import annotations

import ast
import importlib.util
import pathlib
import sys
import typing
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULES = ("ContrastAmplifier", "ContrastAmplifierTraining", "LesionReader")
COMPAT = "ContrastAmplifierCommon.slicer_compat"
PARAMETER_NAME_PROPERTY = "SlicerParameterName"
#: The oldest Slicer the extension supports (its Python, 3.9.10, is also Slicer 5.8's).
OLDEST_SLICER = "5.6.2"

#: Fields that deliberately have no widget: (module, field) -> why. A field not listed here and
#: bound by no widget is a GUI setting someone forgot to put in the .ui.
ALLOWED_WITHOUT_WIDGET: Dict[Tuple[str, str], str] = {
    ("ContrastAmplifier", "Model"): "the model selector is filled from the model registry at run time (user bundles "
                                    "come and go), while Slicer's QComboBox connector needs a fixed Choice: the widget "
                                    "syncs it (ContrastAmplifierWidget.refreshModels / onModelSelected)",
}

#: Value kinds a field's annotation can have (see :func:`field_kind`).
BOOL, INT, FLOAT, STR, PATH, NODE, ENUM, FLOAT_RANGE = "bool", "int", "float", "str", "path", "node", "enum", "FloatRange"


@dataclass(frozen=True)
class Connector:
    """One widget class a Slicer GUI connector binds (``type(widget) == ...``: exact class, no subclass)."""

    name: str  #: the GuiConnector class in guiConnectors.py
    widget: str  #: the widget class as the .ui names it
    kinds: frozenset
    since: str = OLDEST_SLICER  #: first Slicer (of 5.6.2 / 5.8.1) whose connector accepts this widget class
    needs: str = ""  #: "choice", "bounded", "range-bounds" (an annotation), "checkable" (a .ui property)


def _rows(name: str, widgets: Dict[str, str], kinds: Set[str], needs: str = "") -> List[Connector]:
    return [Connector(name, widget, frozenset(kinds), since, needs) for widget, since in widgets.items()]


#: Slicer's GUI connectors, read in Base/Python/slicer/parameterNodeWrapper/guiConnectors.py at tag
#: v5.8.1 (each ``canRepresent``; ``create``/``__init__`` for what they demand) and diffed against
#: v5.6.2: ctkCheckBox, ctkDoubleSlider, ctkDoubleSpinBox, qMRMLSpinBox, ctkComboBox, QLabel,
#: ctkDoubleRangeSlider and qMRMLRangeWidget are bound only from 5.8. Not bindable in either:
#: QPlainTextEdit, QRadioButton, QToolButton, ctkCollapsibleButton, subclasses of these classes.
CONNECTORS: List[Connector] = [
    *_rows("QCheckBoxToBoolConnector", {"QCheckBox": OLDEST_SLICER, "ctkCheckBox": "5.8.1"}, {BOOL}),
    # makes the button checkable (with a warning in the log) when the .ui did not
    *_rows("QCheckablePushButtonToBoolConnector", {"QPushButton": OLDEST_SLICER}, {BOOL}, "checkable"),
    # QSlider: "Cannot have a connection to QSlider where the int type is unbounded."
    *_rows("QSliderOrSpinBoxToIntConnector", {"QSpinBox": OLDEST_SLICER}, {INT}),
    *_rows("QSliderOrSpinBoxToIntConnector", {"QSlider": OLDEST_SLICER}, {INT}, "bounded"),
    *_rows("QDoubleSpinBoxCtkSliderWidgetToFloatConnector",
           {"QDoubleSpinBox": OLDEST_SLICER, "ctkDoubleSlider": "5.8.1", "ctkDoubleSpinBox": "5.8.1", "qMRMLSpinBox": "5.8.1"}, {FLOAT}),
    # "Cannot have a connection to ctkSliderWidget where the float types is unbounded."
    *_rows("QDoubleSpinBoxCtkSliderWidgetToFloatConnector", {"ctkSliderWidget": OLDEST_SLICER, "qMRMLSliderWidget": OLDEST_SLICER},
           {FLOAT}, "bounded"),
    # "ComboBoxToStringableConnector requires the Choice annotation to be used."
    *_rows("QComboBoxToStringableConnector", {"QComboBox": OLDEST_SLICER, "ctkComboBox": "5.8.1"}, {INT, FLOAT, STR, BOOL}, "choice"),
    *_rows("QComboBoxToEnumConnector", {"QComboBox": OLDEST_SLICER, "ctkComboBox": "5.8.1"}, {ENUM}),
    *_rows("QLineEditToStrConnector", {"QLineEdit": OLDEST_SLICER}, {STR}),
    *_rows("QLabelToStrConnector", {"QLabel": "5.8.1"}, {STR}),
    *_rows("QTextEditPlainTextToStrConnector", {"QTextEdit": OLDEST_SLICER}, {STR}),
    *_rows("ctkRangeWidgetToRangeConnector",
           {"ctkRangeWidget": OLDEST_SLICER, "ctkDoubleRangeSlider": "5.8.1", "qMRMLRangeWidget": "5.8.1"}, {FLOAT_RANGE}, "range-bounds"),
    *_rows("ctkPathLineEditToPathConnector", {"ctkPathLineEdit": OLDEST_SLICER}, {PATH}),
    *_rows("ctkDirectoryButtonToPathConnector", {"ctkDirectoryButton": OLDEST_SLICER}, {PATH}),
    *_rows("qMRMLNodeComboBoxToNodeConnector", {"qMRMLNodeComboBox": OLDEST_SLICER}, {NODE}),
]

#: Names parameterNodeWrapper itself puts on the class or instance (wrapper.py, _processClass and
#: _initMethod, v5.8.1): a field with one of these names breaks the wrapper.
RESERVED_NAMES = {
    "allParameters", "default", "isCached", "dataType", "getValue", "setValue", "connectGui", "connectParametersToGui",
    "disconnectGui", "StartModify", "EndModify", "AddObserver", "RemoveObserver", "Modified", "parameterNode",
}
#: The scripted-module helpers of the hand-written binding that parameterNodeWrapper replaces.
OLD_HELPERS = {"addParameterEditWidgetConnections", "updateParameterEditWidgetsFromNode"}
PATH_TYPES = {"Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"}


# -- static reading of the module file and its .ui ----------------------------------------------


@dataclass
class Field:
    name: str
    kind: str
    type_text: str
    extras: List[str] = field(default_factory=list)  #: names of the Annotated extras (WithinRange, Choice, ...)


@dataclass
class UiParameter:
    parameter: str
    widget: str  #: the widget's objectName
    widget_class: str
    dynamic: bool  #: written as a dynamic property (stdset="0"), as Qt Designer writes them
    properties: Dict[str, str]


def script(name: str) -> Path:
    return REPO / name / f"{name}.py"


def ui_file(name: str) -> Path:
    return REPO / name / "Resources" / "UI" / f"{name}.ui"


def module_tree(name: str) -> ast.Module:
    assert script(name).is_file(), f"{script(name)} is missing"
    return ast.parse(script(name).read_text(encoding="utf-8"), filename=str(script(name)))


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    if isinstance(node, ast.Call):
        return _dotted(node.func)
    return ""


def _last(node: ast.AST) -> str:
    return _dotted(node).rsplit(".", 1)[-1]


def wrapper_classes(tree: ast.Module) -> List[ast.ClassDef]:
    return [node for node in tree.body if isinstance(node, ast.ClassDef)
            and any(_last(d) == "parameterNodeWrapper" for d in node.decorator_list)]


def enum_classes(tree: ast.Module) -> Set[str]:
    return {node.name for node in tree.body if isinstance(node, ast.ClassDef)
            and any(_last(b) in ("Enum", "IntEnum", "StrEnum", "Flag", "IntFlag") for b in node.bases)}


def _split_annotated(node: ast.AST) -> Tuple[ast.AST, List[ast.AST]]:
    """``Annotated[T, a, b]`` (nested ones flatten, as in typing) -> (T, [a, b])."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):  # a quoted annotation
        node = ast.parse(node.value, mode="eval").body
    if isinstance(node, ast.Subscript) and _last(node.value) == "Annotated":
        elements = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        inner, extras = _split_annotated(elements[0])
        return inner, extras + list(elements[1:])
    return node, []


def field_kind(node: ast.AST, enums: Set[str]) -> str:
    name = _last(node)
    if name in (BOOL, INT, FLOAT, STR):
        return name
    if name in PATH_TYPES:
        return PATH
    if name.startswith("vtkMRML"):
        return NODE
    if name == FLOAT_RANGE:
        return FLOAT_RANGE
    if name in enums:
        return ENUM
    if isinstance(node, ast.Subscript) and _last(node.value) in ("Optional", "Union"):
        args = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        if all(_last(a).startswith("vtkMRML") or (isinstance(a, ast.Constant) and a.value is None) or _last(a) == "None" for a in args):
            return NODE  # Union[vtkMRMLA, vtkMRMLB, None]: isNodeOrUnionOfNodes
    return f"unsupported ({ast.unparse(node)})"


def wrapper_fields(tree: ast.Module) -> Dict[str, Field]:
    enums = enum_classes(tree)
    fields: Dict[str, Field] = {}
    for cls in wrapper_classes(tree):
        for item in cls.body:
            if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                inner, extras = _split_annotated(item.annotation)
                name = item.target.id
                assert name not in fields, f"field {name} is declared by two @parameterNodeWrapper classes"
                fields[name] = Field(name, field_kind(inner, enums), ast.unparse(item.annotation), [_last(e) or ast.unparse(e) for e in extras])
    return fields


def ui_parameters(name: str) -> List[UiParameter]:
    path = ui_file(name)
    assert path.is_file(), f"{path} is missing"
    found = []
    for widget in ET.parse(path).getroot().iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == PARAMETER_NAME_PROPERTY:
                properties = {p.get("name"): (p[0].text or "") if len(p) else "" for p in widget.findall("property")}
                found.append(UiParameter(prop.findtext("string") or "", widget.get("name"), widget.get("class"),
                                         prop.get("stdset") == "0", properties))
    return found


def class_methods(tree: ast.Module, class_name: str) -> Dict[str, ast.FunctionDef]:
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            return {f.name: f for f in node.body if isinstance(f, ast.FunctionDef)}
    return {}


def attribute_calls(tree: ast.AST) -> Set[str]:
    return {node.func.attr for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)}


def the_wrapper(name: str) -> ast.ClassDef:
    classes = wrapper_classes(module_tree(name))
    assert classes, (f"{name}.py has no @parameterNodeWrapper class: declare the parameters as a typed class "
                     f"(from {COMPAT} import parameterNodeWrapper), see Slicer's TemplateKey.py")
    assert len(classes) == 1, f"{name}.py has {len(classes)} @parameterNodeWrapper classes: {[c.name for c in classes]}"
    return classes[0]


# -- static checks ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODULES)
def test_module_declares_one_wrapper_and_uses_it_like_the_template(name):
    tree = module_tree(name)
    wrapper = the_wrapper(name)
    imports = {alias.name: node.module for node in tree.body if isinstance(node, ast.ImportFrom) for alias in node.names}
    assert imports.get("parameterNodeWrapper") == COMPAT, (
        f"{name}.py: import parameterNodeWrapper from {COMPAT} (Slicer's inside the application, a headless stand-in under slicer-core)")
    direct = sorted(m for m in imports.values() if m and m.startswith(("slicer.parameterNodeWrapper", "slicer.i18n")))
    assert not direct, f"{name}.py imports {direct} directly: the module would not load headless; use {COMPAT}"
    get = class_methods(tree, f"{name}Logic").get("getParameterNode")
    assert get is not None and any(isinstance(n, ast.Call) and _last(n.func) == wrapper.name for n in ast.walk(get)), (
        f"{name}Logic.getParameterNode must return {wrapper.name}(super().getParameterNode())")
    widget_calls = set().union(*(attribute_calls(f) for f in class_methods(tree, f"{name}Widget").values()))
    assert {"connectGui", "disconnectGui"} <= widget_calls, f"{name}Widget must bind the parameter node with connectGui / disconnectGui"


@pytest.mark.parametrize("name", MODULES)
def test_every_ui_parameter_names_a_field_once(name):
    fields = wrapper_fields(module_tree(name))
    params = ui_parameters(name)
    unknown = sorted(f"{p.widget} -> {p.parameter!r}" for p in params if p.parameter not in fields)
    assert not unknown, f"{ui_file(name).name}: {PARAMETER_NAME_PROPERTY} names no field of the {name} parameter class: {unknown}"
    names = [p.parameter for p in params]
    twice = sorted({n for n in names if names.count(n) > 1})
    assert not twice, f"{ui_file(name).name}: more than one widget binds {twice} (connectGui keeps only one)"
    static = sorted(p.widget for p in params if not p.dynamic)
    assert not static, f"{ui_file(name).name}: write {PARAMETER_NAME_PROPERTY} as a dynamic property (stdset=\"0\") on {static}"


@pytest.mark.parametrize("name", MODULES)
def test_every_gui_field_has_a_widget(name):
    fields = wrapper_fields(module_tree(name))
    assert fields, f"{name}.py: the parameter class has no annotated fields"
    bound = {p.parameter for p in ui_parameters(name)}
    allowed = {f for (module, f) in ALLOWED_WITHOUT_WIDGET if module == name}
    missing = sorted(set(fields) - bound - allowed)
    assert not missing, (f"fields {missing} of {name}.py have no widget in {ui_file(name).name} ({PARAMETER_NAME_PROPERTY}); "
                         "bind them, or list them in ALLOWED_WITHOUT_WIDGET with the reason")
    stale = sorted(f for f in allowed if f not in fields or f in bound)
    assert not stale, f"ALLOWED_WITHOUT_WIDGET lists {name} fields that are gone or now have a widget: {stale}"


def _meets(need: str, parameter: UiParameter, extras: List[str]) -> bool:
    if need == "choice":
        return "Choice" in extras
    if need == "bounded":
        return "WithinRange" in extras or {"Minimum", "Maximum"} <= set(extras)
    if need == "range-bounds":
        return "RangeBounds" in extras
    if need == "checkable":
        return parameter.properties.get("checkable") == "true"
    return True


@pytest.mark.parametrize("name", MODULES)
def test_widget_classes_bind_the_field_types(name):
    fields = wrapper_fields(module_tree(name))
    problems = []
    for parameter in ui_parameters(name):
        f = fields.get(parameter.parameter)
        if f is None:
            continue  # reported by test_every_ui_parameter_names_a_field_once
        rows = [c for c in CONNECTORS if c.widget == parameter.widget_class and f.kind in c.kinds]
        where = f"{parameter.widget} ({parameter.widget_class}) -> {f.name}: {f.type_text}"
        if not rows:
            binds = sorted({c.widget for c in CONNECTORS if f.kind in c.kinds and c.since == OLDEST_SLICER})
            problems.append(f"{where}: no Slicer GUI connector binds this widget class to {f.kind}; use one of {binds}")
        elif all(c.since != OLDEST_SLICER for c in rows):
            problems.append(f"{where}: Slicer binds {parameter.widget_class} only from {rows[0].since}; the extension supports {OLDEST_SLICER}")
        elif not any(_meets(c.needs, parameter, f.extras) for c in rows if c.since == OLDEST_SLICER):
            need = next(c.needs for c in rows if c.since == OLDEST_SLICER)
            problems.append(f"{where}: {rows[0].name} needs {need}"
                            + (" (checkable: true in the .ui)" if need == "checkable" else " (an Annotated extra)"))
    for f in fields.values():
        if f.kind.startswith("unsupported"):
            problems.append(f"{f.name}: {f.type_text} is a type this test does not know Slicer's connectors for: {f.kind}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", MODULES)
def test_field_names_are_not_reserved_by_the_wrapper(name):
    clash = sorted(set(wrapper_fields(module_tree(name))) & RESERVED_NAMES)
    assert not clash, f"{name}.py: parameterNodeWrapper reserves {clash}; rename those fields"


@pytest.mark.parametrize("name", MODULES)
def test_no_module_keeps_the_hand_written_parameter_binding(name):
    tree = module_tree(name)
    used = sorted({_last(node) for node in ast.walk(tree) if isinstance(node, (ast.Attribute, ast.Name)) and _last(node) in OLD_HELPERS})
    assert not used, f"{name}.py still uses slicer.util.{used}: connectGui on the parameter node replaces them"


# -- round trip through a real MRML node ------------------------------------------------------------

_loaded: Dict[str, object] = {}


def load_module(name: str):
    """The module file imported headless, registered in sys.modules as a normal import would be
    (the wrapper resolves its annotations in the module's namespace)."""
    if name not in _loaded:
        spec = importlib.util.spec_from_file_location(f"_parameter_binding_{name}", script(name))
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        _loaded[name] = module
    return _loaded[name]


def _validators(extras) -> list:
    return [e for e in extras if hasattr(e, "validate")]


def _first_valid(candidates, default, validators):
    for value in candidates:
        if value == default:
            continue
        try:
            for validator in validators:
                validator.validate(value)
        except ValueError:
            continue
        return value
    return None


def other_value(kind, extras, default, scene, tmp_path: Path, name: str):
    """A valid value of ``kind`` other than ``default`` (None when the test knows no such value)."""
    import slicer

    validators = _validators(extras)
    choices = [c for e in extras if hasattr(e, "choices") for c in e.choices]
    if choices:
        return _first_valid(choices, default, validators)
    if kind is bool:
        return not default
    if kind in (int, float):
        bounds = [(e.minimum, e.maximum) for e in extras if hasattr(e, "minimum") and hasattr(e, "maximum")]
        if bounds:
            low, high = bounds[0]
            middle = (low + high) // 2 if kind is int else (low + high) / 2
            candidates = [middle, high, low, low + 1 if kind is int else low + (high - low) / 4]
        else:
            candidates = [default + 7, default - 7] if kind is int else [default + 0.25, default - 0.25]
        return _first_valid([kind(c) for c in candidates], default, validators)
    if kind is str:
        return _first_valid(["round-trip value", "another value"], default, validators)
    if isinstance(kind, type) and issubclass(kind, pathlib.PurePath):
        return _first_valid([kind(tmp_path / f"{name}-round-trip")], default, validators)
    if isinstance(kind, type) and issubclass(kind, slicer.vtkMRMLNode):
        return scene.AddNewNodeByClass(kind().GetClassName())
    return None


@pytest.mark.parametrize("name", MODULES)
def test_fields_round_trip_through_a_fresh_wrapper(name, tmp_path, monkeypatch):
    slicer = pytest.importorskip("slicer", reason="slicer-core wheel (test extra) is required")
    wrapper_name = the_wrapper(name).name
    module = load_module(name)
    wrapper_class = getattr(module, wrapper_name)
    scene = slicer.vtkMRMLScene()
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    node = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode")
    first = wrapper_class(node)
    hints = typing.get_type_hints(wrapper_class, include_extras=True)
    assert hints, f"{wrapper_name} has no fields"
    written: Dict[str, object] = {}
    for field_name, hint in hints.items():
        kind, extras = hint, ()
        if typing.get_origin(hint) is typing.Annotated:
            kind, *extras = typing.get_args(hint)
        default = getattr(first, field_name)
        value = other_value(kind, extras, default, scene, tmp_path, field_name)
        assert value is not None, f"{wrapper_name}.{field_name}: {hint} has no valid value other than its default {default!r} (or none this test knows)"
        setattr(first, field_name, value)
        written[field_name] = value
    again = wrapper_class(node)  # reads what the first one stored; no default overwrites it
    for field_name, value in written.items():
        got = getattr(again, field_name)
        if isinstance(value, slicer.vtkMRMLNode):
            assert got is not None and got.GetID() == value.GetID(), f"{wrapper_name}.{field_name}: wrote node {value.GetID()}, read {got}"
        else:
            assert got == value and type(got) is type(value), f"{wrapper_name}.{field_name}: wrote {value!r}, read {got!r}"


def test_connector_table_is_consistent():
    """Each (widget class, kind) pair has one connector row; every row names a class of guiConnectors.py."""
    seen: Dict[Tuple[str, str], Optional[str]] = {}
    for row in CONNECTORS:
        assert row.name.endswith("Connector") and row.since in (OLDEST_SLICER, "5.8.1")
        for kind in row.kinds:
            assert (row.widget, kind) not in seen, f"{row.widget}/{kind} listed twice"
            seen[(row.widget, kind)] = row.needs
    assert seen[("QComboBox", STR)] == "choice" and seen[("QSlider", INT)] == "bounded" and ("QPlainTextEdit", STR) not in seen
