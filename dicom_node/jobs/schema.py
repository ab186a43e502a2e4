"""The job store's tables and the records read from them.

Tables (SQLAlchemy Core, so that PostgreSQL works by URL):

- ``instances``: one row per received SOP Instance (idempotent by SOP Instance UID), with the few header values that
  routing rules need and the spool path.
- ``studies``: one row per Study Instance UID: whether it is still receiving, when it started and last changed, and
  how many runs it has had.
- ``jobs``: one row per run of one study: the rule and profile chosen, its state, attempts and a readable error.
- ``events``: the history of every state transition, with timestamps and a detail text.
- ``results``: the result objects a job produced (SOP Instance UID, file, per-destination delivery state).
- ``users``: the console's local users (password hash, role, failed logins, API token hash).
- ``workers``: one row per running worker process, refreshed by its heartbeat (host, queues, device, model).
- ``notifications``: webhook notifications until sent or given up; ``node_state``: the webhooks' place in ``events``.
"""

from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import (
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

__all__ = [
    "UNFINISHED",
    "HeaderValues",
    "InstanceRecord",
    "JobRecord",
    "JobState",
    "Purged",
    "StudyState",
    "events",
    "instances",
    "jobs",
    "metadata",
    "node_state",
    "notifications",
    "patient_key",
    "results",
    "studies",
    "users",
    "workers",
]


def patient_key(patient_id: object, issuer: object) -> str:
    """A stand-in for a patient's identity, to compare instances without keeping the ID itself: a hash of Patient ID
    (0010,0020) and Issuer of Patient ID (0010,0021), each stripped of padding. Absent values count as empty, so a
    study whose instances all lack a Patient ID is one patient, and one that lacks it beside one that has it is not.
    """
    text = f"{'' if issuer is None else str(issuer).strip()}\x00{'' if patient_id is None else str(patient_id).strip()}"
    return hashlib.sha256(text.encode("utf-8", "replace")).hexdigest()[:32]


class StudyState(str, enum.Enum):
    RECEIVING = "receiving"
    COMPLETE = "complete"
    #: Its files were removed by retention (``retention.keep_days``); its jobs and history stay. An instance that
    #: arrives again is a new arrival (``study.late_arrivals`` decides).
    PURGED = "purged"


class JobState(str, enum.Enum):
    """A run of one study. ``queued`` -> ``running`` -> ``succeeded`` -> ``delivered``; or ``failed``,
    ``skipped`` (no rule matched), ``cancelled`` (by an administrator).

    A ``succeeded`` job is awaiting or undergoing its export; while an export worker sends it, the worker holds the
    job's export lease in ``owner`` and ``lease_until`` (the inference lease's columns, free again once inference
    succeeded). The lease is no state of its own: everything that treats ``succeeded`` as "to export" (the
    dispatcher, the broker check, the export task's failures, retention, cancellation) stays as it is."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    DELIVERED = "delivered"
    FAILED = "failed"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.DELIVERED, JobState.FAILED, JobState.SKIPPED, JobState.CANCELLED)


UNFINISHED = (JobState.QUEUED.value, JobState.RUNNING.value, JobState.SUCCEEDED.value)

metadata = MetaData()

instances = Table(
    "instances",
    metadata,
    Column("sop_instance_uid", String(64), primary_key=True),
    Column("study_uid", String(64), nullable=False),
    Column("series_uid", String(64), nullable=False),
    Column("sop_class_uid", String(64), nullable=False),
    Column("transfer_syntax", String(64), nullable=False),
    Column("modality", String(16), nullable=False, default=""),
    Column("body_part", String(64), nullable=False, default=""),
    Column("study_description", String(128), nullable=False, default=""),
    Column("series_description", String(128), nullable=False, default=""),
    Column("calling_ae", String(16), nullable=False, default=""),
    Column("patient_key", String(32), nullable=True),
    Column("accession_number", String(16), nullable=True),
    Column("path", Text, nullable=False),
    Column("size", Integer, nullable=False),
    Column("run", Integer, nullable=False),
    Column("received_at", Float, nullable=False),
    Index("ix_instances_study", "study_uid"),
)

studies = Table(
    "studies",
    metadata,
    Column("study_uid", String(64), primary_key=True),
    Column("state", String(16), nullable=False),
    Column("window_started_at", Float, nullable=False),
    Column("last_received_at", Float, nullable=False),
    Column("runs", Integer, nullable=False, default=0),
    Column("calling_ae", String(16), nullable=False, default=""),
    # The patient of the study's first instance (see patient_key); every later instance must carry the same.
    Column("patient_key", String(32), nullable=True),
    Index("ix_studies_state", "state"),
)

jobs = Table(
    "jobs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("study_uid", String(64), ForeignKey("studies.study_uid"), nullable=False),
    Column("run", Integer, nullable=False),
    Column("state", String(16), nullable=False),
    Column("rule", String(128), nullable=True),
    # urgent | routine: urgent jobs overtake routine ones in the queue and in a worker's batches.
    Column("priority", String(8), nullable=True),
    Column("profile", String(32), nullable=True),
    Column("language", String(8), nullable=True),
    Column("targets", Text, nullable=False, default="[]"),
    Column("outputs", Text, nullable=False, default="[]"),
    Column("destinations", Text, nullable=False, default="[]"),
    Column("attempts", Integer, nullable=False, default=0),
    Column("redeliveries", Integer, nullable=False, default=0),
    Column("owner", String(128), nullable=True),
    Column("lease_until", Float, nullable=True),
    Column("enqueued_at", Float, nullable=True),
    Column("error", Text, nullable=True),
    Column("result_path", Text, nullable=True),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    # What the console lists and filters by, copied from the study's instances when the job is created, so that a
    # page of 100,000 jobs is one indexed query on this table.
    Column("modality", String(64), nullable=True),
    Column("calling_ae", String(16), nullable=True),
    Column("accession_number", String(16), nullable=True),
    UniqueConstraint("study_uid", "run", name="uq_jobs_study_run"),
    Index("ix_jobs_state", "state"),
    # Keyset paging (newest first) within a state, and the console's date and accession number filters.
    Index("ix_jobs_state_id", "state", "id"),
    Index("ix_jobs_created", "created_at"),
    Index("ix_jobs_accession", "accession_number"),
)

events = Table(
    "events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", Float, nullable=False),
    Column("study_uid", String(64), nullable=True),
    Column("job_id", Integer, nullable=True),
    Column("kind", String(32), nullable=False),
    Column("detail", Text, nullable=False, default=""),
    Index("ix_events_job", "job_id"),
)

results = Table(
    "results",
    metadata,
    Column("sop_instance_uid", String(64), primary_key=True),
    Column("job_id", Integer, ForeignKey("jobs.id"), nullable=False),
    Column("kind", String(8), nullable=False),
    Column("path", Text, nullable=False),
    Column("delivered_to", Text, nullable=False, default="[]"),
    Index("ix_results_job", "job_id"),
)

users = Table(
    "users",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("password_hash", Text, nullable=False),  # argon2id, with its parameters and salt
    Column("role", String(16), nullable=False),
    Column("failed_logins", Integer, nullable=False, default=0),
    Column("locked", Boolean, nullable=False, default=False),
    Column("locked_until", Float, nullable=True),  # when a lock ends by itself; None: until passwd
    Column("token_hash", String(64), nullable=True),  # SHA-256 of the API token; the token itself is never kept
    Column("created_at", Float, nullable=False),
    Index("ix_users_token", "token_hash"),
)

workers = Table(
    "workers",
    metadata,
    Column("name", String(255), primary_key=True),  # Celery's hostname of the worker: queues-pid@host
    Column("host", String(255), nullable=False),
    Column("queues", String(64), nullable=False),
    Column("device", String(32), nullable=False, default=""),
    Column("model", String(255), nullable=False, default=""),
    Column("started_at", Float, nullable=False),
    Column("seen_at", Float, nullable=False),
    Column("activity", Text, nullable=True),  # what it is doing: jobs in flight, its last batch
    Column("metrics_url", String(255), nullable=True),  # its Prometheus metrics, when served
)


#: Webhook notifications, kept until sent or given up, so that a restart of the node loses none
#: (``dicom_node.console.webhooks``); one row per webhook and job store event.
notifications = Table(
    "notifications",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("webhook", String(64), nullable=False),
    Column("event", String(32), nullable=False),
    Column("event_id", Integer, nullable=True),  # the ``events`` row it announces
    Column("job_id", Integer, nullable=True),
    Column("body", Text, nullable=False),
    Column("state", String(8), nullable=False),  # pending | sent | dropped
    Column("attempts", Integer, nullable=False, default=0),
    Column("due_at", Float, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("outcome", Text, nullable=True),  # the last attempt's, in words
    UniqueConstraint("webhook", "event", "event_id", name="uq_notifications_event"),
    Index("ix_notifications_due", "state", "webhook", "due_at"),
)

#: Small durable values of the node itself (the webhooks' place in ``events``), by key.
node_state = Table(
    "node_state",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

#: The length of each header text column of ``instances``, from the table itself (one definition).
_TEXT_CAPS: dict[str, int] = {
    name: int(getattr(instances.c[name].type, "length", 0) or 0)
    for name in ("modality", "body_part", "study_description", "series_description", "accession_number")
}


class HeaderValues(Protocol):
    """Anything that gives a header value by keyword, or None: the intake's :class:`~dicom_node.intake.header.Header`
    or a pydicom Dataset."""

    def get(self, keyword: str) -> Any: ...


@dataclass(frozen=True)
class Purged:
    """What retention removed of one study: its instances (count, bytes) and the jobs whose outputs go too."""

    study_uid: str
    instances: int
    size: int
    job_ids: list[int]


@dataclass(frozen=True)
class InstanceRecord:
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    sop_class_uid: str
    transfer_syntax: str
    modality: str
    body_part: str
    study_description: str
    series_description: str
    calling_ae: str
    path: str
    size: int
    #: :func:`patient_key` of the instance; "" for records written before the node compared patients.
    patient_key: str = ""
    #: Accession Number (0008,0050), for the console's search; None when absent.
    accession_number: str | None = None

    @classmethod
    def from_header(
        cls,
        header: HeaderValues,
        *,
        sop_instance_uid: str,
        study_uid: str,
        series_uid: str,
        sop_class_uid: str,
        transfer_syntax: str,
        calling_ae: str,
        path: str,
        size: int,
    ) -> InstanceRecord:
        """The record of a received instance: the UIDs (checked by the caller), and the header values routing rules
        use, stripped and cut to their column's length (a peer may send any length; PostgreSQL refuses a longer
        value where SQLite keeps it). Used by intake and by the start-up recovery of the spool alike."""

        def text(keyword: str, column: str) -> str:
            value = header.get(keyword)
            return "" if value is None else str(value).strip()[: _TEXT_CAPS[column]]

        return cls(
            sop_instance_uid=sop_instance_uid,
            study_uid=study_uid,
            series_uid=series_uid,
            sop_class_uid=sop_class_uid,
            transfer_syntax=transfer_syntax,
            modality=text("Modality", "modality"),
            body_part=text("BodyPartExamined", "body_part"),
            study_description=text("StudyDescription", "study_description"),
            series_description=text("SeriesDescription", "series_description"),
            calling_ae=calling_ae,
            path=path,
            size=size,
            patient_key=patient_key(header.get("PatientID"), header.get("IssuerOfPatientID")),
            accession_number=text("AccessionNumber", "accession_number") or None,
        )


@dataclass(frozen=True)
class JobRecord:
    id: int
    study_uid: str
    run: int
    state: JobState
    rule: str | None
    profile: str | None
    priority: str
    language: str | None
    targets: list[str]
    outputs: list[str]
    destinations: list[str]
    attempts: int
    redeliveries: int
    owner: str | None
    lease_until: float | None
    enqueued_at: float | None
    error: str | None
    result_path: str | None
    created_at: float
    updated_at: float
    modality: str | None = None
    calling_ae: str | None = None
    accession_number: str | None = None

    @classmethod
    def from_row(cls, row: Any) -> JobRecord:
        m = row._mapping
        return cls(
            id=m["id"],
            study_uid=m["study_uid"],
            run=m["run"],
            state=JobState(m["state"]),
            rule=m["rule"],
            profile=m["profile"],
            priority=m["priority"] or "routine",
            language=m["language"],
            targets=json.loads(m["targets"]),
            outputs=json.loads(m["outputs"]),
            destinations=json.loads(m["destinations"]),
            attempts=m["attempts"],
            redeliveries=m["redeliveries"],
            owner=m["owner"],
            lease_until=m["lease_until"],
            enqueued_at=m["enqueued_at"],
            error=m["error"],
            result_path=m["result_path"],
            created_at=m["created_at"],
            updated_at=m["updated_at"],
            modality=m.get("modality"),
            calling_ae=m.get("calling_ae"),
            accession_number=m.get("accession_number"),
        )

    def as_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["state"] = self.state.value
        return out
