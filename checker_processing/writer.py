"""Writes a batch of Kafka records to PostgreSQL in one transaction, exactly once per result.

Rows go through COPY into a per-connection staging table and one
INSERT ... ON CONFLICT DO NOTHING RETURNING; only the rows that were really new update the
tasks table and the incidents, so a redelivered batch changes nothing. Records that break the
contract, and rows the database refuses, go to rejected_messages with their raw bytes.
Connection trouble is raised to the caller (who keeps the batch and retries).
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

import psycopg2
from psycopg2.extensions import connection as Connection
from psycopg2.extras import execute_values

from checker_common.contract import ContractError, Decoded, Health, decode

log = logging.getLogger(__name__)

# Errors that will fail again on every retry: the database refuses this data.
PERMANENT_ERRORS: tuple[type[Exception], ...] = (psycopg2.DataError, psycopg2.IntegrityError)

COLUMNS = (
    "result_id",
    "checked_at",
    "task_id",
    "name",
    "url",
    "method",
    "scheduled_at",
    "attempt",
    "status_code",
    "load_time",
    "pattern_result",
    "ok",
    "health",
    "error_kind",
    "error_message",
    "dns_time",
    "connect_time",
    "tls_time",
    "ttfb_time",
    "transfer_time",
    "bytes",
    "final_url",
    "redirects",
    "cert_expires_at",
    "legacy",
    "kafka_topic",
    "kafka_partition",
    "kafka_offset",
)
_COLS = ", ".join(COLUMNS)

# The staging table lives as long as the connection; ON COMMIT DELETE ROWS empties it after
# every batch (and a rolled-back batch leaves nothing either).
_STAGING = (
    "CREATE TEMP TABLE IF NOT EXISTS staging_results"
    " (LIKE check_results INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
)
_INSERT = f"""
INSERT INTO check_results ({_COLS})
SELECT {_COLS} FROM staging_results
ON CONFLICT DO NOTHING
RETURNING task_id, result_id, checked_at, name, url, method, status_code, ok, health,
          error_kind, error_message
"""


@dataclass(frozen=True)
class Record:
    """One Kafka message as read: where it was and its raw bytes."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


@dataclass(frozen=True)
class Row:
    record: Record
    decoded: Decoded


@dataclass(frozen=True)
class Rejection:
    record: Record
    error: str


@dataclass(frozen=True)
class Outcome:
    """What one batch did: new rows, rows already stored, records rejected."""

    inserted: int = 0
    duplicates: int = 0
    rejected: int = 0

    def __add__(self, other: Outcome) -> Outcome:
        return Outcome(
            self.inserted + other.inserted,
            self.duplicates + other.duplicates,
            self.rejected + other.rejected,
        )


def parse(records: Iterable[Record], max_bytes: int) -> tuple[list[Row], list[Rejection]]:
    """Split records into valid rows and contract rejections (pure)."""
    rows: list[Row] = []
    rejected: list[Rejection] = []
    for record in records:
        try:
            decoded = decode(
                record.value,
                topic=record.topic,
                partition=record.partition,
                offset=record.offset,
                max_bytes=max_bytes,
            )
        except ContractError as exc:
            rejected.append(Rejection(record, str(exc)))
        else:
            rows.append(Row(record, decoded))
    return rows, rejected


def row_values(row: Row) -> tuple[Any, ...]:
    """The COPY values of one row, in COLUMNS order."""
    r = row.decoded.result
    t = r.timings
    return (
        r.result_id,
        r.timestamp,
        row.decoded.task_id,
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
        row.decoded.legacy,
        row.record.topic,
        row.record.partition,
        row.record.offset,
    )


def copy_text(rows: Iterable[Row]) -> str:
    """Rows in COPY text format (pure). A NUL in a string is left in: the server refuses it,
    and that row is then found and rejected like any other the database will not take."""
    lines = []
    for row in rows:
        lines.append("\t".join(_copy_field(value) for value in row_values(row)))
    return "\n".join(lines) + "\n" if lines else ""


