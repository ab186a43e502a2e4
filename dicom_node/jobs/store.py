"""The job store: every instance, study, job and state transition, in SQLite (default) or PostgreSQL.

The store, not the broker, is the source of truth (DESIGN invariant 3). SQLite runs in WAL mode with
``synchronous=FULL`` so that a committed record survives a crash or power loss; every process of the node (the SCP,
workers on this host) opens its own engine on the same file. SQLite serialises writers (``BEGIN IMMEDIATE``);
PostgreSQL runs transactions side by side, so each read-then-write locks the row it changes (``FOR UPDATE``) and
an intake record that collides with another writer's new row is tried again.

The tables and the records they hold are :mod:`dicom_node.jobs.schema`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import (
    and_,
    bindparam,
    create_engine,
    delete,
    event,
    exists,
    func,
    insert,
    inspect,
    literal,
    or_,
    select,
    update,
)
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from dicom_node.jobs.schema import (
    UNFINISHED,
    InstanceRecord,
    JobRecord,
    JobState,
    Purged,
    StudyState,
    events,
    instances,
    jobs,
    metadata,
    results,
    studies,
)
from dicom_node.permissions import private_dir, private_file

__all__ = [
    "JobStore",
    "PatientConflict",
    "StoreUnavailable",
    "describe_error",
    "is_unreachable",
]

log = logging.getLogger(__name__)


_RECORD_ATTEMPTS = 4  # an intake record that met another writer's row is tried again (see record_instance)
_SCHEMA_LOCK = 0x44494E4F  # PostgreSQL advisory lock key of the schema set-up (any fixed number)
_PURGE_CHUNK = 64  # files retention deletes per transaction (see purge_study)


class PatientConflict(ValueError):
    """An instance names another patient than the study it belongs to (DESIGN invariant 10): never recorded."""

    def __init__(self, study_uid: str) -> None:
        super().__init__("Patient ID or Issuer of Patient ID differs from the study's earlier instances")
        self.study_uid = study_uid


class StoreUnavailable(RuntimeError):
    """The job store's database cannot be reached or opened; the message names it (no password) and the reason."""


