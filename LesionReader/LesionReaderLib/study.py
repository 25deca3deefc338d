"""The study definition (``study.json``): cases, readers, phases, blinding, case order, wash-out.

Paper, "Reader study protocol": three successive reading phases (T1c, T1c-pro, T1c-vfa) with the
T2-FLAIR always shown and the routine T1c shown beside T1c-pro and T1c-vfa; at least 10 days
between a reader's phases against recall bias; both readers grade every phase but lesions on
T1c-vfa are marked once, by one reader, and become the reference; cases with more than 20
lesions are not annotated and are excluded from the analysis.

``study.json`` is the only place where file paths and case ids live. What a reader sees is
derived from it through :func:`case_order` and :func:`case_label`, which never expose them.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import random
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable, Optional, Union

from ContrastAmplifierCommon.atomicfile import write_text_atomic
from ContrastAmplifierCommon.outputs import OutputPathError, folders_to_create, remove_empty_folders
from ContrastAmplifierLib import imagefiles
from ContrastAmplifierLib.imagefiles import (  # noqa: F401  (re-exported: the one list of image suffixes)
    DICOM_MAGIC_OFFSET,
    IMAGE_SUFFIXES,
    is_dicom_series_folder,
)

#: Format tag written in every ``study.json``; bumped on incompatible changes.
STUDY_FORMAT = "lesion-reader-study/1"
STUDY_FILE = "study.json"
DATABASE_FILE = "reads.sqlite"

#: Paper defaults ("Reader study protocol").
DEFAULT_WASHOUT_DAYS = 10.0
DEFAULT_MAX_LESIONS = 20
DEFAULT_PHASE_NAMES = ("T1c", "T1c-pro", "T1c-vfa")
DEFAULT_REFERENCE_PHASE = "T1c-vfa"

#: Image quality scale (paper: "general image quality on 4-point scales").
GRADE_LABELS: dict[int, str] = {1: "poor", 2: "average", 3: "good", 4: "excellent"}

#: Canonical modality names and the file-name stems recognised for them in case folders
#: (compared lower-case with "-", "_", "." and spaces removed).
MODALITY_ALIASES: dict[str, tuple[str, ...]] = {
    "T1": ("t1", "t1pre", "t1w", "t1native"),
    "T2-FLAIR": ("t2flair", "flair", "t2wflair"),
    "ADC": ("adc", "adcmap"),
    "T1c": ("t1c", "t1ce", "t1gd", "t1post", "t1c+"),
    "T1c-low": ("t1clow", "t1lowdose"),
    "T1c-pro": ("t1cpro", "t1c+pro", "t1camplified"),
    "T1c-vfa": ("t1cvfa", "t1vfa", "t1cse", "t1ctse"),
}
#: A case volume may be an image file (:data:`IMAGE_SUFFIXES`) or a folder holding one DICOM
#: series (see :func:`is_dicom_series_folder`); both come from :mod:`ContrastAmplifierLib.imagefiles`.

Clock = Callable[[], datetime]
Axis = tuple[tuple[float, float, float], tuple[float, float, float]]


class StudyError(ValueError):
    """A study cannot be created, opened or read; the message names the input and the fix."""


class WashoutError(StudyError):
    """A reader tried to open a phase before the wash-out delay has passed.

    Attributes:
        opens_at: when the phase opens for this reader (UTC).
    """

    def __init__(self, message: str, opens_at: datetime):
        super().__init__(message)
        self.opens_at = opens_at


def read_text_file(path: Union[str, os.PathLike], fix: str) -> str:
    """The UTF-8 text of an input file, refusing what is not text.

    Args:
        path: the file.
        fix: what the user should do, appended to every message (e.g. "export it again").

    Raises:
        StudyError: the path is missing, a folder or unreadable (permissions), or the file is
            compressed, holds NUL bytes or is not UTF-8; the message names the file, the line
            of the first bad byte and ``fix``.
    """
    path = Path(path)
    if path.is_dir():
        raise StudyError(f"{path} is a folder, not a file; {fix}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise StudyError(f"{path} cannot be read ({exc.strerror or exc}); check that it exists and that you may read it, then {fix}") from None
    if data[:2] == b"\x1f\x8b":
        raise StudyError(f"{path} is gzip-compressed, not text; decompress it (gunzip) or {fix}")
    nul = data.find(b"\x00")
    if nul >= 0:
        line = data.count(b"\n", 0, nul) + 1
        raise StudyError(f"{path}, line {line}: holds a NUL byte, so it is a binary file, not text; {fix}")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise StudyError(
            f"{path}, line {line}: byte 0x{data[exc.start]:02x} is not UTF-8 text (a binary file, or text in another "
            f"encoding); save text as UTF-8 (e.g. 'CSV UTF-8' in a spreadsheet program) or {fix}"
        ) from None


def missing_folders(folder: Union[str, os.PathLike], option: str) -> list[Path]:
    """:func:`ContrastAmplifierCommon.outputs.folders_to_create` with a :class:`StudyError`.

    Returns:
        ``folder`` and its missing parents, deepest first (empty when ``folder`` exists).

    Raises:
        StudyError: ``folder`` is a file, a parent is a file, or the nearest existing folder is
            not writable.
    """
    try:
        return folders_to_create(folder, option)
    except OutputPathError as exc:
        raise StudyError(str(exc)) from None


def utc_now() -> datetime:
    """The default clock: the current time, timezone-aware UTC."""
    return datetime.now(timezone.utc)


class ManualClock:
    """A clock that only moves when told to: for tests and simulated studies.

    Example:
        >>> clock = ManualClock(datetime(2024, 1, 1, tzinfo=timezone.utc))
        >>> clock.advance(days=10)
    """

    def __init__(self, start: Optional[datetime] = None):
        self.now = as_utc_aware(start or datetime(2024, 1, 1, 9, 0, tzinfo=timezone.utc))

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float = 0.0, *, minutes: float = 0.0, hours: float = 0.0, days: float = 0.0) -> datetime:
        """Move the clock forward and return the new time."""
        delta = timedelta(seconds=seconds, minutes=minutes, hours=hours, days=days)
        if delta < timedelta(0):
            raise ValueError(f"ManualClock only moves forward (asked to move by {delta})")
        self.now = self.now + delta
        return self.now


def as_utc_aware(moment: datetime) -> datetime:
    """Treat a naive datetime as UTC; leave aware ones unchanged."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)


