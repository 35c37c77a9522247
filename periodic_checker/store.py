"""Where tasks live: a small `TaskStore` interface and its SQLite implementation.

The store is the source of truth; the scheduler is rebuilt from it at start. SQLite runs in WAL
mode with short write transactions, so the outbox (its own table and connection in the same
file) and the API's reads do not wait on each other. The schema is versioned with
`PRAGMA user_version` and upgraded at open by ordered steps; another store (PostgreSQL, for
several checkers) implements the same Protocol.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import re
import sqlite3
import threading
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import orjson
from pydantic import ValidationError

from checker_common.contract import Health
from checker_common.ids import canonical_id
from checker_common.redact import redact_url
from checker_common.task_spec import (
    TaskSpec,
    TaskStatus,
    assembled,
    checked_digest,
    checked_spec,
    spec_json,
)
from periodic_checker.task_service import (
    CURSOR_PATTERN,
    NameTaken,
    TaskFilter,
    TaskPage,
    TooManyTasks,
)
from periodic_checker.task_view import INVALID_RECORD
from periodic_checker.tasks import ALL_TASK_FIELDS, Task, compacted

log = logging.getLogger(__name__)

# Ordered schema steps: step N brings the file to user_version N. Append, never edit.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE IF NOT EXISTS tasks (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            url TEXT NOT NULL,
            spec TEXT NOT NULL,
            status TEXT NOT NULL,
            status_reason TEXT,
            health TEXT NOT NULL,
            runs INTEGER NOT NULL DEFAULT 0,
            failures_in_a_row INTEGER NOT NULL DEFAULT 0,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            last_run_at TEXT
        )""",
        "CREATE INDEX IF NOT EXISTS tasks_order ON tasks (created_at, id)",
        "CREATE INDEX IF NOT EXISTS tasks_status ON tasks (status)",
    ),
    # Runs started by hand, counted apart from the scheduled runs that `end_after_runs` counts.
    ("ALTER TABLE tasks ADD COLUMN manual_runs INTEGER NOT NULL DEFAULT 0",),
    # The task topic (docs/tasks-topic.md). Names are no longer unique in SQL: in cluster mode
    # the table is a view of the topic, which may hold two tasks of one name (written by
    # another program); `insert` and `replace` keep names unique for the API. `published_at`
    # is the `updated_at` of the last record that reached the topic or the outbox (NULL: none,
    # so the tasks of an older release are published once); the record's place on the topic
    # is kept for the owner map of several nodes. Removals wait in `unpublished_removals`
    # until their tombstone is safe; `topic_offsets` is where reading the topic resumes.
    (
        """CREATE TABLE tasks_v3 (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            url TEXT NOT NULL,
            spec TEXT NOT NULL,
            status TEXT NOT NULL,
            status_reason TEXT,
            health TEXT NOT NULL,
            runs INTEGER NOT NULL DEFAULT 0,
            failures_in_a_row INTEGER NOT NULL DEFAULT 0,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            last_run_at TEXT,
            manual_runs INTEGER NOT NULL DEFAULT 0,
            published_at TEXT,
            record_partition INTEGER,
            record_offset INTEGER
        )""",
        """INSERT INTO tasks_v3 (id, name, url, spec, status, status_reason, health, runs,
            failures_in_a_row, created_at, updated_at, last_run_at, manual_runs)
           SELECT id, name, url, spec, status, status_reason, health, runs, failures_in_a_row,
            created_at, updated_at, last_run_at, manual_runs FROM tasks""",
        "DROP TABLE tasks",
        "ALTER TABLE tasks_v3 RENAME TO tasks",
        "CREATE INDEX IF NOT EXISTS tasks_order ON tasks (created_at, id)",
        "CREATE INDEX IF NOT EXISTS tasks_status ON tasks (status)",
        "CREATE INDEX IF NOT EXISTS tasks_name ON tasks (name)",
        """CREATE TABLE IF NOT EXISTS unpublished_removals (
            id TEXT PRIMARY KEY,
            removed_at TEXT NOT NULL
        )""",
        """CREATE TABLE IF NOT EXISTS topic_offsets (
            topic TEXT NOT NULL,
            partition INTEGER NOT NULL,
            next_offset INTEGER NOT NULL,
            PRIMARY KEY (topic, partition)
        )""",
    ),
    # A definition's digest under the validator that accepted it (`checked_digest`): at start
    # a definition whose digest matches is not validated again; NULL (a row of an older
    # release) or another digest (another validator, or a definition written by an older
    # release since) is validated as before.
    ("ALTER TABLE tasks ADD COLUMN spec_checked TEXT",),
    # The tasks not yet on the task topic (`unpublished`, at every start): without it, a scan
    # of every row (0.17-0.19 s at 100,000 tasks on the slow host kind, `bench/micro.py
    # stored-rows`) for what is as a rule none.
    (
        "CREATE INDEX IF NOT EXISTS tasks_unpublished ON tasks (created_at, id)"
        " WHERE published_at IS NOT updated_at",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)
BUSY_TIMEOUT_MS = 5000
MAX_PAGE = 1000


class StoreError(Exception):
    """The store cannot be opened or used; the message says why."""


