"""The hung-job watchdog of an inference worker: a job past ``queue.inference_time_limit`` restarts the worker.

An inference worker runs its studies on Celery's threads pool, which enforces no time limit, and every study's
images go through the one batcher thread that runs the model. A model call that never returns (a driver fault, a
runtime deadlock) would therefore stall every study the worker holds, with no error anywhere. The watchdog looks
at the jobs in flight a few times per limit; when one has run past the limit it

* logs the job, its study (hashed) and how long it ran, at CRITICAL;
* gives the worker's other jobs back to the queue (``running`` -> ``queued``, no redelivery counted: they did
  nothing wrong), so another worker takes them at once;
* leaves the hung job ``running`` under this process, which then exits with :data:`EXIT_HUNG`.

The node's reconciler finds the hung job's owner gone and queues it again, counting a redelivery; a job that hangs
every time fails after ``queue.max_redeliveries`` with a reason saying so (:mod:`dicom_node.jobs.lease`). The
worker is restarted by its supervisor: the node's own, systemd, or the container's restart policy.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

from dicom_node.jobs.schema import JobState
from dicom_node.jobs.store import JobStore

__all__ = ["EXIT_HUNG", "HungJobWatchdog", "overdue"]

log = logging.getLogger(__name__)

#: The exit status of a worker stopped by the watchdog (EX_SOFTWARE): its supervisor restarts it.
EXIT_HUNG = 70


def overdue(in_flight: dict[int, float], limit: float, now: float) -> list[tuple[int, float]]:
    """(job id, seconds running) of the jobs in flight longer than ``limit`` seconds, longest first."""
    late = [(job_id, now - started) for job_id, started in list(in_flight.items()) if now - started > limit]
    return sorted(late, key=lambda item: -item[1])


class HungJobWatchdog:
    """Watches ``in_flight`` (job id -> start time, kept by the worker's steps) and stops the worker when a job
    runs past ``limit`` seconds; ``exit`` is :func:`os._exit` outside the tests of this module. ``store`` gives the
    job store when it is first needed (a worker starts while the database is away, and waits for it)."""

    def __init__(self, store: Callable[[], JobStore], in_flight: dict[int, float], limit: float,
                 study_of: Callable[[int], str] = str, exit: Callable[[int], None] = os._exit) -> None:
        self.store = store
        self.in_flight = in_flight
        self.limit = limit
        self.period = min(15.0, max(0.2, limit / 4))
        self.study_of = study_of
        self.exit = exit
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="hung-job-watchdog", daemon=True)

    def start(self) -> HungJobWatchdog:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(self.period):
            if self.check(time.time()):
                return

    def check(self, now: float) -> bool:
        """Stop the worker if a job is overdue; True when it did."""
        late = overdue(self.in_flight, self.limit, now)
        if not late:
            return False
        job_id, seconds = late[0]
        log.critical(
            "job %d (study %s) has run for %.0f s, past queue.inference_time_limit=%.0f s: the model call is hung; "
            "this worker exits (status %d) for its supervisor to restart it, and the job is queued again (a job "
            "that hangs more than queue.max_redeliveries times fails with the reason)",
            job_id, self.study_of(job_id), seconds, self.limit, EXIT_HUNG,
        )
        for other in [j for j in list(self.in_flight) if j != job_id]:
            try:
                given = self.store().transition(
                    other, JobState.QUEUED, expect=[JobState.RUNNING],
                    detail=f"given back: its worker stopped because job {job_id} hung",
                )
            except Exception as exc:  # the store is away: the reconciler finds the job's owner gone instead
                log.warning("job %d could not be given back (%s); the reconciler will queue it again", other, exc)
                continue
            if given:
                log.warning("job %d given back to the queue: its worker stops because job %d hung", other, job_id)
        for handler in logging.getLogger().handlers:
            handler.flush()
        self.exit(EXIT_HUNG)
        return True
