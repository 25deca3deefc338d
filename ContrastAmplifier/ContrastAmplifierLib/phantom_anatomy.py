"""Phantom anatomy: ICBM 2009a tissue maps (nilearn), a scalp/skull shell, vessels, choroid plexus.

All arrays are in SimpleITK order ``(z, y, x)`` on the "world" grid: the template's own space in
LPS millimetres with an identity direction (nilearn's RAS arrays are flipped on x and y), cropped
to the brain plus room for the shell. Tissue maps are partial-volume fractions in [0, 1].
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

#: Room left around the brain mask for extra-axial CSF + skull + scalp (mm), PHANTOM.md layers.
SHELL_MARGIN_MM = 26.0


@dataclass(frozen=True)
class TemplateAnatomy:
    """Brain tissue fractions of the ICBM 2009a template on the world grid.

    Attributes:
        wm, gm, csf: partial-volume fractions, (z, y, x) float32, ``wm + gm + csf == brain``.
        brain: brain mask (bool).
        origin: LPS physical position (mm) of voxel (0, 0, 0), x-y-z order.
        spacing: voxel size (mm).
        resolution: nilearn template resolution used (1 or 2 mm).
    """

    wm: np.ndarray
    gm: np.ndarray
    csf: np.ndarray
    brain: np.ndarray
    origin: tuple[float, float, float]
    spacing: float
    resolution: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.brain.shape)

    def axis_coordinates(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """1D LPS coordinates (mm) of the grid along z, y, x (broadcastable (Z,1,1), (1,Y,1), (1,1,X))."""
        nz, ny, nx = self.shape
        s = self.spacing
        z = (self.origin[2] + s * np.arange(nz, dtype=np.float32)).reshape(-1, 1, 1)
        y = (self.origin[1] + s * np.arange(ny, dtype=np.float32)).reshape(1, -1, 1)
        x = (self.origin[0] + s * np.arange(nx, dtype=np.float32)).reshape(1, 1, -1)
        return z, y, x


def _nilearn_lps(loader, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """Load a nilearn MNI152 image as a (z, y, x) LPS array with identity direction; returns (array, origin)."""
    img = loader(resolution=resolution)
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.allclose(affine[:3, :3], np.diag(np.diag(affine[:3, :3]))) or np.any(np.diag(affine)[:3] <= 0):
        raise RuntimeError(f"unexpected nilearn template affine {affine.tolist()}; expected a positive diagonal (RAS).")
    data = np.asarray(img.dataobj, dtype=np.float32)  # (i, j, k) = RAS x, y, z
    data = data[::-1, ::-1, :]  # x_LPS = -x_RAS, y_LPS = -y_RAS
    spacing = np.diag(affine)[:3]
    shape = np.array(data.shape)
    ras_last = affine[:3, 3] + spacing * (shape - 1)
    origin = np.array([-ras_last[0], -ras_last[1], affine[2, 3]])
    return np.ascontiguousarray(data.transpose(2, 1, 0)), origin


@functools.lru_cache(maxsize=2)
def load_template_anatomy(resolution: int = 1) -> TemplateAnatomy:
    """ICBM 2009a GM/WM/brain mask from nilearn (offline), CSF = brain mask - GM - WM.

    The result is cropped to the brain's bounding box plus :data:`SHELL_MARGIN_MM` (padded where
    the template's field of view is too tight, e.g. below the cerebellum).

    Args:
        resolution: 1 or 2 (mm), nilearn's ``resolution`` argument.
    """
    if resolution not in (1, 2):
        raise ValueError(f"template resolution must be 1 or 2 mm (nilearn ships those), got {resolution}.")
    from nilearn import datasets

    # nilearn's resolution=2 resamples the 1 mm files on every call (~1.7 s each); averaging 2x2x2
    # blocks of the 1 mm maps gives the same 2 mm maps several times faster.
    mask, origin = _nilearn_lps(datasets.load_mni152_brain_mask, 1)
    gm, _ = _nilearn_lps(datasets.load_mni152_gm_template, 1)
    wm, _ = _nilearn_lps(datasets.load_mni152_wm_template, 1)
    if resolution == 2:
        mask, gm, wm = (block_mean(a, 2) for a in (mask, gm, wm))
        origin = origin + 0.5
    brain = mask >= 0.5
    gm, wm, csf = derive_tissue_fractions(gm, wm, brain)
    margin = int(np.ceil(SHELL_MARGIN_MM / resolution))
    idx = np.nonzero(brain)
    lo = [int(i.min()) - margin for i in idx]
    hi = [int(i.max()) + margin + 1 for i in idx]

    def crop(a: np.ndarray) -> np.ndarray:
        pad = [(max(0, -l), max(0, h - n)) for l, h, n in zip(lo, hi, a.shape)]
        a = np.pad(a, pad)
        sl = tuple(slice(l + p[0], h + p[0]) for l, h, p in zip(lo, hi, pad))
        return np.ascontiguousarray(a[sl])

    # origin is x-y-z, lo is z-y-x
    new_origin = (float(origin[0] + resolution * lo[2]), float(origin[1] + resolution * lo[1]),
                  float(origin[2] + resolution * lo[0]))
    return TemplateAnatomy(wm=crop(wm), gm=crop(gm), csf=crop(csf), brain=crop(brain), origin=new_origin,
                           spacing=float(resolution), resolution=resolution)


def block_mean(array: np.ndarray, factor: int) -> np.ndarray:
    """Average ``factor``^3 blocks (zero-padding the far edges to a multiple of ``factor``)."""
    pad = [(0, (-n) % factor) for n in array.shape]
    a = np.pad(array, pad)
    z, y, x = (n // factor for n in a.shape)
    return a.reshape(z, factor, y, factor, x, factor).mean(axis=(1, 3, 5), dtype=np.float32)


def derive_tissue_fractions(gm: np.ndarray, wm: np.ndarray, brain: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Clean GM/WM probabilities and derive CSF (nilearn ships no CSF map).

    GM and WM are clipped to [0, 1], zeroed outside the brain mask and rescaled where they sum to
    more than 1; ``CSF = brain - GM - WM`` is therefore in [0, 1] everywhere.
    """
    gm = np.clip(gm, 0.0, 1.0).astype(np.float32) * brain
    wm = np.clip(wm, 0.0, 1.0).astype(np.float32) * brain
    total = gm + wm
    scale = np.where(total > 1.0, 1.0 / np.maximum(total, 1e-6), 1.0).astype(np.float32)
    gm *= scale
    wm *= scale
    csf = np.clip(brain.astype(np.float32) - gm - wm, 0.0, 1.0)
    return gm, wm, csf


