"""ContrastAmplifier: amplify gadolinium contrast on brain MRI (T1c -> T1c-pro), after Bone, Ammari et al. 2022.

Thin Slicer module (Slicer 5.8 scripted-module template): the panel's choices live in a typed
parameter node (:class:`ContrastAmplifierParameterNode`, ``parameterNodeWrapper``; the .ui widgets
carry ``SlicerParameterName`` and ``connectGui`` binds them); the widget starts the Lib's own
command line (``python -m ContrastAmplifierLib.cli ...``) through the Logic in a child process, so
the GUI never freezes; the Logic exports the selected volumes, runs the child (in the background,
or synchronously in batch mode) and loads the results back. All real work lives in
ContrastAmplifierLib.

The Logic imports no Qt: it also runs without the Slicer application (``slicer-core`` wheel).
Nothing heavy is imported when Slicer loads this file at start-up: SimpleITK, the MRML bridge and
the model registry are imported where they are used.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Callable, Dict, List, Optional, Sequence, Tuple

import slicer
import vtk

from slicer.util import VTKObservationMixin

from ContrastAmplifierCommon import process
from ContrastAmplifierCommon.dependencies import ensure_dependencies, offer_optional_dependencies
from ContrastAmplifierCommon.slicer_compat import IN_SLICER_APP as HAS_SLICER_APP
from ContrastAmplifierCommon.slicer_compat import (
    Choice,
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
    parameterNodeWrapper,
)
from ContrastAmplifierCommon.slicer_compat import tr as _
from ContrastAmplifierLib.imagefiles import IMAGE_SUFFIXES  # SimpleITK-free: safe before dependencies are installed

PAPER = (
    "Bone A, Ammari S, Menu Y, Balleyguier C, Moulton E, Chouzenoux E, Volk A, Garcia GCTE, Nicolas F, Robert P, "
    "Rohe MM, Lassau N. From Dose Reduction to Contrast Maximization: Can Deep Learning Amplify the Impact of "
    "Contrast Media on Brain Magnetic Resonance Image Quality? A Reader Study. Invest Radiol. 2022;57(8):527-535. "
    "doi:10.1097/RLI.0000000000000867"
)

#: The Sample Data entry: a synthetic phantom case generated on the user's machine (nothing is downloaded).
PHANTOM_SAMPLE_CATEGORY = "Contrast Amplifier"
PHANTOM_SAMPLE_NAME = "Contrast Amplifier phantom"
#: The phantom seed of ``contrast-amplifier demo`` (ContrastAmplifierLib.demo.DEMO_SEED): metastases, never used to
#: train the shipped demo model.
PHANTOM_SEED = 20260
#: Voxel size (mm) of the sample phantom's T1/T1c (a few seconds to generate; the demo model works at 3 mm).
PHANTOM_SPACING_MM = 2.0
#: SampleData needs a URI per file although the entry never downloads (its button calls :func:`loadPhantomSample`).
PHANTOM_SAMPLE_URI = "https://github.com/SlicerContrastAmplifier/SlicerContrastAmplifier#sample-data"
PHANTOM_THUMBNAIL = Path(__file__).resolve().parent / "Resources" / "Icons" / "ContrastAmplifierPhantom.png"


#
# ContrastAmplifier
#


class ContrastAmplifier(ScriptedLoadableModule):
    """Module description shown in Slicer's module panel."""

    def __init__(self, parent) -> None:
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Contrast Amplifier")
        # One category for the whole extension (the ExtensionsIndex category; Testing/SlicerModules/test_extension_index.py).
        self.parent.categories = ["Image Synthesis"]
        self.parent.dependencies = []
        self.parent.contributors = ["SlicerContrastAmplifier developers"]
        self.parent.helpText = _("""
Amplifies the effect of gadolinium on brain MRI: from T1, T2-FLAIR, ADC and a routine post-contrast
T1 (T1c), a 3D residual UNet ensemble predicts "T1c-pro", an image with the look of a higher contrast dose.
<b>Research use only: not for clinical use.</b> The bundled demo model is trained on synthetic phantoms.
<br>Apply runs the chosen model bundle (Quick: 1 fold x 1 mirroring; Balanced: all folds x 2; Paper: all folds x 8)
in a background process (Cancel stops it and leaves nothing behind) and shows a new volume "&lt;T1c name&gt; T1c-pro",
in the T1c's study, next to the T1c in linked side-by-side views with the T1c's window/level.
<br>Add model imports a model bundle (a folder holding bundle.json, or a .zip of one) after checking every file's
SHA-256; the line under Model shows the chosen model's version, geometry, folds and intended use.
<br>Preprocess (QC) runs the paper's preprocessing (skull stripping, registration to the ICBM 2009a atlas,
crop, normalisation) with the chosen model's spacing, crop and clip percentiles, in a background process,
and loads the preprocessed volumes and a QC picture: what that model's network is given.
<br>DICOM output folder (optional): each Apply also writes T1c-pro as a DICOM MR series into a new sub-folder
"&lt;T1c name&gt; T1c-pro" there - in the T1c's study when the T1c was loaded from Slicer's DICOM database, else in a
new de-identified study - and adds it to the DICOM database. Send to PACS sends that series to a PACS (a DICOMweb
URL, dicom://AET@host:port, or an endpoint name of your PACS configuration file).
<br>No MRI at hand? Sample Data > Contrast Amplifier > "Contrast Amplifier phantom" makes a synthetic case
(T1, T2-FLAIR, ADC, T1c and its 4x-dose truth) and selects it here.
See the <a href="https://github.com/SlicerContrastAmplifier/SlicerContrastAmplifier">extension documentation</a>.
""")
        self.parent.acknowledgementText = _("""
This module reproduces the method of: {paper}
The synthetic phantom uses the ICBM 2009a nonlinear symmetric template (McConnell Brain Imaging Centre);
skull stripping uses HD-BET (Isensee et al., Hum Brain Mapp 2019).
""").format(paper=PAPER)
        if HAS_SLICER_APP:  # the Sample Data module is loaded once Slicer has started
            slicer.app.connect("startupCompleted()", registerSampleData)


#
# Sample data: a synthetic phantom case, generated locally
#


def registerSampleData() -> None:
    """Add "Contrast Amplifier phantom" to the Sample Data module (when that module is available).

    SampleData downloads URIs; this entry instead generates a synthetic case with
    ContrastAmplifierLib.phantom through ``customDownloader`` (the Sample Data button calls it;
    Slicer 5.6 and 5.8 both accept the arguments used here). From Python, call
    ``ContrastAmplifierLogic().loadPhantomSample()`` (``SampleData.downloadSample`` would fetch the URI).
    """
    try:
        import SampleData
    except ImportError:  # Sample Data module disabled or not built
        return
    sources = SampleData.SampleDataLogic.sampleDataSourcesByCategory(PHANTOM_SAMPLE_CATEGORY)
    if any(getattr(source, "sampleName", None) == PHANTOM_SAMPLE_NAME for source in sources):
        return  # registered already (module reloaded)
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category=PHANTOM_SAMPLE_CATEGORY,
        sampleName=PHANTOM_SAMPLE_NAME,
        thumbnailFileName=str(PHANTOM_THUMBNAIL),
        uris=PHANTOM_SAMPLE_URI,
        fileNames="ContrastAmplifierPhantom.nrrd",
        nodeNames="Phantom T1c",
        customDownloader=loadPhantomSample,
    )


def loadPhantomSample(source=None) -> Dict[str, object]:
    """The Sample Data button's action: generate the phantom case, load it, select it in the module.

    Installs the Python packages the phantom needs first (after asking), shows errors to the user.
    """
    logic = ContrastAmplifierLogic()
    if HAS_SLICER_APP:
        logic.confirmInstall = lambda message: slicer.util.confirmOkCancelDisplay(message, _("Install Python packages"))
    nodes: Dict[str, object] = {}
    with slicer.util.tryWithErrorDisplay(_("The synthetic phantom case could not be made."), waitCursor=HAS_SLICER_APP):
        nodes = logic.loadPhantomSample()
        if HAS_SLICER_APP:
            slicer.util.setSliceViewerLayers(background=nodes["t1c"], fit=True)
    return nodes


#
# ContrastAmplifierParameterNode
#

#: Labels of the quality presets (stored in the parameter node, shown in the Quality combo box).
QUALITY_LABELS = ["Quick", "Balanced", "Paper"]
#: The panel's Precision choices, as the command line's ``--precision`` (ContrastAmplifierLib.ensemble.PRECISIONS).
PRECISIONS = ("auto", "exact", "fast", "int8")


