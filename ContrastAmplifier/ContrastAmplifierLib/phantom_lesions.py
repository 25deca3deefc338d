"""Phantom lesions: sampling, rasterising (partial volume) and radiologist-style measurement.

Shapes follow PHANTOM.md "Lesions": metastases are ellipsoids (solid when small, ring with a
necrotic core when larger than about 10 mm, surrounding oedema), gliomas are irregular
(thresholded smooth noise inside an ellipsoid) with patchy or ring enhancement and large oedema.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np
from scipy import ndimage

from .phantom_anatomy import TemplateAnatomy, soft_inside

MAX_LESIONS = 25
#: Long axes (mm): 2-40 mm, small metastases to large gliomas; PHANTOM.md: metastases 2-30, gliomas 15-50 (capped at 40).
METASTASIS_LONG_MM = (2.0, 30.0)
GLIOMA_LONG_MM = (15.0, 40.0)
#: Enhancing tissue concentration at the standard dose, PHANTOM.md "Gadolinium" (mmol/L).
LESION_CONC_STD = (0.1, 0.4)
RING_THRESHOLD_MM = 10.0
GLIOMA_INFLATION = 1.28


@dataclass
class Lesion:
    """One lesion in world (template LPS) coordinates.

    Attributes:
        id: 1-based label.
        kind: "metastasis" or "glioma".
        pattern: "solid", "ring" or "patchy" enhancement.
        centre_lps: centre (mm).
        rotation: 3x3 matrix whose columns are the principal axes.
        semi_axes_mm: semi-axes along those columns, longest first.
        rim_mm: enhancing rim thickness (ring pattern) in mm, else 0.
        oedema_scale: oedema ellipsoid size relative to the lesion (1 = none).
        conc_standard_dose: gadolinium concentration (mmol/L) in enhancing tissue at 0.1 mmol/kg.
        noise_seed: seed of the glioma's irregularity noise.
    """

    id: int
    kind: str
    pattern: str
    centre_lps: np.ndarray
    rotation: np.ndarray
    semi_axes_mm: np.ndarray
    rim_mm: float
    oedema_scale: float
    conc_standard_dose: float
    noise_seed: int = 0

    def to_json(self) -> dict:
        c = [float(v) for v in self.centre_lps]
        return {
            "id": self.id, "kind": self.kind, "pattern": self.pattern,
            "centre_lps_world": [round(v, 4) for v in c],
            "centre_ras_world": [round(-c[0], 4), round(-c[1], 4), round(c[2], 4)],
            "rotation_lps": np.round(self.rotation, 6).tolist(),
            "semi_axes_mm": [round(float(v), 4) for v in self.semi_axes_mm],
            "long_axis_3d_mm": round(2 * float(self.semi_axes_mm[0]), 4),
            "rim_mm": round(float(self.rim_mm), 4),
            "oedema_scale": round(float(self.oedema_scale), 4),
            "conc_mmol_l_at_standard_dose": round(float(self.conc_standard_dose), 5),
        }


@dataclass
class LesionMaps:
    """Partial-volume maps on the world grid: enhancing tissue, necrosis, oedema, concentration."""

    enhancing: np.ndarray
    necrosis: np.ndarray
    oedema: np.ndarray
    conc_standard_dose: np.ndarray  # mmol/L in enhancing tissue at 0.1 mmol/kg
    owner: np.ndarray  # lesion id of the enhancing+necrotic body (0 = none)

    @property
    def body(self) -> np.ndarray:
        return self.enhancing + self.necrosis


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """Uniformly random 3D rotation (QR of a Gaussian matrix with sign fix)."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


@dataclass(frozen=True)
class LesionProfile:
    """How many lesions a case gets and how large its metastases are.

    Attributes:
        name: ``default`` (PHANTOM.md's mix, every test and benchmark) or ``small`` (for training:
            mostly metastases, more of them, long axes skewed below 10 mm, the lesions the paper's
            Table 5 is about).
        no_lesion, glioma: probabilities of a case without lesion and of a glioma case (the rest
            are metastases cases).
        mean_extra_metastases: a metastases case has ``1 + floor(Exponential(mean))`` lesions (at
            most :data:`MAX_LESIONS`).
        metastasis_long_mm: range of the metastases' long axes (log-uniform).
    """

    name: str
    no_lesion: float
    glioma: float
    mean_extra_metastases: float
    metastasis_long_mm: tuple[float, float]


