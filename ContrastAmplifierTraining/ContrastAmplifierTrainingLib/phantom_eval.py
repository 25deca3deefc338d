"""``contrast-amplifier-train evaluate``: a bundle on phantom cases with known lesions, rerunnable.

Every case goes through the real pipeline (:func:`ContrastAmplifierLib.inference.amplify_case`;
by default with the case's own ``brain_mask.nii.gz`` instead of HD-BET) and is then measured on
its native T1c grid, every image first brought to the phantom's signal units (``phantom.json``:
paper protocol ``signal = stored / scanner_gain``, one gain for all sequences; clinical protocol
``signal = (physical - offset) / gain`` with each sequence's ``sequences.<name>.storage``).

Images compared (CSV prefixes): ``t1c_low`` (quarter dose), ``t1c`` (routine dose; also the
*identity* baseline), ``t1c_pro`` (the bundle's output), ``t1c_x4`` (quadruple dose, the
reference) and ``t1c_lin``, the *linear dose extrapolation* baseline to the quadruple dose::

    T1c-lin = T1c + 3 * (T1c - T1_on_T1c_grid)        (signal units)

where the pre-contrast T1 is resampled onto the T1c grid with the rigid transform that
preprocessing found (``result.preprocessed.t1c_to["t1"]``); T1c-low uses the phantom's true pose.

Per lesion (each label value of ``lesion_labels.nii.gz``), with the paper's formulae
(:mod:`ContrastAmplifierLib.metrics`, "Performance metrics")::

    CNR = (SI_lesion - SI_brain) / SD_brain;  LBR = SI_lesion / SI_brain;  CEP = 100 (SI_lesion - SI_lesion_pre) / SI_lesion_pre

(healthy brain = brain mask minus all lesions dilated by 3 mm; pre = the T1 on the T1c grid), and
the fraction of the T1c -> T1c-x4 CNR gap that T1c-pro recovers::

    gap fraction = (CNR_pro - CNR_t1c) / (CNR_x4 - CNR_t1c)

(0: no gain, 1: as conspicuous as the quadruple dose; undefined, NaN, where the gap
``CNR_x4 - CNR_t1c`` is below :data:`MIN_CNR_GAP`). Lesion size bands (< 5, 5-10, > 10 mm) use
the lesion's long-axis diameter: the phantom's true 3D long axis (``phantom.json``
``lesions_truth[].long_axis_3d_mm``), else the radiologist-style measurement of ``lesions.json``
(``long_mm``), else the largest distance between the label's voxel centres plus one voxel.

Per case, inside the brain mask, against T1c-x4: PSNR (data range = T1c-x4's range inside the
brain) and SSIM (:func:`ssim_in_mask`: the Gaussian-window SSIM of
:func:`ContrastAmplifierTrainingLib.metrics.ssim3d`, sigma 1.5 voxels, averaged over the brain);
and the *false enhancement* ratio ``mean |X - T1c| / sigma_T1c`` over non-enhancing normal white
matter (:func:`white_matter_roi`), sigma_T1c being the T1c's noise SD recorded in
``phantom.json`` (or estimated from the air in the image corners). Independent noise alone gives
``2 / sqrt(pi) = 1.13`` for T1c-x4; a T1c-pro that only denoises gives at most ``sqrt(2 / pi) = 0.80``.

SYNTHETIC PHANTOMS: the numbers show what the pipeline does to known lesions, not clinical benefit.
"""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ContrastAmplifierCommon.atomicfile import apply_umask, save_figure_atomic, write_text_atomic
from ContrastAmplifierCommon.progress import CancelToken, ProgressCallback, SubProgress, check_cancel, null_progress
from ContrastAmplifierLib.metrics import RoiContrast, healthy_brain_roi, roi_contrast

#: CSV prefix -> display name, in table order. ``t1c`` is also the identity baseline.
IMAGES = {"t1c_low": "T1c-low", "t1c": "T1c", "t1c_pro": "T1c-pro", "t1c_x4": "T1c-x4", "t1c_lin": "T1c-lin"}
#: Images compared with T1c-x4 per case (PSNR, SSIM, false enhancement).
COMPARED = ("t1c", "t1c_pro", "t1c_lin")
#: T1c-x4 is four times the routine dose: linear extrapolation adds 3 x the routine enhancement.
DOSE_FACTOR = 3.0
SIZE_BANDS = ("<5 mm", "5-10 mm", ">10 mm")
#: Healthy-brain ROI of the contrast metrics: brain minus lesions dilated by this much (as the demo).
HEALTHY_MARGIN_MM = 3.0
#: Gap fractions are left undefined (NaN) where T1c-x4 beats T1c by less than this CNR.
MIN_CNR_GAP = 0.25
#: White-matter ROI: template WM fraction at least this, away from lesions and their oedema.
WM_MIN_FRACTION = 0.9
#: Lesion neighbourhood left out of the WM ROI: the oedema ellipsoid (semi-axes x oedema_scale)
#: grown by this factor (irregular glioma oedema reaches ~1.4x) plus a margin.
OEDEMA_EXCLUSION_FACTOR = 1.5
EXCLUSION_MARGIN_MM = 3.0
#: Without phantom.json: healthy brain at least this far from any lesion stands in for white matter.
FALLBACK_EXCLUSION_MM = 15.0
#: Output files (checked before any work; ``--overwrite`` replaces them).
OUTPUT_FILES = ("lesions.csv", "cases.csv", "summary.md", "evaluation.json", "evaluation.png")
REQUIRED_INPUTS = ("t1", "flair", "adc", "t1c")
PHANTOM_LABEL = "synthetic phantom evaluation - not clinical data"


# ---------------------------------------------------------------------------------------------
# Small metric functions (arrays in, numbers out)
# ---------------------------------------------------------------------------------------------

def parse_seed_range(text: str, option: str = "--phantom-seeds") -> list[int]:
    """``"730000-730019"`` -> the 20 seeds 730000..730019 (inclusive); ``"5"`` -> ``[5]``.

    Raises:
        ValueError: not ``FIRST-LAST`` with integers ``0 <= FIRST <= LAST``.
    """
    parts = str(text).strip().split("-")
    fix = f"give FIRST-LAST with FIRST <= LAST (inclusive), e.g. {option} 730000-730019, or one seed"
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"{option} {text!r} is not a seed range: {fix}.") from None
    if len(values) not in (1, 2) or min(values) < 0:
        raise ValueError(f"{option} {text!r} is not a seed range: {fix}.")
    first, last = values[0], values[-1]
    if last < first:
        raise ValueError(f"{option} {text!r}: the last seed is below the first; {fix}.")
    return list(range(first, last + 1))


