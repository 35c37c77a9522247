"""The producer of cluster mode's own records against the real broker: many records produced
together (a handover's state records) all land, each in its key's partition, and a record the
producer refuses is counted, never taken for written."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from checker.nodes import Topics, node_settings, read_topic

from periodic_checker.task_topic import RecordProducer

from conftest import KafkaTarget
from helpers import broker_cut

pytestmark = pytest.mark.kafka


@contextlib.asynccontextmanager
async def running(
    kafka: KafkaTarget, topics: Topics, tmp_path: Path, **options: Any
) -> AsyncIterator[RecordProducer]:
    """A started producer of node-a's records, closed after the block."""
    producer = RecordProducer(node_settings(kafka, topics, tmp_path), **options)
    producer.start()
    try:
        yield producer
    finally:
        await producer.close()


def partition_of(kafka: KafkaTarget, topic: str, key: bytes) -> int:
    """The partition of the first record under `key` on the topic."""
    records = read_topic(kafka, topic)
    return next(partition for partition, _, k, _ in records if k == key)


async def test_records_produced_together_all_land_each_in_its_keys_partition(
    kafka: KafkaTarget, topics: Topics, tmp_path: Path
) -> None:
    records = [(f"task-{n}".encode(), f"state {n}".encode()) for n in range(3000)]
    async with running(kafka, topics, tmp_path) as producer:
        assert await producer.produce_all(topics.states, records) == 0
        # One more alone, the way `produce` writes a record: the same partition for its key.
        alone = await producer.produce(topics.states, b"task-7", b"alone")
    landed = read_topic(kafka, topics.states)
    assert sorted((k, v) for _, _, k, v in landed if v != b"alone") == sorted(records)
    assert partition_of(kafka, topics.states, b"task-7") == alone[0]
    # Each partition holds its records in the order they were given.
    given = {key: n for n, (key, _) in enumerate(records)}
    for partition in {p for p, _, _, _ in landed}:
        order = [given[k] for p, _, k, v in sorted(landed) if p == partition and v != b"alone"]
        assert order == sorted(order)


async def test_a_record_the_producer_refuses_is_counted_and_the_others_land(
    kafka: KafkaTarget, topics: Topics, tmp_path: Path
) -> None:
    # Larger than the producer's message.max.bytes (librdkafka's 1,000,000): refused at once.
    too_large = b"x" * 2_000_000
    records = [(b"a", b"1"), (b"b", too_large), (b"c", b"3"), (b"d", too_large), (b"e", b"5")]
    async with running(kafka, topics, tmp_path) as producer:
        assert await producer.produce_all(topics.states, records) == 2
    landed = sorted((k, v) for _, _, k, v in read_topic(kafka, topics.states))
    assert landed == [(b"a", b"1"), (b"c", b"3"), (b"e", b"5")]


async def test_nothing_to_produce_is_answered_at_once(
    kafka: KafkaTarget, topics: Topics, tmp_path: Path
) -> None:
    async with running(kafka, topics, tmp_path) as producer:
        assert await producer.produce_all(topics.states, []) == 0
    assert read_topic(kafka, topics.states) == []


async def test_records_the_broker_never_answers_count_once_and_the_next_ones_land(
    kafka: KafkaTarget, topics: Topics, tmp_path: Path
) -> None:
    broker = kafka.require_local()
    # A short delivery time-out: the broker away, librdkafka gives up on each record after it.
    async with running(kafka, topics, tmp_path, timeout_ms=2000) as producer:
        with broker_cut(broker):
            assert await producer.produce_all(topics.states, [(b"a", b"1"), (b"b", b"2")]) == 2
        # Back: the records that timed out are not sent again; the next ones land (through a
        # new producer: the old one's idempotence state is broken after a time-out).
        assert await producer.produce_all(topics.states, [(b"c", b"3")]) == 0
    assert sorted((k, v) for _, _, k, v in read_topic(kafka, topics.states)) == [(b"c", b"3")]
