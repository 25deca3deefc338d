"""Reading, validating and atomically writing medical images (SimpleITK).

Every reader error names the file and says how to fix it: a radiologist running the CLI on a
wrong folder should know at once which input is wrong and why.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Union

import numpy as np
import SimpleITK as sitk

from ContrastAmplifierCommon.atomicfile import atomic_path

if TYPE_CHECKING:
    from nibabel.dataobj_images import DataobjImage

# The image suffixes, the folder finder and the DICOM series reader live in the SimpleITK-free
# ``imagefiles`` (the one place for them); re-exported here.
from .imagefiles import (  # noqa: F401  (re-exported)
    IMAGE_SUFFIXES,
    ImageValidationError,
    find_image,
    image_suffix,
    read_dicom_series,
)

ImageLike = Union[str, os.PathLike, sitk.Image]

#: Plausible voxel spacing range in mm for brain MRI (catches metres, microns and 0 spacing).
SPACING_RANGE_MM = (0.05, 20.0)

#: Largest plausible field of view of a head MRI along any axis, in mm. A head is about
#: 200-250 mm long; neurological protocols use FOVs of 180-300 mm (sagittal head-and-neck stacks
#: up to ~350 mm). 500 mm leaves room for all of these and catches wrong header units or
#: spacing (a 67-voxel axis at 15 mm is 1 m, which HD-BET would resample to 1.5 mm: tens of GB).
MAX_FIELD_OF_VIEW_MM = 500.0

#: Suffixes whose voxel payload SimpleITK reads without complaint when truncated, and whose NaN
#: and infinite floats it returns as 0: their raw data is checked with nibabel as well.
NIFTI_SUFFIXES = (".nii.gz", ".nii")


#: How messages name each input (``modality key -> name a radiologist reads``).
DISPLAY_NAMES = {"t1": "T1", "flair": "T2-FLAIR", "adc": "ADC", "t1c": "T1c", "t1c_low": "T1c-low"}


def display_name(modality: str) -> str:
    """``"t1c"`` -> ``"T1c"``, ``"flair"`` -> ``"T2-FLAIR"``; unknown keys upper-cased."""
    return DISPLAY_NAMES.get(modality, modality.upper())


def _describe(name: str, source: object) -> str:
    return f"{name} ({source})" if isinstance(source, (str, os.PathLike)) else name


def read_image(source: ImageLike, name: str = "image") -> sitk.Image:
    """Read a NIfTI/NRRD/MHA file or a DICOM series folder into a float32 SimpleITK image.

    The whole file is read and checked before anything else runs: a truncated or corrupted
    file, NaN or infinite voxels (also in NIfTI, where SimpleITK hides them as 0), more than
    one volume (4D) or more than one component per voxel, an implausible spacing or field of
    view, and an empty image are refused with an :class:`ImageValidationError` naming the input.

    Args:
        source: a path (file or DICOM folder) or an already loaded ``sitk.Image``.
        name: what the image is ("T1c", "ADC"...), used in error messages.

    Raises:
        ImageValidationError: unreadable, missing, truncated, not 3D, empty, non-finite or
            implausible geometry.
    """
    if isinstance(source, sitk.Image):
        image = source
    else:
        path = Path(source)
        if not path.exists():
            raise ImageValidationError(
                f"{name} volume not found: {path}. Check the path, or pass the {name} volume explicitly."
            )
        if path.is_file() and image_suffix(path) in NIFTI_SUFFIXES:
            _check_nifti_payload(path, name)
        try:
            if path.is_dir():
                image = read_dicom_series(path, name)
            else:
                image = sitk.ReadImage(str(path))
        except ImageValidationError:
            raise
        except RuntimeError as exc:
            raise _unreadable(name, path, exc) from exc
    image = _as_single_volume(image, _describe(name, source))
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ImageValidationError(
            f"{_describe(name, source)} has {image.GetNumberOfComponentsPerPixel()} components per voxel (a colour or "
            "vector image); a scalar (grey-level) volume is required."
        )
    image = sitk.Cast(image, sitk.sitkFloat32)
    validate_image(image, _describe(name, source))
    return image


def _check_nifti_payload(path: Path, name: str) -> None:
    """Read a NIfTI file's raw voxels with nibabel: catches truncation, 4D and NaN/Inf that ITK hides."""
    import nibabel as nib

    try:
        # nib.load is annotated with the FileBasedImage base class; a NIfTI file loads as a
        # Nifti1Image or Nifti2Image, both DataobjImage (shape, dataobj).
        nifti: DataobjImage = nib.load(str(path))  # type: ignore[assignment]
    except Exception as exc:  # nibabel raises many types for a bad header
        raise _unreadable(name, path, exc) from None
    shape = tuple(int(v) for v in nifti.shape)
    if len(shape) > 3 and int(np.prod(shape[3:])) > 1:
        raise ImageValidationError(_more_than_one_volume(f"{name} ({path})", shape))
    try:
        data = np.asanyarray(nifti.dataobj)
    except (EOFError, OSError, ValueError, zlib.error) as exc:
        raise ImageValidationError(
            f"{name} file {path} is truncated or corrupted: only part of its {'x'.join(map(str, shape))} voxels could be "
            f"read ({type(exc).__name__}: {str(exc).splitlines()[0]}). Copy or export the file again."
        ) from None
    if data.dtype.kind in "fc":
        bad = int(data.size - np.count_nonzero(np.isfinite(data)))
        if bad:
            raise ImageValidationError(_non_finite_message(f"{name} ({path})", bad, data.size))


