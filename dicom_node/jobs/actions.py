"""What an administrator may do to a job: retry it or cancel it. One definition, for the CLI and the console alike.

A retry keeps the job's run, so its result objects keep their UIDs and a PACS overwrites instead of duplicating
(DESIGN invariant 2). A refusal says why in words (:class:`ActionRefused`).
"""

from __future__ import annotations

from collections.abc import Sequence

from dicom_node.jobs.schema import JobState, StudyState
from dicom_node.jobs.store import JobStore

__all__ = ["CANCELLABLE", "RETRYABLE", "ActionRefused", "cancel_job", "retry_job"]

RETRYABLE = (JobState.FAILED, JobState.CANCELLED)
CANCELLABLE = (JobState.QUEUED, JobState.RUNNING, JobState.SUCCEEDED)


class ActionRefused(ValueError):
    """The job cannot be moved: there is none, it is in another state, or its study's files are gone."""


def _move(store: JobStore, job_id: int, to: JobState, expect: Sequence[JobState], verb: str, detail: str) -> None:
    if not store.transition(job_id, to, expect=expect, detail=detail):
        job = store.job(job_id)
        allowed = ", ".join(s.value for s in expect)
        why = "no such job" if job is None else f"it is {job.state.value}; only {allowed} jobs can be"
        raise ActionRefused(f"cannot {verb} job {job_id}: {why}")


def retry_job(store: JobStore, job_id: int, by: str = "administrator") -> None:
    """Queue a failed or cancelled job again (same run, same result UIDs); the reconciler, or the caller's
    dispatcher, hands it to the queue. ``by`` names who asked, in the job's history."""
    job = store.job(job_id)
    if job is not None and store.study_state(job.study_uid) is StudyState.PURGED:
        raise ActionRefused(
            f"cannot retry job {job_id}: its study's files were removed after retention.keep_days; send the study "
            "again from the PACS (it then runs as a new run)"
        )
    _move(store, job_id, JobState.QUEUED, RETRYABLE, "retry", f"retried by {by}")


def cancel_job(store: JobStore, job_id: int, by: str = "administrator") -> None:
    """Cancel a job that has not been delivered yet; ``by`` names who asked, in the job's history."""
    _move(store, job_id, JobState.CANCELLED, CANCELLABLE, "cancel", f"cancelled by {by}")
