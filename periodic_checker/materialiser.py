"""Follows the task topic into the checker's SQLite store and its scheduler (the materialiser).

One consumer of its own (`assign()` of every partition, a `group.id` used by nobody else,
nothing committed: where reading resumes is the store's business) reads the task topic and, in
cluster mode, the names topic. Each batch of records is applied in one SQLite transaction with
the offsets reached, then to the scheduler through the calls the API uses (add, replace,
remove): the scheduler does not know where its tasks come from. What each record does is
decided in `task_view` (pure); this module does the I/O around it.

- Single mode (the store is the source of truth): reading resumes from the offsets saved in the
  store. A record this checker wrote (`origin` = CHECKER_NODE_ID) is an echo and changes
  nothing; another program's record is applied unless one of this checker's own records of the
  task lands after it (pending, or known to have landed later): then that one is the topic's
  last word, as it is SQLite's. Where the store ends up differing from what the topic's last
  record says, the task is published again (`task_view.republish_after_*`).
- Cluster mode (the topic is the source of truth): at start every partition of the task topic
  is read from the beginning to its end (`read_everything`, partition EOF), the store is made
  exactly that, and only then is the node ready; after that every record is applied in offset
  order, its own included. `applied()` lets a writer wait until its own record is part of the
  view. The names topic is read from its beginning once the node serves (`start`): only writes
  use the claims, and each waits until its own claim is read, so the claims every task created
  through the API left (one each) do not hold up READY.

A record that does not validate becomes a task in status `error` with the reason; one with no
usable id is counted (`periodic_checker_task_records_rejected_total`) and logged, and reading
goes on.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition
from prometheus_client import Counter

from checker_common.kafka import client_config
from checker_common.task_record import (
    Decoded,
    InvalidTask,
    TaskChange,
    TaskRemoved,
    UnusableRecord,
    decode,
)
from checker_common.task_spec import TaskStatus
from periodic_checker.names import NameClaims
from periodic_checker.settings import CheckerMode, CheckerSettings
from periodic_checker.store import RuntimeState, ViewBatch, ViewWrite
from periodic_checker.task_view import (
    INVALID_RECORD,
    NOTHING_REFUSED,
    Action,
    Refusals,
    action_for,
    applied,
    judged,
    republish_after_echo,
    republish_after_foreign,
    says_the_same,
    with_runtime,
)
from periodic_checker.tasks import Task

log = logging.getLogger(__name__)

REJECTED = Counter(
    "periodic_checker_task_records_rejected",
    "Records of the task topic with no usable task id (no key, or a key that is not a UUID):"
    " not a task; each is logged with its partition and offset",
)
APPLIED = Counter(
    "periodic_checker_task_records_applied",
    "Records of the task topic applied to this checker's tasks (in single mode, those of other"
    " programs)",
)
BATCH = 1000
# Tasks of a view being built handed to the store at a time (`build_view`).
VIEW_CHUNK = 1000
POLL_SECONDS = 0.25
# Between attempts to learn the topic's partitions while the broker is away (single mode).
RETRY_SECONDS = 5.0
ERROR_LOG_EVERY = 60.0


class FollowerError(Exception):
    """The task topic cannot be followed now (the broker does not answer)."""


class TopicMissing(FollowerError):
    """A topic to follow does not exist on the broker."""


class ViewSink(Protocol):
    """Where a view being built goes as it is made (`store.ViewRebuild`)."""

    def add(self, writes: Sequence[ViewWrite]) -> None: ...

    def remove(self, task_ids: Sequence[uuid.UUID]) -> None: ...


class ViewStore(Protocol):
    """What the materialiser needs of the store (`store.SQLiteTaskStore`)."""

    max_tasks: int

    def apply(self, batch: ViewBatch) -> None: ...

    def topic_offsets(self, topic: str) -> dict[int, int]: ...

    def positions(self) -> dict[uuid.UUID, tuple[int, int]]: ...

    def named(self, name: str) -> list[uuid.UUID]: ...

    def count(self) -> int: ...


class ViewScheduler(Protocol):
    """The scheduler's calls for live changes (`scheduler.CheckScheduler`)."""

    @property
    def tasks(self) -> dict[uuid.UUID, Task]: ...

    def add(self, task: Task) -> None: ...

    def replace(self, task: Task) -> None: ...

    def remove(self, task_id: uuid.UUID) -> None: ...


