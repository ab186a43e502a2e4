"""The Celery application: two queues, thin tasks, the settings' retry policy, and the dispatcher the node uses.

- ``inference``: GPU work, one worker process per GPU, one job at a time.
- ``export``: CPU work: build the result objects and send them to the PACS.

Tasks carry a job id, never pixels (DESIGN invariant 4). The job store decides what still has to run
(invariant 3): messages may be lost (Redis flushed) or duplicated (redelivery, reconciler) and nothing breaks.
A transient failure is retried as ``queue.retry`` (:class:`dicom_node.config.RetryPolicy`) says.

``queue.broker_url: embedded`` uses kombu's filesystem transport under ``<data_dir>/broker`` (with atomic message
writes: :mod:`dicom_node.work.embedded_broker`): the same tasks and workers, with no service to install.
"""

from __future__ import annotations

import base64
import json
import logging
from typing import Any

from celery import Celery, Task
from kombu.exceptions import KombuError
from redis.exceptions import RedisError

from dicom_node.config import Settings
from dicom_node.jobs.schema import JobRecord, JobState
from dicom_node.jobs.store import describe_error, is_unreachable
from dicom_node.work import embedded_broker
from dicom_node.work.queues import EXPORT_QUEUE, INFERENCE_QUEUE
from dicom_node.work.steps import PermanentError, TransientError, WorkerContext, run_export, run_inference

__all__ = ["EXPORT_TASK", "INFERENCE_TASK", "CeleryDispatcher", "make_celery"]

log = logging.getLogger(__name__)

INFERENCE_TASK = "dicom_node.inference"
EXPORT_TASK = "dicom_node.export"


def broker_settings(settings: Settings) -> tuple[str, dict[str, Any]]:
    """The broker URL and its transport options."""
    hard = settings.queue.inference_time_limit
    if settings.queue.broker_url == "embedded" or settings.queue.broker_url.startswith("filesystem://"):
        folder = settings.node.data_dir / "broker" / "messages"
        control = settings.node.data_dir / "broker" / "control"
        for d in (folder, control):
            d.mkdir(parents=True, exist_ok=True)
        return f"{embedded_broker.SCHEME}://localhost//", {
            "data_folder_in": str(folder),
            "data_folder_out": str(folder),
            "control_folder": str(control),
        }
    return settings.queue.broker_url, {
        # Longer than the hard time limit: Redis must not hand a job still running to a second worker.
        "visibility_timeout": int(hard * 1.5 + 60),
        # One list per priority (0 urgent ... 9), taken in that order: urgent jobs overtake routine ones.
        "priority_steps": list(range(10)),
        "queue_order_strategy": "priority",
        # Fail fast when Redis is down: the job stays queued in the store and the reconciler re-enqueues it.
        "max_retries": 1,
        "socket_connect_timeout": 3,
        "socket_timeout": 10,
    }


