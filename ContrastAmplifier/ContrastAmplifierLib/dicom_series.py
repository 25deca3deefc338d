"""T1c-pro as a DICOM series (``contrast-amplifier predict --out-dicom DIR``): MR images a PACS can store.

One MR Image Storage instance (PS3.3 A.4, SOP Class 1.2.840.10008.5.1.4.1.1.4) per slice of the
T1c's grid, Explicit VR Little Endian, written with pydicom (no hand-made bytes). What the
series carries, by module:

* Patient (C.7.1.1), General Study (C.7.2.1), Patient Study (C.7.2.2), Clinical Trial Subject and
  Study (C.7.1.3, C.7.2.3), Frame of Reference (C.7.4.1): when the T1c is a DICOM series folder,
  copied from it (same Study Instance UID, patient, Frame of Reference UID and Specific Character
  Set), so the series lands in the T1c's study, on its frame. When the T1c is a NIfTI/NRRD/MHA
  file (or an image in memory) there is no patient to copy: a new study with a de-identified
  patient module (Patient Name :data:`DEIDENTIFIED_PATIENT_NAME`, Patient Identity Removed
  ``YES``, De-identification Method :data:`DEIDENTIFICATION_METHOD`) and new Study and Frame of
  Reference UIDs; Image Comments say it was made from a non-DICOM file.
* General Series (C.7.3.1): Modality MR, a new Series Instance UID, Series Description
  ``T1c-pro (contrast amplified, <model>)`` plus ``NOT FOR CLINICAL USE`` whenever the model's
  intended use says so (:func:`series_description`), Related Series Sequence (0008,1250) naming
  every DICOM input series (purpose DCM 121323 "Source series for image processing operation"),
  and the T1c's Patient Position and Body Part Examined (``HEAD`` when it has none).
* General Equipment (C.7.5.1): Manufacturer :data:`MANUFACTURER`, Software Versions (this package
  and the model).
* General Image (C.7.6.1) and General Reference (C.12.4): Image Type ``DERIVED\\SECONDARY\\OTHER``
  (MR images need a value 3, C.8.3.1.1.1),
  Instance Number (1 = the first slice along the slice normal), Derivation Description (what
  computed the image, from which series), Source Image Sequence (0008,2112): the T1c slice at
  the same position and, for each other DICOM input on the T1c's Frame of Reference, its slice
  nearest to this one (purpose DCM 121322 "Source image for image processing operation"), and
  Image Comments with the model's intended use.
* Image Plane (C.7.6.2): a DICOM T1c's own Image Position/Orientation (Patient), Pixel Spacing,
  Slice Thickness and Slice Location, copied per slice (T1c-pro must lie on that grid); otherwise
  computed from the SimpleITK image. ITK's physical space is LPS, DICOM's patient coordinates
  too: no sign changes.
* Image Pixel (C.7.6.3) and MR Image (C.8.3.1): the T1c's stored integer type (Bits Allocated and
  Pixel Representation of the DICOM T1c, or the integer type of a NIfTI T1c file; 16 bits at
  least, all bits stored) with one Rescale Slope/Intercept for the series, chosen so the stored
  integers span the type's range (:func:`choose_scaling`): decoded values differ from T1c-pro by
  at most slope/2. The T1c's MR acquisition attributes (scanning sequence, TR, TE...) are
  copied; without them ``RM`` (research mode)/``NONE`` and empty Type 2 values. dciodvfy warns
  that the MR IOD has no Modality LUT module: Rescale Slope/Intercept are a "standard extended"
  addition, which Slicer, ITK/GDCM, pydicom and PACS viewers apply (scanners write them too).
  Contrast/Bolus (C.7.6.4): the T1c's (an empty Contrast/Bolus Agent when unknown). VOI LUT
  (C.11.2): the T1c's first window (T1c-pro is on the T1c's intensity scale), else one from
  T1c-pro's 0.5th-99.5th percentiles.
* SOP Common (C.12.1): SOP Class/Instance UIDs, Instance Creation Date/Time.

UIDs (pydicom ``generate_uid`` from hashed "entropy sources", under pydicom's root) are unique
per instance and reproducible: Series and SOP Instance UIDs are derived from the source (the T1c
series' UID, or the SHA-256 of a non-DICOM T1c file, or of a T1c image in memory), the SHA-256
of T1c-pro's voxels (float32; the geometry is the source's), the model's name, version and
intended use, the stored type, and (SOP) the instance number. Rerunning the same prediction
(same voxels, bit for bit) gives the same UIDs, also when the series is made later from the
T1c-pro file, so a resend to a PACS duplicates nothing; a changed T1c-pro gets new ones. The
de-identified study's Study and Frame of Reference UIDs (and its pseudonymous Patient ID
``CA-<12 hex>``) depend on the T1c alone: every T1c-pro of one NIfTI T1c lands in one study.

The series is written into a hidden staging folder and moved into place whole, each file
atomically (:func:`ContrastAmplifierCommon.outputs.staged_folder`, ``atomic_path``): a failure or
a cancel leaves no half-written series. The output folder must be new or empty; with
``overwrite`` it may hold an earlier T1c-pro series (only :data:`FILE_PATTERN` files), which is
swapped for the new one in two renames. pydicom is imported when called (Slicer ships it; pip:
``pip install 'SlicerContrastAmplifier[dicom]'``); SimpleITK too.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import re
import shutil
import tempfile
import unicodedata
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import numpy as np

from . import __version__
from .imagefiles import SAME_POSITION_MM, dicom_series_files, is_dicom_series_folder
from ContrastAmplifierCommon.atomicfile import apply_umask, atomic_path
from ContrastAmplifierCommon.outputs import OutputPathError, check_output_folder, staged_folder
from ContrastAmplifierCommon.progress import CancelToken, check_cancel

if TYPE_CHECKING:
    import SimpleITK as sitk

__all__ = [
    "DicomOutputError", "require_pydicom", "ModelLabel", "StoredScaling", "SourceSeries", "DicomSeriesResult", "check_dicom_output_folder",
    "choose_scaling", "series_description", "read_source_series", "write_t1c_pro_series", "series_file_name",
]

PathLike = Union[str, os.PathLike]

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
#: One file per instance, numbered like Instance Number; the only files ``overwrite`` may replace.
FILE_PATTERN = "T1c-pro_{:04d}.dcm"
_OWN_FILE = re.compile(r"T1c-pro_\d{4,}\.dcm")
MANUFACTURER = "SlicerContrastAmplifier"
#: Image Type (0008,0008): derived, secondary; MR images need a value 3 (C.8.3.1.1.1 defined terms: OTHER).
IMAGE_TYPE = ("DERIVED", "SECONDARY", "OTHER")
MODEL_NAME = "ContrastAmplifier"
#: Body Part Examined when the T1c does not say (the model takes brain MRI).
BODY_PART = "HEAD"
DEIDENTIFIED_PATIENT_NAME = "ANONYMOUS^CONTRASTAMPLIFIER"
#: De-identification Method (0012,0063) of a series made from a non-DICOM T1c (LO: 64 characters at most).
DEIDENTIFICATION_METHOD = "No patient data: made from a non-DICOM image file"
#: Intended-use statements that restrict the use, and so put the warning in the Series Description
#: ("synthetic phantom demo - not for clinical use", "research only", "investigational device"...).
NOT_FOR_CLINICAL_USE = re.compile(
    r"not\s+(intended\s+)?for\s+(clinical|diagnostic|patient)|research\s+(use\s+)?only|for\s+research\s+use|"
    r"investigational|not\s+approved|not\s+cleared|demo(nstration)?\s+only|tests?\s+only", re.IGNORECASE)
CLINICAL_WARNING = "NOT FOR CLINICAL USE"
#: Series Number of T1c-pro: the T1c's times this, plus one (series 5 -> 501); without one, :data:`DEFAULT_SERIES_NUMBER`.
SERIES_NUMBER_FACTOR = 100
DEFAULT_SERIES_NUMBER = 9002
#: Largest distance (mm) between a slice position of T1c-pro and the DICOM T1c's.
POSITION_TOLERANCE_MM = SAME_POSITION_MM
#: Largest difference between T1c-pro's axis directions (or relative pixel spacing) and the T1c's.
DIRECTION_TOLERANCE = 1e-3
#: VOI window computed from T1c-pro when the T1c has none: these percentiles of its voxels.
WINDOW_PERCENTILES = (0.5, 99.5)

_LO = 64  # Long String, Series Description, De-identification Method ...
_ST = 1024  # Short Text: Derivation Description

_PURPOSE_SOURCE_IMAGE = ("121322", "DCM", "Source image for image processing operation")  # CID 7202
_PURPOSE_SOURCE_SERIES = ("121323", "DCM", "Source series for image processing operation")  # CID 7210

#: Patient (C.7.1.1), General Study (C.7.2.1), Patient Study (C.7.2.2) and Frame of Reference
#: (C.7.4.1) attributes copied from a DICOM T1c when present (with every ``ClinicalTrial*`` one).
_INHERITED = (
    "SpecificCharacterSet",
    "PatientName", "PatientID", "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence", "TypeOfPatientID",
    "PatientBirthDate", "PatientBirthTime", "PatientSex", "OtherPatientIDsSequence", "OtherPatientNames",
    "EthnicGroup", "PatientComments", "PatientSpeciesDescription", "PatientSpeciesCodeSequence",
    "PatientBreedDescription", "PatientBreedCodeSequence", "BreedRegistrationSequence", "ResponsiblePerson",
    "ResponsiblePersonRole", "ResponsibleOrganization", "PatientIdentityRemoved", "DeidentificationMethod",
    "DeidentificationMethodCodeSequence", "QualityControlSubject",
    "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "ReferringPhysicianIdentificationSequence",
    "ConsultingPhysicianName", "ConsultingPhysicianIdentificationSequence", "StudyID", "AccessionNumber",
    "IssuerOfAccessionNumberSequence", "StudyDescription", "PhysiciansOfRecord", "PhysiciansOfRecordIdentificationSequence",
    "NameOfPhysiciansReadingStudy", "PhysiciansReadingStudyIdentificationSequence", "RequestingServiceCodeSequence",
    "ProcedureCodeSequence", "ReasonForPerformedProcedureCodeSequence",
    "AdmittingDiagnosesDescription", "AdmittingDiagnosesCodeSequence", "PatientAge", "PatientSize", "PatientWeight",
    "PatientSizeCodeSequence", "MedicalAlerts", "Allergies", "SmokingStatus", "PregnancyStatus", "LastMenstrualDate",
    "PatientState", "Occupation", "AdditionalPatientHistory", "AdmissionID", "IssuerOfAdmissionIDSequence",
    "ServiceEpisodeID", "ServiceEpisodeDescription", "IssuerOfServiceEpisodeIDSequence", "PatientSexNeutered",
    "ReasonForVisit", "ReasonForVisitCodeSequence",
    "FrameOfReferenceUID", "PositionReferenceIndicator",
    # General Series (C.7.3.1): how the patient lay and what was imaged hold for T1c-pro too.
    "PatientPosition", "BodyPartExamined", "AnatomicalOrientationType",
)
#: Type 2 attributes of those modules, present (empty) when the T1c lacks them.
_TYPE2_EMPTY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                "ReferringPhysicianName", "StudyID", "AccessionNumber", "PositionReferenceIndicator", "PatientPosition")
#: MR Image (C.8.3.1) acquisition attributes and Contrast/Bolus (C.7.6.4) copied from the T1c slice.
_ACQUISITION = (
    "ScanningSequence", "SequenceVariant", "ScanOptions", "MRAcquisitionType", "SequenceName", "AngioFlag",
    "RepetitionTime", "EchoTime", "InversionTime", "NumberOfAverages", "ImagingFrequency", "ImagedNucleus",
    "EchoNumbers", "MagneticFieldStrength", "NumberOfPhaseEncodingSteps", "EchoTrainLength", "PercentSampling",
    "PercentPhaseFieldOfView", "PixelBandwidth", "ReceiveCoilName", "TransmitCoilName", "AcquisitionMatrix",
    "InPlanePhaseEncodingDirection", "FlipAngle", "VariableFlipAngleFlag", "SAR", "dBdt",
    "ContrastBolusAgent", "ContrastBolusAgentSequence", "ContrastBolusRoute", "ContrastBolusAdministrationRouteSequence",
    "ContrastBolusVolume", "ContrastBolusStartTime", "ContrastBolusStopTime", "ContrastBolusTotalDose",
    "ContrastFlowRate", "ContrastFlowDuration", "ContrastBolusIngredient", "ContrastBolusIngredientConcentration",
)
#: MR Image Type 2 attributes (C.8.3.1), present (empty) when unknown; Contrast/Bolus Agent (Type 2 of
#: C.7.6.4, a module a contrast-enhanced T1c needs).
_MR_TYPE2_EMPTY = ("ScanOptions", "MRAcquisitionType", "RepetitionTime", "EchoTime", "EchoTrainLength", "ContrastBolusAgent")


class DicomOutputError(ValueError):
    """T1c-pro cannot be written as a DICOM series; the message names the input and the fix."""


def require_pydicom() -> Any:
    """The ``pydicom`` module; a :class:`DicomOutputError` naming the fix when it is not installed."""
    try:
        import pydicom
    except ImportError:
        raise DicomOutputError(
            "DICOM output needs pydicom, which is not installed; run pip install 'SlicerContrastAmplifier[dicom]' "
            "(or pip install pydicom), or drop --out-dicom"
        ) from None
    return pydicom


# -- the model's label ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelLabel:
    """What the series says about the model: name, version and intended use (``bundle.json``)."""

    name: str = "unknown model"
    version: str = ""
    intended_use: str = ""

    @classmethod
    def of(cls, bundle: Any) -> ModelLabel:
        """From a :class:`~.bundle.ModelBundle` (its manifest), a registry entry (attributes), a
        mapping, a :class:`ModelLabel`, or ``None`` (unknown model)."""
        if bundle is None or isinstance(bundle, ModelLabel):
            return bundle or cls()
        data = getattr(bundle, "manifest", bundle)
        if isinstance(data, Mapping):
            get = data.get
        else:
            def get(key: str, default: Any = None) -> Any:
                return getattr(data, key, default)
        return cls(name=str(get("name", "") or "unknown model"), version=str(get("version", "") or ""),
                   intended_use=str(get("intended_use", "") or ""))

    @property
    def not_for_clinical_use(self) -> bool:
        """Whether the intended use says research only / not for clinical use (:data:`NOT_FOR_CLINICAL_USE`)."""
        return bool(NOT_FOR_CLINICAL_USE.search(self.intended_use))

    @property
    def title(self) -> str:
        """``name version`` (ASCII)."""
        return _text(f"{self.name} {self.version}".strip())


def _text(value: str, limit: Optional[int] = None) -> str:
    """``value`` as plain ASCII without backslashes or control characters (our own text attributes; the
    T1c's are copied with its character set), cut to ``limit`` characters."""
    plain = unicodedata.normalize("NFKD", value).encode("ascii", "ignore").decode("ascii")
    plain = re.sub(r"[\x00-\x1f\x7f]+", " ", plain.replace("\\", "/")).strip()
    return plain if limit is None or len(plain) <= limit else plain[: limit - 3].rstrip() + "..."


def series_description(model: ModelLabel) -> str:
    """``T1c-pro (contrast amplified, <model>)``, with the intended use (or ``NOT FOR CLINICAL USE``)
    when it says not for clinical use; at most 64 characters (LO), the warning always kept."""
    name = _text(model.name)
    if not model.not_for_clinical_use:
        return _text(f"T1c-pro (contrast amplified, {name})", _LO) if len(name) < _LO - 30 else _text(f"T1c-pro ({name})", _LO)
    label = _text(model.intended_use)
    for candidate in (f"T1c-pro (contrast amplified, {name}) - {label}", f"T1c-pro ({name}) - {label}",
                      f"T1c-pro (contrast amplified, {name}) {CLINICAL_WARNING}", f"T1c-pro ({name}) {CLINICAL_WARNING}"):
        if len(candidate) <= _LO:
            return candidate
    room = _LO - len(f"T1c-pro () {CLINICAL_WARNING}")
    return f"T1c-pro ({_text(name, room)}) {CLINICAL_WARNING}"


# -- stored integers ------------------------------------------------------------------------------


def _ds(value: float) -> str:
    """A Decimal String (16 characters at most) for ``value``."""
    from pydicom.valuerep import format_number_as_ds

    text = str(format_number_as_ds(float(value)))
    return "0" if float(text) == 0 else text


def _ds_at_least(value: float) -> tuple[str, float]:
    """The DS text of a number >= ``value`` (> 0) and that number."""
    target = value
    for _ in range(8):
        text = _ds(target)
        if float(text) >= value:
            return text, float(text)
        target *= 1 + 1e-9
    raise AssertionError(f"no decimal string >= {value!r}")  # pragma: no cover - format_number_as_ds keeps 10+ digits


@dataclass(frozen=True)
class StoredScaling:
    """How T1c-pro's real values become stored integers: ``real = stored * slope + intercept``.

    Attributes:
        bits: Bits Allocated (= Bits Stored; High Bit = bits - 1).
        signed: Pixel Representation 1 (two's complement) or 0 (unsigned).
        slope, intercept: Rescale Slope (0028,1053) and Intercept (0028,1052) as the file holds them.
        slope_text, intercept_text: their Decimal String values.
    """

    bits: int
    signed: bool
    slope: float
    intercept: float
    slope_text: str
    intercept_text: str

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(f"<{'i' if self.signed else 'u'}{self.bits // 8}")

    @property
    def limits(self) -> tuple[int, int]:
        info = np.iinfo(self.dtype)
        return int(info.min), int(info.max)

    @property
    def max_error(self) -> float:
        """Largest difference between a decoded and a real value: half a step."""
        return self.slope / 2

    def to_stored(self, values: np.ndarray) -> np.ndarray:
        """Real values to stored integers (rounded, within the type's range)."""
        low, high = self.limits
        stored = np.rint((np.asarray(values, np.float64) - self.intercept) / self.slope)
        return np.clip(stored, low, high).astype(self.dtype)

    def to_real(self, stored: np.ndarray) -> np.ndarray:
        """What a reader decodes (the Modality LUT of PS3.3 C.11.1)."""
        return np.asarray(stored, np.float64) * self.slope + self.intercept


def choose_scaling(values: np.ndarray, bits: int = 16, signed: bool = True) -> StoredScaling:
    """Rescale Slope/Intercept for ``values`` in the ``bits``-bit (un)signed type, using its whole range.

    The smallest value maps to the type's minimum plus one and the largest to at most its maximum
    minus one (one level kept free at each end for the decimal rounding of slope and intercept),
    so every value is stored without clipping and decodes within slope/2. A constant image gets
    slope 1.

    Raises:
        DicomOutputError: ``values`` holds NaN or infinite values.
    """
    values = np.asarray(values)
    if values.size == 0 or not np.isfinite(values).all():
        raise DicomOutputError("T1c-pro holds no values or non-finite ones (NaN/inf); it cannot be stored as integers")
    info = np.iinfo(np.dtype(f"{'i' if signed else 'u'}{bits // 8}"))
    low, high = float(values.min()), float(values.max())  # in the array's own type: no float64 copy of a volume
    levels = float(info.max) - float(info.min) - 2
    step = (high - low) / levels
    slope_text, slope = _ds_at_least(step) if step > 0 else ("1", 1.0)  # constant (or all but constant): slope 1
    intercept_text = _ds(low - (float(info.min) + 1) * slope)
    return StoredScaling(bits, signed, slope, float(intercept_text), slope_text, intercept_text)


# -- the DICOM inputs -----------------------------------------------------------------------------


@dataclass
class SourceSeries:
    """A DICOM input series: its headers (no pixels) in slice order, as
    :func:`~.imagefiles.read_dicom_series` stacks them.

    Attributes:
        name: how messages call it ("T1c").
        folder: the series folder.
        datasets: ``pydicom.Dataset`` headers, in slice order (one, for a multi-frame file).
    """

    name: str
    folder: Path
    datasets: list[Any]
    _normal: Optional[np.ndarray] = field(default=None, repr=False)
    _offsets: Optional[np.ndarray] = field(default=None, repr=False)

    @property
    def first(self) -> Any:
        return self.datasets[0]

    @property
    def multiframe(self) -> bool:
        return len(self.datasets) == 1 and int(getattr(self.first, "NumberOfFrames", 1) or 1) > 1

    @property
    def series_uid(self) -> str:
        return str(self.first.SeriesInstanceUID)

    @property
    def study_uid(self) -> str:
        return str(self.first.StudyInstanceUID)

    @property
    def frame_of_reference_uid(self) -> Optional[str]:
        uid = getattr(self.first, "FrameOfReferenceUID", None)
        return str(uid) if uid else None

    def slice_near(self, point: Sequence[float]) -> Optional[Any]:
        """The slice whose plane lies within half a slice step of an LPS ``point`` (the nearest), else None.

        None too for a multi-frame file or slices without position/orientation.
        """
        if self._offsets is None:
            self._normal, self._offsets = _slice_offsets(self.datasets)
        if self._normal is None or self._offsets is None or len(self._offsets) < 2:
            return None
        distances = np.abs(self._offsets - float(np.dot(self._normal, np.asarray(point, float))))
        nearest = int(np.argmin(distances))
        half_step = float(np.median(np.abs(np.diff(self._offsets)))) / 2
        return self.datasets[nearest] if distances[nearest] <= half_step + POSITION_TOLERANCE_MM else None


def _slice_offsets(datasets: Sequence[Any]) -> tuple[Optional[np.ndarray], Optional[np.ndarray]]:
    """Slice normal and each slice's position along it (None, None when any slice lacks them)."""
    try:
        orientation = np.asarray([float(v) for v in datasets[0].ImageOrientationPatient])
        normal = np.cross(orientation[:3], orientation[3:])
        offsets = np.array([float(np.dot(normal, [float(v) for v in ds.ImagePositionPatient])) for ds in datasets])
    except (AttributeError, TypeError, ValueError):
        return None, None
    return normal, offsets


def read_source_series(folder: PathLike, name: str = "T1c") -> SourceSeries:
    """Read the headers of the single DICOM series in ``folder`` (checked by :func:`~.imagefiles.dicom_series_files`).

    Raises:
        ImageValidationError: not one regular series (see :func:`~.imagefiles.dicom_slice_layout`).
        DicomOutputError: files lacking the UIDs a derived series refers to, or disagreeing on them.
    """
    pydicom = require_pydicom()
    folder = Path(folder)
    files = dicom_series_files(folder, name)
    datasets = [pydicom.dcmread(path, stop_before_pixels=True) for path in files]
    for tag in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
        lacking = [Path(f).name for f, ds in zip(files, datasets) if not getattr(ds, tag, None)]
        if lacking:
            raise DicomOutputError(
                f"{name} DICOM series {folder}: {len(lacking)} file(s) lack {tag} (e.g. {lacking[0]}), which the T1c-pro "
                "series refers to; export the series again from the PACS or scanner with complete headers"
            )
    for tag in ("StudyInstanceUID", "SeriesInstanceUID"):
        if len({str(getattr(ds, tag)) for ds in datasets}) > 1:
            raise DicomOutputError(f"{name} DICOM series {folder}: slices disagree on {tag}; keep one series per folder")
    return SourceSeries(name=name, folder=folder, datasets=datasets)


# -- the output folder ----------------------------------------------------------------------------


def _shown(names: Sequence[str]) -> str:
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def check_dicom_output_folder(
    out_dir: PathLike,
    inputs: Iterable[PathLike] = (),
    overwrite: bool = False,
    outputs: Iterable[PathLike] = (),
    what: str = "DICOM output folder",
) -> Path:
    """Check, before any work, that ``out_dir`` can receive the T1c-pro series (and that pydicom is there).

    Args:
        out_dir: the series folder: new, or an existing empty one; with ``overwrite`` also one
            holding an earlier T1c-pro series (files named like :data:`FILE_PATTERN` only).
        inputs: input files and folders it may not be, nor contain.
        overwrite: allow replacing an earlier T1c-pro series there.
        outputs: the command's other outputs (the T1c-pro file), which may not land inside it.
        what: how messages call the folder.

    Returns:
        The absolute folder.

    Raises:
        OutputPathError: a file, not writable, the current directory, an input or one of its
            folders, not empty (without ``overwrite``), or holding other files (the message
            names the folder and the fix).
        DicomOutputError: pydicom is not installed.
    """
    require_pydicom()
    inputs = list(inputs)
    out = check_output_folder(out_dir, [], inputs=inputs, overwrite=overwrite, what=what)
    for other in outputs:
        path = Path(os.path.abspath(os.fspath(other))).resolve()
        if out in path.parents:
            raise OutputPathError(f"{what} {out} would hold the T1c-pro file {path}; the folder receives the DICOM series "
                                  "alone (a PACS import takes every file in it). Put the file elsewhere.")
    if not out.is_dir():
        return out
    entries = sorted(p.name for p in out.iterdir())
    if entries and not overwrite:
        raise OutputPathError(f"{what} {out} is not empty ({_shown(entries)}); pass --overwrite to replace the T1c-pro "
                              "series written there, or choose a new or empty folder.")
    foreign = [name for name in entries if not (_OWN_FILE.fullmatch(name) and (out / name).is_file())]
    if foreign:
        raise OutputPathError(f"{what} {out} holds {_shown(foreign)}, which this command did not write; --overwrite only "
                              "replaces a T1c-pro series (T1c-pro_NNNN.dcm files). Choose a new or empty folder.")
    return out


def series_file_name(instance_number: int) -> str:
    """``T1c-pro_0001.dcm`` for instance 1 (:data:`FILE_PATTERN`)."""
    return FILE_PATTERN.format(instance_number)


@contextmanager
def _series_folder(out: Path) -> Iterator[Path]:
    """A hidden staging folder whose files become ``out``'s, all at once or not at all.

    A new or empty ``out`` receives them through :func:`staged_folder`; one holding an earlier
    series (checked by :func:`check_dicom_output_folder`) is swapped for the staging folder:
    ``out`` is renamed aside, the staging folder renamed onto it (or ``out`` renamed back if that
    fails), then the old series removed.
    """
    if not out.is_dir() or not any(out.iterdir()):
        with staged_folder(out) as staging:
            yield staging
        return
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield staging
        apply_umask(staging, directory=True)
        aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rmdir(aside)  # a free name beside ``out``
        os.replace(out, aside)
        try:
            os.replace(staging, out)
        except BaseException:
            os.replace(aside, out)
            raise
        shutil.rmtree(aside, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# -- the datasets ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Slice:
    """One output instance's plane (DS text values) and the T1c header at its position (if DICOM)."""

    position: list[str]
    orientation: list[str]
    pixel_spacing: list[str]
    source: Optional[Any] = None


def _grid_slices(image: sitk.Image) -> list[_Slice]:
    """Image Plane values computed from the SimpleITK grid (LPS, like DICOM patient coordinates)."""
    direction = np.asarray(image.GetDirection(), float).reshape(3, 3)
    spacing = image.GetSpacing()
    orientation = [_ds(v) for v in (*direction[:, 0], *direction[:, 1])]
    pixel_spacing = [_ds(spacing[1]), _ds(spacing[0])]  # row spacing (between rows, along y), then column spacing
    return [_Slice([_ds(v) for v in image.TransformIndexToPhysicalPoint((0, 0, k))], orientation, pixel_spacing)
            for k in range(image.GetSize()[2])]


def _source_slices(image: sitk.Image, source: SourceSeries) -> list[_Slice]:
    """The DICOM T1c's own Image Plane values, slice by slice, after checking T1c-pro lies on that grid.

    Raises:
        DicomOutputError: other size, slice positions, orientation or pixel spacing.
    """
    size, spacing = image.GetSize(), image.GetSpacing()
    direction = np.asarray(image.GetDirection(), float).reshape(3, 3)
    fix = ("write the series from the T1c-pro computed on this T1c (amplify_case's output), or give the T1c it was "
           "computed from")
    if len(source.datasets) != size[2]:
        raise DicomOutputError(f"T1c-pro has {size[2]} slices but the {source.name} series {source.folder} has "
                               f"{len(source.datasets)}; {fix}")
    slices = []
    for k, ds in enumerate(source.datasets):
        shape = (int(getattr(ds, "Columns", 0)), int(getattr(ds, "Rows", 0)))
        position = np.asarray([float(v) for v in ds.ImagePositionPatient])
        orientation = np.asarray([float(v) for v in ds.ImageOrientationPatient])
        pixel_spacing = np.asarray([float(v) for v in ds.PixelSpacing])
        expected = np.asarray(image.TransformIndexToPhysicalPoint((0, 0, k)))
        off = float(np.linalg.norm(position - expected))
        if (shape != tuple(size[:2]) or off > POSITION_TOLERANCE_MM
                or np.abs(orientation - np.concatenate([direction[:, 0], direction[:, 1]])).max() > DIRECTION_TOLERANCE
                or np.abs(pixel_spacing / np.asarray([spacing[1], spacing[0]]) - 1).max() > DIRECTION_TOLERANCE):
            raise DicomOutputError(
                f"T1c-pro does not lie on the grid of the {source.name} series {source.folder}: slice {k + 1} "
                f"({shape[0]} x {shape[1]} pixels at {np.round(position, 3).tolist()} mm) is {off:.3f} mm from T1c-pro's "
                f"({size[0]} x {size[1]} at {np.round(expected, 3).tolist()} mm) or differs in orientation or pixel spacing; {fix}"
            )
        slices.append(_Slice(list(ds.ImagePositionPatient), list(ds.ImageOrientationPatient), list(ds.PixelSpacing), ds))
    return slices


def _code(value: str, scheme: str, meaning: str) -> Any:
    from pydicom.dataset import Dataset

    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _copy_attributes(target: Any, source: Any, keywords: Iterable[str]) -> None:
    """Copy the listed attributes that ``source`` holds (unknown keywords of this pydicom are skipped)."""
    from pydicom.datadict import tag_for_keyword

    for keyword in keywords:
        tag = tag_for_keyword(keyword)
        if tag is not None and tag in source:
            target.add(copy.deepcopy(source[tag]))


def _set_empty(target: Any, keywords: Iterable[str]) -> None:
    for keyword in keywords:
        if keyword not in target:
            setattr(target, keyword, None)


def _patient_and_study(ds: Any, t1c: Optional[SourceSeries], key: str) -> None:
    """Patient, General/Patient Study, Clinical Trial and Frame of Reference attributes (module doc)."""
    from pydicom.uid import generate_uid

    if t1c is not None:
        _copy_attributes(ds, t1c.first, _INHERITED)
        _copy_attributes(ds, t1c.first, sorted(k for k in t1c.first.dir() if k.startswith("ClinicalTrial")))
        if "FrameOfReferenceUID" not in ds:  # a T1c without one: a new frame, reproducible
            ds.FrameOfReferenceUID = generate_uid(entropy_srcs=["T1c-pro frame of reference", key])
        _set_empty(ds, _TYPE2_EMPTY)
        return
    ds.PatientName = DEIDENTIFIED_PATIENT_NAME
    ds.PatientID = f"CA-{hashlib.sha256(key.encode()).hexdigest()[:12].upper()}"
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = DEIDENTIFICATION_METHOD
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["T1c-pro study", key])
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=["T1c-pro frame of reference", key])
    ds.StudyDescription = "ContrastAmplifier T1c-pro (non-DICOM input)"
    _set_empty(ds, _TYPE2_EMPTY)


