"""An export cut off mid-batch (the worker SIGKILLed while the PACS holds a C-STORE) resumes without resending
what the PACS had already acknowledged: delivery is on record object by object, not when a batch returns."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_node.jobs.schema import JobState
from dicom_node.jobs.store import JobStore
from dicom_node.work.steps import WorkerContext, run_export
from tests.dicom_node.export_job import HeldStore, export_job
from tests.orthanc import StoreRecorder

pytestmark = pytest.mark.integration


def test_export_worker_killed_mid_batch_resends_only_what_the_pacs_did_not_acknowledge(tmp_path: Path) -> None:
    n, k = 6, 3
    held = HeldStore(k + 1)  # the PACS has the (k+1)-th object and has not answered yet

    with StoreRecorder("STORESCP", respond=held.respond) as pacs:
        destination = {"name": "pacs", "ae_title": "STORESCP", "host": "127.0.0.1", "port": pacs.port, "timeout": 60}
        job = export_job(tmp_path, destination, n)
        worker = job.run_export_process(tmp_path / "worker.log")
        try:
            held.wait_held(worker, tmp_path / "worker.log")
        finally:
            worker.kill()  # SIGKILL, mid-batch: no chance to record anything more
            worker.wait()
            held.release()
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
