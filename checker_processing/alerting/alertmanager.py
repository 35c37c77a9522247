"""The Prometheus Alertmanager channel (API v2): POST /api/v2/alerts.

An incident is one alert, identified by its labels (alertname, task, name, url, tags): it fires
from the incident's start with `endsAt` `firing_seconds` ahead (Alertmanager resolves an alert
by itself at its endsAt, so a firing alert must name a time; a reminder pushes it on), and the
closing notification sends the same labels with `endsAt` at the incident's end: resolved.
Alertmanager groups, routes, silences and repeats from there.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import orjson

from checker_processing.alerting.config import AlertmanagerChannel
from checker_processing.alerting.delivery import Outcome, TryAgain, outcome_of
from checker_processing.alerting.message import NotificationBody


def alerts(
    channel: AlertmanagerChannel, body: NotificationBody, now: datetime
) -> list[dict[str, Any]]:
    """The alerts to post for a notification (pure)."""
    task, incident = body.task, body.incident
    labels = {
        "alertname": channel.alert_name,
        "task": str(task.id),
        "name": task.name or "",
        "url": task.url or "",
        "tags": ",".join(task.tags),
    }
    if body.kind == "test":
        labels["test"] = "true"
    if body.kind == "closed" and incident.ended_at is not None:
        ends = incident.ended_at
    elif body.kind == "test":
        ends = now + timedelta(minutes=5)
    elif body.kind == "flapping" and body.flapping is not None:
        labels["flapping"] = "true"  # no recovery follows: it resolves at the window's end
        ends = now + timedelta(seconds=body.flapping.window_seconds)
    else:
        ends = now + timedelta(seconds=channel.firing_seconds)
    return [
        {
            "labels": labels,
            "annotations": {
                "summary": body.summary,
                "notification_id": str(body.notification_id),
            },
            "startsAt": incident.started_at.astimezone(UTC).isoformat(),
            "endsAt": ends.astimezone(UTC).isoformat(),
        }
    ]


async def send(
    session: aiohttp.ClientSession, channel: AlertmanagerChannel, body: NotificationBody
) -> Outcome:
    url = channel.url.rstrip("/") + "/api/v2/alerts"
    try:
        async with session.post(
            url,
            data=orjson.dumps(alerts(channel, body, datetime.now(UTC))),
            headers={"Content-Type": "application/json"},
            timeout=aiohttp.ClientTimeout(total=channel.timeout_seconds),
            allow_redirects=False,
        ) as response:
            return await outcome_of(response)
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        return TryAgain(f"{type(exc).__name__}: {' '.join(str(exc).split()) or 'no detail'}")
