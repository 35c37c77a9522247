"""The run state of tasks as it travels between cluster nodes: the state topic.

A compacted topic (KAFKA_TASK_STATE_TOPIC), one record per task (key = the task id), written
by the node that runs the task, read whole by every node (`TaskStates`), so that a node given a
task has its state at hand: health, failures in a row, runs (for `end_after_runs`), the last
run, and the last slot run (docs/ownership.md).

- `released`: written by a node that gives a task up cleanly (a rebalance, SIGTERM) after its
  last check ended; the next owner continues with the slot after `last_slot`.
- `running`: written by a node when it takes a task and every CHECKER_STATE_SNAPSHOT_INTERVAL
  while its state changes; a next owner that finds this (the node died or was cut off) starts
  at the first slot after its assignment, except a node back from a cut itself: it waits
  (bounded) for the holder's release (`TaskStates.await_release`, docs/ownership.md).

Fences: before a node acts on a new assignment it appends a fence record (key `fence:<node>`)
to every partition and reads up to it, so every release written before the rebalance is known.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Collection, Sequence
from datetime import datetime
from enum import StrEnum
from typing import Any, Protocol

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition
from pydantic import BaseModel, ConfigDict, ValidationError

from checker_common.contract import Health
from checker_common.kafka import client_config
from periodic_checker.settings import CheckerSettings
from periodic_checker.tasks import Task

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
FENCE_PREFIX = b"fence:"
BATCH = 1000
POLL_SECONDS = 0.25
RETRY_SECONDS = 2.0
ERROR_LOG_EVERY = 60.0


class StateKind(StrEnum):
    RELEASED = "released"  # given up cleanly: continue after last_slot
    RUNNING = "running"  # a node runs it (taken, or a snapshot)


class TaskState(BaseModel):
    """One record of the state topic."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    schema_version: int = SCHEMA_VERSION
    task_id: uuid.UUID
    kind: StateKind
    node: str
    at: datetime
    health: Health
    failures_in_a_row: int
    runs: int
    manual_runs: int
    last_run_at: datetime | None = None
    last_slot: float | None = None  # epoch seconds of the latest slot run (or skipped)
    # (partition, offset) of the task record this state was measured under.
    record: tuple[int, int] | None = None


def state_of(
    task: Task,
    kind: StateKind,
    *,
    node: str,
    at: datetime,
    last_slot: float | None,
    record: tuple[int, int] | None,
) -> TaskState:
    return TaskState(
        task_id=task.id,
        kind=kind,
        node=node,
        at=at,
        health=task.health,
        failures_in_a_row=task.failures_in_a_row,
        runs=task.runs,
        manual_runs=task.manual_runs,
        last_run_at=task.last_run_at,
        last_slot=last_slot,
        record=record,
    )


def with_state(task: Task, state: TaskState, record: tuple[int, int] | None) -> Task:
    """The task with the state another node measured (pure). Health and failures in a row
    come along only when measured under the task record the task now has: a record changed
    since may check something else (its health then is the view's)."""
    update: dict[str, Any] = {
        "runs": max(task.runs, state.runs),
        "manual_runs": max(task.manual_runs, state.manual_runs),
        "last_run_at": state.last_run_at or task.last_run_at,
    }
    if state.record is not None and state.record == record:
        update.update(health=state.health, failures_in_a_row=state.failures_in_a_row)
    return task.model_copy(update=update)


def held_elsewhere(state: TaskState | None, node: str) -> bool:
    """Whether a task's latest state says another node than `node` runs it (its `running`
    record), so it is not `node`'s to release (pure)."""
    return state is not None and state.kind is StateKind.RUNNING and state.node != node


def unreleased(state: TaskState | None, node: str) -> bool:
    """Whether a node back from a cut, given a task, waits for its release (pure): another
    node's `running` record, or no record at all (a task added since its holder's take has
    none until a snapshot; that holder releases it too)."""
    return state is None or held_elsewhere(state, node)


def runs_here(state: TaskState | None, node: str) -> bool:
    """Whether a task's latest state is `node`'s own `running` record (pure): what a later
    owner must find while `node` runs the task (not an older release to continue after)."""
    return state is not None and state.kind is StateKind.RUNNING and state.node == node


def encode_state(state: TaskState) -> tuple[bytes, bytes]:
    return str(state.task_id).encode(), state.model_dump_json().encode()


def decode_state(key: bytes | None, value: bytes | None) -> TaskState | None:
    """The state a record holds; None for a fence, a tombstone or a record that does not read
    (a state is a help, never a reason to stop)."""
    if key is None or value is None or key.startswith(FENCE_PREFIX):
        return None
    try:
        state = TaskState.model_validate_json(value)
    except ValidationError:
        return None
    return state if str(state.task_id).encode() == key else None


class StateTopicMissing(Exception):
    """The state topic does not exist on the broker."""


class Producing(Protocol):
    """`task_topic.RecordProducer`."""

    async def produce(
        self, topic: str, key: bytes, value: bytes | None, partition: int | None = None
    ) -> tuple[int, int]: ...

    async def produce_all(
        self, topic: str, records: Sequence[tuple[bytes, bytes | None]]
    ) -> int: ...


