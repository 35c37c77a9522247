"""The task topic in PostgreSQL: task records keep `tasks` in step, tombstones close incidents.

The writer against a real PostgreSQL (records built with the contract's own `encode`), then
the processor's loop with a real consumer on the test broker, both topics in one group.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import orjson
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from processing.processing_helpers import WIDE_WINDOW, make_result, record_of, rows, scalar

from checker_common import task_record
from checker_common.contract import encode
from checker_common.task_record import TaskRecord
from checker_common.task_spec import TaskSpec, TaskStatus
from checker_processing import db, migrate, report, retention, task_topic
from checker_processing.consumer import Processor
from checker_processing.daemon import consumer_config
from checker_processing.records import Record
from checker_processing.settings import ProcessorSettings
from checker_processing.writer import Outcome, Writer
from devstack import create_topics

from helpers import wait_for

pytestmark = pytest.mark.postgres

TASKS = "tasks"
RESULTS = "results"
A = uuid.UUID("00000000-0000-4000-8000-00000000000a")
B = uuid.UUID("00000000-0000-4000-8000-00000000000b")
START = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)


def at(minutes: float) -> datetime:
    return START + timedelta(minutes=minutes)


def millis(when: datetime) -> int:
    return int(when.timestamp() * 1000)


def task_value(task: uuid.UUID, *, status: str = "active", reason: str | None = None,
               updated: datetime | None = None, **spec: Any) -> bytes:  # fmt: skip
    fields = {"name": "shop", "url": "https://shop.test/health", "interval": 30.0, "timeout": 5}
    record = TaskRecord(
        id=task,
        spec=TaskSpec.model_validate({**fields, **spec}),
        status=TaskStatus(status),
        status_reason=reason,
        updated_at=updated,
    )
    return task_record.encode(record)[1]


def change(task: uuid.UUID, offset: int, when: datetime | None = None, **fields: Any) -> Record:
    """A task record as the checker publishes it, at `offset` of partition 0."""
    when = when or at(offset)
    value = task_value(task, updated=when, **fields)
    return Record(TASKS, 0, offset, str(task).encode(), value, millis(when))


def tombstone(task: uuid.UUID, offset: int, when: datetime) -> Record:
    return Record(TASKS, 0, offset, task_record.tombstone_key(task), None, millis(when))


def result(
    task: uuid.UUID, offset: int, when: datetime, health: str = "up", **fields: Any
) -> Record:
    ok = health == "up"
    error = None if ok else {"kind": "status", "message": "status 503"}
    checked = make_result(timestamp=when, ok=ok, health=health, error=error, **fields)
    return record_of(task, checked, topic=RESULTS, offset=offset)


def task(conn: Any, task_id: uuid.UUID) -> dict[str, Any]:
    with conn.cursor() as cur:
        cur.execute("SELECT * FROM tasks WHERE task_id = %s", (str(task_id),))
        found = cur.fetchone()
        assert found is not None, f"no row for task {task_id}"
        return dict(zip([d.name for d in cur.description], found, strict=True))


def incidents(conn: Any, task_id: uuid.UUID) -> list[tuple[Any, ...]]:
    return rows(
        conn,
        "SELECT started_at, ended_at, end_reason FROM incidents WHERE task_id = %s"
        " ORDER BY started_at",
        str(task_id),
    )


def latest(conn: Any) -> list[str]:
    return [r[0] for r in rows(conn, "SELECT task_id::text FROM latest_results ORDER BY 1")]


@pytest.fixture
def writer(schema_dsn: str, migrated: Any) -> Iterator[Writer]:
    w = Writer(
        partial(db.connect, schema_dsn), max_message_bytes=4096, window=WIDE_WINDOW,
        tasks_topic=TASKS,
    )  # fmt: skip
    yield w
    w.close()


# -- the rows a record makes -------------------------------------------------------------------


def test_a_task_record_makes_the_task_before_its_first_result(
    writer: Writer, migrated: Any
) -> None:
    outcome = writer.write(
        [change(A, 0, name="shop", url="https://ops:hunter2@shop.test/h", interval=30.0)]
    )
    assert outcome == Outcome(task_changes=1)
    row = task(migrated, A)
    assert {k: row[k] for k in ("name", "url", "method", "interval_seconds", "status")} == {
        "name": "shop",
        "url": "https://ops:***@shop.test/h",  # the password never reaches PostgreSQL
        "method": "GET",
        "interval_seconds": 30.0,
        "status": "active",
    }
    assert (row["status_reason"], row["removed_at"], row["last_result_id"]) == (None, None, None)
    assert row["changed_at"] == at(0)
    assert latest(migrated) == []  # no result yet

    assert writer.write([result(A, 0, at(1), name="shop")]) == Outcome(inserted=1)
    assert latest(migrated) == [str(A)]
    assert task(migrated, A)["last_health"] == "up"


def test_renames_interval_changes_and_pauses_follow_the_records(
    writer: Writer, migrated: Any
) -> None:
    writer.write([change(A, 0, name="shop"), result(A, 0, at(1), name="shop")])
    writer.write([change(A, 1, name="store", interval=120.0)])
    assert (task(migrated, A)["name"], task(migrated, A)["interval_seconds"]) == ("store", 120.0)
    # A result checked before the rename, arriving after it (another topic): the name stays.
    writer.write([result(A, 1, at(2), name="shop")])
    assert task(migrated, A)["name"] == "store"
    assert task(migrated, A)["last_checked_at"] == at(2)

    writer.write([change(A, 2, name="store", interval=120.0, status="paused")])
    row = task(migrated, A)
    assert (row["status"], row["name"], row["changed_at"]) == ("paused", "store", at(2))
    writer.write([change(A, 3, name="store", status="done", reason="ended after 3 runs")])
    row = task(migrated, A)
    assert (row["status"], row["status_reason"]) == ("done", "ended after 3 runs")


def test_tags_follow_the_records(writer: Writer, migrated: Any) -> None:
    writer.write([change(A, 0, tags=["prod", "team:web"])])
    assert task(migrated, A)["tags"] == ["prod", "team:web"]
    writer.write([change(A, 1, tags=["staging"])])
    assert task(migrated, A)["tags"] == ["staging"]
    writer.write([change(A, 2)])
    assert task(migrated, A)["tags"] == []


def test_an_invalid_record_puts_the_task_in_error_with_the_reason(
    writer: Writer, migrated: Any
) -> None:
    value = orjson.dumps(
        {"spec": {"name": "shop", "url": "https://ops:hunter2@shop.test/", "interval": 30,
                  "timeout": 99}}
    )  # fmt: skip
    bad = Record(TASKS, 0, 0, str(A).encode(), value, millis(at(0)))
    assert writer.write([bad]) == Outcome(task_changes=1)
    row = task(migrated, A)
    assert (row["status"], row["name"], row["url"]) == (
        "error",
        "shop",
        "https://ops:***@shop.test/",
    )
    assert row["interval_seconds"] == 30.0
    assert row["status_reason"].startswith("invalid task record: spec.timeout: must be below")


def test_a_record_without_a_task_id_is_kept_in_rejected_messages(
    writer: Writer, migrated: Any
) -> None:
    unusable = [
        Record(TASKS, 1, 7, b"not-a-task-id", b'{"spec": {}}', millis(at(0))),
        Record(TASKS, 1, 8, None, b"{}", millis(at(0))),
    ]
    assert writer.write(unusable) == Outcome(rejected=2)
    assert rows(
        migrated,
        "SELECT kafka_topic, kafka_partition, kafka_offset, message_key::bytea::text,"
        " convert_from(message_value, 'UTF8'), error FROM rejected_messages ORDER BY kafka_offset",
    ) == [
        (TASKS, 1, 7, "\\x6e6f742d612d7461736b2d6964", '{"spec": {}}',
         "task record: key b'not-a-task-id' is not a task id (a UUID)"),
        (TASKS, 1, 8, None, "{}", "task record: record has no key (the key must be the task id)"),
    ]  # fmt: skip
    assert scalar(migrated, "SELECT count(*) FROM tasks") == 0


def test_a_control_character_in_a_status_reason_makes_the_record_invalid(
    writer: Writer, migrated: Any
) -> None:
    """A NUL would make PostgreSQL refuse the row: the contract refuses control characters in
    a status reason, so such a record (from another program) leaves its task in error, with a
    reason that is itself readable."""
    value = orjson.loads(task_value(A, status="error", reason="bad"))
    odd = orjson.dumps({**value, "status_reason": "bad\x00byte"})
    record = Record(TASKS, 0, 0, str(A).encode(), odd, millis(at(0)))
    assert writer.write([record]) == Outcome(task_changes=1)
    stored = task(migrated, A)
    assert stored["status"] == "error"
    assert stored["status_reason"].startswith("invalid task record: status_reason")
    assert "\x00" not in stored["status_reason"]


def test_a_record_the_contract_fails_to_read_does_not_stop_the_batch(
    writer: Writer, migrated: Any
) -> None:
    """decode() must not raise; one did (an updated_at that leaves the datetime range when
    turned to UTC). Such a record is kept aside and the batch goes on."""
    value = orjson.loads(task_value(A))
    odd = orjson.dumps({**value, "updated_at": "0001-01-01T00:00:00+05:00"})
    writer.write([Record(TASKS, 0, 0, str(A).encode(), odd, millis(at(0))), change(B, 1)])
    assert task(migrated, B)["status"] == "active"
    found = rows(migrated, "SELECT status FROM tasks WHERE task_id = %s", str(A))
    kept = rows(migrated, "SELECT error FROM rejected_messages")
    assert found == [("error",)] or (not found and "OverflowError" in kept[0][0])


# -- removal -----------------------------------------------------------------------------------


def test_a_tombstone_closes_the_open_incident_and_the_task_leaves_latest_results(
    writer: Writer, migrated: Any
) -> None:
    writer.write([change(A, 0), change(B, 1, name="blog")])
    writer.write([result(A, 0, at(1)), result(A, 1, at(2), "down"), result(B, 2, at(2), "down")])
    assert incidents(migrated, A) == [(at(2), None, None)]
    assert latest(migrated) == [str(A), str(B)]

    assert writer.write([tombstone(A, 2, at(5))]) == Outcome(task_changes=1)
    assert task(migrated, A)["removed_at"] == at(5)
    assert incidents(migrated, A) == [(at(2), at(5), "task_removed")]
    assert incidents(migrated, B) == [(at(2), None, None)]  # another task's stays open
    assert latest(migrated) == [str(B)]
    # Its history stays.
    assert scalar(migrated, "SELECT count(*) FROM check_results WHERE task_id = %s", str(A)) == 2
    found = {r.task_id: r for r in report.availability(migrated, timedelta(days=1), None)}
    assert (found[str(A)].status, found[str(A)].open_incident) == ("removed", False)
    assert (found[str(B)].status, found[str(B)].open_incident) == ("active", True)


def test_results_after_the_tombstone_are_stored_but_move_nothing(
    writer: Writer, migrated: Any
) -> None:
    writer.write([change(A, 0), result(A, 0, at(1)), result(A, 1, at(2), "down")])
    writer.write([tombstone(A, 1, at(5))])
    before = task(migrated, A)

    # Checked before the removal, late (another topic); and checked after it.
    late = [result(A, 2, at(3), "up"), result(A, 3, at(6), "down"), result(A, 4, at(7), "up")]
    assert writer.write(late) == Outcome(inserted=3)
    assert scalar(migrated, "SELECT count(*) FROM check_results WHERE task_id = %s", str(A)) == 5
    assert task(migrated, A) == before
    assert incidents(migrated, A) == [(at(2), at(5), "task_removed")]
    assert latest(migrated) == []


def test_a_tombstone_and_results_in_one_batch(writer: Writer, migrated: Any) -> None:
    """Task records are applied first: a result of the removed task in the same batch moves
    nothing, whatever its place in the batch."""
    writer.write([change(A, 0), result(A, 0, at(1))])
    batch = [result(A, 1, at(2), "down"), tombstone(A, 1, at(3)), result(B, 2, at(2), "down")]
    assert writer.write(batch) == Outcome(inserted=2, task_changes=1)
    assert incidents(migrated, A) == []
    assert task(migrated, A)["last_checked_at"] == at(1)
    assert incidents(migrated, B) == [(at(2), None, None)]


def test_a_record_for_a_removed_task_brings_it_back(writer: Writer, migrated: Any) -> None:
    writer.write([change(A, 0), result(A, 0, at(1), "down")])
    writer.write([tombstone(A, 1, at(2))])
    writer.write([change(A, 2, at(3), name="shop-again")])
    row = task(migrated, A)
    assert (row["removed_at"], row["name"], row["status"]) == (None, "shop-again", "active")
    writer.write([result(A, 1, at(4), "down")])
    assert incidents(migrated, A) == [(at(1), at(2), "task_removed"), (at(4), None, None)]
    assert latest(migrated) == [str(A)]


def test_a_task_removed_before_the_processor_knew_it_stays_removed(
    writer: Writer, migrated: Any
) -> None:
    assert writer.write([tombstone(A, 0, at(1))]) == Outcome(task_changes=1)
    writer.write([result(A, 0, at(0.5), "down")])  # its last result, late
    row = task(migrated, A)
    assert (row["removed_at"], row["last_result_id"], row["name"]) == (at(1), None, None)
    assert incidents(migrated, A) == []
    assert latest(migrated) == []


def test_a_record_and_its_tombstone_in_one_batch_leave_the_definition_removed(
    writer: Writer, migrated: Any
) -> None:
    """As if they came apart: the record's definition, then `removed_at`; once more after a
    removal, and a redelivery of the batch changes nothing."""
    batch = [change(A, 0, name="shop", tags=["prod"]), tombstone(A, 1, at(2))]
    assert writer.write(batch) == Outcome(task_changes=2)
    row = task(migrated, A)
    assert (row["name"], row["url"], row["status"], row["tags"], row["removed_at"]) == (
        "shop", "https://shop.test/health", "active", ["prod"], at(2),
    )  # fmt: skip
    assert row["record_offset"] == 1
    assert writer.write(batch) == Outcome(duplicates=2)

    again = [change(A, 2, name="store"), change(A, 3, name="blog"), tombstone(A, 4, at(5))]
    assert writer.write(again) == Outcome(task_changes=3)
    row = task(migrated, A)
    assert (row["name"], row["removed_at"], row["record_offset"]) == ("blog", at(5), 4)
    assert latest(migrated) == []


def test_a_tombstone_after_a_record_in_a_batch_keeps_the_record_before_it() -> None:
    planned = task_topic.plan(
        [
            change(A, 0, name="first"),
            tombstone(A, 1, at(1)),
            change(A, 2, name="second"),
            tombstone(A, 3, at(3)),
            tombstone(A, 4, at(4)),
            tombstone(B, 5, at(5)),
        ]
    )
    assert [(row.task_id, row.removed, row.name, row.records) for row in planned.rows] == [
        (str(A), False, "second", 3),
        (str(A), True, None, 2),
        (str(B), True, None, 1),
    ]


def test_a_tombstone_without_a_kafka_time_is_dated_by_the_database(
    writer: Writer, migrated: Any
) -> None:
    writer.write([change(A, 0)])
    writer.write([Record(TASKS, 0, 1, str(A).encode(), None, -1)])
    removed_at = task(migrated, A)["removed_at"]
    assert removed_at is not None
    assert abs(removed_at - datetime.now(UTC)) < timedelta(minutes=5)


# -- redelivery and order ----------------------------------------------------------------------


def test_redelivered_task_records_change_nothing(writer: Writer, migrated: Any) -> None:
    batch = [
        change(A, 0),
        change(A, 1, status="paused"),
        change(B, 2),
        result(B, 0, at(1), "down"),
        tombstone(B, 3, at(4)),
    ]
    assert writer.write(batch) == Outcome(inserted=1, task_changes=4)
    snapshot = (task(migrated, A), task(migrated, B), incidents(migrated, B))

    assert writer.write(batch) == Outcome(duplicates=5)
    assert writer.write([change(A, 0)]) == Outcome(duplicates=1)  # older than the stored one
    assert (task(migrated, A), task(migrated, B), incidents(migrated, B)) == snapshot
    assert task(migrated, A)["status"] == "paused"


def test_the_last_record_of_a_task_in_a_batch_decides() -> None:
    planned = task_topic.plan(
        [
            change(B, 0),
            change(A, 1, name="first"),
            tombstone(A, 2, at(2)),
            change(A, 3, name="last"),
        ]
    )
    assert [(row.task_id, row.name, row.records) for row in planned.rows] == [
        (str(A), "last", 3),
        (str(B), "shop", 1),
    ]


def test_incidents_closed_by_a_result_say_recovered(writer: Writer, migrated: Any) -> None:
    writer.write([result(A, 0, at(1), "down")])
    writer.write([result(A, 1, at(2), "up")])
    writer.write([result(A, 2, at(3), "down"), result(A, 3, at(4), "up")])  # opens and ends
    assert incidents(migrated, A) == [(at(1), at(2), "recovered"), (at(3), at(4), "recovered")]


@pytest.mark.parametrize("version", [7, 8, 11, 12, 13])
def test_the_migration_can_run_again(migrated: Any, version: int) -> None:
    (migration,) = [m for m in migrate.available() if m.version == version]
    with migrated.cursor() as cur:
        cur.execute(migration.sql)
        cur.execute(migration.sql)


# -- the processor's loop with a real broker --------------------------------------------------


def produce(kafka: Any, messages: list[tuple[str, bytes, bytes | None]]) -> None:
    producer = Producer(kafka.client_config(**{"enable.idempotence": True, "linger.ms": 5}))
    for topic, key, value in messages:
        producer.produce(topic, key=key, value=value)
    assert producer.flush(60) == 0


def processor_settings(kafka: Any, schema_dsn: str, topic: str, tasks: str) -> ProcessorSettings:
    """A processor of `topic`'s results and the task topic `tasks`, in a group of its own."""
    env = {
        **kafka.env(),
        "POSTGRESQL_CONNECTION": schema_dsn,
        "KAFKA_CONSUMER_TOPICS": topic,
        "KAFKA_TASKS_TOPIC": tasks,
        "KAFKA_CONSUMER_GROUP": f"g-{uuid.uuid4().hex[:8]}",
    }
    return ProcessorSettings.model_validate({k.lower(): v for k, v in env.items()})


