"""`checker-processing run`: apply migrations, then consume results until SIGTERM.

Under systemd (Type=notify): READY=1 once the consumer has subscribed and polled and a
database connection works; WATCHDOG=1 from the loop itself (also while it waits for the
database), so a wedged loop is restarted; STOPPING=1 on SIGTERM; STATUS= says what it does.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from types import FrameType
from typing import Any

import psycopg2
from confluent_kafka import Consumer, KafkaException

from checker_common import logs
from checker_common.errors import first_line
from checker_common.kafka import client_config, group_timing
from checker_common.metrics import MetricsServerError
from checker_common.systemd import Notifier
from checker_processing import db, migrate, retention
from checker_processing.consumer import EXIT_OK, Events, Processor, backoff
from checker_processing.metrics import STATS_INTERVAL_MS, Metrics
from checker_processing.settings import ProcessorSettings
from checker_processing.writer import Outcome, Writer

log = logging.getLogger(__name__)

CLIENT_ID = "checker-processing"
EXIT_SETUP = 1
# Longest single sleep of a wait, so the watchdog keeps being fed while we wait.
WAIT_SLICE_S = 0.5
# STATUS= with running totals at most this often (systemctl status shows the last one).
STATUS_EVERY_S = 10.0
# What librdkafka may hold of a backlog (BENCHMARKS.md, "Ingest": where the memory went). It
# stops fetching once its queue holds QUEUED_MAX_KBYTES, but one fetch may bring up to
# FETCH_MAX_BYTES of compressed record batches, each taken whole and decompressed (similar
# results compress well: the benchmark's 75 times): with the 50 MB default, a backlog of a
# million results put up to 0.76 GB in the queue in the first seconds of a drain. A batch
# larger than the limit still comes, alone in its fetch (brokers return at least one), so no
# message is too large to read.
FETCH_MAX_BYTES = 262_144
QUEUED_MAX_KBYTES = 16_384


def consumer_config(settings: ProcessorSettings) -> dict[str, Any]:
    """librdkafka consumer options: manual commits after the database, read_committed."""
    config = client_config(settings, client_id=CLIENT_ID)
    session = settings.kafka_session_timeout_ms
    config.update(
        {
            "group.id": settings.kafka_consumer_group,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
            **group_timing(session),
            "fetch.queue.backoff.ms": 10,
            "fetch.message.max.bytes": max(1_048_576, settings.max_message_bytes + 1024),
            "fetch.max.bytes": FETCH_MAX_BYTES,
            # librdkafka wants it no larger than fetch.max.bytes; a consumer's own requests
            # are small.
            "message.max.bytes": FETCH_MAX_BYTES,
            "queued.max.messages.kbytes": QUEUED_MAX_KBYTES,
            "enable.partition.eof": False,
        }
    )
    if settings.kafka_group_instance_id:
        # Static membership: a restart within the session keeps the partitions, no rebalance.
        # Not by default: the local broker never takes partitions from a static member that
        # died and stays dead (README, KAFKA_GROUP_INSTANCE_ID).
        config["group.instance.id"] = settings.kafka_group_instance_id
    return config


def with_statistics(config: dict[str, Any], metrics: Metrics) -> dict[str, Any]:
    """Consumer options that feed librdkafka's statistics (the lag) to served metrics."""
    if metrics.server is None:
        return config
    return {**config, "statistics.interval.ms": STATS_INTERVAL_MS, "stats_cb": metrics.stats}


def wait_alive(stop: threading.Event, seconds: float, tick: Callable[[], object]) -> None:
    """Wait up to `seconds` (less if stopped), calling `tick` at least every WAIT_SLICE_S."""
    deadline = time.monotonic() + seconds
    while not stop.is_set():
        tick()
        left = deadline - time.monotonic()
        if left <= 0:
            return
        stop.wait(min(left, WAIT_SLICE_S))


