"""A hostile or broken PACS: what the node answers, what it records, and what it never does.

Each test here reproduces a defect found by treating the node as a hostile peer would, with real associations
(dcmtk, pynetdicom) or raw sockets where no DICOM toolkit would send such bytes.
"""

from __future__ import annotations

import copy
import json
import logging
import socket
import sqlite3
import struct
import subprocess
import threading
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom import config
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless, generate_uid
from pynetdicom import AE
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import CTImageStorage

from dicom_node.jobs.schema import InstanceRecord, patient_key
from dicom_node.jobs.store import JobStore, PatientConflict
from dicom_node.logs import AUDIT_LOGGER
from dicom_node.node import Node
from dicom_node.status import Status
from tests.conftest import make_study
from tests.corpus import corpus_file
from tests.dicom_node.peers import associate_rq, closed_by_peer, pdu_header, read_pdu, send_raw
from tests.dicom_node.test_intake import wait_for

pytestmark = pytest.mark.integration


def _store_files(port: int, files: list[Path], calling: str = "PACS") -> list[pydicom.Dataset]:
    """C-STORE each file over one association; the response of each (Status, Error Comment)."""
    ae = AE(ae_title=calling)
    for path in files:
        meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
        ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="AINODE")
    assert assoc.is_established
    try:
        return [assoc.send_c_store(path) for path in files]
    finally:
        assoc.release()


@pytest.fixture
def audited(caplog: pytest.LogCaptureFixture) -> Callable[[str], list[dict[str, object]]]:
    """The audit records of one event kind written so far (the audit logger's JSON lines)."""
    caplog.set_level(logging.INFO, logger=AUDIT_LOGGER)

    def records(event: str) -> list[dict[str, object]]:
        found = [json.loads(r.getMessage()) for r in caplog.records if r.name == AUDIT_LOGGER]
        return [r for r in found if r["event"] == event]

    return records


def _with_patient(files: list[Path], patient_id: str, issuer: str | None = None) -> None:
    for path in files:
        ds = pydicom.dcmread(path)
        ds.PatientID = patient_id
        if issuer is not None:
            ds.IssuerOfPatientID = issuer
        ds.save_as(path, enforce_file_format=True)


# --- one patient per study ------------------------------------------------------------------------------------