#: The profiles by name. ``default`` draws exactly what the phantom always drew (same random
#: numbers, same bytes); ``small``: 2-20 mm log-uniform puts 70 % of the metastases below 10 mm
#: and 40 % below 5 mm (default: 48 % and 27 %), with about 7 per case instead of 5.
LESION_PROFILES = {
    "default": LesionProfile("default", 0.15, 0.25, 4.0, METASTASIS_LONG_MM),
    "small": LesionProfile("small", 0.05, 0.10, 6.0, (2.0, 20.0)),
}


def lesion_profile(name: str) -> LesionProfile:
    """The profile called ``name``; a clear error for another name."""
    if name not in LESION_PROFILES:
        raise ValueError(f"--lesions {name!r}: use one of {', '.join(LESION_PROFILES)}.")
    return LESION_PROFILES[name]


def sample_lesion_count(rng: np.random.Generator, profile: LesionProfile = LESION_PROFILES["default"]) -> tuple[str, int]:
    """Case type and lesion count (default: 15 % no lesion, 25 % glioma (1), 60 % metastases (1-25, skewed low))."""
    u = rng.uniform()
    if u < profile.no_lesion:
        return "none", 0
    if u < profile.no_lesion + profile.glioma:
        return "glioma", 1
    return "metastases", int(min(MAX_LESIONS, 1 + np.floor(rng.exponential(profile.mean_extra_metastases))))


def sample_lesion_shape(rng: np.random.Generator, kind: str, lesion_id: int,
                        profile: LesionProfile = LESION_PROFILES["default"]) -> Lesion:
    """Draw one lesion's shape and enhancement (centre set later by :func:`place_lesions`)."""
    lo, hi = profile.metastasis_long_mm if kind == "metastasis" else GLIOMA_LONG_MM
    long_mm = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
    a = long_mm / 2.0
    b = a * rng.uniform(0.6, 1.0)
    c = b * rng.uniform(0.7, 1.0)
    if kind == "metastasis":
        ring = long_mm > RING_THRESHOLD_MM and rng.uniform() < 0.85
        pattern = "ring" if ring else "solid"
        oedema = rng.uniform(1.4, 2.5) if long_mm > 5.0 else rng.uniform(1.0, 1.6)
    else:
        pattern = "ring" if rng.uniform() < 0.5 else "patchy"
        oedema = rng.uniform(1.8, 2.8)
    rim = float(min(rng.uniform(1.5, 3.5), 0.45 * c)) if pattern == "ring" else 0.0
    return Lesion(
        id=lesion_id, kind=kind, pattern=pattern, centre_lps=np.zeros(3), rotation=random_rotation(rng),
        semi_axes_mm=np.array([a, b, c]), rim_mm=rim, oedema_scale=float(oedema),
        conc_standard_dose=float(rng.uniform(*LESION_CONC_STD)), noise_seed=int(rng.integers(0, 2**31 - 1)),
    )


def place_lesions(rng: np.random.Generator, anatomy: TemplateAnatomy, depth_mm: np.ndarray, lesions: list[Lesion],
                  inside_fov) -> list[Lesion]:
    """Choose lesion centres inside the brain; metastases mostly at the grey/white junction.

    Args:
        inside_fov: callable ``(points_lps (N,3), margin_mm) -> bool mask`` telling whether a centre
            keeps the lesion inside the T1c field of view.

    Lesions that cannot be placed without overlapping others are dropped; ids are renumbered 1..n.
    """
    z, y, x = anatomy.axis_coordinates()
    junction = (anatomy.gm > 0.25) & (anatomy.wm > 0.25) & anatomy.brain
    parenchyma = ((anatomy.gm + anatomy.wm) > 0.6) & anatomy.brain
    deep_wm = (anatomy.wm > 0.6) & anatomy.brain
    placed: list[Lesion] = []
    for lesion in lesions:
        a = float(lesion.semi_axes_mm[0])
        if lesion.kind == "glioma":
            region, min_depth = deep_wm, 0.6 * a
        else:
            region, min_depth = (junction if rng.uniform() < 0.8 else parenchyma), min(0.6 * a + 1.0, 12.0)
        idx = np.flatnonzero(region & (depth_mm >= min_depth))
        if idx.size == 0:
            continue
        for _ in range(60):
            k, j, i = np.unravel_index(int(idx[rng.integers(idx.size)]), anatomy.shape)
            centre = np.array([x[0, 0, i], y[0, j, 0], z[k, 0, 0]], dtype=np.float64)
            centre += rng.uniform(-0.5, 0.5, size=3) * anatomy.spacing
            if not inside_fov(centre[None, :], a + 2.0)[0]:
                continue
            if all(np.linalg.norm(centre - o.centre_lps) > a + float(o.semi_axes_mm[0]) + 2.0 for o in placed):
                lesion.centre_lps = centre
                lesion.id = len(placed) + 1
                placed.append(lesion)
                break
    return placed


