"""An export cut off mid-batch (the worker SIGKILLed while the PACS holds a C-STORE) resumes without resending
what the PACS had already acknowledged: delivery is on record object by object, not when a batch returns."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from pynetdicom import evt
from pynetdicom.status import Status

from dicom_node.jobs.schema import JobState
from dicom_node.jobs.store import JobStore
from dicom_node.work.steps import WorkerContext, run_export
from tests.dicom_node.export_job import export_job, wait_until
from tests.orthanc import StoreRecorder

pytestmark = pytest.mark.integration


def test_export_worker_killed_mid_batch_resends_only_what_the_pacs_did_not_acknowledge(tmp_path: Path) -> None:
    n, k = 6, 3
    holding = threading.Event()  # the PACS has the (k+1)-th object and has not answered yet
    release = threading.Event()

    def respond(event: evt.Event) -> int:
        if len(pacs.received) == k + 1 and not release.is_set():
            holding.set()
            release.wait(60)
        return int(Status.SUCCESS)

    with StoreRecorder("STORESCP", respond=respond) as pacs:
        destination = {"name": "pacs", "ae_title": "STORESCP", "host": "127.0.0.1", "port": pacs.port, "timeout": 60}
        job = export_job(tmp_path, destination, n)
        worker = job.run_export_process(tmp_path / "worker.log")
        try:
            wait_until(
                lambda: holding.is_set() or worker.poll() is not None, 120, "the worker's C-STORE of object k+1"
            )
            assert holding.is_set(), (tmp_path / "worker.log").read_text(errors="replace")[-3000:]
        finally:
            worker.kill()  # SIGKILL, mid-batch: no chance to record anything more
            worker.wait()
            release.set()
        first_run = pacs.sop_instance_uids()
        assert len(first_run) == k + 1

        store = JobStore(job.settings.store_url)
        try:
            on_record = {r["sop_instance_uid"] for r in store.job_results(job.job_id) if "pacs" in r["delivered_to"]}
            assert on_record == set(first_run[:k]), "every object the PACS acknowledged is on record"

            ctx = WorkerContext(job.settings)  # the task, redelivered to another worker
            try:
                run_export(ctx, job.job_id)
            finally:
                ctx.store.close()
            rerun = pacs.sop_instance_uids()[len(first_run) :]
            assert len(rerun) == n - k
            assert set(rerun) == set(job.uids) - set(first_run[:k])
            done = store.job(job.job_id)
            assert done is not None and done.state is JobState.DELIVERED
            assert all(r["delivered_to"] == ["pacs"] for r in store.job_results(job.job_id))
        finally:
            store.close()