def test_instances_of_another_patient_in_a_study_are_refused_and_never_recorded(
    running_node: Callable[..., Node], tmp_path: Path, audited: Callable[[str], list[dict[str, object]]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    node = running_node(study={"stable_seconds": 60})
    study_uid = generate_uid()
    first = make_study(tmp_path / "a", 3, study_uid=study_uid)
    second = make_study(tmp_path / "b", 3, study_uid=study_uid)
    _with_patient(first, "SYNTH-A")
    _with_patient(second, "SYNTH-B")

    answers = _store_files(node.port, first + second)

    assert [int(a.Status) for a in answers[:3]] == [Status.SUCCESS] * 3
    for refused in answers[3:]:
        assert int(refused.Status) == Status.PROCESSING_FAILURE
        assert "Patient ID differs" in str(refused.ErrorComment)
    recorded = node.store.study_instances(study_uid)
    assert sorted(r.sop_instance_uid for r in recorded) == sorted(pydicom.dcmread(f).SOPInstanceUID for f in first)
    assert len(list(node.spool.root.rglob("*.dcm"))) == 3, "the refused instances' files are gone"
    assert node.intake.counters.patient_conflicts == 3
    refusals = audited("instance_refused")
    assert len(refusals) == 3 and {r["reason"] for r in refusals} == {"patient_conflict"}
    assert "SYNTH-" not in caplog.text, "no Patient ID in the log or the audit trail"


def test_the_issuer_of_patient_id_is_part_of_the_patient(running_node: Callable[..., Node], tmp_path: Path) -> None:
    node = running_node(study={"stable_seconds": 60})
    study_uid = generate_uid()
    first = make_study(tmp_path / "a", 1, study_uid=study_uid)
    second = make_study(tmp_path / "b", 1, study_uid=study_uid)
    _with_patient(first, "SYNTH-1", issuer="HOSPITAL-A")
    _with_patient(second, "SYNTH-1", issuer="HOSPITAL-B")
    answers = _store_files(node.port, first + second)
    assert [int(a.Status) for a in answers] == [Status.SUCCESS, Status.PROCESSING_FAILURE]


def test_a_late_instance_of_another_patient_does_not_reopen_a_finished_study(
    running_node: Callable[..., Node], tmp_path: Path
) -> None:
    node = running_node(study={"stable_seconds": 0.5})
    study_uid = generate_uid()
    first = make_study(tmp_path / "a", 2, study_uid=study_uid)
    _with_patient(first, "SYNTH-A")
    assert [int(a.Status) for a in _store_files(node.port, first)] == [Status.SUCCESS] * 2
    node.complete_study(study_uid)
    late = make_study(tmp_path / "b", 1, study_uid=study_uid)
    _with_patient(late, "SYNTH-B")
    assert int(_store_files(node.port, late)[0].Status) == Status.PROCESSING_FAILURE
    assert len(node.store.list_jobs()) == 1, "no new run for the refused instance"


def test_a_store_made_before_patients_were_compared_gains_the_column_and_adopts_the_next_patient(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'jobs.sqlite'}"
    JobStore(url).close()
    with sqlite3.connect(tmp_path / "jobs.sqlite") as db:  # the tables as an older node left them
        db.execute("ALTER TABLE studies DROP COLUMN patient_key")
        db.execute("ALTER TABLE instances DROP COLUMN patient_key")
        db.execute(
            "INSERT INTO studies (study_uid, state, window_started_at, last_received_at, runs, calling_ae) "
            "VALUES ('1.2.3', 'receiving', 0, 0, 0, 'PACS')"
        )
    store = JobStore(url)

    def record(sop: str, patient: str) -> InstanceRecord:
        return InstanceRecord(
            sop_instance_uid=sop, study_uid="1.2.3", series_uid="1.2.3.1", sop_class_uid="1.2.840.10008.5.1.4.1.1.7",
            transfer_syntax="1.2.840.10008.1.2.1", modality="OT", body_part="", study_description="",
            series_description="", calling_ae="PACS", path=f"x/{sop}.dcm", size=1, patient_key=patient_key(patient, ""),
        )

    assert store.record_instance(record("1.2.3.1.1", "SYNTH-A"))
    with pytest.raises(PatientConflict):
        store.record_instance(record("1.2.3.1.2", "SYNTH-B"))
    store.close()


def test_patient_key_treats_absent_and_empty_alike_and_tells_ids_apart() -> None:
    assert patient_key(None, None) == patient_key("", " ")
    assert patient_key("A ", None) == patient_key("A", "")
    assert patient_key("A", None) != patient_key("B", None)
    assert patient_key("A", "X") != patient_key("A", "Y")
    assert patient_key(None, None) != patient_key("A", None)


# --- bounded reads, deadlines, limits -------------------------------------------------------------------------


def _connect(node: Node, source: str = "127.0.0.1") -> socket.socket:
    return socket.create_connection(("127.0.0.1", node.port), timeout=10, source_address=(source, 0))


def test_a_pdu_longer_than_announced_is_refused_before_anything_is_allocated(
    running_node: Callable[..., Node], audited: Callable[[str], list[dict[str, object]]]
) -> None:
    node = running_node()
    tracemalloc.start()
    try:
        claims = [_connect(node) for _ in range(3)]
        for sock in claims:  # 10 bytes sent, 1 GiB claimed
            sock.sendall(pdu_header(0x01, 1 << 30) + b"\x00\x01\x00\x00")
        for sock in claims:
            assert read_pdu(sock)[:1] == b"\x07", "an A-ABORT"
            assert closed_by_peer(sock, 10)
            sock.close()
        # Once established, a P-DATA-TF PDU longer than the node announced (node.max_pdu, 131072) is refused too.
        with _connect(node) as sock:
            sock.sendall(associate_rq())
            assert read_pdu(sock)[:1] == b"\x02", "an A-ASSOCIATE-AC"
            sock.sendall(pdu_header(0x04, 525 * 1024) + bytes(4096))
            assert read_pdu(sock)[:1] == b"\x07"
            assert closed_by_peer(sock, 10)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024 * 1024, f"{peak} bytes allocated at the peak: the claimed lengths were allocated"
    assert node.intake.refusals.by_reason["pdu_too_large"] == 4
    assert [r["reason"] for r in audited("association_rejected")] == ["pdu_too_large"] * 4
    # The node serves the next peer as before.
    assert subprocess.run(["echoscu", "-aec", "AINODE", "127.0.0.1", str(node.port)]).returncode == 0


def test_a_peer_that_trickles_its_association_request_is_cut_off_at_the_acse_timeout(
    running_node: Callable[..., Node],
) -> None:
    node = running_node(node={"acse_timeout": 2})
    request = associate_rq()
    began = time.monotonic()
    closed = False
    with _connect(node) as sock:
        sock.sendall(request[:20])
        for byte in request[20:]:  # one byte every 0.25 s: the whole request would take over 40 s
            try:
                sock.sendall(bytes((byte,)))
            except OSError:
                closed = True
                break
            if closed_by_peer(sock, 0.25) or time.monotonic() - began > 30:
                closed = time.monotonic() - began <= 30
                break
    assert closed, "the node kept the connection open while the request trickled in"
    assert node.intake.refusals.by_reason["acse_timeout"] == 1


def test_slow_half_open_connections_from_one_host_leave_room_for_every_other(
    running_node: Callable[..., Node],
) -> None:
    node = running_node(node={"acse_timeout": 60, "max_associations": 16, "max_pending_per_host": 8})
    slow = []
    try:
        for _ in range(17):  # each sends 20 bytes of an A-ASSOCIATE-RQ, then nothing
            sock = _connect(node, source="127.0.0.2")
            sock.sendall(associate_rq()[:20])
            slow.append(sock)
        # At least 9 are refused at once (a connection whose thread is starting counts twice for a moment, so a
        # burst can be refused a little early, never late).
        wait_for(lambda: node.intake.refusals.by_reason["pending_limit"] >= 9)
        echo = subprocess.run(
            ["echoscu", "-aec", "AINODE", "127.0.0.1", str(node.port)], capture_output=True, text=True
        )
        assert echo.returncode == 0, echo.stderr
    finally:
        for sock in slow:
            sock.close()


def test_garbage_connections_are_recorded_once_a_minute_and_lock_no_one_out(
    running_node: Callable[..., Node],
    audited: Callable[[str], list[dict[str, object]]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    node = running_node(node={"max_associations": 2})
    for _ in range(20):
        with _connect(node) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: ainode\r\n\r\n")
            assert closed_by_peer(sock, 10)
    echo = subprocess.run(["echoscu", "-aec", "AINODE", "127.0.0.1", str(node.port)], capture_output=True, text=True)
    assert echo.returncode == 0, echo.stderr
    assert node.intake.refusals.by_reason["garbage"] == 20
    assert len([r for r in audited("association_rejected") if r["reason"] == "garbage"]) == 20
    assert caplog.text.count("refused, garbage") == 1, "one log line a minute per source and reason"


@pytest.mark.parametrize(
    ("request_pdu", "diagnostic", "reason"),
    [
        (associate_rq(called=b"AINODE\r\n"), 0x07, "called_ae"),
        (associate_rq(called=b"AINODE\x00\x01"), 0x07, "called_ae"),
        (associate_rq(called=b"OTHER"), 0x07, "called_ae"),
        (associate_rq(application_context="1.2.840.10008.3.1.1.2"), 0x02, "application_context"),
    ],
    ids=["crlf", "control", "other", "application-context"],
)
def test_association_requests_are_checked_as_sent(
    running_node: Callable[..., Node],
    audited: Callable[[str], list[dict[str, object]]],
    request_pdu: bytes,
    diagnostic: int,
    reason: str,
) -> None:
    node = running_node()
    with _connect(node) as sock:
        sock.sendall(request_pdu)
        answer = read_pdu(sock)
    assert answer[:1] == b"\x03", "an A-ASSOCIATE-RJ"
    assert (answer[7], answer[8], answer[9]) == (0x01, 0x01, diagnostic)  # permanent, by the service user
    assert node.intake.refusals.by_reason[reason] == 1
    assert [r["reason"] for r in audited("association_rejected")] == [reason]
    with _connect(node) as sock:  # the same request done right is accepted
        sock.sendall(associate_rq())
        assert read_pdu(sock)[:1] == b"\x02"


# --- validate before Success ----------------------------------------------------------------------------------


def _explicit_le(ds: pydicom.Dataset) -> bytes:
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, False
    write_dataset(out, ds)
    return out.getvalue()


def _implicit_le(ds: pydicom.Dataset) -> bytes:
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, True
    write_dataset(out, ds)
    return out.getvalue()


def _unusable_cases(tmp_path: Path) -> dict[str, tuple[pydicom.Dataset, str, bytes]]:
    """Data sets a PACS may send that the node could store but never use: (header, transfer syntax, bytes)."""
    cases: dict[str, tuple[pydicom.Dataset, str, bytes]] = {}
    j2k = pydicom.dcmread(corpus_file("RG1_J2KR.dcm"))
    j2k.SOPInstanceUID = generate_uid()
    cases["jpeg2000-pixels-on-an-uncompressed-context"] = (j2k, ExplicitVRLittleEndian, _explicit_le(j2k))
    native = pydicom.dcmread(make_study(tmp_path / "native", 1)[0])
    cases["native-pixels-on-a-jpeg2000-context"] = (native, JPEG2000Lossless, _explicit_le(native))
    study_us = pydicom.dcmread(make_study(tmp_path / "vr", 1)[0])
    encoded = _explicit_le(study_us)
    tag = b"\x20\x00\x0d\x00UI"  # (0020,000D) Study Instance UID, explicit VR UI
    assert encoded.count(tag) == 1
    cases["study-uid-with-vr-us"] = (study_us, ExplicitVRLittleEndian, encoded.replace(tag, b"\x20\x00\x0d\x00US"))
    charset = pydicom.dcmread(make_study(tmp_path / "cs", 1)[0])
    charset.SpecificCharacterSet = "ISO_IR 999"
    cases["unknown-character-set"] = (charset, ExplicitVRLittleEndian, _explicit_le(charset))
    return cases


@pytest.mark.parametrize(
    "case",
    [
        "jpeg2000-pixels-on-an-uncompressed-context",
        "native-pixels-on-a-jpeg2000-context",
        "study-uid-with-vr-us",
        "unknown-character-set",
    ],
)
def test_data_sets_the_node_could_never_use_get_a_failure_status_not_success(
    running_node: Callable[..., Node], tmp_path: Path, case: str
) -> None:
    node = running_node()
    header, syntax, data = _unusable_cases(tmp_path)[case]
    status = send_raw(node.port, header.SOPClassUID, header.SOPInstanceUID, syntax, data)
    assert status == Status.CANNOT_UNDERSTAND
    assert not node.store.has_instance(header.SOPInstanceUID)
    assert not list(node.spool.root.rglob("*.dcm"))
    # The same data set, sent as what it is, is stored.
    good = {"jpeg2000-pixels-on-an-uncompressed-context": JPEG2000Lossless}.get(case, ExplicitVRLittleEndian)
    if case in ("jpeg2000-pixels-on-an-uncompressed-context", "native-pixels-on-a-jpeg2000-context"):
        assert send_raw(node.port, header.SOPClassUID, header.SOPInstanceUID, good, data) == Status.SUCCESS


def test_pydicoms_warnings_for_one_data_set_are_one_log_line(
    running_node: Callable[..., Node], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A data set the fast header reader cannot walk (implicit VR on an explicit context) goes to pydicom, which
    warns once per misspelled character set term each time it decodes a text: here 400 lines for one instance."""
    node = running_node()
    ds = pydicom.dcmread(make_study(tmp_path / "s", 1)[0])
    with config.disable_value_validation():
        ds.SpecificCharacterSet = ["ISO-IR 100"] + ["ISO 2022-IR 100"] * 200  # misspelled, but decodable
        ds.StudyDescription = "Thorax \xe9tude"
        ds.SeriesDescription = "S\xe9rie"
    ds.read_encoding = "latin_1"
    data = _implicit_le(ds)  # pydicom warns here too, in the sender
    caplog.clear()
    status = send_raw(node.port, ds.SOPClassUID, ds.SOPInstanceUID, ExplicitVRLittleEndian, data)
    assert status == Status.SUCCESS
    from_pydicom = [r for r in caplog.records if r.name in ("pydicom", "py.warnings")]
    assert from_pydicom == [], f"{len(from_pydicom)} lines from pydicom"
    summaries = [r.getMessage() for r in caplog.records if "pydicom reported" in r.getMessage()]
    assert len(summaries) == 1 and "reported 40" in summaries[0]
    [record] = node.store.study_instances(ds.StudyInstanceUID)
    assert record.study_description == "Thorax \xe9tude"


# --- memory per association -----------------------------------------------------------------------------------


def _p_data(context_id: int, control: int, fragment: bytes) -> bytes:
    """One P-DATA-TF PDU holding one PDV (control: bit 0 command, bit 1 last fragment)."""
    pdv = struct.pack(">IBB", len(fragment) + 2, context_id, control) + fragment
    return pdu_header(0x04, len(pdv)) + pdv


def _c_find_command() -> bytes:
    command = pydicom.Dataset()
    command.AffectedSOPClassUID = CTImageStorage  # a C-FIND on a storage context: no use to the node
    command.CommandField = 0x0020
    command.MessageID = 1
    command.Priority = 0
    command.CommandDataSetType = 0x0001
    return encode(command, True, True)


@pytest.mark.parametrize("what", ["endless-command-fragments", "a-large-c-find-identifier"])
def test_messages_the_node_has_no_use_for_are_bounded_in_memory(
    running_node: Callable[..., Node], what: str
) -> None:
    node = running_node()
    fragment = bytes(16 * 1024)
    tracemalloc.start()
    try:
        with _connect(node) as sock:
            sock.sendall(associate_rq(abstract_syntax=CTImageStorage, transfer_syntax=ImplicitVRLittleEndian))
            assert read_pdu(sock)[:1] == b"\x02"
            if what == "a-large-c-find-identifier":
                sock.sendall(_p_data(1, 0x03, _c_find_command()))
                control = 0x00  # data set fragments, never the last
            else:
                control = 0x01  # command fragments, never the last
            sent = 0
            try:
                while sent < 24 * 1024 * 1024:
                    sock.sendall(_p_data(1, control, fragment))
                    sent += len(fragment)
            except OSError:
                pass  # the node aborted the association: sends fail
            assert closed_by_peer(sock, 10)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sent < 24 * 1024 * 1024, "the node kept reading"
    assert peak < 8 * 1024 * 1024, f"{peak} bytes at the peak"
    assert node.intake.refusals.by_reason["message_too_large"] == 1


def test_a_large_data_set_read_by_pydicom_is_read_from_the_spool_without_a_copy(
    running_node: Callable[..., Node], tmp_path: Path
) -> None:
    """The fast header reader cannot walk implicit VR on an explicit context; pydicom then reads the spooled file
    as it lies, skipping the Pixel Data, instead of a copy of all of it (40 MB here)."""
    node = running_node()
    ds = pydicom.dcmread(make_study(tmp_path / "s", 1)[0])
    ds.Rows, ds.Columns = 4000, 5000
    ds.PixelData = bytes(4000 * 5000 * 2)
    data = _implicit_le(ds)
    tracemalloc.start()
    try:
        status = send_raw(node.port, ds.SOPClassUID, ds.SOPInstanceUID, ExplicitVRLittleEndian, data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert status == Status.SUCCESS
    assert node.store.has_instance(ds.SOPInstanceUID)
    # The sender (in this process) holds the 40 MB it sends; the node's reading adds little to that.
    assert peak < len(data) + 16 * 1024 * 1024, f"{peak} bytes at the peak for a {len(data)}-byte data set"


# --- duplicates -------------------------------------------------------------------------------------------------


def test_copies_of_one_instance_arriving_together_end_with_a_record_that_describes_the_file(
    running_node: Callable[..., Node], tmp_path: Path
) -> None:
    """20 associations send the same SOP Instance UID at once, each copy with other bytes (as two PACS that
    disagree would): all get Success, one copy is stored, and the record's size is that file's."""
    node = running_node(node={"max_associations": 32, "max_pending_per_host": 32})
    [path] = make_study(tmp_path / "s", 1)
    base = pydicom.dcmread(path)
    copies = []
    for i in range(20):
        ds = copy.deepcopy(base)
        ds.ImageComments = "copy " + "x" * (2 * i)  # each copy a different size
        copies.append(ds)
    start = threading.Barrier(len(copies))
    statuses: list[int] = []

    def send(ds: pydicom.Dataset) -> None:
        ae = AE(ae_title="PACS")
        ae.add_requested_context(ds.SOPClassUID, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="AINODE")
        assert assoc.is_established
        start.wait()
        statuses.append(int(assoc.send_c_store(ds).Status))
        assoc.release()

    threads = [threading.Thread(target=send, args=(ds,)) for ds in copies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert statuses == [Status.SUCCESS] * 20
    [record] = node.store.study_instances(base.StudyInstanceUID)
    stored = node.spool.resolve(record.path)
    assert record.size == stored.stat().st_size, "the record describes another copy than the file"
    assert len(list(node.spool.root.rglob("*.dcm"))) == 1
    assert node.intake.counters.stored == 1 and node.intake.counters.duplicates == 19
    assert node.intake.counters.differing_duplicates == 19, "each differing copy is logged and counted"
    # Sending the stored copy again is a plain duplicate.
    kept = pydicom.dcmread(stored)
    assert int(_store_files(node.port, [stored])[0].Status) == Status.SUCCESS
    assert node.intake.counters.differing_duplicates == 19
    assert kept.SOPInstanceUID == base.SOPInstanceUID


def test_an_invalid_uid_is_logged_as_its_hash_never_as_sent(
    running_node: Callable[..., Node], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    node = running_node()
    ds = pydicom.dcmread(make_study(tmp_path / "s", 1)[0])
    for bad in ("1.2.SYNTHETIC-NAME^GIVEN", "../../../tmp/escape"):
        ds.SOPInstanceUID = bad
        with config.disable_value_validation():
            data = _explicit_le(ds)
        caplog.clear()
        assert send_raw(node.port, ds.SOPClassUID, bad, ExplicitVRLittleEndian, data) == Status.CANNOT_UNDERSTAND
        # The sender is this test's main thread (pynetdicom and pydicom warn there too); the node's threads:
        node_side = "\n".join(r.getMessage() for r in caplog.records if r.threadName != "MainThread")
        assert "refused" in node_side
        assert bad not in node_side and "SYNTHETIC" not in node_side
