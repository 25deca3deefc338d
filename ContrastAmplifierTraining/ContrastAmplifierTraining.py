"""ContrastAmplifierTraining: train the five-fold contrast-amplification ensemble from a cohort.

Thin Slicer module: it builds the ``contrast-amplifier-train fit`` command line and runs it as a
child process (``python -m ContrastAmplifierTrainingLib.cli fit ...``), showing per-fold
progress and the latest losses; Stop ends the process (SIGTERM: the CLI stops after the current case),
Resume (Start on the same output folder) continues after the last checkpointed epoch. All real work lives in ContrastAmplifierTrainingLib;
reading a run folder and the child's progress lines is ``ContrastAmplifierTrainingLib.run_status`` (no torch).

The Logic imports no Qt: it also runs without the Slicer application (``slicer-core`` wheel).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import slicer
import vtk

from slicer.util import VTKObservationMixin

from ContrastAmplifierCommon.slicer_compat import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)

from ContrastAmplifierCommon import process
from ContrastAmplifierCommon.dependencies import ensure_dependencies
from ContrastAmplifierTrainingLib.run_status import FoldStatus, TrainingMonitor, has_run, read_run_status

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
        self.parent.dependencies = ["ContrastAmplifier"]  # imports ContrastAmplifierLib
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
        "ClipPercentile": "99.0",
    }
    NODE_REFERENCES: Tuple[str, ...] = ()
    CLI_MODULE = "ContrastAmplifierTrainingLib.cli"
    CLI_NAME = "contrast-amplifier-train"
    DEVICES = ("auto", "cpu", "cuda")
    #: Seconds Stop lets the CLI finish its current case (it then exits cleanly with a
    #: "cancelled" line) before killing it. A kill is safe too: checkpoints are written
    #: atomically after each epoch, so Resume repeats at most the unfinished epoch.
    STOP_GRACE_S = 30.0

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

    def fitCommand(self, manifest: Path, outputFolder: Path, folds: Sequence[int], epochs: int, device: str = "auto",
                   extraArgs: Sequence[str] = (), upperClipPercentile: float = 99.0) -> List[str]:
        """The ``contrast-amplifier-train fit`` command line (JSON progress for the module).

        Rerunning the same command on the same output folder resumes: finished folds are
        skipped and an unfinished fold continues after its last checkpointed epoch.
        ``extraArgs`` passes further ``fit`` options (e.g. ``["--n-folds", "2", "--crop", "80", "96", "80"]``).
        ``upperClipPercentile`` is the HIGH of ``--clip-percentiles 1 HIGH`` (paper: 99).

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
        if not 1.0 < float(upperClipPercentile) <= 100.0:
            raise ValueError(f"Upper clip percentile must be above 1 and at most 100 (got {upperClipPercentile}); the paper uses 99.")
        args: List[object] = ["fit", manifest, Path(outputFolder)]
        for fold in folds:
            args += ["--folds", int(fold)]
        args += ["--epochs", int(epochs), "--device", device, "--clip-percentiles", 1, f"{float(upperClipPercentile):g}",
                 *map(str, extraArgs), "--progress", "json"]
        return process.python_module_command(self.CLI_MODULE, *args)

    def startTraining(self, manifest, outputFolder, folds: Sequence[int], epochs: int, device: str = "auto",
                      installDependencies: bool = True, extraArgs: Sequence[str] = (),
                      upperClipPercentile: float = 99.0) -> process.BackgroundProcess:
        """Start training in a child process and return it at once (poll it from a timer).

        Raises:
            TrainingUnavailableError: the training command line is not installed.
            ValueError: invalid settings (named in the message).
        """
        command = self.fitCommand(manifest, outputFolder, folds, epochs, device, extraArgs, upperClipPercentile)
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

    def stopTraining(self, job: Optional[process.BackgroundProcess], wait: bool = False) -> None:
        """Stop a training child: SIGTERM (the CLI stops after the current case; finished epochs
        are checkpointed), then a kill after :attr:`STOP_GRACE_S`. Never blocks unless ``wait``.

        Start again with the same output folder to resume.
        """
        if job is not None and job.running:
            job.cancel(grace_s=self.STOP_GRACE_S, wait=wait)

    @staticmethod
    def hasRun(outputFolder) -> bool:
        """True when ``outputFolder`` holds a run started by ``fit`` (Start then resumes it)."""
        return has_run(outputFolder)

    @staticmethod
    def runStatus(outputFolder) -> Dict[int, FoldStatus]:
        """Per-fold state of a run folder (``run_status.read_run_status``: no torch, cheap).

        Returns:
            fold -> :class:`FoldStatus` (epochs done and last losses); empty for a new folder.
        """
        return read_run_status(outputFolder).folds

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
        self._monitor: Optional[TrainingMonitor] = None
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
        self.ui.foldTable.setHorizontalHeaderLabels(["Fold", "Epochs", "State", "Train MSE", "Val MSE", "Val PSNR", "Val SSIM"])
        self.initializeParameterNode()

    def cleanup(self) -> None:
        if self._job is not None and self._job.running:
            self.logic.stopTraining(self._job, wait=True)
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
        resume = pn is not None and self.logic.hasRun(pn.GetParameter("OutputFolder"))
        self.ui.startButton.text = "Resume training" if resume else "Start training"
        self.ui.startButton.enabled = available and ready and not running
        self.ui.startButton.toolTip = reason if not available else (
            "Choose the manifest and the output folder first." if not ready
            else "Continue the run in the output folder: finished folds are skipped, an unfinished fold "
                 "continues after its last saved epoch." if resume
            else "Start training in a background process.")
        self.ui.stopButton.enabled = running
        if not available and not running:
            self.ui.statusLabel.text = reason
        if not running and pn is not None:
            self._showRunStatus(pn.GetParameter("OutputFolder"))

    def _showRunStatus(self, outputFolder: str) -> None:
        """Fill the fold table from the run folder on disk (what a Resume would continue)."""
        if self._monitor is not None:
            return
        self._fillFoldTable(list(self.logic.runStatus(outputFolder).values()))

    def _fillFoldTable(self, rows: Sequence[FoldStatus]) -> None:
        import qt

        table = self.ui.foldTable
        table.setRowCount(len(rows))
        for row, status in enumerate(rows):
            epochs = f"{status.epochs_done}/{status.epochs}" if status.epochs else str(status.epochs_done)
            cells = (str(status.fold), epochs, status.state,
                     "" if status.train_loss is None else f"{status.train_loss:.5f}",
                     "" if status.val_loss is None else f"{status.val_loss:.5f}",
                     "" if status.val_psnr is None else f"{status.val_psnr:.2f}",
                     "" if status.val_ssim is None else f"{status.val_ssim:.4f}")
            for column, text in enumerate(cells):
                table.setItem(row, column, qt.QTableWidgetItem(text))

    def onStartButton(self) -> None:
        pn = self._parameterNode
        try:
            with slicer.util.tryWithErrorDisplay("Training could not start.", waitCursor=True):
                folds = self.logic.parseFolds(pn.GetParameter("Folds"))
                epochs = int(float(pn.GetParameter("Epochs")))
                outputFolder = pn.GetParameter("OutputFolder")
                resuming = self.logic.hasRun(outputFolder)
                self._job = self.logic.startTraining(
                    pn.GetParameter("ManifestPath"), outputFolder, folds, epochs, pn.GetParameter("Device"),
                    upperClipPercentile=float(pn.GetParameter("ClipPercentile") or 99.0),
                )
                self._monitor = TrainingMonitor(folds, epochs, initial=self.logic.runStatus(outputFolder))
                self._fillFoldTable(self._monitor.ordered())
                self.ui.logTextEdit.clear()
                self.ui.lossesLabel.text = ""
                self.ui.progressBar.value = 0
                self.ui.progressBar.show()
                self.ui.statusLabel.text = "Resuming training..." if resuming else "Training started..."
                self._timer.start()
        except Exception as exc:  # already shown to the user by tryWithErrorDisplay
            self.ui.statusLabel.text = f"Not started: {exc}"
        finally:
            self._updateButtons()

    def onStopButton(self) -> None:
        if self._job is not None and self._job.running:
            self.logic.stopTraining(self._job)  # SIGTERM now, kill later from poll(): the GUI never waits
            self.ui.stopButton.enabled = False
            self.ui.statusLabel.text = "Stopping after the current case (Resume continues from the last saved epoch)..."

    def onTimer(self) -> None:
        job, monitor = self._job, self._monitor
        if job is None or monitor is None:
            self._timer.stop()
            return
        changed = False
        for event in job.poll():
            monitor.update(event)
            changed = True
            self.ui.progressBar.value = int(round(100 * event.fraction))
            if event.stage != "epoch":
                self.ui.statusLabel.text = f"{event.stage}: {event.message}" if event.message else event.stage
            if event.stage not in ("fit",) and event.message:  # per-case lines would flood the log
                self.ui.logTextEdit.appendPlainText(event.message)
        if changed:
            self._fillFoldTable(monitor.ordered())
            self.ui.lossesLabel.text = monitor.latest_losses()
        if job.running:
            return
        self._timer.stop()
        self.ui.progressBar.hide()
        if job.state is process.ProcessState.SUCCEEDED:
            self.ui.statusLabel.text = "Training finished. Export a bundle with contrast-amplifier-train export."
        elif job.state is process.ProcessState.CANCELLED:
            monitor.mark_stopped()
            self.ui.statusLabel.text = "Stopped. Resume training continues from the last saved epoch."
        else:
            monitor.mark_stopped()
            self.ui.statusLabel.text = f"Failed: {job.error_message()}"
            slicer.util.errorDisplay(f"Training failed:\n{job.error_message()}", detailedText=job.stderr_text)
        self._fillFoldTable(monitor.ordered())
        self._monitor = None
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