def _copy_field(value: Any) -> str:
    if value is None:
        return "\\N"
    if isinstance(value, bool):
        return "t" if value else "f"
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, float):
        return repr(value)
    text = str(value)
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def utc_day(moment: datetime) -> date:
    return moment.astimezone(UTC).date()


class Writer:
    """Stores batches; owns one connection, opened lazily and dropped on connection trouble."""

    def __init__(self, connect: Callable[[], Connection], max_message_bytes: int) -> None:
        self._connect = connect
        self._conn: Connection | None = None
        self._max_bytes = max_message_bytes
        self._partitions: set[date] = set()

    @property
    def conn(self) -> Connection:
        if self._conn is None or self._conn.closed:
            self._conn = self._connect()
            self._partitions.clear()
        return self._conn

    def reset(self) -> None:
        """Drop the connection (after a transient error); the next call reconnects."""
        if self._conn is not None:
            with contextlib.suppress(psycopg2.Error):
                self._conn.close()
        self._conn = None

    def forget_partitions(self) -> None:
        """Called after retention dropped partitions."""
        self._partitions.clear()

    def close(self) -> None:
        self.reset()

    def write(self, records: Sequence[Record]) -> Outcome:
        """Store a batch. Raises a TRANSIENT error (db.TRANSIENT_ERRORS) when the database
        cannot be reached; then nothing of this call may be assumed stored, retry it whole."""
        rows, rejected = parse(records, self._max_bytes)
        try:
            self.ensure_partitions({utc_day(r.decoded.result.timestamp) for r in rows})
            try:
                outcome = self._store(rows, rejected)
            except PERMANENT_ERRORS as exc:
                self.conn.rollback()
                log.warning("batch of %d rows refused (%s); finding the bad rows", len(rows), exc)
                outcome = self._bisect(rows) + self._store([], rejected)
        except BaseException:
            self.reset()
            raise
        return outcome

    def ensure_partitions(self, days: Iterable[date]) -> None:
        """Create the daily partitions these days need (own short transaction)."""
        missing = sorted(set(days) - self._partitions)
        if not missing:
            return
        conn = self.conn
        with conn.cursor() as cur:
            cur.execute(
                "SELECT d, check_results_ensure_partition(d) FROM unnest(%s::date[]) AS d",
                (missing,),
            )
            for day, created in cur.fetchall():
                if created:
                    log.info("created partition for %s", day)
        conn.commit()
        self._partitions.update(missing)

    def _bisect(self, rows: list[Row]) -> Outcome:
        """Store what the database accepts; reject the rows it refuses one by one."""
        if not rows:
            return Outcome()
        try:
            return self._store(rows, [])
        except PERMANENT_ERRORS as exc:
            self.conn.rollback()
            if len(rows) == 1:
                reason = f"database refused the row: {_one_line(exc)}"
                log.warning(
                    "rejected %s/%d@%d: %s",
                    rows[0].record.topic,
                    rows[0].record.partition,
                    rows[0].record.offset,
                    reason,
                )
                return self._store([], [Rejection(rows[0].record, reason)])
        middle = len(rows) // 2
        return self._bisect(rows[:middle]) + self._bisect(rows[middle:])

    def _store(self, rows: list[Row], rejected: list[Rejection]) -> Outcome:
        """One transaction: results, tasks, incidents and rejections."""
        conn = self.conn
        inserted: list[tuple[Any, ...]] = []
        with conn.cursor() as cur:
            if rows:
                cur.execute(_STAGING)
                cur.copy_expert(
                    f"COPY staging_results ({_COLS}) FROM STDIN", io.StringIO(copy_text(rows))
                )
                cur.execute(_INSERT)
                inserted = cur.fetchall()
                if inserted:
                    _update_tasks_and_incidents(cur, inserted)
            stored_rejections = 0
            if rejected:
                values = [
                    (
                        r.record.topic,
                        r.record.partition,
                        r.record.offset,
                        r.record.key,
                        r.record.value,
                        r.error.replace("\x00", "\\0"),
                    )
                    for r in rejected
                ]
                execute_values(
                    cur,
                    "INSERT INTO rejected_messages (kafka_topic, kafka_partition, kafka_offset,"
                    " message_key, message_value, error) VALUES %s ON CONFLICT DO NOTHING",
                    values,
                    page_size=1000,
                )
                stored_rejections = len(rejected)
        conn.commit()
        for r in rejected:
            log.warning(
                "rejected message: %s",
                r.error,
                extra={
                    "topic": r.record.topic,
                    "partition": r.record.partition,
                    "offset": r.record.offset,
                },
            )
        return Outcome(len(inserted), len(rows) - len(inserted), stored_rejections)


