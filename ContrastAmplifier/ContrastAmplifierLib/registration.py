"""Registration to the ICBM 2009a template and single-pass resampling (SimpleITK).

The paper (Materials and methods, "Preprocessing") registers every image to the ICBM 2009a
nonlinear symmetric atlas with FSL FLIRT affine deformations and resamples to 1 mm with splines.
Here, with SimpleITK:

* each modality is registered rigidly to the T1c (Mattes mutual information, multi-resolution,
  several starts; :func:`register_rigid_detailed` also measures how far to trust the result:
  :class:`RigidResult`, used by :func:`.plausibility.check_registration`),
* the skull-stripped T1c is registered affinely to the skull-stripped template,
* the transforms are composed and each image is resampled exactly once (cubic B-spline).

Transforms follow the ITK convention: a transform registered with fixed image F and moving
image M maps *points of F* to *points of M* (that is what resampling M onto F's grid needs).
So ``atlas_to_t1c`` maps atlas millimetres to native T1c millimetres, and ``t1c_to_t1`` maps
native T1c millimetres to native T1 millimetres.

The affine step is tuned for speed (the target: ANTs ``AffineFast`` speed at <= 0.15 mm
mean error): moments initialisation on the brains, brain-bounding-box crops, a 3-level pyramid
whose finest level is 2x shrunk, regular sampling restricted to the template brain mask,
float32 images and a few iterations per level. The numbers are in :class:`AffineSettings`.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Optional

import numpy as np
import SimpleITK as sitk

__all__ = [
    "AffineSettings",
    "PyramidSettings",
    "RigidSettings",
    "RigidResult",
    "StartOutcome",
    "RIGID_STARTS",
    "register_rigid_detailed",
    "affine_metric",
    "normalised_mutual_information",
    "Template",
    "load_template",
    "nifti_to_sitk",
    "register_rigid",
    "register_affine",
    "compose",
    "resample",
    "crop_to_mask",
    "atlas_crop_grid",
    "mean_point_error_mm",
    "mask_points_mm",
    "concrete_transform",
]


@dataclass(frozen=True)
class PyramidSettings:
    """Pyramid, metric and optimiser settings shared by the rigid and the affine registrations.

    Attributes:
        level_spacing_mm: voxel size of each pyramid level, coarse to fine (images are
            block-averaged per axis to about this size, so a 1 x 1 x 5 mm FLAIR is only
            shrunk in-plane).
        smoothing_sigmas_mm: extra Gaussian smoothing per level (physical units).
        sampling_percentage: fraction of the (masked) fixed voxels used by the metric.
        iterations: gradient-descent iterations per level.
        learning_rate: regular-step gradient descent first step (scaled parameter units, ~mm).
        metric: ``"mattes"`` (mutual information) or ``"correlation"``.
        histogram_bins: Mattes MI bins.
        threads: ITK threads (the CI machine has 2 cores).
    """

    level_spacing_mm: tuple[float, ...] = (8.0, 4.0, 2.0)
    smoothing_sigmas_mm: tuple[float, ...] = (2.0, 1.0, 0.0)
    sampling_percentage: float = 0.25
    iterations: tuple[int, ...] = (100, 60, 30)
    learning_rate: float = 1.0
    metric: str = "mattes"
    histogram_bins: int = 32
    threads: int = 2


#: ``RigidSettings.starts``: ``"multi"`` (default: several starts, see :func:`register_rigid_detailed`)
#: or ``"legacy"`` (the two starts of the code before the clinical protocol; kept for the bench).
RIGID_STARTS = ("multi", "legacy")


@dataclass(frozen=True)
class RigidSettings(PyramidSettings):
    """Intra-subject rigid registration (modality -> T1c): Mattes MI, multi-resolution, several starts.

    The pyramid fields are :class:`PyramidSettings`'; the starts (:func:`register_rigid_detailed`):

    Attributes:
        starts: ``"multi"`` or ``"legacy"`` (:data:`RIGID_STARTS`).
        start_rotation_deg: the rotated starts turn the head by +- this angle about each axis.
        screen_iterations: coarse-level iterations every start gets before the starts are ranked.
        refine: how many of the best (distinct) screened starts go through the finer levels.
        fov_margin_mm: the metric samples only T1c brain points that the start maps at least this
            far inside the modality's field of view (then the sample set cannot change while the
            optimiser moves: a brain cut by the modality's slab no longer pulls it off).
    """

    starts: str = "multi"
    start_rotation_deg: float = 10.0
    screen_iterations: int = 30
    refine: int = 3
    fov_margin_mm: float = 8.0


@dataclass(frozen=True)
class AffineSettings(PyramidSettings):
    """Skull-stripped T1c -> skull-stripped ICBM 2009a template, affine (12 parameters).

    Defaults were tuned on the 1 mm template moved by 10 degrees, 10 mm and scale 1.05 (the
    registration benchmark); see ``bench.py`` for the measurement.

    Same pyramid and optimiser settings as :class:`RigidSettings` (the defaults are shared), plus
    the crop margin.

    Attributes:
        level_spacing_mm: voxel size of each pyramid level, coarse to fine. The finest level
            stays at 2 mm: on the 1 mm benchmark a 1 mm level costs several times more for
            no measurable gain (errors are already ~0.05 mm).
        smoothing_sigmas_mm: Gaussian smoothing per level in mm.
        sampling_percentage: fraction of the fixed voxels in the brain mask used per level.
        iterations: iterations per level.
        learning_rate: regular-step gradient descent initial step (in scaled parameter units).
        metric: ``"mattes"`` (mutual information) or ``"correlation"``.
        histogram_bins: Mattes MI bins.
        threads: ITK threads.
        margin_mm: margin kept around the brain bounding boxes when cropping before registration.
    """

    margin_mm: float = 8.0


@dataclass(frozen=True)
class Template:
    """The ICBM 2009a nonlinear symmetric template (skull-stripped) and its brain mask."""

    image: sitk.Image  # float32, brain only (nilearn's template has no skull)
    brain_mask: sitk.Image  # uint8


def nifti_to_sitk(nifti) -> sitk.Image:
    """Convert a nibabel image (RAS affine, x-fastest array) to a SimpleITK image (LPS)."""
    affine = np.asarray(nifti.affine, dtype=float)
    data = np.asarray(nifti.get_fdata(dtype=np.float32))
    image = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)))
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    ras_to_lps = np.diag([-1.0, -1.0, 1.0])
    direction = ras_to_lps @ affine[:3, :3] / spacing
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetOrigin(tuple(float(v) for v in ras_to_lps @ affine[:3, 3]))
    image.SetDirection(tuple(float(v) for v in direction.ravel()))
    return image


@functools.lru_cache(maxsize=2)
def load_template(resolution_mm: int = 1) -> Template:
    """Load nilearn's ICBM 2009a template and brain mask (offline, shipped with nilearn).

    The template is multiplied by its brain mask so that both sides of the affine registration
    are brains (registered *after* skull stripping: the template has no skull).
    """
    from nilearn import datasets

    image = nifti_to_sitk(datasets.load_mni152_template(resolution=resolution_mm))
    mask = nifti_to_sitk(datasets.load_mni152_brain_mask(resolution=resolution_mm))
    mask = sitk.Cast(mask > 0.5, sitk.sitkUInt8)
    image = sitk.Mask(sitk.Cast(image, sitk.sitkFloat32), mask)
    return Template(image=image, brain_mask=mask)


def skull_stripped(image: sitk.Image, mask: sitk.Image) -> sitk.Image:
    """``image`` inside ``mask``, shifted so that its darkest brain voxel is 0, and 0 outside.

    Everything that is not brain (the stripped skull, and what resampling fills in outside the
    field of view) then sits at the brain's dark end whatever offset the scanner stored (a
    background of -1500 is common), so the registration and the checks that use it give the
    same result for ``a * image + b`` (``a > 0``) as for ``image``.
    """
    image = sitk.Cast(image, sitk.sitkFloat32)
    inside = sitk.Cast(mask > 0, sitk.sitkUInt8)
    values = sitk.GetArrayViewFromImage(image)[sitk.GetArrayViewFromImage(inside) > 0]
    darkest = float(values.min()) if values.size else 0.0
    return sitk.Mask(image - darkest, inside)


def crop_to_mask(image: sitk.Image, mask: sitk.Image, margin_mm: float) -> sitk.Image:
    """Crop ``image`` to the bounding box of ``mask`` (same grid) plus a margin in mm."""
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(sitk.Cast(mask > 0, sitk.sitkUInt8))
    if not stats.HasLabel(1):
        return image
    x0, y0, z0, sx, sy, sz = stats.GetBoundingBox(1)
    margin = [int(np.ceil(margin_mm / s)) for s in image.GetSpacing()]
    lo = [max(0, v - m) for v, m in zip((x0, y0, z0), margin)]
    hi = [min(n, v + s + m) for v, s, m, n in zip((x0, y0, z0), (sx, sy, sz), margin, image.GetSize())]
    return sitk.RegionOfInterest(image, [h - l for l, h in zip(lo, hi)], lo)


def sampling_seed(seed: int) -> int:
    """The seed handed to ITK's metric sampling for our ``seed`` (0, 1, ...): never 0, which
    SimpleITK reads as ``sitkWallClock`` (a new jitter of the regular sampling grid on every run,
    so the same images registered twice gave transforms a few hundredths of a mm apart)."""
    return int(seed) % (2**31 - 2) + 1


def _method(threads: int, bins: int, metric: str = "mattes", gradient_images: bool = False) -> sitk.ImageRegistrationMethod:
    """A registration method with the metric set up.

    ``gradient_images``: ITK's precomputed (recursive Gaussian) gradient images for the metric
    derivatives, the SimpleITK default. Off here: the derivatives then come from the interpolator
    at each sample. On oblique, anisotropic images (clinical 2D stacks, sagittal 3D T1c, EPI) the
    gradient images drove the optimiser uphill, away from a pose it started on (on the clinical
    phantom: ADC -> T1c from the true pose to 11 mm off; T1c -> atlas affine 3-47 mm off in 15 of
    30 cases). Only the legacy rigid code (kept for the bench) turns them on.
    """
    reg = sitk.ImageRegistrationMethod()
    reg.SetNumberOfThreads(int(threads))
    reg.SetMetricUseFixedImageGradientFilter(gradient_images)
    reg.SetMetricUseMovingImageGradientFilter(gradient_images)
    if metric == "mattes":
        reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=bins)
    elif metric == "correlation":
        reg.SetMetricAsCorrelation()
    else:
        raise ValueError(f"metric must be 'mattes' or 'correlation', got {metric!r}")
    reg.SetInterpolator(sitk.sitkLinear)
    return reg


def register_rigid(
    fixed: sitk.Image,
    moving: sitk.Image,
    fixed_mask: Optional[sitk.Image] = None,
    settings: RigidSettings = RigidSettings(),
    seed: int = 0,
) -> sitk.Euler3DTransform:
    """Rigidly register ``moving`` to ``fixed``: the transform of :func:`register_rigid_detailed`.

    Returns:
        Euler3DTransform mapping fixed points (mm) to moving points (mm).
    """
    return register_rigid_detailed(fixed, moving, fixed_mask, settings, seed).transform


#: Two refined starts whose results lie closer than this (mean over the T1c brain, mm) agree.
AGREE_MM = 2.0
#: Translation starts closer than this (mm) are one start.
SAME_START_MM = 5.0
#: A start or result is compared with the others only if it keeps at least this fraction of the
#: best coverage (T1c brain inside the modality's field of view): sliding the brain out of a
#: truncated slab must not win by leaving only the easy part to match.
MIN_RELATIVE_COVERAGE = 0.5
#: Fewer usable brain samples than this on a level: the start is dropped there.
MIN_SUPPORT_POINTS = 200
#: The result is shifted by +- this (mm) along each axis to measure how sharp its NMI peak is.
PEAK_SHIFT_MM = 6.0
#: Bins of the normalised mutual information (quality measures and ranking).
NMI_BINS = 32


@dataclass(frozen=True)
class StartOutcome:
    """One start of :func:`register_rigid_detailed`, as screened and (for the best few) refined.

    Attributes:
        name: ``scanner`` (the images as they lie), ``moments`` (centres of the two heads
            aligned), ``grid`` (centres of the two image grids aligned); a suffix ``/x+10`` etc.
            marks a start turned by 10 degrees about the fixed x axis (about the brain centre).
        coarse_nmi: normalised mutual information after the screening iterations (coarse level).
        coarse_coverage: fraction of the T1c brain inside the modality's field of view there.
        nmi: final NMI at the finest level (refined starts only).
        distance_mm: mean distance over the T1c brain between this start's final transform and the
            chosen one (refined starts only).
    """

    name: str
    coarse_nmi: float
    coarse_coverage: float
    nmi: Optional[float] = None
    distance_mm: Optional[float] = None


@dataclass(frozen=True)
class RigidResult:
    """A rigid registration and the measurements that say whether to trust it.

    Attributes:
        transform: fixed (T1c) points -> moving points.
        method: ``"multi"`` or ``"legacy"`` (:data:`RIGID_STARTS`).
        start: the start the transform came from.
        metric: the registration metric (Mattes MI: lower is better) at the finest level, over the
            T1c brain points inside the modality's field of view.
        nmi: normalised mutual information (Studholme, 1 = independent, 2 = identical) of the
            T1c and the registered modality over the same points, finest level.
        nmi_scanner: the same for the images as they lie in scanner coordinates (before).
        nmi_shifted: mean NMI of the result shifted by +- :data:`PEAK_SHIFT_MM` along each axis.
        coverage: fraction of the T1c brain inside the modality's field of view after registration.
        runner_up_mm: mean distance over the brain to the best refined start that ended elsewhere
            (more than :data:`AGREE_MM` away); ``None`` when every refined start agreed.
        runner_up_nmi: that start's final NMI.
        agreeing_starts: refined starts that ended within :data:`AGREE_MM` of the result (itself included).
        starts: every start (screened, refined).
        seconds: wall time.
    """

    transform: sitk.Euler3DTransform
    method: str
    start: str
    metric: float
    nmi: float
    nmi_scanner: float
    nmi_shifted: float
    coverage: float
    runner_up_mm: Optional[float]
    runner_up_nmi: Optional[float]
    agreeing_starts: int
    starts: tuple[StartOutcome, ...]
    seconds: float

    @property
    def peak(self) -> float:
        """How much the NMI drops when the result is shifted by a few mm: (NMI - 1) / (shifted NMI - 1).

        A right alignment sits on a sharp peak (edges line up only there); a wrong one sits on a
        low, flat one. Contrast-independent: a ratio of the same images' information.
        """
        return float((self.nmi - 1.0) / max(self.nmi_shifted - 1.0, 1e-6))

    def to_dict(self) -> dict:
        """JSON-ready summary (``preprocess.json``: ``registration.<modality>``)."""
        t = self.transform
        angles = np.rad2deg([t.GetAngleX(), t.GetAngleY(), t.GetAngleZ()])
        return {
            "method": self.method, "start": self.start, "metric": _round(self.metric),
            "nmi": _round(self.nmi), "nmi_scanner": _round(self.nmi_scanner), "nmi_shifted": _round(self.nmi_shifted),
            "peak": _round(self.peak), "coverage": _round(self.coverage),
            "runner_up_mm": None if self.runner_up_mm is None else _round(self.runner_up_mm),
            "runner_up_nmi": None if self.runner_up_nmi is None else _round(self.runner_up_nmi),
            "agreeing_starts": self.agreeing_starts, "seconds": _round(self.seconds, 3),
            "rotation_deg_xyz": [_round(float(a), 3) for a in angles],
            "translation_mm": [_round(float(v), 3) for v in t.GetTranslation()],
            "centre_mm": [_round(float(v), 3) for v in t.GetCenter()],
            "starts": [{k: (_round(v) if isinstance(v, float) else v) for k, v in asdict(s).items()} for s in self.starts],
        }


def _round(value: float, digits: int = 5) -> float:
    return round(float(value), digits)


def register_rigid_detailed(
    fixed: sitk.Image,
    moving: sitk.Image,
    fixed_mask: Optional[sitk.Image] = None,
    settings: RigidSettings = RigidSettings(),
    seed: int = 0,
) -> RigidResult:
    """Rigidly register ``moving`` to ``fixed`` (Mattes MI, multi-resolution) from several starts.

    Sequences of one examination share the scanner's coordinates, but each has its own field of
    view, centre and tilt, and the patient moves between them (several degrees, several mm). So:

    1. starts: ``scanner`` (the images as they lie), ``moments`` (the centres of the two heads,
       Otsu foreground, aligned: a header whose origin was lost) and ``grid`` (the centres of the
       two grids aligned; a field of view cut short on one side moves the grid centre, not the
       head, so this one is often tens of mm off), closer ones merged; every start rotates about
       the centre of the T1c brain;
    2. each runs ``screen_iterations`` at the coarsest level; the best translation start is then
       also tried turned by +- ``start_rotation_deg`` about each axis;
    3. the starts are ranked by normalised mutual information (NMI) and the ``refine`` best
       distinct ones go through the remaining levels; the highest final NMI wins.

    At every level the metric samples only T1c brain points that the current transform maps
    at least ``fov_margin_mm`` inside the moving field of view: the sample set stays fixed while
    the optimiser moves, so a slab that cuts the brain (skull base, vertex) no longer drags the
    result away. Metric derivatives come from the interpolator, not ITK's precomputed gradient
    images (which pushed the optimiser uphill on oblique, anisotropic EPI stacks).

    ``settings.starts == "legacy"`` runs the two-start code of before (scanner and grid centres,
    no field-of-view support) for comparison; the quality measurements are the same.

    Args:
        fixed: reference image (the native T1c, with its skull).
        moving: image to align (T1, FLAIR, ADC on their own grids).
        fixed_mask: mask on the fixed grid restricting the metric (the T1c brain); default the
            Otsu foreground of ``fixed``.
        settings: pyramid / sampling / iterations / starts.
        seed: sampling seed.

    Returns:
        :class:`RigidResult` (transform: fixed points -> moving points).
    """
    if settings.starts not in RIGID_STARTS:
        raise ValueError(f"starts must be one of {', '.join(RIGID_STARTS)}, got {settings.starts!r}")
    started = time.perf_counter()
    fixed = sitk.Cast(fixed, sitk.sitkFloat32)
    moving = sitk.Cast(moving, sitk.sitkFloat32)
    given_mask = fixed_mask
    fixed_mask = sitk.Cast((_foreground(fixed) if fixed_mask is None else fixed_mask) > 0, sitk.sitkUInt8)
    levels = [_Level(fixed, moving, fixed_mask, float(mm), float(sigma))
              for mm, sigma in zip(settings.level_spacing_mm, settings.smoothing_sigmas_mm)]
    if settings.starts == "legacy":
        transform = _register_rigid_legacy(fixed, moving, given_mask, settings, seed)
        refined = [_Candidate("legacy", transform, *levels[-1].nmi(transform))]
        outcomes = [StartOutcome("legacy", refined[0].nmi, refined[0].coverage)]
    else:
        refined, outcomes = _multi_start(levels, fixed, moving, fixed_mask, settings, seed)
    return _result(levels, refined, outcomes, settings, settings.starts, time.perf_counter() - started)


@dataclass(frozen=True)
class _Candidate:
    name: str
    transform: sitk.Euler3DTransform
    nmi: float
    coverage: float


class _Level:
    """One pyramid level of a rigid problem: both images, and the T1c brain voxels as points (mm)."""

    def __init__(self, fixed: sitk.Image, moving: sitk.Image, mask: sitk.Image, level_mm: float, sigma_mm: float):
        self.fixed, level_mask = _pyramid_level(fixed, mask, level_mm, sigma_mm)
        self.moving, _ = _pyramid_level(moving, None, level_mm, sigma_mm)
        if level_mask is not None and int(sitk.GetArrayViewFromImage(level_mask).sum()) >= MIN_SUPPORT_POINTS:
            # Only the brain is ever sampled: crop to it (plus the smoothing's reach) so that every
            # resampling of the moving image (NMI) covers the brain's box, not the whole head.
            self.fixed = crop_to_mask(self.fixed, level_mask, 2.0 * max(self.fixed.GetSpacing()))
            level_mask = sitk.Resample(level_mask, self.fixed, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        inside = sitk.GetArrayViewFromImage(level_mask).ravel() > 0 if level_mask is not None else np.zeros(0, bool)
        if int(inside.sum()) < MIN_SUPPORT_POINTS:  # a mask too small for this level: use every voxel
            inside = np.ones(int(np.prod(self.fixed.GetSize())), dtype=bool)
        self.flat = np.flatnonzero(inside)
        size = self.fixed.GetSize()
        index = np.stack(np.unravel_index(self.flat, (size[2], size[1], size[0]))[::-1], axis=1).astype(float)
        direction = np.array(self.fixed.GetDirection()).reshape(3, 3)
        self.points = np.array(self.fixed.GetOrigin()) + (index * np.array(self.fixed.GetSpacing())) @ direction.T
        self.values = np.asarray(sitk.GetArrayViewFromImage(self.fixed)).ravel()[self.flat].astype(np.float64)
        self._moving_to_index = np.array(self.moving.GetDirection()).reshape(3, 3) / np.array(self.moving.GetSpacing())
        self._moving_origin = np.array(self.moving.GetOrigin())
        self._moving_size = np.array(self.moving.GetSize(), dtype=float)
        self._moving_spacing = np.array(self.moving.GetSpacing())

    def support(self, transform: sitk.Transform, margin_mm: float) -> np.ndarray:
        """Brain points that ``transform`` maps at least ``margin_mm`` inside the moving field of view."""
        matrix, offset = _affine_parts(transform)
        index = (self.points @ matrix.T + offset - self._moving_origin) @ self._moving_to_index
        margin = margin_mm / self._moving_spacing
        return np.all((index >= margin - 0.5) & (index <= self._moving_size - 0.5 - margin), axis=1)

    def mask_image(self, selected: np.ndarray) -> sitk.Image:
        size = self.fixed.GetSize()
        array = np.zeros(size[2] * size[1] * size[0], dtype=np.uint8)
        array[self.flat[selected]] = 1
        image = sitk.GetImageFromArray(array.reshape(size[2], size[1], size[0]))
        image.CopyInformation(self.fixed)
        return image

    def nmi(self, transform: sitk.Transform) -> tuple[float, float]:
        """(NMI, coverage): NMI over the brain points inside the moving field of view, and their fraction."""
        selected = self.support(transform, 0.0)
        coverage = float(selected.mean()) if selected.size else 0.0
        if int(selected.sum()) < MIN_SUPPORT_POINTS:
            return 1.0, coverage
        moved = sitk.Resample(self.moving, self.fixed, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        values = np.asarray(sitk.GetArrayViewFromImage(moved)).ravel()[self.flat[selected]]
        return normalised_mutual_information(self.values[selected], values), coverage


def normalised_mutual_information(a: np.ndarray, b: np.ndarray, bins: int = NMI_BINS) -> float:
    """Studholme's normalised mutual information (H(A) + H(B)) / H(A, B) of paired samples.

    1 for independent samples, 2 when one determines the other. Each side is binned between its
    1st and 99th percentiles (outliers fall into the end bins), so intensity scale and offset do
    not matter.
    """
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if a.size < 2:
        return 1.0
    joint = np.bincount(_bin(a, bins) * bins + _bin(b, bins), minlength=bins * bins).astype(np.float64) / a.size
    joint = joint.reshape(bins, bins)
    h_joint = _entropy(joint)
    return float((_entropy(joint.sum(axis=1)) + _entropy(joint.sum(axis=0))) / h_joint) if h_joint > 0 else 1.0


def _bin(values: np.ndarray, bins: int) -> np.ndarray:
    lo, hi = np.percentile(values, [1.0, 99.0])
    if hi <= lo:
        return np.zeros(values.size, dtype=np.int64)
    return np.clip(((values - lo) / (hi - lo) * bins).astype(np.int64), 0, bins - 1)


def _entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def _affine_parts(transform: sitk.Transform) -> tuple[np.ndarray, np.ndarray]:
    """(A, b) with transform(p) = A p + b, for any linear SimpleITK transform (probed on 4 points)."""
    origin = np.array(transform.TransformPoint((0.0, 0.0, 0.0)))
    columns = [np.array(transform.TransformPoint(tuple(float(v) for v in 100.0 * e))) - origin for e in np.eye(3)]
    return np.stack(columns, axis=1) / 100.0, origin


def _mean_distance_mm(a: sitk.Transform, b: sitk.Transform, points: np.ndarray) -> float:
    (ma, oa), (mb, ob) = _affine_parts(a), _affine_parts(b)
    return float(np.linalg.norm(points @ (ma - mb).T + (oa - ob), axis=1).mean())


def _foreground(image: sitk.Image) -> sitk.Image:
    """Otsu foreground (the head) of ``image``, as uint8 on its grid."""
    return sitk.Cast(sitk.OtsuThreshold(image, 0, 1), sitk.sitkUInt8)


def _centroid(mask: sitk.Image) -> Optional[np.ndarray]:
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(sitk.Cast(mask > 0, sitk.sitkUInt8))
    return np.array(stats.GetCentroid(1)) if stats.HasLabel(1) else None


def _grid_centre(image: sitk.Image) -> np.ndarray:
    return np.array(image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2.0 for n in image.GetSize()]))


def _translation_starts(fixed: sitk.Image, moving: sitk.Image) -> list[tuple[str, np.ndarray]]:
    """``scanner`` (0), ``moments`` (head centres aligned) and ``grid`` (grid centres aligned), merged when close."""
    candidates = [("scanner", np.zeros(3))]
    head_fixed, head_moving = (_centroid(_foreground(_pyramid_level(im, None, 4.0, 0.0)[0])) for im in (fixed, moving))
    if head_fixed is not None and head_moving is not None:
        candidates.append(("moments", head_moving - head_fixed))
    candidates.append(("grid", _grid_centre(moving) - _grid_centre(fixed)))
    kept: list[tuple[str, np.ndarray]] = []
    for name, shift in candidates:
        if all(np.linalg.norm(shift - other) > SAME_START_MM for _, other in kept):
            kept.append((name, shift))
    return kept


def _euler(centre: np.ndarray, shift: np.ndarray, angles: Sequence[float] = (0.0, 0.0, 0.0)) -> sitk.Euler3DTransform:
    transform = sitk.Euler3DTransform()
    transform.SetCenter(tuple(float(v) for v in centre))
    transform.SetRotation(*(float(a) for a in angles))
    transform.SetTranslation(tuple(float(v) for v in shift))
    return transform


_RIGID_SCALES = [50.0**2] * 3 + [1.0] * 3  # a rotation of 1/50 rad moves the brain surface (~50 mm) by ~1 mm


def _optimise(level: _Level, start: sitk.Euler3DTransform, iterations: int, learning_rate: float,
              settings: RigidSettings, seed: int) -> Optional[sitk.Euler3DTransform]:
    """Mattes MI (or correlation) on one level from ``start``, sampling the start's field-of-view support.

    Returns ``None`` when too little of the brain lies inside the moving field of view, or when
    ITK gives up (every sample mapped outside the moving image).
    """
    selected = level.support(start, settings.fov_margin_mm)
    n_support = int(selected.sum())
    if n_support < MIN_SUPPORT_POINTS or iterations <= 0:
        return None if n_support < MIN_SUPPORT_POINTS else start
    reg = _method(settings.threads, settings.histogram_bins, settings.metric)
    reg.SetMetricFixedMask(level.mask_image(selected))
    fraction = min(1.0, max(settings.sampling_percentage, 3000.0 / n_support))
    if fraction < 1.0:
        reg.SetMetricSamplingStrategy(reg.REGULAR)
        reg.SetMetricSamplingPercentage(fraction, sampling_seed(seed))
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=learning_rate, minStep=1e-3, numberOfIterations=int(iterations),
                                                 relaxationFactor=0.5, gradientMagnitudeTolerance=1e-8)
    reg.SetOptimizerScales(_RIGID_SCALES)
    reg.SetInitialTransform(sitk.Euler3DTransform(start), inPlace=False)
    try:
        result = reg.Execute(level.fixed, level.moving)
    except RuntimeError:
        return None
    return concrete_transform(_flatten(result, sitk.Euler3DTransform), sitk.Euler3DTransform)


def _screen(level: _Level, starts: Sequence[tuple[str, sitk.Euler3DTransform]], settings: RigidSettings,
            seed: int) -> list[_Candidate]:
    out = []
    for name, start in starts:
        moved = _optimise(level, start, settings.screen_iterations, settings.learning_rate, settings, seed)
        if moved is not None:
            out.append(_Candidate(name, moved, *level.nmi(moved)))
    return out


def _ranked(candidates: Sequence[_Candidate]) -> list[_Candidate]:
    """Candidates that keep enough of the brain in view, best NMI first."""
    if not candidates:
        return []
    best_coverage = max(c.coverage for c in candidates)
    eligible = [c for c in candidates if c.coverage >= MIN_RELATIVE_COVERAGE * best_coverage]
    return sorted(eligible, key=lambda c: -c.nmi)


def _multi_start(levels: Sequence[_Level], fixed: sitk.Image, moving: sitk.Image, fixed_mask: sitk.Image,
                 settings: RigidSettings, seed: int) -> tuple[list[_Candidate], list[StartOutcome]]:
    """Screen the starts at the coarse level, refine the best distinct few (best final NMI first)."""
    centre = _centroid(fixed_mask)
    centre = _grid_centre(fixed) if centre is None else centre
    translations = _translation_starts(fixed, moving)
    screened = _screen(levels[0], [(name, _euler(centre, shift)) for name, shift in translations], settings, seed)
    ranked = _ranked(screened)
    if settings.start_rotation_deg > 0:
        best = ranked[0].name if ranked else "scanner"
        shift = dict(translations)[best]
        angle = np.deg2rad(settings.start_rotation_deg)
        turned = [(f"{best}/{axis}{sign * settings.start_rotation_deg:+g}", _euler(centre, shift, sign * angle * np.eye(3)[k]))
                  for k, axis in enumerate("xyz") for sign in (1.0, -1.0)]
        screened += _screen(levels[0], turned, settings, seed)
    points = levels[-1].points[:: max(1, len(levels[-1].points) // 1000)]
    picked: list[_Candidate] = []
    for candidate in _ranked(screened):
        if all(_mean_distance_mm(candidate.transform, p.transform, points) > AGREE_MM for p in picked):
            picked.append(candidate)
        if len(picked) >= max(1, settings.refine):
            break
    if not picked:  # nothing usable on the coarse level (tiny overlap): the images as they lie
        picked = [_Candidate("scanner", _euler(centre, np.zeros(3)), *levels[0].nmi(_euler(centre, np.zeros(3))))]
    refined = _ranked([_refine(levels, c, settings, seed) for c in picked]) or picked
    final = {c.name: c for c in refined}
    outcomes = [StartOutcome(c.name, c.nmi, c.coverage,
                             final[c.name].nmi if c.name in final else None,
                             _mean_distance_mm(final[c.name].transform, refined[0].transform, points) if c.name in final else None)
                for c in screened]
    return refined, outcomes


def _refine(levels: Sequence[_Level], candidate: _Candidate, settings: RigidSettings, seed: int) -> _Candidate:
    transform = candidate.transform
    remaining = int(settings.iterations[0]) - int(settings.screen_iterations)
    if remaining > 0:
        transform = _optimise(levels[0], transform, remaining, settings.learning_rate / 2, settings, seed) or transform
    for index in range(1, len(levels)):
        lr = settings.learning_rate / (2**index)
        transform = _optimise(levels[index], transform, int(settings.iterations[index]), lr, settings, seed) or transform
    return _Candidate(candidate.name, transform, *levels[-1].nmi(transform))


def _result(levels: Sequence[_Level], refined: Sequence[_Candidate], outcomes: Sequence[StartOutcome],
            settings: RigidSettings, method: str, seconds: float) -> RigidResult:
    """The chosen transform (``refined[0]``) with its quality measurements."""
    best, finest = refined[0], levels[-1]
    points = finest.points[:: max(1, len(finest.points) // 1000)]
    others = [(c, _mean_distance_mm(c.transform, best.transform, points)) for c in refined[1:]]
    elsewhere = [(c, d) for c, d in others if d > AGREE_MM]
    runner_up = max(elsewhere, key=lambda cd: cd[0].nmi) if elsewhere else None
    scanner = _euler(np.array(best.transform.GetCenter()), np.zeros(3))
    shifted = []
    for k in range(3):
        for sign in (1.0, -1.0):
            moved = sitk.Euler3DTransform(best.transform)
            moved.SetTranslation(tuple(np.array(best.transform.GetTranslation()) + sign * PEAK_SHIFT_MM * np.eye(3)[k]))
            shifted.append(finest.nmi(moved)[0])
    return RigidResult(
        transform=sitk.Euler3DTransform(best.transform), method=method, start=best.name,
        metric=_metric_value(finest, best.transform, settings), nmi=best.nmi, nmi_scanner=finest.nmi(scanner)[0],
        nmi_shifted=float(np.mean(shifted)), coverage=best.coverage,
        runner_up_mm=None if runner_up is None else runner_up[1], runner_up_nmi=None if runner_up is None else runner_up[0].nmi,
        agreeing_starts=1 + sum(d <= AGREE_MM for _, d in others), starts=tuple(outcomes), seconds=seconds,
    )


def _metric_value(level: _Level, transform: sitk.Transform, settings: PyramidSettings) -> float:
    """The registration metric of ``transform`` on ``level``, over the brain points inside the moving field of view."""
    selected = level.support(transform, 0.0)
    if int(selected.sum()) < MIN_SUPPORT_POINTS:
        return float("nan")
    reg = _method(settings.threads, settings.histogram_bins, settings.metric)
    reg.SetMetricFixedMask(level.mask_image(selected))
    reg.SetInitialTransform(sitk.Euler3DTransform(transform), inPlace=False)
    return float(reg.MetricEvaluate(level.fixed, level.moving))


def _register_rigid_legacy(
    fixed: sitk.Image,
    moving: sitk.Image,
    fixed_mask: Optional[sitk.Image],
    settings: PyramidSettings,
    seed: int,
) -> sitk.Euler3DTransform:
    """The rigid registration before the clinical protocol (``RigidSettings(starts="legacy")``), for the bench.

    Two starts: the identity about the fixed grid centre and the grid centres aligned; both run
    the coarsest level and the finer levels continue from the one whose metric is lower there.
    No field-of-view support, ITK's gradient images. On the clinical phantom it ended tens of mm
    away on slabs that cut the brain (see ``bench.py``).
    """
    centred = concrete_transform(sitk.CenteredTransformInitializer(
        fixed, moving, sitk.Euler3DTransform(), sitk.CenteredTransformInitializerFilter.GEOMETRY
    ), sitk.Euler3DTransform)
    as_they_lie = sitk.Euler3DTransform()
    as_they_lie.SetCenter(centred.GetCenter())  # rotate about the fixed grid's centre, like the other start
    radius = 50.0  # mm: a rotation of 1/radius rad moves the brain surface by about 1 mm
    scales = [radius**2] * 3 + [1.0] * 3
    # Both starts run the coarsest level (cheap); the finer levels continue from the better one.
    coarse = [_register_levels(fixed, moving, fixed_mask, start, scales, settings, seed, levels=[0], gradient_images=True)
              for start in (as_they_lie, centred)]
    best = min(coarse, key=lambda t: _metric_at_level(fixed, moving, fixed_mask, t, settings, 0))
    finer = range(1, len(settings.level_spacing_mm))
    return sitk.Euler3DTransform(_register_levels(fixed, moving, fixed_mask, best, scales, settings, seed, levels=finer,
                                                  gradient_images=True))


def concrete_transform(transform: sitk.Transform, kind: type) -> Any:
    """``transform`` as an instance of ``kind`` (e.g. ``sitk.Euler3DTransform``).

    SimpleITK 2.2/2.3 (shipped by Slicer 5.6/5.8) return the results of
    ``CenteredTransformInitializer``, ``ImageRegistrationMethod.Execute`` and ``ReadTransform`` as
    the generic ``sitk.Transform``, which has no ``GetCenter``/``GetMatrix``; 2.4+ return the
    concrete class. ``Downcast()`` (SimpleITK >= 2.0) gives the concrete class on every version.

    Raises:
        TypeError: the transform is not a ``kind`` (e.g. an affine where a rigid one was expected).
    """
    if isinstance(transform, kind):
        return transform
    downcast = transform.Downcast()
    if not isinstance(downcast, kind):
        raise TypeError(f"expected a transform of type {kind.__name__}, got {type(downcast).__name__} ({transform.GetName()})")
    return downcast


def _metric_at_level(fixed: sitk.Image, moving: sitk.Image, fixed_mask: Optional[sitk.Image], transform: sitk.Transform,
                     settings: PyramidSettings, level: int) -> float:
    """The registration metric of ``transform`` on pyramid level ``level`` (lower is better)."""
    level_mm, sigma = float(settings.level_spacing_mm[level]), float(settings.smoothing_sigmas_mm[level])
    fixed_l, mask_l = _pyramid_level(fixed, fixed_mask, level_mm, sigma)
    moving_l, _ = _pyramid_level(moving, None, level_mm, sigma)
    reg = _method(settings.threads, settings.histogram_bins, settings.metric)
    if mask_l is not None and int(sitk.GetArrayViewFromImage(mask_l).sum()) > 0:
        reg.SetMetricFixedMask(mask_l)
    reg.SetInitialTransform(type(transform)(transform), inPlace=False)
    return float(reg.MetricEvaluate(fixed_l, moving_l))


def affine_metric(template: Template, t1c: sitk.Image, brain_mask: sitk.Image, atlas_to_t1c: sitk.Transform,
                  settings: AffineSettings = AffineSettings()) -> float:
    """The affine's registration metric at the finest pyramid level (Mattes MI: lower is better).

    Template brain (fixed, inside its mask) against the skull-stripped native T1c, as
    :func:`register_affine` saw them; for ``preprocess.json``.
    """
    moving = skull_stripped(t1c, brain_mask)
    return _metric_at_level(template.image, moving, template.brain_mask, atlas_to_t1c, settings,
                            len(settings.level_spacing_mm) - 1)


def _affine_scales() -> list:
    # Regular-step descent on 12 affine parameters: a unit change of a matrix entry moves a point
    # at distance r from the centre by r mm. Weighting matrix entries by r^2 (r ~ 50 mm, the
    # brain's RMS radius) makes one step mean about the same displacement for all parameters.
    radius = 50.0
    return [radius**2] * 9 + [1.0] * 3


def register_affine(
    fixed: sitk.Image,
    moving: sitk.Image,
    fixed_mask: Optional[sitk.Image] = None,
    moving_mask: Optional[sitk.Image] = None,
    settings: AffineSettings = AffineSettings(),
    seed: int = 0,
) -> sitk.AffineTransform:
    """Affinely register a skull-stripped ``moving`` brain to the skull-stripped ``fixed`` template.

    Both images are cropped to their brain bounding boxes (plus ``settings.margin_mm``), the
    moments of the two brains initialise centre and translation, and the metric samples only
    inside ``fixed_mask``. With ``moving_mask`` the moving brain's intensities are first mapped
    to [0, 1] between their 1st and 99th percentiles inside the mask (clipped at 1.5, 0 outside):
    clinical scanners store images with offsets and slopes that leave the brain negative or
    around the zeros of the stripped background, which misplaced the intensity moments and
    confused the metric (on the clinical phantom: mean error 7 -> 0.45 mm together with the
    derivatives of :func:`_method`).

    Args:
        fixed: the template (atlas space).
        moving: the skull-stripped native T1c.
        fixed_mask: brain mask on the fixed grid (metric support and crop).
        moving_mask: brain mask on the moving grid (crop only).
        settings: see :class:`AffineSettings`.
        seed: sampling seed.

    Returns:
        AffineTransform mapping atlas points (mm) to native T1c points (mm).
    """
    fixed = sitk.Cast(fixed, sitk.sitkFloat32)
    moving = sitk.Cast(moving, sitk.sitkFloat32)
    if fixed_mask is not None:
        fixed = crop_to_mask(fixed, fixed_mask, settings.margin_mm)
        fixed_mask = sitk.Resample(fixed_mask, fixed, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    if moving_mask is not None:
        moving = crop_to_mask(_normalise_brain(moving, moving_mask), moving_mask, settings.margin_mm)
    initial = concrete_transform(sitk.CenteredTransformInitializer(
        fixed, moving, sitk.AffineTransform(3), sitk.CenteredTransformInitializerFilter.MOMENTS
    ), sitk.AffineTransform)
    return sitk.AffineTransform(_register_levels(fixed, moving, fixed_mask, initial, _affine_scales(), settings, seed))


def _normalise_brain(image: sitk.Image, mask: sitk.Image) -> sitk.Image:
    """``image`` mapped to [0, 1] between its 1st and 99th percentiles inside ``mask`` (clipped at 1.5), 0 outside."""
    binary = sitk.Cast(mask > 0, sitk.sitkUInt8)
    inside = sitk.GetArrayViewFromImage(image)[sitk.GetArrayViewFromImage(binary) > 0]
    if inside.size < 2:
        return image
    lo, hi = (float(v) for v in np.percentile(inside, [1.0, 99.0]))
    if hi <= lo:
        return image
    scaled = sitk.Clamp(sitk.Cast((image - lo) / (hi - lo), sitk.sitkFloat32), sitk.sitkFloat32, 0.0, 1.5)
    return sitk.Mask(scaled, binary)


def _register_levels(
    fixed: sitk.Image,
    moving: sitk.Image,
    fixed_mask: Optional[sitk.Image],
    initial: sitk.Transform,
    scales: Sequence[float],
    settings,
    seed: int,
    levels: Optional[Sequence[int]] = None,
    gradient_images: bool = False,
) -> sitk.Transform:
    """Coarse-to-fine registration; each level is its own single-level ITK registration.

    Running the levels separately lets the iteration budget differ per level and lets the
    pyramid be built by cheap block averaging of *both* images (see :func:`_pyramid_level`).
    ``gradient_images``: see :func:`_method`.
    """
    kind = type(initial)
    transform = initial
    schedule = list(zip(settings.level_spacing_mm, settings.smoothing_sigmas_mm, settings.iterations))
    for level in (range(len(schedule)) if levels is None else levels):
        level_mm, sigma, iterations = schedule[level]
        fixed_l, mask_l = _pyramid_level(fixed, fixed_mask, float(level_mm), float(sigma))
        moving_l, _ = _pyramid_level(moving, None, float(level_mm), float(sigma))
        reg = _method(settings.threads, settings.histogram_bins, settings.metric, gradient_images)
        if mask_l is not None:
            n_support = int(sitk.GetArrayViewFromImage(mask_l).sum())
            if n_support > 0:
                reg.SetMetricFixedMask(mask_l)
        else:
            n_support = int(np.prod(fixed_l.GetSize()))
        # Regular sampling at a low percentage, but never fewer than ~3000 points per level.
        fraction = min(1.0, max(settings.sampling_percentage, 3000.0 / max(n_support, 1)))
        if fraction < 1.0:
            reg.SetMetricSamplingStrategy(reg.REGULAR)
            reg.SetMetricSamplingPercentage(fraction, sampling_seed(seed))
        reg.SetOptimizerAsRegularStepGradientDescent(
            learningRate=settings.learning_rate / (2**level), minStep=1e-3, numberOfIterations=int(iterations),
            relaxationFactor=0.5, gradientMagnitudeTolerance=1e-8,
        )
        reg.SetOptimizerScales(list(scales))
        reg.SetInitialTransform(kind(transform), inPlace=False)
        transform = _flatten(reg.Execute(fixed_l, moving_l), kind)
    return transform


def _pyramid_level(
    image: sitk.Image, mask: Optional[sitk.Image], level_mm: float, sigma_mm: float
) -> tuple[sitk.Image, Optional[sitk.Image]]:
    """Block-average ``image`` to about ``level_mm`` voxels (cheap anti-aliasing), then smooth.

    ITK's own pyramid smooths the full-resolution images at every level (~0.1 s per image and
    level at 1 mm) and keeps the moving image at full resolution; shrinking both first makes
    every later operation act on 8-512x fewer voxels.
    """
    shrink = [max(1, int(round(level_mm / s))) for s in image.GetSpacing()]
    if max(shrink) > 1:
        image = sitk.BinShrink(image, shrink)
        if mask is not None:
            mask = sitk.Cast(sitk.BinShrink(sitk.Cast(mask, sitk.sitkFloat32), shrink) > 0.5, sitk.sitkUInt8)
    if sigma_mm > 0:
        image = sitk.SmoothingRecursiveGaussian(image, sigma_mm)
    return image, mask


def _flatten(transform: sitk.Transform, kind) -> sitk.Transform:
    """Collapse a registration result (composite of one transform) into a plain transform."""
    if isinstance(transform, sitk.CompositeTransform) or transform.GetName() == "CompositeTransform":
        composite = sitk.CompositeTransform(transform)
        transform = composite.GetNthTransform(composite.GetNumberOfTransforms() - 1)
    try:
        return kind(transform)
    except (TypeError, RuntimeError):
        return transform.Downcast()


def compose(*transforms: sitk.Transform) -> sitk.CompositeTransform:
    """Compose transforms in the order they are applied to a point.

    ``compose(a, b)(p) == b(a(p))``: e.g. ``compose(atlas_to_t1c, t1c_to_t1)`` maps atlas points
    to native T1 points, which is what resampling the T1 into atlas space needs.
    """
    # SimpleITK applies the last-added transform first.
    return sitk.CompositeTransform(list(reversed(transforms)))


def resample(
    image: sitk.Image,
    reference: sitk.Image,
    transform: Optional[sitk.Transform] = None,
    interpolator: int = sitk.sitkBSpline,
    default: float = 0.0,
    pixel_type: int = sitk.sitkFloat32,
) -> sitk.Image:
    """Resample ``image`` onto ``reference``'s grid through ``transform`` (reference -> image points)."""
    return sitk.Resample(image, reference, transform or sitk.Transform(), interpolator, default, pixel_type)


