"""ContrastAmplifier: amplify gadolinium contrast on brain MRI (T1c -> T1c-pro), after Bone, Ammari et al. 2022.

Thin Slicer module: the widget reads the parameter node and starts the Lib's own command line
(``python -m ContrastAmplifierLib.cli ...``) in a child process, so the GUI never freezes; the
Logic exports the selected volumes, runs the child (in the background, or synchronously in
batch mode) and loads the results back. All real work lives in ContrastAmplifierLib.

The Logic imports no Qt: it also runs without the Slicer application (``slicer-core`` wheel).
"""

from __future__ import annotations

import logging
import os
import unittest
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import slicer
import vtk  # noqa: F401  (Slicer modules conventionally expose vtk)

from slicer.util import VTKObservationMixin

try:  # inside the Slicer application
    from slicer.ScriptedLoadableModule import (
        ScriptedLoadableModule,
        ScriptedLoadableModuleLogic,
        ScriptedLoadableModuleTest,
        ScriptedLoadableModuleWidget,
    )

    HAS_SLICER_APP = True
except ImportError:  # headless (slicer-core wheel, pytest): the Logic works, the GUI classes are inert
    from ContrastAmplifierLib.mrml_bridge import HeadlessScriptedModuleLogic as ScriptedLoadableModuleLogic

    class ScriptedLoadableModule:  # noqa: D101 - stand-in, never shown
        def __init__(self, parent) -> None:
            self.parent = parent

    class ScriptedLoadableModuleWidget:  # noqa: D101 - stand-in, never shown
        def __init__(self, parent=None) -> None:
            self.parent = parent

    ScriptedLoadableModuleTest = unittest.TestCase
    HAS_SLICER_APP = False

from ContrastAmplifierLib import mrml_bridge, process
from ContrastAmplifierLib.dependencies import ensure_dependencies

PAPER = (
    "Bone A, Ammari S, Menu Y, Balleyguier C, Moulton E, Chouzenoux E, Volk A, Garcia GCTE, Nicolas F, Robert P, "
    "Rohe MM, Lassau N. From Dose Reduction to Contrast Maximization: Can Deep Learning Amplify the Impact of "
    "Contrast Media on Brain Magnetic Resonance Image Quality? A Reader Study. Invest Radiol. 2022;57(8):527-535. "
    "doi:10.1097/RLI.0000000000000867"
)


#
# ContrastAmplifier
#


class ContrastAmplifier(ScriptedLoadableModule):
    """Module description shown in Slicer's module panel."""

    def __init__(self, parent) -> None:
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Contrast Amplifier"
        self.parent.categories = ["Contrast Amplifier"]
        self.parent.dependencies = []
        self.parent.contributors = ["SlicerContrastAmplifier developers"]
        self.parent.helpText = """
Amplifies the effect of gadolinium on brain MRI: from T1, T2-FLAIR, ADC and a routine post-contrast
T1 (T1c), a 3D residual UNet ensemble predicts "T1c-pro", an image with the look of a higher contrast dose.
<b>Research use only: not for clinical use.</b> The bundled demo model is trained on synthetic phantoms.
<br>Preprocess (QC) runs the paper's preprocessing (skull stripping, registration to the ICBM 2009a atlas,
crop, normalisation) in a background process and loads the preprocessed volumes and a QC picture.
See the <a href="https://github.com/SlicerContrastAmplifier/SlicerContrastAmplifier">extension documentation</a>.
"""
        self.parent.acknowledgementText = f"""
This module reproduces the method of: {PAPER}
The synthetic phantom uses the ICBM 2009a nonlinear symmetric template (McConnell Brain Imaging Centre);
skull stripping uses HD-BET (Isensee et al., Hum Brain Mapp 2019).
"""


#
# ContrastAmplifierLogic
#


@dataclass
class BackgroundJob:
    """A running Lib command and the files it exchanges with Slicer.

    Attributes:
        process: the child process (poll it from a timer, or wait for it).
        workDir: exchange folder holding the exported inputs and the outputs.
        outDir: where the command writes its results.
        referenceName: name of the T1c node, used to name the loaded results.
        results: nodes loaded by :meth:`ContrastAmplifierLogic.loadPreprocessResults`.
    """

    process: process.BackgroundProcess
    workDir: Path
    outDir: Path
    referenceName: str
    results: Dict[str, object] = field(default_factory=dict)


