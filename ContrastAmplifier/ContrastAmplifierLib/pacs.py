"""Talking to a PACS: send DICOM files, list studies and series, fetch a study's series.

Two protocols, chosen by the endpoint's URL:

* DICOMweb, ``http(s)://host:port/dicom-web`` (the service root): STOW-RS sends, QIDO-RS searches,
  WADO-RS retrieves (through ``dicomweb-client``);
* DIMSE, ``dicom://CALLED_AET@host:port``: C-STORE sends (through ``pynetdicom``) under the calling
  AE title :data:`DEFAULT_CALLING_AET` unless configured otherwise. Query and fetch need DICOMweb.

This module is the public API; the work is done in one module per concern:

* :mod:`.pacs_config`: the errors, the config file, endpoints and credentials (never shown), the
  retry policy;
* :mod:`.pacs_transport`: the retry loop and the DICOMweb plumbing (refusals vs transient errors);
* :mod:`.pacs_send`: :func:`send_instances`, STOW-RS or C-STORE, acknowledged instance by instance;
* :mod:`.pacs_query`: :func:`query_studies`, :func:`query_series` (QIDO-RS);
* :mod:`.pacs_rules`: picking one series per volume by its SeriesDescription (:func:`pick_series`);
* :mod:`.pacs_fetch`: :func:`fetch_study` (WADO-RS into one folder per volume, ``series.json``).

pydicom, pynetdicom, dicomweb-client and requests are imported inside the functions that use them
(the ``dicom`` extra); these modules themselves need the standard library only.

Example::

    from ContrastAmplifierLib import pacs

    endpoint = pacs.resolve_endpoint("hospital", pacs.load_config())
    report = pacs.send_instances("OUT/T1c-pro-dicom", endpoint, pacs.RetryPolicy(retries=3))
    result = pacs.fetch_study("1.2.840....", "case001", endpoint, rules=pacs.load_rules("rules.toml"))
"""

from __future__ import annotations

from .pacs_config import (
    DEFAULT_CALLING_AET,
    ENV_CALLING_AET,
    ENV_CONFIG,
    ENV_PASSWORD,
    ENV_TOKEN,
    ENV_URL,
    ENV_USER,
    Endpoint,
    PacsConfig,
    PacsConfigError,
    PacsError,
    PacsRefused,
    PacsUnreachable,
    RetryPolicy,
    SeriesSelectionError,
    StudyNotFoundError,
    default_config_path,
    endpoint_and_policy,
    load_config,
    mask_url,
    resolve_endpoint,
    user_config_dir,
)
from .pacs_fetch import SERIES_FILE, FetchPlan, FetchResult, fetch_planned, fetch_study, plan_fetch
from .pacs_query import SeriesInfo, StudyInfo, check_uid, query_series, query_studies
from .pacs_rules import DEFAULT_RULES, MODALITIES, VOLUME_RULES, SeriesRule, SeriesRules, default_rules, load_rules, pick_series
from .pacs_send import InstanceResult, SendReport, find_dicom_files, resend_command, send_instances

__all__ = [
    "DEFAULT_CALLING_AET", "DEFAULT_RULES", "ENV_CALLING_AET", "ENV_CONFIG", "ENV_PASSWORD", "ENV_TOKEN", "ENV_URL",
    "ENV_USER", "MODALITIES", "SERIES_FILE", "VOLUME_RULES", "Endpoint", "FetchPlan", "FetchResult", "InstanceResult",
    "PacsConfig", "PacsConfigError", "PacsError", "PacsRefused", "PacsUnreachable", "RetryPolicy", "SendReport",
    "SeriesInfo", "SeriesRule", "SeriesRules", "SeriesSelectionError", "StudyInfo", "StudyNotFoundError",
    "check_uid", "default_config_path", "default_rules", "endpoint_and_policy", "fetch_planned", "fetch_study", "find_dicom_files", "load_config", "load_rules", "mask_url",
    "pick_series", "plan_fetch", "query_series", "query_studies", "resend_command", "resolve_endpoint", "send_instances",
    "user_config_dir",
]