class StoreReadOnly(StoreError):
    """The store's file, its -wal or -shm file, or their directory cannot be written."""


class TaskExists(Exception):
    """A task with this id is already stored."""


class ViewWrite(NamedTuple):
    """A task as a record of the task topic left it; `published`: the topic's last record of
    the task says what the task says (nothing to publish); where that record is, if known.
    A named tuple: made for each of a cluster node's 100,000 task records at start, in half
    the time of a frozen dataclass (`bench/micro.py tuple`)."""

    task: Task
    published: bool = True
    partition: int | None = None
    offset: int | None = None


@dataclass(frozen=True, slots=True)
class RuntimeState:
    """What a node keeps of a task besides its record: kept when the view is rebuilt."""

    health: Health
    runs: int
    manual_runs: int
    failures_in_a_row: int
    last_run_at: datetime | None
    position: tuple[int, int] | None  # (partition, offset) of the record the row was made from


@dataclass
class ViewBatch:
    """What a batch of task records does to the store, written in one transaction."""

    upserts: list[ViewWrite] = field(default_factory=list)
    removals: list[uuid.UUID] = field(default_factory=list)
    # At most one upsert or removal per task (the last record of the task in the batch).
    # (task id, partition, offset) of records that leave the task as it is (own echoes).
    positions: list[tuple[uuid.UUID, int, int]] = field(default_factory=list)
    # (topic, partition) -> next offset to read.
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)

    def empty(self) -> bool:
        return not (self.upserts or self.removals or self.positions or self.offsets)


# SQLite's page cache while a view is rebuilt, KiB (its default is 2,000).
REBUILD_CACHE_KIB = 16_384


class ViewRebuild:
    """A view rebuilt from the whole task topic, written to SQLite while it is being built.

    One transaction: the table emptied, then every chunk given to `add`, then the offsets,
    committed by `finish` (`abandon`, or an error, leaves the table as it was). Each chunk is
    an `INSERT ... SELECT` over a JSON array of its rows (two or more when rows with run state
    come between plain ones, `_view_chunks`), run by a thread of its own: SQLite
    hands the interpreter lock back for the whole statement, so its work runs on another core
    beside the decoding of the next records. (Rows bound one by one would hand the lock back
    and forth at every row, each time waiting for the decoding thread: slower than writing
    after the decoding, measured in BENCHMARKS.md.) The caller's thread makes each chunk's rows;
    the writing thread holds the store's lock until the end.
    """

    def __init__(self, store: SQLiteTaskStore) -> None:
        self._store = store
        self._queue: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._write, name="view-rebuild", daemon=True)
        self._thread.start()

    def add(self, writes: Sequence[ViewWrite]) -> None:
        """Rows for these tasks (a later one of the same id replaces an earlier one)."""
        if not writes:
            return
        for statement in _view_chunks(writes):
            self._queue.put(("rows", statement))

    def remove(self, task_ids: Sequence[uuid.UUID]) -> None:
        """No row for these tasks (given earlier in this rebuild)."""
        if task_ids:
            self._queue.put(("remove", [(str(i),) for i in task_ids]))

    def finish(self, offsets: dict[tuple[str, int], int]) -> None:
        """Commit the view with the offsets reading the topic resumes from; StoreError when
        it could not be written (then nothing of it was)."""
        self._queue.put(("commit", offsets))
        self._thread.join()
        if self._error is not None:
            if isinstance(self._error, sqlite3.Error):
                raise StoreError(f"task storage {self._store.path}: {self._error}")
            raise self._error

    def abandon(self) -> None:
        """Leave the table as it was."""
        self._queue.put(("abandon", None))
        self._thread.join()

    def _write(self) -> None:
        store = self._store
        db = store._db
        # Nothing is locked before there is something to do: the rebuild may begin before the
        # topic can be read (a broker that does not answer yet).
        kind, payload = self._queue.get()
        cache_size: int | None = None
        autocheckpoint: int | None = None
        with store._lock:
            try:
                (cache_size,) = db.execute("PRAGMA cache_size").fetchone()
                # Rows land at random places of the table's and indexes' B-trees: with
                # SQLite's default 2 MB of pages, writing 100,000 of them spends a sixth of
                # its time on pages pushed out and read again (`bench/task_topic.py build`).
                db.execute(f"PRAGMA cache_size = -{REBUILD_CACHE_KIB}")
                # The commit does not copy the view from the log into the file (0.16 of the
                # 0.21 s it took at 100,000 rows): the daemon has it done once READY
                # (`SQLiteTaskStore.checkpoint`); readers find the rows in the log meanwhile.
                (autocheckpoint,) = db.execute("PRAGMA wal_autocheckpoint").fetchone()
                db.execute("PRAGMA wal_autocheckpoint = 0")
                db.execute("BEGIN IMMEDIATE")
                db.execute("DELETE FROM tasks")
                db.execute("DELETE FROM unpublished_removals")
                while True:
                    if kind == "rows":
                        statement, text = payload  # `_view_chunks`
                        db.execute(statement, (text,))
                    elif kind == "remove":
                        db.executemany("DELETE FROM tasks WHERE id = ?", payload)
                    elif kind == "commit":
                        store._save_offsets(payload)
                        db.execute("COMMIT")
                        return
                    else:
                        db.execute("ROLLBACK")
                        return
                    kind, payload = self._queue.get()
            except BaseException as exc:
                self._error = exc
                if db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
                # Whatever comes next is dropped; `finish` or `abandon` still ends the wait.
                while kind not in ("commit", "abandon"):
                    kind = self._queue.get()[0]
            finally:
                with contextlib.suppress(sqlite3.Error):
                    if cache_size is not None:
                        db.execute(f"PRAGMA cache_size = {cache_size}")
                    if autocheckpoint is not None:
                        db.execute(f"PRAGMA wal_autocheckpoint = {autocheckpoint}")