def _bbox(anatomy: TemplateAnatomy, centre: np.ndarray, radius: float) -> tuple[slice, ...]:
    lo = np.floor((centre - radius - np.asarray(anatomy.origin)) / anatomy.spacing).astype(int)
    hi = np.ceil((centre + radius - np.asarray(anatomy.origin)) / anatomy.spacing).astype(int) + 1
    lo = np.maximum(lo, 0)
    hi = np.minimum(hi, np.array(anatomy.shape)[::-1])
    return tuple(slice(int(lo[a]), int(hi[a])) for a in (2, 1, 0))


def _normalised_radius(anatomy: TemplateAnatomy, sl: tuple[slice, ...], lesion: Lesion) -> tuple[np.ndarray, np.ndarray]:
    """Ellipsoidal radius rho (1 on the surface) and Euclidean distance |u| (mm) on a bounding box."""
    h = anatomy.spacing
    o = np.asarray(anatomy.origin)
    zz = (o[2] + h * np.arange(sl[0].start, sl[0].stop) - lesion.centre_lps[2]).reshape(-1, 1, 1)
    yy = (o[1] + h * np.arange(sl[1].start, sl[1].stop) - lesion.centre_lps[1]).reshape(1, -1, 1)
    xx = (o[0] + h * np.arange(sl[2].start, sl[2].stop) - lesion.centre_lps[0]).reshape(1, 1, -1)
    r = lesion.rotation
    rho2 = np.zeros(np.broadcast_shapes(zz.shape, yy.shape, xx.shape), dtype=np.float64)
    for axis in range(3):
        u = r[0, axis] * xx + r[1, axis] * yy + r[2, axis] * zz
        rho2 += (u / lesion.semi_axes_mm[axis]) ** 2
    dist = np.sqrt(xx ** 2 + yy ** 2 + zz ** 2)
    return np.sqrt(rho2), dist


def _shell_fraction(rho: np.ndarray, dist: np.ndarray, scale: float, h: float) -> np.ndarray:
    """Fraction inside the lesion ellipsoid scaled by ``scale`` (approximate signed distance)."""
    local_radius = np.where(rho > 1e-6, dist / np.maximum(rho, 1e-6), 0.0)
    signed = (rho / scale - 1.0) * local_radius * scale
    return soft_inside(signed, 0.0, h)


def _smooth_noise(seed: int, shape: tuple[int, ...], sigma_vox: float) -> np.ndarray:
    noise = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    noise = ndimage.gaussian_filter(noise, sigma=sigma_vox)
    return noise / max(float(noise.std()), 1e-6)