@contextmanager
def running_processor(settings: ProcessorSettings, schema_dsn: str) -> Iterator[None]:
    """The processor, in a thread, for the block; stopping commits what it stored (the
    offsets of both topics, after their rows)."""
    stop = threading.Event()
    writer = Writer(
        partial(db.connect, schema_dsn), 4096, window=WIDE_WINDOW,
        tasks_topic=settings.kafka_tasks_topic,
    )  # fmt: skip
    processor = Processor(
        Consumer(consumer_config(settings)), writer, topics=settings.subscribed_topics,
        batch_max_messages=500, batch_max_ms=100, stop=stop,
    )  # fmt: skip
    thread = threading.Thread(target=processor.run)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=60)


@pytest.mark.kafka
def test_the_processor_follows_the_task_topic_beside_the_results(
    kafka: Any, topic: str, schema_dsn: str, migrated: Any
) -> None:
    tasks = f"{topic}-tasks"
    create_topics(kafka.client_config(), [tasks], partitions=3)
    settings = processor_settings(kafka, schema_dsn, topic, tasks)
    key = str(A).encode()

    def record(**fields: Any) -> tuple[str, bytes, bytes]:
        return (tasks, key, task_value(A, **fields))

    def checked(health: str, minutes: float) -> tuple[str, bytes, bytes]:
        error = None if health == "up" else {"kind": "status", "message": "status 503"}
        one = make_result(timestamp=at(minutes), ok=health == "up", health=health, error=error)
        return (topic, *encode(A, one))

    def shown(column: str) -> Any:
        return scalar(migrated, f"SELECT {column} FROM tasks WHERE task_id = %s", str(A))

    with running_processor(settings, schema_dsn):
        produce(kafka, [record(name="shop"), checked("up", 1), checked("down", 2)])
        wait_for(lambda: incidents(migrated, A), "the incident opened", 60)
        assert shown("name") == "shop"
        # Each change is in PostgreSQL soon after it is produced.
        for fields, column, expected in [
            ({"name": "store"}, "name", "store"),
            ({"name": "store", "interval": 300.0}, "interval_seconds", 300.0),
            ({"name": "store", "interval": 300.0, "status": "paused"}, "status", "paused"),
        ]:
            produce(kafka, [record(**fields)])
            wait_for(lambda c=column, e=expected: shown(c) == e, f"{column} = {expected}", 60)
        paused = report.availability(migrated, timedelta(days=1), A)
        assert [(r.name, r.status, r.open_incident) for r in paused] == [("store", "paused", True)]

        produce(kafka, [(tasks, key, None)])
        wait_for(lambda: shown("removed_at"), "the removal", 60)
        assert [reason for _, _, reason in incidents(migrated, A)] == ["task_removed"]
        assert latest(migrated) == []
        produce(kafka, [checked("down", 3)])  # its last check, after the tombstone
        wait_for(
            lambda: scalar(migrated, "SELECT count(*) FROM check_results") == 3, "3 results", 60
        )
        assert [reason for _, _, reason in incidents(migrated, A)] == ["task_removed"]
        assert shown("last_checked_at") == at(2)
    watcher = Consumer(kafka.client_config(**{"group.id": settings.kafka_consumer_group}))
    try:
        partitions = [TopicPartition(t, p) for t in (topic, tasks) for p in range(3)]
        done = watcher.committed(partitions, timeout=30)
    finally:
        watcher.close()
    committed = {tp.topic: 0 for tp in done}
    for tp in done:
        committed[tp.topic] += max(tp.offset, 0)
    assert committed == {topic: 3, tasks: 5}


