"""Writes a batch of Kafka records to PostgreSQL in one transaction, exactly once per result.

A batch is first COPied straight into result_ids (every stored result's id, its primary key),
result_slots (the result that counts for each task and slot, its primary key) and
check_results inside a savepoint: a normal batch holds only new results of slots not checked
yet, and then every row is new and counts. If any result is already stored (a redelivery), or
a slot already taken (two checker nodes checked it, during a network cut), a primary key
refuses the COPY;
the batch then goes back to the savepoint and through a per-connection staging table and one
INSERT ... ON CONFLICT DO NOTHING RETURNING. Either way only the rows that were really new
update the tasks table and the incidents, so a redelivered batch changes nothing. A result that
is not judged (`checker_overloaded`: the checker held the check up, the site was not judged) is
stored but moves neither its task nor its incidents, like a result that arrives after a newer
one of its task. So is a double: a result of a (task, slot) whose slot an earlier read result
holds (the first stored decides, `double_of` names it), so a slot checked twice opens or
closes an incident at most once and counts once. (Two processors storing results of the same
task at once, only while the processors' group rebalances, could each count their result of
one slot: the second sees the slot taken only after the first commits.) Records that
break the contract, results dated outside the stored window (a checker clock far ahead, or
older than the retention), copies of a stored result with another timestamp, and rows the
database refuses go to rejected_messages with their raw bytes and the reason. Connection
trouble is raised to the caller (who keeps the batch and retries).

Records of the task topic in a batch are task records: they are applied to the tasks table in
the same transaction, before the results (`task_topic`), so a batch's offsets of both topics
are committed after the rows of both.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from itertools import chain
from operator import itemgetter
from typing import Any, NamedTuple

import msgspec
import psycopg2
import psycopg2.errors
from psycopg2.extensions import connection as Connection
from psycopg2.extras import execute_values

from checker_common.contract import NOT_JUDGED, ContractError, Health, Plain, decode_plain_many
from checker_common.errors import first_line
from checker_processing import task_topic
from checker_processing.db import PERMANENT_ERRORS
from checker_processing.records import Record, Rejection
from checker_processing.retention import Window
from checker_processing.task_topic import NO_TASKS, TaskBatch

log = logging.getLogger(__name__)

# error_kind values of results that say nothing about the site.
_NOT_JUDGED = frozenset(kind.value for kind in NOT_JUDGED)

COLUMNS = (
    "result_id",
    "checked_at",
    "task_id",
    "name",
    "url",
    "method",
    "scheduled_at",
    "pattern_result",
    "ok",
    "body_truncated",
    "health",
    "error_kind",
    "error_message",
    "final_url",
    "cert_expires_at",
    "node",
    # The numbers side by side: copy_text writes them for a whole batch in one go.
    "attempt",
    "status_code",
    "load_time",
    "dns_time",
    "connect_time",
    "tls_time",
    "ttfb_time",
    "transfer_time",
    "bytes",
    "redirects",
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


def _takes_slot(alias: str) -> str:
    """SQL: whether a result takes its (task, slot) in result_slots: planned (a manual run has
    no slot) and judged."""
    kinds = ", ".join(f"'{kind}'" for kind in sorted(_NOT_JUDGED))
    return (
        f"{alias}.scheduled_at IS NOT NULL"
        f" AND ({alias}.error_kind IS NULL OR {alias}.error_kind NOT IN ({kinds}))"
    )


# The ids first: a result id already in result_ids is not stored again, whatever its
# timestamp; within the batch the first copy read wins. Then the slots: the first new result
# of a (task, slot) read takes it unless an earlier batch did (the table as it was before this
# statement); any other is a double of the one that holds the slot.
_INSERT = f"""
WITH fresh AS (
    INSERT INTO result_ids (result_id, checked_at)
    SELECT DISTINCT ON (result_id) result_id, checked_at FROM staging_results
    ORDER BY result_id, kafka_topic, kafka_partition, kafka_offset
    ON CONFLICT DO NOTHING
    RETURNING result_id, checked_at
), new AS (
    SELECT DISTINCT ON (s.result_id) s.*
    FROM staging_results AS s JOIN fresh USING (result_id, checked_at)
    ORDER BY s.result_id, s.kafka_topic, s.kafka_partition, s.kafka_offset
), slots AS (
    INSERT INTO result_slots (scheduled_at, task_id, result_id)
    SELECT DISTINCT ON (task_id, scheduled_at) scheduled_at, task_id, result_id FROM new AS n
    WHERE {_takes_slot("n")}
    ORDER BY task_id, scheduled_at, kafka_topic, kafka_partition, kafka_offset
    ON CONFLICT DO NOTHING
    RETURNING task_id, scheduled_at, result_id
)
INSERT INTO check_results ({_COLS}, double_of)
SELECT {", ".join(f"n.{c}" for c in COLUMNS)},
       CASE WHEN {_takes_slot("n")}
            THEN nullif(coalesce(taken.result_id, held.result_id), n.result_id) END