def size_band(long_axis_mm: float) -> str:
    """``"<5 mm"``, ``"5-10 mm"`` (5 and 10 included) or ``">10 mm"`` of a long-axis diameter."""
    if long_axis_mm < 5.0:
        return SIZE_BANDS[0]
    return SIZE_BANDS[1] if long_axis_mm <= 10.0 else SIZE_BANDS[2]


def gap_fraction(cnr_pro: float, cnr_t1c: float, cnr_x4: float, min_gap: float = MIN_CNR_GAP) -> float:
    """(CNR_pro - CNR_t1c) / (CNR_x4 - CNR_t1c); NaN where the gap is below ``min_gap`` (or not finite)."""
    gap = cnr_x4 - cnr_t1c
    if not math.isfinite(gap) or not math.isfinite(cnr_pro) or gap < min_gap:
        return math.nan
    return (cnr_pro - cnr_t1c) / gap


def linear_dose_baseline(t1c: np.ndarray, t1_on_t1c: np.ndarray, factor: float = DOSE_FACTOR) -> np.ndarray:
    """``T1c + factor * (T1c - T1)`` (signal units); T1c itself where the T1 is missing (NaN: outside its field of view)."""
    t1c = np.asarray(t1c, dtype=np.float64)
    t1 = np.asarray(t1_on_t1c, dtype=np.float64)
    return np.where(np.isfinite(t1), t1c + factor * (t1c - t1), t1c)


