"""What a notification says: the webhook's JSON body (one model, its JSON Schema committed as
schema/notification.schema.json) and the one-line summary chat channels show."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION: Literal[1] = 1
Kind = Literal["opened", "reminder", "closed", "flapping", "test"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FirstError(_Model):
    kind: str = Field(description="the error kind of the result that opened the incident")
    message: str | None = None


class IncidentInfo(_Model):
    id: int = Field(description="the incident's id in PostgreSQL (incidents.incident_id)")
    started_at: datetime
    ended_at: datetime | None = Field(None, description="null while the incident is open")
    end_reason: Literal["recovered", "task_removed"] | None = None
    first_error: FirstError | None = None


class FlappingInfo(_Model):
    changes: int = Field(description="incidents the task opened within the window")
    window_seconds: float


class TaskInfo(_Model):
    id: uuid.UUID
    name: str | None = Field(description="null when the processor has not heard the name")
    url: str | None = Field(description="password of the user info masked as ***")
    tags: list[str] = Field(default_factory=list)


class NotificationBody(_Model):
    """The JSON body of a webhook notification."""

    schema_version: Literal[1] = SCHEMA_VERSION
    notification_id: uuid.UUID = Field(
        description="stable: the same incident change to the same channel always has this id,"
        " however often it is sent; drop repeats by it"
    )
    kind: Kind = Field(
        description="opened: the incident is reported; reminder: still down (repeat_seconds);"
        " closed: it is over; flapping: it went down `flapping.changes` times within"
        " `flapping.window_seconds` (its further incidents in that window are not reported);"
        " test: sent by `checker-processing alerts test`"
    )
    sequence: int = Field(0, ge=0, description="1, 2, ... for reminders; 0 otherwise")
    channel: str
    rule: str
    summary: str = Field(description="one line for people")
    task: TaskInfo
    incident: IncidentInfo
    flapping: FlappingInfo | None = Field(None, description="set for kind flapping")


def body(
    notification_id: uuid.UUID,
    kind: Kind,
    sequence: int,
    channel: str,
    rule: str,
    details: dict[str, Any],
) -> NotificationBody:
    """The body of a notification from the details stored with it (pure)."""
    task = TaskInfo.model_validate(details["task"])
    incident = IncidentInfo.model_validate(details["incident"])
    flapping = details.get("flapping")
    flap = FlappingInfo.model_validate(flapping) if flapping is not None else None
    return NotificationBody(
        notification_id=notification_id,
        kind=kind,
        sequence=sequence,
        channel=channel,
        rule=rule,
        summary=summary(kind, task, incident, flap),
        task=task,
        incident=incident,
        flapping=flap,
    )


def summary(
    kind: str, task: TaskInfo, incident: IncidentInfo, flapping: FlappingInfo | None = None
) -> str:
    """'[DOWN] shop (https://shop.test/): status: 503 since 2026-12-03T15:00:00+00:00' (pure)."""
    name = task.name or str(task.id)
    where = f" ({task.url})" if task.url else ""
    error = incident.first_error
    why = f": {error.kind}" + (f": {error.message}" if error.message else "") if error else ""
    since = incident.started_at.isoformat()
    if kind == "closed":
        assert incident.ended_at is not None
        lasted = _duration((incident.ended_at - incident.started_at).total_seconds())
        if incident.end_reason == "task_removed":
            return f"[ENDED] {name}{where}: the task was removed after {lasted} down"
        return f"[RECOVERED] {name}{where} is up again after {lasted} down"
    if kind == "flapping" and flapping is not None:
        window = _duration(flapping.window_seconds)
        return f"[FLAPPING] {name}{where} went down {flapping.changes} times in {window}{why}"
    if kind == "test":
        return f"[TEST] {name}: a test notification; nothing is down"
    label = {"opened": "DOWN", "reminder": "STILL DOWN"}[kind]
    return f"[{label}] {name}{where}{why} since {since}"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {seconds}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes}m"


def json_schema() -> dict[str, Any]:
    """JSON Schema (2020-12) of a webhook notification's body."""
    schema = NotificationBody.model_json_schema(mode="serialization")
    defs = schema.pop("$defs", {})
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://periodic-checker.invalid/schema/notification.schema.json",
        "title": "Webhook notification",
        "description": "Body of a webhook notification (POST, application/json). Headers:"
        " X-Checker-Notification-Id (the id again), X-Checker-Timestamp (Unix seconds) and,"
        " with a secret, X-Checker-Signature: sha256=HEX, the HMAC-SHA256 with the shared"
        " secret of the timestamp, a '.', and the body's bytes.",
        "$defs": {**defs, "NotificationBody": schema},
        "$ref": "#/$defs/NotificationBody",
    }
