"""The export's one retry policy (``queue.retry``) and its one classification of what is worth retrying."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from celery.exceptions import Retry

from dicom_node.config import ConfigError, RetryPolicy, load_settings
from dicom_node.devtools.receiver import free_port
from dicom_node.export.outcome import (
    AssociationResult,
    AssociationState,
    FileResult,
    Outcome,
    SendReport,
    classify_association,
)
from dicom_node.jobs.schema import JobState
from dicom_node.work.celery_app import EXPORT_TASK, make_celery
from dicom_node.work.steps import WorkerContext
from tests.dicom_node.export_job import export_job


def _settings_file(tmp_path: Path, queue: dict[str, object]) -> Path:
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump({"node": {"data_dir": str(tmp_path / "var")}, "queue": queue}))
    return path


def test_default_policy_is_the_one_the_node_always_had() -> None:
    assert RetryPolicy().delays() == [5, 10, 20, 40, 80, 160, 300, 300]


def test_configured_retry_policy_is_read_from_the_file(tmp_path: Path) -> None:
    retry = {"base_seconds": 2, "cap_seconds": 10, "max_retries": 5}
    settings = load_settings(_settings_file(tmp_path, {"retry": retry}))
    assert settings.queue.retry.delays() == [2, 4, 8, 10, 10]
    assert settings.queue.retry.exhausted(5) and not settings.queue.retry.exhausted(4)


def test_legacy_max_retries_is_still_read_and_a_disagreement_is_refused(tmp_path: Path) -> None:
    settings = load_settings(_settings_file(tmp_path, {"max_retries": 3}))
    assert settings.queue.retry.max_retries == 3
    assert settings.queue.retry.base_seconds == 5
    with pytest.raises(ConfigError, match="disagree"):
        load_settings(_settings_file(tmp_path, {"max_retries": 3, "retry": {"max_retries": 4}}))


def test_export_task_waits_and_gives_up_as_the_settings_say(tmp_path: Path) -> None:
    """A PACS that is down (nothing listens on its port): the export task asks Celery for the configured wait, and
    fails the job once the configured retries are spent."""
    destination = {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": free_port(), "timeout": 5}
    job = export_job(tmp_path, destination, 1, queue={"retry": {"base_seconds": 3, "cap_seconds": 7, "max_retries": 3}})
    ctx = WorkerContext(job.settings)
    app = make_celery(job.settings, ctx)
    task = app.tasks[EXPORT_TASK]
    assert task.max_retries == 3
    try:
        waits = []
        for retries in range(3):
            task.push_request(id=f"export-{retries}", args=[job.job_id], retries=retries, called_directly=False)
            try:
                with pytest.raises(Retry) as raised:
                    task.run(job.job_id)
            finally:
                task.pop_request()
            waits.append(raised.value.when)
        assert waits == [3, 6, 7]
        record = ctx.store.job(job.job_id)
        assert record is not None and record.state is JobState.SUCCEEDED and "attempt 3" in (record.error or "")

        task.push_request(id="export-3", args=[job.job_id], retries=3, called_directly=False)
        try:
            task.run(job.job_id)  # the retries are spent: no Retry, the job fails
        finally:
            task.pop_request()
        record = ctx.store.job(job.job_id)
        assert record is not None and record.state is JobState.FAILED
        assert "gave up after 4 attempts" in (record.error or "")
    finally:
        ctx.store.close()


@pytest.mark.parametrize("state", list(AssociationState))
def test_an_association_fails_for_good_only_on_a_configuration_error(state: AssociationState) -> None:
    permanent = state in (AssociationState.REJECTED, AssociationState.NO_CONTEXTS, AssociationState.TLS_FAILED)
    assert classify_association(state) is (Outcome.REJECTED if permanent else Outcome.TRANSIENT)
    assert state.permanent is permanent


def test_a_batch_is_rejected_when_its_association_failed_for_good(tmp_path: Path) -> None:
    def report(state: AssociationState) -> SendReport:
        failed = FileResult(tmp_path / "a.dcm", "1.2.3", "1.2.4", Outcome.TRANSIENT, None, "", "no answer")
        return SendReport("pacs", "PACS@host:104", [AssociationResult(state, "why", 0.1)], [failed])

    assert report(AssociationState.REFUSED).outcome is Outcome.TRANSIENT
    assert report(AssociationState.REJECTED).outcome is Outcome.REJECTED
