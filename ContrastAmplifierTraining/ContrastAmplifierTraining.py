"""ContrastAmplifierTraining: train the five-fold contrast-amplification ensemble from a cohort.

Thin Slicer module: it builds the ``contrast-amplifier-train fit`` command line and runs it as a
child process (``python -m ContrastAmplifierTrainingLib.cli fit ...``), showing per-fold
progress and the latest losses; Stop ends the process, Start on the same output folder resumes
from the last checkpoint. All real work lives in ContrastAmplifierTrainingLib.

The Logic imports no Qt: it also runs without the Slicer application (``slicer-core`` wheel).
"""

from __future__ import annotations

import logging
import re
import unittest
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import slicer
import vtk

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

from ContrastAmplifierLib import process
from ContrastAmplifierLib.dependencies import ensure_dependencies

PAPER = (
    "Bone A, Ammari S, Menu Y, et al. From Dose Reduction to Contrast Maximization: Can Deep Learning Amplify the "
    "Impact of Contrast Media on Brain Magnetic Resonance Image Quality? A Reader Study. Invest Radiol. "
    "2022;57(8):527-535. doi:10.1097/RLI.0000000000000867"
)


#
# ContrastAmplifierTraining
#


class ContrastAmplifierTraining(ScriptedLoadableModule):
    """Module description shown in Slicer's module panel."""

    def __init__(self, parent) -> None:
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Contrast Amplifier Training"
        self.parent.categories = ["Contrast Amplifier"]
        self.parent.dependencies = []
        self.parent.contributors = ["SlicerContrastAmplifier developers"]
        self.parent.helpText = """
Trains the contrast-amplification network of the paper: one 3D residual UNet per fold of a patient-wise
five-fold split (Adam 1e-3, batch 1, MSE, random mirroring), from a cohort with T1, T2-FLAIR, ADC,
low-dose T1c and routine T1c per case. Training runs in a background process; Stop ends it and Start
on the same output folder resumes from the last checkpoint.
<b>Research use only: not for clinical use.</b>
"""
        self.parent.acknowledgementText = f"""
This module reproduces the training procedure of: {PAPER}
"""


#
# ContrastAmplifierTrainingLogic
#


class TrainingUnavailableError(RuntimeError):
    """The training command line is not part of this installation."""


