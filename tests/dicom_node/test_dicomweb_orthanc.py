"""A DICOMweb destination against a real Orthanc with its DICOMweb plugin (Debian ``orthanc-dicomweb``), through
the export task as a worker runs it: delivery into the study, an outage, wrong credentials, and ``echo``."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml
from celery.exceptions import Retry
from typer.testing import CliRunner

from dicom_node.cli import app
from dicom_node.jobs.schema import JobState
from dicom_node.work.celery_app import EXPORT_TASK, make_celery
from dicom_node.work.steps import WorkerContext, outbox_dir
from tests.dicom_node.export_job import ExportJob, export_job, wait_until
from tests.orthanc import Orthanc, orthanc_factory, requires_orthanc_dicomweb  # noqa: F401  (fixture)

pytestmark = [pytest.mark.integration, requires_orthanc_dicomweb]

runner = CliRunner()
USER, PASSWORD = "ainode", "correct-horse-battery"


def _destination(pacs: Orthanc, password: str = PASSWORD, **settings: Any) -> dict[str, Any]:
    return {
        "name": "vna", "kind": "dicomweb", "url": pacs.dicomweb_url, "auth": "basic", "username": USER,
        "password": password, "timeout": 10, **settings,
    }  # fmt: skip


def _run_export_task(job: ExportJob, retries: int) -> None:
    """One run of the export task, as a worker's ``retries``-th attempt; a Retry it asks for propagates."""
    ctx = WorkerContext(job.settings)
    task = make_celery(job.settings, ctx).tasks[EXPORT_TASK]
    task.push_request(id=f"export-{retries}", args=[job.job_id], retries=retries, called_directly=False)
    try:
        task.run(job.job_id)
    finally:
        task.pop_request()
        ctx.store.close()


def _job_state(job: ExportJob) -> tuple[JobState, str]:
    ctx = WorkerContext(job.settings)
    try:
        record = ctx.store.job(job.job_id)
        assert record is not None
        return record.state, record.error or ""
    finally:
        ctx.store.close()


def _study_uid(job: ExportJob) -> str:
    first = next(outbox_dir(job.settings.node.data_dir, job.job_id).glob("*.dcm"))
    return str(pydicom.dcmread(first, stop_before_pixels=True).StudyInstanceUID)


def test_results_arrive_in_the_study_once_each_across_an_orthanc_outage(
    tmp_path: Path, orthanc_factory: Callable[..., Orthanc]  # noqa: F811
) -> None:
    pacs = orthanc_factory(dicomweb=True, users={USER: PASSWORD})
    job = export_job(
        tmp_path, _destination(pacs, objects_per_request=2), 5,
        queue={"retry": {"base_seconds": 1, "cap_seconds": 1, "max_retries": 3}},
    )  # fmt: skip
    pacs.stop()  # the archive is down when the export starts

    with pytest.raises(Retry):
        _run_export_task(job, retries=0)
    state, error = _job_state(job)
    assert state is JobState.SUCCEEDED, "a server that is down is a retry, never a failed job"
    assert f"attempt 1: vna: connection refused by {pacs.dicomweb_url}" in error

    pacs.start()  # same ports, same storage
    _run_export_task(job, retries=1)
    state, error = _job_state(job)
    assert state is JobState.DELIVERED, error

    study = pacs.find_study(_study_uid(job))
    assert study is not None, "the results are in their study"
    in_study = {str(i["MainDicomTags"]["SOPInstanceUID"]) for i in pacs.study_instances(study)}
    assert in_study == set(job.uids)
    assert pacs.instance_count() == len(job.uids)
    assert pacs.new_instance_events() == len(job.uids), "each object was stored once"

    _run_export_task(job, retries=0)  # a duplicated message: nothing left to send
    assert pacs.new_instance_events() == len(job.uids)


#: Orthanc callbacks for the outage test: every instance Orthanc receives is written to its log, and while the hold
#: file exists the second STOW-RS request is held (its objects not yet read) until Orthanc is killed.
WATCH_AND_HOLD = """
local posts = 0
function ReceivedInstanceFilter(dicom, origin, info)
  print('ReceivedInstance ' .. dicom.SOPInstanceUID)
  return true
end
function IncomingHttpRequestFilter(method, uri, ip, username, headers)
  if method == 'POST' and string.find(uri, '/dicom-web/studies', 1, true) then
    posts = posts + 1
    local hold = io.open(HOLD_FILE, 'r')
    if hold ~= nil and posts == 2 then
      hold:close()
      print('HoldingRequest ' .. posts)
      os.execute('sleep 60')
    elseif hold ~= nil then
      hold:close()
    end
  end
  return true
end
"""


