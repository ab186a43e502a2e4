"""The node process: spool, job store, SCP, study assembler and reconciler, wired together.

DICOM has no end-of-study signal: a study is complete after ``study.stable_seconds`` without a new instance (or
``study.max_wait_seconds`` after its receive window opened). The assembler then applies the routing rules and
creates the study's job; the dispatcher hands the job to the queue.

On start-up the node reconciles (DESIGN invariants 1 and 3): spooled files that were never recorded are recorded,
and every job the store says is unfinished is handed to the dispatcher again.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Protocol

import pydicom
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node.config import Settings
from dicom_node.logs import uid_hash
from dicom_node.rules import select_rule
from dicom_node.scp import Intake, start_scp
from dicom_node.spool import InvalidUIDError, Spool, check_uid
from dicom_node.store import InstanceRecord, JobRecord, JobState, JobStore

__all__ = ["Dispatcher", "Node", "RecordingDispatcher"]

log = logging.getLogger(__name__)


class Dispatcher(Protocol):
    """Hands a job to whatever runs it (the Celery queue); must be idempotent per job id."""

    def submit(self, job: JobRecord) -> None: ...


class RecordingDispatcher:
    """Leaves jobs queued in the store: the node receives and assembles, and no worker runs them."""

    def __init__(self) -> None:
        self.submitted: list[int] = []

    def submit(self, job: JobRecord) -> None:
        self.submitted.append(job.id)
        log.info("job %d queued (study %s, run %d)", job.id, uid_hash(job.study_uid), job.run)


class Node:
    """One running node. ``start()`` returns once the SCP listens; ``stop()`` stops everything."""

    def __init__(self, settings: Settings, dispatcher: Dispatcher | None = None) -> None:
        self.settings = settings
        data_dir = settings.node.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        self.spool = Spool(data_dir / "spool", sync=settings.node.fsync)
        self.store = JobStore(settings.store_url)
        self.dispatcher: Dispatcher = dispatcher or RecordingDispatcher()
        self.intake = Intake(settings.node, settings.study, self.spool, self.store)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._server: ThreadedAssociationServer | None = None

    @property
    def port(self) -> int:
        assert self._server is not None, "node not started"
        return int(self._server.server_address[1])

    def start(self) -> None:
        self.recover_spool()
        self.reconcile()
        self._server = start_scp(self.intake)
        period = min(1.0, self.settings.study.stable_seconds / 4)
        t = threading.Thread(target=self._assembler_loop, args=(period,), name="assembler", daemon=True)
        t.start()
        self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
        for t in self._threads:
            t.join(timeout=5)
        self.store.close()

    # --- assembly ---------------------------------------------------------------------------------------------

    def _assembler_loop(self, period: float) -> None:
        while not self._stop.wait(period):
            try:
                self.assemble_ready()
            except Exception:  # process boundary: log once, try again next period
                log.exception("study assembly failed; retrying")

    def assemble_ready(self, now: float | None = None) -> list[int]:
        """Complete every study that has been stable long enough; returns the ids of the jobs created."""
        s = self.settings.study
        created = []
        for study_uid in self.store.studies_ready(s.stable_seconds, s.max_wait_seconds, now=now):
            job_id = self.complete_study(study_uid)
            if job_id is not None:
                created.append(job_id)
        return created

    def complete_study(self, study_uid: str) -> int | None:
        found = self.store.study_instances(study_uid)
        calling = found[-1].calling_ae if found else ""
        decision = select_rule(self.settings.rules, found, calling)
        rule = decision.rule
        if rule is None:
            job_id = self.store.complete_study(study_uid, rule=None, skip_reason=decision.reason)
            if job_id is not None:
                log.info("study %s skipped: %s", uid_hash(study_uid), decision.reason)
            return job_id
        destinations = rule.destinations or [d.name for d in self.settings.destinations]
        job_id = self.store.complete_study(
            study_uid,
            rule=rule.name,
            profile=rule.profile,
            language=rule.language,
            targets=rule.targets,
            outputs=rule.outputs,
            destinations=destinations,
        )
        if job_id is None:
            return None
        log.info(
            "study %s complete (%d instances): job %d, rule %s", uid_hash(study_uid), len(found), job_id, rule.name
        )
        job = self.store.job(job_id)
        assert job is not None
        self.dispatcher.submit(job)
        return job_id

    # --- recovery ---------------------------------------------------------------------------------------------

    def recover_spool(self) -> int:
        """Record spooled files that a crash left unrecorded (written, synced, but the record never committed).

        Their senders got no Success and may resend them; recording them now means they are processed once either
        way. Temporary files of interrupted writes are removed.
        """
        recovered = 0
        for tmp in self.spool.root.glob("*/*/.*.tmp"):
            tmp.unlink(missing_ok=True)
        for path in self.spool.root.glob("*/*/*.dcm"):
            sop_uid = path.stem
            if self.store.has_instance(sop_uid):
                continue
            try:
                record = self._record_from_file(path)
            except (InvalidUIDError, OSError, ValueError, AttributeError) as exc:
                log.error("spooled file %s cannot be recovered: %s", self.spool.relative(path), exc)
                continue
            self.store.record_instance(record, late_arrivals=self.settings.study.late_arrivals)
            recovered += 1
        if recovered:
            log.warning("recorded %d spooled instance(s) left unrecorded by an interrupted run", recovered)
        return recovered

    def _record_from_file(self, path: Path) -> InstanceRecord:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        return InstanceRecord(
            sop_instance_uid=check_uid(ds.SOPInstanceUID, "SOP Instance UID"),
            study_uid=check_uid(ds.StudyInstanceUID, "Study Instance UID"),
            series_uid=check_uid(ds.SeriesInstanceUID, "Series Instance UID"),
            sop_class_uid=str(ds.SOPClassUID),
            transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
            modality=str(ds.get("Modality", "")),
            body_part=str(ds.get("BodyPartExamined", "")),
            study_description=str(ds.get("StudyDescription", ""))[:128],
            series_description=str(ds.get("SeriesDescription", ""))[:128],
            calling_ae="",
            path=self.spool.relative(path),
            size=path.stat().st_size,
        )

    def reconcile(self) -> int:
        """Hand every unfinished job to the dispatcher again: the store decides what still has to run."""
        pending = self.store.unfinished_jobs()
        for job in sorted(pending, key=lambda j: j.id):
            if job.state is JobState.RUNNING:
                # Its worker is gone (the node restarted or the message was lost): it runs again from the start.
                self.store.transition(job.id, JobState.QUEUED, expect=[JobState.RUNNING], detail="reconciled")
                job = self.store.job(job.id) or job
            self.dispatcher.submit(job)
        if pending:
            log.info("reconciled %d unfinished job(s)", len(pending))
        return len(pending)

    def wait(self) -> None:
        while not self._stop.is_set():
            time.sleep(0.5)
