"""Clinical acquisition protocol for the phantom: how hospitals acquire, not how the paper did.

SYNTHETIC PHANTOM, NOT CLINICAL DATA. ``generate_case(..., protocol="clinical")`` keeps the
patient (anatomy, lesions, tissue values, head pose) and changes only the acquisition:

* 2D multi-slice stacks for T1, T1c (and its dose series ``t1c_low``/``t1c_x4`` on T1c's grid) and
  FLAIR: slices 4-6 mm thick, optionally with a gap (slice profile = thickness, slice spacing =
  thickness + gap), in-plane 0.5-1 mm; T1c is a 3D acquisition (0.8-1.2 mm, axial or sagittal
  slab) in some cases (``t1c_acquisition``: ``auto`` draws it from the seed);
* each sequence has its own field of view: in-plane size (FOV / matrix, rectangular in some),
  centre offsets up to +-40 mm, and in some cases a slab that misses the vertex or the skull base;
* oblique stacks, tilted up to 20 degrees (a direction matrix on the grid), and patient motion
  between sequences: up to 10 degrees and 15 mm relative to T1c (the reference, no motion);
* ADC as clinical EPI: 2-2.6 mm in-plane, 5-6 mm slices (+ gap), low SNR, and a smooth
  susceptibility distortion up to 3 mm along the phase-encoding axis (recorded analytically);
* scanner-like storage: int16 (with NIfTI ``scl_slope``/``scl_inter`` in some), uint16 or
  float32; gains and large offsets that leave the background negative.

The ground truth stays exact: ``world_to_native_lps`` maps world points to the physical point of
each sequence's image, oblique or not; the EPI distortion is recorded separately (the rigid pose
of the ADC excludes it). See :func:`.phantom.true_rigid_to_t1c` and
:func:`.phantom.registration_error_mm`.
"""

from __future__ import annotations

import gzip
import struct
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import SimpleITK as sitk

from ContrastAmplifierCommon.atomicfile import atomic_path
from .imageio import write_image_atomic
from .phantom_acquisition import IDENTITY_DIRECTION, NativeGrid, affine_about, apply_affine
from .phantom_anatomy import TemplateAnatomy
from .phantom_lesions import lps_to_ras, measure_lesion

PROTOCOLS = ("paper", "clinical")
T1C_ACQUISITIONS = ("auto", "2d", "3d")
#: Seed-sequence key of the clinical protocol's own random stream: the paper protocol's streams
#: (tissues, pose, lesions, ...) are drawn exactly as before, so the same seed is the same patient.
CLINICAL_STREAM = 0xC11
#: Probability that ``t1c_acquisition="auto"`` gives a 3D T1c.
T1C_3D_PROBABILITY = 0.5

