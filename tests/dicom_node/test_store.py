"""The job store on both backends (SQLite, and a real PostgreSQL server): the rules the node relies on when several
threads or processes write at once. PostgreSQL runs transactions side by side where SQLite serialises them, so each
race here is one that only row locks or a retry keep right there."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import select, update

from dicom_node.jobs.schema import InstanceRecord, JobState, StudyState
from dicom_node.jobs.store import JobStore, StoreUnavailable
from tests.conftest import free_port, make_study
from tests.dicom_node.test_intake import storescu, wait_for
from tests.postgres import PostgresServer, postgres_bin


def record(study: str, n: int) -> InstanceRecord:
    return InstanceRecord(
        sop_instance_uid=f"{study}.{n}",
        study_uid=study,
        series_uid=f"{study}.0",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax="1.2.840.10008.1.2.1",
        modality="CT",
        body_part="CHEST",
        study_description="CT chest",
        series_description="axial",
        calling_ae="MODALITY",
        path=f"{study}/{n}.dcm",
        size=1000 + n,
    )


def race(stores: list[JobStore], work: Callable[[JobStore, int], Any]) -> list[Any]:
    """Run ``work(store, i)`` on one thread per store, all released at the same moment; their results in order."""
    results: list[Any] = [None] * len(stores)
    errors: list[BaseException] = []
    start = threading.Barrier(len(stores))

    def run(i: int) -> None:
        start.wait()
        try:
            results[i] = work(stores[i], i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    return results


@pytest.fixture
def stores(store_url: str) -> Any:
    """Four stores on one database, each with its own engine, as four processes of the node would have."""
    opened = [JobStore(store_url) for _ in range(4)]
    yield opened
    for s in opened:
        s.close()


def test_record_is_idempotent_and_a_late_arrival_opens_a_new_run(store_url: str) -> None:
    store = JobStore(store_url)
    try:
        assert store.record_instance(record("1.2.3", 1))
        assert not store.record_instance(record("1.2.3", 1)), "a re-send is recorded once"
        assert store.known_instance("1.2.3.1") and not store.known_instance("1.2.3.9")
        job = store.complete_study("1.2.3", rule="r", profile="grounded_report")
        assert job is not None and store.complete_study("1.2.3", rule="r") is None

        assert store.record_instance(record("1.2.3", 2), late_arrivals="rerun")
        assert store.studies_ready(0, 3600, now=1e12) == ["1.2.3"]
        second = store.complete_study("1.2.3", rule="r")
        assert second is not None and store.job(second).run == 2  # type: ignore[union-attr]

        assert store.record_instance(record("1.2.3", 3), late_arrivals="ignore")
        assert store.studies_ready(0, 3600, now=1e12) == []
        assert runs_of(store, "1.2.3") == {"1.2.3.1": 1, "1.2.3.2": 2, "1.2.3.3": 2}
        kinds = [e["kind"] for e in store.job_events(second)]
        assert kinds.count("late_ignored") == 1
    finally:
        store.close()


def test_writers_of_one_study_each_record_every_instance_once(stores: list[JobStore]) -> None:
    """Four writers (a node with several SCP processes on one database) receive the same 30 instances in different
    orders: each instance is recorded by exactly one of them, and the study exists once."""
    uids = list(range(30))

    def write(store: JobStore, i: int) -> int:
        order = uids[:]
        random.Random(i).shuffle(order)
        return sum(store.record_instance(record("1.2.4", n)) for n in order)

    recorded = race(stores, write)
    assert sum(recorded) == 30, recorded
    assert len(stores[0].study_instances("1.2.4")) == 30
    assert stores[0].counts()["studies_receiving"] == 1


def test_one_assembler_closes_a_study(stores: list[JobStore]) -> None:
    for n in range(5):
        stores[0].record_instance(record("1.2.5", n))
    created = race(stores, lambda store, _i: store.complete_study("1.2.5", rule="r"))
    assert len([j for j in created if j is not None]) == 1, created
    assert len(stores[0].list_jobs()) == 1


def test_an_instance_recorded_while_its_study_closes_is_in_the_closed_run_or_the_next(
    stores: list[JobStore],
) -> None:
    """Instances arrive while an assembler closes the window. Once ``complete_study`` has returned, the run it
    closed holds a fixed set of instances (the worker reads them from then on); later ones re-open the study."""
    for rounds in range(15):
        study = f"1.2.6.{rounds}"
        stores[0].record_instance(record(study, 0))

        def step(store: JobStore, i: int, study: str = study) -> Any:
            if i > 0:
                return store.record_instance(record(study, i), late_arrivals="rerun")
            job_id = store.complete_study(study, rule="r")
            assert job_id is not None
            run = store.job(job_id).run  # type: ignore[union-attr]
            return run, {uid for uid, r in runs_of(store, study).items() if r == run}

        closed_run, seen_when_closed = race(stores, step)[0]
        now = {uid for uid, r in runs_of(stores[0], study).items() if r == closed_run}
        assert now == seen_when_closed, f"round {rounds}: {sorted(now - seen_when_closed)} joined a closed run"


def runs_of(store: JobStore, study: str) -> dict[str, int]:
    """SOP Instance UID -> the run it was recorded against."""
    from dicom_node.jobs.schema import instances

    with store.engine.connect() as conn:
        rows = conn.execute(
            select(instances.c.sop_instance_uid, instances.c.run).where(instances.c.study_uid == study)
        ).all()
    return {uid: run for uid, run in rows}


def test_only_one_worker_claims_a_queued_job(stores: list[JobStore]) -> None:
    stores[0].record_instance(record("1.2.7", 0))
    job_id = stores[0].complete_study("1.2.7", rule="r")
    assert job_id is not None
    won = race(
        stores,
        lambda store, i: store.transition(job_id, JobState.RUNNING, expect=[JobState.QUEUED], owner=f"w{i}"),
    )
    assert won.count(True) == 1, won
    job = stores[0].job(job_id)
    assert job is not None and job.owner == f"w{won.index(True)}"


def test_deliveries_to_two_destinations_are_both_kept(stores: list[JobStore]) -> None:
    """Two export workers send the same objects to two destinations at once; neither overwrites the other's mark."""
    stores[0].record_instance(record("1.2.8", 0))
    job_id = stores[0].complete_study("1.2.8", rule="r")
    assert job_id is not None
    objects = [(f"1.2.8.9.{n}", "SR", f"out/{n}.dcm") for n in range(40)]
    stores[0].record_results(job_id, objects)

    def deliver(store: JobStore, i: int) -> None:
        for uid, _kind, _path in objects:
            store.mark_delivered(uid, f"pacs{i}")

    race(stores, deliver)
    marks = {o["sop_instance_uid"]: o["delivered_to"] for o in stores[0].job_results(job_id)}
    assert all(m == ["pacs0", "pacs1", "pacs2", "pacs3"] for m in marks.values()), marks