class TaskStore(Protocol):
    """What the checker needs from a task store."""

    def load(self, now: datetime) -> list[Task]:
        """Every task. A stored definition that no longer validates comes back (and is saved)
        with status `error` and the validation message as its reason."""
        ...

    def get(self, task_id: uuid.UUID) -> Task | None: ...

    def insert(self, task: Task) -> None:
        """Raises NameTaken, TooManyTasks or TaskExists."""
        ...

    def replace(self, task: Task) -> None:
        """Write definition and state of an existing task; raises NameTaken."""
        ...

    def delete(self, task_id: uuid.UUID, *, remember: bool = False) -> bool:
        """With `remember`, the removal waits in the store until its tombstone is published."""
        ...

    def save_states(self, tasks: Sequence[Task]) -> None:
        """Write status, health, runs and times of many tasks in one transaction."""
        ...

    def page(self, query: TaskFilter) -> TaskPage: ...

    def named(self, name: str) -> list[uuid.UUID]:
        """Ids of the tasks with this name."""
        ...

    def counts(self) -> tuple[dict[str, int], dict[str, int]]:
        """Number of tasks by status and by health."""
        ...

    def close(self) -> None: ...


class SQLiteTaskStore:
    """`TaskStore` on one SQLite file. Thread-safe: calls are serialised by a lock, so batched
    writes may run in a worker thread while the event loop reads."""

    def __init__(self, path: Path, *, max_tasks: int = 100_000) -> None:
        self.path = path
        self.max_tasks = max_tasks
        self._lock = threading.Lock()
        # Checked before SQLite touches anything: it may open a file it cannot write and only
        # fail at the first write.
        problem = read_only_problem(path)
        if problem is not None:
            raise StoreReadOnly(problem)
        try:
            self._db = sqlite3.connect(
                path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
            )
            self._db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            # The text search sees URLs as the API shows them: matching the hidden password
            # would let anyone guess it a character at a time.
            self._db.create_function("redact_url", 1, redact_url, deterministic=True)
            mode = self._db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            # WAL with synchronous=NORMAL: commits do not fsync; a power cut can lose the last
            # transactions but never corrupts the file.
            self._db.execute("PRAGMA synchronous = NORMAL")
            self.schema_version = migrate(self._db)
        except sqlite3.Error as exc:
            raise StoreError(f"task storage {path}: {exc}") from None
        if mode.lower() != "wal":
            log.warning("task storage %s: journal mode is %s, not wal", path, mode)

    # -- reads ---------------------------------------------------------------------------------

    def load(self, now: datetime) -> list[Task]:
        with self._lock:
            # In the table's own order: the scheduler needs no order, and walking the
            # (created_at, id) index instead takes 1.6-1.9 times as long (`bench/micro.py
            # stored-rows`).
            cursor = self._db.execute(f"SELECT {_COLUMNS}, {_CHECKED} FROM tasks")
            tasks = []
            broken = []
            checked = []
            for row in _chunked(cursor):
                task = _checked_row_to_task(row)
                if task is not None:
                    tasks.append(task)
                    continue
                task, problem = _row_to_task(row)
                if problem is None:
                    # Held as compactly as a task loaded without validation (after an
                    # upgrade every definition is validated again: a third of the memory).
                    task = compacted(task)
                    if task.status is not TaskStatus.ERROR:
                        checked.append((checked_digest(row[_SPEC]), row[_ID]))
                elif _own_reason(task, problem):
                    task = task.model_copy(
                        update={
                            "status": TaskStatus.ERROR,
                            "status_reason": problem,
                            "updated_at": now,
                        }
                    )
                    broken.append(task)
                tasks.append(task)
            if broken:
                self._write_states(broken)
            if checked:
                # Validated here under this validator: not again at the next start.
                with _transaction(self._db):
                    self._db.executemany(f"UPDATE tasks SET {_CHECKED} = ? WHERE id = ?", checked)
        for task in broken:
            log.warning(
                "task %s no longer validates: %s", task.id, task.status_reason,
                extra={"task_id": str(task.id)},
            )  # fmt: skip
        return tasks

    def get(self, task_id: uuid.UUID) -> Task | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {_COLUMNS} FROM tasks WHERE id = ?", (str(task_id),)
            ).fetchone()
        return None if row is None else _row_to_task(row)[0]

    def page(self, query: TaskFilter) -> TaskPage:
        where: list[str] = []
        args: list[Any] = []
        if query.status is not None:
            where.append("status = ?")
            args.append(str(query.status))
        if query.health is not None:
            where.append("health = ?")
            args.append(str(query.health))
        if query.text:
            pattern = "%" + _escape_like(query.text) + "%"
            where.append(
                "(name LIKE ? ESCAPE '\\' OR (CASE WHEN instr(url, '@') = 0 THEN url"
                " ELSE redact_url(url) END) LIKE ? ESCAPE '\\')"
            )
            args += [pattern, pattern]
        if query.cursor:
            created, last_id = decode_cursor(query.cursor)
            where.append("(created_at > ? OR (created_at = ? AND id > ?))")
            args += [created, created, last_id]
        limit = max(1, min(query.limit, MAX_PAGE))
        sql = f"SELECT {_COLUMNS} FROM tasks"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at, id LIMIT ?"
        with self._lock:
            rows = self._db.execute(sql, (*args, limit + 1)).fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        cursor = encode_cursor(rows[-1][_CREATED], rows[-1][_ID]) if more else None
        return TaskPage(tasks=[_row_to_task(row)[0] for row in rows], next_cursor=cursor)

    def counts(self) -> tuple[dict[str, int], dict[str, int]]:
        with self._lock:
            by_status = dict(
                self._db.execute("SELECT status, COUNT(*) FROM tasks GROUP BY status").fetchall()
            )
            by_health = dict(
                self._db.execute("SELECT health, COUNT(*) FROM tasks GROUP BY health").fetchall()
            )
        return by_status, by_health

    # -- writes (each one short transaction) ----------------------------------------------------

    def insert(self, task: Task) -> None:
        with self._lock, _transaction(self._db):
            (count,) = self._db.execute("SELECT COUNT(*) FROM tasks").fetchone()
            if count >= self.max_tasks:
                raise TooManyTasks(f"the checker holds its maximum of {self.max_tasks} tasks")
            self._check_name(task)
            try:
                self._db.execute(
                    f"INSERT INTO tasks ({_COLUMNS}, {_CHECKED})"
                    f" VALUES ({', '.join('?' * (_NCOLUMNS + 1))})",
                    _task_to_row(task),
                )
            except sqlite3.IntegrityError as exc:
                raise _integrity(exc, task) from None

    def replace(self, task: Task) -> None:
        row = _task_to_row(task)
        with self._lock, _transaction(self._db):
            self._check_name(task)
            self._db.execute(f"UPDATE tasks SET {_ASSIGNMENTS} WHERE id = ?", (*row[1:], row[0]))

    def delete(self, task_id: uuid.UUID, *, remember: bool = False) -> bool:
        """Remove a task; with `remember`, keep its id in `unpublished_removals` (in the same
        transaction) until its tombstone is safe (`removals_published`)."""
        with self._lock, _transaction(self._db):
            cursor = self._db.execute("DELETE FROM tasks WHERE id = ?", (str(task_id),))
            if remember and cursor.rowcount > 0:
                self._db.execute(
                    "INSERT OR REPLACE INTO unpublished_removals (id, removed_at) VALUES (?, ?)",
                    (str(task_id), _time(datetime.now(UTC))),
                )
        return cursor.rowcount > 0

    def _check_name(self, task: Task) -> None:
        # Kept here rather than as a UNIQUE constraint: a view of the task topic (cluster
        # mode) must hold what the topic holds, two tasks of one name included.
        taken = self._db.execute(
            "SELECT 1 FROM tasks WHERE name = ? AND id != ? LIMIT 1",
            (task.spec.name, str(task.id)),
        ).fetchone()
        if taken is not None:
            raise NameTaken(f"a task named {task.spec.name!r} already exists")

    # -- the task topic (docs/tasks-topic.md) -----------------------------------------------------

    def apply(self, batch: ViewBatch) -> None:
        """Write what a batch of task records did to the view, with where reading the topic
        resumes, in one transaction: a crash leaves both before or both after the batch."""
        if batch.empty():
            return
        upserts = [_view_row(write) for write in batch.upserts]
        with self._lock, _transaction(self._db):
            if upserts:
                self._db.executemany(_UPSERT, upserts)
            if batch.removals:
                self._db.executemany(
                    "DELETE FROM tasks WHERE id = ?", [(str(i),) for i in batch.removals]
                )
            if batch.positions:
                self._db.executemany(
                    "UPDATE tasks SET record_partition = ?, record_offset = ? WHERE id = ?",
                    [(p, o, str(i)) for i, p, o in batch.positions],
                )
            self._save_offsets(batch.offsets)

    def replace_view(
        self, writes: Sequence[ViewWrite], offsets: dict[tuple[str, int], int]
    ) -> None:
        """Make the table exactly these tasks (a view rebuilt from the whole topic)."""
        rebuild = self.rebuild_view()
        rebuild.add(writes)
        rebuild.finish(offsets)

    def rebuild_view(self) -> ViewRebuild:
        """Start making the table exactly the tasks given to the `ViewRebuild` (a view rebuilt
        from the whole topic), written while they are still being made."""
        return ViewRebuild(self)

    def _save_offsets(self, offsets: dict[tuple[str, int], int]) -> None:
        if offsets:
            self._db.executemany(
                "INSERT INTO topic_offsets (topic, partition, next_offset) VALUES (?, ?, ?)"
                " ON CONFLICT (topic, partition) DO UPDATE SET next_offset = excluded.next_offset",
                [(topic, partition, n) for (topic, partition), n in offsets.items()],
            )

    def topic_offsets(self, topic: str) -> dict[int, int]:
        """Partition -> the offset reading `topic` resumes from."""
        with self._lock:
            found = self._db.execute(
                "SELECT partition, next_offset FROM topic_offsets WHERE topic = ?", (topic,)
            ).fetchall()
        return dict(found)

    def unpublished(self) -> list[Task]:
        """Tasks whose current definition and status have not reached the task topic (or the
        outbox): changed since, or made by an older release."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS}, {_CHECKED} FROM tasks WHERE published_at IS NOT updated_at"
                " ORDER BY created_at, id"
            ).fetchall()
        return [_checked_row_to_task(row) or _row_to_task(row)[0] for row in rows]

    def mark_published(self, items: Sequence[tuple[uuid.UUID, datetime]]) -> None:
        """The records of these tasks, as of these `updated_at`, are safe (on the topic or in
        the outbox). A task changed since keeps differing, so it stays unpublished."""
        if not items:
            return
        with self._lock, _transaction(self._db):
            for task_id, at in items:
                row = self._db.execute(
                    "SELECT updated_at FROM tasks WHERE id = ?", (str(task_id),)
                ).fetchone()
                # Compared as times: a file of an older release may spell them differently.
                if row is not None and _parse_time(row[0]) == at:
                    self._db.execute(
                        "UPDATE tasks SET published_at = updated_at WHERE id = ?", (str(task_id),)
                    )

    def pending_removals(self) -> list[uuid.UUID]:
        """Tasks removed whose tombstone is not yet safe."""
        with self._lock:
            found = self._db.execute("SELECT id FROM unpublished_removals ORDER BY removed_at")
            return [uuid.UUID(row[0]) for row in found.fetchall()]

    def removals_published(self, task_ids: Sequence[uuid.UUID]) -> None:
        if not task_ids:
            return
        with self._lock, _transaction(self._db):
            self._db.executemany(
                "DELETE FROM unpublished_removals WHERE id = ?", [(str(i),) for i in task_ids]
            )

    def set_positions(self, positions: Sequence[tuple[uuid.UUID, int, int]]) -> None:
        """Where the latest records of these tasks landed: (task id, partition, offset)."""
        if not positions:
            return
        with self._lock, _transaction(self._db):
            self._db.executemany(
                "UPDATE tasks SET record_partition = ?, record_offset = ? WHERE id = ?",
                [(p, o, str(i)) for i, p, o in positions],
            )

    def positions(self) -> dict[uuid.UUID, tuple[int, int]]:
        """(partition, offset) of every task's latest record known here."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, record_partition, record_offset FROM tasks"
                " WHERE record_partition IS NOT NULL"
            ).fetchall()
        return {uuid.UUID(i): (int(p), int(o)) for i, p, o in rows}

    def runtime_states(self) -> dict[uuid.UUID, RuntimeState]:
        """Every task's state besides its definition and status (no definition is parsed)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, health, runs, manual_runs, failures_in_a_row, last_run_at,"
                " record_partition, record_offset FROM tasks"
            ).fetchall()
        found = {}
        for task_id, health, runs, manual, failures, last, partition, offset in rows:
            try:
                kept = Health(health)
            except ValueError:
                kept = Health.UNKNOWN
            found[uuid.UUID(task_id)] = RuntimeState(
                health=kept,
                runs=runs,
                manual_runs=manual,
                failures_in_a_row=failures,
                last_run_at=_parse_time(last) if last else None,
                position=None if partition is None else (int(partition), int(offset)),
            )
        return found

    def record_position(self, task_id: uuid.UUID) -> tuple[int, int] | None:
        """(partition, offset) of the task's last record read from the topic, if known."""
        with self._lock:
            row = self._db.execute(
                "SELECT record_partition, record_offset FROM tasks WHERE id = ?", (str(task_id),)
            ).fetchone()
        if row is None or row[0] is None:
            return None
        return int(row[0]), int(row[1])

    def named(self, name: str) -> list[uuid.UUID]:
        """Ids of the tasks with this name (two only where the topic holds two)."""
        with self._lock:
            found = self._db.execute("SELECT id FROM tasks WHERE name = ?", (name,)).fetchall()
        return [uuid.UUID(row[0]) for row in found]

    def count(self) -> int:
        with self._lock:
            (count,) = self._db.execute("SELECT COUNT(*) FROM tasks").fetchone()
        return int(count)

    def save_states(self, tasks: Sequence[Task]) -> None:
        if not tasks:
            return
        with self._lock:
            self._write_states(tasks)

    def _write_states(self, tasks: Sequence[Task]) -> None:
        rows = [
            (
                str(t.status),
                t.status_reason,
                str(t.health),
                t.runs,
                t.manual_runs,
                t.failures_in_a_row,
                _time(t.updated_at),
                _time(t.last_run_at),
                str(t.id),
            )
            for t in tasks
        ]
        with _transaction(self._db):
            self._db.executemany(
                "UPDATE tasks SET status = ?, status_reason = ?, health = ?, runs = ?,"
                " manual_runs = ?, failures_in_a_row = ?, updated_at = ?, last_run_at = ?"
                " WHERE id = ?",
                rows,
            )

    def checkpoint(self) -> None:
        """Copy what the write-ahead log holds into the database file and empty the log: a
        rebuilt view commits without it (`ViewRebuild`), leaving the whole view there (about
        100 MB at 100,000 tasks) until this runs. StoreError when SQLite fails."""
        try:
            with self._lock:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"task storage {self.path}: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            self._db.close()


