"""Which files are images, and finding a named image in a folder. No SimpleITK at import time.

The one place that knows the image suffixes and how a case folder names its images: the
ContrastAmplifier module (in Slicer's GUI process, where SimpleITK may not be installed yet),
:mod:`ContrastAmplifierLib.imageio`, the training cohort reader and LesionReader all use it.
The DICOM series reader here imports SimpleITK only when called; it checks every file's header
first (:func:`dicom_slice_layout`) and refuses a series that would not make one regular 3D volume.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional, Union

PathLike = Union[str, os.PathLike]

#: File suffixes read as single images (lower-case; ``.nii.gz`` first so it wins over ``.gz``);
#: a folder is read as a DICOM series.
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")

#: Byte offset of the ``DICM`` magic in a DICOM Part 10 file.
DICOM_MAGIC_OFFSET = 128


class ImageValidationError(ValueError):
    """An input image cannot be used; the message names it and the fix."""


def image_suffix(path: PathLike) -> str:
    """The image-format suffix of ``path`` (``.nii.gz`` counts as one), lower-case."""
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def image_stem(name: str) -> Optional[str]:
    """``name`` without its image suffix (case-insensitive: ``T1c.NII.GZ`` -> ``T1c``), or None if not an image name."""
    lower = name.lower()
    for suffix in IMAGE_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return None


def image_entries(folder: PathLike, folders: bool = True) -> Iterator[tuple[str, Path]]:
    """``(stem, path)`` of every image in ``folder``, in name order: files with one of
    :data:`IMAGE_SUFFIXES` (stem without the suffix) and, with ``folders=True``, sub-folders
    (stem = the folder name; whether one holds a DICOM series is the caller's check, see
    :func:`is_dicom_series_folder`). Hidden entries are skipped. Every image finder uses this walk.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            if folders:
                yield entry.name, entry
        elif entry.is_file():
            stem = image_stem(entry.name)
            if stem is not None:
                yield stem, entry


def find_image(folder: PathLike, stem: str, folders: bool = True, name: Optional[str] = None) -> Optional[Path]:
    """The image named ``stem`` in ``folder``: ``<stem><suffix>`` for any of :data:`IMAGE_SUFFIXES`,
    or (``folders=True``) a ``<stem>/`` folder, taken as a DICOM series (read it with
    :func:`dicom_series_files` or :func:`ContrastAmplifierLib.imageio.read_image`).

    Names match case-insensitively (``T1c.NII.GZ`` is ``t1c``); hidden entries are ignored.
    ``name`` is how error messages call the image (default ``stem``).

    Returns:
        The path, or None when ``folder`` holds no such image (or is not a folder).

    Raises:
        ImageValidationError: more than one entry matches (the message names them all).
    """
    want = stem.lower()
    hits = [entry for found, entry in image_entries(folder, folders) if found.lower() == want]
    if len(hits) > 1:
        raise ImageValidationError(
            f"{name or stem} is ambiguous in {folder}: {', '.join(h.name for h in hits)} all match; keep only one."
        )
    return hits[0] if hits else None


