"""The SCP's server and the wiring of its association events: the AE, a DICOM TLS handshake on each connection's own
thread, the checks of each connection and association request before pynetdicom negotiates (allow-lists, limits,
called AE title), and the record of every refusal.

The C-STORE decision itself is :mod:`dicom_node.intake.handlers`; the socket and DIMSE pieces that rely on
pynetdicom's private API are :mod:`dicom_node.intake.transport` and :mod:`dicom_node.intake.reactor` (and, here,
:class:`_PolicyACSE` and the server's registration in ``ae._servers``).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import ssl
import threading
import time
from collections import Counter
from threading import Lock
from typing import TYPE_CHECKING, Any

from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.acse import ACSE
from pynetdicom.association import Association
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node.config import NodeSettings
from dicom_node.intake.reactor import make_event_driven
from dicom_node.intake.transport import (
    ConnectionGuard,
    drop_unfinished,
    guard_of,
    install_guard,
    install_log_filters,
    spool_large_data_sets,
)
from dicom_node.logs import audit
from dicom_node.tls import server_context

if TYPE_CHECKING:
    from dicom_node.intake.handlers import Intake, IntakeCounters

__all__ = [
    "ACCEPTED_TRANSFER_SYNTAXES",
    "AccessPolicy",
    "Refusals",
    "build_ae",
    "max_negotiating",
    "start_scp",
    "tune_association",
]

log = logging.getLogger(__name__)

#: What the node accepts and stores as received: uncompressed, deflated, RLE, JPEG, JPEG-LS and JPEG 2000.
ACCEPTED_TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    RLELossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
]


class AccessPolicy:
    """Who may open an association: calling AE titles and source addresses (empty lists allow any)."""

    def __init__(self, settings: NodeSettings) -> None:
        self.calling = {a.strip() for a in settings.allowed_calling_aets}
        self.networks = [ipaddress.ip_network(h, strict=False) for h in settings.allowed_hosts]

    def refusal(self, address: str, calling_ae: str) -> str | None:
        if self.calling and calling_ae.strip() not in self.calling:
            return f"calling AE title {calling_ae.strip()!r} is not in node.allowed_calling_aets"
        if self.networks:
            try:
                ip = ipaddress.ip_address(address)
            except ValueError:
                return f"source address {address!r} is not an IP address"
            if not any(ip in net for net in self.networks):
                return f"source address {address} is not in node.allowed_hosts"
        return None


class Refusals:
    """Every refused connection and association: counted by reason, audited, and logged at most once a minute per
    source address and reason, with the count of those not logged (a peer that retries in a loop floods nothing).

    Reasons: ``called_ae``, ``calling_ae`` (characters an AE title cannot have), ``application_context``,
    ``not_allowed`` (allow-lists), ``association_limit``, ``pending_limit`` (too many connections still
    negotiating), ``garbage``, ``pdu_too_large``, ``message_too_large`` (a command set, or a data set of a message
    the node has no use for, beyond its bound), ``acse_timeout``, ``stalled``, ``tls_handshake``, and
    ``no_request`` (closed before asking for an association: port checks, logged at INFO and not counted as a
    rejected association).
    """

    LOG_EVERY = 60.0

    def __init__(self, counters: IntakeCounters) -> None:
        self._counters = counters
        self._lock = Lock()
        self.by_reason: Counter[str] = Counter()
        self._logged: dict[tuple[str, str], list[float]] = {}  # (address, reason:kind) -> [logged at, unlogged]

    def record(self, reason: str, address: str, detail: str, calling_ae: str = "", kind: str = "") -> None:
        """``kind``: a finer reason whose lines are limited apart (the TLS library's reason, say)."""
        now = time.monotonic()
        with self._lock:
            self.by_reason[reason] += 1
            key = (address, f"{reason}:{kind}")
            entry = self._logged.get(key)
            if entry is not None and now - entry[0] < self.LOG_EVERY:
                entry[1] += 1
                unlogged = None
            else:
                unlogged = 0 if entry is None else int(entry[1])
                if len(self._logged) >= 4096:  # bounded whatever the number of sources
                    self._logged = {k: v for k, v in self._logged.items() if now - v[0] < self.LOG_EVERY}
                self._logged[key] = [now, 0]
        if reason != "no_request":
            self._counters.add(rejected_associations=1)
        audit("association_rejected", address=address, calling_ae=calling_ae, reason=reason, detail=detail)
        if unlogged is not None:
            more = f" (and {unlogged} more from {address} for this reason in the last minute)" if unlogged else ""
            level = logging.INFO if reason == "no_request" else logging.WARNING
            who = f"{address} ({calling_ae})" if calling_ae else address
            log.log(level, "connection from %s refused, %s: %s%s", who, reason, detail, more)


# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4: permanent rejections by the service user, and the
# transient one of the service provider for a local limit.
_RJ_CONTEXT_NAME = (0x01, 0x01, 0x02)  # application-context-name-not-supported
_RJ_CALLING = (0x01, 0x01, 0x03)  # calling-AE-title-not-recognized
_RJ_CALLED = (0x01, 0x01, 0x07)  # called-AE-title-not-recognized
_RJ_LIMIT = (0x02, 0x03, 0x02)  # rejected-transient, local-limit-exceeded
#: The DICOM Application Context Name (PS3.7 A.2.1): the only one a DICOM peer may propose.
_DICOM_APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
#: pynetdicom's own association limit, which counts every connection's thread, established or not; the node's
#: limit (established associations only) is applied by :class:`_PolicyACSE`.
_PYNETDICOM_NO_LIMIT = 1_000_000


class _PolicyACSE(ACSE):
    """ACSE that checks an association request before pynetdicom negotiates its contexts, and refuses it with a
    proper A-ASSOCIATE-RJ, recorded with its reason (see :func:`association_refusal`)."""

    def __init__(self, assoc: Association, intake: Intake) -> None:
        super().__init__(assoc)
        self._intake = intake

    def _negotiate_as_acceptor(self) -> None:
        refusal = association_refusal(self._intake, self.assoc, self.requestor.primitive)
        if refusal is None:
            super()._negotiate_as_acceptor()
            return
        reason, detail, rsd = refusal
        calling = str(getattr(self.requestor.primitive, "calling_ae_title", "") or "").strip()
        self._intake.refusals.record(reason, self.assoc.requestor.address, detail, calling_ae=calling)
        guard = guard_of(self.assoc)
        if guard is not None:
            guard.refusal = reason
        self.requestor.ae_title = calling
        self.send_reject(*rsd)
        evt.trigger(self.assoc, evt.EVT_REJECTED, {})
        self.assoc.kill()


def association_refusal(
    intake: Intake, assoc: Association, request: Any
) -> tuple[str, str, tuple[int, int, int]] | None:
    """Why an association request is refused (reason, detail, A-ASSOCIATE-RJ result/source/diagnostic), or
    None: the called AE title (its characters as sent were checked by the socket), the application context,
    the allow-lists, and the association limit, which counts established associations only."""
    called = str(getattr(request, "called_ae_title", "") or "").strip()
    if called != intake.node.ae_title.strip():
        return "called_ae", f"called AE title {called!r} is not {intake.node.ae_title!r}", _RJ_CALLED
    context = str(getattr(request, "application_context_name", "") or "")
    if context != _DICOM_APPLICATION_CONTEXT:
        return "application_context", f"application context {context[:64]!r} is not DICOM's", _RJ_CONTEXT_NAME
    calling = str(getattr(request, "calling_ae_title", "") or "")
    why = intake.policy.refusal(assoc.requestor.address, calling)
    if why is not None:
        return "not_allowed", why, _RJ_CALLING
    established = sum(
        1 for a in assoc.ae.active_associations if a.is_acceptor and a.is_established and a is not assoc
    )
    if established >= intake.node.max_associations:
        return "association_limit", f"{established} associations already (node.max_associations)", _RJ_LIMIT
    return None


def guard_for(intake: Intake, address: str) -> ConnectionGuard:
    """The bounds of a new connection from ``address``."""
    node = intake.node
    return ConnectionGuard(
        address=address,
        max_pdu=node.max_pdu,
        acse_timeout=node.acse_timeout,
        network_timeout=node.network_timeout,
        on_refusal=lambda guard, reason, detail: intake.refusals.record(reason, guard.address, detail),
    )


def on_conn_open(event: Any, intake: Intake) -> None:
    assoc = event.assoc
    tune_association(assoc, guard_for(intake, assoc.requestor.address))
    assoc.acse = _PolicyACSE(assoc, intake)
    spool_large_data_sets(assoc, intake.spool)


def on_accepted(event: Any, intake: Intake) -> None:
    intake.counters.add(associations=1)
    r = event.assoc.requestor
    audit("association_accepted", address=r.address, calling_ae=r.ae_title.strip())


def on_released(event: Any) -> None:
    drop_unfinished(event.assoc)
    r = event.assoc.requestor
    audit("association_released", address=r.address, calling_ae=r.ae_title.strip())


def on_aborted(event: Any) -> None:
    drop_unfinished(event.assoc)
    r = event.assoc.requestor
    audit("association_aborted", address=r.address, calling_ae=r.ae_title.strip())
    log.warning("association from %s (%s) aborted", r.address, r.ae_title.strip())


def tune_association(assoc: Association, guard: ConnectionGuard | None = None) -> None:
    """Bounds and network tuning for one accepted association (on EVT_CONN_OPEN, before its threads start):
    reads within ``guard``'s limits (by default, the association's own timeouts and maximum PDU, refusals unrecorded)
    and reactor threads that wait for work."""
    if guard is None:
        guard = ConnectionGuard(
            address=assoc.requestor.address,
            max_pdu=assoc.ae.maximum_pdu_size,
            acse_timeout=float(assoc.acse_timeout or 30),
            network_timeout=float(assoc.network_timeout or 60),
            on_refusal=lambda *_: None,
        )
    install_guard(assoc, guard)
    make_event_driven(assoc)


def build_ae(node: NodeSettings) -> AE:
    """The pynetdicom AE of the SCP: every Storage SOP class with the accepted transfer syntaxes, and Verification."""
    ae = AE(ae_title=node.ae_title)
    for context in AllStoragePresentationContexts:
        assert context.abstract_syntax is not None
        ae.add_supported_context(context.abstract_syntax, ACCEPTED_TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.require_called_aet = True
    ae.maximum_associations = node.max_associations
    ae.maximum_pdu_size = node.max_pdu
    ae.acse_timeout = node.acse_timeout
    ae.dimse_timeout = node.dimse_timeout
    ae.network_timeout = node.network_timeout
    return ae


def max_negotiating(node: NodeSettings) -> int:
    """How many connections, from all addresses together, may be negotiating at once: twice
    ``node.max_associations``, at least 32 (a refused or closed connection's thread takes a moment to end)."""
    return max(2 * node.max_associations, 32)


class _IntakeServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, with the DICOM TLS handshake on each connection's own thread.

    pynetdicom runs the handshake while accepting, on the one thread that accepts every connection: a peer that
    connected and never finished its handshake held up all the others until it went away. Here each connection's
    thread does it, within the ACSE time-out; a failed one is logged and counted as a rejected association.
    """

    #: The listen backlog (socketserver's default is 5): a burst of more connections than that, faster than the
    #: accept loop takes them, had its SYNs dropped and retried after 1 s (measured: the 7th of 12 connections
    #: opened back to back waited 1014 ms).
    request_queue_size = 128

    tls: ssl.SSLContext | None = None
    intake: Intake
    _starting: Counter[str]
    _starting_lock: threading.Lock

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Whether to serve a new connection: no more than ``node.max_pending_per_host`` connections from one
        address, and :func:`max_negotiating` from all, may be negotiating at once (each ends within
        ``node.acse_timeout``), so that hosts that connect and stall cannot take every place. A connection refused
        here is closed at once (there is no association to reject yet) and recorded.

        Negotiating: association threads not yet established, and connections accepted whose thread has not
        started its association yet (a TLS handshake, or just started). A connection is counted twice for the moment
        between its association thread's start and its accepting thread's end: a burst may be refused a little
        early, never late."""
        address = str(client_address[0])
        node = self.intake.node
        pending = [
            a.requestor.address
            for a in self.ae.active_associations
            if a.is_acceptor and not (a.is_established or a.is_released or a.is_aborted or a.is_rejected)
        ]
        with self._starting_lock:
            from_host = sum(1 for a in pending if a == address) + self._starting[address]
            in_all = len(pending) + self._starting.total()
            if from_host >= node.max_pending_per_host:
                why = f"{from_host} connections from this address are still negotiating (node.max_pending_per_host)"
            elif in_all >= max_negotiating(node):
                why = f"{in_all} connections are still negotiating (at most {max_negotiating(node)})"
            else:
                self._starting[address] += 1
                return True
        self.intake.refusals.record("pending_limit", address, why)
        return False

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            if self.tls is not None:
                request = self._handshake(request, client_address)
                if request is None:
                    return
            super().process_request_thread(request, client_address)
        finally:
            with self._starting_lock:  # its association thread (if any) now counts itself
                address = str(client_address[0])
                self._starting[address] -= 1
                if self._starting[address] <= 0:
                    del self._starting[address]

    def _handshake(self, raw: socket.socket, client_address: Any) -> ssl.SSLSocket | None:
        assert self.tls is not None
        address = str(client_address[0])
        timeout = raw.gettimeout()
        conn: socket.socket = raw
        try:
            raw.settimeout(self.intake.node.acse_timeout)
            try:
                began = bool(raw.recv(1, socket.MSG_PEEK))
            except ConnectionResetError:
                began = False
            if not began:  # closed before its first byte: a port check (monitoring, a load balancer), not a peer
                self.intake.refusals.record("no_request", address, "closed before its TLS handshake began")
                raw.close()
                return None
            conn = secure = self.tls.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
            secure.do_handshake()
            secure.settimeout(timeout)
        except OSError as exc:  # ssl.SSLError, a time-out or a reset: no association, the next connection is served
            why = _handshake_failure(exc)
            kind = str(getattr(exc, "reason", None) or type(exc).__name__)
            self.intake.refusals.record("tls_handshake", address, f"TLS handshake failed: {why}", kind=kind)
            with contextlib.suppress(OSError):
                conn.close()
            return None
        return secure


#: OpenSSL's reasons for a failed server-side handshake that an administrator meets, in the node's words.
_HANDSHAKE_REASONS = {
    "WRONG_VERSION_NUMBER": "the peer did not start TLS (plain DICOM sent to a TLS port?)",
    "HTTP_REQUEST": "the peer did not start TLS (plain DICOM sent to a TLS port?)",
    "CERTIFICATE_VERIFY_FAILED": "the peer's certificate is not signed by a CA in node.tls_ca_file",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "the peer sent no certificate, and node.tls_ca_file requires one",
    "UNSUPPORTED_PROTOCOL": "the peer offered only TLS versions older than 1.2",
    "NO_SHARED_CIPHER": "the peer offered no cipher suite the node accepts",
}


def _handshake_failure(exc: OSError) -> str:
    if isinstance(exc, TimeoutError):
        return "no handshake within node.acse_timeout"
    reason = getattr(exc, "reason", None)
    if reason in _HANDSHAKE_REASONS:
        return f"{_HANDSHAKE_REASONS[reason]} ({reason})"
    return str(exc) or type(exc).__name__


def start_scp(intake: Intake) -> ThreadedAssociationServer:
    """Start listening (non-blocking); returns the server, whose ``shutdown()`` stops it.

    :class:`dicom_node.tls.TLSConfigError` when ``node.tls_*`` names a file that cannot be used."""
    tls = server_context(intake.node)
    ae = build_ae(intake.node)
    # The called AE title and the association limit are checked by _PolicyACSE, which records each refusal and
    # counts established associations only.
    ae.require_called_aet = False
    ae.maximum_associations = _PYNETDICOM_NO_LIMIT
    install_log_filters()
    handlers: list[Any] = [
        (evt.EVT_C_STORE, intake.on_c_store),
        (evt.EVT_C_ECHO, intake.on_c_echo),
        (evt.EVT_CONN_OPEN, on_conn_open, [intake]),
        (evt.EVT_ACCEPTED, on_accepted, [intake]),
        (evt.EVT_RELEASED, on_released),
        (evt.EVT_ABORTED, on_aborted),
    ]
    # What ae.start_server(block=False) does, with the server class that does the TLS handshake per connection.
    server = ae.make_server((intake.node.bind, intake.node.port), evt_handlers=handlers, server_class=_IntakeServer)
    assert isinstance(server, _IntakeServer)
    server.tls, server.intake = tls, intake
    server._starting, server._starting_lock = Counter(), threading.Lock()
    thread = threading.Thread(target=server.serve_forever, name=f"IntakeServer@{server.server_address[1]}")
    thread.daemon = True
    thread.start()
    ae._servers.append(server)  # so that server.shutdown(), which removes it there, works as pynetdicom's own
    log.info(
        "listening as %s on %s:%d%s (max %d associations)",
        intake.node.ae_title,
        intake.node.bind,
        server.server_address[1],
        " with DICOM TLS" + (", peer certificates required" if intake.node.tls_ca_file else "") if tls else "",
        intake.node.max_associations,
    )
    return server