def read_only_problem(path: Path) -> str | None:
    """Why SQLite could not write the store at `path`, or None. It writes the file and the -wal
    and -shm files it keeps next to it (creating them at open), so the directory counts too."""
    path = path.absolute()
    directory = path.parent
    for one in (path, Path(f"{path}-wal"), Path(f"{path}-shm"), directory):
        if one.exists() and not os.access(one, os.W_OK):
            what = "directory" if one == directory else "file"
            why = "read-only file system" if _on_read_only_fs(one) else "no write permission"
            return (
                f"{what} {one} is read-only ({why}); SQLite must write {path.name}"
                f" and its -wal and -shm files in {directory}"
            )
    return None


def _on_read_only_fs(path: Path) -> bool:
    return bool(os.statvfs(path).f_flag & os.ST_RDONLY)


# -- schema --------------------------------------------------------------------------------------


def migrate(db: sqlite3.Connection) -> int:
    """Bring the file to SCHEMA_VERSION, one transaction per step; returns the version."""
    (version,) = db.execute("PRAGMA user_version").fetchone()
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"schema version {version} is newer than this checker knows ({SCHEMA_VERSION});"
            " upgrade the checker"
        )
    for number in range(version + 1, SCHEMA_VERSION + 1):
        with _transaction(db):
            for statement in MIGRATIONS[number - 1]:
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {number}")
        log.info("task storage migrated to schema version %d", number)
    return SCHEMA_VERSION


