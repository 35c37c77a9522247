"""The task record: one task's whole definition and status on the task topic.

The task topic (`KAFKA_TASKS_TOPIC`, compacted) is the list of checks as a stream that every
part of the pipeline follows: the checker nodes keep their SQLite store as a view of it, the
processor keeps PostgreSQL's `tasks` table in step with it, and another program may create,
change, pause and remove checks by producing records to it. On the wire::

    key   = the task id (UTF-8 text of a UUID)
    value = null (a tombstone: the task is removed), or UTF-8 JSON:
            {"schema_version": 1, "id": "<the key>", "spec": {...TaskSpec...},
             "status": "active", "status_reason": null,
             "created_at": "...", "updated_at": "...", "origin": "<node id>"}

`spec` is exactly what the API takes (`TaskSpec`, secrets included: the topic is behind mutual
TLS like the checker's SQLite file). A record is validated exactly as the API validates a
request. `decode()` sorts what it reads into four outcomes, the same on every reader:

- `TaskChange`: a valid record; the task is created or replaced.
- `TaskRemoved`: a tombstone.
- `InvalidTask`: the key is a task id but the value does not validate: the task exists, with
  status `error` and the reason, and never runs (what could be read of its name and URL is
  kept, so it can be found and fixed).
- `UnusableRecord`: no task id to hang it on (key missing or not a UUID): not a task at all.

Runtime state (health, runs, failures in a row, last run) is not part of a task record.
`json_schema()` describes a record's value; `scripts/gen_schema.py` writes it to
`schema/task-record.schema.json` (a test keeps it current).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from checker_common.contract import MAX_NAME, MAX_URL
from checker_common.ids import parse_id
from checker_common.task_spec import NAME_PATTERN, TaskSpec, TaskStatus

SCHEMA_VERSION: Literal[1] = 1
# Longest status reason kept (a validation message of a hostile record can be long).
MAX_REASON = 500
# Largest value read as a record; a larger one is an InvalidTask, never parsed.
MAX_RECORD_BYTES = 1_048_576


class TaskRecord(BaseModel):
    """A task's definition and status, as the task topic carries it."""

    model_config = ConfigDict(extra="forbid", frozen=True, cache_strings="keys")  # as TaskSpec

    schema_version: Literal[1] = SCHEMA_VERSION
    id: uuid.UUID = Field(description="the task id, equal to the record's key (may be left out)")
    spec: TaskSpec
    status: TaskStatus = Field(TaskStatus.ACTIVE, description="active, paused, done or error")
    status_reason: str | None = Field(
        None, max_length=MAX_REASON, pattern=NAME_PATTERN, description="no control characters"
    )
    created_at: datetime | None = Field(None, description="ISO 8601, UTC")
    updated_at: datetime | None = Field(None, description="ISO 8601, UTC")
    origin: str | None = Field(
        None,
        max_length=255,
        description="the checker node that wrote the record (CHECKER_NODE_ID); absent when"
        " another program wrote it",
    )

    @field_validator("created_at", "updated_at")
    @classmethod
    def _aware_utc(cls, value: datetime | None) -> datetime | None:
        if value is None:
            return None
        try:
            return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        except OverflowError:  # 0001-01-01T00:00:00+05:00 has no UTC time
            raise ValueError("is out of range in UTC") from None


@dataclass(frozen=True, slots=True)
class TaskChange:
    """A valid record: the task is created or replaced by it."""

    task_id: uuid.UUID
    record: TaskRecord


@dataclass(frozen=True, slots=True)
class TaskRemoved:
    """A tombstone: the task is removed."""

    task_id: uuid.UUID


@dataclass(frozen=True, slots=True)
class InvalidTask:
    """A record with a task id whose value does not validate: the task is in `error`.

    `name` and `url` are what could be read of them (cut to the contract's limits, control
    characters replaced), or placeholders, so the task can be listed and fixed."""

    task_id: uuid.UUID
    reason: str
    name: str
    url: str
    interval: float | None
    origin: str | None


