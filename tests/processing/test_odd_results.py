"""Results a checker gets wrong, against a real PostgreSQL: dated ahead of the processor's
clock or older than the retention (set aside, no partition made for them), a result id reused
with another timestamp (stored once), and a partition dropped behind the writer's back."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, timedelta
from functools import partial
from typing import Any

import pytest
from processing.processing_helpers import make_result, record_of, rows, scalar

from checker_processing import db, migrate, retention
from checker_processing.retention import Window
from checker_processing.writer import Outcome, Record, Writer

pytestmark = pytest.mark.postgres

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
WINDOW = Window(retention_days=7, max_clock_skew=timedelta(seconds=300))
FIRST_KEPT = datetime(2026, 11, 20, tzinfo=UTC)  # NOW's day - 7 days, midnight


class Clock:
    """The processor's clock, set by the test."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock(NOW)


@pytest.fixture
def writer(schema_dsn: str, migrated: Any, clock: Clock) -> Any:
    w = Writer(partial(db.connect, schema_dsn), max_message_bytes=4096, window=WINDOW, clock=clock)
    yield w
    w.close()


def partitions(conn: Any) -> list[str]:
    return [name for (name,) in rows(conn, "SELECT tableoid::regclass::text FROM check_results")]


def rejected(conn: Any) -> list[tuple[int, str]]:
    return rows(conn, "SELECT kafka_offset, error FROM rejected_messages ORDER BY kafka_offset")


def at(task: uuid.UUID, when: datetime, offset: int, **fields: Any) -> Record:
    return record_of(task, make_result(timestamp=when, **fields), offset=offset)


def test_results_dated_ahead_of_the_clock_are_set_aside_and_make_no_partition(
    writer: Writer, migrated: Any
) -> None:
    task = uuid.uuid4()
    batch = [
        at(task, NOW - timedelta(minutes=1), 0),
        at(task, NOW + timedelta(seconds=300), 1),  # at the limit: a clock a little fast
        at(task, NOW + timedelta(seconds=301), 2),
        at(task, datetime(2031, 6, 30, 12, tzinfo=UTC), 3),  # a checker clock years ahead
    ]

    assert writer.write(batch) == Outcome(inserted=2, rejected=2)

    assert sorted(set(partitions(migrated))) == ["check_results_p20261127"]
    assert retention.partition_days(migrated) == [date(2026, 11, 27)]
    assert rejected(migrated) == [
        (
            2,
            "timestamp 2026-11-27T12:05:01Z is 301 s ahead of the processor's clock, more than"
            " MAX_CLOCK_SKEW_SECONDS (300): is the checker's clock wrong?",
        ),
        (
            3,
            "timestamp 2031-06-30T12:00:00Z is 144806400 s ahead of the processor's clock,"
            " more than MAX_CLOCK_SKEW_SECONDS (300): is the checker's clock wrong?",
        ),
    ]
    # Its task shows the newest result inside the window, and later results move it on: the
    # result from 2031 does not hold the task still until then.
    assert scalar(migrated, "SELECT last_checked_at FROM tasks") == NOW + timedelta(seconds=300)
    writer.write([at(task, NOW + timedelta(seconds=400), 4, health="down", ok=False)])
    assert scalar(migrated, "SELECT last_checked_at FROM tasks") == NOW + timedelta(seconds=300)
    writer._clock = Clock(NOW + timedelta(minutes=10))  # type: ignore[attr-defined]
    writer.write([at(task, NOW + timedelta(minutes=9), 5, health="down", ok=False)])
    assert rows(migrated, "SELECT last_checked_at, last_health FROM tasks") == [
        (NOW + timedelta(minutes=9), "down")
    ]
    assert scalar(migrated, "SELECT count(*) FROM incidents WHERE ended_at IS NULL") == 1


def test_results_older_than_the_retention_are_set_aside_and_dropped_days_stay_dropped(
    writer: Writer, migrated: Any, clock: Clock
) -> None:
    task = uuid.uuid4()
    batch = [
        at(task, FIRST_KEPT, 0),  # the oldest day kept: its first instant
        at(task, FIRST_KEPT - timedelta(seconds=1), 1),
        at(task, datetime(2020, 1, 1, tzinfo=UTC), 2),
    ]

    assert writer.write(batch) == Outcome(inserted=1, rejected=2)

    assert retention.partition_days(migrated) == [date(2026, 11, 20)]
    reason = (
        "is older than RESULTS_RETENTION_DAYS (7) keeps: results before 2026-11-20 are not stored"
    )
    assert rejected(migrated) == [
        (1, f"timestamp 2026-11-19T23:59:59Z {reason}"),
        (2, f"timestamp 2020-01-01T00:00:00Z {reason}"),
    ]

    # A day later retention drops 2026-11-20; a late copy of a result of that day (or a new
    # one) does not bring the partition back.
    clock.now = NOW + timedelta(days=1)
    assert retention.maintain(migrated, clock.now.date(), WINDOW.retention_days) == [
        date(2026, 11, 20)
    ]
    writer.forget_partitions()  # as the daemon does after maintenance dropped partitions
    outcome = writer.write([batch[0], at(task, FIRST_KEPT + timedelta(hours=1), 3)])
    assert outcome == Outcome(rejected=2)
    assert date(2026, 11, 20) not in retention.partition_days(migrated)
    assert scalar(migrated, "SELECT count(*) FROM check_results") == 0
    assert scalar(migrated, "SELECT count(*) FROM result_ids") == 0