class ContrastAmplifierLogic(ScriptedLoadableModuleLogic):
    """Everything the module does, usable from the Python console and batch mode (no widget needed).

    Example (``Slicer --no-main-window --python-script``)::

        logic = ContrastAmplifierLogic()
        nodes = logic.preprocess(t1, flair, adc, t1c, device="cpu", qualityControl=True)
    """

    #: Parameter-node values and their defaults (every key the module uses is declared here).
    PARAMETERS: Dict[str, str] = {
        "Device": "cpu",
        "SkullStripMode": "fast",
        "QualityControl": "true",
    }
    #: Parameter-node node references (volume selectors).
    NODE_REFERENCES = ("InputT1", "InputFLAIR", "InputADC", "InputT1c", "OutputVolume")
    #: File stem the Lib expects -> (node reference, name shown to the user).
    INPUTS = {
        "t1": ("InputT1", "T1"),
        "flair": ("InputFLAIR", "T2-FLAIR"),
        "adc": ("InputADC", "ADC"),
        "t1c": ("InputT1c", "T1c"),
    }
    #: Preprocessing outputs loaded back: file stem -> (label in node names, label map?).
    PREPROCESS_OUTPUTS = {
        "t1": ("T1", False),
        "flair": ("T2-FLAIR", False),
        "adc": ("ADC", False),
        "t1c": ("T1c", False),
        "brain_mask": ("brain mask", True),
    }
    CLI_MODULE = "ContrastAmplifierLib.cli"
    DEVICES = ("cpu", "cuda")
    SKULL_STRIP_MODES = ("fast", "accurate")

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        #: Asks the user before installing packages; the widget sets a dialog, batch mode logs and installs.
        self.confirmInstall: Optional[Callable[[str], bool]] = None

    # -- parameters --------------------------------------------------------------------------

    def setDefaultParameters(self, parameterNode) -> None:
        """Fill unset parameters with :data:`PARAMETERS` defaults."""
        for key, value in self.PARAMETERS.items():
            if not parameterNode.GetParameter(key):
                parameterNode.SetParameter(key, value)

    def inputNodes(self, parameterNode) -> Dict[str, object]:
        """The four selected input volumes (``None`` where not selected), keyed by file stem."""
        return {stem: parameterNode.GetNodeReference(ref) for stem, (ref, _) in self.INPUTS.items()}

    def validateInputs(self, nodes: Dict[str, object]) -> None:
        """Check that all four inputs are selected, distinct and hold voxels.

        Raises:
            ValueError: names the input and what to do.
        """
        for stem, (_, label) in self.INPUTS.items():
            node = nodes.get(stem)
            if node is None:
                raise ValueError(f"No {label} volume selected: choose it in Inputs > {label}.")
            if node.GetImageData() is None:
                raise ValueError(f"{label} volume '{node.GetName()}' has no voxel data; load the image again.")
        seen: Dict[str, str] = {}
        for stem, (_, label) in self.INPUTS.items():
            node_id = nodes[stem].GetID()
            if node_id in seen:
                raise ValueError(
                    f"{seen[node_id]} and {label} are the same volume '{nodes[stem].GetName()}'; select a different volume for each input."
                )
            seen[node_id] = label

    def ensureDependencies(self) -> None:
        """Install missing Python packages on first use (asks through :attr:`confirmInstall`)."""
        ensure_dependencies(confirm=self.confirmInstall, module_title="Contrast Amplifier")

    # -- preprocessing -----------------------------------------------------------------------

    def preprocessCommand(self, caseDir: Path, outDir: Path, device: str = "cpu", skullStripMode: str = "fast",
                          qualityControl: bool = True, spacing: Optional[float] = None,
                          crop: Optional[Sequence[int]] = None) -> List[str]:
        """The ``contrast-amplifier preprocess`` command line run in the child process.

        ``spacing`` (mm) and ``crop`` (voxels, x y z) override the paper's 1 mm, 160 x 192 x 160
        geometry (a model bundle declares its own; coarse values make quick checks).
        """
        if device not in self.DEVICES:
            raise ValueError(f"Device must be one of {', '.join(self.DEVICES)} (got {device!r}).")
        if skullStripMode not in self.SKULL_STRIP_MODES:
            raise ValueError(f"Skull-strip mode must be one of {', '.join(self.SKULL_STRIP_MODES)} (got {skullStripMode!r}).")
        args: List[object] = ["preprocess", caseDir, outDir, "--device", device, "--skull-strip", skullStripMode,
                              "--progress", "json"]
        if qualityControl:
            args.append("--qc")
        if spacing is not None:
            args += ["--spacing", float(spacing)]
        if crop is not None:
            if len(crop) != 3:
                raise ValueError(f"Crop takes three sizes (x y z), got {list(crop)}.")
            for size in crop:
                args += ["--crop", int(size)]
        return process.python_module_command(self.CLI_MODULE, *args)

    def startPreprocess(self, t1, flair, adc, t1c, device: str = "cpu", skullStripMode: str = "fast",
                        qualityControl: bool = True, workDir: Optional[Path] = None,
                        installDependencies: bool = True, spacing: Optional[float] = None,
                        crop: Optional[Sequence[int]] = None) -> BackgroundJob:
        """Export the inputs and start preprocessing in a child process; returns at once.

        Poll ``job.process`` (``poll()``/``running``), then call :meth:`loadPreprocessResults`.
        """
        nodes = {"t1": t1, "flair": flair, "adc": adc, "t1c": t1c}
        self.validateInputs(nodes)
        if installDependencies:
            self.ensureDependencies()
        folder = Path(workDir) if workDir is not None else mrml_bridge.ExchangeFolder.create(parent=self._temporaryParent()).path
        mrml_bridge.export_volume_nodes(nodes, folder / "case", suffix=".nrrd")
        outDir = folder / "preprocessed"
        command = self.preprocessCommand(folder / "case", outDir, device, skullStripMode, qualityControl, spacing, crop)
        logging.info("Contrast Amplifier: running %s", " ".join(command))
        job = process.BackgroundProcess(command, env=process.child_environment(self._childEnv(device)))
        return BackgroundJob(process=job.start(), workDir=folder, outDir=outDir, referenceName=t1c.GetName())

    def loadPreprocessResults(self, job: BackgroundJob) -> Dict[str, object]:
        """Load the preprocessed volumes of a finished job as nodes named ``"<T1c> preprocessed <modality>"``.

        Raises:
            process.ProcessError: the child failed (its own error message) or was cancelled.
        """
        job.process.raise_for_state()
        for stem, (label, labelMap) in self.PREPROCESS_OUTPUTS.items():
            path = self._find(job.outDir, stem)
            if path is None:
                continue
            job.results[stem] = mrml_bridge.import_volume_file(
                path, f"{job.referenceName} preprocessed {label}", label_map=labelMap
            )
        if "t1c" not in job.results:
            raise FileNotFoundError(f"Preprocessing finished but wrote no T1c in {job.outDir}; see the log.")
        return job.results

    @staticmethod
    def discardJobFiles(job: Optional[BackgroundJob]) -> None:
        """Delete a finished job's exchange folder (exported inputs and outputs: patient data)."""
        if job is not None and not job.process.running:
            mrml_bridge.ExchangeFolder(job.workDir).cleanup()

    def qualityControlImage(self, job: BackgroundJob) -> Optional[Path]:
        """Path of the QC picture (``qc.png``) of a finished job, if it was written."""
        path = job.outDir / "qc.png"
        return path if path.is_file() else None

    def preprocess(self, t1, flair, adc, t1c, device: str = "cpu", skullStripMode: str = "fast",
                   qualityControl: bool = True, progressCallback: Optional[Callable[[process.ProgressEvent], None]] = None,
                   timeout: Optional[float] = None, spacing: Optional[float] = None,
                   crop: Optional[Sequence[int]] = None, keepFiles: bool = False) -> Dict[str, object]:
        """Synchronous preprocessing (batch mode): export, run, wait, load; returns the new nodes.

        With ``keepFiles`` the exchange folder (inputs, outputs, transforms, ``qc.png``) is kept
        and its path is in each result node's ``ContrastAmplifier.Folder`` attribute; otherwise
        it is deleted once the results are loaded.

        Raises:
            ValueError: an input is missing or chosen twice (named in the message).
            process.ProcessError: the command line failed; the message is its own error text.
        """
        job = self.startPreprocess(t1, flair, adc, t1c, device, skullStripMode, qualityControl,
                                   spacing=spacing, crop=crop)
        if progressCallback is not None:
            job.process.on_progress = progressCallback
        try:
            job.process.wait(timeout=timeout)
            results = self.loadPreprocessResults(job)
        except BaseException:
            job.process.cancel(wait=True)
            self.discardJobFiles(job)
            raise
        if keepFiles:
            for node in results.values():
                node.SetAttribute("ContrastAmplifier.Folder", str(job.outDir))
        else:
            self.discardJobFiles(job)
        return results

    # Amplification (T1c-pro) is added by the inference work: the model selector (registry),
    # the quality/speed choice (folds x mirrorings) and an Apply action belong next to
    # ``OutputVolume`` and follow the same pattern as preprocessing: export inputs, run
    # ``contrast-amplifier predict ... --progress json`` through ``process``, import the result
    # with ``mrml_bridge.import_volume_file`` named "<T1c name> T1c-pro".

    # -- helpers -----------------------------------------------------------------------------

    @staticmethod
    def _find(folder: Path, stem: str) -> Optional[Path]:
        for suffix in (".nii.gz", ".nrrd", ".mha", ".nii"):
            if (folder / f"{stem}{suffix}").is_file():
                return folder / f"{stem}{suffix}"
        return None

    @staticmethod
    def _temporaryParent() -> Optional[str]:
        app = getattr(slicer, "app", None)
        return getattr(app, "temporaryPath", None) if app is not None else None

    @staticmethod
    def _childEnv(device: str) -> Dict[str, str]:
        env = {}
        if device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""  # keep the child off the GPU Slicer may be rendering on
        return env


