"""Plausibility checks: pure functions on hand-made arrays, then the bad inputs of issue "Nothing lost, nothing silent".

The phantom tests run real registrations on 3 mm cases: a normal case (no finding) and four
noise cubes (brain finding; strict mode stops before any resampling) with real HD-BET (about
30 s each with 2 threads, 55 s with the tests' single thread: marked slow); the FLAIR of another
phantom "patient" (motion finding naming the FLAIR) and a negated T1c (intensity finding; strict
mode stops before HD-BET) with the phantom's own brain mask in place of HD-BET.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

from ContrastAmplifierLib import plausibility as P
from ContrastAmplifierLib.imageio import ImageValidationError, read_image
from ContrastAmplifierLib.preprocessing import Geometry, PreprocessedCase, preprocess_case

MODALITIES = ("t1", "flair", "adc", "t1c")
GEOMETRY = Geometry(spacing=(4.0, 4.0, 4.0), crop_size=(40, 48, 40))
#: Seed of the "other patient": its FLAIR pose is turned by 18 degrees and shifted by 23 mm (rigid fit
#: of the brain points) from seed 31's T1c.
OTHER_PATIENT_SEED = 990717


def _image(array: np.ndarray, spacing: float = 2.0) -> sitk.Image:
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing((spacing,) * 3)
    return image


def _ellipsoid(semi_axes_vox=(35.0, 42.5, 30.0), shape=(91, 101, 81)) -> np.ndarray:
    """Boolean (z, y, x) ellipsoid with semi-axes (x, y, z) in voxels, centred."""
    z, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]]
    cz, cy, cx = (np.array(shape) - 1) / 2.0
    ax, ay, az = semi_axes_vox
    return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 + ((z - cz) / az) ** 2 <= 1.0


def _blobs(shape=(40, 48, 40)) -> np.ndarray:
    """A smooth head-like float image: an ellipsoid with two darker inner blobs, smoothed."""
    head = _ellipsoid((14, 18, 14), shape).astype(np.float32) * 100.0
    head[15:22, 18:26, 12:18] = 30.0
    head[20:26, 22:30, 22:28] = 60.0
    return sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(_image(head), 2.0))


# --- pure functions -----------------------------------------------------------------------------
def test_negative_fraction_counts_only_clear_negatives():
    # 99th percentile of |a| is 100, so the tolerance is -2: the five -50 count, the five -0.5 do not.
    a = np.array([100.0] * 90 + [-50.0] * 5 + [-0.5] * 5)
    assert P.negative_fraction(a) == pytest.approx(0.05)
    assert P.negative_fraction(-np.abs(a)) == pytest.approx(0.95)  # -0.5 is still tolerated
    assert P.negative_fraction(np.zeros(10)) == 0.0


def test_distinct_levels():
    assert P.distinct_levels(np.array([0, 1, 2, 2, 3])) == 4
    assert P.distinct_levels(np.arange(5000.0), limit=1000) == 1000


def test_border_position_puts_air_at_the_bottom_whatever_the_offset():
    head = np.zeros((20, 20, 20), np.float32)
    head[5:15, 5:15, 5:15] = 100.0  # faces: air (0); 0.5th / 99.5th percentiles 0 and 100
    assert P.border_position(head) == 0.0
    assert P.border_position(head - 1500.0) == 0.0  # a scanner offset moves nothing
    assert P.border_position(-head - 1.0) == pytest.approx(1.0)  # inverted: air is the brightest
    ramp = np.linspace(0.0, 1.0, 8000, dtype=np.float32).reshape(20, 20, 20)  # z = 0 face low, z = 19 high
    assert P.border_position(ramp) == pytest.approx(0.5, abs=0.05)
    assert P.border_position(np.ones((4, 4, 4))) == 0.0


def test_check_intensity_flags_negated_and_label_images():
    ramp = np.linspace(0.0, 1000.0, 20 * 20 * 20, dtype=np.float32).reshape(20, 20, 20)
    assert P.check_intensity(_image(ramp), "t1c") == []
    head = np.zeros((20, 20, 20), np.float32)
    head[5:15, 5:15, 5:15] = np.linspace(50.0, 100.0, 1000).reshape(10, 10, 10)
    # Negated (air -1, head -51..-101): |a| has 99th percentile 100.5 (tolerance -2.01): the 1000 head
    # voxels of 8000 count, the air does not; the air is the brightest part.
    (negated,) = P.check_intensity(_image(-head - 1.0), "t1c")
    assert (negated.code, negated.modality) == ("intensity.negative", "t1c")
    assert negated.value == pytest.approx(1000 / 8000)
    assert negated.threshold == P.MAX_NEGATIVE_FRACTION and "every voxel is <= 0" in negated.message
    # Stored with a scanner offset: every voxel negative, but the air is the darkest: a magnitude image.
    assert P.check_intensity(_image(head - 1500.0), "t1c") == []
    # A phase-like ADC: air is noise around 0 (the middle of the range), a third of the voxels clearly negative.
    phase = np.random.default_rng(3).uniform(-100.0, 100.0, (20, 20, 20)).astype(np.float32)
    phase[5:15, 5:15, 5:15] = 60.0
    expected = float(np.mean(phase < -0.02 * np.percentile(np.abs(phase), 99)))
    (f,) = P.check_intensity(_image(phase), "adc")
    assert f.code == "intensity.negative" and f.value == pytest.approx(expected) and "ADC" in f.message
    assert 0.3 < f.value < 0.5
    labels = (np.arange(8000) % 3).reshape(20, 20, 20).astype(np.float32)
    (f,) = P.check_intensity(_image(labels), "flair")
    assert (f.code, f.value, f.threshold) == ("intensity.levels", 3.0, P.MIN_DISTINCT_LEVELS)


def test_mask_shape_of_boxes():
    a = np.zeros((40, 40, 40), np.uint8)
    a[5:35, 10:30, 15:25] = 1  # 30 x 20 x 10 voxels of 2 mm
    shape = P.mask_shape(_image(a))
    assert shape.volume_ml == pytest.approx(6000 * 8 / 1000)
    assert shape.extents_mm == pytest.approx((20.0, 40.0, 60.0))
    assert shape.fill == pytest.approx(1.0) and shape.largest_component == 1.0
    a[36:39, 0:10, 0:10] = 1  # a second piece of 300 voxels
    assert P.mask_shape(_image(a)).largest_component == pytest.approx(6000 / 6300)
    assert P.mask_shape(_image(np.zeros((5, 5, 5), np.uint8))).volume_ml == 0.0


def test_check_brain_mask_accepts_a_brain_sized_ellipsoid_only():
    # Semi-axes 70 x 85 x 60 mm: 4/3 pi abc = 1495 mL, sides 122 x 142 x 170 mm (voxel edges), fill ~ pi/6.
    brain = _image(_ellipsoid().astype(np.uint8))
    shape = P.mask_shape(brain)
    assert shape.volume_ml == pytest.approx(4 / 3 * math.pi * 70 * 85 * 60 / 1000, rel=0.01)
    assert shape.extents_mm == pytest.approx((122.0, 142.0, 170.0))
    assert shape.fill == pytest.approx(math.pi / 6, abs=0.02)
    assert P.check_brain_mask(brain) == []
    small = np.zeros((40, 40, 40), np.uint8)
    small[5:35, 10:30, 15:25] = 1
    codes = {f.code for f in P.check_brain_mask(_image(small))}
    assert codes == {"brain.volume", "brain.extent"}
    # A thin slab through the brain: right volume, but flat and not compact.
    slab = np.zeros((90, 120, 120), np.uint8)
    slab[40:48, :, :] = 1  # 8 x 120 x 120 voxels of 2 mm: 16 x 240 x 240 mm, 921.6 mL
    codes = {f.code for f in P.check_brain_mask(_image(slab))}
    assert codes == {"brain.extent"}
    scattered = np.zeros((90, 100, 80), np.uint8)
    scattered[::4, ::4, ::4] = 1  # 23 x 25 x 20 isolated voxels
    codes = {f.code for f in P.check_brain_mask(_image(scattered))}
    assert {"brain.volume", "brain.fragmented"} <= codes


def test_dice_and_masked_correlation():
    assert P.dice(np.array([1, 1, 0, 0]), np.array([1, 0, 1, 0])) == pytest.approx(0.5)
    assert P.dice(np.zeros(3), np.zeros(3)) == 1.0
    a = np.array([1.0, 2.0, 3.0, 100.0])
    assert P.masked_correlation(a, 2 * a + 1, np.ones(4)) == pytest.approx(1.0)
    assert P.masked_correlation(a, -a, np.ones(4)) == pytest.approx(-1.0)
    assert P.masked_correlation(a, np.array([1.0, 2.0, 3.0, -5.0]), np.array([1, 1, 1, 0])) == pytest.approx(1.0)
    assert P.masked_correlation(a, np.ones(4), np.ones(4)) == 0.0


def test_atlas_fit_identity_and_shift():
    template = _image(_blobs())
    mask = sitk.Cast(template > 20.0, sitk.sitkUInt8)
    dice, correlation = P.atlas_fit(template, mask, template, mask, sitk.Transform())
    assert dice == pytest.approx(1.0) and correlation == pytest.approx(1.0, abs=1e-6)
    shifted = sitk.TranslationTransform(3, (12.0, 0.0, 0.0))
    dice, correlation = P.atlas_fit(template, mask, template, mask, shifted)
    assert dice < 0.8 and correlation < 0.5
    assert {f.code for f in P.check_atlas_fit(dice, correlation)} == {"brain.atlas_dice", "brain.atlas_correlation"}
    assert P.check_atlas_fit(0.95, 0.8) == []


def test_fov_fraction_and_rigid_motion():
    image = _image(np.zeros((10, 10, 10), np.float32), spacing=1.0)  # field of view -0.5 .. 9.5 mm
    points = np.array([[0.0, 0.0, 0.0], [9.0, 9.0, 9.0], [20.0, 0.0, 0.0], [5.0, 5.0, 5.0]])
    assert P.fov_fraction(points, sitk.Transform(3, sitk.sitkIdentity), image) == pytest.approx(0.75)
    shift = sitk.TranslationTransform(3, (5.0, 0.0, 0.0))  # -> x = 5, 14, 25, 10: one inside
    assert P.fov_fraction(points, shift, image) == pytest.approx(0.25)
    moved = P.rigid_motion(points, sitk.TranslationTransform(3, (3.0, 4.0, 0.0)))
    assert moved.rotation_deg == pytest.approx(0.0, abs=1e-6)
    assert moved.translation_mm == pytest.approx(5.0) and moved.max_displacement_mm == pytest.approx(5.0)
    quarter_turn = sitk.Euler3DTransform((0.0, 0.0, 0.0), 0.0, 0.0, math.pi / 2)  # (x, y, 0) -> (-y, x, 0)
    turned = P.rigid_motion(np.array([[10.0, 0.0, 0.0], [1.0, 0.0, 0.0]]), quarter_turn)
    # centroid (5.5, 0, 0) -> (0, 5.5, 0); the point (10, 0, 0) moves furthest.
    assert turned.rotation_deg == pytest.approx(90.0)
    assert turned.translation_mm == pytest.approx(5.5 * math.sqrt(2))
    assert turned.max_displacement_mm == pytest.approx(10 * math.sqrt(2))
    scaled = sitk.ScaleTransform(3, (1.1, 1.1, 1.1))  # no rotation in a scaling (polar decomposition)
    assert P.rigid_motion(points, scaled).rotation_deg == pytest.approx(0.0, abs=1e-6)
    assert P.rigid_motion(np.zeros((0, 3)), quarter_turn) == P.RigidMotion(0.0, 0.0, 0.0)


def test_gradient_correlation_and_check_alignment():
    fixed = _image(_blobs())
    mask = sitk.Cast(fixed > 20.0, sitk.sitkUInt8)
    identity = sitk.Transform(3, sitk.sitkIdentity)
    # Another contrast of the same head (scaled, offset): edges in the same places.
    other = sitk.Cast(fixed * 2.0 + 5.0, sitk.sitkFloat32)
    assert P.gradient_correlation(fixed, other, identity, mask) == pytest.approx(1.0, abs=1e-6)
    noise = _image(np.random.default_rng(0).uniform(0, 100, (40, 48, 40)).astype(np.float32))
    assert P.gradient_correlation(fixed, noise, identity, mask) < P.MIN_GRADIENT_CORRELATION
    assert P.check_alignment("flair", fixed, other, identity, mask) == []
    moved = P.check_alignment("flair", fixed, other, sitk.TranslationTransform(3, (25.0, 0.0, 0.0)), mask)
    codes = {f.code for f in moved}
    assert "motion.translation" in codes and "motion.rotation" not in codes and all(f.modality == "flair" for f in moved)
    motion = next(f for f in moved if f.code == "motion.translation")
    assert motion.value == pytest.approx(25.0) and "FLAIR belongs to the same patient and examination" in motion.message
    # Within one examination's motion (up to ~10 degrees and 15 mm): no motion finding.
    within = sitk.Euler3DTransform(fixed.TransformContinuousIndexToPhysicalPoint([19.5, 23.5, 19.5]), 0.15, 0.0, 0.0,
                                   (9.0, 9.0, 0.0))
    assert not [f for f in P.check_alignment("flair", fixed, other, within, mask) if f.code.startswith("motion.")]


def test_raise_if_strict_lists_every_finding():
    findings = [P.Finding("brain.volume", "t1c", 90.0, 700.0, "too small"),
                P.Finding("brain.extent", "t1c", 40.0, 90.0, "too flat")]
    P.raise_if_strict(findings, strict=False)
    P.raise_if_strict([], strict=True)
    with pytest.raises(P.PlausibilityError) as err:
        P.raise_if_strict(findings, strict=True)
    assert isinstance(err.value, ImageValidationError) and err.value.findings == tuple(findings)
    assert "[brain.volume] too small" in str(err.value) and "[brain.extent] too flat" in str(err.value)
    assert P.Finding(**json.loads(json.dumps(findings[0].to_dict()))) == findings[0]


# --- the pipeline on phantom cases (real HD-BET and registrations) -----------------------------
class Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, stage, fraction, message=""):
        self.calls.append((stage, fraction, message))

    @property
    def stages(self):
        return [c[0] for c in self.calls]


def _inputs(case_dir):
    return {m: case_dir / f"{m}.nii.gz" for m in MODALITIES}


@pytest.fixture(scope="module")
def normal(small_case_dir):
    """The seed-31 case through the whole preprocessing, real HD-BET included."""
    recorder = Recorder()
    return preprocess_case(_inputs(small_case_dir), GEOMETRY, progress=recorder), recorder


@pytest.mark.slow
def test_normal_case_has_no_findings(normal, tmp_path):
    case, recorder = normal
    assert case.findings == [] and "warning" not in recorder.stages
    assert 0 < case.timings_s["checks"] < case.timings_s["total"]
    meta = json.loads((case.write(tmp_path / "out") / "preprocess.json").read_text(encoding="utf-8"))
    assert meta["warnings"] == []


@pytest.mark.slow
def test_noise_cubes_are_not_a_brain(small_case_dir):
    rng = np.random.default_rng(990001)
    inputs = {}
    for m in MODALITIES:
        like = read_image(small_case_dir / f"{m}.nii.gz")
        noise = sitk.GetImageFromArray(rng.uniform(0, 1000, sitk.GetArrayViewFromImage(like).shape).astype(np.float32))
        noise.CopyInformation(like)
        inputs[m] = noise
    recorder = Recorder()
    with pytest.raises(P.PlausibilityError) as err:
        preprocess_case(inputs, GEOMETRY, progress=recorder, strict=True)
    codes = {f.code for f in err.value.findings}
    print(f"\nnoise cubes: {[(f.code, round(f.value, 3)) for f in err.value.findings]}")
    assert codes and all(c.startswith("brain.") for c in codes)
    assert "skull-strip" in recorder.stages and "resample" not in recorder.stages and "warning" not in recorder.stages


def test_flair_of_another_patient_is_flagged(small_case_dir, tmp_path):
    from ContrastAmplifierLib.phantom import generate_case

    generate_case(tmp_path / "other", OTHER_PATIENT_SEED, spacing=3.0)
    inputs = {**_inputs(small_case_dir), "flair": tmp_path / "other" / "flair.nii.gz"}
    recorder = Recorder()
    case = preprocess_case(inputs, GEOMETRY, brain_mask=small_case_dir / "brain_mask.nii.gz", progress=recorder)
    print(f"\nother patient's FLAIR: {[(f.code, f.modality, round(f.value, 2)) for f in case.findings]}")
    motion = [f for f in case.findings if f.code.startswith("motion.")]
    assert {f.modality for f in motion} == {"flair"} and {f.code for f in motion} == {"motion.rotation", "motion.translation"}
    assert next(f.value for f in motion if f.code == "motion.rotation") > P.MAX_MOTION_DEG
    assert all(f.modality == "flair" for f in case.findings)
    assert "check that the T2-FLAIR belongs to the same patient and examination" in motion[0].message
    warnings = [c for c in recorder.calls if c[0] == "warning"]
    assert [c[2] for c in warnings] == [f.message for f in case.findings]
    before = recorder.calls[recorder.calls.index(warnings[0]) - 1]
    assert before[0] == "register" and all(c[1] == before[1] for c in warnings)  # fraction unchanged
    meta = json.loads((case.write(tmp_path / "out") / "preprocess.json").read_text(encoding="utf-8"))
    assert [w["code"] for w in meta["warnings"]] == [f.code for f in case.findings]
    assert PreprocessedCase.load(tmp_path / "out").findings == case.findings
    with pytest.raises(P.PlausibilityError, match="FLAIR"):
        preprocess_case(inputs, GEOMETRY, brain_mask=small_case_dir / "brain_mask.nii.gz", strict=True)


def test_negated_t1c_is_flagged_before_skull_stripping(small_case_dir):
    t1c = read_image(small_case_dir / "t1c.nii.gz")
    inputs = {**_inputs(small_case_dir), "t1c": sitk.Cast(t1c * -1.0, sitk.sitkFloat32)}
    recorder = Recorder()
    with pytest.raises(P.PlausibilityError) as err:
        preprocess_case(inputs, GEOMETRY, progress=recorder, strict=True)
    assert [(f.code, f.modality) for f in err.value.findings] == [("intensity.negative", "t1c")]
    assert "skull-strip" not in recorder.stages  # raised before HD-BET
    recorder = Recorder()
    case = preprocess_case(inputs, GEOMETRY, brain_mask=small_case_dir / "brain_mask.nii.gz", progress=recorder)
    assert ("intensity.negative", "t1c") in [(f.code, f.modality) for f in case.findings]
    assert ("warning", 0.0, case.findings[0].message) in recorder.calls


def _axial_slab(image: sitk.Image, keep: float) -> sitk.Image:
    """The lower ``keep`` share of ``image``'s slices (a slab that stops part-way up the head)."""
    n = max(1, int(round(image.GetSize()[2] * keep)))
    return image[:, :, :n]


