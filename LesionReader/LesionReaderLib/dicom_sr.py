"""DICOM SR export of each reader's lesions (beyond the paper): TID 1500 measurement reports.

For every reader, phase and confirmed case whose phase volume (the first of the phase's
``shows``, the image the reader marks on) is a DICOM series folder, one Comprehensive 3D SR
document is written to ``OUT_DIR/sr/<reader>_<phase>_<case>.dcm`` (``lesion-reader export
--dicom-sr``). Its content is a TID 1500 Measurement Report (via highdicom) observed by the
reader (person observer name = reader id), holding:

- one TID 1501 measurement group per lesion (finding type SCT "Lesion", tracking identifier
  ``lesion N`` in the numbering of ``lesions.csv`` and a stable tracking UID), with two TID 300
  length measurements in mm, SCT 103339001 "Long axis" and SCT 103340004 "Short axis", each
  inferred from a SCOORD3D POLYLINE of its two end points in the frame of reference of the
  source series, and the source images (slices nearest to the end points);
- one TID 1501 group ``image quality`` whose qualitative evaluation DCM 111101 "Image Quality"
  carries the reader's 1-4 grade, coded in the private scheme :data:`GRADE_SCHEME` (DICOM has
  no code for "average"), declared in the document's Coding Scheme Identification Sequence.

Coordinates: readers mark in RAS mm (Slicer world); DICOM patient coordinates are LPS, so x and
y change sign (:func:`ras_to_lps`). The document inherits patient and study from the source
series and lists its instances as evidence. UIDs are derived from the content (same reads,
same UIDs; a changed read gets a new SOP instance UID within the same series).

Cases whose phase volume is not a DICOM series are skipped, with a note. Needs ``highdicom``
(``pip install 'SlicerContrastAmplifier[dicom]'``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np

from ContrastAmplifierCommon.atomicfile import atomic_path

from .geometry import Axis, Point
from .session import LesionRecord, lesion_from_row
from .storage import ReadKey, ReadsDatabase
from .study import GRADE_LABELS, Study, StudyError, dicom_series_files, is_dicom_series_folder, load_study

logger = logging.getLogger(__name__)

#: Sub-folder of the export folder that receives the SR documents.
SR_FOLDER = "sr"
#: Private coding scheme of the 1-4 image quality grades (paper: "4-point scales").
GRADE_SCHEME = "99LESIONREADER"
GRADE_SCHEME_NAME = "LesionReader image quality grades (1 poor, 2 average, 3 good, 4 excellent)"
MANUFACTURER = "SlicerContrastAmplifier LesionReader"
#: Series number of the SR documents (a high number keeps them after the image series in viewers).
SR_SERIES_NUMBER = 9001


class DicomSRError(StudyError):
    """An SR document cannot be written; the message names the input and the fix."""


@dataclass
class SourceSeries:
    """The DICOM series a reader marked on: headers (no pixels) in slice order.

    Attributes:
        folder: the series folder.
        files: file paths, in slice order.
        datasets: their headers (``pydicom.Dataset``, read without pixel data).
        series_uid, study_uid, frame_of_reference_uid: UIDs shared by all slices.
    """

    folder: Path
    files: list[str]
    datasets: list[Any]
    series_uid: str
    study_uid: str
    frame_of_reference_uid: str
    _normal: np.ndarray = field(default_factory=lambda: np.zeros(3), repr=False)
    _offsets: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)

    def nearest_slice(self, lps_point: Sequence[float]) -> int:
        """Index of the slice whose plane is closest to an LPS point."""
        return int(np.argmin(np.abs(self._offsets - float(np.dot(self._normal, lps_point)))))


@dataclass
class DicomSRExport:
    """What :func:`export_dicom_sr` did.

    Attributes:
        written: the SR files written.
        notes: human-readable notes (skipped cases), also passed to the ``note`` callback.
    """

    written: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def ras_to_lps(point: Sequence[float]) -> Point:
    """RAS mm (Slicer world) to DICOM patient LPS mm: x and y change sign."""
    x, y, z = (float(v) for v in point)
    return (-x, -y, z)


def _require_highdicom() -> Any:
    try:
        import highdicom
    except ImportError:
        raise DicomSRError(
            "DICOM SR export needs highdicom, which is not installed; run "
            "pip install 'SlicerContrastAmplifier[dicom]' (or pip install 'highdicom>=0.22')"
        ) from None
    return highdicom


def load_source_series(folder: Union[str, os.PathLike]) -> SourceSeries:
    """Read the headers of the single DICOM series in ``folder``.

    Raises:
        DicomSRError: not one series, or slices lacking the UIDs or geometry an SR refers to.
    """
    import pydicom

    folder = Path(folder)
    files = dicom_series_files(folder)
    datasets = [pydicom.dcmread(path, stop_before_pixels=True) for path in files]
    first = datasets[0]
    for tag in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "FrameOfReferenceUID",
                "ImagePositionPatient", "ImageOrientationPatient"):
        lacking = [Path(f).name for f, ds in zip(files, datasets) if not getattr(ds, tag, None)]
        if lacking:
            raise DicomSRError(
                f"DICOM series {folder}: {len(lacking)} file(s) lack {tag} (e.g. {lacking[0]}); an SR needs it to "
                "reference the images; re-export the series from the PACS or scanner with complete headers"
            )
    for tag in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        values = {str(getattr(ds, tag)) for ds in datasets}
        if len(values) > 1:
            raise DicomSRError(f"DICOM series {folder}: slices disagree on {tag} ({len(values)} values); keep one series per folder")
    orientation = np.asarray(first.ImageOrientationPatient, dtype=float)
    normal = np.cross(orientation[:3], orientation[3:])
    offsets = np.array([float(np.dot(normal, np.asarray(ds.ImagePositionPatient, dtype=float))) for ds in datasets])
    return SourceSeries(
        folder=folder, files=files, datasets=datasets, series_uid=str(first.SeriesInstanceUID),
        study_uid=str(first.StudyInstanceUID), frame_of_reference_uid=str(first.FrameOfReferenceUID),
        _normal=normal, _offsets=offsets,
    )


def _uid(*parts: object) -> str:
    """A deterministic UID (pydicom root) from the given parts."""
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=[str(p) for p in parts]))


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


def sr_file_name(reader: str, phase: str, case_id: str) -> str:
    """``<reader>_<phase>_<case>.dcm`` (characters other than letters, digits, ``.``, ``_``, ``-`` become ``_``)."""
    return f"{_safe(reader)}_{_safe(phase)}_{_safe(case_id)}.dcm"


def build_sr(
    source: SourceSeries,
    reader: str,
    phase: str,
    grade: int,
    lesions: Sequence[LesionRecord],
    *,
    series_description: Optional[str] = None,
) -> Any:
    """One reader's reading of one case as a Comprehensive 3D SR (TID 1500), see the module doc.

    Args:
        source: the series the reader marked on (:func:`load_source_series`).
        reader: reader id (person observer name).
        phase: phase name (series description and UIDs).
        grade: image quality grade 1-4.
        lesions: the lesions, numbered as in ``lesions.csv`` (``LesionRecord.number``), their geometry in RAS mm.
        series_description: default ``LesionReader <reader> <phase>``.

    Returns:
        A ``highdicom.sr.Comprehensive3DSR`` (a pydicom ``Dataset``).

    Raises:
        DicomSRError: highdicom is missing or the grade is not 1-4.
    """
    hd = _require_highdicom()
    from pydicom.dataset import Dataset
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    if int(grade) not in GRADE_LABELS:
        raise DicomSRError(f"grade {grade!r} of reader {reader}, phase {phase} is not 1-4; fix the read before exporting")
    source_code = Code("260753009", "SCT", "Source")
    base = (source.series_uid, reader, phase)

    def axis_measurement(name: Any, axis: Axis, length: float) -> Any:
        measurement = hd.sr.Measurement(name=name, value=round(float(length), 4), unit=codes.UCUM.Millimeter)
        scoord = hd.sr.Scoord3DContentItem(
            name=source_code,
            graphic_type=hd.sr.GraphicTypeValues3D.POLYLINE,
            graphic_data=np.array([ras_to_lps(p) for p in axis], dtype=float),
            frame_of_reference_uid=source.frame_of_reference_uid,
            relationship_type=hd.sr.RelationshipTypeValues.INFERRED_FROM,
        )
        item = measurement[0]
        if "ContentSequence" not in item:
            item.ContentSequence = hd.sr.ContentSequence()
        item.ContentSequence.append(scoord)
        return measurement

    groups = []
    for lesion in lesions:
        geometry = lesion.geometry
        points = [ras_to_lps(p) for p in geometry.end_points]
        slices = sorted({source.nearest_slice(p) for p in points})
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=_uid(*base, "lesion", lesion.id), identifier=f"lesion {lesion.number}"),
            finding_type=codes.SCT.Lesion,
            measurements=[
                axis_measurement(codes.SCT.LongAxis, geometry.long_axis, geometry.long_mm),
                axis_measurement(codes.SCT.ShortAxis, geometry.short_axis, geometry.short_mm),
            ],
            source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source.datasets[i]) for i in slices],
        ))
    grade_value = Code(str(int(grade)), GRADE_SCHEME, f"{GRADE_LABELS[int(grade)]} ({int(grade)}/4)")
    groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=_uid(*base, "grade"), identifier="image quality"),
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=codes.DCM.ImageQuality, value=grade_value)],
    ))
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Person,
        # Trailing caret: the reader id is the whole (family) name component, not a malformed name.
        observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(name=reader if "^" in reader else f"{reader}^"),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_person_context=observer),
        procedure_reported=codes.SCT.ImagingProcedure,
        imaging_measurements=groups,
    )
    content_key = hashlib.sha256(repr((int(grade), [(l.id, l.geometry.long_axis, l.geometry.short_axis) for l in lesions])).encode()).hexdigest()
    sr = hd.sr.Comprehensive3DSR(
        evidence=source.datasets,
        content=report[0],
        series_instance_uid=_uid(*base, "series"),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=_uid(*base, "instance", content_key),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        series_description=(series_description or f"LesionReader {reader} {phase}")[:64],
    )
    scheme = Dataset()
    scheme.CodingSchemeDesignator = GRADE_SCHEME
    scheme.CodingSchemeName = GRADE_SCHEME_NAME[:64]
    scheme.CodingSchemeResponsibleOrganization = MANUFACTURER[:64]
    sr.CodingSchemeIdentificationSequence = [scheme]
    return sr


def _write_dataset(dataset: Any, path: Path) -> None:
    """Write a DICOM Part 10 file (preamble + file meta) with pydicom 2 or 3."""
    import pydicom

    if int(pydicom.__version__.split(".")[0]) >= 3:
        pydicom.dcmwrite(str(path), dataset, enforce_file_format=True)
    else:  # pragma: no cover - pydicom 2
        pydicom.dcmwrite(str(path), dataset, write_like_original=False)


def _confirmed_reads(study: Study) -> tuple[list[Any], dict[ReadKey, list[LesionRecord]]]:
    with ReadsDatabase(study.database_path) as db:
        reads = db.confirmed_case_reads()
        by_case = db.lesions_by_read()
    lesions = {key: [lesion_from_row(row, n) for n, row in enumerate(rows, start=1)] for key, rows in by_case.items()}
    reader_rank = {r: i for i, r in enumerate(study.readers)}
    phase_rank = {p.name: i for i, p in enumerate(study.phases)}
    reads = sorted(reads, key=lambda r: (reader_rank.get(r["reader"], 99), r["reader"], phase_rank.get(r["phase"], 99), r["phase"], r["case_id"]))
    return reads, lesions


def export_dicom_sr(
    study_dir: Union[str, os.PathLike],
    out_dir: Union[str, os.PathLike],
    note: Optional[Callable[[str], None]] = None,
) -> DicomSRExport:
    """Write one SR per reader, phase and confirmed case read on a DICOM series, into ``OUT_DIR/sr/``.

    Args:
        study_dir: the study folder.
        out_dir: the export folder (the ``sr`` sub-folder is created when a document is written).
        note: called with each note (skipped cases); default: ``logging`` warning.

    Returns:
        The files written and the notes.

    Raises:
        StudyError: no valid study; DicomSRError: highdicom missing, or a DICOM series unusable
            (message names the folder and the fix).
    """
    study = load_study(study_dir)
    _require_highdicom()
    out = Path(out_dir) / SR_FOLDER
    result = DicomSRExport()
    emit = note or logger.warning
    reads, lesions = _confirmed_reads(study)
    sources: dict[Path, Optional[SourceSeries]] = {}
    skipped: dict[tuple[str, str], list[str]] = {}
    for row in reads:
        reader, phase_name, case_id = row["reader"], row["phase"], row["case_id"]
        try:
            phase = study.phase(phase_name)
            case = study.case(case_id)
        except StudyError:
            continue  # reads of a phase or case no longer in study.json: nothing to refer to
        modality = phase.shows[0]
        if modality not in case.volumes:
            skipped.setdefault((phase_name, modality), []).append(case_id)
            continue
        path = study.volume_path(case_id, modality)
        if path not in sources:
            sources[path] = load_source_series(path) if is_dicom_series_folder(path) else None
        source = sources[path]
        if source is None:
            skipped.setdefault((phase_name, modality), []).append(case_id)
            continue
        sr = build_sr(source, reader, phase_name, int(row["grade"]), lesions.get(ReadKey(reader, phase_name, case_id), []))
        out.mkdir(parents=True, exist_ok=True)
        target = out / sr_file_name(reader, phase_name, case_id)
        with atomic_path(target, ".dcm") as tmp:
            _write_dataset(sr, tmp)
        result.written.append(target)
    for (phase_name, modality), case_ids in skipped.items():
        unique = sorted(set(case_ids))
        message = (
            f"DICOM SR: phase {phase_name}: {len(unique)} case(s) skipped, their {modality} volume is not a DICOM series "
            f"folder ({', '.join(unique[:5])}{', ...' if len(unique) > 5 else ''}); SR needs the case volume to be a DICOM series"
        )
        result.notes.append(message)
        emit(message)
    return result
