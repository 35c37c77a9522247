"""Views, report and retention on a small fixed data set with hand-checked numbers."""

from __future__ import annotations

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

from checker_processing import db, retention
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


# (task, time, load_time, ok, health)
DATA = [
    (A, at(10, 0), 0.1, True, "up"),
    (A, at(10, 15), 0.2, True, "up"),
    (A, at(10, 30), 0.3, False, "down"),
    (A, at(10, 45), 0.4, True, "up"),
    (A, at(11, 5), 1.0, True, "up"),
    (B, at(24, 30), 2.0, False, "down"),
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
                error=None if ok else {"kind": "status", "message": "status 500"},
            ),
            offset=n,
        )
        for n, (task, when, load, ok, health) in enumerate(DATA)
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
        " load_time_p99 FROM availability_hourly WHERE task_id = %s ORDER BY hour",
        str(A),
    )
    assert found == approx_rows(
        [
            (at(10), 4, 3, 75.0, 0.25, 0.385, 0.397),
            (at(11), 1, 1, 100.0, 1.0, 1.0, 1.0),
        ]
    )


def test_daily_view(loaded: Any) -> None:
    found = rows(
        loaded,
        "SELECT task_id::text, day, checks, successes, uptime_percent::float8, load_time_p50,"
        " load_time_p95, load_time_p99 FROM availability_daily ORDER BY task_id, day",
    )
    assert found == approx_rows(
        [
            (str(A), date(2026, 11, 1), 5, 4, 80.0, 0.3, 0.88, 0.976),
            (str(B), date(2026, 11, 2), 1, 0, 0.0, 2.0, 2.0, 2.0),
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
         pytest.approx(0.3), pytest.approx(0.88), pytest.approx(0.976), 1, False),
        (str(B), "task-b", "https://example.test/", 1, 0, 0.0, 2.0, 2.0, 2.0, 1, True),
    ]  # fmt: skip
    only_b_recent = availability(loaded, timedelta(hours=24), B, now=at(48))
    assert [(r.task_id, r.checks) for r in only_b_recent] == [(str(B), 1)]
    assert availability(loaded, timedelta(hours=1), None, now=at(48)) == []


def test_render_formats() -> None:
    row = TaskAvailability(str(A), "a", "https://a.test/", 5, 4, 80.0, 0.3, 0.88, 0.976, 1, True)
    assert orjson.loads(render([row], "json"))[0]["uptime_percent"] == 80.0
    assert render([row], "csv").splitlines() == [
        "task_id,name,url,checks,successes,uptime_percent,load_time_p50,load_time_p95,"
        "load_time_p99,incidents,open_incident",
        f"{A},a,https://a.test/,5,4,80.0,0.3,0.88,0.976,1,True",
    ]
    table = render([row], "table").splitlines()
    assert table[0].split() == ["task", "name", "checks", "uptime", "%", "p50", "s", "p95", "s",
                                "p99", "s", "incidents"]  # fmt: skip
    assert table[1].split() == [str(A), "a", "5", "80.000", "0.300", "0.880", "0.976", "1",
                                "(open)"]  # fmt: skip


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
        (["--task", "nope"], "--task: not a task id"),
        (["--format", "xml"], "--format: expected one of table, json, csv"),
    ],
)
def test_report_bad_arguments_exit_2_with_one_line(args: list[str], message: str) -> None:
    done = run_cli("checker_processing.cli", "report", *args)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith(f"checker-processing: error: {message}")


def test_report_and_migrate_commands(kafka: Any, schema_dsn: str) -> None:
    env = {**kafka.env(), "POSTGRESQL_CONNECTION": schema_dsn}
    first = run_cli("checker_processing.cli", "migrate", env=env)
    assert (first.returncode, first.stdout) == (
        0,
        "applied 0001_initial\napplied 0002_latest_results_lateral\n"
        "applied 0003_tasks_fillfactor\napplied 0004_result_ids\n",
    ), first.stderr
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


def test_retention_drops_only_expired_partitions(schema_dsn: str, migrated: Any) -> None:
    writer = Writer(partial(db.connect, schema_dsn), max_message_bytes=4096, window=WIDE_WINDOW)
    today = date(2026, 11, 27)
    kept_day = datetime(2026, 11, 20, 0, 0, 1, tzinfo=UTC)
    old_day = datetime(2026, 11, 19, 23, 59, 59, tzinfo=UTC)
    writer.write(
        [
            record_of(A, make_result(timestamp=old_day), offset=0),
            record_of(A, make_result(timestamp=kept_day), offset=1),
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
    down = rows(loaded, queries[-3])  # open incidents
    assert [r[0] for r in down] == ["task-b"]


def test_migrate_without_database_is_one_line_and_exit_1(kafka: Any) -> None:
    env = {**kafka.env(), "POSTGRESQL_CONNECTION": "postgresql://postgres:s3cret@127.0.0.1:1/x"}
    done = run_cli("checker_processing.cli", "migrate", env=env)
    assert done.returncode == 1
    assert done.stderr.startswith("checker-processing: error: migrate: ")
    assert done.stderr.count("\n") == 1
    assert "s3cret" not in done.stderr
