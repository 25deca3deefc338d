"""LesionReader.py <-> LesionReader.ui wiring, and the module's Logic run headless on a real scene."""

from __future__ import annotations

import ast
import importlib.util
import re
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


def test_ui_shows_the_papers_grade_scale_and_shortcuts():
    widgets = ui_widgets()
    texts = {name: (w.find("property[@name='text']/string").text if w.find("property[@name='text']/string") is not None else "") for name, w in widgets.items()}
    assert [texts[f"grade{g}Button"] for g in (1, 2, 3, 4)] == ["1 poor", "2 average", "3 good", "4 excellent"]
    assert widgets["studyPathLineEdit"].get("class") == "ctkPathLineEdit"
    assert widgets["lesionTable"].get("class") == "QTableWidget"
    columns = [c.find("property/string").text for c in widgets["lesionTable"].findall("column")]
    assert columns == ["Lesion", "Long axis (mm)", "Short axis (mm)"]
    source = MODULE.read_text(encoding="utf-8")
    for key in ('"1"', '"4"', '"N"', '"B"', '"L"', '"P"'):
        assert key in source  # SHORTCUTS table


@pytest.fixture
def module():
    pytest.importorskip("slicer")
    spec = importlib.util.spec_from_file_location("LesionReader_module_under_test", MODULE)
    mod = importlib.util.module_from_spec(spec)
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