def is_unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` says the job store could not be reached or used just then (connection refused or lost,
    database file locked or unreadable): worth trying again later, unlike an error in what was asked of it."""
    if isinstance(exc, StoreUnavailable):
        return True
    return isinstance(exc, (OperationalError, InterfaceError)) or (
        isinstance(exc, DBAPIError) and exc.connection_invalidated
    )


def describe_error(exc: BaseException) -> str:
    """One line for a log: the database's own first line of an error, without SQLAlchemy's background links."""
    orig = getattr(exc, "orig", None) or exc
    lines = str(orig).strip().splitlines()
    return lines[0] if lines else type(orig).__name__


def _pipelined(driver_connection: Any) -> contextlib.AbstractContextManager[Any]:
    """psycopg's pipeline mode (statements are sent without waiting, results read when fetched) where the driver has
    it; nothing for SQLite, whose statements run in this process anyway."""
    pipeline = getattr(driver_connection, "pipeline", None)
    return pipeline() if pipeline is not None else contextlib.nullcontext()


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # Transactions are begun explicitly (below) so that a writer takes the lock up front: a deferred
    # transaction that reads and then writes can fail with "database is locked" under concurrent writers.
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")  # a committed record survives power loss (invariant 1)
    cur.execute("PRAGMA busy_timeout=30000")  # several processes share the file
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _sqlite_begin_immediate(conn: Connection) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE")


class _Prepared:
    """A Core statement compiled once for one dialect, to run on the driver's cursor with named values.

    The C-STORE path records one instance per call; compiling and executing through the SQLAlchemy connection
    costs about three times the SQLite work itself, so the intake statements are compiled once here.
    """

    def __init__(self, stmt: Any, dialect: Any) -> None:
        compiled = stmt.compile(dialect=dialect, compile_kwargs={"render_postcompile": True})
        self.sql = str(compiled)
        self._defaults = dict(compiled.params)
        self._order = list(compiled.positiontup or ()) if dialect.positional else None

    def params(self, **values: Any) -> Any:
        merged = {**self._defaults, **values}
        if self._order is None:
            return merged
        return tuple(merged[name] for name in self._order)


class _RecordSQL:
    """The statements of :meth:`JobStore.known_instance` and :meth:`JobStore.record_instance`."""

    def __init__(self, dialect: Any) -> None:
        sop: Any = bindparam("sop")
        study: Any = bindparam("study")
        now: Any = bindparam("now")

        def prepared(stmt: Any) -> _Prepared:
            return _Prepared(stmt, dialect)

        self.seen = prepared(select(instances.c.sop_instance_uid).where(instances.c.sop_instance_uid == sop))
        # FOR UPDATE: PostgreSQL's transactions run side by side, and the study row is what an assembler closing the
        # window and a writer extending it must take turns on (SQLite's BEGIN IMMEDIATE already serialises them).
        self.study = prepared(
            select(studies.c.state, studies.c.runs, studies.c.patient_key)
            .where(studies.c.study_uid == study)
            .with_for_update()
        )
        self.add_study = prepared(
            insert(studies).values(
                study_uid=study,
                state=bindparam("state"),
                window_started_at=now,
                last_received_at=now,
                runs=0,
                calling_ae=bindparam("calling_ae"),
                patient_key=bindparam("patient_key"),
            )
        )
        # A study recorded before the node compared patients adopts the patient of its next instance.
        self.adopt_patient = prepared(
            update(studies).where(studies.c.study_uid == study).values(patient_key=bindparam("patient_key"))
        )
        self.touch_study = prepared(update(studies).where(studies.c.study_uid == study).values(last_received_at=now))
        self.reopen_study = prepared(
            update(studies)
            .where(studies.c.study_uid == study)
            .values(state=bindparam("state"), window_started_at=now, last_received_at=now)
        )
        self.add_event = prepared(
            insert(events).values(
                at=bindparam("at"), study_uid=study, kind=bindparam("kind"), detail=bindparam("detail")
            )
        )
        self.add_instance = prepared(insert(instances).values({c.name: bindparam(c.name) for c in instances.c}))
        self.known = prepared(
            select(instances.c.sop_instance_uid)
            .where(instances.c.sop_instance_uid == sop)
            .union_all(select(results.c.sop_instance_uid).where(results.c.sop_instance_uid == sop))
            .limit(1)
        )


def _add_missing_columns(conn: Connection) -> None:
    """Columns and indexes that later versions added to existing tables (``create_all`` creates only missing
    tables). Each such column is nullable, so rows written before it stay valid."""
    for table in metadata.sorted_tables:
        have = {c["name"] for c in inspect(conn).get_columns(table.name)}
        for column in table.columns:
            if column.name not in have:
                kind = column.type.compile(dialect=conn.dialect)
                log.info("job store: adding column %s.%s (%s)", table.name, column.name, kind)
                conn.exec_driver_sql(f"ALTER TABLE {table.name} ADD COLUMN {column.name} {kind}")
        indexed = {i["name"] for i in inspect(conn).get_indexes(table.name)}
        for index in table.indexes:
            if index.name not in indexed:
                log.info("job store: adding index %s", index.name)
                index.create(conn, checkfirst=True)


def _restart_timers(conn: Connection, now: float | None, *where: Any) -> int:
    """Set the stable timer of the receiving studies matching ``where`` to ``now`` (never back); how many moved."""
    now = time.time() if now is None else now
    receiving = (studies.c.state == StudyState.RECEIVING.value, studies.c.last_received_at < now)
    return int(conn.execute(update(studies).where(*receiving, *where).values(last_received_at=now)).rowcount)


def _purgeable(cutoff: float) -> Any:
    """The condition on ``studies`` of a study retention may remove: complete, no instance since ``cutoff``, and
    every job finished before it (a job still queued, running or awaiting export keeps its study)."""
    busy = exists().where(
        jobs.c.study_uid == studies.c.study_uid, or_(jobs.c.state.in_(UNFINISHED), jobs.c.updated_at > cutoff)
    )
    return and_(studies.c.state == StudyState.COMPLETE.value, studies.c.last_received_at <= cutoff, ~busy)


class JobStore:
    """All reads and writes of the job store; safe to share between threads of one process."""

    def __init__(self, url: str, *, intake_rebuildable: bool = False) -> None:
        """``intake_rebuildable``: the caller's spool holds everything an intake record holds (files synced, with
        their calling AE), and rebuilds missing records at start-up. SQLite then commits intake records without
        syncing the WAL: a power loss can undo the last of them, never the files they describe, and the next start
        records those files again. Every other write stays synced."""
        self.url = url
        self.intake_engine: Engine
        if url.startswith("sqlite:///"):
            database = Path(url.removeprefix("sqlite:///"))
            private_dir(database.parent)
            if database.name not in ("", ":memory:"):
                private_file(database)  # SQLite gives its -wal and -shm files the database file's mode
            self.engine: Engine = self._sqlite_engine(url, "FULL")
            self.intake_engine = self._sqlite_engine(url, "NORMAL") if intake_rebuildable else self.engine
        else:
            self.engine = create_engine(url, pool_pre_ping=True)
            self.intake_engine = self.engine
        self._sqlite = self.engine.dialect.name == "sqlite"
        self._create_tables()
        self._record_sql = _RecordSQL(self.engine.dialect)
        self._integrity_error: type[Exception] = self.engine.dialect.loaded_dbapi.IntegrityError
        self._intake_lock = threading.Lock()

    def _create_tables(self) -> None:
        """Create missing tables; :class:`StoreUnavailable` with the database's own reason when it cannot be reached.

        On PostgreSQL the node and its workers may start at the same moment, and concurrent ``CREATE TABLE``s of the
        same name collide in the catalogue; an advisory lock held for the transaction makes them take turns.
        """
        try:
            with self.engine.begin() as conn:
                if self.engine.dialect.name == "postgresql":
                    conn.execute(select(func.pg_advisory_xact_lock(_SCHEMA_LOCK)))
                metadata.create_all(conn)
                _add_missing_columns(conn)
        except DBAPIError as exc:
            self.close()
            where = make_url(self.url).render_as_string(hide_password=True)
            raise StoreUnavailable(f"job store {where} cannot be opened: {describe_error(exc)}") from exc

    @staticmethod
    def _sqlite_engine(url: str, synchronous: str) -> Engine:
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 30}, pool_size=8, max_overflow=16
        )

        def pragmas(dbapi_conn: Any, record: Any) -> None:
            _sqlite_pragmas(dbapi_conn, record)
            if synchronous != "FULL":
                dbapi_conn.execute(f"PRAGMA synchronous={synchronous}")

        event.listen(engine, "connect", pragmas)
        event.listen(engine, "begin", _sqlite_begin_immediate)
        return engine

    def close(self) -> None:
        self.engine.dispose()
        if self.intake_engine is not self.engine:
            self.intake_engine.dispose()

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        with self.engine.begin() as conn:
            yield conn

    # --- receiving -------------------------------------------------------------------------------------------

    def has_instance(self, sop_instance_uid: str) -> bool:
        with self.engine.connect() as conn:
            return (
                conn.execute(
                    select(instances.c.sop_instance_uid).where(instances.c.sop_instance_uid == sop_instance_uid)
                ).first()
                is not None
            )

    def instance_uids(self) -> set[str]:
        """Every recorded SOP Instance UID (for the start-up scan of the spool)."""
        with self.engine.connect() as conn:
            return set(conn.execute(select(instances.c.sop_instance_uid)).scalars())

    def known_instance(self, sop_instance_uid: str) -> bool:
        """True when the instance was received before or is one of our own results: one query on the C-STORE path."""
        conn = self.intake_engine.raw_connection()
        try:
            cur = conn.cursor()
            known = self._record_sql.known
            cur.execute(known.sql, known.params(sop=sop_instance_uid))
            found = cur.fetchone() is not None
            cur.close()
            conn.rollback()  # end the read (PostgreSQL opened a transaction for it)
            return found
        finally:
            conn.close()

    def instance_file(self, sop_instance_uid: str) -> str | None:
        """The spool path (relative) recorded for a received instance; None when it is not one."""
        with self.engine.connect() as conn:
            return conn.execute(
                select(instances.c.path).where(instances.c.sop_instance_uid == sop_instance_uid)
            ).scalar_one_or_none()

    def record_instance(self, rec: InstanceRecord, late_arrivals: str = "rerun", now: float | None = None) -> bool:
        """Record a stored instance and advance its study's receive window, in one transaction.

        Returns False when the SOP Instance UID was already recorded (a re-send: stored once, processed once).
        A study that already ran re-opens for a new run when ``late_arrivals`` is ``rerun``; with ``ignore`` the
        instance is recorded against the finished run and starts nothing.

        This runs on the C-STORE path once per instance, so it uses statements compiled once (:class:`_Prepared`) on
        the driver's connection; writers of this process take turns on a lock instead of SQLite's busy-wait sleeps.
        """
        now = time.time() if now is None else now
        with self._intake_lock:
            attempt = 1
            while True:
                try:
                    return self._record_once(rec, late_arrivals, now)
                except self._integrity_error:
                    # Another process (a second SCP on the same PostgreSQL store) inserted the same study or
                    # instance between our read and our write. Its row is committed now, so the next pass sees it;
                    # each pass can meet at most one more such writer (first the study's row, then the instance's).
                    if attempt == _RECORD_ATTEMPTS:
                        raise
                    attempt += 1

    def _record_once(self, rec: InstanceRecord, late_arrivals: str, now: float) -> bool:
        """One transaction: two reads, then the writes and the commit. On PostgreSQL the reads travel together and
        so do the writes with the commit (psycopg's pipeline mode): two round trips to the server instead of six."""
        q = self._record_sql
        conn = self.intake_engine.raw_connection()
        try:
            with _pipelined(conn.driver_connection):
                cur, study_cur = conn.cursor(), conn.cursor()
                if self._sqlite:
                    cur.execute("BEGIN IMMEDIATE")
                try:
                    cur.execute(q.seen.sql, q.seen.params(sop=rec.sop_instance_uid))
                    study_cur.execute(q.study.sql, q.study.params(study=rec.study_uid))
                    if cur.fetchone() is not None:
                        conn.rollback()
                        return False
                    run = self._advance_study(cur, rec, study_cur.fetchone(), late_arrivals, now)
                    values = dict(rec.__dict__, run=run, received_at=now)
                    cur.execute(q.add_instance.sql, q.add_instance.params(**values))
                    conn.commit()
                except BaseException:
                    # In pipeline mode a rollback after a failed statement reports the aborted pipeline again; the
                    # first error is the one to raise (a unique-key collision is retried by the caller).
                    with contextlib.suppress(Exception):
                        conn.rollback()
                    raise
                finally:
                    cur.close()
                    study_cur.close()
        finally:
            conn.close()
        return True

    def _advance_study(self, cur: Any, rec: InstanceRecord, row: Any, late_arrivals: str, now: float) -> int:
        """Open or extend the study's receive window (its ``row``: state and runs, None when new) for one new
        instance; returns the run it belongs to."""
        q = self._record_sql
        study = rec.study_uid
        if row is None:
            cur.execute(
                q.add_study.sql,
                q.add_study.params(
                    study=study,
                    state=StudyState.RECEIVING.value,
                    now=now,
                    calling_ae=rec.calling_ae,
                    patient_key=rec.patient_key or None,
                ),
            )
            cur.execute(q.add_event.sql, q.add_event.params(at=now, study=study, kind="received", detail=""))
            return 1
        state, runs, known_patient = row[0], row[1], row[2]
        if rec.patient_key and known_patient and known_patient != rec.patient_key:
            raise PatientConflict(study)
        if rec.patient_key and not known_patient:
            cur.execute(q.adopt_patient.sql, q.adopt_patient.params(study=study, patient_key=rec.patient_key))
        if state == StudyState.RECEIVING.value:
            cur.execute(q.touch_study.sql, q.touch_study.params(study=study, now=now))
            return int(runs) + 1
        if late_arrivals == "rerun":
            run = int(runs) + 1
            cur.execute(
                q.reopen_study.sql, q.reopen_study.params(study=study, state=StudyState.RECEIVING.value, now=now)
            )
            detail = f"late arrival: run {run}"
            cur.execute(q.add_event.sql, q.add_event.params(at=now, study=study, kind="received", detail=detail))
            return run
        detail = "late arrival ignored"
        cur.execute(q.add_event.sql, q.add_event.params(at=now, study=study, kind="late_ignored", detail=detail))
        return int(runs)

    def extend_window(self, study_uid: str, now: float | None = None) -> bool:
        """A re-sent instance of a study still receiving: the sender is at work on it, so its stable timer starts
        again (a PACS that re-sends a study after a failure sends the instances already stored first). True when
        the timer moved."""
        with self._intake_lock, self.intake_engine.begin() as conn:
            return _restart_timers(conn, now, studies.c.study_uid == study_uid) > 0

    def restart_receive_windows(self, now: float | None = None) -> int:
        """At start-up: every study still receiving gets a fresh stable timer, because the silence while the node
        was down says nothing about whether its sender had finished (it could not send). ``max_wait_seconds`` still
        counts from the first instance. Returns how many timers moved."""
        with self._tx() as conn:
            return _restart_timers(conn, now)

    # --- assembling ------------------------------------------------------------------------------------------

    def studies_ready(self, stable_seconds: float, max_wait_seconds: float, now: float | None = None) -> list[str]:
        now = time.time() if now is None else now
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(studies.c.study_uid).where(
                    and_(
                        studies.c.state == StudyState.RECEIVING.value,
                        or_(
                            studies.c.last_received_at <= now - stable_seconds,
                            studies.c.window_started_at <= now - max_wait_seconds,
                        ),
                    )
                )
            ).all()
        return [r[0] for r in rows]

    def study_instances(self, study_uid: str) -> list[InstanceRecord]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(instances).where(instances.c.study_uid == study_uid).order_by(instances.c.received_at)
            ).all()
        fields = InstanceRecord.__dataclass_fields__
        return [InstanceRecord(**{k: r._mapping[k] for k in fields}) for r in rows]

    def study_sender(self, study_uid: str, run: int) -> str | None:
        """The calling AE title that sent the study, as recorded at intake: that of the first instance received for
        ``run``, else of the study's first instance; None when none was recorded."""
        with self.engine.connect() as conn:
            first_of_run = conn.execute(
                select(instances.c.calling_ae)
                .where(instances.c.study_uid == study_uid, instances.c.run == run, instances.c.calling_ae != "")
                .order_by(instances.c.received_at)
                .limit(1)
            ).scalar_one_or_none()
            if first_of_run:
                return str(first_of_run)
            first = conn.execute(
                select(studies.c.calling_ae).where(studies.c.study_uid == study_uid)
            ).scalar_one_or_none()
        return str(first) if first else None

    def complete_study(
        self,
        study_uid: str,
        rule: str | None,
        profile: str | None = None,
        language: str | None = None,
        targets: Sequence[str] = (),
        outputs: Sequence[str] = (),
        destinations: Sequence[str] = (),
        skip_reason: str | None = None,
        now: float | None = None,
        priority: str = "routine",
    ) -> int | None:
        """Close a study's receive window and create its job (queued, or skipped with ``skip_reason``).

        Returns the job id, or None when the study was no longer receiving (another assembler got there first).
        """
        now = time.time() if now is None else now
        with self._tx() as conn:
            s = conn.execute(select(studies).where(studies.c.study_uid == study_uid).with_for_update()).first()
            if s is None or s._mapping["state"] != StudyState.RECEIVING.value:
                return None
            run = s._mapping["runs"] + 1
            conn.execute(
                update(studies)
                .where(studies.c.study_uid == study_uid)
                .values(state=StudyState.COMPLETE.value, runs=run)
            )
            listed = conn.execute(
                select(instances.c.modality, instances.c.accession_number)
                .where(instances.c.study_uid == study_uid)
                .order_by(instances.c.received_at)
            ).all()
            modalities = sorted({r[0] for r in listed if r[0]})
            accession = next((r[1] for r in listed if r[1]), None)
            state = JobState.SKIPPED if skip_reason else JobState.QUEUED
            job_id = conn.execute(
                insert(jobs).values(
                    study_uid=study_uid,
                    run=run,
                    state=state.value,
                    rule=rule,
                    priority=priority,
                    profile=profile,
                    language=language,
                    targets=json.dumps(list(targets)),
                    outputs=json.dumps(list(outputs)),
                    destinations=json.dumps(list(destinations)),
                    error=skip_reason,
                    created_at=now,
                    updated_at=now,
                    modality=" ".join(modalities)[:64] or None,
                    calling_ae=s._mapping["calling_ae"] or None,
                    accession_number=accession,
                )
            ).inserted_primary_key
            assert job_id is not None
            job_id = job_id[0]
            conn.execute(insert(events).values(at=now, study_uid=study_uid, kind="complete", detail=f"run {run}"))
            conn.execute(
                insert(events).values(
                    at=now, study_uid=study_uid, job_id=job_id, kind=state.value, detail=skip_reason or rule or ""
                )
            )
        return int(job_id)

    # --- retention ------------------------------------------------------------------------------------------

    def studies_to_purge(self, keep_seconds: float, now: float | None = None, limit: int = 100) -> list[str]:
        now = time.time() if now is None else now
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(studies.c.study_uid).where(_purgeable(now - keep_seconds)).limit(limit)
            ).all()
        return [r[0] for r in rows]

    def purge_study(
        self,
        study_uid: str,
        keep_seconds: float,
        remove: Callable[[list[str]], None],
        now: float | None = None,
        chunk: int = _PURGE_CHUNK,
    ) -> Purged | None:
        """Forget a study's instances and mark it purged, if it may still be removed; None when it may not (an
        instance arrived, a job was retried).

        ``remove`` deletes the instances' files (spool-relative paths) while the study's row is locked, ``chunk``
        files per transaction: an instance sent again meanwhile waits, then arrives as new, and is never the one
        deleted; and on SQLite, whose lock holds every writer, intake records wait for one chunk (about 0.5 ms a
        file here), not for the whole study. An instance that arrives between two chunks re-opens the study: what
        was removed by then is recorded as such, the rest stays. When ``remove`` raises, that chunk is not recorded
        and the next pass tries again.
        """
        now = time.time() if now is None else now
        cutoff = now - keep_seconds
        count = size = 0
        while True:
            with self._tx() as conn:
                row = conn.execute(
                    select(studies.c.study_uid)
                    .where(and_(studies.c.study_uid == study_uid, _purgeable(cutoff)))
                    .with_for_update()
                ).first()
                if row is None:
                    if count:
                        detail = f"{count} instance(s), {size / 1e6:.1f} MB removed; the rest stays: a new instance"
                        conn.execute(insert(events).values(at=now, study_uid=study_uid, kind="purged", detail=detail))
                    return None
                files = conn.execute(
                    select(instances.c.sop_instance_uid, instances.c.path, instances.c.size)
                    .where(instances.c.study_uid == study_uid)
                    .limit(chunk)
                ).all()
                if files:
                    remove([f[1] for f in files])
                    conn.execute(delete(instances).where(instances.c.sop_instance_uid.in_([f[0] for f in files])))
                    count += len(files)
                    size += sum(int(f[2]) for f in files)
                    continue
                job_ids = conn.execute(select(jobs.c.id).where(jobs.c.study_uid == study_uid)).scalars().all()
                conn.execute(
                    update(studies).where(studies.c.study_uid == study_uid).values(state=StudyState.PURGED.value)
                )
                detail = f"{count} instance(s), {size / 1e6:.1f} MB removed after {keep_seconds / 86400:g} day(s)"
                conn.execute(insert(events).values(at=now, study_uid=study_uid, kind="purged", detail=detail))
                return Purged(study_uid, count, size, [int(j) for j in job_ids])

    def study_state(self, study_uid: str) -> StudyState | None:
        with self.engine.connect() as conn:
            state = conn.execute(select(studies.c.state).where(studies.c.study_uid == study_uid)).scalar()
        return None if state is None else StudyState(state)

    # --- jobs ------------------------------------------------------------------------------------------------

    def job(self, job_id: int) -> JobRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(jobs).where(jobs.c.id == job_id)).first()
        return JobRecord.from_row(row) if row else None

    def queued_by_priority(self) -> dict[str, int]:
        """Jobs waiting for inference, by priority (urgent, routine)."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(jobs.c.priority, func.count()).where(jobs.c.state == JobState.QUEUED.value)
                .group_by(jobs.c.priority)
            ).all()
        counts = {"urgent": 0, "routine": 0}
        for priority, count in rows:
            counts[priority or "routine"] = counts.get(priority or "routine", 0) + int(count)
        return counts

    def list_jobs(self, states: Sequence[str] = (), limit: int = 200) -> list[JobRecord]:
        q = select(jobs).order_by(jobs.c.id.desc()).limit(limit)
        if states:
            q = q.where(jobs.c.state.in_(list(states)))
        with self.engine.connect() as conn:
            return [JobRecord.from_row(r) for r in conn.execute(q).all()]

    def job_page(
        self,
        *,
        states: Sequence[str] = (),
        since: float | None = None,
        until: float | None = None,
        modality: str | None = None,
        calling_ae: str | None = None,
        accession_number: str | None = None,
        before_id: int | None = None,
        limit: int = 50,
    ) -> list[JobRecord]:
        """One page of jobs, newest first, for the console: keyset paging (``before_id``: the last id of the previous
        page), so a page deep in 100,000 jobs costs what the first does. Filters are exact; ``modality`` matches
        one of a study's modalities."""
        q = select(jobs).order_by(jobs.c.id.desc()).limit(limit)
        if states:
            q = q.where(jobs.c.state.in_(list(states)))
        if since is not None:
            q = q.where(jobs.c.created_at >= since)
        if until is not None:
            q = q.where(jobs.c.created_at < until)
        if modality:  # one of the study's modalities, which the column holds separated by spaces
            q = q.where((literal(" ") + jobs.c.modality + literal(" ")).like(f"% {modality.strip().upper()} %"))
        if calling_ae:
            q = q.where(jobs.c.calling_ae == calling_ae)
        if accession_number:
            q = q.where(jobs.c.accession_number == accession_number)
        if before_id is not None:
            q = q.where(jobs.c.id < before_id)
        with self.engine.connect() as conn:
            return [JobRecord.from_row(r) for r in conn.execute(q).all()]

    def jobs_since(self, since: float) -> dict[str, int]:
        """Jobs created since ``since``, by state (the console's overview of the last 24 hours)."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(jobs.c.state, func.count()).where(jobs.c.created_at >= since).group_by(jobs.c.state)
            ).all()
        return {state: int(n) for state, n in rows}

    def ping(self) -> None:
        """One round trip to the database; raises when it cannot be reached."""
        with self.engine.connect() as conn:
            conn.execute(select(1)).scalar_one()

    def unfinished_jobs(self) -> list[JobRecord]:
        return self.list_jobs(UNFINISHED, limit=1_000_000)

    def transition(
        self,
        job_id: int,
        to: JobState,
        *,
        expect: Sequence[JobState] = (),
        error: str | None = None,
        detail: str = "",
        count_attempt: bool = False,
        count_redelivery: bool = False,
        owner: str | None = None,
        lease_until: float | None = None,
        result_path: str | None = None,
        now: float | None = None,
    ) -> bool:
        """Move a job to ``to`` if it is in one of ``expect`` (any state when empty). False when it was not.

        The compare-and-set is what keeps a job from being exported twice: only one caller wins each transition.
        """
        now = time.time() if now is None else now
        values: dict[str, Any] = {"state": to.value, "updated_at": now}
        if error is not None or to in (JobState.QUEUED, JobState.RUNNING, JobState.DELIVERED):
            values["error"] = error
        if count_attempt:
            values["attempts"] = jobs.c.attempts + 1
        if count_redelivery:
            values["redeliveries"] = jobs.c.redeliveries + 1
        if to is JobState.QUEUED:
            values["enqueued_at"] = None  # not in the broker yet: the next reconcile enqueues it
        if to is JobState.RUNNING:
            values["owner"], values["lease_until"] = owner, lease_until
        elif to in (JobState.QUEUED, JobState.SUCCEEDED) or to.finished:
            values["owner"], values["lease_until"] = None, None
        if result_path is not None:
            values["result_path"] = result_path
        q = update(jobs).where(jobs.c.id == job_id)
        if expect:
            q = q.where(jobs.c.state.in_([s.value for s in expect]))
        with self._tx() as conn:
            changed = conn.execute(q.values(**values)).rowcount
            if changed:
                study = conn.execute(select(jobs.c.study_uid).where(jobs.c.id == job_id)).scalar_one()
                conn.execute(
                    insert(events).values(at=now, study_uid=study, job_id=job_id, kind=to.value, detail=error or detail)
                )
        return bool(changed)

    def hold_export(
        self,
        job_id: int,
        owner: str,
        lease_until: float,
        *,
        held_by: str | None,
        detail: str,
        count_redelivery: bool = False,
        now: float | None = None,
    ) -> bool:
        """Take the export lease of a ``succeeded`` job for ``owner`` until ``lease_until``, if the lease is still
        held by ``held_by`` (None: free) as the caller read it. False when the job moved or another worker took the
        lease first: the compare-and-set on the owner is what keeps two export workers from sending one job at once.
        The job stays ``succeeded`` (see :meth:`release_export`)."""
        now = time.time() if now is None else now
        values: dict[str, Any] = {"owner": owner, "lease_until": lease_until, "updated_at": now}
        if count_redelivery:
            values["redeliveries"] = jobs.c.redeliveries + 1
        held = jobs.c.owner.is_(None) if held_by is None else jobs.c.owner == held_by
        q = update(jobs).where(jobs.c.id == job_id, jobs.c.state == JobState.SUCCEEDED.value, held).values(**values)
        with self._tx() as conn:
            changed = conn.execute(q).rowcount
            if changed:
                conn.execute(insert(events).values(at=now, job_id=job_id, kind="exporting", detail=detail))
        return bool(changed)

    def release_export(
        self, job_id: int, owner: str, *, detail: str = "", count_redelivery: bool = False
    ) -> bool:
        """Give up ``owner``'s export lease of a ``succeeded`` job (its export stopped short of delivered: a retry
        is due, or ``owner`` is gone); False when ``owner`` no longer holds it. Delivered and failed jobs have no
        owner (:meth:`transition` clears it)."""
        values: dict[str, Any] = {"owner": None, "lease_until": None, "updated_at": time.time()}
        if count_redelivery:
            values["redeliveries"] = jobs.c.redeliveries + 1
        q = update(jobs).where(
            jobs.c.id == job_id, jobs.c.state == JobState.SUCCEEDED.value, jobs.c.owner == owner
        ).values(**values)
        with self._tx() as conn:
            changed = conn.execute(q).rowcount
            if changed and detail:
                conn.execute(insert(events).values(at=time.time(), job_id=job_id, kind="export stopped", detail=detail))
        return bool(changed)

    def mark_enqueued(self, job_id: int, now: float | None = None) -> None:
        with self._tx() as conn:
            conn.execute(update(jobs).where(jobs.c.id == job_id).values(enqueued_at=now or time.time()))

    def clear_enqueued(self, job_id: int) -> None:
        """The job's next message could not be published: the next reconcile pass enqueues it (``enqueued_at`` None)."""
        with self._tx() as conn:
            conn.execute(update(jobs).where(jobs.c.id == job_id).values(enqueued_at=None))

    def note(self, job_id: int, kind: str, detail: str) -> None:
        """Record an event (a retry, a redelivery, a send attempt) without changing the job's state."""
        with self._tx() as conn:
            conn.execute(insert(events).values(at=time.time(), job_id=job_id, kind=kind, detail=detail))

    def set_error(self, job_id: int, error: str) -> None:
        with self._tx() as conn:
            conn.execute(update(jobs).where(jobs.c.id == job_id).values(error=error, updated_at=time.time()))

    def job_events(self, job_id: int) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            study = conn.execute(select(jobs.c.study_uid, jobs.c.created_at).where(jobs.c.id == job_id)).first()
            if study is None:
                return []
            rows = conn.execute(
                select(events)
                .where(
                    or_(
                        events.c.job_id == job_id,
                        and_(events.c.study_uid == study[0], events.c.job_id.is_(None)),
                    )
                )
                .order_by(events.c.id)
            ).all()
        return [dict(r._mapping) for r in rows]

    # --- results ---------------------------------------------------------------------------------------------

    def record_results(self, job_id: int, objects: Sequence[tuple[str, str, str]]) -> None:
        """Record (sop_instance_uid, kind, path) of result objects written to the outbox (idempotent)."""
        with self._tx() as conn:
            for uid, kind, path in objects:
                exists = conn.execute(
                    select(results.c.sop_instance_uid).where(results.c.sop_instance_uid == uid)
                ).first()
                if exists is None:
                    conn.execute(insert(results).values(sop_instance_uid=uid, job_id=job_id, kind=kind, path=path))

    def job_results(self, job_id: int) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(results).where(results.c.job_id == job_id)).all()
        out = []
        for r in rows:
            d = dict(r._mapping)
            d["delivered_to"] = json.loads(d["delivered_to"])
            out.append(d)
        return out

    def mark_delivered(self, sop_instance_uid: str, destination: str) -> None:
        with self._tx() as conn:
            row = conn.execute(
                select(results.c.delivered_to).where(results.c.sop_instance_uid == sop_instance_uid).with_for_update()
            ).first()
            if row is None:
                return
            done = set(json.loads(row[0]))
            done.add(destination)
            conn.execute(
                update(results)
                .where(results.c.sop_instance_uid == sop_instance_uid)
                .values(delivered_to=json.dumps(sorted(done)))
            )

    # --- counts for health and metrics -----------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            out = {
                f"jobs_{state}": n
                for state, n in conn.execute(select(jobs.c.state, func.count()).group_by(jobs.c.state)).all()
            }
            out["instances"] = conn.execute(select(func.count()).select_from(instances)).scalar_one()
            for state, n in conn.execute(select(studies.c.state, func.count()).group_by(studies.c.state)).all():
                out[f"studies_{state}"] = n
        return out
