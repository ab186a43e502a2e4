"""The Orthanc fixture behaves as the end-to-end tests need: a real PACS that auto-routes, and not our results."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from dicom_node.config import DestinationSettings
from dicom_node.export.outcome import AssociationState, Outcome
from dicom_node.export.scu import echo, send_files
from tests.corpus import corpus_file
from tests.orthanc import (
    NodeModality,
    Orthanc,
    StoreRecorder,
    orthanc_factory,  # noqa: F401 - a fixture
    parse_decision,
    requires_orthanc,
)

pytestmark = [requires_orthanc, pytest.mark.integration]

NODE_AET = "AINODE"


def _copy(source: Path, out: Path, *, study_uid: str | None = None, series_uid: str | None = None) -> Path:
    """A new instance made from ``source``: fresh SOP Instance UID, the given (or a new) series and study."""
    ds = pydicom.dcmread(source)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.save_as(out)
    return out


def _to_orthanc(pacs: Orthanc) -> DestinationSettings:
    return DestinationSettings(name="pacs", ae_title=pacs.aet, host="127.0.0.1", port=pacs.dicom_port, timeout=5)


@pytest.fixture(scope="module")
def node() -> Iterator[StoreRecorder]:
    with StoreRecorder(NODE_AET) as recorder:
        yield recorder


@pytest.fixture(scope="module")
def routing_pacs(tmp_path_factory: pytest.TempPathFactory, node: StoreRecorder) -> Iterator[Orthanc]:
    with Orthanc(
        tmp_path_factory.mktemp("orthanc"), node=NodeModality(NODE_AET, "127.0.0.1", node.port), stable_age=1
    ) as pacs:
        yield pacs


def _received_in_study(node: StoreRecorder, study_uid: str) -> list[str]:
    return [str(ds.SOPInstanceUID) for ds in node.received if ds.StudyInstanceUID == study_uid]


def test_orthanc_serves_uploads_over_rest_and_keeps_them_across_a_restart(
    orthanc_factory: Callable[..., Orthanc],  # noqa: F811 - the fixture imported above
    tmp_path: Path,
) -> None:
    pacs = orthanc_factory()
    stored = pacs.upload(corpus_file("RG1_UNCI.dcm"))
    assert pacs.studies() == [stored["ParentStudy"]]
    [series] = pacs.study_series(stored["ParentStudy"])
    [instance] = pacs.instances_of_series(series["ID"])
    downloaded = pydicom.dcmread(pacs.download_instance(instance["ID"], tmp_path))
    original = pydicom.dcmread(corpus_file("RG1_UNCI.dcm"))
    assert downloaded.SOPInstanceUID == original.SOPInstanceUID
    assert echo(_to_orthanc(pacs), NODE_AET).ok

    pacs.stop()  # outage: the port closes, senders see a refused connection
    assert not pacs.running
    refused = send_files(_to_orthanc(pacs), [corpus_file("693_UNCI.dcm")], NODE_AET)
    assert refused.outcome == Outcome.TRANSIENT
    assert refused.association is not None and refused.association.state == AssociationState.REFUSED

    pacs.start()  # same ports, same storage
    assert pacs.studies() == [stored["ParentStudy"]]
    assert send_files(_to_orthanc(pacs), [corpus_file("693_UNCI.dcm")], NODE_AET).outcome == Outcome.DELIVERED
    assert "Orthanc has started" in pacs.log_path.read_text(errors="replace")


def test_stable_study_is_routed_to_the_node_once_and_the_node_results_are_not_routed_back(
    routing_pacs: Orthanc, node: StoreRecorder, tmp_path: Path
) -> None:
    study_uid = generate_uid()
    series_uid = generate_uid()
    images = [
        _copy(corpus_file("693_UNCI.dcm"), tmp_path / f"ct{i}.dcm", study_uid=study_uid, series_uid=series_uid)
        for i in range(3)
    ]
    for image in images:
        routing_pacs.upload(image)
    study_id = routing_pacs.find_study(study_uid)
    assert study_id is not None

    decision = routing_pacs.wait_for_routing(study_id, lambda d: True)
    assert parse_decision(decision) == {"routed": 3, "from_node": 0, "already_routed": 0}
    sent = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in images}
    assert sorted(_received_in_study(node, study_uid)) == sorted(sent)
    assert set(node.calling_aets) == {routing_pacs.aet}

    # The node sends its result into the same study; the study becomes stable again; nothing is routed.
    result = _copy(corpus_file("693_UNCI.dcm"), tmp_path / "result.dcm", study_uid=study_uid)
    assert send_files(_to_orthanc(routing_pacs), [result], NODE_AET).outcome == Outcome.DELIVERED
    decision = routing_pacs.wait_for_routing(study_id, lambda d: "from_node=1" in d)
    assert parse_decision(decision) == {"routed": 0, "from_node": 1, "already_routed": 3}
    assert sorted(_received_in_study(node, study_uid)) == sorted(sent)  # each original exactly once


def test_study_that_came_from_the_node_is_not_routed(
    routing_pacs: Orthanc, node: StoreRecorder, tmp_path: Path
) -> None:
    study_uid = generate_uid()
    result = _copy(corpus_file("RG1_UNCI.dcm"), tmp_path / "result.dcm", study_uid=study_uid)
    assert send_files(_to_orthanc(routing_pacs), [result], NODE_AET).outcome == Outcome.DELIVERED
    study_id = routing_pacs.find_study(study_uid)
    assert study_id is not None

    decision = routing_pacs.wait_for_routing(study_id, lambda d: True)
    assert parse_decision(decision) == {"routed": 0, "from_node": 1, "already_routed": 0}
    assert _received_in_study(node, study_uid) == []


def test_study_from_another_modality_over_dicom_is_routed(
    routing_pacs: Orthanc, node: StoreRecorder, tmp_path: Path
) -> None:
    study_uid = generate_uid()
    image = _copy(corpus_file("MR2_UNCI.dcm"), tmp_path / "mr.dcm", study_uid=study_uid)
    assert send_files(_to_orthanc(routing_pacs), [image], "MODALITY").outcome == Outcome.DELIVERED
    study_id = routing_pacs.find_study(study_uid)
    assert study_id is not None

    decision = routing_pacs.wait_for_routing(study_id, lambda d: True)
    assert parse_decision(decision) == {"routed": 1, "from_node": 0, "already_routed": 0}
    assert len(_received_in_study(node, study_uid)) == 1


def test_orthanc_rejects_a_stable_age_below_its_one_second_unit(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="stable_age must be a whole number of seconds >= 1"):
        Orthanc(tmp_path, stable_age=0)
