"""The writer against a real PostgreSQL: every field, exactly once, rejections, bad rows."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import orjson
import pytest
from processing.processing_helpers import (
    WIDE_WINDOW,
    make_result,
    raw_record,
    record_of,
    rows,
    scalar,
)

from checker_common.contract import legacy_result_id
from checker_processing import db, migrate
from checker_processing.writer import Outcome, Writer

pytestmark = pytest.mark.postgres


@pytest.fixture
def writer(schema_dsn: str, migrated: Any) -> Any:
    w = Writer(partial(db.connect, schema_dsn), max_message_bytes=4096, window=WIDE_WINDOW)
    yield w
    w.close()


def test_migrate_is_idempotent(migrated: Any) -> None:
    assert migrate.apply(migrated) == []
    versions = rows(migrated, "SELECT version FROM schema_migrations ORDER BY version")
    assert versions == [(m.version,) for m in migrate.available()]


def test_every_field_lands_in_its_column(writer: Writer, migrated: Any) -> None:
    task = uuid.uuid4()
    started = datetime(2026, 11, 20, 10, 30, 15, 123456, tzinfo=UTC)
    result = make_result(
        name="shop",
        url="https://shop.test/a?b=1",
        method="HEAD",
        timestamp=started,
        scheduled_at=started - timedelta(milliseconds=3),
        attempt=2,
        status=503,
        load_time=1.5,
        pattern_search="no_match",
        ok=False,
        health="down",
        error={"kind": "status", "message": "status 503\tnot in 200-399"},
        timings={"dns": 0.01, "connect": 0.02, "tls": 0.03, "ttfb": 0.4, "transfer": 0.05},
        bytes=12345,
        body_truncated=True,
        final_url="https://shop.test/b",
        redirects=1,
        cert_expires_at=datetime(2027, 1, 2, 3, 4, 5, tzinfo=UTC),
        node="dc1\\checker-7",
    )
    outcome = writer.write([record_of(task, result, topic="results", partition=2, offset=41)])
    assert outcome == Outcome(inserted=1)
    with migrated.cursor() as cur:
        cur.execute("SELECT * FROM check_results")
        names = [d.name for d in cur.description]
        got = dict(zip(names, cur.fetchone(), strict=True))
    assert got.pop("ingested_at") is not None
    assert got == {
        "result_id": str(result.result_id),
        "checked_at": started,
        "task_id": str(task),
        "name": "shop",
        "url": "https://shop.test/a?b=1",
        "method": "HEAD",
        "scheduled_at": started - timedelta(milliseconds=3),
        "attempt": 2,
        "status_code": 503,
        "load_time": 1.5,
        "pattern_result": "no_match",
        "ok": False,
        "health": "down",
        "error_kind": "status",
        "error_message": "status 503 not in 200-399",  # the contract reads a tab as a space
        "dns_time": 0.01,
        "connect_time": 0.02,
        "tls_time": 0.03,
        "ttfb_time": 0.4,
        "transfer_time": 0.05,
        "bytes": 12345,
        "body_truncated": True,
        "final_url": "https://shop.test/b",
        "redirects": 1,
        "cert_expires_at": datetime(2027, 1, 2, 3, 4, 5, tzinfo=UTC),
        "legacy": False,
        "kafka_topic": "results",
        "kafka_partition": 2,
        "kafka_offset": 41,
        "node": "dc1\\checker-7",  # a backslash, escaped in COPY
        "double_of": None,
    }
    assert rows(migrated, "SELECT task_id::text, name, url, method, last_health FROM tasks") == [
        (str(task), "shop", "https://shop.test/a?b=1", "HEAD", "down")
    ]


def test_redelivered_batch_is_stored_once(writer: Writer, migrated: Any) -> None:
    task = uuid.uuid4()
    batch = [record_of(task, make_result(), offset=n) for n in range(50)]
    assert writer.write(batch) == Outcome(inserted=50)
    # The same results again, also from other offsets (a producer retry), and within one batch.
    again = [*batch, record_of(task, make_result(result_id=uuid.uuid4()), offset=99)]
    again += [
        record_of(task, make_result(**_same(batch[0])), offset=100),
    ]
    assert writer.write(again) == Outcome(inserted=1, duplicates=51)
    assert scalar(migrated, "SELECT count(*) FROM check_results") == 51
    assert scalar(migrated, "SELECT count(DISTINCT result_id) FROM check_results") == 51


def _same(record: Any) -> dict[str, Any]:
    body = orjson.loads(record.value)
    ((_, fields),) = body.items()
    return dict(fields)


def test_first_version_messages_are_accepted_and_idempotent(writer: Writer, migrated: Any) -> None:
    task = uuid.uuid4()
    value = orjson.dumps(
        {
            str(task): {
                "name": "old",
                "url": "http://old.test",
                "timestamp": "02/15/21 - 16:43:17",
                "status": 200,
                "load_time": "0.59",
                "pattern_search": "match",
            }
        }
    )
    record = raw_record(value, topic="old-topic", partition=1, offset=7)
    assert writer.write([record]) == Outcome(inserted=1)
    assert writer.write([record]) == Outcome(duplicates=1)
    assert rows(
        migrated, "SELECT result_id::text, checked_at, load_time, ok, legacy FROM check_results"
    ) == [
        (
            str(legacy_result_id("old-topic", 1, 7)),
            datetime(2021, 2, 15, 16, 43, 17, tzinfo=UTC),
            0.59,
            True,
            True,
        )
    ]


def test_poison_messages_are_rejected_with_their_bytes(writer: Writer, migrated: Any) -> None:
    task = uuid.uuid4()
    good = [record_of(task, make_result(), offset=n) for n in (0, 2, 4, 6)]
    poison = [
        raw_record(b"{not json", offset=1),
        raw_record(orjson.dumps({str(task): {"schema_version": 1, "ok": True}}), offset=3),
        raw_record(b"x" * 5000, offset=5),
        raw_record(None, offset=7),
    ]
    batch = sorted(good + poison, key=lambda r: r.offset)
    assert writer.write(batch) == Outcome(inserted=4, rejected=4)
    assert writer.write(batch) == Outcome(duplicates=4, rejected=4)  # redelivery: still 4 rows
    found = rows(
        migrated,
        "SELECT kafka_offset, message_key, message_value, error FROM rejected_messages"
        " ORDER BY kafka_offset",
    )
    assert [(o, bytes(k), bytes(v) if v is not None else None) for o, k, v, _ in found] == [
        (1, b"raw-key", b"{not json"),
        (3, b"raw-key", poison[1].value),
        (5, b"raw-key", b"x" * 5000),
        (7, b"raw-key", None),
    ]
    errors = [e for *_, e in found]
    assert errors[0].startswith("not valid JSON")
    assert "result_id" in errors[1] or "name" in errors[1]
    assert errors[2].startswith("message too large")
    assert scalar(migrated, "SELECT count(*) FROM check_results") == 4


def test_rows_the_database_refuses_are_rejected_not_retried(writer: Writer, migrated: Any) -> None:
    task = uuid.uuid4()
    batch = [record_of(task, make_result(), offset=n) for n in range(20)]
    # Valid for the contract, refused by PostgreSQL: a NUL in text and an integer overflow.
    batch[5] = record_of(task, make_result(name="nul\x00name"), offset=5)
    batch[13] = record_of(task, make_result(redirects=2**40), offset=13)
    assert writer.write(batch) == Outcome(inserted=18, rejected=2)
    found = rows(migrated, "SELECT kafka_offset, error FROM rejected_messages ORDER BY 1")
    assert [o for o, _ in found] == [5, 13]
    assert all(e.startswith("database refused the row") for _, e in found)
    assert scalar(migrated, "SELECT count(*) FROM check_results") == 18


def test_incidents_open_on_down_and_close_on_up(writer: Writer, migrated: Any) -> None:
    task = uuid.uuid4()
    t0 = datetime(2026, 11, 1, 12, tzinfo=UTC)
    health = ["up", "down", "down", "unknown", "up", "up", "down"]
    results = [
        make_result(
            timestamp=t0 + timedelta(minutes=n),
            health=h,
            ok=h == "up",
            error=None if h == "up" else {"kind": "timeout", "message": f"timeout {n}"},
        )
        for n, h in enumerate(health)
    ]
    records = [record_of(task, r, offset=n) for n, r in enumerate(results)]
    # Two batches, the second redelivering part of the first: nothing may change twice.
    writer.write(records[:3])
    writer.write(records[1:])
    assert rows(
        migrated,
        "SELECT started_at, ended_at, first_error_message FROM incidents ORDER BY started_at",
    ) == [
        (t0 + timedelta(minutes=1), t0 + timedelta(minutes=4), "timeout 1"),
        (t0 + timedelta(minutes=6), None, "timeout 6"),
    ]
    assert scalar(migrated, "SELECT last_health FROM tasks") == "down"


def test_a_late_result_is_stored_but_moves_neither_its_task_nor_its_incidents(
    writer: Writer, migrated: Any
) -> None:
    """A result older than the one a task already shows (a redelivery after a rebalance, a
    slow partition) is kept, and the task and incidents stay where the newer one put them;
    the other tasks of the same batch move on as usual."""
    late, other = uuid.uuid4(), uuid.uuid4()
    t0 = datetime(2026, 11, 1, 12, tzinfo=UTC)
    down = {"health": "down", "ok": False, "error": {"kind": "timeout", "message": "late"}}

    writer.write(
        [
            record_of(late, make_result(timestamp=t0 + timedelta(minutes=10)), offset=0),
            record_of(other, make_result(timestamp=t0 + timedelta(minutes=10)), offset=1),
        ]
    )
    outcome = writer.write(
        [
            record_of(late, make_result(timestamp=t0 + timedelta(minutes=5), **down), offset=2),
            record_of(other, make_result(timestamp=t0 + timedelta(minutes=11)), offset=3),
        ]
    )

    assert outcome == Outcome(inserted=2)
    assert scalar(migrated, "SELECT count(*) FROM check_results") == 4
    assert sorted(
        rows(migrated, "SELECT task_id::text, last_checked_at, last_health FROM tasks")
    ) == sorted(
        [
            (str(late), t0 + timedelta(minutes=10), "up"),
            (str(other), t0 + timedelta(minutes=11), "up"),
        ]
    )
    assert scalar(migrated, "SELECT count(*) FROM incidents") == 0


def test_a_result_not_judged_is_stored_but_moves_neither_its_task_nor_its_incidents(
    writer: Writer, migrated: Any
) -> None:
    """checker_overloaded: the checker held the check up, the site was not judged. The row is
    kept; the task keeps its last judged result, no incident opens or closes, and a task seen
    only through such results gets no tasks row yet."""
    up, down, unseen = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    t0 = datetime(2026, 11, 1, 12, tzinfo=UTC)
    t1 = t0 + timedelta(minutes=1)
    failing = {"ok": False, "health": "down", "error": {"kind": "status", "message": "503"}}

    def not_judged(health: str) -> dict[str, Any]:
        error = {"kind": "checker_overloaded", "message": "not judged: held up 2.1 s"}
        return {"ok": False, "health": health, "error": error}

    writer.write(
        [
            record_of(up, make_result(timestamp=t0), offset=0),
            record_of(down, make_result(timestamp=t0, **failing), offset=1),
        ]
    )
    first = dict(rows(migrated, "SELECT task_id::text, last_result_id::text FROM tasks"))
    outcome = writer.write(
        [
            # Even one that claims 'down' for a task that is up opens nothing.
            record_of(up, make_result(timestamp=t1, **not_judged("down")), offset=2),
            record_of(down, make_result(timestamp=t1, **not_judged("up")), offset=3),
            record_of(unseen, make_result(timestamp=t0, **not_judged("unknown")), offset=4),
        ]
    )

    assert outcome == Outcome(inserted=3)
    assert scalar(migrated, "SELECT count(*) FROM check_results") == 5
    assert sorted(
        rows(migrated, "SELECT task_id::text, last_checked_at, last_ok, last_health FROM tasks")
    ) == sorted([(str(up), t0, True, "up"), (str(down), t0, False, "down")])
    assert dict(rows(migrated, "SELECT task_id::text, last_result_id::text FROM tasks")) == first
    assert rows(migrated, "SELECT task_id::text, ended_at FROM incidents") == [(str(down), None)]


TRICKY_TEXT = ['a "quoted", {braced} name', "back\\slash", "NULL", "", "tab\tnew\nline", "ünï ✓"]


def test_tasks_take_each_tasks_latest_result_whatever_its_text(
    writer: Writer, migrated: Any
) -> None:
    """The tasks table gets the newest result of each task in a batch, wherever it is in the
    batch, and any text (the update sends its columns as array literals)."""
    tasks = [uuid.uuid4() for _ in TRICKY_TEXT]
    t0 = datetime(2026, 11, 1, 12, tzinfo=UTC)

    def minutes(n: int, first: int) -> list[int]:
        return [first + 1, first, first + 2][: 1 + n % 3]  # the newest first, last or alone

    def batch(first: int) -> list[Any]:
        records = []
        for n, (task, text) in enumerate(zip(tasks, TRICKY_TEXT, strict=True)):
            newest = max(minutes(n, first))
            for minute in minutes(n, first):
                result = make_result(
                    timestamp=t0 + timedelta(minutes=minute),
                    name=f"{text} {minute}" if minute == newest else "older",
                    url=text,
                    method="GET" if minute == newest else "POST",
                    status=None if n % 2 else 200 + minute,
                    ok=bool(n % 2),
                )
                records.append(record_of(task, result, offset=len(records)))
        return records

    # The first batch creates the tasks (insert), the second moves them on (update).
    for first in (0, 10):
        writer.write(batch(first))
        expected = []
        for n, (task, text) in enumerate(zip(tasks, TRICKY_TEXT, strict=True)):
            newest = max(minutes(n, first))
            expected.append(
                (
                    str(task),
                    f"{text} {newest}",
                    text,
                    "GET",
                    t0 + timedelta(minutes=newest),
                    None if n % 2 else 200 + newest,
                    bool(n % 2),
                )
            )
        got = rows(
            migrated,
            "SELECT task_id::text, name, url, method, last_checked_at, last_status_code, last_ok"
            " FROM tasks",
        )
        assert sorted(got) == sorted(expected)


def test_tasks_pages_keep_room_for_hot_updates(migrated: Any) -> None:
    options = rows(migrated, "SELECT reloptions FROM pg_class WHERE oid = 'tasks'::regclass")

    assert options == [(["fillfactor=50"],)]