@functools.lru_cache(maxsize=2)
def head_distance_maps(resolution: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Signed distance (mm) to the intracranial surface (negative inside) and depth inside the brain.

    The intracranial volume is the brain mask smoothed (sulci filled) and slightly dilated.
    """
    anatomy = load_template_anatomy(resolution)
    if resolution == 1:
        # Distances are smooth: compute them on the 2 mm grid (8x fewer voxels) and interpolate.
        # The 1 mm grid's voxel (0,0,0) sits 0.5 mm before the 2 mm one's, hence the offset.
        coarse = load_template_anatomy(2)
        signed2, depth2 = head_distance_maps(2)
        offset = (np.asarray(anatomy.origin) - np.asarray(coarse.origin))[::-1] / coarse.spacing
        return _upsample(signed2, anatomy.shape, offset), _upsample(depth2, anatomy.shape, offset)
    h = anatomy.spacing
    smooth = ndimage.gaussian_filter(anatomy.brain.astype(np.float32), sigma=2.5 / h)
    icv = ndimage.binary_fill_holes(smooth > 0.25)
    outside = ndimage.distance_transform_edt(~icv, sampling=h).astype(np.float32)
    inside = ndimage.distance_transform_edt(icv, sampling=h).astype(np.float32)
    depth = ndimage.distance_transform_edt(anatomy.brain, sampling=h).astype(np.float32)
    return outside - inside, depth


def _upsample(coarse: np.ndarray, shape: tuple[int, int, int], offset_vox: np.ndarray) -> np.ndarray:
    """Linear interpolation of a 2 mm (z, y, x) map onto a 1 mm grid starting at ``offset_vox`` (2 mm voxels)."""
    axes = [offset_vox[a] + 0.5 * np.arange(shape[a]) for a in range(3)]
    out = coarse
    for a in range(3):  # separable: one axis at a time keeps it fast and low on memory
        pos = np.clip(axes[a], 0, coarse.shape[a] - 1)
        lo = np.minimum(np.floor(pos).astype(int), coarse.shape[a] - 2)
        w = (pos - lo).astype(np.float32)
        shape_w = [1, 1, 1]
        shape_w[a] = -1
        w = w.reshape(shape_w)
        out = np.take(out, lo, axis=a) * (1 - w) + np.take(out, lo + 1, axis=a) * w
    return np.ascontiguousarray(out, dtype=np.float32)


def soft_inside(distance_mm: np.ndarray, radius_mm: float, voxel_mm: float) -> np.ndarray:
    """Partial-volume fraction of a voxel whose centre lies ``distance_mm`` from a centre/surface.

    A linear ramp one voxel wide around ``radius_mm``: 1 well inside, 0 well outside.
    """
    out = np.asarray(distance_mm, dtype=np.float32) * np.float32(-1.0 / voxel_mm)
    out += np.float32(radius_mm / voxel_mm + 0.5)
    return np.clip(out, 0.0, 1.0, out=out)


def head_shell(signed_mm: np.ndarray, brain: np.ndarray, csf_mm: float, skull_mm: float, scalp_mm: float,
               voxel_mm: float) -> dict[str, np.ndarray]:
    """Extra-axial CSF, skull and scalp-fat layers around the intracranial surface (PHANTOM.md table).

    Returns fractions ``{"csf": ..., "skull": ..., "fat": ...}`` that are zero inside the brain mask.
    """
    outside = (~brain).astype(np.float32)
    b1 = soft_inside(signed_mm, csf_mm, voxel_mm)
    b2 = soft_inside(signed_mm, csf_mm + skull_mm, voxel_mm)
    b3 = soft_inside(signed_mm, csf_mm + skull_mm + scalp_mm, voxel_mm)
    return {"csf": b1 * outside, "skull": (b2 - b1) * outside, "fat": (b3 - b2) * outside}


def dural_sinuses(anatomy: TemplateAnatomy, signed_mm: np.ndarray, csf_mm: float, width_mm: float) -> np.ndarray:
    """Superior sagittal and transverse sinuses: bands of blood in the extra-axial space.

    The superior sagittal sinus runs along the midline (x = 0) above the AC level and behind it;
    the transverse sinuses run laterally along the occipital bone at z about -8 mm (MNI).
    """
    z, y, x = anatomy.axis_coordinates()
    h = anatomy.spacing
    band = ((signed_mm > -2.0) & (signed_mm < csf_mm + 0.5) & ~anatomy.brain).astype(np.float32)
    sagittal = soft_inside(np.abs(x), width_mm / 2.0, h) * ((z > -5.0) | (y > 55.0))
    transverse = soft_inside(np.abs(z + 8.0), width_mm / 2.0, h) * (y > 60.0)
    return np.clip(np.maximum(sagittal, transverse) * band, 0.0, 1.0).astype(np.float32)


def _points_to_index(anatomy: TemplateAnatomy, points_lps: np.ndarray) -> np.ndarray:
    return np.rint((points_lps - np.asarray(anatomy.origin)) / anatomy.spacing).astype(int)[..., ::-1]


def tube_fraction(anatomy: TemplateAnatomy, curve_lps: np.ndarray, radius_mm: float) -> tuple[tuple[slice, ...], np.ndarray]:
    """Partial-volume fraction of a tube of ``radius_mm`` around a polyline, on its bounding box.

    Returns ``(slices, fraction)`` so the caller can add it into a full-size map.
    """
    from scipy.spatial import cKDTree

    h = anatomy.spacing
    pad = radius_mm + 2 * h
    lo = _points_to_index(anatomy, curve_lps.min(axis=0) - pad)
    hi: np.ndarray = _points_to_index(anatomy, curve_lps.max(axis=0) + pad) + 1
    lo = np.maximum(lo, 0)
    hi = np.minimum(hi, anatomy.shape)
    sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    zz, yy, xx = np.meshgrid(*[np.arange(s.start, s.stop) for s in sl], indexing="ij")
    pts = np.stack([xx, yy, zz], axis=-1).reshape(-1, 3) * h + np.asarray(anatomy.origin)
    dist, _ = cKDTree(curve_lps).query(pts, distance_upper_bound=pad)
    dist = np.where(np.isfinite(dist), dist, 1e3).reshape(zz.shape)
    return sl, soft_inside(dist, radius_mm, h)


def random_curve(rng: np.random.Generator, start: np.ndarray, end: np.ndarray, bend_mm: float, step_mm: float = 0.5) -> np.ndarray:
    """A quadratic Bezier curve from ``start`` to ``end`` bent by up to ``bend_mm``, sampled every ``step_mm``."""
    control = (start + end) / 2.0 + rng.uniform(-bend_mm, bend_mm, size=3)
    n = max(2, int(np.ceil(np.linalg.norm(end - start) / step_mm)) + 1)
    t = np.linspace(0.0, 1.0, n)[:, None]
    return (1 - t) ** 2 * start + 2 * (1 - t) * t * control + t ** 2 * end


def choroid_plexus(anatomy: TemplateAnatomy, rng: np.random.Generator, radius_mm: float) -> np.ndarray:
    """Enhancing choroid-plexus blobs in the atria of both lateral ventricles (CSF-filled).

    Targets the trigones at about (+-28, 40, 14) mm LPS; each blob replaces CSF only.
    """
    z, y, x = anatomy.axis_coordinates()
    h = anatomy.spacing
    out = np.zeros(anatomy.shape, dtype=np.float32)
    ventricle = (anatomy.csf > 0.6) & anatomy.brain
    for side in (-1.0, 1.0):
        target = np.array([side * 28.0, 40.0, 14.0]) + rng.uniform(-3, 3, size=3)
        d2 = (x - target[0]) ** 2 + (y - target[1]) ** 2 + (z - target[2]) ** 2
        candidates = np.where(ventricle & (d2 < 20.0 ** 2), d2, np.inf)
        flat = int(np.argmin(candidates))
        if not np.isfinite(candidates.flat[flat]):
            continue
        k, j, i = np.unravel_index(flat, anatomy.shape)
        centre = np.array([x[0, 0, i], y[0, j, 0], z[k, 0, 0]])
        dist = np.sqrt((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2)
        out = np.maximum(out, soft_inside(dist, radius_mm, h))
    return out * anatomy.csf
