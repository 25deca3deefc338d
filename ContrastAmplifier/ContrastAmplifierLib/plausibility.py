"""Plausibility checks on the inputs and on each preprocessing step: bad input never passes as good.

Preprocessing used to accept a noise cube as a brain, a FLAIR of another patient and a negated
T1c without a word. The paper removed such cases by hand ("an exhaustive quality control was
finally performed to remove the sequences with important artifacts or failed alignment",
Materials and methods, "Preprocessing"); here small pure functions measure each step and return
:class:`Finding` objects. :func:`.preprocessing.preprocess_case` runs three groups and reports
each finding as a warning; with ``strict`` the first group with findings raises one
:class:`PlausibilityError` listing them all (:func:`raise_if_strict`).

1. **intensity** (each input, right after reading, before HD-BET): ``intensity.negative``
   (more than 5 % of the voxels below -2 % of the image's 99th percentile of |value| *and* the
   air at the grid's faces not the darkest part: MR magnitude images and ADC maps are >= 0 up to
   the offset a scanner may store, :func:`border_position`), ``intensity.levels`` (< 16 distinct
   values: a label map or mask).
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
   ``motion.rotation`` and ``motion.translation`` (the head's rotation and the brain centroid's
   shift under the rigid transform: :func:`rigid_motion`) and ``similarity.gradient`` (correlation of Gaussian gradient magnitudes, sigma 2 mm, of the
   T1c and the registered modality inside the brain: edges line up across contrasts).

Calibration (phantom cases of :mod:`.phantom`, seeds 990000-990011 at 3 mm, 991000-991001 at
2 mm, 992000 at 1 mm; real HD-BET ``fast`` and the pipeline's registrations; measured with the
functions of this module). "Noise": uniform noise cubes on the four inputs' grids (6 cases);
"negated": T1c x -1 (6 cases); "other patient": the FLAIR of every other case of the same
cohort (134 ordered pairs).

========================= ================ =================================== ===========
check                     normal (15)      bad inputs                          threshold
========================= ================ =================================== ===========
negative fraction         0.000            negated 0.51-0.82                   > 0.05 and
border position           0.000            negated 1.000                       > 0.25
distinct levels           >= 910           (label maps; unit-tested)           < 16
brain volume (mL)         1756-2113        noise 2455-3833, negated 1658-2783  700-2600
box sides (mm)            142-193          noise largest 250-388               90-220
compactness               0.46-0.48        noise 0.08-0.22, negated 0.12-0.40  < 0.35
largest component         1.00             1.00 (HD-BET keeps one component)   < 0.9
atlas Dice                0.963-0.982      noise 0.46-0.59, negated 0.32-0.85  < 0.8
atlas correlation         0.76-0.89        noise -0.01-0.20, negated -0.33-0.12 < 0.4
FOV fraction              1.00             noise 0.70-0.96, other 0.74-1.00    < 0.9
rotation (deg)            0.2-5.9          other 0.8-22.9 (median 11.1)        > 12
centroid shift (mm)       0.2-5.9          other 1.1-26.5 (median 13.1)        > 20
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
* Motion is measured as two numbers a radiologist can check against the examination, the
  rotation of the head and the shift of the brain's centroid, not as the largest displacement of
  a brain point: that one adds the rotation's sweep at the brain's edge (10 degrees move a point
  90 mm from the centre by 16 mm) to the shift, and its former 15 mm bound flagged 33 of 60
  correct registrations of the clinical-protocol phantom (motion up to 10 degrees and 15 mm
  between sequences, :mod:`.phantom_clinical`). The bounds (12 degrees, 20 mm) leave room above
  that motion: over 200 clinical-protocol seeds (600 T1c -> T1/FLAIR/ADC pairs, poses from the
  acquisition plan) the true rotation is at most 10.0 degrees and the centroid shift at most
  15.8 mm; on the 30 cases of the registration bench (``bench --only registration``) at most 9.7
  degrees and 15.2 mm; the paper-protocol phantom moves at most 5.9 degrees / 5.9 mm (300 seeds).
* Every phantom has the same anatomy (the template), so a FLAIR of "another patient" differs
  from the right one only by head pose, scale and lesions: after rigid registration its edges
  line up almost as well (gradient correlation median 0.63) and only the motion is a signal.
  Another paper-protocol patient's head pose (8 degrees, 10 mm per axis) is flagged in 46 % of
  3540 pairs (rigid fit of the brain points of 60 seeds; ``rotation`` > 12 or ``shift`` > 20). The
  check cannot see another patient whose head lay in nearly the same scanner position; a real
  other patient also differs in anatomy, which the registration's peak and the gradient
  correlation see and the phantom cannot show. It flags files whose headers lost the scanner
  coordinates (origins reset on export) when that moves the brain by more than 20 mm.
* ``similarity.gradient`` separates noise (<= 0.02) and failed registrations: on the normal
  3 mm case of seed 990002 the ADC -> T1c rigid registration ended 17 mm (mean) from the
  phantom's truth; it measured 21.7 mm of displacement and a gradient correlation of 0.21 and
  is flagged by both checks (the other 14 x 3 registrations: 0.63-0.98).
* On clinical-protocol phantoms (30 cases at 3 mm, true poses) the gradient correlation is
  0.89-0.99 (T1), 0.77-0.95 (FLAIR) and 0.63-0.89 (ADC). It is measured away from the borders of
  both fields of view, with the moving image's own background outside it: before that, 5 of 30
  T1 stacks stored with a scanner offset (+-1100-1700) and truncated through the brain measured
  0.08-0.27, the artificial edge at the cut outweighing the anatomy.
* The field of view covers 84-100 % of the T1c brain for each modality of those 30 cases (2 of
  90 below the 90 % warning: stacks truncated at the vertex or skull base). Below
  :data:`MIN_FOV_COVERAGE` it is an error (:func:`check_coverage`).
* Scanner storage (:mod:`.phantom_clinical`: offsets of +-500-2000, negative backgrounds) puts
  up to 100 % of a clinical phantom's voxels below 0; the image's faces still sit at 0.00-0.06
  of its range (negated: 0.94-1.00; 32 cases x 4 inputs), so only inverted images are flagged.
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
    "negative_fraction", "border_position", "distinct_levels", "check_intensity",
    "MaskShape", "mask_shape", "check_brain_mask",
    "dice", "masked_correlation", "atlas_fit", "check_atlas_fit",
    "fov_fraction", "check_coverage", "RigidMotion", "rigid_motion", "gradient_correlation", "check_alignment",
    "REGISTRATION_SUSPECT", "check_registration", "suspect_modalities",
]

# --- thresholds (calibration in the module docstring) ------------------------------------------
#: A voxel counts as negative below ``-NEGATIVE_TOLERANCE`` x the 99th percentile of |intensity|
#: (small negatives from interpolation ringing or scanner offsets are tolerated).
NEGATIVE_TOLERANCE = 0.02
#: Largest tolerated fraction of negative voxels in a magnitude image or an ADC map.
MAX_NEGATIVE_FRACTION = 0.05
#: Largest position of the image border's median intensity between the 0.5th and 99.5th
#: percentiles (:func:`border_position`) that still counts as dark air around the head.
MAX_BORDER_POSITION = 0.25
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
#: Below this fraction of the T1c brain inside a modality's field of view (after registration)
#: T1c-pro cannot be computed: an error, not a warning (:func:`check_coverage`).
MIN_FOV_COVERAGE = 0.5
#: Largest plausible head rotation (deg) between two sequences of one examination (motion stays
#: below ~10 degrees; calibration in the module docstring).
MAX_MOTION_DEG = 12.0
#: Largest plausible shift (mm) of the brain's centroid between two sequences of one examination
#: (motion stays below ~15 mm; calibration in the module docstring).
MAX_MOTION_MM = 20.0
_MOTION_NORM = "head motion within one examination stays below about 10 degrees and 15 mm"
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


def border_position(array: np.ndarray) -> float:
    """Where the median of the grid's six faces lies between the image's 0.5th and 99.5th percentiles.

    The faces of a head image are mostly air, the darkest part of a magnitude image or an ADC map
    (about 0), whatever offset the scanner stored; an inverted image has them at the top (about 1),
    a phase image in the middle. Returns 0 for a constant image.
    """
    values = np.asarray(array, dtype=np.float32)
    low, high = (float(v) for v in np.percentile(_sample(values), (0.5, 99.5)))
    if high <= low or values.ndim != 3:
        return 0.0
    faces = np.concatenate([values[i].ravel() for i in (0, -1)] + [values[:, i].ravel() for i in (0, -1)]
                           + [values[:, :, i].ravel() for i in (0, -1)])
    return float(np.clip((np.median(faces) - low) / (high - low), 0.0, 1.0))


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
    # Scanners store offsets (a background of -1500 is still a magnitude image): negative values
    # count only when the air around the head is not the darkest part of the image.
    if fraction > MAX_NEGATIVE_FRACTION and border_position(array) > MAX_BORDER_POSITION:
        what = ("every voxel is <= 0" if float(array.max()) <= 0
                else f"{100 * fraction:.1f}% of the voxels are clearly negative")
        findings.append(_finding(
            "intensity.negative", modality, fraction, MAX_NEGATIVE_FRACTION,
            f"{name}: {what} and the air around the head is not its darkest part; MR magnitude images and ADC "
            f"maps are >= 0 (up to a stored offset) with dark air. Check that the {name} is a magnitude image "
            "(not phase, not inverted)."))
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
    from .registration import skull_stripped

    brain = skull_stripped(t1c, native_mask)
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


def check_coverage(modality: str, points_mm: np.ndarray, transform: sitk.Transform, image: sitk.Image,
                   doubtful: bool = False, fraction: Optional[float] = None) -> float:
    """Fraction of the T1c brain (``points_mm``) inside ``image``'s field of view after ``transform``.

    Args:
        doubtful: the registration looks wrong (``registration.suspect``, implausible motion). A
            slab over part of the head is easily dragged onto the brain's middle; then the scanner
            coordinates (the identity: one examination shares them) are measured too.
        fraction: :func:`fov_fraction` of these points, when already measured.

    Raises:
        ImageValidationError: less than :data:`MIN_FOV_COVERAGE`: most of the brain would have no
            input from this modality (a partial slab, or a registration that failed).
    """
    fraction = fov_fraction(points_mm, transform, image) if fraction is None else fraction
    where = "after registration"
    if doubtful and fraction >= MIN_FOV_COVERAGE:
        scanner = fov_fraction(points_mm, sitk.Transform(3, sitk.sitkIdentity), image)
        if scanner < MIN_FOV_COVERAGE:
            fraction, where = scanner, "in scanner coordinates (its registration to the T1c failed)"
    if fraction < MIN_FOV_COVERAGE:
        name = display_name(modality)
        raise ImageValidationError(
            f"{name} covers only {100 * fraction:.0f}% of the T1c brain {where} (at least "
            f"{100 * MIN_FOV_COVERAGE:.0f}% needed): its field of view "
            f"({' x '.join(f'{n * s:.0f}' for n, s in zip(image.GetSize(), image.GetSpacing()))} mm) leaves most of "
            f"the brain without {name} input, where T1c-pro cannot be computed. Load a {name} series that covers "
            f"the whole brain; if it does, check that the {name} belongs to the same examination as the T1c.")
    return fraction


@dataclass(frozen=True)
class RigidMotion:
    """Head motion a modality -> T1c registration implies: its rotation and the brain's shift."""

    rotation_deg: float  # angle of the transform's rotation (polar part of its linear map)
    translation_mm: float  # displacement of the brain's centroid
    max_displacement_mm: float  # largest displacement of a brain point