def migrate_when_reachable(
    connect: Callable[[], Any],
    stop: threading.Event,
    tick: Callable[[], object] = lambda: None,
    on_unavailable: Callable[[int], None] = lambda attempt: None,
) -> bool:
    """Apply migrations, waiting with backoff while PostgreSQL is unreachable (so a
    processor started before its database comes up by itself). False if stopped first.
    `tick` is called all along the wait; `on_unavailable(attempt)` after each failure."""
    attempt = 0
    while not stop.is_set():
        tick()
        try:
            conn = connect()
            try:
                migrate.apply(conn)
            finally:
                conn.close()
            return True
        except db.TRANSIENT_ERRORS as exc:
            attempt += 1
            delay = backoff(attempt)
            on_unavailable(attempt)
            # Expected when the database starts after us: one line with the reason.
            log.warning(
                "database unavailable at start (attempt %d, retry in %.2fs): %s",
                attempt,
                delay,
                first_line(exc),
                extra={"attempt": attempt},
            )
            wait_alive(stop, delay, tick)
    return False


class Supervision(Events):
    """Turns what the loop reports into metrics and systemd notifications.

    READY=1 is sent after the first poll of the main loop (the consumer has subscribed)
    once a query on the writer's connection works; until then every poll retries that check
    (with backoff) and STATUS= says why it is not ready.
    """

    def __init__(
        self,
        notifier: Notifier,
        metrics: Metrics,
        ping_database: Callable[[], None],
        serving: str,
    ) -> None:
        self.notifier = notifier
        self.metrics = metrics
        self.ping_database = ping_database
        self.serving = serving
        self.ready = False
        self._ready_attempts = 0
        self._next_ready_check = 0.0
        self._total = Outcome()
        self._next_status = 0.0

    def tick(self) -> None:
        self.notifier.watchdog()

    def polled(self, count: int) -> None:
        self.metrics.polled(count)
        if not self.ready and time.monotonic() >= self._next_ready_check:
            self._become_ready()

    def _become_ready(self) -> None:
        try:
            self.ping_database()
        except db.TRANSIENT_ERRORS as exc:
            self._ready_attempts += 1
            delay = backoff(self._ready_attempts)
            self._next_ready_check = time.monotonic() + delay
            self.metrics.db_error("ready")
            self.notifier.status(
                f"not ready: database unavailable (attempt {self._ready_attempts})"
            )
            log.warning(
                "not ready: database unavailable (attempt %d, retry in %.2fs): %s",
                self._ready_attempts,
                delay,
                first_line(exc),
                extra={"attempt": self._ready_attempts},
            )
            return
        self.ready = True
        self.notifier.ready(self.serving)
        log.info("ready: %s", self.serving)

    def batch_written(self, outcome: Outcome, size: int, seconds: float) -> None:
        self.metrics.batch(outcome, seconds, size)
        self._total = self._total + outcome
        if self.ready and time.monotonic() >= self._next_status:
            self._next_status = time.monotonic() + STATUS_EVERY_S
            self.notifier.status(self._serving_status())

    def _serving_status(self) -> str:
        t = self._total
        return (
            f"{self.serving}: {t.inserted} stored, {t.duplicates} duplicates, {t.rejected} rejected"
        )

    def db_unavailable(self, attempt: int, delay: float, held: int) -> None:
        self.metrics.retry()
        self.metrics.db_error("write")
        self.notifier.status(f"database unavailable (attempt {attempt}); holding {held} messages")

    def db_back(self, attempts: int) -> None:
        self.notifier.status(self._serving_status())

    def commit_failed(self) -> None:
        self.metrics.commit_failed()

    def maintenance_failed(self) -> None:
        self.metrics.db_error("maintenance")


def run(settings: ProcessorSettings) -> int:
    """Run the processor; returns the exit status (0 after a clean SIGTERM)."""
    logs.setup(settings.log_level, settings.log_format, settings.secrets())
    notifier = Notifier()
    try:
        return _run(settings, notifier)
    finally:
        notifier.close()


