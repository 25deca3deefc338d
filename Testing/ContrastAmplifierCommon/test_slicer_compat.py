"""The headless stand-ins of slicer_compat against real MRML nodes (slicer-core)."""

from __future__ import annotations

import pathlib
from typing import Annotated

import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core wheel (test extra) is required")

from ContrastAmplifierCommon import slicer_compat  # noqa: E402
from ContrastAmplifierCommon.slicer_compat import (  # noqa: E402
    Choice,
    Default,
    ScriptedLoadableModuleLogic,
    WithinRange,
    parameterNodeWrapper,
    tr,
)


@parameterNodeWrapper
class Parameters:
    t1c: slicer.vtkMRMLScalarVolumeNode
    upper: Annotated[float, WithinRange(90, 100)] = 99.5
    epochs: int = 300
    qc: bool = True
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    model: Annotated[str, Default("phantom-demo")]
    out: pathlib.Path


@pytest.fixture
def node(monkeypatch):
    monkeypatch.setattr(slicer, "mrmlScene", slicer.vtkMRMLScene(), raising=False)
    return ScriptedLoadableModuleLogic().getParameterNode()


def test_defaults_are_written_in_slicers_storage_format(node):
    assert not slicer_compat.IN_SLICER_APP and not slicer_compat.HAS_PARAMETER_NODE_WRAPPER
    p = Parameters(node)
    assert (p.upper, p.epochs, p.qc, p.device, p.model, p.out, p.t1c) == (99.5, 300, True, "auto", "phantom-demo", pathlib.Path(), None)
    # Slicer's serializers: str(value) for numbers/strings/paths, "True"/"False" for bools
    assert [node.GetParameter(n) for n in ("upper", "epochs", "qc", "device", "out")] == ["99.5", "300", "True", "auto", "."]


def test_values_round_trip_through_the_node(node):
    p = Parameters(node)
    volume = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    p.upper, p.epochs, p.qc, p.device, p.out, p.t1c = 99.9, 12, False, "cuda", pathlib.Path("/tmp/x"), volume
    again = Parameters(node)  # a new wrapper reads what the first one stored; no default overwrites it
    assert (again.upper, again.epochs, again.qc, again.device, again.out) == (99.9, 12, False, "cuda", pathlib.Path("/tmp/x"))
    assert again.t1c is volume and node.GetNodeReferenceID("t1c") == volume.GetID()
    again.t1c = None
    assert Parameters(node).t1c is None


def test_validators_refuse_out_of_range_and_unknown_choices(node):
    p = Parameters(node)
    with pytest.raises(ValueError, match=r"range \[90, 100\]"):
        p.upper = 50.0
    with pytest.raises(ValueError, match="one of the following"):
        p.device = "tpu"
    assert (p.upper, p.device) == (99.5, "auto")  # refused values are not stored


def test_connect_gui_needs_the_application_and_tr_is_identity(node):
    with pytest.raises(RuntimeError, match="Slicer application"):
        Parameters(node).connectGui(object())
    assert tr("Apply") == "Apply"


def test_module_self_tests_run_headless(caplog):
    """A module's ``<Module>Test`` calls Slicer's ``delayDisplay``; headless it logs the message
    (LesionReaderTest uses it: without it the self-test failed outside the application)."""
    import logging

    class ModuleTest(slicer_compat.ScriptedLoadableModuleTest):
        def runTest(self):
            self.delayDisplay("Creating a two-case study", msec=0)
            self.takeScreenshot("name", "description")

    test = ModuleTest()
    test.messageDelay = 0  # as ScriptedLoadableModule.runTest sets it
    with caplog.at_level(logging.INFO):
        test.runTest()
    assert "Creating a two-case study" in caplog.text
