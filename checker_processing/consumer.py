"""The batch loop: consume, write, then commit offsets — in that order, always.

Offsets are committed by hand and only after the batch's rows are committed in PostgreSQL.
While the database is away the batch is kept, the assigned partitions are paused and the
consumer keeps being polled, so it stays in its group; the write is retried with backoff.

While draining a backlog (a batch came back full) the next batch is taken from what the
consumer has already fetched, and decoded in a helper thread while this one is in the
database: the two halves of the work overlap, the order of writes and commits does not change.
"""

from __future__ import annotations

import gc
import logging
import random
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import repeat
from operator import itemgetter
from typing import Any, Protocol

import psycopg2
from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition

from checker_common.errors import first_line
from checker_processing.db import TRANSIENT_ERRORS
from checker_processing.records import Record
from checker_processing.writer import Outcome, Prepared

log = logging.getLogger(__name__)

BACKOFF_FIRST_S = 0.25
BACKOFF_MAX_S = 15.0
# After a stop request, how long a database outage may still hold the last batch.
SHUTDOWN_GRACE_S = 20.0
MAINTENANCE_EVERY_S = 3600.0
MAINTENANCE_RETRY_S = 60.0
# While a batch is prepared beside a write, the writing thread needs the GIL back after every
# database round trip; the default 5 ms switch interval would add up to that much to each.
SWITCH_INTERVAL_S = 0.0005
# New container objects between two runs of the garbage collector while the loop runs.
GC_YOUNG_OBJECTS = 100_000

EXIT_OK = 0
EXIT_GAVE_UP = 1

TopicPartitionKey = tuple[str, int]
_new_record = tuple.__new__
_error_of = Message.error
_topic_of = Message.topic
_partition_of = Message.partition
_offset_of = Message.offset
_key_of = Message.key
_value_of = Message.value
_timestamp_of = Message.timestamp
_second = itemgetter(1)


class BatchWriter(Protocol):
    def prepare(self, records: Sequence[Record]) -> Prepared: ...

    def write(self, records: Sequence[Record], prepared: Prepared | None = None) -> Outcome: ...


class Events:
    """What the loop reports as it goes (metrics, systemd notifications); no-ops here.

    Every method is called from the loop's own thread and must return quickly.
    """

    def tick(self) -> None:
        """The loop is alive: called on every iteration, also while waiting for the database."""

    def polled(self, count: int) -> None:
        """A poll of the main loop returned `count` records (0 too)."""

    def batch_written(self, outcome: Outcome, size: int, seconds: float) -> None:
        """A batch of `size` records is committed in PostgreSQL."""

    def db_unavailable(self, attempt: int, delay: float, held: int) -> None:
        """Writing failed for a transient reason; retry `attempt` follows in `delay` s."""

    def db_back(self, attempts: int) -> None:
        """The batch held through an outage is written."""

    def commit_failed(self) -> None:
        """An offset commit failed (retried later)."""

    def maintenance_failed(self) -> None:
        """Partition maintenance failed (retried later)."""


def backoff(attempt: int, rng: Callable[[], float] = random.random) -> float:
    """Delay before retry number `attempt` (1, 2, ...): 0.25 s doubling to 15 s, +-20 % jitter."""
    base = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (attempt - 1))
    return float(min(BACKOFF_MAX_S, base * (0.8 + 0.4 * rng())))


def next_offsets(records: Sequence[Record]) -> dict[TopicPartitionKey, int]:
    """The offset to commit per partition: one past the highest record (pure)."""
    found: dict[TopicPartitionKey, int] = {}
    for topic, partition, offset, _, _, _ in records:
        key = (topic, partition)
        if offset + 1 > found.get(key, offset):
            found[key] = offset + 1
    return found


@dataclass
class Stats:
    batches: int = 0
    total: Outcome = field(default_factory=Outcome)
    db_retries: int = 0
    commits_failed: int = 0


