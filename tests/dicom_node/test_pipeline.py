"""The job's steps without Celery: claim, inference, outbox, export, with a real model and a real receiver."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import generate_uid

from dicom_node.devtools.receiver import Receiver
from dicom_node.jobs.schema import InstanceRecord, JobState
from dicom_node.jobs.store import is_unreachable
from dicom_node.node import Node
from dicom_node.work.steps import PermanentError, TransientError, WorkerContext, claim_job, run_export, run_inference
from inference.engine import Engine
from tests.conftest import make_study
from tests.dicom_node.test_intake import storescu, wait_for
from tests.inference.tiny_models import build_qwen2_5_vl
from tests.postgres import PostgresServer, postgres_bin

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_qwen2_5_vl(tmp_path_factory.mktemp("model") / "tiny-qwen2_5_vl")


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.stop()


def model_section(path: Path, tokens: int = 24) -> dict[str, object]:
    return {"family": "qwen2_5_vl", "path": str(path), "max_new_tokens": tokens}


def queued_job(node: Node, files: list[Path]) -> int:
    assert storescu(node, files).returncode == 0
    jobs = wait_for(lambda: node.store.list_jobs())
    assert isinstance(jobs, list) and len(jobs) == 1
    return jobs[0].id


def context(node: Node) -> WorkerContext:
    model = node.settings.model
    return WorkerContext(node.settings, engine_factory=lambda: Engine.load(model, "cpu"))


def test_job_runs_inference_then_delivers_each_object_once(
    running_node: Callable[..., Node], tiny_model: Path, receiver: Receiver, tmp_path: Path
) -> None:
    node = running_node(model=model_section(tiny_model), destinations=[receiver.destination()])
    job_id = queued_job(node, make_study(tmp_path / "s", 2, template="RG1_UNCI.dcm"))
    ctx = context(node)

    assert run_inference(ctx, job_id) is True
    job = node.store.job(job_id)
    assert job is not None and job.state is JobState.SUCCEEDED and job.attempts == 1
    assert job.result_path is not None and Path(job.result_path).exists()

    run_export(ctx, job_id)
    job = node.store.job(job_id)
    assert job is not None and job.state is JobState.DELIVERED, job
    objects = node.store.job_results(job_id)
    assert objects, "an SR is written even when the model found nothing"
    assert {o["sop_instance_uid"] for o in objects} == set(receiver.received)
    assert all(n == 1 for n in receiver.received.values())
    assert all(o["delivered_to"] == ["pacs"] for o in objects)
    assert "SR" in receiver.modalities.values()

    # A duplicated message finds nothing to do: nothing runs or is sent twice.
    assert run_inference(ctx, job_id) is False
    run_export(ctx, job_id)
    assert all(n == 1 for n in receiver.received.values())


def test_rebuilt_results_have_byte_identical_uids(
    running_node: Callable[..., Node], tiny_model: Path, tmp_path: Path
) -> None:
    node = running_node(model=model_section(tiny_model))
    job_id = queued_job(node, make_study(tmp_path / "s", 1, template="RG1_UNCI.dcm"))
    ctx = context(node)
    assert run_inference(ctx, job_id)
    job = node.store.job(job_id)
    assert job is not None
    from dicom_node.work.steps import _write_outbox

    first = _write_outbox(ctx, job)
    first_uids = {(uid, str(pydicom.dcmread(p).SeriesInstanceUID)) for uid, _k, p in first}
    for _uid, _kind, path in first:
        path.unlink()  # as if the outbox had been lost: the retry rebuilds it
    second = _write_outbox(ctx, job)
    second_uids = {(uid, str(pydicom.dcmread(p).SeriesInstanceUID)) for uid, _k, p in second}
    assert first_uids == second_uids


def test_poison_study_fails_fast_with_reason(
    running_node: Callable[..., Node], tiny_model: Path, tmp_path: Path
) -> None:
    node = running_node(model=model_section(tiny_model))
    source = make_study(tmp_path / "src", 1, template="RG1_UNCI.dcm")[0]
    ds = pydicom.dcmread(source)
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 200])  # a JPEG 2000 stream that cannot decode
    ds.file_meta.TransferSyntaxUID = pydicom.uid.JPEG2000Lossless
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    broken = tmp_path / "broken.dcm"
    ds.save_as(broken, enforce_file_format=True)
    assert storescu(node, [broken], "-xv").returncode == 0
    job_id = wait_for(lambda: node.store.list_jobs())[0].id  # type: ignore[index]

    assert run_inference(context(node), job_id) is False
    job = node.store.job(job_id)
    assert job is not None and job.state is JobState.FAILED and job.attempts == 1
    assert job.error is not None and job.error.startswith("unusable study:")


def test_a_study_of_two_patients_fails_its_export_for_good_without_patient_data(
    running_node: Callable[..., Node], tmp_path: Path
) -> None:
    """DESIGN invariant 10: one study, two Patient IDs. No object is built; the job's reason says what differs."""
    from sr_writer.findings import Language
    from tests.sr_writer.helpers import synthetic_result

    node = running_node(study={"stable_seconds": 2})
    files = make_study(tmp_path / "s", 2, template="RG1_UNCI.dcm")
    for path, patient in zip(files, ("SYNTH-PATIENT-A", "SYNTH-PATIENT-B"), strict=True):
        ds = pydicom.dcmread(path)
        ds.PatientID = patient
        ds.save_as(path, enforce_file_format=True)
    # Intake refuses the second patient's instance (test_hostile_peers); a study recorded before the node compared
    # patients at intake can still hold both, so the second is put in the spool and recorded as such a store has it.
    assert storescu(node, files[:1]).returncode == 0
    second = pydicom.dcmread(files[1], stop_before_pixels=True)
    spooled = node.spool.path_for(second.StudyInstanceUID, second.SeriesInstanceUID, second.SOPInstanceUID)
    shutil.copyfile(files[1], spooled)
    node.store.record_instance(
        InstanceRecord(
            sop_instance_uid=second.SOPInstanceUID, study_uid=second.StudyInstanceUID,
            series_uid=second.SeriesInstanceUID, sop_class_uid=second.SOPClassUID,
            transfer_syntax=second.file_meta.TransferSyntaxUID, modality=second.Modality, body_part="",
            study_description="", series_description="", calling_ae="STORESCU",
            path=node.spool.relative(spooled), size=spooled.stat().st_size,
        )
    )
    jobs = wait_for(lambda: node.store.list_jobs())
    assert isinstance(jobs, list) and len(jobs) == 1
    job_id = jobs[0].id
    # The model's part is not the subject: a result without findings, as a worker would have kept it.
    result = synthetic_result(pydicom.dcmread(files[0], stop_before_pixels=True), Language.ENGLISH, findings=[])
    kept = tmp_path / "result.json"
    kept.write_text(result.to_json(), encoding="utf-8")
    assert node.store.transition(job_id, JobState.SUCCEEDED, expect=[JobState.QUEUED], result_path=str(kept))

    ctx = context(node)
    with pytest.raises(PermanentError) as caught:
        run_export(ctx, job_id)
    reason = str(caught.value)
    assert "2 different Patient IDs among 2 sources (sources 0 vs 1)" in reason
    assert "SYNTH-PATIENT" not in reason
    job = node.store.job(job_id)
    assert job is not None and node.store.job_results(job_id) == []
    assert not ctx.outbox_dir(job).exists() or not any(ctx.outbox_dir(job).iterdir())


