"""The result message: the one contract between the checker and the processor.

On the wire a result is a Kafka message keyed by the task id (UTF-8) whose value is UTF-8 JSON
with the task id as its only top-level key::

    {"<task_id>": {"name": ..., "timestamp": ..., "status": 200, "load_time": 0.59,
                   "pattern_search": "match", "result_id": ..., "schema_version": 1, ...}}

`encode()` builds that, `decode()` reads it back (also the first version's shape, which had no
`result_id`), and `json_schema()` describes it. Nothing else spells these fields.

`node` names the checker node that ran the check (its CHECKER_NODE_ID). It came after
`schema_version` 1 and is optional in it: a result of an earlier checker has none (the
processor stores NULL), and an earlier processor ignores it (the model ignores unknown fields).

A result carries no secret of its task. `url` and `final_url` have the password of their user
info replaced by `***` (`https://user:***@host/`), and a user info without a password (often a
token) as a whole (`https://***@host/`), by `checker_common.redact.redact_url`; the password
itself went to the target as basic auth. The values of the task's secret headers
(Authorization, Cookie, Proxy-Authorization and its `secret_headers`) and its URL password are
also replaced by `***` wherever a server or an error put them into `final_url` or
`error.message`. Consumers store what they receive: PostgreSQL never holds these secrets.
"""

from __future__ import annotations

import contextlib
import re
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from enum import StrEnum
from functools import partial
from itertools import repeat
from operator import attrgetter, is_not, itemgetter
from typing import Annotated, Any, Literal, NamedTuple, Protocol

import msgspec
import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

SCHEMA_VERSION = 1
# Results from the first checker carry no result_id; theirs is derived from where they were
# read (topic, partition, offset) under this namespace, so a redelivery gets the same id.
LEGACY_NAMESPACE = uuid.UUID("6f1c52e4-8d0b-4c4e-9a57-0c8f3b1d2a10")
LEGACY_TIMESTAMP_FORMAT = "%m/%d/%y - %H:%M:%S"
DEFAULT_MAX_MESSAGE_BYTES = 1_048_576


class PatternResult(StrEnum):
    MATCH = "match"
    NO_MATCH = "no_match"


class Health(StrEnum):
    UNKNOWN = "unknown"
    UP = "up"
    DOWN = "down"


class ErrorKind(StrEnum):
    """Why a check failed. Kinds are data, never exceptions."""

    DNS = "dns"
    CONNECT = "connect"
    TLS = "tls"
    TIMEOUT = "timeout"
    TOO_MANY_REDIRECTS = "too_many_redirects"
    BODY_TOO_LARGE = "body_too_large"
    INVALID_RESPONSE = "invalid_response"
    DENIED_TARGET = "denied_target"
    STATUS = "status"
    PATTERN = "pattern"
    # The check's time-out ran out while the pattern was being searched (or waited for a
    # search thread): the response itself was fine.
    PATTERN_TIMEOUT = "pattern_timeout"
    # Not a verdict on the target: the checker itself held the check up past its time-out
    # (a stalled event loop, a full DNS pool). Such a result moves no health and no incident.
    CHECKER_OVERLOADED = "checker_overloaded"


# Kinds that say nothing about the target: stored, but they move neither health nor incidents.
NOT_JUDGED: frozenset[ErrorKind] = frozenset({ErrorKind.CHECKER_OVERLOADED})


# Text limits of a result, shared by the model and the ingest fast path (PlainBody).
MAX_NAME = 200
MAX_URL = 8192
MAX_METHOD = 10
# An HTTP status code has three digits (RFC 9110, 15); the first is 1-9 in what a result holds.
MIN_STATUS = 100
MAX_STATUS = 999
MAX_ERROR_MESSAGE = 2000
# A checker node's name (CHECKER_NODE_ID): 1-255 printable ASCII characters, no space.
MAX_NODE = 255
NODE_PATTERN = rf"^[!-~]{{1,{MAX_NODE}}}$"