#: 2D multi-slice (T1, T1c, FLAIR): slice thickness (mm), optional gap, in-plane FOV and matrix
#: (pixel = FOV / matrix, kept within 0.5-1 mm), rectangular FOV along the phase axis in some.
SLICE_THICKNESS_MM = (4.0, 4.5, 5.0, 5.5, 6.0)
SLICE_GAP_PROBABILITY = 0.5
SLICE_GAP_FRACTION = (0.1, 0.3)
FOV_MM = (220.0, 230.0, 240.0, 250.0, 260.0)
MATRIX_2D = (256, 288, 320, 352, 384, 416, 448, 480, 512)
IN_PLANE_2D_MM = (0.5, 1.0)
RECTANGULAR_FOV_PROBABILITY = 0.4
PHASE_FOV_FRACTION = (0.75, 0.9)
#: 3D T1c (GRE) and T1c-vfa (TSE): in-plane and slab partition thickness (mm).
MATRIX_3D = (224, 240, 256, 272, 288, 304, 320)
IN_PLANE_3D_MM = (0.8, 1.0)
THICKNESS_3D_MM = (0.8, 1.2)
IN_PLANE_VFA_MM = (0.8, 1.2)
SAGITTAL_3D_PROBABILITY = 0.5
#: ADC (2D spin-echo EPI): "2 x 2 x 5 mm or coarser".
ADC_FOV_MM = (220.0, 230.0, 240.0, 250.0, 256.0)
ADC_MATRIX = (88, 96, 100, 104, 110, 112, 120, 128)
ADC_IN_PLANE_MM = (2.0, 2.6)
ADC_SLICE_THICKNESS_MM = (5.0, 5.5, 6.0)
#: b = 0 SNR in white matter: clinical EPI is noisy (the paper protocol draws 20-40).
ADC_SNR = (10.0, 20.0)
#: Slab orientation: tilt of the slice normal (deg) about an in-plane axis, in-plane rotation.
MAX_TILT_DEG = 20.0
MAX_IN_PLANE_ROTATION_DEG = 8.0
STRAIGHT_PROBABILITY = 0.25  # a plain axial (or sagittal) stack, no tilt
SHARED_PLANE_PROBABILITY = 0.6  # the technologist copied the session's planning
#: Field of view placement (mm, native axes, relative to the head centre at planning time).
MAX_FOV_OFFSET_MM = 40.0
FOV_BRAIN_MARGIN_MM = 4.0  # in-plane: the brain stays inside the FOV (the scalp may not)
TRUNCATION_PROBABILITY = {"vertex": 0.2, "skull_base": 0.2}
VERTEX_CUT_MM = (5.0, 20.0)  # brain missing above the slab
SKULL_BASE_CUT_MM = (10.0, 40.0)  # brain missing below the slab (cerebellum, brainstem)
COVERAGE_MARGIN_MM = (0.0, 8.0)  # head to slab edge when the slab covers everything
#: Patient motion relative to T1c (rotation about a random axis, translation in a random direction).
MOTION_MAX_DEG = 10.0
MOTION_MAX_MM = 15.0
DOSE_SERIES_MOTION = (3.0, 3.0)  # t1c_low: same series and grid as T1c, a few minutes earlier
#: EPI distortion: maximum |displacement| over the brain (mm), susceptibility hot spots (world LPS:
#: orbitofrontal / frontal sinus, both petrous bones), Gaussian widths (mm).
ADC_DISTORTION_MM = (1.0, 3.0)
DISTORTION_HOTSPOTS_LPS = {"frontal_sinus": (0.0, -45.0, -20.0), "left_petrous": (45.0, 20.0, -30.0),
                           "right_petrous": (-45.0, 20.0, -30.0)}
DISTORTION_SIGMA_MM = (15.0, 30.0)
#: Storage kinds for magnitude images and for ADC (probabilities).
STORAGE_KINDS = {"int16": 0.3, "int16_offset": 0.2, "int16_scaled": 0.3, "uint16": 0.1, "float32": 0.1}
ADC_STORAGE_KINDS = {"int16": 0.6, "int16_scaled": 0.2, "float32": 0.2}
#: Receiver gain relative to the paper protocol's 10000 (white matter 0.045 x gain).
GAIN_FACTOR = (0.15, 3.0)
OFFSET_MM_RANGE = (512.0, 2048.0)  # magnitude of a large additive offset (scanner units)
SCALED_TARGET_MAX = (2000.0, 30000.0)  # largest |stored integer| when the slope is data-derived

SECTION_AXES = {"axial": np.eye(3),
                # DICOM-style sagittal: rows towards posterior, columns towards the feet, normal = R.
                "sagittal": np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])}


@dataclass(frozen=True)
class ClinicalOptions:
    """Knobs of the clinical protocol.

    Attributes:
        t1c_acquisition: ``auto`` (drawn from the seed), ``2d`` (multi-slice) or ``3d``.
        adc_distortion: apply the EPI distortion to the ADC (its parameters are recorded either way).
    """

    t1c_acquisition: str = "auto"
    adc_distortion: bool = True

    def __post_init__(self) -> None:
        if self.t1c_acquisition not in T1C_ACQUISITIONS:
            raise ValueError(f"--t1c-acquisition {self.t1c_acquisition!r}: use one of {', '.join(T1C_ACQUISITIONS)}.")


def clinical_rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), CLINICAL_STREAM]))


# ---------------------------------------------------------------------------------------------
# Geometry helpers
# ---------------------------------------------------------------------------------------------

def axis_angle_matrix(axis: Union[Sequence[float], np.ndarray], angle_deg: float) -> np.ndarray:
    """Rotation by ``angle_deg`` about ``axis`` (Rodrigues)."""
    a = np.asarray(axis, dtype=np.float64)
    a = a / np.linalg.norm(a)
    k = np.array([[0.0, -a[2], a[1]], [a[2], 0.0, -a[0]], [-a[1], a[0], 0.0]])
    t = np.deg2rad(angle_deg)
    return np.eye(3) + np.sin(t) * k + (1.0 - np.cos(t)) * (k @ k)


