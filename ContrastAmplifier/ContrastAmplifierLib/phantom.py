"""Synthetic brain phantom: physics-based multi-sequence MRI cases with known lesions and poses.

SYNTHETIC PHANTOM, NOT CLINICAL DATA. It stands in for patients in tests, the demo and
benchmarks. Per case (``case_NNN/``):

* anatomy: ICBM 2009a GM/WM/brain mask from nilearn, CSF = mask - GM - WM, a scalp-fat and skull
  shell, dural sinuses, vessel-like tubes and choroid plexus (:mod:`.phantom_anatomy`);
* 0-25 lesions, metastasis-like or glioma-like (:mod:`.phantom_lesions`);
* per-tissue T1/T2/PD/ADC drawn inside ``shared/PHANTOM.md`` ranges; signals from the
  :mod:`.mr_signal` equations with the paper's Table 1 parameters; gadolinium shortens T1/T2
  where the blood-brain barrier is broken and in vessels, at doses 0 / 0.025 / 0.1 / 0.4 mmol/kg;
* acquisition: per-sequence pose and voxel size, slab partial volume, bias field, Rician noise
  (:mod:`.phantom_acquisition`).

Two acquisition protocols: ``paper`` (default; the paper's 3D research protocol) and ``clinical``
(:mod:`.phantom_clinical`: 2D thick slices, oblique stacks, own fields of view, motion, EPI
distortion, scanner storage). Ground-truth helpers for registration tests:
:func:`true_rigid_to_t1c`, :func:`registration_error_mm`; :func:`read_signal` undoes a sequence's
storage (gain, offset) back to the phantom's signal units.

Entry points: :func:`generate_case` and :func:`generate_cohort` (CLI ``contrast-amplifier phantom``).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Union

import numpy as np
import SimpleITK as sitk

from . import __version__
from . import mr_signal as mr
from ContrastAmplifierCommon.atomicfile import apply_umask, write_text_atomic
from .imageio import write_image_atomic
from .phantom_acquisition import (NativeGrid, apply_affine, bias_field, native_image, plan_grid,
                                  resample_to_native, sample_case_pose, sample_motion, sequence_spacing,
                                  supersampling, world_image, FOV_MARGIN_MM)
from .phantom_anatomy import (TemplateAnatomy, choroid_plexus, dural_sinuses, head_distance_maps, head_shell,
                              load_template_anatomy, random_curve, tube_fraction)
from .phantom_clinical import (PROTOCOLS, ClinicalOptions, ClinicalPlan, distortion_mm, distortion_transform, encode,
                               measure_lesion_on_grid, plan_clinical, write_stored)
from .phantom_lesions import (Lesion, LesionMaps, place_lesions, rasterise_lesions,
                              LesionProfile, lesion_profile, sample_lesion_count, sample_lesion_shape)
from ContrastAmplifierCommon.progress import CancelToken, ProgressCallback, check_cancel, null_progress

SYNTHETIC_LABEL = "synthetic phantom \u2014 not clinical data"
SEQUENCES = ("t1", "flair", "adc", "t1c_low", "t1c", "t1c_x4", "t1c_vfa")
#: Arbitrary receiver gain so images look like scanner units (WM signal 0.045 -> 450); images are
#: stored as int16 like scanner exports (rounding step 1 is well below the noise, sigma >= 10).
SCANNER_GAIN = 10000.0
#: ADC maps are written in 1e-6 mm^2/s (the usual scanner unit).
ADC_UNIT = 1e-6

Range = tuple[float, float]
#: Tissue parameter ranges, PHANTOM.md "Relaxation, proton density, diffusion" table:
#: (T1 at 1.5 T, T1 at 3 T, T2, PD, ADC in 1e-3 mm^2/s). Values for blood (vessels) and choroid
#: plexus are not in PHANTOM.md: literature blood T1 ~1.45 s (1.5 T) / ~1.65 s (3 T), T2 ~150-250 ms;
#: plexus is taken as grey-matter-like tissue without a blood-brain barrier. Skull T1 is not given
#: (PD 0.05 and T2 < 1 ms make its signal ~0 whatever T1 is).
TISSUE_RANGES: dict[str, dict[str, Range]] = {
    "wm": {"t1_1.5": (650, 800), "t1_3": (830, 1100), "t2": (70, 85), "pd": (0.65, 0.72), "adc": (0.65, 0.80)},
    "gm": {"t1_1.5": (1050, 1250), "t1_3": (1300, 1800), "t2": (90, 110), "pd": (0.78, 0.85), "adc": (0.75, 0.90)},
    "csf": {"t1_1.5": (3500, 4500), "t1_3": (3800, 4500), "t2": (1500, 2200), "pd": (1.0, 1.0), "adc": (2.9, 3.2)},
    "enhancing": {"t1_1.5": (1000, 1400), "t1_3": (1300, 1800), "t2": (90, 130), "pd": (0.80, 0.90), "adc": (0.7, 1.3)},
    "necrosis": {"t1_1.5": (1800, 3000), "t1_3": (2000, 3500), "t2": (150, 400), "pd": (0.90, 0.95), "adc": (1.8, 2.6)},
    "oedema": {"t1_1.5": (1100, 1500), "t1_3": (1400, 2000), "t2": (120, 200), "pd": (0.85, 0.95), "adc": (1.2, 1.7)},
    "fat": {"t1_1.5": (250, 300), "t1_3": (350, 400), "t2": (60, 80), "pd": (0.9, 1.0), "adc": (0.1, 0.3)},
    "skull": {"t1_1.5": (250, 250), "t1_3": (250, 250), "t2": (0.5, 0.9), "pd": (0.05, 0.05), "adc": (0.0, 0.0)},
    "vessel": {"t1_1.5": (1400, 1500), "t1_3": (1600, 1700), "t2": (150, 250), "pd": (0.85, 0.90), "adc": (2.0, 3.0)},
    "plexus": {"t1_1.5": (1050, 1250), "t1_3": (1300, 1800), "t2": (90, 110), "pd": (0.80, 0.90), "adc": (1.0, 1.5)},
}
TISSUES = tuple(TISSUE_RANGES)
#: T2* = factor x T2 for the gradient echo, PHANTOM.md "Signal equations".
T2STAR_FACTOR = (0.6, 0.8)
#: Plasma gadolinium at the standard dose (vessels, sinuses), PHANTOM.md "Gadolinium" (mmol/L).
PLASMA_CONC_STD = (0.5, 1.0)
#: Choroid plexus (fenestrated capillaries, no barrier): a fraction of plasma concentration.
PLEXUS_CONC_STD = (0.3, 0.5)
#: Noise levels: SNR in white matter, PHANTOM.md "Noise" for 3D GRE (15-40); others chosen alike.
SNR_RANGES = {"gre": (15.0, 40.0), "flair": (15.0, 30.0), "t1c_vfa": (20.0, 40.0), "dwi": (20.0, 40.0)}
#: Shell thicknesses (mm): extra-axial CSF, skull, scalp (fat).
SHELL_MM = {"csf": (1.0, 3.0), "skull": (4.0, 8.0), "scalp": (3.0, 6.0)}
#: Incidental magnetisation transfer of the long refocusing train of a 3D TSE (T1c-vfa) lowers
#: macromolecule-rich tissue more than lesions and fluids: one reason T1c-vfa shows enhancing
#: lesions more conspicuously than GRE (paper, Discussion). Signal scale per tissue (default 1).
VFA_MT_SCALE = {"wm": 0.80, "gm": 0.87, "oedema": 0.95, "enhancing": 0.95, "plexus": 0.9}
#: Fat-saturated diffusion EPI keeps this fraction of the fat signal.
DWI_FAT_SUPPRESSION = 0.1


@dataclass
class TissueFractions:
    """Partial-volume fractions on the world grid; they sum to <= 1 (the rest is air)."""

    maps: dict[str, np.ndarray]
    conc_standard_dose: np.ndarray  # mmol/L inside enhancing lesion tissue at 0.1 mmol/kg


@dataclass
class CaseResult:
    """What :func:`generate_case` wrote (paths) and its ground truth (lesions, poses)."""

    case_dir: Path
    lesions: list[dict]
    parameters: dict = field(repr=False, default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------

def sample_tissue_parameters(rng: np.random.Generator, field_strength: float) -> dict[str, dict[str, float]]:
    """Per-case T1 (ms), T2 (ms), PD, ADC (1e-3 mm^2/s) for every tissue inside PHANTOM.md ranges."""
    key = "t1_1.5" if float(field_strength) == 1.5 else "t1_3"
    out: dict[str, dict[str, float]] = {}
    for tissue, ranges in TISSUE_RANGES.items():
        out[tissue] = {
            "t1_ms": float(rng.uniform(*ranges[key])), "t2_ms": float(rng.uniform(*ranges["t2"])),
            "pd": float(rng.uniform(*ranges["pd"])), "adc_1e-3_mm2_s": float(rng.uniform(*ranges["adc"])),
        }
    return out


def _streams(seed: int) -> dict[str, np.random.Generator]:
    """Independent random streams per concern, so changing one part never reshuffles the others."""
    names = ("tissues", "pose", "lesions", "vessels", "noise", "acquisition")
    children = np.random.SeedSequence(int(seed)).spawn(len(names))
    return {n: np.random.default_rng(c) for n, c in zip(names, children)}


# ---------------------------------------------------------------------------------------------
# Anatomy composition
# ---------------------------------------------------------------------------------------------

def vessel_fraction(anatomy: TemplateAnatomy, rng: np.random.Generator, signed_mm: np.ndarray,
                    csf_mm: float) -> tuple[np.ndarray, dict]:
    """Dural sinuses plus 4-8 vessel-like tubes inside the brain (flowing blood)."""
    sinus_width = float(rng.uniform(5.0, 8.0))
    vessels = dural_sinuses(anatomy, signed_mm, csf_mm, sinus_width)
    idx = np.flatnonzero((anatomy.gm + anatomy.wm > 0.5) & anatomy.brain)
    z, y, x = anatomy.axis_coordinates()
    tubes = []
    for _ in range(int(rng.integers(4, 9))):
        ends = []
        for _ in range(2):
            k, j, i = np.unravel_index(int(idx[rng.integers(idx.size)]), anatomy.shape)
            ends.append(np.array([x[0, 0, i], y[0, j, 0], z[k, 0, 0]], dtype=np.float64))
        length = float(np.linalg.norm(ends[1] - ends[0]))
        if length > 70.0:  # keep tubes vessel-like, not brain-spanning
            ends[1] = ends[0] + (ends[1] - ends[0]) * 70.0 / length
        radius = float(rng.uniform(0.7, 1.5))
        curve = random_curve(rng, ends[0], ends[1], bend_mm=15.0)
        sl, frac = tube_fraction(anatomy, curve, radius)
        vessels[sl] = np.maximum(vessels[sl], frac * anatomy.brain[sl])
        tubes.append({"start_lps": ends[0].round(3).tolist(), "end_lps": ends[1].round(3).tolist(),
                      "radius_mm": round(radius, 4)})
    return vessels, {"sinus_width_mm": round(sinus_width, 4), "tubes": tubes}


def compose_fractions(anatomy: TemplateAnatomy, shell: dict[str, np.ndarray], lesions: LesionMaps,
                      vessels: np.ndarray, plexus: np.ndarray) -> TissueFractions:
    """Mix tissues: lesions replace brain tissue, plexus replaces CSF, vessels replace everything."""
    healthy = np.clip(1.0 - lesions.enhancing - lesions.necrosis - lesions.oedema, 0.0, 1.0)
    keep = 1.0 - vessels
    maps = {
        "wm": anatomy.wm * healthy * keep,
        "gm": anatomy.gm * healthy * keep,
        "csf": (np.clip(anatomy.csf * healthy - plexus, 0, 1) + shell["csf"]) * keep,
        "plexus": plexus * healthy * keep,
        "enhancing": lesions.enhancing * keep,
        "necrosis": lesions.necrosis * keep,
        "oedema": lesions.oedema * keep,
        "fat": shell["fat"] * keep,
        "skull": shell["skull"] * keep,
        "vessel": vessels,
    }
    return TissueFractions({k: v.astype(np.float32, copy=False) for k, v in maps.items()}, lesions.conc_standard_dose)


# ---------------------------------------------------------------------------------------------
# Signals on the world grid
# ---------------------------------------------------------------------------------------------

def tissue_concentrations(dose: float, plasma_std: float, plexus_std: float) -> dict[str, float]:
    """Gadolinium (mmol/L) per tissue class at ``dose`` (mmol/kg), linear in dose (PHANTOM.md)."""
    k = dose / mr.STANDARD_DOSE
    return {t: 0.0 for t in TISSUES} | {"vessel": plasma_std * k, "plexus": plexus_std * k}


def tissue_signal(name: str, p: dict[str, float], protocol: mr.Protocol, conc: float, field_strength: float,
                  t2star_factor: float) -> float:
    """Noise-free signal of one tissue with ``conc`` mmol/L of gadolinium (PD 1 = fully relaxed water)."""
    t1, t2 = mr.relax_with_gadolinium(p["t1_ms"], p["t2_ms"], conc, field_strength)
    if isinstance(protocol, mr.GradientEcho):
        return float(mr.spoiled_gre(p["pd"], t1, t2 * t2star_factor, protocol))
    if isinstance(protocol, mr.InversionRecovery):
        return float(mr.inversion_recovery(p["pd"], t1, t2, protocol))
    return float(mr.spin_echo(p["pd"], t1, t2, protocol))


def mix_signal(fractions: TissueFractions, per_tissue: dict[str, float],
               enhancing_signal: Optional[Callable[[np.ndarray], np.ndarray]] = None) -> np.ndarray:
    """Partial-volume signal ``sum_k f_k S_k``; enhancing tissue may depend on its voxel concentration."""
    out = np.zeros_like(fractions.maps["wm"])
    scratch = np.empty_like(out)  # one reused buffer: big temporaries cost page faults at 1 mm
    for tissue, f in fractions.maps.items():
        if tissue == "enhancing" and enhancing_signal is not None:
            continue
        s = per_tissue[tissue]
        if s != 0.0:
            np.multiply(f, np.float32(s), out=scratch)
            out += scratch
    if enhancing_signal is not None:
        f = fractions.maps["enhancing"]
        idx = np.nonzero(f > 0)
        out[idx] += (f[idx] * enhancing_signal(fractions.conc_standard_dose[idx])).astype(np.float32)
    return out


@dataclass
class PhysicsModel:
    """Everything needed to turn tissue fractions into one sequence's noise-free signal."""

    tissues: dict[str, dict[str, float]]
    protocols: dict[str, mr.Protocol]
    field_strength: float
    t2star_factor: float
    plasma_conc_std: float
    plexus_conc_std: float

    def per_tissue(self, sequence: str, dose: float, protocol: Optional[mr.Protocol] = None,
                   black_blood: bool = False) -> dict[str, float]:
        protocol = protocol or self.protocols[sequence]
        conc = tissue_concentrations(dose, self.plasma_conc_std, self.plexus_conc_std)
        out = {t: tissue_signal(t, self.tissues[t], protocol, conc[t], self.field_strength, self.t2star_factor)
               for t in TISSUES}
        if black_blood:  # flowing blood leaves the slice before the refocusing pulses: flow void
            out["vessel"] = 0.0
        if isinstance(protocol, mr.SpinEcho):
            out = {t: s * VFA_MT_SCALE.get(t, 1.0) for t, s in out.items()}
        return out

    @property
    def diffusion(self) -> mr.DiffusionEPI:
        """The ADC series' protocol (DWI at b = 0 and b = ``b_value``)."""
        protocol = self.protocols["adc"]
        if not isinstance(protocol, mr.DiffusionEPI):
            raise TypeError(f"the adc protocol must be a DiffusionEPI, got {type(protocol).__name__}")
        return protocol

    def enhancing_signal(self, protocol: mr.Protocol, dose: float) -> Callable[[np.ndarray], np.ndarray]:
        if isinstance(protocol, mr.InversionRecovery):  # FLAIR mixes the enhancing tissue's per_tissue signal
            raise ValueError("a concentration-dependent enhancing signal exists for gradient-echo and spin-echo sequences only")
        p = self.tissues["enhancing"]

        def signal(conc_std: np.ndarray) -> np.ndarray:
            conc = conc_std.astype(np.float64) * (dose / mr.STANDARD_DOSE)
            t1, t2 = mr.relax_with_gadolinium(p["t1_ms"], p["t2_ms"], conc, self.field_strength)
            if isinstance(protocol, mr.GradientEcho):
                return mr.spoiled_gre(p["pd"], t1, t2 * self.t2star_factor, protocol)
            return mr.spin_echo(p["pd"], t1, t2, protocol) * VFA_MT_SCALE["enhancing"]

        return signal

    def world_signals(self, fractions: TissueFractions) -> dict[str, np.ndarray]:
        """Noise-free world-grid signals: GRE at four doses, FLAIR, T1c-vfa, DWI b=0 and b=1000."""
        out: dict[str, np.ndarray] = {}
        for seq, dose in mr.DOSES_MMOL_PER_KG.items():
            proto = self.protocols[seq]
            out[seq] = mix_signal(fractions, self.per_tissue(seq, dose), self.enhancing_signal(proto, dose))
        out["flair"] = mix_signal(fractions, self.per_tissue("flair", 0.0, black_blood=True))
        vfa = self.protocols["t1c_vfa"]
        out["t1c_vfa"] = mix_signal(fractions, self.per_tissue("t1c_vfa", mr.STANDARD_DOSE, black_blood=True),
                                    self.enhancing_signal(vfa, mr.STANDARD_DOSE))
        b0 = self.per_tissue("adc", 0.0, black_blood=True)
        b0["fat"] *= DWI_FAT_SUPPRESSION
        bval = self.diffusion.b_value
        b1000 = {t: s * float(mr.diffusion_attenuation(self.tissues[t]["adc_1e-3_mm2_s"] * 1e-3, bval))
                 for t, s in b0.items()}
        out["dwi_b0"] = mix_signal(fractions, b0)
        out["dwi_b1000"] = mix_signal(fractions, b1000)
        return out


