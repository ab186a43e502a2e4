"""The node's configuration: one YAML file, validated at start-up, overridable by environment variables.

``DICOM_NODE__SECTION__KEY`` overrides ``section.key`` of the file (``DICOM_NODE__NODE__PORT=11113``); a list or
mapping value is given as JSON (``DICOM_NODE__NODE__ALLOWED_CALLING_AETS='["PACS"]'``).

The tree is loaded once (:func:`load_settings`) and passed down explicitly; nothing holds it in a global.
"""

from __future__ import annotations

import enum
import ipaddress
import os
import re
from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import regex
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    SecretStr,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from inference.config import ModelSettings
from inference.types import Profile
from sr_writer.findings import Language
from sr_writer.kinds import ObjectKind

__all__ = [
    "AnyDestination",
    "ConfigError",
    "ConsoleSettings",
    "DestinationKind",
    "DestinationSettings",
    "DicomWebDestinationSettings",
    "KnownAESettings",
    "LoggingSettings",
    "MatchSettings",
    "NodeSettings",
    "NotificationSettings",
    "QueueSettings",
    "RetentionSettings",
    "RetryPolicy",
    "RuleSettings",
    "SenderDestinationSettings",
    "Settings",
    "StoreSettings",
    "StudySettings",
    "WebhookEvent",
    "WebhookSettings",
    "load_settings",
]

DEFAULT_CONFIG = Path(__file__).with_name("defaults.yaml")
ENV_PREFIX = "DICOM_NODE__"

_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # default character repertoire, no backslash


def _check_ae_title(value: str, what: str) -> str:
    if not _AE_TITLE.match(value) or not value.strip():
        raise ValueError(
            f"{what} must be 1 to 16 printable ASCII characters without backslash and not all spaces, got {value!r}"
        )
    return value.strip()


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NodeSettings(_Section):
    """The Storage SCP: who we are, where we listen, whom we accept, and the limits that protect the host."""

    ae_title: str = "AINODE"
    port: int = Field(11112, ge=1, le=65535)
    bind: str = "0.0.0.0"
    data_dir: Path = Path("./var")
    allowed_calling_aets: list[str] = Field(default_factory=list, description="empty: any calling AE title")
    allowed_hosts: list[str] = Field(default_factory=list, description="IP addresses or networks; empty: any")
    max_associations: int = Field(16, ge=1, le=512, description="established associations at once")
    max_pending_per_host: int = Field(
        8, ge=1, le=512,
        description="connections from one address not yet established (each ends within acse_timeout)",
    )
    max_pdu: int = Field(
        131072, ge=0, description="largest P-DATA PDU we accept; 0: up to 64 MiB (larger aborts the association)"
    )
    acse_timeout: float = Field(30, gt=0)
    dimse_timeout: float = Field(60, gt=0)
    network_timeout: float = Field(120, gt=0)
    min_free_disk_mb: int = Field(1024, ge=0, description="below this, new instances get Out of Resources")
    fsync: bool = Field(True, description="sync each instance to disk before Success; disable only for tests")
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus /metrics port; 0 turns metrics off")
    http_port: int = Field(
        0, ge=0, le=65535, description="the web console, JSON API, /healthz and /readyz; 0 turns them off"
    )
    http_bind: str = Field("127.0.0.1", description="address of the web console (the DICOM port's is `bind`)")
    http_tls: bool = Field(
        False, description="serve the console over HTTPS with tls_cert_file and tls_key_file (the DICOM TLS pair)"
    )
    tls_cert_file: Path | None = Field(None, description="our certificate (PEM): with tls_key_file, intake is TLS")
    tls_key_file: Path | None = Field(None, description="the private key (PEM) of tls_cert_file")
    tls_ca_file: Path | None = Field(None, description="CA certificates (PEM): peers must present one they signed")

    @model_validator(mode="after")
    def _tls(self) -> NodeSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError(
                f"node.tls_cert_file and node.tls_key_file go together, got tls_cert_file={self.tls_cert_file}, "
                f"tls_key_file={self.tls_key_file}"
            )
        if self.http_tls and self.tls_cert_file is None:
            raise ValueError(
                "node.http_tls: true serves the console with node.tls_cert_file and node.tls_key_file: set both"
            )
        if self.tls_ca_file is not None and self.tls_cert_file is None:
            raise ValueError(
                f"node.tls_ca_file ({self.tls_ca_file}) checks peers' certificates on a TLS intake: it needs "
                "node.tls_cert_file and node.tls_key_file"
            )
        return self

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, value: str) -> str:
        return _check_ae_title(value, "node.ae_title")

    @field_validator("allowed_calling_aets")
    @classmethod
    def _aets(cls, values: list[str]) -> list[str]:
        return [_check_ae_title(v, "node.allowed_calling_aets[]") for v in values]

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, values: list[str]) -> list[str]:
        for value in values:
            try:
                ipaddress.ip_network(value, strict=False)
            except ValueError:
                raise ValueError(
                    f"node.allowed_hosts[] must be IP addresses or networks (10.0.0.0/8), got {value!r}"
                ) from None
        return values