def test_export_outcomes_rejected_transient_then_delivered(
    running_node: Callable[..., Node], tiny_model: Path, tmp_path: Path
) -> None:
    refusing = Receiver(ae_title="REFUSE", status=0xC000).start()
    down = Receiver(ae_title="LATER")  # not started yet: the PACS is down
    try:
        node = running_node(
            model=model_section(tiny_model),
            destinations=[refusing.destination("refusing"), down.destination("later")],
            rules=[
                {"name": "r1", "match": {"calling_ae": ["A"]}, "destinations": ["refusing"]},
                {"name": "r2", "match": {"calling_ae": ["B"]}, "destinations": ["later"]},
            ],
        )
        ctx = context(node)
        assert storescu(node, make_study(tmp_path / "a", 1, "RG1_UNCI.dcm"), "-aet", "A").returncode == 0
        assert storescu(node, make_study(tmp_path / "b", 1, "RG1_UNCI.dcm"), "-aet", "B").returncode == 0
        jobs = wait_for(lambda: len(node.store.list_jobs()) == 2 and node.store.list_jobs())
        assert isinstance(jobs, list)
        by_rule = {j.rule: j.id for j in jobs}
        for job_id in by_rule.values():
            assert run_inference(ctx, job_id)

        with pytest.raises(PermanentError, match="0xC000"):
            run_export(ctx, by_rule["r1"])
        with pytest.raises(TransientError):
            run_export(ctx, by_rule["r2"])
        assert all(o["delivered_to"] == [] for o in node.store.job_results(by_rule["r2"]))

        down.start()
        run_export(ctx, by_rule["r2"])
        job = node.store.job(by_rule["r2"])
        assert job is not None and job.state is JobState.DELIVERED
        assert set(down.received) == {o["sop_instance_uid"] for o in node.store.job_results(by_rule["r2"])}
    finally:
        refusing.stop()
        down.stop()