# Text that goes into results and logs holds none of: ASCII and C1 controls (NUL makes
# PostgreSQL refuse the result, ESC writes ANSI escapes into a terminal), line and paragraph
# separators, bidirectional embeddings, overrides and isolates. Written so Python, ECMAScript
# and the fuzzer read the class alike (task_spec's patterns use it too); a lone surrogate cannot
# come through JSON, and naming surrogates would make a pattern invalid for ECMAScript engines.
UNSAFE_TEXT = r"\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069"
SAFE_TEXT_PATTERN = rf"^[^\x00-\x1f{UNSAFE_TEXT}]*$"
# Python text may hold lone surrogates (bytes read with surrogateescape): unsafe as well.
_UNSAFE_CLASS = rf"\x00-\x1f{UNSAFE_TEXT}\ud800-\udfff"
_LINE_BREAKS = "\t\n\x0b\x0c\r\x85\u2028\u2029"
_UNSAFE_CHARS = re.compile(f"[{_UNSAFE_CLASS}]")
_BREAKS = str.maketrans(dict.fromkeys(_LINE_BREAKS, " "))


def safe_text(text: str) -> str:
    """`text` fit for a result and a log line (pure): tabs and line breaks become spaces, any
    other character of UNSAFE_TEXT, a C0 control or a lone surrogate becomes U+FFFD."""
    if _UNSAFE_CHARS.search(text) is None:
        return text
    return _UNSAFE_CHARS.sub("\ufffd", text.translate(_BREAKS))


class CheckError(BaseModel):
    """Why a check failed. Its message is free text, often quoting what a server sent: the
    model makes it safe (`safe_text`) wherever it is built or read, so neither the checker
    nor a consumer ever holds control characters there."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: ErrorKind
    message: str = Field(
        max_length=MAX_ERROR_MESSAGE,
        description="for people; control characters are replaced (tabs and line breaks by"
        " spaces, others by U+FFFD)",
        json_schema_extra={"pattern": SAFE_TEXT_PATTERN},
    )

    # Before pydantic's own check, which refuses a lone surrogate instead of replacing it.
    @field_validator("message", mode="before")
    @classmethod
    def _safe(cls, value: object) -> object:
        return safe_text(value) if isinstance(value, str) else value


Seconds = Annotated[float, Field(ge=0)]


class Timings(BaseModel):
    """Phase durations in seconds; null where the phase did not happen (no TLS on http)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dns: Seconds | None = None
    connect: Seconds | None = None
    tls: Seconds | None = None
    ttfb: Seconds | None = Field(None, description="request sent to first response byte")
    transfer: Seconds | None = Field(None, description="first to last body byte read")


