"""The materialiser in-process against the real broker: the whole topic read at start gives the
last record of each task, a writer's wait ends once its record is applied, and a batch the store
could not write is read again."""

from __future__ import annotations

import asyncio
import json
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from checker.nodes import Topics, node_settings, produce

from checker_common.task_spec import TaskSpec
from periodic_checker import materialiser
from periodic_checker.materialiser import Snapshot, TaskTopicFollower, TopicMissing
from periodic_checker.names import NameClaims
from periodic_checker.store import SQLiteTaskStore, ViewBatch
from periodic_checker.tasks import Task

from conftest import KafkaTarget
from helpers import wait_for

pytestmark = pytest.mark.kafka

SPEC = {"name": "shop", "url": "http://127.0.0.1:9/", "interval": 60, "timeout": 5}


class Scheduler:
    """The scheduler's live-change calls, recorded."""

    def __init__(self) -> None:
        self.tasks: dict[uuid.UUID, Task] = {}

    def add(self, task: Task) -> None:
        self.tasks[task.id] = task

    def replace(self, task: Task) -> None:
        self.tasks[task.id] = task

    def remove(self, task_id: uuid.UUID) -> None:
        self.tasks.pop(task_id, None)


class FailingOnce(SQLiteTaskStore):
    """A store whose first write of a batch fails (a locked or full disk)."""

    failed = False

    def apply(self, batch: ViewBatch) -> None:
        if batch.upserts and not self.failed:
            self.failed = True
            raise OSError("disk full")
        super().apply(batch)


def record(name: str, **fields: Any) -> bytes:
    return json.dumps({"spec": {**SPEC, "name": name}, **fields}).encode()


async def test_reading_the_whole_topic_gives_the_last_record_of_each_task(
    kafka: KafkaTarget, topics: Topics, tmp_path: Path
) -> None:
    a, b, c = (str(uuid.uuid4()) for _ in range(3))
    produce(kafka, topics.tasks, a.encode(), record("a"))
    produce(kafka, topics.tasks, b.encode(), record("b"))
    produce(kafka, topics.tasks, a.encode(), record("a", status="paused"))
    produce(kafka, topics.tasks, b.encode(), None)  # removed
    produce(kafka, topics.tasks, c.encode(), record("c", status="active"))
    produce(kafka, topics.tasks, c.encode(), b'{"spec": 1}')  # its last record is invalid
    store = SQLiteTaskStore(tmp_path / "tasks.sqlite3")
    now = datetime.now(UTC)
    stale = TaskSpec(name="stale", url="http://x.test/")
    store.insert(Task(id=uuid.uuid4(), spec=stale, created_at=now, updated_at=now))
    names = NameClaims()
    follower = TaskTopicFollower(
        node_settings(kafka, topics, tmp_path, "cluster"), store, Scheduler(), names=names
    )
    try:
        snapshot = await asyncio.to_thread(follower.read_everything)
        rebuild = store.rebuild_view()  # written as the view is built, as the daemon does
        writes = follower.build_view(snapshot, {}, datetime.now(UTC), sink=rebuild)
        rebuild.finish(snapshot.offsets)
        stored = store.load(datetime.now(UTC))
    finally:
        await follower.stop()
        store.close()

    assert snapshot.records == 6
    shown = {str(w.task.id): (w.task.spec.name, str(w.task.status)) for w in writes}
    assert shown == {a: ("a", "paused"), c: (f"invalid record {c}", "error")}
    assert {str(t.id): (t.spec.name, str(t.status)) for t in stored} == shown
    assert sum(snapshot.offsets[(topics.tasks, p)] for p in range(3)) == 6


def test_a_task_removed_under_another_spelling_of_its_key_leaves_the_written_view(
    kafka: KafkaTarget, topics: Topics, tmp_path: Path
) -> None:
    d, e = uuid.uuid4(), uuid.uuid4()
    snapshot = Snapshot()
    # The last record of each key, in the order read: one task written under its key in upper
    # case, then removed by a tombstone under the usual spelling.
    snapshot.last[str(d).upper().encode()] = (0, 0, record("d"))
    snapshot.last[str(e).encode()] = (0, 1, record("e"))
    snapshot.last[str(d).encode()] = (0, 2, None)
    store = SQLiteTaskStore(tmp_path / "tasks.sqlite3")
    follower = TaskTopicFollower(
        node_settings(kafka, topics, tmp_path, "cluster"), store, Scheduler(), names=NameClaims()
    )
    rebuild = store.rebuild_view()
    writes = follower.build_view(snapshot, {}, datetime.now(UTC), sink=rebuild)
    rebuild.finish({})
    stored = store.load(datetime.now(UTC))
    store.close()

    assert [w.task.id for w in writes] == [e]
    assert [t.id for t in stored] == [e]