def _series_number(t1c: Optional[SourceSeries]) -> int:
    try:
        number = int(t1c.first.SeriesNumber) * SERIES_NUMBER_FACTOR + 1 if t1c is not None else 1
    except (AttributeError, TypeError, ValueError):
        return DEFAULT_SERIES_NUMBER
    return number if 0 <= number < 2**31 else DEFAULT_SERIES_NUMBER


def _window(ds: Any, t1c: Optional[SourceSeries], values: np.ndarray) -> None:
    """VOI LUT (C.11.2): the T1c's first window (same intensity scale), else T1c-pro's percentiles."""
    source = t1c.first if t1c is not None else None
    if source is not None and "WindowCenter" in source and "WindowWidth" in source:
        center, width = source.WindowCenter, source.WindowWidth
        center = center[0] if isinstance(center, Sequence) and not isinstance(center, str) else center
        width = width[0] if isinstance(width, Sequence) and not isinstance(width, str) else width
        ds.WindowCenter, ds.WindowWidth = _ds(float(center)), _ds(max(float(width), 1.0))
        return
    low, high = np.percentile(values, WINDOW_PERCENTILES)
    ds.WindowCenter, ds.WindowWidth = _ds((low + high) / 2), _ds(max(float(high - low), 1.0))


def _mr_acquisition(ds: Any, source: Optional[Any]) -> None:
    """MR Image (C.8.3.1) and Contrast/Bolus (C.7.6.4) attributes of the T1c slice, or placeholders."""
    if source is not None:
        _copy_attributes(ds, source, _ACQUISITION)
    if "ScanningSequence" not in ds or "SequenceVariant" not in ds:
        ds.ScanningSequence, ds.SequenceVariant = "RM", "NONE"  # research mode: a computed image
    sequence = ds.ScanningSequence
    if "IR" in ([sequence] if isinstance(sequence, str) else list(sequence)):
        _set_empty(ds, ("InversionTime",))  # Type 2C: required with inversion recovery, and only then
    elif "InversionTime" in ds:
        del ds.InversionTime
    _set_empty(ds, _MR_TYPE2_EMPTY)


