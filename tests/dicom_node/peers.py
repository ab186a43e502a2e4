"""A misbehaving peer for bad-input tests: sends C-STORE data set bytes exactly as given, without checking them.

pynetdicom's ``send_c_store`` decodes and validates what it sends; a broken modality does not, so this helper
builds the C-STORE request itself and drives the association's DIMSE layer directly.
"""

from __future__ import annotations

import socket
import struct
import time
from io import BytesIO

from pynetdicom import AE
from pynetdicom.dimse_primitives import C_STORE


def send_raw(port: int, sop_class: str, sop_uid: str, transfer_syntax: str, data: bytes) -> int:
    ae = AE(ae_title="BROKENSCU")
    ae.add_requested_context(sop_class, transfer_syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title="AINODE")
    assert assoc.is_established, "association was not accepted"
    try:
        context = assoc.accepted_contexts[0]
        req = C_STORE()
        req.MessageID = 1
        req.AffectedSOPClassUID = sop_class
        req.AffectedSOPInstanceUID = sop_uid
        req.Priority = 2
        req.DataSet = BytesIO(data)
        assoc._reactor_checkpoint.clear()
        while not assoc._is_paused:
            time.sleep(0.0001)
        assoc.dimse.send_msg(req, context.context_id)
        _, rsp = assoc.dimse.get_msg(block=True)
        assoc._reactor_checkpoint.set()
        assert rsp is not None, "no C-STORE response"
        return int(rsp.Status)
    finally:
        assoc.release()


# --- raw association requests (what pynetdicom and dcmtk will not send) -----------------------------------------

DICOM_APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"


def _item(kind: int, value: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(value)) + value


def associate_rq(
    called: bytes = b"AINODE",
    calling: bytes = b"RAWPEER",
    application_context: str = DICOM_APPLICATION_CONTEXT,
    abstract_syntax: str = "1.2.840.10008.1.1",
    transfer_syntax: str = "1.2.840.10008.1.2",
    max_pdu: int = 16384,
) -> bytes:
    """An A-ASSOCIATE-RQ PDU (PS3.8 9.3.2) built byte by byte, with the AE title fields exactly as given (padded
    with spaces to 16 bytes)."""
    context = bytes((1, 0, 0, 0)) + _item(0x30, abstract_syntax.encode()) + _item(0x40, transfer_syntax.encode())
    body = (
        struct.pack(">HH", 1, 0)
        + called.ljust(16, b" ")[:16]
        + calling.ljust(16, b" ")[:16]
        + bytes(32)
        + _item(0x10, application_context.encode())
        + _item(0x20, context)
        + _item(0x50, _item(0x51, struct.pack(">I", max_pdu)))
    )
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def pdu_header(pdu_type: int, length: int) -> bytes:
    return struct.pack(">BBI", pdu_type, 0, length)


def read_pdu(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """The next whole PDU the node sends; b"" when it closed the connection instead."""
    sock.settimeout(timeout)
    head = b""
    while len(head) < 6:
        chunk = sock.recv(6 - len(head))
        if not chunk:
            return b""
        head += chunk
    length = struct.unpack(">I", head[2:6])[0]
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        if not chunk:
            return b""
        body += chunk
    return head + body


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """Whether the node closes the connection within ``timeout`` seconds (anything it sends first is read)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
    return True