def atlas_crop_grid(template: Template, spacing: Sequence[float], crop_size: Sequence[int]) -> sitk.Image:
    """The atlas-space crop grid: ``crop_size`` voxels of ``spacing`` mm, template orientation.

    Centred on the centre of the template's brain bounding box rather than on its field of view:
    nilearn's 1 mm template (197 x 233 x 189) has the brain touching its lowest slice, and a
    160-slice crop about the field-of-view centre would cut 14 mm of brainstem/cerebellum. The
    paper's numbers (1 mm, 160 x 192 x 160; "Preprocessing") are the defaults of ``Geometry``.

    Returns:
        A zero float32 image whose origin/spacing/direction are the crop grid's true atlas geometry.
    """
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(template.brain_mask)
    x0, y0, z0, sx, sy, sz = stats.GetBoundingBox(1)
    centre_index = [x0 + (sx - 1) / 2.0, y0 + (sy - 1) / 2.0, z0 + (sz - 1) / 2.0]
    centre = np.array(template.brain_mask.TransformContinuousIndexToPhysicalPoint(centre_index))
    direction = np.array(template.brain_mask.GetDirection()).reshape(3, 3)
    spacing = np.asarray(spacing, dtype=float)
    size = np.asarray(crop_size, dtype=int)
    origin = centre - direction @ ((size - 1) / 2.0 * spacing)
    grid = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
    grid.SetSpacing(tuple(float(s) for s in spacing))
    grid.SetDirection(tuple(float(v) for v in direction.ravel()))
    grid.SetOrigin(tuple(float(v) for v in origin))
    return grid


def mask_points_mm(mask: sitk.Image, max_points: int = 20000, seed: int = 0) -> np.ndarray:
    """Physical coordinates (N x 3, mm) of up to ``max_points`` voxels of ``mask``."""
    index = np.argwhere(sitk.GetArrayViewFromImage(mask) > 0)[:, ::-1].astype(float)  # (x, y, z)
    if len(index) > max_points:
        index = index[np.random.default_rng(seed).choice(len(index), max_points, replace=False)]
    direction = np.array(mask.GetDirection()).reshape(3, 3)
    return np.array(mask.GetOrigin()) + (index * np.array(mask.GetSpacing())) @ direction.T


def mean_point_error_mm(estimate: sitk.Transform, truth: sitk.Transform, points: np.ndarray) -> float:
    """Mean Euclidean distance (mm) between ``estimate(p)`` and ``truth(p)`` over ``points``."""
    a = np.array([estimate.TransformPoint(tuple(map(float, p))) for p in points])
    b = np.array([truth.TransformPoint(tuple(map(float, p))) for p in points])
    return float(np.linalg.norm(a - b, axis=1).mean())

