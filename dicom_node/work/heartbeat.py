"""Which workers are alive: each worker process writes a heartbeat row in the job store (``workers``), the node
reads them (the console's overview, ``/readyz``). The store is shared by every host, the broker may not be (the
embedded broker has no remote control), so the store is where the node finds workers on any host.

A worker is alive while its row is younger than three heartbeat periods (``queue.worker_heartbeat_seconds``); a
worker that stops cleanly removes its row.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import delete, insert, select, update

from dicom_node.jobs.schema import workers
from dicom_node.jobs.store import JobStore, describe_error

__all__ = ["Heartbeat", "WorkerInfo", "live_workers"]

log = logging.getLogger(__name__)

#: A worker whose last heartbeat is older than this many periods counts as gone.
MISSED_BEATS = 3


@dataclass(frozen=True)
class WorkerInfo:
    name: str
    host: str
    queues: list[str]
    device: str
    model: str
    started_at: float
    seen_at: float
    activity: str = ""  # what it is doing: jobs in flight, its last batch
    metrics_url: str = ""  # where its Prometheus metrics are served ("" when off)


class Heartbeat:
    """Writes one worker's row every ``period`` seconds from a daemon thread, until :meth:`stop`.

    ``store`` is called at the first beat (the job store may be unreachable when the worker starts: the heartbeat
    then tries again each period). ``activity`` says, at each beat, what the worker is doing.
    """

    def __init__(
        self, store: Callable[[], JobStore], name: str, queues: list[str], device: str, model: str, period: float,
        activity: Callable[[], str] | None = None, metrics_url: str = "",
    ) -> None:
        self._make_store = store
        self._store: JobStore | None = None
        self.name = name
        self.queues = queues
        self.device = device
        self.model = model
        self.period = period
        self.activity = activity
        self.metrics_url = metrics_url
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self._started_at = time.time()

    @property
    def store(self) -> JobStore:
        if self._store is None:
            store = self._store = self._make_store()
            # A pool process forked later (Celery's prefork replaces dead ones) must not touch this process's database
            # connections: it forgets them without closing them.
            os.register_at_fork(after_in_child=lambda: store.engine.dispose(close=False))
        return self._store

    def beat(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        doing = self.activity() if self.activity is not None else ""
        with self.store.engine.begin() as conn:
            changed = conn.execute(
                update(workers).where(workers.c.name == self.name).values(seen_at=now, activity=doing)
            ).rowcount
            if not changed:
                conn.execute(
                    insert(workers).values(
                        name=self.name, host=socket.gethostname(), queues=",".join(self.queues),
                        device=self.device, model=self.model, activity=doing, metrics_url=self.metrics_url,
                        started_at=self._started_at, seen_at=now,
                    )
                )

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def _run(self) -> None:
        failing = False
        while True:
            try:
                self.beat()
                if failing:
                    log.warning("worker heartbeat written again")
                failing = False
            except Exception as exc:  # the job store is down: the worker is still alive, try again next period
                if not failing:
                    log.warning("worker heartbeat not written: %s", describe_error(exc))
                failing = True
            if self._stop.wait(self.period):
                return

    def stop(self) -> None:
        self._stop.set()
        if self._store is None:
            return
        try:
            with self.store.engine.begin() as conn:
                conn.execute(delete(workers).where(workers.c.name == self.name))
        except Exception as exc:  # the row then ages out
            log.warning("worker heartbeat row not removed: %s", describe_error(exc))


def live_workers(store: JobStore, period: float, now: float | None = None) -> list[WorkerInfo]:
    """The workers whose heartbeat is younger than :data:`MISSED_BEATS` periods; raises when the store is down."""
    now = time.time() if now is None else now
    with store.engine.connect() as conn:
        rows = conn.execute(
            select(workers).where(workers.c.seen_at >= now - MISSED_BEATS * period).order_by(workers.c.name)
        ).all()
    return [
        WorkerInfo(
            name=r.name, host=r.host, queues=[q for q in r.queues.split(",") if q], device=r.device, model=r.model,
            started_at=r.started_at, seen_at=r.seen_at, activity=r.activity or "", metrics_url=r.metrics_url or "",
        )
        for r in rows
    ]
