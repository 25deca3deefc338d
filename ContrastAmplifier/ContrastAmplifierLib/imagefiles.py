"""Which files are images, and finding a named image in a folder. No SimpleITK at import time.

The one place that knows the image suffixes and how a case folder names its images: the
ContrastAmplifier module (in Slicer's GUI process, where SimpleITK may not be installed yet),
:mod:`ContrastAmplifierLib.imageio`, the training cohort reader and LesionReader all use it.
The DICOM series reader here imports SimpleITK only when called.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Optional, Union

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


def dicom_series_files(folder: PathLike, name: str = "image") -> list[str]:
    """The files of the single DICOM series in ``folder``, in slice order (SimpleITK/GDCM sorting).

    Raises:
        ImageValidationError: the folder holds no DICOM series, or more than one (one series per folder).
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
    return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0]))


def read_dicom_series(folder: PathLike, name: str = "image"):
    """Read the single DICOM series in ``folder`` into a ``SimpleITK.Image`` (see :func:`dicom_series_files`).

    Raises:
        ImageValidationError: no series or more than one.
        RuntimeError: SimpleITK could not read the files.
    """
    import SimpleITK as sitk  # lazy: this module stays importable without it

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(dicom_series_files(folder, name))
    return reader.Execute()