def test_studies_and_events_round_trip(store_url: str) -> None:
    store = JobStore(store_url)
    try:
        store.record_instance(record("1.2.9", 0), now=100.0)
        assert store.studies_ready(30, 3600, now=120.0) == []
        assert store.studies_ready(30, 3600, now=131.0) == ["1.2.9"]
        job_id = store.complete_study("1.2.9", rule=None, skip_reason="no rule matched: MR", now=140.0)
        assert job_id is not None
        job = store.job(job_id)
        assert job is not None and job.state is JobState.SKIPPED and job.error == "no rule matched: MR"
        assert [j.id for j in store.list_jobs(["skipped"])] == [job_id]
        assert store.counts()["jobs_skipped"] == 1
        assert StudyState.RECEIVING.value not in {e["kind"] for e in store.job_events(job_id)}
    finally:
        store.close()


def test_an_unreachable_database_is_named_without_its_password() -> None:
    port = free_port()  # nothing listens there
    with pytest.raises(StoreUnavailable) as caught:
        JobStore(f"postgresql+psycopg://node:s3cret@127.0.0.1:{port}/jobs")
    message = str(caught.value)
    assert f"127.0.0.1:{port}/jobs" in message and "cannot be opened" in message
    assert "s3cret" not in message and "refused" in message.lower()