def rotation_angle_deg(rotation: np.ndarray) -> float:
    """Angle (deg) of a 3x3 rotation."""
    return float(np.rad2deg(np.arccos(np.clip((np.trace(rotation[:3, :3]) - 1.0) / 2.0, -1.0, 1.0))))


def _unit_vector(rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal(3)
    return v / np.linalg.norm(v)


def sample_motion(rng: np.random.Generator, centre_scanner: np.ndarray, max_deg: float, max_mm: float
                  ) -> tuple[np.ndarray, dict]:
    """Rigid head motion (scanner -> scanner) about the head centre: angle and shift up to the maxima."""
    axis, angle = _unit_vector(rng), float(rng.uniform(0.0, max_deg))
    shift = _unit_vector(rng) * float(rng.uniform(0.0, max_mm))
    matrix = affine_about(centre_scanner, axis_angle_matrix(axis, angle), shift)
    return matrix, {"rotation_deg": round(angle, 6), "axis_lps": axis.round(6).tolist(),
                    "translation_mm": shift.round(6).tolist(), "translation_norm_mm": round(float(np.linalg.norm(shift)), 6),
                    "matrix_scanner": [[round(float(v), 9) for v in row] for row in matrix]}


def sample_plane(rng: np.random.Generator, section: str) -> tuple[np.ndarray, dict]:
    """Direction matrix of a (possibly oblique) slab: tilt <= 20 deg about an in-plane axis, then
    a small in-plane rotation. Axial tilts are mostly about the left-right axis (AC-PC planning)."""
    base = SECTION_AXES[section]
    if rng.uniform() < STRAIGHT_PROBABILITY:
        tilt, phi, spin = 0.0, 0.0, 0.0
    else:
        tilt = float(rng.uniform(-MAX_TILT_DEG, MAX_TILT_DEG))
        phi = float(rng.uniform(-30.0, 30.0)) if section == "axial" else float(rng.uniform(0.0, 180.0))
        spin = float(rng.uniform(-MAX_IN_PLANE_ROTATION_DEG, MAX_IN_PLANE_ROTATION_DEG))
    axis = np.cos(np.deg2rad(phi)) * base[:, 0] + np.sin(np.deg2rad(phi)) * base[:, 1]
    spin_matrix = axis_angle_matrix((0.0, 0.0, 1.0), spin)
    direction = axis_angle_matrix(axis, tilt) @ base @ spin_matrix
    if tilt == 0.0 and spin == 0.0:
        direction = base.copy()
    return direction, {"section": section, "tilt_deg": round(abs(tilt), 6), "tilt_axis_lps": axis.round(6).tolist(),
                       "in_plane_rotation_deg": round(spin, 6)}


def tilt_deg(direction: np.ndarray, section: str) -> float:
    """Angle (deg) between a grid's slice normal and its section's nominal normal."""
    normal = SECTION_AXES[section][:, 2]
    return float(np.rad2deg(np.arccos(np.clip(abs(float(direction[:, 2] @ normal)), -1.0, 1.0))))


def brain_points_scanner(anatomy: TemplateAnatomy, case_pose: np.ndarray, max_points: int = 60000) -> np.ndarray:
    """Brain-mask voxel centres (world) mapped into the scanner by the case pose, thinned to ``max_points``."""
    idx = np.flatnonzero(anatomy.brain)
    step = max(1, int(np.ceil(idx.size / max_points)))
    k, j, i = np.unravel_index(idx[::step], anatomy.shape)
    world = np.asarray(anatomy.origin) + anatomy.spacing * np.stack([i, j, k], axis=1).astype(np.float64)
    return apply_affine(case_pose, world)


# ---------------------------------------------------------------------------------------------
# Per-sequence planning
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Spec:
    mode: str  # "2d", "3d" or "epi"
    section: str
    fovs: tuple[float, ...]
    matrices: tuple[int, ...]
    in_plane_mm: tuple[float, float]
    thickness_choices: tuple[float, ...] = ()
    thickness_range: Optional[tuple[float, float]] = None
    phase_axis: int = 0  # native axis of phase encoding (i = left-right on axial 2D, j = A-P for EPI)
    rectangular: bool = False
    truncate: bool = True


def _spec(name: str, t1c_mode: str, rng: np.random.Generator) -> _Spec:
    two_d = _Spec("2d", "axial", FOV_MM, MATRIX_2D, IN_PLANE_2D_MM, SLICE_THICKNESS_MM, rectangular=True)
    if name in ("t1", "flair") or (name == "t1c" and t1c_mode == "2d"):
        return two_d
    if name == "adc":
        return _Spec("epi", "axial", ADC_FOV_MM, ADC_MATRIX, ADC_IN_PLANE_MM, ADC_SLICE_THICKNESS_MM, phase_axis=1)
    section = "sagittal" if rng.uniform() < SAGITTAL_3D_PROBABILITY else "axial"
    in_plane = IN_PLANE_3D_MM if name == "t1c" else IN_PLANE_VFA_MM
    return _Spec("3d", section, FOV_MM, MATRIX_3D, in_plane, thickness_range=THICKNESS_3D_MM,
                 phase_axis=0 if section == "axial" else 1, truncate=section == "axial")


def _in_plane(rng: np.random.Generator, spec: _Spec) -> tuple[float, int, float]:
    """FOV (mm), matrix and pixel (mm) with the pixel inside the spec's range."""
    lo, hi = spec.in_plane_mm
    while True:
        fov = float(rng.choice(spec.fovs))
        ok = [m for m in spec.matrices if lo - 1e-9 <= fov / m <= hi + 1e-9]
        if ok:
            matrix = int(rng.choice(ok))
            return fov, matrix, fov / matrix


def _offset(rng_value: float, brain_lo: float, brain_hi: float, fov: float) -> float:
    """In-plane FOV centre offset: the drawn value, limited so the brain stays in the FOV."""
    lo = max(brain_hi + FOV_BRAIN_MARGIN_MM - fov / 2.0, -MAX_FOV_OFFSET_MM)
    hi = min(brain_lo - FOV_BRAIN_MARGIN_MM + fov / 2.0, MAX_FOV_OFFSET_MM)
    if lo > hi:  # the brain does not fit (cannot happen with 220 mm FOVs): centre on it
        return float(np.clip((brain_lo + brain_hi) / 2.0, -MAX_FOV_OFFSET_MM, MAX_FOV_OFFSET_MM))
    return float(np.clip(rng_value, lo, hi))


def plan_sequence(rng: np.random.Generator, spec: _Spec, direction: np.ndarray, plane_info: dict,
                  brain_scanner: np.ndarray, centre_scanner: np.ndarray, shell_mm: float, floor_mm: float,
                  size: Optional[Sequence[int]] = None) -> tuple[NativeGrid, dict]:
    """One sequence's grid (FOV, matrix, slices, offsets, truncation) around the head as planned.

    Every random draw happens before ``floor_mm`` (the coarsening of ``--spacing``) is applied, so a
    coarse case has the same fields of view and orientations as its full-resolution twin.
    """
    fov, matrix, pixel = _in_plane(rng, spec)
    fraction = float(rng.uniform(*PHASE_FOV_FRACTION)) if spec.rectangular and rng.uniform() < RECTANGULAR_FOV_PROBABILITY else 1.0
    if spec.thickness_range is not None:
        thickness = float(np.round(rng.uniform(*spec.thickness_range), 2))
        gap = 0.0
    else:
        thickness = float(rng.choice(spec.thickness_choices))
        gap = float(np.round(thickness * rng.uniform(*SLICE_GAP_FRACTION), 1)) if rng.uniform() < SLICE_GAP_PROBABILITY else 0.0
    offset_draw = rng.uniform(-MAX_FOV_OFFSET_MM, MAX_FOV_OFFSET_MM, 2)
    margins = rng.uniform(*COVERAGE_MARGIN_MM, 2)
    u_trunc = float(rng.uniform())
    cut = {"vertex": float(rng.uniform(*VERTEX_CUT_MM)), "skull_base": float(rng.uniform(*SKULL_BASE_CUT_MM))}

    local = (brain_scanner - centre_scanner) @ direction  # brain coordinates along the native axes
    lo_b, hi_b = local.min(axis=0), local.max(axis=0)
    fov_ij = [fov, fov]
    fov_ij[spec.phase_axis] = fov * fraction
    # A reduced phase FOV never cuts the brain: widen it back where needed.
    fov_ij[spec.phase_axis] = max(fov_ij[spec.phase_axis], min(fov, hi_b[spec.phase_axis] - lo_b[spec.phase_axis]
                                                              + 2 * FOV_BRAIN_MARGIN_MM + 2.0))
    truncation = "none"
    lo_k, hi_k = lo_b[2] - shell_mm - margins[0], hi_b[2] + shell_mm + margins[1]
    if spec.truncate and u_trunc < TRUNCATION_PROBABILITY["vertex"]:
        truncation, hi_k = "vertex", hi_b[2] - cut["vertex"]
    elif spec.truncate and u_trunc < TRUNCATION_PROBABILITY["vertex"] + TRUNCATION_PROBABILITY["skull_base"]:
        truncation, lo_k = "skull_base", lo_b[2] + cut["skull_base"]
    centre_k = float(np.clip((lo_k + hi_k) / 2.0, -MAX_FOV_OFFSET_MM, MAX_FOV_OFFSET_MM))

    pixel_used = max(floor_mm, pixel)
    thickness_used = max(floor_mm, thickness)
    step_k = thickness_used + gap
    n = [max(2, int(round(fov_ij[a] / pixel_used))) for a in (0, 1)]
    n.append(max(2, int(round((hi_k - lo_k) / step_k)) + 1))
    if size is not None:
        n = [int(v) for v in size]
    offsets = [_offset(float(offset_draw[a]), float(lo_b[a]), float(hi_b[a]), n[a] * pixel_used) for a in (0, 1)]
    spacing = np.array([pixel_used, pixel_used, step_k])
    local_centre = np.array([offsets[0], offsets[1], centre_k])
    origin = centre_scanner + direction @ (local_centre - (np.asarray(n) - 1) / 2.0 * spacing)
    grid = NativeGrid((n[0], n[1], n[2]), (float(spacing[0]), float(spacing[1]), float(spacing[2])),
                      (float(origin[0]), float(origin[1]), float(origin[2])),
                      tuple(float(v) for v in direction.ravel()),
                      None if gap == 0.0 else float(thickness_used))
    info = {
        "mode": spec.mode, **plane_info,
        "nominal_in_plane_mm": round(pixel, 6), "nominal_slice_thickness_mm": round(thickness, 6),
        "slice_gap_mm": round(gap, 6), "nominal_matrix": matrix,
        "fov_mm": [round(float(n[a] * spacing[a]), 3) for a in range(3)],
        "fov_centre_offset_mm": [round(float(v), 4) for v in local_centre],
        "fov_centre_offset_axes": "native i, j, k unit vectors (grid direction columns), from the head centre at planning",
        "truncation": truncation, "phase_encoding_axis": "ij"[spec.phase_axis],
        "phase_encoding_direction_lps": direction[:, spec.phase_axis].round(9).tolist(),
        "brain_extent_native_mm": [[round(float(lo_b[a]), 3), round(float(hi_b[a]), 3)] for a in range(3)],
    }
    if truncation != "none":
        info["truncation_cut_into_brain_mm"] = round(cut[truncation], 4)
    return grid, info


@dataclass
class ClinicalPlan:
    """Poses, grids and what was drawn for every sequence of a clinical case."""

    poses: dict[str, np.ndarray]
    grids: dict[str, NativeGrid]
    acquisition: dict[str, dict]
    motion: dict[str, Union[dict, str]]
    t1c_mode: str
    distortion: dict
    storage: dict[str, dict]
    adc_snr: float
    centre_scanner: np.ndarray  # head centre the fields of view were planned around (scanner LPS)


def plan_clinical(seed: int, anatomy: TemplateAnatomy, shell_total_mm: float, case_pose: np.ndarray,
                  centre_scanner: np.ndarray, floor_mm: float, size: Optional[Sequence[int]],
                  options: ClinicalOptions, sequences: Sequence[str]) -> ClinicalPlan:
    """Plan every sequence of a clinical case (independent streams for planning, motion, distortion, storage)."""
    plan_rng, motion_rng, distortion_rng, storage_rng, noise_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence([int(seed), CLINICAL_STREAM]).spawn(5))
    t1c_draw = plan_rng.uniform()
    t1c_mode = options.t1c_acquisition if options.t1c_acquisition != "auto" else (
        "3d" if t1c_draw < T1C_3D_PROBABILITY else "2d")
    session_direction, session_info = sample_plane(plan_rng, "axial")
    brain = brain_points_scanner(anatomy, case_pose)
    poses: dict[str, np.ndarray] = {}
    grids: dict[str, NativeGrid] = {}
    acquisition: dict[str, dict] = {}
    motion_info: dict[str, Union[dict, str]] = {}
    for name in ("t1c", "t1", "flair", "adc", "t1c_vfa"):
        spec = _spec(name, t1c_mode, plan_rng)
        shared = spec.section == "axial" and plan_rng.uniform() < SHARED_PLANE_PROBABILITY
        own_direction, own_info = sample_plane(plan_rng, spec.section)
        direction, info = (session_direction, session_info) if shared else (own_direction, own_info)
        grids[name], acquisition[name] = plan_sequence(plan_rng, spec, direction, dict(info, shared_session_plane=shared),
                                                       brain, centre_scanner, shell_total_mm, floor_mm,
                                                       size if name == "t1c" else None)
    for name in ("t1", "flair", "adc", "t1c_vfa", "t1c_low"):
        max_deg, max_mm = DOSE_SERIES_MOTION if name == "t1c_low" else (MOTION_MAX_DEG, MOTION_MAX_MM)
        motion, motion_info[name] = sample_motion(motion_rng, centre_scanner, max_deg, max_mm)
        poses[name] = motion @ case_pose
    poses["t1c"] = poses["t1c_x4"] = case_pose
    motion_info["t1c"], motion_info["t1c_x4"] = "none (reference of the motion)", "same as t1c"
    grids["t1c_low"] = grids["t1c_x4"] = grids["t1c"]
    acquisition["t1c_low"] = acquisition["t1c_x4"] = dict(acquisition["t1c"], same_grid_as="t1c")
    distortion = sample_distortion(distortion_rng, grids["adc"], poses["adc"], anatomy, enabled=options.adc_distortion)
    storage = {name: sample_storage(storage_rng, name) for name in sequences}
    adc_snr = float(noise_rng.uniform(*ADC_SNR))
    return ClinicalPlan(poses, grids, acquisition, motion_info, t1c_mode, distortion, storage, adc_snr,
                        np.asarray(centre_scanner, dtype=np.float64))


