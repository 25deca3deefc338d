"""Phantom acquisition geometry: head pose, per-sequence motion, native grids, resampling, bias field.

Convention (written into ``phantom.json``): ``world`` is the ICBM 2009a template space in LPS mm
(SimpleITK physical coordinates of the nilearn template). For every sequence a 4x4 matrix
``world_to_native_lps`` maps a world point to the physical (LPS, scanner) point where the same
anatomy lies in that sequence's native image: ``p_native = A @ [p_world, 1]``. The native image
is sampled as ``I(p_native) = truth(A^-1 p_native)``. ``A = M_sequence @ A_case``: a per-case head
pose and size (rotation, translation, per-axis scale) followed by per-sequence rigid motion.
The paper protocol's native grids are axial (identity direction), centred on the head in scanner
space; the clinical protocol (:mod:`.phantom_clinical`) plans oblique grids (a direction matrix),
thick slices with an optional gap (``slice_thickness`` < slice spacing) and its own field of view
per sequence. ``world_to_native_lps`` is exact for both: it maps to physical points, whatever the
grid's direction.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np
import SimpleITK as sitk

#: Native voxel sizes (mm) at 1 mm T1c: clinical protocols and paper Table 1 (T1c-vfa 1.2 mm,
#: ADC 4 mm slices); FLAIR 5 mm slices exercise slab partial volume.
NOMINAL_SPACING_MM: dict[str, tuple[float, float, float]] = {
    "t1": (1.0, 1.0, 1.0), "t1c_low": (1.0, 1.0, 1.0), "t1c": (1.0, 1.0, 1.0), "t1c_x4": (1.0, 1.0, 1.0),
    "flair": (1.0, 1.0, 5.0), "adc": (2.0, 2.0, 4.0), "t1c_vfa": (1.2, 1.2, 1.2),
}
#: Head pose ranges: rotation (deg), translation (mm), per-axis scale (subject head size).
CASE_ROTATION_DEG = 8.0
CASE_TRANSLATION_MM = 10.0
CASE_SCALE = (0.94, 1.06)
#: Per-sequence rigid motion between acquisitions.
MOTION_ROTATION_DEG = 2.0
MOTION_TRANSLATION_MM = 2.0
FOV_MARGIN_MM = 6.0
MAX_SUPERSAMPLING = 6


IDENTITY_DIRECTION: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


@dataclass(frozen=True)
class NativeGrid:
    """An image grid in scanner LPS coordinates (SimpleITK geometry).

    Attributes:
        size, spacing, origin: x-y-z voxel counts, voxel spacing (mm) and the LPS position of voxel 0.
        direction: 3x3 direction matrix, row-major (SimpleITK ``GetDirection`` order): its columns
            are the LPS unit vectors of the i, j, k axes. Identity = axial.
        slice_thickness: thickness (mm) of the slice profile along k when it differs from the
            slice spacing (2D multi-slice with a gap: spacing = thickness + gap); ``None`` = spacing.
    """

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...] = IDENTITY_DIRECTION
    slice_thickness: Optional[float] = None

    @property
    def oblique(self) -> bool:
        """True when the direction is not the identity (any non-axial or tilted grid)."""
        return tuple(self.direction) != IDENTITY_DIRECTION

    @property
    def plain(self) -> bool:
        """Identity direction and contiguous slices: the paper protocol's grids."""
        return not self.oblique and self.slice_thickness is None

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    @property
    def profile_mm(self) -> tuple[float, float, float]:
        """Extent each voxel averages (x, y, slice thickness): the spacing, except across a slice gap."""
        sx, sy, sz = self.spacing
        return sx, sy, (sz if self.slice_thickness is None else float(self.slice_thickness))

    def to_json(self) -> dict:
        if not self.oblique:
            direction = np.eye(3).ravel().tolist()
        else:
            direction = [round(float(v), 12) for v in self.direction]
        out = {"size_xyz": list(self.size), "spacing_mm": [round(s, 6) for s in self.spacing],
               "origin_lps": [round(o, 6) for o in self.origin], "direction": direction}
        if self.slice_thickness is not None:
            out["slice_thickness_mm"] = round(float(self.slice_thickness), 6)
            out["slice_gap_mm"] = round(float(self.spacing[2] - self.slice_thickness), 6)
        return out

    def index_to_physical(self, index_xyz: np.ndarray) -> np.ndarray:
        """LPS points (..., 3) of continuous indices (..., 3) in i, j, k order."""
        local = np.asarray(index_xyz, dtype=np.float64) * np.asarray(self.spacing)
        return np.asarray(self.origin) + local @ self.direction_matrix.T

    def physical_to_index(self, points_lps: np.ndarray) -> np.ndarray:
        """Continuous i, j, k indices (..., 3) of LPS points (..., 3)."""
        if not self.oblique:
            return (np.asarray(points_lps) - np.asarray(self.origin)) / np.asarray(self.spacing)
        local = (np.asarray(points_lps, dtype=np.float64) - np.asarray(self.origin)) @ self.direction_matrix
        return local / np.asarray(self.spacing)

    def contains(self, points_lps: np.ndarray, margin_mm: float) -> np.ndarray:
        if self.oblique:
            local = (np.asarray(points_lps, dtype=np.float64) - np.asarray(self.origin)) @ self.direction_matrix
            hi_local = (np.asarray(self.size) - 1) * np.asarray(self.spacing) - margin_mm
            return np.all((local >= margin_mm) & (local <= hi_local), axis=-1)
        lo = np.asarray(self.origin) + margin_mm
        hi = np.asarray(self.origin) + (np.asarray(self.size) - 1) * np.asarray(self.spacing) - margin_mm
        return np.all((points_lps >= lo) & (points_lps <= hi), axis=-1)

    def reference(self, dtype=sitk.sitkFloat32) -> sitk.Image:
        image = sitk.Image([int(s) for s in self.size], dtype)
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        if self.oblique:
            image.SetDirection(tuple(float(v) for v in self.direction))
        return image


