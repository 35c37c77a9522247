"""Result ids that sort by time: UUID version 7 (RFC 9562), made from the check's start.

A random (version 4) id lands anywhere in every B-tree that holds it: the processor's
`result_ids` primary key and `check_results`' (result_id, checked_at) key. Ids that grow with
time are appended at the end of those indexes instead: with them PostgreSQL spent about a
third less CPU per row, 0.78 against 1.12 s per 100,000 for a raw COPY of 1,000,000 results
and 1.15 against 1.77 for the processor's statements (`bench/ingest.py throughput --ids
time-ordered` and `--ids random`, BENCHMARKS.md "Ingest"). Made from the same instant as the
result's `timestamp`, the id also names the day the result is stored in.
"""

from __future__ import annotations

import os
import uuid
from datetime import datetime

_VERSION_7 = 0x7 << 76
_VARIANT = 0b10 << 62


def uuid7(at: datetime) -> uuid.UUID:
    """A version 7 UUID: `at` in Unix milliseconds (48 bits), then 74 random bits."""
    millis = int(at.timestamp() * 1000) & ((1 << 48) - 1)
    rand = int.from_bytes(os.urandom(10), "big")  # 80 bits, 74 used
    rand_a = rand >> 68  # 12 bits
    rand_b = rand & ((1 << 62) - 1)  # 62 bits
    return uuid.UUID(int=(millis << 80) | _VERSION_7 | (rand_a << 64) | _VARIANT | rand_b)


def uuid7_millis(value: uuid.UUID) -> int | None:
    """The Unix milliseconds a version 7 UUID was made at; None for another version."""
    if value.version != 7:
        return None
    return value.int >> 80
