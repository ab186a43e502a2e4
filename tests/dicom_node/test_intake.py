"""The Storage SCP against real peers on loopback: dcmtk's echoscu/storescu and pynetdicom SCUs."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
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
from pynetdicom.sop_class import CTImageStorage, Verification

from dicom_node.scp import Status
from dicom_node.service import Node
from dicom_node.store import JobState
from tests.conftest import make_study
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

    other = running_node(node={"allowed_hosts": ["10.0.0.0/8"]})
    refused = subprocess.run(
        ["echoscu", "-aec", "AINODE", "127.0.0.1", str(other.port)], capture_output=True, text=True
    )
    assert refused.returncode != 0 and "Rejected" in refused.stderr
    assert other.intake.counters.rejected_associations == 1


@pytest.mark.parametrize("name", [*CORPUS, *COMPRESSED])
def test_every_corpus_image_is_stored_byte_for_byte(running_node: Callable[..., Node], name: str) -> None:
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
    # Re-sending the same instances after the study ran starts nothing new.
    assert storescu(node, files).returncode == 0
    time.sleep(2.5)
    assert len(node.store.list_jobs()) == 1


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


def _dataset_bytes(source: Path) -> tuple[pydicom.Dataset, bytes]:
    raw = source.read_bytes()
    ds = pydicom.dcmread(source, stop_before_pixels=True)
    meta_end = 132 + 12 + int(ds.file_meta.FileMetaInformationGroupLength)
    return ds, raw[meta_end:]


def test_bad_input_gets_a_clear_status_and_the_node_keeps_serving(
    running_node: Callable[..., Node], tmp_path: Path
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

    # Nothing of that reached the spool, and the node still takes good data.
    assert list(node.spool.root.rglob("*.dcm")) == []
    assert _send_file(node, source) == Status.SUCCESS
    assert node.store.has_instance(pydicom.dcmread(source).SOPInstanceUID)


def test_disk_watermark_and_write_failure_answer_out_of_resources(
    running_node: Callable[..., Node], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = make_study(tmp_path / "s", 2)
    full = running_node(node={"min_free_disk_mb": 1024 * 1024 * 1024})  # an exabyte: never free
    assert _send_file(full, files[0]) == Status.OUT_OF_RESOURCES
    assert not full.store.has_instance(pydicom.dcmread(files[0]).SOPInstanceUID)

    node = running_node()

    def failing_store(path: Path, data: bytes) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(node.spool, "store", failing_store)
    assert _send_file(node, files[1]) == Status.OUT_OF_RESOURCES
    assert not node.store.has_instance(pydicom.dcmread(files[1]).SOPInstanceUID)


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

    from dicom_node.receiver import free_port

    port = free_port()
    node = running_node(node={"metrics_port": port})
    files = make_study(tmp_path / "s", 2)
    assert storescu(node, files).returncode == 0
    assert storescu(node, files[:1]).returncode == 0
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'dicom_node_instances_total{outcome="stored"} 2.0' in text
    assert 'dicom_node_instances_total{outcome="duplicate"} 1.0' in text
    assert "dicom_node_studies_receiving" in text
