"""Reading, validating and atomically writing medical images (SimpleITK).

Every reader error names the file and says how to fix it: a radiologist running the CLI on a
wrong folder should know at once which input is wrong and why.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import numpy as np
import SimpleITK as sitk

from .atomicfile import atomic_path

ImageLike = Union[str, os.PathLike, sitk.Image]

#: File suffixes read as single images; a folder is read as a DICOM series.
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")

#: Plausible voxel spacing range in mm for brain MRI (catches metres, microns and 0 spacing).
SPACING_RANGE_MM = (0.05, 20.0)


class ImageValidationError(ValueError):
    """An input image cannot be used; the message names it and the fix."""


def _describe(name: str, source: object) -> str:
    return f"{name} ({source})" if isinstance(source, (str, os.PathLike)) else name


def read_image(source: ImageLike, name: str = "image") -> sitk.Image:
    """Read a NIfTI/NRRD/MHA file or a DICOM series folder into a float32 SimpleITK image.

    Args:
        source: a path (file or DICOM folder) or an already loaded ``sitk.Image``.
        name: what the image is ("T1c", "ADC"...), used in error messages.

    Raises:
        ImageValidationError: unreadable, missing, not 3D, empty, non-finite or implausible spacing.
    """
    if isinstance(source, sitk.Image):
        image = source
    else:
        path = Path(source)
        if not path.exists():
            raise ImageValidationError(
                f"{name} volume not found: {path}. Check the path, or pass the {name} volume explicitly."
            )
        try:
            if path.is_dir():
                reader = sitk.ImageSeriesReader()
                series = reader.GetGDCMSeriesIDs(str(path))
                if not series:
                    raise ImageValidationError(
                        f"{name} folder {path} holds no DICOM series; point to a DICOM series folder or a NIfTI/NRRD/MHA file."
                    )
                if len(series) > 1:
                    raise ImageValidationError(
                        f"{name} folder {path} holds {len(series)} DICOM series; put one series per folder."
                    )
                reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path), series[0]))
                image = reader.Execute()
            else:
                image = sitk.ReadImage(str(path))
        except ImageValidationError:
            raise
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ImageValidationError(
                f"{name} file {path} could not be read ({first}). Supported: NIfTI (.nii/.nii.gz), NRRD, MHA/MHD, DICOM series folders."
            ) from exc
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ImageValidationError(
            f"{_describe(name, source)} has {image.GetNumberOfComponentsPerPixel()} components per voxel; a scalar (grey-level) volume is required."
        )
    image = sitk.Cast(image, sitk.sitkFloat32)
    validate_image(image, _describe(name, source))
    return image


def validate_image(image: sitk.Image, name: str = "image") -> None:
    """Check that ``image`` is a usable 3D scalar volume; raise :class:`ImageValidationError` if not."""
    size = image.GetSize()
    if image.GetDimension() != 3 or min(size) <= 1:
        shape = "x".join(str(s) for s in size)
        raise ImageValidationError(
            f"{name} is {'2D' if image.GetDimension() == 2 or min(size) <= 1 else f'{image.GetDimension()}D'} ({shape}); "
            "a 3D volume is required. Export the whole series, not a single slice."
        )
    spacing = image.GetSpacing()
    lo, hi = SPACING_RANGE_MM
    if not all(lo <= s <= hi for s in spacing):
        raise ImageValidationError(
            f"{name} has implausible voxel spacing {tuple(round(s, 4) for s in spacing)} mm (expected {lo}-{hi} mm); "
            "check the header units (mm) or resample the volume."
        )
    array = sitk.GetArrayViewFromImage(image)
    finite = np.isfinite(array)
    if not finite.all():
        bad = int(array.size - finite.sum())
        raise ImageValidationError(
            f"{name} contains {bad} NaN/infinite voxels; fix the export or replace them (e.g. with 0) before processing."
        )
    if float(array.max()) == float(array.min()):
        raise ImageValidationError(
            f"{name} is empty (every voxel equals {float(array.min()):g}); load the right series."
        )


def write_image_atomic(image: sitk.Image, path: Union[str, os.PathLike], compress: bool = True) -> Path:
    """Write ``image`` to ``path`` via a temporary file in the same folder and an atomic rename.

    A crash or cancel mid-write leaves either the previous file or nothing, never half a file.
    """
    path = Path(path)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    with atomic_path(path, suffix) as tmp:
        sitk.WriteImage(image, str(tmp), compress)
    return path


def find_case_inputs(case_dir: Union[str, os.PathLike], names=("t1", "flair", "adc", "t1c")) -> dict:
    """Locate each named input in ``case_dir``: ``<name>.nii.gz|.nii|.nrrd|.nhdr|.mha|.mhd`` or a ``<name>/`` DICOM folder.

    Names match case-insensitively (``T1c.nii.gz`` is the T1c). Nothing is read here; see
    :func:`read_image`.

    Raises:
        ImageValidationError: the folder is missing, or a modality is missing or ambiguous.
    """
    folder = Path(case_dir)
    if not folder.is_dir():
        raise ImageValidationError(f"case folder not found: {folder}. Pass a folder holding {', '.join(names)} images.")
    entries = {p.name.lower(): p for p in folder.iterdir() if not p.name.startswith(".")}
    found = {}
    for name in names:
        hits = [entries[name + s] for s in IMAGE_SUFFIXES if name + s in entries]
        if name in entries and entries[name].is_dir():
            hits.append(entries[name])
        if not hits:
            raise ImageValidationError(
                f"{name.upper()} is missing in {folder}: expected {name}.nii.gz (or .nii/.nrrd/.mha) or a {name}/ DICOM "
                f"folder. Rename the {name.upper()} file, or add it. Found: {sorted(entries) or 'nothing'}."
            )
        if len(hits) > 1:
            raise ImageValidationError(
                f"{name.upper()} is ambiguous in {folder}: {[h.name for h in hits]}; keep only one."
            )
        found[name] = hits[0]
    return found
