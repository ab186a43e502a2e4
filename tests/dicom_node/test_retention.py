"""Retention: a study's files go ``retention.keep_days`` after the node is done with it; its history stays.

The clock is passed in (``apply_retention(now=...)``) instead of waited for; the studies arrive over real
associations and the files are checked on disk.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml
from typer.testing import CliRunner

from dicom_node.cli import app
from dicom_node.jobs.schema import JobState, StudyState
from dicom_node.node import Node
from dicom_node.work.steps import outbox_dir, results_dir
from tests.conftest import free_port, make_study
from tests.dicom_node.test_intake import storescu, wait_for
from tests.dicom_node.test_store import scrape

pytestmark = pytest.mark.integration

DAY = 86400.0


def finished_study(node: Node, files: list[Path], end: JobState = JobState.DELIVERED) -> tuple[str, int]:
    """Send ``files``, wait for the study's job and take it to ``end``, with a result and an outbox on disk."""
    assert storescu(node, files).returncode == 0
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    job = wait_for(lambda: [j for j in node.store.list_jobs() if j.study_uid == study_uid])[0]  # type: ignore[index]
    store = node.store
    assert store.transition(job.id, JobState.RUNNING, expect=[JobState.QUEUED], owner="test:1", lease_until=0)
    if end is JobState.DELIVERED:
        assert store.transition(job.id, JobState.SUCCEEDED, expect=[JobState.RUNNING])
        assert store.transition(job.id, JobState.DELIVERED, expect=[JobState.SUCCEEDED])
    else:
        assert store.transition(job.id, end, expect=[JobState.RUNNING], error="the model gave up")
    for folder in (results_dir(node.settings.data_dir, job.id), outbox_dir(node.settings.data_dir, job.id)):
        folder.mkdir(parents=True)
        (folder / "object.dcm").write_bytes(b"result")
    return study_uid, job.id


def test_a_finished_study_is_removed_after_keep_days_and_its_history_stays(
    running_node: Callable[..., Node], tmp_path: Path, store_section: dict[str, Any]
) -> None:
    metrics = free_port()
    node = running_node(retention={"keep_days": 7}, node={"metrics_port": metrics}, **store_section)
    study_uid, job_id = finished_study(node, make_study(tmp_path / "s", 3))
    other = make_study(tmp_path / "other", 1)  # a second study, still in work: untouched
    assert storescu(node, other).returncode == 0
    now = time.time()

    assert node.apply_retention(now=now + 6 * DAY) == 0
    assert len(list((node.spool.root / study_uid).rglob("*.dcm"))) == 3

    assert node.apply_retention(now=now + 8 * DAY) == 1
    assert not (node.spool.root / study_uid).exists(), "the study's files and folders are gone"
    assert not results_dir(node.settings.data_dir, job_id).exists()
    assert not outbox_dir(node.settings.data_dir, job_id).exists()
    assert node.store.study_instances(study_uid) == []
    assert node.store.study_state(study_uid) is StudyState.PURGED
    job = node.store.job(job_id)
    assert job is not None and job.state is JobState.DELIVERED
    purged = [e for e in node.store.job_events(job_id) if e["kind"] == "purged"]
    assert len(purged) == 1 and purged[0]["detail"].startswith("3 instance(s)")
    assert len(list(node.spool.root.rglob("*.dcm"))) == 1  # the other study's instance
    assert node.apply_retention(now=now + 9 * DAY) == 0  # nothing twice
    assert 'dicom_node_studies{state="purged"} 1.0' in scrape(metrics)


def test_studies_still_in_work_or_recently_finished_are_kept(
    running_node: Callable[..., Node], tmp_path: Path
) -> None:
    node = running_node(retention={"keep_days": 1}, study={"stable_seconds": 600, "max_wait_seconds": 3600})
    receiving = make_study(tmp_path / "receiving", 1)  # its stable time is far off: still receiving
    assert storescu(node, receiving).returncode == 0
    now = time.time()
    assert node.apply_retention(now=now + 30 * DAY) == 0
    assert node.store.study_instances(str(pydicom.dcmread(receiving[0]).StudyInstanceUID))

    node = running_node(retention={"keep_days": 1})
    queued = make_study(tmp_path / "queued", 1)
    assert storescu(node, queued).returncode == 0
    wait_for(lambda: node.store.list_jobs())
    assert node.apply_retention(now=now + 30 * DAY) == 0, "a queued job keeps its study"

    # A failed job retried after 5 days and failed again: keep_days counts from its last change, not from the
    # study's arrival.
    study_uid, job_id = finished_study(node, make_study(tmp_path / "failed", 1), end=JobState.FAILED)
    assert node.store.transition(job_id, JobState.QUEUED, expect=[JobState.FAILED], now=now + 5 * DAY)
    assert node.apply_retention(now=now + 30 * DAY) == 0, "a job queued again keeps its study"
    assert node.store.transition(job_id, JobState.FAILED, expect=[JobState.QUEUED], now=now + 5 * DAY)
    assert node.apply_retention(now=now + 5.5 * DAY) == 0
    assert node.store.study_state(study_uid) is StudyState.COMPLETE
    assert node.apply_retention(now=now + 6.5 * DAY) == 1
    assert node.store.study_state(study_uid) is StudyState.PURGED


