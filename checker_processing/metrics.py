"""Prometheus metrics of the processor, served on METRICS_HOST:METRICS_PORT (0: off)."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

from checker_processing.writer import Outcome

log = logging.getLogger(__name__)


@dataclass
class Metrics:
    registry: CollectorRegistry
    results: Counter
    batch_seconds: Histogram
    db_retries: Counter
    server: WSGIServer | None = None
    thread: threading.Thread | None = None

    @classmethod
    def start(cls, host: str, port: int) -> Metrics:
        registry = CollectorRegistry()
        metrics = cls(
            registry=registry,
            results=Counter(
                "checker_processing_messages",
                "Messages handled, by outcome (stored, duplicate, rejected)",
                ["outcome"],
                registry=registry,
            ),
            batch_seconds=Histogram(
                "checker_processing_batch_seconds",
                "Time to store one batch in PostgreSQL",
                registry=registry,
            ),
            db_retries=Counter(
                "checker_processing_db_retries",
                "Batch writes retried because the database was unavailable",
                registry=registry,
            ),
        )
        if port:
            metrics.server, metrics.thread = start_http_server(port, host, registry=registry)
            log.info("metrics on http://%s:%d/metrics", host, port)
        return metrics

    def batch(self, outcome: Outcome, seconds: float) -> None:
        self.results.labels("stored").inc(outcome.inserted)
        self.results.labels("duplicate").inc(outcome.duplicates)
        self.results.labels("rejected").inc(outcome.rejected)
        self.batch_seconds.observe(seconds)

    def retry(self) -> None:
        self.db_retries.inc()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
        if self.thread is not None:
            self.thread.join(timeout=5)