class ContrastAmplifierTrainingLogic(ScriptedLoadableModuleLogic):
    """Builds and runs the training command line; usable from the Python console and batch mode.

    Example (``Slicer --no-main-window --python-script``)::

        logic = ContrastAmplifierTrainingLogic()
        logic.train("/data/cohort.csv", "/data/run1", folds=[0, 1, 2, 3, 4], epochs=300, device="auto")
    """

    #: Parameter-node values and their defaults (every key the module uses is declared here).
    PARAMETERS: Dict[str, str] = {
        "ManifestPath": "",
        "OutputFolder": "",
        "Folds": "0 1 2 3 4",
        "Epochs": "300",
        "Device": "auto",
    }
    NODE_REFERENCES: Tuple[str, ...] = ()
    CLI_MODULE = "ContrastAmplifierTrainingLib.cli"
    CLI_NAME = "contrast-amplifier-train"
    DEVICES = ("auto", "cpu", "cuda")

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        #: Asks the user before installing packages; the widget sets a dialog, batch mode logs and installs.
        self.confirmInstall: Optional[Callable[[str], bool]] = None

    def setDefaultParameters(self, parameterNode) -> None:
        """Fill unset parameters with :data:`PARAMETERS` defaults."""
        for key, value in self.PARAMETERS.items():
            if not parameterNode.GetParameter(key):
                parameterNode.SetParameter(key, value)

    # -- availability ------------------------------------------------------------------------

    def trainingAvailability(self) -> Tuple[bool, str]:
        """Whether ``contrast-amplifier-train fit`` exists here, and a sentence for the user."""
        try:
            commands = process.available_cli_commands(self.CLI_MODULE)
        except ImportError as exc:  # a dependency is missing: Start installs it, then checks again
            return True, (f"The training command line needs Python packages that are not installed yet ({exc}); "
                          "Start installs them first.")
        if "fit" not in commands:
            return False, (f"The training command line ({self.CLI_NAME} fit) is not part of this installation yet; "
                           "training cannot start. Update the ContrastAmplifier extension.")
        return True, f"Ready: runs '{self.CLI_NAME} fit' in a background process."

    # -- command line ------------------------------------------------------------------------

    @staticmethod
    def parseFolds(text: str) -> List[int]:
        """``"0 1 2"`` or ``"0,1,2"`` -> ``[0, 1, 2]``.

        Raises:
            ValueError: empty, non-integer, negative or repeated folds (the message shows the text).
        """
        parts = [p for p in re.split(r"[\s,;]+", str(text).strip()) if p]
        if not parts:
            raise ValueError("Folds is empty: enter the folds to train, e.g. '0 1 2 3 4'.")
        try:
            folds = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"Folds must be whole numbers separated by spaces, e.g. '0 1 2 3 4' (got '{text}').") from None
        if any(f < 0 for f in folds) or len(set(folds)) != len(folds):
            raise ValueError(f"Folds must be distinct and >= 0 (got '{text}').")
        return folds

    def fitCommand(self, manifest: Path, outputFolder: Path, folds: Sequence[int], epochs: int, device: str = "auto") -> List[str]:
        """The ``contrast-amplifier-train fit`` command line (JSON progress for the module).

        Raises:
            ValueError: a missing manifest, no output folder, bad epochs or device; the message says which.
        """
        if not str(manifest).strip():
            raise ValueError("No manifest selected: choose a cohort manifest CSV or a folder of case folders.")
        manifest = Path(manifest)
        if not manifest.exists():
            raise ValueError(f"Manifest not found: {manifest}. Choose an existing CSV file or case folder.")
        if not str(outputFolder).strip():
            raise ValueError("No output folder selected: choose where checkpoints and logs go.")
        if int(epochs) < 1:
            raise ValueError(f"Epochs must be at least 1 (got {epochs}).")
        if device not in self.DEVICES:
            raise ValueError(f"Device must be one of {', '.join(self.DEVICES)} (got {device!r}).")
        args: List[object] = ["fit", manifest, Path(outputFolder)]
        for fold in folds:
            args += ["--folds", int(fold)]
        args += ["--epochs", int(epochs), "--device", device, "--progress", "json"]
        return process.python_module_command(self.CLI_MODULE, *args)

    def startTraining(self, manifest, outputFolder, folds: Sequence[int], epochs: int, device: str = "auto",
                      installDependencies: bool = True) -> process.BackgroundProcess:
        """Start training in a child process and return it at once (poll it from a timer).

        Raises:
            TrainingUnavailableError: the training command line is not installed.
            ValueError: invalid settings (named in the message).
        """
        command = self.fitCommand(manifest, outputFolder, folds, epochs, device)
        if installDependencies:
            ensure_dependencies(confirm=self.confirmInstall, module_title="Contrast Amplifier Training")
        available, reason = self.trainingAvailability()
        if not available:
            raise TrainingUnavailableError(reason)
        if not {"fit"} <= process.available_cli_commands(self.CLI_MODULE):  # still unloadable after installing
            raise TrainingUnavailableError(f"The training command line ({self.CLI_NAME} fit) cannot be loaded; reinstall the extension.")
        Path(outputFolder).mkdir(parents=True, exist_ok=True)
        logging.info("Contrast Amplifier Training: running %s", " ".join(command))
        env = {"CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else {}
        return process.BackgroundProcess(command, env=process.child_environment(env)).start()

    def train(self, manifest, outputFolder, folds: Sequence[int] = (0, 1, 2, 3, 4), epochs: int = 300,
              device: str = "auto", progressCallback: Optional[Callable[[process.ProgressEvent], None]] = None,
              timeout: Optional[float] = None) -> process.BackgroundProcess:
        """Synchronous training (batch mode); returns the finished process.

        Raises:
            process.ProcessError: training failed; the message is the command line's own error.
        """
        job = self.startTraining(manifest, outputFolder, folds, epochs, device)
        job.on_progress = progressCallback
        try:
            job.wait(timeout=timeout)
        except BaseException:
            job.cancel(wait=True)
            raise
        job.raise_for_state()
        return job


#
# ContrastAmplifierTrainingWidget
#


def _parameterWidgets(uiWidget) -> list:
    """(widget, parameter name) pairs: every widget whose .ui entry has a SlicerParameterName property."""
    pairs = []
    for widget in slicer.util.findChildren(uiWidget):
        name = widget.property("SlicerParameterName") if hasattr(widget, "property") else None
        if name:
            pairs.append((widget, str(name)))
    return pairs


class ContrastAmplifierTrainingWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """GUI: cohort and run folder, folds, epochs, device; Start/Stop a background training run."""

    TIMER_INTERVAL_MS = 500
    #: Widget classes slicer.util's parameter helpers do not handle: bound here by text/path.
    TEXT_WIDGETS = ("ctkPathLineEdit", "QLineEdit")

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: Optional[ContrastAmplifierTrainingLogic] = None
        self._parameterNode = None
        self._updatingGUIFromParameterNode = False
        self._job: Optional[process.BackgroundProcess] = None
        self._timer = None

    def setup(self) -> None:
        import qt

        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/ContrastAmplifierTraining.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = ContrastAmplifierTrainingLogic()
        self.logic.confirmInstall = lambda message: slicer.util.confirmOkCancelDisplay(message, "Install Python packages")
        bindings = _parameterWidgets(uiWidget)
        self.textWidgets = [(w, p) for w, p in bindings if w.className() in self.TEXT_WIDGETS]
        self.parameterEditWidgets = [(w, p) for w, p in bindings if w.className() not in self.TEXT_WIDGETS]

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        slicer.util.addParameterEditWidgetConnections(self.parameterEditWidgets, self.updateParameterNodeFromGUI)
        for widget, _ in self.textWidgets:
            signal = "currentPathChanged(QString)" if widget.className() == "ctkPathLineEdit" else "textChanged(QString)"
            widget.connect(signal, self.updateParameterNodeFromGUI)
        self.ui.startButton.connect("clicked(bool)", self.onStartButton)
        self.ui.stopButton.connect("clicked(bool)", self.onStopButton)

        self._timer = qt.QTimer()
        self._timer.setInterval(self.TIMER_INTERVAL_MS)
        self._timer.connect("timeout()", self.onTimer)
        self.ui.progressBar.hide()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        if self._job is not None and self._job.running:
            self._job.cancel(wait=True)
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
        for widget, name in self.textWidgets:
            value = self._parameterNode.GetParameter(name)
            if widget.className() == "ctkPathLineEdit":
                widget.currentPath = value
            else:
                widget.text = value
        self._updateButtons()
        self._updatingGUIFromParameterNode = False

    def updateParameterNodeFromGUI(self, caller=None, event=None) -> None:
        if self._parameterNode is None or self._updatingGUIFromParameterNode:
            return
        wasModified = self._parameterNode.StartModify()
        slicer.util.updateNodeFromParameterEditWidgets(self.parameterEditWidgets, self._parameterNode)
        for widget, name in self.textWidgets:
            value = widget.currentPath if widget.className() == "ctkPathLineEdit" else widget.text
            self._parameterNode.SetParameter(name, value)
        self._parameterNode.EndModify(wasModified)

    def _updateButtons(self) -> None:
        running = self._job is not None and self._job.running
        available, reason = self.logic.trainingAvailability()
        pn = self._parameterNode
        ready = pn is not None and bool(pn.GetParameter("ManifestPath")) and bool(pn.GetParameter("OutputFolder"))
        self.ui.startButton.enabled = available and ready and not running
        self.ui.startButton.toolTip = reason if not available else (
            "Start (or resume) training in a background process." if ready else "Choose the manifest and the output folder first.")
        self.ui.stopButton.enabled = running
        if not available and not running:
            self.ui.statusLabel.text = reason

    def onStartButton(self) -> None:
        pn = self._parameterNode
        try:
            with slicer.util.tryWithErrorDisplay("Training could not start.", waitCursor=True):
                self._job = self.logic.startTraining(
                    pn.GetParameter("ManifestPath"), pn.GetParameter("OutputFolder"),
                    self.logic.parseFolds(pn.GetParameter("Folds")), int(float(pn.GetParameter("Epochs"))),
                    pn.GetParameter("Device"),
                )
                self.ui.logTextEdit.clear()
                self.ui.progressBar.value = 0
                self.ui.progressBar.show()
                self.ui.statusLabel.text = "Training started..."
                self._timer.start()
        except Exception as exc:  # already shown to the user by tryWithErrorDisplay
            self.ui.statusLabel.text = f"Not started: {exc}"
        finally:
            self._updateButtons()

    def onStopButton(self) -> None:
        if self._job is not None and self._job.running:
            self._job.cancel(grace_s=10.0)  # the CLI saves its checkpoint on SIGTERM
            self.ui.statusLabel.text = "Stopping (a later Start on the same folder resumes)..."

    def onTimer(self) -> None:
        job = self._job
        if job is None:
            self._timer.stop()
            return
        for event in job.poll():
            self.ui.progressBar.value = int(round(100 * event.fraction))
            self.ui.statusLabel.text = event.stage
            if event.message:
                self.ui.logTextEdit.appendPlainText(event.message)
        if job.running:
            return
        self._timer.stop()
        self.ui.progressBar.hide()
        if job.state is process.ProcessState.SUCCEEDED:
            self.ui.statusLabel.text = "Training finished. Export a bundle with contrast-amplifier-train export."
        elif job.state is process.ProcessState.CANCELLED:
            self.ui.statusLabel.text = "Stopped. Start again with the same output folder to resume."
        else:
            self.ui.statusLabel.text = f"Failed: {job.error_message()}"
            slicer.util.errorDisplay(f"Training failed:\n{job.error_message()}", detailedText=job.stderr_text)
        self._updateButtons()


#
# ContrastAmplifierTrainingTest
#


class ContrastAmplifierTrainingTest(ScriptedLoadableModuleTest):
    """Self-test run by Slicer: command-line construction and clear errors (no training run)."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear(0)

    def runTest(self) -> None:
        self.setUp()
        self.test_FitCommand()

    def test_FitCommand(self) -> None:
        import tempfile

        logic = ContrastAmplifierTrainingLogic()
        self.assertEqual(logic.parseFolds("0, 2 4"), [0, 2, 4])
        with tempfile.TemporaryDirectory() as folder:
            command = logic.fitCommand(Path(folder), Path(folder) / "run", [0, 1], 2, "cpu")
        self.assertEqual(command[1:4], ["-m", logic.CLI_MODULE, "fit"])
        self.assertIn("--epochs", command)
        with self.assertRaisesRegex(ValueError, "Manifest not found"):
            logic.fitCommand(Path("/no/such/manifest.csv"), Path("/tmp/run"), [0], 1)
