"""Pure pieces of the batch loop: retry delays, offsets to commit, COPY text."""

from __future__ import annotations

import uuid

import pytest

from checker_processing.consumer import BACKOFF_MAX_S, backoff, next_offsets
from checker_processing.daemon import consumer_config
from checker_processing.writer import COLUMNS, Record, copy_text, parse


@pytest.mark.parametrize(
    ("attempt", "expected"),
    [(1, 0.25), (2, 0.5), (3, 1.0), (4, 2.0), (6, 8.0), (7, 15.0), (50, 15.0)],
)
def test_backoff_doubles_from_250ms_to_15s(attempt: int, expected: float) -> None:
    assert backoff(attempt, rng=lambda: 0.5) == pytest.approx(expected)
    assert backoff(attempt, rng=lambda: 0.0) == pytest.approx(expected * 0.8)
    assert backoff(attempt, rng=lambda: 1.0) <= BACKOFF_MAX_S


def test_next_offsets_are_one_past_the_highest_per_partition() -> None:
    records = [
        Record("a", 0, 5, None, b""),
        Record("a", 0, 3, None, b""),
        Record("a", 1, 9, None, b""),
        Record("b", 0, 0, None, b""),
    ]
    assert next_offsets(records) == {("a", 0): 6, ("a", 1): 10, ("b", 0): 1}


def test_copy_text_escapes_what_copy_would_misread() -> None:
    task = uuid.uuid4()
    value = (
        b'{"%s": {"schema_version": 1, "result_id": "%s", "name": "a\\tb\\\\c\\nd",'
        b' "url": "u", "timestamp": "2026-01-01T00:00:00Z", "load_time": 1, "ok": true}}'
        % (str(task).encode(), str(uuid.uuid4()).encode())
    )
    rows, rejected = parse([Record("t", 0, 0, None, value)], 4096)
    assert rejected == []
    line = copy_text(rows)
    assert "a\\tb\\\\c\\nd" in line
    assert line.count("\n") == 1
    assert "\\N" in line  # absent fields are NULL, not empty strings


def test_copy_text_writes_whether_the_body_was_truncated() -> None:
    task = str(uuid.uuid4()).encode()
    message = (
        b'{"%s": {"schema_version": 1, "result_id": "%s", "name": "n", "url": "u",'
        b' "timestamp": "2026-01-01T00:00:00Z", "load_time": 1, "ok": true%s}}'
    )
    records = [
        Record("t", 0, offset, None, message % (task, str(uuid.uuid4()).encode(), extra))
        for offset, extra in enumerate([b', "body_truncated": true', b""])
    ]
    rows, rejected = parse(records, 4096)
    assert rejected == []
    lines = [
        dict(zip(COLUMNS, line.split("\t"), strict=True)) for line in copy_text(rows).splitlines()
    ]
    # A message without the field (a checker before it) read its whole body.
    assert [line["body_truncated"] for line in lines] == ["t", "f"]


def test_copy_text_writes_each_number_as_read_an_infinite_one_too() -> None:
    """Numbers are written a batch at a time as JSON, which has no infinity; the first
    checker's shape can carry one ("inf" as load_time), and it must not turn into NULL."""
    task = str(uuid.uuid4()).encode()
    finite = (
        b'{"%s": {"schema_version": 1, "result_id": "%s", "name": "n", "url": "u",'
        b' "timestamp": "2026-01-01T00:00:00Z", "load_time": 1e-05, "ok": true,'
        b' "timings": {"dns": 0.25, "ttfb": 1e16}, "bytes": 12, "status": 200}}'
        % (task, str(uuid.uuid4()).encode())
    )
    infinite = b'{"%s": {"timestamp": "02/15/21 - 16:43:17", "load_time": "inf", "status": 200}}'
    records = [Record("t", 0, 0, None, finite), Record("t", 0, 1, None, infinite % task)]
    rows, rejected = parse(records, 4096)
    assert rejected == []
    first, second = (
        dict(zip(COLUMNS, line.split("\t"), strict=True)) for line in copy_text(rows).splitlines()
    )
    assert {k: float(v) for k, v in first.items() if k in NUMBERS and v != "\\N"} == {
        "attempt": 1,
        "status_code": 200,
        "load_time": 1e-05,
        "dns_time": 0.25,
        "ttfb_time": 1e16,
        "bytes": 12,
        "redirects": 0,
    }
    assert [first[k] for k in ("connect_time", "tls_time", "transfer_time")] == ["\\N"] * 3
    assert (second["load_time"], second["status_code"], second["dns_time"]) == ("inf", "200", "\\N")
    # Without the infinite row the batch takes the JSON way: the same numbers.
    (alone,) = (
        dict(zip(COLUMNS, line.split("\t"), strict=True))
        for line in copy_text(rows[:1]).splitlines()
    )
    assert alone.keys() == first.keys()
    assert all(alone[k] == first[k] or float(alone[k]) == float(first[k]) for k in first)


NUMBERS = {
    "attempt",
    "status_code",
    "load_time",
    "dns_time",
    "connect_time",
    "tls_time",
    "ttfb_time",
    "transfer_time",
    "bytes",
    "redirects",
}


def test_consumer_config_commits_by_hand(kafka: object) -> None:
    from checker_processing.settings import ProcessorSettings

    env = kafka.env()  # type: ignore[attr-defined]
    settings = ProcessorSettings(
        **{k.lower(): v for k, v in env.items()},
        postgresql_connection="postgresql://x@127.0.0.1/db",
        kafka_session_timeout_ms=6000,
    )
    config = consumer_config(settings)
    assert config["enable.auto.commit"] is False
    assert config["enable.auto.offset.store"] is False
    assert config["isolation.level"] == "read_committed"
    assert config["auto.offset.reset"] == "earliest"
    assert (config["session.timeout.ms"], config["heartbeat.interval.ms"]) == (6000, 1000)
    # Dynamic membership unless asked for: static members misbehave on the local broker.
    assert "group.instance.id" not in config
    static = settings.model_copy(update={"kafka_group_instance_id": "processor-1"})
    assert consumer_config(static)["group.instance.id"] == "processor-1"
    # What librdkafka holds of a backlog is bounded (the drain test measures the process).
    assert config["fetch.max.bytes"] <= 262_144
    assert config["queued.max.messages.kbytes"] <= 16_384


def test_default_session_hands_a_dead_processors_partitions_on_within_seconds(
    kafka: object,
) -> None:
    """A crashed processor's partitions wait for its session to expire: 6 s by default (the
    least a Kafka broker accepts by default), heartbeats every second; the fault scenario
    `processor_sigkill_defaults` measures the whole stall with the systemd unit's restart."""
    from checker_processing.settings import ProcessorSettings

    env = kafka.env()  # type: ignore[attr-defined]
    settings = ProcessorSettings(
        **{k.lower(): v for k, v in env.items()}, postgresql_connection="postgresql://x@h/db"
    )
    config = consumer_config(settings)
    assert (config["session.timeout.ms"], config["heartbeat.interval.ms"]) == (6000, 1000)