def adc_from_dwi(b0: np.ndarray, b1000: np.ndarray, b_value: float, threshold: float) -> np.ndarray:
    """ADC (mm^2/s) = ln(S0 / Sb) / b where S0 exceeds ``threshold``; 0 elsewhere (scanner-style mask)."""
    valid = (b0 > threshold) & (b1000 > 0)
    adc = np.zeros(b0.shape, dtype=np.float32)
    adc[valid] = np.log(b0[valid] / b1000[valid]) / b_value
    return np.clip(adc, 0.0, 4e-3)


# ---------------------------------------------------------------------------------------------
# Case generation
# ---------------------------------------------------------------------------------------------

def _truth_resolution(spacing: float) -> int:
    return 1 if spacing < 1.5 else 2


def _head_extent(anatomy: TemplateAnatomy, shell_total_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Bounding box (world LPS) of the brain grown by the shell, and the brain centre."""
    z, y, x = anatomy.axis_coordinates()
    idx = np.nonzero(anatomy.brain)
    lo = np.array([x.ravel()[idx[2].min()], y.ravel()[idx[1].min()], z.ravel()[idx[0].min()]])
    hi = np.array([x.ravel()[idx[2].max()], y.ravel()[idx[1].max()], z.ravel()[idx[0].max()]])
    centre = (lo + hi) / 2.0
    grow = shell_total_mm + 2.0
    corners = np.array([[a, b, c] for a in (lo[0] - grow, hi[0] + grow) for b in (lo[1] - grow, hi[1] + grow)
                        for c in (lo[2] - grow, hi[2] + grow)])
    return corners, centre


def plan_acquisition(rng: np.random.Generator, anatomy: TemplateAnatomy, shell_total_mm: float, spacing: float,
                     size: Optional[tuple[int, int, int]]) -> tuple[dict[str, np.ndarray], dict[str, NativeGrid], dict]:
    """Per-sequence world->native matrices and native grids (t1c_x4 shares t1c's)."""
    corners, centre = _head_extent(anatomy, shell_total_mm)
    case_pose, case_info = sample_case_pose(rng, centre)
    centre_scanner = apply_affine(case_pose, centre)
    scanner_corners = apply_affine(case_pose, corners)
    fov = scanner_corners.max(0) - scanner_corners.min(0) + 2 * FOV_MARGIN_MM
    fov_centre = (scanner_corners.max(0) + scanner_corners.min(0)) / 2.0
    t1c_grid = plan_grid(fov_centre, fov, sequence_spacing("t1c", spacing), size)
    fov = np.asarray(t1c_grid.size) * np.asarray(t1c_grid.spacing)
    poses: dict[str, np.ndarray] = {}
    grids: dict[str, NativeGrid] = {}
    motion_info: dict[str, Union[dict, str]] = {}
    for seq in SEQUENCES:
        if seq == "t1c_x4":
            continue
        motion, motion_info[seq] = sample_motion(rng, centre_scanner)
        poses[seq] = motion @ case_pose
        grids[seq] = t1c_grid if seq == "t1c" else plan_grid(fov_centre, fov, sequence_spacing(seq, spacing))
    poses["t1c_x4"], grids["t1c_x4"], motion_info["t1c_x4"] = poses["t1c"], t1c_grid, "same as t1c"
    info = {"case_pose": case_info, "motion": motion_info, "scanner_head_centre_lps": centre_scanner.round(6).tolist()}
    return poses, grids, info


def _lesion_truth(rng: np.random.Generator, anatomy: TemplateAnatomy, depth: np.ndarray, t1c_grid: NativeGrid,
                  t1c_pose: np.ndarray, profile: LesionProfile) -> tuple[str, list[Lesion]]:
    case_type, count = sample_lesion_count(rng, profile)
    kind = "glioma" if case_type == "glioma" else "metastasis"
    shapes = [sample_lesion_shape(rng, kind, i + 1, profile) for i in range(count)]

    def inside_fov(points: np.ndarray, margin: float) -> np.ndarray:
        return t1c_grid.contains(apply_affine(t1c_pose, points), margin)

    return case_type, place_lesions(rng, anatomy, depth, shapes, inside_fov)


def _matrix_json(m: np.ndarray) -> list[list[float]]:
    return [[round(float(v), 9) for v in row] for row in m]


def _write(image: sitk.Image, path: Path) -> None:
    write_image_atomic(image, path, compress=True)


def _check_arguments(spacing: Optional[float], size: Optional[tuple[int, int, int]], protocol: str,
                     clinical: Optional[ClinicalOptions]) -> Optional[ClinicalOptions]:
    if spacing is not None and not 0.5 <= float(spacing) <= 8.0:
        raise ValueError(f"--spacing {spacing} mm is outside 0.5-8 mm; use 1 for realistic cases or 2-4 for fast tests.")
    if size is not None and (len(size) != 3 or min(size) < 8):
        raise ValueError(f"--size {size} must be three voxel counts >= 8 (x y z).")
    if protocol not in PROTOCOLS:
        raise ValueError(f"--protocol {protocol!r}: use one of {', '.join(PROTOCOLS)}.")
    if protocol == "paper":
        if clinical is not None:
            raise ValueError("clinical options (--t1c-acquisition) need --protocol clinical.")
        return None
    return clinical or ClinicalOptions()


def _plan_clinical_case(rng: np.random.Generator, seed: int, anatomy: TemplateAnatomy, shell_total_mm: float,
                        floor_mm: float, size: Optional[tuple[int, int, int]], options: ClinicalOptions
                        ) -> tuple[ClinicalPlan, dict]:
    """The clinical plan; the head pose is drawn exactly as :func:`plan_acquisition` draws it."""
    _, centre = _head_extent(anatomy, shell_total_mm)
    case_pose, case_info = sample_case_pose(rng, centre)
    centre_scanner = apply_affine(case_pose, centre)
    plan = plan_clinical(seed, anatomy, shell_total_mm, case_pose, centre_scanner, floor_mm, size, options, SEQUENCES)
    info = {"case_pose": case_info, "motion": plan.motion, "scanner_head_centre_lps": centre_scanner.round(6).tolist()}
    return plan, info


def plan_clinical_case(seed: int, spacing: Optional[float] = None, size: Optional[tuple[int, int, int]] = None,
                       clinical: Optional[ClinicalOptions] = None, resolution: Optional[int] = None) -> ClinicalPlan:
    """The clinical acquisition plan :func:`generate_case` would use for ``seed`` (grids, poses, storage,
    distortion), without rendering any image: cheap enough to check ranges over many seeds.

    ``resolution`` (1 or 2 mm) is the truth grid the head extent is measured on (default: the one
    :func:`generate_case` uses for ``spacing``); it moves fields of view by at most a millimetre.
    """
    options = _check_arguments(spacing, size, "clinical", clinical)
    assert options is not None
    rng = _streams(seed)
    anatomy = load_template_anatomy(resolution or _truth_resolution(1.0 if spacing is None else float(spacing)))
    sample_tissue_parameters(rng["tissues"], 1.5)  # the draws generate_case makes before the shell's
    shell_mm = {k: float(rng["tissues"].uniform(*r)) for k, r in SHELL_MM.items()}
    floor_mm = 0.0 if spacing is None else float(spacing)
    return _plan_clinical_case(rng["pose"], seed, anatomy, sum(shell_mm.values()), floor_mm, size, options)[0]


@dataclass
class _Acquisition:
    """What the sequence loop needs besides the sequence's own grid and pose."""

    seed: int
    anatomy: TemplateAnatomy
    signals: dict[str, np.ndarray]
    model: PhysicsModel
    sigma: dict[str, float]
    wm_adc: float
    bias_coeffs: np.ndarray
    centre_scanner: np.ndarray
    noise: bool


def _acquire(acq: _Acquisition, seq: str, n: int, grid: NativeGrid, pose: np.ndarray,
             warp: Optional[sitk.Transform] = None) -> tuple[np.ndarray, float, tuple[int, int, int]]:
    """One sequence on its native grid: the noisy magnitude signal, or the ADC in mm^2/s.

    Returns (array, noise sigma in signal units, supersampling).
    """
    h = acq.anatomy.spacing
    sub = supersampling(grid.profile_mm, h)
    bias = bias_field(grid, acq.centre_scanner, acq.bias_coeffs)
    noise_rng = np.random.default_rng(np.random.SeedSequence([int(acq.seed), 1000 + n]))
    if seq == "adc":
        b0 = resample_to_native(world_image(acq.signals["dwi_b0"], acq.anatomy.origin, h), grid, pose, sub=sub,
                                native_warp=warp) * bias
        b1 = resample_to_native(world_image(acq.signals["dwi_b1000"], acq.anatomy.origin, h), grid, pose, sub=sub,
                                native_warp=warp) * bias
        s = acq.sigma["dwi"] if acq.noise else 0.0
        b0 = mr.add_rician_noise(b0, s, noise_rng)
        b1 = mr.add_rician_noise(b1, s, noise_rng)
        threshold = max(4.0 * s, 0.1 * acq.wm_adc)
        return adc_from_dwi(b0, b1, acq.model.diffusion.b_value, threshold), s, sub
    key = "gre" if seq in mr.DOSES_MMOL_PER_KG else seq
    signal = resample_to_native(world_image(acq.signals[seq], acq.anatomy.origin, h), grid, pose, sub=sub) * bias
    s = acq.sigma[key] if acq.noise else 0.0
    return mr.add_rician_noise(signal, s, noise_rng), s, sub


def _store_clinical(array: np.ndarray, seq: str, grid: NativeGrid, plan: ClinicalPlan, path: Path) -> tuple[dict, str]:
    """Scale to physical units (gain, offset), encode as the plan's storage and write; returns the record and unit."""
    storage = plan.storage[seq]
    physical = array.astype(np.float32) * np.float32(storage["gain"]) + np.float32(storage["offset"])
    stored, record = encode(physical, storage)
    write_stored(native_image(stored, grid), path, record)
    if seq == "adc":
        unit = f"{record['physical_unit']} (ADC from b=0 and b=1000 EPI images; physical = ADC[mm^2/s] x gain)"
    else:
        unit = (f"{record['physical_unit']}: physical = signal x gain + offset; stored {record['dtype']}, "
                "physical = stored x scl_slope + scl_inter (NIfTI; SimpleITK and nibabel apply it on read)")
    record["formula"] = ("physical = gain * signal + offset (signal: the phantom's magnitude signal, PD 1 = fully "
                         "relaxed water; ADC: mm^2/s); stored = round((physical - scl_inter) / scl_slope)")
    return record, unit


def generate_case(case_dir: Union[str, Path], seed: int, spacing: Optional[float] = None,
                  size: Optional[tuple[int, int, int]] = None, field_strength: float = 1.5, noise: bool = True,
                  progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None,
                  protocol: str = "paper", clinical: Optional[ClinicalOptions] = None,
                  lesions: str = "default") -> CaseResult:
    """Generate one phantom case into ``case_dir`` (written in place; see :func:`generate_cohort`).

    Args:
        case_dir: output folder (created).
        seed: the case's seed; the same seed gives the same bytes (and, whatever the protocol, the
            same patient: anatomy, lesions, tissue values, head pose).
        spacing: ``paper``: isotropic T1/T1c voxel size in mm (default 1); other sequences keep
            their nominal, coarser voxels but never finer than this. ``clinical``: a floor on every
            voxel dimension (default none: the protocol's own 0.5-1 mm in-plane voxels).
        size: T1c grid size (x, y, z) in voxels; default covers the whole head (clinical: T1c's FOV).
        field_strength: 1.5 or 3 (T).
        noise: add Rician noise (``False`` gives the noise-free images, for physics checks).
        progress, cancel: see :mod:`.progress`.
        protocol: ``paper`` (default: the paper's 3D research protocol, unchanged) or ``clinical``
            (:mod:`.phantom_clinical`: 2D thick slices, oblique stacks, own FOVs, motion, EPI
            distortion, scanner storage).
        clinical: :class:`.phantom_clinical.ClinicalOptions` (``clinical`` protocol only).
        lesions: lesion profile (:data:`.phantom_lesions.LESION_PROFILES`): ``default`` or
            ``small`` (training: more, smaller metastases); recorded in ``phantom.json`` when not
            the default.

    Returns:
        :class:`CaseResult` with the lesions as written to ``lesions.json``.
    """
    started = time.perf_counter()
    report = progress or null_progress
    options = _check_arguments(spacing, size, protocol, clinical)
    profile = lesion_profile(lesions)
    floor_mm = 0.0 if spacing is None else float(spacing)
    spacing = 1.0 if spacing is None else float(spacing)
    fs = mr._check_field_strength(field_strength)
    case_dir = Path(case_dir)
    rng = _streams(seed)

    report("phantom", 0.02, "anatomy")
    resolution = _truth_resolution(spacing)
    anatomy = load_template_anatomy(resolution)
    signed, depth = head_distance_maps(resolution)
    h = anatomy.spacing
    tissues = sample_tissue_parameters(rng["tissues"], fs)
    shell_mm = {k: float(rng["tissues"].uniform(*r)) for k, r in SHELL_MM.items()}
    t2star = float(rng["tissues"].uniform(*T2STAR_FACTOR))
    plasma = float(rng["tissues"].uniform(*PLASMA_CONC_STD))
    plexus_c = plasma * float(rng["tissues"].uniform(*PLEXUS_CONC_STD))
    shell = head_shell(signed, anatomy.brain, shell_mm["csf"], shell_mm["skull"], shell_mm["scalp"], h)
    plan: Optional[ClinicalPlan] = None
    if options is None:
        poses, grids, pose_info = plan_acquisition(rng["pose"], anatomy, sum(shell_mm.values()), spacing, size)
    else:
        plan, pose_info = _plan_clinical_case(rng["pose"], seed, anatomy, sum(shell_mm.values()), floor_mm, size, options)
        poses, grids = plan.poses, plan.grids
    check_cancel(cancel)

    report("phantom", 0.15, "lesions and vessels")
    case_type, truth = _lesion_truth(rng["lesions"], anatomy, depth, grids["t1c"], poses["t1c"], profile)
    lesion_maps = rasterise_lesions(anatomy, truth)
    vessels, vessel_info = vessel_fraction(anatomy, rng["vessels"], signed, shell_mm["csf"])
    plexus_radius = float(rng["vessels"].uniform(3.0, 5.0))
    plexus = choroid_plexus(anatomy, rng["vessels"], plexus_radius)
    fractions = compose_fractions(anatomy, shell, lesion_maps, vessels, plexus)
    del shell, vessels, plexus
    check_cancel(cancel)

    report("phantom", 0.3, "signals")
    model = PhysicsModel(tissues, mr.table1_protocols(fs), fs, t2star, plasma, plexus_c)
    signals = model.world_signals(fractions)
    wm_signal = {seq: model.per_tissue(seq, 0.0)["wm"] for seq in ("t1", "flair", "t1c_vfa", "adc")}
    snr = {k: float(rng["acquisition"].uniform(*r)) for k, r in SNR_RANGES.items()}
    if plan is not None:
        snr["dwi"] = plan.adc_snr
    sigma = {"gre": wm_signal["t1"] / snr["gre"], "flair": wm_signal["flair"] / snr["flair"],
             "t1c_vfa": wm_signal["t1c_vfa"] / snr["t1c_vfa"], "dwi": wm_signal["adc"] / snr["dwi"]}
    bias_coeffs = rng["acquisition"].normal(0.0, 0.07, 9)
    centre_scanner = np.asarray(pose_info["scanner_head_centre_lps"])
    check_cancel(cancel)

    case_dir.mkdir(parents=True, exist_ok=True)
    acq = _Acquisition(int(seed), anatomy, signals, model, sigma, wm_signal["adc"], bias_coeffs, centre_scanner, noise)
    outputs: dict[str, dict] = {}
    steps = list(SEQUENCES)
    for n, seq in enumerate(steps):
        report("phantom", 0.35 + 0.5 * n / len(steps), f"acquiring {seq}")
        grid, pose = grids[seq], poses[seq]
        warp = None
        if plan is not None and seq == "adc" and plan.distortion["applied"]:
            warp = distortion_transform(plan.distortion, grid)
        array, seq_sigma, sub = _acquire(acq, seq, n, grid, pose, warp)
        if plan is None:
            if seq == "adc":
                array = array / ADC_UNIT
                unit = "1e-6 mm^2/s (ADC from b=0 and b=1000 images)"
            else:
                array = array * np.float32(SCANNER_GAIN)
                unit = f"arbitrary scanner units (signal x {SCANNER_GAIN:g}, rounded to int16)"
            _write(native_image(to_int16(array), grid), case_dir / f"{seq}.nii.gz")
        else:
            storage_record, unit = _store_clinical(array, seq, grid, plan, case_dir / f"{seq}.nii.gz")
        outputs[seq] = {
            "file": f"{seq}.nii.gz", "grid": grid.to_json(), "world_to_native_lps": _matrix_json(pose),
            "native_to_world_lps": _matrix_json(np.linalg.inv(pose)),
            "protocol": mr.protocol_dict(model.protocols[seq]),
            "dose_mmol_per_kg": mr.DOSES_MMOL_PER_KG.get(seq, mr.STANDARD_DOSE if seq == "t1c_vfa" else 0.0),
            "noise_sigma_signal_units": round(float(seq_sigma), 8), "supersampling_xyz": list(sub), "unit": unit,
            "black_blood": seq in ("t1c_vfa", "flair", "adc"),
        }
        if plan is not None:
            outputs[seq] |= {"acquisition": plan.acquisition[seq], "storage": storage_record}
            if seq == "adc":
                outputs[seq]["distortion"] = plan.distortion
        check_cancel(cancel)
    del signals, acq

    report("phantom", 0.88, "labels")
    lesion_entries = _write_labels(case_dir, anatomy, lesion_maps, truth, grids["t1c"], poses["t1c"])

    parameters = {
        "label": SYNTHETIC_LABEL,
        "generator": f"ContrastAmplifierLib.phantom {__version__}",
        "seed": int(seed), "field_strength_t": fs, "spacing_mm": spacing, "size_xyz": None if size is None else list(size),
        "noise": bool(noise), "case_type": case_type, "n_lesions": len(lesion_entries),
        **({} if profile.name == "default" else {"lesion_profile": asdict(profile)}),
        "world": {
            "description": "ICBM 2009a nonlinear symmetric template space (nilearn), LPS millimetres "
                           "(SimpleITK physical coordinates); RAS = (-x, -y, z).",
            "truth_grid": {"resolution_mm": resolution, "origin_lps": list(anatomy.origin), "size_xyz": list(anatomy.shape[::-1])},
        },
        "pose_convention": "world_to_native_lps is a 4x4 matrix A with p_native = A @ [p_world, 1] (LPS mm); "
                           "each native image samples I(p_native) = truth(inverse(A) @ p_native). "
                           "A = motion(sequence) @ case_pose; t1c_x4 has exactly t1c's grid and pose. "
                           "To map sequence s onto t1c: p_t1c = A_t1c @ inverse(A_s) @ p_s.",
        "pose": pose_info,
        "sequences": outputs,
        "labels_grid": "t1c (brain_mask.nii.gz, lesion_labels.nii.gz)",
        "tissues": {t: {k: round(v, 6) for k, v in p.items()} for t, p in tissues.items()},
        "tissue_ranges_source": "shared/PHANTOM.md table (vessel/plexus/skull T1: see phantom.py TISSUE_RANGES)",
        "t2star_over_t2": round(t2star, 6),
        "gadolinium": {
            "agent": "gadoterate meglumine", "r1_l_per_mmol_s": mr.RELAXIVITY_R1[fs], "r2_l_per_mmol_s": mr.RELAXIVITY_R2,
            "doses_mmol_per_kg": mr.DOSES_MMOL_PER_KG, "plasma_conc_mmol_l_at_standard_dose": round(plasma, 6),
            "plexus_conc_mmol_l_at_standard_dose": round(plexus_c, 6),
            "scaling": "C(dose) = C_standard * dose / 0.1, non-zero only in enhancing lesion tissue, vessels and plexus",
        },
        "shell_mm": {k: round(v, 4) for k, v in shell_mm.items()},
        "vessels": vessel_info | {"choroid_plexus_radius_mm": round(plexus_radius, 4)},
        "snr_white_matter": {k: round(v, 4) for k, v in snr.items()},
        "bias_field": {"model": "exp(sum c_k m_k), monomials x y z x2 y2 z2 xy xz yz of scanner coordinates "
                                "relative to scanner_head_centre_lps, in units of 100 mm",
                       "coefficients": bias_coeffs.round(8).tolist()},
        "scanner_gain": SCANNER_GAIN,
        "t1c_vfa_magnetisation_transfer_scale": VFA_MT_SCALE,
        "dwi_fat_suppression": DWI_FAT_SUPPRESSION,
        "lesions_truth": [lesion.to_json() for lesion in truth],
    }
    if plan is not None and options is not None:
        _add_clinical_parameters(parameters, plan, options, floor_mm)
    write_text_atomic(json.dumps(parameters, indent=2) + "\n", case_dir / "phantom.json")
    report("phantom", 1.0, f"done in {time.perf_counter() - started:.1f} s")
    return CaseResult(case_dir, lesion_entries, parameters)


def _write_labels(case_dir: Path, anatomy: TemplateAnatomy, lesion_maps: LesionMaps, lesions: list[Lesion],
                  grid: NativeGrid, pose: np.ndarray) -> list[dict]:
    """brain_mask, lesion_labels (on the T1c grid) and lesions.json; returns the lesions.json entries."""
    h = anatomy.spacing
    sub = supersampling(grid.profile_mm, h)
    mask = resample_to_native(world_image(anatomy.brain.astype(np.float32), anatomy.origin, h), grid, pose, sub=sub)
    _write(native_image((mask >= 0.5).astype(np.uint8), grid), case_dir / "brain_mask.nii.gz")
    labels = lesion_labels_on_grid(lesion_maps, anatomy, lesions, grid, pose)
    _write(native_image(labels, grid), case_dir / "lesion_labels.nii.gz")
    lesion_entries = []
    for lesion in lesions:
        entry = measure_lesion_on_grid(labels, lesion.id, grid)
        if entry is not None:
            lesion_entries.append({"id": entry["id"], "kind": lesion.kind, **{k: v for k, v in entry.items() if k != "id"}})
    write_text_atomic(json.dumps({"lesions": lesion_entries}, indent=2) + "\n", case_dir / "lesions.json")
    return lesion_entries


def _add_clinical_parameters(parameters: dict, plan: ClinicalPlan, options: ClinicalOptions, floor_mm: float) -> None:
    """The clinical protocol's phantom.json additions (the paper protocol's phantom.json is unchanged)."""
    parameters["spacing_mm"] = floor_mm or None
    parameters["acquisition_protocol"] = "clinical"
    parameters["clinical"] = {
        "t1c_acquisition": plan.t1c_mode, "options": asdict(options),
        "spacing_floor_mm": floor_mm or None,
        "reference_sequence": "t1c",
        "description": "2D multi-slice T1/T1c/FLAIR (4-6 mm slices, optional gap, 0.5-1 mm in-plane; T1c 3D in some "
                       "cases), each sequence with its own FOV, orientation (tilt <= 20 deg) and motion relative to "
                       "T1c (<= 10 deg, <= 15 mm); EPI ADC (>= 2 x 2 x 5 mm, low SNR, distortion <= 3 mm along the "
                       "phase-encoding axis: sequences.adc.distortion); scanner storage (sequences.<name>.storage).",
    }
    parameters["pose_convention"] = (
        "world_to_native_lps is a 4x4 matrix A with p_native = A @ [p_world, 1] (LPS mm); each native image samples "
        "I(p_native) = truth(inverse(A) @ p_native) (the ADC additionally through its EPI distortion, "
        "sequences.adc.distortion; A is its rigid pose). A = motion(sequence) @ case_pose; t1c has no motion (the "
        "reference); t1c_x4 has exactly t1c's grid and pose; t1c_low has t1c's grid and its own small motion. "
        "Grids may be oblique (grid.direction, columns = i, j, k axes in LPS). To map sequence s onto t1c: "
        "p_t1c = A_t1c @ inverse(A_s) @ p_s; phantom.true_rigid_to_t1c(case_dir, s) returns A_s @ inverse(A_t1c).")
    parameters["scanner_gain"] = "per sequence: sequences.<name>.storage.gain"


def to_int16(array: np.ndarray) -> np.ndarray:
    """Round to the nearest integer and store as int16 (saturating), like scanner exports."""
    return np.clip(np.rint(array), -32768, 32767).astype(np.int16)


def lesion_labels_on_grid(maps: LesionMaps, anatomy: TemplateAnatomy, lesions: Sequence[Lesion],
                          grid: NativeGrid, pose: np.ndarray) -> np.ndarray:
    """Lesion ids on a native grid: body fraction >= 0.5, owner by nearest neighbour.

    A lesion too small to reach 0.5 anywhere gets the voxel holding its centre, so every placed
    lesion has at least one voxel (and a lesions.json entry).
    """
    sub = supersampling(grid.profile_mm, anatomy.spacing)
    body = resample_to_native(world_image(maps.body, anatomy.origin, anatomy.spacing), grid, pose, sub=sub)
    owner = resample_to_native(world_image(maps.owner, anatomy.origin, anatomy.spacing), grid, pose,
                               interpolator=sitk.sitkNearestNeighbor)
    labels = np.where(body >= 0.5, owner, 0).astype(np.uint8)
    present = set(np.unique(labels).tolist())
    for lesion in lesions:
        if lesion.id in present:
            continue
        p = apply_affine(pose, lesion.centre_lps)
        i, j, k = np.rint(grid.physical_to_index(p)).astype(int)
        if 0 <= i < grid.size[0] and 0 <= j < grid.size[1] and 0 <= k < grid.size[2]:
            labels[k, j, i] = lesion.id
    return labels


def generate_cohort(out_dir: Union[str, Path], cases: int = 1, seed: int = 0, spacing: Optional[float] = None,
                    size: Optional[tuple[int, int, int]] = None, field_strength: float = 1.5,
                    progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None,
                    noise: bool = True, skip_existing: bool = False, protocol: str = "paper",
                    clinical: Optional[ClinicalOptions] = None, lesions: str = "default") -> list[Path]:
    """Generate ``cases`` phantom cases ``OUT_DIR/case_NNN`` (case ``i`` uses ``seed + i``).

    ``protocol``, ``clinical`` and ``lesions`` are :func:`generate_case`'s (``paper``, the default, or
    ``clinical``; lesion profile ``default`` or ``small``).

    Each case is built in a hidden temporary folder and renamed into place when complete, so a
    cancel or crash never leaves half a case. An existing phantom case folder (one holding
    ``phantom.json``) is replaced, or kept with ``skip_existing`` (it is complete: only finished
    cases are renamed into place), which lets a cohort grow or resume. A ``case_NNN`` that is
    anything else (a file, or a folder of other data) is never replaced: the call is refused
    before anything is generated.

    Returns:
        The case folders, in order.

    Raises:
        OutputPathError: ``out_dir`` is a file, not writable, or holds a ``case_NNN`` that is not a phantom case.
    """
    from ContrastAmplifierCommon.outputs import OutputPathError, check_output_folder

    if cases < 1:
        raise ValueError(f"--cases must be >= 1, got {cases}.")
    _check_arguments(spacing, size, protocol, clinical)
    lesion_profile(lesions)
    out_dir = Path(out_dir)
    # Only new case_NNN sub-folders are created: the current directory is a fine place for them.
    check_output_folder(out_dir, [], what="phantom output folder", allow_current_dir=True)
    for i in range(cases):
        final = out_dir / f"case_{i:03d}"
        if final.exists() and not (final / "phantom.json").is_file():
            raise OutputPathError(
                f"{final} exists and is not a phantom case (no phantom.json); it is never replaced. Move it, or choose "
                "another output folder."
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    report = progress or null_progress
    paths = []
    for i in range(cases):
        check_cancel(cancel)
        final = out_dir / f"case_{i:03d}"
        if skip_existing and final.is_dir():
            paths.append(final)
            continue
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=out_dir))
        apply_umask(tmp, directory=True)
        try:
            def sub_progress(stage: str, fraction: float, message: str = "", _i: int = i) -> None:
                report(stage, (_i + fraction) / cases, f"case {_i + 1}/{cases}: {message}")

            generate_case(tmp, seed + i, spacing, size, field_strength, noise=noise, progress=sub_progress, cancel=cancel,
                          protocol=protocol, clinical=clinical, lesions=lesions)
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        paths.append(final)
    report("phantom", 1.0, f"{cases} case(s) written to {out_dir}")
    return paths


# ---------------------------------------------------------------------------------------------
# Ground truth for registration tests
# ---------------------------------------------------------------------------------------------

class RegistrationError(NamedTuple):
    """Displacement error (mm) of an estimated transform over the T1c brain-mask voxel centres."""

    mean_mm: float
    max_mm: float
    n_points: int


def _case_parameters(case_dir: Union[str, Path]) -> dict:
    path = Path(case_dir) / "phantom.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {case_dir} is not a phantom case folder.")
    return json.loads(path.read_text(encoding="utf-8"))