def format_time(moment: datetime) -> str:
    """``2024-05-11 14:03 UTC``: how times are shown to readers and in errors."""
    return as_utc_aware(moment).astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def format_duration(seconds: float) -> str:
    """``3 d 4 h``, ``2 h 05 min``, ``4 min 12 s``: compact human durations."""
    seconds = max(0.0, float(seconds))
    days, rest = divmod(int(round(seconds)), 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes:02d} min"
    if minutes:
        return f"{minutes} min {secs:02d} s"
    return f"{secs} s"


def canonical_modality(name: str) -> Optional[str]:
    """Map a file stem or a user spelling (``t1c_pro``, ``FLAIR``...) to a canonical modality name."""
    key = "".join(ch for ch in name.lower() if ch not in "-_. ")
    for canonical, aliases in MODALITY_ALIASES.items():
        if key == canonical.lower().replace("-", "") or key in aliases:
            return canonical
    return None


@dataclass(frozen=True)
class Phase:
    """One reading phase.

    Attributes:
        name: phase name, also the volume it is dedicated to (``T1c-pro``).
        shows: volume names displayed, in layout order (first = the phase's own volume).
        markers: ``"all"`` or the reader ids who mark lesions in this phase (the others only grade).
    """

    name: str
    shows: tuple[str, ...]
    markers: Union[str, tuple[str, ...]] = "all"

    def reader_marks(self, reader: str) -> bool:
        """Whether ``reader`` marks lesions in this phase."""
        return self.markers == "all" or reader in self.markers

    def to_dict(self) -> dict:
        return {"name": self.name, "shows": list(self.shows), "markers": self.markers if self.markers == "all" else list(self.markers)}


@dataclass(frozen=True)
class Case:
    """One case: a private id (never shown to readers) and its volume files by modality."""

    id: str
    volumes: Mapping[str, str]

    def to_dict(self) -> dict:
        return {"id": self.id, "volumes": dict(self.volumes)}


def default_phase(name: str) -> Phase:
    """Paper layout for a phase: its volume, the routine T1c (unless it is the T1c phase), T2-FLAIR."""
    shows = [name]
    if name != "T1c":
        shows.append("T1c")
    if name != "T2-FLAIR":
        shows.append("T2-FLAIR")
    return Phase(name=name, shows=tuple(shows))


