"""Webhooks: the node tells HTTP endpoints when a job failed, when its results were delivered, and when the model
found something listed as urgent (``notifications.urgent_labels``).

The job store is the source: a thread of the node follows the ``events`` table (the history every process of the
node writes, workers included) and turns each ``failed`` and ``delivered`` event into notifications; nothing in
the pipeline waits for them. Each notification is a POST of a JSON body made from a Jinja2 template; one that
cannot be delivered (a refused connection, a time-out, an answer other than 2xx) is tried again with backoff
(``notifications.retry``) by a sender thread of its own webhook, so a webhook that is down delays no other.

Notifications are rows of the job store's ``notifications`` table until sent or given up, written in one
transaction with the follower's place in ``events`` (``node_state``): a node that stops, crashes or restarts
loses none, sends none twice, and on its next start also announces what the workers finished meanwhile.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jinja2
from sqlalchemy import Connection, delete, func, insert, select, update

from dicom_node.config import Settings, WebhookEvent, WebhookSettings
from dicom_node.jobs.schema import JobRecord, events, node_state, notifications
from dicom_node.jobs.store import JobStore, describe_error
from dicom_node.logs import audit, uid_hash
from sr_writer.findings import InferenceResult

__all__ = ["DEFAULT_TEMPLATE", "Notification", "Notifier", "render_body"]

log = logging.getLogger(__name__)

#: The body when a webhook names no template. Variables: event, node, job (id, state, rule, error, study hash, ...),
#: findings (label, text) for urgent_finding, console_url, at. No patient data: the study is named by a hash.
DEFAULT_TEMPLATE = """{
  "event": {{ event | tojson }},
  "node": {{ node | tojson }},
  "at": {{ at | tojson }},
  "job": {{ job | tojson }},
  "findings": {{ findings | tojson }},
  "console_url": {{ console_url | tojson }}
}"""

#: How many event ids below the newest seen are looked at again (see :meth:`Notifier.follow`).
_LOOK_BACK = 200

_env = jinja2.Environment(autoescape=False, undefined=jinja2.StrictUndefined)


def render_body(template: str | None, context: dict[str, Any]) -> bytes:
    """The JSON body of one notification; :class:`ValueError` when the template does not make valid JSON."""
    text = _env.from_string(template or DEFAULT_TEMPLATE).render(**context)
    try:
        json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"the webhook template does not render to JSON: {exc}") from None
    return text.encode("utf-8")


#: The ``node_state`` key of the last ``events`` id the follower handled.
CURSOR_KEY = "webhooks.events_cursor"
#: Sent and dropped notifications are kept this long (the console's history), then deleted.
KEEP_SECONDS = 7 * 86400


@dataclass(frozen=True)
class Notification:
    """One pending notification, as its sender reads it from the table."""

    id: int
    webhook: str
    event: str
    job_id: int | None
    body: bytes
    attempts: int


class Notifier:
    """Follows the job store's events and delivers webhooks from a background thread."""

    def __init__(self, settings: Settings, store: JobStore, console_url: str = "") -> None:
        self.settings = settings
        self.store = store
        self.console_url = console_url
        self._wake = threading.Condition()
        self._stop = threading.Event()
        self._cursor: int | None = None
        self._floor = 0  # events up to this id are all handled (or were there before the node first started)
        self._handled: set[int] = set()  # handled events above the floor
        self._pruned_at = 0.0
        self._client = httpx.Client(follow_redirects=False)
        self._threads: list[threading.Thread] = []
        #: (webhook, event, job) -> outcome of the last attempt, for the console.
        self.last: dict[str, str] = {}

    @property
    def webhooks(self) -> list[WebhookSettings]:
        return self.settings.notifications.webhooks

    def start(self, follow_seconds: float = 1.0) -> None:
        if not self.webhooks:
            return
        threads = [threading.Thread(target=self._follow_loop, args=(follow_seconds,), name="webhook-follow")]
        # One sender per webhook: one that is down or slow holds up no other.
        threads += [
            threading.Thread(target=self._send_loop, args=(hook.name,), name=f"webhook-{hook.name}")
            for hook in self.webhooks
        ]
        for t in threads:
            t.daemon = True
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        with self._wake:
            self._wake.notify_all()
        for t in self._threads:
            t.join(timeout=5)
        self._client.close()

    # --- following the events --------------------------------------------------------------------------------

    def _follow_loop(self, period: float) -> None:
        failing = False
        while not self._stop.is_set():
            try:
                self.follow()
                if failing:
                    log.warning("webhooks: the job store answers again; following its events")
                failing = False
            except Exception as exc:  # the job store is down: nothing is lost, the cursor stays where it was
                if not failing:
                    log.warning("webhooks: cannot read the job store's events: %s", describe_error(exc))
                failing = True
            self._stop.wait(period)

    def follow(self) -> int:
        """Queue the notifications of the events recorded since the last call; how many were queued. The node's
        first start ever begins at the events recorded by then (what happened before is not announced); a later
        start carries on where the last one stopped (``node_state``).

        On PostgreSQL, transactions commit in any order, so an event can become visible after one with a higher id:
        each call looks again at the last :data:`_LOOK_BACK` ids and skips the events it already handled."""
        engine = self.store.engine
        if self._cursor is None:
            with engine.begin() as conn:
                saved = conn.execute(select(node_state.c.value).where(node_state.c.key == CURSOR_KEY)).scalar()
                if saved is None:
                    newest = int(conn.execute(select(func.coalesce(func.max(events.c.id), 0))).scalar_one())
                    conn.execute(insert(node_state).values(key=CURSOR_KEY, value=str(newest)))
                    saved = newest
            self._cursor = self._floor = int(saved)
        with engine.connect() as conn:
            rows = conn.execute(
                select(events.c.id, events.c.job_id, events.c.kind)
                .where(events.c.id > self._cursor - _LOOK_BACK, events.c.kind.in_(["failed", "delivered"]))
                .order_by(events.c.id)
                .limit(500)
            ).all()
        made: list[dict[str, Any]] = []
        fresh: list[int] = []
        for event_id, job_id, kind in rows:
            if event_id in self._handled or event_id <= self._floor:
                continue
            fresh.append(int(event_id))
            job = self.store.job(int(job_id)) if job_id is not None else None
            if job is not None:
                made += self._job_event(job, kind, int(event_id))
        cursor = max([self._cursor, *(int(r[0]) for r in rows)])
        now = time.time()
        with engine.begin() as conn:  # the notifications and the new place in events, together or not at all
            for row in made:
                if not conn.execute(select(notifications.c.id).where(
                        notifications.c.webhook == row["webhook"], notifications.c.event == row["event"],
                        notifications.c.event_id == row["event_id"])).first():
                    conn.execute(insert(notifications).values(**row, state="pending", attempts=0, due_at=now,
                                                              created_at=now))
            if cursor != self._cursor:
                conn.execute(update(node_state).where(node_state.c.key == CURSOR_KEY).values(value=str(cursor)))
        self._handled.update(fresh)
        self._cursor = cursor
        self._floor = max(self._floor, self._cursor - _LOOK_BACK)
        self._handled = {i for i in self._handled if i > self._floor}
        if made:
            with self._wake:
                self._wake.notify_all()
        if now - self._pruned_at > 3600:
            with engine.begin() as conn:
                conn.execute(delete(notifications).where(notifications.c.state != "pending",
                                                         notifications.c.created_at < now - KEEP_SECONDS))
            self._pruned_at = now
        return len(made)

    def _job_event(self, job: JobRecord, kind: str, event_id: int) -> list[dict[str, Any]]:
        """The notification rows (without their state columns) one job event makes."""
        wanted: list[tuple[WebhookEvent, list[dict[str, str]]]] = []
        if kind == "failed":
            wanted.append((WebhookEvent.JOB_FAILED, []))
        elif kind == "delivered":
            wanted.append((WebhookEvent.RESULTS_DELIVERED, []))
            urgent = self._urgent_findings(job)
            if urgent:
                wanted.append((WebhookEvent.URGENT_FINDING, urgent))
        rows = []
        for event, findings in wanted:
            for hook in self.webhooks:
                if event not in hook.events:
                    continue
                try:
                    body = render_body(hook.template, self.context(event.value, job, findings))
                except (ValueError, jinja2.TemplateError) as exc:
                    log.error("webhook %s: %s event not sent: %s", hook.name, event.value, exc)
                    self.last[hook.name] = f"template error: {exc}"
                    continue
                rows.append({"webhook": hook.name, "event": event.value, "event_id": event_id, "job_id": job.id,
                             "body": body.decode("utf-8")})
        return rows

    def _urgent_findings(self, job: JobRecord) -> list[dict[str, str]]:
        labels = {label.casefold() for label in self.settings.notifications.urgent_labels}
        if not labels or not job.result_path:
            return []
        try:
            result = InferenceResult.from_json(Path(job.result_path).read_text(encoding="utf-8"))
        except (OSError, ValueError, KeyError) as exc:
            log.warning("webhooks: job %d: result unreadable for urgent findings: %s", job.id, exc)
            return []
        return [{"label": f.label, "text": f.text} for f in result.findings if f.label.casefold() in labels]

    def context(self, event: str, job: JobRecord | None, findings: list[dict[str, str]]) -> dict[str, Any]:
        described = None
        if job is not None:
            described = {
                "id": job.id, "state": job.state.value, "study": uid_hash(job.study_uid), "run": job.run,
                "rule": job.rule, "profile": job.profile, "modality": job.modality, "calling_ae": job.calling_ae,
                "error": job.error, "destinations": job.destinations, "attempts": job.attempts,
            }
        url = f"{self.console_url.rstrip('/')}/jobs/{job.id}" if self.console_url and job is not None else ""
        return {
            "event": event, "node": self.settings.node.ae_title, "at": round(time.time(), 3), "job": described,
            "findings": findings, "console_url": url,
        }

    # --- sending ---------------------------------------------------------------------------------------------

    def send_test(self, hook: WebhookSettings) -> str:
        """Send one ``test`` notification now, once (no retry); the outcome in words."""
        try:
            body = render_body(hook.template, self.context("test", None, []))
        except (ValueError, jinja2.TemplateError) as exc:
            return f"template error: {exc}"
        outcome = self._post(hook, body)
        return "delivered" if outcome is None else outcome

    def _post(self, hook: WebhookSettings, body: bytes) -> str | None:
        """POST once; None when the endpoint answered 2xx, else why not."""
        try:
            answer = self._client.post(
                hook.url.get_secret_value(), content=body, timeout=hook.timeout,
                headers={"Content-Type": "application/json", "User-Agent": "dicom-node"},
            )
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"
        if 200 <= answer.status_code < 300:
            return None
        return f"HTTP {answer.status_code}"

    def _next(self, name: str, conn: Connection) -> tuple[Notification | None, float | None]:
        """The pending notification of ``name`` due now, else None and when the next one is due (None: none)."""
        row = conn.execute(
            select(notifications.c.id, notifications.c.event, notifications.c.job_id, notifications.c.body,
                   notifications.c.attempts, notifications.c.due_at)
            .where(notifications.c.webhook == name, notifications.c.state == "pending")
            .order_by(notifications.c.due_at, notifications.c.id)
            .limit(1)
        ).first()
        if row is None:
            return None, None
        if row.due_at > time.time():
            return None, float(row.due_at)
        return Notification(int(row.id), name, row.event, row.job_id, row.body.encode("utf-8"), int(row.attempts)), None

    def _record(self, item: Notification, **values: Any) -> None:
        with self.store.engine.begin() as conn:
            conn.execute(update(notifications).where(notifications.c.id == item.id).values(**values))

    def _send_loop(self, name: str) -> None:
        hook = next(h for h in self.webhooks if h.name == name)
        policy = self.settings.notifications.retry
        failing = False
        while not self._stop.is_set():
            try:
                with self.store.engine.connect() as conn:
                    item, due = self._next(name, conn)
                failing = False
            except Exception as exc:  # the job store is away: the notifications wait in it
                if not failing:
                    log.warning("webhook %s: cannot read its notifications: %s", name, describe_error(exc))
                failing = True
                self._stop.wait(2.0)
                continue
            if item is None:
                with self._wake:
                    self._wake.wait(timeout=1.0 if due is None else max(0.0, min(1.0, due - time.time())))
                continue
            failure = self._post(hook, item.body)
            attempts = item.attempts + 1
            try:
                if failure is None:
                    self._record(item, state="sent", attempts=attempts, outcome="delivered")
                    self.last[name] = f"{item.event} delivered"
                    audit("webhook", webhook=name, notification=item.event, job=item.job_id, attempts=attempts)
                elif policy.exhausted(item.attempts):
                    self._record(item, state="dropped", attempts=attempts, outcome=failure)
                    self.last[name] = f"{item.event} dropped after {attempts} attempts: {failure}"
                    log.error("webhook %s: %s of job %s dropped after %d attempts: %s",
                              name, item.event, item.job_id, attempts, failure)
                else:
                    delay = policy.delay(item.attempts)
                    self._record(item, attempts=attempts, due_at=time.time() + delay, outcome=failure)
                    self.last[name] = f"{item.event} not delivered ({failure}); next try in {delay:.0f} s"
                    log.warning("webhook %s: %s of job %s not delivered (%s); trying again in %.0f s",
                                name, item.event, item.job_id, failure, delay)
            except Exception as exc:  # sent, but the store is away: sent again once it answers (at least once)
                log.warning("webhook %s: outcome of %s for job %s not recorded: %s", name, item.event, item.job_id,
                            describe_error(exc))
                self._stop.wait(2.0)

    @staticmethod
    def waiting(store: JobStore) -> dict[str, int]:
        """Notifications waiting to be sent (first tries and retries), by webhook name."""
        with store.engine.connect() as conn:
            rows = conn.execute(
                select(notifications.c.webhook, func.count())
                .where(notifications.c.state == "pending")
                .group_by(notifications.c.webhook)
            ).all()
        return {str(name): int(count) for name, count in rows}

    def pending(self) -> int:
        """Notifications waiting to be sent, of every webhook."""
        return sum(self.waiting(self.store).values())
