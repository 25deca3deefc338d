"""Fetching a study's series from a PACS (DICOMweb), one folder per volume.

:func:`fetch_study` lists the study's series (QIDO-RS), picks one per volume by its
SeriesDescription (:mod:`.pacs_rules`: by default the T1, FLAIR, ADC and T1c series, overridable
with a series number or UID), retrieves each (WADO-RS, in its stored transfer syntax) into
``OUT/<volume>/`` one file per instance (a folder appears only once complete) and records the
choice in ``OUT/series.json``: the layout ``contrast-amplifier predict --t1 OUT/t1 --flair
OUT/flair --adc OUT/adc --t1c OUT/t1c`` reads. The two steps are also separate:
:func:`plan_fetch` lists and picks (nothing written), :func:`fetch_planned` retrieves, so a
caller fetching several studies can check every choice before retrieving any.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

from ContrastAmplifierCommon.atomicfile import apply_umask, atomic_path, write_text_atomic
from ContrastAmplifierCommon.progress import CancelToken, ProgressCallback, check_cancel

from .pacs_config import Endpoint, PacsConfigError, PacsRefused, PacsUnreachable, PathLike, RetryPolicy, StudyNotFoundError
from .pacs_query import UID_PATTERN, SeriesInfo, check_uid, query_series
from .pacs_rules import DEFAULT_FIX, MODALITIES, SeriesRules, default_rules, pick_series
from .pacs_transport import http_attempt, import_optional, make_dicomweb_client, retrying, unreachable

if TYPE_CHECKING:  # the optional DICOM packages: imported where used
    from dicomweb_client import DICOMwebClient
    from pydicom import Dataset

SERIES_FILE = "series.json"


@dataclass(frozen=True)
class FetchPlan:
    """What :func:`plan_fetch` picked: the series to retrieve, before anything is written.

    Attributes:
        study_uid: the Study Instance UID.
        series: every series of the study (QIDO-RS), by series number.
        picked: volume -> the series picked for it, in the order asked for.
        rules: the rules used.
        overrides: volume -> series number or UID given by the user.
    """

    study_uid: str
    series: Sequence[SeriesInfo]
    picked: Mapping[str, SeriesInfo]
    rules: SeriesRules
    overrides: Mapping[str, str] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class FetchResult:
    """What :func:`fetch_study` wrote.

    Attributes:
        out_dir: the output folder.
        folders: volume -> folder of its series (one file per instance).
        series: volume -> the series picked.
        n_instances: instances written in all.
        series_file: ``OUT/series.json``.
        elapsed_s: wall time.
    """

    out_dir: Path
    folders: Mapping[str, Path]
    series: Mapping[str, SeriesInfo]
    n_instances: int
    series_file: Path
    elapsed_s: float


def _write_instance(ds: Dataset, path: Path) -> None:
    """Write a retrieved instance as a DICOM Part 10 file, atomically."""
    pydicom = import_optional("pydicom")
    keyword = "enforce_file_format" if "enforce_file_format" in inspect.signature(pydicom.dcmwrite).parameters else "write_like_original"
    with atomic_path(path, suffix=".dcm") as tmp:
        pydicom.dcmwrite(str(tmp), ds, **{keyword: keyword == "enforce_file_format"})


def _iter_series(client: DICOMwebClient, study_uid: str, series_uid: str) -> Iterator[Dataset]:
    """The instances of a series in their stored transfer syntax; explicit VR little endian from a
    server that cannot send "any" (HTTP 406)."""
    requests = import_optional("requests")
    try:
        return client.iter_series(study_uid, series_uid, media_types=(("application/dicom", "*"),))
    except requests.HTTPError as exc:
        if exc.response is None or exc.response.status_code != 406:
            raise
        return client.iter_series(study_uid, series_uid)


def _retrieve_series(client: DICOMwebClient, endpoint: Endpoint, study_uid: str, series: SeriesInfo, staging: Path,
                     step: Callable[[str], None], cancel: Optional[CancelToken]) -> int:
    """Retrieve one series into the empty folder ``staging`` (one attempt); returns the instances written.
    ``step(sop_instance_uid)`` is called after each instance written."""
    for old in staging.iterdir():  # a retry starts from an empty folder
        old.unlink()
    written: set[str] = set()

    def retrieve() -> int:
        for ds in _iter_series(client, study_uid, series.series_instance_uid):
            check_cancel(cancel)
            uid = str(ds.get("SOPInstanceUID", ""))
            if str(ds.get("SeriesInstanceUID", "")) != series.series_instance_uid or not UID_PATTERN.match(uid):
                raise PacsRefused(f"{endpoint.display()} answered series {series.series_instance_uid} with an instance of "
                                  "another series or without a valid SOP Instance UID; check the PACS.")
            if uid not in written:
                _write_instance(ds, staging / f"{uid}.dcm")
                written.add(uid)
                step(uid)
        return len(written)

    return http_attempt(endpoint, retrieve, f"retrieve series {series.series_instance_uid}")


def _check_outputs(out_dir: Path, volumes: Iterable[str], overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise PacsConfigError(f"{out_dir} is a file; pass a folder for the fetched series.")
    files = [str(out_dir / v) for v in volumes if (out_dir / v).exists() and not (out_dir / v).is_dir()]
    if files:
        raise PacsConfigError(f"{', '.join(files)} exist(s) and is not a folder; move it away or choose another output folder.")
    busy = [str(out_dir / v) for v in volumes if (out_dir / v).is_dir() and any((out_dir / v).iterdir())]
    if busy and not overwrite:
        raise PacsConfigError(f"{', '.join(busy)} already exist(s); pass --overwrite to replace, or choose another output folder.")


def _move_into_place(staging: Path, final: Path) -> None:
    """Rename the complete ``staging`` folder to ``final`` (replacing a previous one)."""
    if final.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.replace(final, trash / final.name)
        os.replace(staging, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staging, final)


def _fetch_one(client: DICOMwebClient, endpoint: Endpoint, study_uid: str, volume: str, series: SeriesInfo,
               out_dir: Path, policy: RetryPolicy, step: Callable[[], None], cancel: Optional[CancelToken]) -> int:
    """Retrieve ``series`` into ``out_dir/volume`` (complete or not at all); returns the instances written."""
    staging = Path(tempfile.mkdtemp(prefix=f".{volume}.partial-", dir=out_dir))
    counted: set[str] = set()

    def step_once(uid: str) -> None:  # an instance retrieved again by a retry is not progress
        if uid not in counted:
            counted.add(uid)
            step()

    try:
        count, _ = retrying(lambda: _retrieve_series(client, endpoint, study_uid, series, staging, step_once, cancel),
                            policy, unreachable(endpoint, f"retrieving the {volume} series"), cancel)
        if count == 0 or (series.n_instances is not None and count != series.n_instances):
            raise PacsUnreachable(f"{endpoint.display()} returned {count} instance(s) of the {volume} series "
                                  f"#{series.number} ({series.series_instance_uid}), which it lists with {series.n_instances}; "
                                  "the PACS may still be receiving it. Fix: wait and fetch again.")
        apply_umask(staging, directory=True)
        _move_into_place(staging, out_dir / volume)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return count


def plan_fetch(study_uid: str, endpoint: Endpoint, rules: Optional[SeriesRules] = None,
               overrides: Optional[Mapping[str, str]] = None, policy: Optional[RetryPolicy] = None,
               volumes: Sequence[str] = MODALITIES, fix: str = DEFAULT_FIX) -> FetchPlan:
    """List the series of a study (QIDO-RS) and pick one per volume (:func:`.pick_series`); writes nothing.

    Args:
        rules: default :func:`.default_rules` of ``volumes``.
        volumes: the volumes to pick, also the names of their folders (default the four inputs).
        fix: the last line of a :class:`.SeriesSelectionError` (how to fix the choice).

    Raises:
        PacsConfigError: a bad UID or rules; StudyNotFoundError (a PacsConfigError): a study the PACS does not hold.
        SeriesSelectionError: the series could not be picked (the message lists them).
        PacsRefused, PacsUnreachable: as :func:`.pacs_send.send_instances`.
    """
    study_uid = check_uid(study_uid, "Study Instance UID")
    rules = rules if rules is not None else default_rules(volumes)
    series = query_series(endpoint, study_uid, policy or RetryPolicy())
    if not series:
        raise StudyNotFoundError(f"study {study_uid} not found on {endpoint.display()}; check the Study Instance UID "
                              f"(`contrast-amplifier pacs query --from ...` lists the studies).")
    picked = pick_series(series, rules, overrides, modalities=volumes, study_uid=study_uid, fix=fix)
    return FetchPlan(study_uid=study_uid, series=series, picked=picked, rules=rules, overrides=dict(overrides or {}))


def fetch_planned(plan: FetchPlan, out_dir: PathLike, endpoint: Endpoint, policy: Optional[RetryPolicy] = None,
                  overwrite: bool = False, progress: Optional[ProgressCallback] = None,
                  cancel: Optional[CancelToken] = None) -> FetchResult:
    """Retrieve the series ``plan`` picked into ``out_dir/<volume>/`` and write ``out_dir/series.json``.

    Each series is retrieved (WADO-RS, in its stored transfer syntax) into a hidden folder that is
    renamed to ``out_dir/<volume>`` once complete.

    Raises:
        PacsConfigError: outputs that exist without ``overwrite``.
        PacsRefused, PacsUnreachable: as :func:`.pacs_send.send_instances`.
    """
    start = time.perf_counter()
    out = Path(out_dir)
    policy = policy or RetryPolicy()
    _check_outputs(out, plan.picked, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    client = make_dicomweb_client(endpoint)
    total = sum(s.n_instances or 0 for s in plan.picked.values()) or 1
    done = [0]

    def step() -> None:
        done[0] += 1
        if progress is not None:
            progress("fetch", min(done[0] / total, 1.0), f"{done[0]}/{total} instances")

    counts = {v: _fetch_one(client, endpoint, plan.study_uid, v, s, out, policy, step, cancel) for v, s in plan.picked.items()}
    record = {
        "study_instance_uid": plan.study_uid,
        "source": endpoint.display(),
        "rules": plan.rules.source,
        "overrides": dict(plan.overrides),
        "fetched_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "series": {v: {**dataclasses.asdict(s), "folder": v, "instances_written": counts[v]} for v, s in plan.picked.items()},
        "all_series": [dataclasses.asdict(s) for s in plan.series],
    }
    series_file = write_text_atomic(json.dumps(record, indent=2) + "\n", out / SERIES_FILE)
    return FetchResult(out_dir=out, folders={v: out / v for v in plan.picked}, series=dict(plan.picked),
                       n_instances=sum(counts.values()), series_file=series_file, elapsed_s=time.perf_counter() - start)


def fetch_study(study_uid: str, out_dir: PathLike, endpoint: Endpoint, rules: Optional[SeriesRules] = None,
                overrides: Optional[Mapping[str, str]] = None, policy: Optional[RetryPolicy] = None,
                overwrite: bool = False, progress: Optional[ProgressCallback] = None,
                cancel: Optional[CancelToken] = None, volumes: Sequence[str] = MODALITIES,
                fix: str = DEFAULT_FIX) -> FetchResult:
    """Fetch one series per volume of a study into ``out_dir/<volume>/`` (DICOMweb): by default the
    T1, FLAIR, ADC and T1c series.

    The outputs are checked, the series listed and picked (:func:`plan_fetch`) before anything is
    written; then :func:`fetch_planned` retrieves them.

    Raises:
        PacsConfigError: a bad UID or rules, or outputs that exist without ``overwrite``.
        SeriesSelectionError: the series could not be picked (the message lists them).
        PacsRefused, PacsUnreachable: as :func:`.pacs_send.send_instances`.
    """
    start = time.perf_counter()
    study_uid = check_uid(study_uid, "Study Instance UID")
    _check_outputs(Path(out_dir), volumes, overwrite)
    plan = plan_fetch(study_uid, endpoint, rules, overrides, policy, volumes=volumes, fix=fix)
    result = fetch_planned(plan, out_dir, endpoint, policy, overwrite=overwrite, progress=progress, cancel=cancel)
    return dataclasses.replace(result, elapsed_s=time.perf_counter() - start)