def make_celery(settings: Settings, ctx: WorkerContext | None = None) -> Celery:
    """The Celery app for ``settings``; ``ctx`` is the worker context the tasks use (created lazily if None)."""
    broker, transport = broker_settings(settings)
    app = Celery("dicom_node", broker=broker, set_as_current=False)
    q = settings.queue
    embedded = broker.startswith(f"{embedded_broker.SCHEME}://")
    app.conf.update(
        broker_transport_options=transport,
        # The job store holds every state and result; Celery's result backend would be a second truth.
        task_ignore_result=True,
        result_backend=None,
        task_serializer="json",
        accept_content=["json"],
        # Acknowledge after the task ran: a worker that dies mid-task leaves its message to be redelivered.
        task_acks_late=True,
        # ...including when the worker process was killed (SIGKILL, out of memory).
        task_reject_on_worker_lost=True,
        # A GPU worker takes one job at a time; the next one stays in the queue for idle workers.
        worker_prefetch_multiplier=1,
        # Inference jobs can be long; export jobs are short. Soft limit first, so the task can record why.
        task_routes={
            INFERENCE_TASK: {"queue": INFERENCE_QUEUE},
            EXPORT_TASK: {"queue": EXPORT_QUEUE},
        },
        task_default_queue=INFERENCE_QUEUE,
        # Keep the broker connection alive across Redis restarts, with bounded publish retries.
        broker_connection_retry_on_startup=True,
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 1},
        # The filesystem transport has no fanout: no remote control or events on the embedded broker.
        worker_enable_remote_control=not embedded,
        worker_send_task_events=False,
        # Log worker output through the node's logging set-up.
        worker_hijack_root_logger=False,
        # A few publishing connections suffice: the node publishes from its assembler and reconciler only.
        broker_pool_limit=4,
        # A pool process that replaces a dead one (killed for memory, say) loads the model before it reports up;
        # Celery's default of 4 s killed every replacement of a model that loads slower, and the queue stalled.
        worker_proc_alive_timeout=q.worker_start_seconds,
    )
    if embedded:
        # An idle worker sleeps this long between looks at the folder: it is the embedded broker's latency floor
        # (measured per hop: 0.05 s gave 24-27 ms, 0.01 s gave 5-8 ms), for about 100 folder listings a second.
        app.conf.broker_transport_options["polling_interval"] = 0.01
    holder = ctx or WorkerContext(settings)
    policy = q.retry  # the one retry policy (config.RetryPolicy): export failures and job store outages alike

    def store_unreachable(task: Task, job_id: int, what: str, exc: BaseException) -> None:
        """The job store could not be reached, so nothing about the job could be recorded, a failure included: the
        task runs again later. Past the retries, the reconciler queues the job again once the store is back."""
        retries = int(task.request.retries or 0)
        if policy.exhausted(retries):
            log.error(
                "%s of job %d: job store unreachable after %d attempts (%s); left to the reconciler",
                what, job_id, retries + 1, describe_error(exc),
            )
            return
        delay = policy.delay(retries)
        log.warning(
            "%s of job %d: job store unreachable (%s); trying again in %.0f s", what, job_id, describe_error(exc), delay
        )
        raise task.retry(countdown=delay, max_retries=policy.max_retries) from None

    def infer(job_id: int) -> None:
        try:
            if run_inference(holder, job_id):
                job = holder.store.job(job_id)  # succeeded, unless cancelled since
                dispatcher = CeleryDispatcher(app, holder.store)
                if job is not None and job.state is JobState.SUCCEEDED and not dispatcher.submit(job):
                    holder.store.clear_enqueued(job_id)  # no export message anywhere: the next reconcile sends one
        except Exception as exc:  # process boundary: the job fails with a readable reason, once
            if is_unreachable(exc):
                raise
            log.exception("inference of job %d failed", job_id)
            holder.store.transition(
                job_id, JobState.FAILED, expect=[JobState.RUNNING], error=f"inference failed: {exc}"[:2000]
            )

    @app.task(
        name=INFERENCE_TASK,
        bind=True,
        shared=False,  # bound to this app's context; another app in the same process gets its own tasks
        soft_time_limit=q.inference_time_limit * 0.9,
        time_limit=q.inference_time_limit,
    )
    def inference_task(self: Task, job_id: int) -> None:
        try:
            infer(job_id)
        except Exception as exc:
            if not is_unreachable(exc):
                raise
            store_unreachable(self, job_id, "inference", exc)

    def export(self: Task, job_id: int) -> None:
        store = holder.store
        try:
            run_export(holder, job_id)
        except TransientError as exc:
            retries = int(self.request.retries or 0)
            store.set_error(job_id, f"attempt {retries + 1}: {exc}")
            store.note(job_id, "retry", str(exc))
            if policy.exhausted(retries):
                store.transition(
                    job_id, JobState.FAILED, expect=[JobState.SUCCEEDED],
                    error=f"export gave up after {retries + 1} attempts: {exc}",
                )
                return
            raise self.retry(countdown=policy.delay(retries), exc=exc, max_retries=policy.max_retries) from None
        except PermanentError as exc:
            store.transition(job_id, JobState.FAILED, expect=[JobState.SUCCEEDED], error=f"export failed: {exc}")
        except Exception as exc:  # process boundary
            if is_unreachable(exc):
                raise
            log.exception("export of job %d failed", job_id)
            store.transition(
                job_id, JobState.FAILED, expect=[JobState.SUCCEEDED], error=f"export failed: {exc}"[:2000]
            )

    @app.task(
        name=EXPORT_TASK,
        bind=True,
        shared=False,
        soft_time_limit=q.export_time_limit * 0.9,
        time_limit=q.export_time_limit,
        max_retries=policy.max_retries,
    )
    def export_task(self: Task, job_id: int) -> None:
        try:
            export(self, job_id)
        except Exception as exc:  # celery's Retry passes through: it is not a store error
            if not is_unreachable(exc):
                raise
            store_unreachable(self, job_id, "export", exc)

    app.conf.dicom_node_context = holder
    return app