# ---------------------------------------------------------------------------------------------
# EPI distortion
# ---------------------------------------------------------------------------------------------

DISTORTION_MODEL = (
    "u(p) = clip(scale * (sum_k weight_k * exp(-|p - centre_k|^2 / (2 sigma_k^2)) + gradient . (p - reference) / 100), "
    "-max_abs_mm, max_abs_mm), p in the ADC image's physical LPS mm. The ADC image at p shows the undistorted native "
    "image (the one world_to_native_lps describes) at p + u(p) * phase_encoding_direction_lps: anatomy appears "
    "shifted by about -u along the phase-encoding axis only."
)


def _raw_field(params: dict, points: np.ndarray) -> np.ndarray:
    p = np.asarray(points, dtype=np.float64)
    raw = (p - np.asarray(params["reference_lps"])) @ np.asarray(params["gradient_per_100mm"]) / 100.0
    for term in params["terms"]:
        d2 = ((p - np.asarray(term["centre_lps"])) ** 2).sum(axis=-1)
        raw = raw + term["weight"] * np.exp(-d2 / (2.0 * term["sigma_mm"] ** 2))
    return raw


def distortion_mm(params: dict, points_lps: np.ndarray) -> np.ndarray:
    """Displacement (mm, signed, along ``phase_encoding_direction_lps``) at ADC physical points (..., 3)."""
    if not params.get("applied", True):
        return np.zeros(np.asarray(points_lps).shape[:-1])
    a = float(params["max_abs_mm"])
    return np.clip(float(params["scale"]) * _raw_field(params, points_lps), -a, a)


