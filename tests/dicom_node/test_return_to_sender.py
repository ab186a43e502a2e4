"""Results back to the AE that sent the study (``kind: sender``): two PACS with their own AE titles send a study
each with dcmtk's storescu; the node runs the demo model and each PACS (a real receiving SCP) gets back only its own
study's results. A sender missing from ``known_aes`` fails the job for good, naming the AE title and the key."""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest

from dicom_node.config import ConfigError, load_settings
from dicom_node.devtools.receiver import Receiver
from dicom_node.export.destinations import send
from dicom_node.export.outcome import Outcome
from dicom_node.jobs.schema import JobRecord, JobState
from dicom_node.node import Node
from dicom_node.work.celery_app import EXPORT_TASK, make_celery
from dicom_node.work.steps import WorkerContext, run_export, run_inference
from inference.engine import Engine
from tests.conftest import make_study
from tests.dicom_node.test_intake import storescu, wait_for
from tests.orthanc import StoreRecorder

pytestmark = pytest.mark.integration


@pytest.fixture
def pacs_a() -> Iterator[Receiver]:
    receiver = Receiver("PACS_A").start()
    yield receiver
    receiver.stop()


@pytest.fixture
def pacs_b() -> Iterator[Receiver]:
    receiver = Receiver("PACS_B").start()
    yield receiver
    receiver.stop()


def _send(node: Node, tmp_path: Path, calling_ae: str) -> str:
    """A one-image study sent to the node by ``calling_ae`` (storescu); its Study Instance UID."""
    files = make_study(tmp_path / calling_ae, 1, template="RG1_UNCI.dcm")
    sent = storescu(node, files, "-aet", calling_ae)
    assert sent.returncode == 0, sent.stderr
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def _jobs(node: Node, count: int) -> dict[str, JobRecord]:
    """The node's jobs by study, once ``count`` studies are complete."""
    jobs = wait_for(lambda: (found := node.store.list_jobs()) and len(found) == count and found, timeout=30)
    assert isinstance(jobs, list)
    return {j.study_uid: j for j in jobs}


def _worker(node: Node) -> WorkerContext:
    model = node.settings.model
    return WorkerContext(node.settings, engine_factory=lambda: Engine.load(model, "cpu"))


def test_each_sender_gets_back_only_its_own_studys_results(
    running_node: Callable[..., Node], pacs_a: Receiver, pacs_b: Receiver, tmp_path: Path
) -> None:
    node = running_node(
        destinations=[{"name": "back", "kind": "sender"}],
        known_aes=[pacs_a.known_ae(), pacs_b.known_ae()],
    )
    study_a = _send(node, tmp_path, "PACS_A")
    study_b = _send(node, tmp_path, "PACS_B")
    jobs = _jobs(node, 2)
    ctx = _worker(node)
    for study in (study_a, study_b):
        assert run_inference(ctx, jobs[study].id)
        run_export(ctx, jobs[study].id)
        done = node.store.job(jobs[study].id)
        assert done is not None and done.state is JobState.DELIVERED, done

    for receiver, own, results in ((pacs_a, study_a, jobs[study_a]), (pacs_b, study_b, jobs[study_b])):
        objects = node.store.job_results(results.id)
        assert objects, "the job made result objects"
        assert set(receiver.received) == {o["sop_instance_uid"] for o in objects}, "its own results, and only them"
        assert set(receiver.studies.values()) == {own}
        assert all(n == 1 for n in receiver.received.values())
        assert all(o["delivered_to"] == ["back"] for o in objects)
        assert receiver.calling_aets == {node.settings.node.ae_title}


def test_a_sender_missing_from_known_aes_fails_the_job_naming_the_ae_and_the_key(
    running_node: Callable[..., Node], pacs_a: Receiver, tmp_path: Path
) -> None:
    node = running_node(destinations=[{"name": "back", "kind": "sender"}], known_aes=[pacs_a.known_ae()])
    study = _send(node, tmp_path, "PACS_C")
    job = _jobs(node, 1)[study]
    ctx = _worker(node)
    assert run_inference(ctx, job.id)
    task = make_celery(node.settings, ctx).tasks[EXPORT_TASK]
    task.push_request(id="export-0", args=[job.id], retries=0, called_directly=False)
    try:
        task.run(job.id)  # no Retry: an AE the configuration does not know stays unknown
    finally:
        task.pop_request()
    failed = node.store.job(job.id)
    assert failed is not None and failed.state is JobState.FAILED
    assert failed.error == (
        "export failed: back: the study was sent by AE title 'PACS_C', which is not in known_aes (listed: PACS_A): "
        "add {ae_title: PACS_C, host: ..., port: ...} to known_aes so that destination 'back' can return results to it"
    )
    assert not pacs_a.received


def test_known_aes_are_checked_when_the_configuration_loads() -> None:
    with pytest.raises(ConfigError, match=r"destination 'back' \(kind: sender\) .* known_aes, which is empty"):
        load_settings(None, {"destinations": [{"name": "back", "kind": "sender"}]})
    twice = {"ae_title": "PACS_A", "host": "127.0.0.1", "port": 104}
    with pytest.raises(ConfigError, match=r"known_aes\[\].ae_title must be unique, repeated: \['PACS_A'\]"):
        load_settings(None, {"known_aes": [twice, twice]})
    with pytest.raises(ConfigError, match=r"known_aes.0.ae_title: .*backslash"):
        load_settings(None, {"known_aes": [{**twice, "ae_title": "A\\B"}]})
    with pytest.raises(ConfigError, match=r"destinations.0: kind must be dimse \(the default\), dicomweb or sender"):
        load_settings(None, {"destinations": [{"name": "x", "kind": "smtp"}]})


def test_a_known_ae_with_tls_takes_its_results_over_dicom_tls(pki: Path, tmp_path: Path) -> None:
    """The ``known_aes`` entry carries the DIMSE destination's TLS settings: here mutual TLS, as a PACS that checks
    the node's certificate asks."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki / "pacs.pem", pki / "pacs.key")
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(pki / "ca.pem")
    files = make_study(tmp_path / "results", 2)
    with StoreRecorder("PACS_TLS", ssl_context=context) as pacs:
        settings = load_settings(None, {
            "destinations": [{"name": "back", "kind": "sender"}],
            "known_aes": [{
                "ae_title": "PACS_TLS", "host": "127.0.0.1", "port": pacs.port, "timeout": 5, "tls": True,
                "tls_ca_file": str(pki / "ca.pem"), "tls_cert_file": str(pki / "node.pem"),
                "tls_key_file": str(pki / "node.key"),
            }],
        })  # fmt: skip
        back = settings.destinations[0]
        report = send(back, files, settings, sender_ae="PACS_TLS")
        assert report.outcome is Outcome.DELIVERED, report.reason
        assert report.peer == f"PACS_TLS@127.0.0.1:{pacs.port}"
        assert len(pacs.received) == 2

        unknown = send(back, files, settings, sender_ae=None)
        assert unknown.outcome is Outcome.REJECTED
        assert "the study's calling AE title was not recorded at intake" in unknown.reason
        assert len(pacs.received) == 2
