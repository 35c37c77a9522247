"""What a notification says: the webhook's JSON body (its JSON Schema committed as
schema/notification.schema.json) and the one-line summary chat channels show; a summary
(`SummaryBody`) stands for the notifications due to a channel beyond its rate limit."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

SCHEMA_VERSION: Literal[1] = 1
Kind = Literal["opened", "reminder", "closed", "flapping", "test"]
# What a summary can stand for: the kinds the outbox holds.
FoldedKind = Literal["opened", "reminder", "closed", "flapping"]
# A summary names this many of its notifications' tasks, and counts the others.
SUMMARY_NAMES = 20


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


class SummaryItem(_Model):
    notification_id: uuid.UUID
    kind: FoldedKind
    task_id: uuid.UUID
    task_name: str | None


class SummaryCounts(_Model):
    opened: int = 0
    reminder: int = 0
    closed: int = 0
    flapping: int = 0


class SummaryBody(_Model):
    """The JSON body of a summary: the notifications due to a channel in one minute beyond
    its `max_per_minute`, told in one."""

    schema_version: Literal[1] = SCHEMA_VERSION
    notification_id: uuid.UUID = Field(
        description="stable: the same notifications folded for the same channel always make"
        " this id; drop repeats by it"
    )
    kind: Literal["summary"] = "summary"
    channel: str
    summary: str = Field(description="one line for people")
    window_start: datetime = Field(
        description="the minute (by the processor's database clock) whose budget was spent"
    )
    max_per_minute: int = Field(description="the channel's rate limit")
    counts: SummaryCounts = Field(description="the folded notifications by kind")
    notification_ids: list[uuid.UUID] = Field(
        description="every notification this summary stands for: none of them is sent on its"
        " own (each is marked summarised with this summary's id)"
    )
    first: list[SummaryItem] = Field(
        description=f"the first {SUMMARY_NAMES} of them, the longest due first"
    )
    more: int = Field(ge=0, description="how many are not in `first`")


Body = NotificationBody | SummaryBody


def summary_body(
    notification_id: uuid.UUID,
    channel: str,
    window_start: datetime,
    max_per_minute: int,
    items: list[SummaryItem],
) -> SummaryBody:
    """The summary of `items`, in the order given (pure)."""
    counts = SummaryCounts(
        **{kind: sum(1 for i in items if i.kind == kind) for kind in SummaryCounts.model_fields}
    )
    first = items[:SUMMARY_NAMES]
    more = len(items) - len(first)
    return SummaryBody(
        notification_id=notification_id,
        channel=channel,
        summary=summary_line(counts, max_per_minute, first, more),
        window_start=window_start,
        max_per_minute=max_per_minute,
        counts=counts,
        notification_ids=[i.notification_id for i in items],
        first=first,
        more=more,
    )


def summary_line(
    counts: SummaryCounts, max_per_minute: int, first: list[SummaryItem], more: int
) -> str:
    """'[SUMMARY] 950 notifications over the limit of 50 a minute: 900 opened, 50 closed:
    shop, api, ... and 930 more' (pure)."""
    total = len(first) + more
    kinds = ", ".join(f"{n} {kind}" for kind, n in counts.model_dump().items() if n)
    names = ", ".join(i.task_name or str(i.task_id) for i in first)
    tail = f" and {more} more" if more else ""
    plural = "s" if total != 1 else ""
    return (
        f"[SUMMARY] {total} notification{plural} over the limit of {max_per_minute} a minute:"
        f" {kinds}: {names}{tail}"
    )


def json_schema() -> dict[str, Any]:
    """JSON Schema (2020-12) of a webhook notification's body."""
    either = Annotated[Body, Field(discriminator="kind")]
    schema = TypeAdapter(either).json_schema(mode="serialization")
    defs = schema.pop("$defs", {})
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://periodic-checker.invalid/schema/notification.schema.json",
        "title": "Webhook notification",
        "description": "Body of a webhook notification (POST, application/json): one"
        " incident change (NotificationBody), or a summary of those due beyond the channel's"
        " max_per_minute (SummaryBody, kind summary). Headers:"
        " X-Checker-Notification-Id (the id again), X-Checker-Timestamp (Unix seconds) and,"
        " with a secret, X-Checker-Signature: sha256=HEX, the HMAC-SHA256 with the shared"
        " secret of the timestamp, a '.', and the body's bytes.",
        "$defs": defs,
        **schema,
    }