class OwnRecords(Protocol):
    """This checker's own records (`task_topic.RecordPublisher`), for single mode."""

    own_positions: dict[uuid.UUID, tuple[int, int]]

    def pending(self, task_id: uuid.UUID) -> bool: ...

    def publish(self, task: Task) -> None: ...

    def remove(self, task_id: uuid.UUID) -> None: ...


class HostPolicy(Protocol):
    def check_url(self, url: str) -> str | None: ...


# A task-topic record as read: key, partition, offset, value.
TaskRecordRead = tuple[bytes, int, int, bytes | None]
RecordSink = Callable[[list[TaskRecordRead]], None]


@dataclass
class Snapshot:
    """The whole task topic as read at start: the last record of each key (unless they went to
    a `ViewBuilder` as they were read), the records without a key, and where the reading
    ended."""

    last: dict[bytes, tuple[int, int, bytes | None]] = field(default_factory=dict)
    unusable: list[tuple[int, int, str]] = field(default_factory=list)  # partition, offset, why
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    records: int = 0


@dataclass
class FollowerStats:
    applied: int = 0
    rejected: int = 0
    echoes: int = 0  # own records read back (single mode)
    superseded: int = 0  # records of others a later own record overrides (single mode)
    republished: int = 0


class TaskTopicFollower:
    """Reads the task topic into the store and the scheduler (see the module doc)."""

    def __init__(
        self,
        settings: CheckerSettings,
        store: ViewStore,
        scheduler: ViewScheduler,
        *,
        policy: HostPolicy | None = None,
        own: OwnRecords | None = None,
        names: NameClaims | None = None,
    ) -> None:
        self.settings = settings
        self.mode = settings.checker_mode
        self.node_id = settings.checker_node_id
        self.topic = settings.kafka_tasks_topic
        self.names_topic = settings.kafka_task_names_topic if names is not None else None
        self.store = store
        self.scheduler = scheduler
        self.policy = policy
        self.own = own
        self.names = names
        self.stats = FollowerStats()
        self.caught_up = asyncio.Event()
        self._consumer: Any = None
        self._stopping = threading.Event()
        self._runner: asyncio.Task[None] | None = None
        self._positions: dict[uuid.UUID, tuple[int, int]] = {}
        # (topic, partition) -> next offset to apply: everything before it is in the view.
        self._next: dict[tuple[str, int], int] = {}
        self._partitions: set[tuple[str, int]] = set()
        self._eof: set[tuple[str, int]] = set()
        self._waiters: list[tuple[tuple[str, int], int, asyncio.Future[None]]] = []
        self._logged_error_at = -ERROR_LOG_EVERY

    # -- the consumer ----------------------------------------------------------------------------

    def consumer_config(self) -> dict[str, Any]:
        config = client_config(self.settings, client_id="periodic-checker-view")
        config.update(
            {
                # assign() needs a group id; one nobody else uses, and nothing committed.
                "group.id": f"periodic-checker-view-{self.node_id}-{uuid.uuid4().hex[:12]}",
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "auto.offset.reset": "earliest",
                # "Caught up" is partition EOF; the local broker's watermarks cannot tell.
                "enable.partition.eof": True,
                # Without it the consumer waits up to a second between fetches (local broker).
                "fetch.queue.backoff.ms": 10,
                # A write through the API waits until its claim and its record are read back.
                # A real Kafka answers a fetch as soon as a record arrives; the local broker
                # waits out this whole time, so it bounds the answer time there
                # (bench/task_topic.py visibility). Shorter costs an idle node more fetches.
                "fetch.wait.max.ms": 25,
            }
        )
        return config

    def _open(self, timeout: float) -> None:
        """Create the consumer and learn the partitions; FollowerError when it cannot."""
        if self._consumer is None:
            self._consumer = Consumer(self.consumer_config())
        topics = [self.topic] + ([self.names_topic] if self.names_topic else [])
        try:
            metadata = self._consumer.list_topics(timeout=timeout)
        except Exception as exc:
            raise FollowerError(f"the broker did not answer: {exc}") from None
        partitions: set[tuple[str, int]] = set()
        for topic in topics:
            found = metadata.topics.get(topic)
            if found is None or found.error is not None or not found.partitions:
                raise TopicMissing(f"topic {topic} does not exist on the broker")
            partitions.update((topic, p) for p in found.partitions)
        self._partitions = partitions

    def _assign(
        self, offsets: dict[tuple[str, int], int], topic: str | None = None, *, add: bool = False
    ) -> None:
        """Read the partitions (of `topic` only, if given) from `offsets`, else the beginning;
        `add`: beside those assigned already."""
        chosen = sorted(key for key in self._partitions if topic is None or key[0] == topic)
        partitions = [
            TopicPartition(t, p, offsets.get((t, p), OFFSET_BEGINNING)) for t, p in chosen
        ]
        if add:
            self._consumer.incremental_assign(partitions)
        else:
            self._consumer.assign(partitions)
        for key in chosen:
            self._next.setdefault(key, offsets.get(key, 0))

    # -- cluster mode: the whole topic at start -----------------------------------------------

    def interrupt(self) -> None:
        """Make `read_everything` give up (from another thread)."""
        self._stopping.set()

    def read_everything(self, on_records: RecordSink | None = None) -> Snapshot:
        """Read every partition of the task topic from the beginning to its end (blocking: run
        it in a thread). The names topic is not read here but from `start` on: 100,000 claims
        cost a node 0.7-1.1 s of its start (`bench/task_topic.py startup --claims`). Waits
        for a broker that does not answer (saying so); TopicMissing when a topic (the names
        topic too) does not exist.

        The task records go to `on_records` as they are read, a batch at a time and in the
        order read (the view is built from them meanwhile, `ViewBuilder`); without it, the
        snapshot keeps the last record of each key."""
        waiting_since = time.monotonic()
        while True:
            try:
                self._open(timeout=5.0)
                break
            except TopicMissing:
                raise
            except FollowerError as exc:
                if self._stopping.is_set():
                    raise
                if time.monotonic() - waiting_since >= RETRY_SECONDS * 6:
                    log.warning("waiting for the broker to read the task topic: %s", exc)
                    waiting_since = time.monotonic()
                self._stopping.wait(1.0)
        self._assign({}, topic=self.topic)
        snapshot = Snapshot()
        remaining = {key for key in self._partitions if key[0] == self.topic}
        last = snapshot.last
        while remaining and not self._stopping.is_set():
            batch: list[TaskRecordRead] = []
            for message in self._consumer.consume(BATCH, POLL_SECONDS):
                error = message.error()
                topic, partition = message.topic(), message.partition()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        remaining.discard((topic, partition))
                        self._eof.add((topic, partition))
                        snapshot.offsets.setdefault((topic, partition), message.offset())
                    else:
                        self._log_error(error)
                    continue
                offset = message.offset()
                snapshot.offsets[(topic, partition)] = offset + 1
                snapshot.records += 1
                key = message.key()
                if key is None:
                    snapshot.unusable.append(
                        (partition, offset, "record has no key (the key must be the task id)")
                    )
                elif on_records is not None:
                    batch.append((key, partition, offset, message.value()))
                else:
                    last.pop(key, None)  # keeps the dict in order of each key's last record
                    last[key] = (partition, offset, message.value())
            if batch and on_records is not None:
                on_records(batch)
        if remaining:
            raise FollowerError("stopped before the task topic was read")
        for key, next_offset in snapshot.offsets.items():
            self._next[key] = next_offset
        return snapshot

    def view_builder(
        self, runtime: dict[uuid.UUID, RuntimeState], now: datetime, sink: ViewSink | None = None
    ) -> ViewBuilder:
        """A view to build from task records given in the order read (`ViewBuilder`)."""
        return ViewBuilder(self, runtime, now, sink)

    def build_view(
        self,
        snapshot: Snapshot,
        runtime: dict[uuid.UUID, RuntimeState],
        now: datetime,
        sink: ViewSink | None = None,
    ) -> list[ViewWrite]:
        """The tasks the snapshot holds, with the state this node kept of each (pure but for
        the metric and log lines of the records it rejects). With a `sink`, they are also
        handed to it a chunk at a time as they are made (the store writes them meanwhile)."""
        builder = self.view_builder(runtime, now, sink)
        builder.add(
            (key, partition, offset, value)
            for key, (partition, offset, value) in snapshot.last.items()
        )
        return builder.finish(snapshot.unusable)

    # -- live --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Follow the topic from where the view is (cluster: after `read_everything`; single:
        the offsets saved in the store) until `stop()`."""
        if self._consumer is None:
            self._positions = await asyncio.to_thread(self.store.positions)
        else:
            if self.names_topic is not None:
                # Cluster mode: the names topic, from its beginning, beside the task topic.
                self._assign({}, topic=self.names_topic, add=True)
            if self._partitions and self._eof >= self._partitions:
                self.caught_up.set()  # read to the end at start (no names topic)
        self._runner = asyncio.create_task(self._run(), name="task-topic")

    async def stop(self) -> None:
        self._stopping.set()
        if self._runner is not None:
            await self._runner
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await asyncio.to_thread(consumer.close)
        for _, _, waiter in self._waiters:
            if not waiter.done():
                waiter.cancel()
        self._waiters.clear()

    def partition_of(self, task_id: uuid.UUID) -> int | None:
        """The task topic's partition the task's last record is in (cluster mode: which node
        owns the task), None when not known."""
        where = self._positions.get(task_id)
        return None if where is None else where[0]

    def position_of(self, task_id: uuid.UUID) -> tuple[int, int] | None:
        """(partition, offset) of the task's last record, None when not known."""
        return self._positions.get(task_id)

    async def applied(self, topic: str, partition: int, offset: int) -> None:
        """Return once the record at (topic, partition, offset) is part of the view."""
        key = (topic, partition)
        if self._next.get(key, 0) > offset:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((key, offset, waiter))
        try:
            await waiter
        finally:
            if not waiter.done():
                waiter.cancel()

    async def _run(self) -> None:
        if not self._partitions:
            await self._open_for_single_mode()
        while not self._stopping.is_set():
            try:
                messages = await asyncio.to_thread(self._next_batch)
            except Exception:
                log.exception("reading the task topic failed; retrying")
                await asyncio.sleep(RETRY_SECONDS)
                continue
            if messages:
                try:
                    await self._apply(messages)
                except Exception:
                    # Not written (SQLite trouble): read the batch's task records again, later.
                    # What reached the scheduler meanwhile comes again the same; the name
                    # claims, kept in memory only, were applied and are not read twice.
                    log.exception(
                        "applying %d task records failed; retrying in %.0f s",
                        len(messages), RETRY_SECONDS,
                    )  # fmt: skip
                    await asyncio.to_thread(self._rewind, messages)
                    await asyncio.sleep(RETRY_SECONDS)

    def _rewind(self, messages: list[Any]) -> None:
        """Seek each task-topic partition back to the first record of `messages` in it."""
        first: dict[int, int] = {}
        for message in messages:
            if message.error() is None and message.topic() == self.topic:
                first.setdefault(message.partition(), message.offset())
        for partition, offset in first.items():
            self._consumer.seek(TopicPartition(self.topic, partition, offset))

    def _next_batch(self) -> list[Any]:
        """The records there are, once there is one (`consume()` alone would wait for a full
        batch or its whole time-out, and every write through the API waits for this)."""
        first = self._consumer.poll(POLL_SECONDS)
        if first is None:
            return []
        return [first, *self._consumer.consume(BATCH - 1, 0)]

    async def _open_for_single_mode(self) -> None:
        """The partitions, once the broker answers (single mode starts without it)."""
        offsets = {
            (self.topic, p): n
            for p, n in (await asyncio.to_thread(self.store.topic_offsets, self.topic)).items()
        }
        warned = False
        while not self._stopping.is_set():
            try:
                await asyncio.to_thread(self._open, 5.0)
                break
            except FollowerError as exc:
                if not warned:
                    log.warning("cannot follow the task topic yet (%s); retrying", exc)
                    warned = True
                # The wait ends by itself: a thread of the loop's executor left waiting at
                # each try would fill it within a minute and wedge every other thread call
                # (store writes, the outbox, the shutdown).
                await asyncio.to_thread(self._stopping.wait, RETRY_SECONDS)
        else:
            return
        self._assign(offsets)
        log.info("following task topic %s from the saved offsets", self.topic)

    async def _apply(self, messages: Iterable[Any]) -> None:
        now = datetime.now(UTC)
        batch = ViewBatch()
        writes: dict[uuid.UUID, ViewWrite | None] = {}  # None: removed
        echoed: set[uuid.UUID] = set()
        republish: dict[uuid.UUID, Task | None] = {}
        for message in messages:
            error = message.error()
            topic, partition = message.topic(), message.partition()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    self._eof.add((topic, partition))
                else:
                    self._log_error(error)
                continue
            offset = message.offset()
            batch.offsets[(topic, partition)] = offset + 1
            if topic == self.names_topic and self.names is not None:
                self.names.apply(offset, message.key(), message.value(), now.timestamp())
                continue
            self._apply_one(
                partition, offset, message.key(), message.value(), now, writes, echoed, republish
            )
        for task_id, write in writes.items():
            if write is None:
                batch.removals.append(task_id)
            else:
                position = self._positions.get(task_id, (write.partition, write.offset))
                batch.upserts.append(
                    ViewWrite(write.task, write.published, position[0], position[1])
                )
        batch.positions = [
            (task_id, *self._positions[task_id])
            for task_id in echoed
            if task_id not in writes and task_id in self._positions
        ]
        await asyncio.to_thread(self.store.apply, batch)
        for key, next_offset in batch.offsets.items():
            self._next[key] = max(self._next.get(key, 0), next_offset)
        self._wake_waiters()
        if self.own is not None:
            for task_id, task in republish.items():
                self.stats.republished += 1
                if task is None:
                    self.own.remove(task_id)
                else:
                    self.own.publish(task)
        if not self.caught_up.is_set() and self._partitions and self._eof >= self._partitions:
            self.caught_up.set()

    def _apply_one(
        self,
        partition: int,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        now: datetime,
        writes: dict[uuid.UUID, ViewWrite | None],
        echoed: set[uuid.UUID],
        republish: dict[uuid.UUID, Task | None],
    ) -> None:
        decoded = decode(key, value)
        if isinstance(decoded, UnusableRecord):
            self._reject(partition, offset, decoded.reason)
            return
        task_id = decoded.task_id
        current = self.scheduler.tasks.get(task_id)
        single = self.mode is CheckerMode.SINGLE
        own = self.own
        later = pending = False
        if single and own is not None:
            later = _later(own.own_positions.get(task_id), partition, offset) or _later(
                self._positions.get(task_id), partition, offset
            )
            pending = own.pending(task_id)
        action = action_for(
            cluster=not single,
            own=_origin(decoded) == self.node_id,
            own_pending=pending,
            own_later=later,
        )
        if action is Action.ECHO:
            self.stats.echoes += 1
            if current is not None and not later:
                self._positions[task_id] = (partition, offset)
                echoed.add(task_id)
            echo_at = decoded.record.updated_at if isinstance(decoded, TaskChange) else None
            if republish_after_echo(echo_at, current, own_pending=pending, own_later=later):
                republish[task_id] = current
            return
        if action is Action.SUPERSEDED:
            self.stats.superseded += 1
            return
        self.stats.applied += 1
        APPLIED.inc()
        if isinstance(decoded, TaskRemoved):
            self._positions.pop(task_id, None)
            if current is not None or writes.get(task_id) is not None:
                self.scheduler.remove(task_id)
                writes[task_id] = None
                log.info(
                    "task %s removed by the task topic (partition %d, offset %d)",
                    task_id, partition, offset, extra={"task_id": str(task_id)},
                )  # fmt: skip
            return
        task = applied(decoded, current, now)
        task = judged(task, self._refusals(task, current, single=single, writes=writes), now)
        as_recorded = isinstance(decoded, InvalidTask) or says_the_same(task, decoded.record)
        # Known before the scheduler hears of the task: its partition says which node runs it.
        self._positions[task_id] = (partition, offset)
        if current is None:
            self.scheduler.add(task)
        else:
            self.scheduler.replace(task)
        writes[task_id] = ViewWrite(task, as_recorded, partition, offset)
        if single and republish_after_foreign(
            own_pending=pending, own_later=later, as_recorded=as_recorded
        ):
            republish[task_id] = task
        log.info(
            "task %s %s from the task topic (partition %d, offset %d): %s",
            task_id, "created" if current is None else "changed", partition, offset, task.status,
            extra={"task_id": str(task_id)},
        )  # fmt: skip

    def _refusals(
        self,
        task: Task,
        current: Task | None,
        *,
        single: bool,
        writes: dict[uuid.UUID, ViewWrite | None] | None = None,
    ) -> Refusals:
        if task.status is TaskStatus.ERROR and (task.status_reason or "").startswith(
            INVALID_RECORD
        ):
            return NOTHING_REFUSED
        target = self.policy.check_url(task.spec.url) if self.policy is not None else None
        if not single:
            # Cluster mode: the view holds what the topic holds; names are kept unique by the
            # claims of the API's writes, and another program's records are not checked.
            return NOTHING_REFUSED if target is None else Refusals(target=target)
        name = task.spec.name
        others = [i for i in self.store.named(name) if i != task.id]
        others += [
            i for i, w in (writes or {}).items() if w is not None and i != task.id
            and w.task.spec.name == name
        ]  # fmt: skip
        full = None
        if current is None:
            new = sum(1 for i, w in (writes or {}).items() if w is not None)
            if self.store.count() + new >= self.store.max_tasks:
                full = self.store.max_tasks
        return Refusals(target=target, name_taken_by=others[0] if others else None, full=full)

    def _wake_waiters(self) -> None:
        still = []
        for key, offset, waiter in self._waiters:
            if waiter.done():
                continue
            if self._next.get(key, 0) > offset:
                waiter.set_result(None)
            else:
                still.append((key, offset, waiter))
        self._waiters = still

    def _reject(self, partition: int, offset: int, reason: str) -> None:
        self.stats.rejected += 1
        REJECTED.inc()
        log.warning(
            "task record rejected (topic %s, partition %d, offset %d): %s",
            self.topic, partition, offset, reason,
        )  # fmt: skip

    def _log_error(self, error: KafkaError) -> None:
        now = time.monotonic()
        if now - self._logged_error_at >= ERROR_LOG_EVERY:
            self._logged_error_at = now
            log.warning("reading the task topic: %s", error.str())


