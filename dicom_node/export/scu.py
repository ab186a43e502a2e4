"""Results back to the PACS: C-STORE SCU over one association per batch, and C-ECHO for the administrator.

:func:`send_files` never raises for what a network or a peer can do; it returns a :class:`SendReport` that
says, for each file, whether it was ``delivered``, ``rejected`` (permanent: the peer answered a failure
status, or will never accept the object as configured) or ``transient`` (worth retrying: no connection,
time-out, abort, peer out of resources), with the status code, its name and a reason an IT administrator can
act on.

Classification rules
--------------------
Per instance (C-STORE response status, PS3.4 B.2.3 and PS3.7 C):

- Success, and Warning (B000 coercion, B006 elements discarded, B007 data set does not match SOP class):
  ``delivered`` (a warning is named in the reason);
- Refused: Out of Resources (A7xx), Resource Limitation (0213), Duplicate Invocation (0210): ``transient``;
- any other failure (A9xx, Cxxx, 0122 SOP class not supported, 0124 not authorised, 0110 processing
  failure...) and any status outside the standard's categories: ``rejected``;
- no response (DIMSE time-out, association aborted or connection lost while sending): ``transient``.

Per association (every file of the batch gets the association's outcome when it is not established):

- connection refused, host unreachable, name not resolved, connect or ACSE time-out, A-ABORT, A-ASSOCIATE-RJ
  "rejected transient" (peer busy): ``transient``;
- A-ASSOCIATE-RJ "rejected permanent" (called AE title not recognised, calling AE title not recognised,
  ...), a failed TLS handshake or unusable TLS files: ``rejected``: a configuration error that retrying
  cannot fix;
- a SOP class (or transfer syntax we cannot convert to) that the peer does not accept: ``rejected`` for the
  files concerned.
"""

from __future__ import annotations

import errno
import logging
import socket
import ssl
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.pdu import A_ASSOCIATE_RJ
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_node.config import DestinationSettings, RetryPolicy
from dicom_node.export.outcome import (
    AssociationResult,
    AssociationState,
    EchoResult,
    FileResult,
    Outcome,
    RejectReason,
    RejectResult,
    SendReport,
    classify_association,
    classify_store_status,
    status_name,
)
from dicom_node.logs import uid_hash
from dicom_node.status import Status
from dicom_node.tls import TLSConfigError, client_context

__all__ = ["MAX_CONTEXTS", "echo", "peer_label", "send_files"]

log = logging.getLogger(__name__)

MAX_CONTEXTS = 128  # presentation contexts one A-ASSOCIATE-RQ may carry (odd context IDs 1..255)
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


def peer_label(destination: DestinationSettings) -> str:
    """``AE@host:port``, how an administrator names a DICOM peer."""
    return f"{destination.ae_title}@{destination.host}:{destination.port}"


# -- association ---------------------------------------------------------------------------------------------


@dataclass
class _Attempt:
    assoc: Association | None
    result: AssociationResult | None  # None while the association is established and in use
    started: float


def _resolve(host: str) -> str:
    """The IP address pynetdicom needs; raises OSError (socket.gaierror) when the name does not resolve."""
    infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return str(infos[0][4][0])


def _connect_failure(
    destination: DestinationSettings, address: str, tls: ssl.SSLContext | None, elapsed: float
) -> tuple[AssociationState, str]:
    """Why the TCP/TLS connection failed: pynetdicom only logs the error, so look once more with a probe."""
    peer = f"{destination.host}:{destination.port}"
    if elapsed >= destination.timeout * 0.9:
        return AssociationState.TIMEOUT, (
            f"no TCP connection to {peer} within {destination.timeout:g} s (host down, firewall, or wrong address)"
        )
    try:
        with socket.create_connection((address, destination.port), timeout=destination.timeout) as sock:
            if tls is not None:
                try:
                    with tls.wrap_socket(sock, server_hostname=destination.host):
                        pass
                except (ssl.SSLError, ssl.CertificateError) as exc:
                    return AssociationState.TLS_FAILED, f"TLS handshake with {peer} failed: {exc}"
                except OSError as exc:
                    return AssociationState.TLS_FAILED, f"TLS handshake with {peer} failed: {exc}"
    except ConnectionRefusedError:
        return AssociationState.REFUSED, (
            f"connection refused by {peer}: nothing listens on that port (is the PACS running, is the port right?)"
        )
    except TimeoutError:
        return AssociationState.TIMEOUT, f"no TCP connection to {peer} within {destination.timeout:g} s"
    except OSError as exc:
        if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN):
            return AssociationState.UNREACHABLE, f"{peer} is unreachable: {exc.strerror}"
        return AssociationState.UNREACHABLE, f"cannot connect to {peer}: {exc}"
    return (
        AssociationState.UNREACHABLE,
        f"connection to {peer} failed, then succeeded on a second try (flaky)",
    )


