"""Writing the task topic: this checker's changes of tasks as task records.

Two writers, for the two ways a change may be made (docs/tasks-topic.md):

- `RecordPublisher`: after the change is made (single mode: every change, written to SQLite
  first; both modes: a task that ends by itself). Records go through the result publisher's
  machinery (idempotent producer, the outbox while the broker is away, one chain per task with
  its results), and the store remembers which version of each task is safe on the topic or in
  the outbox (`published_at`), so a crash before that publishes it again at the next start.
- `RecordProducer`: before the change is made (cluster mode, the API): the record is produced
  and its place on the topic awaited; the caller then waits until its node applied it. A broker
  that does not confirm in time is `BrokerUnavailable`, and nothing changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from confluent_kafka import KafkaError, KafkaException, Producer

from checker_common.kafka import client_config
from checker_common.task_record import encode
from periodic_checker.producer import NEEDS_NEW_PRODUCER
from periodic_checker.settings import CheckerSettings
from periodic_checker.task_service import BrokerUnavailable
from periodic_checker.task_view import record_of
from periodic_checker.tasks import Task

log = logging.getLogger(__name__)

MARK_INTERVAL = 1.0
# librdkafka's own deadline for a record the API waits for (cluster mode).
PRODUCE_TIMEOUT_MS = 10_000
POLL_SECONDS = 0.1


class RecordSink(Protocol):
    """The result publisher, as far as task records go (`producer.ResultPublisher`)."""

    record_events: Any

    def publish_record(self, task_id: uuid.UUID, value: bytes | None, tag: Any = None) -> None: ...

    def records_pending(self, task_id: uuid.UUID) -> bool: ...


class PublishedStore(Protocol):
    """What `RecordPublisher` keeps in the store (`store.SQLiteTaskStore`)."""

    def unpublished(self) -> list[Task]: ...

    def mark_published(self, items: list[tuple[uuid.UUID, datetime]]) -> None: ...

    def pending_removals(self) -> list[uuid.UUID]: ...

    def removals_published(self, task_ids: list[uuid.UUID]) -> None: ...

    def set_positions(self, positions: list[tuple[uuid.UUID, int, int]]) -> None: ...


@dataclass(frozen=True, slots=True)
class _Version:
    """Tag of a task record: which version of the task it carries."""

    task_id: uuid.UUID
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class _Removal:
    """Tag of a tombstone."""

    task_id: uuid.UUID


class RecordPublisher:
    """Publishes this checker's task changes through the result publisher (see module doc)."""

    def __init__(
        self,
        sink: RecordSink,
        store: PublishedStore,
        node_id: str,
        *,
        mark_interval: float = MARK_INTERVAL,
    ) -> None:
        self.sink = sink
        self.store = store
        self.node_id = node_id
        self.mark_interval = mark_interval
        sink.record_events = self
        # The newest offset each task's own records landed at in this run (and its partition).
        self.own_positions: dict[uuid.UUID, tuple[int, int]] = {}
        self._handed: dict[uuid.UUID, datetime | None] = {}  # last version handed over
        self._marks: list[tuple[uuid.UUID, datetime]] = []
        self._removed: list[uuid.UUID] = []
        self._positions: list[tuple[uuid.UUID, int, int]] = []
        self._stop = asyncio.Event()
        self._loop: asyncio.Task[None] | None = None
        self.published = 0

    # -- publishing ----------------------------------------------------------------------------

    def publish(self, task: Task) -> None:
        """Put the task as it now is on the topic (after its earlier records and results)."""
        if self._handed.get(task.id) == task.updated_at:
            return  # this version is on its way already (a task ended at load, then unpublished)
        try:
            _, value = encode(record_of(task, self.node_id))
        except Exception:
            # A definition stored by an older release may no longer even serialise.
            log.exception("task %s cannot be written as a record", task.id)
            return
        self._handed[task.id] = task.updated_at
        self.sink.publish_record(task.id, value, _Version(task.id, task.updated_at))
        self.published += 1

    def remove(self, task_id: uuid.UUID) -> None:
        """Put the tombstone of a removed task on the topic."""
        self._handed[task_id] = None
        self.sink.publish_record(task_id, None, _Removal(task_id))
        self.published += 1

    def pending(self, task_id: uuid.UUID) -> bool:
        """Whether a record of this task from this checker has not landed yet."""
        return self.sink.records_pending(task_id)

    def publish_unpublished(self) -> int:
        """Publish every task whose current version is not safe yet (an upgrade from a release
        without the task topic publishes every task, once), and every removal not yet safe."""
        count = 0
        for task in self.store.unpublished():
            self.publish(task)
            count += 1
        for task_id in self.store.pending_removals():
            self.remove(task_id)
            count += 1
        if count:
            log.info("publishing %d task records not yet on the task topic", count)
        return count

    # -- what the result publisher tells (RecordEvents) ------------------------------------------

    def records_safe(self, tags: list[Any]) -> None:
        for tag in tags:
            if isinstance(tag, _Version):
                self._marks.append((tag.task_id, tag.updated_at))
            elif isinstance(tag, _Removal):
                self._removed.append(tag.task_id)

    def record_delivered(self, task_id: uuid.UUID, partition: int, offset: int) -> None:
        self.own_positions[task_id] = (partition, offset)
        self._positions.append((task_id, partition, offset))

    # -- writing down what is safe ---------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.create_task(self._mark_loop(), name="record-marks")

    async def stop(self) -> None:
        """Write the last marks (call after the result publisher closed: everything it held is
        then delivered or in the outbox)."""
        self._stop.set()
        if self._loop is not None:
            await self._loop
        await self.flush()

    async def flush(self) -> None:
        marks, self._marks = self._marks, []
        removed, self._removed = self._removed, []
        positions, self._positions = self._positions, []
        if not (marks or removed or positions):
            return
        try:
            await asyncio.to_thread(self._write, marks, removed, positions)
        except Exception:
            # Not lost: an unmarked version is published again at the next start.
            log.exception("writing %d published marks failed; will retry", len(marks))
            self._marks[:0] = marks
            self._removed[:0] = removed
            self._positions[:0] = positions

    def _write(
        self,
        marks: list[tuple[uuid.UUID, datetime]],
        removed: list[uuid.UUID],
        positions: list[tuple[uuid.UUID, int, int]],
    ) -> None:
        self.store.mark_published(marks)
        self.store.removals_published(removed)
        self.store.set_positions(positions)

    async def _mark_loop(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.mark_interval)
            await self.flush()