def _is_dicom_file(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            handle.seek(DICOM_MAGIC_OFFSET)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def is_dicom_series_folder(path: PathLike) -> bool:
    """Whether ``path`` is a folder holding DICOM files (Part 10, ``DICM`` preamble) directly inside it."""
    folder = Path(path)
    if not folder.is_dir():
        return False
    return any(child.is_file() and _is_dicom_file(child) for child in sorted(folder.iterdir()))


#: Largest difference between two Image Orientation Patient components still taken as one
#: orientation (scanners round IOP to 5-6 decimals; 0.01 is about half a degree).
IOP_TOLERANCE = 0.01
#: Slice positions closer than this (mm, along the slice normal) are the same position.
SAME_POSITION_MM = 0.01
#: A step between neighbouring slices that deviates from the median step by more than this
#: fraction of it (and by more than :data:`SAME_POSITION_MM`) is a gap or an overlap.
STEP_TOLERANCE = 0.10
#: How many irregular steps a message lists before "and N more".
MAX_REPORTED_GAPS = 3

_POSITION_TAG = "0020|0032"  # Image Position (Patient)
_ORIENTATION_TAG = "0020|0037"  # Image Orientation (Patient)
#: Tags that tell the images of a 4D series apart, with how messages call their values.
_SERIES_DIMENSION_TAGS = (("0018|9087", "b-values"), ("0018|0086", "echo numbers"), ("0020|0100", "time points"))

Vector = tuple[float, float, float]


class DicomSliceLayout(NamedTuple):
    """The files of a DICOM series in slice order and the distance between neighbouring slices."""

    files: list[str]
    #: Median distance between neighbouring slice positions in mm; None for one multi-frame file.
    step_mm: Optional[float]


@dataclass(frozen=True)
class _SliceHeader:
    file: str
    frames: int  # slices in the file (more than one in a multi-frame file)
    position: Optional[Vector]  # Image Position Patient, None when missing or malformed
    row: Optional[Vector]  # Image Orientation Patient row and column cosines (normalised)
    column: Optional[Vector]
    dimensions: tuple[Optional[str], ...]  # value of each of _SERIES_DIMENSION_TAGS, None when missing


def is_adc_name(name: str) -> bool:
    """Whether an input called ``name`` in messages is the ADC map (``"ADC"``, ``"adc"``)."""
    return name.strip().lower() in ("adc", "adc map")


def _numbers(text: str, count: int) -> Optional[tuple[float, ...]]:
    try:
        values = tuple(float(v) for v in text.strip().strip("\x00").split("\\"))
    except ValueError:
        return None
    return values if len(values) == count and all(math.isfinite(v) for v in values) else None


def _unit(vector: tuple[float, ...]) -> Optional[Vector]:
    norm = math.sqrt(sum(v * v for v in vector))
    if norm < 1e-6:
        return None
    return (vector[0] / norm, vector[1] / norm, vector[2] / norm)


def _cross(a: Vector, b: Vector) -> Vector:
    return (a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0])


def _dot(a: Vector, b: Vector) -> float:
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]


def _mm(value: float) -> str:
    """``5.0``, ``10.0``, ``0.45``: at least one and at most two decimals."""
    text = f"{value:.2f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def _read_slice_header(reader, path: str, label: str) -> _SliceHeader:
    """One file's geometry and 4D tags, from its header only (``reader``: a ``SimpleITK.ImageFileReader``)."""
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ImageValidationError(
            f"{label}: file {Path(path).name} could not be read ({first}); export or send the series again."
        ) from None

    def tag(key: str) -> Optional[str]:
        return reader.GetMetaData(key) if reader.HasMetaDataKey(key) else None

    position = _numbers(tag(_POSITION_TAG) or "", 3)
    orientation = _numbers(tag(_ORIENTATION_TAG) or "", 6)
    size = reader.GetSize()
    return _SliceHeader(
        file=path,
        frames=int(size[2]) if len(size) > 2 else 1,
        position=(position[0], position[1], position[2]) if position else None,
        row=_unit(orientation[:3]) if orientation else None,
        column=_unit(orientation[3:]) if orientation else None,
        dimensions=tuple((tag(key) or "").strip() or None for key, _ in _SERIES_DIMENSION_TAGS),
    )


def _plane(normal: Vector) -> str:
    """``"axial"``, ``"coronal"`` or ``"sagittal"`` (LPS normal), with the tilt when oblique."""
    axis = max(range(3), key=lambda i: abs(normal[i]))
    tilt = math.degrees(math.acos(min(1.0, abs(normal[axis]))))
    plane = ("sagittal", "coronal", "axial")[axis]
    return f"{plane} tilted {tilt:.0f} deg" if tilt >= 1.0 else plane


