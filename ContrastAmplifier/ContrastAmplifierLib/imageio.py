"""Reading, validating and atomically writing medical images (SimpleITK).

Every reader error names the file and says how to fix it: a radiologist running the CLI on a
wrong folder should know at once which input is wrong and why.
"""

from __future__ import annotations

import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

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
    is_adc_name,
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

#: Smallest extent (mm) along every axis of an input series that can hold a whole brain. An adult
#: brain is about 140 x 170 x 120 mm (left-right, front-back, cerebrum height); 60 mm is less than
#: half of it: a localiser or scout (1-5 slices), a targeted slab or a single-slice export.
MIN_SERIES_EXTENT_MM = 60.0

#: Suffixes whose voxel payload SimpleITK reads without complaint when truncated, and whose NaN
#: and infinite floats it returns as 0: their raw data is checked with nibabel as well.
NIFTI_SUFFIXES = (".nii.gz", ".nii")

#: Suffixes whose header declares the voxel payload (MetaImage, NRRD): the payload is checked
#: against it before SimpleITK reads the file, because SimpleITK before 2.4 (Slicer 5.6 ships
#: 2.2.1, 5.8 ships 2.3.1) reads a truncated compressed file without error.
HEADER_PAYLOAD_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr")


#: How messages name each input (``modality key -> name a radiologist reads``).
DISPLAY_NAMES = {"t1": "T1", "flair": "T2-FLAIR", "adc": "ADC", "t1c": "T1c", "t1c_low": "T1c-low"}


def display_name(modality: str) -> str:
    """``"t1c"`` -> ``"T1c"``, ``"flair"`` -> ``"T2-FLAIR"``; unknown keys upper-cased."""
    return DISPLAY_NAMES.get(modality, modality.upper())


def describe_source(name: str, source: object) -> str:
    """``"T1 (/path/t1.nii.gz)"`` for a path, ``"T1"`` for an image already loaded: how messages name an input."""
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
        elif path.is_file() and image_suffix(path) in HEADER_PAYLOAD_SUFFIXES:
            check_header_payload(path, name)
        try:
            if path.is_dir():
                image = read_dicom_series(path, name)
            else:
                image = sitk.ReadImage(str(path))
        except ImageValidationError:
            raise
        except RuntimeError as exc:
            raise _unreadable(name, path, exc) from exc
    image = _as_single_volume(image, describe_source(name, source))
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ImageValidationError(
            f"{describe_source(name, source)} has {image.GetNumberOfComponentsPerPixel()} components per voxel (a colour or "
            "vector image); a scalar (grey-level) volume is required."
        )
    image = sitk.Cast(image, sitk.sitkFloat32)
    validate_image(image, describe_source(name, source))
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


#: Bytes per value of each MetaImage ``ElementType`` (MetaIO's metaTypes.h: MET_LONG is 4 bytes).
_META_TYPE_BYTES = {
    "MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
    "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8,
}
#: Bytes per value of each NRRD ``type`` (every spelling of the NRRD format specification).
_NRRD_TYPE_BYTES = {
    **dict.fromkeys(("signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8", "uint8_t"), 1),
    **dict.fromkeys(("short", "short int", "signed short", "signed short int", "int16", "int16_t", "ushort",
                     "unsigned short", "unsigned short int", "uint16", "uint16_t"), 2),
    **dict.fromkeys(("int", "signed int", "int32", "int32_t", "uint", "unsigned int", "uint32", "uint32_t", "float"), 4),
    **dict.fromkeys(("longlong", "long long", "long long int", "signed long long", "signed long long int", "int64",
                     "int64_t", "ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t",
                     "double"), 8),
}
#: Largest header read when looking for the payload description (headers are a few hundred bytes).
_MAX_HEADER_BYTES = 1 << 16
#: Decompressed bytes produced per step while counting a compressed payload (bounds memory).
_INFLATE_STEP = 1 << 24


@dataclass(frozen=True)
class _Payload:
    """Where a MetaImage/NRRD file's voxels are and how many bytes they must make."""

    file: Path
    offset: int  # first byte of the voxel data in ``file``
    expected: int  # bytes of (decompressed) voxel data the header's sizes and type need
    compressed: bool  # zlib or gzip stream (MetaImage CompressedData, NRRD gzip encoding)
    shape: tuple[int, ...]
    declared_compressed: Optional[int] = None  # MetaImage CompressedDataSize


