"""The outbox: results and task records the broker has not confirmed yet, kept in SQLite until
it does. Each row names its topic (none: the results topic); a task's rows of both topics are
one sequence, so its records and results reach the broker in the order they were made.

The table lives in the same SQLite file as the tasks (its own connection, WAL mode). Each row
carries a sequence number; rows of one task are sent in that order, so a result never
overtakes an earlier one of the same task. Sequence numbers come from `reserve()`: the
publisher takes one for every result when it is published, so a result that fails after later
ones of its task were stored still goes back in front of them.

Rows are deleted only after the broker confirmed their delivery, or when they are set aside:
a message the broker or the client refuses for good (too large, invalid) would otherwise stay at
the head of its task's queue and hold back every later result of that task. `set_aside()` moves
such rows, with the reason, to the table `outbox_set_aside` in the same file, in one
transaction; they stay there for a person to look at (nothing reads them back):

    sqlite3 tasks.sqlite3 "SELECT id, task_id, reason, datetime(set_aside_at, 'unixepoch')
                           FROM outbox_set_aside ORDER BY id"
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 10_000

# A row's topic: NULL is the results topic (KAFKA_TOPIC), which every row of a file made before
# the task topic holds; task records name theirs. A null value is a tombstone (task removed).
SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq      INTEGER PRIMARY KEY,
    task_id  TEXT    NOT NULL,
    key      BLOB    NOT NULL,
    value    BLOB,
    added_at REAL    NOT NULL,
    topic    TEXT
);
CREATE INDEX IF NOT EXISTS outbox_task_seq ON outbox (task_id, seq);
CREATE TABLE IF NOT EXISTS outbox_set_aside (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    seq          INTEGER NOT NULL,
    task_id      TEXT    NOT NULL,
    key          BLOB    NOT NULL,
    value        BLOB,
    reason       TEXT    NOT NULL,
    set_aside_at REAL    NOT NULL,
    topic        TEXT
);
"""
# Files made before the task topic: both tables gain `topic` (NULL for their rows: results) and
# lose NOT NULL on `value`, which SQLite can only drop by copying the table.
UPGRADE_TO_TOPICS = """
CREATE TABLE outbox_v2 (
    seq      INTEGER PRIMARY KEY,
    task_id  TEXT    NOT NULL,
    key      BLOB    NOT NULL,
    value    BLOB,
    added_at REAL    NOT NULL,
    topic    TEXT
);
INSERT INTO outbox_v2 (seq, task_id, key, value, added_at)
    SELECT seq, task_id, key, value, added_at FROM outbox;
DROP TABLE outbox;
ALTER TABLE outbox_v2 RENAME TO outbox;
CREATE INDEX IF NOT EXISTS outbox_task_seq ON outbox (task_id, seq);
CREATE TABLE outbox_set_aside_v2 (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    seq          INTEGER NOT NULL,
    task_id      TEXT    NOT NULL,
    key          BLOB    NOT NULL,
    value        BLOB,
    reason       TEXT    NOT NULL,
    set_aside_at REAL    NOT NULL,
    topic        TEXT
);
INSERT INTO outbox_set_aside_v2 (id, seq, task_id, key, value, reason, set_aside_at)
    SELECT id, seq, task_id, key, value, reason, set_aside_at FROM outbox_set_aside;
DROP TABLE outbox_set_aside;
ALTER TABLE outbox_set_aside_v2 RENAME TO outbox_set_aside;
"""


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """One stored message: its place in the send order, its task, the Kafka key/value (None: a
    tombstone) and its topic (None: the results topic)."""

    seq: int
    task_id: uuid.UUID
    key: bytes
    value: bytes | None
    topic: str | None = None


@dataclass(frozen=True, slots=True)
class SetAside:
    """A message that cannot be delivered, and why."""

    row: OutboxRow
    reason: str


