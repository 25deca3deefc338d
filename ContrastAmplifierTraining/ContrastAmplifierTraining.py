"""ContrastAmplifierTraining: train the five-fold contrast-amplification ensemble from a cohort.

Thin Slicer module: it builds the ``contrast-amplifier-train fit`` command line and runs it as a
child process (``python -m ContrastAmplifierTrainingLib.cli fit ...``), showing per-fold
progress and the latest losses; Stop ends the process (SIGTERM: the CLI stops after the current case),
Resume (Start on the same output folder) continues after the last checkpointed epoch. All real work lives in ContrastAmplifierTrainingLib;
reading a run folder and the child's progress lines is ``ContrastAmplifierTrainingLib.run_status`` (no torch).
"Export and add to models" turns a finished run into a model bundle and installs it in the user's
models (``ContrastAmplifierLib.registry``), where the Contrast Amplifier module lists it.

The settings live in a typed parameter node (:class:`ContrastAmplifierTrainingParameterNode`,
Slicer's ``parameterNodeWrapper``): each .ui widget names its field in the ``SlicerParameterName``
property and ``connectGui`` binds them. The Logic reads its settings from that node and imports
no Qt: it also runs without the Slicer application (``slicer-core`` wheel, headless stand-ins of
``ContrastAmplifierCommon.slicer_compat``).
"""

from __future__ import annotations

import logging
import pathlib
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Callable, ClassVar, Dict, FrozenSet, List, Optional, Sequence, Tuple

import slicer
import vtk

from slicer.util import VTKObservationMixin

from ContrastAmplifierCommon.slicer_compat import (
    Choice,
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
    WithinRange,
    parameterNodeWrapper,
)
from ContrastAmplifierCommon.slicer_compat import tr as _

from ContrastAmplifierCommon import process
from ContrastAmplifierCommon.dependencies import ensure_dependencies
from ContrastAmplifierTrainingLib.run_status import (
    FINISHED,
    RUNNING,
    STOPPED,
    WAITING,
    FoldStatus,
    RunStatus,
    RunStatusCache,
    TrainingMonitor,
    has_run,
)

PAPER = (
    "Bone A, Ammari S, Menu Y, et al. From Dose Reduction to Contrast Maximization: Can Deep Learning Amplify the "
    "Impact of Contrast Media on Brain Magnetic Resonance Image Quality? A Reader Study. Invest Radiol. "
    "2022;57(8):527-535. doi:10.1097/RLI.0000000000000867"
)

#: Devices the fit command line takes from the module ("auto" picks a GPU when there is one).
DEVICES = ("auto", "cpu", "cuda")
#: Registry names of model bundles (``bundle-schema.json``: letters, digits, ``. _ -``).
MODEL_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


#
# ContrastAmplifierTraining
#


class ContrastAmplifierTraining(ScriptedLoadableModule):
    """Module description shown in Slicer's module panel."""

    def __init__(self, parent) -> None:
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Contrast Amplifier Training")
        # The extension's category (EXTENSION_CATEGORY), the same in every module of the extension.
        self.parent.categories = ["Image Synthesis"]
        self.parent.dependencies = ["ContrastAmplifier"]  # imports ContrastAmplifierLib
        self.parent.contributors = ["SlicerContrastAmplifier developers"]
        self.parent.helpText = _("""
Trains the contrast-amplification network of the paper: one 3D residual UNet per fold of a patient-wise
five-fold split (Adam 1e-3, batch 1, MSE, random mirroring), from a cohort with T1, T2-FLAIR, ADC,
low-dose T1c and routine T1c per case. Training runs in a background process; Stop ends it and Start
on the same output folder resumes from the last checkpoint. Export and add to models installs the
finished ensemble in your models, where the Contrast Amplifier module lists it.
<b>Research use only: not for clinical use.</b>
""")
        self.parent.acknowledgementText = _("""
This module reproduces the training procedure of: {paper}
""").format(paper=PAPER)


#
# ContrastAmplifierTrainingParameterNode
#


