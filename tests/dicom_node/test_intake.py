"""The Storage SCP against real peers on loopback: dcmtk's echoscu/storescu and pynetdicom SCUs."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import (
    JPEG2000,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)
from pynetdicom import AE
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import create_file_meta, encode_file_meta
from pynetdicom.sop_class import CTImageStorage, Verification
from sqlalchemy.exc import OperationalError

from dicom_node.config import Settings
from dicom_node.intake.spool import StagingFile, file_head
from dicom_node.intake.transport import _SpooledDataSet
from dicom_node.jobs.schema import JobState
from dicom_node.node import Node
from dicom_node.status import Status
from tests.conftest import RecordingDispatcher, make_study
from tests.corpus import COMPRESSED, CORPUS, corpus_file
from tests.dicom_node.peers import send_raw

pytestmark = pytest.mark.integration


def storescu(node: Node, files: list[Path], *args: str, aec: str = "AINODE") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["storescu", "-R", "-aec", aec, *args, "127.0.0.1", str(node.port), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
    )


# storescu's option to propose a file's own compressed transfer syntax (it proposes uncompressed by default).
_PROPOSE = {
    JPEG2000Lossless: ["-xv"],
    JPEG2000: ["-xw"],
    RLELossless: ["-xr"],
    JPEGLSLossless: ["-xt"],
    JPEGLosslessSV1: ["-xs"],
    JPEGBaseline8Bit: ["-xy"],
}


def wait_for(predicate: Callable[[], object], timeout: float = 15.0) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"condition not met within {timeout} s")


def _send_file(node: Node, path: Path, calling: str = "TESTSCU") -> int:
    """Send a file as stored (pynetdicom reads the meta and sends the data set bytes without decoding them)."""
    meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
    ae = AE(ae_title=calling)
    ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="AINODE")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(path)
        return int(status.Status)
    finally:
        assoc.release()


@pytest.mark.parametrize(
    ("sop_class", "sop_instance", "syntax"),
    [
        ("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", "1.2.840.10008.1.2.1"),  # even lengths
        ("1.2.840.10008.5.1.4.1.1.1", "1.2.33", "1.2.840.10008.1.2"),  # odd lengths: padded with NUL
        ("1.2.840.10008.5.1.4.1.1.4", "1." + "9" * 62, "1.2.840.10008.1.2.4.50"),  # 64 characters
    ],
)
def test_file_head_equals_pydicoms_encoding_of_pynetdicoms_file_meta(
    sop_class: str, sop_instance: str, syntax: str
) -> None:
    meta = create_file_meta(sop_class_uid=sop_class, sop_instance_uid=sop_instance, transfer_syntax=syntax)
    assert file_head(sop_class, sop_instance, syntax) == b"\x00" * 128 + b"DICM" + encode_file_meta(meta)


def test_echo_with_dcmtk(running_node: Callable[..., Node]) -> None:
    node = running_node()
    ok = subprocess.run(["echoscu", "-aec", "AINODE", "127.0.0.1", str(node.port)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    wrong = subprocess.run(["echoscu", "-aec", "OTHER", "127.0.0.1", str(node.port)], capture_output=True, text=True)
    assert wrong.returncode != 0
    assert "Called AE Title Not Recognized" in wrong.stderr


def test_calling_ae_and_host_allow_lists_reject_with_a_associate_rj(running_node: Callable[..., Node]) -> None:
    node = running_node(node={"allowed_calling_aets": ["PACS"]})
    refused = subprocess.run(
        ["echoscu", "-aet", "INTRUDER", "-aec", "AINODE", "127.0.0.1", str(node.port)], capture_output=True, text=True
    )
    assert refused.returncode != 0
    assert "Calling AE Title Not Recognized" in refused.stderr
    allowed = subprocess.run(
        ["echoscu", "-aet", "PACS", "-aec", "AINODE", "127.0.0.1", str(node.port)], capture_output=True, text=True
    )
    assert allowed.returncode == 0, allowed.stderr
    assert node.intake.counters.rejected_associations == 1

    # Source networks: the whole of 127/8 is this host, so a peer can come from 127.0.0.2 as well as 127.0.0.1.
    other = running_node(node={"allowed_hosts": ["127.0.0.2/32"]})
    refused = subprocess.run(
        ["echoscu", "-aec", "AINODE", "127.0.0.1", str(other.port)], capture_output=True, text=True
    )
    assert refused.returncode != 0 and "Rejected" in refused.stderr
    assert other.intake.counters.rejected_associations == 1
    ae = AE(ae_title="PACS")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", other.port, ae_title="AINODE", bind_address=("127.0.0.2", 0))
    assert assoc.is_established, "a peer from an allowed address is accepted"
    assert int(assoc.send_c_echo().Status) == Status.SUCCESS
    assoc.release()
    assert other.intake.counters.rejected_associations == 1


@pytest.fixture(params=["as-shipped", "in-memory", "spooled-on-arrival"])
def receive_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Small data sets are held in memory until complete, large ones written to the spool as they arrive
    (``as-shipped``); the other two modes send every data set one way."""
    threshold = {"in-memory": sys.maxsize, "spooled-on-arrival": 1024}.get(request.param)
    if threshold is not None:
        monkeypatch.setattr(_SpooledDataSet, "SPOOL_ABOVE", threshold)
    return str(request.param)