def psnr_in_mask(image: np.ndarray, reference: np.ndarray, mask: np.ndarray, data_range: Optional[float] = None) -> float:
    """PSNR (dB) of ``image`` against ``reference`` over ``mask``; data range default: the reference's max - min there."""
    mask = np.asarray(mask, bool)
    ref = np.asarray(reference, dtype=np.float64)[mask]
    if ref.size == 0:
        return math.nan
    if data_range is None:
        data_range = float(ref.max() - ref.min())
    mse = float(np.mean((np.asarray(image, dtype=np.float64)[mask] - ref) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range ** 2 / mse) if data_range > 0 else math.nan


def ssim_in_mask(image: np.ndarray, reference: np.ndarray, mask: np.ndarray, data_range: float, sigma: float = 1.5) -> float:
    """Mean SSIM over ``mask`` of the whole-volume SSIM map (Wang et al. 2004).

    The map is :func:`ContrastAmplifierTrainingLib.metrics.ssim3d`'s (separable Gaussian window,
    ``sigma`` voxels, radius ``3 sigma`` capped by the size, K1 0.01, K2 0.03), computed with
    scipy and averaged over ``mask`` instead of the whole crop; the volume's edges repeat the
    nearest voxel. Away from the edges the map equals ssim3d's voxel for voxel.
    """
    x = np.asarray(image, dtype=np.float64)
    y = np.asarray(reference, dtype=np.float64)
    mask = np.asarray(mask, bool)
    if not mask.any():
        return math.nan
    radius = max(1, min(int(3 * sigma + 0.5), (min(x.shape) - 1) // 2))

    def blur(a: np.ndarray) -> np.ndarray:
        return ndimage.gaussian_filter(a, sigma, truncate=radius / sigma, mode="nearest")

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = blur(x), blur(y)
    sxx = blur(x * x) - mu_x ** 2
    syy = blur(y * y) - mu_y ** 2
    sxy = blur(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (sxx + syy + c2))
    return float(ssim_map[mask].mean())


def false_enhancement_ratio(image: np.ndarray, t1c: np.ndarray, roi: np.ndarray, noise_sd: float) -> float:
    """``mean |image - T1c|`` over ``roi`` divided by the T1c's noise SD (NaN without ROI or noise)."""
    roi = np.asarray(roi, bool)
    if not roi.any() or not noise_sd > 0:
        return math.nan
    diff = np.asarray(image, dtype=np.float64)[roi] - np.asarray(t1c, dtype=np.float64)[roi]
    return float(np.mean(np.abs(diff))) / float(noise_sd)


def long_axis_from_labels(labels: np.ndarray, lesion_id: int, spacing_xyz: Sequence[float]) -> float:
    """Largest distance (mm) between the voxel centres of ``lesion_id`` plus one voxel along that direction.

    The 3D analogue of the radiologist-style measure of :func:`ContrastAmplifierLib.phantom_lesions.measure_lesion`
    (half a voxel added at both ends). ``labels`` is (z, y, x); the grid's direction does not change distances.
    """
    k, j, i = np.nonzero(np.asarray(labels) == lesion_id)
    if k.size == 0:
        return math.nan
    s = np.asarray(spacing_xyz, dtype=np.float64)
    points = np.stack([i, j, k], axis=1).astype(np.float64) * s
    if len(points) > 200:  # the farthest pair lies on the convex hull
        from scipy.spatial import ConvexHull, QhullError

        try:
            points = points[ConvexHull(points).vertices]
        except QhullError:  # flat lesion (one slice): keep every point
            pass
    d2 = ((points[:, None, :] - points[None, :, :]) ** 2).sum(-1)
    a, b = np.unravel_index(int(np.argmax(d2)), d2.shape)
    length = float(math.sqrt(d2[a, b]))
    u = (points[b] - points[a]) / length if length > 0 else np.array([1.0, 0.0, 0.0])
    return length + float(np.abs(u) @ s)


def estimate_noise_sd(volume: np.ndarray) -> float:
    """Noise SD from the air in the 8 corner blocks (1/8 of each axis): Rayleigh median / sqrt(2 ln 2).

    NaN when the corners are zero (a zero-filled or skull-stripped background holds no noise).
    """
    v = np.asarray(volume, dtype=np.float64)
    blocks = []
    for corner in np.ndindex(2, 2, 2):
        sl = tuple(slice(0, max(2, n // 8)) if c == 0 else slice(n - max(2, n // 8), n) for c, n in zip(corner, v.shape))
        blocks.append(v[sl].ravel())
    median = float(np.median(np.abs(np.concatenate(blocks))))
    return median / math.sqrt(2.0 * math.log(2.0)) if median > 0 else math.nan


def finite_mean(values: Sequence[float]) -> float:
    """Mean of the finite values (NaN if none)."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return float(np.mean(finite)) if finite else math.nan


# ---------------------------------------------------------------------------------------------
# Phantom truth: scales, noise, lesion sizes, white matter
# ---------------------------------------------------------------------------------------------

def signal_scale(params: Optional[Mapping[str, Any]], name: str) -> tuple[float, float]:
    """``(gain, offset)`` with ``physical = gain * signal + offset`` for sequence ``name``: the
    phantom's own (:func:`ContrastAmplifierLib.phantom.signal_scale`: clinical storage, or the paper
    protocol's one scanner gain, so T1c and T1c-x4 share one scale); without ``phantom.json``: (1, 0),
    i.e. the images are taken to share one scale already.
    """
    from ContrastAmplifierLib.phantom import signal_scale as phantom_scale

    return phantom_scale(params, name) if params else (1.0, 0.0)


def to_signal(array: np.ndarray, params: Optional[Mapping[str, Any]], name: str) -> np.ndarray:
    """Stored/physical intensities of sequence ``name`` -> the phantom's signal units (float64)."""
    gain, offset = signal_scale(params, name)
    return (np.asarray(array, dtype=np.float64) - offset) / gain


@dataclass(frozen=True)
class LesionSize:
    """A lesion's long-axis diameter (mm), where it came from, and the lesions.json measure (NaN if none)."""

    long_axis_mm: float
    source: str
    measured_long_mm: float = math.nan
    kind: str = ""


def lesion_sizes(labels: np.ndarray, spacing_xyz: Sequence[float], params: Optional[Mapping[str, Any]],
                 lesions_json: Optional[Mapping[str, Any]]) -> dict[int, LesionSize]:
    """Long axis of every label value > 0 (see the module docstring for the order of sources)."""
    truth = {int(e["id"]): e for e in (params or {}).get("lesions_truth", [])}
    measured = {int(e["id"]): e for e in (lesions_json or {}).get("lesions", [])}
    out: dict[int, LesionSize] = {}
    for lesion_id in (int(v) for v in np.unique(labels) if v > 0):
        m = measured.get(lesion_id, {})
        t = truth.get(lesion_id, {})
        kind = str(t.get("kind", m.get("kind", "")))
        measured_mm = float(m["long_mm"]) if "long_mm" in m else math.nan
        if "long_axis_3d_mm" in t:
            out[lesion_id] = LesionSize(float(t["long_axis_3d_mm"]), "phantom.json long_axis_3d_mm", measured_mm, kind)
        elif math.isfinite(measured_mm):
            out[lesion_id] = LesionSize(measured_mm, "lesions.json long_mm", measured_mm, kind)
        else:
            out[lesion_id] = LesionSize(long_axis_from_labels(labels, lesion_id, spacing_xyz), "label voxels", measured_mm, kind)
    return out


def _voxel_centres(t1c: sitk.Image, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """Physical LPS points (N, 3) of the index box [lo, hi) (x, y, z) and their (z, y, x) index arrays."""
    kk, jj, ii = np.meshgrid(*(np.arange(lo[a], hi[a]) for a in (2, 1, 0)), indexing="ij")
    index = np.stack([ii.ravel(), jj.ravel(), kk.ravel()], axis=1).astype(np.float64) * np.asarray(t1c.GetSpacing())
    direction = np.asarray(t1c.GetDirection(), dtype=np.float64).reshape(3, 3)
    return np.asarray(t1c.GetOrigin()) + index @ direction.T, (kk.ravel(), jj.ravel(), ii.ravel())


def lesion_neighbourhood(params: Mapping[str, Any], t1c: sitk.Image, factor: float = OEDEMA_EXCLUSION_FACTOR,
                         margin_mm: float = EXCLUSION_MARGIN_MM) -> np.ndarray:
    """T1c-grid voxels inside any lesion's oedema ellipsoid (true shape from ``lesions_truth``) grown by
    ``factor`` plus ``margin_mm``: where the tissue is not normal white matter."""
    size = np.asarray(t1c.GetSize())
    out = np.zeros(tuple(size[::-1]), dtype=bool)
    a_t1c = np.asarray(params["sequences"]["t1c"]["world_to_native_lps"], dtype=np.float64)
    native_to_world = np.linalg.inv(a_t1c)
    spacing = np.asarray(t1c.GetSpacing())
    for lesion in params.get("lesions_truth", []):
        semi = np.asarray(lesion["semi_axes_mm"], float) * max(float(lesion.get("oedema_scale", 1.0)), 1.0) * factor + margin_mm
        centre = np.asarray(lesion["centre_lps_world"], float)
        centre_native = a_t1c[:3, :3] @ centre + a_t1c[:3, 3]
        centre_index = np.asarray(t1c.TransformPhysicalPointToContinuousIndex(tuple(float(v) for v in centre_native)))
        half = np.ceil(float(semi.max()) / spacing) + 1
        lo = np.maximum(np.floor(centre_index - half), 0).astype(int)
        hi = np.minimum(np.ceil(centre_index + half) + 1, size).astype(int)
        if np.any(hi <= lo):
            continue
        points, index = _voxel_centres(t1c, lo, hi)
        world = points @ native_to_world[:3, :3].T + native_to_world[:3, 3]
        u = (world - centre) @ np.asarray(lesion["rotation_lps"], float)  # coordinates along the principal axes
        out[index] |= ((u / semi) ** 2).sum(axis=1) <= 1.0
    return out


def white_matter_fraction(params: Mapping[str, Any], t1c: sitk.Image) -> np.ndarray:
    """The phantom's (template) white-matter fraction on the T1c grid, through the case's true pose."""
    from ContrastAmplifierLib.phantom_acquisition import world_image
    from ContrastAmplifierLib.phantom_anatomy import load_template_anatomy

    anatomy = load_template_anatomy(int(params["world"]["truth_grid"]["resolution_mm"]))
    world = world_image(anatomy.wm.astype(np.float32), anatomy.origin, anatomy.spacing)
    inverse = np.linalg.inv(np.asarray(params["sequences"]["t1c"]["world_to_native_lps"], dtype=np.float64))
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(inverse[:3, :3].ravel().tolist())
    transform.SetTranslation(inverse[:3, 3].tolist())
    return sitk.GetArrayFromImage(sitk.Resample(world, t1c, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32))


def white_matter_roi(params: Optional[Mapping[str, Any]], t1c: sitk.Image, brain: np.ndarray, labels: np.ndarray
                     ) -> tuple[np.ndarray, str]:
    """Non-enhancing normal white matter on the T1c grid, and how it was found.

    Phantom case: template WM fraction >= :data:`WM_MIN_FRACTION`, inside the brain mask, outside every
    lesion's grown oedema ellipsoid (:func:`lesion_neighbourhood`) and its labels. Otherwise (no
    ``phantom.json``): the brain mask eroded by one voxel, at least :data:`FALLBACK_EXCLUSION_MM`
    from any lesion (healthy brain, not white matter only).
    """
    brain = np.asarray(brain, bool)
    lesions = np.asarray(labels) > 0
    if params and "world" in params and "lesions_truth" in params:
        roi = (white_matter_fraction(params, t1c) >= WM_MIN_FRACTION) & brain & ~lesions
        roi &= ~lesion_neighbourhood(params, t1c)
        return roi, (f"phantom white matter (template WM fraction >= {WM_MIN_FRACTION}) inside the brain mask, outside "
                     f"each lesion's oedema ellipsoid x {OEDEMA_EXCLUSION_FACTOR} + {EXCLUSION_MARGIN_MM:g} mm")
    roi = ndimage.binary_erosion(brain, iterations=1)
    if lesions.any():
        distance = ndimage.distance_transform_edt(~lesions, sampling=tuple(t1c.GetSpacing())[::-1])
        roi &= distance >= FALLBACK_EXCLUSION_MM
    return roi, f"brain mask eroded by 1 voxel, >= {FALLBACK_EXCLUSION_MM:g} mm from any lesion (no phantom.json: no tissue map)"


def t1c_noise_sd(params: Optional[Mapping[str, Any]], t1c_signal: np.ndarray) -> tuple[float, str]:
    """The T1c's noise SD in signal units: phantom.json's record, else estimated from the air (:func:`estimate_noise_sd`)."""
    recorded = (params or {}).get("sequences", {}).get("t1c", {}).get("noise_sigma_signal_units")
    if isinstance(recorded, (int, float)) and recorded > 0:
        return float(recorded), "phantom.json sequences.t1c.noise_sigma_signal_units"
    return estimate_noise_sd(t1c_signal), "estimated from the air in the T1c's corners"


# ---------------------------------------------------------------------------------------------
# Cases: discovery, checks, phantom generation
# ---------------------------------------------------------------------------------------------

@dataclass
class EvalCase:
    """One case folder: its input paths and phantom records (``None`` when absent)."""

    name: str
    folder: Path
    inputs: dict[str, Path]
    params: Optional[dict] = field(default=None, repr=False)
    lesions_json: Optional[dict] = field(default=None, repr=False)

    @property
    def seed(self) -> Optional[int]:
        return None if not self.params or "seed" not in self.params else int(self.params["seed"])


def _read_json(path: Path) -> Optional[dict]:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); regenerate the case or remove the file.") from None


def load_case(folder: Path) -> EvalCase:
    """Locate a case's inputs (t1, flair, adc, t1c, t1c_x4, lesion_labels, brain_mask; t1c_low if present).

    Raises:
        ValueError: a required input is missing (the message names it and the fix).
    """
    from ContrastAmplifierLib.imagefiles import find_image
    from ContrastAmplifierLib.imageio import find_case_inputs

    inputs: dict[str, Path] = dict(find_case_inputs(folder, REQUIRED_INPUTS))
    needs = {
        "t1c_x4": "the quadruple-dose T1c on the T1c grid, the reference of this evaluation. Add it, or evaluate "
                  "phantom cases (--phantom-seeds FIRST-LAST), which have it",
        "lesion_labels": "the lesion label map on the T1c grid (0 = background, one value 1..N per lesion), as "
                         "`contrast-amplifier phantom` writes it. Add it",
        "brain_mask": "the brain mask on the T1c grid (the ROI of every metric), as `contrast-amplifier phantom` "
                      "writes it. Add it",
    }
    for stem, why in needs.items():
        hit = find_image(folder, stem, folders=False)
        if hit is None:
            raise ValueError(f"{stem}.nii.gz is missing in case folder {folder}: it is {why}.")
        inputs[stem] = hit
    low = find_image(folder, "t1c_low", folders=False)
    if low is not None:
        inputs["t1c_low"] = low
    return EvalCase(folder.name, folder, inputs, _read_json(folder / "phantom.json"), _read_json(folder / "lesions.json"))


def _same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    return (a.GetSize() == b.GetSize() and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-4)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-3) and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-5))


def _read_map(path: Path) -> sitk.Image:
    """A label map or mask as it is (all zeros allowed: a lesion-free case)."""
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise ValueError(f"cannot read {path} ({str(exc).strip().splitlines()[-1]}); regenerate or replace the file.") from None


def check_case(case: EvalCase) -> int:
    """Check a case before any work: T1c-x4, labels and mask on the T1c grid, lesions labelled; returns the lesion count.

    A case without any lesion is accepted only when its phantom records none (``n_lesions`` 0):
    it still counts for PSNR, SSIM and false enhancement.

    Raises:
        ValueError: the message names the input and the fix.
    """
    from ContrastAmplifierLib.imageio import read_image

    t1c = read_image(case.inputs["t1c"], "T1c")
    images = {"t1c_x4": read_image(case.inputs["t1c_x4"], "T1c-x4"),
              **{stem: _read_map(case.inputs[stem]) for stem in ("lesion_labels", "brain_mask")}}
    for stem, other in images.items():
        if not _same_grid(t1c, other):
            raise ValueError(f"{case.inputs[stem]} is not on the T1c grid of {case.inputs['t1c']} (size, spacing, origin or "
                             f"direction differ); resample it onto the T1c first.")
    if not (sitk.GetArrayViewFromImage(images["brain_mask"]) > 0).any():
        raise ValueError(f"{case.inputs['brain_mask']} is empty (no voxel > 0): the brain mask must cover the brain.")
    n_lesions = int(np.count_nonzero(np.unique(sitk.GetArrayViewFromImage(images["lesion_labels"])) > 0))
    if n_lesions == 0 and not (case.params and int(case.params.get("n_lesions", -1)) == 0):
        raise ValueError(f"{case.inputs['lesion_labels']} is empty (no label > 0): label each lesion with its own value "
                         "1..N on the T1c grid, or leave this case out of the cohort.")
    return n_lesions


def cohort_cases(cohort: Path) -> list[EvalCase]:
    """The case sub-folders of ``cohort`` (hidden ones skipped), in name order."""
    if not Path(cohort).is_dir():
        raise ValueError(f"--cohort {cohort} is not a folder; pass a folder of case sub-folders (each with t1, flair, adc, "
                         "t1c, t1c_x4, lesion_labels and brain_mask), e.g. the output of `contrast-amplifier phantom`.")
    folders = sorted(p for p in Path(cohort).iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise ValueError(f"--cohort {cohort} holds no case sub-folders; generate some with `contrast-amplifier phantom "
                         f"{cohort} --cases 5`, or use --phantom-seeds.")
    return [load_case(folder) for folder in folders]


def _phantom_matches(params: Mapping[str, Any], seed: int, spacing: float, protocol: str) -> bool:
    recorded = params.get("spacing_mm")
    return (int(params.get("seed", -1)) == seed and params.get("acquisition_protocol", "paper") == protocol
            and recorded is not None and abs(float(recorded) - spacing) < 1e-6)


def phantom_cases(cases_dir: Path, seeds: Sequence[int], spacing: float = 1.0, protocol: str = "paper",
                  progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None) -> list[Path]:
    """``cases_dir/seed_<N>`` for every seed: an existing matching phantom case is reused, a missing one generated.

    Each case is generated in a hidden temporary folder and renamed into place when complete.

    Raises:
        ValueError: a ``seed_<N>`` folder holds something else (another spacing/protocol, or not a phantom case).
    """
    from ContrastAmplifierLib.phantom import generate_case

    report = progress or null_progress
    folders = [Path(cases_dir) / f"seed_{seed}" for seed in seeds]
    for seed, folder in zip(seeds, folders):  # refuse before generating anything
        if folder.exists():
            params = _read_json(folder / "phantom.json")
            if params is None or not _phantom_matches(params, seed, spacing, protocol):
                raise ValueError(f"{folder} exists but is not phantom seed {seed} at {spacing:g} mm, protocol {protocol} "
                                 f"(its phantom.json differs or is missing); remove it to regenerate, or use another OUT_DIR.")
    Path(cases_dir).mkdir(parents=True, exist_ok=True)
    for n, (seed, folder) in enumerate(zip(seeds, folders)):
        check_cancel(cancel)
        if folder.is_dir():
            report("phantom", (n + 1) / len(seeds), f"seed {seed}: reused")
            continue
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=cases_dir))
        apply_umask(tmp, directory=True)
        try:
            generate_case(tmp, seed, spacing, protocol=protocol, cancel=cancel,
                          progress=SubProgress(report, n / len(seeds), (n + 1) / len(seeds)))
            tmp.rename(folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return folders


# ---------------------------------------------------------------------------------------------
# One case
# ---------------------------------------------------------------------------------------------

@dataclass
class AmplifySettings:
    """How :func:`evaluate_case` runs the pipeline (``amplify_case``'s options)."""

    hdbet: bool = False
    flips: int = 8
    folds: Optional[list[int]] = None
    device: str = "auto"
    threads: Optional[int] = None


def _resample_to(path: Path, reference: sitk.Image, transform: sitk.Transform) -> np.ndarray:
    moving = sitk.ReadImage(str(path), sitk.sitkFloat32)
    return sitk.GetArrayFromImage(sitk.Resample(moving, reference, transform, sitk.sitkLinear, math.nan, sitk.sitkFloat32))


def case_images(case: EvalCase, t1c_image: sitk.Image, t1c_pro: sitk.Image, t1c_to_t1: sitk.Transform) -> dict[str, np.ndarray]:
    """Every compared image on the T1c grid in signal units (T1c-pro has the T1c's scale), plus ``"t1"``, the pre-contrast."""
    params = case.params
    raw = sitk.GetArrayFromImage(t1c_image)
    images: dict[str, np.ndarray] = {
        "t1c": to_signal(raw, params, "t1c"),
        "t1c_pro": to_signal(sitk.GetArrayFromImage(t1c_pro), params, "t1c"),
        "t1c_x4": to_signal(sitk.GetArrayFromImage(sitk.ReadImage(str(case.inputs["t1c_x4"]), sitk.sitkFloat32)), params, "t1c_x4"),
        "t1": to_signal(_resample_to(case.inputs["t1"], t1c_image, t1c_to_t1), params, "t1"),
    }
    if "t1c_low" in case.inputs and params and "t1c_low" in params.get("sequences", {}):
        from ContrastAmplifierLib.phantom import true_rigid_to_t1c

        truth = sitk.AffineTransform(3)  # the phantom's true T1c -> T1c-low pose (the pipeline registers no T1c-low)
        matrix = true_rigid_to_t1c(case.folder, "t1c_low")
        truth.SetMatrix(matrix[:3, :3].ravel().tolist())
        truth.SetTranslation(matrix[:3, 3].tolist())
        images["t1c_low"] = to_signal(_resample_to(case.inputs["t1c_low"], t1c_image, truth), params, "t1c_low")
    images["t1c_lin"] = linear_dose_baseline(images["t1c"], images["t1"])
    return images


def lesion_contrasts(images: Mapping[str, np.ndarray], labels: np.ndarray, brain: np.ndarray, pre: np.ndarray,
                     margin_voxels: int) -> dict[int, dict[str, RoiContrast]]:
    """Per label value > 0, per image: :func:`~ContrastAmplifierLib.metrics.roi_contrast` against one
    healthy-brain ROI (brain minus all lesions dilated by ``margin_voxels``)."""
    lesions = np.asarray(labels) > 0
    roi = healthy_brain_roi(brain, lesions, margin_voxels=margin_voxels)
    out: dict[int, dict[str, RoiContrast]] = {}
    for lesion_id in (int(v) for v in np.unique(labels) if v > 0):
        mask = labels == lesion_id
        out[lesion_id] = {name: roi_contrast(image, mask, roi, pre=pre) for name, image in images.items()}
    return out


def lesion_rows(case: EvalCase, contrasts: Mapping[int, Mapping[str, RoiContrast]], sizes: Mapping[int, LesionSize],
                labels: np.ndarray) -> list[dict[str, Any]]:
    """``lesions.csv`` rows of one case."""
    rows = []
    for lesion_id, per_image in contrasts.items():
        size = sizes[lesion_id]
        row: dict[str, Any] = {"case": case.name, "seed": case.seed, "lesion": lesion_id, "kind": size.kind,
                               "long_axis_mm": round(size.long_axis_mm, 3), "long_axis_source": size.source,
                               "measured_long_mm": size.measured_long_mm, "size_band": size_band(size.long_axis_mm),
                               "voxels": int((labels == lesion_id).sum())}
        for key in IMAGES:
            r = per_image.get(key)
            row[f"cnr_{key}"] = math.nan if r is None else r.cnr
            row[f"lbr_{key}"] = math.nan if r is None else r.lbr
            row[f"cep_{key}"] = math.nan if r is None else r.cep
        for key in ("t1c_pro", "t1c_lin"):
            row[f"gap_fraction_{key}"] = gap_fraction(row[f"cnr_{key}"], row["cnr_t1c"], row["cnr_t1c_x4"])
        rows.append(row)
    return rows


def evaluate_case(case: EvalCase, bundle: Any, settings: AmplifySettings, progress: Optional[ProgressCallback] = None,
                  cancel: Optional[CancelToken] = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run the pipeline on one case and measure it: (``lesions.csv`` rows, ``cases.csv`` row)."""
    from ContrastAmplifierLib.imageio import read_image
    from ContrastAmplifierLib.inference import amplify_case

    started = time.perf_counter()
    result = amplify_case(case.inputs["t1"], case.inputs["flair"], case.inputs["adc"], case.inputs["t1c"], bundle=bundle,
                          folds=settings.folds, n_mirrorings=settings.flips, device=settings.device, threads=settings.threads,
                          brain_mask=None if settings.hdbet else case.inputs["brain_mask"], progress=progress, cancel=cancel)
    check_cancel(cancel)
    t1c_image = read_image(case.inputs["t1c"], "T1c")
    images = case_images(case, t1c_image, result.image, result.preprocessed.t1c_to.get("t1", sitk.Transform()))
    pre = images.pop("t1")
    labels: np.ndarray = sitk.GetArrayFromImage(sitk.ReadImage(str(case.inputs["lesion_labels"]))).astype(np.int32)
    brain = sitk.GetArrayFromImage(sitk.ReadImage(str(case.inputs["brain_mask"]))) > 0
    spacing = t1c_image.GetSpacing()
    margin = max(1, int(round(HEALTHY_MARGIN_MM / min(spacing))))
    contrasts = lesion_contrasts(images, labels, brain, pre, margin) if (labels > 0).any() else {}
    sizes = lesion_sizes(labels, spacing, case.params, case.lesions_json)
    rows = lesion_rows(case, contrasts, sizes, labels)

    reference = images["t1c_x4"]
    data_range = float(reference[brain].max() - reference[brain].min())
    wm, wm_source = white_matter_roi(case.params, t1c_image, brain, labels)
    noise_sd, noise_source = t1c_noise_sd(case.params, images["t1c"])
    row: dict[str, Any] = {"case": case.name, "seed": case.seed, "n_lesions": len(rows), "mapping": result.mapping,
                           "predictions": result.n_predictions, "brain_voxels": int(brain.sum()), "data_range": data_range}
    for key in COMPARED:
        row[f"psnr_{key}"] = psnr_in_mask(images[key], reference, brain, data_range)
        row[f"ssim_{key}"] = ssim_in_mask(images[key], reference, brain, data_range)
    for key in ("t1c_pro", "t1c_lin", "t1c_x4"):
        row[f"false_enhancement_{key}"] = false_enhancement_ratio(images[key], images["t1c"], wm, noise_sd)
    if (labels > 0).any():  # the paper's Table 4 way: all lesions of the case pooled into one ROI
        roi = healthy_brain_roi(brain, labels > 0, margin_voxels=margin)
        for key in (k for k in IMAGES if k in images):
            row[f"cnr_pooled_{key}"] = roi_contrast(images[key], labels > 0, roi, pre=pre).cnr
    row.update({"noise_sd": noise_sd, "noise_source": noise_source, "wm_voxels": int(wm.sum()), "wm_roi": wm_source,
                "seconds": round(time.perf_counter() - started, 2)})
    return rows, row


# ---------------------------------------------------------------------------------------------
# Summary and outputs
# ---------------------------------------------------------------------------------------------

def summarise(lesions: Sequence[Mapping[str, Any]], cases: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per size band and overall: lesion count, mean CNR/LBR/CEP per image, gap fractions; per case: PSNR wins, means."""
    bands: dict[str, dict[str, Any]] = {}
    for band in (*SIZE_BANDS, "all"):
        rows = [r for r in lesions if band == "all" or r["size_band"] == band]
        entry: dict[str, Any] = {"n_lesions": len(rows)}
        for metric in ("cnr", "lbr", "cep"):
            entry[metric] = {key: finite_mean([r[f"{metric}_{key}"] for r in rows]) for key in IMAGES}
        for key in ("t1c_pro", "t1c_lin"):
            fractions = [r[f"gap_fraction_{key}"] for r in rows if math.isfinite(r[f"gap_fraction_{key}"])]
            entry[f"gap_fraction_{key}"] = {"mean": finite_mean(fractions),
                                            "median": float(np.median(fractions)) if fractions else math.nan,
                                            "n_defined": len(fractions)}
        bands[band] = entry
    per_case: dict[str, Any] = {"n_cases": len(cases), "n_cases_with_lesions": sum(1 for c in cases if c["n_lesions"] > 0)}
    for key in COMPARED:
        per_case[f"psnr_{key}"] = finite_mean([c[f"psnr_{key}"] for c in cases])
        per_case[f"ssim_{key}"] = finite_mean([c[f"ssim_{key}"] for c in cases])
    per_case["psnr_wins_t1c_pro_vs_t1c"] = sum(1 for c in cases if c["psnr_t1c_pro"] > c["psnr_t1c"])
    per_case["psnr_wins_t1c_pro_vs_t1c_lin"] = sum(1 for c in cases if c["psnr_t1c_pro"] > c["psnr_t1c_lin"])
    per_case["ssim_wins_t1c_pro_vs_t1c"] = sum(1 for c in cases if c["ssim_t1c_pro"] > c["ssim_t1c"])
    for key in ("t1c_pro", "t1c_lin", "t1c_x4"):
        values = [c[f"false_enhancement_{key}"] for c in cases]
        finite = [v for v in values if math.isfinite(v)]
        per_case[f"false_enhancement_{key}"] = {"mean": finite_mean(finite), "max": max(finite) if finite else math.nan}
    return {"size_bands": bands, "cases": per_case}


def _fmt(value: Any, digits: int = 2) -> str:
    """A table cell: floats to ``digits`` decimals; NaN, infinities and ``None`` (JSON's null) as ``n/a``."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return "n/a" if not math.isfinite(value) else f"{value:.{digits}f}"
    return str(value)


def contrast_table(bands: Mapping[str, Any]) -> list[str]:
    """The lesion-contrast table of ``summary.md`` (one row per size band and ``all``), as Markdown lines.

    ``bands`` is a summary's ``size_bands``, from :func:`summarise` (NaN) or read back from JSON (``null``).
    """
    lines = [
        "| lesions | n | " + " | ".join(f"CNR {name}" for name in IMAGES.values()) + " | gap fraction T1c-pro (mean / median) "
        "| gap fraction T1c-lin (mean) |",
        "|---|---:|" + "---:|" * len(IMAGES) + "---:|---:|",
    ]
    for band, entry in bands.items():
        pro, lin = entry["gap_fraction_t1c_pro"], entry["gap_fraction_t1c_lin"]
        lines.append(f"| {band} | {entry['n_lesions']} | " + " | ".join(_fmt(entry["cnr"][k]) for k in IMAGES)
                     + f" | {_fmt(pro['mean'])} / {_fmt(pro['median'])} (n={pro['n_defined']}) | {_fmt(lin['mean'])} |")
    return lines


def similarity_table(per_case: Mapping[str, Any]) -> list[str]:
    """The against-T1c-x4 table of ``summary.md`` (mean PSNR, SSIM, false enhancement per image), as Markdown lines."""
    lines = ["| image | mean PSNR (dB) | mean SSIM | false enhancement mean / max |", "|---|---:|---:|---:|"]
    for key in COMPARED:
        fe = per_case.get(f"false_enhancement_{key}", {"mean": math.nan, "max": math.nan})
        fe_text = "0 (by definition)" if key == "t1c" else f"{_fmt(fe['mean'])} / {_fmt(fe['max'])}"
        lines.append(f"| {IMAGES[key]} | {_fmt(per_case[f'psnr_{key}'])} | {_fmt(per_case[f'ssim_{key}'], 4)} | {fe_text} |")
    return lines


def summary_markdown(summary: Mapping[str, Any], bundle_info: Mapping[str, Any], source: str) -> str:
    """The ``summary.md`` text: contrast per size band, image similarity, false enhancement."""
    bands, per_case = summary["size_bands"], summary["cases"]
    n = per_case["n_cases"]
    lines = [
        f"# Phantom evaluation of `{bundle_info['name']}` {bundle_info.get('version', '')}".rstrip(),
        "",
        f"**Intended use: {bundle_info['intended_use']}.** {PHANTOM_LABEL.capitalize()}: {source}.",
        "",
        "## Lesion contrast (CNR, paper formula) per size band (long axis)",
        "",
        *contrast_table(bands),
    ]
    overall = bands["all"]
    lines += [
        "",
        "All lesions, mean LBR: " + ", ".join(f"{name} {_fmt(overall['lbr'][k], 3)}" for k, name in IMAGES.items())
        + "; mean CEP %: " + ", ".join(f"{name} {_fmt(overall['cep'][k], 1)}" for k, name in IMAGES.items()) + ".",
        "",
        f"Gap fraction = (CNR_pro - CNR_T1c) / (CNR_x4 - CNR_T1c) per lesion (0 = no gain, 1 = as the 4x dose), "
        f"defined where CNR_x4 - CNR_T1c >= {MIN_CNR_GAP}. T1c-lin = T1c + 3 (T1c - T1), the linear 4x-dose "
        "extrapolation; T1c is the identity baseline.",
        "",
        f"## Against T1c-x4, per case ({n} cases, inside the brain mask)",
        "",
        *similarity_table(per_case),
    ]
    fe_x4 = per_case["false_enhancement_t1c_x4"]
    lines += [
        "",
        f"PSNR wins: T1c-pro beats T1c in {per_case['psnr_wins_t1c_pro_vs_t1c']}/{n} cases and T1c-lin in "
        f"{per_case['psnr_wins_t1c_pro_vs_t1c_lin']}/{n}; SSIM: T1c-pro beats T1c in {per_case['ssim_wins_t1c_pro_vs_t1c']}/{n}.",
        "",
        f"False enhancement = mean |X - T1c| / noise SD of the T1c in non-enhancing normal white matter (target for "
        f"T1c-pro: below 1). T1c-pro: {_fmt(per_case['false_enhancement_t1c_pro']['mean'])} (mean over cases). "
        f"Reference: T1c-x4 {_fmt(fe_x4['mean'])} (independent noise alone gives 2/sqrt(pi) = 1.13).",
        "",
    ]
    return "\n".join(lines)


def _csv_text(rows: Sequence[Mapping[str, Any]]) -> str:
    buffer = io.StringIO()
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return buffer.getvalue()


def json_safe(value: Any) -> Any:
    """NaN and infinities become null (strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return json_safe(value.item())
    return value


def write_figure(lesions: Sequence[Mapping[str, Any]], path: Path, title: str) -> Path:
    """Per-lesion CNR of T1c, T1c-pro, T1c-x4 (and T1c-lin) against the long axis, and the gap fraction."""
    from matplotlib.figure import Figure  # no pyplot: the Agg canvas, whatever the caller's backend

    fig = Figure(figsize=(11, 4.6), dpi=110)
    ax_cnr, ax_gap = fig.subplots(1, 2)
    size = np.array([r["long_axis_mm"] for r in lesions], dtype=float)
    styles = {"t1c": ("tab:blue", "o"), "t1c_pro": ("tab:red", "s"), "t1c_x4": ("black", "^"), "t1c_lin": ("tab:gray", "x")}
    for key, (colour, marker) in styles.items():
        ax_cnr.scatter(size, [r[f"cnr_{key}"] for r in lesions], c=colour, marker=marker, s=18, alpha=0.8, label=IMAGES[key])
    ax_gap.scatter(size, [r["gap_fraction_t1c_pro"] for r in lesions], c="tab:red", marker="s", s=18, label="T1c-pro")
    ax_gap.scatter(size, [r["gap_fraction_t1c_lin"] for r in lesions], c="tab:gray", marker="x", s=18, label="T1c-lin")
    for level in (0.0, 1.0):
        ax_gap.axhline(level, color="black", lw=0.6, ls=":")
    for ax in (ax_cnr, ax_gap):
        for edge in (5.0, 10.0):
            ax.axvline(edge, color="black", lw=0.6, ls="--")
        if len(size) and np.nanmin(size) > 0:
            from matplotlib.ticker import NullFormatter, ScalarFormatter

            ax.set_xscale("log")
            ax.set_xticks([t for t in (2, 3, 5, 10, 20, 40) if 0.7 * np.nanmin(size) <= t <= 1.4 * np.nanmax(size)] or [5, 10])
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("lesion long axis (mm)")
        ax.legend(fontsize=8)
    ax_cnr.set_ylabel("CNR (per lesion)")
    ax_gap.set_ylabel("fraction of the T1c -> T1c-x4 CNR gap recovered")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure_atomic(fig, path, suffix=".png")


def write_outputs(out_dir: Path, lesions: Sequence[Mapping[str, Any]], cases: Sequence[Mapping[str, Any]],
                  report: Mapping[str, Any]) -> None:
    """lesions.csv, cases.csv, summary.md, evaluation.json and evaluation.png, each written atomically."""
    out_dir = Path(out_dir)
    bundle_info = report["bundle"]
    write_text_atomic(_csv_text(lesions), out_dir / "lesions.csv")
    write_text_atomic(_csv_text(cases), out_dir / "cases.csv")
    write_text_atomic(summary_markdown(report["summary"], bundle_info, report["source"]), out_dir / "summary.md")
    write_figure(lesions, out_dir / "evaluation.png",
                 f"SYNTHETIC PHANTOMS - model '{bundle_info['name']}': {bundle_info['intended_use']}")
    write_text_atomic(json.dumps(json_safe({**report, "cases": list(cases), "lesions": list(lesions)}), indent=2) + "\n",
                      out_dir / "evaluation.json")


DEFINITIONS = {
    "cnr": "(SI_lesion - SI_brain) / SD_brain (paper); SI_brain, SD_brain over the brain mask minus all lesions dilated by 3 mm",
    "lbr": "SI_lesion / SI_brain",
    "cep": "100 * (SI_lesion - SI_lesion_pre) / SI_lesion_pre, pre = T1 on the T1c grid (preprocessing's rigid transform)",
    "gap_fraction": f"(CNR_pro - CNR_t1c) / (CNR_x4 - CNR_t1c) per lesion; NaN where CNR_x4 - CNR_t1c < {MIN_CNR_GAP}",
    "t1c_lin": "T1c + 3 * (T1c - T1_on_T1c_grid) in signal units: linear extrapolation to the 4x dose",
    "psnr": "10 log10(R^2 / MSE) inside the brain mask against T1c-x4, R = T1c-x4 max - min inside the brain",
    "ssim": "Gaussian-window SSIM (sigma 1.5 voxels, K1 0.01, K2 0.03, data range R) averaged over the brain mask",
    "false_enhancement": "mean |X - T1c| / noise SD of the T1c over non-enhancing normal white matter",
    "size_band": "< 5 mm, 5-10 mm, > 10 mm long-axis diameter (phantom truth, else lesions.json, else label voxels)",
    "units": "phantom signal units: physical = gain * signal + offset (phantom.json)",
}


def check_arguments(seeds: Optional[Sequence[int]], cohort: Optional[Union[str, Path]], spacing: float, protocol: str) -> None:
    """The command's own argument checks, before anything is read or written.

    Raises:
        ValueError: neither or both of seeds and cohort, an unknown protocol, or a spacing outside 0.5-8 mm.
    """
    from ContrastAmplifierLib.phantom_clinical import PROTOCOLS

    if (seeds is None) == (cohort is None):
        raise ValueError("give either --phantom-seeds FIRST-LAST or --cohort FOLDER (exactly one).")
    if protocol not in PROTOCOLS:
        raise ValueError(f"--protocol {protocol!r}: use one of {', '.join(PROTOCOLS)}.")
    if seeds is not None and not 0.5 <= float(spacing) <= 8.0:
        raise ValueError(f"--spacing {spacing:g} mm is outside 0.5-8 mm; use 1 (the paper's) or 3 (the phantom demo model's).")


def run_evaluation(bundle: Union[str, Path], out_dir: Union[str, Path], seeds: Optional[Sequence[int]] = None,
                   cohort: Optional[Union[str, Path]] = None, spacing: float = 1.0, protocol: str = "paper",
                   settings: Optional[AmplifySettings] = None, overwrite: bool = False, record: bool = False,
                   progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None) -> dict[str, Any]:
    """Evaluate ``bundle`` on phantom ``seeds`` (generated into ``out_dir/cases``) or on a ``cohort`` folder.

    Everything is checked before the pipeline runs (output folder, bundle, every case's inputs,
    with ``record`` that the bundle's ``bundle.json`` can be written); the outputs are written once
    all cases are measured, then, with ``record``, the summary is recorded in the bundle
    (:mod:`.evaluation_record`). Returns what ``evaluation.json`` holds (without the per-case and
    per-lesion rows).

    Raises:
        ValueError: bad input (the message names it and the fix).
    """
    from ContrastAmplifierCommon.outputs import check_output_folder
    from ContrastAmplifierLib.registry import resolve_model

    check_arguments(seeds, cohort, spacing, protocol)
    if record:
        from .evaluation_record import check_recordable

        check_recordable(bundle)
    settings = settings or AmplifySettings()
    report = progress or null_progress
    out_dir = Path(out_dir)
    inputs = [Path(cohort)] if cohort is not None else []
    bundle_path = Path(bundle)
    if bundle_path.exists():
        inputs.append(bundle_path)
    check_output_folder(out_dir, OUTPUT_FILES, inputs=inputs, overwrite=overwrite, what="evaluation output folder")
    model = resolve_model(str(bundle))
    if seeds is not None:
        folders = phantom_cases(out_dir / "cases", seeds, spacing, protocol, progress=SubProgress(report, 0.0, 0.2), cancel=cancel)
        cases = [load_case(folder) for folder in folders]
        source = f"phantom seeds {seeds[0]}-{seeds[-1]} ({len(seeds)} cases, {spacing:g} mm, {protocol} protocol)"
    else:
        cases = cohort_cases(Path(str(cohort)))
        source = f"cohort {cohort} ({len(cases)} cases)"
    counts = [check_case(case) for case in cases]
    if sum(counts) == 0:
        raise ValueError(f"none of the {len(cases)} cases has a lesion: the contrast evaluation needs labelled lesions; "
                         "add cases (more --phantom-seeds) or label the lesions.")
    lesions: list[dict[str, Any]] = []
    case_rows: list[dict[str, Any]] = []
    start = 0.2 if seeds is not None else 0.0
    for n, case in enumerate(cases):
        check_cancel(cancel)
        lo = start + (1.0 - start) * n / len(cases)
        hi = start + (1.0 - start) * (n + 1) / len(cases)
        span = SubProgress(report, lo, hi)
        span("evaluate", 0.0, f"case {n + 1}/{len(cases)} {case.name}")
        rows, row = evaluate_case(case, model, settings, progress=_Prefixed(span, f"{case.name}: "), cancel=cancel)
        lesions += rows
        case_rows.append(row)
    result = {
        "label": PHANTOM_LABEL,
        "bundle": {"name": model.name, "version": str(model.manifest.get("version", "")),
                   "intended_use": str(model.manifest.get("intended_use", "")), "path": str(model.path)},
        "source": source,
        "settings": {"seeds": None if seeds is None else [int(seeds[0]), int(seeds[-1])], "cohort": None if cohort is None else str(cohort),
                     "spacing_mm": spacing, "protocol": protocol, "hdbet": settings.hdbet, "flips": settings.flips,
                     "folds": settings.folds if settings.folds is not None else model.folds, "device": settings.device},
        "definitions": DEFINITIONS,
        "summary": summarise(lesions, case_rows),
    }
    write_outputs(out_dir, lesions, case_rows, result)
    if record:
        from .evaluation_record import evaluation_entry, record_evaluation

        record_evaluation(model.path, model.manifest, evaluation_entry(result, bundle, out_dir, model.folds))
    report("done", 1.0, f"{len(cases)} cases, {len(lesions)} lesions: {out_dir / 'summary.md'}")
    return result


class _Prefixed:
    """A progress callback that prefixes every message (the case name)."""

    def __init__(self, parent: ProgressCallback, prefix: str) -> None:
        self.parent = parent
        self.prefix = prefix

    def __call__(self, stage: str, fraction: float, message: str = "") -> None:
        self.parent(stage, fraction, self.prefix + message)