def _check_orientations(orientations: list[tuple[Vector, Vector]], label: str) -> Vector:
    """The slice normal shared by every slice (``orientations``: each slice's IOP row and column);
    refuses a series with slices in several orientations."""
    groups: list[tuple[Vector, Vector, int]] = []  # (row, column, how many slices)
    for this_row, this_column in orientations:
        for index, (row, column, count) in enumerate(groups):
            if max(abs(a - b) for a, b in zip(this_row + this_column, row + column)) <= IOP_TOLERANCE:
                groups[index] = (row, column, count + 1)
                break
        else:
            groups.append((this_row, this_column, 1))
    if len(groups) > 1:
        planes = sorted(((count, _plane(_cross(row, column))) for row, column, count in groups), key=lambda g: (-g[0], g[1]))
        found = ", ".join(f"{count} {plane}" for count, plane in planes)
        raise ImageValidationError(
            f"{label} holds slices in {len(groups)} different orientations ({found} slices): a localiser/scout or a "
            "multi-plane series. Choose the whole-brain series in one orientation (axial, or sagittal or coronal) "
            "and export it alone."
        )
    normal = _unit(_cross(groups[0][0], groups[0][1]))
    if normal is None:
        raise ImageValidationError(
            f"{label} has an invalid Image Orientation Patient (0020,0037): its row and column directions are "
            "parallel. Export or send the series again."
        )
    return normal


def _value_key(text: str) -> tuple[float, str]:
    number = _numbers(text, 1)
    return (number[0] if number else math.inf, text)


def _value_text(text: str) -> str:
    number = _numbers(text, 1)
    return f"{number[0]:g}" if number else text


def _series_values(headers: list[_SliceHeader]) -> str:
    """``"; b-values found: 0, 500, 1000"``: the distinct b-values, echo numbers and time points, if any."""
    found = []
    for index, (_, what) in enumerate(_SERIES_DIMENSION_TAGS):
        values = {value for value in (h.dimensions[index] for h in headers) if value is not None}
        if len(values) > 1:
            found.append(f"{what} found: {', '.join(_value_text(v) for v in sorted(values, key=_value_key))}")
    return "".join(f"; {part}" for part in found)


def _check_duplicates(positions: list[list[_SliceHeader]], headers: list[_SliceHeader], name: str, label: str) -> None:
    """Refuse several images at one slice position (a 4D series, or slices sent twice)."""
    counts = [len(group) for group in positions]
    if max(counts) == 1:
        return
    crowded = sum(count > 1 for count in counts)
    if min(counts) == max(counts):
        what = (f"holds {counts[0]} images at each of {len(counts)} slice positions (a 4D series: several b-values, "
                f"echoes or time points{_series_values(headers)})")
    else:
        what = (f"holds {len(headers)} images at {len(counts)} slice positions, {min(counts)} to {max(counts)} at each "
                f"({crowded} position{' holds' if crowded == 1 else 's hold'} more than one: a 4D series, or slices sent twice"
                f"{_series_values(headers)})")
    if is_adc_name(name):
        fix = ("this looks like the diffusion-weighted series, not the ADC map: export the ADC map (one image per "
               "slice)")
    else:
        fix = "export the single 3D volume this input needs (one image per slice position)"
    raise ImageValidationError(f"{label} {what}; {fix}.")


def _check_steps(steps: list[float], label: str) -> float:
    """The median step between slice positions; refuses missing slices and uneven spacing."""
    median = statistics.median(steps)
    tolerance = max(STEP_TOLERANCE * median, SAME_POSITION_MM)
    irregular = [(i, step) for i, step in enumerate(steps) if abs(step - median) > tolerance]
    if not irregular:
        return median
    parts = []
    for index, step in irregular[:MAX_REPORTED_GAPS]:
        if step > median:
            missing = max(1, round(step / median) - 1)
            hint = f"{missing} missing slice{'s' if missing > 1 else ''}?"
        else:
            hint = "an extra or misplaced slice?"
        parts.append(f"{_mm(step)} mm between slices {index + 1} and {index + 2} ({hint})")
    more = len(irregular) - MAX_REPORTED_GAPS
    plural = "s" if more > 1 else ""
    raise ImageValidationError(
        f"{label} has non-uniform slice positions: {_mm(median)} mm apart except {', '.join(parts)}"
        f"{f' and {more} more irregular step{plural}' if more > 0 else ''}. Export or send the complete series again."
    )


