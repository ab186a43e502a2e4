"""C-STORE and C-ECHO towards real peers on loopback: Orthanc, and pynetdicom SCPs that answer as a test wants."""

from __future__ import annotations

import json
import logging
import socket
import ssl
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.sr.codedict import codes
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, Verification  # type: ignore[attr-defined]

from dicom_node.config import DestinationSettings
from dicom_node.export.outcome import (
    AssociationState,
    FileResult,
    Outcome,
    classify_store_status,
    status_name,
)
from dicom_node.export.scu import echo, send_files
from dicom_node.logs import uid_hash
from dicom_node.status import Status as StoreStatus
from tests.conftest import make_study
from tests.corpus import corpus_file
from tests.orthanc import Orthanc, StoreRecorder, free_ports, requires_orthanc

NODE_AET = "AINODE"


# -- result objects built in the test, as the node would make them -------------------------------------------


def _source() -> pydicom.Dataset:
    path = get_testdata_file("CT_small.dcm", download=False)
    assert path is not None, "pydicom's own test file CT_small.dcm is missing"
    return pydicom.dcmread(path)


BOX = np.array([[10, 10], [60, 10], [60, 40], [10, 40], [10, 10]], dtype=float)


def make_sr(source: Dataset, out: Path) -> Path:
    """A TID 1500 Comprehensive 3D SR with one box on ``source``."""
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=BOX,
        source_image=hd.sr.SourceImageForRegion.from_source_image(source),
    )
    group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier="finding 1"),
        referenced_region=region,
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(),
        procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
        imaging_measurements=[group],
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[source],
        content=report,
        series_instance_uid=generate_uid(),
        series_number=900,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="test",
    )
    sr.save_as(out, enforce_file_format=True)
    return out


def make_gsps(source: Dataset, out: Path) -> Path:
    layer = hd.pr.GraphicLayer(layer_name="BOXES", order=1)
    annotation = hd.pr.GraphicAnnotation(
        referenced_images=[source],
        graphic_layer=layer,
        graphic_objects=[
            hd.pr.GraphicObject(
                graphic_type=hd.pr.GraphicTypeValues.POLYLINE,
                graphic_data=BOX,
                units=hd.pr.AnnotationUnitsValues.PIXEL,
            )
        ],
    )
    gsps = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=[source],
        series_instance_uid=generate_uid(),
        series_number=901,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="test",
        manufacturer_model_name="test",
        software_versions="1",
        device_serial_number="1",
        content_label="BOXES",
        graphic_layers=[layer],
        graphic_annotations=[annotation],
    )
    gsps.save_as(out, enforce_file_format=True)
    return out


def make_seg(source: Dataset, out: Path) -> Path:
    mask = np.zeros((1, source.Rows, source.Columns), dtype=bool)
    mask[0, 10:40, 10:60] = True
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="finding",
        segmented_property_category=codes.SCT.Tissue,
        segmented_property_type=codes.SCT.Tissue,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="test", version="1", family=codes.DCM.ArtificialIntelligence
        ),
    )
    seg = hd.seg.Segmentation(
        source_images=[source],
        pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=generate_uid(),
        series_number=902,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="test",
        manufacturer_model_name="test",
        software_versions="1",
        device_serial_number="1",
    )
    seg.save_as(out, enforce_file_format=True)
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("results")
    source = _source()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the test file's patient name has a single component
        return {
            "sr": make_sr(source, out / "sr.dcm"),
            "gsps": make_gsps(source, out / "gsps.dcm"),
            "seg": make_seg(source, out / "seg.dcm"),
        }


def _uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _destination(port: int, ae_title: str = "ORTHANC", **kwargs: object) -> DestinationSettings:
    settings: dict[str, object] = {"timeout": 5, **kwargs}
    return DestinationSettings(name="pacs", ae_title=ae_title, host="127.0.0.1", port=port, **settings)


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    if not Path("/usr/sbin/Orthanc").exists():
        pytest.skip("Orthanc is not installed (Debian package 'orthanc')")
    server = Orthanc(tmp_path_factory.mktemp("orthanc"), always_allow_store=False, modalities={
        "node": (NODE_AET, "127.0.0.1", 1),
    })  # fmt: skip
    with server:
        yield server