FROM new AS n
LEFT JOIN slots AS taken ON taken.task_id = n.task_id AND taken.scheduled_at = n.scheduled_at
LEFT JOIN result_slots AS held ON held.task_id = n.task_id AND held.scheduled_at = n.scheduled_at
ON CONFLICT DO NOTHING
RETURNING task_id, result_id, checked_at, name, url, method, status_code, ok, health,
          error_kind, error_message, double_of
"""
# Copies whose result id is stored with another check time: not redeliveries of it.
_CONFLICTS = """
SELECT s.kafka_topic, s.kafka_partition, s.kafka_offset, s.checked_at, r.checked_at
FROM staging_results AS s JOIN result_ids AS r USING (result_id)
WHERE r.checked_at <> s.checked_at
"""


class Row(NamedTuple):
    record: Record
    plain: Plain


@dataclass(frozen=True)
class Outcome:
    """What one batch did: new rows, rows already stored, records rejected, task records
    that changed a task (a task record at or before the one its task was set from counts as
    a duplicate), and the new rows that are doubles (of a slot another result holds)."""

    inserted: int = 0
    duplicates: int = 0
    rejected: int = 0
    task_changes: int = 0
    doubles: int = 0

    def __add__(self, other: Outcome) -> Outcome:
        return Outcome(
            self.inserted + other.inserted,
            self.duplicates + other.duplicates,
            self.rejected + other.rejected,
            self.task_changes + other.task_changes,
            self.doubles + other.doubles,
        )


def parse(records: Sequence[Record], max_bytes: int) -> tuple[list[Row], list[Rejection]]:
    """Split records into valid rows and contract rejections (pure)."""
    rows: list[Row] = []
    rejected: list[Rejection] = []
    for record, plain in zip(records, decode_plain_many(records, max_bytes=max_bytes), strict=True):
        if isinstance(plain, ContractError):
            rejected.append(Rejection(record, str(plain)))
        else:
            rows.append(_new_tuple(Row, (record, plain)))  # Row's own __new__ is Python code
    return rows, rejected


_new_tuple = tuple.__new__


def copy_text(rows: Sequence[Row]) -> str:
    """Rows in COPY text format, COLUMNS order (pure). Each column has its own formatter:
    only free text is escaped; UUIDs, enum values and the message's own ISO 8601 UTC strings
    go as they are (the contract admits nothing there that COPY would misread). A NUL in a
    string is left in: the server refuses it, and that row is then found and rejected like any
    other the database will not take."""
    lines = []
    tails: dict[tuple[str, int, bool], str] = {}
    n, bs = _NULL, "\\"
    v: Any  # each column's value in turn
    for (record, plain), numbers in zip(rows, _numbers(rows), strict=True):
        b = plain.body
        e = b.error
        tail_key = (record.topic, record.partition, plain.legacy)
        tail = tails.get(tail_key)
        if tail is None:
            tail = tails[tail_key] = (
                f"{'t' if plain.legacy else 'f'}\t{_text(record.topic)}\t{record.partition}"
            )
        if (final_url := b.final_url) is None:
            final_url = n
        elif not final_url.isprintable() or bs in final_url:
            final_url = _escape(final_url)
        # Inline None tests, not helper calls: this runs for every column of every row.
        lines.append(
            f"{b.result_id}\t{b.timestamp}\t{plain.task_id}"
            f"\t{v if (v := b.name).isprintable() and bs not in v else _escape(v)}"
            f"\t{v if (v := b.url).isprintable() and bs not in v else _escape(v)}"
            f"\t{v if (v := b.method).isprintable() and bs not in v else _escape(v)}"
            f"\t{n if (v := b.scheduled_at) is None else v}"
            f"\t{n if (v := b.pattern_search) is None else v}"
            f"\t{'t' if b.ok else 'f'}\t{'t' if b.body_truncated else 'f'}\t{b.health}"
            f"\t{n if e is None else e.kind}\t{n if e is None else _text(e.message)}"
            f"\t{final_url}\t{n if (v := b.cert_expires_at) is None else v}"
            f"\t{n if (v := b.node) is None else v if bs not in v else _escape(v)}"
            f"\t{numbers}\t{tail}\t{record.offset}\n"
        )
    return "".join(lines)


def _numbers(rows: Sequence[Row]) -> list[str]:
    """Each row's numeric columns (attempt .. redirects) as COPY text, tab-separated (pure).

    Formatting floats is most of the cost of a COPY line: msgspec writes a whole batch's in
    one call, as the shortest text that reads back as the same float (as repr() does, spelled
    "1e16" where repr() says "1e+16"; PostgreSQL reads both alike). JSON has no infinity: it
    writes one as null, so when a batch holds one (only the model's lax path lets it in) the
    batch is formatted here number by number instead."""
    if not rows:
        return []
    columns = [
        (
            b.attempt,
            b.status,
            b.load_time,
            t.dns,
            t.connect,
            t.tls,
            t.ttfb,
            t.transfer,
            b.bytes,
            b.redirects,
        )
        for _, (_, b, _, _) in rows
        for t in (b.timings,)
    ]
    encoded = _encode_json(columns)
    if encoded.count(b"null") == list(chain.from_iterable(columns)).count(None):
        # [[1,null,...],[...]]: tab-separated, one row between each "]\t[".
        return encoded.replace(b"null", b"\\N").replace(b",", b"\t").decode()[2:-2].split("]\t[")
    n = _NULL
    return ["\t".join(n if v is None else str(v) for v in one) for one in columns]


_encode_json = msgspec.json.encode


_NULL = "\\N"


def _text(value: str) -> str:
    # isprintable() is False for tab, newline and carriage return (and for other text that
    # needs no escape: _escape leaves that as it is); a backslash is printable.
    if value.isprintable() and "\\" not in value:
        return value
    return _escape(value)


def _escape(value: str) -> str:
    return (
        value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    )


@dataclass(frozen=True)
class Prepared:
    """A batch decoded and in COPY text: the CPU half of a write, done ahead (pure)."""

    records: Sequence[Record]
    rows: list[Row]
    rejected: list[Rejection]
    text: str
    ids_text: str  # result_id and check time of each row, COPY text for result_ids
    slots_text: str  # the slot of each row that takes one, COPY text for result_slots
    days: frozenset[date]
    checked: tuple[datetime, datetime] | None  # the earliest and latest check time of the rows
    if_all_new: NewRows  # what the tasks and incidents need when every row is new
    tasks: TaskBatch = field(default=NO_TASKS)  # the batch's task records (task_topic.plan)


_topic_of = itemgetter(0)


def prepare(records: Sequence[Record], max_bytes: int, tasks_topic: str | None = None) -> Prepared:
    """Results and task records (those of `tasks_topic`) decoded, ready to write (pure)."""
    results = records
    tasks = NO_TASKS
    # A scan in C: most batches hold results only, and they go on as they came.
    if tasks_topic is not None and tasks_topic in set(map(_topic_of, records)):
        results = [r for r in records if r.topic != tasks_topic]
        tasks = task_topic.plan([r for r in records if r.topic == tasks_topic])
    rows, rejected = parse(results, max_bytes)
    return _prepared(records, rows, rejected, tasks)


def _prepared(
    records: Sequence[Record],
    rows: list[Row],
    rejected: list[Rejection],
    tasks: TaskBatch = NO_TASKS,
) -> Prepared:
    bodies = [plain.body for _, plain in rows]
    # Bodies hold ISO 8601 UTC strings: their first ten characters are the UTC day.
    days = frozenset(map(date.fromisoformat, {body.timestamp[:10] for body in bodies}))
    times = [plain.checked_at for _, plain in rows]
    if_all_new = new_rows(returning(rows), with_task_columns=True)
    checked = (min(times), max(times)) if times else None
    text = copy_text(rows)
    return Prepared(
        records,
        rows,
        rejected,
        text,
        ids_text(rows),
        slots_text(rows),
        days,
        checked,
        if_all_new,
        tasks,
    )


def ids_text(rows: Sequence[Row]) -> str:
    """Each row's result_id and check time in COPY text, for result_ids (pure)."""
    return "".join([f"{p.body.result_id}\t{p.body.timestamp}\n" for _, p in rows])


def slots_text(rows: Sequence[Row]) -> str:
    """Slot, task id and result id of each row that takes a slot (planned and judged), COPY
    text for result_slots (pure)."""
    return "".join(
        [
            f"{b.scheduled_at}\t{p.task_id}\t{b.result_id}\n"
            for _, p in rows
            for b in (p.body,)
            if b.scheduled_at is not None and (b.error is None or b.error.kind not in _NOT_JUDGED)
        ]
    )


def within(rows: list[Row], window: Window, now: datetime) -> tuple[list[Row], list[Rejection]]:
    """The rows whose check time the window keeps at `now`, and rejections of the others
    with the reason (pure)."""
    earliest, latest = window.bounds(now)
    kept: list[Row] = []
    aside: list[Rejection] = []
    for row in rows:
        checked_at = row.plain.checked_at
        if checked_at > latest:
            ahead = (checked_at - now).total_seconds()
            reason = (
                f"timestamp {row.plain.body.timestamp} is {ahead:.0f} s ahead of the"
                f" processor's clock, more than MAX_CLOCK_SKEW_SECONDS"
                f" ({window.max_clock_skew.total_seconds():.0f}): is the checker's clock wrong?"
            )
            aside.append(Rejection(row.record, reason))
        elif checked_at < earliest:
            reason = (
                f"timestamp {row.plain.body.timestamp} is older than RESULTS_RETENTION_DAYS"
                f" ({window.retention_days}) keeps: results before {earliest:%Y-%m-%d} are"
                " not stored"
            )
            aside.append(Rejection(row.record, reason))
        else:
            kept.append(row)
    return kept, aside


def _utc_now() -> datetime:
    return datetime.now(UTC)


class Writer:
    """Stores batches; owns one connection, opened lazily and dropped on connection trouble.

    Rows are stored only when their check time is inside `window` at the time of the write
    (`clock`); the others are rejected with the reason, so no partition is made outside it.
    Records of `tasks_topic` are task records (`task_topic`); every other record is a result.
    """

    def __init__(
        self,
        connect: Callable[[], Connection],
        max_message_bytes: int,
        *,
        window: Window,
        tasks_topic: str | None = None,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        self._connect = connect
        self._conn: Connection | None = None
        self._max_bytes = max_message_bytes
        self._window = window
        self._tasks_topic = tasks_topic
        self._clock = clock
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

    def prepare(self, records: Sequence[Record]) -> Prepared:
        """The CPU half of `write`; pure, so it may run in another thread meanwhile."""
        return prepare(records, self._max_bytes, self._tasks_topic)

    def write(self, records: Sequence[Record], prepared: Prepared | None = None) -> Outcome:
        """Store a batch. Raises a TRANSIENT error (db.TRANSIENT_ERRORS) when the database
        cannot be reached; then nothing of this call may be assumed stored, retry it whole.
        `prepared` is used when it was made from this very sequence of records."""
        if prepared is None or prepared.records is not records:
            prepared = self.prepare(records)
        retried = False
        try:
            while True:
                batch = self._in_window(prepared)
                rows, rejected = batch.rows, batch.rejected
                self.ensure_partitions(batch.days)
                try:
                    return self._store(rows, rejected, batch, batch.tasks)
                except PERMANENT_ERRORS as exc:
                    self.conn.rollback()
                    if _no_partition(exc) and not retried:
                        # A partition this writer saw was dropped behind its back (retention
                        # of another processor, an operator): look at the days again, and at
                        # the window, which may have moved past one of them meanwhile.
                        log.warning("a partition is gone (%s); creating it again", first_line(exc))
                        self._partitions.clear()
                        retried = True
                        continue
                    log.warning(
                        "batch of %d rows refused (%s); finding the bad rows", len(rows), exc
                    )
                    return self._bisect(rows) + self._store([], rejected, tasks=batch.tasks)
        except BaseException:
            self.reset()
            raise

    def _in_window(self, prepared: Prepared) -> Prepared:
        """The batch without the rows the window does not keep now (rejected instead)."""
        if prepared.checked is None:
            return prepared
        now = self._clock()
        earliest, latest = self._window.bounds(now)
        first, last = prepared.checked
        if earliest <= first and last <= latest:
            return prepared
        kept, aside = within(prepared.rows, self._window, now)
        return _prepared(prepared.records, kept, [*prepared.rejected, *aside], prepared.tasks)

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
                reason = f"database refused the row: {first_line(exc)}"
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

    def _store(
        self,
        rows: list[Row],
        rejected: list[Rejection],
        prepared: Prepared | None = None,
        tasks: TaskBatch = NO_TASKS,
    ) -> Outcome:
        """One transaction: task records, then results, tasks, incidents and rejections.
        `prepared` is the batch's own preparation when `rows` are all of its rows.

        Task records go first: a result of a task removed in the same batch is stored but
        moves nothing, as one arriving in a later batch."""
        conn = self.conn
        stored = doubles = 0
        conflicts: list[Rejection] = []
        applied = task_topic.Applied()
        with conn.cursor() as cur:
            if tasks:
                # The results' tasks are locked with the records' own, in one statement.
                applied = task_topic.apply(cur, tasks, {plain.task_id for _, plain in rows})
                rejected = [*rejected, *applied.rejected]
            if rows:
                if prepared is None:
                    inserted, conflicts = _insert_new(cur, _Texts.of(rows), rows, None)
                else:
                    texts = _Texts(prepared.text, prepared.ids_text, prepared.slots_text)
                    inserted, conflicts = _insert_new(cur, texts, rows, prepared.if_all_new)
                stored, doubles = len(inserted.rows), inserted.doubles
                if inserted.newest:  # empty when every new row is not judged
                    _update_tasks_and_incidents(cur, inserted)
                if conflicts:
                    rejected = [*rejected, *conflicts]
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
        return Outcome(
            stored,
            len(rows) - stored - len(conflicts) + applied.unchanged,
            stored_rejections,
            applied.changed,
            doubles,
        )


@dataclass(frozen=True)
class NewRows:
    """Rows stored by a batch, in the shape of _INSERT's RETURNING, with what the tasks and
    incidents need of them: each task's newest judged row and the tasks with a judged 'down'
    result (the only ones besides open incidents whose incidents can change). Doubles (a
    result of a slot another result holds: double_of is set) count as neither."""

    rows: list[tuple[Any, ...]]
    newest: dict[str, tuple[Any, ...]]
    with_down: frozenset[str]
    # _UPDATE_TASKS's parameters for every task's newest row, in task id order: what the
    # update sends when every task is known and no row is older than the stored one (the
    # usual batch), made ahead with the rest of the batch.
    task_columns: list[str] | None = None
    doubles: int = 0  # rows that are doubles


def new_rows(returned: list[tuple[Any, ...]], *, with_task_columns: bool = False) -> NewRows:
    """One pass over the rows (pure); `with_task_columns` also formats the tasks update."""
    newest: dict[str, tuple[Any, ...]] = {}
    with_down = set()
    down = Health.DOWN.value
    doubles = 0
    for row in returned:
        if row[11] is not None:
            doubles += 1
            continue  # stored, but it moves neither its task nor its incidents
        if row[9] in _NOT_JUDGED:
            continue  # the same
        task_id = row[0]
        best = newest.get(task_id)
        if best is None or row[2] > best[2] or (row[2] == best[2] and row[1] > best[1]):
            newest[task_id] = row
        if row[8] == down:
            with_down.add(task_id)
    columns = None
    if with_task_columns and newest:
        columns = _task_columns([newest[task_id] for task_id in sorted(newest)])
    return NewRows(returned, newest, frozenset(with_down), columns, doubles)


def returning(rows: list[Row]) -> list[tuple[Any, ...]]:
    """What _INSERT's RETURNING gives for these rows when all are new, from memory (pure)."""
    returned = []
    for _, (task_id, b, checked_at, _) in rows:
        e = b.error
        returned.append(
            (
                task_id,
                b.result_id,
                checked_at,
                b.name,
                b.url,
                b.method,
                b.status,
                b.ok,
                b.health,
                None if e is None else e.kind,
                None if e is None else e.message,
                None,  # double_of: a batch whose rows are all new holds no double
            )
        )
    return returned


class _Texts(NamedTuple):
    """A batch's rows in COPY text: for check_results, their ids for result_ids and their
    slots for result_slots."""

    rows: str
    ids: str
    slots: str

    @classmethod
    def of(cls, rows: list[Row]) -> _Texts:
        return cls(copy_text(rows), ids_text(rows), slots_text(rows))


def _insert_new(
    cur: Any, texts: _Texts, rows: list[Row], if_all_new: NewRows | None
) -> tuple[NewRows, list[Rejection]]:
    """Store the rows not stored yet and return them, with rejections of the rows whose
    result id is stored with another check time; `if_all_new` is what to return when every
    row is new (made ahead from `rows`)."""
    cur.execute("SAVEPOINT direct_copy")
    # One read of the whole text: psycopg2 takes the GIL back for every chunk it reads, and
    # with a preparing thread beside it each take can wait a whole switch interval. As bytes:
    # a StringIO that is read holds its text at four bytes a character.
    rows_text, ids_text = texts.rows.encode(), texts.ids.encode()
    size = len(rows_text) + 1
    try:
        cur.copy_expert(
            "COPY result_ids (result_id, checked_at) FROM STDIN",
            io.BytesIO(ids_text),
            len(ids_text) + 1,
        )
        if texts.slots:
            slots_text = texts.slots.encode()
            cur.copy_expert(
                "COPY result_slots (scheduled_at, task_id, result_id) FROM STDIN",
                io.BytesIO(slots_text),
                len(slots_text) + 1,
            )
        cur.copy_expert(f"COPY check_results ({_COLS}) FROM STDIN", io.BytesIO(rows_text), size)
    except psycopg2.errors.UniqueViolation:
        # Some result is stored already (a redelivery, or twice in this batch), or some slot
        # is taken (another node checked it too): the slow path sorts out which rows are new
        # and which are doubles.
        cur.execute("ROLLBACK TO SAVEPOINT direct_copy")
        cur.execute(_STAGING)
        cur.copy_expert(f"COPY staging_results ({_COLS}) FROM STDIN", io.BytesIO(rows_text), size)
        cur.execute(_INSERT)
        inserted = new_rows(list(cur.fetchall()))
        cur.execute(_CONFLICTS)
        return inserted, _conflicts(rows, cur.fetchall())
    cur.execute("RELEASE SAVEPOINT direct_copy")
    # All rows are new: what RETURNING would give, from memory.
    return (new_rows(returning(rows)) if if_all_new is None else if_all_new), []


def _conflicts(rows: list[Row], found: list[tuple[Any, ...]]) -> list[Rejection]:
    """Rejections of the rows at the Kafka positions `found` (_CONFLICTS's rows)."""
    if not found:
        return []
    at = {(r.record.topic, r.record.partition, r.record.offset): r for r in rows}
    rejections = []
    for topic, partition, offset, checked_at, stored_at in found:
        row = at[(topic, partition, offset)]
        reason = (
            f"result_id {row.plain.body.result_id} is stored already with timestamp"
            f" {stored_at.astimezone(UTC).isoformat()}; this copy says"
            f" {checked_at.astimezone(UTC).isoformat()}"
        )
        rejections.append(Rejection(row.record, reason))
    return rejections


def _update_tasks_and_incidents(cur: Any, inserted: NewRows) -> None:
    """Move each task's latest result and its incidents forward from the new rows only.

    Set-based: which incidents open and close is worked out here, row by row in time order
    per task, then applied in at most four statements whatever the batch holds. A removed
    task (`removed_at`) is left as it is: its results are stored, they move nothing."""
    newest = inserted.newest
    task_ids = sorted(newest)
    # UUIDs as one array literal: psycopg2 would adapt a list item by item, in Python.
    task_array = _array(task_ids)
    # Lock in a fixed order so two processors touching the same tasks cannot deadlock.
    cur.execute(
        "SELECT task_id::text, last_checked_at, removed_at IS NOT NULL FROM tasks"
        " WHERE task_id = ANY(%s::uuid[]) ORDER BY task_id FOR UPDATE",
        (task_array,),
    )
    # A task made by its task record has no result yet: None, as for a task not in the table.
    last_seen: dict[str, datetime | None] = {}
    removed = set()
    for task_id, checked_at, is_removed in cur.fetchall():
        last_seen[task_id] = checked_at
        if is_removed:
            removed.add(task_id)
    if removed:
        newest = {task_id: row for task_id, row in newest.items() if task_id not in removed}
        task_ids = sorted(newest)
        if not task_ids:
            return
    cur.execute(
        "SELECT task_id::text, incident_id FROM incidents"
        " WHERE ended_at IS NULL AND task_id = ANY(%s::uuid[])",
        (task_array,),
    )
    open_incidents: dict[str, int] = dict(cur.fetchall())

    closes: list[tuple[Any, ...]] = []  # incidents open in the database that end now
    spans: list[tuple[Any, ...]] = []  # incidents that open and end within this batch
    opens: list[tuple[Any, ...]] = []  # incidents that open now and stay open
    # Incidents: walk the rows of those tasks in time order, from the last applied result on.
    walked = inserted.with_down.union(open_incidents).difference(removed)
    by_task: dict[str, list[tuple[Any, ...]]] = {}
    if walked:
        for row in inserted.rows:
            if row[0] in walked and row[9] not in _NOT_JUDGED and row[11] is None:
                by_task.setdefault(row[0], []).append(row)
    for task_id in sorted(by_task):
        previous = last_seen.get(task_id)
        opened: tuple[Any, ...] | None = None  # the row that opened this batch's incident
        for row in sorted(by_task[task_id], key=lambda r: (r[2], r[1])):
            # A result older than what we already applied arrived late: it is stored, but it
            # must not reopen or close incidents out of order.
            if previous is not None and row[2] < previous:
                continue
            health = row[8]
            if health == Health.DOWN and opened is None and task_id not in open_incidents:
                opened = row
            elif health == Health.UP:
                if opened is not None:
                    spans.append((*_opening(task_id, opened), row[2], row[1]))
                    opened = None
                elif task_id in open_incidents:
                    closes.append((open_incidents.pop(task_id), row[2], row[1]))
        if opened is not None:
            opens.append(_opening(task_id, opened))
    latest = []
    for task_id in task_ids:
        row = newest[task_id]
        previous = last_seen.get(task_id)
        if previous is None or row[2] >= previous:
            latest.append(row)
    if closes:
        execute_values(
            cur,
            "UPDATE incidents AS i SET ended_at = greatest(v.ended_at, i.started_at),"
            " closed_by = v.closed_by, end_reason = 'recovered'"
            " FROM (VALUES %s) AS v (incident_id, ended_at, closed_by)"
            " WHERE i.incident_id = v.incident_id",
            closes,
            template="(%s::bigint, %s::timestamptz, %s::uuid)",
            page_size=_PAGE,
        )
    if spans:
        # Skipped for a task whose incident another processor holds open (as a lone INSERT
        # of the opening would have been skipped by the unique index).
        execute_values(
            cur,
            "INSERT INTO incidents (task_id, started_at, first_error_kind, first_error_message,"
            " opened_by, ended_at, closed_by, end_reason)"
            " SELECT *, 'recovered' FROM (VALUES %s) AS v (task_id, started_at, kind, message,"
            " opened_by, ended_at, closed_by) WHERE NOT EXISTS (SELECT FROM incidents AS i"
            " WHERE i.task_id = v.task_id AND i.ended_at IS NULL)",
            spans,
            template="(%s::uuid, %s::timestamptz, %s, %s, %s::uuid, %s::timestamptz, %s::uuid)",
            page_size=_PAGE,
        )
    if opens:
        execute_values(
            cur,
            "INSERT INTO incidents (task_id, started_at, first_error_kind, first_error_message,"
            " opened_by) VALUES %s ON CONFLICT (task_id) WHERE ended_at IS NULL DO NOTHING",
            opens,
            page_size=_PAGE,
        )
    # Tasks seen before are locked above: a plain UPDATE (cheaper than an upsert's
    # speculative insert); only tasks new to the table take the upsert.
    known = [row for row in latest if row[0] in last_seen]
    if len(known) == len(task_ids) and inserted.task_columns is not None and not removed:
        # Every task's newest row, in task id order: the columns made ahead are these.
        cur.execute(_UPDATE_TASKS, inserted.task_columns)
    elif known:
        cur.execute(_UPDATE_TASKS, _task_columns(known))
    new = [row[:9] for row in latest if row[0] not in last_seen]
    if new:
        execute_values(cur, _UPSERT_TASKS, new, page_size=_PAGE)


# Name, URL and method come from the results only for a task no task record has set (its
# checker publishes none): a result checked before a rename may arrive after it.
_UPDATE_TASKS = """
UPDATE tasks AS t SET
    name = CASE WHEN t.record_offset IS NULL THEN v.name ELSE t.name END,
    url = CASE WHEN t.record_offset IS NULL THEN v.url ELSE t.url END,
    method = CASE WHEN t.record_offset IS NULL THEN v.method ELSE t.method END,
    last_result_id = v.result_id, last_checked_at = v.checked_at,
    last_status_code = v.status_code, last_ok = v.ok, last_health = v.health, updated_at = now()
FROM unnest(%s::uuid[], %s::uuid[], %s::timestamptz[], %s::text[], %s::text[], %s::text[],
            %s::smallint[], %s::boolean[], %s::text[])
    AS v (task_id, result_id, checked_at, name, url, method, status_code, ok, health)
WHERE t.task_id = v.task_id AND t.removed_at IS NULL
  AND (t.last_checked_at IS NULL OR t.last_checked_at <= v.checked_at)
"""


def _task_columns(rows: list[tuple[Any, ...]]) -> list[str]:
    """The nine columns of _UPDATE_TASKS, each as one array literal: psycopg2 would adapt a
    list item by item in Python, which costs more than the update itself."""
    return [
        _array([str(r[0]) for r in rows]),
        _array([str(r[1]) for r in rows]),
        _array([r[2].isoformat() for r in rows]),
        *(_array([_quoted(r[i]) for r in rows]) for i in (3, 4, 5)),
        _array(["NULL" if r[6] is None else str(r[6]) for r in rows]),
        _array(["t" if r[7] else "f" for r in rows]),
        _array([_quoted(r[8]) for r in rows]),
    ]


def _array(items: list[str]) -> str:
    """A PostgreSQL array literal of items that are safe as they are (UUIDs, numbers, ISO
    timestamps, NULL, or quoted by _quoted)."""
    return "{" + ",".join(items) + "}"


def _quoted(text: str) -> str:
    """Any text as an element of an array literal."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


# For tasks not in the table when the batch locked its tasks (a row another processor made
# meanwhile is updated as _UPDATE_TASKS would).
_UPSERT_TASKS = """
INSERT INTO tasks (task_id, last_result_id, last_checked_at, name, url, method,
                   last_status_code, last_ok, last_health) VALUES %s
ON CONFLICT (task_id) DO UPDATE SET
    name = CASE WHEN tasks.record_offset IS NULL THEN EXCLUDED.name ELSE tasks.name END,
    url = CASE WHEN tasks.record_offset IS NULL THEN EXCLUDED.url ELSE tasks.url END,
    method = CASE WHEN tasks.record_offset IS NULL THEN EXCLUDED.method ELSE tasks.method END,
    last_result_id = EXCLUDED.last_result_id, last_checked_at = EXCLUDED.last_checked_at,
    last_status_code = EXCLUDED.last_status_code, last_ok = EXCLUDED.last_ok,
    last_health = EXCLUDED.last_health, updated_at = now()
WHERE tasks.removed_at IS NULL
  AND (tasks.last_checked_at IS NULL OR tasks.last_checked_at <= EXCLUDED.last_checked_at)
"""


# Rows per statement for execute_values: a batch's tasks and incidents in one round trip.
_PAGE = 100_000


def _opening(task_id: str, row: tuple[Any, ...]) -> tuple[Any, ...]:
    """An incident's opening columns from the 'down' row that opens it."""
    return (task_id, row[2], row[9], row[10], row[1])


def _no_partition(exc: BaseException) -> bool:
    """Whether PostgreSQL refused a row for want of a partition for its check time."""
    return isinstance(exc, psycopg2.errors.CheckViolation) and "no partition" in str(exc)