def test_retention_is_off_unless_configured(running_node: Callable[..., Node], tmp_path: Path) -> None:
    node = running_node()
    study_uid, _ = finished_study(node, make_study(tmp_path / "s", 1))
    assert node.apply_retention(now=time.time() + 10_000 * DAY) == 0
    assert node.store.study_instances(study_uid)


def test_a_study_sent_again_after_retention_is_stored_and_runs_anew(
    running_node: Callable[..., Node], tmp_path: Path
) -> None:
    node = running_node(retention={"keep_days": 1}, study={"stable_seconds": 1})
    files = make_study(tmp_path / "s", 2)
    study_uid, job_id = finished_study(node, files)
    assert node.apply_retention(now=time.time() + 2 * DAY) == 1
    assert not (node.spool.root / study_uid).exists()

    # The PACS sends it again (a radiologist asks for another read): the same instances, into folders retention
    # removed, are stored and become run 2.
    duplicates = node.intake.counters.duplicates
    assert storescu(node, files).returncode == 0
    assert node.intake.counters.duplicates == duplicates, "not mistaken for re-sends of what was removed"
    assert len(list((node.spool.root / study_uid).rglob("*.dcm"))) == 2
    jobs = wait_for(lambda: [j for j in node.store.list_jobs() if j.study_uid == study_uid and j.id != job_id])
    assert isinstance(jobs, list) and jobs[0].run == 2 and jobs[0].state is JobState.QUEUED


def test_jobs_retry_of_a_removed_study_says_to_send_it_again(
    running_node: Callable[..., Node], tmp_path: Path
) -> None:
    node = running_node(retention={"keep_days": 1})
    _, job_id = finished_study(node, make_study(tmp_path / "s", 1), end=JobState.FAILED)
    assert node.apply_retention(now=time.time() + 2 * DAY) == 1
    config = tmp_path / "node.yaml"
    config.write_text(yaml.safe_dump({"node": {"data_dir": str(node.settings.node.data_dir)}}))
    refused = CliRunner().invoke(app, ["jobs", "retry", str(job_id), "--config", str(config)])
    said = " ".join(refused.output.split())  # as read, whatever the terminal's width
    assert refused.exit_code == 1
    assert "files were removed after retention.keep_days" in said and "send the study again" in said
    job = node.store.job(job_id)
    assert job is not None and job.state is JobState.FAILED
    config.write_text(yaml.safe_dump({"node": {"data_dir": str(node.settings.node.data_dir)},
                                      "retention": {"keep_days": 1}}))  # fmt: skip
    status = CliRunner().invoke(app, ["status", "--config", str(config)])
    said = " ".join(status.output.split())
    assert status.exit_code == 0 and "studies purged │ 1" in said
    assert "retention: study files removed 1 day(s) after their last job" in said


def test_a_file_that_cannot_be_deleted_holds_back_its_study_only(
    running_node: Callable[..., Node], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    node = running_node(retention={"keep_days": 1})
    stuck_uid, _ = finished_study(node, make_study(tmp_path / "stuck", 2))
    other_uid, _ = finished_study(node, make_study(tmp_path / "other", 1))
    locked = sorted((node.spool.root / stuck_uid).rglob("*.dcm"))[-1]
    if subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not allowed here (no CAP_LINUX_IMMUTABLE, or the file system lacks it)")
    try:
        assert node.apply_retention(now=time.time() + 2 * DAY) == 1
        assert node.store.study_state(other_uid) is StudyState.PURGED
        assert node.store.study_state(stuck_uid) is StudyState.COMPLETE  # nothing recorded for it
        assert len(node.store.study_instances(stuck_uid)) == 2
        assert "files not removed by retention" in caplog.text and "Operation not permitted" in caplog.text
    finally:
        subprocess.run(["chattr", "-i", str(locked)], check=True)
    assert node.apply_retention(now=time.time() + 2 * DAY) == 1  # the next pass
    assert not (node.spool.root / stuck_uid).exists()
    assert node.store.study_state(stuck_uid) is StudyState.PURGED


def test_a_large_study_goes_a_chunk_at_a_time_and_a_failed_chunk_resumes(
    running_node: Callable[..., Node], tmp_path: Path
) -> None:
    """The job store's write lock is held for one chunk of deletions at a time (SQLite's lock holds every
    writer); chunks already done stay done when a later one fails, and the next pass finishes the study."""
    node = running_node(retention={"keep_days": 1})
    study_uid, _ = finished_study(node, make_study(tmp_path / "s", 5))
    later = time.time() + 2 * DAY
    chunks: list[int] = []

    def remove_then_fail(paths: list[str]) -> None:
        if len(chunks) == 1:
            raise OSError(5, "Input/output error")
        chunks.append(len(paths))
        node.spool.remove(paths)

    with pytest.raises(OSError):
        node.store.purge_study(study_uid, DAY, remove_then_fail, now=later, chunk=2)
    assert chunks == [2]
    assert len(node.store.study_instances(study_uid)) == 3
    assert len(list((node.spool.root / study_uid).rglob("*.dcm"))) == 3  # records and files go together
    assert node.store.study_state(study_uid) is StudyState.COMPLETE

    purged = node.store.purge_study(study_uid, DAY, node.spool.remove, now=later, chunk=2)
    assert purged is not None and purged.instances == 3
    assert node.store.study_state(study_uid) is StudyState.PURGED
    assert not (node.spool.root / study_uid).exists()
