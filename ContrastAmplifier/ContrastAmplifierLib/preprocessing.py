"""The paper's preprocessing, end to end (Materials and methods, "Preprocessing").

Order of steps (differs from the paper): nilearn's ICBM 2009a template has no
skull, so

1. read and validate every input (:func:`imageio.read_image`),
2. skull-strip the T1c in its native space (HD-BET),
3. register the skull-stripped T1c to the skull-stripped template (affine) and every other
   modality to the T1c (rigid),
4. compose the transforms and resample each image once (cubic B-spline) onto the atlas crop
   grid (default 1 mm, 160 x 192 x 160: the paper's numbers),
5. z-score inside the one brain mask, clip to the percentiles of the geometry, map to [0, 1].

:class:`PreprocessedCase` keeps the transforms so that any atlas-space result maps back onto
the native T1c grid (:meth:`PreprocessedCase.to_native`): outputs land in the user's space.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np
import SimpleITK as sitk

from ContrastAmplifierCommon.atomicfile import write_text_atomic
from .imageio import ImageLike, display_name, find_case_inputs, read_image, write_image_atomic
from .normalization import DEFAULT_CLIP, clip_to_unit, zscore_in_mask
from .plausibility import Finding
from ContrastAmplifierCommon.progress import CancelToken, ProgressCallback, SubProgress, check_cancel, null_progress
from .registration import (
    AffineSettings,
    RigidResult,
    RigidSettings,
    Template,
    atlas_crop_grid,
    compose,
    load_template,
    register_affine,
    register_rigid_detailed,
    resample,
)

__all__ = ["Geometry", "NativeGrid", "PreprocessedCase", "preprocess_case", "preprocess_case_dir", "MODALITIES"]

#: The paper's four inputs (Figure 1); "t1c" is the post-contrast slot and the reference grid.
MODALITIES: tuple[str, ...] = ("t1", "flair", "adc", "t1c")
REFERENCE = "t1c"
#: Written last by :func:`preprocess_case_dir`: present only when the rest of the output is.
MANIFEST_FILE = "preprocess.json"


@dataclass
class Geometry:
    """Atlas-space geometry and normalisation of a model (read from its bundle).

    Attributes:
        spacing: voxel spacing (x, y, z) in mm (paper: 1 mm isotropic).
        crop_size: centre-crop size (x, y, z) in voxels (paper: 160 x 192 x 160).
        percentiles: per modality ``(low, high)`` clip values in brain z-score units (paper: the
            training set's 1st and 99th percentiles); modalities not listed use
            :data:`normalization.DEFAULT_CLIP`.
    """

    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    crop_size: tuple[int, int, int] = (160, 192, 160)
    percentiles: dict[str, tuple[float, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        spacing = tuple(float(s) for s in self.spacing)
        crop_size = tuple(int(s) for s in self.crop_size)
        if len(spacing) != 3 or min(spacing) <= 0:
            raise ValueError(f"geometry spacing must be three positive mm values, got {spacing}")
        if len(crop_size) != 3 or min(crop_size) < 2:
            raise ValueError(f"geometry crop_size must be three voxel counts >= 2, got {crop_size}")
        self.spacing = spacing
        self.crop_size = crop_size
        self.percentiles = {k: (float(v[0]), float(v[1])) for k, v in dict(self.percentiles).items()}

    def clip_for(self, modality: str) -> tuple[float, float]:
        """The clip range of ``modality`` (``t1c_low`` shares the ``t1c`` pair)."""
        if modality in self.percentiles:
            return self.percentiles[modality]
        if modality.startswith("t1c") and "t1c" in self.percentiles:
            return self.percentiles["t1c"]
        return DEFAULT_CLIP

    def to_dict(self) -> dict:
        return {
            "spacing": list(self.spacing),
            "crop_size": list(self.crop_size),
            "percentiles": {k: list(v) for k, v in self.percentiles.items()},
            "default_percentiles": list(DEFAULT_CLIP),
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> Geometry:
        return cls(spacing=tuple(data["spacing"]), crop_size=tuple(data["crop_size"]),
                   percentiles={k: tuple(v) for k, v in data.get("percentiles", {}).items()})


@dataclass(frozen=True)
class NativeGrid:
    """Size, origin, spacing and direction of the native T1c (where outputs are written)."""

    size: tuple[int, int, int]
    origin: tuple[float, float, float]
    spacing: tuple[float, float, float]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, image: sitk.Image) -> NativeGrid:
        return cls(tuple(image.GetSize()), tuple(image.GetOrigin()), tuple(image.GetSpacing()), tuple(image.GetDirection()))

    def refined(self, factors: Sequence[int]) -> NativeGrid:
        """The grid with each voxel split into ``factors`` (x, y, z) sub-voxels covering the same space."""
        if tuple(factors) == (1, 1, 1):
            return self
        direction = np.array(self.direction).reshape(3, 3)
        spacing = np.array(self.spacing) / np.array(factors)
        # The first sub-voxel's centre lies half a voxel minus half a sub-voxel before the voxel's.
        shift = direction @ ((spacing - np.array(self.spacing)) / 2.0)
        fx, fy, fz = (int(f) for f in factors)
        ox, oy, oz = (float(v) for v in np.array(self.origin) + shift)
        sx, sy, sz = (float(v) for v in spacing)
        return NativeGrid((self.size[0] * fx, self.size[1] * fy, self.size[2] * fz), (ox, oy, oz), (sx, sy, sz),
                          self.direction)

    def reference(self, pixel_type: int = sitk.sitkUInt8) -> sitk.Image:
        image = sitk.Image(list(self.size), pixel_type)
        image.SetOrigin(self.origin)
        image.SetSpacing(self.spacing)
        image.SetDirection(self.direction)
        return image


#: A native axis counts as a slab axis when its spacing exceeds the atlas grid's by this factor.
SLAB_RATIO = 1.5


def slab_factors(native_spacing: Sequence[float], atlas_spacing: Sequence[float]) -> tuple[int, int, int]:
    """Sub-voxels per native voxel along x, y, z for slab averaging (:meth:`PreprocessedCase.to_native`).

    An axis whose spacing is more than :data:`SLAB_RATIO` times the atlas grid's largest spacing is
    split into ``ceil(spacing / atlas spacing)`` sub-voxels (a 5 mm slice on a 1 mm atlas grid: 5);
    the others are left whole (1).
    """
    step = max(float(v) for v in atlas_spacing)
    x, y, z = (int(np.ceil(s / step - 1e-6)) if s > SLAB_RATIO * step else 1 for s in native_spacing)
    return x, y, z


@dataclass
class PreprocessedCase:
    """One case on the atlas crop grid, plus everything needed to go back to native space.

    Attributes:
        images: per modality, normalised [0, 1] float32 image on the crop grid (true atlas-space
            origin, spacing and direction).
        zscores: per modality, brain z-scores before clipping (z, y, x) (training caches these).
        brain_mask: uint8 brain mask on the crop grid (the T1c's HD-BET mask, mapped once).
        native_brain_mask: uint8 HD-BET mask on the native T1c grid.
        atlas_to_t1c: affine mapping atlas points (mm) to native T1c points (mm).
        t1c_to: per other modality, rigid transform mapping native T1c points to its points.
        native_grid: the native T1c grid.
        geometry: the geometry used.
        timings_s: seconds per stage and ``"total"``.
        findings: plausibility warnings (:class:`.plausibility.Finding`), written to
            ``preprocess.json`` as ``"warnings"``; empty when every check passed.
        registration: per transform, its final metric and quality measurements
            (``t1c_to_<modality>``: :meth:`.registration.RigidResult.to_dict` plus ``suspect``;
            ``atlas_to_t1c``: metric, atlas Dice and correlation), written to ``preprocess.json``
            as ``"registration"``.
    """

    images: dict[str, sitk.Image]
    zscores: dict[str, np.ndarray]
    brain_mask: sitk.Image
    native_brain_mask: sitk.Image
    atlas_to_t1c: sitk.AffineTransform
    t1c_to: dict[str, sitk.Transform]
    native_grid: NativeGrid
    geometry: Geometry
    timings_s: dict[str, float] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    registration: dict[str, dict] = field(default_factory=dict)

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        """Normalised arrays (z, y, x) per modality."""
        return {k: sitk.GetArrayFromImage(v) for k, v in self.images.items()}

    @property
    def mask_array(self) -> np.ndarray:
        return sitk.GetArrayFromImage(self.brain_mask).astype(bool)

    @property
    def crop_grid(self) -> sitk.Image:
        return self.brain_mask

    def atlas_image(self, array: np.ndarray) -> sitk.Image:
        """Wrap a (z, y, x) array of the crop shape into an image with the crop grid's geometry."""
        expected = tuple(reversed(self.geometry.crop_size))
        if tuple(array.shape) != expected:
            raise ValueError(f"atlas array has shape {tuple(array.shape)}; expected (z, y, x) = {expected} (the crop grid)")
        image = sitk.GetImageFromArray(np.ascontiguousarray(array))
        image.CopyInformation(self.brain_mask)
        return image

    def to_native(self, data: Union[np.ndarray, sitk.Image], interpolator: int = sitk.sitkLinear,
                  default: float = 0.0, average_slabs: bool = False) -> sitk.Image:
        """Map an atlas-space array or image back onto the native T1c grid.

        Args:
            data: (z, y, x) array on the crop grid, or any image in atlas space.
            interpolator: SimpleITK interpolator (linear by default; nearest for labels).
            default: value outside the crop grid.
            average_slabs: along native axes coarser than the atlas grid (the slices of a 2D
                stack, 4-6 mm against 1 mm), give each voxel the mean over its whole slab
                instead of the value at its centre, as the scanner does (:func:`slab_factors`).
                For intensities, not labels.

        Returns:
            Image with the input T1c's size, origin, spacing and direction.
        """
        image = self.atlas_image(np.asarray(data)) if not isinstance(data, sitk.Image) else data
        pixel = image.GetPixelID() if interpolator == sitk.sitkNearestNeighbor else sitk.sitkFloat32
        if pixel != image.GetPixelID():
            image = sitk.Cast(image, pixel)
        factors = slab_factors(self.native_grid.spacing, image.GetSpacing()) if average_slabs else (1, 1, 1)
        reference = self.native_grid.refined(factors).reference(pixel)
        native = sitk.Resample(image, reference, self.atlas_to_t1c.GetInverse(), interpolator, default, pixel)
        if factors == (1, 1, 1):
            return native
        array = sitk.GetArrayViewFromImage(native)
        nx, ny, nz = self.native_grid.size
        fx, fy, fz = factors
        averaged = array.reshape(nz, fz, ny, fy, nx, fx).mean(axis=(1, 3, 5), dtype=np.float64).astype(np.float32)
        out = sitk.GetImageFromArray(averaged)
        out.SetOrigin(self.native_grid.origin)
        out.SetSpacing(self.native_grid.spacing)
        out.SetDirection(self.native_grid.direction)
        return out

    def write(self, out_dir: Union[str, os.PathLike], extra: Optional[dict] = None) -> Path:
        """Write images, mask, transforms and ``preprocess.json`` into ``out_dir`` (see module doc)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for name, image in self.images.items():
            write_image_atomic(image, out / f"{name}.nii.gz")
        write_image_atomic(self.brain_mask, out / "brain_mask.nii.gz")
        write_image_atomic(self.native_brain_mask, out / "native_brain_mask.nii.gz")
        sitk.WriteTransform(self.atlas_to_t1c, str(out / "atlas_to_t1c.tfm"))
        for name, transform in self.t1c_to.items():
            sitk.WriteTransform(transform, str(out / f"t1c_to_{name}.tfm"))
        meta = {
            "geometry": self.geometry.to_dict(),
            "percentiles_used": {k: list(self.geometry.clip_for(k)) for k in self.images},
            "modalities": list(self.images),
            "native_t1c_grid": asdict(self.native_grid),
            "crop_grid": {"origin": list(self.brain_mask.GetOrigin()), "spacing": list(self.brain_mask.GetSpacing()),
                          "direction": list(self.brain_mask.GetDirection()), "size": list(self.brain_mask.GetSize())},
            "transforms": {
                "atlas_to_t1c.tfm": "affine: atlas points (mm, LPS) -> native T1c points; resamples the T1c into atlas space",
                **{f"t1c_to_{k}.tfm": f"rigid: native T1c points -> native {k} points; compose after atlas_to_t1c"
                   for k in self.t1c_to},
            },
            "order": ["read+validate", "skull-strip T1c (native, HD-BET)", "affine T1c brain -> ICBM 2009a brain",
                      "rigid modality -> T1c", "one B-spline resampling per image", "z-score in brain, clip, [0,1]"],
            "timings_s": {k: round(v, 3) for k, v in self.timings_s.items()},
            "warnings": [f.to_dict() for f in self.findings],
            "registration": self.registration,
        }
        meta.update(extra or {})
        write_text_atomic(json.dumps(meta, indent=2), out / "preprocess.json")
        return out

    @classmethod
    def load(cls, out_dir: Union[str, os.PathLike]) -> PreprocessedCase:
        """Read back what :meth:`write` wrote (zscores are not stored: empty dict)."""
        out = Path(out_dir)
        meta = json.loads((out / MANIFEST_FILE).read_text(encoding="utf-8"))
        images = {m: sitk.ReadImage(str(out / f"{m}.nii.gz"), sitk.sitkFloat32) for m in meta["modalities"]}
        grid = meta["native_t1c_grid"]
        return cls(
            images=images, zscores={},
            brain_mask=sitk.ReadImage(str(out / "brain_mask.nii.gz"), sitk.sitkUInt8),
            native_brain_mask=sitk.ReadImage(str(out / "native_brain_mask.nii.gz"), sitk.sitkUInt8),
            atlas_to_t1c=sitk.AffineTransform(sitk.ReadTransform(str(out / "atlas_to_t1c.tfm")).Downcast()),
            t1c_to={m: sitk.ReadTransform(str(out / f"t1c_to_{m}.tfm")).Downcast() for m in meta["modalities"] if m != REFERENCE},
            native_grid=NativeGrid(tuple(grid["size"]), tuple(grid["origin"]), tuple(grid["spacing"]), tuple(grid["direction"])),
            geometry=Geometry.from_dict(meta["geometry"]),
            timings_s=meta.get("timings_s", {}),
            findings=[Finding(**f) for f in meta.get("warnings", [])],
            registration=meta.get("registration", {}),
        )


def preprocess_case(
    inputs: Mapping[str, ImageLike],
    geometry: Optional[Geometry] = None,
    skull_strip_mode: str = "fast",
    device: str = "cpu",
    brain_mask: Optional[ImageLike] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
    rigid_settings: RigidSettings = RigidSettings(),
    affine_settings: AffineSettings = AffineSettings(),
    template: Optional[Template] = None,
    strict: bool = False,
    backend: str = "torch",
) -> PreprocessedCase:
    """Preprocess one case (see the module docstring for the order of steps).

    Plausibility checks (:mod:`.plausibility`) run in three groups: intensities right after
    reading (before HD-BET), the brain mask and atlas fit after the affine registration, and
    overlap / motion / similarity after the rigid registrations. Their findings are reported
    through ``progress`` as stage ``"warning"`` and kept in :attr:`PreprocessedCase.findings`.

    Args:
        inputs: modality -> path or image; must contain ``"t1c"`` (the reference grid). Other
            keys (``t1``, ``flair``, ``adc``, ``t1c_low`` ...) are registered rigidly to it.
        geometry: atlas spacing, crop size and clip percentiles (default: the paper's).
        skull_strip_mode: HD-BET ``"fast"`` (CPU) or ``"accurate"`` (GPU, mirroring).
        device: ``"cpu"`` or ``"cuda[:N]"`` for HD-BET.
        brain_mask: optional brain mask on the native T1c grid; skips HD-BET when given.
        progress: ``(stage, fraction, message)`` callback.
        cancel: checked between steps; raises :class:`progress.Cancelled`.
        rigid_settings, affine_settings: registration settings.
        template: atlas template (default: nilearn's ICBM 2009a at 1 mm).
        strict: raise at the first group of checks with findings instead of warning.
        backend: HD-BET's runtime: ``"torch"``, ``"openvino"`` (CPU) or ``"auto"``
            (:func:`.skullstrip.skull_strip_backend`); checked before any work.

    Raises:
        ImageValidationError: an input is missing, unreadable, 2D, empty or not finite, too thin
            to hold a brain (a localiser or slab: :func:`.imageio.check_series_extent`), or its
            field of view misses most of the T1c brain (:func:`.plausibility.check_coverage`).
        PlausibilityError: ``strict`` and a plausibility check failed (lists that group's findings).
    """
    from . import plausibility as plaus
    from .imageio import ImageValidationError, check_series_extent
    from .registration import affine_metric, mask_points_mm, skull_stripped

    geometry = geometry or Geometry()
    sink = progress or null_progress
    timings: dict[str, float] = {"checks": 0.0}
    findings: list[plaus.Finding] = []
    last_fraction = [0.0]
    start = time.perf_counter()

    def report(stage: str, fraction: float, message: str = "") -> None:
        last_fraction[0] = fraction
        sink(stage, fraction, message)

    def flag(group: list[plaus.Finding], t0: float) -> None:
        """Keep one group of findings and report each as a "warning" (strict: raise instead)."""
        timings["checks"] += time.perf_counter() - t0
        plaus.raise_if_strict(group, strict)
        findings.extend(group)
        for finding in group:
            sink("warning", last_fraction[0], finding.message)

    if REFERENCE not in inputs:
        raise ImageValidationError(f"no {display_name(REFERENCE)} given (got {sorted(inputs)}); the T1c is the reference of every case.")
    if brain_mask is None:  # a backend that cannot run is one error line before any work
        from .skullstrip import skull_strip_backend

        backend = skull_strip_backend(backend, device)

    report("read", 0.0, "reading and validating inputs")
    t0 = time.perf_counter()
    images = {name: read_image(src, display_name(name)) for name, src in inputs.items()}
    for name, image in images.items():
        check_series_extent(image, display_name(name), inputs[name])
    native_mask_in = read_image(brain_mask, "brain mask") if brain_mask is not None else None
    timings["read"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    flag([f for name, image in images.items() for f in plaus.check_intensity(image, name)], t0)
    check_cancel(cancel)

    t1c = images[REFERENCE]
    t0 = time.perf_counter()
    if native_mask_in is None:
        report("skull-strip", 0.05, f"HD-BET {skull_strip_mode} on {device} ({'OpenVINO' if backend == 'openvino' else 'PyTorch'})")
        from .skullstrip import skull_strip

        native_mask = skull_strip(t1c, mode=skull_strip_mode, device=device, backend=backend).mask
    else:
        native_mask = sitk.Cast(
            sitk.Resample(native_mask_in, t1c, sitk.Transform(), sitk.sitkNearestNeighbor, 0) > 0.5, sitk.sitkUInt8)
    if int(sitk.GetArrayViewFromImage(native_mask).sum()) == 0:
        raise ImageValidationError("skull stripping found no brain in the T1c; check that the T1c is a head MRI.")
    timings["skull_strip"] = time.perf_counter() - t0
    check_cancel(cancel)

    report("register", 0.55, "affine T1c brain -> ICBM 2009a")
    template = template or load_template(1)
    t0 = time.perf_counter()
    atlas_to_t1c = register_affine(template.image, skull_stripped(t1c, native_mask), template.brain_mask, native_mask,
                                   affine_settings)
    timings["register_affine"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    fit = plaus.atlas_fit(template.image, template.brain_mask, t1c, native_mask, atlas_to_t1c)
    registration: dict[str, dict] = {"atlas_to_t1c": {
        "kind": "affine", "metric": round(affine_metric(template, t1c, native_mask, atlas_to_t1c, affine_settings), 5),
        "atlas_dice": round(fit[0], 5), "atlas_correlation": round(fit[1], 5),
        "seconds": round(timings["register_affine"], 3)}}
    flag(plaus.check_brain_mask(native_mask) + plaus.check_atlas_fit(*fit), t0)
    check_cancel(cancel)

    t1c_to: dict[str, sitk.Transform] = {}
    others = [m for m in images if m != REFERENCE]
    rigid: dict[str, RigidResult] = {}
    t0 = time.perf_counter()
    for i, name in enumerate(others):
        report("register", 0.65 + 0.2 * i / max(len(others), 1), f"rigid {name} -> T1c")
        rigid[name] = register_rigid_detailed(t1c, images[name], native_mask, rigid_settings)
        t1c_to[name] = rigid[name].transform
        check_cancel(cancel)
    timings["register_rigid"] = time.perf_counter() - t0
    timings["registration"] = timings["register_affine"] + timings["register_rigid"]
    t0 = time.perf_counter()
    points = mask_points_mm(native_mask, 5000)
    group = []
    for name in others:
        suspect = plaus.check_registration(name, rigid[name])
        registration[f"t1c_to_{name}"] = {**rigid[name].to_dict(), "suspect": bool(suspect)}
        inside = plaus.fov_fraction(points, t1c_to[name], images[name])  # measured once, for both checks
        found = suspect + plaus.check_alignment(name, t1c, images[name], t1c_to[name], native_mask, points, inside)
        # An input that misses most of the brain is an error, not a warning.
        doubtful = any(f.code == plaus.REGISTRATION_SUSPECT or f.code.startswith("motion.") for f in found)
        plaus.check_coverage(name, points, t1c_to[name], images[name], doubtful, inside)
        group += found
    flag(group, t0)
    check_cancel(cancel)

    report("resample", 0.85, "one B-spline resampling per image")
    t0 = time.perf_counter()
    grid = atlas_crop_grid(template, geometry.spacing, geometry.crop_size)
    mask_atlas = resample(sitk.Cast(native_mask, sitk.sitkFloat32), grid, atlas_to_t1c, sitk.sitkLinear)
    mask_atlas = sitk.Cast(mask_atlas > 0.5, sitk.sitkUInt8)
    mask_np: np.ndarray = sitk.GetArrayViewFromImage(mask_atlas).astype(bool)
    if mask_np.sum() < 2:
        raise ImageValidationError("the brain mask falls outside the atlas crop grid: registration failed; check the inputs' orientation.")
    normalised: dict[str, sitk.Image] = {}
    zscores: dict[str, np.ndarray] = {}
    for name, image in images.items():
        transform = atlas_to_t1c if name == REFERENCE else compose(atlas_to_t1c, t1c_to[name])
        moved = sitk.GetArrayFromImage(resample(image, grid, transform, sitk.sitkBSpline))
        z = zscore_in_mask(moved, mask_np)
        zscores[name] = z
        low, high = geometry.clip_for(name)
        out = clip_to_unit(z, low, high)
        out[~mask_np] = 0.0
        out_image = sitk.GetImageFromArray(out)
        out_image.CopyInformation(grid)
        normalised[name] = out_image
        check_cancel(cancel)
    timings["resample_normalize"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - start
    misaligned = plaus.suspect_modalities(findings)
    report("done", 1.0, "preprocessing finished" + (
        f"; CHECK REGISTRATION: {', '.join(display_name(m) for m in misaligned)}" if misaligned else ""))
    ordered = {k: normalised[k] for k in [m for m in MODALITIES if m in normalised] + [m for m in normalised if m not in MODALITIES]}
    return PreprocessedCase(
        images=ordered, zscores=zscores, brain_mask=mask_atlas, native_brain_mask=native_mask,
        atlas_to_t1c=atlas_to_t1c, t1c_to=t1c_to, native_grid=NativeGrid.of(t1c), geometry=geometry, timings_s=timings,
        findings=findings, registration=registration,
    )


def preprocess_output_names(modalities: Sequence[str] = MODALITIES, qc: bool = False) -> list[str]:
    """The file names :func:`preprocess_case_dir` writes (and the only ones it ever replaces)."""
    names = [f"{m}.nii.gz" for m in modalities] + ["brain_mask.nii.gz", "native_brain_mask.nii.gz", "atlas_to_t1c.tfm"]
    names += [f"t1c_to_{m}.tfm" for m in modalities if m != REFERENCE]
    return names + (["qc.png"] if qc else []) + [MANIFEST_FILE]


def preprocess_case_dir(
    case_dir: Union[str, os.PathLike],
    out_dir: Union[str, os.PathLike],
    geometry: Optional[Geometry] = None,
    skull_strip_mode: str = "fast",
    device: str = "cpu",
    qc: bool = False,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
    modalities: Sequence[str] = MODALITIES,
    brain_mask: Optional[ImageLike] = None,
    overwrite: bool = False,
    strict: bool = False,
    backend: str = "torch",
) -> PreprocessedCase:
    """Preprocess the case in ``case_dir`` (files t1, flair, adc, t1c) and write ``out_dir``.

    ``out_dir`` is checked before any work (:func:`.outputs.check_output_folder`): it may not
    be the case folder, hold it, or be the current directory, and files it already holds under
    the names this function writes (:func:`preprocess_output_names`) are only replaced with
    ``overwrite``. Nothing else in ``out_dir`` is touched. Everything is written into a hidden
    staging folder first and published at the end (``preprocess.json`` last), so a cancel or a
    crash never leaves a half-written output.

    Args:
        overwrite: replace this function's own files in an existing ``out_dir``.
        strict: plausibility warnings become errors (see :func:`preprocess_case`).
        backend: HD-BET's runtime (see :func:`preprocess_case`); ``preprocess.json`` records the one that ran.

    Returns:
        The :class:`PreprocessedCase` (``timings_s`` includes ``"write"`` and ``"total"``).

    Raises:
        OutputPathError: ``out_dir`` cannot be used (before any work).
        ImageValidationError: an input is unusable.
    """
    from ContrastAmplifierCommon.outputs import check_output_folder, staged_folder

    start = time.perf_counter()
    report = progress or null_progress
    inputs = find_case_inputs(case_dir, modalities)
    sources = [case_dir, *inputs.values()] + ([brain_mask] if isinstance(brain_mask, (str, os.PathLike)) else [])
    out = check_output_folder(out_dir, preprocess_output_names(list(inputs), qc), inputs=sources, overwrite=overwrite)
    if brain_mask is None:
        from .skullstrip import skull_strip_backend

        backend = skull_strip_backend(backend, device)
    case = preprocess_case(inputs, geometry, skull_strip_mode, device, brain_mask=brain_mask,
                           progress=SubProgress(report, 0.0, 0.95), cancel=cancel, strict=strict, backend=backend)
    check_cancel(cancel)
    report("write", 0.95, f"writing {out}")
    t0 = time.perf_counter()
    with staged_folder(out, last=MANIFEST_FILE) as tmp:
        skull = {"mode": skull_strip_mode, "device": device, **({"backend": backend} if brain_mask is None else {})}
        extra = {"inputs": {k: str(v) for k, v in inputs.items()}, "skull_strip": skull}
        case.write(tmp, extra)
        if qc:
            from .qc import write_qc_png

            write_qc_png(case, tmp / "qc.png")
        check_cancel(cancel)
        case.timings_s["write"] = time.perf_counter() - t0
        case.timings_s["total"] = time.perf_counter() - start
        # Rewrite the JSON with the final timings (still inside the staging folder).
        meta = json.loads((tmp / MANIFEST_FILE).read_text(encoding="utf-8"))
        meta["timings_s"] = {k: round(v, 3) for k, v in case.timings_s.items()}
        write_text_atomic(json.dumps(meta, indent=2), tmp / MANIFEST_FILE)
    report("done", 1.0, f"wrote {out}")
    return case
