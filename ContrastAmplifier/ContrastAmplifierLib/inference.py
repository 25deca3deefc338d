"""``amplify_case``: T1, T2-FLAIR, ADC and T1c in, T1c-pro out, on the T1c's own grid.

Paper, "Training and evaluating the model": the networks were trained on (T1, T2-FLAIR, ADC,
T1c-low) -> T1c; at test time the routine T1c replaces T1c-low and the 5 fold models x 8
mirrorings are averaged, giving the amplified "T1c-pro" image.

Intensity mapping back to the T1c's scale (the network works on [0, 1] normalised images):

1. the prediction ``p`` in [0, 1] is turned back into a brain z-score with the bundle's T1c clip
   percentiles ``(lo, hi)``: ``z = lo + p * (hi - lo)`` (inverse of the input normalisation);
2. ``z`` is mapped to the native grid (linear interpolation, inverse of the atlas affine);
3. the z-score becomes intensity with the mean and SD of the *input* T1c inside its brain mask
   (native grid): ``T1c-pro = mean_T1c + z * sd_T1c``. A voxel the network leaves unchanged thus
   keeps its T1c value, up to clipping at the percentiles, and T1c-pro is windowed like the T1c.
4. Outside the brain mask (skull, scalp, neck) T1c-pro holds the input T1c unchanged, so the
   image reads like a whole head; ``outside_brain="zero"`` blanks it instead.

That is the ``"direct"`` mapping: T1c-pro *is* the prediction, at the model's resolution. The
``"residual"`` mapping (beyond the paper) adds only the network's *change* to the native T1c:
``T1c-pro = T1c + sd_T1c * native(z_out - z_in)``, where ``z_in`` is the T1c input the network
saw (same clip, same atlas grid). A voxel the network leaves unchanged then keeps its native
T1c value exactly, so the T1c's own resolution survives a model that works on a coarser grid
(the 3 mm phantom demo on a 1 mm T1c: same enhancement, no 3 mm blur), and nothing is capped at
the upper clip. ``"auto"`` (default) takes ``"residual"`` when the model's grid is more than
:data:`RESIDUAL_SPACING_RATIO` times coarser than the T1c's finest spacing (or more), else ``"direct"``
(the paper's case: a 1 mm model on a ~1 mm T1c).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

import numpy as np
import SimpleITK as sitk

from .bundle import ModelBundle
from .ensemble import InferenceSettings, configure_cpu_threads, predict_ensemble
from .imageio import ImageLike, read_image, write_image_atomic
from .preprocessing import PreprocessedCase, preprocess_case
from ContrastAmplifierCommon.progress import CancelToken, ProgressCallback, SubProgress, check_cancel, null_progress

if TYPE_CHECKING:
    import torch

    from .dicom_series import DicomSeriesResult

#: Inputs of :func:`amplify_case`, in the paper's order (Figure 1).
INPUT_MODALITIES = ("t1", "flair", "adc", "t1c")
#: How the prediction returns to the native T1c grid (module docstring).
MAPPINGS = ("auto", "direct", "residual")
#: ``mapping="auto"`` adds the network's change to the native T1c (residual) when the model's grid
#: spacing exceeds this multiple of the T1c's finest voxel spacing.
RESIDUAL_SPACING_RATIO = 1.5
#: Formats T1c-pro can be written in: single-file formats only, so that the atomic rename moves
#: the whole image (a .mhd/.nhdr header would point at a data file under a temporary name).
OUTPUT_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")


@dataclass
class AmplifyResult:
    """What :func:`amplify_case` produced.

    Attributes:
        image: T1c-pro on the native T1c grid (float32, T1c intensity scale).
        atlas_prediction: mean ensemble prediction in [0, 1] on the atlas crop grid (z, y, x).
        preprocessed: the preprocessing result (transforms, masks, normalised inputs).
        output_path: where the image was written, if it was.
        n_predictions: folds x mirrorings averaged.
        timings_s: seconds per stage and ``"total"``.
        mapping: ``"direct"`` or ``"residual"`` (see the module docstring).
        dicom_series: the DICOM series written (``out_dicom``), if it was.
    """

    image: sitk.Image
    atlas_prediction: np.ndarray
    preprocessed: PreprocessedCase
    output_path: Optional[Path] = None
    n_predictions: int = 0
    timings_s: dict[str, float] = field(default_factory=dict)
    mapping: str = "direct"
    dicom_series: Optional[DicomSeriesResult] = None

    @property
    def suspect_registrations(self) -> list[str]:
        """Modalities whose registration to the T1c looks wrong (``registration.suspect`` findings)."""
        from .plausibility import suspect_modalities

        return suspect_modalities(self.preprocessed.findings)


def _resolve_bundle(bundle: Union[ModelBundle, str, os.PathLike, None]) -> ModelBundle:
    if isinstance(bundle, ModelBundle):
        return bundle
    from .registry import resolve_model

    return resolve_model(None if bundle is None else str(bundle))


def brain_statistics(image: sitk.Image, mask: sitk.Image) -> tuple:
    """Mean and SD of ``image`` inside ``mask`` (same grid)."""
    values = sitk.GetArrayViewFromImage(image)[sitk.GetArrayViewFromImage(mask) > 0].astype(np.float64)
    if values.size < 2:
        raise ValueError("the T1c brain mask is empty: skull stripping failed; check the QC picture")
    return float(values.mean()), float(values.std())


def prediction_to_native_intensity(
    prediction: np.ndarray,
    case: PreprocessedCase,
    t1c_native: sitk.Image,
    clip: tuple,
    outside_brain: str = "t1c",
    mapping: str = "direct",
) -> sitk.Image:
    """Map an atlas-space [0, 1] prediction to T1c intensities on the native T1c grid (see module doc).

    ``mapping`` is ``"direct"`` or ``"residual"``; the residual needs the normalised T1c input
    of ``case`` (``case.arrays["t1c"]``), which :func:`~.preprocessing.preprocess_case` keeps.
    """
    if outside_brain not in ("t1c", "zero"):
        raise ValueError(f"outside_brain must be 't1c' or 'zero' (got {outside_brain!r})")
    if mapping not in ("direct", "residual"):
        raise ValueError(f"mapping must be 'direct' or 'residual' here (got {mapping!r})")
    low, high = clip
    z_atlas = (low + np.clip(prediction, 0.0, 1.0) * (high - low)).astype(np.float32)
    if mapping == "residual":
        z_input = (low + case.arrays["t1c"] * (high - low)).astype(np.float32)
        z_atlas = np.where(case.mask_array, z_atlas - z_input, 0.0).astype(np.float32)
    # Thick native slices get the mean over their slab (a 5 mm slice of a 1 mm prediction), not the centre plane.
    z_native = sitk.GetArrayFromImage(case.to_native(z_atlas, average_slabs=True))
    mean, sd = brain_statistics(t1c_native, case.native_brain_mask)
    native_t1c = sitk.GetArrayFromImage(t1c_native).astype(np.float32)
    # Brain voxels that the atlas crop covers get the prediction; everything else keeps the T1c.
    covered = sitk.GetArrayFromImage(case.to_native(np.ones(z_atlas.shape, np.float32), default=0.0)) > 0.999
    brain = (sitk.GetArrayViewFromImage(case.native_brain_mask) > 0) & covered
    out = native_t1c.copy() if outside_brain == "t1c" else np.zeros_like(native_t1c)
    if mapping == "residual":
        out[brain] = native_t1c[brain] + z_native[brain] * sd
    else:
        out[brain] = mean + z_native[brain] * sd
    image = sitk.GetImageFromArray(out.astype(np.float32))
    image.CopyInformation(t1c_native)
    return image


def resolve_mapping(mapping: str, model_spacing: Sequence[float], t1c_spacing: Sequence[float]) -> str:
    """``"direct"`` or ``"residual"`` for ``mapping`` (``"auto"``: see :data:`RESIDUAL_SPACING_RATIO`)."""
    if mapping not in MAPPINGS:
        raise ValueError(f"--mapping must be one of {', '.join(MAPPINGS)} (got {mapping!r})")
    if mapping != "auto":
        return mapping
    coarser = min(model_spacing) >= RESIDUAL_SPACING_RATIO * min(t1c_spacing) - 1e-6
    return "residual" if coarser else "direct"


def amplify_case(
    t1: ImageLike,
    flair: ImageLike,
    adc: ImageLike,
    t1c: ImageLike,
    bundle: Union[ModelBundle, str, os.PathLike, None] = None,
    out_path: Union[str, os.PathLike, None] = None,
    folds: Optional[Sequence[int]] = None,
    n_mirrorings: int = 8,
    device: str = "auto",
    precision: str = "auto",
    compile: Optional[bool] = None,
    skull_strip_mode: Optional[str] = None,
    brain_mask: Optional[ImageLike] = None,
    outside_brain: str = "t1c",
    mapping: str = "auto",
    threads: Optional[int] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
    overwrite: bool = False,
    strict: bool = False,
    out_dicom: Union[str, os.PathLike, None] = None,
    t1c_dicom: Union[str, os.PathLike, None] = None,
    backend: str = "auto",
) -> AmplifyResult:
    """Amplify the contrast of one case: the paper's T1c -> T1c-pro.

    Args:
        t1, flair, adc, t1c: images or paths (NIfTI/NRRD/MHA/DICOM folder), each on its own grid.
        bundle: a loaded bundle, a registry name, a bundle folder, or ``None`` for the default.
        out_path: if given, T1c-pro is written there atomically (temp file + rename). The path is
            checked before any work (:func:`.outputs.check_output_file`): a supported image
            ending, not an input, not an existing folder, writable, and not an existing file
            unless ``overwrite``.
        folds: fold models to average (default: all of the bundle's).
        n_mirrorings: 1, 2, 4 or 8 (paper: 8).
        device: auto, cpu, cuda, cuda:N or mps (network and HD-BET).
        precision: auto (bf16 on CUDA, fp32 on CPU), exact (fp32), fast (bf16 autocast) or int8
            (OpenVINO; :func:`.openvino_int8.int8_settings` calibrates and checks it first, or refuses it).
        compile: ``torch.compile`` each fold model; ``None`` decides by device and size (see
            :class:`~.ensemble.InferenceSettings`).
        skull_strip_mode: HD-BET fast/accurate; default accurate on CUDA, fast on CPU.
        brain_mask: optional native-T1c brain mask that replaces HD-BET.
        outside_brain: "t1c" (keep the input outside the brain) or "zero".
        mapping: "auto", "direct" or "residual" (module docstring).
        threads: CPU threads for torch (default: all cores).
        progress: ``(stage, fraction, message)`` callback over the whole job.
        cancel: checked between every step and every forward pass; nothing is written when set.
        overwrite: allow replacing an existing ``out_path``, and an earlier T1c-pro series in ``out_dicom``.
        strict: preprocessing plausibility warnings become errors (:func:`.preprocessing.preprocess_case`).
        out_dicom: if given, T1c-pro is also written there as a DICOM MR series, after ``out_path``
            (:func:`.dicom_series.write_t1c_pro_series`: the T1c's study when ``t1c`` is a DICOM
            series folder, else a new de-identified study). The folder is checked before any work
            (:func:`.dicom_series.check_dicom_output_folder`): new or empty, or holding an earlier
            T1c-pro series with ``overwrite``.
        t1c_dicom: the DICOM series folder the T1c was read from, when ``t1c`` itself is an image
            or an exported file (as the Slicer module passes it): the ``out_dicom`` series then joins
            that series' study (its grid must be the T1c's).
        backend: "auto" (OpenVINO on CPU when installed, else torch), "torch" or "openvino" (CPU
            only; :mod:`.openvino_backend`), for the ensemble and for HD-BET where it runs on the CPU
            (:mod:`.skullstrip_openvino`). Checked before any work.

    Returns:
        :class:`AmplifyResult` with T1c-pro on the native T1c grid.
    """
    start = time.perf_counter()
    report = progress or null_progress
    sources: list[Union[str, os.PathLike]] = [
        p for p in (t1, flair, adc, t1c, brain_mask, t1c_dicom) if isinstance(p, (str, os.PathLike))]
    out_path, out_dicom = check_case_outputs(sources, out_path, out_dicom, overwrite, t1c_dicom)
    model_bundle = _resolve_bundle(bundle)
    check_modalities(model_bundle)
    settings = InferenceSettings.create(device, precision, compile=compile, backend=backend)
    if settings.device.type == "cpu":
        configure_cpu_threads(threads)
    models = None
    if settings.precision == "int8":  # calibrated and checked once per model (cached); a refusal comes before any work
        from .openvino_int8 import int8_settings

        models = model_bundle.load_models(folds)  # loaded once: the check's, then the ensemble's
        settings = int8_settings(settings, model_bundle, models, n_mirrorings, report, cancel)
    hd_bet_device = "cpu" if settings.device.type != "cuda" else str(settings.device)
    mode = skull_strip_mode or ("accurate" if settings.device.type == "cuda" else "fast")
    prepared = prepare_case({"t1": t1, "flair": flair, "adc": adc, "t1c": t1c}, model_bundle, mapping=mapping,
                            skull_strip_mode=mode, skull_strip_device=hd_bet_device, skull_strip_backend=backend, brain_mask=brain_mask,
                            progress=report, cancel=cancel, strict=strict)
    return finish_case(prepared, model_bundle, settings, models=models, folds=folds, n_mirrorings=n_mirrorings,
                       outside_brain=outside_brain, out_path=out_path, out_dicom=out_dicom, t1c_dicom=t1c_dicom,
                       overwrite=overwrite, progress=report, cancel=cancel, start=start)


def check_case_outputs(
    sources: Sequence[Union[str, os.PathLike]],
    out_path: Union[str, os.PathLike, None],
    out_dicom: Union[str, os.PathLike, None],
    overwrite: bool,
    t1c_dicom: Union[str, os.PathLike, None] = None,
) -> tuple[Optional[Path], Optional[Path]]:
    """:func:`amplify_case`'s checks of its outputs, before any work: ``(out_path, out_dicom)`` resolved.

    ``sources``: the input paths (no output may be one of them). See ``out_path``, ``out_dicom`` and
    ``t1c_dicom`` of :func:`amplify_case` for what is refused.
    """
    if t1c_dicom is not None and out_dicom is None:
        raise ValueError(f"a T1c DICOM series ({t1c_dicom}) is only used for a DICOM output; add an output folder "
                         "(--out-dicom DIR) or leave it out.")
    checked_path = checked_dicom = None
    if out_path is not None:
        from ContrastAmplifierCommon.outputs import check_output_file

        checked_path = check_output_file(out_path, OUTPUT_SUFFIXES, inputs=sources, overwrite=overwrite,
                                         what="T1c-pro output")
    if out_dicom is not None:
        from .dicom_series import check_dicom_output_folder

        checked_dicom = check_dicom_output_folder(out_dicom, inputs=sources, overwrite=overwrite,
                                                  outputs=[checked_path] if checked_path is not None else [])
    return checked_path, checked_dicom


def check_modalities(model_bundle: ModelBundle) -> None:
    """Refuse a bundle that expects an input :func:`amplify_case` does not take."""
    missing = [m for m in model_bundle.modalities if m not in INPUT_MODALITIES]
    if missing:
        raise ValueError(f"bundle {model_bundle.name!r} expects modalities {missing} that amplify_case does not take")


@dataclass
class PreparedCase:
    """The first half of :func:`amplify_case` (:func:`prepare_case`), what the second (:func:`finish_case`) needs.

    Plain data (SimpleITK images and transforms, numpy arrays): it pickles exactly, so the two halves
    may run in different processes (:mod:`.cohort_dask`).

    Attributes:
        preprocessed: the preprocessing result.
        t1c: the native T1c as read (the grid and intensities T1c-pro is mapped back onto).
        inputs: the inputs as given (paths or images), for the DICOM output's sources.
        mapping: ``"direct"`` or ``"residual"`` (resolved).
        seconds: time of the preprocessing.
    """

    preprocessed: PreprocessedCase
    t1c: sitk.Image
    inputs: dict[str, ImageLike]
    mapping: str
    seconds: float


def prepare_case(
    inputs: Mapping[str, ImageLike],
    model_bundle: ModelBundle,
    mapping: str = "auto",
    skull_strip_mode: str = "fast",
    skull_strip_device: str = "cpu",
    skull_strip_backend: str = "auto",
    brain_mask: Optional[ImageLike] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
    strict: bool = False,
) -> PreparedCase:
    """CPU half of :func:`amplify_case`: read the T1c, resolve the mapping, preprocess (0-40% of ``progress``).

    Args:
        inputs: ``t1``, ``flair``, ``adc``, ``t1c`` (paths or images).
        model_bundle: the bundle (its geometry and modalities).
        skull_strip_mode, skull_strip_device: HD-BET's (resolved: ``"fast"``/``"accurate"``, ``"cpu"``/``"cuda[:N]"``).
        skull_strip_backend: HD-BET's runtime, ``amplify_case``'s ``backend`` (auto, torch, openvino; CPU only).
        Others: as :func:`amplify_case`'s.
    """
    report = progress or null_progress
    t1c_image = read_image(inputs["t1c"], "T1c")
    chosen_mapping = resolve_mapping(mapping, model_bundle.spacing, t1c_image.GetSpacing())
    given: dict[str, ImageLike] = {**inputs, "t1c": t1c_image}
    t0 = time.perf_counter()
    case = preprocess_case(
        {m: given[m] for m in model_bundle.modalities}, model_bundle.geometry(), skull_strip_mode=skull_strip_mode,
        device=skull_strip_device, backend=skull_strip_backend, brain_mask=brain_mask, progress=SubProgress(report, 0.0, 0.4), cancel=cancel,
        strict=strict,
    )
    seconds = time.perf_counter() - t0
    check_cancel(cancel)
    return PreparedCase(case, t1c_image, dict(inputs), chosen_mapping, seconds)


def finish_case(
    prepared: PreparedCase,
    model_bundle: ModelBundle,
    settings: InferenceSettings,
    models: Optional[Sequence[torch.nn.Module]] = None,
    folds: Optional[Sequence[int]] = None,
    n_mirrorings: int = 8,
    outside_brain: str = "t1c",
    out_path: Optional[Path] = None,
    out_dicom: Optional[Path] = None,
    t1c_dicom: Union[str, os.PathLike, None] = None,
    overwrite: bool = False,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
    start: Optional[float] = None,
) -> AmplifyResult:
    """Ensemble half of :func:`amplify_case`: predict, map back to the T1c grid, write (40-100% of ``progress``).

    Args:
        prepared: :func:`prepare_case`'s result.
        settings: device, precision, backend (resolved).
        models: the fold networks of ``folds`` already loaded (a worker's cache); ``None`` loads them.
        out_path, out_dicom: checked outputs (:func:`check_case_outputs`), or ``None``.
        start: ``perf_counter`` at the start of the case, for ``timings_s["total"]`` (default: now
            minus the preprocessing time).
        Others: as :func:`amplify_case`'s.
    """
    report = progress or null_progress
    case = prepared.preprocessed
    timings: dict[str, float] = {"preprocess": prepared.seconds}
    start = time.perf_counter() - prepared.seconds if start is None else start
    t0 = time.perf_counter()
    report("load model", 0.4, f"{model_bundle.name}: folds {list(folds) if folds is not None else model_bundle.folds}")
    if models is None:
        models = model_bundle.load_models(folds)
    arrays = case.arrays
    stacked = np.stack([arrays[m] for m in model_bundle.modalities]).astype(np.float32)
    prediction = predict_ensemble(models, stacked, n_mirrorings, settings, progress=SubProgress(report, 0.42, 0.92), cancel=cancel)
    prediction[~case.mask_array] = 0.0
    timings["ensemble"] = time.perf_counter() - t0
    check_cancel(cancel)

    t0 = time.perf_counter()
    report("map back", 0.93, f"atlas -> native T1c grid ({prepared.mapping})")
    image = prediction_to_native_intensity(prediction, case, prepared.t1c, model_bundle.geometry().clip_for("t1c"),
                                           outside_brain, prepared.mapping)
    timings["map_back"] = time.perf_counter() - t0
    check_cancel(cancel)

    written = None
    if out_path is not None:
        report("write", 0.97, str(out_path))
        written = write_image_atomic(image, out_path)
    series = None
    n_predictions = len(models) * n_mirrorings
    if out_dicom is not None:
        from .dicom_series import write_t1c_pro_series

        t0 = time.perf_counter()
        report("write DICOM", 0.98, str(out_dicom))
        details = (f"{n_predictions} predictions averaged ({len(models)} folds x {n_mirrorings} mirrorings), "
                   f"{prepared.mapping} mapping")
        given = prepared.inputs
        series = write_t1c_pro_series(image, out_dicom, t1c=given["t1c"] if t1c_dicom is None else t1c_dicom,
                                      model=model_bundle, sources={m: given[m] for m in ("t1", "flair", "adc")},
                                      details=details, overwrite=overwrite)  # no cancel once T1c-pro is written: both or neither
        timings["dicom"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - start
    from .imageio import display_name
    from .plausibility import suspect_modalities

    suspect = suspect_modalities(case.findings)
    check = f"; CHECK REGISTRATION: {', '.join(display_name(m) for m in suspect)}" if suspect else ""
    report("done", 1.0, f"T1c-pro from {n_predictions} predictions ({prepared.mapping} mapping){check}")
    return AmplifyResult(image, prediction, case, written, n_predictions, timings, prepared.mapping, series)