@dataclass(frozen=True)
class _SeriesText:
    description: str
    derivation: str
    comments: str


def _series_text(model: ModelLabel, t1c: Optional[SourceSeries], others: Sequence[SourceSeries], details: str) -> _SeriesText:
    """Series Description, Derivation Description and Image Comments."""
    inputs = "; ".join(f"{s.name} series {s.series_uid}" for s in ([t1c] if t1c else []) + list(others))
    derivation = (f"T1c-pro: gadolinium contrast amplified (Bone, Ammari et al., Invest Radiol 2022) by {MANUFACTURER} "
                  f"{__version__}, model {model.title}, from the T1c, T1, T2-FLAIR and ADC"
                  f"{f' ({_text(details)})' if details else ''}. Computed, not acquired."
                  f"{f' DICOM inputs: {inputs}.' if inputs else ' T1c from a non-DICOM file.'}")
    comments = (f"T1c-pro: synthetic contrast-amplified T1c computed by {MANUFACTURER} (model {model.title}). "
                f"Intended use: {_text(model.intended_use) or 'not stated'}.")
    if t1c is None:
        comments += " Made from a non-DICOM image file (NIfTI/NRRD/MHA): new study, no patient data."
    return _SeriesText(series_description(model), _text(derivation, _ST), comments)


