"""What a job does, as plain functions the Celery tasks call (and tests call without Celery).

``run_inference``: claim the job, read the study from the spool, run the model, keep the result on disk.
``run_export``: take the job's export lease, build the result objects (deterministic UIDs), write them to the
outbox, send them to every destination, mark the job delivered (or give the lease back for a retry).

Every step is idempotent: a redelivered or duplicated message finds the job already claimed, already done, or
redoes work whose output is identical (DESIGN invariant 2). The job store's compare-and-set transitions decide.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pydicom

from dicom_node.config import SenderDestinationSettings, Settings
from dicom_node.intake.spool import Spool, durable_write
from dicom_node.jobs.lease import fail_if_redelivered_too_often, is_abandoned, process_host
from dicom_node.jobs.schema import JobRecord, JobState
from dicom_node.jobs.store import JobStore, is_unreachable
from dicom_node.logs import audit, uid_hash
from dicom_node.permissions import private_dir

if TYPE_CHECKING:
    from dicom_node.work.worker_metrics import WorkerMetrics
    from inference.engine import Engine

__all__ = [
    "PermanentError",
    "TransientError",
    "WorkerContext",
    "claim_export",
    "claim_job",
    "outbox_dir",
    "results_dir",
    "run_export",
    "run_inference",
]

log = logging.getLogger(__name__)

#: SOP classes the model never reads (our own and others' results, key objects); still sent as region input.
_NON_IMAGE_MODALITIES = {"SR", "PR", "SEG", "KO", "RTSTRUCT", "DOC"}


class TransientError(Exception):
    """Worth retrying later: the PACS is down or busy, the broker hiccupped."""


class PermanentError(Exception):
    """Retrying will not help: the PACS rejected an object, a destination is misconfigured."""


def _worker_id() -> str:
    return f"{process_host()}:{os.getpid()}"


@dataclass
class WorkerContext:
    """What a worker process needs: settings, store, spool, and (inference workers) the loaded model."""

    settings: Settings
    engine_factory: Callable[[], Engine] | None = None
    fixed_worker_id: str | None = None
    #: Jobs this process claimed and left running because the job store became unreachable (see claim_job).
    interrupted: set[int] = field(default_factory=set)
    #: Inference jobs this process holds now (job id -> start time); an inference worker holds several at once.
    in_flight: dict[int, float] = field(default_factory=dict)
    #: The worker's Prometheus metrics (inference workers only).
    metrics: WorkerMetrics | None = None
    _store: JobStore | None = None
    _engine: Engine | None = None

    @property
    def worker_id(self) -> str:
        """host:pid of the process running the task (a prefork child, not the worker's parent process)."""
        return self.fixed_worker_id or _worker_id()

    @property
    def store(self) -> JobStore:
        if self._store is None:
            self._store = JobStore(self.settings.store_url)
        return self._store

    @property
    def spool(self) -> Spool:
        return Spool(self.settings.node.data_dir / "spool", sync=self.settings.node.fsync)

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            if self.engine_factory is None:
                raise RuntimeError("this worker has no model: start it with --queues inference")
            self._engine = self.engine_factory()
        return self._engine

    @property
    def loaded_engine(self) -> Engine | None:
        """The model if this worker has loaded it, without loading it."""
        return self._engine

    def load_engine(self) -> None:
        """Load and warm up the model now (worker start), so that the first job is not slow."""
        engine = self.engine
        engine.warm_up()

    def study_of(self, job_id: int) -> str:
        """The hashed Study Instance UID of a job, for log lines ("?" when the store cannot say)."""
        try:
            job = self.store.job(job_id)
        except Exception:  # a log line must not fail for want of the store
            return "?"
        return uid_hash(job.study_uid) if job is not None else "?"

    def activity(self) -> str:
        """What this worker is doing, in one line (its heartbeat, ``dicom-node status``)."""
        held = sorted(self.in_flight)
        doing = f"{len(held)} job(s) in flight: {', '.join(map(str, held[:8]))}" if held else "idle"
        if self.metrics is not None and self.metrics.last_batch:
            doing += f"; {self.metrics.last_batch}"
        return doing

    def results_dir(self, job: JobRecord) -> Path:
        return results_dir(self.settings.node.data_dir, job.id)

    def outbox_dir(self, job: JobRecord) -> Path:
        return outbox_dir(self.settings.node.data_dir, job.id)


def results_dir(data_dir: Path, job_id: int) -> Path:
    """Where a job's inference result is kept."""
    return data_dir / "results" / f"job-{job_id}"


def outbox_dir(data_dir: Path, job_id: int) -> Path:
    """Where a job's result objects are kept until, and after, they are delivered."""
    return data_dir / "outbox" / f"job-{job_id}"


def claim_job(ctx: WorkerContext, job_id: int, lease_seconds: float) -> JobRecord | None:
    """Take the job for this worker, or None when there is nothing to do (done, cancelled, running elsewhere).

    A job found ``running`` and abandoned (:mod:`dicom_node.jobs.lease`) was redelivered after a crash; it is taken
    over and counted, or failed when redelivered more than ``queue.max_redeliveries`` times.
    """
    store = ctx.store
    job = store.job(job_id)
    if job is None:
        log.warning("job %d does not exist; message dropped", job_id)
        return None
    now = time.time()
    lease = now + lease_seconds
    if job.state is JobState.QUEUED:
        if store.transition(
            job_id, JobState.RUNNING, expect=[JobState.QUEUED], count_attempt=True, owner=ctx.worker_id,
            lease_until=lease, detail=f"on {ctx.worker_id}",
        ):
            return store.job(job_id)
        return None
    if job.state is not JobState.RUNNING:
        log.info("job %d is %s; nothing to run", job_id, job.state.value)
        return None
    if job.owner == ctx.worker_id and job_id in ctx.interrupted:
        # This process's own earlier attempt, cut off by a job store outage before it could record its outcome. A
        # prefork process runs one task at a time, so nothing here runs it now: resume, without a redelivery.
        ctx.interrupted.discard(job_id)
        if store.transition(
            job_id, JobState.RUNNING, expect=[JobState.RUNNING], count_attempt=True, owner=ctx.worker_id,
            lease_until=lease, detail=f"resumed on {ctx.worker_id} after the job store was unreachable",
        ):
            return store.job(job_id)
        return None
    if not is_abandoned(job, now):
        log.info("job %d already running on %s; duplicate message dropped", job_id, job.owner)
        return None
    if fail_if_redelivered_too_often(store, job, ctx.settings.queue.max_redeliveries):
        return None
    if store.transition(
        job_id, JobState.RUNNING, expect=[JobState.RUNNING], count_attempt=True, count_redelivery=True,
        owner=ctx.worker_id, lease_until=lease, detail=f"redelivered after {job.owner} stopped; on {ctx.worker_id}",
    ):
        return store.job(job_id)
    return None


def claim_export(ctx: WorkerContext, job_id: int, lease_seconds: float) -> JobRecord | None:
    """Take the export lease of a ``succeeded`` job for this worker, or None when there is nothing to do (not
    succeeded, or exported by a live worker right now: a duplicate message, dropped).

    The mirror of :func:`claim_job` for the export: the job stays ``succeeded`` and the lease lives in ``owner`` and
    ``lease_until``. A lease whose worker is gone or whose time ran out (:mod:`dicom_node.jobs.lease`, the same rule)
    is taken over and the redelivery counted, or the job failed when redelivered more than
    ``queue.max_redeliveries`` times.
    """
    store = ctx.store
    job = store.job(job_id)
    if job is None or job.state is not JobState.SUCCEEDED:
        log.info("job %d is %s; nothing to export", job_id, job.state.value if job else "missing")
        return None
    lease = time.time() + lease_seconds
    me = ctx.worker_id
    if job.owner is None:
        taken = store.hold_export(job_id, me, lease, held_by=None, detail=f"on {me}")
    elif job.owner == me and job_id in ctx.interrupted:
        # This process's own earlier attempt, cut off by a job store outage before it could give the lease back.
        ctx.interrupted.discard(job_id)
        taken = store.hold_export(
            job_id, me, lease, held_by=me, detail=f"resumed on {me} after the job store was unreachable"
        )
    elif not is_abandoned(job, time.time()):
        log.info("job %d already exporting on %s; duplicate message dropped", job_id, job.owner)
        return None
    elif fail_if_redelivered_too_often(store, job, ctx.settings.queue.max_redeliveries):
        return None
    else:
        taken = store.hold_export(
            job_id, me, lease, held_by=job.owner, count_redelivery=True,
            detail=f"redelivered after {job.owner} stopped; on {me}",
        )  # fmt: skip
    if not taken:  # another worker took the lease between the read and the compare-and-set
        log.info("job %d: its export lease was taken meanwhile; duplicate message dropped", job_id)
        return None
    return store.job(job_id)


def study_files(ctx: WorkerContext, job: JobRecord) -> list[Path]:
    """The study's instances as files, read through the spool (a shared volume for remote workers)."""
    spool = ctx.spool
    return [spool.resolve(i.path) for i in ctx.store.study_instances(job.study_uid)]


def run_inference(ctx: WorkerContext, job_id: int) -> bool:
    """Run the model on the job's study; True when the job succeeded and its export should be queued.

    Raises :class:`inference.errors.PoisonInputError` subclasses only as a failed job: unusable input fails fast,
    without retry, with the reason in the store. An unreachable job store (:func:`is_unreachable`) is raised with
    the job left running and marked in ``ctx.interrupted``, so that the task's retry resumes it.
    """
    lease = ctx.settings.queue.inference_time_limit * 1.5
    job = claim_job(ctx, job_id, lease)
    if job is None:
        return False
    ctx.in_flight[job_id] = time.time()
    if ctx.metrics is not None:
        ctx.metrics.in_flight.set(len(ctx.in_flight))
        if job.enqueued_at is not None:
            ctx.metrics.queue_wait.labels(job.priority).observe(max(0.0, time.time() - job.enqueued_at))
    try:
        return _infer(ctx, job)
    except Exception as exc:
        if is_unreachable(exc):  # the job stays running, ours: the task's retry resumes it (claim_job)
            ctx.interrupted.add(job_id)
        raise
    finally:
        ctx.in_flight.pop(job_id, None)
        if ctx.metrics is not None:
            ctx.metrics.in_flight.set(len(ctx.in_flight))


def _infer(ctx: WorkerContext, job: JobRecord) -> bool:
    from inference.batching import Priority
    from inference.errors import PoisonInputError

    job_id = job.id
    started = time.perf_counter()
    files = study_files(ctx, job)
    try:
        result = ctx.engine.run_study(
            files, job.profile or "grounded_report", job.language or "en", targets=job.targets,
            priority=Priority.of(job.priority),
        )
    except PoisonInputError as exc:
        ctx.store.transition(job_id, JobState.FAILED, expect=[JobState.RUNNING], error=f"unusable study: {exc}")
        log.warning("job %d failed: unusable study: %s", job_id, exc)
        return False
    out = private_dir(ctx.results_dir(job))
    path = out / "result.json"
    durable_write(path, result.to_json().encode("utf-8"), sync=ctx.settings.node.fsync)
    elapsed = time.perf_counter() - started
    done = ctx.store.transition(
        job_id, JobState.SUCCEEDED, expect=[JobState.RUNNING], result_path=str(path),
        detail=f"{len(result.findings)} finding(s) in {elapsed:.1f} s",
    )
    log.info(
        "job %d: study %s, %d file(s), %d finding(s) in %.1f s",
        job_id, uid_hash(job.study_uid), len(files), len(result.findings), elapsed,
    )
    return done


def _result_sources(files: list[Path]) -> list[pydicom.Dataset]:
    sources: list[pydicom.Dataset] = []
    for path in files:
        ds = pydicom.dcmread(path)
        if str(ds.get("Modality", "")) in _NON_IMAGE_MODALITIES or "PixelData" not in ds:
            continue
        sources.append(ds)
    return sources


def _write_outbox(ctx: WorkerContext, job: JobRecord) -> list[tuple[str, str, Path]]:
    """Build the result objects and write each once, synced, into the outbox; later attempts reuse the files
    already there. SOP Instance UID and kind come from the datasets in memory, not from reading the files back."""
    from sr_writer.api import build_result_objects, encode_result_object, object_kind, result_file_name
    from sr_writer.context import ResultOptions
    from sr_writer.findings import InferenceResult
    from sr_writer.prepare import MixedSourcesError
    from sr_writer.uids import ResultUIDs

    recorded = ctx.store.job_results(job.id)
    outbox = ctx.outbox_dir(job)
    if recorded and all((outbox / Path(r["path"]).name).exists() for r in recorded):
        return [(r["sop_instance_uid"], r["kind"], outbox / Path(r["path"]).name) for r in recorded]
    if not job.result_path:
        raise PermanentError("the job has no inference result to export")
    result = InferenceResult.from_json(Path(job.result_path).read_text(encoding="utf-8"))
    sources = _result_sources(study_files(ctx, job))
    if not sources:
        raise PermanentError("the study has no image left in the spool to attach results to")
    uids = ResultUIDs(job.study_uid, result.algorithm, job.profile or result.profile, job.run)
    outputs = set(job.outputs)
    options = ResultOptions(sr="sr" in outputs, gsps="gsps" in outputs, seg="seg" in outputs, sc="sc" in outputs)
    private_dir(outbox)
    try:
        objects = build_result_objects(result, sources, uids, options)
    except MixedSourcesError as exc:  # the study itself is wrong (DESIGN invariant 10): no retry can mend it
        raise PermanentError(f"the study's images cannot make one result: {exc}") from exc
    made = []
    for ds in objects:  # each object encoded and written once, from memory; its UID and kind read there too
        path = outbox / result_file_name(ds)
        # Synced before it is recorded: the outbox survives a crash (invariant 1); a retry rewrites the same names.
        durable_write(path, encode_result_object(ds), sync=ctx.settings.node.fsync)
        made.append((str(ds.SOPInstanceUID), object_kind(ds).value, path))
    ctx.store.record_results(job.id, [(uid, kind, str(p)) for uid, kind, p in made])
    return made


def run_export(ctx: WorkerContext, job_id: int) -> None:
    """Build, keep and send the job's result objects; raises :class:`TransientError` when a retry may help.

    The export runs under the job's export lease (:func:`claim_export`): a second message for a job a live worker
    is exporting is dropped. The lease lasts 1.5 times ``queue.export_time_limit``, the task's hard limit, so it
    cannot run out under a live export and needs no renewal; it is given back when the export stops short of
    delivered (a retry is due, the job failed) and cleared with the transition to delivered.

    A destination that rejects an object (a failure status) fails the job with the status and reason; partial
    success is recorded per destination and per object, each object as soon as the peer acknowledges it, and a
    retry (after a failure or a crash) sends only what is missing.
    """
    job = claim_export(ctx, job_id, ctx.settings.queue.export_time_limit * 1.5)
    if job is None:
        return
    try:
        _export(ctx, job)  # delivered (or cancelled meanwhile): the transition cleared the lease
    except Exception as exc:
        if is_unreachable(exc):  # the lease stays ours: the task's retry resumes it (claim_export)
            ctx.interrupted.add(job_id)
        else:  # stopped short of delivered (a retry is due, or the task fails the job): the next message is free
            _give_back_export(ctx, job_id)
        raise


def _give_back_export(ctx: WorkerContext, job_id: int) -> None:
    """Release this worker's export lease; kept, for this process's retry to resume, if the store is unreachable."""
    try:
        ctx.store.release_export(job_id, ctx.worker_id)
    except Exception as exc:
        if not is_unreachable(exc):
            raise
        ctx.interrupted.add(job_id)


def _export(ctx: WorkerContext, job: JobRecord) -> None:
    from dicom_node.export.destinations import send
    from dicom_node.export.outcome import FileResult, Outcome

    store = ctx.store
    job_id = job.id
    made = _write_outbox(ctx, job)
    delivered = {r["sop_instance_uid"]: set(r["delivered_to"]) for r in store.job_results(job_id)}
    if not job.destinations:
        store.transition(
            job_id, JobState.DELIVERED, expect=[JobState.SUCCEEDED],
            detail=f"no destination configured: {len(made)} object(s) kept in {ctx.outbox_dir(job)}",
        )
        return
    transient: list[str] = []
    sender_ae: str | None = None
    for name in job.destinations:
        destination = ctx.settings.destination(name)
        if destination is None:
            raise PermanentError(f"destination {name!r} is no longer configured")
        pending = [p for uid, _kind, p in made if name not in delivered.get(uid, set())]
        if not pending:
            continue
        if isinstance(destination, SenderDestinationSettings) and sender_ae is None:
            sender_ae = store.study_sender(job.study_uid, job.run)  # the calling AE title recorded at intake

        def record(item: FileResult, name: str = name) -> None:
            # As the peer acknowledges each object, before the next goes out: a worker killed mid-batch leaves
            # every acknowledged object on record, and the retry sends only what the peer did not confirm.
            if item.sop_instance_uid:
                store.mark_delivered(item.sop_instance_uid, name)

        report = send(destination, pending, ctx.settings, sender_ae=sender_ae, on_delivered=record)
        audit(
            "export", job=job_id, destination=name, kind=destination.kind.value, peer=report.peer,
            delivered=len(report.delivered), rejected=len(report.rejected), transient=len(report.transient),
        )  # fmt: skip
        store.note(job_id, "send", report.summary())
        if report.outcome is Outcome.REJECTED:  # the one classification: dicom_node.export.outcome
            raise PermanentError(f"{name}: {report.reason}")
        if report.outcome is Outcome.TRANSIENT:
            transient.append(f"{name}: {report.reason}")
    if transient:
        raise TransientError("; ".join(transient))
    store.transition(
        job_id, JobState.DELIVERED, expect=[JobState.SUCCEEDED],
        detail=f"{len(made)} object(s) to {', '.join(job.destinations)}",
    )
