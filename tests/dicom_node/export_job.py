"""A job waiting for its export, made straight in the job store: ``n`` result objects in its outbox, one
destination. For tests and benchmarks of the export alone (no model, no intake), and a worker process that runs
``run_export`` the way the export task does, to be killed mid-send."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import yaml
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import evt
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]
from pynetdicom.status import Status

from dicom_node.config import Settings, load_settings
from dicom_node.devtools.receiver import free_port
from dicom_node.jobs.schema import InstanceRecord, JobState
from dicom_node.jobs.store import JobStore
from dicom_node.work.steps import outbox_dir
from tests.conftest import make_study

EXPORT_SCRIPT = """
import sys
from dicom_node.config import load_settings
from dicom_node.work.steps import WorkerContext, run_export
run_export(WorkerContext(load_settings(sys.argv[1])), int(sys.argv[2]))
"""


@dataclass
class ExportJob:
    config_path: Path
    settings: Settings
    job_id: int
    uids: list[str]  # the result objects' SOP Instance UIDs, in the order they are sent

    def run_export_process(self, log: Path) -> subprocess.Popen[bytes]:
        """``run_export`` of the job in a process of its own (a worker), its output in ``log``."""
        with log.open("ab") as out:
            return subprocess.Popen(
                [sys.executable, "-c", EXPORT_SCRIPT, str(self.config_path), str(self.job_id)],
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip


def queued_job(store: JobStore, source: Path, destinations: list[str]) -> int:
    """A complete study of one instance (``source``, left where it is) and its job, queued and never enqueued."""
    study_uid = generate_uid()
    store.record_instance(
        InstanceRecord(
            sop_instance_uid=generate_uid(), study_uid=study_uid, series_uid=generate_uid(),
            sop_class_uid=CTImageStorage, transfer_syntax=ExplicitVRLittleEndian, modality="CT", body_part="",
            study_description="", series_description="", calling_ae="TEST", path=str(source),
            size=source.stat().st_size,
        )
    )  # fmt: skip
    job_id = store.complete_study(study_uid, rule="test", destinations=destinations)
    assert job_id is not None
    return job_id


def export_job(
    tmp_path: Path, destination: dict[str, Any], count: int, queue: dict[str, Any] | None = None
) -> ExportJob:
    """A job in state ``succeeded`` whose ``count`` result objects (synthetic CT instances) wait in the outbox; its
    configuration (``queue`` laid over the queue section) in ``tmp_path/node.yaml``."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    config_path = tmp_path / "node.yaml"
    config = {
        "node": {"port": free_port(), "bind": "127.0.0.1", "data_dir": str(tmp_path / "var")},
        "queue": {"start_workers": False, **(queue or {})},
        "destinations": [destination],
    }
    config_path.write_text(yaml.safe_dump(config))
    settings = load_settings(config_path)
    store = JobStore(settings.store_url)
    try:
        job_id = queued_job(store, make_study(tmp_path / "source", 1)[0], [destination["name"]])
        assert store.transition(job_id, JobState.RUNNING, expect=[JobState.QUEUED], owner="test", lease_until=0)
        assert store.transition(job_id, JobState.SUCCEEDED, expect=[JobState.RUNNING], result_path="unused")
        job = store.job(job_id)
        assert job is not None
        outbox = outbox_dir(settings.node.data_dir, job_id)
        files = make_study(outbox, count)
        uids = [str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in files]
        store.record_results(job_id, [(uid, "sc", str(path)) for uid, path in zip(uids, files, strict=True)])
    finally:
        store.close()
    return ExportJob(config_path, settings, job_id, uids)


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.05)


class HeldStore:
    """A PACS's C-STORE answer (``StoreRecorder(respond=...)``) that holds the ``nth`` object it receives unanswered
    until :meth:`release` (at most 60 s): a sender is then mid-send, for as long as a test needs."""

    def __init__(self, nth: int) -> None:
        self.nth = nth
        self.holding = threading.Event()
        self._released = threading.Event()
        self._lock = threading.Lock()
        self._count = 0

    def respond(self, event: evt.Event) -> int:
        with self._lock:
            self._count += 1
            hold = self._count == self.nth
        if hold and not self._released.is_set():
            self.holding.set()
            self._released.wait(60)
        return int(Status.SUCCESS)

    def release(self) -> None:
        self._released.set()

    def wait_held(self, worker: subprocess.Popen[bytes], log: Path) -> None:
        """Until the ``nth`` object is held; fails, with the end of the worker's log, if the worker ended first."""
        wait_until(lambda: self.holding.is_set() or worker.poll() is not None, 120, f"the C-STORE of object {self.nth}")
        assert self.holding.is_set(), log.read_text(errors="replace")[-3000:] if log.exists() else "no log"
