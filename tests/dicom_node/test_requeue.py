"""The broker check's rule, with a stand-in broker: a job counts as lost when two checks in a row miss its message
and it did not move in between. The real thing, with redis-server and workers, is in test_queue.py."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from dicom_node.config import Settings
from dicom_node.jobs.schema import JobRecord
from dicom_node.jobs.store import JobStore
from dicom_node.node import Node
from tests.conftest import make_study
from tests.dicom_node.export_job import queued_job


class Broker:
    """Holds the ids it is told to; ``submit`` records and holds the job."""

    def __init__(self) -> None:
        self.held: set[int] = set()
        self.submitted: list[int] = []
        self.store: JobStore | None = None
        self.up = True

    def submit(self, job: JobRecord) -> bool:
        if not self.up:
            return False
        self.submitted.append(job.id)
        self.held.add(job.id)
        assert self.store is not None
        self.store.mark_enqueued(job.id)
        return True

    def queued_job_ids(self) -> set[int] | None:
        return set(self.held) if self.up else None


def test_a_message_missed_by_two_checks_in_a_row_is_sent_again_once(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    broker = Broker()
    node = Node(make_settings(), dispatcher=broker)
    broker.store = node.store
    try:
        moved = queued_job(node.store, make_study(tmp_path / "a", 1)[0], [])
        lost = queued_job(node.store, make_study(tmp_path / "b", 1)[0], [])
        kept = queued_job(node.store, make_study(tmp_path / "c", 1)[0], [])
        assert node.reconcile() == 3 and broker.submitted == [moved, lost, kept]
        broker.held = {kept}  # Redis restarted: two messages gone (or in a worker's hands for a moment)
        broker.submitted.clear()

        assert node.requeue_lost() == 0  # one miss is not enough
        job = node.store.job(moved)
        assert job is not None and job.enqueued_at is not None
        node.store.mark_enqueued(moved, now=job.enqueued_at + 1)  # it moved between the checks: a miss counts anew
        assert node.requeue_lost() == 1 and broker.submitted == [lost]
        assert node.requeue_lost() == 1 and broker.submitted == [lost, moved]  # missed twice since it moved
        assert node.requeue_lost() == 0 and broker.submitted == [lost, moved]  # held again: nothing more

        broker.held.clear()
        broker.up = False  # the broker cannot tell: nothing is decided
        assert node.requeue_lost() == 0 and node.requeue_lost() == 0 and broker.submitted == [lost, moved]
        broker.up = True
        assert node.requeue_lost() == 0  # misses count again from the first check the broker answers
        assert node.requeue_lost() == 3 and sorted(broker.submitted[2:]) == sorted([moved, lost, kept])
    finally:
        node.store.close()

