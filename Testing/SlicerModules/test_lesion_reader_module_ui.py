"""LesionReader.py <-> LesionReader.ui wiring, and the module's Logic run headless on a real scene."""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULE = REPO / "LesionReader" / "LesionReader.py"
UI = REPO / "LesionReader" / "Resources" / "UI" / "LesionReader.ui"


def ui_widgets() -> dict:
    return {w.get("name"): w for w in ET.parse(UI).getroot().iter("widget")}


def used_ui_names() -> set:
    """``self.ui.X`` plus names built as ``getattr(self.ui, f"grade{grade}Button")`` or from string tuples."""
    tree = ast.parse(MODULE.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "ui":
            names.add(node.attr)
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "getattr" and len(node.args) >= 2:
            target = node.args[0]
            if isinstance(target, ast.Attribute) and target.attr == "ui":
                arg = node.args[1]
                if isinstance(arg, ast.JoinedStr):
                    pattern = "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in arg.values)
                    names |= {pattern.format(g) for g in (1, 2, 3, 4)}
    # Names iterated in `for name in ("studyPathLineEdit", ...)` loops and then getattr'ed.
    for node in ast.walk(tree):
        if isinstance(node, ast.For) and isinstance(node.iter, ast.Tuple):
            for elt in node.iter.elts:
                if isinstance(elt, ast.Constant) and isinstance(elt.value, str) and re.match(r"^[a-z]\w+(Button|Edit|Box)$", elt.value):
                    names.add(elt.value)
    return names


def test_every_widget_the_module_uses_exists_in_the_ui():
    widgets = ui_widgets()
    used = used_ui_names()
    assert {"grade1Button", "grade4Button", "studyPathLineEdit", "lesionTable", "pauseButton"} <= used
    missing = sorted(used - set(widgets))
    assert not missing, f"LesionReader.py uses self.ui.{missing}; add them to {UI.name}"


def ui_texts() -> list:
    """Every string shown by the .ui (texts, titles, tooltips)."""
    return [node.text for node in ET.parse(UI).getroot().iter("string") if node.text]


def test_ui_shows_the_papers_grade_scale():
    from LesionReaderLib import GRADE_LABELS

    widgets = ui_widgets()
    texts = {name: (w.find("property[@name='text']/string").text if w.find("property[@name='text']/string") is not None else "") for name, w in widgets.items()}
    assert [texts[f"grade{g}Button"] for g in (1, 2, 3, 4)] == ["1 poor", "2 average", "3 good", "4 excellent"]
    assert [texts[f"grade{g}Button"] for g in (1, 2, 3, 4)] == [f"{g} {GRADE_LABELS[g]}" for g in (1, 2, 3, 4)]
    assert widgets["studyPathLineEdit"].get("class") == "ctkPathLineEdit"
    assert widgets["lesionTable"].get("class") == "QTableWidget"
    columns = [c.find("property/string").text for c in widgets["lesionTable"].findall("column")]
    assert columns == ["Lesion", "Long axis (mm)", "Short axis (mm)"]


# -- keyboard shortcuts: none may take a key Slicer itself binds -----------------------------------

MODIFIERS = {"Ctrl", "Shift", "Alt", "Meta", "Num", "Any"}


def module_constants() -> dict:
    """SLICER_KEY_BINDINGS (module level) and LesionReaderWidget.SHORTCUTS, read statically."""
    tree = ast.parse(MODULE.read_text(encoding="utf-8"))
    found = {}
    for node in tree.body:
        bodies = [node] if isinstance(node, ast.Assign) else (node.body if isinstance(node, ast.ClassDef) else [])
        for item in bodies:
            if isinstance(item, ast.Assign) and len(item.targets) == 1 and isinstance(item.targets[0], ast.Name):
                if item.targets[0].id in ("SLICER_KEY_BINDINGS", "SHORTCUTS"):
                    found[item.targets[0].id] = ast.literal_eval(item.value)
    assert set(found) == {"SLICER_KEY_BINDINGS", "SHORTCUTS"}, f"LesionReader.py must define both tables, found {sorted(found)}"
    return found


def parse_keys(sequence: str) -> tuple:
    """QKeySequence portable text -> (modifiers, key); "Num+" keypad, "Any+" any modifiers; "+" is the plus key."""
    if sequence == "+":
        mods, key = [], "+"
    elif sequence.endswith("++"):
        mods, key = sequence[:-2].split("+"), "+"
    else:
        *mods, key = sequence.split("+")
    assert key and set(mods) <= MODIFIERS and len(set(mods)) == len(mods), f"not a key sequence: {sequence!r}"
    return frozenset(mods), key.upper() if len(key) == 1 else key


def collides(shortcut: str, binding: str) -> bool:
    """Would a main-window QShortcut on ``shortcut`` take ``binding``'s key from Slicer?

    Same key and the same modifiers, with "Num" (keypad) ignored on both sides: Qt's QShortcutMap
    retries a keypad key without Qt::KeypadModifier, so "1" also fires on keypad 1. An "Any+"
    binding (vtkEvent::AnyModifier) takes its key with every modifier combination.
    """
    (s_mods, s_key), (b_mods, b_key) = parse_keys(shortcut), parse_keys(binding)
    if s_key != b_key:
        return False
    return "Any" in b_mods or s_mods - {"Num"} == b_mods - {"Num"}


def test_key_sequence_model():
    assert collides("B", "B") and collides("b", "B") and not collides("Alt+B", "B")
    assert collides("1", "Num+1") and collides("Shift+1", "Shift+Num+1") and not collides("Alt+1", "Num+1")
    assert collides("Alt+Shift+V", "Any+V") and collides("Ctrl++", "Ctrl++") and parse_keys("+") == (frozenset(), "+")
    assert not collides("Ctrl+Shift+Left", "Ctrl+Left")


def test_slicer_key_list_holds_the_documented_slice_view_keys():
    bindings = module_constants()["SLICER_KEY_BINDINGS"]
    for source, entries in bindings.items():
        assert source.endswith((".cxx", ".ui")) and source.split("/")[0] in ("Libs", "Base", "Modules", "Applications"), source
        for sequence, what in entries:
            parse_keys(sequence)
            assert what, f"{source}: {sequence} has no description"
    slice_view = {seq for seq, _ in bindings["Libs/MRML/DisplayableManager/vtkMRMLSliceIntersectionWidget.cxx"]}
    # Slicer's user guide, "Slice views": b/f and the arrows browse slices, g t v r, [ ] { }
    assert {"B", "F", "Left", "Right", "Up", "Down", "G", "T", "V", "R", "Any+[", "Any+]", "Any+{", "Any+}"} <= slice_view


def test_no_shortcut_takes_a_key_slicer_binds():
    tables = module_constants()
    shortcuts, bindings = tables["SHORTCUTS"], tables["SLICER_KEY_BINDINGS"]
    assert set(shortcuts.values()) == {"grade1", "grade2", "grade3", "grade4", "next", "previous", "lesion", "pause"}
    parsed = [parse_keys(k) for k in shortcuts]
    assert len(set(parsed)) == len(parsed), "two shortcuts share one key"
    assert not any({"Any", "Num"} & mods for mods, _ in parsed), "shortcuts are plain key sequences"
    clashes = [f"{key} ({action}) takes {sequence} from {source} ({what})"
               for key, action in shortcuts.items()
               for source, entries in bindings.items() for sequence, what in entries if collides(key, sequence)]
    assert not clashes, "\n".join(clashes)


def test_shortcuts_are_installed_only_from_the_table_and_named_in_the_ui():
    tree = ast.parse(MODULE.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("QKeySequence", "QShortcut"):
            assert not any(isinstance(a, ast.Constant) for a in node.args), f"line {node.lineno}: a key outside SHORTCUTS"
    shown = " ".join(ui_texts())
    help_text = MODULE.read_text(encoding="utf-8")
    for key in module_constants()["SHORTCUTS"]:
        assert key in shown, f"{UI.name} does not tell the reader about {key}"
        assert key in help_text or key in ("Alt+2", "Alt+3"), f"helpText does not list {key}"


@pytest.fixture
def module():
    pytest.importorskip("slicer")
    spec = importlib.util.spec_from_file_location("LesionReader_module_under_test", MODULE)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # as a normal import would: the parameter class's annotations are resolved there
    spec.loader.exec_module(mod)
    return mod


def test_logic_imports_headless_and_shows_a_blinded_case(module, make_study, clock):
    import slicer

    assert module.HAVE_GUI is False  # slicer-core: no Qt, yet the Logic loads
    scene = slicer.vtkMRMLScene()
    logic = module.LesionReaderLogic(scene)
    study_dir = make_study(n_cases=2)
    choices = logic.phase_choices(str(study_dir), "R1")
    assert [c["phase"] for c in choices] == ["T1c", "T1c-pro", "T1c-vfa"] and choices[0]["state"] == "not opened"
    session = module.ReaderSession.open(study_dir, "R1", "T1c", clock=clock)
    ids = logic.show_case(session)
    names = [scene.GetNodeByID(i).GetName() for i in ids]
    assert names == ["Case 01 T1c", "Case 01 T2-FLAIR"]
    from LesionReaderLib import mrml_bridge as bridge

    long_node = bridge.new_axis_node(scene, bridge.LONG, "drawing", ((0, 0, 0), (10, 0, 0)))
    short_node = bridge.new_axis_node(scene, bridge.SHORT, "drawing", ((5, -3, 0), (5, 3, 0)))
    lesion_id = logic.commit_lesion(session, long_node, short_node)
    assert long_node.GetName() == "L1 long" and session.lesions()[0].id == lesion_id
    bad_long = bridge.new_axis_node(scene, bridge.LONG, "drawing", ((0, 0, 0), (10, 0, 0)))
    bad_short = bridge.new_axis_node(scene, bridge.SHORT, "drawing", ((0, 1, 0), (10, 1, 0)))
    with pytest.raises(module.LesionAxisError, match="perpendicular"):
        logic.commit_lesion(session, bad_long, bad_short)
    session.grade(2)
    session.next_case()
    ids = logic.show_case(session)  # the previous case's nodes are gone
    assert [scene.GetNodeByID(i).GetName() for i in ids] == ["Case 02 T1c", "Case 02 T2-FLAIR"]
    assert bridge.lesion_nodes(scene) == []
    logic.clear()
    assert bridge.reading_volume_nodes(scene) == []
    session.close()


def test_logic_parameter_node_follows_the_template(module, monkeypatch):
    import pathlib

    import slicer

    monkeypatch.setattr(slicer, "mrmlScene", slicer.vtkMRMLScene(), raising=False)
    logic = module.LesionReaderLogic()
    parameters = logic.getParameterNode()
    assert isinstance(parameters, module.LesionReaderParameterNode)
    assert (parameters.studyFolder, parameters.reader) == (pathlib.Path("."), "")
    assert logic.chosen_study_dir(parameters.studyFolder) == ""  # Slicer's path default: nothing chosen
    parameters.studyFolder, parameters.reader = pathlib.Path("/data/study"), "R2"
    again = logic.getParameterNode()  # the same singleton node, a new wrapper
    assert (again.studyFolder, again.reader) == (pathlib.Path("/data/study"), "R2")
    assert logic.chosen_study_dir(again.studyFolder) == str(pathlib.Path("/data/study"))
    assert parameters.parameterNode.GetParameter("reader") == "R2"  # nothing of the cases: just the panel's choices