def sample_distortion(rng: np.random.Generator, grid: NativeGrid, pose: np.ndarray, anatomy: TemplateAnatomy,
                      enabled: bool = True) -> dict:
    """Smooth susceptibility field around the air-tissue hot spots, scaled so max |u| over the brain = amplitude."""
    amplitude = float(rng.uniform(*ADC_DISTORTION_MM))
    sign = 1.0 if rng.uniform() < 0.5 else -1.0
    terms = []
    for name, centre_world in DISTORTION_HOTSPOTS_LPS.items():
        keep = name == "frontal_sinus" or rng.uniform() < 0.7
        weight, sigma = float(rng.uniform(0.6, 1.0)), float(rng.uniform(*DISTORTION_SIGMA_MM))
        if keep:
            centre = apply_affine(pose, np.asarray(centre_world, dtype=np.float64))
            terms.append({"name": name, "centre_lps": centre.round(6).tolist(), "sigma_mm": round(sigma, 6),
                          "weight": round(sign * weight, 6)})
    gradient = rng.normal(0.0, 0.25, 3)
    phase_axis = 1
    params = {
        "model": DISTORTION_MODEL, "applied": bool(enabled),
        "phase_encoding_axis": "j", "phase_encoding_direction_lps": grid.direction_matrix[:, phase_axis].round(12).tolist(),
        "terms": terms, "gradient_per_100mm": gradient.round(6).tolist(),
        "reference_lps": [round(float(v), 6) for v in grid.index_to_physical((np.asarray(grid.size) - 1) / 2.0)],
        "max_abs_mm": round(amplitude, 6), "scale": 1.0,
    }
    brain = brain_points_scanner(anatomy, pose, max_points=30000)
    peak = float(np.abs(_raw_field(params, brain)).max())
    params["scale"] = round(amplitude / max(peak, 1e-9), 9)
    return params