def parse_phase_spec(spec: str) -> Phase:
    """Parse a CLI phase: ``NAME`` (paper layout) or ``NAME=VOL1+VOL2+...`` (explicit layout).

    Raises:
        StudyError: empty name or volume list.
    """
    if "=" not in spec:
        if not spec.strip():
            raise StudyError("--phases got an empty phase name; give NAME or NAME=VOL1+VOL2")
        return default_phase(spec.strip())
    name, _, shows = spec.partition("=")
    volumes = tuple(v.strip() for v in shows.split("+") if v.strip())
    if not name.strip() or not volumes:
        raise StudyError(f"--phases entry {spec!r} is malformed; write NAME=VOL1+VOL2, e.g. T1c-pro=T1c-pro+T1c+T2-FLAIR")
    return Phase(name=name.strip(), shows=volumes)


@dataclass
class Study:
    """A loaded ``study.json`` (validated), rooted at ``directory``."""

    directory: Path
    name: str
    readers: tuple[str, ...]
    phases: tuple[Phase, ...]
    cases: tuple[Case, ...]
    seed: int = 0
    washout_days: float = DEFAULT_WASHOUT_DAYS
    max_lesions: int = DEFAULT_MAX_LESIONS
    reference_phase: Optional[str] = None
    reference_reader: Optional[str] = None
    _case_index: dict[str, Case] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._case_index = {case.id: case for case in self.cases}

    @property
    def database_path(self) -> Path:
        return self.directory / DATABASE_FILE

    def phase(self, name: str) -> Phase:
        """The phase called ``name``; a :class:`StudyError` lists the valid names otherwise."""
        for phase in self.phases:
            if phase.name == name:
                return phase
        raise StudyError(f"unknown phase {name!r} in study {self.directory}; phases are: {', '.join(p.name for p in self.phases)}")

    def phase_index(self, name: str) -> int:
        return [p.name for p in self.phases].index(self.phase(name).name)

    def check_reader(self, reader: str) -> str:
        """Return ``reader`` if registered, else raise a :class:`StudyError` naming the readers."""
        if reader not in self.readers:
            raise StudyError(
                f"unknown reader {reader!r} in study {self.directory}; readers are: {', '.join(self.readers)} "
                f"(add readers with 'lesion-reader init --force' before any read, or edit study.json)"
            )
        return reader

    def case(self, case_id: str) -> Case:
        try:
            return self._case_index[case_id]
        except KeyError:
            raise StudyError(f"case {case_id!r} is not in {self.directory / STUDY_FILE}") from None

    def volume_path(self, case_id: str, modality: str) -> Path:
        """Absolute path of a case's volume (relative paths in ``study.json`` are relative to the study folder)."""
        case = self.case(case_id)
        if modality not in case.volumes:
            raise StudyError(f"case {case_id!r} has no {modality} volume in {self.directory / STUDY_FILE}; add it under cases[].volumes")
        path = Path(case.volumes[modality])
        return path if path.is_absolute() else (self.directory / path)

    def to_dict(self) -> dict:
        return {
            "format": STUDY_FORMAT,
            "name": self.name,
            "seed": self.seed,
            "washout_days": self.washout_days,
            "max_lesions": self.max_lesions,
            "readers": list(self.readers),
            "reference": {"phase": self.reference_phase, "reader": self.reference_reader},
            "phases": [p.to_dict() for p in self.phases],
            "cases": [c.to_dict() for c in self.cases],
        }


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise StudyError(message)


