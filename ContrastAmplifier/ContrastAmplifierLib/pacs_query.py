"""Searching a PACS (QIDO-RS): its studies, and the series of one study.

DICOMweb only (a ``dicom://`` endpoint is refused with the fix); retried like every request
(:func:`.pacs_transport.retrying`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

from .pacs_config import Endpoint, PacsConfigError, RetryPolicy
from .pacs_transport import http_attempt, make_dicomweb_client, retrying, unreachable

#: A DICOM UID: digits and dots (at most 64 characters, checked by :func:`check_uid`).
UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")


@dataclass(frozen=True)
class StudyInfo:
    """One study as QIDO-RS lists it."""

    study_instance_uid: str
    date: str = ""
    patient_id: str = ""
    description: str = ""
    modalities: str = ""
    n_series: Optional[int] = None
    n_instances: Optional[int] = None


@dataclass(frozen=True)
class SeriesInfo:
    """One series as QIDO-RS lists it."""

    series_instance_uid: str
    number: Optional[int] = None
    description: str = ""
    modality: str = ""
    n_instances: Optional[int] = None

    def line(self) -> str:
        """``#3  MR   176 instances  "T1 MPRAGE"  1.2.840...`` for listings."""
        number = f"#{self.number}" if self.number is not None else "#?"
        count = f"{self.n_instances} instances" if self.n_instances is not None else "? instances"
        return f"{number:>5}  {self.modality or '?':<3} {count:>14}  {json.dumps(self.description)}  {self.series_instance_uid}"


def check_uid(uid: str, what: str) -> str:
    """``uid`` without surrounding spaces; a :class:`.PacsConfigError` when it is not a DICOM UID."""
    uid = uid.strip()
    if not UID_PATTERN.match(uid) or len(uid) > 64:
        raise PacsConfigError(f"{what} {uid!r} is not a DICOM UID (digits and dots, at most 64 characters); copy it from "
                              "`contrast-amplifier pacs query`.")
    return uid


def query_studies(endpoint: Endpoint, patient_id: Optional[str] = None, study_uid: Optional[str] = None,
                  policy: Optional[RetryPolicy] = None) -> list[StudyInfo]:
    """The studies of ``endpoint`` (QIDO-RS), optionally of one patient or one Study Instance UID.

    Raises:
        PacsConfigError, PacsRefused, PacsUnreachable: as :func:`.pacs_send.send_instances`.
    """
    client = make_dicomweb_client(endpoint)
    filters: dict[str, Any] = {}
    if patient_id:
        filters["PatientID"] = patient_id
    if study_uid:
        filters["StudyInstanceUID"] = check_uid(study_uid, "Study Instance UID")
    fields = ["StudyDescription", "ModalitiesInStudy", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"]

    def search() -> list[dict[str, Any]]:
        return http_attempt(endpoint, lambda: client.search_for_studies(fields=fields, search_filters=filters,
                                                                        get_remaining=True), "search studies")

    found, _ = retrying(search, policy or RetryPolicy(), unreachable(endpoint, "searching studies"))
    studies = [StudyInfo(study_instance_uid=str(_value(s, "0020000D") or ""), date=str(_value(s, "00080020") or ""),
                         patient_id=str(_value(s, "00100020") or ""), description=str(_value(s, "00081030") or ""),
                         modalities="\\".join(str(m) for m in (s.get("00080061") or {}).get("Value") or []),
                         n_series=_int_or_none(_value(s, "00201206")), n_instances=_int_or_none(_value(s, "00201208")))
               for s in found]
    return sorted(studies, key=lambda s: (s.date, s.study_instance_uid))


def query_series(endpoint: Endpoint, study_uid: str, policy: Optional[RetryPolicy] = None) -> list[SeriesInfo]:
    """The series of study ``study_uid`` on ``endpoint`` (QIDO-RS), by series number.

    Raises:
        PacsConfigError, PacsRefused, PacsUnreachable: as :func:`.pacs_send.send_instances`.
    """
    study_uid = check_uid(study_uid, "Study Instance UID")
    client = make_dicomweb_client(endpoint)
    fields = ["SeriesDescription", "SeriesNumber", "Modality", "NumberOfSeriesRelatedInstances"]

    def search() -> list[dict[str, Any]]:
        return http_attempt(endpoint, lambda: client.search_for_series(study_uid, fields=fields, get_remaining=True),
                            "search series")

    found, _ = retrying(search, policy or RetryPolicy(), unreachable(endpoint, f"searching the series of study {study_uid}"))
    series = [SeriesInfo(series_instance_uid=str(_value(s, "0020000E") or ""), number=_int_or_none(_value(s, "00200011")),
                         description=str(_value(s, "0008103E") or ""), modality=str(_value(s, "00080060") or ""),
                         n_instances=_int_or_none(_value(s, "00201209")))
              for s in found]
    return sorted(series, key=lambda s: (s.number is None, s.number or 0, s.series_instance_uid))


def _value(item: Mapping[str, Any], tag: str) -> Any:
    """The first value of ``tag`` (8 hex digits) in a DICOM JSON object; a person name as text."""
    values = (item.get(tag) or {}).get("Value") or []
    if not values:
        return None
    value = values[0]
    if isinstance(value, dict):  # PN
        return value.get("Alphabetic") or next(iter(value.values()), None)
    return value


def _int_or_none(value: Any) -> Optional[int]:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None
