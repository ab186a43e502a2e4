"""The C-STORE and C-ECHO handlers: whether to answer Success, and what to keep.

:class:`Intake` holds what the handlers need (spool, job store, settings, counters); :meth:`Intake.on_c_store`
and :meth:`Intake.on_c_echo` are bound to pynetdicom's events by :func:`dicom_node.intake.server.start_scp`, which
wires the association events apart. The handlers run on the association's thread, so they only validate, write and
record (DESIGN invariant 4): no pixel decoding, no inference, no network calls.

Success is returned only after the instance is synced to disk and recorded in the job store (invariant 1); a failed
write answers Out of Resources, never Success.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from threading import Lock
from typing import Any

from pydicom.dataset import Dataset

from dicom_node.config import NodeSettings, StudySettings
from dicom_node.intake.header import Header, read_header
from dicom_node.intake.server import AccessPolicy, Refusals
from dicom_node.intake.spool import InvalidUIDError, Spool, Staged, check_uid, file_head
from dicom_node.intake.transport import _SpooledDataSet
from dicom_node.jobs.schema import InstanceRecord
from dicom_node.jobs.store import JobStore, PatientConflict, describe_error
from dicom_node.logs import audit, uid_hash
from dicom_node.status import Status

__all__ = ["Intake", "IntakeCounters"]

log = logging.getLogger(__name__)


@dataclass
class IntakeCounters:
    """What the SCP did since start; read by health and metrics."""

    stored: int = 0
    duplicates: int = 0
    failed: int = 0
    #: instances refused because they name another patient than their study's earlier instances
    patient_conflicts: int = 0
    #: re-sent instances whose bytes differ from the stored copy's (which is kept)
    differing_duplicates: int = 0
    associations: int = 0
    rejected_associations: int = 0
    bytes: int = 0
    #: C-STORE requests handled and the seconds their handler took in all (validate, write, sync, record).
    handled: int = 0
    handler_seconds: float = 0.0
    lock: Lock = field(default_factory=Lock, repr=False)

    def add(self, **deltas: float) -> None:
        with self.lock:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)


class Intake:
    """The C-STORE/C-ECHO handlers' state: spool, job store, settings, counters."""

    def __init__(
        self,
        node: NodeSettings,
        study: StudySettings,
        spool: Spool,
        store: JobStore,
    ) -> None:
        self.node = node
        self.study = study
        self.spool = spool
        self.store = store
        self.counters = IntakeCounters()
        self.refusals = Refusals(self.counters)
        self.policy = AccessPolicy(node)
        self._min_free = node.min_free_disk_mb * 1024 * 1024
        self._instance_locks = [Lock() for _ in range(64)]

    # --- handlers ---------------------------------------------------------------------------------------------

    def on_c_echo(self, event: Any) -> int:
        return Status.SUCCESS

    def on_c_store(self, event: Any) -> int | Dataset:
        """Validate, write durably, record; answer Success only when all three are done."""
        started = time.perf_counter()
        calling = event.assoc.requestor.ae_title.strip()
        try:
            return self._store(event, calling)
        except Exception:  # process boundary: the peer gets a failure status, the node keeps serving
            log.exception("C-STORE from %s failed unexpectedly", calling)
            self.counters.add(failed=1)
            return Status.OUT_OF_RESOURCES
        finally:
            self.counters.add(handled=1, handler_seconds=time.perf_counter() - started)

    def _refuse(self, status: int, calling: str, sop_uid: str, why: str, comment: str = "") -> int | Dataset:
        """Count and log a refused C-STORE; the status to answer, with ``comment`` as its Error Comment if given."""
        log.warning("C-STORE from %s refused (0x%04X) for instance %s: %s", calling, status, uid_hash(sop_uid), why)
        self.counters.add(failed=1)
        if not comment:
            return status
        answer = Dataset()
        answer.Status = status
        answer.ErrorComment = comment[:64]  # LO
        return answer

    def _known(self, sop_uid: str) -> bool | str:
        """Whether the instance is stored already, or why the job store could not say (then no Success)."""
        try:
            return self.store.known_instance(sop_uid)
        except Exception as exc:  # the database is down or refuses: no Success without a record
            return f"job store unavailable: {describe_error(exc)}"

    def _store(self, event: Any, calling: str) -> int | Dataset:
        request = event.request
        data_set = request.DataSet
        # A large data set was written to .incoming while it arrived (or the write failed); None: held in memory.
        spooled = data_set.staged() if isinstance(data_set, _SpooledDataSet) else None
        with contextlib.ExitStack() as cleanup:
            if isinstance(spooled, Staged):
                cleanup.callback(spooled.discard)  # refused or a re-send; a no-op once committed
            raw_sop = str(request.AffectedSOPInstanceUID or "")
            try:
                sop_uid = check_uid(raw_sop, "Affected SOP Instance UID")
            except InvalidUIDError as exc:
                return self._refuse(Status.CANNOT_UNDERSTAND, calling, raw_sop, str(exc))
            if self._min_free and self.spool.free_bytes() < self._min_free:
                known = self._known(sop_uid)
                if isinstance(known, str):
                    return self._refuse(Status.OUT_OF_RESOURCES, calling, sop_uid, known)
                if known:  # a re-send needs no room
                    self.counters.add(duplicates=1)
                    return Status.SUCCESS
                why = f"free disk below node.min_free_disk_mb ({self.node.min_free_disk_mb} MB)"
                return self._refuse(Status.OUT_OF_RESOURCES, calling, sop_uid, why)
            if isinstance(spooled, OSError):
                return self._refuse(Status.OUT_OF_RESOURCES, calling, sop_uid, f"write failed: {spooled.strerror}")
            if spooled is not None:
                staged = spooled  # its header is read from the page cache
                whole = cleanup.enter_context(memoryview(cleanup.enter_context(spooled.mapped())))
                body = cleanup.enter_context(whole[data_set.head_length :])
            else:
                # Held in memory: the preamble and File Meta, then the data set exactly as received, are staged, so
                # that the disk writes them while the header is read. (Staging on a second thread measured 15%
                # slower on two cores.)
                head = file_head(str(request.AffectedSOPClassUID), sop_uid, str(event.context.transfer_syntax))
                body = cleanup.enter_context(data_set.getbuffer())
                try:
                    staged = self.spool.stage((head, body), source_ae=calling)
                except OSError as exc:
                    return self._refuse(Status.OUT_OF_RESOURCES, calling, sop_uid, f"write failed: {exc.strerror}")
                cleanup.callback(staged.discard)
            return self._admit(event, calling, sop_uid, staged, body)

    def _admit(self, event: Any, calling: str, sop_uid: str, staged: Staged, body: memoryview) -> int | Dataset:
        """Check the header, then commit the staged file and record it; returns the status to answer."""
        request = event.request
        syntax = event.context.transfer_syntax
        try:
            header = read_header(body, str(syntax))
        except Exception as exc:  # HeaderError, or pydicom's many kinds for the rare syntaxes it reads
            return self._refuse(Status.CANNOT_UNDERSTAND, calling, sop_uid, f"data set cannot be decoded: {exc}")
        problem = header.encoding_problem(syntax)
        if problem is not None:
            return self._refuse(Status.CANNOT_UNDERSTAND, calling, sop_uid, problem, comment=problem)
        try:
            study_uid = check_uid(header.get("StudyInstanceUID"), "Study Instance UID")
            series_uid = check_uid(header.get("SeriesInstanceUID"), "Series Instance UID")
            if str(header.get("SOPInstanceUID") or "").strip() != sop_uid:
                raise InvalidUIDError("SOP Instance UID in the data set differs from the C-STORE request's")
        except InvalidUIDError as exc:
            return self._refuse(Status.CANNOT_UNDERSTAND, calling, sop_uid, str(exc))
        sop_class = str(request.AffectedSOPClassUID)
        if header.get("SOPClassUID") is not None and str(header.get("SOPClassUID")).strip() != sop_class:
            return self._refuse(Status.DATASET_MISMATCH, calling, sop_uid, "SOP Class UID differs from the request's")
        expected = None if syntax.is_compressed else header.native_pixel_bytes()
        if header.pixel_length is not None and expected is not None and header.pixel_length < expected:
            return self._refuse(
                Status.DATASET_MISMATCH,
                calling,
                sop_uid,
                f"Pixel Data is truncated: {header.pixel_length} bytes, the header needs {expected}",
            )

        # One copy of a SOP Instance UID at a time from here: whether it is new, its move into the spool and its
        # record are one decision, so that copies arriving together end with a record that describes the file.
        with self._instance_locks[hash(sop_uid) % len(self._instance_locks)]:
            return self._keep(calling, sop_uid, study_uid, series_uid, sop_class, str(syntax), header, staged)

    def _keep(
        self,
        calling: str,
        sop_uid: str,
        study_uid: str,
        series_uid: str,
        sop_class: str,
        syntax: str,
        header: Header,
        staged: Staged,
    ) -> int | Dataset:
        """Store a new instance (commit, then record) or acknowledge a re-sent one; the status to answer."""
        known = self._known(sop_uid)
        if isinstance(known, str):
            return self._refuse(Status.OUT_OF_RESOURCES, calling, sop_uid, known)
        if known:
            self._resent(calling, sop_uid, study_uid, staged)
            return Status.SUCCESS

        path = self.spool.path_for(study_uid, series_uid, sop_uid)
        try:
            staged.commit(path)
        except OSError as exc:
            return self._refuse(Status.OUT_OF_RESOURCES, calling, sop_uid, f"write failed: {exc.strerror}")
        size = staged.size

        record = InstanceRecord.from_header(
            header,
            sop_instance_uid=sop_uid,
            study_uid=study_uid,
            series_uid=series_uid,
            sop_class_uid=sop_class,
            transfer_syntax=syntax,
            calling_ae=calling,
            path=self.spool.relative(path),
            size=size,
        )
        try:
            recorded = self.store.record_instance(record, late_arrivals=self.study.late_arrivals)
        except PatientConflict as exc:  # never part of that study: the file goes, the PACS is told why
            self.spool.remove([record.path])
            self.counters.add(patient_conflicts=1)
            audit("instance_refused", calling_ae=calling, instance=uid_hash(sop_uid), study=uid_hash(study_uid),
                  reason="patient_conflict")
            return self._refuse(Status.PROCESSING_FAILURE, calling, sop_uid, f"study {uid_hash(study_uid)}: {exc}",
                                comment="Patient ID differs from the study's other instances")
        except Exception as exc:  # the file is safe on disk; the peer must resend, the start-up scan records it
            why = describe_error(exc)
            log.error("instance %s written but not recorded in the job store: %s", uid_hash(sop_uid), why)
            self.counters.add(failed=1)
            return Status.OUT_OF_RESOURCES
        if not recorded:  # another node process on the same job store recorded it between our check and now
            log.warning("instance %s was recorded by another process meanwhile; the file is this copy",
                        uid_hash(sop_uid))
            self.counters.add(duplicates=1)
            return Status.SUCCESS
        self.counters.add(stored=1, bytes=size)
        return Status.SUCCESS

    def _resent(self, calling: str, sop_uid: str, study_uid: str, staged: Staged) -> None:
        """A copy of an instance already stored: kept as it was, the study's timer extended, and a copy whose bytes
        differ from the stored one's logged and counted (the PACS changed it, or two sources disagree)."""
        self.counters.add(duplicates=1)
        differs = self._differs_from_stored(sop_uid, staged)
        if differs:
            self.counters.add(differing_duplicates=1)
            log.warning(
                "instance %s from %s is already stored with other content (%s); the stored copy is kept",
                uid_hash(sop_uid), calling, differs,
            )
            audit("instance_differs", calling_ae=calling, instance=uid_hash(sop_uid), study=uid_hash(study_uid),
                  reason=differs)
        else:
            log.info("instance %s from %s already stored; not processed again", uid_hash(sop_uid), calling)
        try:
            self.store.extend_window(study_uid)
        except Exception as exc:  # stored already: the answer is Success whatever the timer does
            log.warning("study %s: stable timer not extended: %s", uid_hash(study_uid), describe_error(exc))

    def _differs_from_stored(self, sop_uid: str, staged: Staged) -> str | None:
        """How a re-sent copy differs from the stored file (None: the same bytes, or nothing to compare with)."""
        try:
            stored = self.store.instance_file(sop_uid)
            if stored is None:  # one of the node's own results, sent back to it
                return None
            path = self.spool.resolve(stored)
            size = path.stat().st_size
            if size != staged.size:
                return f"{staged.size} bytes, the stored copy {size}"
            with open(path, "rb") as existing, staged.mapped() as new:
                offset = 0
                while chunk := existing.read(1 << 20):
                    if new[offset : offset + len(chunk)] != chunk:
                        return f"same size, different bytes from offset {offset}"
                    offset += len(chunk)
        except Exception as exc:  # comparing is a courtesy: a failure to compare never fails the C-STORE
            log.warning("instance %s: re-sent copy not compared with the stored one: %s", uid_hash(sop_uid), exc)
        return None