def distortion_transform(params: dict, grid: NativeGrid) -> sitk.Transform:
    """Displacement-field transform (distorted native point -> undistorted native point) covering ``grid``.

    The field is sampled on a grid with ``grid``'s direction, at most 2 mm apart, two voxels wider
    than ``grid`` on every side (so every sub-sample of a voxel's profile lies inside it).
    """
    spacing = np.asarray(grid.spacing, dtype=np.float64)
    step = np.minimum(spacing, 2.0)
    pad = 2.0 * spacing
    n = np.ceil(((np.asarray(grid.size) - 1) * spacing + 2 * pad) / step).astype(int) + 1
    direction = grid.direction_matrix
    origin = np.asarray(grid.origin) + direction @ (-pad)
    k, j, i = np.meshgrid(*(np.arange(int(n[a]), dtype=np.float64) for a in (2, 1, 0)), indexing="ij")
    points = origin + (np.stack([i, j, k], axis=-1) * step) @ direction.T
    u = distortion_mm(params, points)
    vectors = u[..., None] * np.asarray(params["phase_encoding_direction_lps"], dtype=np.float64)
    image = sitk.GetImageFromArray(vectors, isVector=True)
    image.SetOrigin([float(v) for v in origin])
    image.SetSpacing([float(v) for v in step])
    image.SetDirection([float(v) for v in grid.direction])
    return sitk.DisplacementFieldTransform(image)


