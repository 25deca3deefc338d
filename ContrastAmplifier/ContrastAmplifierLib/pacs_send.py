"""Sending DICOM files to a PACS: STOW-RS (DICOMweb) or C-STORE (DIMSE), instance by instance.

What is reported as sent was acknowledged by the PACS, instance by instance: C-STORE status
0x0000 (or a warning status: stored), a STOW-RS response's ReferencedSOPSequence (an instance in
its FailedSOPSequence, or in neither, is not sent). A PACS acknowledges an instance it already
holds, so sending again is safe. Connection errors, HTTP 408/429/5xx and association aborts are
retried with exponential backoff (:class:`.RetryPolicy`); a refusal (HTTP 4xx, association
rejected) is not, and raises :class:`.PacsRefused` naming the endpoint and the fix.

Entry point: :func:`send_instances` (files and folders are searched by :func:`find_dicom_files`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import socket
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

from ContrastAmplifierCommon.progress import CancelToken, ProgressCallback, check_cancel

from .pacs_config import Endpoint, PacsConfigError, PacsError, PacsRefused, PathLike, RetryPolicy, mask_url
from .pacs_transport import Transient, http_attempt, import_optional, make_dicomweb_client, retrying, unreachable

if TYPE_CHECKING:  # the optional DICOM packages: imported where used
    import requests
    from dicomweb_client import DICOMwebClient
    from pydicom import Dataset


# -- files ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InstanceFile:
    """A DICOM Part 10 file to send: its path, SOP class and instance UIDs, transfer syntax and size in bytes."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    size: int