def _run(settings: ProcessorSettings, notifier: Notifier) -> int:
    connect = partial(db.connect, settings.postgresql_connection)
    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        notifier.stopping("stopping: finishing the batch in hand")
        log.info("signal %s: finishing the batch in hand", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    try:
        # Served from the start, so a processor waiting for its database shows it.
        metrics = Metrics.start(settings.metrics_host, settings.metrics_port)
    except MetricsServerError as exc:
        log.error("%s", exc)
        return EXIT_SETUP
    try:
        return _serve(settings, notifier, metrics, connect, stop)
    finally:
        metrics.stop()


def _serve(
    settings: ProcessorSettings,
    notifier: Notifier,
    metrics: Metrics,
    connect: Callable[[], Any],
    stop: threading.Event,
) -> int:
    """Migrate once the database answers, build the consumer, the writer and the processor,
    and run the processor until `stop`; returns the exit status."""

    def unavailable_at_start(attempt: int) -> None:
        metrics.db_error("start")
        notifier.status(f"waiting for the database (attempt {attempt})")

    notifier.status("connecting to the database")
    if not migrate_when_reachable(connect, stop, notifier.watchdog, unavailable_at_start):
        return EXIT_OK

    try:
        consumer = Consumer(with_statistics(consumer_config(settings), metrics))
    except KafkaException as exc:
        log.error("cannot create the Kafka consumer: %s", exc)
        return EXIT_SETUP

    window = retention.Window(
        settings.results_retention_days, timedelta(seconds=settings.max_clock_skew_seconds)
    )
    writer = Writer(
        connect, settings.max_message_bytes, window=window, tasks_topic=settings.kafka_tasks_topic
    )

    def maintain() -> None:
        try:
            dropped = retention.maintain(
                writer.conn, datetime.now(UTC).date(), settings.results_retention_days
            )
        except BaseException:
            writer.reset()  # never hand a broken or aborted transaction to the next batch
            raise
        if dropped:
            writer.forget_partitions()

    def ping_database() -> None:
        try:
            conn = writer.conn
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
            conn.rollback()
        except db.TRANSIENT_ERRORS:
            writer.reset()
            raise

    topics = ",".join(settings.subscribed_topics)
    serving = f"consuming {topics} as group {settings.kafka_consumer_group}"
    processor = Processor(
        consumer,
        writer,
        topics=settings.subscribed_topics,
        batch_max_messages=settings.batch_max_messages,
        batch_max_ms=settings.batch_max_ms,
        stop=stop,
        maintenance=maintain,
        events=Supervision(notifier, metrics, ping_database, serving),
    )
    sender = _start_sender(settings, connect, stop, metrics)
    notifier.status("joining the consumer group")
    log.info(
        "consuming %s as group %s",
        topics,
        settings.kafka_consumer_group,
        extra={"group": settings.kafka_consumer_group},
    )
    try:
        return processor.run()
    except psycopg2.Error as exc:
        # Not a connection problem (those are retried): schema or permissions are wrong.
        log.error("database error that retrying cannot fix: %s", first_line(exc))
        return EXIT_SETUP
    finally:
        writer.close()
        if sender is not None:
            # The consume loop is done (SIGTERM, or an error): the sender finishes the
            # notifications in hand and stops too.
            stop.set()
            sender.join()


def _start_sender(
    settings: ProcessorSettings,
    connect: Callable[[], Any],
    stop: threading.Event,
    metrics: Metrics,
) -> threading.Thread | None:
    """The alerting sender in a thread of its own, when ALERTING_CONFIG is set."""
    if settings.alerting is None:
        return None
    from checker_processing.alerting.sender import Sender

    sender = Sender(connect, settings.alerting, stop, metrics)
    thread = threading.Thread(target=sender.run, name="alerting-sender")
    thread.start()
    log.info(
        "alerting: sending notifications to %d channels",
        len(settings.alerting.channels),
    )
    return thread