class StudySettings(_Section):
    """When a study counts as complete: DICOM has no end-of-study signal."""

    stable_seconds: float = Field(30, gt=0, description="complete after this long without a new instance")
    max_wait_seconds: float = Field(3600, gt=0, description="force-complete a study that keeps receiving")
    late_arrivals: Literal["ignore", "rerun"] = Field(
        "rerun", description="instances arriving after a study ran: ignore them, or start a new run"
    )

    @model_validator(mode="after")
    def _order(self) -> StudySettings:
        if self.max_wait_seconds < self.stable_seconds:
            raise ValueError(
                f"study.max_wait_seconds ({self.max_wait_seconds}) must be at least "
                f"study.stable_seconds ({self.stable_seconds})"
            )
        return self


class RetentionSettings(_Section):
    """How long the node keeps a study's files once it is done with it (the PACS is the archive, not the node)."""

    keep_days: float | None = Field(
        None, gt=0, description="remove a study's files this long after its last job finished; null keeps them"
    )
    check_seconds: float = Field(600, gt=0, description="how often to look for studies past keep_days")


class RetryPolicy(_Section):
    """When a transient failure is tried again, and how often: exponential backoff with a cap.

    The one export retry policy (PACS down or busy, an association lost), also used when the job store cannot be
    reached from a task. Attempt ``n`` (0 for the first retry) waits ``min(cap_seconds, base_seconds * 2**n)``.
    """

    base_seconds: float = Field(5.0, gt=0, description="wait before the first retry; doubled for each next one")
    cap_seconds: float = Field(300.0, gt=0, description="no wait between two attempts is longer than this")
    max_retries: int = Field(8, ge=0, description="retries of transient failures before a job fails")

    def delay(self, retries: int) -> float:
        """Seconds to wait before the retry that follows ``retries`` retries already made."""
        return float(min(self.cap_seconds, self.base_seconds * (2**retries)))

    def exhausted(self, retries: int) -> bool:
        """Whether ``retries`` retries already made leave none to try: the failure is final."""
        return retries >= self.max_retries

    def delays(self) -> list[float]:
        """Every wait, in order, of a failure that never clears (for the administrator and the tests)."""
        return [self.delay(n) for n in range(self.max_retries)]


