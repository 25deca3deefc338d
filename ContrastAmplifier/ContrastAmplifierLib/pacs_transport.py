"""How PACS requests are made: the retry loop and the DICOMweb plumbing shared by send, query and fetch.

Connection errors, HTTP 408/429/5xx and association aborts are transient (:class:`Transient`)
and retried by :func:`retrying` with the exponential backoff of a :class:`.RetryPolicy`; a
refusal (HTTP 4xx, association rejected) is a :class:`.PacsRefused`, raised at once and naming
the endpoint and the fix (:func:`http_attempt`). :func:`makemake_dicomweb_client` builds a
dicomweb-client with its own retries off, so that :func:`retrying` counts every attempt.

The optional DICOM packages (pydicom, pynetdicom, dicomweb-client, requests: the ``dicom`` extra)
are imported where used, through :func:`import_optional`, which names the install command.
"""

from __future__ import annotations

import importlib
import inspect
import re
from typing import TYPE_CHECKING, Any, Callable, Optional, TypeVar

from ContrastAmplifierCommon.progress import CancelToken, check_cancel

from .pacs_config import ENV_PASSWORD, ENV_TOKEN, ENV_USER, Endpoint, PacsConfigError, PacsError, PacsRefused, PacsUnreachable, RetryPolicy

if TYPE_CHECKING:  # the optional DICOM packages: imported where used
    from dicomweb_client import DICOMwebClient

    from .pacs_send import SendReport

T = TypeVar("T")

INSTALL_FIX = "install them with `pip install 'slicer-contrast-amplifier[dicom]'` (or `pip install pynetdicom dicomweb-client`)"


class Transient(Exception):
    """One attempt failed in a way a retry may fix; ``progressed`` when it still got some work done."""

    def __init__(self, message: str, progressed: bool = False):
        super().__init__(message)
        self.progressed = progressed


# -- retries -------------------------------------------------------------------------------------


def retrying(action: Callable[[], T], policy: RetryPolicy, failure: Callable[[str, int], PacsError],
             cancel: Optional[CancelToken] = None) -> tuple[T, int]:
    """Run ``action`` until it succeeds or ``policy`` runs out; returns its result and the attempts made.

    ``action`` raises :class:`Transient` for a failure worth retrying; one that made progress
    starts the count again. Out of attempts, ``failure(last message, attempts)`` is raised; a
    :class:`PacsError` from ``action`` (a refusal) passes through at once, with the attempts made.
    """
    attempt = total = 0
    while True:
        attempt += 1
        total += 1
        check_cancel(cancel)
        try:
            return action(), total
        except PacsError as exc:  # a refusal: never retried
            exc.attempts = exc.attempts or total
            raise
        except Transient as exc:
            if exc.progressed:
                attempt = 0
                continue
            if attempt >= policy.attempts:
                raise failure(str(exc), total) from None
            policy.sleep(policy.delay(attempt))


def unreachable(endpoint: Endpoint, what: str, report: Optional[SendReport] = None) -> Callable[[str, int], PacsError]:
    """The ``failure`` of :func:`retrying`: a :class:`.PacsUnreachable` saying what was being done and the fix."""
    def make(last: str, attempts: int) -> PacsError:
        return PacsUnreachable(
            endpoint.redact(f"{what}: {endpoint.display()} did not answer after {attempts} attempt(s) (last: {last}). Fix: "
                            "check that the PACS is running and reachable from this machine (URL, host, port, firewall, VPN), "
                            "then run again (more tries: --retries)."), attempts=attempts, report=report)
    return make


# -- DICOMweb plumbing ---------------------------------------------------------------------------


def import_optional(name: str) -> Any:
    """Import an optional DICOM package; a :class:`.PacsConfigError` with the install command when it is missing."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise PacsConfigError(f"talking to a PACS needs the {name.split('.')[0]} package, which is not installed: "
                              f"{INSTALL_FIX}.") from exc


def make_dicomweb_client(endpoint: Endpoint) -> DICOMwebClient:
    """A dicomweb-client for ``endpoint`` (its own retries off: :func:`retrying` counts attempts)."""
    if endpoint.protocol != "dicomweb":
        raise PacsConfigError(f"{endpoint.display()} is a DIMSE endpoint; searching and fetching need DICOMweb: use its "
                              "http(s)://host:port/dicom-web URL (C-FIND/C-MOVE are not supported).")
    requests = import_optional("requests")
    web = import_optional("dicomweb_client.web")
    session = requests.Session()
    if endpoint.username or endpoint.password:
        session.auth = (endpoint.username or "", endpoint.password or "")
    headers = {"Authorization": f"Bearer {endpoint.token}"} if endpoint.token else None
    options: dict[str, Any] = {}
    if "timeout" in inspect.signature(web.DICOMwebClient).parameters:  # dicomweb-client >= 0.60
        options["timeout"] = endpoint.timeout_s
    client = web.DICOMwebClient(endpoint.url, session=session, headers=headers, **options)
    client.set_http_retry_params(retry=False)
    return client


_RETRIABLE_HTTP = {408, 429}


def _short_connection_error(exc: BaseException) -> str:
    """The useful part of a requests connection error (``[Errno 111] Connection refused``)."""
    text = str(exc)
    found = re.search(r"\[Errno -?\d+\][^'\")]*", text)
    if found:
        return found.group(0).strip()
    if "timed out" in text.lower() or "timeout" in type(exc).__name__.lower():
        return "timed out"
    return type(exc).__name__


def _http_refusal(endpoint: Endpoint, status: int, reason: str, doing: str) -> PacsRefused:
    """The :class:`PacsRefused` for an HTTP 4xx answer, with the fix for that status."""
    head = f"{endpoint.display()} refused to {doing} (HTTP {status} {reason})".rstrip()
    creds = (f"the endpoint's username/password(_env) or token in the config file, or ${ENV_USER}/${ENV_PASSWORD} "
             f"(${ENV_TOKEN})")
    fixes = {
        401: f"the credentials are missing or wrong. Fix: set {creds}.",
        403: "this account may not do that. Fix: ask the PACS administrator for the permission, or use another account.",
        404: "the URL is not a DICOMweb service root. Fix: use the root, e.g. http://host:8042/dicom-web for Orthanc.",
        413: "the request is too large. Fix: send fewer instances per request (--batch-size).",
        415: "the PACS does not accept this DICOM encoding. Fix: send over DIMSE (dicom://AET@host:port) or ask the "
             "PACS administrator.",
    }
    return PacsRefused(endpoint.redact(f"{head}: {fixes.get(status, 'Fix: check the URL and the PACS logs.')}"))


def http_attempt(endpoint: Endpoint, call: Callable[[], T], doing: str) -> T:
    """One DICOMweb request: connection errors, 408/429/5xx -> :class:`Transient`, other 4xx -> :class:`PacsRefused`."""
    requests = import_optional("requests")
    try:
        return call()
    except requests.HTTPError as exc:
        response = exc.response
        status = response.status_code if response is not None else 0
        if status >= 500 or status in _RETRIABLE_HTTP:
            raise Transient(f"HTTP {status} {getattr(response, 'reason', '') or ''}".strip()) from None
        raise _http_refusal(endpoint, status, getattr(response, "reason", "") or "", doing) from None
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise Transient(_short_connection_error(exc)) from None
    except requests.exceptions.ChunkedEncodingError as exc:  # the connection dropped mid-answer
        raise Transient(f"connection dropped ({type(exc).__name__})") from None