@dataclass(frozen=True, slots=True)
class UnusableRecord:
    """No task id to hang the record on."""

    reason: str


Decoded = TaskChange | TaskRemoved | InvalidTask | UnusableRecord


def encode(record: TaskRecord) -> tuple[bytes, bytes]:
    """The Kafka key and value of a record."""
    return str(record.id).encode(), record.__pydantic_serializer__.to_json(record)


def tombstone_key(task_id: uuid.UUID) -> bytes:
    """The key of the tombstone that removes a task (its value is null)."""
    return str(task_id).encode()


def decode(key: bytes | None, value: bytes | None) -> Decoded:
    """Read one record of the task topic; never raises."""
    if key is None:
        return UnusableRecord("record has no key (the key must be the task id)")
    try:
        task_id = parse_id(key.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return UnusableRecord(f"key {key[:60]!r} is not a task id (a UUID)")
    if value is None:
        return TaskRemoved(task_id)
    if len(value) > MAX_RECORD_BYTES:
        return _invalid(task_id, f"record is larger than {MAX_RECORD_BYTES} bytes", {})
    # The usual record (valid, its id the key) is parsed once; anything else is read again
    # below, so that what it is told is the same whichever way it came.
    try:
        record = TaskRecord.model_validate_json(value)
    except ValidationError:
        pass
    else:
        if record.id.int == task_id.int:  # UUIDs equal (their own __eq__ is Python)
            return TaskChange(task_id, record)
    try:
        document = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        return _invalid(task_id, f"not JSON: {exc}", {})
    if not isinstance(document, dict):
        return _invalid(task_id, "not a JSON object", {})
    if "id" not in document:
        # The key says which task: a producer may leave the id out of the value.
        value = orjson.dumps({**document, "id": str(task_id)})
    elif str(document["id"]) != str(task_id):
        return _invalid(task_id, f"id: {str(document['id'])[:60]!r} is not the key", document)
    try:
        record = TaskRecord.model_validate_json(value)
    except ValidationError as exc:
        return _invalid(task_id, _first_error(exc), document)
    return TaskChange(task_id, record)


def _invalid(task_id: uuid.UUID, reason: str, document: dict[str, Any]) -> InvalidTask:
    spec = document.get("spec")
    spec = spec if isinstance(spec, dict) else {}
    interval = spec.get("interval")
    origin = document.get("origin")
    return InvalidTask(
        task_id=task_id,
        reason=_clean(f"invalid task record: {reason}", MAX_REASON),
        name=_clean(spec.get("name"), MAX_NAME) or f"invalid record {task_id}",
        url=_clean(spec.get("url"), MAX_URL),
        interval=float(interval) if isinstance(interval, int | float) and interval > 0 else None,
        origin=_clean(origin, 255) or None if isinstance(origin, str) else None,
    )


def _clean(value: object, limit: int) -> str:
    """Text fit for a log line and a PostgreSQL text column: no control characters, cut."""
    if not isinstance(value, str):
        return ""
    text = "".join(c if c.isprintable() else "\ufffd" for c in value)
    return text[:limit]


def _first_error(exc: ValidationError) -> str:
    errors = exc.errors(include_url=False, include_input=False)
    first = errors[0]
    where = ".".join(str(part) for part in first.get("loc", ())) or "record"
    message = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {message}{more}"


def json_schema() -> dict[str, Any]:
    """JSON Schema (2020-12) of a record's value (a tombstone's value is null)."""
    body = TaskRecord.model_json_schema(mode="serialization")
    defs = body.pop("$defs", {})
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://periodic-checker.invalid/schema/task-record.schema.json",
        "title": "Task record",
        "description": "Value of a record on the task topic; the key is the task id as UTF-8."
        " A null value (tombstone) removes the task.",
        "$defs": {**defs, "TaskRecord": body},
        "$ref": "#/$defs/TaskRecord",
    }