def study_from_dict(data: Mapping, directory: Union[str, os.PathLike], *, check_files: bool = False) -> Study:
    """Validate a ``study.json`` document and build a :class:`Study`.

    Args:
        data: the parsed JSON.
        directory: the study folder (relative volume paths are resolved against it).
        check_files: also check that every volume file exists.

    Raises:
        StudyError: the first problem found, naming the field and the fix.
    """
    where = Path(directory) / STUDY_FILE
    _require(isinstance(data, Mapping), f"{where} must hold a JSON object")
    _require(data.get("format") == STUDY_FORMAT, f"{where}: 'format' is {data.get('format')!r}, expected {STUDY_FORMAT!r}; recreate it with 'lesion-reader init'")
    # Explicit `if not ...: raise` (not _require) where later lines rely on the narrowed type.
    readers = data.get("readers")
    if not (isinstance(readers, list) and readers and all(isinstance(r, str) and r.strip() for r in readers)):
        raise StudyError(f"{where}: 'readers' must be a non-empty list of reader ids")
    _require(len(set(readers)) == len(readers), f"{where}: reader ids repeat in 'readers': {readers}")
    phases_raw = data.get("phases")
    if not (isinstance(phases_raw, list) and phases_raw):
        raise StudyError(f"{where}: 'phases' must be a non-empty list")
    phases: list[Phase] = []
    for i, raw in enumerate(phases_raw):
        _require(isinstance(raw, Mapping) and isinstance(raw.get("name"), str) and bool(raw["name"].strip()), f"{where}: phases[{i}] needs a 'name'")
        shows = raw.get("shows")
        if not (isinstance(shows, list) and shows and all(isinstance(s, str) for s in shows)):
            raise StudyError(f"{where}: phases[{i}] ({raw['name']}) needs 'shows', a non-empty list of volume names")
        markers = raw.get("markers", "all")
        if markers != "all":
            _require(isinstance(markers, list) and all(m in readers for m in markers),
                     f"{where}: phases[{i}].markers must be \"all\" or a list of reader ids among {readers}, got {markers!r}")
            markers = tuple(markers)
        phases.append(Phase(name=raw["name"], shows=tuple(shows), markers=markers))
    names = [p.name for p in phases]
    _require(len(set(names)) == len(names), f"{where}: phase names repeat: {names}")
    reference = data.get("reference") or {}
    if not isinstance(reference, Mapping):  # e.g. "reference": "T1c-vfa" would fail on .get() below
        raise StudyError(f"{where}: 'reference' must be an object {{\"phase\": ..., \"reader\": ...}}, got {reference!r}")
    ref_phase, ref_reader = reference.get("phase"), reference.get("reader")
    _require(ref_phase is None or ref_phase in names, f"{where}: reference.phase {ref_phase!r} is not a phase ({', '.join(names)})")
    _require(ref_reader is None or ref_reader in readers, f"{where}: reference.reader {ref_reader!r} is not a reader ({', '.join(readers)})")
    cases_raw = data.get("cases")
    if not (isinstance(cases_raw, list) and cases_raw):
        raise StudyError(f"{where}: 'cases' must be a non-empty list")
    cases: list[Case] = []
    needed = sorted({v for p in phases for v in p.shows})
    for i, raw in enumerate(cases_raw):
        _require(isinstance(raw, Mapping) and isinstance(raw.get("id"), str) and bool(raw["id"]), f"{where}: cases[{i}] needs an 'id'")
        volumes = raw.get("volumes")
        if not isinstance(volumes, Mapping):
            raise StudyError(f"{where}: cases[{i}] ({raw['id']}) needs 'volumes', an object modality -> path")
        missing = [v for v in needed if v not in volumes]
        _require(not missing, f"{where}: case {raw['id']!r} lacks {', '.join(missing)}, shown in phases {', '.join(p.name for p in phases if set(p.shows) & set(missing))}; add the files or change the phases' 'shows'")
        cases.append(Case(id=raw["id"], volumes={str(k): str(v) for k, v in volumes.items()}))
    ids = [c.id for c in cases]
    _require(len(set(ids)) == len(ids), f"{where}: case ids repeat: {sorted({i for i in ids if ids.count(i) > 1})}")
    washout = data.get("washout_days", DEFAULT_WASHOUT_DAYS)
    _require(isinstance(washout, (int, float)) and math.isfinite(washout) and washout >= 0, f"{where}: 'washout_days' must be a finite number >= 0, got {washout!r}")
    max_lesions = data.get("max_lesions", DEFAULT_MAX_LESIONS)
    _require(isinstance(max_lesions, int) and max_lesions >= 1, f"{where}: 'max_lesions' must be an integer >= 1, got {max_lesions!r}")
    seed = data.get("seed", 0)
    _require(isinstance(seed, int), f"{where}: 'seed' must be an integer, got {seed!r}")
    study = Study(
        directory=Path(directory).resolve(), name=str(data.get("name") or Path(directory).name),
        readers=tuple(readers), phases=tuple(phases), cases=tuple(cases), seed=seed,
        washout_days=float(washout), max_lesions=max_lesions, reference_phase=ref_phase, reference_reader=ref_reader,
    )
    if check_files:
        missing_files = [f"{c.id}/{m}: {study.volume_path(c.id, m)}" for c in cases for m in needed if not study.volume_path(c.id, m).exists()]
        if missing_files:
            raise StudyError(f"{len(missing_files)} volume file(s) listed in {where} do not exist, e.g. {missing_files[0]}; fix the paths")
    return study


