"""Unique task names across checker nodes (cluster mode): claims on a one-partition topic.

The names topic (`KAFKA_TASK_NAMES_TOPIC`, compacted, one partition: one total order that
every node reads alike) holds claims::

    key   = "<name>\\n<task id>"   (a name holds no control character, so "\\n" separates)
    value = {"task_id": ..., "name": ..., "claimed_at": ...}, or null: the claim is released

The rule, the same on every node because it depends only on the order of the log: a claim
wins when no other task's live claim holds the name at the moment it is appended; a claim
that arrives while another task's claim holds the name is lost for ever, even if that one is
released later (a node that waits for its claim knows the answer once it has read that far).
A task claiming a name it already holds wins again (a PUT repeated through another node).

`NameClaims` applies the records in log order and answers "did the claim at offset X win?";
it is pure (no I/O), so the same code reads the topic at start and live.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

import orjson

from checker_common.ids import parse_id

log = logging.getLogger(__name__)

NAME_SEPARATOR = "\n"
# A winning claim whose task record never came (its writer died in between) is released by
# any node after this long.
ORPHAN_AFTER = 300.0
# Outcomes kept for the claims read most recently: a node waits for its own claim's outcome
# seconds after appending it, never after this many later claims.
RECENT_OUTCOMES = 100_000


def claim_key(name: str, task_id: uuid.UUID) -> bytes:
    return f"{name}{NAME_SEPARATOR}{task_id}".encode()


def claim_value(name: str, task_id: uuid.UUID, now: datetime) -> bytes:
    return orjson.dumps(
        {"task_id": str(task_id), "name": name, "claimed_at": now.astimezone(UTC).isoformat()}
    )


def parse_key(key: bytes | None) -> tuple[str, uuid.UUID] | None:
    """(name, task id) of a claim's key; None when it is not one."""
    if key is None:
        return None
    try:
        name, _, raw_id = key.decode("utf-8").rpartition(NAME_SEPARATOR)
        return (name, parse_id(raw_id)) if name else None
    except (UnicodeDecodeError, ValueError):
        return None


@dataclass(frozen=True, slots=True)
class Holder:
    task_id: uuid.UUID
    claimed_at: float  # epoch seconds, from the claim (or when it was read, if it has none)


class NameClaims:
    """Who holds each name, from the claims read so far in log order."""

    def __init__(self) -> None:
        self.holders: dict[str, Holder] = {}
        # offset of a claim -> (its name and task, whether it won); the most recent ones (a
        # dict keeps their order)
        self._outcomes: dict[int, tuple[str, uuid.UUID, bool]] = {}
        self.next_offset = 0

    def apply(self, offset: int, key: bytes | None, value: bytes | None, now: float) -> bool:
        """Apply one record of the names topic; False when it is not a claim (ignored)."""
        self.next_offset = max(self.next_offset, offset + 1)
        parsed = parse_key(key)
        if parsed is None:
            return False
        name, task_id = parsed
        holder = self.holders.get(name)
        if value is None:  # released; a lost claim released changes nothing
            if holder is not None and holder.task_id == task_id:
                del self.holders[name]
            return True
        won = holder is None or holder.task_id == task_id
        if holder is None:
            self.holders[name] = Holder(task_id, _claimed_at(value, now))
        self._outcomes[offset] = (name, task_id, won)
        if len(self._outcomes) > RECENT_OUTCOMES:
            del self._outcomes[next(iter(self._outcomes))]
        return True

    def won(self, name: str, task_id: uuid.UUID, offset: int) -> bool | None:
        """Whether the claim of `name` by `task_id` appended at `offset` won; None while that
        offset has not been read. A claim not found there (where the broker said it was) is
        not taken for a win."""
        if offset >= self.next_offset:
            return None
        found = self._outcomes.get(offset)
        if found is None or found[:2] != (name, task_id):
            log.error(
                "name claim of %r by task %s not found at offset %d (found %s): taken as lost",
                name, task_id, offset, found,
            )  # fmt: skip
            return False
        return found[2]

    def holder(self, name: str) -> uuid.UUID | None:
        found = self.holders.get(name)
        return None if found is None else found.task_id

    def orphans(self, names_of: dict[uuid.UUID, str], now: float) -> list[tuple[str, uuid.UUID]]:
        """Winning claims older than ORPHAN_AFTER whose task does not (or no longer) carry the
        name: (name, task id) to release. `names_of` is every task's name in the view."""
        return [
            (name, holder.task_id)
            for name, holder in self.holders.items()
            if now - holder.claimed_at > ORPHAN_AFTER and names_of.get(holder.task_id) != name
        ]


def _claimed_at(value: bytes, now: float) -> float:
    try:
        document = orjson.loads(value)
        return datetime.fromisoformat(str(document["claimed_at"])).timestamp()
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return now