def _header_lines(path: Path, separator: str) -> tuple[dict[str, str], int]:
    """``({lower-case key: value}, byte offset after the header)`` of a text header ending with a
    ``ElementDataFile`` line (MetaImage, ``separator`` "=") or an empty line / end of file (NRRD, ":")."""
    with open(path, "rb") as stream:
        head = stream.read(_MAX_HEADER_BYTES)
    fields: dict[str, str] = {}
    position = 0
    while position < len(head):
        end = head.find(b"\n", position)
        end = len(head) if end < 0 else end + 1
        line = head[position:end].decode("latin-1").rstrip("\r\n")
        position = end
        if separator == ":" and line == "":
            break
        if line.startswith("#") or separator not in line:
            continue
        key, _, value = line.partition(separator)
        if separator == ":" and value.startswith("="):  # NRRD key/value pair "key:=value": not a field
            continue
        fields[key.strip().lower()] = value.strip()
        if separator == "=" and key.strip().lower() == "elementdatafile":
            break
    return fields, position


def _ints(text: str) -> Optional[tuple[int, ...]]:
    values = text.split()
    if not values or not all(re.fullmatch(r"\d+", v) for v in values):
        return None
    return tuple(int(v) for v in values)


def _meta_payload(path: Path) -> Optional[_Payload]:
    """The payload of a ``.mha``/``.mhd`` file, or None when its layout is not one checked here."""
    fields, end = _header_lines(path, "=")
    shape = _ints(fields.get("dimsize", ""))
    size = _META_TYPE_BYTES.get(fields.get("elementtype", "").upper())
    channels = _ints(fields.get("elementnumberofchannels", "1"))
    data_file = fields.get("elementdatafile", "")
    header_size = fields.get("headersize", "0")
    binary = fields.get("binarydata", "True").lower() in ("true", "1")
    if (shape is None or size is None or channels is None or not binary or not data_file
            or data_file.upper() == "LIST" or "%" in data_file or not re.fullmatch(r"\d+", header_size)):
        return None  # ASCII data, a file list or pattern, HeaderSize -1 (data at the end): left to ITK
    local = data_file.upper() == "LOCAL"
    declared = _ints(fields.get("compresseddatasize", ""))
    return _Payload(file=path if local else path.parent / data_file,
                    offset=(end if local else 0) + int(header_size),
                    expected=int(np.prod(shape, dtype=np.int64)) * channels[0] * size,
                    compressed=fields.get("compresseddata", "False").lower() in ("true", "1"), shape=shape,
                    declared_compressed=declared[0] if declared else None)


def _nrrd_payload(path: Path) -> Optional[_Payload]:
    """The payload of a ``.nrrd``/``.nhdr`` file, or None when its layout is not one checked here."""
    with open(path, "rb") as stream:
        if not stream.read(8).startswith(b"NRRD000"):
            return None  # not NRRD: ITK will say so
    fields, end = _header_lines(path, ":")
    shape = _ints(fields.get("sizes", ""))
    size = _NRRD_TYPE_BYTES.get(" ".join(fields.get("type", "").lower().split()))
    encoding = fields.get("encoding", "").lower()
    data_file = fields.get("data file", fields.get("datafile", ""))
    skips = [fields.get(k, "0") for k in ("line skip", "lineskip")] + [fields.get(k, "0") for k in ("byte skip", "byteskip")]
    if (shape is None or size is None or encoding not in ("raw", "gzip", "gz") or data_file.upper().startswith("LIST")
            or len(data_file.split()) > 1 or not all(re.fullmatch(r"\d+", v) for v in skips)
            or any(int(v) for v in skips[:2])):
        return None  # text encodings, bzip2, multi-file data, line skips, byte skip -1: left to ITK
    byte_skip = int(fields.get("byte skip", fields.get("byteskip", "0")))
    return _Payload(file=path.parent / data_file if data_file else path, offset=(0 if data_file else end) + byte_skip,
                    expected=int(np.prod(shape, dtype=np.int64)) * size, compressed=encoding != "raw", shape=shape)