def test_the_window_is_the_one_at_the_time_of_the_write(
    writer: Writer, migrated: Any, clock: Clock
) -> None:
    """A batch prepared ahead (or held through a database outage) is judged when written."""
    task = uuid.uuid4()
    batch = [at(task, FIRST_KEPT + timedelta(hours=1), 0), at(task, NOW, 1)]
    prepared = writer.prepare(batch)
    clock.now = NOW + timedelta(days=1)

    assert writer.write(batch, prepared) == Outcome(inserted=1, rejected=1)
    assert retention.partition_days(migrated) == [date(2026, 11, 27)]


def test_a_partition_dropped_behind_the_writers_back_is_made_again(
    writer: Writer, migrated: Any
) -> None:
    """The writer remembers which partitions exist. Another processor (here one keeping only
    1 day) or an operator may drop one meanwhile; rows of that day, still inside this
    writer's window, are stored, not rejected for want of a partition."""
    task = uuid.uuid4()
    day = NOW - timedelta(days=2)
    assert writer.write([at(task, day, 0)]) == Outcome(inserted=1)
    assert retention.maintain(migrated, NOW.date(), retention_days=1) == [day.date()]

    assert writer.write([at(task, day + timedelta(minutes=1), 1)]) == Outcome(inserted=1)
    assert rejected(migrated) == []
    assert scalar(migrated, "SELECT count(*) FROM check_results") == 1


def test_a_result_id_is_stored_once_whatever_its_timestamp_says(
    writer: Writer, migrated: Any
) -> None:
    task = uuid.uuid4()
    first = make_result(timestamp=NOW - timedelta(hours=30))
    again = first.model_copy(update={"timestamp": NOW - timedelta(hours=29)})  # same day
    next_day = first.model_copy(update={"timestamp": NOW - timedelta(hours=1)})
    other = make_result(timestamp=NOW - timedelta(minutes=5))
    other_restamped = other.model_copy(update={"timestamp": NOW - timedelta(minutes=4)})
    assert writer.write([record_of(task, first, offset=0)]) == Outcome(inserted=1)

    batch = [
        record_of(task, again, offset=1),
        record_of(task, next_day, offset=2),
        record_of(task, other, offset=3),
        record_of(task, other_restamped, offset=4),  # the first copy read wins
    ]
    assert writer.write(batch) == Outcome(inserted=1, rejected=3)
    assert rows(migrated, "SELECT result_id::text, checked_at FROM check_results ORDER BY 2") == [
        (str(first.result_id), first.timestamp),
        (str(other.result_id), other.timestamp),
    ]
    assert rejected(migrated) == [
        (
            1,
            f"result_id {first.result_id} is stored already with timestamp"
            " 2026-11-26T06:00:00+00:00; this copy says 2026-11-26T07:00:00+00:00",
        ),
        (
            2,
            f"result_id {first.result_id} is stored already with timestamp"
            " 2026-11-26T06:00:00+00:00; this copy says 2026-11-27T11:00:00+00:00",
        ),
        (
            4,
            f"result_id {other.result_id} is stored already with timestamp"
            " 2026-11-27T11:55:00+00:00; this copy says 2026-11-27T11:56:00+00:00",
        ),
    ]
    # The same batch again (a redelivery): nothing more stored, the rejections recorded once.
    assert writer.write(batch) == Outcome(duplicates=1, rejected=3)
    assert scalar(migrated, "SELECT count(*) FROM check_results") == 2
    assert scalar(migrated, "SELECT count(*) FROM rejected_messages") == 3
    # The task moved to the stored results only.
    assert scalar(migrated, "SELECT last_result_id::text FROM tasks") == str(other.result_id)


def test_migration_0004_takes_in_the_ids_already_stored(writer: Writer, migrated: Any) -> None:
    task = uuid.uuid4()
    writer.write([at(task, NOW - timedelta(hours=n), n) for n in range(3)])
    stored = rows(migrated, "SELECT result_id, checked_at FROM check_results ORDER BY 2")
    # As before the migration: no ids table.
    with migrated.cursor() as cur:
        cur.execute("DROP TABLE result_ids")
        cur.execute("DELETE FROM schema_migrations WHERE version = 4")

    assert [m.version for m in migrate.apply(migrated)] == [4]
    assert rows(migrated, "SELECT result_id, checked_at FROM result_ids ORDER BY 2") == stored