def rigid_motion(points_mm: np.ndarray, transform: sitk.Transform) -> RigidMotion:
    """Rotation angle, centroid shift and largest point displacement of ``transform`` over ``points_mm``.

    The linear part is measured from the images of the centroid and of three points 10 mm away
    (any transform type); its rotation is the orthogonal factor of its polar decomposition.
    """
    points = np.asarray(points_mm, dtype=float).reshape(-1, 3)
    if len(points) == 0:
        return RigidMotion(0.0, 0.0, 0.0)
    centre = points.mean(axis=0)
    probes = _transform_points(transform, np.vstack([centre, centre + 10.0 * np.eye(3)]))
    linear = (probes[1:] - probes[0]).T / 10.0
    u, _, vt = np.linalg.svd(linear)
    rotation = u @ vt
    angle = float(np.degrees(np.arccos(np.clip((np.trace(rotation) - 1.0) / 2.0, -1.0, 1.0))))
    moved = _transform_points(transform, points)
    return RigidMotion(angle, float(np.linalg.norm(probes[0] - centre)),
                       float(np.linalg.norm(moved - points, axis=1).max()))


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
    ones = sitk.Image(moving.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(moving)
    inside = sitk.Resample(ones, reference, transform, sitk.sitkNearestNeighbor, 0)
    # Outside its field of view the moving image is filled with its own background level (scanners
    # store offsets: 0 would be an edge), and the band where the gradients still see the field of
    # view's border (of either image) is left out.
    background = float(np.percentile(_sample(sitk.GetArrayViewFromImage(moving)), 1))
    moved = sitk.Resample(sitk.Cast(moving, sitk.sitkFloat32), reference, transform, sitk.sitkLinear, background)
    band = [max(1, int(np.ceil(2.0 * sigma_mm / s))) for s in reference.GetSpacing()]
    inside = sitk.BinaryErode(inside, band, sitk.sitkBall, 0, 1, False)  # the grid border counts as outside
    gf = sitk.GetArrayFromImage(sitk.GradientMagnitudeRecursiveGaussian(reference, sigma_mm))
    gm = sitk.GetArrayFromImage(sitk.GradientMagnitudeRecursiveGaussian(moved, sigma_mm))
    support = (sitk.GetArrayFromImage(mask) > 0.5) & (sitk.GetArrayFromImage(inside) > 0)
    return masked_correlation(gf, gm, support)


def check_alignment(modality: str, t1c: sitk.Image, moving: sitk.Image, transform: sitk.Transform,
                    native_mask: sitk.Image, points_mm: Optional[np.ndarray] = None,
                    fraction: Optional[float] = None) -> list[Finding]:
    """Overlap, motion and similarity of one modality after its rigid registration to the T1c.

    Args:
        modality: the modality's name.
        t1c: the native T1c; ``native_mask`` its brain mask.
        moving: the modality on its own grid.
        transform: T1c points -> modality points.
        points_mm: T1c brain points (default: up to 5000 voxels of ``native_mask``).
        fraction: :func:`fov_fraction` of those points, when already measured.

    Returns:
        ``overlap.fov`` (too little of the brain inside the modality's field of view),
        ``motion.rotation`` / ``motion.translation`` (implausible head motion: :func:`rigid_motion`),
        ``similarity.gradient`` (edges do
        not line up).
    """
    from .registration import mask_points_mm

    points = mask_points_mm(native_mask, 5000) if points_mm is None else np.asarray(points_mm, dtype=float)
    name = display_name(modality)
    same = f"check that the {name} belongs to the same patient and examination as the T1c."
    findings = []
    fraction = fov_fraction(points, transform, moving) if fraction is None else fraction
    if fraction < MIN_FOV_FRACTION:
        findings.append(_finding("overlap.fov", modality, fraction, MIN_FOV_FRACTION,
                                 f"{name}: only {100 * fraction:.0f}% of the T1c brain lies inside the {name} field of "
                                 f"view after registration (at least {100 * MIN_FOV_FRACTION:.0f}% expected): T1c-pro "
                                 f"has no {name} input in the rest (a truncated field of view), or the registration "
                                 f"failed; {same}"))
    motion = rigid_motion(points, transform)
    if motion.rotation_deg > MAX_MOTION_DEG:
        findings.append(_finding("motion.rotation", modality, motion.rotation_deg, MAX_MOTION_DEG,
                                 f"{name}: registration to the T1c turns the head by {motion.rotation_deg:.0f} degrees "
                                 f"({_MOTION_NORM}); "
                                 f"{same}"))
    if motion.translation_mm > MAX_MOTION_MM:
        findings.append(_finding("motion.translation", modality, motion.translation_mm, MAX_MOTION_MM,
                                 f"{name}: registration to the T1c shifts the brain by {motion.translation_mm:.0f} mm "
                                 f"({_MOTION_NORM}); "
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
