"""The task topic into PostgreSQL: each task record moves its task's row in `tasks`.

The checker publishes every change of a task as a task record (`checker_common.task_record`)
on KAFKA_TASKS_TOPIC; the processor consumes that topic in the same group and batches as the
results, and applies a batch's task records in the same transaction as its results, before
them, so the offsets of both are committed after the rows of both:

- a valid record (`TaskChange`) sets the task's name, URL (password masked), method, interval,
  tags, status and status reason, and clears `removed_at` (a task created again under its old id);
- a record that does not validate (`InvalidTask`) puts the task in `error` with the reason,
  with what could be read of its name and URL, as every checker node does;
- a tombstone (`TaskRemoved`) sets `removed_at` to the record's Kafka time and closes the
  task's open incident with the end reason `task_removed`; the task then leaves
  `latest_results` and the report's open incidents, and its results after that are stored
  but move neither the task nor its incidents;
- a record without a task id (`UnusableRecord`) goes to rejected_messages.

Within a batch a task's last record decides, except that a tombstone after a record of the
task in the batch leaves the row as the two would coming apart: the record's definition, with
`removed_at` set (a task created and removed at once still shows what it was).

Each task row remembers the position (topic, partition, offset) of the record it was last set
from; a record at or before that position (a redelivery, a group reading the topic again)
changes nothing, so applying the topic again from any offset leaves the same rows.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from psycopg2.extras import execute_values

from checker_common import task_record
from checker_common.errors import first_line
from checker_common.redact import redact_url
from checker_processing.db import PERMANENT_ERRORS
from checker_processing.records import Record, Rejection, kafka_time

log = logging.getLogger(__name__)

INCIDENT_END_TASK_REMOVED = "task_removed"
_PAGE = 10_000


@dataclass(frozen=True, slots=True)
class TaskRow:
    """What a task's last record in a batch (or its definition before a last tombstone) does
    to the task's row (pure data)."""

    task_id: str
    record: Record  # the record itself: its position, and its bytes should it be refused
    records: int  # records of this task in the batch that this one stands for (itself too)
    removed_at: datetime | None  # a tombstone's Kafka time (None: unknown, use the clock)
    removed: bool = False
    name: str | None = None
    url: str | None = None
    method: str | None = None
    interval: float | None = None
    status: str | None = None
    status_reason: str | None = None
    changed_at: datetime | None = None
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class TaskBatch:
    """A batch's task records: one row per task (its last record; two when a tombstone follows
    a record of the task: the record's, then the tombstone's), and the rejections."""

    rows: list[TaskRow] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.rows or self.rejected)


NO_TASKS = TaskBatch()


@dataclass(frozen=True)
class Applied:
    """What a batch's task records did: records that changed a task, records at or before
    the position a task was already set from (changed nothing), records refused."""

    changed: int = 0
    unchanged: int = 0
    rejected: list[Rejection] = field(default_factory=list)


def plan(records: Sequence[Record]) -> TaskBatch:
    """Decode task records into one row per task: its last record in the batch (pure).

    A task whose last record is a tombstone that follows a record of it in the batch gets two
    rows, that record's then the tombstone's, so the row is left as the two would leave it
    coming in two batches: the definition, then `removed_at`."""
    last: dict[str, TaskRow] = {}
    defined: dict[str, TaskRow] = {}  # the definition before a task's last record, a tombstone
    rejected: list[Rejection] = []
    for record in records:
        row = _row(record)
        if isinstance(row, Rejection):
            rejected.append(row)
            continue
        before = last.pop(row.task_id, None)
        if before is not None and row.removed and not before.removed:
            defined[row.task_id] = before
        elif before is not None:
            earlier = 0 if row.removed else _records(defined.pop(row.task_id, None))
            row = replace(row, records=before.records + earlier + 1)
        last[row.task_id] = row
    return TaskBatch(
        [row for task_id in sorted(last) for row in _rows(defined.get(task_id), last[task_id])],
        rejected,
    )