def true_rigid_to_t1c(case_dir: Union[str, Path], modality: str) -> np.ndarray:
    """The true 4x4 transform mapping T1c physical points (LPS mm) to ``modality``'s physical points.

    ``A_modality @ inverse(A_t1c)`` from ``phantom.json``'s ``world_to_native_lps``: rigid (the head's
    size and pose cancel; the rotation is orthonormal to machine precision, so
    ``sitk.Euler3DTransform().SetMatrix`` accepts it), exact for oblique grids (to the 9 decimals of
    ``phantom.json``), and the convention of a SimpleITK transform that
    resamples ``modality`` onto the T1c grid (fixed = T1c, moving = ``modality``). For the clinical
    ADC it is the rigid pose, without the EPI distortion (``sequences.adc.distortion``).

    Raises:
        KeyError: ``modality`` is not a sequence of the case.
    """
    sequences = _case_parameters(case_dir)["sequences"]
    if modality not in sequences:
        raise KeyError(f"{modality!r} is not a sequence of this phantom case; it has {', '.join(sequences)}.")
    a_mod = np.asarray(sequences[modality]["world_to_native_lps"], dtype=np.float64)
    a_t1c = np.asarray(sequences["t1c"]["world_to_native_lps"], dtype=np.float64)
    m = a_mod @ np.linalg.inv(a_t1c)
    # Rigid by construction; phantom.json keeps 9 decimals, which leaves ~1e-9 of non-orthogonality
    # that SimpleITK's rigid transforms refuse (tolerance 1e-10): project onto the nearest rotation.
    u, _, vt = np.linalg.svd(m[:3, :3])
    m[:3, :3] = u @ vt
    return m