# ---------------------------------------------------------------------------------------------
# Storage
# ---------------------------------------------------------------------------------------------

def _choice(rng: np.random.Generator, table: dict[str, float]) -> str:
    names = list(table)
    return str(names[int(rng.choice(len(names), p=np.asarray(list(table.values())) / sum(table.values())))])


def sample_storage(rng: np.random.Generator, name: str) -> dict:
    """How one sequence is stored: dtype, NIfTI scaling, gain and offset (physical = gain * signal + offset)."""
    kind = _choice(rng, ADC_STORAGE_KINDS if name == "adc" else STORAGE_KINDS)
    gain_factor = float(np.exp(rng.uniform(*np.log(GAIN_FACTOR))))
    offset_mag = float(np.round(rng.uniform(*OFFSET_MM_RANGE)))
    negative = rng.uniform() < 0.7
    inter_choice = float(rng.choice([0.0, -1024.0, float(np.round(rng.uniform(-4000.0, 4000.0)))]))
    target = float(rng.uniform(*SCALED_TARGET_MAX))
    if name == "adc":
        gain, unit = {"int16": (1e6, "1e-6 mm^2/s"), "int16_scaled": (1e3, "1e-3 mm^2/s"), "float32": (1.0, "mm^2/s")}[kind]
        return {"kind": kind, "dtype": "float32" if kind == "float32" else "int16",
                "scl_slope": float(np.float32(1e-3)) if kind == "int16_scaled" else 1.0, "scl_inter": 0.0,
                "slope_from_data": False, "gain": gain, "offset": 0.0, "physical_unit": unit}
    gain = 10000.0 * gain_factor
    offset = 0.0
    if kind == "int16_offset" or (kind == "int16_scaled" and rng.uniform() < 0.5):
        offset = -offset_mag if negative else offset_mag
    if kind == "uint16":
        offset = abs(offset)
    return {"kind": kind, "dtype": {"uint16": "uint16", "float32": "float32"}.get(kind, "int16"),
            "scl_slope": 1.0, "scl_inter": inter_choice if kind == "int16_scaled" else 0.0,
            "slope_from_data": kind == "int16_scaled", "scaled_target_max": round(target, 3),
            "gain": round(gain, 6), "offset": offset, "physical_unit": "arbitrary scanner units"}