def _series_template(
    t1c: Optional[SourceSeries], others: Sequence[SourceSeries], model: ModelLabel, scaling: StoredScaling,
    series_uid: str, key: str, values: np.ndarray, details: str, size: Sequence[int],
) -> Any:
    """The attributes all instances share (every module of the class doc but Image Plane and the pixels)."""
    from pydicom.dataset import Dataset

    ds = Dataset()
    _patient_and_study(ds, t1c, key)
    now = datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    text = _series_text(model, t1c, others, details)
    ds.SOPClassUID = MR_IMAGE_STORAGE
    ds.Modality = "MR"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = _series_number(t1c)
    ds.SeriesDescription = text.description
    ds.SeriesDate, ds.SeriesTime = date, time
    ds.ContentDate, ds.ContentTime = date, time
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    ds.Manufacturer, ds.ManufacturerModelName = MANUFACTURER, MODEL_NAME
    ds.SoftwareVersions = [f"{MANUFACTURER} {__version__}", _text(f"model {model.title}", _LO)]
    if "BodyPartExamined" not in ds:  # a brain MRI (and an unpaired part: no Laterality needed, C.7.3.1)
        ds.BodyPartExamined = BODY_PART
    if t1c is not None:
        ds.RelatedSeriesSequence = [_related_series(s) for s in [t1c, *others]]
    ds.ImageType = list(IMAGE_TYPE)
    ds.DerivationDescription = text.derivation
    ds.ImageComments = text.comments
    ds.BurnedInAnnotation = "NO"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = int(size[1]), int(size[0])
    ds.BitsAllocated = ds.BitsStored = scaling.bits
    ds.HighBit = scaling.bits - 1
    ds.PixelRepresentation = int(scaling.signed)
    ds.RescaleIntercept, ds.RescaleSlope = scaling.intercept_text, scaling.slope_text
    _window(ds, t1c, values)
    return ds