# -- against Orthanc -----------------------------------------------------------------------------------------


@requires_orthanc
@pytest.mark.integration
def test_corpus_images_and_results_are_delivered_to_orthanc_over_one_association(
    pacs: Orthanc, results: dict[str, Path]
) -> None:
    images = [corpus_file(n) for n in ("RG1_UNCI.dcm", "693_UNCI.dcm", "MR2_UNCI.dcm", "RG1_J2KR.dcm")]
    files = [*images, results["sr"], results["gsps"], results["seg"]]

    report = send_files(_destination(pacs.dicom_port), files, NODE_AET)

    assert [f.outcome for f in report.files] == [Outcome.DELIVERED] * len(files), report.files
    assert [f.status_name for f in report.files] == ["Success"] * len(files)
    assert len(report.associations) == 1 and report.associations[0].state == AssociationState.RELEASED
    assert report.outcome == Outcome.DELIVERED and report.reason == ""
    assert {f.sop_instance_uid for f in report.files} <= pacs.sop_instance_uids()
    # The compressed image went as stored: Orthanc accepts JPEG 2000.
    assert report.files[3].transfer_syntax == JPEG2000Lossless

    study = pacs.find_study(str(_source().StudyInstanceUID))
    assert study is not None
    modalities = {s["MainDicomTags"].get("Modality") for s in pacs.study_series(study)}
    assert {"SR", "PR", "SEG"} <= modalities
    sr_series = next(s for s in pacs.study_series(study) if s["MainDicomTags"].get("Modality") == "SR")
    [sr_instance] = pacs.instances_of_series(sr_series["ID"])
    stored = pydicom.dcmread(pacs.download_instance(sr_instance["ID"], pacs.workdir))
    original = pydicom.dcmread(results["sr"])
    assert stored.SOPInstanceUID == original.SOPInstanceUID
    assert stored.ContentSequence == original.ContentSequence
    # Orthanc records who sent it: the routing rule relies on that.
    assert pacs.instance_metadata(sr_instance["ID"])["RemoteAET"] == NODE_AET


@requires_orthanc
@pytest.mark.integration
def test_wrong_called_ae_title_is_a_permanent_rejection_with_the_reason(pacs: Orthanc) -> None:
    report = send_files(_destination(pacs.dicom_port, "NOTORTHANC"), [corpus_file("693_UNCI.dcm")], NODE_AET)

    assert report.outcome == Outcome.REJECTED
    assert report.association is not None and report.association.state == AssociationState.REJECTED
    assert report.association.permanent
    assert report.reason == (
        f"association rejected by NOTORTHANC@127.0.0.1:{pacs.dicom_port}: called AE title NOTORTHANC not "
        "recognised (check the destination's ae_title)"
    )
    assert report.files[0].status is None and report.files[0].reason == report.reason


@requires_orthanc
@pytest.mark.integration
def test_unknown_calling_ae_title_is_a_permanent_rejection(pacs: Orthanc) -> None:
    report = send_files(_destination(pacs.dicom_port), [corpus_file("693_UNCI.dcm")], "STRANGER")

    assert report.outcome == Outcome.REJECTED
    assert "calling AE title STRANGER not recognised" in report.reason


@requires_orthanc
@pytest.mark.integration
def test_destination_calling_ae_title_overrides_the_node_ae_title(pacs: Orthanc) -> None:
    destination = _destination(pacs.dicom_port, calling_ae_title=NODE_AET)
    report = send_files(destination, [corpus_file("693_UNCI.dcm")], "STRANGER")
    assert report.outcome == Outcome.DELIVERED