@pytest.mark.parametrize("name", [*CORPUS, *COMPRESSED])
def test_every_corpus_image_is_stored_byte_for_byte(
    running_node: Callable[..., Node], name: str, receive_mode: str
) -> None:
    node = running_node()
    source = corpus_file(name)
    original = pydicom.dcmread(source)
    result = storescu(node, [source], *_PROPOSE.get(str(original.file_meta.TransferSyntaxUID), []))
    assert result.returncode == 0, result.stderr
    spooled = node.spool.path_for(original.StudyInstanceUID, original.SeriesInstanceUID, original.SOPInstanceUID)
    stored = pydicom.dcmread(spooled)
    # No transcoding on receipt: same transfer syntax, same encoded pixel data, same elements.
    assert stored.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    assert stored.PixelData == original.PixelData
    # storescu drops Data Set Trailing Padding (FFFC,FFFC) when it sends; everything else arrives.
    assert [e.tag for e in stored] == [e.tag for e in original if e.tag != 0xFFFCFFFC]
    assert node.store.has_instance(original.SOPInstanceUID)


@pytest.mark.parametrize("name", ["693_UNCI.dcm", "emri_small_RLE.dcm", "RG1_J2KR.dcm"])
def test_the_spooled_file_is_the_file_meta_then_the_data_set_as_sent(
    running_node: Callable[..., Node], name: str, receive_mode: str
) -> None:
    node = running_node()
    source = corpus_file(name)
    header, sent = _dataset_bytes(source)
    ts = header.file_meta.TransferSyntaxUID
    assert send_raw(node.port, header.SOPClassUID, header.SOPInstanceUID, ts, sent) == Status.SUCCESS
    spooled = node.spool.path_for(header.StudyInstanceUID, header.SeriesInstanceUID, header.SOPInstanceUID)
    meta = file_head(header.SOPClassUID, header.SOPInstanceUID, header.file_meta.TransferSyntaxUID)
    assert spooled.read_bytes() == meta + sent
    assert list(node.spool.incoming.iterdir()) == []


def test_study_is_assembled_after_stable_time_and_resends_are_idempotent(
    running_node: Callable[..., Node], tmp_path: Path
) -> None:
    node = running_node(study={"stable_seconds": 1.5})
    files = make_study(tmp_path / "study", 5)
    assert storescu(node, files).returncode == 0
    assert storescu(node, files[:2]).returncode == 0  # a PACS re-sends: Success, stored once
    assert node.intake.counters.duplicates == 2
    study_uid = pydicom.dcmread(files[0]).StudyInstanceUID
    jobs = wait_for(lambda: node.store.list_jobs())
    assert isinstance(jobs, list) and len(jobs) == 1
    job = jobs[0]
    assert job.study_uid == study_uid and job.state is JobState.QUEUED and job.rule == "all-images"
    assert len(node.store.study_instances(study_uid)) == 5
    assert len(list(node.spool.root.rglob("*.dcm"))) == 5
    assert not list(node.spool.incoming.iterdir())  # the re-sends' staged copies were dropped
    # Re-sending the same instances after the study ran starts nothing new.
    assert storescu(node, files).returncode == 0
    time.sleep(2.5)
    assert len(node.store.list_jobs()) == 1
    # One of the node's own results routed back by the PACS: Success, not stored, not processed.
    own = make_study(tmp_path / "own", 1)
    own_uid = pydicom.dcmread(own[0]).SOPInstanceUID
    node.store.record_results(job.id, [(own_uid, "sr", "outbox/own.dcm")])
    assert storescu(node, own).returncode == 0
    assert node.intake.counters.duplicates == 8 and not node.store.has_instance(own_uid)


