"""int8 precision of the OpenVINO backend (``--precision int8``): NNCF post-training quantisation.

Each fold's OpenVINO model (:func:`.openvino_backend.load_or_convert`) is quantised by
``nncf.quantize`` (the OpenVINO-model path): preset ``MIXED`` (symmetric per-channel int8 weights,
asymmetric int8 activations: LeakyReLU outputs are not centred), activation ranges from the min and
max over the calibration set (NNCF's default estimator gave a larger worst voxel, 0.084 against
0.071 on a first trial), no bias correction: NNCF's fast bias correction made the demo ensemble
worse (lesion CNR change up to -1.2 % against -0.35 % without, worst voxel 0.018 against 0.015)
and raised the calibration's peak memory at 160 x 192 x 160 from 4.0 to 7.1 GB. The network's
tail after its last activation (the 1x1x1 head, the input-skip logit of the T1c and the sigmoid)
stays in f32: quantising it raised the mean error of a demo fold's prediction by half
(2.4e-3 -> 3.6e-3) for no speed.

Calibration set (:func:`bundle_calibration`): the phantom cases :data:`CALIBRATION_SEED` onwards
(:data:`CALIBRATION_CASES` of them), generated at the bundle's spacing and run through the real
preprocessing (:func:`.preprocessing.preprocess_case` into the bundle's geometry, the phantom's
brain mask in place of HD-BET), each fed in the ensemble's 8 mirrorings. Seeds: the demo model
trains on 710000-710059 and is evaluated on 720000-, ``contrast-amplifier-train evaluate --phantom-seeds``
uses 730000-730019; calibration uses 740000- and the acceptance check 750000-, so no case is used
twice. Calibration runs on first use (``predict --precision int8``) and is cached; a training
export can run it ahead with :func:`int8_settings`.

Acceptance rule (:func:`accept_int8`), run once per model, fold set and number of mirrorings (the
verdict is cached): on the held-out phantom cases from :data:`ACCEPTANCE_SEED` that have lesions
(:data:`ACCEPTANCE_CASES`), the ensemble runs in fp32 (OpenVINO, ``exact``) and in int8; int8 is
accepted when, for *every* case, the lesion CNR of T1c-pro (the demo's definition: phantom lesion
labels pooled against the brain minus the lesions dilated by 3 mm, :func:`.metrics.roi_contrast`)
is within :data:`CNR_TOLERANCE` (2 %) of fp32's, and the largest voxel difference of the
prediction inside the brain is at most :data:`MAX_DIFF_BOUND` (normalised [0, 1] output units).
Every case, not the mean: a mean could hide one case whose contrast int8 changed. Otherwise
:class:`Int8Refused` names the numbers. The bound was set from the demo bundle's measurement (see
:data:`MAX_DIFF_BOUND`); it catches a quantisation that breaks, it does not promise fp32's accuracy.

Cache (under :func:`.openvino_backend.cache_dir`): int8 models are IR entries like the fp32 ones
(``entry.json`` with file hashes, checked on load), keyed by the fp32 entry's key, the calibration
set's identity (seeds, count, spacing, geometry), NNCF's version and :data:`INT8_FORMAT`;
``int8-verdicts/<key>.json`` holds each verdict with the numbers, keyed by the int8 models' keys,
the acceptance cases and the rule; ``int8-phantoms/`` the generated and preprocessed phantoms.

``nncf`` is imported here only, inside functions.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from ContrastAmplifierCommon.atomicfile import write_text_atomic
from ContrastAmplifierCommon.progress import CancelToken, ProgressCallback, check_cancel, null_progress

from . import __version__
from . import openvino_backend as ovb

logger = logging.getLogger(__name__)

#: First phantom seed of the calibration set (case ``i``: seed + i); see the module docstring.
CALIBRATION_SEED = 740_000
CALIBRATION_CASES = 2
#: First phantom seed of the acceptance check; seeds without lesions are skipped (no lesion CNR).
ACCEPTANCE_SEED = 750_000
ACCEPTANCE_CASES = 3
#: How many seeds from :data:`ACCEPTANCE_SEED` are tried for cases with lesions.
ACCEPTANCE_SEED_SPAN = 40
#: Largest relative change of the lesion CNR of T1c-pro, int8 against fp32, in every case (issue 18).
CNR_TOLERANCE = 0.02
#: Largest voxel difference int8 - fp32 of the ensemble prediction inside the brain, in the
#: network's normalised [0, 1] output units (0.03 is 0.23 brain SD of the demo's T1c scale). Set
#: from a measurement on other cases than the check's: the shipped demo bundle at the paper setting
#: (5 folds x 8 mirrorings) on the phantom seeds 720000-720003 (its held-out evaluation cases) had
#: its worst voxel at 0.0170 (mean 0.00096); 1.5 x 0.0170 = 0.0255, rounded up to 0.03. Fewer
#: predictions average less quantisation noise away: on the check's cases 5 folds x 2 mirrorings
#: reached 0.023 (accepted), 5 x 1 0.033 and single predictions 0.047-0.106 (refused; see README, "int8").
MAX_DIFF_BOUND = 0.03
#: Bumped when the quantisation changes in a way that makes older int8 entries and verdicts wrong.
INT8_FORMAT = 1
#: What the quantisation does (part of every int8 cache key).
QUANTISATION = {"preset": "mixed", "activations_range": "minmax", "bias_correction": "none",
                "f32": "the ops after the last activation (head, input-skip logit, sigmoid)"}
INSTALL_HINT = 'pip install "slicer-contrast-amplifier[openvino]" (or: pip install nncf)'
#: Activations whose last one ends the quantised part of the graph (LeakyReLU converts to PRelu).
ACTIVATIONS = ("PRelu", "Relu", "Elu", "Swish", "Gelu")
#: Number of quantisations (NNCF runs) this process made; the tests read it.
quantisations = 0


class Int8Refused(ValueError):
    """The int8 models failed the accuracy rule (the message names the numbers and the fix)."""


def require_nncf() -> Any:
    """The ``nncf`` module, or a one-line :class:`ValueError` naming the fix."""
    try:
        return importlib.import_module("nncf")
    except Exception as exc:
        raise ValueError(f"--precision int8 needs the nncf package (post-training quantisation), which could not be "
                         f"imported ({type(exc).__name__}: {exc}); install it with {INSTALL_HINT}, or use --precision "
                         "exact.") from None


@dataclass(frozen=True)
class CalibrationSet:
    """The inputs NNCF measures activation ranges on: ``(C, Z, Y, X)`` float32 volumes, each fed in
    the ensemble's 8 mirrorings.

    ``identity`` (JSON) names them in the cache keys; ``make`` builds them, only when a fold is
    quantised (a cache hit never calls it), once per set. A pickled set (settings sent to another
    process) leaves the volumes behind: ``make`` builds them there if needed.
    """

    identity: dict[str, Any]
    make: Callable[[], list[np.ndarray]] = field(compare=False, repr=False)
    _made: list[np.ndarray] = field(default_factory=list, compare=False, repr=False)

    def __getstate__(self) -> dict[str, Any]:
        return {"identity": self.identity, "make": self.make, "_made": []}

    def inputs(self) -> list[np.ndarray]:
        if not self._made:
            self._made.extend(self.make())
        return self._made

    def samples(self, input_shape: Sequence[int]) -> _Mirrored:
        """Every input, centre-cropped or zero-padded to ``input_shape`` ``(1, C, Z, Y, X)``, in every mirroring."""
        return _Mirrored(self.inputs(), tuple(int(s) for s in input_shape[1:]))


class _Mirrored:
    """Calibration samples made while NNCF iterates over them (it may iterate more than once): one
    mirrored copy in memory at a time (16 copies would be 1.3 GB at 160 x 192 x 160)."""

    def __init__(self, inputs: list[np.ndarray], shape: tuple[int, ...]):
        self.inputs = inputs
        self.shape = shape

    def __len__(self) -> int:
        from .ensemble import MIRRORINGS

        return len(self.inputs) * len(MIRRORINGS)

    def __iter__(self) -> Iterator[np.ndarray]:
        from .ensemble import MIRRORINGS

        for volume in self.inputs:
            item = torch.from_numpy(_fit(volume, self.shape))[None]
            for dims in MIRRORINGS:
                yield np.ascontiguousarray((torch.flip(item, dims) if dims else item).numpy())


def _fit(volume: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``volume`` centre-cropped and zero-padded (the images' background) to ``shape``."""
    if volume.shape[0] != shape[0]:
        raise ValueError(f"calibration inputs have {volume.shape[0]} channels; the model takes {shape[0]}")
    out = np.zeros(shape, np.float32)
    src, dst = [slice(None)], [slice(None)]
    for have, want in zip(volume.shape[1:], shape[1:]):
        n = min(have, want)
        src.append(slice((have - n) // 2, (have - n) // 2 + n))
        dst.append(slice((want - n) // 2, (want - n) // 2 + n))
    out[tuple(dst)] = volume[tuple(src)]
    return out


@contextlib.contextmanager
def _quiet_nncf() -> Iterator[None]:
    """NNCF logs and draws progress bars: keep them off stdout and down to errors."""
    nncf_logger = logging.getLogger("nncf")
    level = nncf_logger.level
    nncf_logger.setLevel(logging.ERROR)
    try:
        with ovb._quiet():
            yield
    finally:
        nncf_logger.setLevel(level)


def f32_tail(converted: Any) -> list[str]:
    """Names of the ops after the graph's last activation (they stay f32, see the module docstring)."""
    ops = [op for op in converted.get_ordered_ops() if op.get_type_name() not in ("Constant", "Parameter", "Result")]
    last = max((i for i, op in enumerate(ops) if op.get_type_name() in ACTIVATIONS), default=None)
    return [] if last is None else [op.get_friendly_name() for op in ops[last + 1:]]


def quantise(converted: Any, samples: Any) -> Any:
    """``nncf.quantize`` of the ``openvino.Model`` ``converted`` on ``samples`` (a sized, re-iterable
    collection of batch-1 input arrays)."""
    nncf = require_nncf()
    advanced = importlib.import_module("nncf.quantization.advanced_parameters")
    ranges = importlib.import_module("nncf.quantization.range_estimator")
    if not len(samples):
        raise ValueError("the int8 calibration set is empty")
    with _quiet_nncf():
        return nncf.quantize(
            converted, nncf.Dataset(samples), preset=nncf.QuantizationPreset.MIXED, target_device=nncf.TargetDevice.CPU,
            subset_size=len(samples), ignored_scope=nncf.IgnoredScope(names=f32_tail(converted), validate=False),
            advanced_parameters=advanced.AdvancedQuantizationParameters(
                activations_range_estimator_params=ranges.RangeEstimatorParametersSet.MINMAX, disable_bias_correction=True))


def int8_key(model: torch.nn.Module, input_shape: tuple[int, ...], calibration: CalibrationSet) -> tuple[str, dict[str, Any]]:
    """The int8 entry's folder name and what it hashes: the fp32 entry's key plus the quantisation's."""
    _, details = ovb.cache_key(model, input_shape)
    return ovb.entry_key({**details, "int8": {"format": INT8_FORMAT, "nncf": str(require_nncf().__version__),
                                              "quantisation": QUANTISATION, "calibration": calibration.identity}})


def int8_model(model: torch.nn.Module, input_shape: tuple[int, ...], calibration: CalibrationSet) -> Any:
    """The quantised ``openvino.Model`` of ``model`` at ``input_shape``: cached, else quantised and cached."""
    input_shape = (1, *(int(s) for s in input_shape[1:]))
    key, details = int8_key(model, input_shape, calibration)

    def build() -> Any:
        global quantisations
        quantised = quantise(ovb.load_or_convert(model, input_shape), calibration.samples(input_shape))
        quantisations += 1
        return quantised

    return ovb.load_or_build(key, details, build)


def compiled_int8_fold(model: torch.nn.Module, input_shape: tuple[int, ...], calibration: CalibrationSet,
                       threads: Optional[int] = None) -> ovb.CompiledFold:
    """``model`` quantised to int8 and compiled for batch-1 inputs of ``input_shape`` (cached)."""
    input_shape = (1, *(int(s) for s in input_shape[1:]))
    return ovb.compile_converted(int8_model(model, input_shape, calibration), input_shape, "int8", threads)


# -- phantom cases: generated and preprocessed once, kept in the cache -------------------------------


def _phantom_spacing(bundle: Any) -> float:
    return float(min(bundle.spacing))


def phantom_case(seed: int, spacing: float, cancel: Optional[CancelToken] = None) -> Path:
    """The phantom case of ``seed`` at ``spacing`` mm, generated into the cache the first time."""
    from .phantom import generate_cohort

    folder = ovb.cache_dir() / "int8-phantoms" / f"seed{seed}-{spacing:g}mm-v{__version__}"
    case = folder / "case_000"
    if not (case / "phantom.json").is_file():
        try:
            generate_cohort(folder, cases=1, seed=seed, spacing=spacing, skip_existing=True, cancel=cancel)
        except OSError:
            if not (case / "phantom.json").is_file():  # else another process has just renamed it into place
                raise
    return case


def preprocessed_case(case_dir: Path, bundle: Any, cancel: Optional[CancelToken] = None) -> Any:
    """``case_dir`` through :func:`.preprocessing.preprocess_case` into ``bundle``'s geometry (the
    phantom's brain mask instead of HD-BET), written once into the cache and read back after."""
    from .preprocessing import MANIFEST_FILE, PreprocessedCase, preprocess_case

    geometry = bundle.geometry()
    tag = hashlib.sha256(json.dumps({"geometry": geometry.to_dict(), "modalities": list(bundle.modalities),
                                     "version": __version__}, sort_keys=True).encode()).hexdigest()[:16]
    folder = case_dir.parent.parent / f"preprocessed-{tag}" / case_dir.parent.name
    if (folder / MANIFEST_FILE).is_file():
        try:
            return PreprocessedCase.load(folder)
        except Exception as exc:  # a damaged copy: made again below
            logger.warning("preprocessed phantom %s is unusable (%s); preprocessing it again", folder, exc)
    missing = [m for m in bundle.modalities if not (case_dir / f"{m}.nii.gz").is_file()]
    if missing:
        raise ValueError(f"int8 calibration uses phantom cases, which have no {missing} for model {bundle.name!r}; "
                         "use --precision exact.")
    case = preprocess_case({m: case_dir / f"{m}.nii.gz" for m in bundle.modalities}, geometry,
                           brain_mask=case_dir / "brain_mask.nii.gz", cancel=cancel)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        case.write(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except OSError as exc:
        if not (folder / MANIFEST_FILE).is_file():
            logger.warning("could not keep the preprocessed phantom %s (%s)", folder, exc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return case


def case_inputs(case: Any, bundle: Any) -> np.ndarray:
    """The ensemble input of a preprocessed case, as :func:`.inference.amplify_case` stacks it."""
    arrays = case.arrays
    return np.stack([arrays[m] for m in bundle.modalities]).astype(np.float32)


def bundle_calibration(bundle: Any, cases: int = CALIBRATION_CASES, seed: int = CALIBRATION_SEED,
                       progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None) -> CalibrationSet:
    """The phantom calibration set of ``bundle`` (module docstring); its phantoms are made only when a fold is quantised."""
    spacing = _phantom_spacing(bundle)
    seeds = list(range(int(seed), int(seed) + int(cases)))
    identity = {"kind": "phantom", "seeds": seeds, "spacing_mm": spacing, "generator": __version__,
                "geometry": bundle.geometry().to_dict(), "modalities": list(bundle.modalities), "mirrorings": 8,
                "preprocessing": "preprocess_case, phantom brain mask"}
    return CalibrationSet(identity, _PhantomInputs(bundle, seeds, spacing, progress, cancel))


@dataclass
class _PhantomInputs:
    """:func:`bundle_calibration`'s ``make``: the phantoms of ``seeds``, preprocessed for ``bundle``
    (picklable: ``progress`` and ``cancel`` stay in this process)."""

    bundle: Any
    seeds: list[int]
    spacing: float
    progress: Optional[ProgressCallback] = None
    cancel: Optional[CancelToken] = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "progress": None, "cancel": None}

    def __call__(self) -> list[np.ndarray]:
        report = self.progress or null_progress
        inputs = []
        for i, s in enumerate(self.seeds):
            check_cancel(self.cancel)
            report("int8", 0.0, f"int8 calibration: phantom seed {s} ({i + 1}/{len(self.seeds)}, {self.spacing:g} mm; "
                                "once per model geometry)")
            case = preprocessed_case(phantom_case(s, self.spacing, self.cancel), self.bundle, self.cancel)
            inputs.append(case_inputs(case, self.bundle))
        return inputs


# -- the accuracy rule ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """Outcome of the accuracy rule on held-out phantoms.

    ``cases``: per case ``seed``, ``cnr_fp32``, ``cnr_int8``, ``cnr_change`` (relative, signed),
    ``max_abs_diff`` and ``mean_abs_diff`` (prediction inside the brain, normalised units).
    """

    accepted: bool
    cases: list[dict[str, float]]
    max_abs_diff: float
    cnr_tolerance: float
    max_diff_bound: float
    folds: int
    mirrorings: int

    @classmethod
    def judge(cls, cases: list[dict[str, float]], cnr_tolerance: float, max_diff_bound: float, folds: int,
              mirrorings: int) -> Verdict:
        worst = max(c["max_abs_diff"] for c in cases)
        accepted = all(abs(c["cnr_change"]) <= cnr_tolerance for c in cases) and worst <= max_diff_bound
        return cls(bool(accepted), cases, float(worst), cnr_tolerance, max_diff_bound, folds, mirrorings)

    def describe(self) -> str:
        changes = ", ".join(f"{c['cnr_change'] * 100:+.2f} % (seed {int(c['seed'])}: {c['cnr_fp32']:.3f} -> "
                            f"{c['cnr_int8']:.3f})" for c in self.cases)
        return (f"{self.folds} fold{'s' if self.folds != 1 else ''} x {self.mirrorings} mirroring{'s' if self.mirrorings != 1 else ''} "
                f"on {len(self.cases)} held-out phantom case{'s' if len(self.cases) != 1 else ''}: lesion CNR "
                f"of T1c-pro changed by {changes} against fp32 (limit +-{self.cnr_tolerance * 100:g} % in every case); "
                f"largest voxel difference in the brain {self.max_abs_diff:.4f} (limit {self.max_diff_bound:g}, "
                "normalised [0, 1] units)")


def lesion_cnr(case_dir: Path, case: Any, prediction: np.ndarray, bundle: Any) -> float:
    """Lesion CNR of T1c-pro made from ``prediction`` (atlas space) as :func:`.inference.amplify_case`
    maps it back, with the phantom's lesion labels and the demo's healthy-brain ROI."""
    import SimpleITK as sitk

    from .imageio import read_image
    from .inference import prediction_to_native_intensity, resolve_mapping
    from .metrics import healthy_brain_roi, roi_contrast

    t1c = read_image(case_dir / "t1c.nii.gz", "T1c")
    mapping = resolve_mapping("auto", bundle.spacing, t1c.GetSpacing())
    image = prediction_to_native_intensity(prediction, case, t1c, bundle.geometry().clip_for("t1c"), "t1c", mapping)
    lesions = sitk.GetArrayFromImage(sitk.ReadImage(str(case_dir / "lesion_labels.nii.gz"))) > 0
    brain = sitk.GetArrayFromImage(sitk.ReadImage(str(case_dir / "brain_mask.nii.gz"))) > 0
    roi = healthy_brain_roi(brain, lesions, margin_voxels=max(1, int(round(3.0 / min(t1c.GetSpacing())))))
    return float(roi_contrast(sitk.GetArrayFromImage(image), lesions, roi).cnr)


def acceptance_seeds(bundle: Any, cases: int = ACCEPTANCE_CASES, seed: int = ACCEPTANCE_SEED,
                     cancel: Optional[CancelToken] = None) -> list[int]:
    """The first ``cases`` seeds from ``seed`` whose phantom has lesions (their phantoms are generated)."""
    found = []
    for s in range(int(seed), int(seed) + ACCEPTANCE_SEED_SPAN):
        meta = json.loads((phantom_case(s, _phantom_spacing(bundle), cancel) / "phantom.json").read_text(encoding="utf-8"))
        if meta.get("n_lesions", 0) > 0:
            found.append(s)
            if len(found) == cases:
                return found
    raise ValueError(f"only {len(found)} of the phantom seeds {seed}-{seed + ACCEPTANCE_SEED_SPAN - 1} have lesions; "
                     f"{cases} are needed for the int8 check")


def evaluate_int8(bundle: Any, models: Sequence[torch.nn.Module], n_mirrorings: int, settings: Any,
                  seeds: Sequence[int], cnr_tolerance: float = CNR_TOLERANCE, max_diff_bound: float = MAX_DIFF_BOUND,
                  progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None) -> Verdict:
    """Run the rule (module docstring) on the phantom cases of ``seeds``; ``settings``: int8 with its calibration."""
    from .ensemble import predict_ensemble

    report = progress or null_progress
    exact = replace(settings, precision="exact", calibration=None)
    rows = []
    for i, s in enumerate(seeds):
        report("int8", 0.0, f"int8 check: held-out phantom seed {s} ({i + 1}/{len(seeds)}), fp32 and int8 ensembles")
        case_dir = phantom_case(s, _phantom_spacing(bundle), cancel)
        case = preprocessed_case(case_dir, bundle, cancel)
        x = case_inputs(case, bundle)
        inside = case.mask_array
        predictions = []
        for mode in (exact, settings):
            prediction = predict_ensemble(models, x, n_mirrorings, mode, cancel=cancel)
            prediction[~inside] = 0.0  # as amplify_case
            predictions.append(prediction)
        ref, got = predictions
        diff = np.abs(got - ref)[inside]
        cnr_ref, cnr_got = (lesion_cnr(case_dir, case, p, bundle) for p in predictions)
        change = (cnr_got - cnr_ref) / abs(cnr_ref) if cnr_ref != 0 else math.inf
        rows.append({"seed": int(s), "cnr_fp32": cnr_ref, "cnr_int8": cnr_got, "cnr_change": float(change),
                     "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean())})
    return Verdict.judge(rows, cnr_tolerance, max_diff_bound, len(models), n_mirrorings)


def verdict_key(bundle: Any, models: Sequence[torch.nn.Module], n_mirrorings: int, calibration: CalibrationSet,
                cases: int, seed: int, cnr_tolerance: float, max_diff_bound: float) -> tuple[str, dict[str, Any]]:
    """A verdict's file name and what it hashes: the int8 models' keys, the mirrorings, the cases, the rule."""
    input_shape = (1, len(bundle.modalities), *(int(s) for s in bundle.crop_size[::-1]))
    return ovb.entry_key({
        "format": INT8_FORMAT, "mirrorings": int(n_mirrorings),
        "int8_models": [int8_key(m, input_shape, calibration)[0] for m in models],
        "acceptance": {"first_seed": int(seed), "cases": int(cases), "spacing_mm": _phantom_spacing(bundle),
                       "generator": __version__, "geometry": bundle.geometry().to_dict()},
        "rule": {"cnr_tolerance": float(cnr_tolerance), "max_diff_bound": float(max_diff_bound)}})


def verdict_path(key: str) -> Path:
    """Where the verdict of :func:`verdict_key` ``key`` is cached."""
    return ovb.cache_dir() / "int8-verdicts" / f"{key}.json"


def _read_verdict(path: Path, details: dict[str, Any]) -> Optional[Verdict]:
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        if stored.get("key") != details:
            logger.warning("int8 verdict %s was made for something else; checking again", path)
            return None
        return Verdict(**stored["verdict"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("int8 verdict %s is unusable (%s); checking again", path, exc)
        return None


def accept_int8(bundle: Any, models: Sequence[torch.nn.Module], n_mirrorings: int, settings: Any,
                cases: Optional[int] = None, seed: int = ACCEPTANCE_SEED, cnr_tolerance: float = CNR_TOLERANCE,
                max_diff_bound: float = MAX_DIFF_BOUND, progress: Optional[ProgressCallback] = None,
                cancel: Optional[CancelToken] = None) -> Verdict:
    """The verdict of the accuracy rule for ``models`` (int8 ``settings`` with their calibration) at
    ``n_mirrorings`` on ``cases`` phantoms (default :data:`ACCEPTANCE_CASES`): read from the cache,
    else measured and cached."""
    cases = ACCEPTANCE_CASES if cases is None else int(cases)
    key, details = verdict_key(bundle, models, n_mirrorings, settings.calibration, cases, seed, cnr_tolerance, max_diff_bound)
    path = verdict_path(key)
    verdict = _read_verdict(path, details)
    if verdict is not None:
        return verdict
    seeds = acceptance_seeds(bundle, cases, seed, cancel)
    verdict = evaluate_int8(bundle, models, n_mirrorings, settings, seeds, cnr_tolerance, max_diff_bound, progress, cancel)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(json.dumps({"key": details, "verdict": asdict(verdict)}, indent=2) + "\n", path)
    except OSError as exc:
        logger.warning("could not write the int8 verdict %s (%s); it will be measured again next time", path, exc)
    return verdict


def int8_settings(settings: Any, bundle: Any, models: Sequence[torch.nn.Module], n_mirrorings: int,
                  progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None,
                  calibration_cases: Optional[int] = None, **rule: Any) -> Any:
    """``settings`` (precision int8) with ``bundle``'s calibration set, once the accuracy rule accepts
    ``models`` at ``n_mirrorings`` (calibrating and checking on first use: minutes for a 3 mm model).

    ``calibration_cases``: :func:`bundle_calibration`'s ``cases`` (default :data:`CALIBRATION_CASES`); ``rule``: :func:`accept_int8`'s
    ``cases``, ``seed``, ``cnr_tolerance`` and ``max_diff_bound``.

    Raises:
        Int8Refused: the rule refused int8 (the message gives the numbers and the fix).
    """
    report = progress or null_progress
    calibrated = replace(settings, calibration=bundle_calibration(
        bundle, CALIBRATION_CASES if calibration_cases is None else calibration_cases, progress=report, cancel=cancel))
    verdict = accept_int8(bundle, models, n_mirrorings, calibrated, progress=report, cancel=cancel, **rule)
    if not verdict.accepted:
        raise Int8Refused(f"int8 refused for model {bundle.name!r}: {verdict.describe()}. Use --precision exact (fp32) "
                          "instead, or more predictions (all folds, --flips 8: an average of more predictions carries "
                          "less of int8's error).")
    report("int8", 0.0, f"int8 accepted: {verdict.describe()}")
    return calibrated
