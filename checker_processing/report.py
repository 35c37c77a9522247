"""`checker-processing report`: availability per task over a recent window."""

from __future__ import annotations

import csv
import io
import re
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta

import orjson
from psycopg2 import sql
from psycopg2.extensions import connection as Connection

FORMATS = ("table", "json", "csv")
_SINCE = re.compile(r"^(\d{1,6})([mhdw])$")
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


class ReportArgumentError(ValueError):
    """A bad --since, --task or --format (also a --task name that names no task, or several);
    the message names the option."""


class SchemaMissingError(RuntimeError):
    """The database lacks a table the report reads: it was never migrated. The message says
    which command creates the schema."""


# The tables the report reads; the first migration makes them all.
_TABLES = ("check_results", "tasks", "incidents")


def require_schema(conn: Connection) -> None:
    """Raise SchemaMissingError when a table the report reads is not in the database (in its
    search path), rather than let the report fail on it as if the database had failed."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT name FROM unnest(%s::text[]) AS name WHERE to_regclass(name) IS NULL",
            (list(_TABLES),),
        )
        missing = [name for (name,) in cur.fetchall()]
    conn.rollback()
    if missing:
        raise SchemaMissingError(
            f"report: the database has no schema (no table {', '.join(missing)}): create it"
            " with `checker-processing migrate` (the processor's `run` also does at start)"
        )


def parse_since(text: str) -> timedelta:
    """`30d`, `24h`, `90m`, `2w` -> a positive duration (pure)."""
    match = _SINCE.match(text.strip())
    if not match or int(match[1]) == 0:
        raise ReportArgumentError(
            f"--since: expected a positive duration like 30d, 24h, 90m or 2w, got {text!r}"
        )
    return timedelta(**{_UNITS[match[2]]: int(match[1])})


def parse_task(text: str | None) -> uuid.UUID | str | None:
    """--task: a task id, else a task name that `resolve_task` looks up (pure)."""
    if text is None:
        return None
    if not text.strip():
        raise ReportArgumentError("--task: expected a task id or name, got an empty value")
    try:
        return uuid.UUID(text)
    except ValueError:
        return text


# An ambiguous name lists this many of its ids; enough to pick one, short enough for one line.
AMBIGUOUS_IDS_SHOWN = 3


def resolve_task(conn: Connection, ref: uuid.UUID | str | None) -> uuid.UUID | None:
    """The id `--task` names: an id as given, or the one task whose name (its latest, as the
    processor stored it) is exactly `ref`: the one task by that name that is not removed, else
    the one removed task by that name. No task or several: ReportArgumentError.
    """
    if ref is None or isinstance(ref, uuid.UUID):
        return ref
    with conn.cursor() as cur:
        cur.execute(
            "SELECT task_id::text, removed_at IS NOT NULL FROM tasks WHERE name = %s"
            " ORDER BY last_checked_at DESC NULLS LAST",
            (ref,),
        )
        found = cur.fetchall()
    conn.rollback()
    # A name freed by a removal and taken again: the live task is the one meant.
    ids = [task_id for task_id, removed in found if not removed] or [
        task_id for task_id, _ in found
    ]
    if not ids:
        raise ReportArgumentError(f"--task: no task has the id or name {ref!r}")
    if len(ids) > 1:
        shown = ", ".join(ids[:AMBIGUOUS_IDS_SHOWN])
        more = (
            f" and {len(ids) - AMBIGUOUS_IDS_SHOWN} more" if len(ids) > AMBIGUOUS_IDS_SHOWN else ""
        )
        raise ReportArgumentError(
            f"--task: {len(ids)} tasks are named {ref!r} ({shown}{more}); give the id"
        )
    return uuid.UUID(ids[0])


def parse_format(text: str) -> str:
    if text not in FORMATS:
        raise ReportArgumentError(f"--format: expected one of {', '.join(FORMATS)}, got {text!r}")
    return text


@dataclass(frozen=True)
class TaskAvailability:
    task_id: str
    name: str
    url: str
    checks: int
    successes: int
    uptime_percent: float
    load_time_p50: float
    load_time_p95: float
    load_time_p99: float
    incidents: int
    open_incident: bool
    # active, paused, done or error as the task topic last said; removed; None when no task
    # record was seen (a checker that publishes none). A paused or done task has few checks
    # in the window because it was not checked, not because it was down.
    status: str | None


# The window is filtered on checked_at itself (partition pruning, index range scan); the
# percentiles are exact (percentile_cont over the window's rows). Results not judged
# (checker_overloaded: the checker held the check up) say nothing about the site: they are
# left out, and a task with nothing else in the window is not listed. A double (a second
# result of the same task and slot, from another checker node) is left out: one result
# counts per (task, slot). A removed task is
# listed for its results in the window, with no open incident (its removal closed it).
_QUERY = """
WITH r AS (
    SELECT task_id,
           count(*) FILTER (WHERE judged) AS checks,
           count(*) FILTER (WHERE ok) AS successes,
           percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY load_time)
               FILTER (WHERE judged) AS p
    FROM (
        SELECT task_id, ok, load_time,
               error_kind IS DISTINCT FROM 'checker_overloaded' AS judged
        FROM check_results
        WHERE checked_at >= %(since)s AND double_of IS NULL {task_filter}
    ) AS c
    GROUP BY task_id
    HAVING count(*) FILTER (WHERE judged) > 0
)
SELECT r.task_id::text, coalesce(t.name, ''), coalesce(t.url, ''), r.checks, r.successes,
       round(100.0 * r.successes / r.checks, 3)::float8, r.p[1], r.p[2], r.p[3],
       (SELECT count(*) FROM incidents i
         WHERE i.task_id = r.task_id AND coalesce(i.ended_at, 'infinity') >= %(since)s),
       t.removed_at IS NULL
         AND EXISTS (SELECT 1 FROM incidents i WHERE i.task_id = r.task_id AND i.ended_at IS NULL),
       CASE WHEN t.removed_at IS NOT NULL THEN 'removed' ELSE t.status END