def _received(pacs: Orthanc) -> Counter[str]:
    """How often Orthanc received each SOP Instance UID (ReceivedInstanceFilter's log lines), across restarts."""
    lines = pacs.log_path.read_text(errors="replace").splitlines()
    return Counter(line.split("ReceivedInstance ", 1)[1].strip() for line in lines if "ReceivedInstance " in line)


def test_orthanc_killed_mid_export_gets_the_rest_once_when_back(
    tmp_path: Path, orthanc_factory: Callable[..., Orthanc]  # noqa: F811
) -> None:
    """Orthanc dies while it holds the second STOW-RS request of an export worker: the first request's objects
    are on record as delivered, the worker's attempt ends as a retry, and when Orthanc is back the retry sends
    only the objects it had not stored; Orthanc receives each object exactly once."""
    hold = tmp_path / "hold"
    hold.write_text("held")
    callbacks = f"HOLD_FILE = {json.dumps(str(hold))}\n{WATCH_AND_HOLD}"
    pacs = orthanc_factory(dicomweb=True, users={USER: PASSWORD}, lua=callbacks)
    job = export_job(tmp_path, _destination(pacs, objects_per_request=2, timeout=60), 6)
    log = tmp_path / "worker.log"
    worker = job.run_export_process(log)
    try:
        wait_until(lambda: "HoldingRequest 2" in pacs.log_path.read_text(errors="replace"), 60, "the held request")
        pacs.kill()  # a crash, mid-request
        assert worker.wait(timeout=60) != 0  # the attempt ends short of delivered: a retry is due
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    said = log.read_text(errors="replace")
    assert "TransientError" in said and f"vna: connection to {pacs.dicomweb_url} lost before the answer" in said
    state, _error = _job_state(job)
    assert state is JobState.SUCCEEDED
    ctx = WorkerContext(job.settings)
    try:
        on_record = {r["sop_instance_uid"] for r in ctx.store.job_results(job.job_id) if r["delivered_to"] == ["vna"]}
    finally:
        ctx.store.close()
    assert on_record == set(job.uids[:2]), "the first request's objects were recorded as its answer arrived"

    hold.unlink()
    pacs.start()
    _run_export_task(job, retries=1)
    assert _job_state(job)[0] is JobState.DELIVERED
    assert _received(pacs) == {uid: 1 for uid in job.uids}, "every object arrived once"
    assert pacs.instance_count() == len(job.uids)


def test_a_wrong_password_fails_the_job_with_a_reason_jobs_show_prints(
    tmp_path: Path, orthanc_factory: Callable[..., Orthanc]  # noqa: F811
) -> None:
    pacs = orthanc_factory(dicomweb=True, users={USER: PASSWORD})
    job = export_job(tmp_path, _destination(pacs, password="wrong-password-123"), 2)

    _run_export_task(job, retries=0)  # no Retry: retrying cannot fix credentials
    state, _error = _job_state(job)
    assert state is JobState.FAILED
    assert pacs.instance_count() == 0

    shown = runner.invoke(app, ["jobs", "show", str(job.job_id), "--config", str(job.config_path)])
    said = " ".join(shown.output.split())  # the console wraps long lines
    assert shown.exit_code == 0, shown.output
    assert (
        f"reason: export failed: vna: 401 Unauthorized from {pacs.dicomweb_url}: check the credentials "
        f"(auth: basic, username '{USER}')"
    ) in said
    assert "wrong-password-123" not in shown.output and PASSWORD not in shown.output


def test_echo_asks_orthanc_by_qido_rs(tmp_path: Path, orthanc_factory: Callable[..., Orthanc]) -> None:  # noqa: F811
    pacs = orthanc_factory(dicomweb=True, users={USER: PASSWORD})
    config = tmp_path / "node.yaml"
    locked_out = {**_destination(pacs, "not-the-password-77"), "name": "locked-out"}
    config.write_text(
        yaml.safe_dump({"node": {"data_dir": str(tmp_path / "var")}, "destinations": [_destination(pacs), locked_out]})
    )
    ok = runner.invoke(app, ["echo", "vna", "--config", str(config)])
    assert ok.exit_code == 0, ok.output
    assert f"vna ({pacs.dicomweb_url}): QIDO-RS ok, round trip" in " ".join(ok.output.split())
    refused = runner.invoke(app, ["echo", "locked-out", "--config", str(config)])
    said = " ".join(refused.output.split())
    assert refused.exit_code == 1 and "QIDO-RS failed (rejected): 401 Unauthorized" in said
    assert "check the credentials" in said and "not-the-password-77" not in said
    pacs.stop()
    down = runner.invoke(app, ["echo", "vna", "--config", str(config)])
    assert down.exit_code == 1 and "QIDO-RS failed (refused): connection refused" in " ".join(down.output.split())