def test_late_arrival_starts_a_new_run_or_is_ignored(running_node: Callable[..., Node], tmp_path: Path) -> None:
    for policy, expected_jobs in (("rerun", 2), ("ignore", 1)):
        node = running_node(study={"stable_seconds": 1.0, "late_arrivals": policy})
        files = make_study(tmp_path / policy, 3)
        assert storescu(node, files[:2]).returncode == 0
        wait_for(lambda n=node: n.store.list_jobs())
        assert storescu(node, files[2:]).returncode == 0
        time.sleep(2.5)
        found = node.store.list_jobs()
        assert len(found) == expected_jobs, policy
        if policy == "rerun":
            assert sorted(j.run for j in found) == [1, 2]


def test_study_matching_no_rule_is_skipped_with_reason(running_node: Callable[..., Node], tmp_path: Path) -> None:
    node = running_node(rules=[{"name": "chest", "match": {"modality": ["CR", "DX"]}}])
    assert storescu(node, make_study(tmp_path / "ct", 2)).returncode == 0
    jobs = wait_for(lambda: node.store.list_jobs())
    assert isinstance(jobs, list)
    assert jobs[0].state is JobState.SKIPPED
    assert jobs[0].error is not None and "Modality ['CT'] not in ['CR', 'DX']" in jobs[0].error


def test_rules_match_on_modality_description_and_calling_ae(running_node: Callable[..., Node], tmp_path: Path) -> None:
    rules = [
        {"name": "from-zh", "match": {"calling_ae": ["PACS_ZH"]}, "language": "zh"},
        {"name": "ct", "match": {"modality": ["CT"], "series_description": "^(?!.*scout)"}, "profile": "vqa"},
    ]
    node = running_node(rules=rules)
    assert storescu(node, make_study(tmp_path / "a", 1)).returncode == 0
    assert storescu(node, make_study(tmp_path / "b", 1), "-aet", "PACS_ZH").returncode == 0
    jobs = wait_for(lambda: len(node.store.list_jobs()) == 2 and node.store.list_jobs())
    assert isinstance(jobs, list)
    assert sorted((j.rule, j.language, j.profile) for j in jobs) == [
        ("ct", "en", "vqa"),
        ("from-zh", "zh", "grounded_report"),
    ]


