"""The Celery queues by name: one definition for the app, its workers' command line and the node's supervisor.

A module of its own, without Celery, so that the CLI and the supervisor name the queues without importing it.
"""

from __future__ import annotations

__all__ = ["EXPORT_QUEUE", "INFERENCE_QUEUE", "QUEUES"]

#: GPU work: a job's study through the model.
INFERENCE_QUEUE = "inference"
#: Network work: a job's result objects written and sent to its destinations.
EXPORT_QUEUE = "export"
QUEUES = (INFERENCE_QUEUE, EXPORT_QUEUE)
