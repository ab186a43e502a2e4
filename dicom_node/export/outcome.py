"""What a send came to: C-STORE status names and their classification, association outcomes, and the per-file
and per-batch reports that :func:`dicom_node.export.scu.send_files` (DIMSE) and
:func:`dicom_node.export.stow.send_files` (DICOMweb) return (the rules are in those modules' docstrings).

Every transient-or-permanent decision of the export is made here, without Celery: :func:`classify_store_status`
for a C-STORE response, :func:`classify_association` for an association that was not established, and
:attr:`SendReport.outcome` for a destination's whole batch, which the export step turns into a retry (transient)
or a failed job (rejected).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pynetdicom.status import STATUS_FAILURE, STATUS_SUCCESS, STATUS_WARNING, STORAGE_SERVICE_CLASS_STATUS
from pynetdicom.status import code_to_category as _category

from dicom_node.status import Status

__all__ = [
    "AssociationResult",
    "AssociationState",
    "EchoResult",
    "FileResult",
    "Outcome",
    "RejectReason",
    "RejectResult",
    "RejectSource",
    "SendReport",
    "classify_association",
    "classify_store_status",
    "status_name",
]


class Outcome(enum.StrEnum):
    DELIVERED = "delivered"
    REJECTED = "rejected"  # permanent: retrying the same object to the same peer will not help
    TRANSIENT = "transient"  # retry later


_RANGE = 0x100  # A7xx / A9xx: a base code and the 255 codes after it
_TRANSIENT_STATUSES = {Status.RESOURCE_LIMITATION, Status.DUPLICATE_INVOCATION}


def _is_out_of_resources(code: int) -> bool:
    return Status.OUT_OF_RESOURCES <= code < Status.OUT_OF_RESOURCES + _RANGE


def status_name(code: int) -> str:
    """The standard's name for a C-STORE status code (``'Refused: Out of Resources'``), or ``'Unknown'``."""
    if code == Status.SUCCESS:
        return "Success"
    return STORAGE_SERVICE_CLASS_STATUS.get(code, ("", "Unknown status"))[1] or "Unknown status"


def classify_store_status(code: int) -> Outcome:
    """What a C-STORE response status means for the sender (see the module docstring)."""
    category = _category(code)
    if category in (STATUS_SUCCESS, STATUS_WARNING):
        return Outcome.DELIVERED
    if category == STATUS_FAILURE and (_is_out_of_resources(code) or code in _TRANSIENT_STATUSES):
        return Outcome.TRANSIENT
    return Outcome.REJECTED


class AssociationState(enum.StrEnum):
    """How the association with the peer went (DIMSE), or the HTTP request (DICOMweb: one per STOW-RS request)."""

    RELEASED = "released"  # established, used, released
    ANSWERED = "answered"  # HTTP: the request got the service's answer (its objects' outcomes are in it)
    NOT_ATTEMPTED = "not_attempted"  # nothing sendable in the batch
    REFUSED = "refused"  # TCP connection refused: nothing listens on host:port
    UNREACHABLE = "unreachable"  # no route, host down, name not resolved
    TIMEOUT = "timeout"  # no TCP connection, association answer or response in time (HTTP 408 too)
    REJECTED = "rejected"  # A-ASSOCIATE-RJ permanent, HTTP 4xx: configuration error (AE titles, credentials, URL)
    BUSY = "busy"  # A-ASSOCIATE-RJ transient, HTTP 429 or 503: peer congested or at its limit
    ABORTED = "aborted"  # A-ABORT / A-P-ABORT / connection dropped
    SERVER_ERROR = "server_error"  # HTTP 5xx (but 503): the server failed to handle the request
    NO_CONTEXTS = "no_contexts"  # association accepted, but none of the SOP classes offered
    TLS_FAILED = "tls_failed"  # TLS files unusable, handshake failed or certificate not trusted

    @property
    def permanent(self) -> bool:
        """A configuration error that retrying cannot fix (see :func:`classify_association`)."""
        return classify_association(self) is Outcome.REJECTED


_PERMANENT_ASSOCIATIONS = {AssociationState.REJECTED, AssociationState.NO_CONTEXTS, AssociationState.TLS_FAILED}


def classify_association(state: AssociationState) -> Outcome:
    """What an association that was not established, in ``state``, means for every file of its batch: ``rejected``
    for a configuration error that retrying cannot fix (A-ASSOCIATE-RJ permanent, none of the SOP classes accepted,
    TLS), else ``transient`` (refused, unreachable, time-out, busy, aborted)."""
    return Outcome.REJECTED if state in _PERMANENT_ASSOCIATIONS else Outcome.TRANSIENT


class RejectSource(enum.IntEnum):
    """A-ASSOCIATE-RJ source (PS3.8 9.3.4)."""

    SERVICE_USER = 1
    SERVICE_PROVIDER_ACSE = 2
    SERVICE_PROVIDER_PRESENTATION = 3


class RejectResult(enum.IntEnum):
    PERMANENT = 1
    TRANSIENT = 2