class QueueSettings(_Section):
    """The Celery broker: ``embedded`` needs nothing installed; ``redis://host:6379/0`` scales out."""

    broker_url: str = "embedded"
    inference_time_limit: float = Field(
        1800, gt=0,
        description="hard limit of one inference job, seconds: a job past it restarts its worker (the model call is "
        "hung) and is queued again; one that hangs more than max_redeliveries times fails",
    )
    export_time_limit: float = Field(
        600, gt=0, description="hard limit of one export task, seconds; the export lease lasts 1.5 times this"
    )
    max_redeliveries: int = Field(3, ge=1, description="a job redelivered more often than this is failed")
    retry: RetryPolicy = Field(default_factory=RetryPolicy, description="backoff of transient failures")
    worker_start_seconds: float = Field(
        900, gt=0, description="how long a worker process may take to load and warm up its model before it is restarted"
    )
    start_workers: bool | None = Field(
        None, description="`serve` starts and supervises an inference and an export worker; None: only when embedded"
    )
    reconcile_seconds: float = Field(30, gt=0, description="how often the store is compared with the queue")
    inference_concurrency: int = Field(
        8, ge=1, le=256,
        description="studies one inference worker process holds at once; their images share the model's batches "
        "(model.batch_size, model.batch_wait_ms)",
    )
    urgent_calling_aets: list[str] = Field(
        default_factory=list, description="studies from these calling AE titles are urgent, whatever their rule says"
    )
    worker_metrics_port: int = Field(
        0, ge=0, le=65535,
        description="first port of the inference workers' Prometheus /metrics (the next free one is taken when "
        "several workers share a host); 0: off",
    )
    requeue_after_seconds: float = Field(
        600, gt=0, description="a queued job with no sign of a worker this long is enqueued again (lost message)"
    )
    worker_heartbeat_seconds: float = Field(
        10, gt=0, description="how often each worker records that it is alive; gone after three missed beats"
    )
    broker_check_seconds: float = Field(
        5,
        gt=0,
        description="how often queued jobs are checked against the messages Redis holds: a job whose message is "
        "gone (Redis restarted empty, flushed) is enqueued again when two checks in a row miss it",
    )

    @model_validator(mode="before")
    @classmethod
    def _legacy_max_retries(cls, data: Any) -> Any:
        """``queue.max_retries`` (before the ``queue.retry`` section): read as ``queue.retry.max_retries``."""
        if isinstance(data, Mapping) and "max_retries" in data:
            data = dict(data)
            legacy = data.pop("max_retries")
            retry = data.get("retry")
            retry = dict(retry) if isinstance(retry, Mapping) else {}
            if "max_retries" in retry and retry["max_retries"] != legacy:
                raise ValueError(
                    f"queue.max_retries ({legacy}) and queue.retry.max_retries ({retry['max_retries']}) disagree; "
                    "keep queue.retry.max_retries only"
                )
            retry.setdefault("max_retries", legacy)
            data["retry"] = retry
        return data

    @field_validator("urgent_calling_aets")
    @classmethod
    def _urgent_aets(cls, values: list[str]) -> list[str]:
        return [_check_ae_title(v, "queue.urgent_calling_aets[]") for v in values]

    @field_validator("broker_url")
    @classmethod
    def _broker(cls, value: str) -> str:
        if value == "embedded" or value.startswith(("redis://", "rediss://", "filesystem://")):
            return value
        raise ValueError(f"queue.broker_url must be 'embedded' or a redis:// URL, got {value!r}")


class StoreSettings(_Section):
    """The job store; SQLite under data_dir unless a SQLAlchemy URL (PostgreSQL) is given."""

    url: SecretStr | None = Field(None, description="SQLAlchemy URL; None: sqlite under node.data_dir")

    @field_validator("url")
    @classmethod
    def _url(cls, value: SecretStr | None) -> SecretStr | None:
        """A ``sqlite:///`` or ``postgresql://`` URL whose driver is installed; bare ``postgresql://`` gets psycopg."""
        if value is None:
            return None
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            url = make_url(value.get_secret_value())
        except ArgumentError:
            raise ValueError("not a database URL; expected sqlite:///PATH or postgresql://...") from None
        if url.drivername == "postgresql":
            url = url.set(drivername="postgresql+psycopg")
        if url.get_backend_name() not in ("sqlite", "postgresql"):
            raise ValueError("the job store runs on sqlite or postgresql")
        try:
            url.get_dialect().import_dbapi()
        except ImportError as exc:
            hint = " (pip install 'dicom-ai-node[postgresql]')" if url.get_backend_name() == "postgresql" else ""
            raise ValueError(f"its database driver is not installed: {exc}{hint}") from None
        return SecretStr(url.render_as_string(hide_password=False))


class DestinationKind(str, enum.Enum):
    """How results reach a destination: ``destinations[].kind``."""

    DIMSE = "dimse"  # C-STORE to a configured AE (the default: a destination without ``kind``)
    DICOMWEB = "dicomweb"  # STOW-RS to a DICOMweb archive
    SENDER = "sender"  # C-STORE back to the AE that sent the study, looked up in ``known_aes``


class _DimsePeer(_Section):
    """Where a DICOM AE listens, and how we associate with it (plain TCP or DICOM TLS)."""

    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    calling_ae_title: str | None = Field(None, description="our AE title towards this peer; None: node.ae_title")
    tls: bool = False
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    timeout: float = Field(30, gt=0)