class _transaction:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error) on a connection in autocommit mode."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: object, exc: object, tb: object) -> None:
        self.db.execute("COMMIT" if kind is None else "ROLLBACK")


# -- rows ----------------------------------------------------------------------------------------

_COLUMN_NAMES = (
    "id",
    "name",
    "url",
    "spec",
    "status",
    "status_reason",
    "health",
    "runs",
    "failures_in_a_row",
    "created_at",
    "updated_at",
    "last_run_at",
    "manual_runs",
)
_COLUMNS = ", ".join(_COLUMN_NAMES)
# Written with a task's row (the last value of `_task_to_row`); only `load` reads it.
_CHECKED = "spec_checked"
_NCOLUMNS = len(_COLUMN_NAMES)
_ASSIGNMENTS = ", ".join(f"{name} = ?" for name in (*_COLUMN_NAMES[1:], _CHECKED))
_VIEW_COLUMNS = (*_COLUMN_NAMES, _CHECKED, "published_at", "record_partition", "record_offset")
_ON_CONFLICT_REPLACE = " ON CONFLICT (id) DO UPDATE SET " + ", ".join(
    f"{name} = excluded.{name}" for name in _VIEW_COLUMNS[1:]
)
# One row (`_view_row`) as bound values.
_UPSERT = (
    f"INSERT INTO tasks ({', '.join(_VIEW_COLUMNS)})"
    f" VALUES ({', '.join('?' * len(_VIEW_COLUMNS))})" + _ON_CONFLICT_REPLACE
)
# The rows of a chunk of a rebuilt view, from one JSON array of rows (`ViewRebuild`).
_VIEW_ROWS_FROM_JSON = (
    f"INSERT INTO tasks ({', '.join(_VIEW_COLUMNS)}) SELECT "
    + ", ".join(f"value ->> {i}" for i in range(len(_VIEW_COLUMNS)))
    + " FROM json_each(?) WHERE true"
    + _ON_CONFLICT_REPLACE
)
_ID = 0
_SPEC = 3
_CREATED = 9
_UPDATED = 10
_PUBLISHED = _VIEW_COLUMNS.index("published_at")
# Most rows of a rebuilt view hold their definition, status, times and place and nothing
# else: no run yet, no reason, the record's `updated_at` as `published_at`, no digest. SQLite
# reads each column of a row from the row's JSON text anew (about 0.5 us a column for a row
# of 770 bytes: half of the 2.1 s that 100,000 rows took), so such a row goes with only the
# columns that vary and the statement fills in the others (`bench/task_topic.py build`).
_PLAIN_FILLED: dict[str, int | None] = {
    "status_reason": None,
    "runs": 0,
    "failures_in_a_row": 0,
    "last_run_at": None,
    "manual_runs": 0,
    _CHECKED: None,
}
_PLAIN_COLUMNS = tuple(c for c in _VIEW_COLUMNS if c not in _PLAIN_FILLED and c != "published_at")
_FILLED_VALUES = tuple(_PLAIN_FILLED.values())
_PLAIN_ROWS_FROM_JSON = (
    f"INSERT INTO tasks ({', '.join((*_PLAIN_COLUMNS, *_PLAIN_FILLED, 'published_at'))}) SELECT "
    + ", ".join(f"value ->> {i}" for i in range(len(_PLAIN_COLUMNS)))
    + "".join(", NULL" if v is None else f", {v}" for v in _FILLED_VALUES)
    + f", value ->> {_PLAIN_COLUMNS.index('updated_at')}"
    + " FROM json_each(?) WHERE true"
    + _ON_CONFLICT_REPLACE
)


