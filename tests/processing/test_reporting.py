"""Views, report and retention on a small fixed data set with hand-checked numbers."""

from __future__ import annotations

import dataclasses
import re
import uuid
from dataclasses import astuple
from datetime import UTC, date, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import orjson
import pytest
from processing.processing_helpers import WIDE_WINDOW, make_result, record_of, rows, scalar

from checker_processing import db, migrate, retention
from checker_processing.report import (
    ReportArgumentError,
    TaskAvailability,
    availability,
    parse_since,
    render,
)
from checker_processing.writer import Writer

from helpers import run_cli

pytestmark = pytest.mark.postgres

A = uuid.UUID("00000000-0000-4000-8000-00000000000a")
B = uuid.UUID("00000000-0000-4000-8000-00000000000b")
DAY = datetime(2026, 11, 1, tzinfo=UTC)


def at(hours: float, minutes: float = 0) -> datetime:
    return DAY + timedelta(hours=hours, minutes=minutes)


# (task, time, load_time, ok, health, error kind)
DATA = [
    (A, at(10, 0), 0.1, True, "up", None),
    (A, at(10, 15), 0.2, True, "up", None),
    (A, at(10, 30), 0.3, False, "down", "status"),
    (A, at(10, 45), 0.4, True, "up", None),
    # Not judged (the checker held the check up): in no figure but `not_judged`.
    (A, at(10, 50), 9.0, False, "up", "checker_overloaded"),
    (A, at(11, 5), 1.0, True, "up", None),
    (B, at(24, 30), 2.0, False, "down", "status"),
    (B, at(24, 40), 9.0, False, "down", "checker_overloaded"),
]


@pytest.fixture
def loaded(schema_dsn: str, migrated: Any) -> Any:
    writer = Writer(partial(db.connect, schema_dsn), max_message_bytes=4096, window=WIDE_WINDOW)
    records = [
        record_of(
            task,
            make_result(
                name=f"task-{str(task)[-1]}",
                timestamp=when,
                load_time=load,
                ok=ok,
                health=health,
                error=None if kind is None else {"kind": kind, "message": "not fine"},
            ),
            offset=n,
        )
        for n, (task, when, load, ok, health, kind) in enumerate(DATA)
    ]
    writer.write(records)
    writer.close()
    return migrated


def approx_rows(found: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    return [tuple(pytest.approx(v) if isinstance(v, float) else v for v in r) for r in found]


def test_hourly_view(loaded: Any) -> None:
    found = rows(
        loaded,
        "SELECT hour, checks, successes, uptime_percent::float8, load_time_p50, load_time_p95,"
        " load_time_p99, not_judged FROM availability_hourly WHERE task_id = %s ORDER BY hour",
        str(A),
    )
    assert found == approx_rows(
        [
            (at(10), 4, 3, 75.0, 0.25, 0.385, 0.397, 1),
            (at(11), 1, 1, 100.0, 1.0, 1.0, 1.0, 0),
        ]
    )


def test_daily_view(loaded: Any) -> None:
    found = rows(
        loaded,
        "SELECT task_id::text, day, checks, successes, uptime_percent::float8, load_time_p50,"
        " load_time_p95, load_time_p99, not_judged FROM availability_daily"
        " ORDER BY task_id, day",
    )
    assert found == approx_rows(
        [
            (str(A), date(2026, 11, 1), 5, 4, 80.0, 0.3, 0.88, 0.976, 1),
            (str(B), date(2026, 11, 2), 1, 0, 0.0, 2.0, 2.0, 2.0, 1),
        ]
    )


def test_latest_results_view(loaded: Any) -> None:
    found = rows(
        loaded,
        "SELECT task_id::text, checked_at, health FROM latest_results ORDER BY task_id",
    )
    assert found == [(str(A), at(11, 5), "up"), (str(B), at(24, 30), "down")]


def test_report_numbers(loaded: Any) -> None:
    report = availability(loaded, timedelta(days=30), None, now=at(48))
    assert [astuple(r) for r in report] == [
        (str(A), "task-a", "https://example.test/", 5, 4, 80.0,
         pytest.approx(0.3), pytest.approx(0.88), pytest.approx(0.976), 1, False, None),
        (str(B), "task-b", "https://example.test/", 1, 0, 0.0, 2.0, 2.0, 2.0, 1, True, None),
    ]  # fmt: skip
    only_b_recent = availability(loaded, timedelta(hours=24), B, now=at(48))
    assert [(r.task_id, r.checks) for r in only_b_recent] == [(str(B), 1)]
    assert availability(loaded, timedelta(hours=1), None, now=at(48)) == []


def test_render_formats() -> None:
    row = TaskAvailability(
        str(A), "a", "https://a.test/", 5, 4, 80.0, 0.3, 0.88, 0.976, 1, True, "paused"
    )
    assert orjson.loads(render([row], "json"))[0]["uptime_percent"] == 80.0
    assert orjson.loads(render([row], "json"))[0]["status"] == "paused"
    assert render([row], "csv").splitlines() == [
        "task_id,name,url,checks,successes,uptime_percent,load_time_p50,load_time_p95,"
        "load_time_p99,incidents,open_incident,status",
        f"{A},a,https://a.test/,5,4,80.0,0.3,0.88,0.976,1,True,paused",
    ]
    table = render([row], "table").splitlines()
    assert table[0].split() == ["task", "name", "status", "checks", "uptime", "%", "p50", "s",
                                "p95", "s", "p99", "s", "incidents"]  # fmt: skip
    assert table[1].split() == [str(A), "a", "paused", "5", "80.000", "0.300", "0.880", "0.976",
                                "1", "(open)"]  # fmt: skip
    unknown = render([dataclasses.replace(row, status=None)], "table").splitlines()
    assert unknown[1].split()[2] == "-"  # no task record seen: a checker that publishes none


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30d", timedelta(days=30)),
        ("24h", timedelta(hours=24)),
        ("90m", timedelta(minutes=90)),
        ("2w", timedelta(weeks=2)),
    ],
)
def test_parse_since(text: str, expected: timedelta) -> None:
    assert parse_since(text) == expected