def _records(row: TaskRow | None) -> int:
    return 0 if row is None else row.records


def _rows(definition: TaskRow | None, last: TaskRow) -> list[TaskRow]:
    return [last] if definition is None else [definition, last]


def _row(record: Record) -> TaskRow | Rejection:
    try:
        decoded = task_record.decode(record.key, record.value)
    except Exception as exc:  # decode() must not raise; should it, the record is kept aside
        log.exception("reading a task record failed")
        return Rejection(record, f"task record could not be read: {type(exc).__name__}: {exc}")
    at = kafka_time(record)
    if isinstance(decoded, task_record.UnusableRecord):
        return Rejection(record, f"task record: {decoded.reason}")
    task_id = str(decoded.task_id)
    if isinstance(decoded, task_record.TaskRemoved):
        return TaskRow(task_id, record, 1, at, removed=True)
    if isinstance(decoded, task_record.InvalidTask):
        return TaskRow(
            task_id,
            record,
            1,
            None,
            name=_text(decoded.name),
            url=_text(redact_url(decoded.url)),
            interval=decoded.interval,
            status="error",
            status_reason=_text(decoded.reason),
            changed_at=at,
        )
    spec = decoded.record.spec
    return TaskRow(
        task_id,
        record,
        1,
        None,
        name=_text(spec.name),
        url=_text(redact_url(spec.url)),
        method=_text(spec.method),
        interval=spec.interval,
        status=decoded.record.status.value,
        status_reason=_text(decoded.record.status_reason),
        changed_at=decoded.record.updated_at or at,
        tags=tuple(spec.tags),
    )


def _text(value: str | None) -> str | None:
    """Text PostgreSQL takes: no NUL (it refuses one), valid UTF-8 (pure)."""
    if value is None:
        return None
    return value.encode("utf-8", "replace").decode("utf-8").replace("\x00", "\ufffd")


def apply(cur: Any, batch: TaskBatch, lock_also: Collection[str] = ()) -> Applied:
    """Apply a batch's task rows in the caller's transaction.

    Locks the rows of these tasks and of `lock_also` (the tasks of the batch's results) in one
    statement, in task id order, so two processors never wait on each other in a circle.
    Should PostgreSQL refuse a row, each row is tried alone and the refused ones are rejected
    (with their raw record) instead of failing the batch."""
    if not batch.rows:
        return Applied(rejected=list(batch.rejected))
    ids = sorted({row.task_id for row in batch.rows}.union(lock_also))
    cur.execute(
        "SELECT task_id::text, record_topic, record_partition, record_offset FROM tasks"
        " WHERE task_id = ANY(%s::uuid[]) ORDER BY task_id FOR UPDATE",
        (ids,),
    )
    positions = {task_id: (topic, partition, offset) for task_id, topic, partition, offset in cur}
    fresh = [row for row in batch.rows if _after(row.record, positions.get(row.task_id))]
    unchanged = sum(row.records for row in batch.rows) - sum(row.records for row in fresh)
    rejected = list(batch.rejected)
    cur.execute("SAVEPOINT task_records")
    try:
        _write(cur, fresh)
    except PERMANENT_ERRORS as exc:
        cur.execute("ROLLBACK TO SAVEPOINT task_records")
        log.warning("task records refused (%s); trying each alone", first_line(exc))
        kept = []
        for row in fresh:
            cur.execute("SAVEPOINT task_record")
            try:
                _write(cur, [row])
            except PERMANENT_ERRORS as one:
                cur.execute("ROLLBACK TO SAVEPOINT task_record")
                rejected.append(Rejection(row.record, f"database refused: {first_line(one)}"))
            else:
                cur.execute("RELEASE SAVEPOINT task_record")
                kept.append(row)
        fresh = kept
    cur.execute("RELEASE SAVEPOINT task_records")
    for row in fresh:
        log.info(
            "task %s %s",
            row.task_id,
            "removed" if row.removed else f"set: {row.status}, {row.name!r}",
            extra={
                "task_id": row.task_id,
                "topic": row.record.topic,
                "partition": row.record.partition,
                "offset": row.record.offset,
            },
        )
    return Applied(sum(row.records for row in fresh), unchanged, rejected)