class CheckResult(BaseModel):
    """One check of one task: what the checker measured and publishes."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    schema_version: Literal[1] = 1
    result_id: uuid.UUID
    name: str = Field(max_length=MAX_NAME)
    url: str = Field(max_length=MAX_URL, description="the task's URL, its password as ***")
    method: str = Field("GET", max_length=MAX_METHOD)
    timestamp: datetime = Field(description="when the check started, ISO 8601 UTC")
    scheduled_at: datetime | None = Field(None, description="when the check was planned to start")
    attempt: int = Field(1, ge=1, description="1 for the first try, then retries")
    status: int | None = Field(
        None, ge=MIN_STATUS, le=MAX_STATUS, description="HTTP status, null if none"
    )
    load_time: Seconds = Field(description="seconds from start to last byte or to the failure")
    pattern_search: PatternResult | None = None
    ok: bool
    health: Health = Health.UNKNOWN
    error: CheckError | None = None
    timings: Timings = Field(default_factory=Timings)
    bytes: int = Field(0, ge=0, description="body bytes read (after decompression)")
    body_truncated: bool = Field(
        False,
        description="the body was longer than the task's max_body_bytes: only that many bytes"
        " were read and searched",
    )
    final_url: str | None = Field(
        None, max_length=MAX_URL, description="the last URL requested, its password as ***"
    )
    redirects: int = Field(0, ge=0)
    cert_expires_at: datetime | None = None
    node: str | None = Field(
        None,
        max_length=MAX_NODE,
        pattern=NODE_PATTERN,
        description="the checker node that ran the check (its CHECKER_NODE_ID); absent in"
        " results of checkers before it was added",
    )

    @field_validator("timestamp", "scheduled_at", "cert_expires_at")
    @classmethod
    def _aware_utc(cls, value: datetime | None) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class ContractError(ValueError):
    """A message that breaks the contract; the text says what and where."""


def encode(task_id: uuid.UUID, result: CheckResult) -> tuple[bytes, bytes]:
    """The Kafka key and value for one result."""
    key = str(task_id).encode()
    # Serialised by pydantic-core in one pass; a UUID's text needs no JSON escaping.
    return key, b'{"' + key + b'":' + result.__pydantic_serializer__.to_json(result) + b"}"


class Decoded(BaseModel):
    model_config = ConfigDict(frozen=True)

    task_id: uuid.UUID
    result: CheckResult
    legacy: bool = False


def decode(
    value: bytes | None,
    *,
    topic: str = "",
    partition: int = 0,
    offset: int = 0,
    max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> Decoded:
    """Parse one message value. Raises `ContractError` with a readable reason."""
    if value is None:
        raise ContractError("empty message (no value)")
    if len(value) > max_bytes:
        raise ContractError(f"message too large: {len(value)} bytes > {max_bytes}")
    try:
        document = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise ContractError(f"not valid JSON: {exc}") from None
    if not isinstance(document, dict) or len(document) != 1:
        raise ContractError("top level must be an object with exactly one key, the task id")
    ((raw_id, body),) = document.items()
    try:
        task_id = uuid.UUID(raw_id)
    except ValueError:
        raise ContractError(f"task id is not a UUID: {raw_id[:80]!r}") from None
    if not isinstance(body, dict):
        raise ContractError("the value under the task id must be an object")
    legacy = "result_id" not in body and "schema_version" not in body
    if legacy:
        body = _upgrade_legacy(body, topic=topic, partition=partition, offset=offset)
    else:
        version = body.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ContractError(f"unknown schema_version: {version!r}")
    try:
        result = CheckResult.model_validate(body)
    except ValidationError as exc:
        raise ContractError(_first_error(exc)) from None
    return Decoded(task_id=task_id, result=result, legacy=legacy)


# Only the canonical spellings; pydantic accepts more (upper case, no hyphens, other offsets),
# and those take the model's path. Checked a whole column of a batch at a time: one regex over
# the column's values, one per line.
_UUID_RE = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
_UTC_ISO_RE = r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,6})?(?:Z|\+00:00)"
_UUID_LINES = re.compile(f"(?:{_UUID_RE}\n)*\\Z").match
_UTC_ISO_LINES = re.compile(f"(?:{_UTC_ISO_RE}\n)*\\Z").match
# Numbers the fast path takes: larger ones could be read differently by orjson (a float past
# 2**64) than by msgspec (an exact int); the model decides those.
_MAX_NUMBER = 2**53

_Seconds = Annotated[float, msgspec.Meta(ge=0, le=_MAX_NUMBER)]
_Count = Annotated[int, msgspec.Meta(ge=0, le=_MAX_NUMBER)]
# Literal, not the enums: the values stay plain str (tests prove they are the enums' values).
PatternValue = Literal["match", "no_match"]
HealthValue = Literal["unknown", "up", "down"]
ErrorKindValue = Literal[
    "dns",
    "connect",
    "tls",
    "timeout",
    "too_many_redirects",
    "body_too_large",
    "invalid_response",
    "denied_target",
    "status",
    "pattern",
    "pattern_timeout",
    "checker_overloaded",
]


class PlainError(msgspec.Struct, forbid_unknown_fields=True, frozen=True, gc=False):
    kind: ErrorKindValue
    # Only safe text: a message with a character `safe_text` replaces goes to the model.
    message: Annotated[
        str, msgspec.Meta(max_length=MAX_ERROR_MESSAGE, pattern=rf"^[^{_UNSAFE_CLASS}]*\Z")
    ]


class PlainTimings(msgspec.Struct, forbid_unknown_fields=True, frozen=True, gc=False):
    dns: _Seconds | None = None
    connect: _Seconds | None = None
    tls: _Seconds | None = None
    ttfb: _Seconds | None = None
    transfer: _Seconds | None = None


_NO_TIMINGS = PlainTimings()


class PlainBody(msgspec.Struct, forbid_unknown_fields=True, frozen=True, gc=False):
    """Every CheckResult field as plain values: str UUIDs (lower case, canonical), timestamps
    as ISO 8601 UTC strings, enums as their values.

    Also the fast path's decoder: only `encode()`'s canonical shape, each field of
    CheckResult with its constraints or stricter (no unknown fields, no lax spellings, no
    huge numbers; UUIDs and timestamps are checked after it, a batch at a time); what it
    refuses goes to the model, which then decides."""

    schema_version: Literal[1]
    result_id: str
    name: Annotated[str, msgspec.Meta(max_length=MAX_NAME)]
    url: Annotated[str, msgspec.Meta(max_length=MAX_URL)]
    timestamp: str
    load_time: _Seconds
    ok: bool
    method: Annotated[str, msgspec.Meta(max_length=MAX_METHOD)] = "GET"
    scheduled_at: str | None = None
    attempt: Annotated[int, msgspec.Meta(ge=1, le=_MAX_NUMBER)] = 1
    status: Annotated[int, msgspec.Meta(ge=MIN_STATUS, le=MAX_STATUS)] | None = None
    pattern_search: PatternValue | None = None
    health: HealthValue = "unknown"
    error: PlainError | None = None
    timings: PlainTimings = _NO_TIMINGS
    bytes: _Count = 0
    body_truncated: bool = False
    final_url: Annotated[str, msgspec.Meta(max_length=MAX_URL)] | None = None
    redirects: _Count = 0
    cert_expires_at: str | None = None
    # \Z, not $: Python's $ also matches before a final newline.
    node: Annotated[str, msgspec.Meta(pattern=rf"^[!-~]{{1,{MAX_NODE}}}\Z")] | None = None


class Plain(NamedTuple):
    """A decoded message as plain values, for writers that only pass them on.
    `checked_at` is the parsed `body.timestamp`."""

    task_id: str
    body: PlainBody
    checked_at: datetime
    legacy: bool


def decode_plain(
    value: bytes | None,
    *,
    topic: str = "",
    partition: int = 0,
    offset: int = 0,
    max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> Plain:
    """`decode()` for the ingest path: the same messages accepted, the same errors raised.
    Raises `ContractError` with decode()'s text. One message of `decode_plain_many`."""
    (plain,) = decode_plain_many([_Message(value, topic, partition, offset)], max_bytes=max_bytes)
    if isinstance(plain, ContractError):
        raise plain
    return plain