@pytest.mark.parametrize("text", ["", "30", "0d", "-1d", "1y", "d", "30 days", "1.5h"])
def test_parse_since_rejects(text: str) -> None:
    with pytest.raises(ReportArgumentError, match=r"^--since: "):
        parse_since(text)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--since", "30x"], "--since: expected a positive duration"),
        (["--task", " "], "--task: expected a task id or name"),
        (["--format", "xml"], "--format: expected one of table, json, csv"),
    ],
)
def test_report_bad_arguments_exit_2_with_one_line(args: list[str], message: str) -> None:
    done = run_cli("checker_processing.cli", "report", *args)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith(f"checker-processing: error: {message}")


def test_report_and_migrate_commands(schema_dsn: str) -> None:
    env = {"POSTGRESQL_CONNECTION": schema_dsn}  # all they read: no Kafka settings
    first = run_cli("checker_processing.cli", "migrate", env=env)
    shipped = "".join(f"applied {m.version:04d}_{m.name}\n" for m in migrate.available())
    assert shipped.startswith("applied 0001_initial\n")
    assert (first.returncode, first.stdout) == (0, shipped), first.stderr
    again = run_cli("checker_processing.cli", "migrate", env=env)
    assert (again.returncode, again.stdout) == (0, "schema is up to date\n"), again.stderr

    writer = Writer(partial(db.connect, schema_dsn), max_message_bytes=4096, window=WIDE_WINDOW)
    now = datetime.now(UTC)
    loads = [0.1, 0.2, 0.3, 0.4]
    writer.write(
        [
            record_of(A, make_result(timestamp=now - timedelta(minutes=n + 1), load_time=t),
                      offset=n)
            for n, t in enumerate(loads)
        ]
    )  # fmt: skip
    writer.close()
    done = run_cli(
        "checker_processing.cli", "report", "--since", "24h", "--format", "json", env=env
    )
    assert done.returncode == 0, done.stderr
    (report,) = orjson.loads(done.stdout)
    assert report["task_id"] == str(A)
    assert (report["checks"], report["uptime_percent"]) == (4, 100.0)
    assert report["load_time_p50"] == pytest.approx(0.25)
    other = run_cli("checker_processing.cli", "report", "--task", str(B), env=env)
    assert (other.returncode, other.stdout) == (0, "no results in this window\n")


def test_report_on_a_database_never_migrated_says_how_to_make_the_schema(
    schema_dsn: str,
) -> None:
    """No schema is a setup to fix (exit 2), not a database to wait for (3): one line saying
    what is missing and the command that creates it; the report creates nothing itself."""
    env = {"POSTGRESQL_CONNECTION": schema_dsn}
    done = run_cli("checker_processing.cli", "report", "--since", "24h", env=env)
    assert (done.returncode, done.stdout) == (2, ""), done.stderr
    assert done.stderr == (
        "checker-processing: error: report: the database has no schema (no table"
        " check_results, tasks, incidents): create it with `checker-processing migrate`"
        " (the processor's `run` also does at start)\n"
    )
    conn = db.connect(schema_dsn)
    try:
        assert scalar(conn, "SELECT to_regclass('schema_migrations')::text") is None
    finally:
        conn.close()


def test_report_takes_a_task_name_or_id(loaded: Any, schema_dsn: str) -> None:
    env = {"POSTGRESQL_CONNECTION": schema_dsn}
    report = ["checker_processing.cli", "report", "--since", "5000w", "--format", "json"]
    for task in ["task-a", str(A)]:
        done = run_cli(*report, "--task", task, env=env)
        assert done.returncode == 0, done.stderr
        assert [r["task_id"] for r in orjson.loads(done.stdout)] == [str(A)]