#: Quick retries of an association lost during negotiation, inside one send: 0.2 s, then 0.4 s. Not in the settings:
#: they ride out a link reset within the task; an outage longer than that is the task's retry (``queue.retry``).
NEGOTIATION_RETRY = RetryPolicy(base_seconds=0.2, cap_seconds=0.4, max_retries=2)


def _associate(destination: DestinationSettings, calling_ae: str, contexts: list[PresentationContext]) -> _Attempt:
    """Request an association; quick retries when the link drops during negotiation.

    A connection lost before any answer (a reset, a peer restarting) is retried twice, 0.2 s and then 0.4 s later;
    a rejection that arrived is never retried (see :func:`_associate_once` for one that pynetdicom misses).
    """
    attempt = _associate_once(destination, calling_ae, contexts)
    for retries in range(NEGOTIATION_RETRY.max_retries):
        if attempt.result is None or attempt.result.state != AssociationState.ABORTED:
            break
        time.sleep(NEGOTIATION_RETRY.delay(retries))
        attempt = _associate_once(destination, calling_ae, contexts)
    return attempt


def _no_delay(event: evt.Event) -> None:
    """Disable Nagle's algorithm: pynetdicom writes a C-STORE as several small PDUs, and Nagle holding each
    one back until the peer's delayed ACK costs ~40 ms per instance on loopback (measured: 49 -> 12 ms)."""
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:
            log.debug("cannot set TCP_NODELAY: %s", exc)


def _associate_once(destination: DestinationSettings, calling_ae: str, contexts: list[PresentationContext]) -> _Attempt:
    started = time.monotonic()
    peer = peer_label(destination)

    def failed(state: AssociationState, reason: str) -> _Attempt:
        return _Attempt(None, AssociationResult(state, reason, time.monotonic() - started), started)

    tls: ssl.SSLContext | None = None
    if destination.tls:
        try:
            tls = client_context(destination)
        except TLSConfigError as exc:
            return failed(AssociationState.TLS_FAILED, str(exc))
    try:
        address = _resolve(destination.host)
    except OSError as exc:
        return failed(AssociationState.UNREACHABLE, f"cannot resolve host name {destination.host!r}: {exc}")

    ae = AE(ae_title=calling_ae)
    ae.connection_timeout = destination.timeout
    ae.acse_timeout = destination.timeout
    ae.dimse_timeout = destination.timeout
    ae.network_timeout = destination.timeout
    ae.requested_contexts = contexts
    connected: list[bool] = []
    rejections: list[A_ASSOCIATE_RJ] = []

    def on_open(event: evt.Event) -> None:
        connected.append(True)
        _no_delay(event)

    def on_pdu(event: evt.Event) -> None:
        if isinstance(event.pdu, A_ASSOCIATE_RJ):
            rejections.append(event.pdu)

    assoc = ae.associate(
        address,
        destination.port,
        ae_title=destination.ae_title,
        tls_args=(tls, destination.host) if tls is not None else None,
        evt_handlers=[(evt.EVT_CONN_OPEN, on_open), (evt.EVT_PDU_RECV, on_pdu)],
    )
    elapsed = time.monotonic() - started
    if assoc.is_established:
        assoc.unbind(evt.EVT_PDU_RECV, on_pdu)  # only the negotiation's answer is of interest
        return _Attempt(assoc, None, started)
    if assoc.is_rejected or rejections:
        # pynetdicom can miss a rejection that it received: when its network thread reads the A-ASSOCIATE-RJ and
        # closes the connection (as the peer does) before the requesting thread looks, that thread sees a closed
        # connection and aborts (seen under full CPU load against Orthanc). The PDU itself is the answer.
        primitive: Any = assoc.acceptor.primitive if assoc.is_rejected else rejections[0].to_primitive()
        result = int(getattr(primitive, "result", RejectResult.PERMANENT))
        source = int(getattr(primitive, "result_source", 0) or 0)
        diagnostic = int(getattr(primitive, "diagnostic", 0) or 0)
        words = RejectReason.describe(source, diagnostic, calling_ae, destination.ae_title)
        if result == RejectResult.TRANSIENT:
            return failed(AssociationState.BUSY, f"association rejected for now by {peer}: {words}")
        return failed(AssociationState.REJECTED, f"association rejected by {peer}: {words}")
    if not connected:
        state, reason = _connect_failure(destination, address, tls, elapsed)
        return failed(state, reason)
    if assoc.rejected_contexts and not assoc.accepted_contexts:
        offered = sorted({UID(str(cx.abstract_syntax)).name for cx in assoc.rejected_contexts})
        return failed(AssociationState.NO_CONTEXTS, f"{peer} accepts none of the SOP classes offered: {offered}")
    if elapsed >= destination.timeout * 0.9:
        return failed(
            AssociationState.TIMEOUT,
            f"{peer} did not answer the association request within {destination.timeout:g} s",
        )
    return failed(AssociationState.ABORTED, f"{peer} aborted the association during negotiation")