#
# ContrastAmplifierWidget
#


def _parameterWidgets(uiWidget) -> list:
    """(widget, parameter name) pairs: every widget whose .ui entry has a SlicerParameterName property."""
    pairs = []
    for widget in slicer.util.findChildren(uiWidget):
        name = widget.property("SlicerParameterName") if hasattr(widget, "property") else None
        if name:
            pairs.append((widget, str(name)))
    return pairs


class ContrastAmplifierWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """GUI: binds the .ui to the parameter node, runs jobs in the background, Apply turns into Cancel."""

    TIMER_INTERVAL_MS = 200

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: Optional[ContrastAmplifierLogic] = None
        self._parameterNode = None
        self._updatingGUIFromParameterNode = False
        self._job: Optional[BackgroundJob] = None
        self._timer = None

    def setup(self) -> None:
        import qt

        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/ContrastAmplifier.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = ContrastAmplifierLogic()
        self.logic.confirmInstall = lambda message: slicer.util.confirmOkCancelDisplay(message, "Install Python packages")
        self.parameterEditWidgets = _parameterWidgets(uiWidget)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        slicer.util.addParameterEditWidgetConnections(self.parameterEditWidgets, self.updateParameterNodeFromGUI)
        self.ui.preprocessButton.connect("clicked(bool)", self.onPreprocessButton)

        self._timer = qt.QTimer()
        self._timer.setInterval(self.TIMER_INTERVAL_MS)
        self._timer.connect("timeout()", self.onTimer)
        self.ui.progressBar.hide()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        if self._job is not None and self._job.process.running:
            self._job.process.cancel(wait=True)
        self.logic.discardJobFiles(self._job)
        if self._timer is not None:
            self._timer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode is not None:
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, parameterNode) -> None:
        if parameterNode is not None:
            self.logic.setDefaultParameters(parameterNode)
        if self._parameterNode is not None:
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self._parameterNode = parameterNode
        if self._parameterNode is not None:
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self.updateGUIFromParameterNode()

    def updateGUIFromParameterNode(self, caller=None, event=None) -> None:
        if self._parameterNode is None or self._updatingGUIFromParameterNode:
            return
        self._updatingGUIFromParameterNode = True
        slicer.util.updateParameterEditWidgetsFromNode(self.parameterEditWidgets, self._parameterNode)
        self._updateButtons()
        self._updatingGUIFromParameterNode = False

    def updateParameterNodeFromGUI(self, caller=None, event=None) -> None:
        if self._parameterNode is None or self._updatingGUIFromParameterNode:
            return
        wasModified = self._parameterNode.StartModify()
        slicer.util.updateNodeFromParameterEditWidgets(self.parameterEditWidgets, self._parameterNode)
        self._parameterNode.EndModify(wasModified)

    def _updateButtons(self) -> None:
        running = self._job is not None and self._job.process.running
        if running:
            self.ui.preprocessButton.text = "Cancel"
            self.ui.preprocessButton.toolTip = "Stop the preprocessing child process."
            self.ui.preprocessButton.enabled = True
            return
        self.ui.preprocessButton.text = "Preprocess (QC)"
        missing = [label for stem, (ref, label) in self.logic.INPUTS.items()
                   if self._parameterNode is None or self._parameterNode.GetNodeReference(ref) is None]
        self.ui.preprocessButton.enabled = not missing
        self.ui.preprocessButton.toolTip = (
            f"Select the {', '.join(missing)} volume(s) first." if missing
            else "Skull-strip, register to the ICBM 2009a atlas, crop and normalise the four inputs in a background process."
        )

    # -- preprocessing in the background -----------------------------------------------------

    def onPreprocessButton(self) -> None:
        if self._job is not None and self._job.process.running:
            self._job.process.cancel()
            self.ui.statusLabel.text = "Cancelling..."
            return
        pn = self._parameterNode
        nodes = self.logic.inputNodes(pn)
        self.logic.discardJobFiles(self._job)  # the previous run's files (its results are in the scene)
        try:
            with slicer.util.tryWithErrorDisplay("Preprocessing could not start.", waitCursor=True):
                self._job = self.logic.startPreprocess(
                    nodes["t1"], nodes["flair"], nodes["adc"], nodes["t1c"],
                    device=pn.GetParameter("Device"), skullStripMode=pn.GetParameter("SkullStripMode"),
                    qualityControl=pn.GetParameter("QualityControl") == "true",
                )
                self.ui.progressBar.value = 0
                self.ui.progressBar.show()
                self.ui.statusLabel.text = "Preprocessing started..."
                self.ui.qcImageLabel.clear()
                self._timer.start()
        except Exception as exc:  # already shown to the user by tryWithErrorDisplay
            self.ui.statusLabel.text = f"Not started: {exc}"
        finally:
            self._updateButtons()

    def onTimer(self) -> None:
        job = self._job
        if job is None:
            self._timer.stop()
            return
        for event in job.process.poll():
            self.ui.progressBar.value = int(round(100 * event.fraction))
            self.ui.statusLabel.text = f"{event.stage}: {event.message}" if event.message else event.stage
        if job.process.running:
            return
        self._timer.stop()
        self.ui.progressBar.hide()
        try:
            if job.process.state is process.ProcessState.CANCELLED:
                self.ui.statusLabel.text = "Cancelled; nothing was loaded."
                return
            with slicer.util.tryWithErrorDisplay("Preprocessing failed.", waitCursor=True):
                nodes = self.logic.loadPreprocessResults(job)
                slicer.util.setSliceViewerLayers(background=nodes["t1c"], fit=True)
                self.ui.statusLabel.text = f"Done: {len(nodes)} volumes loaded (files in {job.outDir})."
                qcPath = self.logic.qualityControlImage(job)
                if qcPath is not None:
                    self._showQualityControl(qcPath)
        except Exception as exc:  # already shown to the user by tryWithErrorDisplay
            self.ui.statusLabel.text = f"Failed: {exc}"
        finally:
            self._updateButtons()

    def _showQualityControl(self, path: Path) -> None:
        import qt

        pixmap = qt.QPixmap(str(path))
        width = max(self.ui.qcImageLabel.width, 200)
        self.ui.qcImageLabel.setPixmap(pixmap.scaledToWidth(width, qt.Qt.SmoothTransformation))
        self.ui.qcImageLabel.toolTip = str(path)