def brain_points_t1c(case_dir: Union[str, Path]) -> np.ndarray:
    """Physical LPS points (N, 3) of the voxel centres of ``brain_mask.nii.gz`` (on the T1c grid)."""
    mask = sitk.ReadImage(str(Path(case_dir) / "brain_mask.nii.gz"))
    k, j, i = np.nonzero(sitk.GetArrayViewFromImage(mask) > 0)
    index = np.stack([i, j, k], axis=1).astype(np.float64) * np.asarray(mask.GetSpacing())
    direction = np.asarray(mask.GetDirection(), dtype=np.float64).reshape(3, 3)
    return np.asarray(mask.GetOrigin()) + index @ direction.T


def _as_matrix(transform: sitk.Transform, probe: np.ndarray) -> Optional[np.ndarray]:
    """The 4x4 matrix of a SimpleITK transform if it is affine (checked on ``probe`` points), else None."""
    b = np.asarray(transform.TransformPoint((0.0, 0.0, 0.0)))
    m = np.eye(4)
    m[:3, 3] = b
    for axis in range(3):
        e = np.zeros(3)
        e[axis] = 100.0
        m[:3, axis] = (np.asarray(transform.TransformPoint(tuple(e))) - b) / 100.0
    for p in probe:
        if np.linalg.norm(np.asarray(transform.TransformPoint(tuple(float(v) for v in p))) - apply_affine(m, p)) > 1e-6:
            return None
    return m