def test_a_view_built_from_every_record_as_read_is_the_view_of_each_keys_last_record(
    kafka: KafkaTarget, topics: Topics, tmp_path: Path
) -> None:
    # The daemon builds the view from each batch as it is read, superseded records included;
    # what it makes must be what the last record of each key makes.
    a, b, c, d, e = (uuid.uuid4() for _ in range(5))
    read = [
        (str(a).encode(), record("a")),
        (str(b).encode(), record("b")),
        (str(a).encode(), record("a", status="paused")),
        (str(b).encode(), None),  # removed
        (str(c).upper().encode(), record("c")),  # another spelling of c's key
        (str(c).encode(), None),  # removes it
        (str(c).encode(), record("c again")),  # and it is made again
        (str(d).encode(), b'{"spec": 1}'),
        (str(d).encode(), record("d")),  # fixed
        (b"not-a-task-id", record("x")),
        (b"not-a-task-id", record("y")),
        (str(e).encode(), record("e")),
        (str(e).encode(), b"{"),  # broken
    ]
    records = [(key, n % 3, n, value) for n, (key, value) in enumerate(read)]
    snapshot = Snapshot()
    for key, partition, offset, value in records:
        snapshot.last.pop(key, None)
        snapshot.last[key] = (partition, offset, value)
    config = node_settings(kafka, topics, tmp_path, "cluster")
    now = datetime.now(UTC)
    views = []
    for name, build in (("as-read", True), ("last", False)):
        store = SQLiteTaskStore(tmp_path / f"{name}.sqlite3")
        follower = TaskTopicFollower(config, store, Scheduler(), names=NameClaims())
        rejected = materialiser.REJECTED._value.get()
        rebuild = store.rebuild_view()
        if build:
            builder = follower.view_builder({}, now, sink=rebuild)
            builder.add(records[:6])
            builder.add(records[6:])
            writes = builder.finish()
        else:
            writes = follower.build_view(snapshot, {}, now, sink=rebuild)
        rebuild.finish({})
        stored = store.load(now)
        store.close()
        made = {
            w.task.id: (w.task.spec.name, str(w.task.status), (w.partition, w.offset))
            for w in writes
        }
        rows = {t.id: (t.spec.name, str(t.status), t.status_reason) for t in stored}
        views.append((made, rows, materialiser.REJECTED._value.get() - rejected))

    assert views[0] == views[1]
    made, rows, rejected = views[0]
    assert {i: (name, status) for i, (name, status, _) in made.items()} == {
        a: ("a", "paused"),
        c: ("c again", "active"),
        d: ("d", "active"),
        e: (f"invalid record {e}", "error"),
    }
    assert made[c][2] == (0, 6)  # the record it was made from
    assert rows.keys() == made.keys()
    assert rejected == 1  # one key without a task id, counted once


async def test_a_missing_topic_is_said_at_once(
    kafka: KafkaTarget, topics: Topics, tmp_path: Path
) -> None:
    config = node_settings(kafka, topics, tmp_path, "cluster")
    config = config.model_copy(update={"kafka_task_names_topic": f"{topics.names}-missing"})
    store = SQLiteTaskStore(tmp_path / "tasks.sqlite3")
    follower = TaskTopicFollower(config, store, Scheduler(), names=NameClaims())
    try:
        with pytest.raises(TopicMissing, match="-missing does not exist"):
            await asyncio.to_thread(follower.read_everything)
    finally:
        await follower.stop()
        store.close()


async def test_a_single_mode_node_waiting_for_its_task_topic_keeps_the_loop_threads_free(
    kafka: KafkaTarget, topics: Topics, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Single mode starts without the task topic (or the broker) and tries again and again;
    # the loop's threads, which store writes, the outbox and the shutdown use, stay free.
    monkeypatch.setattr(materialiser, "RETRY_SECONDS", 0.01)
    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(max_workers=2))
    config = node_settings(kafka, topics, tmp_path, "single")
    config = config.model_copy(update={"kafka_tasks_topic": f"{topics.tasks}-missing"})
    store = SQLiteTaskStore(tmp_path / "tasks.sqlite3")
    follower = TaskTopicFollower(config, store, Scheduler(), names=NameClaims())
    await follower.start()
    try:
        await asyncio.sleep(1.0)  # dozens of tries at 10 ms
        free = await asyncio.wait_for(asyncio.to_thread(lambda: "free"), timeout=10)
        assert free == "free"
    finally:
        await asyncio.wait_for(follower.stop(), timeout=10)
        store.close()
    assert not follower.caught_up.is_set()


async def test_a_writer_waits_until_its_record_is_applied_and_a_failed_batch_comes_again(
    kafka: KafkaTarget, topics: Topics, tmp_path: Path
) -> None:
    store = FailingOnce(tmp_path / "tasks.sqlite3")
    scheduler = Scheduler()
    follower = TaskTopicFollower(
        node_settings(kafka, topics, tmp_path, "cluster"), store, scheduler, names=NameClaims()
    )
    try:
        await asyncio.to_thread(follower.read_everything)
        await follower.start()
        task_id = uuid.uuid4()
        spec = TaskSpec.model_validate(SPEC)
        produce(kafka, topics.tasks, str(task_id).encode(), record("shop"))
        await asyncio.wait_for(follower.caught_up.wait(), 30)

        def applied() -> bool:
            return store.get(task_id) is not None

        # The first write failed; the batch is read again and written.
        await asyncio.to_thread(wait_for, applied, "the task in the store", 30)
        assert store.failed
        stored = store.get(task_id)
        assert stored is not None
        assert stored.spec == spec
        assert scheduler.tasks[task_id].spec == spec
        partition, offset = store.record_position(task_id) or (-1, -1)
        await asyncio.wait_for(follower.applied(topics.tasks, partition, offset), 5)
    finally:
        await follower.stop()
        store.close()