@requires_orthanc
@pytest.mark.integration
def test_echo_orthanc_ok_and_each_failure(pacs: Orthanc) -> None:
    ok = echo(_destination(pacs.dicom_port), NODE_AET)
    assert ok.ok and ok.state == AssociationState.RELEASED and ok.reason == ""
    assert ok.round_trip_ms is not None and ok.round_trip_ms > 0 and ok.total_ms >= ok.round_trip_ms
    assert str(ok).startswith(f"pacs (ORTHANC@127.0.0.1:{pacs.dicom_port}): C-ECHO ok, round trip")

    wrong_ae = echo(_destination(pacs.dicom_port, "NOTORTHANC"), NODE_AET)
    assert not wrong_ae.ok and wrong_ae.state == AssociationState.REJECTED
    assert "called AE title NOTORTHANC not recognised" in str(wrong_ae)

    stranger = echo(_destination(pacs.dicom_port), "STRANGER")
    assert not stranger.ok and "calling AE title STRANGER not recognised" in stranger.reason

    refused = echo(_destination(free_ports(1)[0]), NODE_AET)
    assert not refused.ok and refused.state == AssociationState.REFUSED
    assert "connection refused" in refused.reason and refused.round_trip_ms is None


# -- against pynetdicom SCPs that answer as the test wants ---------------------------------------------------


def _failing_for(uids: set[str], status: int, comment: str = "") -> Callable[[evt.Event], int | Dataset]:
    def respond(event: evt.Event) -> int | Dataset:
        if str(event.dataset.SOPInstanceUID) not in uids:
            return int(StoreStatus.SUCCESS)
        answer = Dataset()
        answer.Status = status
        if comment:
            answer.ErrorComment = comment
        return answer

    return respond


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS, Outcome.REJECTED),
        (StoreStatus.CANNOT_UNDERSTAND, Outcome.REJECTED),
        (StoreStatus.SOP_CLASS_NOT_SUPPORTED, Outcome.REJECTED),
        (StoreStatus.PROCESSING_FAILURE, Outcome.REJECTED),
        (StoreStatus.OUT_OF_RESOURCES, Outcome.TRANSIENT),
        (StoreStatus.RESOURCE_LIMITATION, Outcome.TRANSIENT),
        (StoreStatus.COERCION_OF_DATA_ELEMENTS, Outcome.DELIVERED),
    ],
)
def test_per_instance_status_is_classified_and_the_rest_of_the_batch_goes_through(
    results: dict[str, Path], status: StoreStatus, outcome: Outcome
) -> None:
    sr_uid = _uid(results["sr"])
    files = [corpus_file("693_UNCI.dcm"), results["sr"], results["gsps"]]
    with StoreRecorder("STORESCP", respond=_failing_for({sr_uid}, status, "test says no")) as scp:
        report = send_files(_destination(scp.port, "STORESCP"), files, NODE_AET)

    assert [f.outcome for f in report.files] == [Outcome.DELIVERED, outcome, Outcome.DELIVERED]
    sr = report.files[1]
    assert sr.sop_instance_uid == sr_uid and sr.status == status
    assert sr.status_name == status_name(status) != "Unknown status"
    assert sr.status_hex in sr.reason and "test says no" in sr.reason
    if outcome == Outcome.REJECTED:
        assert sr.reason.startswith(f"rejected by STORESCP@127.0.0.1:{scp.port} with status")
    assert report.outcome == outcome
    assert len(report.associations) == 1 and report.associations[0].state == AssociationState.RELEASED
    assert len(scp.received) == 3


def test_classification_of_status_ranges_and_unknown_codes() -> None:
    assert classify_store_status(StoreStatus.OUT_OF_RESOURCES + 0xFF) == Outcome.TRANSIENT  # A7FF, end of range
    assert classify_store_status(StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS + 1) == Outcome.REJECTED
    assert classify_store_status(StoreStatus.ELEMENTS_DISCARDED) == Outcome.DELIVERED
    assert classify_store_status(StoreStatus.NOT_AUTHORISED) == Outcome.REJECTED
    assert classify_store_status(0xFFFF) == Outcome.REJECTED  # outside every category
    assert status_name(StoreStatus.OUT_OF_RESOURCES) == "Refused: Out of Resources"


