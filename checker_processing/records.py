"""One Kafka message as the processor reads it, and the reason one was set aside."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import NamedTuple


class Record(NamedTuple):
    """One Kafka message as read: where it was, its raw bytes and its Kafka timestamp (a
    tuple: one is built per message consumed, and a frozen dataclass costs twice as much to
    build: `bench/micro.py tuple`)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    # Milliseconds since the epoch (the producer's create time or the broker's append time);
    # 0 or less when the broker gave none.
    timestamp: int | None = None


@dataclass(frozen=True)
class Rejection:
    record: Record
    error: str


def kafka_time(record: Record) -> datetime | None:
    """The record's Kafka timestamp as a UTC time, None when it has none (pure)."""
    if record.timestamp is None or record.timestamp <= 0:
        return None
    return datetime.fromtimestamp(record.timestamp / 1000, UTC)