class TaskStates:
    """Every task's latest state, read from the state topic (the whole topic, then live)."""

    def __init__(self, settings: CheckerSettings) -> None:
        self.settings = settings
        self.topic = settings.kafka_task_state_topic
        self.node_id = settings.checker_node_id
        self.latest: dict[uuid.UUID, TaskState] = {}
        self.read = 0
        self._fresh: set[uuid.UUID] = set()  # read since the last `take_fresh`
        self._consumer: Any = None
        self._partitions: list[int] = []
        self._next: dict[int, int] = {}
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._stopping = asyncio.Event()
        # Set (and replaced) whenever states were read: what `await_release` waits on.
        self._news = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._logged_error_at = -ERROR_LOG_EVERY

    def _config(self) -> dict[str, Any]:
        config = client_config(self.settings, client_id="periodic-checker-state")
        config.update(
            {
                "group.id": f"periodic-checker-state-{self.node_id}-{uuid.uuid4().hex[:12]}",
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "auto.offset.reset": "earliest",
                "fetch.queue.backoff.ms": 10,
                # A node waits for its fences to be read back at every assignment.
                "fetch.wait.max.ms": 25,
            }
        )
        return config

    async def start(self, *, follow: bool = True) -> None:
        """Learn the topic's partitions and follow them from the beginning (`follow`: at once,
        else from `follow()` on); StateTopicMissing when the topic does not exist. Waits while
        the broker does not answer, until `interrupt` (then returns, following nothing)."""
        self._consumer = Consumer(self._config())
        warned = False
        while True:
            try:
                metadata = await asyncio.to_thread(self._consumer.list_topics, None, 5.0)
                break
            except Exception as exc:
                if not warned:
                    log.warning("waiting for the broker to read the state topic: %s", exc)
                    warned = True
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), RETRY_SECONDS)
            if self._stopping.is_set():
                return
        found = metadata.topics.get(self.topic)
        if found is None or found.error is not None or not found.partitions:
            raise StateTopicMissing(f"topic {self.topic} does not exist on the broker")
        self._partitions = sorted(found.partitions)
        if follow:
            self.follow()

    def follow(self) -> None:
        """Read the topic from here on (a cluster node: once it serves, as the names topic;
        only a handover's fences and the mirror of other nodes' tasks need the states, and
        both wait for them). The partitions are assigned here, not at `start`: an assigned
        consumer fetches at once whether it is read or not, and a node fetching 100,000
        state records while it starts is slower to READY."""
        if self._runner is None:
            self._consumer.assign(
                [TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in self._partitions]
            )
            self._runner = asyncio.create_task(self._run(), name="state-topic")

    def interrupt(self) -> None:
        """Stop waiting for the broker in `start` (its metadata request in flight, at most
        5 s, still ends): then `stop`, once `start` returned."""
        self._stopping.set()

    async def stop(self) -> None:
        self._stopping.set()
        if self._runner is not None:
            await self._runner
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await asyncio.to_thread(consumer.close)
        for _, _, waiter in self._waiters:
            waiter.cancel()
        self._waiters.clear()

    async def fence(self, producer: Producing) -> None:
        """Return once every record appended to the topic before this call has been read.
        BrokerUnavailable when a fence cannot be written."""
        key = FENCE_PREFIX + self.node_id.encode()
        landed = await asyncio.gather(
            *(producer.produce(self.topic, key, b"{}", partition=p) for p in self._partitions)
        )
        for partition, offset in landed:
            await self._reached(partition, offset)

    async def await_release(
        self, task_ids: Collection[uuid.UUID], within: float
    ) -> list[uuid.UUID]:
        """Wait until every task of `task_ids` has a state record that is not another node's
        `running` (`unreleased`: its holder released it), for at most `within` seconds; the
        ids still waiting then."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            held = [i for i in task_ids if unreleased(self.latest.get(i), self.node_id)]
            left = deadline - loop.time()
            if not held or left <= 0:
                return held
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._news.wait(), left)

    async def _reached(self, partition: int, offset: int) -> None:
        if self._next.get(partition, 0) > offset:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((partition, offset, waiter))
        await waiter

    async def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                messages = await asyncio.to_thread(self._next_batch)
            except Exception:
                log.exception("reading the state topic failed; retrying")
                await asyncio.sleep(RETRY_SECONDS)
                continue
            self._apply(messages)

    def _next_batch(self) -> list[Any]:
        first = self._consumer.poll(POLL_SECONDS)
        if first is None:
            return []
        return [first, *self._consumer.consume(BATCH - 1, 0)]

    def _apply(self, messages: list[Any]) -> None:
        for message in messages:
            error = message.error()
            if error is not None:
                if error.code() != KafkaError._PARTITION_EOF:
                    self._log_error(error)
                continue
            partition = message.partition()
            self._next[partition] = message.offset() + 1
            key = message.key()
            state = decode_state(key, message.value())
            if state is not None:
                self.latest[state.task_id] = state
                self._fresh.add(state.task_id)
                self.read += 1
            elif message.value() is None and key is not None:
                with contextlib.suppress(ValueError):
                    self.latest.pop(uuid.UUID(key.decode(errors="replace")), None)
        if messages:
            news, self._news = self._news, asyncio.Event()
            news.set()
        still = []
        for partition, offset, waiter in self._waiters:
            if waiter.done():
                continue
            if self._next.get(partition, 0) > offset:
                waiter.set_result(None)
            else:
                still.append((partition, offset, waiter))
        self._waiters = still

    def take_fresh(self) -> set[uuid.UUID]:
        """The tasks whose state was read since the last call (`state_mirror`)."""
        fresh, self._fresh = self._fresh, set()
        return fresh

    def _log_error(self, error: KafkaError) -> None:
        now = time.monotonic()
        if now - self._logged_error_at >= ERROR_LOG_EVERY:
            self._logged_error_at = now
            log.warning("reading the state topic: %s", error.str())
