"""The outbox keeps unsent results in the task store's SQLite file, in send order per task."""

from __future__ import annotations

import sqlite3
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from periodic_checker.outbox import Outbox, OutboxRow, SetAside


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "tasks.sqlite3"


@pytest.fixture
def outbox(path: Path) -> Iterator[Outbox]:
    box = Outbox(path)
    yield box
    box.close()


def test_added_rows_come_back_oldest_first(outbox: Outbox) -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    outbox.add([(a, b"ka", b"1"), (b, b"kb", b"2")])
    outbox.add([(a, b"ka", b"3")])

    assert outbox.size() == 3
    assert [(r.task_id, r.value) for r in outbox.head(10)] == [(a, b"1"), (b, b"2"), (a, b"3")]
    assert [r.value for r in outbox.head(2)] == [b"1", b"2"]


def test_a_row_put_under_an_earlier_reservation_goes_in_front(outbox: Outbox) -> None:
    task = uuid.uuid4()
    early = outbox.reserve()  # taken when the result was published
    outbox.add([(task, b"k", b"later")])
    outbox.put([OutboxRow(early, task, b"k", b"earlier")])

    assert [r.value for r in outbox.head(10)] == [b"earlier", b"later"]


def test_delete_removes_only_the_rows_named(outbox: Outbox) -> None:
    task = uuid.uuid4()
    outbox.add([(task, b"k", str(i).encode()) for i in range(5)])
    first_two = [r.seq for r in outbox.head(2)]

    outbox.delete(first_two)
    outbox.delete(first_two)  # confirming twice is harmless

    assert outbox.size() == 3
    assert [r.value for r in outbox.head(10)] == [b"2", b"3", b"4"]


def test_storing_the_same_row_twice_keeps_one(outbox: Outbox) -> None:
    row = OutboxRow(outbox.reserve(), uuid.uuid4(), b"k", b"v")
    outbox.put([row])
    outbox.put([row])

    assert outbox.size() == 1
    assert outbox.head(10) == [row]


def test_backlog_counts_rows_per_task(outbox: Outbox) -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    outbox.add([(a, b"k", b"1"), (a, b"k", b"2"), (b, b"k", b"3")])

    assert outbox.backlog() == {a: 2, b: 1}


def test_rows_and_order_survive_reopening(path: Path) -> None:
    task = uuid.uuid4()
    first = Outbox(path)
    first.add([(task, b"k", b"1"), (task, b"k", b"2")])
    last_seq = first.head(10)[-1].seq
    first.close()

    again = Outbox(path)
    try:
        assert again.size() == 2
        assert [r.value for r in again.head(10)] == [b"1", b"2"]
        assert again.reserve() > last_seq
    finally:
        again.close()


def test_shares_the_task_store_file_in_wal_mode(path: Path) -> None:
    tasks = sqlite3.connect(path)
    tasks.execute("CREATE TABLE tasks (id TEXT PRIMARY KEY)")
    tasks.execute("INSERT INTO tasks VALUES ('t1')")
    tasks.commit()

    box = Outbox(path)
    box.add([(uuid.uuid4(), b"k", b"v")])
    box.close()

    assert tasks.execute("SELECT id FROM tasks").fetchall() == [("t1",)]
    assert tasks.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] == 1
    tasks.close()
    fresh = sqlite3.connect(path)
    assert fresh.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    fresh.close()


def test_reservations_from_many_threads_are_unique(outbox: Outbox) -> None:
    taken: list[int] = []
    lock = threading.Lock()

    def take() -> None:
        mine = [outbox.reserve() for _ in range(500)]
        with lock:
            taken.extend(mine)

    threads = [threading.Thread(target=take) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(set(taken)) == 2000


def test_heads_give_the_oldest_row_of_each_named_task_only(outbox: Outbox) -> None:
    a, b, c = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    outbox.add([(a, b"ka", b"a1"), (b, b"kb", b"b1"), (a, b"ka", b"a2"), (b, b"kb", b"b2")])
    outbox.add([(c, b"kc", b"c1")])

    heads = {row.task_id: row.value for row in outbox.heads([a, b, uuid.uuid4()])}

    assert heads == {a: b"a1", b: b"b1"}
    outbox.delete([row.seq for row in outbox.heads([a])])
    assert [row.value for row in outbox.heads([a])] == [b"a2"]
    assert outbox.size() == 4


def test_a_row_set_aside_leaves_the_queue_for_the_side_table_with_its_reason(path: Path) -> None:
    task = uuid.uuid4()
    outbox = Outbox(path)
    outbox.add([(task, b"k", b"too big"), (task, b"k", b"next")])
    head = outbox.heads([task])[0]
    never_stored = OutboxRow(outbox.reserve(), task, b"k", b"refused when sent directly")

    outbox.set_aside([SetAside(head, "too large"), SetAside(never_stored, "invalid")])

    assert [r.value for r in outbox.heads([task])] == [b"next"]
    assert (outbox.size(), outbox.set_aside_size()) == (1, 2)
    outbox.close()
    reopened = Outbox(path)  # counted again from the file
    assert (reopened.size(), reopened.set_aside_size()) == (1, 2)
    assert [(t, reason, value) for _, t, reason, value in reopened.set_aside_rows()] == [
        (task, "too large", b"too big"),
        (task, "invalid", b"refused when sent directly"),
    ]
    reopened.close()


# The outbox as the release before the task topic made it.
RELEASE_2_SCHEMA = """
CREATE TABLE outbox (seq INTEGER PRIMARY KEY, task_id TEXT NOT NULL, key BLOB NOT NULL,
                     value BLOB NOT NULL, added_at REAL NOT NULL);
CREATE INDEX outbox_task_seq ON outbox (task_id, seq);
CREATE TABLE outbox_set_aside (id INTEGER PRIMARY KEY AUTOINCREMENT, seq INTEGER NOT NULL,
                               task_id TEXT NOT NULL, key BLOB NOT NULL, value BLOB NOT NULL,
                               reason TEXT NOT NULL, set_aside_at REAL NOT NULL);
"""


def test_rows_of_a_file_made_before_the_task_topic_stay_results(path: Path) -> None:
    task = uuid.uuid4()
    with sqlite3.connect(path) as db:
        db.executescript(RELEASE_2_SCHEMA)
        db.execute(
            "INSERT INTO outbox VALUES (5, ?, ?, ?, 0)", (str(task), b"k", b'{"r": "result"}')
        )
        db.execute(
            "INSERT INTO outbox_set_aside (seq, task_id, key, value, reason, set_aside_at)"
            " VALUES (3, ?, ?, ?, 'too large', 0)",
            (str(task), b"k", b"big"),
        )
    db.close()

    box = Outbox(path)
    try:
        assert box.head(10) == [OutboxRow(5, task, b"k", b'{"r": "result"}', None)]
        assert box.set_aside_size() == 1
        assert box.reserve() == 6
        # The upgraded tables take task records, tombstones included, behind the old rows.
        box.add([(task, b"k", b"record")], topic="tasks")
        box.put([OutboxRow(box.reserve(), task, b"k", None, "tasks")])
        assert [(r.value, r.topic) for r in box.heads([task])] == [(b'{"r": "result"}', None)]
        assert [(r.value, r.topic) for r in box.head(10)] == [
            (b'{"r": "result"}', None),
            (b"record", "tasks"),
            (None, "tasks"),
        ]
        assert box.backlog() == {task: 3}
        assert box.backlog("tasks") == {task: 2}
    finally:
        box.close()
    again = Outbox(path)  # opened again: no second upgrade, nothing lost
    assert again.size() == 3
    again.close()
