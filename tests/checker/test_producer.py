"""The result publisher loses nothing: broker outages, restarts and long outages, for real.

Every test talks to the real broker over mutual TLS; outages cut the TLS proxy while the
broker keeps its data. Results carry a per-task sequence number in `attempt`, so the order in
which one task's results landed can be read back from the topic.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest
from checker.nodes import read_topic as read_records
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition

from checker_common.contract import CheckResult, decode, encode
from periodic_checker.outbox import Outbox
from periodic_checker.producer import PublisherStats, ResultPublisher, counted_failures
from periodic_checker.settings import CheckerSettings

from conftest import KafkaTarget
from helpers import broker_cut, tasks_topic_of

pytestmark = pytest.mark.kafka

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = jsonschema.Draft202012Validator(
    json.loads((ROOT / "schema" / "result-message.schema.json").read_text())
)
MESSAGE_TIMEOUT_MS = 3000
DEADLINE = 90.0
END_MARKER = b"end-of-test"


@pytest.fixture
def settings(kafka: KafkaTarget, topic: str, tmp_path: Path) -> CheckerSettings:
    env: dict[str, Any] = {k.lower(): v for k, v in kafka.env().items()}
    return CheckerSettings(
        **env,
        kafka_topic=topic,
        task_storage=tmp_path / "tasks.sqlite3",
        kafka_message_timeout_ms=MESSAGE_TIMEOUT_MS,
    )


@dataclass
class Sent:
    """What the test published: result_id -> (task_id, per-task sequence number)."""

    results: dict[uuid.UUID, tuple[uuid.UUID, int]]

    def publish_round(self, publisher: ResultPublisher, tasks: list[uuid.UUID], n: int) -> None:
        for task in tasks:
            result = a_result(n)
            self.results[result.result_id] = (task, n)
            publisher.publish(task, result)


def a_result(sequence: int) -> CheckResult:
    return CheckResult(
        result_id=uuid.uuid4(),
        name="site",
        url="http://127.0.0.1:9/",
        timestamp=datetime.now(UTC),
        attempt=sequence,
        status=200,
        load_time=0.012,
        ok=True,
    )


async def wait_for(
    publisher: ResultPublisher, condition: Callable[[PublisherStats], bool], what: str
) -> PublisherStats:
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        stats = publisher.stats()
        if condition(stats):
            return stats
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting until {what}: {publisher.stats()}")


def settled(stats: PublisherStats) -> bool:
    return stats.outbox_size == 0 and stats.queue_length == 0 and stats.in_flight == 0


def read_topic(kafka: KafkaTarget, topic: str) -> list[tuple[int, int, bytes, bytes]]:
    """Every message now in the topic: (partition, offset, key, value).

    Called once the publisher is closed. An end marker written to each partition bounds the
    read (this broker's high watermarks lag), so late duplicates would still be seen.
    """
    marker = Producer(kafka.client_config())
    partitions = sorted(marker.list_topics(topic, timeout=10).topics[topic].partitions)
    for p in partitions:
        marker.produce(topic, key=END_MARKER, value=b"{}", partition=p)
    assert marker.flush(30) == 0
    consumer = Consumer(
        kafka.client_config(
            **{
                "group.id": f"reader-{uuid.uuid4().hex[:8]}",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "session.timeout.ms": 6000,
                "heartbeat.interval.ms": 1000,
                "fetch.queue.backoff.ms": 10,
            }
        )
    )
    try:
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        found: list[tuple[int, int, bytes, bytes]] = []
        done: set[int] = set()
        deadline = time.monotonic() + DEADLINE
        while len(done) < len(partitions):
            assert time.monotonic() < deadline, f"read {len(found)} messages, ends in {done}"
            message = consumer.poll(0.5)
            if message is None:
                continue
            assert message.error() is None, message.error()
            partition, offset = message.partition(), message.offset()
            key, value = message.key(), message.value()
            assert partition is not None
            assert offset is not None
            assert key
            assert value
            if key == END_MARKER:
                done.add(partition)
            else:
                found.append((partition, offset, key, value))
        return found
    finally:
        consumer.close()


def assert_all_arrived_once_in_order(
    found: list[tuple[int, int, bytes, bytes]], sent: Sent
) -> None:
    per_task: dict[uuid.UUID, list[int]] = defaultdict(list)
    counts: Counter[uuid.UUID] = Counter()
    for _partition, _offset, key, value in sorted(found):
        SCHEMA.validate(orjson.loads(value))
        decoded = decode(value)
        assert key == str(decoded.task_id).encode(), "keyed by task id"
        counts[decoded.result.result_id] += 1
        per_task[decoded.task_id].append(decoded.result.attempt)
    duplicates = {rid: n for rid, n in counts.items() if n > 1}
    assert not duplicates, f"{len(duplicates)} results arrived more than once"
    assert set(counts) == set(sent.results), "every result arrived, nothing else"
    expected: dict[uuid.UUID, list[int]] = defaultdict(list)
    for task, sequence in sent.results.values():
        expected[task].append(sequence)
    for task, sequences in per_task.items():
        # One key lands in one partition; sorting by (partition, offset) gives topic order.
        assert sequences == sorted(expected[task]), f"task {task} out of order: {sequences}"


async def test_published_results_all_arrive_keyed_by_task_and_valid(
    kafka: KafkaTarget, topic: str, settings: CheckerSettings
) -> None:
    outbox = Outbox(settings.task_storage)
    publisher = ResultPublisher(settings, outbox)
    await publisher.start()
    tasks = [uuid.uuid4() for _ in range(50)]
    sent = Sent({})
    try:
        for n in range(1, 5):
            sent.publish_round(publisher, tasks, n)
            await wait_for(publisher, settled, f"round {n} delivered")
        stats = publisher.stats()
    finally:
        await publisher.close(timeout=10)
        outbox.close()

    assert stats.delivered == 200
    assert stats.failed == 0
    assert stats.stored == 0, "with the broker up, nothing needed the outbox"
    assert stats.broker_reachable is True
    assert stats.last_delivered_at is not None
    assert_all_arrived_once_in_order(read_topic(kafka, topic), sent)


async def test_a_burst_for_many_tasks_drains_in_order_then_tasks_send_directly_again(
    kafka: KafkaTarget, topic: str, settings: CheckerSettings
) -> None:
    outbox = Outbox(settings.task_storage)
    publisher = ResultPublisher(settings, outbox)
    await publisher.start()
    tasks = [uuid.uuid4() for _ in range(200)]
    sent = Sent({})
    try:
        for n in range(1, 21):  # a burst: 20 results per task before any report
            sent.publish_round(publisher, tasks, n)
        burst = publisher.stats()
        # Each task's later results queue behind its first; the chains empty the outbox.
        await wait_for(publisher, settled, "the burst delivered and the outbox empty")
        stored_by_burst = publisher.stats().stored
        sent.publish_round(publisher, tasks, 21)
        await wait_for(publisher, settled, "one more round delivered")
        stats = publisher.stats()
    finally:
        await publisher.close(timeout=10)
        outbox.close()

    assert burst.in_flight == 200, "the first result of each task went straight to librdkafka"
    assert stored_by_burst == 200 * 19, "the rest queued behind it in the outbox"
    assert stats.stored == stored_by_burst, "with the backlog gone, every task sends directly"
    assert stats.delivered == 200 * 21
    assert stats.failed == 0
    assert_all_arrived_once_in_order(read_topic(kafka, topic), sent)


async def test_outage_longer_than_the_message_timeout_loses_nothing(
    kafka: KafkaTarget, topic: str, settings: CheckerSettings, caplog: pytest.LogCaptureFixture
) -> None:
    broker = kafka.require_local()
    outbox = Outbox(settings.task_storage)
    publisher = ResultPublisher(settings, outbox)
    await publisher.start()
    tasks = [uuid.uuid4() for _ in range(10)]
    sent = Sent({})
    caplog.set_level(logging.WARNING, logger="periodic_checker.producer")
    try:
        sent.publish_round(publisher, tasks, 1)
        await wait_for(publisher, settled, "first round delivered")
        with broker_cut(broker):
            for n in range(2, 6):
                sent.publish_round(publisher, tasks, n)
            # The first of each task waited in librdkafka and timed out; all 40 are on disk.
            during = await wait_for(
                publisher, lambda s: s.outbox_size == 40 and s.failed >= 10, "all in the outbox"
            )
        await wait_for(publisher, settled, "outbox drained after the outage")
        after = publisher.stats()
    finally:
        await publisher.close(timeout=10)
        outbox.close()

    assert during.broker_reachable is False
    assert after.broker_reachable is True
    assert after.delivered >= 50
    failed_ids = [r.getMessage() for r in caplog.records if "delivery failed" in r.getMessage()]
    first_of_task = {rid for rid, (_t, n) in sent.results.items() if n == 2}
    assert all(any(str(rid) in line for line in failed_ids) for rid in first_of_task), (
        "each failed delivery is logged with its result_id"
    )
    assert_all_arrived_once_in_order(read_topic(kafka, topic), sent)


async def test_thousands_of_rows_from_a_long_outage_drain_once_and_in_order(
    kafka: KafkaTarget, topic: str, settings: CheckerSettings
) -> None:
    broker = kafka.require_local()
    outbox = Outbox(settings.task_storage)
    publisher = ResultPublisher(settings, outbox)
    await publisher.start()
    tasks = [uuid.uuid4() for _ in range(200)]
    rounds = 15
    sent = Sent({})
    try:
        with broker_cut(broker):
            for n in range(1, rounds + 1):
                sent.publish_round(publisher, tasks, n)
            # Longer than the message time-out: the first of each task failed and is stored
            # in front of the task's later results.
            during = await wait_for(
                publisher,
                lambda s: s.outbox_size == 200 * rounds and s.failed >= 200,
                "everything in the outbox",
            )
        await wait_for(publisher, settled, "outbox drained after the outage")
        after = publisher.stats()
    finally:
        await publisher.close(timeout=10)
        outbox.close()

    assert during.broker_reachable is False
    assert after.broker_reachable is True
    assert after.delivered == 200 * rounds
    assert_all_arrived_once_in_order(read_topic(kafka, topic), sent)


async def test_results_unsent_at_shutdown_are_sent_after_a_restart(
    kafka: KafkaTarget, topic: str, settings: CheckerSettings
) -> None:
    broker = kafka.require_local()
    tasks = [uuid.uuid4() for _ in range(10)]
    sent = Sent({})
    outbox = Outbox(settings.task_storage)
    publisher = ResultPublisher(settings, outbox)
    await publisher.start()
    with broker_cut(broker):
        try:
            sent.publish_round(publisher, tasks, 1)
            sent.publish_round(publisher, tasks, 2)
            sent.publish_round(publisher, tasks, 3)
            in_librdkafka = publisher.stats().in_flight
        finally:
            # Shorter than the message time-out: the first of each task is still in librdkafka.
            await publisher.close(timeout=1.0)
        assert in_librdkafka == 10
        assert outbox.size() == 30, "close() stored what librdkafka still held"
        outbox.close()

        outbox = Outbox(settings.task_storage)
        publisher = ResultPublisher(settings, outbox)
        await publisher.start()
    try:
        await wait_for(publisher, settled, "outbox drained after the restart")
    finally:
        await publisher.close(timeout=10)
        outbox.close()

    assert_all_arrived_once_in_order(read_topic(kafka, topic), sent)


async def test_a_long_outage_keeps_memory_bounded_and_the_rest_on_disk(
    kafka: KafkaTarget, topic: str, settings: CheckerSettings
) -> None:
    broker = kafka.require_local()
    cap = 20
    outbox = Outbox(settings.task_storage)
    publisher = ResultPublisher(settings, outbox, max_in_flight=cap)
    await publisher.start()
    tasks = [uuid.uuid4() for _ in range(300)]
    sent = Sent({})
    most_in_memory = 0
    try:
        with broker_cut(broker):
            for task in tasks:
                sent.publish_round(publisher, [task], 1)
                stats = publisher.stats()
                most_in_memory = max(most_in_memory, stats.in_flight)
            # librdkafka got the first `cap`; the other 280 went to disk without waiting.
            on_disk = await wait_for(publisher, lambda s: s.outbox_size >= 280, "rest on disk")
            most_in_memory = max(most_in_memory, on_disk.in_flight)
            assert on_disk.stored >= 280

        async def watch() -> None:
            nonlocal most_in_memory
            while True:
                most_in_memory = max(most_in_memory, publisher.stats().in_flight)
                await asyncio.sleep(0.01)

        watcher = asyncio.create_task(watch())
        try:
            await wait_for(publisher, settled, "outbox drained after the outage")
        finally:
            watcher.cancel()
            with pytest.raises(asyncio.CancelledError):
                await watcher
    finally:
        await publisher.close(timeout=10)
        outbox.close()

    assert most_in_memory <= cap
    assert_all_arrived_once_in_order(read_topic(kafka, topic), sent)


async def test_results_published_before_start_or_after_close_are_kept(
    settings: CheckerSettings,
) -> None:
    outbox = Outbox(settings.task_storage)
    publisher = ResultPublisher(settings, outbox)
    task = uuid.uuid4()
    publisher.publish(task, a_result(1))  # not started: nothing to send with yet
    await publisher.close(timeout=1)
    publisher.publish(task, a_result(2))  # closed: written to the outbox at once
    rows = outbox.head(10)
    outbox.close()

    assert [decode(r.value).result.attempt for r in rows] == [1, 2]


# --- a message refused for good does not block its task ----------------------------------------

SMALL_MESSAGES = 4096  # message.max.bytes of the producer below


class SmallMessagePublisher(ResultPublisher):
    """A producer whose limit a result can pass: a long URL makes a message too large."""

    def producer_config(self) -> dict[str, Any]:
        return {**super().producer_config(), "message.max.bytes": SMALL_MESSAGES}


def a_huge_result(sequence: int) -> CheckResult:
    return a_result(sequence).model_copy(update={"url": "http://127.0.0.1:9/" + "x" * 8000})


@pytest.mark.parametrize("path", ["from the outbox", "sent directly"])
async def test_a_result_refused_for_its_size_is_set_aside_and_its_tasks_later_results_flow(
    kafka: KafkaTarget,
    topic: str,
    settings: CheckerSettings,
    caplog: pytest.LogCaptureFixture,
    path: str,
) -> None:
    caplog.set_level(logging.WARNING, logger="periodic_checker.producer")
    task, other = uuid.uuid4(), uuid.uuid4()
    huge = a_huge_result(1)
    sent = Sent({})
    outbox = Outbox(settings.task_storage)
    if path == "from the outbox":
        # Left by an earlier run (a larger limit then): it heads its task's queue at start.
        later = [a_result(2), a_result(3)]
        outbox.add([(task, *encode(task, r)) for r in [huge, *later]])
        sent.results.update({r.result_id: (task, r.attempt) for r in later})
    publisher = SmallMessagePublisher(settings, outbox)
    await publisher.start()
    try:
        if path == "sent directly":
            publisher.publish(task, huge)
        for sequence in (4, 5):
            for who in (task, other):
                result = a_result(sequence)
                sent.results[result.result_id] = (who, sequence)
                publisher.publish(who, result)
        stats = await wait_for(
            publisher, lambda s: settled(s) and s.set_aside_size == 1, "the task's results flow"
        )
    finally:
        await publisher.close(timeout=10)
    aside = outbox.set_aside_rows()
    outbox.close()

    assert_all_arrived_once_in_order(read_topic(kafka, topic), sent)
    assert (stats.set_aside, stats.outbox_size) == (1, 0)
    [(_, aside_task, reason, value)] = aside
    assert (aside_task, decode(value).result.result_id) == (task, huge.result_id)
    assert "too large" in reason.lower()
    assert f"result set aside, it cannot be delivered: task_id={task}" in caplog.text
    assert str(huge.result_id) in caplog.text


@pytest.mark.parametrize(
    ("code", "counted", "others_delivered", "after"),
    [
        (KafkaError.MSG_SIZE_TOO_LARGE, 0, False, None),  # refused for good: at once
        (KafkaError.INVALID_RECORD, 0, False, None),
        (KafkaError._MSG_TIMED_OUT, 4, True, 4),  # the broker away: never the message
        (KafkaError._ALL_BROKERS_DOWN, 4, True, 4),
        (KafkaError._PURGE_QUEUE, 4, True, 4),
        (KafkaError.PRODUCER_FENCED, 4, True, 4),
        (KafkaError.TOPIC_AUTHORIZATION_FAILED, 4, False, 4),  # every message fails alike
        (KafkaError.TOPIC_AUTHORIZATION_FAILED, 3, True, 4),  # others go through: it counts
        (KafkaError.TOPIC_AUTHORIZATION_FAILED, 4, True, None),  # the fifth: set aside
    ],
)
def test_a_failure_counts_against_the_message_only_while_others_are_delivered(
    code: int, counted: int, others_delivered: bool, after: int | None
) -> None:
    assert counted_failures(code, counted, others_delivered) == after


@dataclass
class Events:
    """What the publisher tells of task records (`producer.RecordEvents`)."""

    safe: list[Any]
    delivered: list[tuple[uuid.UUID, int, int]]

    def records_safe(self, tags: list[Any]) -> None:
        self.safe += tags

    def record_delivered(self, task_id: uuid.UUID, partition: int, offset: int) -> None:
        self.delivered.append((task_id, partition, offset))


async def test_task_records_wait_with_their_tasks_results_and_arrive_in_order(
    kafka: KafkaTarget, topic: str, settings: CheckerSettings
) -> None:
    broker = kafka.require_local()
    records_topic = tasks_topic_of(topic)
    settings = settings.model_copy(update={"kafka_tasks_topic": records_topic})
    outbox = Outbox(settings.task_storage)
    publisher = ResultPublisher(settings, outbox)
    events = Events([], [])
    publisher.record_events = events
    await publisher.start()
    task = uuid.uuid4()
    try:
        with broker_cut(broker):
            publisher.publish_record(task, b'{"n": 1}', tag="first")
            publisher.publish(task, a_result(1))
            publisher.publish_record(task, b'{"n": 2}', tag="second")
            publisher.publish_record(task, None, tag="removed")  # a tombstone
            assert publisher.records_pending(task)
            # librdkafka gives up on them (a short message time-out): they go to the outbox,
            # where they are safe from a crash.
            await wait_for(publisher, lambda s: s.outbox_size == 4, "all four in the outbox")
            # Told once the step that stored them is back on the event loop: a moment after
            # its commit, which the outbox's size already counts.
            await wait_for(publisher, lambda _: len(events.safe) >= 3, "the records told safe")
            assert sorted(events.safe) == ["first", "removed", "second"]
        await wait_for(publisher, settled, "the outbox drained")
        assert not publisher.records_pending(task)
    finally:
        await publisher.close(timeout=10)
        outbox.close()

    records = [(offset, value) for _, offset, key, value in read_any(kafka, records_topic) if key]
    assert [value for _, value in sorted(records)] == [b'{"n": 1}', b'{"n": 2}', None]
    assert [offset for _, _, offset in events.delivered] == sorted(o for o, _ in records)
    assert {t for t, _, _ in events.delivered} == {task}
    assert len(read_topic(kafka, topic)) == 1  # the result, on the results topic


def read_any(kafka: KafkaTarget, topic: str) -> list[tuple[int, int, bytes | None, bytes | None]]:
    """Every record of a topic, tombstones included (`read_topic` reads results only)."""
    return read_records(kafka, topic)