class Outbox:
    """Messages waiting for the broker, in the task store's SQLite file.

    Thread-safe: the publisher runs its reads and writes in worker threads while the event
    loop may ask for `size()`.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            str(path), isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000
        )
        try:
            self._db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            self._db.execute("PRAGMA journal_mode = WAL")
            # An outbox row is a result nobody else has: make its commit survive power loss.
            self._db.execute("PRAGMA synchronous = FULL")
            self._upgrade()
            self._db.executescript(SCHEMA)
            (count, last) = self._db.execute("SELECT COUNT(*), MAX(seq) FROM outbox").fetchone()
            (aside,) = self._db.execute("SELECT COUNT(*) FROM outbox_set_aside").fetchone()
        except sqlite3.Error:
            self._db.close()
            raise
        self._count: int = count
        self._aside: int = aside
        self._next_seq: int = (last or 0) + 1

    def _upgrade(self) -> None:
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(outbox)")}
        if columns and "topic" not in columns:
            # executescript commits first; the whole copy is one transaction of its own.
            try:
                self._db.executescript(f"BEGIN IMMEDIATE;\n{UPGRADE_TO_TOPICS}\nCOMMIT;")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
            log.info("outbox upgraded: each row names its topic")

    def reserve(self) -> int:
        """The next sequence number: larger than every stored and every reserved one."""
        with self._lock:
            seq = self._next_seq
            self._next_seq += 1
            return seq

    def add(self, items: list[tuple[uuid.UUID, bytes, bytes]], topic: str | None = None) -> None:
        """Append messages (task_id, key, value) for `topic` (None: the results topic) behind
        everything reserved so far."""
        rows = [
            OutboxRow(self.reserve(), task_id, key, value, topic) for task_id, key, value in items
        ]
        self.put(rows)

    def put(self, rows: Sequence[OutboxRow]) -> None:
        """Store messages under sequence numbers taken earlier with `reserve()`."""
        if not rows:
            return
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                before = self._db.total_changes
                # A row stored twice (same seq) is the same message: keep the first copy.
                self._db.executemany(
                    "INSERT OR IGNORE INTO outbox (seq, task_id, key, value, added_at, topic) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    [(r.seq, str(r.task_id), r.key, r.value, now, r.topic) for r in rows],
                )
                added = self._db.total_changes - before
                self._db.execute("COMMIT")
            except BaseException:
                # SQLite has already rolled back after some errors (disk full): a ROLLBACK
                # then fails and would hide the real error.
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
            self._count += added
            self._next_seq = max(self._next_seq, max(r.seq for r in rows) + 1)

    def head(self, limit: int) -> list[OutboxRow]:
        """The oldest rows in send order (smallest sequence number first)."""
        with self._lock:
            found = self._db.execute(
                "SELECT seq, task_id, key, value, topic FROM outbox ORDER BY seq LIMIT ?", (limit,)
            ).fetchall()
        return [_row(*row) for row in found]

    def heads(self, task_ids: Iterable[uuid.UUID]) -> list[OutboxRow]:
        """The oldest row of each of these tasks (tasks without rows are left out).

        One statement for the whole batch; each task's head is one lookup in the
        (task_id, seq) index, so the cost does not grow with the size of the outbox.
        """
        ids = _json_list(str(task) for task in task_ids)
        if ids == "[]":
            return []
        with self._lock:
            found = self._db.execute(
                "SELECT o.seq, o.task_id, o.key, o.value, o.topic FROM json_each(?) AS t "
                "JOIN outbox AS o ON o.seq = "
                "(SELECT MIN(seq) FROM outbox WHERE task_id = t.value) "
                "ORDER BY o.seq",
                (ids,),
            ).fetchall()
        return [_row(*row) for row in found]

    def delete(self, seqs: Iterable[int]) -> None:
        """Forget rows the broker has confirmed."""
        params = _json_list(seqs)
        if params == "[]":
            return
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                before = self._db.total_changes
                # One statement for the batch (each row found by its primary key).
                self._db.execute(
                    "DELETE FROM outbox WHERE seq IN (SELECT value FROM json_each(?))", (params,)
                )
                removed = self._db.total_changes - before
                self._db.execute("COMMIT")
            except BaseException:
                # SQLite has already rolled back after some errors (disk full): a ROLLBACK
                # then fails and would hide the real error.
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
            self._count -= removed

    def set_aside(self, items: Sequence[SetAside]) -> None:
        """Move messages that cannot be delivered out of the outbox (where they may or may not
        be) into `outbox_set_aside`, in one transaction."""
        if not items:
            return
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                before = self._db.total_changes
                self._db.execute(
                    "DELETE FROM outbox WHERE seq IN (SELECT value FROM json_each(?))",
                    (_json_list(item.row.seq for item in items),),
                )
                removed = self._db.total_changes - before
                self._db.executemany(
                    "INSERT INTO outbox_set_aside"
                    " (seq, task_id, key, value, reason, set_aside_at, topic)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [
                        (
                            i.row.seq,
                            str(i.row.task_id),
                            i.row.key,
                            i.row.value,
                            i.reason,
                            now,
                            i.row.topic,
                        )
                        for i in items
                    ],
                )
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
            self._count -= removed
            self._aside += len(items)

    def set_aside_rows(self, limit: int = 100) -> list[tuple[int, uuid.UUID, str, bytes | None]]:
        """The messages set aside, oldest first: (seq, task_id, reason, value)."""
        with self._lock:
            found = self._db.execute(
                "SELECT seq, task_id, reason, value FROM outbox_set_aside ORDER BY id LIMIT ?",
                (limit,),
            ).fetchall()
        return [(seq, uuid.UUID(task), reason, value) for seq, task, reason, value in found]

    def set_aside_size(self) -> int:
        """Messages in `outbox_set_aside` (kept in memory like `size()`)."""
        return self._aside

    def backlog(self, topic: str | None = None) -> Counter[uuid.UUID]:
        """How many rows each task has waiting (only those for `topic`, when it is given)."""
        with self._lock:
            if topic is None:
                found = self._db.execute(
                    "SELECT task_id, COUNT(*) FROM outbox GROUP BY task_id"
                ).fetchall()
            else:
                found = self._db.execute(
                    "SELECT task_id, COUNT(*) FROM outbox WHERE topic = ? GROUP BY task_id",
                    (topic,),
                ).fetchall()
        return Counter({uuid.UUID(task): count for task, count in found})

    def size(self) -> int:
        """Rows waiting (kept in memory: this connection is the table's only writer)."""
        return self._count

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _row(seq: int, task: str, key: bytes, value: bytes | None, topic: str | None) -> OutboxRow:
    return OutboxRow(seq, uuid.UUID(task), key, value, topic)


def _json_list(items: Iterable[int | str]) -> str:
    """A JSON array of these ids, for json_each(): task ids as the strings they are stored as."""
    return (
        "[" + ",".join(f'"{item}"' if isinstance(item, str) else str(item) for item in items) + "]"
    )