@parameterNodeWrapper
class ContrastAmplifierTrainingParameterNode:
    """The module's settings, stored in its vtkMRMLScriptedModuleNode (saved with the scene).

    manifestPath - cohort manifest CSV, or a folder of case folders / cached cases.
    outputFolder - the run folder (cache, checkpoints, logs); Start on a folder with a run resumes it.
    folds - folds to train, e.g. "0 1 2 3 4" (:meth:`ContrastAmplifierTrainingLogic.parseFolds`).
    epochs - epochs per fold (paper: 300).
    device - "auto", "cpu" or "cuda".
    upperClipPercentile - HIGH of ``--clip-percentiles 1 HIGH`` (paper: 99).
    modelName - registry name of the exported bundle (empty: from the output folder's name).

    Paths not chosen yet read as ``Path(".")`` (Slicer's path serializer stores ``str(Path())``):
    the Logic takes ``""`` and ``"."`` for "not chosen".
    """

    manifestPath: pathlib.Path
    outputFolder: pathlib.Path
    folds: str = "0 1 2 3 4"
    epochs: Annotated[int, WithinRange(1, 100000)] = 300
    device: Annotated[str, Choice(list(DEVICES))] = "auto"
    upperClipPercentile: Annotated[float, WithinRange(90.0, 100.0)] = 99.0
    modelName: str = ""


def chosenPath(value) -> str:
    """A path setting as text, ``""`` when none was chosen (``None``, ``""``, or ``"."`` from ``Path()``)."""
    text = "" if value is None else str(value).strip()
    return "" if text in ("", ".") else text


#
# ContrastAmplifierTrainingLogic
#


class TrainingUnavailableError(RuntimeError):
    """The training command line is not part of this installation."""


@dataclass(frozen=True)
class TrainingSettings:
    """Everything ``fit`` needs from the parameter node, checked only by :meth:`ContrastAmplifierTrainingLogic.fitCommand`."""

    manifest: str
    outputFolder: str
    folds: Tuple[int, ...]
    epochs: int
    device: str
    upperClipPercentile: float