def _update_tasks_and_incidents(cur: Any, inserted: list[tuple[Any, ...]]) -> None:
    """Move each task's latest result and its incidents forward from the new rows only."""
    by_task: dict[str, list[tuple[Any, ...]]] = {}
    for row in inserted:
        by_task.setdefault(str(row[0]), []).append(row)
    task_ids = sorted(by_task)
    # Lock in a fixed order so two processors touching the same tasks cannot deadlock.
    cur.execute(
        "SELECT task_id::text, last_checked_at FROM tasks WHERE task_id = ANY(%s::uuid[])"
        " ORDER BY task_id FOR UPDATE",
        (task_ids,),
    )
    last_seen: dict[str, datetime] = dict(cur.fetchall())
    cur.execute(
        "SELECT task_id::text, incident_id FROM incidents"
        " WHERE ended_at IS NULL AND task_id = ANY(%s::uuid[])",
        (task_ids,),
    )
    open_incidents: dict[str, int] = dict(cur.fetchall())

    latest = []
    for task_id in task_ids:
        rows = sorted(by_task[task_id], key=lambda r: (r[2], str(r[1])))
        previous = last_seen.get(task_id)
        for row in rows:
            # A result older than what we already applied arrived late: it is stored, but it
            # must not reopen or close incidents out of order.
            if previous is not None and row[2] < previous:
                continue
            _apply_health(cur, task_id, row, open_incidents)
        newest = rows[-1]
        if previous is None or newest[2] >= previous:
            latest.append(newest)
    if latest:
        execute_values(
            cur,
            "INSERT INTO tasks (task_id, last_result_id, last_checked_at, name, url, method,"
            " last_status_code, last_ok, last_health) VALUES %s"
            " ON CONFLICT (task_id) DO UPDATE SET name = EXCLUDED.name, url = EXCLUDED.url,"
            " method = EXCLUDED.method, last_result_id = EXCLUDED.last_result_id,"
            " last_checked_at = EXCLUDED.last_checked_at,"
            " last_status_code = EXCLUDED.last_status_code, last_ok = EXCLUDED.last_ok,"
            " last_health = EXCLUDED.last_health, updated_at = now()"
            " WHERE tasks.last_checked_at <= EXCLUDED.last_checked_at",
            [row[:9] for row in latest],
        )


def _apply_health(
    cur: Any, task_id: str, row: tuple[Any, ...], open_incidents: dict[str, int]
) -> None:
    result_id, checked_at, health = row[1], row[2], row[8]
    error_kind, error_message = row[9], row[10]
    if health == Health.DOWN and task_id not in open_incidents:
        cur.execute(
            "INSERT INTO incidents (task_id, started_at, first_error_kind, first_error_message,"
            " opened_by) VALUES (%s, %s, %s, %s, %s)"
            " ON CONFLICT (task_id) WHERE ended_at IS NULL DO NOTHING RETURNING incident_id",
            (task_id, checked_at, error_kind, error_message, result_id),
        )
        created = cur.fetchone()
        if created:
            open_incidents[task_id] = created[0]
    elif health == Health.UP and task_id in open_incidents:
        cur.execute(
            "UPDATE incidents SET ended_at = greatest(%s, started_at), closed_by = %s"
            " WHERE incident_id = %s",
            (checked_at, result_id, open_incidents.pop(task_id)),
        )


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
