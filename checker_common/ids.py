"""Ids: result ids that sort by time, and task ids read from their text.

Result ids are UUID version 7 (RFC 9562), made from the check's start.

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
# Bound once for `canonical_id`: without them its saving is gone in the look-ups.
_new, _set, _UUID, _UNKNOWN = object.__new__, object.__setattr__, uuid.UUID, uuid.SafeUUID.unknown


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


def canonical_id(text: str) -> uuid.UUID | None:
    """The UUID `uuid.UUID(text)` reads from `text` spelled as `str(uuid)` spells one (36
    characters, 32 hexadecimal digits once the hyphens are gone), without its steps for the
    forms such a text never has (braces, `urn:uuid:`): about 0.6 us less. None for any other
    text (which `uuid.UUID` may still read, or refuse)."""
    digits = text.replace("-", "")
    if len(text) != 36 or len(digits) != 32:
        return None
    try:
        number = int(digits, 16)  # what `uuid.UUID` does with the same 32 characters
    except ValueError:
        return None
    made = _new(_UUID)
    _set(made, "int", number)
    _set(made, "is_safe", _UNKNOWN)
    return made


def parse_id(text: str) -> uuid.UUID:
    """`uuid.UUID(text)`: the same UUID, or the same ValueError; quicker for the usual spelling
    (`canonical_id`). A cluster node reads 100,000 task ids at start from the task topic's
    keys and as many from the names topic's."""
    found = canonical_id(text)
    return found if found is not None else _UUID(text)