def _is_part10(path: Path) -> bool:
    """Whether ``path`` starts like a DICOM Part 10 file (``DICM`` after the 128-byte preamble)."""
    try:
        with path.open("rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def _candidate_files(paths: Iterable[PathLike]) -> Iterator[Path]:
    """Every file named or under a folder named (recursively, hidden names skipped), in name order."""
    for given in paths:
        path = Path(given)
        if path.is_file():
            yield path
        elif path.is_dir():
            for child in sorted(path.rglob("*")):
                relative = child.relative_to(path).parts
                if child.is_file() and not any(part.startswith(".") for part in relative):
                    yield child
        else:
            raise PacsConfigError(f"{path} does not exist; pass a DICOM file or a folder of DICOM files.")


def find_dicom_files(paths: Iterable[PathLike]) -> tuple[list[InstanceFile], list[tuple[Path, str]]]:
    """The DICOM Part 10 instances among ``paths`` (files and folders, recursively) and what was skipped.

    Returns:
        ``(instances, skipped)``: one entry per SOP instance (a second file with the same SOP
        Instance UID is skipped); ``skipped`` pairs a path with the reason (not DICOM, a DICOMDIR,
        a duplicate, unreadable).
    """
    pydicom = import_optional("pydicom")
    instances: list[InstanceFile] = []
    skipped: list[tuple[Path, str]] = []
    seen: dict[str, Path] = {}
    for path in _candidate_files(paths):
        if not _is_part10(path):
            skipped.append((path, "not a DICOM Part 10 file"))
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"])
            meta = ds.file_meta
            sop_class = str(ds.get("SOPClassUID") or meta.get("MediaStorageSOPClassUID") or "")
            sop_uid = str(ds.get("SOPInstanceUID") or meta.get("MediaStorageSOPInstanceUID") or "")
            syntax = str(meta.get("TransferSyntaxUID") or "")
        except Exception as exc:  # pydicom raises many types on damaged files
            skipped.append((path, f"unreadable ({type(exc).__name__})"))
            continue
        if sop_class == "1.2.840.10008.1.3.10":
            skipped.append((path, "a DICOMDIR (index), not an instance"))
        elif not sop_uid or not sop_class or not syntax:
            skipped.append((path, "no SOP Class/Instance UID or transfer syntax"))
        elif sop_uid in seen:
            skipped.append((path, f"same SOP Instance UID as {seen[sop_uid]}"))
        else:
            seen[sop_uid] = path
            instances.append(InstanceFile(path, sop_class, sop_uid, syntax, path.stat().st_size))
    return instances, skipped


# -- send ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InstanceResult:
    """What the PACS said about one instance.

    Attributes:
        path: the file sent.
        sop_instance_uid: its SOP Instance UID.
        status: ``"sent"`` (acknowledged; ``detail`` says when with a warning), ``"failed"`` (the
            PACS refused it) or ``"not sent"`` (no acknowledgement: the transfer stopped first).
        detail: the DIMSE status or STOW-RS reason, e.g. ``0x0000`` or ``FailureReason 0x0110 (processing failure)``.
    """

    path: Path
    sop_instance_uid: str
    status: str
    detail: str = ""


@dataclass
class SendReport:
    """The outcome of :func:`send_instances`.

    Attributes:
        endpoint: the endpoint, as displayed (credentials masked).
        protocol: ``"dicomweb"`` (STOW-RS) or ``"dimse"`` (C-STORE).
        results: one per instance found, in file order.
        skipped: files that were not sent, with the reason (not DICOM, duplicates).
        attempts: STOW-RS requests or associations made, retries included.
        elapsed_s: wall time.
    """

    endpoint: str
    protocol: str
    results: list[InstanceResult] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    attempts: int = 0
    elapsed_s: float = 0.0

    @property
    def n_sent(self) -> int:
        return sum(r.status == "sent" for r in self.results)

    @property
    def n_total(self) -> int:
        return len(self.results)

    @property
    def ok(self) -> bool:
        """Every instance found was acknowledged."""
        return self.n_total > 0 and self.n_sent == self.n_total

    def summary(self) -> str:
        """``sent N of M instances to X`` (and what failed or was skipped)."""
        method = "STOW-RS" if self.protocol == "dicomweb" else "C-STORE"
        unit = "request(s)" if self.protocol == "dicomweb" else "association(s)"
        text = f"sent {self.n_sent} of {self.n_total} instances to {self.endpoint} ({method}, {self.elapsed_s:.1f} s"
        text += f", {self.attempts} {unit})" if self.attempts else ")"
        failed = sum(r.status == "failed" for r in self.results)
        not_sent = sum(r.status == "not sent" for r in self.results)
        extra = [f"{failed} refused by the PACS" if failed else "", f"{not_sent} not acknowledged" if not_sent else "",
                 f"{len(self.skipped)} file(s) skipped (not DICOM instances)" if self.skipped else ""]
        extra = [e for e in extra if e]
        return text + ("; " + ", ".join(extra) if extra else "")

    def lines(self, verbose: bool = False) -> list[str]:
        """One line per instance not acknowledged (``status  SOP Instance UID  path  detail``); with
        ``verbose``, one per instance and one per file skipped."""
        lines = [f"{r.status:<8}  {r.sop_instance_uid}  {r.path}  {r.detail}" for r in self.results if verbose or r.status != "sent"]
        if verbose:
            lines += [f"skipped   {path}  {reason}" for path, reason in self.skipped]
        return lines

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready copy (paths as strings)."""
        return {"endpoint": self.endpoint, "protocol": self.protocol, "sent": self.n_sent, "total": self.n_total,
                "attempts": self.attempts, "elapsed_s": round(self.elapsed_s, 3),
                "instances": [{**dataclasses.asdict(r), "path": str(r.path)} for r in self.results],
                "skipped": [{"path": str(p), "reason": why} for p, why in self.skipped]}


_STATUS_MEANINGS = (
    (0x0000, 0x0000, "success"),
    (0x0001, 0x0001, "stored with warning"),
    (0x0107, 0x0107, "attribute list error"),
    (0x0110, 0x0110, "processing failure"),
    (0x0111, 0x0111, "duplicate SOP instance"),
    (0x0117, 0x0117, "invalid SOP instance"),
    (0x0122, 0x0122, "SOP class not supported"),
    (0x0124, 0x0124, "not authorized"),
    (0xA700, 0xA7FF, "out of resources"),
    (0xA900, 0xA9FF, "data set does not match SOP class"),
    (0xB000, 0xB000, "coercion of data elements"),
    (0xB006, 0xB006, "elements discarded"),
    (0xB007, 0xB007, "data set does not match SOP class (stored)"),
    (0xC000, 0xCFFF, "cannot understand"),
)
_WARNING_STATUSES = {0x0001, 0xB000, 0xB006, 0xB007}


def _status_text(code: int) -> str:
    meaning = next((m for low, high, m in _STATUS_MEANINGS if low <= code <= high), "unknown status")
    return f"0x{code:04X} ({meaning})"


def _cstore_result(item: InstanceFile, status: int) -> InstanceResult:
    """An instance's result from its C-STORE response status (success and warnings are stored)."""
    if status == 0x0000:
        return InstanceResult(item.path, item.sop_instance_uid, "sent", "0x0000")
    if status in _WARNING_STATUSES:
        return InstanceResult(item.path, item.sop_instance_uid, "sent", f"warning {_status_text(status)}")
    return InstanceResult(item.path, item.sop_instance_uid, "failed", _status_text(status))


def _stow_results(batch: Sequence[InstanceFile], response: Dataset, bare_ok: bool) -> list[InstanceResult]:
    """Per-instance results from a STOW-RS response (ReferencedSOPSequence / FailedSOPSequence).

    An instance in neither sequence is ``not sent``, except when ``bare_ok`` (a 2xx answer) and
    the response lists nothing at all: an HTTP 200 without a body acknowledges every instance of
    the request (PS3.18 10.5.3).
    """
    referenced = {str(i.get("ReferencedSOPInstanceUID", "")): i for i in response.get("ReferencedSOPSequence", None) or []}
    failed = {str(i.get("ReferencedSOPInstanceUID", "")): i for i in response.get("FailedSOPSequence", None) or []}
    bare_ok = bare_ok and not referenced and not failed
    results = []
    for item in batch:
        uid = item.sop_instance_uid
        if uid in failed:
            reason = failed[uid].get("FailureReason", None)
            text = f"FailureReason {_status_text(int(reason))}" if reason is not None else "in FailedSOPSequence"
            results.append(InstanceResult(item.path, uid, "failed", text))
        elif uid in referenced:
            warning = referenced[uid].get("WarningReason", None)
            detail = f"warning {_status_text(int(warning))}" if warning is not None else "in ReferencedSOPSequence"
            results.append(InstanceResult(item.path, uid, "sent", detail))
        elif bare_ok:
            results.append(InstanceResult(item.path, uid, "sent", "HTTP 200 (no per-instance response)"))
        else:
            results.append(InstanceResult(item.path, uid, "not sent", "not in the PACS's response"))
    return results


def _batches(items: Sequence[InstanceFile], max_count: int, max_bytes: int) -> Iterator[list[InstanceFile]]:
    """``items`` in runs of at most ``max_count`` instances and about ``max_bytes`` (one instance at least)."""
    batch: list[InstanceFile] = []
    size = 0
    for item in items:
        if batch and (len(batch) >= max_count or size + item.size > max_bytes):
            yield batch
            batch, size = [], 0
        batch.append(item)
        size += item.size
    if batch:
        yield batch


def _stow_batch(client: DICOMwebClient, endpoint: Endpoint, batch: Sequence[InstanceFile]) -> list[InstanceResult]:
    """One STOW-RS request for ``batch`` (one attempt); a 409 answer still gives per-instance results."""
    pydicom = import_optional("pydicom")
    requests = import_optional("requests")
    datasets = [pydicom.dcmread(item.path) for item in batch]

    def post() -> list[InstanceResult]:
        try:
            response = client.store_instances(datasets)
        except requests.HTTPError as exc:
            body = _stow_error_body(exc.response)
            if body is None:
                raise
            return _stow_results(batch, body, bare_ok=False)
        return _stow_results(batch, response, bare_ok=True)

    return http_attempt(endpoint, post, "store the instances")


def _stow_error_body(response: Optional[requests.Response]) -> Optional[Dataset]:
    """The DICOM JSON body of a STOW-RS 4xx answer that lists per-instance failures (409), else ``None``."""
    if response is None or not (400 <= response.status_code < 500):
        return None
    if "json" not in response.headers.get("Content-Type", "") and not response.content.lstrip().startswith(b"{"):
        return None
    pydicom = import_optional("pydicom")
    try:
        body = pydicom.Dataset.from_json(response.text)
    except Exception:  # not DICOM JSON: an ordinary refusal
        return None
    return body if "FailedSOPSequence" in body or "ReferencedSOPSequence" in body else None


def _send_stow(instances: Sequence[InstanceFile], endpoint: Endpoint, report: SendReport, policy: RetryPolicy,
               batch_size: int, step: Callable[[int], None], cancel: Optional[CancelToken]) -> None:
    """STOW-RS ``instances`` in batches; each batch is retried on its own (``report.attempts`` counts requests)."""
    client = make_dicomweb_client(endpoint)
    failure = unreachable(endpoint, f"sending {len(instances)} instance(s)", report)
    for batch in _batches(instances, batch_size, 64 * 1024 * 1024):
        try:
            results, attempts = retrying(functools.partial(_stow_batch, client, endpoint, batch), policy, failure, cancel)
        except PacsError as exc:
            report.attempts += exc.attempts
            raise
        report.attempts += attempts
        report.results.extend(results)
        step(len(report.results))


def _presentation_contexts(instances: Sequence[InstanceFile]) -> list[tuple[str, str]]:
    """The (SOP class, transfer syntax) pairs to propose, one context each: the files are sent as
    stored (no transcoding), so each needs its own transfer syntax accepted."""
    pairs: dict[tuple[str, str], None] = {}
    for item in instances:
        pairs[(item.sop_class_uid, item.transfer_syntax_uid)] = None
    return list(pairs)


def _check_association(endpoint: Endpoint, assoc: Any) -> None:
    """Return when ``assoc`` is established; a permanent rejection raises :class:`PacsRefused`, a
    transient one or no association at all (refused connection, abort, timeout) :class:`Transient`."""
    if assoc.is_established:
        return
    answer = getattr(getattr(assoc, "acceptor", None), "primitive", None)
    if not assoc.is_rejected and answer is not None and getattr(answer, "result", None) == 0 and assoc.rejected_contexts:
        classes = sorted({str(c.abstract_syntax) for c in assoc.rejected_contexts})
        raise PacsRefused(f"{endpoint.display()} accepted the association but none of the SOP classes offered "
                          f"({', '.join(classes)}): it does not store these objects (in these transfer syntaxes). Fix: ask "
                          "the PACS administrator to accept them, or send over DICOMweb.")
    if not assoc.is_rejected:
        raise Transient("no association (connection refused, reset or timed out)")
    primitive = getattr(getattr(assoc, "acceptor", None), "primitive", None)
    reason = str(getattr(primitive, "reason_str", "") or "rejected")
    result = getattr(primitive, "result", 1)
    if result == 2:  # rejected-transient
        raise Transient(f"association rejected (transient: {reason})")
    fixes = {
        "Called AE title not recognised": f"check the PACS's AE title: the URL says {endpoint.called_aet!r} "
                                          "(dicom://CALLED_AET@host:port); use the one the PACS is configured with",
        "Calling AE title not recognised": f"ask the PACS administrator to register calling AE title {endpoint.calling_aet!r} "
                                           f"(with this machine's address), or pass the registered one with --calling-aet",
    }
    fix = fixes.get(reason, "check the AE titles and ask the PACS administrator whether this client may connect")
    raise PacsRefused(f"{endpoint.display()} rejected the association ({reason}; calling AE title {endpoint.calling_aet!r}, "
                       f"called {endpoint.called_aet!r}). Fix: {fix}.")


def _disable_nagle(assoc: Any) -> None:
    """Send small writes at once on the association's socket (TCP_NODELAY).

    pynetdicom writes a C-STORE request as several small sends; with Nagle's algorithm each one
    after the first waits for the peer's delayed ACK (about 40 ms on Linux): with TCP_NODELAY, a
    C-STORE to a pynetdicom SCP took 5 ms instead of 49 ms (to Orthanc 1.10: 57 ms instead of 93 ms).
    """
    sock = getattr(getattr(getattr(assoc, "dul", None), "socket", None), "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _accepted_pairs(assoc: Any) -> set[tuple[str, str]]:
    return {(str(c.abstract_syntax), str(ts)) for c in assoc.accepted_contexts for ts in (c.transfer_syntax or [])}


def _cstore_pending(assoc: Any, pending: list[InstanceFile], results: list[InstanceResult], step: Callable[[int], None],
                    cancel: Optional[CancelToken]) -> None:
    """C-STORE ``pending`` over ``assoc``, moving each acknowledged (or refused) instance to ``results``."""
    accepted = _accepted_pairs(assoc)
    progressed = False
    while pending:
        check_cancel(cancel)
        item = pending[0]
        if (item.sop_class_uid, item.transfer_syntax_uid) not in accepted:
            results.append(InstanceResult(item.path, item.sop_instance_uid, "failed",
                                          f"the PACS accepted no presentation context for SOP class {item.sop_class_uid} "
                                          f"in transfer syntax {item.transfer_syntax_uid}"))
        else:
            status = assoc.send_c_store(item.path)  # a path: sent as stored, in its own transfer syntax
            if not status or "Status" not in status:  # no answer: aborted, timed out or the connection dropped
                raise Transient("no C-STORE response (association aborted or timed out)", progressed=progressed)
            results.append(_cstore_result(item, int(status.Status)))
        pending.pop(0)
        progressed = True
        step(len(results))


def _send_dimse(instances: Sequence[InstanceFile], endpoint: Endpoint, report: SendReport, policy: RetryPolicy,
                step: Callable[[int], None], cancel: Optional[CancelToken]) -> None:
    pynetdicom = import_optional("pynetdicom")
    contexts = _presentation_contexts(instances)
    if len(contexts) > 128:
        raise PacsConfigError(f"the files need {len(contexts)} presentation contexts (SOP class x transfer syntax); one "
                              "association allows 128: send them in smaller groups (one folder at a time).")
    ae = pynetdicom.AE(ae_title=endpoint.calling_aet)
    for sop_class, syntax in contexts:
        ae.add_requested_context(sop_class, [syntax])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = endpoint.timeout_s
    ae.connection_timeout = min(endpoint.timeout_s, 10.0)
    pending = list(instances)

    def one_association() -> None:
        assoc = ae.associate(endpoint.host, endpoint.port, ae_title=endpoint.called_aet)
        _check_association(endpoint, assoc)
        _disable_nagle(assoc)
        try:
            _cstore_pending(assoc, pending, report.results, step, cancel)
        finally:
            if assoc.is_established:
                assoc.release()

    failure = unreachable(endpoint, f"sending {len(instances)} instance(s)", report)
    _, report.attempts = retrying(one_association, policy, failure, cancel)


def resend_command(paths: Sequence[PathLike], endpoint: Endpoint) -> str:
    """The ``contrast-amplifier pacs send`` command that sends ``paths`` to ``endpoint`` later
    (the endpoint by its config name, else its URL with credentials masked)."""
    shown = " ".join(str(p) for p in paths[:3]) + (" ..." if len(paths) > 3 else "")
    return f"contrast-amplifier pacs send {shown} --to {endpoint.name or mask_url(endpoint.url)}"


def send_instances(paths: Union[PathLike, Iterable[PathLike]], endpoint: Endpoint, policy: Optional[RetryPolicy] = None,
                   batch_size: int = 25, progress: Optional[ProgressCallback] = None,
                   cancel: Optional[CancelToken] = None) -> SendReport:
    """Send every DICOM instance among ``paths`` (files, or folders searched recursively) to ``endpoint``.

    DICOMweb endpoints get STOW-RS requests of ``batch_size`` instances; DIMSE endpoints one
    association of C-STOREs (each file in its own transfer syntax). Each instance's result is what
    the PACS acknowledged; an instance refused by the PACS does not stop the others.

    Args:
        paths: a file or folder, or several.
        endpoint: from :func:`resolve_endpoint`.
        policy: retries of a failed request or association (default :class:`RetryPolicy`).
        batch_size: instances per STOW-RS request.
        progress: ``(stage, fraction, message)`` callback.
        cancel: stops between instances.

    Returns:
        The :class:`SendReport`: check ``report.ok``.

    Raises:
        PacsConfigError: no DICOM file found, or a bad option.
        PacsRefused: the PACS refused the connection (credentials, AE title, URL); ``exc.report``
            holds what was acknowledged before.
        PacsUnreachable: no answer after every retry; ``exc.report`` likewise.
    """
    if batch_size < 1:
        raise PacsConfigError(f"batch size must be at least 1 (got {batch_size}).")
    policy = policy or RetryPolicy()
    given = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    instances, skipped = find_dicom_files(given)
    if not instances:
        names = ", ".join(str(p) for p in given)
        raise PacsConfigError(f"no DICOM instance found in {names} ({len(skipped)} file(s) skipped: not DICOM Part 10); "
                              "pass the folder of the DICOM series to send.")
    report = SendReport(endpoint=endpoint.display(), protocol=endpoint.protocol, skipped=skipped)
    start = time.perf_counter()

    def step(done: int) -> None:
        if progress is not None:
            progress("send", done / len(instances), f"{done}/{len(instances)} instances")

    try:
        if endpoint.protocol == "dicomweb":
            _send_stow(instances, endpoint, report, policy, batch_size, step, cancel)
        else:
            _send_dimse(instances, endpoint, report, policy, step, cancel)
    except PacsError as exc:
        report.attempts = report.attempts or exc.attempts
        _finish(report, instances, start)
        exc.report = report
        raise
    _finish(report, instances, start)
    return report


def _finish(report: SendReport, instances: Sequence[InstanceFile], start: float) -> None:
    """Mark the instances without a result ``not sent``, keep file order, and stamp the time."""
    known = {r.sop_instance_uid: r for r in report.results}
    report.results = [known.get(i.sop_instance_uid) or InstanceResult(i.path, i.sop_instance_uid, "not sent", "not attempted")
                      for i in instances]
    report.elapsed_s = time.perf_counter() - start
