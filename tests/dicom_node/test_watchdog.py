"""The hung-job watchdog of an inference worker.

Unit tests of the rule (which job is overdue, what happens to the others) on a real job store; then, for real, a
`dicom-node worker` whose job outlives queue.inference_time_limit: the worker exits with the reason in its log, the
node queues the job again, and a job that hangs every time fails with a reason instead of holding a worker forever.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from dicom_node.jobs.schema import JobState
from dicom_node.jobs.store import JobStore
from dicom_node.work.watchdog import EXIT_HUNG, HungJobWatchdog, overdue
from tests.conftest import make_study
from tests.dicom_node import test_queue
from tests.dicom_node.test_intake import storescu
from tests.dicom_node.test_queue import Deployment, RedisServer
from tests.dicom_node.test_store import record

deploy = test_queue.deploy
redis = test_queue.redis


def test_overdue_lists_the_jobs_past_the_limit_longest_first() -> None:
    assert overdue({1: 100.0, 2: 50.0, 3: 95.0}, 10, now=110.0) == [(2, 60.0), (3, 15.0)]
    assert overdue({1: 100.0}, 10, now=105.0) == []


def _running(store: JobStore, study: str) -> int:
    assert store.record_instance(record(study, 1))
    job_id = store.complete_study(study, rule="rule", profile="grounded_report")
    assert job_id is not None
    assert store.transition(job_id, JobState.RUNNING, owner="host:1", lease_until=time.time() + 60)
    return job_id


def test_a_hung_job_stays_running_and_the_others_are_given_back(tmp_path: Path) -> None:
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    hung, other = _running(store, "1.2.3"), _running(store, "1.2.4")
    exits: list[int] = []
    watchdog = HungJobWatchdog(lambda: store, {hung: 0.0, other: 95.0}, limit=30, exit=exits.append)
    assert not watchdog.check(now=29.0)  # nothing past the limit yet
    assert watchdog.check(now=100.0)
    assert exits == [EXIT_HUNG]
    assert store.job(hung).state is JobState.RUNNING  # left to the reconciler, which counts the redelivery
    given = store.job(other)
    assert given.state is JobState.QUEUED and given.redeliveries == 0
    store.close()


@pytest.mark.integration
@pytest.mark.slow
def test_a_job_that_hangs_restarts_its_worker_and_fails_after_max_redeliveries(
    deploy: Callable[..., Deployment], redis: RedisServer, tmp_path: Path
) -> None:
    # The batcher waits 10 s for other images to join a batch that never fills: to the watchdog, a model call that
    # does not return within the 2 s limit.
    d = deploy(queue={"broker_url": redis.url, "inference_time_limit": 2, "max_redeliveries": 1},
               model={"family": "demo", "batch_wait_ms": 10000})
    first = d.start_worker("inference")
    node = d.start_node()
    assert storescu(node, make_study(tmp_path / "s", 1, "RG1_UNCI.dcm")).returncode == 0
    assert first.wait(timeout=120) == EXIT_HUNG
    log = next(tmp_path.glob("worker-0-*.log")).read_text(errors="replace")
    assert "past queue.inference_time_limit=2 s" in log and "hung" in log, log[-3000:]
    rerun = d.wait_jobs(lambda js: js[0].redeliveries == 1, timeout=60)  # queued again by the node
    assert rerun[0].state in (JobState.QUEUED, JobState.RUNNING)
    second = d.start_worker("inference")  # restarted, as a supervisor does
    assert second.wait(timeout=120) == EXIT_HUNG  # it hangs again
    jobs = d.wait_jobs(lambda js: js[0].state is JobState.FAILED, timeout=60)
    assert "over its time limit" in (jobs[0].error or ""), jobs[0].error