def dicom_slice_layout(files: Sequence[str], name: str = "image", folder: Optional[PathLike] = None) -> DicomSliceLayout:
    """Check from the headers alone that ``files`` (one DICOM series) make one regular 3D volume.

    Reads every file's header (Image Position/Orientation Patient), projects the positions on the
    slice normal and sorts the files along it (ascending, as ITK expects). SimpleITK's series
    reader would build a wrong volume silently, or with a mere warning, from what is refused here.

    Args:
        files: the series' files (any order).
        name: how messages call the input ("ADC", "T2-FLAIR"...).
        folder: the series folder, for messages (default: the first file's folder).

    Returns:
        The files in slice order and the median slice step in mm (None for a single multi-frame file).

    Raises:
        ImageValidationError: a single slice, unreadable headers, missing or malformed position or
            orientation, slices in several orientations, several images at one slice position (4D),
            or non-uniform slice positions (missing slices). The message names the input, the folder,
            the numbers and the fix.
    """
    import SimpleITK as sitk  # lazy: this module stays importable without it

    files = [str(f) for f in files]
    if not files:
        raise ImageValidationError(f"{name} DICOM series{f' in {folder}' if folder else ''} holds no files.")
    label = f"{name} DICOM series in {folder if folder is not None else Path(files[0]).parent}"
    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    headers = [_read_slice_header(reader, path, label) for path in files]
    if any(h.frames > 1 for h in headers):
        return DicomSliceLayout(files, None)  # multi-frame (enhanced) DICOM: its geometry is GDCM's to read
    if len(headers) == 1:
        raise ImageValidationError(
            f"{label} holds a single slice: a localiser or one image exported by mistake; export the whole series."
        )
    placed = [(h.position, h.row, h.column) for h in headers if h.position and h.row and h.column]
    if len(placed) < len(headers):
        lacking = next(h for h in headers if not (h.position and h.row and h.column))
        raise ImageValidationError(
            f"{label}: {len(headers) - len(placed)} of {len(headers)} files lack a valid Image Position/Orientation "
            f"Patient (0020,0032 / 0020,0037), e.g. {Path(lacking.file).name}, so the slices cannot be placed. "
            "Export the series again with complete headers."
        )
    normal = _check_orientations([(row, column) for _, row, column in placed], label)
    along = sorted((_dot(position, normal), i) for i, (position, _, _) in enumerate(placed))
    groups: list[list[tuple[float, int]]] = []
    for distance, index in along:
        if groups and distance - groups[-1][0][0] <= SAME_POSITION_MM:
            groups[-1].append((distance, index))
        else:
            groups.append([(distance, index)])
    _check_duplicates([[headers[i] for _, i in group] for group in groups], headers, name, label)
    steps = [b[0][0] - a[0][0] for a, b in zip(groups, groups[1:])]
    return DicomSliceLayout([headers[i].file for _, i in along], _check_steps(steps, label))


def dicom_series_files(folder: PathLike, name: str = "image") -> list[str]:
    """The files of the single DICOM series in ``folder``, in slice order (ascending along the slice normal).

    The headers are checked first (see :func:`dicom_slice_layout`): a series that would not make
    one regular 3D volume is refused before any pixel data is read.

    Raises:
        ImageValidationError: the folder holds no DICOM series, or more than one (one series per
            folder), or the series is not one regular 3D volume (a single slice, missing slices,
            a 4D series, slices in several orientations).
    """
    import SimpleITK as sitk  # lazy: this module stays importable without it

    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise ImageValidationError(
            f"{name} folder {folder} holds no DICOM series; point to a DICOM series folder or a NIfTI/NRRD/MHA file."
        )
    if len(series) > 1:
        raise ImageValidationError(
            f"{name} folder {folder} holds {len(series)} DICOM series ({', '.join(series)}); put one series per folder."
        )
    files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0]))
    return dicom_slice_layout(files, name, folder).files


def read_dicom_series(folder: PathLike, name: str = "image"):
    """Read the single DICOM series in ``folder`` into a ``SimpleITK.Image`` (see :func:`dicom_series_files`).

    Raises:
        ImageValidationError: no series or more than one, or not one regular 3D volume (see
            :func:`dicom_slice_layout`).
        RuntimeError: SimpleITK could not read the files.
    """
    import SimpleITK as sitk  # lazy: this module stays importable without it

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(dicom_series_files(folder, name))
    return reader.Execute()