FROM r LEFT JOIN tasks t USING (task_id)
ORDER BY t.name, r.task_id
"""


def availability(
    conn: Connection, since: timedelta, task: uuid.UUID | None, now: datetime | None = None
) -> list[TaskAvailability]:
    """Per task: checks, uptime and load-time percentiles in the window, incidents touching it."""
    start = (now or datetime.now(UTC)) - since
    task_filter = sql.SQL("AND task_id = %(task)s") if task else sql.SQL("")
    query = sql.SQL(_QUERY).format(task_filter=task_filter)
    with conn.cursor() as cur:
        cur.execute(query, {"since": start, "task": str(task) if task else None})
        found = [TaskAvailability(*row) for row in cur.fetchall()]
    conn.rollback()
    return found


def render(rows: list[TaskAvailability], fmt: str) -> str:
    """The report as text (pure)."""
    if fmt == "json":
        return orjson.dumps([asdict(r) for r in rows], option=orjson.OPT_INDENT_2).decode()
    fields = list(TaskAvailability.__dataclass_fields__)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(fields)
        for r in rows:
            writer.writerow([getattr(r, f) for f in fields])
        return out.getvalue().rstrip("\n")
    header = [
        "task",
        "name",
        "status",
        "checks",
        "uptime %",
        "p50 s",
        "p95 s",
        "p99 s",
        "incidents",
    ]
    table = [
        [
            r.task_id,
            r.name or r.url,
            r.status or "-",
            str(r.checks),
            f"{r.uptime_percent:.3f}",
            f"{r.load_time_p50:.3f}",
            f"{r.load_time_p95:.3f}",
            f"{r.load_time_p99:.3f}",
            f"{r.incidents}{' (open)' if r.open_incident else ''}",
        ]
        for r in rows
    ]
    if not table:
        return "no results in this window"
    widths = [max(len(line[i]) for line in [header, *table]) for i in range(len(header))]
    lines = [
        "  ".join(
            cell.ljust(w) if i < 3 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        ).rstrip()
        for line in [header, *table]
    ]
    return "\n".join(lines)
