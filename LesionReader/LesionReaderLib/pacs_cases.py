"""A reader study and the PACS: cases fetched from it, DICOM SR reads sent to it (beyond the paper).

``lesion-reader init STUDY_DIR --pacs-case CASE=STUDY_UID ... --from PACS`` (:func:`init_study_from_pacs`):
for each case, the series of the volumes the phases show (T1c, T1c-pro, T1c-vfa, T2-FLAIR by
default) are picked in the PACS study by their SeriesDescription and retrieved (DICOMweb) into
``STUDY_DIR/cases/<CASE>/<folder>/``, one DICOM series folder per volume, named as
``init --cases`` recognises them (:data:`VOLUME_FOLDERS`: ``t1c/``, ``t1c_pro/``, ``t1c_vfa/``,
``flair/``); ``series.json`` beside them records which series were taken. The study is then
created from those folders exactly as from ``--cases``.

The picking is ContrastAmplifierLib's (:mod:`ContrastAmplifierLib.pacs_rules`): each volume
folder has a rule (:data:`ContrastAmplifierLib.pacs_rules.VOLUME_RULES`; ``t1c_pro`` takes
``T1c-pro (contrast amplified, ...)``, the series ``contrast-amplifier predict --out-dicom``
writes, which the ``t1c`` rule never takes; ``t1c_vfa`` takes SPACE/CUBE/VISTA/VFA descriptions
and ``t1c`` yields them), a rules file (``--pacs-rules``) changes them or gives the rule of a
volume without a default. Every case is listed and picked before any series is retrieved; a
volume matched by no series or by several, or a series matched by two volumes, is an error that
names the case and lists its series. Options are checked (:func:`.init_study` with ``dry_run``)
before the PACS is asked anything.

``lesion-reader export STUDY OUT --dicom-sr --send PACS``: the SR documents just written are sent
(STOW-RS or C-STORE, :func:`ContrastAmplifierLib.pacs.send_instances`) and what the PACS
acknowledged is reported.

Endpoints, credentials, retries: the PACS config file of ``contrast-amplifier pacs``
(``--pacs-config``, ``$CA_PACS_CONFIG``, ``$CA_PACS_URL``...; :mod:`ContrastAmplifierLib.pacs`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from ContrastAmplifierCommon.progress import CancelToken, ProgressCallback
from ContrastAmplifierLib.pacs import (
    Endpoint,
    FetchPlan,
    FetchResult,
    PacsConfigError,
    PacsError,
    RetryPolicy,
    SeriesSelectionError,
    StudyNotFoundError,
    check_uid,
    fetch_planned,
    load_rules,
    plan_fetch,
)

from .study import DEFAULT_PHASE_NAMES, Case, Phase, Study, StudyError, default_phase, init_study

PathLike = Union[str, "os.PathLike[str]"]

#: Sub-folder of the study folder that receives the cases fetched from a PACS.
CASES_FOLDER = "cases"
#: Folder of each known volume in a case folder; ``init --cases`` maps these names back
#: (:func:`LesionReaderLib.study.canonical_modality`). Other volumes: :func:`volume_folder`.
VOLUME_FOLDERS = {"T1": "t1", "T2-FLAIR": "flair", "ADC": "adc", "T1c": "t1c", "T1c-low": "t1c_low", "T1c-pro": "t1c_pro",
                  "T1c-vfa": "t1c_vfa"}
#: How to fix a series choice, in lesion-reader's options.
SELECTION_FIX = ("Fix: adapt the SeriesDescription patterns in a rules file (--pacs-rules FILE, a table per volume folder "
                 "such as [t1c] include = \"REGEX\", exclude = \"REGEX\"; see `lesion-reader init --help`), or put that "
                 "case's series in a folder yourself (one DICOM series folder per volume: t1c/, t1c_pro/, t1c_vfa/, flair/) "
                 "and pass it with --cases.")
_CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class PacsCase:
    """A case to fetch: its id (also its folder name) and the Study Instance UID on the PACS."""

    id: str
    study_uid: str


def parse_pacs_case(spec: str) -> PacsCase:
    """``CASE=STUDY_INSTANCE_UID`` (the ``--pacs-case`` option).

    Raises:
        StudyError: not of that form, a case id that cannot be a folder name, or not a UID.
    """
    case_id, sep, uid = spec.partition("=")
    case_id, uid = case_id.strip(), uid.strip()
    if not sep or not case_id or not uid:
        raise StudyError(f"--pacs-case {spec!r}: write CASE=STUDY_INSTANCE_UID, e.g. --pacs-case P001=1.2.840.113619.2.55.3")
    if not _CASE_ID.match(case_id):
        raise StudyError(f"--pacs-case {spec!r}: the case id {case_id!r} names its folder (STUDY_DIR/{CASES_FOLDER}/CASE); use "
                         "letters, digits, '.', '_' and '-', starting with a letter or digit")
    try:
        return PacsCase(case_id, check_uid(uid, f"--pacs-case {case_id}: Study Instance UID"))
    except PacsConfigError as exc:
        raise StudyError(str(exc)) from None


def volume_folder(volume: str) -> str:
    """The folder name of a volume in a case folder: :data:`VOLUME_FOLDERS`, else the name in lower
    case with every run of other characters than letters and digits as ``_`` (``SWI map`` -> ``swi_map``)."""
    return VOLUME_FOLDERS.get(volume) or re.sub(r"[^a-z0-9]+", "_", volume.lower()).strip("_") or "volume"


def study_volumes(phases: Sequence[Phase]) -> dict[str, str]:
    """Volume -> folder of every volume the phases show, in order of first appearance.

    Raises:
        StudyError: two volumes that would share a folder.
    """
    folders: dict[str, str] = {}
    for phase in phases:
        for volume in phase.shows:
            folders.setdefault(volume, volume_folder(volume))
    seen: dict[str, str] = {}
    for volume, folder in folders.items():
        if folder in seen:
            raise StudyError(f"volumes {seen[folder]!r} and {volume!r} would both be fetched into the folder {folder}/; "
                             "rename one in --phases")
        seen[folder] = volume
    return folders


def planned_cases(study_dir: PathLike, pacs_cases: Sequence[PacsCase], folders: dict[str, str]) -> list[Case]:
    """The cases as they will be once fetched: volume -> ``STUDY_DIR/cases/<CASE>/<folder>``."""
    root = Path(study_dir).resolve() / CASES_FOLDER
    return [Case(id=c.id, volumes={v: str(root / c.id / f) for v, f in folders.items()}) for c in pacs_cases]


def plan_cases(pacs_cases: Sequence[PacsCase], endpoint: Endpoint, folders: Sequence[str], rules_file: Optional[PathLike] = None,
               policy: Optional[RetryPolicy] = None) -> dict[str, FetchPlan]:
    """List and pick the series of every case (nothing retrieved, nothing written).

    Raises:
        PacsError: the series of one or more cases could not be picked, or a study is not on the
            PACS: one message names each such case and lists its series; a bad rules file.
        PacsRefused, PacsUnreachable: the PACS refused or did not answer (at the first case).
    """
    rules = load_rules(rules_file, volumes=folders)
    plans: dict[str, FetchPlan] = {}
    problems: dict[str, str] = {}
    for case in pacs_cases:
        try:
            plans[case.id] = plan_fetch(case.study_uid, endpoint, rules, policy=policy, volumes=folders, fix=SELECTION_FIX)
        except (SeriesSelectionError, StudyNotFoundError) as exc:
            problems[case.id] = f"case {case.id}: {exc}"
    if problems:
        what = f"case {next(iter(problems))}" if len(problems) == 1 else f"{len(problems)} cases"
        raise PacsError(f"cannot fetch {what} from {endpoint.display()}; nothing was fetched.\n" + "\n\n".join(problems.values()))
    return plans


def fetch_cases(study_dir: PathLike, plans: dict[str, FetchPlan], endpoint: Endpoint, policy: Optional[RetryPolicy] = None,
                progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None) -> dict[str, FetchResult]:
    """Retrieve the planned series of each case into ``STUDY_DIR/cases/<CASE>/``, replacing volume folders
    left there by an earlier attempt (each folder appears only once complete)."""
    root = Path(study_dir).resolve() / CASES_FOLDER
    results: dict[str, FetchResult] = {}
    for index, (case_id, plan) in enumerate(plans.items()):
        def case_progress(stage: str, fraction: float, message: str = "", index: int = index, case_id: str = case_id) -> None:
            if progress is not None:
                progress(stage, (index + fraction) / len(plans), f"case {case_id} ({index + 1}/{len(plans)}): {message}")

        results[case_id] = fetch_planned(plan, root / case_id, endpoint, policy, overwrite=True, progress=case_progress,
                                         cancel=cancel)
    return results


def init_study_from_pacs(
    study_dir: PathLike,
    pacs_cases: Sequence[PacsCase],
    endpoint: Endpoint,
    readers: Sequence[str],
    phases: Optional[Sequence[Union[str, Phase]]] = None,
    *,
    other_cases: Sequence[Union[PathLike, Case]] = (),
    rules_file: Optional[PathLike] = None,
    policy: Optional[RetryPolicy] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
    **init_options,
) -> tuple[Study, dict[str, FetchResult]]:
    """Fetch the cases' volumes from a PACS and create the study (see the module doc).

    Args:
        study_dir: the study folder; the cases go to ``STUDY_DIR/cases/<CASE>/``.
        pacs_cases: the cases to fetch (:func:`parse_pacs_case`).
        endpoint: a DICOMweb endpoint (:func:`ContrastAmplifierLib.pacs.endpoint_and_policy`).
        readers, phases: as :func:`.init_study`.
        other_cases: case folders, manifests or :class:`.Case` objects that are not fetched (``--cases``).
        rules_file: series rules (TOML or JSON, :func:`ContrastAmplifierLib.pacs.load_rules`).
        policy: retries of each request.
        progress, cancel: progress callback and cancel token of the retrieval.
        **init_options: the other keyword arguments of :func:`.init_study` (reference_reader, force...).

    Returns:
        The study and, per fetched case, what was retrieved.

    Raises:
        StudyError: as :func:`.init_study` (checked before the PACS is asked anything).
        PacsError: the series could not be picked, or the PACS refused or did not answer.
    """
    if not pacs_cases:
        raise StudyError("no case to fetch: give --pacs-case CASE=STUDY_INSTANCE_UID (repeat per case)")
    ids = [c.id for c in pacs_cases]
    if len(set(ids)) < len(ids):
        raise StudyError(f"--pacs-case names case {sorted({i for i in ids if ids.count(i) > 1})[0]!r} twice; one entry per case")
    phase_list = [p if isinstance(p, Phase) else default_phase(p) for p in (phases or DEFAULT_PHASE_NAMES)]
    folders = study_volumes(phase_list)
    cases = [*planned_cases(study_dir, pacs_cases, folders), *other_cases]
    init_study(study_dir, cases, readers, phase_list, dry_run=True, **init_options)
    plans = plan_cases(pacs_cases, endpoint, list(folders.values()), rules_file, policy)
    results = fetch_cases(study_dir, plans, endpoint, policy, progress, cancel)
    return init_study(study_dir, cases, readers, phase_list, **init_options), results