class RejectReason(enum.Enum):
    """A-ASSOCIATE-RJ (source, reason/diag.) pairs, worded for the administrator, with what to check."""

    NO_REASON = (RejectSource.SERVICE_USER, 1, "no reason given")
    APPLICATION_CONTEXT_NOT_SUPPORTED = (
        RejectSource.SERVICE_USER,
        2,
        "application context name not supported",
    )
    CALLING_AE_NOT_RECOGNISED = (
        RejectSource.SERVICE_USER,
        3,
        "calling AE title {calling} not recognised (register it as a modality in the PACS)",
    )
    CALLED_AE_NOT_RECOGNISED = (
        RejectSource.SERVICE_USER,
        7,
        "called AE title {called} not recognised (check the destination's ae_title)",
    )
    ACSE_NO_REASON = (RejectSource.SERVICE_PROVIDER_ACSE, 1, "no reason given (ACSE)")
    PROTOCOL_VERSION_NOT_SUPPORTED = (RejectSource.SERVICE_PROVIDER_ACSE, 2, "protocol version not supported")
    TEMPORARY_CONGESTION = (RejectSource.SERVICE_PROVIDER_PRESENTATION, 1, "temporary congestion")
    LOCAL_LIMIT_EXCEEDED = (
        RejectSource.SERVICE_PROVIDER_PRESENTATION,
        2,
        "local limit exceeded (too many associations)",
    )

    @classmethod
    def describe(cls, source: int, diagnostic: int, calling: str, called: str) -> str:
        for member in cls:
            if member.value[0] == source and member.value[1] == diagnostic:
                return str(member.value[2]).format(calling=calling, called=called)
        return f"reason {diagnostic} from source {source}"


@dataclass(frozen=True)
class AssociationResult:
    state: AssociationState
    reason: str  # empty when released normally
    elapsed_s: float

    @property
    def established(self) -> bool:
        """The association was used and released, or the HTTP request answered: the files have their own outcomes."""
        return self.state in (AssociationState.RELEASED, AssociationState.ANSWERED)

    @property
    def permanent(self) -> bool:
        return self.state.permanent


@dataclass(frozen=True)
class FileResult:
    path: Path
    sop_instance_uid: str | None  # None when the file could not be read
    sop_class_uid: str | None
    outcome: Outcome
    status: int | None  # the peer's C-STORE status; None when no response was received
    status_name: str  # the standard's name of ``status``, or "" without one
    reason: str
    transfer_syntax: str | None = None  # the transfer syntax the object was sent in

    @property
    def status_hex(self) -> str:
        return "" if self.status is None else f"0x{self.status:04X}"


@dataclass
class SendReport:
    """What happened to each file of one :func:`send_files` call."""

    destination: str
    peer: str
    associations: list[AssociationResult] = field(default_factory=list)
    files: list[FileResult] = field(default_factory=list)
    elapsed_s: float = 0.0

    def _with(self, outcome: Outcome) -> list[FileResult]:
        return [f for f in self.files if f.outcome == outcome]

    @property
    def delivered(self) -> list[FileResult]:
        return self._with(Outcome.DELIVERED)

    @property
    def rejected(self) -> list[FileResult]:
        return self._with(Outcome.REJECTED)

    @property
    def transient(self) -> list[FileResult]:
        return self._with(Outcome.TRANSIENT)

    @property
    def association(self) -> AssociationResult | None:
        """The first association that was not released normally, else the last one (None: none attempted)."""
        failed = [a for a in self.associations if not a.established]
        return failed[0] if failed else (self.associations[-1] if self.associations else None)

    @property
    def outcome(self) -> Outcome:
        """``rejected`` if any file was rejected or the association failed for good, else ``transient`` if any file
        is to retry, else delivered: the export retries a destination only when this is ``transient``."""
        if self.rejected:
            return Outcome.REJECTED
        if self.transient:
            assoc = self.association
            if assoc is not None and assoc.permanent:
                return Outcome.REJECTED
            return Outcome.TRANSIENT
        return Outcome.DELIVERED

    @property
    def reason(self) -> str:
        """One line for a job's failure reason: the association's problem, else the first failed file's."""
        assoc = self.association
        if assoc is not None and assoc.reason and not assoc.established:
            return assoc.reason
        for result in self.rejected + self.transient:
            return result.reason
        return ""

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready form, for the job store and ``dicom-node jobs show``."""
        return {
            "destination": self.destination,
            "peer": self.peer,
            "outcome": self.outcome.value,
            "reason": self.reason,
            "elapsed_s": round(self.elapsed_s, 3),
            "associations": [
                {"state": a.state.value, "reason": a.reason, "elapsed_s": round(a.elapsed_s, 3)}
                for a in self.associations
            ],
            "files": [
                {
                    "path": str(f.path),
                    "sop_instance_uid": f.sop_instance_uid,
                    "sop_class_uid": f.sop_class_uid,
                    "outcome": f.outcome.value,
                    "status": f.status,
                    "status_name": f.status_name,
                    "reason": f.reason,
                    "transfer_syntax": f.transfer_syntax,
                }
                for f in self.files
            ],
        }

    def summary(self) -> str:
        return (
            f"{self.destination} ({self.peer}): {len(self.delivered)} delivered, "
            f"{len(self.rejected)} rejected, "
            f"{len(self.transient)} transient in {self.elapsed_s:.2f} s"
        )


@dataclass(frozen=True)
class EchoResult:
    destination: str
    peer: str
    ok: bool
    state: AssociationState
    reason: str  # "" when ok
    round_trip_ms: float | None  # request to response; None when no request was answered
    total_ms: float  # connect (and associate), request, release
    status: int | None = None  # C-ECHO status, or the HTTP status code
    service: str = "C-ECHO"  # what was asked: C-ECHO (DIMSE) or QIDO-RS (DICOMweb)

    def __str__(self) -> str:
        if self.ok:
            setup = "association set-up and release" if self.service == "C-ECHO" else "connection set-up"
            return (
                f"{self.destination} ({self.peer}): {self.service} ok, round trip {self.round_trip_ms:.1f} ms "
                f"({self.total_ms:.1f} ms with {setup})"
            )
        return f"{self.destination} ({self.peer}): {self.service} failed ({self.state.value}): {self.reason}"