def _after(record: Record, stored: tuple[str | None, int | None, int | None] | None) -> bool:
    """Whether `record` comes after the one a task's row was set from (pure). A row never
    set from a record, or set from another topic or partition (the topic was replaced or
    repartitioned), takes any record."""
    if stored is None:
        return True
    topic, partition, offset = stored
    if offset is None or topic != record.topic or partition != record.partition:
        return True
    return record.offset > offset


# A row changes only when the record comes after the one it was set from (the locked rows
# were checked already; this holds for a row another processor inserted meanwhile).
_AFTER_STORED = (
    "tasks.record_offset IS NULL OR tasks.record_topic <> EXCLUDED.record_topic"
    " OR tasks.record_partition <> EXCLUDED.record_partition"
    " OR tasks.record_offset < EXCLUDED.record_offset"
)
_SET_TASKS = f"""
INSERT INTO tasks (task_id, name, url, method, interval_seconds, status, status_reason,
                   changed_at, record_topic, record_partition, record_offset, tags)
VALUES %s
ON CONFLICT (task_id) DO UPDATE SET
    name = EXCLUDED.name, url = EXCLUDED.url, method = EXCLUDED.method, tags = EXCLUDED.tags,
    interval_seconds = EXCLUDED.interval_seconds, status = EXCLUDED.status,
    status_reason = EXCLUDED.status_reason, changed_at = EXCLUDED.changed_at, removed_at = NULL,
    record_topic = EXCLUDED.record_topic, record_partition = EXCLUDED.record_partition,
    record_offset = EXCLUDED.record_offset, updated_at = now()
WHERE {_AFTER_STORED}
"""
# A task removed before the processor knew it still gets a row, so a result of it that comes
# later (another topic: no order between the two) does not bring it back as a live task.
_REMOVE_TASKS = f"""
INSERT INTO tasks (task_id, removed_at, record_topic, record_partition, record_offset)
VALUES %s
ON CONFLICT (task_id) DO UPDATE SET
    removed_at = coalesce(tasks.removed_at, EXCLUDED.removed_at),
    record_topic = EXCLUDED.record_topic, record_partition = EXCLUDED.record_partition,
    record_offset = EXCLUDED.record_offset, updated_at = now()
WHERE {_AFTER_STORED}
"""
_CLOSE_INCIDENTS = f"""
UPDATE incidents AS i
SET ended_at = greatest(t.removed_at, i.started_at), end_reason = '{INCIDENT_END_TASK_REMOVED}'
FROM tasks AS t
WHERE t.task_id = i.task_id AND i.ended_at IS NULL AND t.removed_at IS NOT NULL
  AND t.task_id = ANY(%s::uuid[])
"""


def _write(cur: Any, rows: list[TaskRow]) -> None:
    changes = [
        (
            row.task_id,
            row.name,
            row.url,
            row.method,
            row.interval,
            row.status,
            row.status_reason,
            row.changed_at,
            row.record.topic,
            row.record.partition,
            row.record.offset,
            [_text(tag) for tag in row.tags],
        )
        for row in rows
        if not row.removed
    ]
    if changes:
        execute_values(
            cur,
            _SET_TASKS,
            changes,
            template="(%s::uuid, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s::text[])",
            page_size=_PAGE,
        )
    removals = [
        (row.task_id, row.removed_at, row.record.topic, row.record.partition, row.record.offset)
        for row in rows
        if row.removed
    ]
    if removals:
        execute_values(
            cur,
            _REMOVE_TASKS,
            removals,
            template="(%s::uuid, coalesce(%s::timestamptz, now()), %s, %s, %s)",
            page_size=_PAGE,
        )
        cur.execute(_CLOSE_INCIDENTS, ([task_id for task_id, *_ in removals],))
