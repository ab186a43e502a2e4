"""The pieces of pynetdicom's private API the intake relies on are still there and still behave as relied on.

``dicom_node/intake/transport.py``, ``reactor.py`` and ``server.py`` subclass pynetdicom's classes, swap the classes
of live objects and read their attributes (DESIGN: such code stays in few files, with the version it was written
against pinned and tested). pyproject.toml pins ``pynetdicom>=3.0.4,<3.1``; when a new version is taken, this test
says which piece moved, and why the node needs it, before any association fails in a less readable way.
"""

from __future__ import annotations

import inspect
import re
import tomllib
from pathlib import Path

import pynetdicom
import pynetdicom._config
import pynetdicom.association
import pynetdicom.dul
import pytest
from pynetdicom import AE, evt
from pynetdicom.acse import ACSE
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.dul import DULServiceProvider
from pynetdicom.transport import AssociationSocket, ThreadedAssociationServer

ROOT = Path(__file__).resolve().parents[2]


def _why(piece: str, reason: str) -> str:
    return (
        f"pynetdicom {pynetdicom.__version__}: {piece} changed; the node relies on it: {reason}. Revisit "
        "dicom_node/intake/transport.py, reactor.py and server.py before widening the pin in pyproject.toml."
    )


def test_the_pin_names_the_version_the_private_api_code_was_written_against() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    [pin] = [d for d in project["dependencies"] if re.match(r"pynetdicom\b", d)]
    assert pin.replace(" ", "") == "pynetdicom>=3.0.4,<3.1", f"dependency {pin!r}: expected pynetdicom>=3.0.4,<3.1"
    major, minor, *_ = (int(p) for p in re.findall(r"\d+", pynetdicom.__version__))
    assert (major, minor) == (3, 0), _why("the installed version", "the pin allows 3.0.x only")


def test_the_socket_pieces_transport_relies_on() -> None:
    assert callable(getattr(AssociationSocket, "recv", None)), _why(
        "AssociationSocket.recv", "GuardedSocket overrides it to bound every PDU read"
    )
    reader = inspect.getsource(DULServiceProvider._read_pdu_data)
    assert "self.socket.recv(6)" in reader, _why(
        "DULServiceProvider._read_pdu_data",
        "GuardedSocket.recv expects a PDU read as its 6-byte header, then one recv of the length the header gives",
    )
    assert "self.socket" in inspect.getsource(AssociationSocket.recv), _why(
        "AssociationSocket.socket", "GuardedSocket reads with recv_into on the socket it wraps"
    )


@pytest.fixture
def assoc() -> Association:
    return Association(AE(), "acceptor")


def test_the_association_and_dul_pieces_the_reactor_relies_on(assoc: Association) -> None:
    for module in (pynetdicom.association, pynetdicom.dul):
        assert getattr(module, "time", None) is not None, _why(
            f"{module.__name__}.time", "the reactor replaces that module's time to make its sleeps wait for work"
        )
    dul = assoc.dul
    assert type(dul) is DULServiceProvider and isinstance(dul.socket, AssociationSocket | None), _why(
        "Association.dul / DULServiceProvider.socket", "install_guard and make_event_driven swap their classes"
    )
    for name in ("to_provider_queue", "to_user_queue", "event_queue"):
        assert hasattr(getattr(dul, name, None), "queue"), _why(
            f"DULServiceProvider.{name}", "the reactor wakes its threads when a primitive or event is queued"
        )
    assert dul.__dict__.get("_kill_thread") is False, _why(
        "DULServiceProvider._kill_thread", "the event-driven DUL wakes its thread when it is set"
    )
    for name in ("receive_pdu", "run", "is_alive"):
        assert callable(getattr(DULServiceProvider, name, None)), _why(f"DULServiceProvider.{name}", "overridden")
    assert "time.sleep" in inspect.getsource(DULServiceProvider.run_reactor), _why(
        "DULServiceProvider.run_reactor", "its idle sleep is what the reactor turns into a wait for work"
    )
    assert assoc.__dict__.get("_kill") is False, _why("Association._kill", "read by the reactor's wait")
    assert hasattr(assoc.dimse.msg_queue, "not_empty"), _why(
        "DIMSEServiceProvider.msg_queue", "the association thread waits on its condition"
    )
    assert "time.sleep" in inspect.getsource(Association._run_reactor), _why(
        "Association._run_reactor", "its 1 ms sleep is what the reactor turns into a wait for work"
    )
    for name in ("is_acceptor", "is_established", "is_released", "is_aborted", "is_rejected", "kill"):
        assert hasattr(assoc, name), _why(f"Association.{name}", "the server's limits and the reactor read it")


def test_the_dimse_pieces_the_spooling_relies_on(assoc: Association) -> None:
    assert callable(getattr(DIMSEServiceProvider, "receive_primitive", None)), _why(
        "DIMSEServiceProvider.receive_primitive", "_SpoolingDIMSE overrides it to bound and spool what arrives"
    )
    assert assoc.dimse.__dict__.get("message", 0) is None, _why(
        "DIMSEServiceProvider.message", "_SpoolingDIMSE creates each message with a spooling data set"
    )
    message = DIMSEMessage()
    for name in ("encoded_command_set", "data_set", "command_set", "context_id"):
        assert hasattr(message, name), _why(f"DIMSEMessage.{name}", "read or replaced while a message arrives")
    assert callable(getattr(DIMSEMessage, "decode_msg", None)), _why(
        "DIMSEMessage.decode_msg", "writes each fragment to data_set, the node's _SpooledDataSet"
    )
    assert pynetdicom._config.STORE_RECV_CHUNKED_DATASET is False, _why(
        "_config.STORE_RECV_CHUNKED_DATASET", "when set, data sets go to pynetdicom's own file, not _SpooledDataSet"
    )
    source = inspect.getsource(DIMSEMessage.decode_msg)
    assert "BytesIO, self.data_set).write(" in source and "self.encoded_command_set.write(" in source, _why(
        "DIMSEMessage.decode_msg", "data set fragments must reach data_set.write as they arrive"
    )


def test_the_acse_and_server_pieces_the_server_relies_on() -> None:
    assert callable(getattr(ACSE, "_negotiate_as_acceptor", None)), _why(
        "ACSE._negotiate_as_acceptor", "_PolicyACSE checks an association request before pynetdicom negotiates"
    )
    assert callable(getattr(ACSE, "send_reject", None)) and hasattr(ACSE, "requestor"), _why(
        "ACSE.send_reject / ACSE.requestor", "_PolicyACSE rejects with its own result, source and diagnostic"
    )
    assert callable(getattr(evt, "trigger", None)), _why("evt.trigger", "_PolicyACSE triggers EVT_REJECTED")
    assert isinstance(AE()._servers, list), _why("AE._servers", "start_scp registers its server there")
    assert "_servers.remove" in inspect.getsource(ThreadedAssociationServer.shutdown), _why(
        "ThreadedAssociationServer.shutdown", "it removes the server from ae._servers, where start_scp put it"
    )
    assert "server_class" in inspect.signature(AE.make_server).parameters, _why(
        "AE.make_server(server_class=...)", "start_scp serves with _IntakeServer"
    )
    assert callable(getattr(ThreadedAssociationServer, "process_request_thread", None)), _why(
        "ThreadedAssociationServer.process_request_thread", "_IntakeServer does the TLS handshake there"
    )