class CeleryDispatcher:
    """Publishes a job's next task and tells which jobs the broker holds a message for.

    Never raises for the broker: a job that could not be enqueued stays as it is in the store, the failure is
    logged with its reason, and the reconciler tries again (DESIGN invariant 3).
    """

    def __init__(self, app: Celery, store: Any) -> None:
        self.app = app
        self.store = store
        self.embedded = str(app.conf.broker_url).startswith(f"{embedded_broker.SCHEME}://")

    def submit(self, job: JobRecord) -> bool:
        """Publish the job's next task (export once inference succeeded); False when the broker did not take it."""
        task, queue = (
            (EXPORT_TASK, EXPORT_QUEUE) if job.state is JobState.SUCCEEDED else (INFERENCE_TASK, INFERENCE_QUEUE)
        )
        try:
            self.app.send_task(task, args=[job.id], queue=queue, priority=queue_priority(job.priority))
        except Exception as exc:  # the broker's boundary: kombu, redis and the OS each raise their own errors
            log.warning(
                "job %d NOT enqueued: the broker did not take it (%s: %s); it stays %s in the job store and the "
                "reconciler tries again", job.id, type(exc).__name__, exc, job.state.value,
            )  # fmt: skip
            return False
        self.store.mark_enqueued(job.id)
        return True

    def queued_job_ids(self) -> set[int] | None:
        """The ids of the jobs the broker holds a task message for: waiting in a queue, or delivered to a worker
        and not acknowledged yet (tasks acknowledge late, so a running task's message is still held).

        None when it cannot tell: the broker is unreachable just now, or it is the embedded one, whose messages are
        files that survive restarts, and which a worker removes as it takes them (a running task's message is gone).
        """
        if self.embedded:
            return None
        try:
            payloads = _redis_messages(self.app)
        except (OSError, RedisError, KombuError) as exc:
            log.debug("cannot list the broker's messages: %s", exc)
            return None
        found = (_job_of(payload) for payload in payloads)
        return {job_id for job_id in found if job_id is not None}


def queue_priority(priority: str) -> int:
    """A job's priority as a message priority: 0 (urgent) is taken before 5 (routine), on Redis and embedded."""
    from inference.batching import Priority

    return Priority.of(priority)


def _redis_messages(app: Celery) -> list[dict[str, Any]]:
    """Every message of the node's two queues (all priority levels) and every delivered, unacknowledged message.

    Leans on kombu's Redis layout (5.x): one list per queue and priority step, named by ``Channel._q_for_pri``, and
    the ``unacked`` hash of ``[message, exchange, routing key]``; kept to this one function.
    """
    with app.connection_for_read() as conn:
        channel: Any = conn.default_channel
        with channel.conn_or_acquire() as client, client.pipeline() as pipe:
            for queue in (INFERENCE_QUEUE, EXPORT_QUEUE):
                for priority in channel.priority_steps:
                    pipe.lrange(channel._q_for_pri(queue, priority), 0, -1)
            pipe.hvals(channel.unacked_key)
            *waiting, unacked = pipe.execute()
    payloads: list[dict[str, Any]] = [json.loads(item) for reply in waiting for item in reply]
    payloads += [json.loads(item)[0] for item in unacked]
    return payloads


def _job_of(payload: Any) -> int | None:
    """The job id a task message of ours carries (Celery message protocol 2: body ``[args, kwargs, embed]``)."""
    try:
        if (payload.get("headers") or {}).get("task") not in (INFERENCE_TASK, EXPORT_TASK):
            return None
        body = payload["body"]
        if (payload.get("properties") or {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        return int(json.loads(body)[0][0])
    except (AttributeError, KeyError, IndexError, TypeError, ValueError):  # not a message of ours
        return None