def _release(attempt: _Attempt, destination: DestinationSettings) -> AssociationResult:
    assoc = attempt.assoc
    assert assoc is not None
    if assoc.is_established:
        assoc.release()
        return AssociationResult(AssociationState.RELEASED, "", time.monotonic() - attempt.started)
    return AssociationResult(
        AssociationState.ABORTED,
        f"association with {peer_label(destination)} aborted or lost before release",
        time.monotonic() - attempt.started,
    )


# -- C-STORE -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _FileInfo:
    index: int
    path: Path
    sop_class: UID
    sop_instance: str
    transfer_syntax: UID


def _read_info(index: int, path: Path) -> _FileInfo | str:
    """The file's SOP class, instance and transfer syntax, or why it cannot be sent."""
    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"])
    except (OSError, InvalidDicomError) as exc:
        return f"cannot read {path}: {exc}"
    except Exception as exc:
        return f"cannot parse {path} as DICOM: {exc}"
    meta = getattr(ds, "file_meta", None)
    ts = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
    sop_class = ds.get("SOPClassUID") or (getattr(meta, "MediaStorageSOPClassUID", None) if meta else None)
    sop_instance = ds.get("SOPInstanceUID") or (getattr(meta, "MediaStorageSOPInstanceUID", None) if meta else None)
    missing = [
        name
        for name, value in (
            ("TransferSyntaxUID", ts),
            ("SOPClassUID", sop_class),
            ("SOPInstanceUID", sop_instance),
        )
        if not value
    ]
    if missing:
        return f"{path} lacks {', '.join(missing)}: not a DICOM Part 10 file that can be sent"
    return _FileInfo(index, path, UID(str(sop_class)), str(sop_instance), UID(str(ts)))


def _contexts_for(infos: Sequence[_FileInfo]) -> list[tuple[UID, tuple[UID, ...]]]:
    """(SOP class, transfer syntaxes) to offer.

    The stored syntax alone, when it is not a plain little endian one, and always both plain little endian
    syntaxes as the fallback we can convert or decompress to.
    """
    wanted: dict[UID, list[tuple[UID, ...]]] = defaultdict(list)
    for info in infos:
        offers = wanted[info.sop_class]
        if info.transfer_syntax not in UNCOMPRESSED and (info.transfer_syntax,) not in offers:
            offers.append((info.transfer_syntax,))
    contexts: list[tuple[UID, tuple[UID, ...]]] = []
    for sop_class, offers in wanted.items():
        contexts.extend((sop_class, syntaxes) for syntaxes in offers)
        contexts.append((sop_class, UNCOMPRESSED))
    return contexts


def _batches(infos: list[_FileInfo]) -> list[list[_FileInfo]]:
    """Split into associations of at most MAX_CONTEXTS presentation contexts, keeping SOP classes together."""
    by_class: dict[UID, list[_FileInfo]] = defaultdict(list)
    for info in infos:
        by_class[info.sop_class].append(info)
    batches: list[list[_FileInfo]] = [[]]
    used = 0
    for group in by_class.values():
        need = len(_contexts_for(group))
        if batches[-1] and used + need > MAX_CONTEXTS:
            batches.append([])
            used = 0
        batches[-1].extend(group)
        used += need
    for batch in batches:
        batch.sort(key=lambda i: i.index)  # send in the caller's order within an association
    return [b for b in batches if b]


def _plan(info: _FileInfo, accepted: set[tuple[UID, UID]]) -> tuple[UID | None, bool]:
    """(transfer syntax to send in, whether to decompress the pixel data); None: the peer takes none."""
    if (info.sop_class, info.transfer_syntax) in accepted:
        return info.transfer_syntax, False
    for syntax in UNCOMPRESSED:
        if (info.sop_class, syntax) in accepted:
            if info.transfer_syntax.is_compressed:
                return syntax, True
            if info.transfer_syntax.is_little_endian:
                return syntax, False  # pynetdicom converts between explicit/implicit VR and inflates deflated
    return None, False


