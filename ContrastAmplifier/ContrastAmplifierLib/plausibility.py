"""Plausibility checks on the inputs and on each preprocessing step: bad input never passes as good.

Preprocessing used to accept a noise cube as a brain, a FLAIR of another patient and a negated
T1c without a word. The paper removed such cases by hand ("an exhaustive quality control was
finally performed to remove the sequences with important artifacts or failed alignment",
Materials and methods, "Preprocessing"); here small pure functions measure each step and return
:class:`Finding` objects. :func:`.preprocessing.preprocess_case` runs three groups and reports
each finding as a warning; with ``strict`` the first group with findings raises one
:class:`PlausibilityError` listing them all (:func:`raise_if_strict`).

1. **intensity** (each input, right after reading, before HD-BET): ``intensity.negative``
   (more than 5 % of the voxels below -2 % of the image's 99th percentile of |value|: MR
   magnitude images and ADC maps are >= 0), ``intensity.levels`` (< 16 distinct values: a label
   map or mask).
2. **brain** (T1c, after HD-BET and the affine registration to ICBM 2009a): ``brain.volume``,
   ``brain.extent`` (sides of the mask's principal-axes bounding box), ``brain.compactness``
   (mask volume / that box's volume), ``brain.fragmented`` (share of the largest connected
   component), ``brain.atlas_dice`` (template brain mask vs the HD-BET mask mapped into atlas
   space) and ``brain.atlas_correlation`` (template vs the registered T1c brain, inside the
   template mask), both on a 2 mm atlas grid.
3. **alignment** (each other modality, after its rigid registration to the T1c):
   ``registration.suspect`` (the registration's own similarity peak is low and flat:
   :func:`check_registration`, calibrated on clinical-protocol phantoms),
   ``overlap.fov`` (share of T1c brain points mapped inside the modality's field of view),
   ``motion.displacement`` (largest displacement of a brain point under the rigid transform)
   and ``similarity.gradient`` (correlation of Gaussian gradient magnitudes, sigma 2 mm, of the
   T1c and the registered modality inside the brain: edges line up across contrasts).

Calibration (phantom cases of :mod:`.phantom`, seeds 990000-990011 at 3 mm, 991000-991001 at
2 mm, 992000 at 1 mm; real HD-BET ``fast`` and the pipeline's registrations; measured with the
functions of this module). "Noise": uniform noise cubes on the four inputs' grids (6 cases);
"negated": T1c x -1 (6 cases); "other patient": the FLAIR of every other case of the same
cohort (134 ordered pairs).

========================= ================ =================================== ===========
check                     normal (15)      bad inputs                          threshold
========================= ================ =================================== ===========
negative fraction         0.000            negated 0.51-0.82                   > 0.05
distinct levels           >= 910           (label maps; unit-tested)           < 16
brain volume (mL)         1756-2113        noise 2455-3833, negated 1658-2783  700-2600
box sides (mm)            142-193          noise largest 250-388               90-220
compactness               0.46-0.48        noise 0.08-0.22, negated 0.12-0.40  < 0.35
largest component         1.00             1.00 (HD-BET keeps one component)   < 0.9
atlas Dice                0.963-0.982      noise 0.46-0.59, negated 0.32-0.85  < 0.8
atlas correlation         0.76-0.89        noise -0.01-0.20, negated -0.33-0.12 < 0.4
FOV fraction              1.00             noise 0.70-0.96, other 0.74-1.00    < 0.9
max displacement (mm)     3.0-9.0          other 8.8-112 (median 26)           > 15
gradient correlation      0.63-0.98        noise <= 0.02, other -0.07-0.88     < 0.35
========================= ================ =================================== ===========

What this shows, and what it does not:

* Noise cubes are caught by every brain check but the volume (3 of 6 noise masks have a
  brain-like volume) and the largest component; negated T1c by the intensity check (100 %), and
  5 of 6 also by the atlas Dice, 6 of 6 by the atlas correlation.
* The phantom brains are the ICBM template scaled by 0.94-1.06 per axis: 1756-2113 mL, larger
  than a typical adult HD-BET mask (roughly 1100-1700 mL); the upper volume bound leaves room
  for them (the largest possible phantom brain is about 2370 mL), the lower bound (700 mL) is
  far below any adult brain (paper Table 2: ages 55 +- 14). On real data these two bounds are
  not calibrated, only argued.
* Every phantom has the same anatomy (the template), so a FLAIR of "another patient" differs
  from the right one only by head pose, scale and lesions: after rigid registration its edges
  line up almost as well (gradient correlation median 0.63) and only the motion is a signal.
  The phantom's motion between two sequences of one examination is at most 2 degrees and 2 mm
  per axis (``phantom_acquisition``): over 300 seeds the true T1c -> FLAIR displacement of
  brain points is at most 10.6 mm (registered: 3.0-9.0 mm), while another phantom patient's
  head pose (8 degrees, 10 mm per axis) gives 4.4-56 mm (rigid fit, 17 940 pairs; 95.5 %
  above 15 mm). On the 134 registered pairs 96.3 % are flagged; the 5 missed ones had moved
  8.8-14.8 mm. The 15 mm bound is the physical one (motion within one MR examination stays
  below ~10 degrees / 15 mm), not the phantom's 10.6 mm: 12 mm would catch 98.5-99 % of the
  pairs but flag real restless patients. The check cannot see another patient whose head lay
  in nearly the same scanner position (the misses), and it flags files whose headers lost the
  scanner coordinates (origins reset on export) even when they belong together.
* ``similarity.gradient`` separates noise (<= 0.02) and failed registrations: on the normal
  3 mm case of seed 990002 the ADC -> T1c rigid registration ended 17 mm (mean) from the
  phantom's truth; it measured 21.7 mm of displacement and a gradient correlation of 0.21 and
  is flagged by both checks (the other 14 x 3 registrations: 0.63-0.98).
* ``brain.fragmented`` cannot be calibrated with HD-BET (its post-processing keeps the largest
  component); it guards user-given brain masks.

The checks add about 1.9 s to a 1 mm case (0.6 s per registered modality, mostly the gradient
correlation) and 0.5 s at 3 mm; HD-BET alone takes 20-30 s on the CPU.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import SimpleITK as sitk

from .imageio import ImageValidationError, display_name

__all__ = [
    "Finding", "PlausibilityError", "raise_if_strict", "format_findings",
    "negative_fraction", "distinct_levels", "check_intensity",
    "MaskShape", "mask_shape", "check_brain_mask",
    "dice", "masked_correlation", "atlas_fit", "check_atlas_fit",
    "fov_fraction", "max_displacement_mm", "gradient_correlation", "check_alignment",
    "REGISTRATION_SUSPECT", "check_registration", "suspect_modalities",
]

# --- thresholds (calibration in the module docstring) ------------------------------------------
#: A voxel counts as negative below ``-NEGATIVE_TOLERANCE`` x the 99th percentile of |intensity|
#: (small negatives from interpolation ringing or scanner offsets are tolerated).
NEGATIVE_TOLERANCE = 0.02
#: Largest tolerated fraction of negative voxels in a magnitude image or an ADC map.
MAX_NEGATIVE_FRACTION = 0.05
#: Fewer distinct values than this: a label map or a mask, not an MR image.
MIN_DISTINCT_LEVELS = 16
#: Plausible HD-BET brain volume (mL) of an adult (paper Table 2: ages 55 +- 14 years).
BRAIN_VOLUME_ML = (700.0, 2600.0)
#: Plausible sides (mm) of the brain mask's oriented bounding box (smallest, largest).
BRAIN_EXTENT_MM = (90.0, 220.0)
#: Smallest plausible mask volume / oriented-bounding-box volume (an ellipsoid fills 0.52).
MIN_BRAIN_FILL = 0.35
#: Smallest plausible fraction of the mask in its largest connected component.
MIN_LARGEST_COMPONENT = 0.9
#: Atlas fit: Dice of the template brain mask and the HD-BET mask mapped into atlas space.
MIN_ATLAS_DICE = 0.8
#: Atlas fit: correlation of the registered T1c brain with the template inside the template mask.
MIN_ATLAS_CORRELATION = 0.4
#: Fraction of the T1c brain that must fall inside a modality's field of view after registration.
MIN_FOV_FRACTION = 0.9
#: Largest plausible displacement (mm) of a brain point under a modality -> T1c rigid transform.
MAX_DISPLACEMENT_MM = 15.0
#: Smallest plausible correlation of gradient magnitudes (T1c vs registered modality) in the brain.
MIN_GRADIENT_CORRELATION = 0.35
#: Grid spacing (mm) of the atlas-fit and gradient-correlation measurements.
CHECK_SPACING_MM = 2.0
#: Smallest plausible NMI peak of a rigid registration (:attr:`.registration.RigidResult.peak`:
#: (NMI - 1) / (NMI shifted by 6 mm - 1)); calibration in :func:`check_registration`.
MIN_REGISTRATION_PEAK = 2.3
#: Finding code of a registration that looks wrong (the QC picture marks its modality).
REGISTRATION_SUSPECT = "registration.suspect"


@dataclass(frozen=True)
class Finding:
    """One implausible measurement.

    Attributes:
        code: stable identifier, ``group.check`` (e.g. ``"motion.displacement"``).
        modality: input it concerns (``"t1c"``, ``"flair"``...).
        value: the measured value.
        threshold: the bound it crossed.
        message: what is wrong and what to check, for a radiologist.
    """

    code: str
    modality: str
    value: float
    threshold: float
    message: str

    def to_dict(self) -> dict:
        return asdict(self)


class PlausibilityError(ImageValidationError):
    """Strict mode: the inputs failed plausibility checks (``findings`` lists them all)."""

    def __init__(self, findings: Sequence[Finding]):
        self.findings: tuple[Finding, ...] = tuple(findings)
        super().__init__(f"implausible inputs (strict mode):\n{format_findings(self.findings)}")

    def __reduce__(self):  # picklable across worker processes (the default would pass the message)
        return (type(self), (self.findings,))


def format_findings(findings: Iterable[Finding]) -> str:
    """One ``- [code] message`` line per finding."""
    return "\n".join(f"- [{f.code}] {f.message}" for f in findings)


def raise_if_strict(findings: Sequence[Finding], strict: bool) -> None:
    """In strict mode, turn ``findings`` (if any) into one :class:`PlausibilityError` listing them all."""
    if strict and findings:
        raise PlausibilityError(findings)


def _finding(code: str, modality: str, value: float, threshold: float, message: str) -> Finding:
    return Finding(code, modality, float(value), float(threshold), message)


# --- intensities (right after reading) ---------------------------------------------------------
def _sample(array: np.ndarray, max_voxels: int = 1_000_000) -> np.ndarray:
    flat = np.asarray(array).ravel()
    return flat[:: max(1, flat.size // max_voxels)]


def negative_fraction(array: np.ndarray, tolerance: float = NEGATIVE_TOLERANCE) -> float:
    """Fraction of voxels below ``-tolerance`` x the 99th percentile of ``|array|``.

    Args:
        array: image intensities (any shape).
        tolerance: tolerated negative excursion, relative to the image's bright level.

    Returns:
        A fraction in [0, 1] (0 for an all-zero image).
    """
    values = np.asarray(array, dtype=np.float32)
    scale = float(np.percentile(np.abs(_sample(values)), 99))
    if scale <= 0:
        return 0.0
    return float(np.count_nonzero(values < -tolerance * scale)) / values.size


def distinct_levels(array: np.ndarray, limit: int = 1000) -> int:
    """Number of distinct values of ``array`` (counted on a subsample, capped at ``limit``)."""
    return int(min(limit, np.unique(_sample(array)).size))


def check_intensity(image: sitk.Image, modality: str) -> list[Finding]:
    """Intensities that do not look like an MR magnitude image (or an ADC map, also >= 0).

    Args:
        image: the input as read (native grid).
        modality: its name (``"t1c"``...).

    Returns:
        ``intensity.negative`` (too many clearly negative voxels) and/or ``intensity.levels``
        (too few distinct values: a label map or mask).
    """
    array = sitk.GetArrayViewFromImage(image)
    name = display_name(modality)
    findings = []
    fraction = negative_fraction(array)
    if fraction > MAX_NEGATIVE_FRACTION:
        what = ("every voxel is <= 0" if float(array.max()) <= 0
                else f"{100 * fraction:.1f}% of the voxels are clearly negative")
        findings.append(_finding(
            "intensity.negative", modality, fraction, MAX_NEGATIVE_FRACTION,
            f"{name}: {what} (max {100 * MAX_NEGATIVE_FRACTION:.0f}% tolerated); MR magnitude images and ADC maps "
            f"are >= 0. Check that the {name} is a magnitude image (not phase, not inverted, no rescale offset)."))
    levels = distinct_levels(array)
    if levels < MIN_DISTINCT_LEVELS:
        findings.append(_finding(
            "intensity.levels", modality, levels, MIN_DISTINCT_LEVELS,
            f"{name}: only {levels} distinct values (at least {MIN_DISTINCT_LEVELS} expected); this looks like a "
            f"label map or a mask, not an MR image. Load the {name} series itself."))
    return findings


# --- brain (after skull stripping and the atlas affine) ----------------------------------------
@dataclass(frozen=True)
class MaskShape:
    """Shape of a brain mask: volume (mL), sorted oriented-bounding-box sides (mm), fill, connectivity."""

    volume_ml: float
    extents_mm: tuple[float, float, float]
    fill: float
    largest_component: float


def mask_shape(mask: sitk.Image) -> MaskShape:
    """Measure a binary mask (any non-zero voxel is inside).

    ``fill`` is the mask volume over the volume of its oriented (principal-axes) bounding box;
    ``largest_component`` the fraction of the mask in its largest 26-connected component.
    """
    binary = sitk.Cast(mask > 0, sitk.sitkUInt8)
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.ComputeOrientedBoundingBoxOn()
    stats.Execute(binary)
    if not stats.HasLabel(1):
        return MaskShape(0.0, (0.0, 0.0, 0.0), 0.0, 0.0)
    volume = stats.GetPhysicalSize(1)
    e1, e2, e3 = sorted(float(v) for v in stats.GetOrientedBoundingBoxSize(1))
    extents = (e1, e2, e3)
    components = sitk.RelabelComponent(sitk.ConnectedComponent(binary, True), sortByObjectSize=True)
    largest = int(np.count_nonzero(sitk.GetArrayViewFromImage(components) == 1))
    total = int(np.count_nonzero(sitk.GetArrayViewFromImage(binary)))
    return MaskShape(volume / 1000.0, extents, float(volume / max(np.prod(extents), 1e-9)), largest / total)


def check_brain_mask(mask: sitk.Image, modality: str = "t1c") -> list[Finding]:
    """Does the skull-stripping mask (native T1c grid) look like an adult brain?"""
    shape = mask_shape(mask)
    hint = "this does not look like a brain MRI; check that the T1c is a head MRI of an adult."
    findings = []
    lo, hi = BRAIN_VOLUME_ML
    if not lo <= shape.volume_ml <= hi:
        findings.append(_finding("brain.volume", modality, shape.volume_ml, lo if shape.volume_ml < lo else hi,
                                 f"brain mask volume {shape.volume_ml:.0f} mL is outside {lo:.0f}-{hi:.0f} mL: {hint}"))
    lo, hi = BRAIN_EXTENT_MM
    small, large = shape.extents_mm[0], shape.extents_mm[2]
    if small < lo or large > hi:
        bad, bound = (small, lo) if small < lo else (large, hi)
        sides = " x ".join(f"{v:.0f}" for v in shape.extents_mm)
        findings.append(_finding("brain.extent", modality, bad, bound,
                                 f"brain mask extents {sides} mm are outside {lo:.0f}-{hi:.0f} mm: {hint}"))
    if shape.fill < MIN_BRAIN_FILL:
        findings.append(_finding("brain.compactness", modality, shape.fill, MIN_BRAIN_FILL,
                                 f"brain mask fills {shape.fill:.2f} of its bounding box (at least {MIN_BRAIN_FILL:.2f} "
                                 f"expected: a brain is compact): {hint}"))
    if shape.largest_component < MIN_LARGEST_COMPONENT:
        findings.append(_finding("brain.fragmented", modality, shape.largest_component, MIN_LARGEST_COMPONENT,
                                 f"only {100 * shape.largest_component:.0f}% of the brain mask is in one piece (at least "
                                 f"{100 * MIN_LARGEST_COMPONENT:.0f}% expected): {hint}"))
    return findings


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient of two boolean arrays (1.0 when both are empty)."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def masked_correlation(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Pearson correlation of ``a`` and ``b`` over ``mask`` (0.0 if either is constant there)."""
    m = np.asarray(mask, dtype=bool)
    x = np.asarray(a, dtype=np.float64)[m]
    y = np.asarray(b, dtype=np.float64)[m]
    if x.size < 2:
        return 0.0
    x, y = x - x.mean(), y - y.mean()
    denominator = float(np.sqrt((x * x).sum() * (y * y).sum()))
    return 0.0 if denominator == 0 else float((x * y).sum() / denominator)


