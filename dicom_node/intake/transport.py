"""The socket of each accepted association: bounded reads, deadlines, and fast PDU reads.

pynetdicom reads a PDU as its 6-byte header, then as many bytes as the header's length field claims, into one buffer
allocated up front, with no deadline once the first byte has arrived. A peer could so make the node allocate 4 GiB
per PDU with a 10-byte message, or hold a connection (and a slot) open for ever by trickling an A-ASSOCIATE-RQ one
byte at a time. :class:`GuardedSocket` reads the same way, with these bounds:

* **PDU length.** A P-DATA-TF PDU may be as long as the maximum the node announced (``node.max_pdu``, plus the
  header's 6 bytes; 64 MiB when it announced no maximum); any other PDU 1 MiB (an A-ASSOCIATE-RQ with hundreds of
  presentation contexts and a user identity token is a few tens of KiB). A longer claim is refused before anything
  is allocated: the peer gets an A-ABORT and the connection is closed. A PDU type that does not exist is refused the
  same way.
* **Deadlines.** Until the association is established, every read shares one deadline: ``node.acse_timeout`` from
  the moment the connection was accepted. Afterwards, each read of a PDU that has begun to arrive must make progress
  within ``node.network_timeout``. (A connection that sends nothing at all is ended by pynetdicom's own ARTIM and
  idle timers.)

Each refusal is reported once to the connection's :class:`ConnectionGuard` (reason, detail), which the intake
records; pynetdicom then sees a closed connection and ends the association its usual way, with no log lines of its
own for the refused connection (see :func:`install_log_filters`).

Also, for speed: a PDU is read with ``recv_into`` straight into its buffer (pynetdicom reads 4096-byte pieces and
appends each), and quick acknowledgements are re-armed after each read (see :meth:`GuardedSocket.recv`).

And the DIMSE provider of each accepted association (:class:`_SpoolingDIMSE`), which writes a large C-STORE data set
to the spool while it arrives (:class:`_SpooledDataSet`) and bounds what other messages may hold.

This module and :mod:`dicom_node.intake.reactor` hold the code that relies on pynetdicom's private API (with
:class:`dicom_node.intake.server._PolicyACSE`); ``tests/dicom_node/test_pynetdicom_private_api.py`` names each piece.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any, cast

from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RQ, DIMSEMessage
from pynetdicom.transport import AssociationSocket

from dicom_node.intake.spool import Spool, Staged, StagingFile, file_head
from dicom_node.logs import HashQuotedValues

__all__ = [
    "MAX_COMMAND_SET",
    "MAX_OTHER_DATASET",
    "MAX_OTHER_PDU",
    "MAX_UNANNOUNCED_PDU",
    "ConnectionGuard",
    "GuardedSocket",
    "drop_unfinished",
    "guard_of",
    "install_guard",
    "install_log_filters",
    "printable_ae",
    "spool_large_data_sets",
]

#: Longest PDU other than P-DATA-TF that the node reads.
MAX_OTHER_PDU = 1024 * 1024
#: Longest P-DATA-TF PDU read when ``node.max_pdu`` is 0 (no maximum announced).
MAX_UNANNOUNCED_PDU = 64 * 1024 * 1024

log = logging.getLogger(__name__)

_HEADER = struct.Struct(">BBL")
_A_ASSOCIATE_RQ, _P_DATA_TF = 0x01, 0x04
_PDU_TYPES = frozenset(range(0x01, 0x08))
# A-ABORT PDU: type 7, reserved, length 4, reserved x2, source 2 (service provider), reason 6 (invalid PDU parameter
# value) or 0 (not specified).
_ABORT_INVALID = bytes((0x07, 0, 0, 0, 0, 4, 0, 0, 0x02, 0x06))

#: Linux's TCP_QUICKACK (None elsewhere): acknowledge received data at once instead of after up to 40 ms.
_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)


@dataclass
class ConnectionGuard:
    """The limits and the story of one accepted connection."""

    address: str
    max_pdu: int
    acse_timeout: float
    network_timeout: float
    #: Called once, with (guard, reason, detail), when this connection is refused.
    on_refusal: Callable[[ConnectionGuard, str, str], None]
    opened: float = field(default_factory=time.monotonic)
    #: An A-ASSOCIATE-RQ header arrived.
    requested: bool = False
    #: Why the connection was refused; None while it is not.
    refusal: str | None = None
    #: The peer closed the connection (or reset it).
    closed: bool = False

    @property
    def ended(self) -> bool:
        return self.closed or self.refusal is not None

    def unrequested(self) -> None:
        """The connection ended, or its time ran out, before an association was requested: recorded once, as a
        refusal unless one was already recorded (a port check of a monitoring system or a load balancer, mostly)."""
        if self.refusal is None and not self.requested:
            self.refuse("no_request", "closed before requesting an association (a port check?)")

    def limit(self, pdu_type: int) -> int:
        if pdu_type != _P_DATA_TF:
            return MAX_OTHER_PDU
        return self.max_pdu + _HEADER.size if self.max_pdu else MAX_UNANNOUNCED_PDU

    def refuse(self, reason: str, detail: str) -> None:
        if self.refusal is None:
            self.refusal = reason
            setattr(threading.current_thread(), "dicom_node_refused", True)  # noqa: B010 (a thread attribute)
            self.on_refusal(self, reason, detail)


def printable_ae(raw: bytes | bytearray | memoryview) -> bool:
    """An AE title field as sent: the default character repertoire without backslash (PS3.5 6.2); trailing NULs,
    which some peers pad with, are tolerated."""
    return all(0x20 <= b <= 0x7E and b != 0x5C for b in bytes(raw).rstrip(b"\x00"))


class GuardedSocket(AssociationSocket):
    """An accepted association's socket that reads PDUs within the bounds of its :class:`ConnectionGuard`."""

    guard: ConnectionGuard
    _body: int | None  # the length of the PDU body to read next; None: a header comes next
    _body_type: int
    _timeout: float | None  # the read time-out last set on the socket

    def recv(self, nr_bytes: int) -> bytearray:
        guard = self.guard
        if guard.refusal is not None:
            return bytearray()  # ended: pynetdicom sees a closed connection
        if self._body is None and nr_bytes == _HEADER.size:
            return self._read_header()
        body_type, self._body = self._body_type, None
        data = self._read(nr_bytes)
        if body_type == _A_ASSOCIATE_RQ and len(data) >= 36:
            # pynetdicom strips the AE titles' control characters at the edges ("AINODE\r\n" is AINODE) and fails
            # with a traceback on those inside: both are refused here, as sent.
            for field_name, raw, diagnostic in (("called", data[4:20], 0x07), ("calling", data[20:36], 0x03)):
                if not printable_ae(raw):
                    detail = f"{field_name} AE title {bytes(raw)!r} has characters an AE title cannot have"
                    return self._refuse(f"{field_name}_ae", detail, bytes((0x03, 0, 0, 0, 0, 4, 0, 1, 1, diagnostic)))
        return data

    def _read_header(self) -> bytearray:
        guard = self.guard
        header = self._read(_HEADER.size)
        if len(header) < _HEADER.size:
            return header  # closed or timed out: pynetdicom reports the connection closed
        pdu_type, _, length = _HEADER.unpack(header)
        if pdu_type not in _PDU_TYPES:
            return self._refuse("garbage", f"bytes that are no DICOM PDU (first byte 0x{pdu_type:02X})")
        if length > guard.limit(pdu_type):
            limit = guard.limit(pdu_type)
            detail = f"a PDU of type 0x{pdu_type:02X} claims {length} bytes (limit {limit})"
            return self._refuse("pdu_too_large", detail)
        if pdu_type == _A_ASSOCIATE_RQ:
            guard.requested = True
        self._body, self._body_type = length, pdu_type
        return header

    def abort(self, reason: str, detail: str) -> None:
        """Refuse the connection from another layer (a DIMSE message beyond its bounds): A-ABORT, then closed."""
        self._refuse(reason, detail)

    def _refuse(self, reason: str, detail: str, answer: bytes = _ABORT_INVALID) -> bytearray:
        """Refuse the connection: record why, send ``answer`` (an A-ABORT, or an A-ASSOCIATE-RJ), close."""
        self.guard.refuse(reason, detail)
        sock = cast(socket.socket, self.socket)
        with contextlib.suppress(OSError):
            sock.sendall(answer)
            sock.shutdown(socket.SHUT_RDWR)
        return bytearray()

    def _read(self, nr_bytes: int) -> bytearray:
        """Up to ``nr_bytes`` (fewer when the peer closed, or missed a deadline: then the guard says why)."""
        guard = self.guard
        sock = cast(socket.socket, self.socket)
        established = self.assoc.is_established
        deadline = None if established else guard.opened + guard.acse_timeout
        buffer = bytearray(nr_bytes)
        read = 0
        with memoryview(buffer) as view:
            while read < nr_bytes:
                wait = guard.network_timeout if deadline is None else deadline - time.monotonic()
                try:
                    if wait <= 0:
                        raise TimeoutError
                    if deadline is not None or self._timeout != wait:  # once established: set once
                        sock.settimeout(wait)
                        self._timeout = wait
                    got = sock.recv_into(view[read:], nr_bytes - read)
                except TimeoutError:
                    if deadline is None:
                        self._refuse("stalled", f"no data for {guard.network_timeout:g} s inside a PDU")
                    else:
                        self._refuse("acse_timeout", f"association not requested within {guard.acse_timeout:g} s")
                    break
                except OSError:  # reset: what arrived is returned, pynetdicom reports the connection closed
                    guard.closed = True
                    break
                if not got:  # connection closed: return what arrived, as pynetdicom does
                    guard.closed = True
                    break
                read += got
        if read < nr_bytes:
            del buffer[read:]
        if _QUICKACK is not None:
            # A sender with Nagle's algorithm on (dcmtk's storescu, and PACS built on dcmtk) holds the short last
            # segment of a PDU until the earlier ones are acknowledged, while Linux may delay that acknowledgement
            # by 40 ms; re-arming quick acknowledgements after each read removes those stalls.
            with contextlib.suppress(OSError):  # the connection is gone: the next read reports it
                sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
        return buffer