def load_study(study_dir: Union[str, os.PathLike]) -> Study:
    """Read and validate ``STUDY_DIR/study.json``.

    Raises:
        StudyError: missing folder/file, invalid JSON or an invalid definition.
    """
    path = Path(study_dir) / STUDY_FILE
    if not path.is_file():
        raise StudyError(f"no study at {Path(study_dir)}: {path} is missing; create one with 'lesion-reader init {study_dir} --cases ... --readers ...'")
    text = read_text_file(path, "recreate it with 'lesion-reader init --force'")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StudyError(f"{path} is not valid JSON ({exc}); fix it or recreate it with 'lesion-reader init --force'") from None
    return study_from_dict(data, study_dir)


def dicom_series_files(folder: Union[str, os.PathLike]) -> list[str]:
    """The files of the single DICOM series in ``folder``, in slice order (SimpleITK/GDCM sorting).

    A DICOM series folder is accepted as a case volume (one series per folder, see
    :func:`is_dicom_series_folder`); it is read with :func:`read_volume` and, for DICOM SR export,
    by :mod:`LesionReaderLib.dicom_sr`. The reading is :func:`ContrastAmplifierLib.imagefiles.dicom_series_files`.

    Raises:
        StudyError: the folder holds no DICOM series, or more than one (one series per folder).
    """
    try:
        return imagefiles.dicom_series_files(folder, "case volume")
    except imagefiles.ImageValidationError as exc:
        raise StudyError(str(exc)) from None


def read_volume(path: Union[str, os.PathLike]):
    """Read a case volume: an image file (NIfTI, NRRD, MHA...) or a DICOM series folder.

    Returns:
        A ``SimpleITK.Image`` (LPS physical space, as SimpleITK always uses).

    Raises:
        StudyError: the path is missing or cannot be read (the message names it).
    """
    import SimpleITK as sitk  # lazy: study.py stays importable without it

    volume = Path(path)
    if not volume.exists():
        raise StudyError(f"case volume {volume} does not exist; fix its path in study.json")
    try:
        if volume.is_dir():
            return imagefiles.read_dicom_series(volume, "case volume")
        return sitk.ReadImage(str(volume))
    except imagefiles.ImageValidationError as exc:
        raise StudyError(str(exc)) from None
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        raise StudyError(f"case volume {volume} could not be read ({first}); check the file or DICOM folder") from exc


def discover_case_folder(folder: Path) -> Case:
    """A case from a folder whose images are named after their modality (``t1c_pro.nii.gz``).

    A sub-folder named after a modality (``t1c/``) that holds a DICOM series is taken as that
    modality's volume.

    Raises:
        StudyError: the folder has no recognised image, or two entries claim the same modality.
    """
    volumes: dict[str, str] = {}
    for stem, path in imagefiles.image_entries(folder):
        modality = canonical_modality(stem)
        if modality is None or (path.is_dir() and not is_dicom_series_folder(path)):
            continue
        if modality in volumes:
            raise StudyError(f"case folder {folder} has two {modality} images ({Path(volumes[modality]).name}, {path.name}); keep one")
        volumes[modality] = str(path.resolve())
    if not volumes:
        raise StudyError(
            f"case folder {folder} holds no image named after a modality; name files e.g. t1c.nii.gz, t1c_pro.nii.gz, "
            f"t1c_vfa.nii.gz, flair.nii.gz or DICOM series folders e.g. t1c/ (known: {', '.join(MODALITY_ALIASES)}), "
            "or list the cases in a CSV manifest"
        )
    return Case(id=folder.name, volumes=volumes)