def _origin(decoded: Decoded) -> str | None:
    if isinstance(decoded, TaskChange):
        return decoded.record.origin
    if isinstance(decoded, InvalidTask):
        return decoded.origin
    return None  # a tombstone says nothing of who wrote it


def _later(known: tuple[int, int] | None, partition: int, offset: int) -> bool:
    """Whether a record known for the task lies after (partition, offset). Offsets order
    records of one partition only; a task's records are all in one partition unless a writer
    used another partitioner (docs/tasks-topic.md)."""
    return known is not None and known[0] == partition and known[1] > offset


class ViewBuilder:
    """A cluster node's view of the task topic, made from its records in the order read.

    Each record is decoded, validated and made into its task as it comes, so that the view is
    built while the rest of the topic is still being read (`read_everything(on_records=...)`):
    reading 100,000 records mostly waits for the broker. A later record of a task replaces an
    earlier one and a tombstone removes it, so the tasks made are those of each task's last
    record, as if only those had been read. Records with no usable task id are counted and
    logged at `finish`, once for each key, at its last record."""

    def __init__(
        self,
        follower: TaskTopicFollower,
        runtime: dict[uuid.UUID, RuntimeState],
        now: datetime,
        sink: ViewSink | None,
    ) -> None:
        self._follower = follower
        self._runtime = runtime
        self._now = now
        self._sink = sink
        self._writes: dict[uuid.UUID, ViewWrite] = {}
        self._chunk: list[ViewWrite] = []
        self._rejected: dict[bytes, tuple[int, int, str]] = {}

    def add(self, records: Iterable[TaskRecordRead]) -> None:
        follower, runtime, now, sink = self._follower, self._runtime, self._now, self._sink
        writes, chunk, positions = self._writes, self._chunk, follower._positions
        for key, partition, offset, value in records:
            decoded = decode(key, value)
            if isinstance(decoded, UnusableRecord):
                self._rejected.pop(key, None)  # in order of each key's last record
                self._rejected[key] = (partition, offset, decoded.reason)
                continue
            if isinstance(decoded, TaskRemoved):
                # Made by an earlier record, perhaps under another spelling of its key.
                if writes.pop(decoded.task_id, None) is not None and sink is not None:
                    sink.add(chunk)
                    chunk = []
                    sink.remove([decoded.task_id])
                continue
            task = applied(decoded, None, now)
            kept = runtime.get(decoded.task_id) if runtime else None  # a new node keeps none
            if kept is not None:
                task = with_runtime(task, kept, same_record=kept.position == (partition, offset))
            task = judged(task, follower._refusals(task, None, single=False), now)
            write = ViewWrite(task, True, partition, offset)
            writes[decoded.task_id] = write
            positions[decoded.task_id] = (partition, offset)
            if sink is not None:
                chunk.append(write)
                if len(chunk) >= VIEW_CHUNK:
                    sink.add(chunk)
                    chunk = []
        self._chunk = chunk

    def finish(self, unusable: Iterable[tuple[int, int, str]] = ()) -> list[ViewWrite]:
        """The view's tasks; what is left of them goes to the sink. `unusable`: the records
        with no key (partition, offset, why: `Snapshot.unusable`), rejected with the rest."""
        for partition, offset, why in unusable:
            self._follower._reject(partition, offset, why)
        for partition, offset, why in self._rejected.values():
            self._follower._reject(partition, offset, why)
        if self._sink is not None:
            self._sink.add(self._chunk)
            self._chunk = []
        return list(self._writes.values())
