"""Registration to the ICBM 2009a template and single-pass resampling (SimpleITK).

The paper (Materials and methods, "Preprocessing") registers every image to the ICBM 2009a
nonlinear symmetric atlas with FSL FLIRT affine deformations and resamples to 1 mm with splines.
Here, with SimpleITK:

* each modality is registered rigidly to the T1c (Mattes mutual information, multi-resolution),
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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np
import SimpleITK as sitk

__all__ = [
    "AffineSettings",
    "RigidSettings",
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
]


@dataclass(frozen=True)
class RigidSettings:
    """Intra-subject rigid registration (modality -> T1c): Mattes MI, multi-resolution.

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


@dataclass(frozen=True)
class AffineSettings(RigidSettings):
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


def _method(threads: int, bins: int, metric: str = "mattes") -> sitk.ImageRegistrationMethod:
    reg = sitk.ImageRegistrationMethod()
    reg.SetNumberOfThreads(int(threads))
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
    """Rigidly register ``moving`` to ``fixed`` (Mattes MI, multi-resolution), from two starts.

    Sequences of one examination share the scanner's coordinates, so the first start is the
    identity (the images as they lie); the second aligns the centres of the two image grids,
    which helps when a header's origin was lost. Both run the coarsest pyramid level, and the
    finer levels continue from the one whose metric is lower there. The grid-centre start alone
    was seen to end tens of mm away (a field of view cut short on one side moves the grid
    centre, not the head); the plausibility checks flag such results.

    Args:
        fixed: reference image (the native T1c, with its skull).
        moving: image to align (T1, FLAIR, ADC on their own grids).
        fixed_mask: optional mask on the fixed grid restricting the metric (the T1c brain).
        settings: pyramid / sampling / iterations.
        seed: sampling seed.

    Returns:
        Euler3DTransform mapping fixed points (mm) to moving points (mm).
    """
    fixed = sitk.Cast(fixed, sitk.sitkFloat32)
    moving = sitk.Cast(moving, sitk.sitkFloat32)
    centred = sitk.CenteredTransformInitializer(
        fixed, moving, sitk.Euler3DTransform(), sitk.CenteredTransformInitializerFilter.GEOMETRY
    )
    as_they_lie = sitk.Euler3DTransform()
    as_they_lie.SetCenter(centred.GetCenter())  # rotate about the fixed grid's centre, like the other start
    radius = 50.0  # mm: a rotation of 1/radius rad moves the brain surface by about 1 mm
    scales = [radius**2] * 3 + [1.0] * 3
    # Both starts run the coarsest level (cheap); the finer levels continue from the better one.
    coarse = [_register_levels(fixed, moving, fixed_mask, start, scales, settings, seed, levels=[0])
              for start in (as_they_lie, centred)]
    best = min(coarse, key=lambda t: _metric_at_level(fixed, moving, fixed_mask, t, settings, 0))
    finer = range(1, len(settings.level_spacing_mm))
    return sitk.Euler3DTransform(_register_levels(fixed, moving, fixed_mask, best, scales, settings, seed, levels=finer))


def _metric_at_level(fixed: sitk.Image, moving: sitk.Image, fixed_mask: Optional[sitk.Image], transform: sitk.Transform,
                     settings: RigidSettings, level: int) -> float:
    """The registration metric of ``transform`` on pyramid level ``level`` (lower is better)."""
    level_mm, sigma = float(settings.level_spacing_mm[level]), float(settings.smoothing_sigmas_mm[level])
    fixed_l, mask_l = _pyramid_level(fixed, fixed_mask, level_mm, sigma)
    moving_l, _ = _pyramid_level(moving, None, level_mm, sigma)
    reg = _method(settings.threads, settings.histogram_bins, settings.metric)
    if mask_l is not None and int(sitk.GetArrayViewFromImage(mask_l).sum()) > 0:
        reg.SetMetricFixedMask(mask_l)
    reg.SetInitialTransform(type(transform)(transform), inPlace=False)
    return float(reg.MetricEvaluate(fixed_l, moving_l))


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
    inside ``fixed_mask``.

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
        moving = crop_to_mask(moving, moving_mask, settings.margin_mm)
    initial = sitk.CenteredTransformInitializer(
        fixed, moving, sitk.AffineTransform(3), sitk.CenteredTransformInitializerFilter.MOMENTS
    )
    return sitk.AffineTransform(_register_levels(fixed, moving, fixed_mask, initial, _affine_scales(), settings, seed))


def _register_levels(
    fixed: sitk.Image,
    moving: sitk.Image,
    fixed_mask: Optional[sitk.Image],
    initial: sitk.Transform,
    scales: Sequence[float],
    settings,
    seed: int,
    levels: Optional[Sequence[int]] = None,
) -> sitk.Transform:
    """Coarse-to-fine registration; each level is its own single-level ITK registration.

    Running the levels separately lets the iteration budget differ per level and lets the
    pyramid be built by cheap block averaging of *both* images (see :func:`_pyramid_level`).
    """
    kind = type(initial)
    transform = initial
    schedule = list(zip(settings.level_spacing_mm, settings.smoothing_sigmas_mm, settings.iterations))
    for level in (range(len(schedule)) if levels is None else levels):
        level_mm, sigma, iterations = schedule[level]
        fixed_l, mask_l = _pyramid_level(fixed, fixed_mask, float(level_mm), float(sigma))
        moving_l, _ = _pyramid_level(moving, None, float(level_mm), float(sigma))
        reg = _method(settings.threads, settings.histogram_bins, settings.metric)
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
            reg.SetMetricSamplingPercentage(fraction, seed)
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