def test_unreachable_port_is_transient_with_the_reason() -> None:
    port = free_ports(1)[0]
    report = send_files(_destination(port), [corpus_file("693_UNCI.dcm")], NODE_AET)

    assert report.outcome == Outcome.TRANSIENT
    assert report.association is not None and report.association.state == AssociationState.REFUSED
    assert not report.association.permanent
    assert report.reason == (
        f"connection refused by 127.0.0.1:{port}: nothing listens on that port "
        "(is the PACS running, is the port right?)"
    )


def test_unresolvable_host_is_transient() -> None:
    destination = DestinationSettings(name="pacs", ae_title="PACS", host="pacs.invalid", port=104, timeout=5)
    report = send_files(destination, [corpus_file("693_UNCI.dcm")], NODE_AET)
    assert report.outcome == Outcome.TRANSIENT
    assert report.reason.startswith("cannot resolve host name 'pacs.invalid'")


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A TCP port that accepts connections and never answers (a hung PACS)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        yield server.getsockname()[1]


def test_peer_that_never_answers_is_a_transient_time_out(silent_server: int) -> None:
    destination = _destination(silent_server, timeout=1)
    report = send_files(destination, [corpus_file("693_UNCI.dcm")], NODE_AET)
    assert report.outcome == Outcome.TRANSIENT
    assert report.association is not None and report.association.state == AssociationState.TIMEOUT
    assert "did not answer the association request within 1 s" in report.reason

    result = echo(destination, NODE_AET)
    assert not result.ok and result.state == AssociationState.TIMEOUT


@pytest.fixture
def rejecting_server() -> Iterator[int]:
    """A TCP port whose peer reads each association request, answers A-ASSOCIATE-RJ (permanent, called AE title
    not recognised) and closes at once, as dcmtk-based PACS do."""
    stop = threading.Event()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        server.settimeout(0.1)

        def serve() -> None:
            while not stop.is_set():
                try:
                    peer, _ = server.accept()
                except TimeoutError:
                    continue
                with peer:
                    peer.settimeout(5)
                    head = peer.recv(6, socket.MSG_WAITALL)
                    peer.recv(int.from_bytes(head[2:6], "big"), socket.MSG_WAITALL)
                    peer.sendall(bytes([0x03, 0, 0, 0, 0, 4, 0, 0x01, 0x01, 0x07]))

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        yield server.getsockname()[1]
        stop.set()
        thread.join(5)