class DestinationSettings(_DimsePeer):
    """A DICOM peer that receives our results (C-STORE), usually the PACS that sent the study."""

    name: str
    kind: Literal[DestinationKind.DIMSE] = DestinationKind.DIMSE

    @field_validator("ae_title", "calling_ae_title")
    @classmethod
    def _ae(cls, value: str | None) -> str | None:
        return None if value is None else _check_ae_title(value, "destinations[].ae_title")

    @model_validator(mode="after")
    def _tls(self) -> DestinationSettings:
        if self.tls and self.tls_ca_file is None:
            raise ValueError(f"destination {self.name!r}: tls: true needs tls_ca_file")
        return self


class KnownAESettings(_DimsePeer):
    """An AE that sends us studies and takes results back (``known_aes``): where a ``kind: sender`` destination
    sends the results of a study this AE sent."""

    @field_validator("ae_title", "calling_ae_title")
    @classmethod
    def _ae(cls, value: str | None) -> str | None:
        return None if value is None else _check_ae_title(value, "known_aes[].ae_title")

    @model_validator(mode="after")
    def _tls(self) -> KnownAESettings:
        if self.tls and self.tls_ca_file is None:
            raise ValueError(f"known AE {self.ae_title!r}: tls: true needs tls_ca_file")
        return self

    def as_destination(self, name: str) -> DestinationSettings:
        """This AE as the DIMSE destination ``name`` (the ``kind: sender`` destination it stands in for)."""
        return DestinationSettings(name=name, **self.model_dump())