def read_case_manifest(path: Path) -> list[Case]:
    """Cases from a CSV manifest with header ``case,<modality>,<modality>...`` (paths relative to the CSV)."""
    text = read_text_file(path, "save the manifest as a UTF-8 CSV file")
    try:
        rows = list(csv.DictReader(io.StringIO(text, newline="")))
    except csv.Error as exc:
        raise StudyError(f"case manifest {path} is not a valid CSV file ({exc}); save it as CSV") from None
    if not rows or "case" not in rows[0]:
        raise StudyError(f"case manifest {path} needs a header row starting with 'case' followed by modality columns (e.g. case,T1c,T1c-pro,T2-FLAIR)")
    cases = []
    for line, row in enumerate(rows, start=2):
        volumes = {}
        for column, value in row.items():
            if column == "case" or not value:
                continue
            modality = canonical_modality(column) or column
            volume = Path(value)
            volumes[modality] = str((volume if volume.is_absolute() else path.parent / volume).resolve())
        if not row["case"]:
            raise StudyError(f"case manifest {path}, line {line}: empty 'case' id")
        cases.append(Case(id=row["case"], volumes=volumes))
    return cases


def collect_cases(sources: Iterable[Union[str, os.PathLike]]) -> list[Case]:
    """Cases from case folders and/or CSV manifests (see :func:`discover_case_folder`, :func:`read_case_manifest`)."""
    cases: list[Case] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            try:
                cases.append(discover_case_folder(path))
            except OSError as exc:
                raise StudyError(f"--cases {path}: the case folder cannot be read ({exc.strerror or exc}); check its permissions") from None
        elif path.is_file() and path.suffix.lower() == ".csv":
            cases.extend(read_case_manifest(path))
        else:
            raise StudyError(f"--cases {path}: neither a case folder nor a .csv manifest; check the path")
    return cases


def _relative_if_inside(path: str, root: Path) -> str:
    try:
        return Path(path).resolve().relative_to(root).as_posix()
    except ValueError:
        return str(Path(path).resolve())