def _related_series(series: SourceSeries) -> Any:
    from pydicom.dataset import Dataset

    item = Dataset()
    item.StudyInstanceUID, item.SeriesInstanceUID = series.study_uid, series.series_uid
    item.PurposeOfReferenceCodeSequence = [_code(*_PURPOSE_SOURCE_SERIES)]
    return item


def _source_image(reference: Any) -> Any:
    from pydicom.dataset import Dataset

    item = Dataset()
    item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = reference.SOPClassUID, reference.SOPInstanceUID
    item.PurposeOfReferenceCodeSequence = [_code(*_PURPOSE_SOURCE_IMAGE)]
    return item


def _sources_of_slice(plane: _Slice, t1c: Optional[SourceSeries], others: Sequence[SourceSeries],
                      centre: Sequence[float]) -> list[Any]:
    """Source Image Sequence items: the T1c slice (or multi-frame file) and the nearest slice of each
    other DICOM input on the T1c's Frame of Reference."""
    if t1c is None:
        return []
    references = [plane.source if plane.source is not None else t1c.first]
    frame = t1c.frame_of_reference_uid
    for other in others:
        if frame is not None and other.frame_of_reference_uid == frame:
            near = other.slice_near(centre)
            if near is not None:
                references.append(near)
    return [_source_image(reference) for reference in references]


