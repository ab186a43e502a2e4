"""The node process: spool, job store, SCP, study assembler and reconciler, wired together.

DICOM has no end-of-study signal: a study is complete after ``study.stable_seconds`` without a new instance (or
``study.max_wait_seconds`` after its receive window opened). The assembler then applies the routing rules and
creates the study's job; the dispatcher hands the job to the queue.

On start-up the node reconciles (DESIGN invariants 1 and 3): spooled files that were never recorded are recorded,
and every job the store says is unfinished is handed to the dispatcher again. While it runs, the reconciler enqueues
what the broker did not take and what dead workers left, and the broker check (``queue.broker_check_seconds``)
enqueues again the jobs whose message Redis lost.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import pydicom
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node.config import Settings
from dicom_node.intake.handlers import Intake
from dicom_node.intake.server import start_scp
from dicom_node.intake.spool import InvalidUIDError, Spool, check_uid
from dicom_node.jobs.lease import fail_if_redelivered_too_often, is_abandoned
from dicom_node.jobs.rules import select_rule
from dicom_node.jobs.schema import InstanceRecord, JobRecord, JobState, Purged
from dicom_node.jobs.store import JobStore, PatientConflict, describe_error, is_unreachable
from dicom_node.logs import audit, uid_hash
from dicom_node.permissions import private_data_dir
from dicom_node.work.steps import outbox_dir, results_dir
from dicom_node.work.supervisor import WorkerSupervisor

if TYPE_CHECKING:
    from dicom_node.console.server import ConsoleServer
    from dicom_node.console.webhooks import Notifier

__all__ = ["Dispatcher", "Node"]

log = logging.getLogger(__name__)


class Dispatcher(Protocol):
    """Hands a job to whatever runs it (the Celery queue); must be idempotent per job id."""

    def submit(self, job: JobRecord) -> bool:
        """Hand the job over; False when that failed (logged with the reason): the job stays as the store has it,
        and the reconciler tries again. Never raises for the queue being unavailable."""
        ...

    def queued_job_ids(self) -> set[int] | None:
        """The ids of the jobs whose message the queue holds (waiting or being worked on); None: cannot tell."""
        ...


class Node:
    """One running node. ``start()`` returns once the SCP listens; ``stop()`` stops everything."""

    def __init__(
        self, settings: Settings, dispatcher: Dispatcher | None = None, config_path: Path | None = None
    ) -> None:
        self.settings = settings
        data_dir = settings.node.data_dir
        private_data_dir(data_dir)
        self.spool = Spool(data_dir / "spool", sync=settings.node.fsync)
        # The spool carries every fact of an intake record (the calling AE as an extended attribute), and
        # recover_spool() records any file whose record a power loss undid: so intake records need no WAL sync.
        self.store = JobStore(settings.store_url, intake_rebuildable=self.spool.carries_source)
        if not self.spool.carries_source:
            log.info("the spool's file system keeps no extended attributes: intake records are synced one by one")
        if dispatcher is None:
            from dicom_node.work.celery_app import CeleryDispatcher, make_celery

            dispatcher = CeleryDispatcher(make_celery(settings), self.store)
        self.dispatcher: Dispatcher = dispatcher
        start_workers = settings.queue.start_workers
        if start_workers is None:
            start_workers = settings.queue.broker_url == "embedded"
        self.workers = WorkerSupervisor(config_path, data_dir / "logs") if start_workers else None
        self.intake = Intake(settings.node, settings.study, self.spool, self.store)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._server: ThreadedAssociationServer | None = None
        #: Jobs whose message the last broker check did not find, with the ``enqueued_at`` it saw (see requeue_lost).
        self._missing: dict[int, float] = {}
        self.console: ConsoleServer | None = None
        self.notifier: Notifier | None = None

    @property
    def port(self) -> int:
        assert self._server is not None, "node not started"
        return int(self._server.server_address[1])

    def start(self) -> None:
        self.recover_spool()
        receiving = self.store.restart_receive_windows()
        if receiving:
            log.info("%d study(ies) were still receiving: their stable timers start again now", receiving)
        self.reconcile(startup=True)
        self._start_console()  # before the SCP: a console port in use stops the start with nothing listening yet
        self._server = start_scp(self.intake)
        if self.settings.node.metrics_port:
            from dicom_node.metrics import serve_metrics

            serve_metrics(self, self.settings.node.metrics_port, self.settings.node.bind)
        if self.workers is not None:
            self.workers.start()
        period = min(1.0, self.settings.study.stable_seconds / 4)
        loops: list[tuple[str, Callable[[float], None], float]] = [
            ("assembler", self._assembler_loop, period),
            ("reconciler", self._reconciler_loop, self.settings.queue.reconcile_seconds),
            ("broker-check", self._broker_check_loop, self.settings.queue.broker_check_seconds),
        ]
        if self.settings.retention.keep_days is not None:
            loops.append(("retention", self._retention_loop, self.settings.retention.check_seconds))
        for name, target, arg in loops:
            t = threading.Thread(target=target, args=(arg,), name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def _start_console(self) -> None:
        """The web console and API (``node.http_port``), and the webhooks that follow the job store's events."""
        from dicom_node.console.app import ConsoleContext
        from dicom_node.console.server import ConsoleServer
        from dicom_node.console.webhooks import Notifier

        ctx = ConsoleContext(self.settings, self.store, submit=self.dispatcher.submit)
        if self.settings.node.http_port:
            self.console = ConsoleServer(ctx)
        if self.settings.notifications.webhooks:
            self.notifier = Notifier(self.settings, self.store, self.console.url if self.console else "")
            ctx.notifier = self.notifier
            self.notifier.start()
        if self.console is not None:
            self.console.start()

    def stop(self) -> None:
        self._stop.set()
        if self.console is not None:
            self.console.stop()
        if self.notifier is not None:
            self.notifier.stop()
        if self._server is not None:
            self._server.shutdown()
        if self.workers is not None:
            self.workers.stop()
        for t in self._threads:
            t.join(timeout=5)
        self.store.close()

    # --- assembly ---------------------------------------------------------------------------------------------

    def _assembler_loop(self, period: float) -> None:
        self._repeat("study assembly", self.assemble_ready, period)

    def _reconciler_loop(self, period: float) -> None:
        self._repeat("reconciliation", self.reconcile, period)

    def _broker_check_loop(self, period: float) -> None:
        self._repeat("broker check", self.requeue_lost, period)

    def _retention_loop(self, period: float) -> None:
        self._repeat("retention", self.apply_retention, period)

    def apply_retention(self, now: float | None = None) -> int:
        """Remove the files of studies the node is done with (``retention.keep_days`` after their last instance
        and their last job's end): spooled instances, inference results, outbox. Their jobs, history and the UIDs
        of the node's own results stay in the job store, so ``jobs show`` still tells what happened, and results
        routed back are still recognised. Returns the number of studies removed."""
        keep = self.settings.retention.keep_days
        if keep is None:
            return 0
        keep_seconds = keep * 86400
        removed = 0
        passed_over: set[str] = set()  # this pass: not removable after all, or failed
        while True:
            found = self.store.studies_to_purge(keep_seconds, now, limit=100 + len(passed_over))
            batch = [u for u in found if u not in passed_over]
            if not batch:
                return removed
            for study_uid in batch:
                try:
                    purged = self.store.purge_study(study_uid, keep_seconds, self.spool.remove, now)
                except (OSError, InvalidUIDError) as exc:  # nothing recorded: the next pass tries again
                    log.error("study %s: files not removed by retention: %s", uid_hash(study_uid), exc)
                    purged = None
                if purged is None:  # or an instance arrived, or a job was retried, since the query
                    passed_over.add(study_uid)
                    continue
                self._purged(purged, keep)
                removed += 1

    def _purged(self, purged: Purged, keep: float) -> None:
        """After a study's instances went: its jobs' results and outboxes, a log line and an audit entry."""
        for job_id in purged.job_ids:
            for folder in (results_dir(self.settings.data_dir, job_id), outbox_dir(self.settings.data_dir, job_id)):
                shutil.rmtree(folder, ignore_errors=True)
        log.info(
            "study %s: %d instance(s), %.1f MB and the outputs of %d job(s) removed after %g day(s)",
            uid_hash(purged.study_uid), purged.instances, purged.size / 1e6, len(purged.job_ids), keep,
        )
        audit("study_purged", study=uid_hash(purged.study_uid), instances=purged.instances, bytes=purged.size)

    def _repeat(self, what: str, step: Callable[[], object], period: float) -> None:
        """Run ``step`` every ``period`` seconds until stopped. A failure (the job store down, say) is logged with its
        traceback once, then as one line a minute while it lasts, and its end is logged: the log stays readable
        through an outage, and the loop never dies."""
        failing_since: float | None = None
        last_said = 0.0
        while not self._stop.wait(period):
            try:
                step()
            except Exception as exc:  # process boundary: keep going, the next period tries again
                now = time.monotonic()
                if failing_since is None:
                    failing_since = last_said = now
                    log.exception("%s failed; retrying every %.1f s", what, period)
                elif now - last_said >= 60:
                    last_said = now
                    log.error("%s still failing after %.0f s: %s", what, now - failing_since, describe_error(exc))
                continue
            if failing_since is not None:
                log.warning("%s works again after %.0f s", what, time.monotonic() - failing_since)
                failing_since = None

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
        urgent = rule.priority == "urgent" or calling.strip() in self.settings.queue.urgent_calling_aets
        job_id = self.store.complete_study(
            study_uid,
            rule=rule.name,
            priority="urgent" if urgent else "routine",
            profile=rule.profile.value,
            language=rule.language.value,
            targets=rule.targets,
            outputs=[kind.value for kind in rule.outputs],
            destinations=destinations,
        )
        if job_id is None:
            return None
        log.info(
            "study %s complete (%d instances): job %d, rule %s, %s", uid_hash(study_uid), len(found), job_id,
            rule.name, "urgent" if urgent else "routine",
        )
        job = self.store.job(job_id)
        assert job is not None
        self.dispatcher.submit(job)
        return job_id

    # --- recovery ---------------------------------------------------------------------------------------------

    def recover_spool(self) -> int:
        """Record spooled files that have no record: written and synced, but the record never committed (a crash
        between the two: the sender got no Success and may resend), or committed without a WAL sync and undone by a
        power loss (the sender got Success). Either way the file is recorded now, with the calling AE it carries,
        and processed once. Temporary files of interrupted writes are removed.
        """
        recovered = 0
        for tmp in self.spool.root.glob("*/*/.*.tmp"):
            tmp.unlink(missing_ok=True)
        self.spool.clear_incoming()
        known = self.store.instance_uids()  # one query, not one per file: a spool can hold millions
        for path in self.spool.root.glob("*/*/*.dcm"):
            if path.stem in known:
                continue
            # Each file on its own: one that cannot be read or recorded is logged and left, the others recovered
            # (a job store that cannot be reached stops the start, as it would a moment later).
            try:
                record = self._record_from_file(path)
            except Exception as exc:  # pydicom's many kinds, a bad UID, a missing attribute, an unreadable file
                log.error("spooled file %s cannot be recovered: %s", self.spool.relative(path), exc)
                continue
            try:
                self.store.record_instance(record, late_arrivals=self.settings.study.late_arrivals)
            except PatientConflict as exc:
                # Refused at intake (the node crashed before removing it): the sender was never told Success.
                log.error("spooled file %s removed: %s", self.spool.relative(path), exc)
                self.spool.remove([record.path])
                continue
            except Exception as exc:
                if is_unreachable(exc):
                    raise
                log.error("spooled file %s not recorded: %s", self.spool.relative(path), describe_error(exc))
                continue
            recovered += 1
        if recovered:
            log.warning("recorded %d spooled instance(s) left unrecorded by an interrupted run", recovered)
        return recovered

    def _record_from_file(self, path: Path) -> InstanceRecord:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        return InstanceRecord.from_header(
            ds,
            sop_instance_uid=check_uid(ds.SOPInstanceUID, "SOP Instance UID"),
            study_uid=check_uid(ds.StudyInstanceUID, "Study Instance UID"),
            series_uid=check_uid(ds.SeriesInstanceUID, "Series Instance UID"),
            sop_class_uid=str(ds.SOPClassUID),
            transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
            calling_ae=self.spool.source_ae(path),
            path=self.spool.relative(path),
            size=path.stat().st_size,
        )

    def reconcile(self, startup: bool = False, now: float | None = None) -> int:
        """Compare the store with the queue and enqueue what still has to run; returns the number enqueued.

        The store decides (DESIGN invariant 3): a queued job that no worker took for ``queue.requeue_after_seconds``
        (its message was lost when Redis was flushed or restarted) is enqueued again, as is, at once, a job whose
        inference or export worker died (abandoned: :mod:`dicom_node.jobs.lease`); a job a live worker is exporting
        is left to it. Duplicate messages are harmless: a worker claims a job (or its export lease) with a
        compare-and-set and drops messages for jobs that are running, exporting or done.

        A job the broker does not take is not counted: the failure is logged, the pass stops there (the broker is
        unreachable, every further job would wait for the same time-out) and the next pass tries again. A message
        Redis lost is found sooner by :meth:`requeue_lost`.
        """
        now = time.time() if now is None else now
        q = self.settings.queue
        stale = now - q.requeue_after_seconds
        enqueued = 0
        for job in sorted(self.store.unfinished_jobs(), key=lambda j: j.id):
            if job.state is JobState.RUNNING:
                if not is_abandoned(job, now) or fail_if_redelivered_too_often(self.store, job, q.max_redeliveries):
                    continue
                if not self.store.transition(
                    job.id, JobState.QUEUED, expect=[JobState.RUNNING], count_redelivery=True,
                    detail=f"worker {job.owner} stopped; queued again",
                ):
                    continue
            elif job.state is JobState.SUCCEEDED and job.owner is not None:  # an export lease is held
                if not is_abandoned(job, now):
                    continue  # a live worker is exporting it: a message now would only be dropped
                if fail_if_redelivered_too_often(self.store, job, q.max_redeliveries):
                    continue
                if not self.store.release_export(
                    job.id, job.owner, count_redelivery=True, detail=f"export worker {job.owner} stopped; queued again"
                ):
                    continue
            elif not startup and job.enqueued_at is not None and job.enqueued_at > stale:
                continue
            fresh = self.store.job(job.id)
            if fresh is None or fresh.state.finished:
                continue
            if not self.dispatcher.submit(fresh):
                # The broker is unreachable (the dispatcher logged why): the jobs after this one would fail alike, one
                # time-out each. They all stay as they are in the store, and the next pass tries again.
                log.error(
                    "reconciliation: enqueue failed at job %d (broker unreachable, reason above); %d job(s) enqueued "
                    "before it; it and the rest are tried again in %g s", fresh.id, enqueued, q.reconcile_seconds,
                )  # fmt: skip
                break
            enqueued += 1
        if enqueued:
            log.info("reconciled: %d job(s) enqueued", enqueued)
        return enqueued

    def requeue_lost(self) -> int:
        """Enqueue again the jobs the store says are waiting in the queue whose message the broker no longer holds
        (Redis restarted without its data, or flushed); returns how many were enqueued.

        A job counts as lost when two checks in a row miss its message and it has not moved in between (same state,
        same ``enqueued_at``): a message a worker is just taking is briefly in neither of Redis' places. A duplicate
        is harmless all the same (see :meth:`reconcile`). Jobs never enqueued, and jobs of dead workers, are the
        reconciler's; with a broker that cannot tell (embedded), ``queue.requeue_after_seconds`` is the fallback.
        """
        waiting = (JobState.QUEUED, JobState.SUCCEEDED)
        enqueued_at = {
            job.id: job.enqueued_at
            for job in self.store.unfinished_jobs()
            if job.state in waiting and job.enqueued_at is not None
        }
        held = self.dispatcher.queued_job_ids() if enqueued_at else None  # no broker round trip for an empty queue
        if held is None:
            self._missing.clear()
            return 0
        missing = {job_id: at for job_id, at in enqueued_at.items() if job_id not in held}
        lost = sorted(job_id for job_id, at in missing.items() if self._missing.get(job_id) == at)
        self._missing = {job_id: at for job_id, at in missing.items() if job_id not in lost}
        enqueued = 0
        for job_id in lost:
            job = self.store.job(job_id)
            if job is None or job.state not in waiting or job.enqueued_at != missing[job_id]:
                continue  # it moved since the check
            detail = "its message is no longer in the broker (restarted without its data, or flushed); enqueued again"
            if not self.dispatcher.submit(job):  # the broker went away again: the next check tries these again
                self._missing.update({j: missing[j] for j in lost[lost.index(job_id) :]})
                break
            self.store.note(job_id, "requeued", detail)
            enqueued += 1
        if lost:
            log.warning(
                "%d queued job(s) had lost their broker message (Redis restarted empty or flushed?): %d enqueued again",
                len(lost), enqueued,
            )  # fmt: skip
        return enqueued

    def wait(self) -> None:
        while not self._stop.is_set():
            time.sleep(0.5)