def install_guard(assoc: Association, guard: ConnectionGuard) -> None:
    """Make an accepted association's socket a :class:`GuardedSocket` (on EVT_CONN_OPEN, before its threads
    start)."""
    sock = assoc.dul.socket
    if type(sock) is AssociationSocket:
        sock.__class__ = GuardedSocket
        guarded = cast(GuardedSocket, sock)
        guarded.guard = guard
        guarded._body = None
        guarded._body_type = 0
        guarded._timeout = None


def guard_of(assoc: Association) -> ConnectionGuard | None:
    sock = assoc.dul.socket
    return sock.guard if isinstance(sock, GuardedSocket) else None


class _RefusedThreadFilter(logging.Filter):
    """Drops pynetdicom's log records on the thread of a connection the node refused (it logged the refusal)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(threading.current_thread(), "dicom_node_refused", False)


_quiet = _RefusedThreadFilter()
_hashed = HashQuotedValues()


def install_log_filters() -> None:
    """Install the node's filters on pynetdicom's loggers (idempotent): nothing from the thread of a connection the
    node refused (it logged the refusal), and values pynetdicom quotes from what a peer sent (a non-conformant UID)
    as their hashes (pydicom's too). A logger's filters apply to the records created on it, not its children's, so
    each of pynetdicom's module loggers gets them."""
    import pynetdicom  # noqa: F401 (its modules create their loggers on import)

    names = [n for n in list(logging.Logger.manager.loggerDict) if n == "pynetdicom" or n.startswith("pynetdicom.")]
    for name in names:
        logger = logging.getLogger(name)
        for node_filter in (_quiet, _hashed):
            if node_filter not in logger.filters:
                logger.addFilter(node_filter)
    # pydicom warns with the value it found when pynetdicom decodes a received command set on these threads.
    for name in ("pydicom", "py.warnings"):
        logger = logging.getLogger(name)
        if _hashed not in logger.filters:
            logger.addFilter(_hashed)


class _SpooledDataSet(BytesIO):
    """The data set of a C-STORE request: held in memory up to :attr:`SPOOL_ABOVE` bytes, then written to the
    spool's ``.incoming`` as its fragments arrive.

    pynetdicom collects a message's data set in a BytesIO (its primitives require one) and hands it over when the
    last fragment is in: a 2 GB whole-slide image would need 2 GB of memory per association, more while the BytesIO
    grows. Past the threshold, pynetdicom's network thread writes the File Meta (the bytes of :func:`file_head`),
    what it held and each further fragment to a :class:`StagingFile`, so memory stays bounded whatever the size, and
    the disk writes while the rest arrives. Measured (``bench/bench_large_instance.py`` and the same node with every
    data set spooled or none): a 537 MB instance arrives in 0.31x the time with 0.19x the peak memory; series of
    4, 8 and 16 MB instances in 0.83x, 0.89x and 0.77x the time; 2 MB ones took 1.06x and 514 KB CT slices showed
    no gain, so smaller data sets stay in memory and the handler stages them itself. Messages other than C-STORE
    requests are always held in memory.
    """

    #: Data sets larger than this many bytes go to the spool while they arrive.
    SPOOL_ABOVE = 3 * 1024 * 1024

    def __init__(self, spool: Spool, assoc: Association, message: DIMSEMessage) -> None:
        super().__init__()
        self._spool = spool
        self._assoc = assoc
        self._message = message
        self._staging: StagingFile | None = None
        self._error: OSError | None = None
        self.head_length = 0

    def write(self, data: Any) -> int:
        if self._staging is None and self._error is None:
            if not isinstance(self._message, C_STORE_RQ):  # no use to the node: held, up to a bound
                if self.tell() + len(data) > MAX_OTHER_DATASET:
                    why = f"a data set of over {MAX_OTHER_DATASET} bytes that is not a C-STORE request's"
                    if _abort(self._assoc, "message_too_large", why):
                        self.seek(0)
                        self.truncate()
                        return len(data)
                return super().write(data)
            if self.tell() + len(data) <= self.SPOOL_ABOVE:
                return super().write(data)
            self._open()
        if self._staging is not None:
            try:
                self._staging.write(data)
            except OSError as exc:
                self._fail(exc)
        return len(data)

    def _open(self) -> None:
        command = self._message.command_set
        syntax = next(
            (str(cx.transfer_syntax[0]) for cx in self._assoc.accepted_contexts
             if cx.context_id == self._message.context_id),
            "",
        )
        sop_uid = str(command.AffectedSOPInstanceUID or "").strip().rstrip("\x00")
        head = file_head(str(command.AffectedSOPClassUID or ""), sop_uid, syntax)
        self.head_length = len(head)
        try:
            self._staging = self._spool.open_staging(self._assoc.requestor.ae_title.strip())
            self._staging.write(head)
            with self.getbuffer() as held:
                self._staging.write(held)
        except OSError as exc:
            self._fail(exc)
        self.seek(0)
        self.truncate()  # what was held is in the file now

    def _fail(self, exc: OSError) -> None:
        log.error("writing a received instance to %s failed: %s", self._spool.incoming, exc)
        self._error = exc
        if self._staging is not None:
            self._staging.discard()
            self._staging = None

    def staged(self) -> Staged | OSError | None:
        """The spooled file for the handler (it then owns it), the write's error, or None when held in memory."""
        if self._error is not None:
            return self._error
        if self._staging is None:
            return None
        staging, self._staging = self._staging, None
        try:
            return staging.finish()
        except OSError as exc:
            staging.discard()
            return exc

    def discard(self) -> None:
        """Drop a file whose transfer never completed (the association ended first)."""
        if self._staging is not None:
            self._staging.discard()
            self._staging = None


class _SpoolingDIMSE(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider, with each message's data set a :class:`_SpooledDataSet` (installed per
    association on EVT_CONN_OPEN, as the socket tuning is)."""

    spool: Spool

    def receive_primitive(self, primitive: Any) -> None:
        guard = guard_of(self.assoc)
        if guard is not None and guard.refusal is not None:
            return  # aborted: what is still in flight is dropped
        if self.message is None:
            self.message = DIMSEMessage()
            self.message.data_set = _SpooledDataSet(self.spool, self.assoc, self.message)
        held = self.message.encoded_command_set.tell()
        command = sum(len(data) - 1 for _, data in primitive.presentation_data_value_list if data and data[0] & 1)
        if held + command > MAX_COMMAND_SET and _abort(
            self.assoc, "message_too_large", f"a command set of over {MAX_COMMAND_SET} bytes"
        ):
            return
        super().receive_primitive(primitive)

    def drop_unfinished(self) -> None:
        message = self.message
        if message is not None and isinstance(message.data_set, _SpooledDataSet):
            message.data_set.discard()


#: Longest command set the node holds (a C-STORE request's is about 200 bytes).
MAX_COMMAND_SET = 64 * 1024
#: Longest data set of a message other than a C-STORE request that the node holds (it serves Storage and
#: Verification only: no other message's data set is of use).
MAX_OTHER_DATASET = 1024 * 1024


def _abort(assoc: Association, reason: str, detail: str) -> bool:
    """Abort the association for a message beyond the node's bounds; False when its socket has no guard."""
    sock = assoc.dul.socket
    if not isinstance(sock, GuardedSocket):
        return False
    sock.abort(reason, detail)
    return True


def drop_unfinished(assoc: Association) -> None:
    """Remove the staged file of a transfer the association ended in the middle of (its peer got no Success)."""
    if isinstance(assoc.dimse, _SpoolingDIMSE):
        assoc.dimse.drop_unfinished()




def spool_large_data_sets(assoc: Association, spool: Spool) -> None:
    """Have the association's large C-STORE data sets written to ``spool`` as they arrive (on EVT_CONN_OPEN)."""
    if type(assoc.dimse) is DIMSEServiceProvider:
        assoc.dimse.__class__ = _SpoolingDIMSE
        cast(_SpoolingDIMSE, assoc.dimse).spool = spool