def test_retention_drops_a_task_removed_before_the_first_kept_day(
    writer: Writer, migrated: Any
) -> None:
    long_ago = datetime.now(UTC) - timedelta(days=100)
    writer.write([change(A, 0, long_ago), result(A, 0, long_ago, "down")])
    writer.write([tombstone(A, 1, long_ago + timedelta(hours=1)), change(B, 2)])
    writer.write([tombstone(B, 3, at(1))])
    retention.maintain(migrated, datetime.now(UTC).date(), retention_days=90)
    assert rows(migrated, "SELECT task_id::text FROM tasks") == [(str(B),)]  # removed lately
    assert incidents(migrated, A) == []


@pytest.mark.kafka
def test_a_task_created_and_removed_by_another_program_keeps_its_row(
    kafka: Any, topic: str, schema_dsn: str, migrated: Any
) -> None:
    """A record and then a tombstone of one task, produced as the README's example producer
    does: the task's row holds the record's definition and `removed_at`, whether the two come
    in one batch (A: both on the topic before the processor starts) or apart (B)."""
    tasks = f"{topic}-tasks"
    create_topics(kafka.client_config(), [tasks], partitions=3)
    settings = processor_settings(kafka, schema_dsn, topic, tasks)

    def definition(task_id: uuid.UUID, name: str) -> tuple[str, bytes, bytes]:
        spec = {"name": name, "url": f"https://{name}.example.net/health", "interval": 30,
                "timeout": 5}  # fmt: skip
        value = {"schema_version": 1, "id": str(task_id), "spec": spec}
        return (tasks, str(task_id).encode(), orjson.dumps(value))

    def shown(task_id: uuid.UUID) -> tuple[Any, ...] | None:
        found = rows(
            migrated,
            "SELECT name, url, status, removed_at IS NOT NULL FROM tasks WHERE task_id = %s",
            str(task_id),
        )
        return found[0] if found else None

    produce(kafka, [definition(A, "shop"), (tasks, str(A).encode(), None)])
    with running_processor(settings, schema_dsn):
        wait_for(lambda: shown(A) is not None, "task A's row", 60)
        assert shown(A) == ("shop", "https://shop.example.net/health", "active", True)

        produce(kafka, [definition(B, "blog")])
        wait_for(lambda: shown(B) is not None, "task B's row", 60)
        produce(kafka, [(tasks, str(B).encode(), None)])
        wait_for(lambda: (shown(B) or ())[-1:] == (True,), "task B's removal", 60)
        assert shown(B) == ("blog", "https://blog.example.net/health", "active", True)
    # Set last from the tombstone: a redelivery of either record changes nothing.
    assert task(migrated, A)["record_offset"] == 1
    assert scalar(migrated, "SELECT count(*) FROM rejected_messages") == 0
