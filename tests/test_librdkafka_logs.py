"""librdkafka's log lines: a broker outage is a few lines, not twenty a second."""

from __future__ import annotations

import logging

import pytest

from checker_common.kafka import LibrdkafkaLevels, LibrdkafkaRepeats, librdkafka_logger


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def librdkafka_record(
    text: str, facility: str = "FAIL", client: str = "rdkafka#producer-1"
) -> logging.LogRecord:
    """A record as confluent-kafka makes it (syslog level 3 is ERROR)."""
    return logging.LogRecord(
        "librdkafka", logging.ERROR, __file__, 1, "%s [%s] %s", (facility, client, text), None
    )


def refused(broker: str = "ssl://kafka-1:9093/bootstrap", after_ms: int = 0) -> str:
    return (
        f"[thrd:{broker}]: {broker}: Connect to ipv4#127.0.0.1:9093 failed: Connection refused"
        f" (after {after_ms}ms in state CONNECT)"
    )


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def repeats(clock: Clock) -> LibrdkafkaRepeats:
    return LibrdkafkaRepeats(every=30.0, clock=clock)


def test_an_outage_is_one_line_then_one_per_window_with_the_count(
    repeats: LibrdkafkaRepeats, clock: Clock
) -> None:
    logged = []
    # 20 s of a broker that refuses, 20 attempts a second (what a tester counted: 426 lines).
    for attempt in range(400):
        clock.now = 1000.0 + attempt * 0.05
        record = librdkafka_record(refused(after_ms=attempt % 7))
        if repeats.filter(record):
            logged.append(record.getMessage())
    assert len(logged) == 1
    assert "Connection refused" in logged[0]
    assert "suppressed" not in logged[0]
    # Still down after the window: logged again, saying how many were held back.
    clock.now = 1031.0
    again = librdkafka_record(refused())
    assert repeats.filter(again)
    assert again.getMessage().endswith("(399 repeats suppressed)")
    assert "Connection refused" in again.getMessage()
    # And the count starts again from there.
    clock.now = 1032.0
    assert not repeats.filter(librdkafka_record(refused()))


def test_other_messages_are_logged_at_once(repeats: LibrdkafkaRepeats, clock: Clock) -> None:
    assert repeats.filter(librdkafka_record(refused()))
    clock.now += 1
    # Another broker, another client, another facility: each its own message.
    assert repeats.filter(librdkafka_record(refused("ssl://kafka-2:9093/2")))
    assert repeats.filter(librdkafka_record(refused(), client="rdkafka#consumer-2"))
    recovered = "[thrd:ssl://kafka-1:9093/bootstrap]: ssl://kafka-1:9093/bootstrap: connected"
    assert repeats.filter(librdkafka_record(recovered, facility="CONNECT"))
    # Messages of no broker's thread are the same when only their numbers differ.
    first = "[thrd:main]: Metadata request failed: 3 brokers down (after 12ms)"
    assert repeats.filter(librdkafka_record(first, facility="METADATA"))
    same = "[thrd:main]: Metadata request failed: 2 brokers down (after 40ms)"
    assert not repeats.filter(librdkafka_record(same, facility="METADATA"))
    other = "[thrd:main]: Topic checker-results: partition count changed"
    assert repeats.filter(librdkafka_record(other, facility="METADATA"))


def test_records_not_shaped_like_librdkafkas_are_never_held(repeats: LibrdkafkaRepeats) -> None:
    for _ in range(3):
        record = logging.LogRecord("librdkafka", logging.ERROR, __file__, 1, "plain", None, None)
        assert repeats.filter(record)


@pytest.mark.parametrize("step", [1.0, 0.001])
def test_the_table_of_seen_messages_stays_small(
    repeats: LibrdkafkaRepeats, clock: Clock, step: float
) -> None:
    for n in range(5000):
        clock.now += step
        repeats.filter(librdkafka_record(refused(f"ssl://kafka-{n}:9093/{n}")))
        assert len(repeats.seen) <= 1024


def test_the_librdkafka_logger_downgrades_then_holds_repeats() -> None:
    logger = librdkafka_logger()
    assert librdkafka_logger() is logger
    kinds = [type(f) for f in logger.filters]
    assert kinds.count(LibrdkafkaLevels) == 1
    assert kinds.count(LibrdkafkaRepeats) == 1
    record = librdkafka_record(refused("ssl://levels-test:9093/bootstrap"))
    assert logger.filter(record)
    assert record.levelname == "WARNING"
    assert not logger.filter(librdkafka_record(refused("ssl://levels-test:9093/bootstrap")))


def test_another_failure_of_the_same_broker_is_logged_at_once(repeats: LibrdkafkaRepeats) -> None:
    # A refused certificate right after refused connections says what to fix: never held back.
    broker = "ssl://kafka-1:9093/bootstrap"
    assert repeats.filter(librdkafka_record(refused(broker)))
    assert not repeats.filter(librdkafka_record(refused(broker, after_ms=3)))
    tls = librdkafka_record(
        f"[thrd:{broker}]: {broker}: SSL handshake failed: error:0A000086:SSL routines::"
        "certificate verify failed: broker certificate could not be verified"
    )
    assert repeats.filter(tls)