def _atlas_grid(template_mask: sitk.Image, spacing_mm: float, margin_mm: float = 10.0) -> sitk.Image:
    """A ``spacing_mm`` grid in atlas space covering the template brain plus a margin."""
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(sitk.Cast(template_mask > 0, sitk.sitkUInt8))
    x0, y0, z0, sx, sy, sz = stats.GetBoundingBox(1)
    spacing = np.array(template_mask.GetSpacing())
    direction = np.array(template_mask.GetDirection()).reshape(3, 3)
    lo = np.array([x0, y0, z0], dtype=float) - margin_mm / spacing
    size = np.ceil((np.array([sx, sy, sz]) * spacing + 2 * margin_mm) / spacing_mm).astype(int)
    grid = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
    grid.SetSpacing((float(spacing_mm),) * 3)
    grid.SetDirection(template_mask.GetDirection())
    grid.SetOrigin(tuple(float(v) for v in np.array(template_mask.GetOrigin()) + direction @ (lo * spacing)))
    return grid


def atlas_fit(template_image: sitk.Image, template_mask: sitk.Image, t1c: sitk.Image, native_mask: sitk.Image,
              atlas_to_t1c: sitk.Transform, spacing_mm: float = CHECK_SPACING_MM) -> tuple[float, float]:
    """Dice and correlation between the template and the T1c brain mapped into atlas space.

    Args:
        template_image, template_mask: the skull-stripped atlas template and its brain mask.
        t1c, native_mask: the native T1c and its HD-BET brain mask.
        atlas_to_t1c: the affine (atlas points -> native T1c points).
        spacing_mm: grid spacing of the comparison.

    Returns:
        ``(dice, correlation)``: Dice of the template mask and the mapped HD-BET mask; Pearson
        correlation of the template and the mapped, skull-stripped T1c inside the template mask.
    """
    grid = _atlas_grid(template_mask, spacing_mm)
    identity = sitk.Transform()
    tmask = sitk.GetArrayFromImage(sitk.Resample(template_mask, grid, identity, sitk.sitkNearestNeighbor, 0)) > 0
    timage = sitk.GetArrayFromImage(sitk.Resample(template_image, grid, identity, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    nmask = sitk.GetArrayFromImage(sitk.Resample(sitk.Cast(native_mask, sitk.sitkFloat32), grid, atlas_to_t1c,
                                                 sitk.sitkLinear, 0.0, sitk.sitkFloat32)) > 0.5
    brain = sitk.Mask(sitk.Cast(t1c, sitk.sitkFloat32), sitk.Cast(native_mask > 0, sitk.sitkUInt8))
    nimage = sitk.GetArrayFromImage(sitk.Resample(brain, grid, atlas_to_t1c, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    return dice(tmask, nmask), masked_correlation(timage, nimage, tmask)


def check_atlas_fit(dice_value: float, correlation: float, modality: str = "t1c") -> list[Finding]:
    """Findings for an atlas registration that did not bring a brain onto the template."""
    hint = ("the T1c brain does not match the ICBM 2009a template after the affine registration: "
            "check that the T1c is a brain MRI and that its header orientation is right.")
    findings = []
    if dice_value < MIN_ATLAS_DICE:
        findings.append(_finding("brain.atlas_dice", modality, dice_value, MIN_ATLAS_DICE,
                                 f"brain-mask Dice with the atlas {dice_value:.2f} < {MIN_ATLAS_DICE:.2f}: {hint}"))
    if correlation < MIN_ATLAS_CORRELATION:
        findings.append(_finding("brain.atlas_correlation", modality, correlation, MIN_ATLAS_CORRELATION,
                                 f"correlation with the atlas template {correlation:.2f} < {MIN_ATLAS_CORRELATION:.2f}: {hint}"))
    return findings


# --- overlap and motion (after the rigid registrations) ----------------------------------------
def _transform_points(transform: sitk.Transform, points: np.ndarray) -> np.ndarray:
    return np.array([transform.TransformPoint(tuple(float(v) for v in p)) for p in points]).reshape(-1, 3)


def fov_fraction(points_mm: np.ndarray, transform: sitk.Transform, image: sitk.Image) -> float:
    """Fraction of ``points_mm`` (T1c mm) that ``transform`` maps inside ``image``'s field of view.

    The field of view is the image's voxels including their half-voxel borders.
    """
    if len(points_mm) == 0:
        return 0.0
    moved = _transform_points(transform, points_mm)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    index = (moved - np.array(image.GetOrigin())) @ direction / np.array(image.GetSpacing())
    inside = np.all((index >= -0.5) & (index <= np.array(image.GetSize()) - 0.5), axis=1)
    return float(inside.mean())


def max_displacement_mm(points_mm: np.ndarray, transform: sitk.Transform) -> float:
    """Largest distance (mm) between a point and its image under ``transform``."""
    if len(points_mm) == 0:
        return 0.0
    return float(np.linalg.norm(_transform_points(transform, points_mm) - points_mm, axis=1).max())


def _shrink_to(image: sitk.Image, spacing_mm: float) -> sitk.Image:
    factors = [max(1, int(round(spacing_mm / s))) for s in image.GetSpacing()]
    return sitk.BinShrink(image, factors) if max(factors) > 1 else image


def gradient_correlation(fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform, fixed_mask: sitk.Image,
                         sigma_mm: float = 2.0, spacing_mm: float = CHECK_SPACING_MM) -> float:
    """Correlation of gradient magnitudes of ``fixed`` and the registered ``moving`` inside ``fixed_mask``.

    Edges (brain surface, ventricles, lesions) lie in the same places in every modality of one
    head even when their contrasts differ, so the correlation of Gaussian gradient magnitudes is
    comparable across T1, FLAIR and ADC. Measured on ``fixed`` block-averaged to ~``spacing_mm``,
    over mask voxels that fall inside ``moving``'s field of view.

    Args:
        fixed: the native T1c.
        moving: the modality on its own grid.
        transform: fixed points -> moving points (the rigid registration result).
        fixed_mask: brain mask on the fixed grid.
        sigma_mm: Gaussian scale of the gradients.
        spacing_mm: measurement grid spacing.
    """
    reference = _shrink_to(sitk.Cast(fixed, sitk.sitkFloat32), spacing_mm)
    mask = sitk.Resample(sitk.Cast(fixed_mask > 0, sitk.sitkFloat32), reference, sitk.Transform(), sitk.sitkLinear, 0.0)
    ones = sitk.Image(moving.GetSize(), sitk.sitkFloat32) + 1.0
    ones.CopyInformation(moving)
    inside = sitk.Resample(ones, reference, transform, sitk.sitkNearestNeighbor, 0.0)
    moved = sitk.Resample(sitk.Cast(moving, sitk.sitkFloat32), reference, transform, sitk.sitkLinear, 0.0)
    gf = sitk.GetArrayFromImage(sitk.GradientMagnitudeRecursiveGaussian(reference, sigma_mm))
    gm = sitk.GetArrayFromImage(sitk.GradientMagnitudeRecursiveGaussian(moved, sigma_mm))
    support = (sitk.GetArrayFromImage(mask) > 0.5) & (sitk.GetArrayFromImage(inside) > 0.5)
    return masked_correlation(gf, gm, support)


def check_alignment(modality: str, t1c: sitk.Image, moving: sitk.Image, transform: sitk.Transform,
                    native_mask: sitk.Image, points_mm: Optional[np.ndarray] = None) -> list[Finding]:
    """Overlap, motion and similarity of one modality after its rigid registration to the T1c.

    Args:
        modality: the modality's name.
        t1c: the native T1c; ``native_mask`` its brain mask.
        moving: the modality on its own grid.
        transform: T1c points -> modality points.
        points_mm: T1c brain points (default: up to 5000 voxels of ``native_mask``).

    Returns:
        ``overlap.fov`` (too little of the brain inside the modality's field of view),
        ``motion.displacement`` (implausible rigid motion), ``similarity.gradient`` (edges do
        not line up).
    """
    from .registration import mask_points_mm

    points = mask_points_mm(native_mask, 5000) if points_mm is None else np.asarray(points_mm, dtype=float)
    name = display_name(modality)
    same = f"check that the {name} belongs to the same patient and examination as the T1c."
    findings = []
    fraction = fov_fraction(points, transform, moving)
    if fraction < MIN_FOV_FRACTION:
        findings.append(_finding("overlap.fov", modality, fraction, MIN_FOV_FRACTION,
                                 f"{name}: only {100 * fraction:.0f}% of the T1c brain lies inside the {name} field of "
                                 f"view after registration (at least {100 * MIN_FOV_FRACTION:.0f}% expected); {same}"))
    displacement = max_displacement_mm(points, transform)
    if displacement > MAX_DISPLACEMENT_MM:
        findings.append(_finding("motion.displacement", modality, displacement, MAX_DISPLACEMENT_MM,
                                 f"{name}: registration to the T1c moves brain points by up to {displacement:.0f} mm "
                                 f"(patient motion within one examination stays below ~{MAX_DISPLACEMENT_MM:.0f} mm); "
                                 f"{same}"))
    correlation = gradient_correlation(t1c, moving, transform, native_mask)
    if correlation < MIN_GRADIENT_CORRELATION:
        findings.append(_finding("similarity.gradient", modality, correlation, MIN_GRADIENT_CORRELATION,
                                 f"{name}: after registration its edges do not line up with the T1c's (gradient "
                                 f"correlation {correlation:.2f} < {MIN_GRADIENT_CORRELATION:.2f}); {same}"))
    return findings


# --- registration quality (the rigid registration's own measurements) ---------------------------
def check_registration(modality: str, result) -> list[Finding]:
    """``registration.suspect`` when a rigid registration (:class:`.registration.RigidResult`) looks wrong.

    The measure is the sharpness of the normalised-mutual-information peak (``result.peak``):
    NMI - 1 of the result over NMI - 1 of the result shifted by 6 mm along each axis (mean of
    six). Edges of one head line up only at the right pose, so there the NMI drops steeply
    when the image is moved; a wrong local optimum sits on a low, flat peak. The ratio compares
    the same images with themselves, so it needs no per-contrast reference.

    Calibration (clinical-protocol phantoms at 3 mm, seeds 700-723, T1/FLAIR/ADC -> T1c, the
    phantom's brain mask): right registrations (mean error over the brain < 1.5 mm, ADC < 2.5 mm:
    196 from the multi-start code, the legacy code and refinements started 15-35 mm and 15-30
    degrees from the truth that came back) have peaks 2.46-4.15; wrong ones (error > 3 mm: the 6
    legacy failures and 157 such refinements that ended 3.6-90 mm off) have peaks 0.90-2.19. The
    threshold 2.3 sits in the middle of that gap. The peak falls with the error: 2.5-3.0 at
    1.7-2.8 mm, 1.4-2.2 at 3.6-4.1 mm, below 1.5 beyond 6 mm; so errors above ~3.5 mm are
    flagged and errors below ~2.5 mm are not. At the clinical native voxels right registrations
    have sharper peaks (3.6-5.6 on seed 708). ``bench.py --only registration`` reports the flags.
    The peak is calibrated for registrations measured over the T1c brain mask (as preprocessing
    runs them); over a whole-head foreground (no mask given) scalp and skull lower it.

    Args:
        modality: the registered modality (``"flair"``...).
        result: its :class:`.registration.RigidResult` (``peak``, ``nmi``, ``agreeing_starts``...).
    """
    peak = float(result.peak)
    if peak >= MIN_REGISTRATION_PEAK:
        return []
    name = display_name(modality)
    return [_finding(
        REGISTRATION_SUSPECT, modality, peak, MIN_REGISTRATION_PEAK,
        f"CHECK REGISTRATION of the {name}: its alignment to the T1c looks wrong (similarity peak {peak:.2f} < "
        f"{MIN_REGISTRATION_PEAK:.1f}: the {name} matches the T1c hardly better there than a few mm away). Look at the "
        f"{name} row of qc.png or overlay the {name} on the T1c; results that use the {name} may be wrong.")]


def suspect_modalities(findings: Iterable[Finding]) -> list[str]:
    """Modalities whose registration looks wrong (``registration.suspect``), in the order found."""
    out: list[str] = []
    for f in findings:
        if f.code == REGISTRATION_SUSPECT and f.modality not in out:
            out.append(f.modality)
    return out
