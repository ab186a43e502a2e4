"""The Storage SCP: Verification and every Storage SOP class, with durable intake.

Handlers are plain functions bound to an :class:`Intake`; they run on the association's thread, so they only
validate, write and record (DESIGN invariant 4): no pixel decoding, no inference, no network calls.

Success is returned only after the instance is synced to disk and recorded in the job store (invariant 1); a failed
write answers Out of Resources, never Success.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import ssl
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from io import BytesIO
from threading import Lock
from typing import Any, cast

from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, evt
from pynetdicom.acse import ACSE
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RQ, DIMSEMessage
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node.config import NodeSettings, StudySettings
from dicom_node.intake.header import Header, read_header
from dicom_node.intake.reactor import make_event_driven
from dicom_node.intake.spool import InvalidUIDError, Spool, Staged, StagingFile, check_uid
from dicom_node.intake.transport import ConnectionGuard, GuardedSocket, guard_of, install_guard, quiet_refused_threads
from dicom_node.jobs.store import InstanceRecord, JobStore, PatientConflict, describe_error, patient_key
from dicom_node.logs import audit, uid_hash
from dicom_node.tls import server_context

__all__ = ["ACCEPTED_TRANSFER_SYNTAXES", "Intake", "Status", "start_scp", "tune_association"]

log = logging.getLogger(__name__)

#: What the node accepts and stores as received: uncompressed, deflated, RLE, JPEG, JPEG-LS and JPEG 2000.
ACCEPTED_TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    RLELossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
]


class Status:
    """C-STORE / C-ECHO status codes the node answers with (PS3.4 B.2.3 and C.4.2.1.4)."""

    SUCCESS = 0x0000
    PROCESSING_FAILURE = 0x0110  # Failure: Processing failure (PS3.7 C.4.1.1.4), with an Error Comment
    OUT_OF_RESOURCES = 0xA700  # Refused: Out of Resources (storage: disk full, write or record failed)
    DATASET_MISMATCH = 0xA900  # Error: Data Set does not match SOP Class
    CANNOT_UNDERSTAND = 0xC000  # Error: Cannot understand (malformed, truncated, bad UIDs)



_PREAMBLE = b"\x00" * 128 + b"DICM"

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


class AccessPolicy:
    """Who may open an association: calling AE titles and source addresses (empty lists allow any)."""

    def __init__(self, settings: NodeSettings) -> None:
        self.calling = {a.strip() for a in settings.allowed_calling_aets}
        self.networks = [ipaddress.ip_network(h, strict=False) for h in settings.allowed_hosts]

    def refusal(self, address: str, calling_ae: str) -> str | None:
        if self.calling and calling_ae.strip() not in self.calling:
            return f"calling AE title {calling_ae.strip()!r} is not in node.allowed_calling_aets"
        if self.networks:
            try:
                ip = ipaddress.ip_address(address)
            except ValueError:
                return f"source address {address!r} is not an IP address"
            if not any(ip in net for net in self.networks):
                return f"source address {address} is not in node.allowed_hosts"
        return None


class Refusals:
    """Every refused connection and association: counted by reason, audited, and logged at most once a minute per
    source address and reason, with the count of those not logged (a peer that retries in a loop floods nothing).

    Reasons: ``called_ae``, ``calling_ae`` (characters an AE title cannot have), ``application_context``,
    ``not_allowed`` (allow-lists), ``association_limit``, ``pending_limit`` (too many connections still
    negotiating), ``garbage``, ``pdu_too_large``, ``message_too_large`` (a command set, or a data set of a message
    the node has no use for, beyond its bound), ``acse_timeout``, ``stalled``, ``tls_handshake``, and
    ``no_request`` (closed before asking for an association: port checks, logged at INFO and not counted as a
    rejected association).
    """

    LOG_EVERY = 60.0

    def __init__(self, counters: IntakeCounters) -> None:
        self._counters = counters
        self._lock = Lock()
        self.by_reason: Counter[str] = Counter()
        self._logged: dict[tuple[str, str], list[float]] = {}  # (address, reason:kind) -> [logged at, unlogged]

    def record(self, reason: str, address: str, detail: str, calling_ae: str = "", kind: str = "") -> None:
        """``kind``: a finer reason whose lines are limited apart (the TLS library's reason, say)."""
        now = time.monotonic()
        with self._lock:
            self.by_reason[reason] += 1
            key = (address, f"{reason}:{kind}")
            entry = self._logged.get(key)
            if entry is not None and now - entry[0] < self.LOG_EVERY:
                entry[1] += 1
                unlogged = None
            else:
                unlogged = 0 if entry is None else int(entry[1])
                if len(self._logged) >= 4096:  # bounded whatever the number of sources
                    self._logged = {k: v for k, v in self._logged.items() if now - v[0] < self.LOG_EVERY}
                self._logged[key] = [now, 0]
        if reason != "no_request":
            self._counters.add(rejected_associations=1)
        audit("association_rejected", address=address, calling_ae=calling_ae, reason=reason, detail=detail)
        if unlogged is not None:
            more = f" (and {unlogged} more from {address} for this reason in the last minute)" if unlogged else ""
            level = logging.INFO if reason == "no_request" else logging.WARNING
            who = f"{address} ({calling_ae})" if calling_ae else address
            log.log(level, "connection from %s refused, %s: %s%s", who, reason, detail, more)


# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4: permanent rejections by the service user, and the
# transient one of the service provider for a local limit.
_RJ_CONTEXT_NAME = (0x01, 0x01, 0x02)  # application-context-name-not-supported
_RJ_CALLING = (0x01, 0x01, 0x03)  # calling-AE-title-not-recognized
_RJ_CALLED = (0x01, 0x01, 0x07)  # called-AE-title-not-recognized
_RJ_LIMIT = (0x02, 0x03, 0x02)  # rejected-transient, local-limit-exceeded
#: The DICOM Application Context Name (PS3.7 A.2.1): the only one a DICOM peer may propose.
_DICOM_APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
#: pynetdicom's own association limit, which counts every connection's thread, established or not; the node's
#: limit (established associations only) is applied by :class:`_PolicyACSE`.
_PYNETDICOM_NO_LIMIT = 1_000_000


class _PolicyACSE(ACSE):
    """ACSE that checks an association request before pynetdicom negotiates its contexts, and refuses it with a
    proper A-ASSOCIATE-RJ, recorded with its reason (see :meth:`Intake.association_refusal`)."""

    def __init__(self, assoc: Association, intake: Intake) -> None:
        super().__init__(assoc)
        self._intake = intake

    def _negotiate_as_acceptor(self) -> None:
        refusal = self._intake.association_refusal(self.assoc, self.requestor.primitive)
        if refusal is None:
            super()._negotiate_as_acceptor()
            return
        reason, detail, rsd = refusal
        calling = str(getattr(self.requestor.primitive, "calling_ae_title", "") or "").strip()
        self._intake.refusals.record(reason, self.assoc.requestor.address, detail, calling_ae=calling)
        guard = guard_of(self.assoc)
        if guard is not None:
            guard.refusal = reason
        self.requestor.ae_title = calling
        self.send_reject(*rsd)
        evt.trigger(self.assoc, evt.EVT_REJECTED, {})
        self.assoc.kill()


def _short_element(element: int, vr: bytes, value: bytes) -> bytes:
    """One group 0002 element in explicit VR little endian with a 2-byte length (UL, UI, SH)."""
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def file_head(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
    """Preamble, ``DICM`` and the File Meta Information (PS3.10 7.1) of a received instance.

    The same elements and bytes as pynetdicom's ``Event.file_meta`` written by pydicom, which took 0.2 to 0.5 ms per
    instance on the C-STORE path; a test holds the two equal.
    """

    def padded(text: str, pad: bytes) -> bytes:
        raw = text.encode("ascii")
        return raw + pad if len(raw) % 2 else raw

    elements = b"".join(
        (
            struct.pack("<HH2s2sI", 0x0002, 0x0001, b"OB", b"\0\0", 2) + b"\x00\x01",
            _short_element(0x0002, b"UI", padded(sop_class_uid, b"\0")),
            _short_element(0x0003, b"UI", padded(sop_instance_uid, b"\0")),
            _short_element(0x0010, b"UI", padded(transfer_syntax, b"\0")),
            _short_element(0x0012, b"UI", padded(PYNETDICOM_IMPLEMENTATION_UID, b"\0")),
            _short_element(0x0013, b"SH", padded(PYNETDICOM_IMPLEMENTATION_VERSION, b" ")),
        )
    )
    return _PREAMBLE + _short_element(0x0000, b"UL", struct.pack("<I", len(elements))) + elements


class Intake:
    """The C-STORE/C-ECHO handlers' state: spool, job store, settings, counters."""

    def __init__(
        self,
        node: NodeSettings,
        study: StudySettings,
        spool: Spool,
        store: JobStore,
        on_stored: Callable[[str], None] | None = None,
    ) -> None:
        self.node = node
        self.study = study
        self.spool = spool
        self.store = store
        self.counters = IntakeCounters()
        self.refusals = Refusals(self.counters)
        self.policy = AccessPolicy(node)
        self._on_stored = on_stored
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

        def text(kw: str, limit: int) -> str:
            value = header.get(kw)
            return "" if value is None else str(value).strip()[:limit]

        record = InstanceRecord(
            sop_instance_uid=sop_uid,
            study_uid=study_uid,
            series_uid=series_uid,
            sop_class_uid=sop_class,
            transfer_syntax=syntax,
            modality=text("Modality", 16),
            body_part=text("BodyPartExamined", 64),
            study_description=text("StudyDescription", 128),
            series_description=text("SeriesDescription", 128),
            calling_ae=calling,
            path=self.spool.relative(path),
            size=size,
            patient_key=patient_key(header.get("PatientID"), header.get("IssuerOfPatientID")),
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
        if self._on_stored is not None:
            self._on_stored(study_uid)
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

    # --- association events (audit) ----------------------------------------------------------------------------

    def association_refusal(self, assoc: Association, request: Any) -> tuple[str, str, tuple[int, int, int]] | None:
        """Why an association request is refused (reason, detail, A-ASSOCIATE-RJ result/source/diagnostic), or
        None: the called AE title (its characters as sent were checked by the socket), the application context,
        the allow-lists, and the association limit, which counts established associations only."""
        called = str(getattr(request, "called_ae_title", "") or "").strip()
        if called != self.node.ae_title.strip():
            return "called_ae", f"called AE title {called!r} is not {self.node.ae_title!r}", _RJ_CALLED
        context = str(getattr(request, "application_context_name", "") or "")
        if context != _DICOM_APPLICATION_CONTEXT:
            return "application_context", f"application context {context[:64]!r} is not DICOM's", _RJ_CONTEXT_NAME
        calling = str(getattr(request, "calling_ae_title", "") or "")
        why = self.policy.refusal(assoc.requestor.address, calling)
        if why is not None:
            return "not_allowed", why, _RJ_CALLING
        established = sum(
            1 for a in assoc.ae.active_associations if a.is_acceptor and a.is_established and a is not assoc
        )
        if established >= self.node.max_associations:
            return "association_limit", f"{established} associations already (node.max_associations)", _RJ_LIMIT
        return None

    def guard_for(self, address: str) -> ConnectionGuard:
        """The bounds of a new connection from ``address``."""
        node = self.node
        return ConnectionGuard(
            address=address,
            max_pdu=node.max_pdu,
            acse_timeout=node.acse_timeout,
            network_timeout=node.network_timeout,
            on_refusal=lambda guard, reason, detail: self.refusals.record(reason, guard.address, detail),
        )

    def on_conn_open(self, event: Any) -> None:
        assoc = event.assoc
        tune_association(assoc, self.guard_for(assoc.requestor.address))
        assoc.acse = _PolicyACSE(assoc, self)
        if type(assoc.dimse) is DIMSEServiceProvider:  # large C-STORE data sets go to the spool as they arrive
            assoc.dimse.__class__ = _SpoolingDIMSE
            cast(_SpoolingDIMSE, assoc.dimse).spool = self.spool

    def on_accepted(self, event: Any) -> None:
        self.counters.add(associations=1)
        r = event.assoc.requestor
        audit("association_accepted", address=r.address, calling_ae=r.ae_title.strip())

    def on_released(self, event: Any) -> None:
        _drop_unfinished(event.assoc)
        r = event.assoc.requestor
        audit("association_released", address=r.address, calling_ae=r.ae_title.strip())

    def on_aborted(self, event: Any) -> None:
        _drop_unfinished(event.assoc)
        r = event.assoc.requestor
        audit("association_aborted", address=r.address, calling_ae=r.ae_title.strip())
        log.warning("association from %s (%s) aborted", r.address, r.ae_title.strip())


class _SpooledDataSet(BytesIO):
    """The data set of a C-STORE request: held in memory up to :attr:`SPOOL_ABOVE` bytes, then written to the
    spool's ``.incoming`` as its fragments arrive.

    pynetdicom collects a message's data set in a BytesIO (its primitives require one) and hands it over when the
    last fragment is in: a 2 GB whole-slide image would need 2 GB of memory per association, more while the BytesIO
    grows. Past the threshold, pynetdicom's network thread writes the File Meta (the bytes of :func:`file_head`),
    what it held and each further fragment to a :class:`StagingFile`, so memory stays bounded whatever the size, and
    the disk writes while the rest arrives. Measured (``bench/bench_large_instance.py`` and the same node with every
    data set spooled or none): a 537 MB instance arrives in 0.31x the time with 0.19x the peak memory; series of
    4, 8 and 16 MB instances in 0.83x, 0.89x and 0.77x the time; 2 MB ones took 1.06x and 514 KB CT slices showed
    no gain, so smaller data sets stay in memory and the handler stages them itself. Messages other than C-STORE
    requests are always held in memory.
    """

    #: Data sets larger than this many bytes go to the spool while they arrive.
    SPOOL_ABOVE = 3 * 1024 * 1024

    def __init__(self, spool: Spool, assoc: Association, message: DIMSEMessage) -> None:
        super().__init__()
        self._spool = spool
        self._assoc = assoc
        self._message = message
        self._staging: StagingFile | None = None
        self._error: OSError | None = None
        self.head_length = 0

    def write(self, data: Any) -> int:
        if self._staging is None and self._error is None:
            if not isinstance(self._message, C_STORE_RQ):  # no use to the node: held, up to a bound
                if self.tell() + len(data) > MAX_OTHER_DATASET:
                    why = f"a data set of over {MAX_OTHER_DATASET} bytes that is not a C-STORE request's"
                    if _abort(self._assoc, "message_too_large", why):
                        self.seek(0)
                        self.truncate()
                        return len(data)
                return super().write(data)
            if self.tell() + len(data) <= self.SPOOL_ABOVE:
                return super().write(data)
            self._open()
        if self._staging is not None:
            try:
                self._staging.write(data)
            except OSError as exc:
                self._fail(exc)
        return len(data)

    def _open(self) -> None:
        command = self._message.command_set
        syntax = next(
            (str(cx.transfer_syntax[0]) for cx in self._assoc.accepted_contexts
             if cx.context_id == self._message.context_id),
            "",
        )
        sop_uid = str(command.AffectedSOPInstanceUID or "").strip().rstrip("\x00")
        head = file_head(str(command.AffectedSOPClassUID or ""), sop_uid, syntax)
        self.head_length = len(head)
        try:
            self._staging = self._spool.open_staging(self._assoc.requestor.ae_title.strip())
            self._staging.write(head)
            with self.getbuffer() as held:
                self._staging.write(held)
        except OSError as exc:
            self._fail(exc)
        self.seek(0)
        self.truncate()  # what was held is in the file now

    def _fail(self, exc: OSError) -> None:
        log.error("writing a received instance to %s failed: %s", self._spool.incoming, exc)
        self._error = exc
        if self._staging is not None:
            self._staging.discard()
            self._staging = None

    def staged(self) -> Staged | OSError | None:
        """The spooled file for the handler (it then owns it), the write's error, or None when held in memory."""
        if self._error is not None:
            return self._error
        if self._staging is None:
            return None
        staging, self._staging = self._staging, None
        try:
            return staging.finish()
        except OSError as exc:
            staging.discard()
            return exc

    def discard(self) -> None:
        """Drop a file whose transfer never completed (the association ended first)."""
        if self._staging is not None:
            self._staging.discard()
            self._staging = None


class _SpoolingDIMSE(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider, with each message's data set a :class:`_SpooledDataSet` (installed per
    association on EVT_CONN_OPEN, as the socket tuning is)."""

    spool: Spool

    def receive_primitive(self, primitive: Any) -> None:
        guard = guard_of(self.assoc)
        if guard is not None and guard.refusal is not None:
            return  # aborted: what is still in flight is dropped
        if self.message is None:
            self.message = DIMSEMessage()
            self.message.data_set = _SpooledDataSet(self.spool, self.assoc, self.message)
        held = self.message.encoded_command_set.tell()
        command = sum(len(data) - 1 for _, data in primitive.presentation_data_value_list if data and data[0] & 1)
        if held + command > MAX_COMMAND_SET and _abort(
            self.assoc, "message_too_large", f"a command set of over {MAX_COMMAND_SET} bytes"
        ):
            return
        super().receive_primitive(primitive)

    def drop_unfinished(self) -> None:
        message = self.message
        if message is not None and isinstance(message.data_set, _SpooledDataSet):
            message.data_set.discard()


#: Longest command set the node holds (a C-STORE request's is about 200 bytes).
MAX_COMMAND_SET = 64 * 1024
#: Longest data set of a message other than a C-STORE request that the node holds (it serves Storage and
#: Verification only: no other message's data set is of use).
MAX_OTHER_DATASET = 1024 * 1024


def _abort(assoc: Association, reason: str, detail: str) -> bool:
    """Abort the association for a message beyond the node's bounds; False when its socket has no guard."""
    sock = assoc.dul.socket
    if not isinstance(sock, GuardedSocket):
        return False
    sock.abort(reason, detail)
    return True


def _drop_unfinished(assoc: Association) -> None:
    """Remove the staged file of a transfer the association ended in the middle of (its peer got no Success)."""
    if isinstance(assoc.dimse, _SpoolingDIMSE):
        assoc.dimse.drop_unfinished()


def tune_association(assoc: Association, guard: ConnectionGuard | None = None) -> None:
    """Bounds and network tuning for one accepted association (on EVT_CONN_OPEN, before its threads start):
    reads within ``guard``'s limits (by default, the association's own timeouts and maximum PDU, refusals unrecorded)
    and reactor threads that wait for work."""
    if guard is None:
        guard = ConnectionGuard(
            address=assoc.requestor.address,
            max_pdu=assoc.ae.maximum_pdu_size,
            acse_timeout=float(assoc.acse_timeout or 30),
            network_timeout=float(assoc.network_timeout or 60),
            on_refusal=lambda *_: None,
        )
    install_guard(assoc, guard)
    make_event_driven(assoc)


def build_ae(node: NodeSettings) -> AE:
    """The pynetdicom AE of the SCP: every Storage SOP class with the accepted transfer syntaxes, and Verification."""
    ae = AE(ae_title=node.ae_title)
    for context in AllStoragePresentationContexts:
        assert context.abstract_syntax is not None
        ae.add_supported_context(context.abstract_syntax, ACCEPTED_TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.require_called_aet = True
    ae.maximum_associations = node.max_associations
    ae.maximum_pdu_size = node.max_pdu
    ae.acse_timeout = node.acse_timeout
    ae.dimse_timeout = node.dimse_timeout
    ae.network_timeout = node.network_timeout
    return ae


def max_negotiating(node: NodeSettings) -> int:
    """How many connections, from all addresses together, may be negotiating at once: twice
    ``node.max_associations``, at least 32 (a refused or closed connection's thread takes a moment to end)."""
    return max(2 * node.max_associations, 32)


class _IntakeServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, with the DICOM TLS handshake on each connection's own thread.

    pynetdicom runs the handshake while accepting, on the one thread that accepts every connection: a peer that
    connected and never finished its handshake held up all the others until it went away. Here each connection's
    thread does it, within the ACSE time-out; a failed one is logged and counted as a rejected association.
    """

    #: The listen backlog (socketserver's default is 5): a burst of more connections than that, faster than the
    #: accept loop takes them, had its SYNs dropped and retried after 1 s (measured: the 7th of 12 connections
    #: opened back to back waited 1014 ms).
    request_queue_size = 128

    tls: ssl.SSLContext | None = None
    intake: Intake
    _starting: Counter[str]
    _starting_lock: threading.Lock

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Whether to serve a new connection: no more than ``node.max_pending_per_host`` connections from one
        address, and :func:`max_negotiating` from all, may be negotiating at once (each ends within
        ``node.acse_timeout``), so that hosts that connect and stall cannot take every place. A connection refused
        here is closed at once (there is no association to reject yet) and recorded.

        Negotiating: association threads not yet established, and connections accepted whose thread has not
        started its association yet (a TLS handshake, or just started). A connection is counted twice for the moment
        between its association thread's start and its accepting thread's end: a burst may be refused a little
        early, never late."""
        address = str(client_address[0])
        node = self.intake.node
        pending = [
            a.requestor.address
            for a in self.ae.active_associations
            if a.is_acceptor and not (a.is_established or a.is_released or a.is_aborted or a.is_rejected)
        ]
        with self._starting_lock:
            from_host = sum(1 for a in pending if a == address) + self._starting[address]
            in_all = len(pending) + self._starting.total()
            if from_host >= node.max_pending_per_host:
                why = f"{from_host} connections from this address are still negotiating (node.max_pending_per_host)"
            elif in_all >= max_negotiating(node):
                why = f"{in_all} connections are still negotiating (at most {max_negotiating(node)})"
            else:
                self._starting[address] += 1
                return True
        self.intake.refusals.record("pending_limit", address, why)
        return False

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            if self.tls is not None:
                request = self._handshake(request, client_address)
                if request is None:
                    return
            super().process_request_thread(request, client_address)
        finally:
            with self._starting_lock:  # its association thread (if any) now counts itself
                address = str(client_address[0])
                self._starting[address] -= 1
                if self._starting[address] <= 0:
                    del self._starting[address]

    def _handshake(self, raw: socket.socket, client_address: Any) -> ssl.SSLSocket | None:
        assert self.tls is not None
        address = str(client_address[0])
        timeout = raw.gettimeout()
        conn: socket.socket = raw
        try:
            raw.settimeout(self.intake.node.acse_timeout)
            try:
                began = bool(raw.recv(1, socket.MSG_PEEK))
            except ConnectionResetError:
                began = False
            if not began:  # closed before its first byte: a port check (monitoring, a load balancer), not a peer
                self.intake.refusals.record("no_request", address, "closed before its TLS handshake began")
                raw.close()
                return None
            conn = secure = self.tls.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
            secure.do_handshake()
            secure.settimeout(timeout)
        except OSError as exc:  # ssl.SSLError, a time-out or a reset: no association, the next connection is served
            why = _handshake_failure(exc)
            kind = str(getattr(exc, "reason", None) or type(exc).__name__)
            self.intake.refusals.record("tls_handshake", address, f"TLS handshake failed: {why}", kind=kind)
            with contextlib.suppress(OSError):
                conn.close()
            return None
        return secure


#: OpenSSL's reasons for a failed server-side handshake that an administrator meets, in the node's words.
_HANDSHAKE_REASONS = {
    "WRONG_VERSION_NUMBER": "the peer did not start TLS (plain DICOM sent to a TLS port?)",
    "HTTP_REQUEST": "the peer did not start TLS (plain DICOM sent to a TLS port?)",
    "CERTIFICATE_VERIFY_FAILED": "the peer's certificate is not signed by a CA in node.tls_ca_file",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "the peer sent no certificate, and node.tls_ca_file requires one",
    "UNSUPPORTED_PROTOCOL": "the peer offered only TLS versions older than 1.2",
    "NO_SHARED_CIPHER": "the peer offered no cipher suite the node accepts",
}


def _handshake_failure(exc: OSError) -> str:
    if isinstance(exc, TimeoutError):
        return "no handshake within node.acse_timeout"
    reason = getattr(exc, "reason", None)
    if reason in _HANDSHAKE_REASONS:
        return f"{_HANDSHAKE_REASONS[reason]} ({reason})"
    return str(exc) or type(exc).__name__


def start_scp(intake: Intake) -> ThreadedAssociationServer:
    """Start listening (non-blocking); returns the server, whose ``shutdown()`` stops it.

    :class:`dicom_node.tls.TLSConfigError` when ``node.tls_*`` names a file that cannot be used."""
    tls = server_context(intake.node)
    ae = build_ae(intake.node)
    # The called AE title and the association limit are checked by _PolicyACSE, which records each refusal and
    # counts established associations only.
    ae.require_called_aet = False
    ae.maximum_associations = _PYNETDICOM_NO_LIMIT
    quiet_refused_threads()
    handlers: list[Any] = [
        (evt.EVT_C_STORE, intake.on_c_store),
        (evt.EVT_C_ECHO, intake.on_c_echo),
        (evt.EVT_CONN_OPEN, intake.on_conn_open),
        (evt.EVT_ACCEPTED, intake.on_accepted),
        (evt.EVT_RELEASED, intake.on_released),
        (evt.EVT_ABORTED, intake.on_aborted),
    ]
    # What ae.start_server(block=False) does, with the server class that does the TLS handshake per connection.
    server = ae.make_server((intake.node.bind, intake.node.port), evt_handlers=handlers, server_class=_IntakeServer)
    assert isinstance(server, _IntakeServer)
    server.tls, server.intake = tls, intake
    server._starting, server._starting_lock = Counter(), threading.Lock()
    thread = threading.Thread(target=server.serve_forever, name=f"IntakeServer@{server.server_address[1]}")
    thread.daemon = True
    thread.start()
    ae._servers.append(server)  # so that server.shutdown(), which removes it there, works as pynetdicom's own
    log.info(
        "listening as %s on %s:%d%s (max %d associations)",
        intake.node.ae_title,
        intake.node.bind,
        server.server_address[1],
        " with DICOM TLS" + (", peer certificates required" if intake.node.tls_ca_file else "") if tls else "",
        intake.node.max_associations,
    )
    return server


def wait_forever(stop: Callable[[], bool], interval: float = 0.5) -> None:
    while not stop():
        time.sleep(interval)