def registration_error_mm(case_dir: Union[str, Path], modality: str, transform: Union[np.ndarray, sitk.Transform],
                          max_points: int = 20000) -> RegistrationError:
    """Mean and max error (mm) of an estimated ``modality`` -> T1c transform over the brain.

    Args:
        transform: maps T1c physical points to ``modality`` physical points (the transform that
            resamples ``modality`` onto T1c): a 4x4 matrix, or any SimpleITK transform. An affine
            one is applied to every brain-mask voxel; a non-linear one to at most ``max_points``
            evenly spread voxels.

    Returns:
        :class:`RegistrationError`: |estimate(p) - truth(p)| over the T1c ``brain_mask.nii.gz`` voxel centres.
    """
    truth = true_rigid_to_t1c(case_dir, modality)
    points = brain_points_t1c(case_dir)
    if points.size == 0:
        raise ValueError(f"{case_dir}: brain_mask.nii.gz is empty; no point to measure the error on.")
    if isinstance(transform, sitk.Transform):
        matrix = _as_matrix(transform, points[:: max(1, len(points) // 5)][:5])
        if matrix is None:
            points = points[:: max(1, int(np.ceil(len(points) / max_points)))]
            estimate = np.array([transform.TransformPoint(tuple(float(v) for v in p)) for p in points])
        else:
            estimate = apply_affine(matrix, points)
    else:
        matrix = np.asarray(transform, dtype=np.float64)
        if matrix.shape != (4, 4):
            raise ValueError(f"transform must be a 4x4 matrix or a SimpleITK transform, got shape {matrix.shape}.")
        estimate = apply_affine(matrix, points)
    error = np.linalg.norm(estimate - apply_affine(truth, points), axis=1)
    return RegistrationError(float(error.mean()), float(error.max()), int(len(points)))


def signal_scale(params: Mapping[str, Any], name: str) -> tuple[float, float]:
    """``(gain, offset)`` with ``physical = gain * signal + offset`` for sequence ``name`` of a case
    whose ``phantom.json`` is ``params``: the clinical protocol's storage record, or the paper
    protocol's one scanner gain (ADC: stored in 1e-6 mm^2/s)."""
    storage = params["sequences"].get(name, {}).get("storage")
    if storage is not None:
        return float(storage["gain"]), float(storage["offset"])
    return (1.0 / ADC_UNIT, 0.0) if name == "adc" else (SCANNER_GAIN, 0.0)


def read_signal(case_dir: Union[str, Path], name: str) -> np.ndarray:
    """A sequence's image (z, y, x) in the phantom's units: magnitude signal (PD 1 = fully relaxed
    water) or ADC in mm^2/s, whatever the protocol's storage (slope/intercept, gain, offset)."""
    physical = sitk.GetArrayFromImage(sitk.ReadImage(str(Path(case_dir) / f"{name}.nii.gz"), sitk.sitkFloat64))
    gain, offset = signal_scale(_case_parameters(case_dir), name)
    return (physical - offset) / gain


def adc_distortion_mm(case_dir: Union[str, Path], points_lps: np.ndarray) -> np.ndarray:
    """The clinical ADC's EPI displacement (mm along its phase-encoding direction) at ADC physical points;
    zeros for a paper-protocol case (no distortion)."""
    distortion = _case_parameters(case_dir)["sequences"]["adc"].get("distortion")
    if distortion is None:
        return np.zeros(np.asarray(points_lps).shape[:-1])
    return distortion_mm(distortion, points_lps)
