"""Publishes check results (and task records) to Kafka and loses none: librdkafka first, the
SQLite outbox after.

Task records (`publish_record()`, the task topic, docs/tasks-topic.md) travel exactly like
results, in the same chain per task: a task's records and results reach the broker in the
order they were published, whichever topic each goes to.

How a result travels:

- `publish()` gives it a sequence number (from the outbox, so it orders results across memory
  and disk) and hands it to librdkafka (idempotent, acks=all, zstd, batched) -- unless its task
  already has a message in librdkafka or rows in the outbox, or librdkafka holds
  `max_in_flight` messages. Then it goes to the outbox, behind its task's earlier results.
- A task has at most one message in librdkafka at a time. librdkafka keeps a partition in
  order while the broker answers, but a message that times out can be followed by a later one
  that gets through; one message per task rules that out, and results of one task come
  seconds apart anyway.
- Delivery reports are served by a poller thread and settled on the event loop by the pump
  task: a failed delivery goes to the outbox (one WARNING line with its ids), a delivered one
  that came from the outbox is deleted from it. A row is deleted only after its delivery report.
- The pump also drains the outbox, one chain per task: as soon as a task has nothing in
  flight and rows waiting (its message was just acknowledged, or its first row was stored),
  its head row goes to librdkafka on the next pump step. Tasks drain side by side, each at
  the rate of its round trips, none waiting for unrelated ones. Heads are read for all such
  tasks in one statement per step, after that step's deletes. While the broker does not
  answer only small probes go (a delivered probe says it is back).
- A task whose backlog is empty (every stored row delivered) and that has nothing in flight
  sends directly again.
- A broker that refuses the producer's idempotence state (fenced, bad epoch or sequence,
  fatal error) gets a new producer instance; what the old one held comes back as purged.
- `close()` flushes for the time-out given, purges what is left, and stores exactly the
  messages whose reports say they were not delivered (plus any without a report). A result
  published after that is written to the outbox at once.
- A message that can never be delivered is set aside instead of blocking its task: at once
  when librdkafka or the broker refuses it for what it is (too large, invalid:
  `REFUSED_FOR_GOOD`), or after `MAX_DELIVERY_ATTEMPTS` failures that each came while other
  results were being delivered (so a broker outage, or an error every message gets, never
  sets anything aside). It moves to the outbox's `outbox_set_aside` table with the reason, one
  WARNING line with its ids, and the task's later results flow again.

Throughput of the outbox drain: many tasks drain at once (at most `drain_batch` heads are
handed over per pump step; 200 tasks' backlogs: 2,600-3,600 results a second here); one task's
backlog drains one row per round trip (35-39 a second here: `bench/outbox_drain.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from typing import Any, Protocol

import orjson
from confluent_kafka import KafkaError, KafkaException, Producer

from checker_common.contract import CheckResult, encode
from checker_common.kafka import client_config
from periodic_checker.outbox import Outbox, OutboxRow, SetAside
from periodic_checker.settings import CheckerSettings

log = logging.getLogger(__name__)

CLIENT_ID = "periodic-checker"
DEFAULT_MAX_IN_FLIGHT = 10_000
DEFAULT_DRAIN_BATCH = 500
PROBE_BATCH = 10
DEFAULT_DRAIN_INTERVAL = 1.0
LINGER_MS = 20
POLL_SECONDS = 0.1
# After purge() librdkafka reports the purged messages on the next poll; this bounds the wait.
PURGE_GRACE_SECONDS = 5.0
# At shutdown with the broker known to be away, the flush waits this long, not the whole
# budget: what librdkafka still holds goes to the outbox, to be sent by the next start.
AWAY_FLUSH_SECONDS = 2.0
MIN_PURGE_GRACE_SECONDS = 0.5

_PURGED = frozenset({KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT})
_BROKER_GONE = frozenset({KafkaError._ALL_BROKERS_DOWN, KafkaError._MSG_TIMED_OUT})
# The producer's idempotence state is broken: only a new instance (a new producer id) helps.
# Seen after an outage when a broker refuses librdkafka's local epoch bump.
NEEDS_NEW_PRODUCER = frozenset(
    {
        KafkaError.PRODUCER_FENCED,
        KafkaError.INVALID_PRODUCER_EPOCH,
        KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER,
        KafkaError.UNKNOWN_PRODUCER_ID,
        KafkaError._FATAL,
    }
)
# The message itself is refused, and would be on every attempt: set it aside at once.
REFUSED_FOR_GOOD = frozenset(
    {
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.INVALID_MSG,
        KafkaError.INVALID_MSG_SIZE,
        KafkaError.RECORD_LIST_TOO_LARGE,
        KafkaError.INVALID_RECORD,
        KafkaError.INVALID_TIMESTAMP,
        KafkaError._BAD_MSG,
    }
)
# Failures of one message, each while other results were delivered, before it is set aside.
MAX_DELIVERY_ATTEMPTS = 5
# Errors that say nothing about the message itself (the broker away, the producer renewed).
_NOT_THE_MESSAGE = _PURGED | _BROKER_GONE | NEEDS_NEW_PRODUCER


def counted_failures(code: int, counted: int, others_delivered: bool) -> int | None:
    """A message's failures that count against it once this one (`code`) is added to the
    `counted` before, or None: set it aside now (pure). A failure counts only when other
    results were delivered since its last one: then the broker works, and it is the message."""
    if code in REFUSED_FOR_GOOD:
        return None
    if code in _NOT_THE_MESSAGE or not others_delivered:
        return counted
    counted += 1
    return None if counted >= MAX_DELIVERY_ATTEMPTS else counted


class _Handover(Enum):
    """What `produce()` did with a message."""

    SENT = "sent"
    FULL = "full"  # librdkafka's queue is full: later
    REFUSED = "refused"  # refused now, maybe not later: kept in the outbox
    SET_ASIDE = "set aside"  # refused for good


class RecordEvents(Protocol):
    """Told what happened to task records (called on the event loop)."""

    def records_safe(self, tags: list[Any]) -> None:
        """These records (the tags given to `publish_record`) are on the topic or in the
        outbox: a crash no longer loses them."""
        ...

    def record_delivered(self, task_id: uuid.UUID, partition: int, offset: int) -> None:
        """A record of this task landed here on the task topic."""
        ...


@dataclass(frozen=True, slots=True)
class PublisherStats:
    """What the publisher holds and has done, for /status and /metrics."""

    queue_length: int  # in librdkafka, plus on the way to the outbox
    outbox_size: int  # rows in the outbox (a row being re-sent stays until delivered)
    broker_reachable: bool | None  # None until the first sign either way
    last_delivered_at: datetime | None
    delivered: int  # delivery reports that said delivered
    failed: int  # delivery reports that said failed (each went to, or stayed in, the outbox)
    in_flight: int  # messages handed to librdkafka, not yet reported
    max_in_flight: int
    stored: int  # results written to the outbox since start
    dropped: int  # results that could not even be encoded
    set_aside: int = 0  # results set aside since start (they can never be delivered)
    set_aside_size: int = 0  # rows in the outbox's set-aside table
    records_waiting: int = 0  # task records not yet confirmed by the broker


@dataclass(frozen=True, slots=True)
class _Message:
    seq: int
    task_id: uuid.UUID
    key: bytes
    value: bytes | None  # None: a tombstone (task records only)
    stored: bool  # True: the row is in the outbox already (this is a re-send)
    topic: str | None = None  # None: the results topic

    def row(self) -> OutboxRow:
        return OutboxRow(self.seq, self.task_id, self.key, self.value, self.topic)


class ResultPublisher:
    """Sends results to `settings.kafka_topic` and task records to `settings.kafka_tasks_topic`,
    keeping what the broker cannot take yet."""

    def __init__(
        self,
        settings: CheckerSettings,
        outbox: Outbox,
        *,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        drain_batch: int = DEFAULT_DRAIN_BATCH,
        drain_interval: float = DEFAULT_DRAIN_INTERVAL,
    ) -> None:
        self._settings = settings
        self._outbox = outbox
        self._topic = settings.kafka_topic
        self._records_topic = settings.kafka_tasks_topic
        # Task records not yet confirmed, per task (in librdkafka, on the way, in the outbox).
        self._record_backlog: Counter[uuid.UUID] = Counter()
        # seq -> the tag of a record not yet safe (delivered or stored), for `record_events`.
        self._tags: dict[int, Any] = {}
        self.record_events: RecordEvents | None = None
        self._max_in_flight = max_in_flight
        self._drain_batch = drain_batch
        self._drain_interval = drain_interval
        self._producer: Any = None
        self._in_flight: dict[int, _Message] = {}
        self._stored_in_flight = 0
        self._busy_tasks: set[uuid.UUID] = set()
        # Tasks with rows waiting and nothing in flight, longest waiting first: their head row
        # goes to librdkafka on the next pump step (a dict keeps insertion order).
        self._ready: dict[uuid.UUID, None] = {}
        # Rows per task in the outbox or on their way to it: such a task's new results queue up.
        self._backlog: Counter[uuid.UUID] = Counter()
        self._spill: list[OutboxRow] = []
        self._writing = 0  # rows of the spill being written right now
        self._confirmed: set[int] = set()  # outbox rows delivered, delete pending
        self._aside: dict[int, SetAside] = {}  # set aside, write pending (by seq)
        # seq -> (failures counted against it, deliveries seen at its last failure)
        self._failures: dict[int, tuple[int, int]] = {}
        self._set_aside_count = 0
        # Filled by delivery callbacks on whichever thread serves them; settled on the loop:
        # (seq, error, partition, offset).
        self._reports: deque[tuple[int, KafkaError | None, int, int]] = deque()
        self._wake = asyncio.Event()
        self._closing = False
        self._stopping = False
        self._closed = False
        self._pump: asyncio.Task[None] | None = None
        self._poller: threading.Thread | None = None
        self._poll_stop = threading.Event()
        self._reachable: bool | None = None
        self._renew = False  # set from any thread: replace the producer on the next step
        self._renewed_at = -float("inf")
        self._probe_after = -float("inf")
        self._last_delivered_at: datetime | None = None
        self._delivered = 0
        self._failed = 0
        self._stored = 0
        self._dropped = 0

    def producer_config(self) -> dict[str, Any]:
        config = client_config(self._settings, client_id=CLIENT_ID)
        config.update(
            {
                "enable.idempotence": True,
                "acks": "all",
                "compression.type": "zstd",
                "linger.ms": LINGER_MS,
                "message.timeout.ms": self._settings.kafka_message_timeout_ms,
                "queue.buffering.max.messages": self._max_in_flight,
                "error_cb": self._on_error,
            }
        )
        return config

    async def start(self) -> None:
        """Create the producer, learn the outbox's backlog, start the poller and the pump."""
        self._backlog.update(await asyncio.to_thread(self._outbox.backlog))
        self._record_backlog.update(
            await asyncio.to_thread(self._outbox.backlog, self._records_topic)
        )
        self._ready.update(dict.fromkeys(self._backlog))
        self._producer = Producer(self.producer_config())
        self._renewed_at = time.monotonic()
        loop = asyncio.get_running_loop()
        self._poller = threading.Thread(
            target=self._poll_forever, args=(loop,), name="kafka-poller", daemon=True
        )
        self._poller.start()
        self._pump = asyncio.create_task(self._run(), name="result-publisher")
        if self._outbox.size():
            log.info("outbox holds %d results from before; sending them", self._outbox.size())

    def publish(self, task_id: uuid.UUID, result: CheckResult) -> None:
        """Hand one result over; never blocks on the network and never raises."""
        try:
            key, value = encode(task_id, result)
        except Exception:
            self._dropped += 1
            log.exception(
                "result cannot be encoded, dropped: task_id=%s result_id=%s",
                task_id,
                result.result_id,
                extra={"task_id": str(task_id), "result_id": str(result.result_id)},
            )
            return
        try:
            self._route(_Message(self._outbox.reserve(), task_id, key, value, stored=False))
        except Exception:
            # Not expected; say so loudly rather than let a check's caller fail.
            log.exception(
                "result not handed over: task_id=%s result_id=%s",
                task_id,
                result.result_id,
                extra={"task_id": str(task_id), "result_id": str(result.result_id)},
            )

    def publish_record(self, task_id: uuid.UUID, value: bytes | None, tag: Any = None) -> None:
        """Hand a task record over (`value` None: the tombstone that removes the task), behind
        the task's earlier records and results; never blocks on the network, never raises.
        `record_events` hears of `tag` once the record is safe."""
        try:
            seq = self._outbox.reserve()
            if tag is not None:
                self._tags[seq] = tag
            self._record_backlog[task_id] += 1
            key = str(task_id).encode()
            self._route(_Message(seq, task_id, key, value, stored=False, topic=self._records_topic))
        except Exception:
            log.exception(
                "task record not handed over: task_id=%s", task_id, extra={"task_id": str(task_id)}
            )

    def records_pending(self, task_id: uuid.UUID) -> bool:
        """Whether a record of this task published here has not been confirmed yet."""
        return self._record_backlog[task_id] > 0

    async def close(self, timeout: float) -> None:  # noqa: ASYNC109 - the flush's budget
        """Flush for up to `timeout` seconds; put every undelivered message in the outbox."""
        if self._closing:
            return
        deadline = time.monotonic() + timeout
        self._closing = True  # from here publish() only fills the outbox
        self._stopping = True
        self._wake.set()
        if self._pump is not None:
            await self._pump  # it ends after its current step; never cancelled mid-write
        self._poll_stop.set()
        if self._poller is not None:
            await asyncio.to_thread(self._poller.join)
        producer, self._producer = self._producer, None
        if producer is not None:
            now = time.monotonic
            if self._reachable is False:
                deadline = min(deadline, now() + AWAY_FLUSH_SECONDS)
                log.info("broker unreachable at shutdown; undelivered results go to the outbox")
            left = await asyncio.to_thread(producer.flush, max(0.0, deadline - now()))
            if left:
                # Messages librdkafka still holds would otherwise be delivered (or not) after
                # we are gone; purged ones report _PURGE_* and are stored below.
                producer.purge()
                grace = min(PURGE_GRACE_SECONDS, max(MIN_PURGE_GRACE_SECONDS, deadline - now()))
                await asyncio.to_thread(producer.flush, grace)
        self._settle_reports()
        unreported = [m for m in self._in_flight.values() if not m.stored]
        if unreported:
            log.warning("%d messages without a delivery report; storing them", len(unreported))
        for message in unreported:
            self._to_outbox(message)
        self._in_flight.clear()
        self._busy_tasks.clear()
        self._ready.clear()
        self._stored_in_flight = 0
        moved = len(self._spill)
        self._closed = True  # later results are written by publish() itself
        try:
            await self._store_spill()
            await self._write_aside()
            await self._delete_confirmed()
        except Exception:
            # Nothing is left to retry with: say exactly what is lost.
            log.exception(
                "outbox write failed at shutdown: %d results lost, %d delivered rows not deleted,"
                " %d results not set aside",
                len(self._spill),
                len(self._confirmed),
                len(self._aside),
            )
            return
        log.info(
            "publisher closed: %d results moved to the outbox at shutdown, %d rows in the outbox",
            moved,
            self._outbox.size(),
        )

    def stats(self) -> PublisherStats:
        producer = self._producer
        return PublisherStats(
            queue_length=(len(producer) if producer is not None else 0)
            + len(self._spill)
            + self._writing,
            outbox_size=self._outbox.size(),
            broker_reachable=self._reachable,
            last_delivered_at=self._last_delivered_at,
            delivered=self._delivered,
            failed=self._failed,
            in_flight=len(self._in_flight),
            max_in_flight=self._max_in_flight,
            stored=self._stored,
            dropped=self._dropped,
            set_aside=self._set_aside_count,
            set_aside_size=self._outbox.set_aside_size() + len(self._aside),
            records_waiting=self._record_backlog.total(),
        )

    # -- routing (event loop) ---------------------------------------------------------------

    def _route(self, message: _Message) -> None:
        must_wait = (
            self._producer is None
            or self._closing
            or message.task_id in self._busy_tasks
            or self._backlog[message.task_id] > 0
            or len(self._in_flight) >= self._max_in_flight
        )
        if must_wait or self._send(message) in (_Handover.FULL, _Handover.REFUSED):
            self._to_outbox(message)

    def _send(self, message: _Message) -> _Handover:
        try:
            self._producer.produce(
                message.topic or self._topic,
                key=message.key,
                value=message.value,
                on_delivery=functools.partial(self._on_delivery, message.seq),
            )
        except BufferError:
            return _Handover.FULL
        except KafkaException as exc:
            error = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
            if error is not None and error.code() in REFUSED_FOR_GOOD:
                self._set_aside(message, f"refused by the Kafka client: {error.str()}")
                return _Handover.SET_ASIDE
            log.warning(
                "produce refused, task_id=%s kept in the outbox: %s",
                message.task_id,
                exc,
                extra={"task_id": str(message.task_id)},
            )
            return _Handover.REFUSED
        self._in_flight[message.seq] = message
        self._busy_tasks.add(message.task_id)
        if message.stored:
            self._stored_in_flight += 1
        return _Handover.SENT

    def _set_aside(self, message: _Message, reason: str) -> None:
        """Move a message that can never be delivered out of its task's way: into the
        set-aside table (written by the next pump step), and the task's next row goes."""
        self._failures.pop(message.seq, None)
        self._aside[message.seq] = SetAside(message.row(), reason)
        self._set_aside_count += 1
        self._record_settled(message)
        result_id = _result_id(message.value)
        log.warning(
            "%s set aside, it cannot be delivered: task_id=%s result_id=%s: %s",
            "result" if message.topic is None else "task record",
            message.task_id,
            result_id,
            reason,
            extra={"task_id": str(message.task_id), "result_id": result_id},
        )
        task = message.task_id
        if message.stored:
            self._backlog[task] -= 1
            if self._backlog[task] <= 0:
                del self._backlog[task]
        if self._backlog[task] > 0 and task not in self._busy_tasks:
            self._ready[task] = None
        self._wake.set()

    def _record_settled(self, message: _Message) -> None:
        """A task record left the publisher's hands (delivered, or set aside for good)."""
        if message.topic is None:
            return
        self._tags.pop(message.seq, None)
        task = message.task_id
        self._record_backlog[task] -= 1
        if self._record_backlog[task] <= 0:
            del self._record_backlog[task]

    def _safe(self, seqs: list[int]) -> None:
        """Tell `record_events` that the records with these seqs can no longer be lost."""
        if not self._tags:
            return
        tags = [self._tags.pop(seq) for seq in seqs if seq in self._tags]
        if tags and self.record_events is not None:
            try:
                self.record_events.records_safe(tags)
            except Exception:
                log.exception("record_events.records_safe failed")

    def _to_outbox(self, message: _Message) -> None:
        row = message.row()
        if self._closed:
            # No pump any more: a late result (a check finishing after close) is written now.
            self._outbox.put([row])
            self._stored += 1
            self._safe([row.seq])
            return
        self._spill.append(row)
        self._backlog[message.task_id] += 1
        if message.task_id not in self._busy_tasks:
            # Nothing of it in flight that would start the chain when acknowledged.
            self._ready[message.task_id] = None
        self._wake.set()

    def _settle_reports(self) -> None:
        while self._reports:
            seq, error, partition, offset = self._reports.popleft()
            self._settle(seq, error, partition, offset)

    def _settle(
        self, seq: int, error: KafkaError | None, partition: int = -1, offset: int = -1
    ) -> None:
        message = self._in_flight.pop(seq, None)
        if message is None:
            return
        self._busy_tasks.discard(message.task_id)
        if message.stored:
            self._stored_in_flight -= 1
        if error is None:
            self._failures.pop(seq, None)
            self._delivered += 1
            self._last_delivered_at = datetime.now(UTC)
            self._set_reachable(True)
            if message.topic is not None:
                self._safe([seq])
                self._record_settled(message)
                if self.record_events is not None:
                    try:
                        self.record_events.record_delivered(message.task_id, partition, offset)
                    except Exception:
                        log.exception("record_events.record_delivered failed")
            if message.stored:
                self._confirmed.add(seq)
                self._backlog[message.task_id] -= 1
                if self._backlog[message.task_id] <= 0:
                    del self._backlog[message.task_id]  # back to sending directly
            if self._backlog[message.task_id] > 0:
                # The chain: this task's next row goes on the next pump step.
                self._ready[message.task_id] = None
            return
        if error.code() in _PURGED:
            log.debug("purged, kept: task_id=%s seq=%d", message.task_id, seq)
        else:
            self._failed += 1
            if error.code() in _BROKER_GONE:
                self._set_reachable(False)
            if error.code() in NEEDS_NEW_PRODUCER or error.fatal():
                self._renew = True
            before = self._failures.get(seq)
            counted = counted_failures(
                error.code(),
                before[0] if before else 0,
                others_delivered=before is not None and self._delivered > before[1],
            )
            if counted is None:
                if error.code() in REFUSED_FOR_GOOD:
                    reason = f"refused by the broker: {error.str()}"
                else:
                    reason = (
                        f"delivery failed {MAX_DELIVERY_ATTEMPTS} times while other results"
                        f" were delivered; the last time: {error.str()}"
                    )
                self._set_aside(message, reason)
                return
            self._failures[seq] = (counted, self._delivered)
            if message.stored:
                # Re-sending a row right after it failed would spin; probe again a bit later.
                self._probe_after = time.monotonic() + self._drain_interval
            result_id = _result_id(message.value)
            log.warning(
                "delivery failed, result kept in the outbox: task_id=%s result_id=%s: %s",
                message.task_id,
                result_id,
                error.str(),
                extra={"task_id": str(message.task_id), "result_id": result_id},
            )
        if not message.stored:
            self._to_outbox(message)  # marks the task ready: nothing of it is in flight now
        elif self._backlog[message.task_id] > 0:
            # Its row is still the task's head; it goes again, behind the probes if need be.
            self._ready[message.task_id] = None

    def _set_reachable(self, reachable: bool) -> None:
        if self._reachable is not reachable:
            if reachable:
                log.info("broker reachable; outbox holds %d results", self._outbox.size())
            else:
                log.warning("broker unreachable; results go to the outbox when librdkafka is full")
        self._reachable = reachable

    # -- the pump (event loop) --------------------------------------------------------------

    async def _run(self) -> None:
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._drain_interval)
            self._wake.clear()
            if self._stopping:
                break
            try:
                await self._step()
            except Exception:
                # SQLite trouble (disk full, locked): what was not written stays in memory.
                log.exception("publisher step failed; retrying in %.1f s", self._drain_interval)
                await asyncio.sleep(self._drain_interval)

    async def _step(self) -> None:
        self._settle_reports()
        if self._renew and time.monotonic() - self._renewed_at >= self._drain_interval:
            await self._renew_producer()
        # One trip to the worker thread per step: store the spill, delete what was delivered,
        # read the heads of the ready tasks (after the deletes, so no head is a delivered row).
        rows, self._spill = self._spill, []
        seqs = list(self._confirmed)
        aside = list(self._aside.values())
        tasks = self._take_ready()
        if not (rows or seqs or aside or tasks):
            return
        self._writing = len(rows)
        done: list[str] = []
        try:
            heads = await asyncio.to_thread(
                _outbox_io, self._outbox, rows, seqs, aside, tasks, done
            )
        except BaseException:
            if "stored" not in done:
                self._spill[:0] = rows
            self._ready.update(dict.fromkeys(tasks))
            raise
        finally:
            self._writing = 0
            if "stored" in done:
                self._stored += len(rows)
                self._safe([row.seq for row in rows])
            if "deleted" in done:
                self._confirmed.difference_update(seqs)
            if "set aside" in done:
                for item in aside:
                    self._aside.pop(item.row.seq, None)
        self._send_heads(tasks, heads)

    async def _renew_producer(self) -> None:
        """Swap in a new producer; what the old one still holds comes back as purged."""
        old, self._producer = self._producer, None  # publish() spills meanwhile
        self._renew = False
        if old is not None:
            log.warning("replacing the kafka producer (its idempotence state is broken)")
            old.purge()
            await asyncio.to_thread(old.flush, PURGE_GRACE_SECONDS)
            self._settle_reports()
        try:
            self._producer = Producer(self.producer_config())
        finally:
            self._renewed_at = time.monotonic()

    async def _store_spill(self) -> None:
        if not self._spill:
            return
        rows, self._spill = self._spill, []
        self._writing = len(rows)
        try:
            await asyncio.to_thread(self._outbox.put, rows)
        except BaseException:
            self._spill[:0] = rows
            raise
        finally:
            self._writing = 0
        self._stored += len(rows)
        self._safe([row.seq for row in rows])

    async def _write_aside(self) -> None:
        if not self._aside:
            return
        aside = list(self._aside.values())
        await asyncio.to_thread(self._outbox.set_aside, aside)
        for item in aside:
            self._aside.pop(item.row.seq, None)

    async def _delete_confirmed(self) -> None:
        if not self._confirmed:
            return
        seqs = list(self._confirmed)
        await asyncio.to_thread(self._outbox.delete, seqs)
        self._confirmed.difference_update(seqs)

    def _take_ready(self) -> list[uuid.UUID]:
        """Up to one step's budget of ready tasks, longest waiting first, taken off the list."""
        if not self._ready:
            return []
        if self._producer is None or self._closing or self._renew:
            return []
        if not self._reachable:
            # Probing: a few rows at a time, the next probe only after the last one settled.
            if self._stored_in_flight or time.monotonic() < self._probe_after:
                return []
            budget = PROBE_BATCH
        else:
            budget = self._drain_batch
        budget = min(budget, self._max_in_flight - len(self._in_flight))
        tasks: list[uuid.UUID] = []
        for task in self._ready:
            if len(tasks) >= budget:
                break  # delivery reports wake the pump again
            tasks.append(task)
        for task in tasks:
            del self._ready[task]
        return tasks

    def _send_heads(self, tasks: list[uuid.UUID], rows: list[OutboxRow]) -> None:
        """Hand over the head row of each task taken by `_take_ready()`."""
        found = {row.task_id for row in rows}
        sent = 0
        for index, row in enumerate(rows):
            if row.task_id in self._busy_tasks:
                continue  # its acknowledgement starts the chain again
            if row.seq in self._confirmed or row.seq in self._aside:
                self._ready[row.task_id] = None  # delivered or set aside, write pending
                continue
            handed = (
                _Handover.FULL
                if self._producer is None
                or self._closing
                or len(self._in_flight) >= self._max_in_flight
                else self._send(
                    _Message(row.seq, row.task_id, row.key, row.value, stored=True, topic=row.topic)
                )
            )
            if handed is _Handover.SET_ASIDE:
                continue  # the task's next row goes once this one is out of the outbox
            if handed is not _Handover.SENT:
                # Not now (librdkafka full or being replaced): this and the rest stay ready.
                self._ready.update(
                    dict.fromkeys(
                        r.task_id for r in rows[index:] if r.task_id not in self._busy_tasks
                    )
                )
                break
            sent += 1
        if len(found) < len(tasks):
            # No stored row yet: its rows are still in the spill (they wake the pump when
            # stored) -- or its backlog count is off, then new results mark it again.
            spilled = {row.task_id for row in self._spill}
            self._ready.update(dict.fromkeys(t for t in tasks if t not in found and t in spilled))
        if self._ready and sent and self._reachable:
            self._wake.set()  # more ready tasks than one step's budget: go on at once
        if sent:
            log.debug("re-sending %d results from the outbox", sent)

    # -- librdkafka callbacks (poller thread, or the thread running flush) -------------------

    def _poll_forever(self, loop: asyncio.AbstractEventLoop) -> None:
        while not self._poll_stop.is_set():
            producer = self._producer  # replaced by the pump after a fatal error
            if producer is None:
                self._poll_stop.wait(POLL_SECONDS)
                continue
            try:
                served = producer.poll(POLL_SECONDS)
            except Exception:
                log.exception("kafka poll failed")
                self._poll_stop.wait(POLL_SECONDS)
                continue
            if served and self._reports:
                try:
                    loop.call_soon_threadsafe(self._wake.set)
                except RuntimeError:  # the loop is closed: nobody left to tell
                    return

    def _on_delivery(self, seq: int, error: KafkaError | None, message: Any) -> None:
        if error is None and message is not None:
            self._reports.append((seq, None, message.partition(), message.offset()))
        else:
            self._reports.append((seq, error, -1, -1))

    def _on_error(self, error: KafkaError) -> None:
        if error.fatal():
            log.error("kafka producer fatal error; replacing the producer: %s", error.str())
            self._renew = True
        elif error.code() in _BROKER_GONE:
            # A plain attribute write is atomic; the loop logs the change on the next report.
            self._reachable = False
            log.warning("kafka: %s", error.str())
        else:
            log.info("kafka: %s", error.str())


def _outbox_io(
    outbox: Outbox,
    rows: list[OutboxRow],
    seqs: list[int],
    aside: list[SetAside],
    tasks: list[uuid.UUID],
    done: list[str],
) -> list[OutboxRow]:
    """A pump step's SQLite work, in a worker thread; `done` tells the loop how far it got.
    Heads are read last: no head is a row delivered or set aside in this step."""
    outbox.put(rows)
    done.append("stored")
    outbox.delete(seqs)
    done.append("deleted")
    outbox.set_aside(aside)
    done.append("set aside")
    return outbox.heads(tasks) if tasks else []


def _result_id(value: bytes | None) -> str:
    """The result_id inside a message value, for log lines."""
    if value is None:
        return "-"
    try:
        (body,) = orjson.loads(value).values()
        return str(body.get("result_id", "?"))
    except (orjson.JSONDecodeError, ValueError, AttributeError):
        return "?"
