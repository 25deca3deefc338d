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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import slicer
import vtk  # noqa: F401  (Slicer modules conventionally expose vtk)

from slicer.util import VTKObservationMixin

from ContrastAmplifierCommon.slicer_compat import IN_SLICER_APP as HAS_SLICER_APP
from ContrastAmplifierCommon.slicer_compat import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)

from ContrastAmplifierCommon import process
from ContrastAmplifierLib import mrml_bridge
from ContrastAmplifierLib.imagefiles import IMAGE_SUFFIXES  # SimpleITK-free: safe before dependencies are installed
from ContrastAmplifierCommon.dependencies import ensure_dependencies

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
<br>Apply runs the chosen model bundle (Quick: 1 fold x 1 mirroring; Balanced: all folds x 2; Paper: all folds x 8)
in a background process (Cancel stops it and leaves nothing behind) and shows "&lt;T1c name&gt; T1c-pro" next to the T1c
in linked side-by-side views.
<br>Preprocess (QC) runs the paper's preprocessing (skull stripping, registration to the ICBM 2009a atlas,
crop, normalisation) with the chosen model's spacing, crop and clip percentiles, in a background process,
and loads the preprocessed volumes and a QC picture: what that model's network is given.
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


@dataclass
class AmplifyJob(BackgroundJob):
    """A running ``contrast-amplifier predict`` and what it needs to load T1c-pro back.

    Attributes:
        outputPath: the T1c-pro file the command writes (atomically) on the T1c grid.
        t1cNode: the input T1c (its name and space define the result's).
        outputNode: the node to overwrite, or ``None`` for a new ``"<T1c name> T1c-pro"`` node.
        command: the command line (for the log).
        result: the loaded T1c-pro node once :meth:`ContrastAmplifierLogic.pollAmplify` saw success.
        error: the failure message once the job failed or was cancelled.
    """

    outputPath: Optional[Path] = None
    t1cNode: object = None
    outputNode: object = None
    command: List[str] = field(default_factory=list)
    result: object = None
    error: Optional[str] = None


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


#: Quality/speed presets (keys are lower-case; the .ui shows the labels).
QUALITY_PRESETS: Dict[str, QualityPreset] = {
    "quick": QualityPreset("Quick", False, 1, "1 fold x 1 mirroring: a first look, seconds on a CPU"),
    "balanced": QualityPreset("Balanced", True, 2, "all folds x 2 mirrorings"),
    "paper": QualityPreset("Paper", True, 8, "all folds x 8 mirrorings, as in the paper (5 x 8 = 40 predictions)"),
}


