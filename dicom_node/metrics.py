"""Prometheus metrics of a running node: what the SCP received, and how many jobs are in each state.

Values are read when Prometheus scrapes (a custom collector), so nothing on the C-STORE path does extra work.
Served on ``node.metrics_port`` (0 turns it off) at ``/metrics``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from dicom_node.jobs.schema import JobState, StudyState
from dicom_node.jobs.store import describe_error

if TYPE_CHECKING:
    from dicom_node.node import Node

__all__ = ["NodeCollector", "serve_metrics"]

log = logging.getLogger(__name__)


class NodeCollector(Collector):
    def __init__(self, node: Node) -> None:
        self.node = node

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily | SummaryMetricFamily]:
        c = self.node.intake.counters
        received = CounterMetricFamily("dicom_node_instances", "C-STORE requests by outcome", labels=["outcome"])
        outcomes = (("stored", c.stored), ("duplicate", c.duplicates), ("failed", c.failed))
        for outcome, value in outcomes:
            received.add_metric([outcome], value)
        yield received
        yield CounterMetricFamily("dicom_node_received_bytes", "bytes of instances stored", value=c.bytes)
        yield SummaryMetricFamily(
            "dicom_node_cstore_handler_seconds",
            "time the C-STORE handler took: validate, write, sync and record (the disk's share of a transfer)",
            count_value=c.handled, sum_value=c.handler_seconds,
        )
        assoc = CounterMetricFamily("dicom_node_associations", "associations by outcome", labels=["outcome"])
        assoc.add_metric(["accepted"], c.associations)
        assoc.add_metric(["rejected"], c.rejected_associations)
        yield assoc
        refused = CounterMetricFamily(
            "dicom_node_association_refusals",
            "connections and associations refused, by reason (no_request: closed before asking, e.g. port checks)",
            labels=["reason"],
        )
        for reason, count in sorted(self.node.intake.refusals.by_reason.items()):
            refused.add_metric([reason], count)
        yield refused
        yield CounterMetricFamily(
            "dicom_node_differing_duplicates",
            "re-sent instances whose bytes differ from the stored copy (kept); also counted as duplicates",
            value=c.differing_duplicates,
        )
        yield CounterMetricFamily(
            "dicom_node_patient_conflicts", "instances refused because their patient differs from their study's",
            value=c.patient_conflicts,
        )
        yield GaugeMetricFamily(
            "dicom_node_spool_free_bytes", "free space where the spool lives", value=self.node.spool.free_bytes()
        )
        # The job store may be a server that is down: its gauges are then left out and the scrape still answers,
        # with the intake's counters, which matter most during an outage.
        try:
            counts = self.node.store.counts()
        except Exception as exc:  # any database error: say so in the metric and the log, keep serving
            log.warning("metrics: job store unavailable: %s", describe_error(exc))
            yield GaugeMetricFamily("dicom_node_job_store_up", "1 when the job store answered this scrape", value=0)
            return
        yield GaugeMetricFamily("dicom_node_job_store_up", "1 when the job store answered this scrape", value=1)
        jobs = GaugeMetricFamily("dicom_node_jobs", "jobs in the job store by state", labels=["state"])
        for state in JobState:
            jobs.add_metric([state.value], counts.get(f"jobs_{state.value}", 0))
        yield jobs
        yield GaugeMetricFamily(
            "dicom_node_studies_receiving", "studies still within their receive window",
            value=counts.get("studies_receiving", 0),
        )
        studies = GaugeMetricFamily(
            "dicom_node_studies", "studies by state (purged: files removed by retention)", labels=["state"]
        )
        for study_state in StudyState:
            studies.add_metric([study_state.value], counts.get(f"studies_{study_state.value}", 0))
        yield studies


def serve_metrics(node: Node, port: int, addr: str = "0.0.0.0") -> None:
    registry = CollectorRegistry()
    registry.register(NodeCollector(node))
    start_http_server(port, addr=addr, registry=registry)
    log.info("metrics on http://%s:%d/metrics", addr, port)