@pytest.mark.integration
def test_node_on_postgresql_answers_failure_while_the_database_is_down_then_resumes(
    running_node: Callable[..., Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Invariant 1 with the store on another server: no Success while an instance cannot be recorded; once the
    database is back the re-sent instance is accepted, and the study runs once."""
    bindir = postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (make test installs Debian's postgresql)")
    server = PostgresServer(bindir).start()
    try:
        metrics = free_port()
        node = running_node(store={"url": server.new_database()}, node={"metrics_port": metrics})
        first, second = make_study(tmp_path / "s", 2)
        assert storescu(node, [first]).returncode == 0
        assert "dicom_node_job_store_up 1.0" in scrape(metrics)
        server.stop_server()
        refused = storescu(node, [second], "-v")
        said = refused.stdout + refused.stderr
        assert refused.returncode != 0 and "Refused: OutOfResources" in said, said
        assert "job store unavailable: connection failed" in caplog.text
        during = scrape(metrics)  # the scrape still answers, with what the SCP did
        assert "dicom_node_job_store_up 0.0" in during
        assert 'dicom_node_instances_total{outcome="failed"} 1.0' in during
        time.sleep(1.5)  # the assembler meets the outage too
        server.start_server()
        assert storescu(node, [second]).returncode == 0
        jobs = wait_for(lambda: node.store.list_jobs(), timeout=30)
        assert len(jobs) == 1 and len(node.store.study_instances(jobs[0].study_uid)) == 2  # type: ignore[index]
        assert "study assembly failed" in caplog.text and "study assembly works again" in caplog.text
        assert "dicom_node_job_store_up 1.0" in scrape(metrics)
    finally:
        server.stop()


def scrape(port: int) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        return str(answer.read().decode())


def test_a_resend_or_a_restart_starts_a_receiving_study_s_stable_timer_again(store_url: str) -> None:
    store = JobStore(store_url)
    try:
        store.record_instance(record("1.3.1", 0), now=100.0)
        assert store.extend_window("1.3.1", now=150.0)  # a re-sent instance
        assert not store.extend_window("1.3.9", now=150.0)  # no such study
        store.extend_window("1.3.1", now=120.0)  # an older clock never moves the timer back
        assert store.studies_ready(30, 3600, now=179.0) == []
        assert store.studies_ready(30, 3600, now=181.0) == ["1.3.1"]

        assert store.restart_receive_windows(now=500.0) == 1  # the node starts again
        assert store.studies_ready(30, 3600, now=529.0) == []
        assert store.studies_ready(30, 3600, now=531.0) == ["1.3.1"]
        assert store.studies_ready(30, 300, now=510.0) == ["1.3.1"], "max_wait still counts from the first instance"

        assert store.complete_study("1.3.1", rule="r") is not None
        assert not store.extend_window("1.3.1", now=600.0), "a re-send does not re-open a study that ran"
        assert store.restart_receive_windows(now=700.0) == 0
        assert store.studies_ready(0, 3600, now=800.0) == []
    finally:
        store.close()


def test_node_restarts_the_stable_timer_of_studies_it_was_receiving_and_resends_extend_it(
    make_settings: Callable[..., Any], tmp_path: Path
) -> None:
    """A node that stopped mid-study does not complete the study at start-up on the strength of its own downtime,
    and a PACS re-sending the instances already stored keeps the study open: both ran the study twice (a partial
    run, then a late-arrival run) when the re-send reached the new instances after stable_seconds."""
    from dicom_node.jobs.schema import studies
    from dicom_node.node import Node
    from tests.conftest import RecordingDispatcher

    settings = make_settings(study={"stable_seconds": 30})
    first, second = make_study(tmp_path / "s", 2)
    study_uid = str(pydicom.dcmread(first, stop_before_pixels=True).StudyInstanceUID)

    def last_received(store: JobStore) -> float:
        with store.engine.connect() as conn:
            return float(
                conn.execute(
                    select(studies.c.last_received_at).where(studies.c.study_uid == study_uid)
                ).scalar_one()
            )

    node = Node(settings, dispatcher=RecordingDispatcher())
    node.start()
    try:
        assert storescu(node, [first]).returncode == 0
        stored_at = last_received(node.store)
        time.sleep(0.05)
        assert storescu(node, [first]).returncode == 0  # a re-send
        assert last_received(node.store) > stored_at
    finally:
        node.stop()

    # The node was down for a while (as far as the store can tell: its last instance is old).
    store = JobStore(settings.store_url)
    with store.engine.begin() as conn:
        conn.execute(update(studies).values(last_received_at=time.time() - 3600))
    store.close()
    started = time.time()
    node = Node(settings, dispatcher=RecordingDispatcher())
    node.start()
    try:
        assert last_received(node.store) >= started
        assert node.assemble_ready() == [] and node.store.list_jobs() == []
        assert storescu(node, [second]).returncode == 0
        assert len(node.store.study_instances(study_uid)) == 2
    finally:
        node.stop()