def lesion_components(anatomy: TemplateAnatomy, lesion: Lesion) -> tuple[tuple[slice, ...], dict[str, np.ndarray]]:
    """Enhancing / necrotic / oedema fractions and concentration factor of one lesion on its bounding box."""
    h = anatomy.spacing
    a = float(lesion.semi_axes_mm[0])
    sl = _bbox(anatomy, lesion.centre_lps, a * lesion.oedema_scale * 1.3 + 2 * h)
    rho, dist = _normalised_radius(anatomy, sl, lesion)
    shape = rho.shape
    conc = np.ones(shape, dtype=np.float32)
    if lesion.kind == "glioma":
        n1 = _smooth_noise(lesion.noise_seed, shape, sigma_vox=max(4.0 / h, 1.0))
        n2 = _smooth_noise(lesion.noise_seed + 1, shape, sigma_vox=max(3.0 / h, 1.0))
        # Irregular outline kept inside the drawn ellipsoid (long axis <= 40 mm): the noise moves the
        # surface between 1/1.28 and 1/1.28/0.78 ~ 1.0 of the semi-axes.
        rho_irregular = rho * GLIOMA_INFLATION * (1.0 + 0.22 * np.clip(n1, -1.0, 1.0))
        body = _shell_fraction(rho_irregular, dist, 1.0, h)
        if lesion.pattern == "ring":
            inner = 1.0 - lesion.rim_mm / a
            necrosis = _shell_fraction(rho_irregular, dist, inner, h)
        else:
            necrosis = np.zeros(shape, dtype=np.float32)
        enhancing = body - necrosis
        # Patchy enhancement: non-enhancing tumour counts as oedema-like (T2-bright) tissue.
        patch = np.clip(0.5 + 0.5 * n2, 0.0, 1.0) if lesion.pattern == "patchy" else np.ones(shape, np.float32)
        nonenh = enhancing * (patch < 0.35)
        enhancing = enhancing - nonenh
        conc = np.clip(0.4 + 0.8 * patch, 0.4, 1.2).astype(np.float32)
        oedema = np.clip(_shell_fraction(rho * (1.0 + 0.15 * n1), dist, lesion.oedema_scale, h) - body, 0, 1) + nonenh
    else:
        body = _shell_fraction(rho, dist, 1.0, h)
        if lesion.pattern == "ring":
            necrosis = _shell_fraction(rho, dist, 1.0 - lesion.rim_mm / a, h)
        else:
            necrosis = np.zeros(shape, dtype=np.float32)
        enhancing = body - necrosis
        oedema = np.clip(_shell_fraction(rho, dist, lesion.oedema_scale, h) - body, 0, 1) if lesion.oedema_scale > 1.0 \
            else np.zeros(shape, np.float32)
    brain = anatomy.brain[sl].astype(np.float32)
    parenchyma = np.clip(anatomy.wm[sl] + anatomy.gm[sl], 0.0, 1.0)
    wm_share = anatomy.wm[sl] / np.maximum(parenchyma, 1e-3)
    return sl, {
        "enhancing": (enhancing * brain).astype(np.float32),
        "necrosis": (necrosis * brain).astype(np.float32),
        # Oedema spreads along white matter (finger-like), not into CSF.
        "oedema": (oedema * parenchyma * np.clip(0.3 + wm_share, 0, 1)).astype(np.float32),
        "conc": conc,
    }


def rasterise_lesions(anatomy: TemplateAnatomy, lesions: Sequence[Lesion]) -> LesionMaps:
    """Add every lesion's partial-volume components into full world-grid maps."""
    shape = anatomy.shape
    maps = LesionMaps(
        enhancing=np.zeros(shape, np.float32), necrosis=np.zeros(shape, np.float32), oedema=np.zeros(shape, np.float32),
        conc_standard_dose=np.zeros(shape, np.float32), owner=np.zeros(shape, np.uint8),
    )
    for lesion in lesions:
        sl, comp = lesion_components(anatomy, lesion)
        maps.enhancing[sl] += comp["enhancing"]
        maps.necrosis[sl] += comp["necrosis"]
        maps.oedema[sl] = np.maximum(maps.oedema[sl], comp["oedema"])
        conc = comp["conc"] * lesion.conc_standard_dose
        maps.conc_standard_dose[sl] = np.where(comp["enhancing"] > 0, conc, maps.conc_standard_dose[sl])
        body = comp["enhancing"] + comp["necrosis"]
        maps.owner[sl] = np.where(body > 0, np.uint8(lesion.id), maps.owner[sl])
    total = np.clip(maps.enhancing + maps.necrosis, 0.0, 1.0)
    maps.enhancing = np.minimum(maps.enhancing, total)
    maps.necrosis = total - maps.enhancing
    maps.oedema = np.minimum(maps.oedema, 1.0 - total)
    return maps


# ---------------------------------------------------------------------------------------------
# Radiologist-style measurement on the label map (lesions.json)
# ---------------------------------------------------------------------------------------------