class Message(Protocol):
    """What `decode_plain_many` needs of a message: its value and where it was read (the
    legacy shape's result id is derived from that)."""

    @property
    def value(self) -> bytes | None: ...

    @property
    def topic(self) -> str: ...

    @property
    def partition(self) -> int: ...

    @property
    def offset(self) -> int: ...


class _Message(NamedTuple):
    value: bytes | None
    topic: str
    partition: int
    offset: int


def decode_plain_many(
    messages: Sequence[Message],
    *,
    max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> list[Plain | ContractError]:
    """`decode_plain` for each message: a Plain, or the ContractError that `decode()` raises
    for it, in the same order.

    Messages in the shape `encode()` writes are decoded by msgspec into PlainBody (2.9 us a
    message against 18 us for `decode()`, `bench/micro.py decode`), and their UUIDs and
    timestamps checked a column at
    a time; anything else (the legacy shape, unknown fields, lax spellings pydantic would
    coerce, every error) goes through `decode()` itself, so the model stays the one
    definition and every error text comes from it.
    """
    fast: list[tuple[int, str, PlainBody]] = []
    decode_fast = _fast_decoder.decode
    for index, message in enumerate(messages):
        value = message.value
        if value is None or len(value) > max_bytes:
            continue
        try:
            document = decode_fast(value)
        except (msgspec.MsgspecError, ValueError):  # UnicodeDecodeError is a ValueError
            continue
        if len(document) == 1:
            ((task_id, body),) = document.items()
            fast.append((index, task_id, body))
    canonical = _canonical(fast)
    if len(canonical) == len(messages):
        # The usual batch: every message took the fast path. Timestamps a column at a time.
        bodies = list(map(_body_of, canonical))
        try:
            checked = list(map(_fromisoformat, map(_timestamp_of, bodies)))
            _valid_stamps(bodies)
        except ValueError:
            pass
        else:
            # tuple.__new__: Plain's own __new__ is Python code, a call per message.
            return list(
                map(
                    _new_tuple,
                    repeat(Plain),
                    zip(
                        map(_task_id_of, canonical),
                        bodies,
                        checked,
                        repeat(False, len(bodies)),
                        strict=True,
                    ),
                )
            )
    found: list[Plain | ContractError | None] = [None] * len(messages)
    taken = 0
    for index, task_id, body in canonical:
        # The pattern admits 2026-02-30 and 25:00; the model says what is wrong with those.
        try:
            checked_at = datetime.fromisoformat(body.timestamp)
            _valid_stamps([body])
        except ValueError:
            continue
        found[index] = _new_tuple(Plain, (task_id, body, checked_at, False))
        taken += 1
    if taken == len(found):
        return found  # type: ignore[return-value]  # no None left
    return [
        _plain_by_model(message, max_bytes) if plain is None else plain
        for plain, message in zip(found, messages, strict=True)
    ]


def _valid_stamps(bodies: list[PlainBody]) -> None:
    """Raises ValueError unless every scheduled_at and cert_expires_at is a real date and
    time (each distinct value read once: a task's certificate date repeats)."""
    for stamp in {*map(_scheduled_at_of, bodies), *map(_cert_expires_at_of, bodies)}:
        if stamp is not None:
            datetime.fromisoformat(stamp)


def _canonical(fast: list[tuple[int, str, PlainBody]]) -> list[tuple[int, str, PlainBody]]:
    """The decoded messages whose ids and timestamps are spelled canonically (one regex per
    column over the whole batch; message by message only when a column fails)."""
    if not fast or _all_canonical(fast):
        return fast
    return [one for one in fast if _all_canonical([one])]


def _all_canonical(fast: list[tuple[int, str, PlainBody]]) -> bool:
    # Column by column (map in C): the order of the values does not matter here.
    bodies = list(map(_body_of, fast))
    ids = [*map(_task_id_of, fast), *map(_result_id_of, bodies)]
    stamps = [
        *map(_timestamp_of, bodies),
        *filter(_is_not_none, map(_scheduled_at_of, bodies)),
        *filter(_is_not_none, map(_cert_expires_at_of, bodies)),
    ]
    return _lines_match(_UUID_LINES, ids, _HEX) and _lines_match(_UTC_ISO_LINES, stamps, _DIGITS)


_task_id_of = itemgetter(1)
_body_of = itemgetter(2)
_result_id_of = attrgetter("result_id")
_timestamp_of = attrgetter("timestamp")
_scheduled_at_of = attrgetter("scheduled_at")
_cert_expires_at_of = attrgetter("cert_expires_at")
_is_not_none = partial(is_not, None)
_fromisoformat = datetime.fromisoformat


_HEX = "0123456789abcdef"
_DIGITS = "0123456789"


def _lines_match(match: Callable[[str], object], values: list[str], free: str) -> bool:
    """Each value matches on its own line (a newline inside a value makes one line more).
    `free` are the characters the pattern admits anywhere its values have one of them."""
    text = "\n".join(values) + "\n"
    if values and _same_shape(text, values[0] + "\n", len(values), match, free):
        return True
    return text.count("\n") == len(values) and match(text) is not None


def _same_shape(
    text: str, first: str, count: int, match: Callable[[str], object], free: str
) -> bool:
    """Whether each of the `count` lines of `text` is spelled like `first`, which matches: as
    long, the same characters as it where it has no `free` one, `free` ones everywhere else.
    The usual batch, where all values look alike, in a few passes of C instead of the regex
    (several times as slow); False says nothing, the regex decides then."""
    width = len(first)
    # "+00:00" has digits that must be zeros: left to the regex.
    if len(text) != width * count or "+" in first or match(first) is None:
        return False
    try:
        raw = text.encode("ascii")
    except UnicodeEncodeError:
        return False
    # No character outside `free` but those in the same places as first's.
    kept = free.encode()
    if raw.translate(None, kept) != first.encode().translate(None, kept) * count:
        return False
    return all(
        raw[at::width] == char.encode() * count for at, char in enumerate(first) if char not in free
    )


def _plain_by_model(message: Message, max_bytes: int) -> Plain | ContractError:
    try:
        decoded = decode(
            message.value,
            topic=message.topic,
            partition=message.partition,
            offset=message.offset,
            max_bytes=max_bytes,
        )
    except ContractError as exc:
        return exc
    result = decoded.result
    body = result.model_dump(mode="json")
    error, timings = body.pop("error"), body.pop("timings")
    return Plain(
        str(decoded.task_id),
        PlainBody(
            **body,
            error=None if error is None else PlainError(**error),
            timings=PlainTimings(**timings),
        ),
        result.timestamp,
        decoded.legacy,
    )


_fast_decoder = msgspec.json.Decoder(dict[str, PlainBody])
_new_tuple = tuple.__new__


def legacy_result_id(topic: str, partition: int, offset: int) -> uuid.UUID:
    return uuid.uuid5(LEGACY_NAMESPACE, f"{topic}/{partition}/{offset}")


def _upgrade_legacy(
    body: dict[str, Any], *, topic: str, partition: int, offset: int
) -> dict[str, Any]:
    """The first checker's shape: no result_id, `02/15/21 - 16:43:17`, load_time a string."""
    upgraded = dict(body)
    upgraded["result_id"] = str(legacy_result_id(topic, partition, offset))
    stamp = body.get("timestamp")
    if isinstance(stamp, str):
        # It may already be ISO 8601; then the model decides.
        with contextlib.suppress(ValueError):
            parsed = datetime.strptime(stamp, LEGACY_TIMESTAMP_FORMAT)
            upgraded["timestamp"] = parsed.replace(tzinfo=UTC)
    load_time = body.get("load_time")
    if isinstance(load_time, str):
        try:
            upgraded["load_time"] = float(load_time)
        except ValueError:
            raise ContractError(f"load_time: not a number: {load_time[:40]!r}") from None
    pattern = body.get("pattern_search")
    if isinstance(pattern, str):
        normalised = pattern.strip().lower().replace(" ", "_")
        upgraded["pattern_search"] = {
            "match": "match",
            "no_match": "no_match",
            "not_match": "no_match",
            "none": None,
            "": None,
        }.get(normalised, pattern)
    status = body.get("status")
    upgraded.setdefault("url", "")
    upgraded.setdefault("name", "")
    upgraded.setdefault(
        "ok",
        isinstance(status, int)
        and 200 <= status < 400
        and upgraded.get("pattern_search") != "no_match",
    )
    return upgraded


def _first_error(exc: ValidationError) -> str:
    first = exc.errors(include_url=False, include_input=False)[0]
    where = ".".join(str(part) for part in first.get("loc", ())) or "message"
    return f"{where}: {first.get('msg', 'invalid')}"


def json_schema() -> dict[str, Any]:
    """JSON Schema (2020-12) of one message value, generated from the model."""
    body = CheckResult.model_json_schema(mode="serialization")
    defs = body.pop("$defs", {})
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://periodic-checker.invalid/schema/result-message.schema.json",
        "title": "Check result message",
        "description": "Kafka message value; the key is the same task id as UTF-8.",
        "type": "object",
        "minProperties": 1,
        "maxProperties": 1,
        "propertyNames": {"format": "uuid"},
        "additionalProperties": {"$ref": "#/$defs/CheckResult"},
        "$defs": {**defs, "CheckResult": body},
    }
