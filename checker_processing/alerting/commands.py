"""`checker-processing alerts test CHANNEL` and `alerts list`: what the command line does."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime
from typing import Any

import aiohttp

from checker_processing.alerting import outbox
from checker_processing.alerting.config import AlertingConfig
from checker_processing.alerting.delivery import Delivered, Outcome
from checker_processing.alerting.message import IncidentInfo, NotificationBody, TaskInfo, summary
from checker_processing.alerting.sender import send

STATES = ("pending", "sent", "summarised", "failed", "cancelled")


def sample_notification(channel: str) -> NotificationBody:
    """A notification of kind `test` (a fresh id each time: every test is sent)."""
    task = TaskInfo(
        id=uuid.UUID(int=0), name="checker-processing test notification", url=None, tags=[]
    )
    incident = IncidentInfo(id=0, started_at=datetime.now(UTC))
    return NotificationBody(
        notification_id=uuid.uuid4(),
        kind="test",
        channel=channel,
        rule="(test)",
        summary=summary("test", task, incident),
        task=task,
        incident=incident,
    )


def send_test(config: AlertingConfig, channel: str) -> Outcome:
    """Send one test notification to `channel` (one try, no retry)."""

    async def once() -> Outcome:
        async with aiohttp.ClientSession() as session:
            return await send(session, config, channel, sample_notification(channel))

    return asyncio.run(once())


def delivered(outcome: Outcome) -> bool:
    return isinstance(outcome, Delivered)


def describe(outcome: Outcome) -> str:
    return "delivered" if isinstance(outcome, Delivered) else f"failed: {outcome.error}"


def parse_states(text: str) -> tuple[str, ...]:
    """'pending,failed' -> ('pending', 'failed'); ValueError naming a state it does not know."""
    states = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [s for s in states if s not in STATES]
    if unknown or not states:
        named = ", ".join(unknown) if unknown else repr(text)
        raise ValueError(f"--state: {named} is not one of {', '.join(STATES)}")
    return states


def render(found: list[dict[str, Any]], fmt: str) -> str:
    """The notifications as a table or JSON lines' array (pure)."""
    if fmt == "json":
        return json.dumps(found, default=str, indent=2)
    if not found:
        return "no notifications"
    header = ["ID", "STATE", "KIND", "CHANNEL", "TASK", "TRIES", "DUE", "LAST ERROR"]
    lines = [
        [
            row["notification_id"],
            row["state"],
            row["kind"],
            row["channel"],
            row["task_name"] or row["task_id"],
            str(row["attempts"]),
            row["due_at"].astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            (row["last_error"] or "-").replace("\n", " "),
        ]
        for row in found
    ]
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join([*(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)), r[-1]])
        for r in [header, *lines]
    )


def listing(conn: Any, states: tuple[str, ...]) -> list[dict[str, Any]]:
    with conn.cursor() as cur:
        found = outbox.listing(cur, states)
    conn.rollback()
    return found