#
# ContrastAmplifierTest
#


class ContrastAmplifierTest(ScriptedLoadableModuleTest):
    """Self-test run by Slicer (Reload and Test, ctest): node-level round trip through files."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear(0)

    def runTest(self) -> None:
        self.setUp()
        self.test_ExportImportKeepsGeometry()
        self.test_MissingInputIsNamed()

    def test_ExportImportKeepsGeometry(self) -> None:
        import tempfile

        import numpy as np
        import SimpleITK as sitk

        image = sitk.GetImageFromArray(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6))
        image.SetSpacing((0.8, 1.1, 3.0))
        image.SetOrigin((10.0, -20.0, 5.0))
        image.SetDirection((0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
        node = mrml_bridge.add_volume_node_from_sitk(image, "ContrastAmplifierTest", scene=slicer.mrmlScene)
        with tempfile.TemporaryDirectory() as folder:
            path = mrml_bridge.export_volume_node(node, Path(folder) / "t1c.nrrd")
            back = mrml_bridge.import_volume_file(path, "ContrastAmplifierTest back", scene=slicer.mrmlScene)
        np.testing.assert_allclose(mrml_bridge.ijk_to_ras_matrix(back), mrml_bridge.ijk_to_ras_matrix(node), atol=1e-9)
        self.assertTrue(np.array_equal(slicer.util.arrayFromVolume(back), slicer.util.arrayFromVolume(node)))

    def test_MissingInputIsNamed(self) -> None:
        logic = ContrastAmplifierLogic()
        with self.assertRaisesRegex(ValueError, r"No T1 volume selected: choose it in Inputs > T1\."):
            logic.validateInputs({"t1": None, "flair": None})