def test_rejection_read_before_the_requesting_thread_looks_is_still_a_rejection(
    rejecting_server: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Under full CPU load the requesting thread may resume only after pynetdicom's network thread has read the
    # A-ASSOCIATE-RJ and closed the connection; pynetdicom then aborts instead of reporting the rejection. The pause
    # after the request makes that order certain.
    from pynetdicom.acse import ACSE

    send_request = ACSE.send_request

    def slow_send_request(self: ACSE) -> None:
        send_request(self)
        time.sleep(0.3)

    monkeypatch.setattr(ACSE, "send_request", slow_send_request)
    destination = _destination(rejecting_server, "NOTHERE")

    report = send_files(destination, [corpus_file("693_UNCI.dcm")], NODE_AET)
    result = echo(destination, NODE_AET)

    assert report.outcome == Outcome.REJECTED
    assert report.association is not None and report.association.permanent
    assert report.reason == (
        f"association rejected by NOTHERE@127.0.0.1:{rejecting_server}: called AE title NOTHERE not recognised "
        "(check the destination's ae_title)"
    )
    assert not result.ok and result.state == AssociationState.REJECTED


def test_peer_that_does_not_answer_a_c_store_in_time_leaves_it_transient(results: dict[str, Path]) -> None:
    answered = threading.Event()

    def hang_on_first(event: evt.Event) -> int:
        if len(scp.received) == 1:
            answered.wait(5)  # longer than the destination's 1 s time-out
        return int(StoreStatus.SUCCESS)

    with StoreRecorder("STORESCP", respond=hang_on_first) as scp:
        try:
            report = send_files(
                _destination(scp.port, "STORESCP", timeout=1), [results["sr"], results["gsps"]], NODE_AET
            )
        finally:
            answered.set()

    assert [f.outcome for f in report.files] == [Outcome.TRANSIENT, Outcome.TRANSIENT]
    assert report.files[0].reason == f"no C-STORE response from STORESCP@127.0.0.1:{scp.port} within 1 s"
    assert "ended before this object was sent" in report.files[1].reason


def test_busy_peer_rejecting_the_association_for_now_is_transient() -> None:
    with StoreRecorder("STORESCP", maximum_associations=1) as scp:
        holder = AE(ae_title="HOLDER")
        holder.add_requested_context(Verification)
        held = holder.associate("127.0.0.1", scp.port, ae_title="STORESCP")
        assert held.is_established
        try:
            report = send_files(_destination(scp.port, "STORESCP"), [corpus_file("693_UNCI.dcm")], NODE_AET)
            result = echo(_destination(scp.port, "STORESCP"), NODE_AET)
        finally:
            held.release()

    assert report.outcome == Outcome.TRANSIENT
    assert report.association is not None and report.association.state == AssociationState.BUSY
    assert "local limit exceeded" in report.reason
    assert not result.ok and result.state == AssociationState.BUSY


def test_abort_in_the_middle_of_a_batch_leaves_the_rest_transient(results: dict[str, Path]) -> None:
    def abort_on_second(event: evt.Event) -> int:
        if len(scp.received) == 2:
            event.assoc.abort()
        return int(StoreStatus.SUCCESS)

    files = [corpus_file("693_UNCI.dcm"), results["sr"], results["gsps"]]
    with StoreRecorder("STORESCP", respond=abort_on_second) as scp:
        report = send_files(_destination(scp.port, "STORESCP"), files, NODE_AET)

    assert [f.outcome for f in report.files] == [Outcome.DELIVERED, Outcome.TRANSIENT, Outcome.TRANSIENT]
    assert "aborted" in report.files[1].reason and report.files[1].status is None
    assert report.outcome == Outcome.TRANSIENT
    stored = json.loads(json.dumps(report.as_dict()))  # what the job store keeps
    assert [f["outcome"] for f in stored["files"]] == ["delivered", "transient", "transient"]
    assert stored["files"][0]["status_name"] == "Success" and stored["outcome"] == "transient"


def test_sop_class_the_peer_does_not_accept_is_rejected_and_others_go_through(results: dict[str, Path]) -> None:
    files = [corpus_file("693_UNCI.dcm"), results["sr"]]
    with StoreRecorder("STORESCP", sop_classes=[CTImageStorage]) as scp:
        report = send_files(_destination(scp.port, "STORESCP"), files, NODE_AET)
        nothing = send_files(_destination(scp.port, "STORESCP"), [results["sr"]], NODE_AET)
    with StoreRecorder("STORESCP", sop_classes=[MRImageStorage]) as scp:
        refused_echo = echo(_destination(scp.port, "STORESCP"), NODE_AET)

    assert [f.outcome for f in report.files] == [Outcome.DELIVERED, Outcome.REJECTED]
    assert report.files[1].reason == (
        f"STORESCP@127.0.0.1:{report.peer.rsplit(':', 1)[1]} does not accept SOP class Comprehensive 3D SR Storage"
    )
    assert nothing.outcome == Outcome.REJECTED
    assert nothing.association is not None and nothing.association.state == AssociationState.NO_CONTEXTS
    assert "Comprehensive 3D SR Storage" in nothing.reason
    assert refused_echo.ok  # Verification is always supported by the recorder


@pytest.mark.parametrize("name", ["emri_small_RLE.dcm", "JPGLosslessP14SV1_1s_1f_8b.dcm"])
def test_compressed_file_goes_as_stored_when_accepted_and_decompressed_only_when_needed(name: str) -> None:
    path = corpus_file(name)
    original = pydicom.dcmread(path)
    with StoreRecorder("STORESCP") as scp:
        as_stored = send_files(_destination(scp.port, "STORESCP"), [path], NODE_AET)
        [received] = scp.received
    assert as_stored.files[0].outcome == Outcome.DELIVERED
    assert received.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    assert received.PixelData == original.PixelData  # the very bytes of the file
    assert as_stored.files[0].transfer_syntax == original.file_meta.TransferSyntaxUID

    with StoreRecorder("STORESCP", transfer_syntaxes=[ImplicitVRLittleEndian]) as scp:
        converted = send_files(_destination(scp.port, "STORESCP"), [path], NODE_AET)
        [received] = scp.received
    assert converted.files[0].outcome == Outcome.DELIVERED
    assert converted.files[0].transfer_syntax == ImplicitVRLittleEndian
    assert received.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    np.testing.assert_array_equal(received.pixel_array, original.pixel_array)


def test_uncompressed_file_is_converted_between_explicit_and_implicit_vr(results: dict[str, Path]) -> None:
    assert pydicom.dcmread(results["sr"]).file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    with StoreRecorder("STORESCP", transfer_syntaxes=[ImplicitVRLittleEndian]) as scp:
        report = send_files(_destination(scp.port, "STORESCP"), [results["sr"]], NODE_AET)
        [received] = scp.received
    assert report.outcome == Outcome.DELIVERED
    assert received.ContentSequence == pydicom.dcmread(results["sr"]).ContentSequence


def test_compressed_file_the_peer_cannot_take_is_rejected_when_it_cannot_be_decoded(tmp_path: Path) -> None:
    broken = tmp_path / "broken.dcm"
    ds = pydicom.dcmread(corpus_file("emri_small_RLE.dcm"))
    ds.PixelData = encapsulate([b"\x00" * 64] * int(ds.NumberOfFrames))  # frames that are not RLE streams
    ds.save_as(broken)
    with StoreRecorder("STORESCP", transfer_syntaxes=[ExplicitVRLittleEndian]) as scp:
        report = send_files(_destination(scp.port, "STORESCP"), [broken], NODE_AET)
    assert report.files[0].outcome == Outcome.REJECTED
    assert "could not be decompressed" in report.files[0].reason
    assert RLELossless.name in report.files[0].reason


def test_unreadable_file_is_rejected_and_does_not_stop_the_batch(tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all")
    with StoreRecorder("STORESCP") as scp:
        report = send_files(_destination(scp.port, "STORESCP"), [junk, corpus_file("693_UNCI.dcm")], NODE_AET)
    assert [f.outcome for f in report.files] == [Outcome.REJECTED, Outcome.DELIVERED]
    assert report.files[0].sop_instance_uid is None and str(junk) in report.files[0].reason
    assert len(scp.received) == 1


def test_empty_batch_makes_no_association() -> None:
    report = send_files(_destination(free_ports(1)[0]), [], NODE_AET)
    assert report.files == [] and report.outcome == Outcome.DELIVERED
    assert [a.state for a in report.associations] == [AssociationState.NOT_ATTEMPTED]


def test_logs_name_hashed_uids_never_patient_data(caplog: pytest.LogCaptureFixture, results: dict[str, Path]) -> None:
    source = _source()
    sr_uid = _uid(results["sr"])
    caplog.set_level(logging.DEBUG, logger="dicom_node")
    with StoreRecorder(
        "STORESCP",
        respond=_failing_for({sr_uid}, StoreStatus.CANNOT_UNDERSTAND),
    ) as scp:
        send_files(_destination(scp.port, "STORESCP"), [results["sr"], results["gsps"]], NODE_AET)
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("dicom_node")]
    assert any(uid_hash(sr_uid) in line for line in ours)  # the failure names the instance by its hash
    assert sum("C-STORE association" in line for line in ours) == 1  # one line per association
    text = "\n".join(ours)
    for secret in (str(source.PatientName), str(source.PatientID), sr_uid, str(source.StudyInstanceUID)):
        assert secret not in text


def test_uid_hash_is_short_stable_and_distinct() -> None:
    assert uid_hash("1.2.3") == uid_hash("1.2.3")
    assert uid_hash("1.2.3") != uid_hash("1.2.4")
    assert len(uid_hash("1.2.3")) == 12 and int(uid_hash("1.2.3"), 16) >= 0


# -- DICOM TLS -----------------------------------------------------------------------------------------------


def _server_context(pki: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki / "pacs.pem", pki / "pacs.key")
    context.verify_mode = ssl.CERT_REQUIRED  # mutual TLS: the PACS checks the node's certificate too
    context.load_verify_locations(pki / "ca.pem")
    return context


def test_tls_destination_with_client_certificate_delivers(pki: Path, results: dict[str, Path]) -> None:
    with StoreRecorder("TLSSCP", ssl_context=_server_context(pki)) as scp:
        destination = _destination(
            scp.port, "TLSSCP", tls=True, tls_ca_file=pki / "ca.pem",
            tls_cert_file=pki / "node.pem", tls_key_file=pki / "node.key",
        )  # fmt: skip
        report = send_files(destination, [results["sr"]], NODE_AET)
        result = echo(destination, NODE_AET)
    assert report.outcome == Outcome.DELIVERED, report.reason
    assert scp.sop_instance_uids() == [_uid(results["sr"])]
    assert result.ok


def test_tls_with_an_untrusted_peer_certificate_is_a_permanent_failure(pki: Path, results: dict[str, Path]) -> None:
    with StoreRecorder("TLSSCP", ssl_context=_server_context(pki)) as scp:
        destination = _destination(
            scp.port, "TLSSCP", tls=True, tls_ca_file=pki / "other-ca.pem",
            tls_cert_file=pki / "node.pem", tls_key_file=pki / "node.key",
        )  # fmt: skip
        report = send_files(destination, [results["sr"]], NODE_AET)
    assert report.outcome == Outcome.REJECTED
    assert report.association is not None and report.association.state == AssociationState.TLS_FAILED
    assert "certificate verify failed" in report.reason
    assert scp.received == []


def test_tls_with_missing_files_names_the_setting(tmp_path: Path, results: dict[str, Path]) -> None:
    destination = _destination(1, tls=True, tls_ca_file=tmp_path / "absent.pem")
    report = send_files(destination, [results["sr"]], NODE_AET)
    assert report.outcome == Outcome.REJECTED
    assert report.reason.startswith("destination 'pacs': tls_ca_file ") and "absent.pem" in report.reason


# -- delivery reported object by object ----------------------------------------------------------------------


def test_each_acknowledged_object_is_reported_before_the_next_c_store(tmp_path: Path) -> None:
    """What the peer confirmed is handed to the caller (who records it) before anything else is sent, so a crash
    mid-batch cannot lose the record of an acknowledged object; failures are not reported as delivered."""
    files = make_study(tmp_path, 4)
    statuses = [StoreStatus.SUCCESS, StoreStatus.COERCION_OF_DATA_ELEMENTS, StoreStatus.CANNOT_UNDERSTAND, 0x0000]
    reported: list[str | None] = []
    reported_when_received: list[int] = []

    def respond(event: evt.Event) -> int:
        reported_when_received.append(len(reported))
        return int(statuses[len(scp.received) - 1])

    with StoreRecorder("STORESCP", respond=respond) as scp:
        report = send_files(
            _destination(scp.port, "STORESCP"), files, NODE_AET,
            on_delivered=lambda result: reported.append(result.sop_instance_uid),
        )  # fmt: skip

    assert [f.outcome for f in report.files] == [
        Outcome.DELIVERED, Outcome.DELIVERED, Outcome.REJECTED, Outcome.DELIVERED,
    ]  # fmt: skip
    assert reported == [report.files[i].sop_instance_uid for i in (0, 1, 3)]
    # The peer saw the n-th C-STORE only after every acknowledged object before it had been reported.
    assert reported_when_received == [0, 1, 2, 2]


def test_a_failing_delivery_callback_stops_the_batch_and_propagates(tmp_path: Path) -> None:
    files = make_study(tmp_path, 4)

    def record(result: FileResult) -> None:
        if len(scp.received) == 2:
            raise RuntimeError("job store gone")

    with StoreRecorder("STORESCP") as scp, pytest.raises(RuntimeError, match="job store gone"):
        send_files(_destination(scp.port, "STORESCP"), files, NODE_AET, on_delivered=record)
    assert len(scp.received) == 2  # nothing was sent that could not be recorded
