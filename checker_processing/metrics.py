"""Prometheus metrics of the processor, served on METRICS_HOST:METRICS_PORT (0: off).

Counters move from the consume loop (alerting's from its sender thread); the consumer lag comes
from librdkafka's statistics (`stats_cb`), whose high watermark is the one seen in fetch
responses. (This broker's ListOffsets answer, behind `get_watermark_offsets(cached=False)`, is
not reliable.)
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from checker_common.metrics import MetricsServer
from checker_processing.writer import Outcome

log = logging.getLogger(__name__)

# How often librdkafka hands over its statistics (the lag). A few KB of JSON a second is
# nothing next to a batch, and a scrape then sees a lag at most a second old.
STATS_INTERVAL_MS = 1000
BATCH_SIZE_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 50000)

DELAY_BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900, 3600, 4 * 3600, 86400)

PartitionKey = tuple[str, int]


def partition_lags(stats: Mapping[str, Any]) -> dict[PartitionKey, int]:
    """Messages of each partition this member owns that its group has not committed (pure).

    `consumer_lag` is librdkafka's end offset (the last stable one under read_committed)
    minus the committed offset; it is -1 while the group has never committed the partition.
    Such a group starts at the earliest message (auto.offset.reset=earliest), so its lag is
    then everything from the low watermark. Partitions whose offsets are unknown are left out.
    """
    lags: dict[PartitionKey, int] = {}
    for topic, topic_stats in (stats.get("topics") or {}).items():
        for key, part in (topic_stats.get("partitions") or {}).items():
            partition = int(key)
            # -1 is librdkafka's internal "unassigned" partition; not desired: not ours.
            if partition < 0 or not part.get("desired"):
                continue
            lag = int(part.get("consumer_lag", -1))
            if lag < 0:
                end = int(part.get("ls_offset", -1))
                if end < 0:
                    end = int(part.get("hi_offset", -1))
                low = int(part.get("lo_offset", -1))
                committed = int(part.get("committed_offset", -1001))
                if end < 0 or low < 0 or committed >= 0:
                    continue
                lag = max(0, end - low)
            lags[(topic, partition)] = lag
    return lags


@dataclass
class Metrics:
    registry: CollectorRegistry
    consumed: Counter
    results: Counter
    batch_seconds: Histogram
    batch_size: Histogram
    db_retries: Counter
    db_errors: Counter
    doubles: Counter
    commit_failures: Counter
    lag: Gauge
    notifications: Counter
    notifications_pending: Gauge
    notifications_due: Gauge
    notification_delay: Histogram
    server: MetricsServer | None = None
    _lag_keys: set[PartitionKey] = field(default_factory=set)

    @classmethod
    def create(cls) -> Metrics:
        """The processor's metrics on a registry of their own (no process collectors)."""
        registry = CollectorRegistry()
        return cls(
            registry=registry,
            consumed=Counter(
                "checker_processing_consumed_messages",
                "Messages read from Kafka into a batch (a message read again counts again)",
                registry=registry,
            ),
            results=Counter(
                "checker_processing_messages",
                "Messages handled, by outcome (stored, duplicate, rejected, task_applied)",
                ["outcome"],
                registry=registry,
            ),
            batch_seconds=Histogram(
                "checker_processing_batch_seconds",
                "Time to store one batch in PostgreSQL",
                registry=registry,
            ),
            batch_size=Histogram(
                "checker_processing_batch_messages",
                "Messages in one stored batch",
                buckets=BATCH_SIZE_BUCKETS,
                registry=registry,
            ),
            db_retries=Counter(
                "checker_processing_db_retries",
                "Batch writes retried because the database was unavailable",
                registry=registry,
            ),
            db_errors=Counter(
                "checker_processing_db_errors",
                "Database errors, by stage (start, write, ready, maintenance)",
                ["stage"],
                registry=registry,
            ),
            doubles=Counter(
                "checker_processing_result_doubles",
                "Results stored as doubles: another result of their task and slot, from"
                " another checker node, was stored first and counts instead",
                registry=registry,
            ),
            commit_failures=Counter(
                "checker_processing_offset_commit_failures",
                "Offset commits the broker refused or missed (retried later)",
                registry=registry,
            ),
            lag=Gauge(
                "checker_processing_consumer_lag",
                "Messages of an owned partition not yet committed by the group",
                ["topic", "partition"],
                registry=registry,
            ),
            notifications=Counter(
                "checker_processing_notifications",
                "Alerting: notifications by channel, kind and outcome (sent, summarised,"
                " retried, failed, cancelled); a summary is kind summary",
                ["channel", "kind", "outcome"],
                registry=registry,
            ),
            notifications_pending=Gauge(
                "checker_processing_notifications_pending",
                "Alerting: notifications not yet sent (due or later)",
                registry=registry,
            ),
            notifications_due=Gauge(
                "checker_processing_notifications_due",
                "Alerting: pending notifications whose time has come",
                registry=registry,
            ),
            notification_delay=Histogram(
                "checker_processing_notification_delay_seconds",
                "Alerting: from when a notification was first due to when it was delivered"
                " (sent, or in a summary)",
                ["channel"],
                buckets=DELAY_BUCKETS,
                registry=registry,
            ),
        )

    @classmethod
    def start(cls, host: str, port: int) -> Metrics:
        """Create the metrics and serve them (raises MetricsServerError if the port is taken)."""
        metrics = cls.create()
        metrics.server = MetricsServer.start(metrics.registry, host, port)
        return metrics

    def polled(self, count: int) -> None:
        self.consumed.inc(count)

    def batch(self, outcome: Outcome, seconds: float, size: int | None = None) -> None:
        self.results.labels("stored").inc(outcome.inserted)
        self.results.labels("duplicate").inc(outcome.duplicates)
        self.results.labels("rejected").inc(outcome.rejected)
        self.results.labels("task_applied").inc(outcome.task_changes)
        self.doubles.inc(outcome.doubles)
        self.batch_seconds.observe(seconds)
        if size is not None:
            self.batch_size.observe(size)

    def retry(self) -> None:
        self.db_retries.inc()

    def db_error(self, stage: str) -> None:
        self.db_errors.labels(stage).inc()

    def commit_failed(self) -> None:
        self.commit_failures.inc()

    def notified(self, channel: str, kind: str, outcome: str) -> None:
        self.notifications.labels(channel, kind, outcome).inc()

    def delivered(self, channel: str, seconds: float) -> None:
        self.notification_delay.labels(channel).observe(max(0.0, seconds))

    def outbox(self, pending: int, due: int) -> None:
        self.notifications_pending.set(pending)
        self.notifications_due.set(due)

    def stats(self, text: str) -> None:
        """librdkafka's `stats_cb`: update the lag gauges (called from the consume loop)."""
        try:
            lags = partition_lags(orjson.loads(text))
        except (orjson.JSONDecodeError, TypeError, ValueError, AttributeError) as exc:
            log.debug("unreadable consumer statistics: %s", exc)
            return
        for topic, partition in self._lag_keys - lags.keys():
            # No longer ours (revoked): its new owner reports it.
            self.lag.remove(topic, str(partition))
        for (topic, partition), lag in lags.items():
            self.lag.labels(topic, str(partition)).set(lag)
        self._lag_keys = set(lags)

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
