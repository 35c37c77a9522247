"""`checker-processing run`: apply migrations, then consume results until SIGTERM."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from types import FrameType
from typing import Any

import psycopg2

from checker_common import logs
from checker_common.kafka import client_config
from checker_processing import db, migrate, retention
from checker_processing.consumer import EXIT_OK, Processor, backoff
from checker_processing.metrics import Metrics
from checker_processing.settings import ProcessorSettings
from checker_processing.writer import Writer

log = logging.getLogger(__name__)

CLIENT_ID = "checker-processing"
# Test hook, read once at start: exit right after the database commit of batch N, before its
# offsets are committed, to prove a crash there loses and duplicates nothing.
CRASH_HOOK_ENV = "CHECKER_PROCESSING_TEST_CRASH_AFTER_BATCH"
EXIT_SETUP = 1


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
            "session.timeout.ms": session,
            # A third of the session is librdkafka's own ratio at the default; shorter
            # sessions (tests) need a proportionally shorter heartbeat.
            "heartbeat.interval.ms": max(100, min(3000, session // 6)),
            "fetch.queue.backoff.ms": 10,
            "fetch.message.max.bytes": max(1_048_576, settings.max_message_bytes + 1024),
            "enable.partition.eof": False,
        }
    )
    return config


def migrate_when_reachable(connect: Callable[[], Any], stop: threading.Event) -> bool:
    """Apply migrations, waiting with backoff while PostgreSQL is unreachable (so a
    processor started before its database comes up by itself). False if stopped first."""
    attempt = 0
    while not stop.is_set():
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
            log.warning(
                "database unavailable at start (attempt %d, retry in %.2fs): %s",
                attempt,
                delay,
                str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__,
            )
            stop.wait(delay)
    return False


def run(settings: ProcessorSettings) -> int:
    """Run the processor; returns the exit status (0 after a clean SIGTERM)."""
    from confluent_kafka import Consumer, KafkaException

    logs.setup(settings.log_level, settings.log_format, settings.secrets())
    connect = partial(db.connect, settings.postgresql_connection)
    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        log.info("signal %s: finishing the batch in hand", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    if not migrate_when_reachable(connect, stop):
        return EXIT_OK

    try:
        consumer = Consumer(consumer_config(settings))
    except KafkaException as exc:
        log.error("cannot create the Kafka consumer: %s", exc)
        return EXIT_SETUP

    writer = Writer(connect, settings.max_message_bytes)
    metrics = Metrics.start(settings.metrics_host, settings.metrics_port)

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

    crash_hook = os.environ.get(CRASH_HOOK_ENV)
    processor = Processor(
        consumer,
        writer,
        topics=settings.topics,
        batch_max_messages=settings.batch_max_messages,
        batch_max_ms=settings.batch_max_ms,
        stop=stop,
        maintenance=maintain,
        crash_after_batch=int(crash_hook) if crash_hook else None,
        on_batch=metrics.batch,
        on_retry=metrics.retry,
    )
    log.info(
        "consuming %s as group %s",
        ",".join(settings.topics),
        settings.kafka_consumer_group,
    )
    try:
        return processor.run()
    except psycopg2.Error as exc:
        # Not a connection problem (those are retried): schema or permissions are wrong.
        log.error("database error that retrying cannot fix: %s", exc)
        return EXIT_SETUP
    finally:
        writer.close()
        metrics.stop()
