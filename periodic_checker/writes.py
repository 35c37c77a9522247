"""How the task service makes a change it has validated: the two modes' write paths.

- `LocalWrites` (single mode, the default): SQLite first, then the running scheduler, then the
  task topic (through the outbox when the broker is away). A change works without the broker.
- `TopicWrites` (cluster mode): the task topic first. The record is produced, its place awaited,
  then the wait is for this node's materialiser to apply it, so the answer comes from the view
  and a client reads its own write. Names stay unique across nodes through claims on the names
  topic (`names.py`). The broker away is `BrokerUnavailable`, and nothing changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from datetime import UTC, datetime
from typing import Protocol

from checker_common.task_record import encode
from periodic_checker.materialiser import TaskTopicFollower
from periodic_checker.names import NameClaims, claim_key, claim_value
from periodic_checker.scheduler import CheckScheduler
from periodic_checker.store import TaskStore
from periodic_checker.task_service import BrokerUnavailable, NameTaken, TooManyTasks, ViewBehind
from periodic_checker.task_topic import RecordProducer, RecordPublisher
from periodic_checker.task_view import record_of
from periodic_checker.tasks import Task

log = logging.getLogger(__name__)

# How long a change waits for its own node to apply it (cluster mode).
APPLY_TIMEOUT = 10.0
# How often a node looks for name claims whose task never came (`names.ORPHAN_AFTER`).
ORPHAN_SWEEP_EVERY = 60.0


class TaskWrites(Protocol):
    """Makes a validated change; returns the task as it now is."""

    async def insert(self, task: Task) -> Task:
        """Raises NameTaken, TooManyTasks or TaskExists."""
        ...

    async def replace(self, before: Task, task: Task) -> Task:
        """A new definition (and the state it brings); raises NameTaken."""
        ...

    async def save_state(self, task: Task) -> Task:
        """A new status (pause, resume), written at once."""
        ...

    async def delete(self, task_id: uuid.UUID) -> bool:
        """False when there is no such task."""
        ...


class LocalWrites:
    """Single mode: the store is the source of truth, and the topic hears of every change."""

    def __init__(
        self, store: TaskStore, scheduler: CheckScheduler, records: RecordPublisher | None = None
    ) -> None:
        self.store = store
        self.scheduler = scheduler
        self.records = records

    async def insert(self, task: Task) -> Task:
        self.store.insert(task)  # NameTaken, TooManyTasks, TaskExists
        self.scheduler.add(task)
        if self.records is not None:
            self.records.publish(task)
        return task

    async def replace(self, before: Task, task: Task) -> Task:
        self.store.replace(task)  # NameTaken
        self.scheduler.replace(task)
        if self.records is not None:
            self.records.publish(task)
        return task

    async def save_state(self, task: Task) -> Task:
        # A user's pause or resume is written at once, not with the batched check states.
        self.store.save_states([task])
        self.scheduler.replace(task)
        if self.records is not None:
            self.records.publish(task)
        return task

    async def delete(self, task_id: uuid.UUID) -> bool:
        # The removal is remembered with it until its tombstone is safe: a crash in between
        # publishes the tombstone at the next start.
        if not self.store.delete(task_id, remember=self.records is not None):
            return False
        self.scheduler.remove(task_id)
        if self.records is not None:
            self.records.remove(task_id)
        return True


class TopicWrites:
    """Cluster mode: the task topic is the source of truth (see the module doc)."""

    def __init__(
        self,
        producer: RecordProducer,
        follower: TaskTopicFollower,
        names: NameClaims,
        store: TaskStore,
        scheduler: CheckScheduler,
        *,
        node_id: str,
        tasks_topic: str,
        names_topic: str,
        max_tasks: int,
        apply_timeout: float = APPLY_TIMEOUT,
    ) -> None:
        self.producer = producer
        self.follower = follower
        self.names = names
        self.store = store
        self.scheduler = scheduler
        self.node_id = node_id
        self.tasks_topic = tasks_topic
        self.names_topic = names_topic
        self.max_tasks = max_tasks
        self.apply_timeout = apply_timeout
        self._stop = asyncio.Event()
        self._sweeper: asyncio.Task[None] | None = None

    async def insert(self, task: Task) -> Task:
        name = task.spec.name
        if self._named(name, task.id):  # the fast answer; the claim decides a race
            raise NameTaken(f"a task named {name!r} already exists")
        if len(self.scheduler.tasks) >= self.max_tasks:
            raise TooManyTasks(f"the checker holds its maximum of {self.max_tasks} tasks")
        await self._claim(name, task.id)
        try:
            await self._write(task)
        except BrokerUnavailable:
            await self._release(name, task.id)
            raise
        return self.scheduler.tasks.get(task.id, task)

    async def replace(self, before: Task, task: Task) -> Task:
        old, new = before.spec.name, task.spec.name
        if new != old:
            if self._named(new, task.id):
                raise NameTaken(f"a task named {new!r} already exists")
            await self._claim(new, task.id)  # the new name first, the old one after
        await self._write(task)
        if new != old:
            await self._release(old, task.id)
        return self.scheduler.tasks.get(task.id, task)

    async def save_state(self, task: Task) -> Task:
        await self._write(task)
        return self.scheduler.tasks.get(task.id, task)

    async def delete(self, task_id: uuid.UUID) -> bool:
        current = self.scheduler.tasks.get(task_id)
        if current is None:
            return False
        await self._produce_and_apply(self.tasks_topic, str(task_id).encode(), None)
        await self._release(current.spec.name, task_id)
        return True

    # -- records ---------------------------------------------------------------------------------

    async def _write(self, task: Task) -> None:
        key, value = encode(record_of(task, self.node_id))
        await self._produce_and_apply(self.tasks_topic, key, value)

    async def _produce_and_apply(self, topic: str, key: bytes, value: bytes | None) -> int:
        """Produce, then wait until this node applied the record; its offset."""
        partition, offset = await self.producer.produce(topic, key, value)
        try:
            async with asyncio.timeout(self.apply_timeout):
                await self.follower.applied(topic, partition, offset)
        except TimeoutError:
            raise ViewBehind(
                f"the change is on the task topic (partition {partition}, offset {offset}) but"
                f" this node has not applied it within {self.apply_timeout:g} s; it will"
            ) from None
        return offset

    # -- names -----------------------------------------------------------------------------------

    def _named(self, name: str, task_id: uuid.UUID) -> bool:
        return any(other != task_id for other in self.store.named(name))

    async def _claim(self, name: str, task_id: uuid.UUID) -> None:
        """Claim the name for the task; NameTaken when another task's claim came first."""
        key = claim_key(name, task_id)
        offset = await self._produce_and_apply(
            self.names_topic, key, claim_value(name, task_id, datetime.now(UTC))
        )
        won = self.names.won(name, task_id, offset)
        log.info(
            "name %r claimed for task %s at offset %d: %s",
            name, task_id, offset, "won" if won else "lost",
            extra={"task_id": str(task_id)},
        )  # fmt: skip
        if not won:
            # A lost claim holds nothing; its tombstone only keeps the compacted topic small.
            with contextlib.suppress(BrokerUnavailable):
                await self.producer.produce(self.names_topic, key, None)
            raise NameTaken(f"a task named {name!r} already exists")

    async def _release(self, name: str, task_id: uuid.UUID) -> None:
        """Give the name up (best effort: a claim left behind is released as an orphan)."""
        try:
            await self.producer.produce(self.names_topic, claim_key(name, task_id), None)
        except BrokerUnavailable as exc:
            log.warning("name %r of task %s not released yet: %s", name, task_id, exc)

    async def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep_orphans(), name="name-orphans")

    async def stop(self) -> None:
        self._stop.set()
        if self._sweeper is not None:
            await self._sweeper

    async def _sweep_orphans(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), ORPHAN_SWEEP_EVERY)
            if self._stop.is_set():
                return
            if not self.follower.caught_up.is_set():
                continue  # the claims read so far are not all there are (read after READY)
            names_of = {task.id: task.spec.name for task in self.scheduler.tasks.values()}
            for name, task_id in self.names.orphans(names_of, time.time()):
                log.info("releasing name %r: its task %s never came or is gone", name, task_id)
                await self._release(name, task_id)
