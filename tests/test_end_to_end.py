"""End to end: `periodic-checker run` checks a local web server, `checker-processing run` stores
what it published in PostgreSQL -- every field as measured -- and the incident table follows the
target going down and coming back."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from faults.faults_support import (
    Daemon,
    Target,
    checker_env,
    fresh_schema,
    processor_env,
    query,
    read_topic,
    seed_tasks,
    settle_and_tally,
    spec,
    wait_for,
)

from checker_common.contract import Decoded, Health, PatternResult
from periodic_checker.settings import default_node_id

from helpers import KafkaTarget

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]

PAGE_BYTES = len(b"<h1>hello periodic checker</h1>")
COLUMNS = (
    "result_id, checked_at, task_id, name, url, method, scheduled_at, attempt, status_code,"
    " load_time, pattern_result, ok, health, error_kind, error_message, dns_time, connect_time,"
    " tls_time, ttfb_time, transfer_time, bytes, final_url, redirects, cert_expires_at, legacy,"
    " kafka_topic, node"
)


@pytest.fixture
def dsn(pg_dsn: str) -> Iterator[str]:
    with fresh_schema(pg_dsn) as schema_dsn:
        yield schema_dsn


def expected_row(message: Decoded, topic: str) -> tuple[object, ...]:
    """The row the processor must store for one published message (COLUMNS order)."""
    r, t = message.result, message.result.timings
    return (
        str(r.result_id),
        r.timestamp,
        str(message.task_id),
        r.name,
        r.url,
        r.method,
        r.scheduled_at,
        r.attempt,
        r.status,
        r.load_time,
        r.pattern_search.value if r.pattern_search else None,
        r.ok,
        r.health.value,
        r.error.kind.value if r.error else None,
        r.error.message if r.error else None,
        t.dns,
        t.connect,
        t.tls,
        t.ttfb,
        t.transfer,
        r.bytes,
        r.final_url,
        r.redirects,
        r.cert_expires_at,
        False,
        topic,
        r.node,
    )


def test_checks_reach_postgresql_with_every_field_and_incidents_follow_the_target(
    kafka: KafkaTarget, topic: str, dsn: str, tmp_path: Path
) -> None:
    storage = tmp_path / "tasks.sqlite3"
    with Target() as target:
        flip, redirected = seed_tasks(
            storage,
            [
                spec(target.url("/flip"), name="flip", pattern="hello periodic"),
                spec(target.url("/redirect/2"), name="redirected", pattern="not on the page"),
            ],
        )
        processor = Daemon.processor(processor_env(kafka, topic, dsn), tmp_path / "processor.log")
        checker = Daemon.checker(checker_env(kafka, topic, storage), tmp_path / "checker.log")
        try:

            def rows_of(task: uuid.UUID, where: str = "true") -> int:
                found = query(
                    dsn,
                    f"SELECT count(*) FROM check_results WHERE task_id = %s AND {where}",
                    str(task),
                )
                return int(found[0][0]) if found else 0

            def incidents() -> list[tuple[object, ...]]:
                return query(
                    dsn,
                    "SELECT started_at, ended_at, first_error_kind, first_error_message"
                    " FROM incidents WHERE task_id = %s",
                    str(flip),
                )

            wait_for(lambda: rows_of(flip, "ok") >= 2, "two good results of the flip task")
            assert incidents() == []
            target.failing = True
            wait_for(lambda: any(end is None for _, end, *_ in incidents()), "an open incident")
            target.failing = False
            wait_for(lambda: rows_of(flip, "ok AND checked_at > (SELECT max(started_at)"
                                           " FROM incidents)") >= 1,
                     "a good result after the incident")  # fmt: skip
            wait_for(lambda: all(end is not None for _, end, *_ in incidents()), "closed incident")
            assert checker.terminate() == 0, checker.tail()
        finally:
            checker.kill()
        tally = settle_and_tally(kafka, topic, dsn)
        assert processor.terminate() == 0, processor.tail()

    tally.report("end_to_end")
    assert tally.lost == tally.duplicates == tally.unknown == tally.outbox_left == 0
    assert tally.rows == tally.produced > 0
    # Every result names the node that ran it (the checker's host name by default).
    assert {m.result.node for m in read_topic(kafka, topic)} == {default_node_id()}

    messages = {str(m.result.result_id): m for m in read_topic(kafka, topic)}
    rows = query(dsn, f"SELECT {COLUMNS} FROM check_results")
    assert len(rows) == len(messages)
    for row in rows:
        assert row == expected_row(messages[row[0]], topic)

    # What the checker measured, independently of the message: the page, the pattern, timings.
    by_task = {task: [m.result for m in messages.values() if m.task_id == task]
               for task in (flip, redirected)}  # fmt: skip
    good = [r for r in by_task[flip] if r.ok]
    assert good
    assert all(r.status == 200 for r in good)
    assert all(r.pattern_search is PatternResult.MATCH and r.bytes == PAGE_BYTES for r in good)
    assert all(r.final_url == target.url("/flip") and r.redirects == 0 for r in good)
    assert all(r.timings.connect is not None and r.timings.ttfb is not None for r in good)
    assert all(r.timings.tls is None and r.load_time > 0 for r in good)
    down = [r for r in by_task[flip] if not r.ok]
    assert down
    assert all(r.status == 503 and r.health is Health.DOWN for r in down)
    assert all(r.error is not None and r.error.kind == "status" for r in down)
    moved = by_task[redirected]
    assert moved
    assert all(r.final_url == target.url("/ok") and r.redirects == 2 for r in moved)
    assert all(r.status == 200 and r.pattern_search is PatternResult.NO_MATCH for r in moved)
    assert all(not r.ok and r.health is Health.DOWN for r in moved)

    # The tasks table holds each task's name, url and latest result.
    tasks = query(dsn, "SELECT task_id::text, name, url, last_result_id::text FROM tasks")
    latest = {
        str(task): max(results, key=lambda r: r.timestamp) for task, results in by_task.items()
    }
    assert {(t, n, u, last) for t, n, u, last in tasks} == {
        (str(flip), "flip", target.url("/flip"), str(latest[str(flip)].result_id)),
        (
            str(redirected),
            "redirected",
            target.url("/redirect/2"),
            str(latest[str(redirected)].result_id),
        ),
    }
    # One incident, opened by the first failure and closed by the first success after it.
    ((started, ended, kind, message),) = incidents_of(dsn, flip)
    assert isinstance(started, datetime)
    first_down = min(down, key=lambda r: r.timestamp)
    assert started == first_down.timestamp
    assert kind == "status"
    assert first_down.error is not None
    assert message == first_down.error.message
    back = min((r for r in good if r.timestamp > started), key=lambda r: r.timestamp)
    assert ended == back.timestamp


def incidents_of(dsn: str, task: uuid.UUID) -> list[tuple[object, ...]]:
    return query(
        dsn,
        "SELECT started_at, ended_at, first_error_kind, first_error_message"
        " FROM incidents WHERE task_id = %s",
        str(task),
    )