def lps_to_ras(point: Sequence[float]) -> list[float]:
    """SimpleITK physical points are LPS; Slicer and lesions.json use RAS: (-x, -y, z)."""
    return [-float(point[0]), -float(point[1]), float(point[2])]


def measure_lesion(labels_zyx: np.ndarray, lesion_id: int, origin: Sequence[float], spacing: Sequence[float]
                   ) -> Optional[dict]:
    """Long and short axes of a lesion on its largest axial section, as a radiologist draws them.

    The grid must have an identity direction (axial slices = constant z). The long axis is the
    largest distance between voxel centres of the section, extended by half a voxel at both ends;
    the short axis is the widest chord perpendicular to it. The centre is the section's centroid
    (snapped to the nearest lesion voxel if the centroid falls outside an irregular lesion).

    Returns:
        ``lesions.json`` entry without ``kind`` (RAS mm), or ``None`` if the label is absent.
    """
    counts = np.bincount(np.nonzero(labels_zyx == lesion_id)[0], minlength=labels_zyx.shape[0])
    if counts.sum() == 0:
        return None
    k = int(np.argmax(counts))
    jj, ii = np.nonzero(labels_zyx[k] == lesion_id)
    sx, sy, sz = (float(s) for s in spacing)
    pts = np.stack([origin[0] + sx * ii, origin[1] + sy * jj], axis=1).astype(np.float64)
    z = float(origin[2] + sz * k)
    if len(pts) > 1:
        d2 = ((pts[:, None, :] - pts[None, :, :]) ** 2).sum(-1)
        a, b = np.unravel_index(int(np.argmax(d2)), d2.shape)
        p1, p2 = pts[a], pts[b]
    else:
        p1 = p2 = pts[0]
    u = p2 - p1
    u = u / np.linalg.norm(u) if np.linalg.norm(u) > 0 else np.array([1.0, 0.0])
    v = np.array([-u[1], u[0]])
    half = 0.5 * (abs(u[0]) * sx + abs(u[1]) * sy)
    half_v = 0.5 * (abs(v[0]) * sx + abs(v[1]) * sy)
    l1, l2 = p1 - half * u, p2 + half * u
    long_mm = float(np.linalg.norm(l2 - l1))
    s = (pts - p1) @ u
    t = (pts - p1) @ v
    bins = np.rint(s / min(sx, sy)).astype(int)
    best = (-1.0, 0.0, 0.0, 0.0)
    for bval in np.unique(bins):
        sel = bins == bval
        extent = float(t[sel].max() - t[sel].min())
        if extent > best[0]:
            best = (extent, float(s[sel].mean()), float(t[sel].min()), float(t[sel].max()))
    _, s_mid, t_lo, t_hi = best
    t_lo, t_hi = t_lo - half_v, t_hi + half_v
    if t_hi - t_lo > long_mm:  # a chord cannot exceed the largest diameter
        excess = (t_hi - t_lo - long_mm) / 2.0
        t_lo, t_hi = t_lo + excess, t_hi - excess
    q1 = p1 + s_mid * u + t_lo * v
    q2 = p1 + s_mid * u + t_hi * v
    centroid = pts.mean(axis=0)
    ci = np.rint((centroid - np.asarray(origin[:2])) / np.array([sx, sy])).astype(int)
    inside = (0 <= ci[1] < labels_zyx.shape[1] and 0 <= ci[0] < labels_zyx.shape[2]
              and labels_zyx[k, ci[1], ci[0]] == lesion_id)
    centre = pts[np.argmin(((pts - centroid) ** 2).sum(1))] if not inside else origin[:2] + ci * np.array([sx, sy])

    def ras(p2d: np.ndarray) -> list[float]:
        return [round(v, 4) for v in lps_to_ras([float(p2d[0]), float(p2d[1]), z])]

    long_axis = [ras(l1), ras(l2)]
    short_axis = [ras(q1), ras(q2)]
    return {
        "id": int(lesion_id),
        "center_ras": ras(np.asarray(centre, dtype=np.float64)),
        "long_axis_ras": long_axis,
        "short_axis_ras": short_axis,
        "long_mm": round(float(np.linalg.norm(np.subtract(*long_axis))), 3),
        "short_mm": round(float(np.linalg.norm(np.subtract(*short_axis))), 3),
    }