class DicomWebDestinationSettings(_Section):
    """A DICOMweb archive that receives our results by STOW-RS (PS3.18 10.5), through ``dicomweb-client``.

    ``url`` is the service's base (STOW-RS posts to ``{url}/studies``). TLS certificates are verified unless
    ``tls_verify: false``, which the node logs as a warning at every export; ``tls_ca_file`` is the CA bundle to trust
    instead of requests' default (certifi's, or the file ``REQUESTS_CA_BUNDLE`` names). Credentials are secrets:
    never logged, shown as ``**********``.
    """

    name: str
    kind: Literal[DestinationKind.DICOMWEB]
    url: str = Field(description="DICOMweb base URL, e.g. https://vna.example.org/dicom-web")
    auth: Literal["none", "basic", "bearer"] = "none"
    username: str | None = Field(None, description="auth: basic")
    password: SecretStr | None = Field(None, description="auth: basic")
    token: SecretStr | None = Field(None, description="auth: bearer")
    tls_verify: bool = Field(True, description="verify the server's certificate; false only for tests (warned)")
    tls_ca_file: Path | None = Field(
        None, description="CA bundle (PEM) to verify the server with; None: certifi's, or REQUESTS_CA_BUNDLE's"
    )
    tls_cert_file: Path | None = Field(None, description="our client certificate (PEM), with tls_key_file")
    tls_key_file: Path | None = None
    timeout: float = Field(30, gt=0, description="seconds to connect, and to wait for each answer")
    objects_per_request: int = Field(16, ge=1, le=1000, description="result objects sent in one STOW-RS request")
    max_request_mb: float = Field(
        64, gt=0, description="a request holds objects up to this size in all (a larger object goes alone)"
    )

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        parts = urlsplit(value.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        if parts.username is not None or parts.password is not None:
            raise ValueError("must not hold credentials: use auth: basic with username and password")
        if parts.query or parts.fragment:
            raise ValueError("must be the DICOMweb base URL, without query or fragment")
        if "[" in parts.netloc:  # dicomweb-client reads the host up to the first colon
            raise ValueError("cannot name an IPv6 address in brackets (dicomweb-client cannot): use a host name")
        try:
            parts.port  # noqa: B018  (raises ValueError on a bad port)
        except ValueError:
            raise ValueError("has an invalid port") from None
        return value.strip().rstrip("/")

    @model_validator(mode="after")
    def _credentials(self) -> DicomWebDestinationSettings:
        who = f"destination {self.name!r}"
        if self.auth == "basic" and (not self.username or self.password is None):
            raise ValueError(f"{who}: auth: basic needs username and password")
        if self.auth == "bearer" and self.token is None:
            raise ValueError(f"{who}: auth: bearer needs token")
        unused = [
            key
            for key, used in (
                ("username", self.auth == "basic"), ("password", self.auth == "basic"), ("token", self.auth == "bearer")
            )
            if getattr(self, key) is not None and not used
        ]  # fmt: skip
        if unused:
            raise ValueError(f"{who}: {', '.join(unused)} given but auth is {self.auth!r}; set auth or remove them")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError(f"{who}: tls_cert_file and tls_key_file go together")
        tls_files = [k for k in ("tls_ca_file", "tls_cert_file", "tls_key_file") if getattr(self, k) is not None]
        if tls_files and not self.https:
            raise ValueError(f"{who}: {', '.join(tls_files)} apply to https:// URLs only, got {self.url}")
        if self.tls_ca_file is not None and not self.tls_verify:
            raise ValueError(f"{who}: tls_ca_file verifies the server, but tls_verify is false; keep one")
        return self

    @property
    def https(self) -> bool:
        return self.url.startswith("https://")

    def warnings(self) -> list[str]:
        """What an administrator should know about this destination's security (config check, every export)."""
        found = []
        if self.https and not self.tls_verify:
            found.append(
                f"destination {self.name!r}: tls_verify is false: the server's certificate is not checked, so "
                "anyone on the path can read the results and the credentials"
            )
        if not self.https and self.auth != "none":
            found.append(f"destination {self.name!r}: {self.auth} credentials go over plain http to {self.url}")
        return found


class SenderDestinationSettings(_Section):
    """Results back to the AE that sent the study (its calling AE title, recorded at intake), by C-STORE to where
    ``known_aes`` says that AE listens: one node serving several PACS, each getting its own studies' results."""

    name: str
    kind: Literal[DestinationKind.SENDER]


def _destination_kind(value: Any) -> str:
    """The tag of a ``destinations[]`` entry: its ``kind``; ``dimse`` when it has none (configurations before
    DICOMweb had only DIMSE destinations)."""
    kind = value.get("kind", DestinationKind.DIMSE) if isinstance(value, Mapping) else getattr(value, "kind", None)
    return str(kind.value if isinstance(kind, DestinationKind) else kind)


AnyDestination = Annotated[
    Annotated[DestinationSettings, Tag(DestinationKind.DIMSE.value)]
    | Annotated[DicomWebDestinationSettings, Tag(DestinationKind.DICOMWEB.value)]
    | Annotated[SenderDestinationSettings, Tag(DestinationKind.SENDER.value)],
    Discriminator(
        _destination_kind,
        custom_error_type="destination_kind",
        custom_error_message="kind must be dimse (the default), dicomweb or sender",
    ),
]
"""One ``destinations[]`` entry, by its ``kind``."""


class MatchSettings(_Section):
    """What a rule matches; every given criterion must hold (lists: any of; regexes: search, case-insensitive)."""

    modality: list[str] = Field(default_factory=list)
    sop_class: list[str] = Field(default_factory=list, description="SOP Class UIDs or pydicom keywords")
    body_part: list[str] = Field(default_factory=list)
    study_description: str | None = None
    series_description: str | None = None
    calling_ae: list[str] = Field(default_factory=list)

    @field_validator("study_description", "series_description")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        """Compiled by the engine that searches it (the ``regex`` package, under a time limit: see rules.py)."""
        if value is not None:
            try:
                regex.compile(value, regex.IGNORECASE)
            except regex.error as exc:
                raise ValueError(f"not a valid regular expression ({exc}): {value!r}") from None
        return value


class RuleSettings(_Section):
    """A routing rule: which studies to process, with which task profile, language and outputs."""

    name: str
    match: MatchSettings = Field(default_factory=MatchSettings)
    profile: Profile = Profile.GROUNDED_REPORT
    language: Language = Language.ENGLISH
    targets: list[str] = Field(default_factory=list, description="structures to locate (text_to_region)")
    outputs: list[ObjectKind] = Field(default_factory=lambda: [ObjectKind.SR, ObjectKind.GSPS])
    destinations: list[str] = Field(default_factory=list, description="destination names; empty: all")
    priority: Literal["urgent", "routine"] = Field(
        "routine", description="urgent jobs overtake routine ones in the queue and in a worker's batches"
    )


class ConsoleSettings(_Section):
    """Sessions and log-ins of the web console (served on ``node.http_port``)."""

    secret_key: SecretStr | None = Field(
        None, description="signs session cookies; None: a random key kept in data_dir/console.key"
    )
    session_hours: float = Field(12, gt=0, description="a session ends this long after its log-in")
    max_failed_logins: int = Field(5, ge=1, description="wrong passwords in a row that lock an account")
    lockout_minutes: float = Field(
        15, ge=0,
        description="a locked account opens again by itself after this long (so wrong guesses cannot keep every "
        "administrator out); 0: it stays locked until an administrator sets its password",
    )


class WebhookEvent(str, Enum):
    JOB_FAILED = "job_failed"
    RESULTS_DELIVERED = "results_delivered"
    URGENT_FINDING = "urgent_finding"


class WebhookSettings(_Section):
    """One HTTP endpoint told about jobs: a POST of a JSON body, retried with backoff while it cannot be reached."""

    name: str = Field(min_length=1)
    url: SecretStr = Field(description="http(s) URL; kept secret, as such URLs often carry a token")
    events: list[WebhookEvent] = Field(
        default_factory=lambda: [WebhookEvent.JOB_FAILED, WebhookEvent.RESULTS_DELIVERED]
    )
    template: str | None = Field(
        None, description="a Jinja2 template of the JSON body; None: the node's own (dicom_node/console/webhooks.py)"
    )
    timeout: float = Field(5, gt=0, description="seconds one POST may take")

    @field_validator("url")
    @classmethod
    def _url(cls, value: SecretStr) -> SecretStr:
        if not re.match(r"^https?://[^\s/]+", value.get_secret_value()):
            raise ValueError("url must be an http:// or https:// URL")
        return value

    @field_validator("template")
    @classmethod
    def _template(cls, value: str | None) -> str | None:
        if value is not None:
            import jinja2

            try:
                jinja2.Environment().parse(value)
            except jinja2.TemplateSyntaxError as exc:
                raise ValueError(f"template is not a valid Jinja2 template: {exc}") from None
        return value


class NotificationSettings(_Section):
    webhooks: list[WebhookSettings] = Field(default_factory=list)
    urgent_labels: list[str] = Field(
        default_factory=list,
        description="finding labels (case-insensitive) that count as urgent: an urgent_finding notification each",
    )
    retry: RetryPolicy = Field(
        default_factory=lambda: RetryPolicy(base_seconds=2, cap_seconds=300, max_retries=20),
        description="backoff of a webhook that cannot be reached",
    )


class LoggingSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    json_format: bool = Field(False, description="one JSON object per line, for log shippers")


class Settings(BaseSettings):
    """The whole configuration tree of one node."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", case_sensitive=False
    )

    node: NodeSettings = Field(default_factory=NodeSettings)
    study: StudySettings = Field(default_factory=StudySettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    queue: QueueSettings = Field(default_factory=QueueSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    destinations: list[AnyDestination] = Field(default_factory=list)
    known_aes: list[KnownAESettings] = Field(
        default_factory=list, description="AEs that send studies, where kind: sender destinations return results"
    )
    rules: list[RuleSettings] = Field(default_factory=list)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    console: ConsoleSettings = Field(default_factory=ConsoleSettings)
    notifications: NotificationSettings = Field(default_factory=NotificationSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file's values arrive as init kwargs; environment variables win over them.
        return env_settings, init_settings

    @model_validator(mode="after")
    def _cross_checks(self) -> Settings:
        if self.model.export_dir is None:  # exports live with the node's other data unless placed elsewhere
            self.model.export_dir = self.node.data_dir / "model-exports"
        names = [d.name for d in self.destinations]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"destinations[].name must be unique, repeated: {duplicated}")
        hooks = [w.name for w in self.notifications.webhooks]
        repeated = sorted({n for n in hooks if hooks.count(n) > 1})
        if repeated:
            raise ValueError(f"notifications.webhooks[].name must be unique, repeated: {repeated}")
        for rule in self.rules:
            unknown = [d for d in rule.destinations if d not in names]
            if unknown:
                raise ValueError(f"rule {rule.name!r} names unknown destinations {unknown}; known: {names}")
        aets = [a.ae_title for a in self.known_aes]
        repeated = sorted({a for a in aets if aets.count(a) > 1})
        if repeated:
            raise ValueError(f"known_aes[].ae_title must be unique, repeated: {repeated}")
        senders = [d.name for d in self.destinations if isinstance(d, SenderDestinationSettings)]
        if senders and not self.known_aes:
            raise ValueError(
                f"destination {senders[0]!r} (kind: sender) returns results to the AE that sent the study, looked "
                "up in known_aes, which is empty: list the sending AEs there (ae_title, host, port)"
            )
        return self

    def destination(self, name: str) -> AnyDestination | None:
        """The destination called ``name``, or None."""
        return next((d for d in self.destinations if d.name == name), None)

    def known_ae(self, ae_title: str) -> KnownAESettings | None:
        """The ``known_aes`` entry of ``ae_title``, or None."""
        return next((a for a in self.known_aes if a.ae_title == ae_title), None)

    @property
    def data_dir(self) -> Path:
        return self.node.data_dir

    @property
    def store_url(self) -> str:
        if self.store.url is not None:
            return self.store.url.get_secret_value()
        return f"sqlite:///{(self.node.data_dir / 'jobs.sqlite').resolve()}"


class ConfigError(Exception):
    """The configuration cannot be used; the message names the key, the bad value and what is allowed."""


_URL_PASSWORD = re.compile(r"(//[^:/@\s]*:)[^@\s]*@")
_SECRET_KEYS = {"password", "token"}  # their values never appear in an error message (nor in a log)
_KIND_TAGS = {k.value for k in DestinationKind}


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for err in exc.errors():
        loc = _without_tags(err["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        value = err.get("input")
        shown = repr(value) if not isinstance(value, Mapping) else "{...}"
        shown = _URL_PASSWORD.sub(r"\1***@", shown)  # a database or broker URL's password stays out of logs
        if _SECRET_KEYS & {str(p) for p in loc}:
            shown = "'***'"
        if len(shown) > 80:
            shown = shown[:77] + "..."
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling against config/node.example.yaml)"
        lines.append(f"  {key}: {msg} (got {shown}{_from_environment(loc)})")
    return "\n".join(lines)


def _without_tags(loc: tuple[int | str, ...]) -> tuple[int | str, ...]:
    """``destinations.0.dicomweb.url`` -> ``destinations.0.url``: the union's tag is not a key of the file."""
    return tuple(
        p for i, p in enumerate(loc) if not (i == 2 and loc[0] == "destinations" and p in _KIND_TAGS)
    )


def _from_environment(loc: tuple[int | str, ...]) -> str:
    """``", from DICOM_NODE__SECTION__KEY"`` when that environment variable set the value at ``loc``."""
    wanted = ENV_PREFIX + "__".join(str(p).upper() for p in loc[:2])
    named = [name for name in os.environ if name.upper() == wanted]
    return f", from {named[0]}" if named and len(loc) >= 2 else ""


def _read_yaml(source: Path) -> dict[str, Any]:
    try:
        text = Path(source).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {source}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"configuration file {source} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"configuration file {source} must hold a mapping of sections, got {type(data).__name__}")
    return data


def _lay_over(data: dict[str, Any], layer: Mapping[str, Any]) -> None:
    """Sections of ``layer`` over ``data``: mappings merge key by key, anything else (a list) replaces."""
    for section, values in layer.items():
        if isinstance(values, Mapping) and isinstance(data.get(section), Mapping):
            data[section] = {**data[section], **values}
        else:
            data[section] = values


def load_settings(path: Path | None = None, overrides: Mapping[str, Any] | None = None) -> Settings:
    """Read, merge and validate the configuration.

    The embedded defaults (``dicom_node/defaults.yaml``) come first, the file at ``path`` over them, environment
    variables over both; ``overrides`` (used by tests) are laid over the file at section level.
    """
    data = _read_yaml(DEFAULT_CONFIG)
    source = path or DEFAULT_CONFIG
    if path is not None:
        _lay_over(data, _read_yaml(path))
    _lay_over(data, overrides or {})
    try:
        settings = Settings(**data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, str(source))) from None
    if not settings.node.data_dir.is_absolute() and path is not None:
        # A relative data_dir in a file is relative to the working directory, as users expect from the CLI.
        settings.node.data_dir = Path.cwd() / settings.node.data_dir
    return settings