def encode(physical: np.ndarray, storage: dict) -> tuple[np.ndarray, dict]:
    """Stored array and the final storage record (data-derived slope filled in, float32-exact)."""
    record = dict(storage)
    dtype = storage["dtype"]
    if dtype == "float32":
        return physical.astype(np.float32), record
    if dtype == "uint16":
        return np.clip(np.rint(physical), 0, 65535).astype(np.uint16), record
    inter = float(np.float32(storage["scl_inter"]))
    slope = float(np.float32(storage["scl_slope"]))
    if storage.get("slope_from_data"):
        span = max(abs(float(physical.max()) - inter), abs(float(physical.min()) - inter), 1.0)
        slope = float(np.float32(span / float(storage["scaled_target_max"])))
    record["scl_slope"], record["scl_inter"] = slope, inter
    stored = np.rint((physical.astype(np.float64) - inter) / slope)
    return np.clip(stored, -32768, 32767).astype(np.int16), record


def write_stored(image: sitk.Image, path: Union[str, Path], record: dict) -> None:
    """Write ``image`` (stored values) with the record's NIfTI ``scl_slope``/``scl_inter``.

    SimpleITK always writes slope 1, intercept 0; the two float32 header fields (bytes 112-119
    of the NIfTI-1 header) are set here and the file gzip-compressed deterministically (mtime 0).
    """
    slope, inter = float(record["scl_slope"]), float(record["scl_inter"])
    if slope == 1.0 and inter == 0.0:
        write_image_atomic(image, path, compress=True)
        return
    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp) / "image.nii"
        sitk.WriteImage(image, str(plain), False)
        header = bytearray(plain.read_bytes())
    if struct.unpack("<i", bytes(header[:4]))[0] != 348:
        raise RuntimeError(f"unexpected NIfTI header written by SimpleITK for {path}")
    header[112:120] = struct.pack("<ff", slope, inter)
    with atomic_path(path, ".nii.gz") as out:
        out.write_bytes(gzip.compress(bytes(header), compresslevel=6, mtime=0))


# ---------------------------------------------------------------------------------------------
# Measurement on oblique grids
# ---------------------------------------------------------------------------------------------

def measure_lesion_on_grid(labels_zyx: np.ndarray, lesion_id: int, grid: NativeGrid) -> Optional[dict]:
    """:func:`.phantom_lesions.measure_lesion` on any grid: measured on the acquired slices (constant k),
    then mapped to physical RAS through the grid's direction."""
    if tuple(grid.direction) == IDENTITY_DIRECTION:
        return measure_lesion(labels_zyx, lesion_id, grid.origin, grid.spacing)
    entry = measure_lesion(labels_zyx, lesion_id, (0.0, 0.0, 0.0), grid.spacing)
    if entry is None:
        return None
    direction, origin = grid.direction_matrix, np.asarray(grid.origin)

    def physical(ras_local: Sequence[float]) -> list[float]:
        local = np.array(lps_to_ras(ras_local))  # RAS <-> LPS is its own inverse
        return [round(v, 4) for v in lps_to_ras(origin + direction @ local)]

    for key in ("long_axis_ras", "short_axis_ras"):
        entry[key] = [physical(p) for p in entry[key]]
    entry["center_ras"] = physical(entry["center_ras"])
    return entry