class RecordProducer:
    """Produces a record and awaits where it landed (cluster mode's writes through the API).

    An idempotent producer of its own, with a short delivery time-out: a client waits for the
    answer, so a record the broker does not confirm within PRODUCE_TIMEOUT_MS fails the request
    instead of waiting in an outbox.
    """

    def __init__(self, settings: CheckerSettings, *, timeout_ms: int = PRODUCE_TIMEOUT_MS) -> None:
        config = client_config(settings, client_id="periodic-checker-writes")
        config.update(
            {
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": 0,
                "message.timeout.ms": timeout_ms,
            }
        )
        self._config = config
        self._timeout_s = timeout_ms / 1000
        self._producer: Any = None
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self._renew = False
        self._retired: list[Any] = []  # replaced producers still holding records

    def start(self) -> None:
        self._producer = Producer(self._config)
        self._poller = threading.Thread(target=self._poll, name="record-producer", daemon=True)
        self._poller.start()

    async def produce(
        self, topic: str, key: bytes, value: bytes | None, partition: int | None = None
    ) -> tuple[int, int]:
        """(partition, offset) of the record once the broker confirmed it; BrokerUnavailable
        when it did not. `partition`: a given one, else the key's."""
        try:
            return await self._produce(topic, key, value, partition)
        except _Renewed:
            # The producer's idempotence state was broken (after an outage the local broker
            # fences the epoch librdkafka bumps): the record was not written; once more with a
            # new producer.
            return await self._produce(topic, key, value, partition)

    async def _produce(
        self, topic: str, key: bytes, value: bytes | None, partition: int | None
    ) -> tuple[int, int]:
        if self._renew:
            self._renew_producer()
        loop = asyncio.get_running_loop()
        done: asyncio.Future[tuple[int, int]] = loop.create_future()
        report = functools.partial(self._report, loop, done)
        try:
            where = {} if partition is None else {"partition": partition}
            self._producer.produce(topic, key=key, value=value, on_delivery=report, **where)
        except (BufferError, KafkaException) as exc:
            raise BrokerUnavailable(f"the task topic cannot take the change now: {exc}") from None
        return await done

    async def produce_all(self, topic: str, records: Sequence[tuple[bytes, bytes | None]]) -> int:
        """Produce many records (key, value; each to its key's partition) and wait until the
        broker answered for every one; the number it did not confirm.

        For the state records of a handover (one a task: 100,000 when a node takes every
        task). They are produced from another thread and their answers counted there, so the
        event loop is woken once for all of them, not once a record: a future and a wake-up a
        record made a take of 100,000 tasks 8 of its 14 s, the API waiting meanwhile
        (`bench/task_topic.py startup --states`). A record refused because the producer had
        to be replaced (fenced: `NEEDS_NEW_PRODUCER`) is produced once more by a new one, as
        `produce` does; one that timed out is not (the broker is away)."""
        failed, again = await self._produce_all(topic, records)
        if again:
            more, still = await self._produce_all(topic, again)  # by a new producer
            failed += more + len(still)
        return failed

    async def _produce_all(
        self, topic: str, records: Sequence[tuple[bytes, bytes | None]]
    ) -> tuple[int, list[tuple[bytes, bytes | None]]]:
        """(records not confirmed, records to produce again with a new producer)."""
        if not records:
            return 0, []
        if self._renew:
            self._renew_producer()
        loop = asyncio.get_running_loop()
        answers = _Answers(records, loop)
        await asyncio.to_thread(answers.produce_all, self._producer, topic, self._timeout_s)
        await answers.done
        if answers.renew:
            self._renew = True
        return answers.failed, answers.again

    def _report(
        self,
        loop: asyncio.AbstractEventLoop,
        done: asyncio.Future[tuple[int, int]],
        error: KafkaError | None,
        message: Any,
    ) -> None:
        if error is not None and (error.fatal() or error.code() in _NEEDS_NEW_PRODUCER):
            self._renew = True
        if error is not None:
            log.warning("task topic write failed: %s", error.str())
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            where = (message.partition(), message.offset()) if error is None else (-1, -1)
            loop.call_soon_threadsafe(_settle, done, error, where)

    def _renew_producer(self) -> None:
        self._renew = False
        # Not purged: a record it still holds may be written yet, and its client must hear
        # the truth. The poller serves it until it holds nothing.
        self._retired.append(self._producer)
        self._producer = Producer(self._config)

    def _poll(self) -> None:
        while not self._stop.is_set():
            producer = self._producer
            try:
                producer.poll(POLL_SECONDS)
                for old in list(self._retired):
                    old.poll(0)
                    if len(old) == 0:
                        self._retired.remove(old)
            except Exception:
                log.exception("record producer poll failed")
                self._stop.wait(POLL_SECONDS)

    async def close(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109 - the flush's budget
        producer = self._producer
        if producer is not None:
            await asyncio.to_thread(producer.flush, timeout)
        self._stop.set()
        if self._poller is not None:
            await asyncio.to_thread(self._poller.join)


# The producer's idempotence state is broken, or will be: after a record timed out, librdkafka
# bumps its epoch, which the local broker answers with PRODUCER_FENCED. A new producer (a new
# producer id) starts clean.
_NEEDS_NEW_PRODUCER = NEEDS_NEW_PRODUCER | {KafkaError._MSG_TIMED_OUT}


class _Answers:
    """The broker's answers for records produced together (`RecordProducer.produce_all`),
    counted as they come (on the producer's polling thread); `done` is settled once, when the
    last one came."""

    def __init__(
        self, records: Sequence[tuple[bytes, bytes | None]], loop: asyncio.AbstractEventLoop
    ) -> None:
        self.records = records
        self.done: asyncio.Future[None] = loop.create_future()
        self.failed = 0
        self.again: list[tuple[bytes, bytes | None]] = []
        self.renew = False  # the producer is to be replaced
        self._loop = loop
        self._waiting = len(records)
        self._lock = threading.Lock()

    def produce_all(self, producer: Any, topic: str, timeout: float) -> None:
        """Hand every record to `producer` (a thread of its own: the producer's queue may be
        full until the polling thread has served answers). A record it does not take within
        `timeout` of the one before counts as not confirmed."""
        deadline = time.monotonic() + timeout
        refused: KafkaException | None = None
        for index, (key, value) in enumerate(self.records):
            report = functools.partial(self._answer, index)
            while True:
                try:
                    producer.produce(topic, key=key, value=value, on_delivery=report)
                    deadline = time.monotonic() + timeout
                    break
                except BufferError:
                    if time.monotonic() < deadline:
                        time.sleep(0.01)  # the polling thread empties the queue meanwhile
                        continue
                    self._answered(failed=True)
                except KafkaException as exc:
                    refused = exc
                    self._answered(failed=True)
                break
        if refused is not None:
            log.warning("records for %s refused by the producer: %s", topic, refused)

    def _answer(self, index: int, error: KafkaError | None, message: Any) -> None:
        if error is None:
            self._answered(failed=False)
            return
        # As for `produce`: refused by a producer whose idempotence state is broken, the record
        # goes again through a new one; timed out, it counts as not confirmed (the broker is
        # away: once more would double a handover's wait), and the next call renews.
        fenced = error.fatal() or error.code() in NEEDS_NEW_PRODUCER
        if fenced or error.code() in _NEEDS_NEW_PRODUCER:
            self.renew = True
        self._answered(failed=not fenced, again=self.records[index] if fenced else None)

    def _answered(self, *, failed: bool, again: tuple[bytes, bytes | None] | None = None) -> None:
        with self._lock:
            self.failed += failed
            if again is not None:
                self.again.append(again)
            self._waiting -= 1
            last = self._waiting == 0
        if last:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
                self._loop.call_soon_threadsafe(_settle_once, self.done)


def _settle_once(done: asyncio.Future[None]) -> None:
    if not done.done():
        done.set_result(None)


class _Renewed(BrokerUnavailable):
    """The record was refused because the producer had to be replaced; it may be sent again."""


def _settle(
    done: asyncio.Future[tuple[int, int]], error: KafkaError | None, where: tuple[int, int]
) -> None:
    if done.done():
        return
    if error is None:
        done.set_result(where)
        return
    fenced = error.fatal() or error.code() in NEEDS_NEW_PRODUCER
    failed = _Renewed if fenced else BrokerUnavailable
    done.set_exception(failed(f"the broker did not confirm the change: {error.str()}"))
