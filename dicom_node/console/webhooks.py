"""Webhooks: the node tells HTTP endpoints when a job failed, when its results were delivered, and when the model
found something listed as urgent (``notifications.urgent_labels``).

The job store is the source: a thread of the node follows the ``events`` table (the history every process of the
node writes, workers included) and turns each ``failed`` and ``delivered`` event into notifications; nothing in
the pipeline waits for them. Each notification is a POST of a JSON body made from a Jinja2 template; one that
cannot be delivered (a refused connection, a time-out, an answer other than 2xx) is tried again with backoff
(``notifications.retry``) from a queue of its own, so a webhook that is down delays no other.
"""

from __future__ import annotations

import heapq
import itertools
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jinja2
from sqlalchemy import func, select

from dicom_node.config import Settings, WebhookEvent, WebhookSettings
from dicom_node.jobs.schema import JobRecord, events
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


@dataclass(order=True)
class Notification:
    due: float
    seq: int
    webhook: WebhookSettings = field(compare=False)
    event: str = field(compare=False)
    body: bytes = field(compare=False)
    job_id: int | None = field(compare=False, default=None)
    attempts: int = field(compare=False, default=0)


class Notifier:
    """Follows the job store's events and delivers webhooks from a background thread."""

    def __init__(self, settings: Settings, store: JobStore, console_url: str = "") -> None:
        self.settings = settings
        self.store = store
        self.console_url = console_url
        self._queues: dict[str, list[Notification]] = {hook.name: [] for hook in settings.notifications.webhooks}
        self._seq = itertools.count()
        self._lock = threading.Condition()
        self._stop = threading.Event()
        self._cursor: int | None = None
        self._floor = 0  # events up to this id are all handled (or were there before the node started)
        self._handled: set[int] = set()  # handled events above the floor
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
        with self._lock:
            self._lock.notify_all()
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
        """Queue the notifications of the events recorded since the last call; how many were queued. The first
        call starts from the events recorded by then (what happened before the node started is not re-sent).

        On PostgreSQL, transactions commit in any order, so an event can become visible after one with a higher id:
        each call looks again at the last :data:`_LOOK_BACK` ids and skips the events it already handled."""
        with self.store.engine.connect() as conn:
            if self._cursor is None:
                self._cursor = self._floor = int(
                    conn.execute(select(func.coalesce(func.max(events.c.id), 0))).scalar_one()
                )
                return 0
            rows = conn.execute(
                select(events.c.id, events.c.job_id, events.c.kind)
                .where(events.c.id > self._cursor - _LOOK_BACK, events.c.kind.in_(["failed", "delivered"]))
                .order_by(events.c.id)
                .limit(500)
            ).all()
        queued = 0
        for event_id, job_id, kind in rows:
            if event_id in self._handled or event_id <= self._floor:
                continue
            self._handled.add(int(event_id))
            job = self.store.job(int(job_id)) if job_id is not None else None
            if job is not None:
                queued += self._job_event(job, kind)
        if rows:
            self._cursor = max(self._cursor, int(rows[-1][0]))
        self._floor = max(self._floor, self._cursor - _LOOK_BACK)
        self._handled = {i for i in self._handled if i > self._floor}
        return queued

    def _job_event(self, job: JobRecord, kind: str) -> int:
        wanted: list[tuple[WebhookEvent, list[dict[str, str]]]] = []
        if kind == "failed":
            wanted.append((WebhookEvent.JOB_FAILED, []))
        elif kind == "delivered":
            wanted.append((WebhookEvent.RESULTS_DELIVERED, []))
            urgent = self._urgent_findings(job)
            if urgent:
                wanted.append((WebhookEvent.URGENT_FINDING, urgent))
        queued = 0
        for event, findings in wanted:
            for hook in self.webhooks:
                if event in hook.events:
                    self.enqueue(hook, event.value, self.context(event.value, job, findings), job.id)
                    queued += 1
        return queued

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

    def enqueue(self, hook: WebhookSettings, event: str, context: dict[str, Any], job_id: int | None = None) -> None:
        try:
            body = render_body(hook.template, context)
        except (ValueError, jinja2.TemplateError) as exc:
            log.error("webhook %s: %s event not sent: %s", hook.name, event, exc)
            self.last[hook.name] = f"template error: {exc}"
            return
        with self._lock:
            heapq.heappush(
                self._queues[hook.name], Notification(time.time(), next(self._seq), hook, event, body, job_id)
            )
            self._lock.notify_all()

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

    def _send_loop(self, name: str) -> None:
        policy = self.settings.notifications.retry
        queue = self._queues[name]
        while not self._stop.is_set():
            with self._lock:
                while not self._stop.is_set() and (not queue or queue[0].due > time.time()):
                    self._lock.wait(timeout=queue[0].due - time.time() if queue else None)
                if self._stop.is_set():
                    return
                item = heapq.heappop(queue)
            failure = self._post(item.webhook, item.body)
            if failure is None:
                self.last[name] = f"{item.event} delivered"
                audit("webhook", webhook=name, notification=item.event, job=item.job_id, attempts=item.attempts + 1)
                continue
            if policy.exhausted(item.attempts):
                self.last[name] = f"{item.event} dropped after {item.attempts + 1} attempts: {failure}"
                log.error("webhook %s: %s of job %s dropped after %d attempts: %s",
                          name, item.event, item.job_id, item.attempts + 1, failure)
                continue
            delay = policy.delay(item.attempts)
            self.last[name] = f"{item.event} not delivered ({failure}); next try in {delay:.0f} s"
            log.warning("webhook %s: %s of job %s not delivered (%s); trying again in %.0f s",
                        name, item.event, item.job_id, failure, delay)
            item.attempts += 1
            item.due = time.time() + delay
            with self._lock:
                heapq.heappush(queue, item)

    def pending(self) -> int:
        with self._lock:
            return sum(len(q) for q in self._queues.values())