def test_claim_drops_duplicates_takes_over_dead_workers_and_gives_up(
    running_node: Callable[..., Node], tmp_path: Path
) -> None:
    node = running_node(queue={"max_redeliveries": 1})
    job_id = queued_job(node, make_study(tmp_path / "s", 1))
    first = WorkerContext(node.settings, fixed_worker_id="gpu-host-a:101")
    second = WorkerContext(node.settings, fixed_worker_id="gpu-host-b:202")

    assert claim_job(first, job_id, lease_seconds=60) is not None
    assert claim_job(second, job_id, lease_seconds=60) is None  # running elsewhere, lease valid: duplicate

    node.store.transition(job_id, JobState.RUNNING, lease_until=time.time() - 1, owner="gpu-host-a:101")
    taken = claim_job(second, job_id, lease_seconds=60)
    assert taken is not None and taken.owner == "gpu-host-b:202" and taken.redeliveries == 1

    node.store.transition(job_id, JobState.RUNNING, lease_until=time.time() - 1, owner="gpu-host-b:202")
    assert claim_job(first, job_id, lease_seconds=60) is None
    job = node.store.job(job_id)
    assert job is not None and job.state is JobState.FAILED
    assert job.error is not None and "max_redeliveries=1" in job.error


def test_a_job_store_outage_during_inference_is_resumed_not_failed(
    running_node: Callable[..., Node], tiny_model: Path, tmp_path: Path
) -> None:
    """The database goes away while the model runs: the outcome cannot be recorded, and neither can a failure.
    The job stays running, this worker's; the task's retry resumes it at once (no lease to wait out, no
    redelivery counted) and it succeeds."""
    bindir = postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (make test installs Debian's postgresql)")
    server = PostgresServer(bindir).start()
    try:
        node = running_node(store={"url": server.new_database()}, model=model_section(tiny_model))
        job_id = queued_job(node, make_study(tmp_path / "s", 1, template="RG1_UNCI.dcm"))
        loaded = Engine.load(node.settings.model, "cpu")
        outages = [server.stop_server]

        class DatabaseGoesAway:
            """The real engine; the database server stops during the first study it runs."""

            def warm_up(self) -> None:
                loaded.warm_up()

            def run_study(self, *args: Any, **kwargs: Any) -> Any:
                while outages:
                    outages.pop()()
                return loaded.run_study(*args, **kwargs)

        ctx = WorkerContext(node.settings, engine_factory=lambda: cast(Engine, DatabaseGoesAway()))
        with pytest.raises(Exception) as caught:
            run_inference(ctx, job_id)
        assert is_unreachable(caught.value), caught.value
        assert ctx.interrupted == {job_id}
        server.start_server()
        job = node.store.job(job_id)
        assert job is not None and job.state is JobState.RUNNING and job.owner == ctx.worker_id

        other = WorkerContext(node.settings, fixed_worker_id="gpu-host-b:202")
        assert claim_job(other, job_id, 60) is None, "another worker still leaves it alone: its lease runs"

        assert run_inference(ctx, job_id) is True  # the retry
        job = node.store.job(job_id)
        assert job is not None and job.state is JobState.SUCCEEDED
        assert job.attempts == 2 and job.redeliveries == 0 and job.error is None
        assert ctx.interrupted == set()
    finally:
        server.stop()
