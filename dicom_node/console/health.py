"""Liveness and readiness of the node, for orchestrators and the console's overview.

``/healthz``: the process answers. ``/readyz``: the node can take and run work: the job store answers, the spool is
writable with free space above ``node.min_free_disk_mb``, the broker can be reached, and at least one inference
worker's heartbeat is recent (:mod:`dicom_node.work.heartbeat`). Each check says why it fails, in words.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from dicom_node.config import Settings
from dicom_node.jobs.store import JobStore, describe_error
from dicom_node.work.heartbeat import WorkerInfo, live_workers
from dicom_node.work.queues import INFERENCE_QUEUE

__all__ = ["Check", "Readiness", "broker_check", "readiness"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class Readiness:
    checks: list[Check]
    workers: list[WorkerInfo]
    free_bytes: int | None

    @property
    def ready(self) -> bool:
        return all(c.ok for c in self.checks)

    def as_dict(self) -> dict[str, object]:
        return {
            "ready": self.ready,
            "checks": {c.name: {"ok": c.ok, "detail": c.detail} for c in self.checks},
        }


def _store_check(store: JobStore) -> Check:
    try:
        store.ping()
    except Exception as exc:  # any database error means "not reachable now"
        return Check("job_store", False, f"job store unreachable: {describe_error(exc)}")
    return Check("job_store", True, "answers")


def _spool_check(spool_root: Path, min_free_mb: int) -> tuple[Check, int | None]:
    try:
        free = shutil.disk_usage(spool_root).free
        probe = spool_root / f".ready-{uuid.uuid4().hex}"
        with open(probe, "wb") as f:
            f.write(b"ok")
        os.unlink(probe)
    except OSError as exc:
        return Check("spool", False, f"spool {spool_root} not writable: {exc.strerror or exc}"), None
    floor = min_free_mb * 1024 * 1024
    if free < floor:
        low = f"{free / 2**20:.0f} MB free, below node.min_free_disk_mb ({min_free_mb} MB)"
        return Check("spool", False, low), free
    return Check("spool", True, f"{free / 2**30:.1f} GiB free (floor {min_free_mb} MB)"), free


def broker_check(settings: Settings) -> Check:
    """Whether the broker can be reached: a connection to Redis, or the embedded broker's folder writable."""
    from dicom_node.work.celery_app import broker_settings

    try:
        url, options = broker_settings(settings)
    except OSError as exc:
        return Check("broker", False, f"embedded broker folder unusable: {exc}")
    if "data_folder_out" in options:
        folder = Path(options["data_folder_out"])
        if os.access(folder, os.W_OK | os.X_OK):
            return Check("broker", True, "embedded (folder writable)")
        return Check("broker", False, f"embedded broker folder {folder} not writable")
    from kombu import Connection

    try:
        with Connection(url, transport_options=options, connect_timeout=2) as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, timeout=2)
    except Exception as exc:  # kombu, redis and the OS each raise their own
        return Check("broker", False, f"broker unreachable: {type(exc).__name__}: {exc}")
    return Check("broker", True, "reachable")


def readiness(settings: Settings, store: JobStore, spool_root: Path) -> Readiness:
    checks = [_store_check(store)]
    spool, free = _spool_check(spool_root, settings.node.min_free_disk_mb)
    checks += [spool, broker_check(settings)]
    found: list[WorkerInfo] = []
    if checks[0].ok:
        try:
            found = live_workers(store, settings.queue.worker_heartbeat_seconds)
        except Exception as exc:  # the store went away since the first check
            checks.append(Check("inference_workers", False, f"cannot list workers: {describe_error(exc)}"))
        else:
            inference = [w for w in found if INFERENCE_QUEUE in w.queues]
            detail = f"{len(inference)} alive" if inference else "no inference worker has reported recently"
            checks.append(Check("inference_workers", bool(inference), detail))
    else:
        checks.append(Check("inference_workers", False, "unknown: the job store is unreachable"))
    return Readiness(checks, found, free)