@pytest.mark.parametrize("keep", [
    0.5,  # 44-46% of the brain inside the slab, registered right or not
    0.4,  # 24%: the registration drags it 35 mm up onto the brain's middle; the scanner's share counts
])
def test_flair_slab_that_misses_most_of_the_brain_is_an_error(small_case_dir, keep):
    """A FLAIR slab over the lower part of the head leaves most of the brain without FLAIR: refused
    (not a warning) with the share and the fix, also when its registration slid it onto the brain."""
    flair = read_image(small_case_dir / "flair.nii.gz")
    slab = _axial_slab(flair, keep)
    assert slab.GetSize()[2] * slab.GetSpacing()[2] >= 60.0  # thick enough to pass the localiser check
    inputs = {**_inputs(small_case_dir), "flair": slab}
    with pytest.raises(ImageValidationError) as err:
        preprocess_case(inputs, GEOMETRY, brain_mask=small_case_dir / "brain_mask.nii.gz")
    message = str(err.value)
    share = int(message.split("covers only ")[1].split("%")[0])
    assert share < 100 * P.MIN_FOV_COVERAGE
    assert "of the T1c brain after registration" in message or "of the T1c brain in scanner coordinates" in message
    assert message.startswith("T2-FLAIR covers only") and "Load a T2-FLAIR series that covers the whole brain" in message


