"""Prometheus metrics and a health endpoint for ``dqr-xnat serve``.

State gauges (jobs, rows, studies by state) are read from the job store at scrape time, so they are
right even after a restart; throughput and latency are counters and histograms the pipeline feeds.
``/health`` answers 200 when XNAT and every PACS answer and our C-MOVE receiver runs, 503
otherwise, with a JSON body saying which did not. Labels never carry PHI: only PACS names, projects, states and error kinds.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

log = logging.getLogger(__name__)


class Metrics:
    """The service's metrics, in a registry of its own (so tests and several services don't mix)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.instances = Counter("dqr_xnat_instances_total", "DICOM instances moved",
                                 ["stage", "pacs"], registry=self.registry)
        self.bytes = Counter("dqr_xnat_bytes_total", "Bytes of DICOM moved",
                             ["stage", "pacs"], registry=self.registry)
        self.failures = Counter("dqr_xnat_failures_total", "Failures by stage and kind",
                                ["stage", "kind"], registry=self.registry)
        self.latency = Histogram("dqr_xnat_pacs_operation_seconds", "PACS operation latency",
                                 ["pacs", "operation"], registry=self.registry,
                                 buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))

    @contextmanager
    def timed(self, pacs: str, operation: str) -> Iterator[None]:
        start = time.monotonic()
        try:
            yield
        finally:
            self.latency.labels(pacs, operation).observe(time.monotonic() - start)

    def moved(self, stage: str, pacs: str, instances: int, size: int) -> None:
        self.instances.labels(stage, pacs).inc(instances)
        self.bytes.labels(stage, pacs).inc(size)

    def failed(self, stage: str, exc: BaseException) -> None:
        self.failures.labels(stage, type(exc).__name__).inc()

    def add_state_collector(self, collect: Callable[[], list[GaugeMetricFamily]]) -> None:
        self.registry.register(_Collector(collect))


class _Collector:
    def __init__(self, collect: Callable[[], list[GaugeMetricFamily]]) -> None:
        self._collect = collect

    def collect(self) -> list[GaugeMetricFamily]:
        try:
            return self._collect()
        except Exception as exc:  # noqa: BLE001 - a scrape must never crash the service
            log.warning("metrics: cannot read the job store: %s", exc)
            return []


def state_families(store, pacs_open: Callable[[], dict[str, int]]) -> list[GaugeMetricFamily]:
    """Jobs, rows and studies by state, and associations in use per PACS."""
    jobs = GaugeMetricFamily("dqr_xnat_jobs", "Jobs by state", labels=["state"])
    rows = GaugeMetricFamily("dqr_xnat_rows", "CSV rows by status", labels=["status"])
    studies = GaugeMetricFamily("dqr_xnat_studies", "Studies by state", labels=["state"])
    assoc = GaugeMetricFamily("dqr_xnat_pacs_associations", "Open associations per PACS",
                              labels=["pacs"])
    job_counts: dict[str, int] = {}
    row_counts: dict[str, int] = {}
    study_counts: dict[str, int] = {}
    for job in store.list_jobs():
        job_counts[job.state.value] = job_counts.get(job.state.value, 0) + 1
        progress = store.job_progress(job.id)
        for key, n in progress.rows.items():
            row_counts[key] = row_counts.get(key, 0) + n
        for key, n in progress.studies.items():
            study_counts[key] = study_counts.get(key, 0) + n
    for family, counts in ((jobs, job_counts), (rows, row_counts), (studies, study_counts)):
        for key, n in sorted(counts.items()):
            family.add_metric([key], n)
    for name, n in sorted(pacs_open().items()):
        assoc.add_metric([name], n)
    return [jobs, rows, studies, assoc]


class MetricsServer:
    """``/metrics`` (Prometheus text format) and ``/health`` (JSON) on one loopback-by-default port."""

    def __init__(self, metrics: Metrics, health: Callable[[], dict[str, object]], *,
                 host: str = "127.0.0.1", port: int = 0) -> None:
        self.metrics = metrics
        self.health = health
        handler = self._handler()
        self.server = ThreadingHTTPServer((host, port), handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, name="metrics", daemon=True)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def start(self) -> "MetricsServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                if self.path.split("?")[0] == "/metrics":
                    self._send(200, CONTENT_TYPE_LATEST, generate_latest(outer.metrics.registry))
                elif self.path.split("?")[0] == "/health":
                    report = outer.health()
                    body = json.dumps(report).encode()
                    self._send(200 if report.get("ok") else 503, "application/json", body)
                else:
                    self._send(404, "text/plain", b"not found\n")

            def _send(self, status: int, content_type: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                log.debug("metrics: " + format, *args)

        return Handler