def test_report_refuses_a_task_name_that_names_none_or_several(
    loaded: Any, schema_dsn: str
) -> None:
    env = {"POSTGRESQL_CONNECTION": schema_dsn}
    unknown = run_cli("checker_processing.cli", "report", "--task", "task-z", env=env)
    assert (unknown.returncode, unknown.stdout) == (2, "")
    assert unknown.stderr == (
        "checker-processing: error: --task: no task has the id or name 'task-z'\n"
    )

    # Names are unique in one checker, not in the results: a task removed and added again
    # under its old name is a second task with that name.
    loaded.cursor().execute("UPDATE tasks SET name = 'task-a' WHERE task_id = %s", (str(B),))
    ambiguous = run_cli("checker_processing.cli", "report", "--task", "task-a", env=env)
    assert (ambiguous.returncode, ambiguous.stdout) == (2, "")
    assert ambiguous.stderr.count("\n") == 1
    assert ambiguous.stderr.startswith(
        "checker-processing: error: --task: 2 tasks are named 'task-a' ("
    )
    assert str(A) in ambiguous.stderr
    assert str(B) in ambiguous.stderr
    assert ambiguous.stderr.endswith("); give the id\n")


def test_retention_drops_only_expired_partitions(schema_dsn: str, migrated: Any) -> None:
    writer = Writer(partial(db.connect, schema_dsn), max_message_bytes=4096, window=WIDE_WINDOW)
    today = date(2026, 11, 27)
    kept_day = datetime(2026, 11, 20, 0, 0, 1, tzinfo=UTC)
    old_day = datetime(2026, 11, 19, 23, 59, 59, tzinfo=UTC)
    # Slots a day before the first kept one are kept: a check starts up to an hour late.
    slot_kept = datetime(2026, 11, 19, 0, 0, tzinfo=UTC)
    slot_old = datetime(2026, 11, 18, 23, 59, tzinfo=UTC)
    writer.write(
        [
            record_of(A, make_result(timestamp=old_day, scheduled_at=slot_old), offset=0),
            record_of(A, make_result(timestamp=kept_day, scheduled_at=slot_kept), offset=1),
            record_of(A, make_result(timestamp=datetime(2025, 1, 1, tzinfo=UTC)), offset=2),
        ]
    )
    writer.close()
    dropped = retention.maintain(migrated, today, retention_days=7)
    assert dropped == [date(2025, 1, 1), date(2026, 11, 19)]
    assert retention.partition_days(migrated) == [
        date(2026, 11, 20),
        date(2026, 11, 27),
        date(2026, 11, 28),
        date(2026, 11, 29),
        date(2026, 11, 30),
    ]
    assert rows(migrated, "SELECT checked_at FROM check_results") == [(kept_day,)]
    assert rows(migrated, "SELECT checked_at FROM result_ids") == [(kept_day,)]
    assert rows(migrated, "SELECT scheduled_at FROM result_slots") == [(slot_kept,)]
    assert retention.maintain(migrated, today, retention_days=7) == []
    assert scalar(migrated, "SELECT count(*) FROM check_results") == 1


@pytest.mark.parametrize(
    ("days", "retention_days", "expected"),
    [
        ([date(2026, 1, 1), date(2026, 1, 2), date(2026, 1, 3)], 1, [date(2026, 1, 1)]),
        ([date(2026, 1, 2), date(2026, 1, 3)], 1, []),
        ([date(2025, 12, 1)], 30, [date(2025, 12, 1)]),
    ],
)
def test_expired_days(days: list[date], retention_days: int, expected: list[date]) -> None:
    assert retention.expired(days, date(2026, 1, 3), retention_days) == expected


def test_documented_queries_run(loaded: Any) -> None:
    text = (Path(__file__).resolve().parents[2] / "docs" / "queries.md").read_text()
    queries = re.findall(r"```sql\n(.*?)```", text, re.DOTALL)
    assert len(queries) >= 8
    for query in queries:
        rows(loaded, query.replace("%", "%%"))
    (open_incidents,) = re.findall(r"Tasks that are down now.*?```sql\n(.*?)```", text, re.DOTALL)
    down = rows(loaded, open_incidents)
    assert [r[0] for r in down] == ["task-b"]


def test_migrate_without_database_is_one_line_and_exit_3() -> None:
    env = {"POSTGRESQL_CONNECTION": "postgresql://postgres:s3cret@127.0.0.1:1/x"}
    done = run_cli("checker_processing.cli", "migrate", env=env)
    assert done.returncode == 3
    assert done.stderr.startswith("checker-processing: error: migrate: ")
    assert done.stderr.count("\n") == 1
    assert "s3cret" not in done.stderr