def _view_chunks(writes: Sequence[ViewWrite]) -> Iterator[tuple[str, str]]:
    """The statements that write the rows of `writes`, each with its JSON (text: SQLite reads
    a BLOB parameter as no JSON at all), in the order of the writes (a later row of a task
    replaces an earlier one): runs of plain rows (`_plain_view_row`) go with their varying
    columns alone. Not marked as checked: a view is rebuilt from the topic, never loaded
    (`load` marks what it validates, should the node run in single mode one day)."""
    plain: list[tuple[Any, ...]] = []
    full: list[tuple[Any, ...]] = []
    for write in writes:
        row = _plain_view_row(write)
        if row is not None:
            if full:
                yield _VIEW_ROWS_FROM_JSON, orjson.dumps(full).decode()
                full = []
            plain.append(row)
        else:
            if plain:
                yield _PLAIN_ROWS_FROM_JSON, orjson.dumps(plain).decode()
                plain = []
            full.append(_view_row(write, checked=False, for_json=True))
    if plain:
        yield _PLAIN_ROWS_FROM_JSON, orjson.dumps(plain).decode()
    if full:
        yield _VIEW_ROWS_FROM_JSON, orjson.dumps(full).decode()


def _plain_view_row(write: ViewWrite) -> tuple[Any, ...] | None:
    """The columns `_PLAIN_ROWS_FROM_JSON` writes of the row `_view_row(write, checked=False,
    for_json=True)` makes, when the row is plain: nothing but definition, status, times and
    place (`_PLAIN_FILLED`), and `published_at` its `updated_at`. Else None. Made from the task
    directly, in the order of `_PLAIN_COLUMNS`, not picked from its whole row once that is made
    and found plain: 2.2 against 2.6 us and the finding
    (`bench/micro.py view-rows`; a cluster node makes 100,000 at start)."""
    task = write.task
    if (
        task.runs != 0
        or task.failures_in_a_row != 0
        or task.manual_runs != 0
        or task.status_reason is not None
        or task.last_run_at is not None
        or not (write.published or task.updated_at is None)
    ):
        return None
    spec = task.spec
    return (
        task.id,
        spec.name,
        spec.url,
        spec_json(spec),
        task.status,
        task.health,
        _json_time(task.created_at),
        _json_time(task.updated_at),
        write.partition,
        write.offset,
    )