def _inflated_bytes(payload: _Payload) -> tuple[int, str]:
    """``(bytes the compressed payload inflates to, problem or "")``, stopping once ``expected`` is reached."""
    inflater = zlib.decompressobj(47)  # zlib or gzip header, detected (as MetaIO and NrrdIO accept both)
    total = 0
    with open(payload.file, "rb") as stream:
        stream.seek(payload.offset)
        while total <= payload.expected and not inflater.eof:
            chunk = inflater.unconsumed_tail or stream.read(1 << 20)
            if not chunk:
                return total, "the compressed data stops early"
            try:
                total += len(inflater.decompress(chunk, _INFLATE_STEP))
            except zlib.error as exc:
                return total, f"the compressed data is damaged: {exc}"
    return total, ""


def check_header_payload(path: Union[str, os.PathLike], name: str = "image") -> None:
    """Refuse a MetaImage (``.mha``/``.mhd``) or NRRD (``.nrrd``/``.nhdr``) file whose voxel data is
    shorter than its header says (a truncated copy or download) or whose compressed data is damaged.

    SimpleITK before 2.4 reads such a compressed file without error (the missing voxels come out
    as whatever the buffer held), so the check does not rely on it: the header's sizes and type give
    the bytes needed; raw data is measured, compressed data is inflated and counted (and a
    MetaImage's ``CompressedDataSize`` compared with the bytes present). Layouts not covered (ASCII
    data, file lists, bzip2, skipped lines) are left to SimpleITK.

    Raises:
        ImageValidationError: names the file, the sizes and the fix.
    """
    path = Path(path)
    try:
        payload = _meta_payload(path) if image_suffix(path) in (".mha", ".mhd") else _nrrd_payload(path)
        if payload is None or not payload.file.is_file():
            return  # not checked here, or a missing data file: SimpleITK's own error names it
        available = max(payload.file.stat().st_size - payload.offset, 0)
        problem = ""
        if payload.declared_compressed is not None and available < payload.declared_compressed:
            got, problem = available, f"the header declares {payload.declared_compressed} compressed bytes, the file holds {available}"
        elif payload.compressed:
            got, problem = _inflated_bytes(payload)
        else:
            got = available
    except OSError as exc:
        raise _unreadable(name, path, exc) from None
    if problem or got < payload.expected:
        raise ImageValidationError(
            f"{name} file {path} is truncated or corrupted: its {'x'.join(map(str, payload.shape))} voxels need "
            f"{payload.expected} bytes of image data, {'only ' if got < payload.expected else ''}{got} could be read"
            f"{f' ({problem})' if problem else ''}. Copy or export the file again."
        )


def _unreadable(name: str, path: Path, exc: BaseException) -> ImageValidationError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ImageValidationError(
        f"{name} file {path} could not be read ({first}). It may be truncated, corrupted or in another format: "
        "export it again. Supported: NIfTI (.nii/.nii.gz), NRRD, MHA/MHD, DICOM series folders."
    )


def _more_than_one_volume(name: str, shape) -> str:
    """``name``: the input as messages call it, ``"ADC"`` or ``"ADC (path)"`` (see :func:`_describe`)."""
    message = (
        f"{name} holds {int(np.prod(shape[3:]))} volumes ({'x'.join(str(s) for s in shape)}, 4D); a single 3D volume is "
        "required. "
    )
    if is_adc_name(name.split(" (", 1)[0]):
        return message + (
            "This looks like the diffusion-weighted series (one volume per b-value), not the ADC map: export the ADC "
            "map (one 3D volume) instead."
        )
    return message + "Export the single 3D volume this input needs, not a series of b-values, echoes or time points."


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


def check_series_extent(image: sitk.Image, name: str = "image", source: object = None) -> None:
    """Refuse a series too thin to hold a brain (:data:`MIN_SERIES_EXTENT_MM` along some axis).

    ``name`` is what the input is ("T1"), ``source`` where it came from (a path, named in the message).

    Raises:
        ImageValidationError: names the input, its extent and slices along that axis, and the fix.
    """
    extents = [n * s for n, s in zip(image.GetSize(), image.GetSpacing())]
    axis = int(np.argmin(extents))
    if extents[axis] < MIN_SERIES_EXTENT_MM:
        n, spacing = image.GetSize()[axis], image.GetSpacing()[axis]
        raise ImageValidationError(
            f"{describe_source(name, source)} covers only {extents[axis]:.0f} mm along its {('first', 'second', 'third')[axis]} axis ({n} slices of "
            f"{spacing:g} mm; at least {MIN_SERIES_EXTENT_MM:.0f} mm needed): a localiser, a scout or a partial slab, "
            f"not a whole-brain series. Load the whole-brain {name} series."
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
