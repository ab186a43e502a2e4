"""When a running job counts as abandoned, and what happens to one redelivered too often: the one rule that the
worker claiming a job and the node's reconciler both apply.

A job is ``running`` under its worker's name (``host:pid``) until ``lease_until``; a ``succeeded`` job being
exported holds the same two columns (the export lease, :func:`dicom_node.work.steps.claim_export`). It is abandoned
when the lease has run out or its worker is a process on this host that no longer exists; it is then run again
(taken over by the worker that finds it, or queued again by the reconciler) and the redelivery counted. A job
abandoned more than ``queue.max_redeliveries`` times is failed, so a study that kills its worker (out of memory,
say) does not loop.
"""

from __future__ import annotations

import os
import socket

from dicom_node.jobs.schema import JobRecord, JobState
from dicom_node.jobs.store import JobStore

__all__ = ["fail_if_redelivered_too_often", "is_abandoned", "owner_gone", "process_host"]

#: The kernel's fixed inode number of the initial PID namespace (PROC_PID_INIT_INO): a process outside containers.
_INITIAL_PID_NAMESPACE = "pid:[4026531836]"


def process_host() -> str:
    """The ``host`` of a ``host:pid`` owner: the host name, plus the PID namespace inside a container.

    Containers on the host's network share its host name but each has its own process ids, so a pid is only
    checkable by a process in the same PID namespace: the node's container must not take a worker container's
    pid 7 for one of its own (and requeue a job that is running). Outside containers the owner stays ``host:pid``.
    """
    host = socket.gethostname()
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return host
    if namespace == _INITIAL_PID_NAMESPACE:
        return host
    return f"{host}~{namespace.removeprefix('pid:[').removesuffix(']')}"


def owner_gone(owner: str | None) -> bool:
    """True when ``owner`` (host:pid) is a process on this host (and in this PID namespace) that no longer exists."""
    if not owner or ":" not in owner:
        return False
    host, _, pid = owner.rpartition(":")
    if host != process_host() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def is_abandoned(job: JobRecord, now: float) -> bool:
    """Whether a ``running`` (or exporting) job's worker is gone: its lease ran out, or its process on this host no
    longer exists."""
    expired = job.lease_until is not None and job.lease_until < now
    return expired or owner_gone(job.owner)


def fail_if_redelivered_too_often(store: JobStore, job: JobRecord, max_redeliveries: int) -> bool:
    """Fail an abandoned job whose next run would be one redelivery more than ``queue.max_redeliveries``; True when
    it was failed (or is no longer running), so the caller leaves it."""
    if job.redeliveries + 1 <= max_redeliveries:
        return False
    store.transition(
        job.id, JobState.FAILED, expect=[job.state],
        error=f"the worker stopped {job.redeliveries + 1} times while running this job (killed, out of memory or "
        f"over its time limit); more than queue.max_redeliveries={max_redeliveries}",
    )  # fmt: skip
    return True