def test_localiser_given_as_t1_is_refused_before_any_work(small_case_dir):
    t1 = read_image(small_case_dir / "t1.nii.gz")
    three = t1[:, :, t1.GetSize()[2] // 2 - 1: t1.GetSize()[2] // 2 + 2]  # 3 slices of 3 mm: a scout
    with pytest.raises(ImageValidationError, match=r"T1 covers only 9 mm along its third axis \(3 slices of 3 mm"):
        preprocess_case({**_inputs(small_case_dir), "t1": three}, GEOMETRY, brain_mask=small_case_dir / "brain_mask.nii.gz")


def test_check_coverage_returns_the_share_or_raises():
    image = _image(np.zeros((10, 10, 10), np.float32), spacing=1.0)  # field of view -0.5 .. 9.5 mm
    points = np.array([[1.0, 1.0, 1.0], [2.0, 2.0, 2.0], [30.0, 0.0, 0.0], [40.0, 0.0, 0.0]])
    identity = sitk.Transform(3, sitk.sitkIdentity)
    assert P.check_coverage("adc", points[:3], identity, image) == pytest.approx(2 / 3)
    # A doubtful registration that moved the points into the field of view: the scanner's share counts.
    into = sitk.TranslationTransform(3, (-35.0, 0.0, 0.0))  # (40, 0, 0) -> (5, 0, 0)
    assert P.check_coverage("adc", points[[3, 3, 3, 0]], into, image) == pytest.approx(0.75)
    with pytest.raises(ImageValidationError, match=r"ADC covers only 25% of the T1c brain in scanner coordinates"):
        P.check_coverage("adc", points[[3, 3, 3, 0]], into, image, doubtful=True)
    with pytest.raises(ImageValidationError, match=r"ADC covers only 25% of the T1c brain .*\(10 x 10 x 10 mm\)"):
        P.check_coverage("adc", points[[0, 2, 3, 3]], identity, image)