def _no_response(what: str, peer: str, timeout: float, sent: float) -> str:
    """Why a request got no response: pynetdicom returns an empty status for a time-out and for a lost link."""
    if time.monotonic() - sent >= timeout * 0.9:
        return f"no {what} response from {peer} within {timeout:g} s"
    return f"association with {peer} aborted or connection lost before the {what} response"


def _send_one(
    assoc: Association, info: _FileInfo, accepted: set[tuple[UID, UID]], peer: str, timeout: float
) -> FileResult:
    def result(outcome: Outcome, reason: str, status: int | None = None, syntax: UID | None = None) -> FileResult:
        return FileResult(
            info.path,
            info.sop_instance,
            str(info.sop_class),
            outcome,
            status,
            status_name(status) if status is not None else "",
            reason,
            str(syntax) if syntax is not None else None,
        )

    syntax, decompress = _plan(info, accepted)
    if syntax is None:
        offered = [ts.name for (sop, ts) in accepted if sop == info.sop_class]
        if not offered:
            return result(Outcome.REJECTED, f"{peer} does not accept SOP class {info.sop_class.name}")
        return result(
            Outcome.REJECTED,
            f"{peer} accepts {info.sop_class.name} only as {offered}, and the file's "
            f"{info.transfer_syntax.name} cannot be converted to it",
        )
    try:
        ds: Dataset = dcmread(info.path)
        if decompress:
            ds.decompress()
    except Exception as exc:
        return result(
            Outcome.REJECTED,
            f"{peer} needs {info.sop_class.name} uncompressed and the file's {info.transfer_syntax.name} "
            f"could not be decompressed: {exc}",
        )
    sent = time.monotonic()
    try:
        status = assoc.send_c_store(ds)
    except RuntimeError:  # pynetdicom: the association ended between our check and the send
        return result(Outcome.TRANSIENT, f"association with {peer} ended before this object was sent")
    except (ValueError, AttributeError, TypeError) as exc:
        return result(Outcome.REJECTED, f"cannot encode the object for {peer}: {exc}")
    if "Status" not in status:
        return result(Outcome.TRANSIENT, _no_response("C-STORE", peer, timeout, sent), None, syntax)
    code = int(status.Status)
    outcome = classify_store_status(code)
    comment = str(status.get("ErrorComment", "") or "")[:64]
    name = status_name(code)
    if outcome == Outcome.DELIVERED:
        reason = "" if code == Status.SUCCESS else f"stored with warning 0x{code:04X} ({name})"
    elif outcome == Outcome.TRANSIENT:
        reason = f"{peer} is temporarily unable to store: status 0x{code:04X} ({name})"
    else:
        reason = f"rejected by {peer} with status 0x{code:04X} ({name})"
    if comment:
        reason += f": {comment}"
    return result(outcome, reason, code, syntax)


