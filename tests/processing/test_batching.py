"""Pure pieces of the batch loop: retry delays, offsets to commit, COPY text."""

from __future__ import annotations

import uuid

import pytest

from checker_processing.consumer import BACKOFF_MAX_S, backoff, next_offsets
from checker_processing.daemon import consumer_config
from checker_processing.writer import Record, copy_text, parse


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