def init_study(
    study_dir: Union[str, os.PathLike],
    cases: Sequence[Union[str, os.PathLike, Case]],
    readers: Sequence[str],
    phases: Optional[Sequence[Union[str, Phase]]] = None,
    *,
    reference_reader: Optional[str] = None,
    reference_phase: Optional[str] = None,
    washout_days: float = DEFAULT_WASHOUT_DAYS,
    max_lesions: int = DEFAULT_MAX_LESIONS,
    seed: int = 0,
    name: Optional[str] = None,
    force: bool = False,
    dry_run: bool = False,
) -> Study:
    """Create a study folder: validated ``study.json`` plus an empty reads database.

    Paper defaults ("Reader study protocol"): phases T1c, T1c-pro, T1c-vfa with T2-FLAIR (and
    T1c beside the processed images); in T1c-vfa only the reference reader marks lesions;
    10 days' wash-out; cases with more than 20 lesions excluded.

    Args:
        study_dir: folder to create (may exist; created with its missing parents).
        cases: case folders, CSV manifests or :class:`Case` objects.
        readers: reader ids.
        phases: reading order; names (paper layout) or :class:`Phase` objects. Default T1c, T1c-pro, T1c-vfa.
        reference_reader: who marks the reference lesions (default: the last reader).
        reference_phase: the phase only the reference reader marks (default ``T1c-vfa`` when present).
        washout_days: minimum days between a reader's consecutive phases.
        max_lesions: above this count a case is flagged "too many lesions" and excluded.
        seed: seed of the case orders.
        name: study title (default: the folder name).
        force: replace an existing ``study.json`` (refused once reads exist).
        dry_run: check everything but the existence of the volume files, and write nothing (a
            caller that first fetches the volumes, e.g. from a PACS, checks its options so).

    Returns:
        The loaded study (with ``dry_run``: the study that would be written).

    Raises:
        StudyError: invalid inputs, missing files, an existing study (without ``force``, or
            with reads), ``study_dir`` a file or in a parent that is a file or not writable, or a
            failed write. Everything is checked before the folder is created, and a failed call
            removes the files and folders it created (never files that were there before).
    """
    from .storage import ReadsDatabase  # storage imports study; keep the cycle one-way at import time

    root = Path(study_dir).resolve()
    created = missing_folders(root, "study folder")  # a file, or an unwritable parent: refused before any work
    if (root / STUDY_FILE).exists():
        if not force:
            raise StudyError(f"{root / STUDY_FILE} already exists; pass --force (force=True) to replace it, or pick another folder")
        if (root / DATABASE_FILE).exists() and _has_reads(root / DATABASE_FILE):
            raise StudyError(f"{root} already has reads in {DATABASE_FILE}; refusing to replace study.json under them. Start a new study folder")
    case_list = [c if isinstance(c, Case) else None for c in cases]
    paths = [c for c in cases if not isinstance(c, Case)]
    collected = [c for c in case_list if c is not None] + collect_cases(paths)
    phase_list = [p if isinstance(p, Phase) else default_phase(p) for p in (phases or DEFAULT_PHASE_NAMES)]
    phase_names = [p.name for p in phase_list]
    if reference_phase is None and DEFAULT_REFERENCE_PHASE in phase_names:
        reference_phase = DEFAULT_REFERENCE_PHASE
    if reference_phase is not None:
        if reference_phase not in phase_names:
            raise StudyError(f"--reference-phase {reference_phase!r} is not one of the phases ({', '.join(phase_names)})")
        reference_reader = reference_reader or (readers[-1] if readers else None)
    if reference_reader is not None and reference_reader not in readers:
        raise StudyError(f"--reference-reader {reference_reader!r} is not one of the readers ({', '.join(readers)})")
    phase_list = [
        # reference_reader is None here only without readers, which study_from_dict rejects below.
        Phase(p.name, p.shows, (reference_reader,)) if p.name == reference_phase and p.markers == "all" and reference_reader is not None else p
        for p in phase_list
    ]
    data = {
        "format": STUDY_FORMAT,
        "name": name or root.name,
        "seed": int(seed),
        "washout_days": float(washout_days),
        "max_lesions": int(max_lesions),
        "readers": list(readers),
        "reference": {"phase": reference_phase, "reader": reference_reader},
        "phases": [p.to_dict() for p in phase_list],
        "cases": [{"id": c.id, "volumes": {m: _relative_if_inside(v, root) for m, v in c.volumes.items()}} for c in collected],
    }
    study = study_from_dict(data, root, check_files=not dry_run)  # validated before the folder is created
    if dry_run:
        return study
    before = set(os.listdir(root)) if root.is_dir() else set()
    try:
        root.mkdir(parents=True, exist_ok=True)
        write_text_atomic(json.dumps(data, indent=2) + "\n", root / STUDY_FILE)
        ReadsDatabase(study.database_path).close()
    except (OSError, sqlite3.Error) as exc:
        # Leave nothing behind: only the files and folders this call created go.
        for name in (STUDY_FILE, DATABASE_FILE, f"{DATABASE_FILE}-wal", f"{DATABASE_FILE}-shm", f"{DATABASE_FILE}-journal"):
            if name not in before and (root / name).is_file():
                (root / name).unlink()
        remove_empty_folders(created)
        raise StudyError(f"cannot write the study into {root} ({exc}); check that the folder is writable, the disk not full and any {DATABASE_FILE} there a LesionReader database") from None
    return study


def _has_reads(database: Path) -> bool:
    """Whether an existing reads database holds reads (:class:`StudyError` if it is not a database)."""
    from .storage import ReadsDatabase

    try:
        with ReadsDatabase(database) as db:
            return db.has_reads()
    except sqlite3.Error as exc:
        raise StudyError(f"{database} is not a readable reads database ({exc}); move it away or start a new study folder") from None


def case_order(study: Study, reader: str, phase: str) -> list[str]:
    """The case ids in the order ``reader`` reads them in ``phase``.

    Shuffled from a seed derived from (study seed, reader, phase) with SHA-256, so the order is
    the same at every restart and on every machine, yet differs between readers and phases
    (no reader sees the cases in the order of another phase, which limits recall).
    """
    study.check_reader(reader)
    study.phase(phase)
    digest = hashlib.sha256(f"{study.seed}\0{reader}\0{phase}".encode()).digest()
    ids = sorted(c.id for c in study.cases)
    random.Random(int.from_bytes(digest[:8], "big")).shuffle(ids)
    return ids


def case_label(position: int, total: int) -> str:
    """The neutral label of the case at 0-based ``position``: ``Case 07`` (no file name, no id)."""
    width = max(2, len(str(total)))
    return f"Case {position + 1:0{width}d}"
