"""The export lease: one export worker at a time sends a job. A second export message for a job that a live worker
is sending is dropped; a killed export worker's job is queued again by the reconciler at once, not after
``queue.requeue_after_seconds``. Real worker processes (``run_export``) against a real pynetdicom Storage SCP."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import pytest

from dicom_node.jobs.schema import JobRecord, JobState
from dicom_node.jobs.store import JobStore
from dicom_node.node import Node
from dicom_node.work.steps import WorkerContext, claim_export
from tests.dicom_node.export_job import HeldStore, export_job, wait_until
from tests.orthanc import StoreRecorder

pytestmark = pytest.mark.integration


def _pacs(name: str, port: int) -> dict[str, object]:
    return {"name": name, "ae_title": "STORESCP", "host": "127.0.0.1", "port": port, "timeout": 60}


def _log(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:] if path.exists() else ""


def test_two_export_messages_at_once_send_each_object_once(tmp_path: Path) -> None:
    n = 4
    held = HeldStore(1)  # the PACS has the first worker's first object and has not answered yet

    with StoreRecorder("STORESCP", respond=held.respond) as pacs:
        job = export_job(tmp_path, _pacs("pacs", pacs.port), n)
        first = job.run_export_process(tmp_path / "first.log")
        second: subprocess.Popen[bytes] | None = None
        try:
            held.wait_held(first, tmp_path / "first.log")
            # The duplicate message, taken by a second export worker while the first is mid-send: it either drops
            # the message and ends, or (with nothing to stop it) sends objects of its own.
            second = job.run_export_process(tmp_path / "second.log")
            wait_until(
                lambda: second.poll() is not None or len(pacs.received) > 1, 120, "the second worker's decision"
            )
        finally:
            held.release()
            for worker in (first, second):
                if worker is not None and worker.wait(120) is None:
                    worker.kill()
        assert first.returncode == 0, _log(tmp_path / "first.log")
        assert second is not None and second.returncode == 0, _log(tmp_path / "second.log")

        assert sorted(pacs.sop_instance_uids()) == sorted(job.uids), "each object sent once"
        store = JobStore(job.settings.store_url)
        try:
            done = store.job(job.job_id)
            assert done is not None and done.state is JobState.DELIVERED and done.owner is None
            assert done.redeliveries == 0
            exports = [e for e in store.job_events(job.job_id) if e["kind"] == "exporting"]
            assert len(exports) == 1, exports
        finally:
            store.close()


class Broker:
    """Stands in for the Celery queue: records what the node submits, and marks it enqueued as the real one does."""

    def __init__(self, store: JobStore) -> None:
        self.store = store
        self.submitted: list[int] = []

    def submit(self, job: JobRecord) -> bool:
        self.submitted.append(job.id)
        self.store.mark_enqueued(job.id)
        return True

    def queued_job_ids(self) -> set[int] | None:
        return None


def test_export_worker_killed_mid_send_is_queued_again_at_once_and_finishes(tmp_path: Path) -> None:
    n, k = 6, 3
    held = HeldStore(k + 1)  # the PACS has the (k+1)-th object and has not answered yet

    with StoreRecorder("STORESCP", respond=held.respond) as pacs:
        # requeue_after_seconds as in production: only the dead owner can make the reconciler act now.
        job = export_job(tmp_path, _pacs("pacs", pacs.port), n, queue={"requeue_after_seconds": 600})
        store = JobStore(job.settings.store_url)
        store.mark_enqueued(job.job_id)  # the export message the dispatcher published, just now
        worker = job.run_export_process(tmp_path / "worker.log")
        try:
            held.wait_held(worker, tmp_path / "worker.log")
        finally:
            worker.kill()  # SIGKILL mid-send: its lease stays on record under a pid that no longer exists
            worker.wait()
            held.release()
        first_run = pacs.sop_instance_uids()
        assert len(first_run) == k + 1

        broker = Broker(store)
        node = Node(job.settings, dispatcher=broker)
        try:
            # One reconciler pass (every queue.reconcile_seconds) right after the kill queues the export again.
            assert node.reconcile() == 1 and broker.submitted == [job.job_id]
            assert node.reconcile() == 0, "queued again once"
            again = job.run_export_process(tmp_path / "again.log")  # a worker takes the new message
            assert again.wait(120) == 0, _log(tmp_path / "again.log")
        finally:
            node.store.close()

        try:
            rerun = pacs.sop_instance_uids()[len(first_run) :]
            assert sorted(rerun) == sorted(set(job.uids) - set(first_run[:k])), "the unacknowledged ones, once each"
            done = store.job(job.job_id)
            assert done is not None and done.state is JobState.DELIVERED and done.owner is None
            assert done.redeliveries == 1
            assert all(r["delivered_to"] == ["pacs"] for r in store.job_results(job.job_id))
        finally:
            store.close()


def test_a_live_lease_is_left_and_an_expired_one_taken_over(tmp_path: Path) -> None:
    """Owners on another host: only the lease's time tells (the pid check is for this host's processes)."""
    job = export_job(tmp_path, _pacs("pacs", 1), 1)
    store = JobStore(job.settings.store_url)
    ctx = WorkerContext(job.settings, fixed_worker_id=f"{socket.gethostname()}:1")
    try:
        elsewhere = "elsewhere.example:4242"
        now = time.time()
        assert store.hold_export(job.job_id, elsewhere, now + 60, held_by=None, detail="test")
        assert claim_export(ctx, job.job_id, 60) is None, "a live lease elsewhere: the message is dropped"
        held = store.job(job.job_id)
        assert held is not None and held.owner == elsewhere and held.redeliveries == 0

        assert store.hold_export(job.job_id, elsewhere, now - 1, held_by=elsewhere, detail="test")  # ran out
        taken = claim_export(ctx, job.job_id, 60)
        assert taken is not None and taken.owner == ctx.worker_id and taken.redeliveries == 1
        assert taken.state is JobState.SUCCEEDED
        assert claim_export(WorkerContext(job.settings, fixed_worker_id="other:2"), job.job_id, 60) is None
    finally:
        ctx.store.close()
        store.close()
