"""An inference worker's Prometheus metrics, on its own port (``queue.worker_metrics_port``; when several workers
share a host each takes the next free port): jobs in flight, batch sizes, images and generated tokens (their rates
are images/s and tokens/s), time to first token, queue wait by priority, GPU memory in use on CUDA.

Where the metrics are, and what the worker is doing, go into its heartbeat row (:mod:`dicom_node.work.heartbeat`),
which ``dicom-node status`` and the console show.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

if TYPE_CHECKING:
    from inference.batching import BatchReport

__all__ = ["WorkerMetrics", "serve_worker_metrics"]

log = logging.getLogger(__name__)

class WorkerMetrics:
    """The inference worker's Prometheus metrics, in a registry of its own."""

    def __init__(self, device: str) -> None:
        self.registry = CollectorRegistry()
        self.device = device
        self.in_flight = Gauge("dicom_node_worker_jobs_in_flight", "studies this worker holds now",
                               registry=self.registry)
        self.batch_size = Histogram("dicom_node_worker_batch_size", "images per backend call",
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=self.registry)
        self.batch_seconds = Histogram("dicom_node_worker_batch_seconds", "time of one backend call",
                                       buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
                                       registry=self.registry)
        self.failed_batches = Counter("dicom_node_worker_failed_batches",
                                      "batches that failed and were run image by image", registry=self.registry)
        self.images = Counter("dicom_node_worker_images", "images answered", registry=self.registry)
        self.tokens = Counter("dicom_node_worker_generated_tokens", "tokens generated", registry=self.registry)
        self.ttft = Histogram("dicom_node_worker_time_to_first_token_seconds",
                              "prefill and first token of one backend call",
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=self.registry)
        self.queue_wait = Histogram("dicom_node_worker_queue_wait_seconds",
                                    "time from a job's enqueue to its start, by priority", labelnames=["priority"],
                                    buckets=(0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600), registry=self.registry)
        self.batch_wait = Histogram("dicom_node_worker_batch_wait_seconds",
                                    "time an image waited for its batch to start, by priority",
                                    labelnames=["priority"], buckets=(0.001, 0.01, 0.05, 0.1, 0.5, 1, 5, 30),
                                    registry=self.registry)
        self.gpu_memory = Gauge("dicom_node_worker_gpu_memory_bytes", "GPU memory allocated by torch on the device",
                                registry=self.registry)
        self.batches_served = 0
        self.last_batch = ""
        if device.startswith("cuda"):
            self.gpu_memory.set_function(self._gpu_memory)

    def _gpu_memory(self) -> float:
        import torch

        return float(torch.cuda.memory_allocated(self.device)) if torch.cuda.is_available() else 0.0

    def observe_batch(self, report: BatchReport, stats: dict[str, float]) -> None:
        from inference.batching import Priority

        self.batches_served += 1
        self.batch_size.observe(report.size)
        self.batch_seconds.observe(report.seconds)
        self.images.inc(report.size)
        if report.failed:
            self.failed_batches.inc()
        if "tokens" in stats:
            self.tokens.inc(stats["tokens"])
        if "ttft_s" in stats:
            self.ttft.observe(stats["ttft_s"])
        for wait, priority in zip(report.waits, report.priorities, strict=True):
            label = "urgent" if priority == Priority.URGENT else "routine"
            self.batch_wait.labels(label).observe(wait)
        self.last_batch = f"last batch {report.size} image(s) in {report.seconds:.2f} s"


def serve_worker_metrics(metrics: WorkerMetrics, first_port: int, bind: str = "0.0.0.0") -> int:
    """Serve ``metrics`` on the first free port from ``first_port`` (16 tried); the port, or 0 when none was free."""
    for port in range(first_port, first_port + 16):
        try:
            start_http_server(port, addr=bind, registry=metrics.registry)
        except OSError:
            continue
        return port
    log.warning("no free port for the worker's metrics in %d-%d; metrics are off", first_port, first_port + 15)
    return 0