class ContrastAmplifierTrainingLogic(ScriptedLoadableModuleLogic):
    """Builds and runs the training command line; usable from the Python console and batch mode.

    Settings come from the module's parameter node (:meth:`getParameterNode`); explicit arguments
    override them. Example (``Slicer --no-main-window --python-script``)::

        logic = ContrastAmplifierTrainingLogic()
        parameters = logic.getParameterNode()
        parameters.upperClipPercentile = 99.9
        logic.train("/data/cohort.csv", "/data/run1", folds=[0, 1, 2, 3, 4], epochs=300, device="auto")
        logic.exportAndAddModel("/data/run1", name="my-model")
    """

    CLI_MODULE = "ContrastAmplifierTrainingLib.cli"
    CLI_NAME = "contrast-amplifier-train"
    DEVICES = DEVICES
    #: Seconds Stop lets the CLI finish its current case (it then exits cleanly with a
    #: "cancelled" line) before killing it. A kill is safe too: checkpoints are written
    #: atomically after each epoch, so Resume repeats at most the unfinished epoch.
    STOP_GRACE_S = 30.0
    #: Grace before the kill when Slicer closes during a fit (bounded: closing never hangs).
    CLOSE_GRACE_S = 3.0
    #: Sub-commands of each CLI module, probed once per session (the probe imports the CLI and
    #: builds its click command). A probe that fails to import (packages not installed yet) is
    #: not kept, so the one after installing sees the command line.
    _commandsCache: ClassVar[Dict[str, FrozenSet[str]]] = {}

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        #: Asks the user before installing packages; the widget sets a dialog, batch mode logs and installs.
        self.confirmInstall: Optional[Callable[[str], bool]] = None
        self._runStatusCache = RunStatusCache()

    def getParameterNode(self) -> ContrastAmplifierTrainingParameterNode:
        """The module's typed parameter node (created with the paper's defaults when missing)."""
        return ContrastAmplifierTrainingParameterNode(super().getParameterNode())

    # -- availability ------------------------------------------------------------------------

    def availableCommands(self) -> FrozenSet[str]:
        """Sub-commands of :attr:`CLI_MODULE`, probed once per session.

        Raises:
            ImportError: the command line cannot be imported yet (a dependency is missing); not cached.
        """
        cache = ContrastAmplifierTrainingLogic._commandsCache
        if self.CLI_MODULE not in cache:
            cache[self.CLI_MODULE] = frozenset(process.available_cli_commands(self.CLI_MODULE))
        return cache[self.CLI_MODULE]

    @classmethod
    def clearCommandCache(cls) -> None:
        """Probe the command line again on next use (e.g. after updating the extension)."""
        ContrastAmplifierTrainingLogic._commandsCache.clear()

    def trainingAvailability(self) -> Tuple[bool, str]:
        """Whether ``contrast-amplifier-train fit`` exists here, and a sentence for the user."""
        try:
            commands = self.availableCommands()
        except ImportError as exc:  # a dependency is missing: Start installs it, then checks again
            return True, _("The training command line needs Python packages that are not installed yet ({error}); "
                           "Start installs them first.").format(error=exc)
        if "fit" not in commands:
            return False, _("The training command line ({command} fit) is not part of this installation yet; "
                            "training cannot start. Update the ContrastAmplifier extension.").format(command=self.CLI_NAME)
        return True, _("Ready: runs '{command} fit' in a background process.").format(command=self.CLI_NAME)

    # -- settings and command line -----------------------------------------------------------

    @staticmethod
    def parseFolds(text: str) -> List[int]:
        """``"0 1 2"`` or ``"0,1,2"`` -> ``[0, 1, 2]``.

        Raises:
            ValueError: empty, non-integer, negative or repeated folds (the message shows the text).
        """
        parts = [p for p in re.split(r"[\s,;]+", str(text).strip()) if p]
        if not parts:
            raise ValueError(_("Folds is empty: enter the folds to train, e.g. '0 1 2 3 4'."))
        try:
            folds = [int(p) for p in parts]
        except ValueError:
            raise ValueError(_("Folds must be whole numbers separated by spaces, e.g. '0 1 2 3 4' (got '{text}').").format(
                text=text)) from None
        if any(f < 0 for f in folds) or len(set(folds)) != len(folds):
            raise ValueError(_("Folds must be distinct and >= 0 (got '{text}').").format(text=text))
        return folds

    def trainingSettings(self, parameters: Optional[ContrastAmplifierTrainingParameterNode] = None, *,
                         manifest=None, outputFolder=None, folds=None, epochs: Optional[int] = None,
                         device: Optional[str] = None, upperClipPercentile: Optional[float] = None) -> TrainingSettings:
        """The settings of ``parameters`` (default: this module's parameter node); arguments not ``None`` override them.

        Raises:
            ValueError: the folds text does not parse (see :meth:`parseFolds`).
        """
        p = parameters if parameters is not None else self.getParameterNode()
        foldList = self.parseFolds(p.folds) if folds is None else (self.parseFolds(folds) if isinstance(folds, str) else folds)
        return TrainingSettings(
            manifest=chosenPath(p.manifestPath if manifest is None else manifest),
            outputFolder=chosenPath(p.outputFolder if outputFolder is None else outputFolder),
            folds=tuple(int(k) for k in foldList),
            epochs=int(p.epochs if epochs is None else epochs),
            device=str(p.device if device is None else device),
            upperClipPercentile=float(p.upperClipPercentile if upperClipPercentile is None else upperClipPercentile),
        )

    def fitCommand(self, manifest, outputFolder, folds: Sequence[int], epochs: int, device: str = "auto",
                   extraArgs: Sequence[str] = (), upperClipPercentile: float = 99.0) -> List[str]:
        """The ``contrast-amplifier-train fit`` command line (JSON progress for the module).

        Rerunning the same command on the same output folder resumes: finished folds are
        skipped and an unfinished fold continues after its last checkpointed epoch.
        ``extraArgs`` passes further ``fit`` options (e.g. ``["--n-folds", "2", "--crop", "80", "96", "80"]``).
        ``upperClipPercentile`` is the HIGH of ``--clip-percentiles 1 HIGH`` (paper: 99).

        Raises:
            ValueError: a missing manifest, no output folder, bad epochs or device; the message says which.
        """
        if not chosenPath(manifest):
            raise ValueError(_("No manifest selected: choose a cohort manifest CSV or a folder of case folders."))
        manifest = Path(manifest)
        if not manifest.exists():
            raise ValueError(_("Manifest not found: {path}. Choose an existing CSV file or case folder.").format(path=manifest))
        if not chosenPath(outputFolder):
            raise ValueError(_("No output folder selected: choose where checkpoints and logs go."))
        if int(epochs) < 1:
            raise ValueError(_("Epochs must be at least 1 (got {epochs}).").format(epochs=epochs))
        if device not in self.DEVICES:
            raise ValueError(_("Device must be one of {devices} (got {device}).").format(
                devices=", ".join(self.DEVICES), device=repr(device)))
        if not 1.0 < float(upperClipPercentile) <= 100.0:
            raise ValueError(_("Upper clip percentile must be above 1 and at most 100 (got {value}); the paper uses 99.").format(
                value=upperClipPercentile))
        args: List[object] = ["fit", manifest, Path(outputFolder)]
        for fold in folds:
            args += ["--folds", int(fold)]
        args += ["--epochs", int(epochs), "--device", device, "--clip-percentiles", 1, f"{float(upperClipPercentile):g}",
                 *map(str, extraArgs), "--progress", "json"]
        return process.python_module_command(self.CLI_MODULE, *args)

    def fitCommandFromParameters(self, parameters: Optional[ContrastAmplifierTrainingParameterNode] = None,
                                 extraArgs: Sequence[str] = ()) -> List[str]:
        """:meth:`fitCommand` with every setting from ``parameters`` (default: this module's parameter node)."""
        s = self.trainingSettings(parameters)
        return self.fitCommand(s.manifest, s.outputFolder, s.folds, s.epochs, s.device, extraArgs, s.upperClipPercentile)

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
            ensure_dependencies(confirm=self.confirmInstall, module_title=_("Contrast Amplifier Training"))
        available, reason = self.trainingAvailability()
        if not available:
            raise TrainingUnavailableError(reason)
        if "fit" not in self.availableCommands():  # still unloadable after installing (ImportError names why)
            raise TrainingUnavailableError(_("The training command line ({command} fit) cannot be loaded; "
                                             "reinstall the extension.").format(command=self.CLI_NAME))
        Path(outputFolder).mkdir(parents=True, exist_ok=True)
        self._runStatusCache.clear()
        logging.info("Contrast Amplifier Training: running %s", " ".join(command))
        env = {"CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else {}
        return process.BackgroundProcess(command, env=process.child_environment(env)).start()

    def startTrainingFromParameters(self, parameters: Optional[ContrastAmplifierTrainingParameterNode] = None,
                                    installDependencies: bool = True, extraArgs: Sequence[str] = ()) -> process.BackgroundProcess:
        """:meth:`startTraining` with every setting from ``parameters`` (default: this module's parameter node)."""
        s = self.trainingSettings(parameters)
        return self.startTraining(s.manifest, s.outputFolder, s.folds, s.epochs, s.device,
                                  installDependencies=installDependencies, extraArgs=extraArgs,
                                  upperClipPercentile=s.upperClipPercentile)

    def stopTraining(self, job: Optional[process.BackgroundProcess], wait: bool = False,
                     grace_s: Optional[float] = None) -> None:
        """Stop a training child: SIGTERM (the CLI stops after the current case; finished epochs
        are checkpointed), then a kill of its whole process tree after ``grace_s`` (default
        :attr:`STOP_GRACE_S`). Never blocks unless ``wait`` (then at most ``grace_s`` + a few s).

        Start again with the same output folder to resume.
        """
        if job is not None and job.running:
            job.cancel(grace_s=self.STOP_GRACE_S if grace_s is None else grace_s, wait=wait)

    @staticmethod
    def hasRun(outputFolder) -> bool:
        """True when ``outputFolder`` holds a run started by ``fit`` (Start then resumes it)."""
        return has_run(chosenPath(outputFolder))

    def runFolderStatus(self, outputFolder) -> RunStatus:
        """What the run folder holds (plan, per-fold state); read again only when its files changed."""
        return self._runStatusCache.read(chosenPath(outputFolder))

    def runStatus(self, outputFolder) -> Dict[int, FoldStatus]:
        """Per-fold state of a run folder (``run_status.read_run_status``: no torch, cheap, cached).

        Returns:
            fold -> :class:`FoldStatus` (epochs done and last losses); empty for a new folder.
        """
        return self.runFolderStatus(outputFolder).folds

    def train(self, manifest=None, outputFolder=None, folds: Optional[Sequence[int]] = None, epochs: Optional[int] = None,
              device: Optional[str] = None, progressCallback: Optional[Callable[[process.ProgressEvent], None]] = None,
              timeout: Optional[float] = None, upperClipPercentile: Optional[float] = None,
              parameters: Optional[ContrastAmplifierTrainingParameterNode] = None,
              extraArgs: Sequence[str] = (), installDependencies: bool = True) -> process.BackgroundProcess:
        """Synchronous training (batch mode); returns the finished process.

        Settings not given come from ``parameters`` (default: this module's parameter node, whose
        defaults are the paper's), so a clip percentile set there reaches the command line.

        Raises:
            process.ProcessError: training failed; the message is the command line's own error.
        """
        s = self.trainingSettings(parameters, manifest=manifest, outputFolder=outputFolder, folds=folds, epochs=epochs,
                                  device=device, upperClipPercentile=upperClipPercentile)
        job = self.startTraining(s.manifest, s.outputFolder, s.folds, s.epochs, s.device,
                                 installDependencies=installDependencies, extraArgs=extraArgs,
                                 upperClipPercentile=s.upperClipPercentile)
        job.on_progress = progressCallback
        try:
            job.wait(timeout=timeout)
        except BaseException:
            job.cancel(wait=True)
            raise
        job.raise_for_state()
        return job

    # -- export --------------------------------------------------------------------------------

    @staticmethod
    def defaultModelName(outputFolder) -> str:
        """A registry name from the run folder's name (``"run 1"`` -> ``"run-1"``)."""
        name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(chosenPath(outputFolder) or "contrast-amplifier").name).strip("-._")
        return name or "contrast-amplifier"

    def exportModelName(self, parameters: Optional[ContrastAmplifierTrainingParameterNode] = None) -> str:
        """The bundle name to export under: the parameter node's model name, else :meth:`defaultModelName`."""
        p = parameters if parameters is not None else self.getParameterNode()
        return p.modelName.strip() or self.defaultModelName(p.outputFolder)

    def exportProblem(self, outputFolder, folds: Optional[Sequence[int]] = None,
                      status: Optional[RunStatus] = None) -> Optional[str]:
        """Why the run cannot be exported yet (a sentence for the user), or ``None`` when it can.

        The ensemble needs every fold of the run's split (``folds``: only those). Cheap: judges
        ``status`` when given, else reads the run folder through the status cache; never loads weights.
        """
        folder = chosenPath(outputFolder)
        if not folder:
            return _("No output folder selected: choose the run folder to export.")
        if status is None:
            status = self.runFolderStatus(folder)
        if not status.has_plan:
            return _("{folder} holds no training run: train into it first.").format(folder=folder)
        if folds is None and not status.n_folds:
            return _("The plan of {folder} is unreadable: its folds are unknown.").format(folder=folder)
        missing = status.missing_folds(folds)
        if missing:
            return _("Folds {missing} of {folder} have not finished (finished: {finished}): every fold of the "
                     "ensemble is needed. Train them (Folds: '{missingText}', then Resume training) before exporting.").format(
                missing=", ".join(map(str, missing)), folder=folder,
                finished=", ".join(map(str, status.finished_folds())) or _("none"),
                missingText=" ".join(map(str, missing)))
        return None

    @staticmethod
    def userModelPath(name: str) -> Optional[Path]:
        """Where the user's model ``name`` is installed, or ``None`` (the registry's per-user folder)."""
        from ContrastAmplifierLib.registry import user_models_dir

        path = user_models_dir() / name
        return path if path.exists() else None

    def exportAndAddModel(self, outputFolder=None, name: Optional[str] = None, folds: Optional[Sequence[int]] = None,
                          overwrite: bool = False, version: str = "1.0.0",
                          parameters: Optional[ContrastAmplifierTrainingParameterNode] = None,
                          installDependencies: bool = True):
        """Export the finished run as a model bundle and add it to the user's models.

        The bundle is written (``ContrastAmplifierTrainingLib.export.export_bundle``) to a
        temporary folder, then ``ContrastAmplifierLib.registry.import_model`` checks it in full
        (manifest, SHA-256 of each file, tensors) and installs it: the Contrast Amplifier module
        lists it at once (its Refresh, or on its next start). The default model is unchanged.

        Args:
            outputFolder, name: default from ``parameters`` (:meth:`exportModelName`).
            folds: the folds to export (default: every fold of the run's split, all required).
            overwrite: replace a user model of the same name.

        Returns:
            The installed ``ModelBundle``.

        Raises:
            ValueError: folds missing (named, with what to do), no run, or an invalid name.
            ContrastAmplifierLib.bundle.BundleError: a model of that name is installed (without
                ``overwrite``) or the bundle fails the check.
        """
        if outputFolder is None or name is None:
            p = parameters if parameters is not None else self.getParameterNode()
            outputFolder = p.outputFolder if outputFolder is None else outputFolder
            name = self.exportModelName(p) if name is None else name
        name = str(name).strip()
        if not MODEL_NAME_PATTERN.match(name):
            raise ValueError(_("Model name '{name}' is not valid: use letters, digits, '.', '_' and '-', "
                               "starting with a letter or digit.").format(name=name))
        self._runStatusCache.clear()  # the folder as it is now, not as last shown
        problem = self.exportProblem(outputFolder, folds)
        if problem:
            raise ValueError(problem)
        status = self.runFolderStatus(outputFolder)
        exportFolds = sorted(status.finished_folds() if folds is None else (int(k) for k in folds))
        if installDependencies:
            ensure_dependencies(confirm=self.confirmInstall, module_title=_("Contrast Amplifier Training"))
        from ContrastAmplifierLib.registry import import_model
        from ContrastAmplifierTrainingLib.export import export_bundle

        with tempfile.TemporaryDirectory(prefix="ContrastAmplifierTraining-export-") as scratch:
            staged = Path(scratch) / name
            export_bundle(Path(chosenPath(outputFolder)), staged, folds=exportFolds, name=name, version=version)
            bundle = import_model(staged, overwrite=overwrite)
        logging.info("Contrast Amplifier Training: model %r (folds %s) added to %s", bundle.name, bundle.folds, bundle.path)
        return bundle