def _instance(template: Any, number: int, plane: _Slice, pixels: np.ndarray, sop_uid: str, sources: list[Any],
              slice_source: Optional[Any], thickness: str, step: str) -> Any:
    """One slice: the shared attributes, Image Plane (C.7.6.2), its references and pixels."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian

    ds = copy.deepcopy(template)
    ds.SOPInstanceUID = sop_uid
    ds.InstanceNumber = number
    ds.ImagePositionPatient, ds.ImageOrientationPatient, ds.PixelSpacing = plane.position, plane.orientation, plane.pixel_spacing
    ds.SliceThickness, ds.SpacingBetweenSlices = thickness, step
    if slice_source is not None and "SliceLocation" in slice_source:
        ds.SliceLocation = slice_source.SliceLocation
    _mr_acquisition(ds, slice_source)
    if sources:
        ds.SourceImageSequence = sources
    ds.add_new(0x7FE00010, "OW", np.ascontiguousarray(pixels).tobytes())
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = UID(MR_IMAGE_STORAGE), UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    return ds


def _write_dataset(dataset: Any, path: Path) -> None:
    """Write a DICOM Part 10 file (preamble, file meta, Explicit VR Little Endian) with pydicom 2 or 3."""
    import pydicom

    if int(pydicom.__version__.split(".")[0]) >= 3:
        pydicom.dcmwrite(str(path), dataset, enforce_file_format=True)
    else:  # pydicom 2.4 (Slicer 5.6/5.8)
        dataset.is_little_endian, dataset.is_implicit_VR = True, False
        pydicom.dcmwrite(str(path), dataset, write_like_original=False)


# -- the writer -----------------------------------------------------------------------------------


@dataclass
class DicomSeriesResult:
    """What :func:`write_t1c_pro_series` wrote.

    Attributes:
        folder: the series folder.
        files: one file per instance, in Instance Number order.
        study_uid, series_uid, frame_of_reference_uid: the series' UIDs.
        sop_instance_uids: per file.
        scaling: stored type and Rescale Slope/Intercept.
        from_dicom: the series joined the DICOM T1c's study (False: a new de-identified study).
        series_description: as written.
        notes: DICOM inputs that could not be referenced, and why.
    """

    folder: Path
    files: list[Path]
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    sop_instance_uids: list[str]
    scaling: StoredScaling
    from_dicom: bool
    series_description: str
    notes: list[str] = field(default_factory=list)


def _file_key(path: Path) -> str:
    from .bundle import sha256_file

    return f"file sha256 {sha256_file(path)}"


def _voxels_key(values: np.ndarray) -> str:
    """SHA-256 of T1c-pro's voxels (float32, z y x) and shape: its geometry is the source's (the DICOM
    series or T1c file in the key), so the same voxels read back from a NIfTI file keep their UIDs."""
    digest = hashlib.sha256(repr(values.shape).encode())
    digest.update(np.ascontiguousarray(values, np.float32))  # the buffer itself, no bytes copy
    return digest.hexdigest()


#: T1c-pro's content enters its UIDs on a grid of about this many steps over its value range.
UID_CONTENT_LEVELS = 4096


def _content_key(values: np.ndarray) -> str:
    """SHA-256 of T1c-pro's voxels rounded to a power-of-two step of about 1/4096 of their range.

    Two runs of the same prediction differ in float rounding (ITK's multi-threaded registration sums
    in a varying order: ~1e-5 in a few voxels), which must not change the UIDs, or a rerun would
    send a second copy to the PACS; a real change of a voxel by more than one step does change them.
    The step is a power of two of the range so that the grid itself does not move with rounding.
    """
    finite = np.asarray(values, np.float64)
    span = float(finite.max() - finite.min()) if finite.size else 0.0
    step = 2.0 ** math.floor(math.log2(span / UID_CONTENT_LEVELS)) if span > 0 else 1.0
    return f"step {step!r} " + _voxels_key(np.floor(finite / step).astype(np.float32))


def _image_key(image: sitk.Image) -> str:
    """SHA-256 of an image in memory: voxels and geometry."""
    import SimpleITK as sitk

    digest = hashlib.sha256(_voxels_key(sitk.GetArrayViewFromImage(image)).encode())
    digest.update(repr((image.GetOrigin(), image.GetSpacing(), image.GetDirection())).encode())
    return f"image sha256 {digest.hexdigest()}"


def _stored_type(t1c: Any, source: Optional[SourceSeries]) -> tuple[int, bool]:
    """(bits, signed): the DICOM T1c's Bits Allocated and Pixel Representation, a T1c file's integer
    type, else signed 16 bits; 16 bits at least."""
    if source is not None:
        bits = int(getattr(source.first, "BitsAllocated", 16) or 16)
        return max(bits, 16) if bits in (8, 16, 32) else 16, int(getattr(source.first, "PixelRepresentation", 1)) == 1
    if isinstance(t1c, (str, os.PathLike)) and Path(t1c).is_file():
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(str(t1c))
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            return 16, True
        unsigned = {sitk.sitkUInt8: 16, sitk.sitkUInt16: 16, sitk.sitkUInt32: 32}
        signed = {sitk.sitkInt8: 16, sitk.sitkInt16: 16, sitk.sitkInt32: 32}
        pixel = reader.GetPixelID()
        if pixel in unsigned:
            return unsigned[pixel], False
        return signed.get(pixel, 16), True
    return 16, True


def _read_others(sources: Mapping[str, Any], notes: list[str]) -> list[SourceSeries]:
    """The other inputs that are DICOM series folders (for references); unreadable ones become notes."""
    from .imageio import display_name

    found = []
    for modality, source in sources.items():
        if not isinstance(source, (str, os.PathLike)) or not is_dicom_series_folder(source):
            continue
        try:
            found.append(read_source_series(source, display_name(modality)))
        except (ValueError, OSError, AttributeError) as exc:
            notes.append(f"{display_name(modality)} series {source} not referenced: {exc}")
    return found


def write_t1c_pro_series(
    image: Union[sitk.Image, PathLike],
    out_dir: PathLike,
    t1c: Union[sitk.Image, PathLike, None] = None,
    model: Any = None,
    sources: Optional[Mapping[str, Any]] = None,
    details: str = "",
    overwrite: bool = False,
    cancel: Optional[CancelToken] = None,
) -> DicomSeriesResult:
    """Write T1c-pro as a DICOM MR series into ``out_dir`` (see the module doc for what it holds).

    Args:
        image: T1c-pro on the T1c's grid (``AmplifyResult.image``), or a T1c-pro file.
        out_dir: the series folder: new or empty (or an earlier T1c-pro series, with ``overwrite``).
        t1c: the T1c that T1c-pro was computed from: a DICOM series folder (the series joins its
            study), a NIfTI/NRRD/MHA file or image, or None (a new de-identified study either way).
        model: the model bundle (:class:`~.bundle.ModelBundle`, a registry entry or a :class:`ModelLabel`):
            name, version and intended use for the description, comments and UIDs.
        sources: the other inputs by modality (``{"t1": path, "flair": ..., "adc": ...}``); those
            that are DICOM series folders are referenced when the T1c is DICOM too.
        details: how T1c-pro was computed (folds, mirrorings, mapping), for the Derivation Description.
        overwrite: allow replacing an earlier T1c-pro series in ``out_dir``.
        cancel: checked before every slice; a cancel leaves nothing.

    Returns:
        The files and UIDs written.

    Raises:
        OutputPathError: ``out_dir`` cannot be used (:func:`check_dicom_output_folder`).
        DicomOutputError: pydicom missing, T1c-pro not on the DICOM T1c's grid, non-finite values,
            or T1c headers lacking UIDs.
        ImageValidationError: the T1c (or a T1c-pro file) cannot be read.
        Cancelled: ``cancel`` was set.
    """
    import SimpleITK as sitk
    from pydicom.uid import generate_uid

    from .imageio import read_image

    inputs = [p for p in (image, t1c, *(sources or {}).values()) if isinstance(p, (str, os.PathLike))]
    out = check_dicom_output_folder(out_dir, inputs=inputs, overwrite=overwrite)
    pro = read_image(image, "T1c-pro") if not isinstance(image, sitk.Image) else image
    source = read_source_series(t1c, "T1c") if isinstance(t1c, (str, os.PathLike)) and Path(t1c).is_dir() else None
    notes: list[str] = []
    others = _read_others(sources or {}, notes) if source is not None else []
    label = ModelLabel.of(model)
    values: np.ndarray = sitk.GetArrayViewFromImage(pro)  # z, y, x; stored slice by slice below
    scaling = choose_scaling(values, *_stored_type(t1c, source))
    if source is not None:
        key = f"series {source.series_uid}"
        planes = _source_slices(pro, source) if not source.multiframe else _grid_slices(pro)
    else:
        key = _file_key(Path(t1c)) if isinstance(t1c, (str, os.PathLike)) else _image_key(t1c if t1c is not None else pro)
        planes = _grid_slices(pro)
    entropy = [key, _content_key(values), label.name, label.version, label.intended_use,
               f"{scaling.bits}{'s' if scaling.signed else 'u'}"]
    series_uid = generate_uid(entropy_srcs=["T1c-pro series", *entropy])
    template = _series_template(source, others, label, scaling, series_uid, key, values, details, pro.GetSize())
    step = str(getattr(source.first, "SpacingBetweenSlices", "") or "") if source is not None else ""
    step = step or _ds(round(pro.GetSpacing()[2], 6))  # ITK's step from the positions: no float noise in the header
    files, uids = [], []
    with _series_folder(out) as staging:
        for k, plane in enumerate(planes):
            check_cancel(cancel)
            uid = generate_uid(entropy_srcs=["T1c-pro instance", *entropy, str(k + 1)])
            slice_source = plane.source if plane.source is not None else (source.first if source is not None else None)
            thickness = str(getattr(slice_source, "SliceThickness", "") or "") or step
            centre = pro.TransformContinuousIndexToPhysicalPoint(((pro.GetSize()[0] - 1) / 2, (pro.GetSize()[1] - 1) / 2, k))
            dataset = _instance(template, k + 1, plane, scaling.to_stored(values[k]), uid, _sources_of_slice(plane, source, others, centre),
                                slice_source, thickness, step)
            with atomic_path(staging / series_file_name(k + 1), ".dcm") as tmp:
                _write_dataset(dataset, tmp)
            files.append(out / series_file_name(k + 1))
            uids.append(str(uid))
        check_cancel(cancel)
    return DicomSeriesResult(out, files, str(template.StudyInstanceUID), str(series_uid), str(template.FrameOfReferenceUID),
                             uids, scaling, source is not None, str(template.SeriesDescription), notes)