def rotation_matrix(angles_deg: Sequence[float]) -> np.ndarray:
    """Rotation ``Rz @ Ry @ Rx`` from angles about x, y, z (degrees)."""
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def affine_about(centre: np.ndarray, rotation: np.ndarray, translation: np.ndarray,
                 scale: Sequence[float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """4x4 matrix of ``p -> centre + translation + R diag(scale) (p - centre)``."""
    linear = rotation @ np.diag(scale)
    out = np.eye(4)
    out[:3, :3] = linear
    out[:3, 3] = centre + translation - linear @ centre
    return out


def apply_affine(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 4x4 matrix to (..., 3) points."""
    return points @ matrix[:3, :3].T + matrix[:3, 3]


def sample_case_pose(rng: np.random.Generator, head_centre: np.ndarray) -> tuple[np.ndarray, dict]:
    """Per-case head pose and size in the scanner (world -> scanner), with its parameters."""
    angles = rng.uniform(-CASE_ROTATION_DEG, CASE_ROTATION_DEG, 3)
    shift = rng.uniform(-CASE_TRANSLATION_MM, CASE_TRANSLATION_MM, 3)
    scale = rng.uniform(*CASE_SCALE, 3)
    matrix = affine_about(head_centre, rotation_matrix(angles), shift, scale)
    return matrix, {"rotation_deg_xyz": angles.round(6).tolist(), "translation_mm": shift.round(6).tolist(),
                    "scale_xyz": scale.round(6).tolist(), "centre_lps_world": head_centre.round(6).tolist()}


def sample_motion(rng: np.random.Generator, centre_scanner: np.ndarray) -> tuple[np.ndarray, dict]:
    """Small rigid motion of the head between two acquisitions (scanner -> scanner)."""
    angles = rng.uniform(-MOTION_ROTATION_DEG, MOTION_ROTATION_DEG, 3)
    shift = rng.uniform(-MOTION_TRANSLATION_MM, MOTION_TRANSLATION_MM, 3)
    return affine_about(centre_scanner, rotation_matrix(angles), shift), {
        "rotation_deg_xyz": angles.round(6).tolist(), "translation_mm": shift.round(6).tolist()}


def _floats_xyz(values: Iterable[float]) -> tuple[float, float, float]:
    x, y, z = (float(v) for v in values)
    return x, y, z


def _ints_xyz(values: Iterable[float]) -> tuple[int, int, int]:
    x, y, z = (int(v) for v in values)
    return x, y, z


def sequence_spacing(name: str, spacing: float) -> tuple[float, float, float]:
    """Native voxel size: the nominal one, coarsened to at least ``spacing`` (``--spacing``)."""
    return _floats_xyz(max(spacing, s) for s in NOMINAL_SPACING_MM[name])


def plan_grid(centre_scanner: np.ndarray, fov_mm: np.ndarray, spacing: Sequence[float],
              size: Optional[Sequence[int]] = None) -> NativeGrid:
    """Axial grid centred on ``centre_scanner`` covering ``fov_mm`` (or of explicit ``size``)."""
    sp = np.asarray(spacing, dtype=np.float64)
    n = np.asarray(size, dtype=int) if size is not None else np.maximum(np.ceil(fov_mm / sp).astype(int), 2)
    origin = centre_scanner - (n - 1) / 2.0 * sp
    return NativeGrid(_ints_xyz(n), _floats_xyz(sp), _floats_xyz(origin))


def supersampling(spacing: Sequence[float], truth_spacing: float) -> tuple[int, int, int]:
    """Sub-samples per native voxel and axis so thick slices average their slab (partial volume)."""
    return _ints_xyz(min(MAX_SUPERSAMPLING, max(1, round(s / truth_spacing))) for s in spacing)


def resample_to_native(world: sitk.Image, grid: NativeGrid, world_to_native: np.ndarray,
                       interpolator: int = sitk.sitkLinear, sub: Sequence[int] = (1, 1, 1),
                       native_warp: Optional[sitk.Transform] = None) -> np.ndarray:
    """Sample a world-grid image on a native grid, averaging ``sub`` sub-samples per voxel.

    ``sub`` sub-samples spread over each voxel's profile (:attr:`NativeGrid.profile_mm`: across
    the slice thickness, not the gap). ``native_warp``, if given, maps each (distorted) native
    point to the undistorted native point that the scanner actually sampled there (EPI
    distortion); it is applied before ``inverse(world_to_native)``.

    Returns the (z, y, x) float32 array of the native grid.
    """
    if not grid.plain or native_warp is not None:
        return _resample_general(world, grid, world_to_native, interpolator, sub, native_warp)
    inverse = np.linalg.inv(world_to_native)
    transform = sitk.AffineTransform(3)
    transform.SetMatrix([float(v) for v in inverse[:3, :3].ravel()])
    transform.SetTranslation([float(v) for v in inverse[:3, 3]])
    sub = np.asarray(sub, dtype=int)
    sp = np.asarray(grid.spacing)
    fine_sp = sp / sub
    fine_origin = np.asarray(grid.origin) - sp / 2.0 + fine_sp / 2.0
    resampler = sitk.ResampleImageFilter()
    resampler.SetSize([int(v) for v in np.asarray(grid.size) * sub])
    resampler.SetOutputSpacing([float(v) for v in fine_sp])
    resampler.SetOutputOrigin([float(v) for v in fine_origin])
    resampler.SetOutputDirection(np.eye(3).ravel().tolist())
    resampler.SetTransform(transform)
    resampler.SetInterpolator(interpolator)
    resampler.SetDefaultPixelValue(0.0)
    resampler.SetOutputPixelType(world.GetPixelID())
    fine = sitk.GetArrayFromImage(resampler.Execute(world))
    if tuple(sub) == (1, 1, 1):
        return fine
    nx, ny, nz = grid.size
    blocks = fine.reshape(nz, sub[2], ny, sub[1], nx, sub[0])
    return blocks.mean(axis=(1, 3, 5), dtype=np.float32)


def _resample_general(world: sitk.Image, grid: NativeGrid, world_to_native: np.ndarray, interpolator: int,
                      sub: Sequence[int], native_warp: Optional[sitk.Transform]) -> np.ndarray:
    """:func:`resample_to_native` for oblique grids, slice gaps and warps: one resampling per
    through-slice sub-sample offset (the slab profile), in-plane sub-samples on a finer grid."""
    inverse = np.linalg.inv(world_to_native)
    affine = sitk.AffineTransform(3)
    affine.SetMatrix([float(v) for v in inverse[:3, :3].ravel()])
    affine.SetTranslation([float(v) for v in inverse[:3, 3]])
    # CompositeTransform applies its last transform first: native warp, then native -> world.
    transform: sitk.Transform = affine if native_warp is None else sitk.CompositeTransform([affine, native_warp])
    sub_arr = np.asarray(sub, dtype=int)
    sp = np.asarray(grid.spacing, dtype=np.float64)
    thickness = grid.profile_mm[2]
    direction = grid.direction_matrix
    fine_xy = sp[:2] / sub_arr[:2]
    nx, ny, nz = grid.size
    total = np.zeros((nz, ny * int(sub_arr[1]), nx * int(sub_arr[0])), dtype=np.float32)
    resampler = sitk.ResampleImageFilter()
    resampler.SetSize([nx * int(sub_arr[0]), ny * int(sub_arr[1]), nz])
    resampler.SetOutputSpacing([float(fine_xy[0]), float(fine_xy[1]), float(sp[2])])
    resampler.SetOutputDirection([float(v) for v in grid.direction])
    resampler.SetTransform(transform)
    resampler.SetInterpolator(interpolator)
    resampler.SetDefaultPixelValue(0.0)
    resampler.SetOutputPixelType(world.GetPixelID())
    for j in range(int(sub_arr[2])):
        dz = -thickness / 2.0 + (j + 0.5) * thickness / int(sub_arr[2]) if sub_arr[2] > 1 else 0.0
        shift = np.array([-sp[0] / 2.0 + fine_xy[0] / 2.0, -sp[1] / 2.0 + fine_xy[1] / 2.0, dz])
        resampler.SetOutputOrigin([float(v) for v in np.asarray(grid.origin) + direction @ shift])
        total += sitk.GetArrayFromImage(resampler.Execute(world)).astype(np.float32, copy=False)
    if sub_arr[2] > 1:
        total /= np.float32(sub_arr[2])
    if tuple(sub_arr[:2]) == (1, 1):
        return total
    blocks = total.reshape(nz, ny, int(sub_arr[1]), nx, int(sub_arr[0]))
    return blocks.mean(axis=(2, 4), dtype=np.float32)


def bias_field(grid: NativeGrid, centre_scanner: np.ndarray, coefficients: np.ndarray) -> np.ndarray:
    """Smooth multiplicative receive-coil bias, fixed in scanner space (so it moves with no head).

    ``exp(sum c_k m_k)`` over the 9 monomials of degree 1-2 in coordinates scaled by 100 mm.
    """
    if grid.oblique:
        return _bias_field_oblique(grid, centre_scanner, coefficients)
    axes = [(np.asarray(grid.origin[a]) + grid.spacing[a] * np.arange(grid.size[a]) - centre_scanner[a]) / 100.0
            for a in range(3)]
    x = axes[0].reshape(1, 1, -1)
    y = axes[1].reshape(1, -1, 1)
    z = axes[2].reshape(-1, 1, 1)
    terms = (x, y, z, x * x, y * y, z * z, x * y, x * z, y * z)
    log_field = np.zeros((grid.size[2], grid.size[1], grid.size[0]), dtype=np.float32)
    for c, term in zip(coefficients, terms):
        log_field += np.float32(c) * term.astype(np.float32)
    return np.exp(log_field)


def _bias_field_oblique(grid: NativeGrid, centre_scanner: np.ndarray, coefficients: np.ndarray) -> np.ndarray:
    """:func:`bias_field` on an oblique grid: scanner coordinates of every voxel centre."""
    d = grid.direction_matrix
    steps = [grid.spacing[a] * np.arange(grid.size[a], dtype=np.float64) / 100.0 for a in range(3)]
    shapes = [(1, 1, -1), (1, -1, 1), (-1, 1, 1)]
    coords = []
    for axis in range(3):  # LPS x, y, z of each voxel relative to the head centre, in 100 mm (float32)
        c = np.full((grid.size[2], grid.size[1], grid.size[0]), (grid.origin[axis] - centre_scanner[axis]) / 100.0,
                    dtype=np.float32)
        for k in range(3):
            c += (d[axis, k] * steps[k]).astype(np.float32).reshape(shapes[k])
        coords.append(c)
    x, y, z = coords
    log_field = np.zeros((grid.size[2], grid.size[1], grid.size[0]), dtype=np.float32)
    scratch = np.empty_like(log_field)
    for c_k, (a, b) in zip(coefficients, ((x, None), (y, None), (z, None), (x, x), (y, y), (z, z), (x, y), (x, z), (y, z))):
        if b is None:
            np.multiply(a, np.float32(c_k), out=scratch)
        else:
            np.multiply(a, b, out=scratch)
            scratch *= np.float32(c_k)
        log_field += scratch
    return np.exp(log_field, out=log_field)


def world_image(array_zyx: np.ndarray, origin: Sequence[float], spacing: float) -> sitk.Image:
    """Wrap a world-grid array as a SimpleITK image (identity direction, LPS)."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array_zyx))
    image.SetOrigin(tuple(float(o) for o in origin))
    image.SetSpacing((spacing,) * 3)
    return image


def native_image(array_zyx: np.ndarray, grid: NativeGrid) -> sitk.Image:
    """Wrap a native-grid array as a SimpleITK image with the grid's geometry."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array_zyx))
    image.SetOrigin(grid.origin)
    image.SetSpacing(grid.spacing)
    if grid.oblique:
        image.SetDirection(tuple(float(v) for v in grid.direction))
    return image