class Processor:
    """Runs the loop until `stop` is set; `run()` returns the exit status."""

    def __init__(
        self,
        consumer: Any,
        writer: BatchWriter,
        *,
        topics: list[str],
        batch_max_messages: int,
        batch_max_ms: int,
        stop: threading.Event,
        maintenance: Callable[[], None] | None = None,
        events: Events | None = None,
    ) -> None:
        self.consumer = consumer
        self.writer = writer
        self.topics = topics
        self.batch_max_messages = batch_max_messages
        self.batch_timeout_s = batch_max_ms / 1000
        self.stop = stop
        self.maintenance = maintenance
        self.events = events or Events()
        self.stats = Stats()
        # Offsets whose rows are in PostgreSQL but that the broker has not acknowledged yet.
        self.pending: dict[TopicPartitionKey, int] = {}
        self.in_hand: list[Record] = []
        # The next batch, consumed while draining a backlog, and its preparation.
        self.ahead: list[Record] = []
        self.ahead_prepared: Future[Prepared] | None = None
        self.next_maintenance = 0.0
        # Whether the partitions are meant to be paused (a batch held through an outage).
        self.paused = False

    # -- group membership ------------------------------------------------------------------

    def subscribe(self) -> None:
        self.consumer.subscribe(
            self.topics, on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
        )

    def _on_assign(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        """Take the partitions, paused while a batch waits for the database, else running.

        librdkafka keeps a partition's pause through a revocation and a new assignment: a
        partition paused for an outage and assigned again after it (when the resume found
        no assignment to resume) would stay paused for good, while one new to this member
        would come unpaused in the middle of an outage. So the state is set here, after an
        explicit assign() (a pause before it would be undone by the automatic one); this is
        the eager protocol's assign, the one librdkafka uses by default."""
        log.info("assigned %s", _describe(partitions))
        try:
            consumer.assign(partitions)
            if self.paused:
                consumer.pause(partitions)
            else:
                consumer.resume(partitions)
        except KafkaException as exc:
            log.warning("taking the assigned partitions: %s", exc)

    def _on_revoke(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        """Before the partitions go: commit what is written; drop unwritten records of them
        (their new owner starts at the committed offset and reads them again)."""
        revoked = {(p.topic, p.partition) for p in partitions}
        log.info("revoked %s", _describe(partitions))
        self._commit_pending(only=revoked)
        self._forget(revoked)

    def _on_lost(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        lost = {(p.topic, p.partition) for p in partitions}
        log.warning("lost %s (session expired); not committing them", _describe(partitions))
        self._forget(lost)

    def _forget(self, keys: set[TopicPartitionKey]) -> None:
        # New lists: a preparation made from the old ones no longer applies.
        self.in_hand = [r for r in self.in_hand if (r.topic, r.partition) not in keys]
        self.ahead = [r for r in self.ahead if (r.topic, r.partition) not in keys]
        for key in keys:
            self.pending.pop(key, None)

    # -- the loop --------------------------------------------------------------------------

    def run(self) -> int:
        self.subscribe()
        # What exists by now (modules, models, clients) lives as long as the process: out of
        # the collector's way, whose full passes would walk it all again every few batches
        # (preparing a batch: 7.4-7.9 us of CPU per row without, 5.6-5.8 with it frozen;
        # `bench/micro.py prepare-gc`).
        gc.freeze()
        # A batch's records, rows and tuples are tens of thousands of objects that live a
        # batch or two: at the default threshold (700) the collector ran some 140 times per
        # batch of 20,000, promoting them to older generations and walking them again, about
        # a tenth of the CPU per row (`bench/micro.py prepare-gc`). Cyclic garbage is still
        # collected, in larger steps.
        thresholds = gc.get_threshold()
        gc.set_threshold(GC_YOUNG_OBJECTS, *thresholds[1:])
        status = EXIT_OK
        switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        preparer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare")
        try:
            while not self.stop.is_set():
                self.events.tick()
                self._maybe_maintain()
                prepared = None
                if self.ahead:
                    self.in_hand, self.ahead = self.ahead, []
                    prepared = self._prepared_ahead(self.in_hand)
                else:
                    self.in_hand = self._consume(self.batch_max_messages, self.batch_timeout_s)
                self.events.polled(len(self.in_hand))
                if self.pending:
                    self._commit_pending()
                if not self.in_hand:
                    continue
                if len(self.in_hand) >= self.batch_max_messages:
                    self._read_ahead(preparer)
                if not self._write_in_hand(prepared):
                    status = EXIT_GAVE_UP
                    break
        finally:
            # Records read ahead are not written: their offsets are not committed either.
            preparer.shutdown(wait=True, cancel_futures=True)
            sys.setswitchinterval(switch_interval)
            gc.set_threshold(*thresholds)
            if status == EXIT_OK:
                self._commit_pending()
            try:
                # Leaves the group; the revoke callback commits anything still pending.
                self.consumer.close()
            except KafkaException as exc:
                log.warning("closing the consumer: %s", exc)
        log.info(
            "stopped after %d batches: %d stored, %d duplicates, %d rejected",
            self.stats.batches,
            self.stats.total.inserted,
            self.stats.total.duplicates,
            self.stats.total.rejected,
            extra={
                "batches": self.stats.batches,
                "stored": self.stats.total.inserted,
                "duplicates": self.stats.total.duplicates,
                "rejected": self.stats.total.rejected,
            },
        )
        return status

    def _consume(self, count: int, timeout: float) -> list[Record]:
        messages = self.consumer.consume(num_messages=count, timeout=timeout)
        if any(map(_error_of, messages)):  # rare: error events come mixed in with messages
            kept = []
            for message in messages:
                error = message.error()
                if error is None:
                    kept.append(message)
                elif error.code() != KafkaError._PARTITION_EOF:
                    log.warning("consumer error: %s", error, extra={"code": error.name()})
            messages = kept
        # Column by column in C (map over the methods), then one tuple per message without
        # calling Record's own __new__ (Python code): a Python loop costs 0.35 us per message
        # against 0.25 (`bench/micro.py records`), on the loop's critical path. The Kafka
        # timestamp (a tombstone's time) adds about 0.07 us.
        return list(
            map(
                _new_record,
                repeat(Record),
                zip(
                    map(_topic_of, messages),
                    map(_partition_of, messages),
                    map(_offset_of, messages),
                    map(_key_of, messages),
                    map(_value_of, messages),
                    map(_second, map(_timestamp_of, messages)),
                    strict=True,
                ),
            )
        )

    def _read_ahead(self, preparer: ThreadPoolExecutor) -> None:
        """Take the next batch from what is fetched already (no wait) and start preparing it."""
        self.ahead = self._consume(self.batch_max_messages, 0)
        self.ahead_prepared = (
            preparer.submit(self.writer.prepare, self.ahead) if self.ahead else None
        )

    def _prepared_ahead(self, records: list[Record]) -> Prepared | None:
        """The preparation of `records` if it is theirs (none after a revocation changed
        them); the writer prepares again when given none."""
        future, self.ahead_prepared = self.ahead_prepared, None
        if future is None:
            return None
        try:
            prepared = future.result()
        except Exception:  # prepare is pure; should it fail, write() fails the same way
            log.exception("preparing a batch ahead failed")
            return None
        return prepared if prepared.records is records else None

    def _write_in_hand(self, prepared: Prepared | None = None) -> bool:
        """Write the batch in hand, retrying through database outages; then commit offsets.
        False when a stop request outlasted the outage (offsets stay uncommitted)."""
        attempt = 0
        paused = False
        gave_up_at: float | None = None
        try:
            while True:
                started = time.monotonic()
                try:
                    outcome = self.writer.write(self.in_hand, prepared)
                    break
                except TRANSIENT_ERRORS as exc:
                    attempt += 1
                    self.stats.db_retries += 1
                    delay = backoff(attempt)
                    self.events.db_unavailable(attempt, delay, len(self.in_hand))
                    # Expected while the database is away: one line with the reason.
                    log.warning(
                        "database unavailable (attempt %d, retry in %.2fs): %s",
                        attempt,
                        delay,
                        first_line(exc),
                        extra={"attempt": attempt, "batch_size": len(self.in_hand)},
                    )
                    if not paused:
                        self._pause()
                        paused = True
                    if self.stop.is_set():
                        gave_up_at = gave_up_at or time.monotonic() + SHUTDOWN_GRACE_S
                        if time.monotonic() >= gave_up_at:
                            log.error(
                                "stopping with %d records unwritten; offsets not committed",
                                len(self.in_hand),
                            )
                            return False
                    self._idle(delay)
                    if not self.in_hand:
                        # Every partition of the batch was revoked meanwhile.
                        return True
        finally:
            if paused:
                self._resume()
        elapsed = time.monotonic() - started
        if attempt:
            self.events.db_back(attempt)
            log.info("database is back after %d failed attempts; batch written", attempt)
        self.stats.batches += 1
        self.stats.total = self.stats.total + outcome
        self.events.batch_written(outcome, len(self.in_hand), elapsed)
        # Only when logged: the partitions take a pass over the batch.
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "batch %d: %d stored, %d duplicates, %d rejected in %.3fs",
                self.stats.batches,
                outcome.inserted,
                outcome.duplicates,
                outcome.rejected,
                elapsed,
                extra={
                    "batch": self.stats.batches,
                    "batch_size": len(self.in_hand),
                    "stored": outcome.inserted,
                    "duplicates": outcome.duplicates,
                    "rejected": outcome.rejected,
                    "partitions": _partitions_of(self.in_hand),
                },
            )
        for key, offset in next_offsets(self.in_hand).items():
            self.pending[key] = max(self.pending.get(key, 0), offset)
        self.in_hand = []
        self._commit_pending()
        return True

    def _pause(self) -> None:
        self.paused = True
        try:
            assignment = list(self.consumer.assignment())
            if assignment:
                self.consumer.pause(assignment)
        except KafkaException as exc:
            log.warning("pausing partitions: %s", exc)

    def _resume(self) -> None:
        self.paused = False
        try:
            assignment = list(self.consumer.assignment())
            if assignment:
                self.consumer.resume(assignment)
        except KafkaException as exc:
            log.warning("resuming partitions: %s", exc)

    def _idle(self, seconds: float) -> None:
        """Wait while serving the group (rebalances, max.poll.interval.ms). Partitions are
        paused, also those assigned meanwhile; should records come anyway they are kept
        after the batch read ahead and written once the database is back. (Seeking back to
        them instead lost them when the seek failed: the position stayed past them, and
        later commits moved the offset over them.)"""
        deadline = time.monotonic() + seconds
        while True:
            self.events.tick()
            left = deadline - time.monotonic()
            if left <= 0:
                return
            stray = self._consume(self.batch_max_messages, min(left, 1.0))
            if stray:
                # A new list: a preparation of the old one no longer applies. Within each
                # partition these follow what is in hand and ahead (or, after a revocation
                # dropped those, start again at the committed offset).
                self.ahead = [*self.ahead, *stray]
                log.info(
                    "kept %d records delivered while paused; pausing %s",
                    len(stray),
                    _partitions_of(stray),
                )
                self._pause()

    def _commit_pending(self, only: set[TopicPartitionKey] | None = None) -> None:
        # Never commit for a partition this member no longer owns: it would move its new
        # owner's position.
        assigned = {(tp.topic, tp.partition) for tp in self.consumer.assignment()}
        for key in [k for k in self.pending if k not in assigned]:
            del self.pending[key]
        todo = {k: v for k, v in self.pending.items() if only is None or k in only}
        if not todo:
            return
        offsets = [TopicPartition(t, p, o) for (t, p), o in todo.items()]
        try:
            self.consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            # The rows are stored; a redelivery would be a harmless duplicate. Retry later.
            self.stats.commits_failed += 1
            self.events.commit_failed()
            log.warning("offset commit failed, will retry: %s", exc)
            return
        for key, offset in todo.items():
            if self.pending.get(key) == offset:
                del self.pending[key]

    def _maybe_maintain(self) -> None:
        if self.maintenance is None or time.monotonic() < self.next_maintenance:
            return
        try:
            self.maintenance()
        except psycopg2.Error as exc:
            # Ingestion goes on; old partitions can wait for the next try.
            self.events.maintenance_failed()
            log.warning("partition maintenance failed, retrying later: %s", first_line(exc))
            self.next_maintenance = time.monotonic() + MAINTENANCE_RETRY_S
        else:
            self.next_maintenance = time.monotonic() + MAINTENANCE_EVERY_S


def _partitions_of(records: Sequence[Record]) -> str:
    """The offsets of a batch as "topic/partition:first-last, ...", for its log line (pure)."""
    spans: dict[TopicPartitionKey, tuple[int, int]] = {}
    for r in records:
        low, high = spans.get((r.topic, r.partition), (r.offset, r.offset))
        spans[(r.topic, r.partition)] = (min(low, r.offset), max(high, r.offset))
    return ", ".join(f"{t}/{p}:{lo}-{hi}" for (t, p), (lo, hi) in sorted(spans.items()))


def _describe(partitions: list[TopicPartition]) -> str:
    return ", ".join(f"{p.topic}/{p.partition}" for p in partitions) or "nothing"