#
# ContrastAmplifierTrainingWidget
#


class ContrastAmplifierTrainingWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """GUI: cohort and run folder, folds, epochs, device, clip percentile; Start/Stop a background
    training run; export the finished ensemble into the user's models."""

    TIMER_INTERVAL_MS = 500

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: Optional[ContrastAmplifierTrainingLogic] = None
        self._parameterNode: Optional[ContrastAmplifierTrainingParameterNode] = None
        self._parameterNodeGuiTag = None
        self._job: Optional[process.BackgroundProcess] = None
        self._monitor: Optional[TrainingMonitor] = None
        self._timer = None
        #: The run folder the fold table and buttons show, and its status (refreshed when the
        #: folder setting changes, on enter and after a fit; not on every keystroke elsewhere).
        self._statusFolder: Optional[str] = None
        self._status = RunStatus(None)

    def setup(self) -> None:
        import qt

        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/ContrastAmplifierTraining.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = ContrastAmplifierTrainingLogic()
        self.logic.confirmInstall = lambda message: slicer.util.confirmOkCancelDisplay(message, _("Install Python packages"))

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.startButton.connect("clicked(bool)", self.onStartButton)
        self.ui.stopButton.connect("clicked(bool)", self.onStopButton)
        self.ui.exportButton.connect("clicked(bool)", self.onExportButton)

        self._timer = qt.QTimer()
        self._timer.setInterval(self.TIMER_INTERVAL_MS)
        self._timer.connect("timeout()", self.onTimer)
        self.ui.progressBar.hide()
        self.ui.foldTable.setHorizontalHeaderLabels(
            [_("Fold"), _("Epochs"), _("State"), _("Train MSE"), _("Val MSE"), _("Val PSNR"), _("Val SSIM")])
        self.initializeParameterNode()

    def cleanup(self) -> None:
        # Closing Slicer must not wait for the epoch in progress (STOP_GRACE_S): a short grace,
        # then the tree is killed; finished epochs are checkpointed, Resume continues from them.
        if self._job is not None and self._job.running:
            self.logic.stopTraining(self._job, wait=True, grace_s=self.logic.CLOSE_GRACE_S)
        if self._timer is not None:
            self._timer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self._stopObserving(self._parameterNode)

    def _stopObserving(self, parameterNode: ContrastAmplifierTrainingParameterNode) -> None:
        node = parameterNode.parameterNode
        if self.hasObserver(node, vtk.vtkCommand.ModifiedEvent, self._checkCanApply):  # exit() may have removed it
            self.removeObserver(node, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, inputParameterNode: Optional[ContrastAmplifierTrainingParameterNode]) -> None:
        """Bind the .ui widgets (``SlicerParameterName``) to the node and follow its changes.

        The node's ModifiedEvent is observed on the underlying vtkMRMLScriptedModuleNode (the
        wrapper's ``AddObserver`` forwards there in Slicer; the headless stand-in has none).
        """
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self._stopObserving(self._parameterNode)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._connectGui(self._parameterNode)
            self.addObserver(self._parameterNode.parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._refreshRunStatus(force=True)
            self._checkCanApply()

    def _connectGui(self, parameterNode: ContrastAmplifierTrainingParameterNode):
        """``connectGui(self.ui)`` and its tag, for ``disconnectGui`` in :meth:`exit`.

        Slicer 5.6 and 5.8 return no tag (fixed in 5.10, Slicer commit b5a65a4): ``disconnectGui(None)``
        then does nothing, and each enter() would add one more set of connectors to the widgets.
        The tag of the connection just made is the wrapper's last one.
        """
        tag = parameterNode.connectGui(self.ui)
        if tag is None and isinstance(getattr(parameterNode, "_nextParameterGUIsTag", None), int):
            tag = parameterNode._nextParameterGUIsTag - 1
        return tag

    # -- state shown -----------------------------------------------------------------------------

    def _running(self) -> bool:
        return self._job is not None and self._job.running

    def _refreshRunStatus(self, force: bool = False) -> RunStatus:
        """The status of the chosen run folder: looked up when the folder setting changed (or
        ``force``); the Logic's cache re-reads the files only when they changed on disk."""
        folder = chosenPath(self._parameterNode.outputFolder) if self._parameterNode else ""
        if force or folder != self._statusFolder:
            self._statusFolder = folder
            self._status = self.logic.runFolderStatus(folder)
            if self._monitor is None:
                self._fillFoldTable(list(self._status.folds.values()))
        return self._status

    def _checkCanApply(self, caller=None, event=None) -> None:
        """Buttons and tooltips from the settings: runs on every parameter change (each keystroke),
        so it reads nothing that did not change (the command probe and run status are cached)."""
        pn = self._parameterNode
        running = self._running()
        available, reason = self.logic.trainingAvailability()
        status = self._refreshRunStatus()
        ready = pn is not None and bool(chosenPath(pn.manifestPath)) and bool(chosenPath(pn.outputFolder))
        resume = status.has_plan
        self.ui.startButton.text = _("Resume training") if resume else _("Start training")
        self.ui.startButton.enabled = available and ready and not running
        if not available:
            self.ui.startButton.toolTip = reason
        elif not ready:
            self.ui.startButton.toolTip = _("Choose the manifest and the output folder first.")
        elif resume:
            self.ui.startButton.toolTip = _("Continue the run in the output folder: finished folds are skipped, an unfinished "
                                            "fold continues after its last saved epoch.")
        else:
            self.ui.startButton.toolTip = _("Start training in a background process.")
        self.ui.stopButton.enabled = running
        if not available and not running:
            self.ui.statusLabel.text = reason
        problem = self.logic.exportProblem(self._statusFolder, status=status) if status.has_plan else _(
            "Train a run into the output folder first.")
        self.ui.exportButton.enabled = not running and problem is None
        self.ui.exportButton.toolTip = problem or _(
            "Export the finished ensemble as a model bundle named '{name}' and add it to your models "
            "(Contrast Amplifier > Model).").format(name=self.logic.exportModelName(pn) if pn else "")

    def _fillFoldTable(self, rows: Sequence[FoldStatus]) -> None:
        import qt

        states = {WAITING: _("waiting"), RUNNING: _("running"), FINISHED: _("finished"), STOPPED: _("stopped")}
        table = self.ui.foldTable
        table.setRowCount(len(rows))
        for row, status in enumerate(rows):
            epochs = f"{status.epochs_done}/{status.epochs}" if status.epochs else str(status.epochs_done)
            cells = (str(status.fold), epochs, states.get(status.state, status.state),
                     "" if status.train_loss is None else f"{status.train_loss:.5f}",
                     "" if status.val_loss is None else f"{status.val_loss:.5f}",
                     "" if status.val_psnr is None else f"{status.val_psnr:.2f}",
                     "" if status.val_ssim is None else f"{status.val_ssim:.4f}")
            for column, text in enumerate(cells):
                table.setItem(row, column, qt.QTableWidgetItem(text))

    # -- actions ---------------------------------------------------------------------------------

    def onStartButton(self) -> None:
        pn = self._parameterNode
        try:
            with slicer.util.tryWithErrorDisplay(_("Training could not start."), waitCursor=True):
                settings = self.logic.trainingSettings(pn)
                resuming = self.logic.hasRun(settings.outputFolder)
                self._job = self.logic.startTrainingFromParameters(pn)
                initial = self._refreshRunStatus(force=True).folds
                self._monitor = TrainingMonitor(settings.folds, settings.epochs, initial=initial)
                self._fillFoldTable(self._monitor.ordered())
                self.ui.logTextEdit.clear()
                self.ui.lossesLabel.text = ""
                self.ui.progressBar.value = 0
                self.ui.progressBar.show()
                self.ui.statusLabel.text = _("Resuming training...") if resuming else _("Training started...")
                self._timer.start()
        except Exception as exc:  # already shown to the user by tryWithErrorDisplay
            self.ui.statusLabel.text = _("Not started: {error}").format(error=exc)
        finally:
            self._checkCanApply()

    def onStopButton(self) -> None:
        if self._running():
            self.logic.stopTraining(self._job)  # SIGTERM now, kill later from poll(): the GUI never waits
            self.ui.stopButton.enabled = False
            self.ui.statusLabel.text = _("Stopping after the current case (Resume continues from the last saved epoch)...")

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
            self.ui.statusLabel.text = _("Training finished. Export and add to models makes the ensemble available in "
                                         "the Contrast Amplifier module.")
        elif job.state is process.ProcessState.CANCELLED:
            monitor.mark_stopped()
            self.ui.statusLabel.text = _("Stopped. Resume training continues from the last saved epoch.")
        else:
            monitor.mark_stopped()
            self.ui.statusLabel.text = _("Failed: {error}").format(error=job.error_message())
            slicer.util.errorDisplay(_("Training failed:\n{error}").format(error=job.error_message()),
                                     detailedText=job.stderr_text)
        self._fillFoldTable(monitor.ordered())
        self._monitor = None
        self._refreshRunStatus(force=True)  # what the child wrote: Resume, Export
        self._checkCanApply()

    def onExportButton(self) -> None:
        pn = self._parameterNode
        name = self.logic.exportModelName(pn)
        overwrite = False
        if self.logic.userModelPath(name) is not None:
            if not slicer.util.confirmOkCancelDisplay(
                    _("A model named '{name}' is already in your models. Replace it with this run's ensemble?").format(name=name),
                    _("Replace model")):
                return
            overwrite = True
        try:
            with slicer.util.tryWithErrorDisplay(_("The model could not be exported."), waitCursor=True):
                bundle = self.logic.exportAndAddModel(pn.outputFolder, name, overwrite=overwrite)
                self.ui.statusLabel.text = _(
                    "Model '{name}' (folds {folds}) added to your models: choose it in Contrast Amplifier > Model.").format(
                    name=bundle.name, folds=", ".join(map(str, bundle.folds)))
                self._refreshContrastAmplifierModels()
        except Exception as exc:  # already shown to the user by tryWithErrorDisplay
            self.ui.statusLabel.text = _("Not exported: {error}").format(error=exc)
        finally:
            self._checkCanApply()

    @staticmethod
    def _refreshContrastAmplifierModels() -> None:
        """Let the Contrast Amplifier module's model selector list the new bundle now."""
        try:
            widget = slicer.util.getModuleWidget("ContrastAmplifier")
            refresh = getattr(widget, "refreshModels", None)
            if refresh is not None:
                refresh()
        except Exception as exc:  # the module or its widget is not there: its Refresh button lists it later
            logging.info("Contrast Amplifier Training: model list of Contrast Amplifier not refreshed (%s)", exc)


#
# ContrastAmplifierTrainingTest
#


class ContrastAmplifierTrainingTest(ScriptedLoadableModuleTest):
    """Self-test run by Slicer: settings from the parameter node, command-line construction and
    clear errors (no training run)."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear(0)

    def runTest(self) -> None:
        self.setUp()
        self.test_FitCommand()
        self.test_ParameterNode()

    def test_FitCommand(self) -> None:
        logic = ContrastAmplifierTrainingLogic()
        self.assertEqual(logic.parseFolds("0, 2 4"), [0, 2, 4])
        with tempfile.TemporaryDirectory() as folder:
            command = logic.fitCommand(Path(folder), Path(folder) / "run", [0, 1], 2, "cpu")
        self.assertEqual(command[1:4], ["-m", logic.CLI_MODULE, "fit"])
        self.assertIn("--epochs", command)
        with self.assertRaisesRegex(ValueError, "Manifest not found"):
            logic.fitCommand(Path("/no/such/manifest.csv"), Path("/tmp/run"), [0], 1)

    def test_ParameterNode(self) -> None:
        logic = ContrastAmplifierTrainingLogic()
        parameters = logic.getParameterNode()
        self.assertEqual((parameters.folds, parameters.epochs, parameters.device, parameters.upperClipPercentile),
                         ("0 1 2 3 4", 300, "auto", 99.0))
        with tempfile.TemporaryDirectory() as folder:
            parameters.manifestPath = Path(folder)
            parameters.outputFolder = Path(folder) / "run"
            parameters.upperClipPercentile = 99.9
            parameters.folds = "1 3"
            command = logic.fitCommandFromParameters(parameters)
        joined = " ".join(command)
        self.assertIn("--clip-percentiles 1 99.9", joined)
        self.assertIn("--folds 1 --folds 3", joined)