def _unreadable(name: str, path: Path, exc: BaseException) -> ImageValidationError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ImageValidationError(
        f"{name} file {path} could not be read ({first}). It may be truncated, corrupted or in another format: "
        "export it again. Supported: NIfTI (.nii/.nii.gz), NRRD, MHA/MHD, DICOM series folders."
    )


def _more_than_one_volume(name: str, shape) -> str:
    return (
        f"{name} holds {int(np.prod(shape[3:]))} volumes ({'x'.join(str(s) for s in shape)}, 4D); a single 3D volume is "
        "required. Export the one volume this input needs (for diffusion, the ADC map, not the b-value series)."
    )


def _non_finite_message(name: str, bad: int, total: int) -> str:
    return (
        f"{name} contains {bad} NaN/infinite voxels (of {total}); fix the export or replace them (e.g. with 0) "
        "before processing."
    )


def _as_single_volume(image: sitk.Image, name: str) -> sitk.Image:
    """A 4D image with one volume becomes 3D; more volumes are refused (before any cast)."""
    if image.GetDimension() == 4:
        size = image.GetSize()
        if size[3] != 1:
            raise ImageValidationError(_more_than_one_volume(name, size))
        return sitk.Extract(image, [size[0], size[1], size[2], 0], [0, 0, 0, 0])
    if image.GetDimension() > 4:
        raise ImageValidationError(f"{name} is {image.GetDimension()}D; a single 3D volume is required.")
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
    extent = [n * s for n, s in zip(size, spacing)]
    if max(extent) > MAX_FIELD_OF_VIEW_MM:
        raise ImageValidationError(
            f"{name} covers {' x '.join(f'{e:.0f}' for e in extent)} mm ({'x'.join(str(n) for n in size)} voxels of "
            f"{' x '.join(f'{s:g}' for s in spacing)} mm): more than {MAX_FIELD_OF_VIEW_MM:.0f} mm is not a head MRI. "
            "Check the voxel spacing in the header (mm, not cm), or crop the volume to the head."
        )
    array = sitk.GetArrayViewFromImage(image)
    finite = np.isfinite(array)
    if not finite.all():
        raise ImageValidationError(_non_finite_message(name, int(array.size - finite.sum()), array.size))
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
    found = {}
    for name in names:
        hit = find_image(folder, name, name=display_name(name))
        if hit is None:
            entries = sorted(p.name.lower() for p in folder.iterdir() if not p.name.startswith("."))
            raise ImageValidationError(
                f"{display_name(name)} is missing in {folder}: expected {name}.nii.gz (or {'/'.join(IMAGE_SUFFIXES[1:])}) or a "
                f"{name}/ DICOM folder. Rename the {display_name(name)} file, or add it. Found: {entries or 'nothing'}."
            )
        found[name] = hit
    return found