class ContrastAmplifierLogic(ScriptedLoadableModuleLogic):
    """Everything the module does, usable from the Python console and batch mode (no widget needed).

    Example (``Slicer --no-main-window --python-script``)::

        logic = ContrastAmplifierLogic()
        t1cPro = logic.process(t1, flair, adc, t1c, quality="paper", device="auto")  # waits, returns the node
        nodes = logic.preprocess(t1, flair, adc, t1c, device="cpu", qualityControl=True)
    """

    #: Parameter-node values and their defaults (every key the module uses is declared here).
    PARAMETERS: Dict[str, str] = {
        "Model": "",
        "Quality": "Paper",
        "Device": "auto",
        "Precision": "auto",
        "SkullStripMode": "fast",
        "QualityControl": "true",
    }
    #: Parameter-node node references (volume selectors).
    NODE_REFERENCES = ("InputT1", "InputFLAIR", "InputADC", "InputT1c", "InputBrainMask", "OutputVolume")
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
    #: Devices of preprocessing (HD-BET); "auto" is resolved by :meth:`resolvePreprocessDevice`.
    DEVICES = ("cpu", "cuda")
    #: Devices of amplification (resolved by the command line itself).
    PREDICT_DEVICES = ("auto", "cpu", "cuda", "mps")
    PRECISIONS = ("auto", "exact", "fast")
    SKULL_STRIP_MODES = ("fast", "accurate")
    MIRRORINGS = (1, 2, 4, 8)
    #: Suffix of the result node's name: "<T1c name> T1c-pro".
    RESULT_SUFFIX = "T1c-pro"
    #: Seconds between SIGTERM and SIGKILL on cancel (the CLI removes its temporary file on SIGTERM).
    CANCEL_GRACE_S = 5.0

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
                          crop: Optional[Sequence[int]] = None, model: Optional[str] = None) -> List[str]:
        """The ``contrast-amplifier preprocess`` command line run in the child process.

        ``model`` (registry name or bundle folder) preprocesses with that bundle's spacing, crop
        and clip percentiles (``--model``), i.e. what Apply feeds its network. Without it,
        ``spacing`` (mm) and ``crop`` (voxels, x y z) override the paper's 1 mm, 160 x 192 x 160
        geometry (coarse values make quick checks).

        Raises:
            ValueError: an invalid setting, or ``model`` together with ``spacing``/``crop`` (named in the message).
        """
        if model and (spacing is not None or crop is not None):
            raise ValueError(f"Model {model!r} sets the preprocessing geometry; leave spacing and crop unset to use it.")
        device = self.resolvePreprocessDevice(device)
        if device not in self.DEVICES:
            raise ValueError(f"Device must be one of {', '.join(self.DEVICES)} or auto (got {device!r}).")
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
            args += ["--crop", *(int(size) for size in crop)]
        if model:
            args += ["--model", model]
        return process.python_module_command(self.CLI_MODULE, *args)

    def startPreprocess(self, t1, flair, adc, t1c, device: str = "cpu", skullStripMode: str = "fast",
                        qualityControl: bool = True, workDir: Optional[Path] = None,
                        installDependencies: bool = True, spacing: Optional[float] = None,
                        crop: Optional[Sequence[int]] = None, model: Optional[str] = None) -> BackgroundJob:
        """Export the inputs and start preprocessing in a child process; returns at once.

        ``model``: preprocess with that bundle's geometry (see :meth:`preprocessCommand`).
        Poll ``job.process`` (``poll()``/``running``), then call :meth:`loadPreprocessResults`.
        """
        nodes = {"t1": t1, "flair": flair, "adc": adc, "t1c": t1c}
        self.validateInputs(nodes)
        if installDependencies:
            self.ensureDependencies()
        folder = Path(workDir) if workDir is not None else mrml_bridge.ExchangeFolder.create(parent=self._temporaryParent()).path
        mrml_bridge.export_volume_nodes(nodes, folder / "case", suffix=".nrrd")
        outDir = folder / "preprocessed"
        command = self.preprocessCommand(folder / "case", outDir, device, skullStripMode, qualityControl, spacing, crop,
                                         model=model)
        logging.info("Contrast Amplifier: running %s", " ".join(command))
        job = process.BackgroundProcess(command, env=process.child_environment(self._childEnv(self.resolvePreprocessDevice(device))))
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
                   crop: Optional[Sequence[int]] = None, keepFiles: bool = False,
                   model: Optional[str] = None) -> Dict[str, object]:
        """Synchronous preprocessing (batch mode): export, run, wait, load; returns the new nodes.

        ``model``: preprocess with that bundle's geometry (see :meth:`preprocessCommand`).

        With ``keepFiles`` the exchange folder (inputs, outputs, transforms, ``qc.png``) is kept
        and its path is in each result node's ``ContrastAmplifier.Folder`` attribute; otherwise
        it is deleted once the results are loaded.

        Raises:
            ValueError: an input is missing or chosen twice (named in the message).
            process.ProcessError: the command line failed; the message is its own error text.
        """
        job = self.startPreprocess(t1, flair, adc, t1c, device, skullStripMode, qualityControl,
                                   spacing=spacing, crop=crop, model=model)
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

    # -- amplification (T1c -> T1c-pro) -----------------------------------------------------

    @staticmethod
    def availableModels() -> list:
        """Model bundles from the registry (``registry.list_models()``): user bundles first, then the shipped demo.

        Returns an empty list when the registry cannot be imported yet (Python packages not
        installed: Apply installs them first).
        """
        try:
            from ContrastAmplifierLib.registry import list_models
        except ImportError as exc:
            logging.info("Contrast Amplifier: model registry not available yet (%s)", exc)
            return []
        try:
            return list_models()
        except Exception as exc:  # a broken Models.json must not break the module panel
            logging.warning("Contrast Amplifier: could not list models: %s", exc)
            return []

    @staticmethod
    def defaultModelName() -> Optional[str]:
        """The registry's default model (the shipped demo unless the user set another), or ``None``.

        Raises:
            ValueError: the user's chosen default is no longer installed (the message says how to fix it).
        """
        try:
            from ContrastAmplifierLib.registry import default_model_name
        except ImportError as exc:
            logging.info("Contrast Amplifier: model registry not available yet (%s)", exc)
            return None
        return default_model_name()

    @staticmethod
    def modelSummary(entry) -> str:
        """One line for the model selector: name, version, intended use (e.g. "synthetic phantom demo - not for clinical use")."""
        use = entry.intended_use or "intended use not stated"
        return f"{entry.name} {entry.version}: {use}"

    @staticmethod
    def qualityPreset(quality: str) -> QualityPreset:
        """The :class:`QualityPreset` for ``"quick"``, ``"balanced"`` or ``"paper"`` (any case).

        Raises:
            ValueError: unknown name; the message lists the choices.
        """
        preset = QUALITY_PRESETS.get(str(quality).strip().lower())
        if preset is None:
            choices = ", ".join(p.label for p in QUALITY_PRESETS.values())
            raise ValueError(f"Quality must be one of {choices} (got {quality!r}).")
        return preset

    def bundleFolds(self, model: Optional[str] = None) -> List[int]:
        """Fold indices of a bundle, from its validated ``bundle.json`` (``bundle.read_manifest``: no weights, no torch).

        Args:
            model: registry name, bundle folder, or ``None`` for the default model (``models set-default``).

        Raises:
            ValueError: no such model, or no model installed; the message says how to get one.
            ContrastAmplifierLib.bundle.BundleError: (a ``ValueError``) the bundle's manifest is
                unreadable or invalid; the message names the file, the field and the fix.
        """
        from ContrastAmplifierLib.bundle import BUNDLE_FILE, read_manifest

        folder: Optional[Path] = None
        if model and (Path(model) / BUNDLE_FILE).is_file():
            folder = Path(model)
        else:
            entries = self.availableModels()
            if not entries:
                raise ValueError("No model bundle installed: import one with "
                                 "'contrast-amplifier models import BUNDLE_DIR_OR_ZIP' or choose a bundle folder.")
            wanted = model or self.defaultModelName()
            matches = [e for e in entries if e.name == wanted]
            if not matches:
                known = ", ".join(e.name for e in entries)
                raise ValueError(f"Model {wanted!r} is not installed (installed: {known}); choose one in Model.")
            folder = Path(matches[0].path)
        return [int(k) for k in read_manifest(folder)["folds"]]

    def ensembleChoice(self, quality: str = "paper", model: Optional[str] = None, folds: Optional[Sequence[int]] = None,
                       flips: Optional[int] = None) -> tuple:
        """``(folds or None for all, flips)`` for a quality preset; explicit ``folds``/``flips`` win.

        Raises:
            ValueError: unknown quality, or a mirroring count other than 1, 2, 4, 8.
        """
        preset = self.qualityPreset(quality)
        chosenFlips = preset.flips if flips is None else int(flips)
        if chosenFlips not in self.MIRRORINGS:
            raise ValueError(f"Mirrorings must be one of {', '.join(map(str, self.MIRRORINGS))} (got {flips}).")
        if folds is not None:
            return [int(k) for k in folds], chosenFlips
        if preset.allFolds:
            return None, chosenFlips
        return self.bundleFolds(model)[:1], chosenFlips

    def predictCommand(self, inputs: Dict[str, Path], outPath: Path, model: Optional[str] = None,
                       folds: Optional[Sequence[int]] = None, flips: int = 8, device: str = "auto",
                       precision: str = "auto", brainMask: Optional[Path] = None,
                       threads: Optional[int] = None) -> List[str]:
        """The ``contrast-amplifier predict ... --progress json`` command line run in the child process.

        Args:
            inputs: file stem (t1, flair, adc, t1c) -> exported image file.
            outPath: the T1c-pro file to write.
            model: registry name or bundle folder (``None``: the registry's default).
            folds: fold models to average (``None``: all).
            flips: mirrorings per fold.
            device: auto, cpu, cuda or mps.
            precision: auto, exact (fp32) or fast (bf16).
            brainMask: brain mask on the T1c grid (skips HD-BET).
            threads: CPU threads of the child (default: all cores).

        Raises:
            ValueError: an input file is missing or a setting is invalid (named in the message).
        """
        if device not in self.PREDICT_DEVICES:
            raise ValueError(f"Device must be one of {', '.join(self.PREDICT_DEVICES)} (got {device!r}).")
        if precision not in self.PRECISIONS:
            raise ValueError(f"Precision must be one of {', '.join(self.PRECISIONS)} (got {precision!r}).")
        if int(flips) not in self.MIRRORINGS:
            raise ValueError(f"Mirrorings must be one of {', '.join(map(str, self.MIRRORINGS))} (got {flips}).")
        args: List[object] = ["predict"]
        for stem in self.INPUTS:
            if stem not in inputs:
                raise ValueError(f"No {self.INPUTS[stem][1]} file for the command line; export all four inputs first.")
            args += [f"--{stem}", inputs[stem]]
        args += ["--out", outPath]
        if model:
            args += ["--model", model]
        for fold in folds or ():
            args += ["--folds", int(fold)]
        args += ["--flips", int(flips), "--device", device, "--precision", precision]
        if brainMask is not None:
            args += ["--brain-mask", brainMask]
        if threads is not None:
            args += ["--threads", int(threads)]
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
            raise ValueError(f"Brain mask '{brainMask.GetName()}' has no voxel data; load it again or clear the selector.")
        if brainMask.GetID() == t1c.GetID():
            raise ValueError("Brain mask and T1c are the same volume; select a mask or clear the Brain mask selector.")
        maskDims, t1cDims = brainMask.GetImageData().GetDimensions(), t1c.GetImageData().GetDimensions()
        sameGrid = tuple(maskDims) == tuple(t1cDims)
        if sameGrid:
            import numpy as np

            sameGrid = np.allclose(mrml_bridge.ijk_to_ras_matrix(brainMask), mrml_bridge.ijk_to_ras_matrix(t1c), atol=1e-3)
        if not sameGrid:
            raise ValueError(
                f"Brain mask '{brainMask.GetName()}' ({'x'.join(map(str, maskDims))}) is not on the grid of T1c "
                f"'{t1c.GetName()}' ({'x'.join(map(str, t1cDims))}); resample it onto the T1c "
                "(Resample Image (BRAINS) with the T1c as reference) or clear the selector to let HD-BET compute one."
            )

    def startAmplify(self, t1, flair, adc, t1c, output=None, model: Optional[str] = None, quality: str = "paper",
                     device: str = "auto", precision: str = "auto", brainMask=None,
                     folds: Optional[Sequence[int]] = None, flips: Optional[int] = None,
                     threads: Optional[int] = None, workDir: Optional[Path] = None,
                     installDependencies: bool = True) -> AmplifyJob:
        """Export the inputs and start ``contrast-amplifier predict`` in a child process; returns at once.

        Poll with :meth:`pollAmplify` (e.g. from a ``qt.QTimer``) until it returns True. No
        output node is created or modified before the result file exists.

        Raises:
            ValueError: a missing, duplicate or mismatched input, or an invalid setting (named).
        """
        nodes = {"t1": t1, "flair": flair, "adc": adc, "t1c": t1c}
        self.validateInputs(nodes)
        self.validateBrainMask(brainMask, t1c)
        if output is not None and output.GetID() in {n.GetID() for n in nodes.values()}:
            raise ValueError(f"Output volume '{output.GetName()}' is one of the inputs; choose 'Create new volume' "
                             "or another volume in T1c-pro output.")
        if installDependencies:
            self.ensureDependencies()
        chosenFolds, chosenFlips = self.ensembleChoice(quality, model, folds, flips)
        folder = Path(workDir) if workDir is not None else mrml_bridge.ExchangeFolder.create(parent=self._temporaryParent()).path
        try:
            # NRRD keeps the T1c geometry in double precision, so T1c-pro lands exactly on its grid.
            files = mrml_bridge.export_volume_nodes(nodes, folder / "case", suffix=".nrrd")
            maskFile = None
            if brainMask is not None:
                maskFile = mrml_bridge.export_volume_node(brainMask, folder / "case" / "brain_mask.nrrd")
            outputPath = folder / "result" / "t1c_pro.nrrd"
            outputPath.parent.mkdir(parents=True, exist_ok=True)
            command = self.predictCommand(files, outputPath, model=model or None, folds=chosenFolds, flips=chosenFlips,
                                          device=device, precision=precision, brainMask=maskFile, threads=threads)
            logging.info("Contrast Amplifier: running %s", " ".join(command))
            child = process.BackgroundProcess(command, env=process.child_environment(self._childEnv(device))).start()
        except BaseException:
            mrml_bridge.ExchangeFolder(folder).cleanup()
            raise
        return AmplifyJob(process=child, workDir=folder, outDir=outputPath.parent, referenceName=t1c.GetName(),
                          outputPath=outputPath, t1cNode=t1c, outputNode=output, command=command)

    def resultName(self, t1c) -> str:
        """``"<T1c name> T1c-pro"``."""
        return f"{t1c.GetName()} {self.RESULT_SUFFIX}"

    def loadAmplifyResult(self, job: AmplifyJob):
        """Load T1c-pro of a finished job into ``job.outputNode`` or a new node ``"<T1c name> T1c-pro"``.

        The file is on the T1c's grid in world (RAS) coordinates, so the node gets no parent
        transform; its geometry equals the T1c's.

        Raises:
            process.ProcessCancelled: the job was cancelled (nothing is created).
            process.ProcessError: the command line failed; the message is its own error text.
        """
        job.process.raise_for_state()
        name = job.outputNode.GetName() if job.outputNode is not None else self.resultName(job.t1cNode)
        node = mrml_bridge.import_volume_file(job.outputPath, name, scene=job.t1cNode.GetScene(), node=job.outputNode)
        if node.GetParentTransformNode() is not None:
            node.SetAndObserveTransformNodeID(None)
        node.SetAttribute("ContrastAmplifier.Source", job.t1cNode.GetID())
        node.SetAttribute("ContrastAmplifier.Command", " ".join(job.command[3:]))
        job.result = node
        return node

    def pollAmplify(self, job: AmplifyJob) -> bool:
        """Forward new progress (``job.process.on_progress``) and, once the child has ended, finish the job.

        Finishing loads the result (success) or records ``job.error`` (failure, cancel), then
        deletes the exchange folder (exported patient data). Never blocks.

        Returns:
            True when the job is finished (``job.result`` or ``job.error`` is set).
        """
        job.process.poll()
        if job.process.running:
            return False
        if job.result is None and job.error is None:
            try:
                self.loadAmplifyResult(job)
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
                cancel=None, timeout: Optional[float] = None, installDependencies: bool = True):
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
            precision: auto (bf16 on CUDA, fp32 on CPU), exact (fp32) or fast (bf16).
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

        Returns:
            The T1c-pro volume node (synchronous) or the :class:`AmplifyJob` (asynchronous).

        Raises:
            ValueError: an input is missing, chosen twice, or a setting is invalid (named in the message).
            process.ProcessCancelled: cancelled through ``cancel``; no node and no file are left.
            process.ProcessError: the command line failed; the message is its own error text.
        """
        import time

        job = self.startAmplify(t1, flair, adc, t1c, output=output, model=model, quality=quality, device=device,
                                precision=precision, brainMask=brainMask, folds=folds, flips=flips, threads=threads,
                                installDependencies=installDependencies)
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
                    raise TimeoutError(f"Contrast amplification ran past {timeout} s and was stopped; "
                                       "choose a quicker quality or a GPU device.")
                time.sleep(0.1)
        except BaseException:
            self.cancelJob(job, wait=True)
            self.discardJobFiles(job)
            raise
        if job.result is None:
            job.process.raise_for_state()  # the command line's own message (or "Cancelled by the user.")
            raise process.ProcessError(job.error or "Contrast amplification produced no result; see the log.")
        return job.result

    def showSideBySide(self, t1c, t1cPro) -> None:
        """Show T1c (left) and T1c-pro (right) in the side-by-side layout, linked, with the same window.

        Does nothing without the Slicer application's views (batch mode, tests).
        """
        app = getattr(slicer, "app", None)
        layoutManager = app.layoutManager() if app is not None and hasattr(app, "layoutManager") else None
        if layoutManager is None:
            return
        layoutManager.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutSideBySideView)
        for viewName, volume in (("Red", t1c), ("Yellow", t1cPro)):
            sliceWidget = layoutManager.sliceWidget(viewName)
            if sliceWidget is None:
                continue
            compositeNode = sliceWidget.mrmlSliceCompositeNode()
            compositeNode.SetBackgroundVolumeID(volume.GetID())
            compositeNode.SetForegroundVolumeID(None)
            compositeNode.SetLabelVolumeID(None)
            # Linked after the volumes are set (programmatic changes are not broadcast), so
            # browsing, zooming and panning one view moves the other.
            compositeNode.SetLinkedControl(True)
            sliceWidget.sliceLogic().FitSliceToAll()
        # T1c-pro is on the T1c's intensity scale: the same window shows the gain in enhancement.
        source, target = t1c.GetDisplayNode(), t1cPro.GetDisplayNode()
        if source is not None and target is not None:
            target.SetAutoWindowLevel(False)
            target.SetWindowLevel(source.GetWindow(), source.GetLevel())

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


def _parameterWidgets(uiWidget) -> list:
    """(widget, parameter name) pairs: every widget whose .ui entry has a SlicerParameterName property."""
    pairs = []
    for widget in slicer.util.findChildren(uiWidget):
        name = widget.property("SlicerParameterName") if hasattr(widget, "property") else None
        if name:
            pairs.append((widget, str(name)))
    return pairs


class ContrastAmplifierWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """GUI: binds the .ui to the parameter node, runs jobs in the background, Apply turns into Cancel.

    One child process at a time (amplification or preprocessing); a ``qt.QTimer`` polls it, so
    the GUI never waits. The widget holds no algorithm: it reads the parameter node and calls
    the Logic, which runs the Lib's command line.
    """

    TIMER_INTERVAL_MS = 200
    APPLY_TEXT = "Apply"
    PREPROCESS_TEXT = "Preprocess (QC)"

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: Optional[ContrastAmplifierLogic] = None
        self._parameterNode = None
        self._updatingGUIFromParameterNode = False
        self._job: Optional[BackgroundJob] = None
        self._timer = None
        self._models: list = []

    def setup(self) -> None:
        import qt

        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/ContrastAmplifier.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = ContrastAmplifierLogic()
        self.logic.confirmInstall = lambda message: slicer.util.confirmOkCancelDisplay(message, "Install Python packages")
        self.refreshModels()
        self.parameterEditWidgets = _parameterWidgets(uiWidget)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        slicer.util.addParameterEditWidgetConnections(self.parameterEditWidgets, self.updateParameterNodeFromGUI)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.preprocessButton.connect("clicked(bool)", self.onPreprocessButton)
        self.ui.refreshModelsButton.connect("clicked(bool)", self.refreshModels)

        self._timer = qt.QTimer()
        self._timer.setInterval(self.TIMER_INTERVAL_MS)
        self._timer.connect("timeout()", self.onTimer)
        self.ui.progressBar.hide()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        if self._job is not None and self._job.process.running:
            self.logic.cancelJob(self._job, wait=True)
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
            if not parameterNode.GetParameter("Model") and self._models:
                try:
                    default = self.logic.defaultModelName()
                except ValueError as exc:  # the chosen default is gone: say so, do not pick another
                    default = None
                    self.ui.modelInfoLabel.text = str(exc)
                if default:
                    parameterNode.SetParameter("Model", default)
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
        self._updateDescriptions()
        self._updateButtons()
        self._updatingGUIFromParameterNode = False

    def updateParameterNodeFromGUI(self, caller=None, event=None) -> None:
        if self._parameterNode is None or self._updatingGUIFromParameterNode:
            return
        wasModified = self._parameterNode.StartModify()
        slicer.util.updateNodeFromParameterEditWidgets(self.parameterEditWidgets, self._parameterNode)
        self._parameterNode.EndModify(wasModified)

    # -- model list and descriptions ---------------------------------------------------------

    def refreshModels(self) -> None:
        """Fill the model selector from the registry (user bundles first, then the shipped demo)."""
        import qt

        self._models = self.logic.availableModels()
        combo = self.ui.modelComboBox
        wasBlocked = combo.blockSignals(True)
        current = self._parameterNode.GetParameter("Model") if self._parameterNode is not None else ""
        combo.clear()
        for entry in self._models:
            combo.addItem(entry.name)
            combo.setItemData(combo.count - 1, self.logic.modelSummary(entry), qt.Qt.ToolTipRole)
        if current:
            combo.setCurrentText(current)
        combo.blockSignals(wasBlocked)
        self._updateDescriptions()
        self._updateButtons()

    def _updateDescriptions(self) -> None:
        pn = self._parameterNode
        name = pn.GetParameter("Model") if pn is not None else ""
        entry = next((e for e in self._models if e.name == name), None)
        if entry is None and self._models:
            self.ui.modelInfoLabel.text = ("Choose a model in Model (no default model is available; "
                                           "'contrast-amplifier models list' shows which is set).")
        elif entry is None:
            self.ui.modelInfoLabel.text = ("No model bundle installed. Import one with "
                                           "'contrast-amplifier models import BUNDLE_DIR_OR_ZIP', then press Refresh.")
        else:
            self.ui.modelInfoLabel.text = f"{entry.description} Intended use: {entry.intended_use or 'not stated'}."
            self.ui.modelInfoLabel.toolTip = str(entry.path)
        try:
            preset = self.logic.qualityPreset(pn.GetParameter("Quality") if pn is not None else "paper")
            self.ui.qualityInfoLabel.text = preset.summary
        except ValueError as exc:
            self.ui.qualityInfoLabel.text = str(exc)

    def _missingInputs(self) -> List[str]:
        pn = self._parameterNode
        return [label for stem, (ref, label) in self.logic.INPUTS.items() if pn is None or pn.GetNodeReference(ref) is None]

    def _updateButtons(self) -> None:
        running = self._job is not None and self._job.process.running
        amplifying = running and isinstance(self._job, AmplifyJob)
        missing = self._missingInputs()
        # Apply
        if amplifying:
            self.ui.applyButton.text = "Cancel"
            self.ui.applyButton.toolTip = "Stop the amplification; no output volume or file is left."
            self.ui.applyButton.enabled = True
        else:
            self.ui.applyButton.text = self.APPLY_TEXT
            self.ui.applyButton.enabled = not running and not missing and bool(self._models)
            self.ui.applyButton.toolTip = (
                "Wait for preprocessing to finish (or cancel it)." if running
                else f"Select the {', '.join(missing)} volume(s) first." if missing
                else "Import a model bundle first (see the Model line)." if not self._models
                else "Compute T1c-pro in a background process and show it next to the T1c."
            )
        # Preprocess (QC)
        if running and not amplifying:
            self.ui.preprocessButton.text = "Cancel"
            self.ui.preprocessButton.toolTip = "Stop the preprocessing child process."
            self.ui.preprocessButton.enabled = True
            return
        self.ui.preprocessButton.text = self.PREPROCESS_TEXT
        self.ui.preprocessButton.enabled = not running and not missing
        self.ui.preprocessButton.toolTip = (
            "Wait for the amplification to finish (or cancel it)." if running
            else f"Select the {', '.join(missing)} volume(s) first." if missing
            else "Skull-strip, register to the ICBM 2009a atlas, crop and normalise the four inputs with the chosen "
                 "model's geometry, in a background process."
        )

    # -- amplification in the background -----------------------------------------------------

    def onApplyButton(self) -> None:
        if self._job is not None and self._job.process.running:
            self.logic.cancelJob(self._job)  # the timer sees the end and removes the files
            self.ui.statusLabel.text = "Cancelling..."
            return
        pn = self._parameterNode
        nodes = self.logic.inputNodes(pn)
        self.logic.discardJobFiles(self._job)
        try:
            with slicer.util.tryWithErrorDisplay("Contrast amplification could not start.", waitCursor=True):
                self._job = self.logic.process(
                    nodes["t1"], nodes["flair"], nodes["adc"], nodes["t1c"],
                    output=pn.GetNodeReference("OutputVolume"), model=pn.GetParameter("Model") or None,
                    quality=pn.GetParameter("Quality"), device=pn.GetParameter("Device"),
                    precision=pn.GetParameter("Precision"), brainMask=pn.GetNodeReference("InputBrainMask"),
                    synchronous=False,
                )
                self._startProgress("Amplification started...")
        except Exception as exc:  # already shown to the user by tryWithErrorDisplay
            self.ui.statusLabel.text = f"Not started: {exc}"
        finally:
            self._updateButtons()

    def _finishAmplify(self, job: AmplifyJob) -> None:
        self.logic.pollAmplify(job)  # loads the result (or records the error) and removes the files
        if job.result is not None:
            self._parameterNode.SetNodeReferenceID("OutputVolume", job.result.GetID())
            self.logic.showSideBySide(job.t1cNode, job.result)
            seconds = (job.process.finished_at or 0.0) - (job.process.started_at or 0.0)
            self.ui.statusLabel.text = f"Done in {seconds:.0f} s: '{job.result.GetName()}' (right) next to the T1c (left)."
        elif job.process.state is process.ProcessState.CANCELLED:
            self.ui.statusLabel.text = "Cancelled; no output volume or file was created."
        else:
            self.ui.statusLabel.text = f"Failed: {job.error}"
            slicer.util.errorDisplay(f"Contrast amplification failed:\n{job.error}", detailedText=job.process.stderr_text)

    # -- preprocessing in the background -----------------------------------------------------

    def onPreprocessButton(self) -> None:
        if self._job is not None and self._job.process.running:
            self.logic.cancelJob(self._job)
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
                    qualityControl=pn.GetParameter("QualityControl") == "true", model=pn.GetParameter("Model") or None,
                )
                self.ui.qcImageLabel.clear()
                self._startProgress("Preprocessing started...")
        except Exception as exc:  # already shown to the user by tryWithErrorDisplay
            self.ui.statusLabel.text = f"Not started: {exc}"
        finally:
            self._updateButtons()

    def _finishPreprocess(self, job: BackgroundJob) -> None:
        if job.process.state is process.ProcessState.CANCELLED:
            self.ui.statusLabel.text = "Cancelled; nothing was loaded."
            self.logic.discardJobFiles(job)
            return
        try:
            with slicer.util.tryWithErrorDisplay("Preprocessing failed.", waitCursor=True):
                nodes = self.logic.loadPreprocessResults(job)
                slicer.util.setSliceViewerLayers(background=nodes["t1c"], fit=True)
                self.ui.statusLabel.text = f"Done: {len(nodes)} volumes loaded (files in {job.outDir})."
                qcPath = self.logic.qualityControlImage(job)
                if qcPath is not None:
                    self._showQualityControl(qcPath)
        except Exception as exc:  # already shown to the user by tryWithErrorDisplay
            self.ui.statusLabel.text = f"Failed: {exc}"

    # -- shared: progress polling --------------------------------------------------------------

    def _startProgress(self, text: str) -> None:
        self._warnings: List[str] = []  # plausibility warnings of this run, shown when it ends
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
        if getattr(self, "_warnings", None):
            slicer.util.warningDisplay("The inputs look implausible; check them before reading the result:\n\n- "
                                       + "\n- ".join(self._warnings), windowTitle="Contrast Amplifier: plausibility warnings")

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