_CHECKED_AT = _NCOLUMNS  # where `load` reads spec_checked


def _task_to_row(task: Task, *, checked: bool = True, for_json: bool = False) -> tuple[Any, ...]:
    """The task's columns (`_COLUMN_NAMES`), then `spec_checked` (None without `checked`).

    `for_json`: for orjson to write into a view's chunk (`ViewRebuild`), the same JSON with the
    values orjson writes as these columns spell them left to it (the id, status and health, the
    times) and the definition's text through `spec_json`: 3.4-4.7 against 7.9-9.6 us a row
    (`bench/micro.py view-rows`), made by the thread that decodes a cluster node's 100,000
    task records at start."""
    ident: object
    status: object
    health: object
    if for_json:
        spec, time = spec_json(task.spec), _json_time
        ident, status, health = task.id, task.status, task.health
    else:
        spec, time = task.spec.model_dump_json(), _time
        ident, status, health = str(task.id), str(task.status), str(task.health)
    return (
        ident,
        task.spec.name,
        task.spec.url,
        spec,
        status,
        task.status_reason,
        health,
        task.runs,
        task.failures_in_a_row,
        time(task.created_at),
        time(task.updated_at),
        time(task.last_run_at),
        task.manual_runs,
        # A task in error may hold a definition that does not validate (built without
        # validation to be shown); every other definition was validated by this process.
        None if not checked or task.status is TaskStatus.ERROR else checked_digest(spec),
    )


def _view_row(write: ViewWrite, *, checked: bool = True, for_json: bool = False) -> tuple[Any, ...]:
    """A view's row (`_VIEW_COLUMNS`) for what a task record left: the task's columns, then
    `published_at` (its `updated_at` when the topic's last record says what it says),
    the record's partition and offset."""
    row = _task_to_row(write.task, checked=checked, for_json=for_json)
    return (*row, row[_UPDATED] if write.published else None, write.partition, write.offset)


def _json_time(value: datetime | None) -> datetime | str | None:
    """A time as orjson writes it where that is `_time`'s text (UTC, microseconds not 0:
    orjson leaves out ".000000"), else `_time`'s text."""
    if value is None or (value.microsecond and value.tzinfo is UTC):
        return value
    return _time(value)


def _chunked(cursor: sqlite3.Cursor, size: int = 2000) -> Iterator[Any]:
    """A cursor's rows, fetched `size` at a time rather than all at once: the rows of a chunk,
    the stored definitions' text above all, are gone before the next one is read, and making
    100,000 tasks takes 1.36-1.40 instead of 1.43-1.56 s (`bench/micro.py stored-rows`)."""
    while rows := cursor.fetchmany(size):
        yield from rows