@parameterNodeWrapper
class ContrastAmplifierParameterNode:
    """The panel's choices, kept in the module's parameter node (saved with the scene).

    The names are those earlier versions stored, so saved scenes keep their selections.

    InputT1, InputFLAIR, InputADC, InputT1c - the four input volumes.
    InputBrainMask - optional brain mask on the T1c grid (skips HD-BET); label maps are scalar volumes too.
    OutputVolume - where Apply writes T1c-pro; ``None`` (the selector's "Create new volume") makes a
                   new "<T1c name> T1c-pro" volume. A chosen volume is used for one Apply: after it
                   the selector goes back to "Create new volume", so the next patient's run never
                   overwrites this one's result.
    Model - registry name of the model bundle ("" = the default model). Not bound through
            SlicerParameterName: the selector is filled from the model registry at run time and
            Slicer's QComboBox connector needs a fixed Choice (Testing/SlicerModules/test_parameter_binding.py
            ALLOWED_WITHOUT_WIDGET).
    Quality - Quick / Balanced / Paper (QUALITY_PRESETS).
    Device - auto, cpu or cuda.
    Precision - auto, exact (fp32), fast (bf16) or int8 (OpenVINO + NNCF on the CPU only: each fold quantised
                once, used only when its check on held-out phantoms passes; Apply offers OpenVINO and NNCF).
    Backend - runtime of HD-BET and the ensemble on the CPU: auto (OpenVINO when installed, else PyTorch;
              PyTorch on a GPU), torch or openvino (CPU only). OpenVINO is optional: Apply offers to
              install it (:meth:`ContrastAmplifierLogic.ensureOptionalDependencies`).
    SkullStripMode - HD-BET fast or accurate.
    QualityControl - Preprocess (QC) writes and shows qc.png.
    DicomOutputFolder - where Apply also writes T1c-pro as a DICOM series: each Apply makes a new
                        sub-folder "<T1c name> T1c-pro" there (:meth:`ContrastAmplifierLogic.dicomSeriesFolder`)
                        and adds it to Slicer's DICOM database. Empty (stored as ".", the default of a
                        path parameter): no DICOM files.
    PacsTarget - send the series to this PACS after writing it: a URL (http://host:8042/dicom-web,
                 dicom://AET@host:104) or an endpoint name of the user's PACS configuration file.
                 Empty: not sent. Without a DICOM output folder the series is written to the
                 exchange folder only to be sent.
    """

    InputT1: slicer.vtkMRMLScalarVolumeNode
    InputFLAIR: slicer.vtkMRMLScalarVolumeNode
    InputADC: slicer.vtkMRMLScalarVolumeNode
    InputT1c: slicer.vtkMRMLScalarVolumeNode
    InputBrainMask: slicer.vtkMRMLScalarVolumeNode
    OutputVolume: slicer.vtkMRMLScalarVolumeNode
    Model: str
    Quality: Annotated[str, Choice(QUALITY_LABELS)] = "Paper"
    Device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    Precision: Annotated[str, Choice(list(PRECISIONS))] = "auto"
    Backend: Annotated[str, Choice(["auto", "torch", "openvino"])] = "auto"
    SkullStripMode: Annotated[str, Choice(["fast", "accurate"])] = "fast"
    QualityControl: bool = True
    DicomOutputFolder: Path
    PacsTarget: str


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
        backend: the runtime the child uses on the CPU ("torch" or "openvino"; :meth:`ContrastAmplifierLogic.resolveBackend`).
    """

    process: process.BackgroundProcess
    workDir: Path
    outDir: Path
    referenceName: str
    results: Dict[str, object] = field(default_factory=dict)
    backend: str = "torch"


@dataclass
class AmplifyJob(BackgroundJob):
    """A running ``contrast-amplifier predict`` and what it needs to load T1c-pro back.

    Attributes:
        outputPath: the T1c-pro file the command writes (atomically) on the T1c grid.
        t1cNode: the input T1c (its name, space and study define the result's).
        outputNode: the node to overwrite, or ``None`` for a new ``"<T1c name> T1c-pro"`` node.
        command: the command line (for the log).
        showResult: show T1c-pro next to the T1c once loaded (:meth:`ContrastAmplifierLogic.showSideBySide`).
        result: the loaded T1c-pro node once :meth:`ContrastAmplifierLogic.pollAmplify` saw success.
        error: the failure message once the job failed or was cancelled.
        dicomOutput: the folder of the T1c-pro DICOM series (``--out-dicom``), or ``None``.
        keepDicom: the series folder is the user's (kept); otherwise it lies in the exchange folder
            (written only to be sent) and is deleted with it.
        sendTo: the PACS the series is sent to (``--send``), or ``None``.
        t1cDicom: the copy of the T1c's own DICOM files passed as ``--t1c-dicom`` (the series joins
            the T1c's study), or ``None`` (a new de-identified study; ``t1cDicomNote`` says why).
        t1cDicomNote: why the T1c's DICOM files were not used ("" when they were, or no series is written).
        importToDatabase: add the user's series folder to Slicer's DICOM database after success.
        importedToDatabase: whether that import happened.
        sendError: the command line's error when T1c-pro and its series were written but sending failed
            (the result is loaded all the same).
        precision: the Precision asked for (auto, exact, fast, int8).
    """

    outputPath: Optional[Path] = None
    t1cNode: object = None
    outputNode: object = None
    command: List[str] = field(default_factory=list)
    showResult: bool = True
    result: object = None
    error: Optional[str] = None
    dicomOutput: Optional[Path] = None
    keepDicom: bool = False
    sendTo: Optional[str] = None
    t1cDicom: Optional[Path] = None
    t1cDicomNote: str = ""
    importToDatabase: bool = False
    importedToDatabase: bool = False
    sendError: Optional[str] = None
    precision: str = "auto"


@dataclass(frozen=True)
class QualityPreset:
    """A quality/speed choice: how many fold models and mirrorings are averaged.

    Attributes:
        label: text shown in the module (and stored in the parameter node).
        allFolds: every fold of the bundle (paper: 5), else only the first one.
        flips: mirrorings per fold (1, 2, 4 or 8; paper: 8).
        summary: one line for the user.
    """

    label: str
    allFolds: bool
    flips: int
    summary: str

    def predictions(self, nFolds: int) -> int:
        """Number of forward passes averaged for a bundle with ``nFolds`` folds."""
        return (nFolds if self.allFolds else 1) * self.flips


#: Quality/speed presets (keys are lower-case; the panel shows the labels, :data:`QUALITY_LABELS`).
QUALITY_PRESETS: Dict[str, QualityPreset] = {
    "quick": QualityPreset("Quick", False, 1, _("1 fold x 1 mirroring: a first look, seconds on a CPU")),
    "balanced": QualityPreset("Balanced", True, 2, _("all folds x 2 mirrorings")),
    "paper": QualityPreset("Paper", True, 8, _("all folds x 8 mirrorings, as in the paper (5 x 8 = 40 predictions)")),
}


def _bridge():
    """ContrastAmplifierLib.mrml_bridge, imported on first use (it imports SimpleITK: not at Slicer start-up)."""
    from ContrastAmplifierLib import mrml_bridge

    return mrml_bridge


class ContrastAmplifierLogic(ScriptedLoadableModuleLogic):
    """Everything the module does, usable from the Python console and batch mode (no widget needed).

    Example (``Slicer --no-main-window --python-script``)::

        logic = ContrastAmplifierLogic()
        t1cPro = logic.process(t1, flair, adc, t1c, quality="paper", device="auto")  # waits, returns the node
        nodes = logic.preprocess(t1, flair, adc, t1c, device="cpu", qualityControl=True)
        logic.importModel("/path/to/my-model.zip")  # then process(..., model="my-model")
        case = logic.loadPhantomSample()  # a synthetic case to try it on
    """

    #: File stem the Lib expects -> (parameter of :class:`ContrastAmplifierParameterNode`, name shown to the user).
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
    #: Phantom files loaded by :meth:`loadPhantomSample`: file stem -> label in node names.
    PHANTOM_VOLUMES = {
        "t1": "T1",
        "flair": "T2-FLAIR",
        "adc": "ADC",
        "t1c": "T1c",
        "t1c_x4": "T1c-x4 (4x dose truth)",
    }
    CLI_MODULE = "ContrastAmplifierLib.cli"
    #: Devices of preprocessing (HD-BET); "auto" is resolved by :meth:`resolvePreprocessDevice`.
    DEVICES = ("cpu", "cuda")
    #: Devices of amplification (resolved by the command line itself).
    PREDICT_DEVICES = ("auto", "cpu", "cuda", "mps")
    PRECISIONS = PRECISIONS
    #: Runtimes of HD-BET and the ensemble (the command line's ``--backend``); OpenVINO is an optional package.
    BACKENDS = ("auto", "torch", "openvino")
    #: Settings key (Slicer's QSettings) remembering that the user declined the optional OpenVINO install.
    DECLINED_OPENVINO_SETTING = "ContrastAmplifier/DeclinedOpenVINO"
    SKULL_STRIP_MODES = ("fast", "accurate")
    MIRRORINGS = (1, 2, 4, 8)
    #: Suffix of the result node's name: "<T1c name> T1c-pro".
    RESULT_SUFFIX = "T1c-pro"
    #: Seconds between SIGTERM and SIGKILL on cancel (the CLI removes its temporary file on SIGTERM).
    CANCEL_GRACE_S = 5.0
    #: Node attribute Slicer's DICOM scalar-volume plugin sets on a volume loaded from DICOM: its SOP Instance UIDs.
    DICOM_INSTANCE_UIDS_ATTRIBUTE = "DICOM.instanceUIDs"

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        #: Asks the user before installing packages; the widget sets a dialog, batch mode logs and installs.
        self.confirmInstall: Optional[Callable[[str], bool]] = None
        #: Installs optional packages (a list of pip requirements); ``None``: Slicer's pip with its shipped
        #: packages pinned (ContrastAmplifierCommon.dependencies.slicer_pip_installer).
        self.installOptional: Optional[Callable[[List[str]], None]] = None
        self._declined = False  # the optional OpenVINO install was declined (without Qt settings to keep it in)

    # -- parameters --------------------------------------------------------------------------

    def getParameterNode(self) -> ContrastAmplifierParameterNode:
        """The module's parameter node (a singleton ``vtkMRMLScriptedModuleNode`` in ``slicer.mrmlScene``), typed.

        Unset parameters get their defaults; ``.parameterNode`` is the MRML node itself.
        """
        return ContrastAmplifierParameterNode(super().getParameterNode())

    def _parameters(self, parameterNode=None) -> ContrastAmplifierParameterNode:
        """Typed parameters of ``parameterNode``: typed already, a module ``vtkMRMLScriptedModuleNode``,
        or ``None`` for :meth:`getParameterNode`."""
        if parameterNode is None:
            return self.getParameterNode()
        if isinstance(parameterNode, ContrastAmplifierParameterNode):
            return parameterNode
        return ContrastAmplifierParameterNode(parameterNode)

    def setDefaultParameters(self, parameterNode) -> None:
        """Fill unset parameters with their defaults (typed parameters or the MRML node; :class:`ContrastAmplifierParameterNode`)."""
        self._parameters(parameterNode)

    def inputNodes(self, parameterNode) -> Dict[str, object]:
        """The four selected input volumes (``None`` where not selected), keyed by file stem.

        ``parameterNode``: typed parameters (:meth:`getParameterNode`) or the module's MRML node.
        """
        parameters = self._parameters(parameterNode)
        return {stem: getattr(parameters, ref) for stem, (ref, _label) in self.INPUTS.items()}

    def validateInputs(self, nodes: Dict[str, object]) -> None:
        """Check that all four inputs are selected, distinct and hold voxels.

        Raises:
            ValueError: names the input and what to do.
        """
        for stem, (_ref, label) in self.INPUTS.items():
            node = nodes.get(stem)
            if node is None:
                raise ValueError(_("No {label} volume selected: choose it in Inputs > {label}.").format(label=label))
            if node.GetImageData() is None:
                raise ValueError(_("{label} volume '{name}' has no voxel data; load the image again.").format(
                    label=label, name=node.GetName()))
        seen: Dict[str, str] = {}
        for stem, (_ref, label) in self.INPUTS.items():
            node_id = nodes[stem].GetID()
            if node_id in seen:
                raise ValueError(_("{first} and {second} are the same volume '{name}'; select a different volume for "
                                   "each input.").format(first=seen[node_id], second=label, name=nodes[stem].GetName()))
            seen[node_id] = label

    def ensureDependencies(self) -> None:
        """Install missing Python packages on first use (asks through :attr:`confirmInstall`); the optional
        OpenVINO is offered after them (:meth:`ensureOptionalDependencies`)."""
        ensure_dependencies(confirm=self.confirmInstall, module_title="Contrast Amplifier")

    # -- the CPU runtime (PyTorch or the optional OpenVINO) -------------------------------------

    @staticmethod
    def _packageInstalled(name: str) -> bool:
        """Whether package ``name`` is installed in this Python (looked up, not imported: cheap)."""
        import importlib.util

        try:
            return importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            return False

    @staticmethod
    def openvinoInstalled() -> bool:
        """Whether the ``openvino`` package is installed in this Python (looked up, not imported: cheap)."""
        return ContrastAmplifierLogic._packageInstalled("openvino")

    @staticmethod
    def nncfInstalled() -> bool:
        """Whether the ``nncf`` package (int8 quantisation) is installed in this Python (looked up, not imported)."""
        return ContrastAmplifierLogic._packageInstalled("nncf")

    def int8MissingPackages(self) -> List[str]:
        """The packages precision int8 needs that are not installed: "OpenVINO", "NNCF" (empty: it can run)."""
        return [name for name, installed in (("OpenVINO", self.openvinoInstalled()), ("NNCF", self.nncfInstalled()))
                if not installed]

    def validatePrecision(self, precision: str = "auto", backend: str = "auto", device: str = "auto") -> None:
        """Refuse a precision that ``backend`` on ``device`` cannot run, before anything is exported or installed.

        int8 follows the command line's rule (ContrastAmplifierLib.ensemble._int8_backend, mirrored here:
        Slicer's Python may not have torch yet): OpenVINO on the CPU only, so a GPU device (cuda, mps, or
        auto when it picks the GPU) and Backend torch are refused.

        Raises:
            ValueError: an unknown precision, or int8 with a GPU or Backend torch (the message names the fix).
        """
        if precision not in self.PRECISIONS:
            raise ValueError(_("Precision must be one of {choices} (got {value!r}).").format(
                choices=", ".join(self.PRECISIONS), value=precision))
        if precision != "int8":
            return
        if self._onGpu(device):
            if device == "auto":
                raise ValueError(_("Precision int8 runs on OpenVINO on the CPU only, and Device auto picks the GPU "
                                   "here: choose Device cpu, or Precision fast (or auto) for the GPU."))
            raise ValueError(_("Precision int8 runs on OpenVINO on the CPU only, not on {device}: choose Device cpu, "
                               "or Precision fast (or auto) for the GPU.").format(device=device))
        if backend == "torch":
            raise ValueError(_("Precision int8 runs on OpenVINO (NNCF quantisation); PyTorch has no int8 path: "
                               "choose Backend auto or openvino, or Precision exact or fast."))

    def resolveBackend(self, backend: str = "auto", device: str = "auto", precision: str = "auto") -> str:
        """The runtime (``"torch"`` or ``"openvino"``) the command line picks for ``backend`` on ``device``:
        ``auto`` is OpenVINO on the CPU when it is installed, PyTorch otherwise and on a GPU. Precision
        int8 always runs on OpenVINO (:meth:`validatePrecision`).

        Raises:
            ValueError: an unknown backend or precision, OpenVINO with a GPU device, or int8 with a GPU
                or Backend torch (named in the message).
        """
        if backend not in self.BACKENDS:
            raise ValueError(_("Backend must be one of {choices} (got {value!r}).").format(
                choices=", ".join(self.BACKENDS), value=backend))
        self.validatePrecision(precision, backend, device)
        if precision == "int8":
            return "openvino"
        gpu = self._onGpu(device)
        if backend == "openvino" and gpu:
            raise ValueError(_("OpenVINO runs on the CPU only: choose Device cpu, or Backend auto or torch for the "
                               "GPU."))
        if backend == "auto":
            return "openvino" if not gpu and self.openvinoInstalled() else "torch"
        return backend

    def backendSummary(self, backend: str = "auto", device: str = "auto", precision: str = "auto") -> str:
        """One line for the panel: which runtime runs skull stripping and the network, and why."""
        try:
            runtime = self.resolveBackend(backend, device, precision)
        except ValueError as exc:
            return str(exc)
        if precision == "int8":
            missing = self.int8MissingPackages()
            if missing:
                return _("int8 on OpenVINO: {packages} not installed: Apply offers to install them (or choose "
                         "Precision exact or fast).").format(packages=_(" and ").join(missing))
            return _("int8 on OpenVINO on the CPU: each fold is quantised once and used only if its check on "
                     "held-out phantoms passes (the first run with a model takes minutes).")
        if backend == "openvino" and not self.openvinoInstalled():
            return _("OpenVINO is not installed: Apply offers to install it (or choose auto or torch).")
        if runtime == "openvino":
            return _("OpenVINO on the CPU.") if backend == "openvino" else _("auto: OpenVINO on the CPU (installed).")
        if backend == "torch":
            return _("PyTorch.")
        if self._onGpu(device):
            return _("auto: PyTorch (on a GPU).")
        return _("auto: PyTorch (OpenVINO, optional and faster on the CPU, is not installed: Apply offers it).")

    def ensureOptionalDependencies(self, backend: str = "auto", device: str = "auto", precision: str = "auto") -> None:
        """Offer to install OpenVINO (optional) when ``backend`` would use it and it is missing.

        ``auto`` never fails for it: a declined (remembered, not asked again) or failed install keeps
        PyTorch. ``openvino`` asks every time and raises when it is still missing afterwards. Precision
        int8 needs OpenVINO and NNCF: whichever is missing is offered every time, and int8 is refused
        while one is still missing.

        Raises:
            ValueError: ``backend`` is "openvino" and OpenVINO could not be installed, or ``precision`` is
                "int8" and OpenVINO or NNCF could not be (names the fix); a setting :meth:`resolveBackend` refuses.
        """
        # an unknown backend or precision, OpenVINO or int8 on a GPU, int8 with torch: refused here
        self.resolveBackend(backend, device, precision)
        if precision == "int8":
            self._ensureInt8Packages()
            return
        if backend == "torch" or self.openvinoInstalled():
            return
        if backend == "auto" and (self._onGpu(device) or self._declinedOpenVINO()):
            return
        asked = []

        def confirm(message: str) -> bool:
            asked.append(message)
            return self.confirmInstall(message) if self.confirmInstall is not None else True

        installed = offer_optional_dependencies(confirm=confirm, installer=self.installOptional,
                                                module_title="Contrast Amplifier")
        if not installed and not self.openvinoInstalled():
            if asked and backend == "auto":
                self._declinedOpenVINO(remember=True)
            if backend == "openvino":
                raise ValueError(_("Backend openvino needs the OpenVINO package, which is not installed (declined or "
                                   "failed: see the log). Choose Backend auto or torch, or install it from the Python "
                                   "console with slicer.util.pip_install('openvino')."))

    def _ensureInt8Packages(self) -> None:
        """Offer what precision int8 is missing of OpenVINO and NNCF (every time), then refuse int8 without them."""
        if not self.int8MissingPackages():
            return
        from ContrastAmplifierCommon import dependencies

        requirements = list(dependencies.OPTIONAL_REQUIREMENTS) + list(dependencies.INT8_REQUIREMENTS)
        offer_optional_dependencies(requirements, confirm=self.confirmInstall, installer=self.installOptional,
                                    module_title="Contrast Amplifier",
                                    without=_("Without them Precision int8 cannot run (exact and fast can)."))
        missing = self.int8MissingPackages()
        if missing:
            raise ValueError(_("Precision int8 needs {packages}, not installed (declined or failed: see the log). "
                               "Choose Precision exact or fast, or install them from the Python console with "
                               "slicer.util.pip_install('openvino nncf').").format(packages=_(" and ").join(missing)))

    def _onGpu(self, device: str) -> bool:
        return device == "mps" or self.resolvePreprocessDevice(device) == "cuda"

    def _declinedOpenVINO(self, remember: bool = False) -> bool:
        """Whether the user declined the optional OpenVINO install (kept in Slicer's settings; ``remember``
        records it). Without Qt (batch, tests) it is remembered for this Logic only."""
        try:
            import qt

            settings = qt.QSettings()
        except (ImportError, AttributeError):
            settings = None
        if remember:
            self._declined = True
            if settings is not None:
                settings.setValue(self.DECLINED_OPENVINO_SETTING, True)
            return True
        if settings is not None and str(settings.value(self.DECLINED_OPENVINO_SETTING, False)).lower() == "true":
            return True
        return self._declined

    # -- preprocessing -----------------------------------------------------------------------

    def preprocessCommand(self, caseDir: Path, outDir: Path, device: str = "cpu", skullStripMode: str = "fast",
                          qualityControl: bool = True, spacing: Optional[float] = None,
                          crop: Optional[Sequence[int]] = None, model: Optional[str] = None,
                          backend: str = "auto") -> List[str]:
        """The ``contrast-amplifier preprocess`` command line run in the child process.

        ``model`` (registry name or bundle folder) preprocesses with that bundle's spacing, crop
        and clip percentiles (``--model``), i.e. what Apply feeds its network. Without it,
        ``spacing`` (mm) and ``crop`` (voxels, x y z) override the paper's 1 mm, 160 x 192 x 160
        geometry (coarse values make quick checks). ``backend``: HD-BET's runtime (``--backend``).

        Raises:
            ValueError: an invalid setting, or ``model`` together with ``spacing``/``crop`` (named in the message).
        """
        if model and (spacing is not None or crop is not None):
            raise ValueError(_("Model {model!r} sets the preprocessing geometry; leave spacing and crop unset to use "
                               "it.").format(model=model))
        device = self.resolvePreprocessDevice(device)
        if device not in self.DEVICES:
            raise ValueError(_("Device must be one of {choices} or auto (got {value!r}).").format(
                choices=", ".join(self.DEVICES), value=device))
        if skullStripMode not in self.SKULL_STRIP_MODES:
            raise ValueError(_("Skull-strip mode must be one of {choices} (got {value!r}).").format(
                choices=", ".join(self.SKULL_STRIP_MODES), value=skullStripMode))
        self.resolveBackend(backend, device)
        args: List[object] = ["preprocess", caseDir, outDir, "--device", device, "--skull-strip", skullStripMode,
                              "--backend", backend, "--progress", "json"]
        if qualityControl:
            args.append("--qc")
        if spacing is not None:
            args += ["--spacing", float(spacing)]
        if crop is not None:
            if len(crop) != 3:
                raise ValueError(_("Crop takes three sizes (x y z), got {crop}.").format(crop=list(crop)))
            args += ["--crop", *(int(size) for size in crop)]
        if model:
            args += ["--model", model]
        return process.python_module_command(self.CLI_MODULE, *args)

    def startPreprocess(self, t1, flair, adc, t1c, device: str = "cpu", skullStripMode: str = "fast",
                        qualityControl: bool = True, workDir: Optional[Path] = None,
                        installDependencies: bool = True, spacing: Optional[float] = None,
                        crop: Optional[Sequence[int]] = None, model: Optional[str] = None,
                        backend: str = "auto") -> BackgroundJob:
        """Export the inputs and start preprocessing in a child process; returns at once.

        ``model``: preprocess with that bundle's geometry (see :meth:`preprocessCommand`).
        ``backend``: HD-BET's runtime (auto, torch, openvino; see :meth:`resolveBackend`).
        Poll ``job.process`` (``poll()``/``running``), then call :meth:`loadPreprocessResults`.
        When the child cannot be started, the exported images are deleted before the error is raised.
        """
        bridge = _bridge()
        nodes = {"t1": t1, "flair": flair, "adc": adc, "t1c": t1c}
        self.validateInputs(nodes)
        if installDependencies:
            self.ensureDependencies()
            self.ensureOptionalDependencies(backend, device)
        runtime = self.resolveBackend(backend, device)
        folder = Path(workDir) if workDir is not None else bridge.ExchangeFolder.create(parent=self._temporaryParent()).path
        outDir = folder / "preprocessed"
        try:  # exported patient images never outlive a child that did not start
            bridge.export_volume_nodes(nodes, folder / "case", suffix=".nrrd")
            command = self.preprocessCommand(folder / "case", outDir, device, skullStripMode, qualityControl, spacing,
                                             crop, model=model, backend=backend)
            logging.info("Contrast Amplifier: running %s", " ".join(command))
            env = process.child_environment(self._childEnv(self.resolvePreprocessDevice(device)))
            child = process.BackgroundProcess(command, env=env).start()
        except BaseException:
            bridge.ExchangeFolder(folder).cleanup()
            raise
        return BackgroundJob(process=child, workDir=folder, outDir=outDir, referenceName=t1c.GetName(), backend=runtime)

    def startPreprocessFromParameters(self, parameterNode=None, **options) -> BackgroundJob:
        """:meth:`startPreprocess` with the panel's choices (Preprocess (QC)); ``options`` go to it."""
        parameters = self._parameters(parameterNode)
        nodes = self.inputNodes(parameters)
        return self.startPreprocess(nodes["t1"], nodes["flair"], nodes["adc"], nodes["t1c"], device=parameters.Device,
                                    skullStripMode=parameters.SkullStripMode,
                                    qualityControl=parameters.QualityControl, model=parameters.Model or None,
                                    backend=parameters.Backend, **options)

    def loadPreprocessResults(self, job: BackgroundJob) -> Dict[str, object]:
        """Load the preprocessed volumes of a finished job as nodes named ``"<T1c> preprocessed <modality>"``.

        Raises:
            process.ProcessError: the child failed (its own error message) or was cancelled.
        """
        bridge = _bridge()
        job.process.raise_for_state()
        for stem, (label, labelMap) in self.PREPROCESS_OUTPUTS.items():
            path = self._find(job.outDir, stem)
            if path is None:
                continue
            job.results[stem] = bridge.import_volume_file(
                path, f"{job.referenceName} preprocessed {label}", label_map=labelMap
            )
        if "t1c" not in job.results:
            raise FileNotFoundError(_("Preprocessing finished but wrote no T1c in {folder}; see the log.").format(
                folder=job.outDir))
        return job.results

    @staticmethod
    def discardJobFiles(job: Optional[BackgroundJob]) -> None:
        """Delete a finished job's exchange folder (exported inputs and outputs: patient data)."""
        if job is not None and not job.process.running:
            _bridge().ExchangeFolder(job.workDir).cleanup()

    def qualityControlImage(self, job: BackgroundJob) -> Optional[Path]:
        """Path of the QC picture (``qc.png``) of a finished job, if it was written."""
        path = job.outDir / "qc.png"
        return path if path.is_file() else None

    def preprocess(self, t1, flair, adc, t1c, device: str = "cpu", skullStripMode: str = "fast",
                   qualityControl: bool = True, progressCallback: Optional[Callable[[process.ProgressEvent], None]] = None,
                   timeout: Optional[float] = None, spacing: Optional[float] = None,
                   crop: Optional[Sequence[int]] = None, keepFiles: bool = False,
                   model: Optional[str] = None, backend: str = "auto") -> Dict[str, object]:
        """Synchronous preprocessing (batch mode): export, run, wait, load; returns the new nodes.

        ``model``: preprocess with that bundle's geometry (see :meth:`preprocessCommand`); ``backend``:
        HD-BET's runtime (:meth:`resolveBackend`).

        With ``keepFiles`` the exchange folder (inputs, outputs, transforms, ``qc.png``) is kept
        and its path is in each result node's ``ContrastAmplifier.Folder`` attribute; otherwise
        it is deleted once the results are loaded.

        Raises:
            ValueError: an input is missing or chosen twice (named in the message).
            process.ProcessError: the command line failed; the message is its own error text.
        """
        job = self.startPreprocess(t1, flair, adc, t1c, device, skullStripMode, qualityControl,
                                   spacing=spacing, crop=crop, model=model, backend=backend)
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

    # -- models: list, describe, add ----------------------------------------------------------

    @staticmethod
    def availableModels() -> list:
        """Model bundles from the registry (``registry.list_models()``): user bundles first, then the shipped demo.

        Needs only the standard library (works before the first-use install); a broken
        ``Models.json`` gives an empty list and a logged warning, never a broken panel.
        """
        try:
            from ContrastAmplifierLib.registry import list_models
        except ImportError as exc:
            logging.warning("Contrast Amplifier: model registry not available (%s)", exc)
            return []
        try:
            return list_models()
        except Exception as exc:  # a broken Models.json must not break the module panel
            logging.warning("Contrast Amplifier: could not list models: %s", exc)
            return []

    @staticmethod
    def defaultModelName() -> Optional[str]:
        """The registry's default model (the shipped demo unless the user set another), or ``None`` when there is none.

        Raises:
            ValueError: the user's chosen default is no longer installed (the message says what to do in the panel).
        """
        from ContrastAmplifierLib.registry import chosen_default_name, default_model_name

        try:
            return default_model_name()
        except ValueError:
            chosen = chosen_default_name()  # an unreadable choice file raises here, naming the file
            if chosen is None:  # nothing shipped, nothing chosen
                return None
            raise ValueError(_("The default model '{name}' is not installed any more: choose a model in Model, or add "
                               "it again with Add model.").format(name=chosen)) from None

    @staticmethod
    def modelSummary(entry) -> str:
        """One line for the model selector's tooltip: name, version, intended use (e.g. "synthetic phantom demo - not for clinical use")."""
        use = entry.intended_use or _("intended use not stated")
        return f"{entry.name} {entry.version}: {use}"

    @staticmethod
    def modelInfo(entry) -> str:
        """The line under the model selector: name, version, geometry (spacing, crop), folds and intended use.

        E.g. "phantom-demo 0.2.0 - 3 mm grid, crop 56 x 64 x 56 voxels - folds 0, 1, 2, 3, 4 - synthetic
        phantom demo - not for clinical use". Read from ``bundle.json`` as plain JSON (no package needed).
        """
        def numbers(values) -> str:
            texts = [f"{value:g}" for value in values]
            return texts[0] if len(set(texts)) == 1 else " x ".join(texts)

        parts = [f"{entry.name} {entry.version}"]
        if entry.spacing:
            parts.append(_("{spacing} mm grid").format(spacing=numbers(entry.spacing)))
        if entry.crop_size:
            parts.append(_("crop {crop} voxels").format(crop=" x ".join(str(size) for size in entry.crop_size)))
        parts.append(_("folds {folds}").format(folds=", ".join(map(str, entry.folds))) if entry.folds else _("no folds listed"))
        parts.append(entry.intended_use or _("intended use not stated"))
        return " - ".join(parts)

    @staticmethod
    def findModel(model: Optional[str] = None):
        """The registry entry of a model: a bundle folder, a registry name, or ``None`` for the default.

        Reads ``bundle.json`` as plain JSON (:func:`ContrastAmplifierLib.registry.read_entry`): no
        package beyond Python's own, so the panel can describe models before the first-use install.
        The full check (schema, hashes, tensors) runs when the model is used.

        Raises:
            ValueError: no such model, or no model installed; the message says how to get one.
        """
        from ContrastAmplifierLib.registry import BUNDLE_FILE, read_entry

        if model and (Path(model) / BUNDLE_FILE).is_file():
            return read_entry(model)
        entries = ContrastAmplifierLogic.availableModels()
        if not entries:
            raise ValueError(_("No model bundle installed: add one with Add model in the Contrast Amplifier panel "
                               "(ContrastAmplifierLogic().importModel(path) from Python), or choose a bundle folder."))
        wanted = model or ContrastAmplifierLogic.defaultModelName()
        matches = [entry for entry in entries if entry.name == wanted]
        if not matches:
            raise ValueError(_("Model {name!r} is not installed (installed: {known}); choose one in Model.").format(
                name=wanted, known=", ".join(entry.name for entry in entries)))
        return matches[0]

    def bundleFolds(self, model: Optional[str] = None) -> List[int]:
        """Fold indices of a bundle, from its ``bundle.json`` read as plain JSON (no weights, no torch, no jsonschema).

        Args:
            model: registry name, bundle folder, or ``None`` for the default model (``models set-default``).

        Raises:
            ValueError: no such model, no model installed, or a manifest without folds; the message says what to do.
        """
        entry = self.findModel(model)
        if not entry.folds:
            raise ValueError(_("Model '{name}' lists no folds in {path}; add the model again or choose another one.").format(
                name=entry.name, path=Path(entry.path) / "bundle.json"))
        return list(entry.folds)

    def importModel(self, source, overwrite: bool = False, installDependencies: bool = True):
        """Add a model bundle (a folder, its ``bundle.json``, or a ``.zip``) to the per-user models folder.

        Every file is checked first (manifest, SHA-256, tensors: ``registry.import_model``), which
        needs the first-use packages (jsonschema, safetensors, torch): they are installed first.

        Returns:
            The registry entry of the added model.

        Raises:
            ContrastAmplifierLib.registry.ModelAlreadyInstalledError: that name is installed and ``overwrite`` is False.
            ContrastAmplifierLib.bundle.BundleError: the bundle was refused (the message names the file and why).
        """
        if installDependencies:
            self.ensureDependencies()
        from ContrastAmplifierLib.registry import import_model, read_entry

        bundle = import_model(Path(source), overwrite=overwrite)
        return read_entry(bundle.path, "user")

    def addModel(self, source, confirmReplace: Optional[Callable[[str], bool]] = None,
                 installDependencies: bool = True) -> Tuple[object, str]:
        """What the panel's Add model button does: :meth:`importModel`, with messages for the user.

        A model of the same name is replaced only when ``confirmReplace(question)`` says yes.

        Returns:
            ``(entry, message)``: the added model's registry entry (``None`` when nothing was added)
            and the text to show (success, or why it was not added: a tampered file is named with its SHA-256).
        """
        from ContrastAmplifierLib.registry import ModelAlreadyInstalledError

        try:
            try:
                entry = self.importModel(source, installDependencies=installDependencies)
            except ModelAlreadyInstalledError as exc:
                question = _("A model named '{name}' is already installed ({path}). Replace it with the one in "
                             "{source}?").format(name=exc.name, path=exc.path, source=source)
                if confirmReplace is None or not confirmReplace(question):
                    return None, _("The model was not added: '{name}' is installed already and was kept.").format(
                        name=exc.name)
                entry = self.importModel(source, overwrite=True, installDependencies=False)
        except (ValueError, OSError, RuntimeError) as exc:  # BundleError, DependencyError, unreadable files
            return None, _("The model was not added.\n\n{reason}").format(reason=exc)
        return entry, _("Added model {info}.").format(info=self.modelInfo(entry))

    # -- amplification (T1c -> T1c-pro) -----------------------------------------------------

    @staticmethod
    def qualityPreset(quality: str) -> QualityPreset:
        """The :class:`QualityPreset` for ``"quick"``, ``"balanced"`` or ``"paper"`` (any case).

        Raises:
            ValueError: unknown name; the message lists the choices.
        """
        preset = QUALITY_PRESETS.get(str(quality).strip().lower())
        if preset is None:
            choices = ", ".join(p.label for p in QUALITY_PRESETS.values())
            raise ValueError(_("Quality must be one of {choices} (got {value!r}).").format(choices=choices, value=quality))
        return preset

    def ensembleChoice(self, quality: str = "paper", model: Optional[str] = None, folds: Optional[Sequence[int]] = None,
                       flips: Optional[int] = None) -> tuple:
        """``(folds or None for all, flips)`` for a quality preset; explicit ``folds``/``flips`` win.

        Raises:
            ValueError: unknown quality, or a mirroring count other than 1, 2, 4, 8.
        """
        preset = self.qualityPreset(quality)
        chosenFlips = preset.flips if flips is None else int(flips)
        if chosenFlips not in self.MIRRORINGS:
            raise ValueError(_("Mirrorings must be one of {choices} (got {value}).").format(
                choices=", ".join(map(str, self.MIRRORINGS)), value=flips))
        if folds is not None:
            return [int(k) for k in folds], chosenFlips
        if preset.allFolds:
            return None, chosenFlips
        return self.bundleFolds(model)[:1], chosenFlips

    def predictCommand(self, inputs: Dict[str, Path], outPath: Path, model: Optional[str] = None,
                       folds: Optional[Sequence[int]] = None, flips: int = 8, device: str = "auto",
                       precision: str = "auto", brainMask: Optional[Path] = None,
                       threads: Optional[int] = None, dicomOutput: Optional[Path] = None,
                       t1cDicom: Optional[Path] = None, sendTo: Optional[str] = None,
                       backend: str = "auto") -> List[str]:
        """The ``contrast-amplifier predict ... --progress json`` command line run in the child process.

        Args:
            inputs: file stem (t1, flair, adc, t1c) -> exported image file.
            outPath: the T1c-pro file to write.
            model: registry name or bundle folder (``None``: the registry's default).
            folds: fold models to average (``None``: all).
            flips: mirrorings per fold.
            device: auto, cpu, cuda or mps.
            precision: auto, exact (fp32), fast (bf16) or int8 (OpenVINO on the CPU; :meth:`validatePrecision`;
                with device auto the child is told cpu).
            brainMask: brain mask on the T1c grid (skips HD-BET).
            threads: CPU threads of the child (default: all cores).
            dicomOutput: also write T1c-pro as a DICOM MR series into this new or empty folder (``--out-dicom``).
            t1cDicom: the DICOM series folder the T1c came from (``--t1c-dicom``): the series joins the
                T1c's study; without it the series makes a new de-identified study. Needs ``dicomOutput``.
            sendTo: send the series to this PACS after writing it (``--send``): a URL or an endpoint name
                of the PACS configuration file. Needs ``dicomOutput``.
            backend: runtime of HD-BET and the ensemble (``--backend``): auto, torch or openvino (CPU only).

        Raises:
            ValueError: an input file is missing or a setting is invalid (named in the message).
        """
        if t1cDicom is not None and dicomOutput is None:
            raise ValueError(_("The T1c's DICOM series is only used for a DICOM output; choose a DICOM output folder "
                               "or leave it out."))
        if sendTo and dicomOutput is None:
            raise ValueError(_("Sending to a PACS needs a DICOM series: give a DICOM output folder too."))
        if device not in self.PREDICT_DEVICES:
            raise ValueError(_("Device must be one of {choices} (got {value!r}).").format(
                choices=", ".join(self.PREDICT_DEVICES), value=device))
        if int(flips) not in self.MIRRORINGS:
            raise ValueError(_("Mirrorings must be one of {choices} (got {value}).").format(
                choices=", ".join(map(str, self.MIRRORINGS)), value=flips))
        self.resolveBackend(backend, device, precision)  # also refuses an unknown precision, int8 on a GPU or torch
        if precision == "int8" and device == "auto":
            # auto found no GPU (a GPU was refused above); the child's own auto would pick Apple's MPS, where
            # int8 cannot run, so it is told the CPU outright.
            device = "cpu"
        args: List[object] = ["predict"]
        for stem in self.INPUTS:
            if stem not in inputs:
                raise ValueError(_("No {label} file for the command line; export all four inputs first.").format(
                    label=self.INPUTS[stem][1]))
            args += [f"--{stem}", inputs[stem]]
        args += ["--out", outPath]
        if model:
            args += ["--model", model]
        for fold in folds or ():
            args += ["--folds", int(fold)]
        args += ["--flips", int(flips), "--device", device, "--precision", precision, "--backend", backend]
        if brainMask is not None:
            args += ["--brain-mask", brainMask]
        if threads is not None:
            args += ["--threads", int(threads)]
        if dicomOutput is not None:
            args += ["--out-dicom", dicomOutput]
        if t1cDicom is not None:
            args += ["--t1c-dicom", t1cDicom]
        if sendTo:
            args += ["--send", sendTo]
        args += ["--progress", "json"]
        return process.python_module_command(self.CLI_MODULE, *args)

    def validateBrainMask(self, brainMask, t1c) -> None:
        """Check an optional brain mask lies on the T1c grid (the command line uses it voxel for voxel).

        Raises:
            ValueError: names the mask and the fix.
        """
        if brainMask is None:
            return
        if brainMask.GetImageData() is None:
            raise ValueError(_("Brain mask '{name}' has no voxel data; load it again or clear the selector.").format(
                name=brainMask.GetName()))
        if brainMask.GetID() == t1c.GetID():
            raise ValueError(_("Brain mask and T1c are the same volume; select a mask or clear the Brain mask selector."))
        maskDims, t1cDims = brainMask.GetImageData().GetDimensions(), t1c.GetImageData().GetDimensions()
        sameGrid = tuple(maskDims) == tuple(t1cDims)
        if sameGrid:
            import numpy as np

            bridge = _bridge()
            sameGrid = np.allclose(bridge.ijk_to_ras_matrix(brainMask), bridge.ijk_to_ras_matrix(t1c), atol=1e-3)
        if not sameGrid:
            raise ValueError(_(
                "Brain mask '{mask}' ({maskSize}) is not on the grid of T1c '{t1c}' ({t1cSize}); resample it onto the "
                "T1c (Resample Image (BRAINS) with the T1c as reference) or clear the selector to let HD-BET compute one."
            ).format(mask=brainMask.GetName(), maskSize="x".join(map(str, maskDims)), t1c=t1c.GetName(),
                     t1cSize="x".join(map(str, t1cDims))))

    # -- DICOM output: the T1c's own series, the output folder, the DICOM database -------------

    @staticmethod
    def dicomFolder(value) -> Optional[Path]:
        """A DICOM output folder as an absolute path; ``None`` for no DICOM output.

        ``None``, ``""`` and ``"."`` mean none: ``"."`` is what an empty path parameter holds
        (``Path("")`` is ``Path(".")``), never a folder chosen in the panel.
        """
        if value is None or str(value).strip() in ("", "."):
            return None
        return Path(os.path.abspath(os.path.expanduser(str(value))))

    def dicomSeriesFolder(self, parent, t1c) -> Path:
        """A new (or empty) series folder for one Apply: ``<parent>/<T1c name> T1c-pro``, then `` 2``, `` 3``...

        The command line writes a series only into a new or empty folder, and a PACS import takes
        every file of a folder, so each Apply of the panel gets its own sub-folder.
        """
        base = Path(parent) / (re.sub(r"[^\w .-]+", "_", self.resultName(t1c)).strip(" .") or self.RESULT_SUFFIX)
        candidate, number = base, 1
        while candidate.exists() and (not candidate.is_dir() or any(candidate.iterdir())):
            number += 1
            candidate = base.with_name(f"{base.name} {number}")
        return candidate

    def t1cDicomFiles(self, t1c, database=None) -> Tuple[List[Path], str]:
        """The DICOM files the T1c volume was loaded from, found through Slicer's DICOM database.

        Slicer's DICOM plugin lists the SOP Instance UIDs of a loaded volume in the node attribute
        ``DICOM.instanceUIDs``; ``database.fileForInstance(uid)`` names each file.

        Args:
            t1c: the T1c volume node.
            database: the DICOM database (``None``: ``slicer.dicomDatabase`` where there is one).

        Returns:
            ``(files, "")`` when every instance has a file, else ``([], why not)``.
        """
        name = t1c.GetName()
        uids = (t1c.GetAttribute(self.DICOM_INSTANCE_UIDS_ATTRIBUTE) or "").split()
        if not uids:
            return [], _("T1c '{name}' was not loaded from DICOM").format(name=name)
        if t1c.GetParentTransformNode() is not None:
            return [], _("T1c '{name}' is under a transform, so it is not on the grid of its DICOM series").format(name=name)
        if database is None:
            database = getattr(slicer, "dicomDatabase", None)
        if database is None:
            return [], _("Slicer's DICOM database is not available")
        isOpen = getattr(database, "isOpen", True)
        if not (isOpen() if callable(isOpen) else isOpen):
            return [], _("Slicer's DICOM database is not open")
        files: List[Path] = []
        missing = 0
        for uid in uids:
            try:
                found = database.fileForInstance(uid)
            except Exception:  # a database that cannot answer: counted as not found
                found = ""
            path = Path(found) if found else None
            if path is None or not path.is_file():
                missing += 1
            elif path not in files:
                files.append(path)
        if missing:
            return [], _("{missing} of {total} DICOM files of T1c '{name}' were not found through the DICOM database").format(
                missing=missing, total=len(uids), name=name)
        return files, ""

    def copyT1cDicom(self, t1c, folder: Path, database=None) -> Tuple[Optional[Path], str]:
        """Copy the T1c's DICOM files (:meth:`t1cDicomFiles`) into ``folder``, for ``--t1c-dicom``.

        Returns:
            ``(folder, "")``, or ``(None, why not)`` when they are not all available (nothing is copied).
        """
        import shutil

        files, why = self.t1cDicomFiles(t1c, database)
        if not files:
            return None, why
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for index, path in enumerate(files):
            shutil.copyfile(path, folder / f"IM{index + 1:05d}.dcm")
        return folder, ""

    @staticmethod
    def importDicomSeries(folder: Path) -> bool:
        """Add a DICOM series folder to Slicer's DICOM database (``DICOMLib.DICOMUtils.importDicom``).

        Returns:
            False where DICOMLib or the database is missing (batch mode, tests) or the import failed (logged).
        """
        try:
            from DICOMLib import DICOMUtils
        except ImportError:
            logging.info("Contrast Amplifier: DICOMLib is not available; %s was not added to a DICOM database.", folder)
            return False
        if getattr(slicer, "dicomDatabase", None) is None:
            logging.info("Contrast Amplifier: no DICOM database; %s was not added to it.", folder)
            return False
        try:
            imported = DICOMUtils.importDicom(str(folder))  # False (and an error in the log) when it failed
        except Exception as exc:  # the series is written all the same: say so, do not fail the job
            logging.warning("Contrast Amplifier: could not add %s to the DICOM database: %s", folder, exc)
            return False
        return imported is not False

    def dicomSummary(self, job: AmplifyJob) -> str:
        """What happened to the DICOM series of a finished job, for the status line ("" without one)."""
        if job.dicomOutput is None:
            return ""
        study = _("the T1c's study") if job.t1cDicom is not None else (
            _("a new de-identified study: {why}").format(why=job.t1cDicomNote) if job.t1cDicomNote
            else _("a new de-identified study"))
        if job.keepDicom:
            details = _("{study}; added to the DICOM database").format(study=study) if job.importedToDatabase else study
            text = _("DICOM series in {folder} ({details})").format(folder=job.dicomOutput, details=details)
        else:
            text = _("DICOM series ({study})").format(study=study)
        if job.sendTo and job.sendError:
            text += _(" NOT sent to {target}: {error}").format(target=job.sendTo, error=job.sendError)
        elif job.sendTo:
            text += _(" sent to {target}").format(target=job.sendTo)
        return text + "."

    def startAmplify(self, t1, flair, adc, t1c, output=None, model: Optional[str] = None, quality: str = "paper",
                     device: str = "auto", precision: str = "auto", brainMask=None,
                     folds: Optional[Sequence[int]] = None, flips: Optional[int] = None,
                     threads: Optional[int] = None, workDir: Optional[Path] = None,
                     installDependencies: bool = True, showResult: bool = True, dicomOutput: Optional[Path] = None,
                     sendTo: Optional[str] = None, importToDatabase: bool = False, backend: str = "auto") -> AmplifyJob:
        """Export the inputs and start ``contrast-amplifier predict`` in a child process; returns at once.

        Poll with :meth:`pollAmplify` (e.g. from a ``qt.QTimer``) until it returns True. No
        output node is created or modified before the result file exists. When the child cannot
        be started, the exported images are deleted before the error is raised.

        ``dicomOutput`` (a new or empty folder; ``None``: none) also writes T1c-pro as a DICOM MR
        series: in the T1c's study when the T1c was loaded from DICOM and its files are in Slicer's
        DICOM database (:meth:`copyT1cDicom`), else in a new de-identified study. ``sendTo`` (a
        PACS URL or endpoint name) sends that series; without ``dicomOutput`` it is written into the
        exchange folder only to be sent. ``importToDatabase`` adds the ``dicomOutput`` series to
        Slicer's DICOM database after success (:meth:`importDicomSeries`). ``backend`` (auto, torch,
        openvino) is the runtime of HD-BET and the ensemble; the optional OpenVINO is offered first
        where it would be used (:meth:`ensureOptionalDependencies`); precision int8 (OpenVINO + NNCF on
        the CPU) is checked (:meth:`validatePrecision`) and its packages offered the same way.

        Raises:
            ValueError: a missing, duplicate or mismatched input, or an invalid setting (named).
        """
        bridge = _bridge()
        nodes = {"t1": t1, "flair": flair, "adc": adc, "t1c": t1c}
        self.validateInputs(nodes)
        self.validateBrainMask(brainMask, t1c)
        if output is not None and output.GetID() in {n.GetID() for n in nodes.values()}:
            raise ValueError(_("Output volume '{name}' is one of the inputs; choose 'Create new volume' or another "
                               "volume in T1c-pro output.").format(name=output.GetName()))
        self.resolveBackend(backend, device, precision)  # a refused setting (int8 on a GPU ...) before any install
        if installDependencies:
            self.ensureDependencies()
            self.ensureOptionalDependencies(backend, device, precision)
        runtime = self.resolveBackend(backend, device, precision)
        chosenFolds, chosenFlips = self.ensembleChoice(quality, model, folds, flips)
        dicomFolder = self.dicomFolder(dicomOutput)
        sendTo = (sendTo or "").strip() or None
        folder = Path(workDir) if workDir is not None else bridge.ExchangeFolder.create(parent=self._temporaryParent()).path
        try:  # exported patient images never outlive a child that did not start
            # NRRD keeps the T1c geometry in double precision, so T1c-pro lands exactly on its grid.
            files = bridge.export_volume_nodes(nodes, folder / "case", suffix=".nrrd")
            maskFile = None
            if brainMask is not None:
                maskFile = bridge.export_volume_node(brainMask, folder / "case" / "brain_mask.nrrd")
            outputPath = folder / "result" / "t1c_pro.nrrd"
            outputPath.parent.mkdir(parents=True, exist_ok=True)
            # only to be sent: the series lives in the exchange folder and goes with it
            seriesFolder = dicomFolder if dicomFolder is not None or not sendTo else outputPath.parent / "dicom"
            t1cDicom, t1cDicomNote = None, ""
            if seriesFolder is not None:
                t1cDicom, t1cDicomNote = self.copyT1cDicom(t1c, folder / "case" / "t1c_dicom")
                if t1cDicom is None:
                    logging.info("Contrast Amplifier: the T1c-pro DICOM series makes a new de-identified study: %s.",
                                 t1cDicomNote)
            command = self.predictCommand(files, outputPath, model=model or None, folds=chosenFolds, flips=chosenFlips,
                                          device=device, precision=precision, brainMask=maskFile, threads=threads,
                                          dicomOutput=seriesFolder, t1cDicom=t1cDicom, sendTo=sendTo, backend=backend)
            logging.info("Contrast Amplifier: running %s", " ".join(command))
            child = process.BackgroundProcess(command, env=process.child_environment(self._childEnv(device))).start()
        except BaseException:
            bridge.ExchangeFolder(folder).cleanup()
            raise
        return AmplifyJob(process=child, workDir=folder, outDir=outputPath.parent, referenceName=t1c.GetName(),
                          outputPath=outputPath, t1cNode=t1c, outputNode=output, command=command, showResult=showResult,
                          dicomOutput=seriesFolder, keepDicom=dicomFolder is not None, sendTo=sendTo, t1cDicom=t1cDicom,
                          t1cDicomNote=t1cDicomNote, importToDatabase=importToDatabase and dicomFolder is not None,
                          backend=runtime, precision=precision)

    def startAmplifyFromParameters(self, parameterNode=None, **options) -> AmplifyJob:
        """:meth:`startAmplify` with the panel's choices (what Apply runs); ``options`` go to it.

        The output is the chosen T1c-pro volume, or - the selector on "Create new volume" - a new
        ``"<T1c name> T1c-pro"`` volume. :meth:`finishAmplify` puts the selector back to "Create new
        volume", so each Apply (each patient) gets its own volume unless the user picks one again.

        With a DICOM output folder, each Apply writes its series into a new sub-folder of it
        (:meth:`dicomSeriesFolder`) and adds that to Slicer's DICOM database; with a PACS target
        the series is sent there. ``dicomOutput``, ``sendTo`` and ``importToDatabase`` in
        ``options`` take the place of those parameters.
        """
        parameters = self._parameters(parameterNode)
        nodes = self.inputNodes(parameters)
        if "dicomOutput" not in options:
            parent = self.dicomFolder(parameters.DicomOutputFolder)
            options["dicomOutput"] = (self.dicomSeriesFolder(parent, nodes["t1c"])
                                      if parent is not None and nodes["t1c"] is not None else parent)
        options.setdefault("sendTo", parameters.PacsTarget or None)
        options.setdefault("importToDatabase", True)
        return self.startAmplify(nodes["t1"], nodes["flair"], nodes["adc"], nodes["t1c"],
                                 output=parameters.OutputVolume, model=parameters.Model or None,
                                 quality=parameters.Quality, device=parameters.Device, precision=parameters.Precision,
                                 brainMask=parameters.InputBrainMask, backend=parameters.Backend, **options)

    def finishAmplify(self, job: AmplifyJob, parameterNode=None):
        """The end of an Apply: load the result (:meth:`pollAmplify`), then reset the output choice.

        On success the parameter node's OutputVolume goes back to ``None`` ("Create new volume"):
        the next Apply, usually on another patient, makes its own ``"<T1c name> T1c-pro"`` volume
        instead of overwriting this one.

        Returns:
            The T1c-pro node, or ``None`` (``job.error`` says why).
        """
        self.pollAmplify(job)
        if job.result is not None and parameterNode is not None:
            self._parameters(parameterNode).OutputVolume = None
        return job.result

    def resultName(self, t1c) -> str:
        """``"<T1c name> T1c-pro"``."""
        return f"{t1c.GetName()} {self.RESULT_SUFFIX}"

    def loadAmplifyResult(self, job: AmplifyJob):
        """Load T1c-pro of a finished job into ``job.outputNode`` or a new node ``"<T1c name> T1c-pro"``.

        The file is on the T1c's grid in world (RAS) coordinates, so the node gets no parent
        transform; its geometry equals the T1c's. The node joins the T1c's study in the subject
        hierarchy, and (``job.showResult``) is shown next to the T1c (:meth:`showSideBySide`).
        A new node's name is made unique when that T1c already has a T1c-pro.

        When only sending the DICOM series failed (:meth:`sendFailedAfterWriting`), the result
        is loaded and ``job.sendError`` holds the command line's message.

        Raises:
            process.ProcessCancelled: the job was cancelled (nothing is created).
            process.ProcessError: the command line failed; the message is its own error text.
        """
        if self.sendFailedAfterWriting(job):
            job.sendError = job.process.error_message()
            logging.error("Contrast Amplifier: T1c-pro was written but not sent to %s: %s", job.sendTo, job.sendError)
        else:
            job.process.raise_for_state()
        scene = job.t1cNode.GetScene()
        if job.outputNode is not None:
            name = job.outputNode.GetName()
        else:
            name = self.resultName(job.t1cNode)
            if scene is not None and scene.GetFirstNodeByName(name) is not None:
                name = scene.GenerateUniqueName(name)
        node = _bridge().import_volume_file(job.outputPath, name, scene=scene, node=job.outputNode)
        if node.GetParentTransformNode() is not None:
            node.SetAndObserveTransformNodeID(None)
        node.SetAttribute("ContrastAmplifier.Source", job.t1cNode.GetID())
        node.SetAttribute("ContrastAmplifier.Command", " ".join(job.command[3:]))
        self.placeInStudyOf(node, job.t1cNode)
        if job.showResult:
            self.showSideBySide(job.t1cNode, node)
        job.result = node
        return node

    @staticmethod
    def sendFailedAfterWriting(job: AmplifyJob) -> bool:
        """Whether a failed job wrote T1c-pro and its DICOM series and only the PACS send failed.

        The command line writes the T1c-pro file and the series together (both or neither, the file
        atomically) before it sends, so a failure with both on disk is the send's.
        """
        if job.process.state is not process.ProcessState.FAILED or not job.sendTo or job.dicomOutput is None:
            return False
        series = job.dicomOutput
        return job.outputPath is not None and job.outputPath.is_file() and series.is_dir() and any(series.iterdir())

    def pollAmplify(self, job: AmplifyJob) -> bool:
        """Forward new progress (``job.process.on_progress``) and, once the child has ended, finish the job.

        Finishing loads the result (success) or records ``job.error`` (failure, cancel), adds the
        user's DICOM series to the DICOM database (``job.importToDatabase``), then deletes the
        exchange folder (exported patient data). Never blocks.

        Returns:
            True when the job is finished (``job.result`` or ``job.error`` is set).
        """
        job.process.poll()
        if job.process.running:
            return False
        if job.result is None and job.error is None:
            try:
                self.loadAmplifyResult(job)
                if job.importToDatabase and job.keepDicom and job.dicomOutput is not None:
                    job.importedToDatabase = self.importDicomSeries(job.dicomOutput)
            except Exception as exc:
                job.error = str(exc) or type(exc).__name__
            finally:
                self.discardJobFiles(job)
        return True

    def cancelJob(self, job: Optional[BackgroundJob], wait: bool = False) -> None:
        """Stop a running job (terminate, then kill after :attr:`CANCEL_GRACE_S`).

        With ``wait`` it blocks until the child is gone and deletes the job's files; otherwise
        the next :meth:`pollAmplify` (or timer tick) finishes it, so a GUI never waits.
        """
        if job is None:
            return
        job.process.cancel(grace_s=self.CANCEL_GRACE_S, wait=wait)
        if wait:
            if isinstance(job, AmplifyJob):
                self.pollAmplify(job)
            else:
                self.discardJobFiles(job)

    def process(self, t1, flair, adc, t1c, output=None, model: Optional[str] = None, quality: str = "paper",
                device: str = "auto", precision: str = "auto", synchronous: bool = True,
                progress: Optional[Callable] = None, brainMask=None,
                folds: Optional[Sequence[int]] = None, flips: Optional[int] = None, threads: Optional[int] = None,
                cancel=None, timeout: Optional[float] = None, installDependencies: bool = True,
                showResult: bool = True, dicomOutput: Optional[Path] = None, sendTo: Optional[str] = None,
                importToDatabase: bool = False, backend: str = "auto"):
        """Amplify the contrast of one case: T1, T2-FLAIR, ADC and T1c nodes in, T1c-pro node out.

        Runs ``contrast-amplifier predict`` in a child process (Slicer's GUI and Python stay
        free); usable from the Python console and batch mode (``Slicer --no-main-window
        --python-script``).

        Args:
            t1, flair, adc, t1c: scalar volume nodes (any grids; T1c-pro is computed on the T1c's).
            output: volume node to overwrite; ``None`` creates ``"<T1c name> T1c-pro"`` (only on success).
            model: registry name or bundle folder; ``None`` = the default model (``contrast-amplifier models list`` marks it).
            quality: ``"quick"`` (1 fold x 1 mirroring), ``"balanced"`` (all folds x 2) or ``"paper"`` (all x 8).
            device: auto, cpu, cuda or mps.
            precision: auto (bf16 on CUDA, fp32 on CPU), exact (fp32), fast (bf16) or int8 (OpenVINO + NNCF on
                the CPU: each fold quantised once, used only if its check on held-out phantoms passes, else
                the run fails with the numbers; the first run with a model takes minutes).
            synchronous: wait and return the node; otherwise return the running :class:`AmplifyJob`
                at once and call :meth:`pollAmplify` (e.g. from a ``qt.QTimer``) until it returns True.
            progress: called with each :class:`ContrastAmplifierCommon.process.ProgressEvent`
                (``stage``, ``fraction`` of the whole job, ``message``).
            brainMask: optional brain mask on the T1c grid; skips HD-BET skull stripping.
            folds, flips: override the quality preset (e.g. ``folds=[0], flips=1``).
            threads: CPU threads of the child (default: all cores).
            cancel: a :class:`ContrastAmplifierCommon.progress.CancelToken` checked while waiting (synchronous only).
            timeout: seconds before a synchronous run is cancelled and ``TimeoutError`` raised.
            installDependencies: install missing Python packages first (asks in the GUI).
            showResult: show T1c-pro next to the T1c, linked, with its window/level (:meth:`showSideBySide`).
            dicomOutput: also write T1c-pro as a DICOM MR series into this new or empty folder; in the
                T1c's study when the T1c was loaded from DICOM (its files in Slicer's DICOM database),
                else in a new de-identified study (``job.t1cDicomNote`` and the log say why).
            sendTo: send the series to this PACS (URL or endpoint name of the PACS configuration file);
                without ``dicomOutput`` the series is written to the exchange folder only to be sent.
            importToDatabase: add the ``dicomOutput`` series to Slicer's DICOM database (where there is one).
            backend: runtime of HD-BET and the ensemble: auto (OpenVINO on the CPU when installed), torch
                or openvino (:meth:`resolveBackend`).

        Returns:
            The T1c-pro volume node (synchronous) or the :class:`AmplifyJob` (asynchronous).

        Raises:
            ValueError: an input is missing, chosen twice, or a setting is invalid (named in the message).
            process.ProcessCancelled: cancelled through ``cancel``; no node and no file are left.
            process.ProcessError: the command line failed; the message is its own error text. When
                only sending to the PACS failed, T1c-pro is loaded (and its series kept) first.
        """
        import time

        job = self.startAmplify(t1, flair, adc, t1c, output=output, model=model, quality=quality, device=device,
                                precision=precision, brainMask=brainMask, folds=folds, flips=flips, threads=threads,
                                installDependencies=installDependencies, showResult=showResult, dicomOutput=dicomOutput,
                                sendTo=sendTo, importToDatabase=importToDatabase, backend=backend)
        job.process.on_progress = progress
        if not synchronous:
            return job
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while not self.pollAmplify(job):
                if cancel is not None and cancel.cancelled:
                    self.cancelJob(job, wait=True)
                    break
                if deadline is not None and time.monotonic() > deadline:
                    self.cancelJob(job, wait=True)
                    raise TimeoutError(_("Contrast amplification ran past {seconds} s and was stopped; choose a quicker "
                                         "quality or a GPU device.").format(seconds=timeout))
                time.sleep(0.1)
        except BaseException:
            self.cancelJob(job, wait=True)
            self.discardJobFiles(job)
            raise
        if job.result is None:
            job.process.raise_for_state()  # the command line's own message (or "Cancelled by the user.")
            raise process.ProcessError(job.error or _("Contrast amplification produced no result; see the log."))
        if job.sendError:
            raise process.ProcessError(_("T1c-pro '{name}' was computed and loaded, but not sent to {target}: {error}").format(
                name=job.result.GetName(), target=job.sendTo, error=job.sendError))
        return job.result

    # -- showing the result ------------------------------------------------------------------

    @staticmethod
    def placeInStudyOf(node, reference) -> None:
        """Put ``node`` in the subject hierarchy under ``reference``'s parent item (the T1c's study).

        Nothing happens when ``reference`` has no subject-hierarchy item.
        """
        scene = reference.GetScene()
        shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene) if scene is not None else None
        if shNode is None:
            return
        referenceItem = shNode.GetItemByDataNode(reference)
        if not referenceItem:
            return
        parentItem = shNode.GetItemParent(referenceItem)
        item = shNode.GetItemByDataNode(node)
        if item:
            shNode.SetItemParent(item, parentItem)
        else:
            shNode.CreateItem(parentItem, node)

    @staticmethod
    def _sliceCompositeNode(scene, layoutName: str):
        """The slice-composite node of the view ``layoutName`` ("Red", "Yellow", ...), or ``None``."""
        nodes = scene.GetNodesByClass("vtkMRMLSliceCompositeNode")
        nodes.UnRegister(scene)  # GetNodesByClass hands over a reference (as slicer.util.getNodesByClass does)
        for index in range(nodes.GetNumberOfItems()):
            node = nodes.GetItemAsObject(index)
            if node.GetLayoutName() == layoutName:
                return node
        return None

    def showSideBySide(self, t1c, t1cPro) -> None:
        """Show T1c (left) and T1c-pro (right) side by side, linked, T1c-pro with the T1c's window/level.

        Works on the scene's layout and slice-composite nodes (present in the application; absent
        in batch mode, where only the window/level is copied); views are fitted when the
        application's layout manager is there.
        """
        # T1c-pro is on the T1c's intensity scale: the same window shows the gain in enhancement.
        source, target = t1c.GetDisplayNode(), t1cPro.GetDisplayNode()
        if source is not None and target is not None:
            target.SetAutoWindowLevel(False)
            target.SetWindowLevel(source.GetWindow(), source.GetLevel())
        scene = t1c.GetScene()
        if scene is None:
            return
        layoutNode = scene.GetFirstNodeByClass("vtkMRMLLayoutNode")
        if layoutNode is not None:
            layoutNode.SetViewArrangement(slicer.vtkMRMLLayoutNode.SlicerLayoutSideBySideView)
        app = getattr(slicer, "app", None)
        layoutManager = app.layoutManager() if app is not None and hasattr(app, "layoutManager") else None
        for viewName, volume in (("Red", t1c), ("Yellow", t1cPro)):
            compositeNode = self._sliceCompositeNode(scene, viewName)
            if compositeNode is None:
                continue
            compositeNode.SetBackgroundVolumeID(volume.GetID())
            compositeNode.SetForegroundVolumeID(None)
            compositeNode.SetLabelVolumeID(None)
            # Linked after the volumes are set (programmatic changes are not broadcast), so
            # browsing, zooming and panning one view moves the other.
            compositeNode.SetLinkedControl(True)
            sliceWidget = layoutManager.sliceWidget(viewName) if layoutManager is not None else None
            if sliceWidget is not None:
                sliceWidget.sliceLogic().FitSliceToAll()

    # -- sample data ---------------------------------------------------------------------------

    def loadPhantomSample(self, seed: int = PHANTOM_SEED, spacing: float = PHANTOM_SPACING_MM, scene=None,
                          installDependencies: bool = True, selectInputs: bool = True) -> Dict[str, object]:
        """Generate a synthetic phantom case and load it: T1, T2-FLAIR, ADC, T1c and the 4x-dose T1c truth.

        SYNTHETIC, NOT CLINICAL DATA (ContrastAmplifierLib.phantom): lets anyone try the module
        without their own MRI. The files are generated in a temporary folder, loaded as volumes
        "Phantom <sequence>" in one study of the subject hierarchy ("Synthetic phantom <seed>"),
        and the folder is deleted. With ``selectInputs`` the four inputs are selected in the
        module's parameter node.

        Returns:
            file stem (t1, flair, adc, t1c, t1c_x4) -> volume node.
        """
        if installDependencies:
            self.ensureDependencies()
        from ContrastAmplifierLib.phantom import generate_case

        bridge = _bridge()
        scene = scene if scene is not None else slicer.mrmlScene
        folder = bridge.ExchangeFolder.create(prefix="ContrastAmplifierPhantom-", parent=self._temporaryParent())
        try:
            generate_case(folder.path / "case", seed=seed, spacing=spacing)
            nodes = {stem: bridge.import_volume_file(folder.path / "case" / f"{stem}.nii.gz", f"Phantom {label}", scene=scene)
                     for stem, label in self.PHANTOM_VOLUMES.items()}
        finally:
            folder.cleanup()
        shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
        if shNode is not None:
            subject = shNode.CreateSubjectItem(shNode.GetSceneItemID(), _("Synthetic phantom {seed}").format(seed=seed))
            study = shNode.CreateStudyItem(subject, _("Contrast Amplifier sample ({spacing:g} mm, not clinical data)").format(
                spacing=spacing))
            for node in nodes.values():
                item = shNode.GetItemByDataNode(node)
                if item:
                    shNode.SetItemParent(item, study)
                else:
                    shNode.CreateItem(study, node)
        for node in nodes.values():
            node.SetAttribute("ContrastAmplifier.Synthetic", "phantom seed {}".format(seed))
        if selectInputs:
            parameters = self.getParameterNode()
            for stem, (ref, _label) in self.INPUTS.items():
                setattr(parameters, ref, nodes[stem])
        return nodes

    @staticmethod
    def resolvePreprocessDevice(device: str) -> str:
        """``"auto"`` -> ``"cuda"`` when an NVIDIA GPU is usable, else ``"cpu"`` (other values unchanged).

        Cheap on purpose (runs in the GUI thread): asks torch only if it is already imported,
        otherwise looks for ``nvidia-smi``.
        """
        if device != "auto":
            return device
        import shutil
        import sys

        torch = sys.modules.get("torch")
        if torch is not None:
            try:
                return "cuda" if torch.cuda.is_available() else "cpu"
            except Exception:
                return "cpu"
        return "cuda" if shutil.which("nvidia-smi") else "cpu"

    # -- helpers -----------------------------------------------------------------------------

    @staticmethod
    def _find(folder: Path, stem: str) -> Optional[Path]:
        for suffix in IMAGE_SUFFIXES:
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


class ContrastAmplifierWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """GUI (Slicer 5.8 scripted-module template): the .ui is bound to the typed parameter node with
    ``connectGui``; jobs run in the background and Apply turns into Cancel.

    One child process at a time (amplification or preprocessing); a ``qt.QTimer`` polls it, so
    the GUI never waits. The widget holds no algorithm: it reads the parameter node and calls
    the Logic, which runs the Lib's command line.
    """

    TIMER_INTERVAL_MS = 200

    def __init__(self, parent=None) -> None:
        """Called when the user opens the module the first time and the widget is initialized."""
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)  # needed for parameter node observation
        self.logic: Optional[ContrastAmplifierLogic] = None
        self._parameterNode: Optional[ContrastAmplifierParameterNode] = None
        self._parameterNodeGuiTag = None
        self._job: Optional[BackgroundJob] = None
        self._timer = None
        self._models: list = []
        self._fillingModels = False
        self._warnings: List[str] = []

    def setup(self) -> None:
        """Called when the user opens the module the first time and the widget is initialized."""
        import qt

        ScriptedLoadableModuleWidget.setup(self)

        # Load widget from .ui file (created by Qt Designer).
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/ContrastAmplifier.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)

        # Set scene in MRML widgets ("mrmlSceneChanged(vtkMRMLScene*)" is connected to each selector's setMRMLScene in the .ui).
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = ContrastAmplifierLogic()
        self.logic.confirmInstall = lambda message: slicer.util.confirmOkCancelDisplay(message, _("Install Python packages"))

        # These connections ensure that we update parameter node when scene is closed
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        # Buttons (every parameter widget is bound by connectGui in setParameterNode, except the model selector)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.preprocessButton.connect("clicked(bool)", self.onPreprocessButton)
        self.ui.refreshModelsButton.connect("clicked(bool)", self.refreshModels)
        self.ui.addModelButton.connect("clicked(bool)", self.onAddModelButton)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelSelected)

        self._timer = qt.QTimer()
        self._timer.setInterval(self.TIMER_INTERVAL_MS)
        self._timer.connect("timeout()", self.onTimer)
        self.ui.progressBar.hide()

        # Make sure parameter node is initialized (needed for module reload)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        if self._job is not None and self._job.process.running:
            self.logic.cancelJob(self._job, wait=True)
        self.logic.discardJobFiles(self._job)
        if self._timer is not None:
            self._timer.stop()
        self.removeObservers()

    def enter(self) -> None:
        """Called each time the user opens this module."""
        self.initializeParameterNode()

    def exit(self) -> None:
        """Called each time the user opens a different module."""
        # Do not react to parameter node changes (GUI will be updated when the user enters into the module)
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event) -> None:
        """Called just before the scene is closed."""
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        """Called just after the scene is closed."""
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        """Ensure parameter node exists and observed; choose the default model if none is chosen yet."""
        self.setParameterNode(self.logic.getParameterNode())
        self.refreshModels()
        if not self._parameterNode.Model and self._models:
            try:
                default = self.logic.defaultModelName()
            except ValueError as exc:  # the chosen default is gone: say so, do not pick another
                default = None
                self.ui.modelInfoLabel.text = str(exc)
            if default:
                self._parameterNode.Model = default

    def setParameterNode(self, inputParameterNode: Optional[ContrastAmplifierParameterNode]) -> None:
        """Set and observe parameter node.

        Observation is needed because when the parameter node is changed then the GUI must be updated immediately.
        """
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Note: in the .ui file, a Qt dynamic property called "SlicerParameterName" is set on each
            # ui element that needs connection.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._checkCanApply()

    def _checkCanApply(self, caller=None, event=None) -> None:
        """Parameter node changed: model selector, descriptions and the two buttons follow it."""
        self._showChosenModel()
        self._updateDescriptions()
        self._updateButtons()

    # -- model list and descriptions ---------------------------------------------------------

    def refreshModels(self) -> None:
        """Fill the model selector from the registry (user bundles first, then the shipped demo)."""
        import qt

        self._models = self.logic.availableModels()
        combo = self.ui.modelComboBox
        self._fillingModels = True
        try:
            combo.clear()
            for entry in self._models:
                combo.addItem(entry.name)
                combo.setItemData(combo.count - 1, self.logic.modelSummary(entry), qt.Qt.ToolTipRole)
        finally:
            self._fillingModels = False
        self._checkCanApply()

    def _showChosenModel(self) -> None:
        combo = self.ui.modelComboBox
        name = self._parameterNode.Model if self._parameterNode else ""
        index = combo.findText(name) if name else -1
        if combo.currentIndex != index:
            self._fillingModels = True
            try:
                combo.setCurrentIndex(index)
            finally:
                self._fillingModels = False

    def onModelSelected(self, index: int) -> None:
        if self._fillingModels or self._parameterNode is None or index < 0:
            return
        self._parameterNode.Model = self.ui.modelComboBox.itemText(index)

    def onAddModelButton(self) -> None:
        """Add model: pick a bundle's bundle.json or a .zip; every file is checked before it is installed."""
        import qt

        path = qt.QFileDialog.getOpenFileName(
            slicer.util.mainWindow(), _("Add a model bundle (its bundle.json, or a .zip of the bundle folder)"), "",
            _("Model bundle (bundle.json *.zip);;All files (*)"))
        if not path:
            return
        with slicer.util.tryWithErrorDisplay(_("The model could not be added."), waitCursor=True):
            entry, message = self.logic.addModel(
                path, confirmReplace=lambda question: slicer.util.confirmYesNoDisplay(question, _("Add model")))
        if entry is None:
            slicer.util.errorDisplay(message, windowTitle=_("Add model"))
            return
        self.refreshModels()
        if self._parameterNode is not None:
            self._parameterNode.Model = entry.name
        self.ui.statusLabel.text = message

    def _updateDescriptions(self) -> None:
        pn = self._parameterNode
        name = pn.Model if pn is not None else ""
        entry = next((e for e in self._models if e.name == name), None)
        if entry is None and self._models:
            self.ui.modelInfoLabel.text = _("Choose a model in Model.")
            self.ui.modelInfoLabel.toolTip = ""
        elif entry is None:
            self.ui.modelInfoLabel.text = _("No model bundle installed: press Add model and choose a bundle's "
                                            "bundle.json or a .zip of a bundle.")
            self.ui.modelInfoLabel.toolTip = ""
        else:
            self.ui.modelInfoLabel.text = self.logic.modelInfo(entry)
            self.ui.modelInfoLabel.toolTip = f"{entry.description}\n{entry.path}"
        try:
            preset = self.logic.qualityPreset(pn.Quality if pn is not None else "paper")
            self.ui.qualityInfoLabel.text = preset.summary
        except ValueError as exc:
            self.ui.qualityInfoLabel.text = str(exc)
        self.ui.backendInfoLabel.text = self.logic.backendSummary(pn.Backend if pn is not None else "auto",
                                                                  pn.Device if pn is not None else "auto",
                                                                  pn.Precision if pn is not None else "auto")

    def _missingInputs(self) -> List[str]:
        pn = self._parameterNode
        return [label for ref, label in self.logic.INPUTS.values() if pn is None or getattr(pn, ref) is None]

    def _updateButtons(self) -> None:
        running = self._job is not None and self._job.process.running
        amplifying = running and isinstance(self._job, AmplifyJob)
        missing = ", ".join(self._missingInputs())
        # Apply
        if amplifying:
            self.ui.applyButton.text = _("Cancel")
            self.ui.applyButton.toolTip = _("Stop the amplification; no output volume or file is left.")
            self.ui.applyButton.enabled = True
        else:
            self.ui.applyButton.text = _("Apply")
            self.ui.applyButton.enabled = not running and not missing and bool(self._models)
            self.ui.applyButton.toolTip = (
                _("Wait for preprocessing to finish (or cancel it).") if running
                else _("Select the {volumes} volume(s) first.").format(volumes=missing) if missing
                else _("Add a model bundle first (Add model).") if not self._models
                else _("Compute T1c-pro in a background process and show it next to the T1c.")
            )
        # Preprocess (QC)
        if running and not amplifying:
            self.ui.preprocessButton.text = _("Cancel")
            self.ui.preprocessButton.toolTip = _("Stop the preprocessing child process.")
            self.ui.preprocessButton.enabled = True
            return
        self.ui.preprocessButton.text = _("Preprocess (QC)")
        self.ui.preprocessButton.enabled = not running and not missing
        self.ui.preprocessButton.toolTip = (
            _("Wait for the amplification to finish (or cancel it).") if running
            else _("Select the {volumes} volume(s) first.").format(volumes=missing) if missing
            else _("Skull-strip, register to the ICBM 2009a atlas, crop and normalise the four inputs with the chosen "
                   "model's geometry, in a background process.")
        )

    # -- amplification in the background -----------------------------------------------------

    def onApplyButton(self) -> None:
        """Run processing when user clicks "Apply" button (or cancel the running one)."""
        if self._job is not None and self._job.process.running:
            self.logic.cancelJob(self._job)  # the timer sees the end and removes the files
            self.ui.statusLabel.text = _("Cancelling...")
            return
        self.logic.discardJobFiles(self._job)
        try:
            with slicer.util.tryWithErrorDisplay(_("Contrast amplification could not start."), waitCursor=True):
                self._job = self.logic.startAmplifyFromParameters(self._parameterNode)
                self._startProgress(self._startedText(_("Amplification started"), self._job))
        except Exception as exc:  # already shown to the user by tryWithErrorDisplay
            self.ui.statusLabel.text = _("Not started: {error}").format(error=exc)
        finally:
            self._updateButtons()

    def _finishAmplify(self, job: AmplifyJob) -> None:
        # loads the result into the T1c's study, shows it beside the T1c, adds its DICOM series to the
        # DICOM database, removes the files, and puts the output selector back to "Create new volume"
        result = self.logic.finishAmplify(job, self._parameterNode)
        if result is not None:
            seconds = (job.process.finished_at or 0.0) - (job.process.started_at or 0.0)
            text = _("Done in {seconds:.0f} s: '{name}' (right) next to the T1c (left).").format(
                seconds=seconds, name=result.GetName())
            dicom = self.logic.dicomSummary(job)
            self.ui.statusLabel.text = f"{text} {dicom}" if dicom else text
            if job.sendError:
                slicer.util.errorDisplay(_("T1c-pro was computed but not sent to {target}:\n{error}").format(
                    target=job.sendTo, error=job.sendError), detailedText=job.process.stderr_text)
        elif job.process.state is process.ProcessState.CANCELLED:
            self.ui.statusLabel.text = _("Cancelled; no output volume or file was created.")
        else:
            self.ui.statusLabel.text = _("Failed: {error}").format(error=job.error)
            slicer.util.errorDisplay(_("Contrast amplification failed:\n{error}").format(error=job.error),
                                     detailedText=job.process.stderr_text)

    # -- preprocessing in the background -----------------------------------------------------

    def onPreprocessButton(self) -> None:
        if self._job is not None and self._job.process.running:
            self.logic.cancelJob(self._job)
            self.ui.statusLabel.text = _("Cancelling...")
            return
        self.logic.discardJobFiles(self._job)  # the previous run's files (its results are in the scene)
        try:
            with slicer.util.tryWithErrorDisplay(_("Preprocessing could not start."), waitCursor=True):
                self._job = self.logic.startPreprocessFromParameters(self._parameterNode)
                self.ui.qcImageLabel.clear()
                self._startProgress(self._startedText(_("Preprocessing started"), self._job))
        except Exception as exc:  # already shown to the user by tryWithErrorDisplay
            self.ui.statusLabel.text = _("Not started: {error}").format(error=exc)
        finally:
            self._updateButtons()

    def _finishPreprocess(self, job: BackgroundJob) -> None:
        if job.process.state is process.ProcessState.CANCELLED:
            self.ui.statusLabel.text = _("Cancelled; nothing was loaded.")
            self.logic.discardJobFiles(job)
            return
        try:
            with slicer.util.tryWithErrorDisplay(_("Preprocessing failed."), waitCursor=True):
                nodes = self.logic.loadPreprocessResults(job)
                slicer.util.setSliceViewerLayers(background=nodes["t1c"], fit=True)
                self.ui.statusLabel.text = _("Done: {count} volumes loaded (files in {folder}).").format(
                    count=len(nodes), folder=job.outDir)
                qcPath = self.logic.qualityControlImage(job)
                if qcPath is not None:
                    self._showQualityControl(qcPath)
        except Exception as exc:  # already shown to the user by tryWithErrorDisplay
            self.ui.statusLabel.text = _("Failed: {error}").format(error=exc)

    # -- shared: progress polling --------------------------------------------------------------

    @staticmethod
    def _startedText(started: str, job: BackgroundJob) -> str:
        runtime = _("OpenVINO") if job.backend == "openvino" else _("PyTorch")
        if isinstance(job, AmplifyJob) and job.precision == "int8":
            runtime = _("OpenVINO int8; the first run with a model quantises and checks each fold: minutes")
        return _("{started} ({runtime})...").format(started=started, runtime=runtime)

    def _startProgress(self, text: str) -> None:
        self._warnings = []  # plausibility warnings of this run, shown when it ends
        self.ui.progressBar.value = 0
        self.ui.progressBar.show()
        self.ui.statusLabel.text = text
        self._timer.start()

    def onTimer(self) -> None:
        job = self._job
        if job is None:
            self._timer.stop()
            return
        for event in job.process.poll():
            if event.stage == "warning":
                self._warnings.append(event.message)
            self.ui.progressBar.value = int(round(100 * event.fraction))
            self.ui.statusLabel.text = f"{event.stage}: {event.message}" if event.message else event.stage
        if job.process.running:
            return
        self._timer.stop()
        self.ui.progressBar.hide()
        try:
            if isinstance(job, AmplifyJob):
                self._finishAmplify(job)
            else:
                self._finishPreprocess(job)
        finally:
            self._updateButtons()
        if self._warnings:
            slicer.util.warningDisplay(
                _("The inputs look implausible; check them before reading the result:") + "\n\n- " + "\n- ".join(self._warnings),
                windowTitle=_("Contrast Amplifier: plausibility warnings"))

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

        bridge = _bridge()
        image = sitk.GetImageFromArray(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6))
        image.SetSpacing((0.8, 1.1, 3.0))
        image.SetOrigin((10.0, -20.0, 5.0))
        image.SetDirection((0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
        node = bridge.add_volume_node_from_sitk(image, "ContrastAmplifierTest", scene=slicer.mrmlScene)
        with tempfile.TemporaryDirectory() as folder:
            path = bridge.export_volume_node(node, Path(folder) / "t1c.nrrd")
            back = bridge.import_volume_file(path, "ContrastAmplifierTest back", scene=slicer.mrmlScene)
        np.testing.assert_allclose(bridge.ijk_to_ras_matrix(back), bridge.ijk_to_ras_matrix(node), atol=1e-9)
        self.assertTrue(np.array_equal(slicer.util.arrayFromVolume(back), slicer.util.arrayFromVolume(node)))

    def test_MissingInputIsNamed(self) -> None:
        logic = ContrastAmplifierLogic()
        with self.assertRaisesRegex(ValueError, r"No T1 volume selected: choose it in Inputs > T1\."):
            logic.validateInputs({"t1": None, "flair": None})