def send_files(
    destination: DestinationSettings,
    files: Sequence[Path],
    calling_ae: str,
    *,
    on_delivered: Callable[[FileResult], None] | None = None,
) -> SendReport:
    """C-STORE ``files`` to ``destination`` over one association (more only beyond 128 presentation contexts).

    ``calling_ae`` is our AE title unless the destination sets ``calling_ae_title``. Files are sent as stored
    when the peer accepts their transfer syntax, else converted to Explicit/Implicit VR Little Endian
    (decompressed if needed). Never raises for network, peer or file problems: see :class:`SendReport` and the
    module docstring.

    ``on_delivered(result)`` is called for each file the peer acknowledged (Success or a warning), as soon as its
    response arrives and before the next C-STORE goes out: the caller records the delivery there, so that a crash
    mid-batch leaves on record everything the peer confirmed, and a retry resends only the rest (at most the one
    object whose response was in flight). Whatever it raises aborts the association and propagates: sending on
    without being able to record what was delivered would only make duplicates later.
    """
    started = time.monotonic()
    calling = destination.calling_ae_title or calling_ae
    peer = peer_label(destination)
    report = SendReport(destination=destination.name, peer=peer)
    results: dict[int, FileResult] = {}
    infos: list[_FileInfo] = []
    for index, path in enumerate(Path(f) for f in files):
        info = _read_info(index, path)
        if isinstance(info, str):
            results[index] = FileResult(path, None, None, Outcome.REJECTED, None, "", info)
            log.warning("C-STORE to %s skips an unreadable file: %s", peer, info)
        else:
            infos.append(info)

    for batch in _batches(infos):
        contexts = [build_context(sop, list(syntaxes)) for sop, syntaxes in _contexts_for(batch)]
        attempt = _associate(destination, calling, contexts)
        if attempt.result is not None:
            assoc_result = attempt.result
            outcome = classify_association(assoc_result.state)
            for info in batch:
                results[info.index] = FileResult(
                    info.path, info.sop_instance, str(info.sop_class), outcome, None, "", assoc_result.reason
                )
            log.warning(
                "C-STORE to %s (%s) from %s: %s, %d files %s: %s",
                destination.name, peer, calling, assoc_result.state.value, len(batch), outcome.value,
                assoc_result.reason,
            )  # fmt: skip
            report.associations.append(assoc_result)
            continue
        assoc = attempt.assoc
        assert assoc is not None
        accepted = {(UID(str(cx.abstract_syntax)), UID(str(cx.transfer_syntax[0]))) for cx in assoc.accepted_contexts}
        for info in batch:
            if not assoc.is_established:
                results[info.index] = FileResult(
                    info.path, info.sop_instance, str(info.sop_class), Outcome.TRANSIENT, None, "",
                    f"association with {peer} ended before this object was sent",
                )  # fmt: skip
                continue
            file_result = _send_one(assoc, info, accepted, peer, destination.timeout)
            results[info.index] = file_result
            if on_delivered is not None and file_result.outcome == Outcome.DELIVERED:
                try:
                    on_delivered(file_result)
                except BaseException:  # not handled here: the association ends, the error goes to the caller
                    assoc.abort()
                    raise
            if file_result.outcome != Outcome.DELIVERED:
                log.warning(
                    "C-STORE of instance %s to %s %s: %s",
                    uid_hash(info.sop_instance), peer, file_result.outcome.value, file_result.reason,
                )  # fmt: skip
        assoc_result = _release(attempt, destination)
        report.associations.append(assoc_result)
        counts = defaultdict(int, {o: 0 for o in Outcome})
        for info in batch:
            counts[results[info.index].outcome] += 1
        log.info(
            "C-STORE association %s -> %s (%s): %d delivered, %d rejected, %d transient in %.2f s, %s",
            calling, peer, destination.name, counts[Outcome.DELIVERED], counts[Outcome.REJECTED],
            counts[Outcome.TRANSIENT], assoc_result.elapsed_s, assoc_result.state.value,
        )  # fmt: skip
    if not infos:
        report.associations.append(AssociationResult(AssociationState.NOT_ATTEMPTED, "", 0.0))
    report.files = [results[i] for i in sorted(results)]
    report.elapsed_s = time.monotonic() - started
    return report


# -- C-ECHO --------------------------------------------------------------------------------------------------


def echo(
    destination: DestinationSettings, calling_ae: str, *, clock: Callable[[], float] = time.perf_counter
) -> EchoResult:
    """C-ECHO ``destination``: ok and round trip, or the exact failure (refused, rejected and why, ...)."""
    calling = destination.calling_ae_title or calling_ae
    peer = peer_label(destination)
    started = clock()

    def total_ms() -> float:
        return (clock() - started) * 1000

    attempt = _associate(destination, calling, [build_context(Verification, list(UNCOMPRESSED))])
    if attempt.result is not None:
        result = EchoResult(
            destination.name, peer, False, attempt.result.state, attempt.result.reason, None, total_ms()
        )
        log.warning("C-ECHO %s -> %s failed (%s): %s", calling, peer, result.state.value, result.reason)
        return result
    assoc = attempt.assoc
    assert assoc is not None
    sent = clock()
    sent_monotonic = time.monotonic()
    status = assoc.send_c_echo()
    round_trip = (clock() - sent) * 1000
    release = _release(attempt, destination)
    if "Status" not in status:
        why = _no_response("C-ECHO", peer, destination.timeout, sent_monotonic)
        state = AssociationState.TIMEOUT if why.startswith("no ") else AssociationState.ABORTED
        result = EchoResult(destination.name, peer, False, state, why, None, total_ms())
    elif int(status.Status) != Status.SUCCESS:
        code = int(status.Status)
        result = EchoResult(
            destination.name, peer, False, release.state,
            f"{peer} answered C-ECHO with status 0x{code:04X} ({status_name(code)})",
            round_trip, total_ms(), code,
        )  # fmt: skip
    else:
        result = EchoResult(destination.name, peer, True, release.state, "", round_trip, total_ms(), int(status.Status))
    if result.ok:
        log.info("C-ECHO %s -> %s ok in %.1f ms", calling, peer, result.round_trip_ms or 0.0)
    else:
        log.warning("C-ECHO %s -> %s failed (%s): %s", calling, peer, result.state.value, result.reason)
    return result
