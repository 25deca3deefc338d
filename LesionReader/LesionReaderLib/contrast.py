"""Contrast metrics CNR, LBR and CEP per case (paper, "Performance metrics" and Table 4).

    CNR = (SI_lesion - SI_brain) / SD_brain
    LBR = SI_lesion / SI_brain
    CEP = (SI_lesion - SI_lesion_pre) / SI_lesion_pre        (reported in %, as in Table 4)

- Lesion ROI: "the parallelograms built from the reference long and short axes"; pooled over
  all reference lesions of the case. Here the parallelogram is the one bounded by the two lines
  parallel to the short axis through the long-axis end points and the two lines parallel to the
  long axis through the short-axis end points (the four end points lie on its sides; when the
  axes bisect each other it is centred on their crossing;
  :meth:`.geometry.LesionGeometry.parallelogram`). It lies in the plane of the two axes
  and is voxelised on each image's own grid as a one-voxel-thick digital plane: every voxel
  column along the grid axis closest to the plane normal contributes the voxel whose centre is
  nearest to the plane, when that column crosses the plane inside the parallelogram.
- Healthy-brain ROI: a label volume given in the study (paper: drawn by A.B., reviewed by
  S.A.), or, when none is given, an automatic one (deviation from the paper): the brain mask
  minus a ball of radius (long axis / 2 + margin) around every reference lesion and minus the
  lesion label volume dilated by the margin when one is available.
- SI_lesion_pre: mean of the pre-contrast T1 in the same lesion ROI, voxelised on its grid.

Coordinates: lesion points are RAS millimetres (3D Slicer); SimpleITK physical points are LPS,
so RAS (x, y, z) is LPS (-x, -y, z).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import SimpleITK as sitk
from ContrastAmplifierLib.metrics import contrast_metrics  # the paper's formulae, shared with the demo

from .geometry import LesionGeometry, LesionGeometryError

PathLike = Union[str, os.PathLike]

#: Default margin (mm) added around lesions when building the automatic healthy-brain ROI.
DEFAULT_BRAIN_MARGIN_MM = 5.0


class ContrastInputError(ValueError):
    """A contrast-metric input is unusable; the message names it and the fix."""


LesionAxes = LesionGeometry  # old public name, kept: LesionAxes(long_axis, short_axis, lesion_id) still builds one


def ras_to_continuous_index(image: sitk.Image, points_ras: np.ndarray) -> np.ndarray:
    """Map RAS mm points (N, 3) to continuous voxel indices (N, 3) in (i, j, k) = (x, y, z) order."""
    pts = np.atleast_2d(np.asarray(points_ras, dtype=float)).copy()
    pts[:, :2] *= -1.0  # RAS -> LPS
    origin = np.array(image.GetOrigin())
    spacing = np.array(image.GetSpacing())
    direction = np.array(image.GetDirection()).reshape(3, 3)
    # LPS = origin + direction @ (spacing * index)
    return (np.linalg.solve(direction, (pts - origin).T).T) / spacing


def parallelogram_mask(image: sitk.Image, lesions: Sequence[LesionGeometry]) -> np.ndarray:
    """Voxelise the lesions' axis parallelograms on the grid of ``image`` (pooled, union).

    Paper, "Performance metrics": lesion ROIs are the parallelograms built from the reference
    long and short axes (:meth:`.geometry.LesionGeometry.parallelogram`, built here in the
    image's continuous voxel indices). See the module docstring for the voxelisation.

    Args:
        image: grid on which to voxelise (any origin, spacing, direction).
        lesions: reference lesions of one case.

    Returns:
        Boolean array in SimpleITK's NumPy order (z, y, x), True inside any parallelogram.

    Raises:
        ContrastInputError: degenerate axes (zero length or parallel).
    """
    size = np.array(image.GetSize())  # (x, y, z)
    mask = np.zeros(size[::-1], dtype=bool)
    for lesion in lesions:
        try:
            roi = lesion.parallelogram(lambda pts: ras_to_continuous_index(image, pts))
        except LesionGeometryError as exc:
            raise ContrastInputError(f"Lesion {lesion.lesion_id!r}: {exc}") from None
        corners = roi.corners()
        lo = np.maximum(np.floor(corners.min(axis=0)) - 1, 0).astype(int)
        hi = np.minimum(np.ceil(corners.max(axis=0)) + 1, size - 1).astype(int)
        if np.any(hi < lo):
            continue  # entirely outside this grid
        grids = np.meshgrid(*[np.arange(lo[d], hi[d] + 1) for d in range(3)], indexing="ij")
        k = np.stack([g.ravel() for g in grids], axis=1).astype(float)
        r = k - roi.origin
        m = roi.normal
        dom = int(np.argmax(np.abs(m)))
        # Signed offset along the dominant grid axis from the voxel centre to the plane.
        t = (r @ m) / m[dom]
        on_plane = (t >= -0.5) & (t < 0.5)
        proj = r.copy()
        proj[:, dom] -= t
        inside = on_plane & roi.covers(proj, from_origin=True)
        idx = k[inside].astype(int)
        mask[idx[:, 2], idx[:, 1], idx[:, 0]] = True
    return mask


def _on_grid(label: sitk.Image, reference: sitk.Image) -> sitk.Image:
    same = (
        label.GetSize() == reference.GetSize()
        and np.allclose(label.GetOrigin(), reference.GetOrigin(), atol=1e-4)
        and np.allclose(label.GetSpacing(), reference.GetSpacing(), atol=1e-6)
        and np.allclose(label.GetDirection(), reference.GetDirection(), atol=1e-6)
    )
    if same:
        return label
    return sitk.Resample(label, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, label.GetPixelID())


def _read(path_or_image: Union[PathLike, sitk.Image], name: str) -> sitk.Image:
    if isinstance(path_or_image, sitk.Image):
        return path_or_image
    path = Path(path_or_image)
    if not path.exists():
        raise ContrastInputError(f"{name} volume not found: {path}. Fix the path in study.json (or volumes.csv).")
    from .study import StudyError, read_volume

    try:
        return read_volume(path)  # an image file or a DICOM series folder
    except (RuntimeError, StudyError) as exc:
        raise ContrastInputError(f"{name} volume {path} could not be read ({str(exc).strip().splitlines()[0] if str(exc).strip() else exc}).") from exc


def automatic_brain_mask(
    image: sitk.Image,
    brain_mask: sitk.Image,
    lesions: Sequence[LesionGeometry],
    lesion_labels: Optional[sitk.Image] = None,
    margin_mm: float = DEFAULT_BRAIN_MARGIN_MM,
) -> np.ndarray:
    """Automatic healthy-brain ROI (deviation from the paper, which drew it by hand).

    Brain mask minus balls of radius ``long_mm / 2 + margin_mm`` around each reference lesion
    centre, minus the lesion label volume (when given) dilated by ``margin_mm``.

    Returns:
        Boolean array (z, y, x) on the grid of ``image``.
    """
    brain = sitk.GetArrayFromImage(_on_grid(brain_mask, image)) > 0
    size = np.array(image.GetSize())
    spacing = np.array(image.GetSpacing())
    keep = brain.copy()
    for lesion in lesions:
        # The ball is around the drawn axes (their centroid and long axis as measured), whatever
        # centre or length a file states. The direction matrix is orthonormal, so physical
        # distances are spacing-scaled index distances.
        c = ras_to_continuous_index(image, np.array([lesion.measured_center], dtype=float))[0]
        radius = lesion.measured_long_mm / 2.0 + margin_mm
        lo = np.maximum(np.floor(c - radius / spacing), 0).astype(int)
        hi = np.minimum(np.ceil(c + radius / spacing), size - 1).astype(int)
        if np.any(hi < lo):
            continue
        ax = [(np.arange(lo[d], hi[d] + 1) - c[d]) * spacing[d] for d in range(3)]
        d2 = ax[2][:, None, None] ** 2 + ax[1][None, :, None] ** 2 + ax[0][None, None, :] ** 2
        block = keep[lo[2]:hi[2] + 1, lo[1]:hi[1] + 1, lo[0]:hi[0] + 1]
        block &= ~(d2 < radius**2)
    if lesion_labels is not None:
        lab = sitk.GetArrayFromImage(_on_grid(lesion_labels, image)) > 0
        if lab.any():
            from scipy import ndimage

            radii = np.maximum(np.round(margin_mm / spacing[::-1]).astype(int), 0)
            zz, yy, xx = np.ogrid[-radii[0]:radii[0] + 1, -radii[1]:radii[1] + 1, -radii[2]:radii[2] + 1]
            sph = ((zz * spacing[2]) ** 2 + (yy * spacing[1]) ** 2 + (xx * spacing[0]) ** 2) <= margin_mm**2 + 1e-9
            keep &= ~ndimage.binary_dilation(lab, structure=sph)
    return keep


@dataclass
class ContrastResult:
    """CNR, LBR and CEP of one volume of one case, with the ROI statistics behind them."""

    case: str
    volume: str
    cnr: float
    lbr: float
    cep: float  #: percent, as in Table 4
    si_lesion: float
    si_brain: float
    sd_brain: float
    si_lesion_pre: float
    n_lesions: int
    n_lesion_voxels: int
    n_brain_voxels: int
    brain_roi: str  #: "label" or "automatic"


@dataclass
class CaseVolumes:
    """Volumes of one case needed for the contrast metrics.

    Attributes:
        case: case id (as in grades.csv).
        post: post-contrast volumes to score, name -> path (e.g. "T1c", "T1c-pro", "T1c-vfa").
        pre: pre-contrast T1 (for SI_lesion_pre).
        healthy_brain: optional label volume (non-zero = healthy-brain ROI), as in the paper.
        brain_mask: optional brain mask for the automatic healthy-brain ROI.
        lesion_labels: optional lesion label volume, excluded (dilated) from the automatic ROI.
    """

    case: str
    post: Mapping[str, PathLike]  # only read: any mapping of name -> path (dict[str, Path] included)
    pre: Optional[PathLike] = None
    healthy_brain: Optional[PathLike] = None
    brain_mask: Optional[PathLike] = None
    lesion_labels: Optional[PathLike] = None


def case_contrast(
    volumes: CaseVolumes,
    lesions: Sequence[LesionGeometry],
    margin_mm: float = DEFAULT_BRAIN_MARGIN_MM,
) -> list[ContrastResult]:
    """CNR, LBR and CEP of every post-contrast volume of one case (paper, Table 4).

    Args:
        volumes: the case's volumes.
        lesions: the case's reference lesions (at least one; paper: cases with >= 1 reference lesion).
        margin_mm: margin of the automatic healthy-brain ROI.

    Raises:
        ContrastInputError: no lesion, no pre-contrast T1, no healthy-brain label nor brain
            mask, or an empty ROI; the message names the case and the missing input.
    """
    if not lesions:
        raise ContrastInputError(f"Case {volumes.case}: no reference lesion; contrast metrics need at least one (paper).")
    if volumes.pre is None:
        raise ContrastInputError(f"Case {volumes.case}: no pre-contrast T1 volume; add it to the study (role 'T1') to compute CEP.")
    if volumes.healthy_brain is None and volumes.brain_mask is None:
        raise ContrastInputError(
            f"Case {volumes.case}: no healthy-brain label and no brain mask; add one of them to the study to compute CNR/LBR."
        )
    pre = _read(volumes.pre, f"case {volumes.case} pre-contrast T1")
    pre_roi = parallelogram_mask(pre, lesions)
    if not pre_roi.any():
        raise ContrastInputError(f"Case {volumes.case}: the lesion ROIs fall outside the pre-contrast T1 grid; check the lesion coordinates (RAS mm).")
    si_pre = float(sitk.GetArrayViewFromImage(pre)[pre_roi].astype(float).mean())
    healthy = _read(volumes.healthy_brain, f"case {volumes.case} healthy-brain label") if volumes.healthy_brain is not None else None
    brain = _read(volumes.brain_mask, f"case {volumes.case} brain mask") if volumes.brain_mask is not None else None
    labels = _read(volumes.lesion_labels, f"case {volumes.case} lesion labels") if volumes.lesion_labels is not None else None
    results = []
    for name, path in volumes.post.items():
        image = _read(path, f"case {volumes.case} {name}")
        data: np.ndarray = sitk.GetArrayViewFromImage(image).astype(float)
        roi = parallelogram_mask(image, lesions)
        if not roi.any():
            raise ContrastInputError(f"Case {volumes.case}: the lesion ROIs fall outside the {name} grid; check the lesion coordinates (RAS mm).")
        if healthy is not None:
            brain_roi = sitk.GetArrayFromImage(_on_grid(healthy, image)) > 0
            kind = "label"
        elif brain is not None:
            brain_roi = automatic_brain_mask(image, brain, lesions, labels, margin_mm)
            kind = "automatic"
        else:  # not reached: a case with neither input is refused above
            raise ContrastInputError(f"Case {volumes.case}: no healthy-brain label and no brain mask; add one of them to the study to compute CNR/LBR.")
        brain_roi &= ~roi
        if brain_roi.sum() < 2:
            raise ContrastInputError(f"Case {volumes.case}: the healthy-brain ROI on {name} has {int(brain_roi.sum())} voxel(s); check the label/brain mask.")
        si_lesion = float(data[roi].mean())
        si_brain = float(data[brain_roi].mean())
        sd_brain = float(data[brain_roi].std(ddof=1))
        cnr, lbr, cep = contrast_metrics(si_lesion, si_brain, sd_brain, si_pre)
        results.append(ContrastResult(
            case=volumes.case, volume=name, cnr=cnr, lbr=lbr, cep=cep, si_lesion=si_lesion,
            si_brain=si_brain, sd_brain=sd_brain, si_lesion_pre=si_pre, n_lesions=len(lesions),
            n_lesion_voxels=int(roi.sum()), n_brain_voxels=int(brain_roi.sum()), brain_roi=kind,
        ))
    return results