def test_intake_records_undone_by_a_power_loss_are_rebuilt_from_the_spool(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    """Intake records are committed without a WAL sync when the spool carries their every fact. A power loss can
    then undo the last records (simulated here by deleting them), never the synced files: the next start records
    the files again, with the calling AE they carry, and the study runs once under the rule that AE selects."""
    rules = [{"name": "from-zh", "match": {"calling_ae": ["PACS_ZH"]}, "language": "zh"}, {"name": "other"}]
    settings = make_settings(study={"stable_seconds": 60}, rules=rules)
    node = Node(settings, dispatcher=RecordingDispatcher())
    if not node.spool.carries_source:
        pytest.skip("the test folder's file system keeps no extended attributes")
    with node.store.intake_engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL: intake commits skip the WAL sync
    with node.store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL for every other write
    node.start()
    files = make_study(tmp_path / "study", 3)
    study_uid = pydicom.dcmread(files[0]).StudyInstanceUID
    try:
        assert storescu(node, files, "-aet", "PACS_ZH").returncode == 0
        assert len(node.store.study_instances(study_uid)) == 3
        spooled = sorted(node.spool.root.rglob("*.dcm"))
        assert [node.spool.source_ae(f) for f in spooled] == ["PACS_ZH"] * 3
    finally:
        node.stop()
    with sqlite3.connect(settings.node.data_dir / "jobs.sqlite") as db:  # what a power loss may undo
        for table in ("instances", "events", "studies"):
            db.execute(f"DELETE FROM {table} WHERE study_uid = ?", (study_uid,))
    quick = settings.model_copy(update={"study": settings.study.model_copy(update={"stable_seconds": 0.5})})
    restarted = Node(quick, dispatcher=RecordingDispatcher())
    restarted.start()
    try:
        records = restarted.store.study_instances(study_uid)
        assert sorted(r.calling_ae for r in records) == ["PACS_ZH"] * 3
        jobs = wait_for(lambda: restarted.store.list_jobs())
        assert isinstance(jobs, list) and len(jobs) == 1
        assert (jobs[0].rule, jobs[0].language) == ("from-zh", "zh")
        assert storescu(restarted, files, "-aet", "PACS_ZH").returncode == 0  # a re-send is still a re-send
        assert restarted.intake.counters.duplicates == 3
    finally:
        restarted.stop()


def _dataset_bytes(source: Path) -> tuple[pydicom.Dataset, bytes]:
    raw = source.read_bytes()
    ds = pydicom.dcmread(source, stop_before_pixels=True)
    meta_end = 132 + 12 + int(ds.file_meta.FileMetaInformationGroupLength)
    return ds, raw[meta_end:]


def test_bad_input_gets_a_clear_status_and_the_node_keeps_serving(
    running_node: Callable[..., Node], tmp_path: Path, receive_mode: str
) -> None:
    node = running_node()
    source = make_study(tmp_path / "src", 1)[0]
    header, body = _dataset_bytes(source)
    cls, uid, ts = header.SOPClassUID, header.SOPInstanceUID, header.file_meta.TransferSyntaxUID

    garbage = b"\x08\x00\x05\x00\xff\xff\xff\x7f" + b"\x01" * 64  # an element longer than the stream
    assert send_raw(node.port, cls, uid, ts, garbage) == Status.CANNOT_UNDERSTAND
    truncated = body[: len(body) // 2]
    assert send_raw(node.port, cls, uid, ts, truncated) in (Status.CANNOT_UNDERSTAND, Status.DATASET_MISMATCH)

    ds = pydicom.dcmread(source)
    ds.SOPInstanceUID = "../../../../tmp/escape"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    escaping = tmp_path / "escape.dcm"
    ds.save_as(escaping, enforce_file_format=True)
    assert _send_file(node, escaping) == Status.CANNOT_UNDERSTAND
    assert not Path("/tmp/escape.dcm").exists()
    assert not any(p.name.startswith("escape") for p in node.spool.root.rglob("*"))

    # An unknown SOP class: its presentation context is rejected during negotiation.
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context("1.2.3.4.5.6.7", ExplicitVRLittleEndian)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="AINODE")
    assert assoc.is_established
    assert [c.abstract_syntax for c in assoc.accepted_contexts] == [Verification]
    assoc.release()

    # Nothing of that reached the spool (staged copies included), and the node still takes good data.
    assert list(node.spool.root.rglob("*.dcm")) == []
    assert list(node.spool.incoming.iterdir()) == []
    assert _send_file(node, source) == Status.SUCCESS
    assert node.store.has_instance(pydicom.dcmread(source).SOPInstanceUID)


def test_a_transfer_cut_off_midway_leaves_no_file_and_no_record(
    running_node: Callable[..., Node], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large data set is written to the spool while it arrives; a peer that aborts in the middle of it got no
    Success, so the partial file is removed at once (not only at the next start) and nothing is recorded."""
    monkeypatch.setattr(_SpooledDataSet, "SPOOL_ABOVE", 64 * 1024)
    node = running_node()
    source = make_study(tmp_path / "src", 1)[0]
    header, body = _dataset_bytes(source)
    ae = AE(ae_title="CUTOFF")
    ae.add_requested_context(header.SOPClassUID, header.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="AINODE")
    assert assoc.is_established
    req = C_STORE()
    req.MessageID, req.Priority = 1, 2
    req.AffectedSOPClassUID, req.AffectedSOPInstanceUID = header.SOPClassUID, header.SOPInstanceUID
    req.DataSet = BytesIO(body)
    message = C_STORE_RQ()
    message.primitive_to_message(req)
    fragments = list(message.encode_msg(assoc.accepted_contexts[0].context_id, 16384))
    for pdata in fragments[: len(fragments) // 2]:  # the command and half of the data set
        assoc.dul.send_pdu(pdata)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not list(node.spool.incoming.iterdir()):
        time.sleep(0.01)
    assert list(node.spool.incoming.iterdir()), "the data set is written to the spool while it arrives"
    assoc.abort()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and list(node.spool.incoming.iterdir()):
        time.sleep(0.05)
    assert list(node.spool.incoming.iterdir()) == []
    assert not node.store.has_instance(header.SOPInstanceUID)
    assert _send_file(node, source) == Status.SUCCESS, "the peer sends it again, whole"
    assert node.store.has_instance(header.SOPInstanceUID)


def test_disk_watermark_and_write_failure_answer_out_of_resources(
    running_node: Callable[..., Node], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    files = make_study(tmp_path / "s", 2)
    full = running_node(node={"min_free_disk_mb": 1024 * 1024 * 1024})  # an exabyte: never free
    assert _send_file(full, files[0]) == Status.OUT_OF_RESOURCES
    assert not full.store.has_instance(pydicom.dcmread(files[0]).SOPInstanceUID)
    assert not list(full.spool.root.rglob("*.tmp")), "the refused instance's staged file is gone"

    # Below the watermark a re-send is still answered from the job store; with the store down, a clear refusal.
    def store_down(sop_uid: str) -> bool:
        raise OperationalError("SELECT 1", {}, Exception("unable to open database file"))

    monkeypatch.setattr(full.store, "known_instance", store_down)
    caplog.clear()
    assert _send_file(full, files[0]) == Status.OUT_OF_RESOURCES
    assert "job store unavailable: unable to open database file" in caplog.text
    assert "failed unexpectedly" not in caplog.text and not any(r.exc_info for r in caplog.records)
    monkeypatch.undo()

    node = running_node()

    def failing_write(self: object, data: object) -> None:
        raise OSError(28, "No space left on device")

    # The network thread writes each fragment to the spool as it arrives: the disk fills up during the transfer.
    monkeypatch.setattr(StagingFile, "write", failing_write)
    assert _send_file(node, files[1]) == Status.OUT_OF_RESOURCES
    assert not node.store.has_instance(pydicom.dcmread(files[1]).SOPInstanceUID)
    monkeypatch.undo()
    assert _send_file(node, files[1]) == Status.SUCCESS  # the peer resends once the disk has room
    assert node.store.has_instance(pydicom.dcmread(files[1]).SOPInstanceUID)
    assert not list(node.spool.root.rglob("*.tmp"))  # no temporary file is left behind


def test_a_full_disk_answers_out_of_resources_and_accepts_the_resend_once_there_is_room(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    """A real ENOSPC: the spool is a 1 MiB tmpfs that holds one 514 KB instance. The watermark is off, so the write
    itself fails; the peer gets A700, nothing is recorded, no temporary file is left, and the same instances are
    accepted once the file system has room."""
    settings = make_settings(node={"min_free_disk_mb": 0})
    spool_dir = settings.node.data_dir / "spool"
    spool_dir.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(spool_dir)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"mounting a small tmpfs needs root: {mounted.stderr.decode(errors='replace').strip()}")
    try:
        node = Node(settings, dispatcher=RecordingDispatcher())
        node.start()
        try:
            files = make_study(tmp_path / "study", 3)
            statuses = [_send_file(node, f) for f in files]
            assert statuses[0] == Status.SUCCESS
            refused = [f for f, status in zip(files, statuses, strict=True) if status != Status.SUCCESS]
            assert refused and all(s == Status.OUT_OF_RESOURCES for s in statuses[1:] if s != Status.SUCCESS)
            for f in refused:
                assert not node.store.has_instance(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
            assert not list(spool_dir.rglob("*.tmp"))
            assert node.intake.counters.failed == len(refused)

            subprocess.run(["mount", "-o", "remount,size=8m", str(spool_dir)], check=True)  # the admin makes room
            assert [_send_file(node, f) for f in refused] == [Status.SUCCESS] * len(refused)
            assert len(list(spool_dir.rglob("*.dcm"))) == 3
        finally:
            node.stop()
    finally:
        subprocess.run(["umount", "-l", str(spool_dir)], check=False)


def test_pynetdicom_dataset_send_and_max_associations(running_node: Callable[..., Node], tmp_path: Path) -> None:
    node = running_node(node={"max_associations": 1})
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage)
    first = ae.associate("127.0.0.1", node.port, ae_title="AINODE")
    assert first.is_established
    second = ae.associate("127.0.0.1", node.port, ae_title="AINODE")
    assert second.is_rejected  # local limit exceeded: a transient rejection, the PACS retries later
    ds = pydicom.dcmread(make_study(tmp_path / "s", 1)[0])
    assert first.send_c_store(ds).Status == Status.SUCCESS
    first.release()
    # The slot is free again.
    third = ae.associate("127.0.0.1", node.port, ae_title="AINODE")
    assert third.is_established
    third.release()


def test_metrics_show_what_the_scp_did(running_node: Callable[..., Node], tmp_path: Path) -> None:
    import urllib.request

    from dicom_node.devtools.receiver import free_port

    port = free_port()
    node = running_node(node={"metrics_port": port})
    files = make_study(tmp_path / "s", 2)
    assert storescu(node, files).returncode == 0
    assert storescu(node, files[:1]).returncode == 0
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'dicom_node_instances_total{outcome="stored"} 2.0' in text
    assert 'dicom_node_instances_total{outcome="duplicate"} 1.0' in text
    assert "dicom_node_studies_receiving" in text
    assert "dicom_node_cstore_handler_seconds_count 3.0" in text
    handler_sum = next(line for line in text.splitlines() if line.startswith("dicom_node_cstore_handler_seconds_sum"))
    assert 0 < float(handler_sum.split()[1]) < 60
