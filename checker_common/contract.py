"""The result message: the one contract between the checker and the processor.

On the wire a result is a Kafka message keyed by the task id (UTF-8) whose value is UTF-8 JSON
with the task id as its only top-level key::

    {"<task_id>": {"name": ..., "timestamp": ..., "status": 200, "load_time": 0.59,
                   "pattern_search": "match", "result_id": ..., "schema_version": 1, ...}}

`encode()` builds that, `decode()` reads it back (also the first version's shape, which had no
`result_id`), and `json_schema()` describes it. Nothing else spells these fields.
"""

from __future__ import annotations

import contextlib
import re
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal, NamedTuple

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


class CheckError(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: ErrorKind
    message: str = Field(max_length=2000)


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
    name: str = Field(max_length=200)
    url: str = Field(max_length=8192)
    method: str = Field("GET", max_length=10)
    timestamp: datetime = Field(description="when the check started, ISO 8601 UTC")
    scheduled_at: datetime | None = Field(None, description="when the check was planned to start")
    attempt: int = Field(1, ge=1, description="1 for the first try, then retries")
    status: int | None = Field(None, ge=100, le=999, description="HTTP status, null if none")
    load_time: Seconds = Field(description="seconds from start to last byte or to the failure")
    pattern_search: PatternResult | None = None
    ok: bool
    health: Health = Health.UNKNOWN
    error: CheckError | None = None
    timings: Timings = Field(default_factory=Timings)
    bytes: int = Field(0, ge=0, description="body bytes read (after decompression)")
    final_url: str | None = Field(None, max_length=8192)
    redirects: int = Field(0, ge=0)
    cert_expires_at: datetime | None = None

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


class Plain(NamedTuple):
    """A decoded message as plain values, for writers that only pass them on.

    `body` has every CheckResult field as JSON values: str UUIDs (lower case, canonical),
    timestamps as ISO 8601 UTC strings, enums as their values, `error` a dict or None,
    `timings` a dict with all five phases. `checked_at` is the parsed `timestamp`.
    """

    task_id: str
    body: dict[str, Any]
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

    Messages in the shape `encode()` writes are checked by hand in one pass over orjson's
    output (several times faster than pydantic on a dict); anything else (the legacy shape,
    lax spellings pydantic would coerce, every error) goes through `decode()` itself, so the
    model stays the one definition and every error text comes from it.
    """
    if value is not None and len(value) <= max_bytes:
        plain = _plain_fast(value)
        if plain is not None:
            return plain
    decoded = decode(value, topic=topic, partition=partition, offset=offset, max_bytes=max_bytes)
    result = decoded.result
    return Plain(
        str(decoded.task_id), result.model_dump(mode="json"), result.timestamp, decoded.legacy
    )


# Only the canonical spellings; pydantic accepts more (upper case, no hyphens, other offsets),
# and those take the model's path.
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z").match
_UTC_ISO = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,6})?(?:Z|\+00:00)\Z"
).match
_HEALTH = frozenset(h.value for h in Health)
_PATTERN = frozenset(p.value for p in PatternResult)
_KINDS = frozenset(k.value for k in ErrorKind)
_PHASES = ("dns", "connect", "tls", "ttfb", "transfer")
_NO_TIMINGS: dict[str, Any] = {}
# Larger JSON integers could round differently as a float; the model decides those.
_EXACT_FLOAT_INT = 2**53


def _utc(text: Any) -> datetime | None:
    """A canonical ISO 8601 UTC string as an aware datetime; None when unsure."""
    if type(text) is not str or not _UTC_ISO(text):
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:  # 2026-02-30, 25:00: the model says what is wrong
        return None


def _seconds(value: Any) -> float | None:
    """A JSON number >= 0 as a float; None when unsure (also for a missing value)."""
    if type(value) is float:
        return value if value >= 0 else None
    if type(value) is int and 0 <= value < _EXACT_FLOAT_INT:
        return float(value)
    return None


def _plain_fast(value: bytes) -> Plain | None:
    """The message as Plain if it is in the canonical shape and valid; None otherwise (then
    `decode()` decides). Mirrors CheckResult's fields and constraints one by one."""
    try:
        document = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    if type(document) is not dict or len(document) != 1:
        return None
    ((task_id, body),) = document.items()
    if not _UUID(task_id) or type(body) is not dict:
        return None
    get = body.get
    version = get("schema_version")
    if type(version) is not int or version != SCHEMA_VERSION:
        return None
    result_id, name, url, method = get("result_id"), get("name"), get("url"), get("method", "GET")
    if not (
        type(result_id) is str
        and _UUID(result_id)
        and type(name) is str
        and len(name) <= 200
        and type(url) is str
        and len(url) <= 8192
        and type(method) is str
        and len(method) <= 10
    ):
        return None
    stamp = get("timestamp")
    checked_at = _utc(stamp)
    if checked_at is None:
        return None
    scheduled_at = get("scheduled_at")
    if scheduled_at is not None and _utc(scheduled_at) is None:
        return None
    cert_expires_at = get("cert_expires_at")
    if cert_expires_at is not None and _utc(cert_expires_at) is None:
        return None
    attempt, status, bytes_, redirects = (
        get("attempt", 1),
        get("status"),
        get("bytes", 0),
        get("redirects", 0),
    )
    if not (
        type(attempt) is int
        and attempt >= 1
        and (status is None or (type(status) is int and 100 <= status <= 999))
        and type(bytes_) is int
        and bytes_ >= 0
        and type(redirects) is int
        and redirects >= 0
    ):
        return None
    load_time = _seconds(get("load_time"))
    if load_time is None:
        return None
    pattern, ok, health = get("pattern_search"), get("ok"), get("health", "unknown")
    if not (
        (pattern is None or (type(pattern) is str and pattern in _PATTERN))
        and type(ok) is bool
        and type(health) is str
        and health in _HEALTH
    ):
        return None
    error = get("error")
    if error is not None:
        if type(error) is not dict or len(error) != 2:
            return None
        kind, message = error.get("kind"), error.get("message")
        if not (
            type(kind) is str and kind in _KINDS and type(message) is str and len(message) <= 2000
        ):
            return None
        error = {"kind": kind, "message": message}
    raw_timings = get("timings", _NO_TIMINGS)
    if type(raw_timings) is not dict:
        return None
    timings: dict[str, float | None] = {}
    for phase in _PHASES:
        seconds = raw_timings.get(phase)
        if seconds is not None:
            seconds = _seconds(seconds)
            if seconds is None:
                return None
        timings[phase] = seconds
    if len(raw_timings) > len(_PHASES) or not raw_timings.keys() <= timings.keys():
        return None  # an unknown phase: the model forbids extras
    final_url = get("final_url")
    if final_url is not None and (type(final_url) is not str or len(final_url) > 8192):
        return None
    return Plain(
        task_id,
        {
            "schema_version": SCHEMA_VERSION,
            "result_id": result_id,
            "name": name,
            "url": url,
            "method": method,
            "timestamp": stamp,
            "scheduled_at": scheduled_at,
            "attempt": attempt,
            "status": status,
            "load_time": load_time,
            "pattern_search": pattern,
            "ok": ok,
            "health": health,
            "error": error,
            "timings": timings,
            "bytes": bytes_,
            "final_url": final_url,
            "redirects": redirects,
            "cert_expires_at": cert_expires_at,
        },
        checked_at,
        False,
    )


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