def _checked_row_to_task(row: Sequence[Any]) -> Task | None:
    """The task in a row whose definition this validator accepted as it is stored (its
    `spec_checked` matches), built without validating again; None for any other row."""
    digest = row[_CHECKED_AT]
    if digest is None or digest != checked_digest(row[_SPEC]):
        return None
    status = _STATUSES.get(row[4])
    health = _HEALTHS.get(row[6])
    if status is None or health is None:
        return None
    if status is TaskStatus.ERROR:
        return None  # its reason may need the validation's message
    task_id = canonical_id(row[0])  # else the row goes the way that validates
    if task_id is None:
        return None
    spec = checked_spec(orjson.loads(row[_SPEC]))
    if spec is None:
        return None
    values = {
        "id": task_id,
        "spec": spec,
        "status": status,
        "status_reason": row[5],
        "health": health,
        "runs": row[7],
        "manual_runs": row[12],
        "failures_in_a_row": row[8],
        "created_at": _parse_time(row[9]),
        "updated_at": _parse_time(row[10]),
        "last_run_at": _parse_time(row[11]) if row[11] else None,
    }
    return assembled(Task, values, ALL_TASK_FIELDS)


# A stored row's status and health by their text, without the enumeration's lookup (0.5
# against 0.03 us, twice a row at every start: `bench/micro.py stored-rows`).
_STATUSES = {status.value: status for status in TaskStatus}
_HEALTHS = {health.value: health for health in Health}


def _row_to_task(row: Sequence[Any]) -> tuple[Task, str | None]:
    """The task in a row, and the validation problem of its definition (None when it is fine)."""
    spec, problem = parse_spec(row[3], name=row[1], url=row[2])
    try:
        status = TaskStatus(row[4])
    except ValueError:
        status, problem = TaskStatus.ERROR, problem or f"unknown status {row[4]!r}"
    try:
        health = Health(row[6])
    except ValueError:
        health = Health.UNKNOWN
    task = Task(
        id=uuid.UUID(row[0]),
        spec=spec,
        status=status,
        status_reason=row[5],
        health=health,
        runs=row[7],
        failures_in_a_row=row[8],
        created_at=_parse_time(row[9]),
        updated_at=_parse_time(row[10]),
        last_run_at=_parse_time(row[11]) if row[11] else None,
        manual_runs=row[12],
    )
    return task, problem


def _own_reason(task: Task, problem: str) -> bool:
    """Whether a task whose definition does not validate must get `problem` as its reason: not
    when it has it already, nor when its reason says its record did not validate."""
    if task.status is not TaskStatus.ERROR:
        return True
    reason = task.status_reason or ""
    return reason != problem and not reason.startswith(INVALID_RECORD)


def parse_spec(raw: str, *, name: str, url: str) -> tuple[TaskSpec, str | None]:
    """Validate a stored definition. One that fails (after an upgrade tightened a rule) is still
    built, without validation, so it can be shown and edited; the problem names the field."""
    try:
        return TaskSpec.model_validate_json(raw), None
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(part) for part in first.get("loc", ())) or "definition"
        message = str(first.get("msg", "invalid")).removeprefix("Value error, ")
        problem = f"stored definition no longer validates: {where}: {message}"
    try:
        fields = orjson.loads(raw)
    except orjson.JSONDecodeError:
        fields = {}
    if not isinstance(fields, dict):
        fields = {}
    known = {k: v for k, v in fields.items() if k in TaskSpec.model_fields}
    known.update(name=name, url=url)
    return TaskSpec.model_construct(**known), problem


def _integrity(exc: sqlite3.IntegrityError, task: Task) -> Exception:
    text = str(exc)
    if "tasks.id" in text:
        return TaskExists(f"task {task.id} already exists")
    return StoreError(text)


def _time(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is not UTC:  # a task's times are UTC already (a view's 100,000 rows)
        value = value.astimezone(UTC)
    return value.isoformat(timespec="microseconds")


def _parse_time(value: str) -> datetime:
    parsed = datetime.fromisoformat(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


# A cursor is the position after (created_at, id) in digits and hex (CURSOR_PATTERN):
# `20261127T200555239275-3f1c8a526a8e4c399a445d2b1f0e7c11`. Rows are ordered by comparing the
# stored strings, so any string of this shape is a position, even one no row has.
_CURSOR = re.compile(CURSOR_PATTERN)


def encode_cursor(created_at: str, task_id: str) -> str:
    """An opaque position in the list: after (created_at, id)."""
    digits = "".join(c for c in created_at.removesuffix("+00:00") if c.isdigit())
    return f"{digits[:8]}T{digits[8:]}-{uuid.UUID(task_id).hex}"


def decode_cursor(cursor: str) -> tuple[str, str]:
    """(created_at, id) as stored; ValueError for a string that is not of a cursor's shape."""
    if not _CURSOR.match(cursor):
        raise ValueError("not a valid cursor")
    d, t, h = cursor[:8], cursor[9:21], cursor[22:]
    created = f"{d[:4]}-{d[4:6]}-{d[6:]}T{t[:2]}:{t[2:4]}:{t[4:6]}.{t[6:]}+00:00"
    return created, f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
