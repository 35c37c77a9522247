"""The notification outbox in PostgreSQL: events become notifications, due ones are claimed.

`expand` reads the incident events the trigger wrote (migration 0012) and makes one
notification per channel a rule routes the task to, each with a stable id, in one transaction
with marking the events done; events are claimed with SKIP LOCKED, so several processors
share them; an incident's closing is expanded only once its opening is, committed. `claim`
(and `claim_channel`, for a summary: `rate`) locks due notifications with `FOR UPDATE SKIP
LOCKED` and keeps them locked until the caller's transaction ends: a notification being sent
is invisible to every other sender, so two processors never send one twice; a sender that dies
mid-send releases its rows and another sends them again (receivers drop the repeat by the id).
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from psycopg2.extras import Json

from checker_processing.alerting.config import AlertingConfig

log = logging.getLogger(__name__)

# Namespace of the notification ids (UUIDv5 of "incident/kind/channel/sequence").
NAMESPACE = uuid.UUID("6f0a3c0e-5b1d-4c36-9a51-2b8c3f0e7d21")


def notification_id(incident_id: int, kind: str, channel: str, sequence: int = 0) -> uuid.UUID:
    """The same incident change to the same channel always has the same id (pure)."""
    return uuid.uuid5(NAMESPACE, f"{incident_id}/{kind}/{channel}/{sequence}")


def summary_id(channel: str, notification_ids: list[uuid.UUID]) -> uuid.UUID:
    """The same notifications folded for the same channel always make the same summary id,
    so a summary tried again is a repeat its receiver can drop (pure)."""
    folded = hashlib.sha256(",".join(sorted(map(str, notification_ids))).encode()).hexdigest()
    return uuid.uuid5(NAMESPACE, f"summary/{channel}/{folded}")


@dataclass(frozen=True, slots=True)
class Notification:
    """A claimed notification: what to send, and where."""

    notification_id: uuid.UUID
    incident_id: int
    task_id: str
    channel: str
    rule: str
    kind: str
    sequence: int
    details: dict[str, Any]
    first_due_at: datetime
    attempts: int
    incident_open: bool


# A closing waits until its opening is expanded (committed, or by this transaction): another
# sender still expanding the opening holds notifications this one cannot see yet, and the
# recovery is made from them.
_EVENTS = """
SELECT e.event_id, e.incident_id, e.task_id::text, e.kind, e.at,
       t.name, t.url, t.tags, i.started_at, i.ended_at, i.end_reason,
       i.first_error_kind, i.first_error_message
FROM alert_events AS e
JOIN incidents AS i USING (incident_id)
LEFT JOIN tasks AS t ON t.task_id = e.task_id
WHERE e.expanded_at IS NULL
  AND (e.kind = 'opened' OR NOT EXISTS (
      SELECT FROM alert_events AS o
      WHERE o.incident_id = e.incident_id AND o.kind = 'opened' AND o.expanded_at IS NULL))
ORDER BY e.event_id
LIMIT %s
FOR UPDATE OF e SKIP LOCKED
"""
_INSERT = """
INSERT INTO notifications (notification_id, incident_id, task_id, channel, rule, kind,
                           sequence, details, first_due_at, due_at)
VALUES (%s, %s, %s::uuid, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (notification_id) DO NOTHING
"""


def expand(cur: Any, config: AlertingConfig, limit: int = 500) -> int:
    """Turn waiting incident events into notifications, in the caller's transaction; returns
    how many events were expanded. Passes until none is left: a closing whose opening this
    transaction expanded is taken in the next pass, before anything of it can be claimed."""
    done = 0
    while done < limit:
        cur.execute(_EVENTS, (limit - done,))
        events = cur.fetchall()
        if not events:
            break
        for event in events:
            _expand_one(cur, config, event)
        done += len(events)
    return done


def _expand_one(cur: Any, config: AlertingConfig, event: tuple[Any, ...]) -> None:
    (event_id, incident_id, task_id, kind, at, name, url, tags, started, ended, end_reason,
     error_kind, error_message) = event  # fmt: skip
    details = {
        "task": {"id": task_id, "name": name, "url": url, "tags": list(tags or [])},
        "incident": {
            "id": incident_id,
            "started_at": started.astimezone(UTC).isoformat(),
            "ended_at": ended.astimezone(UTC).isoformat() if ended is not None else None,
            "end_reason": end_reason,
            "first_error": {"kind": error_kind, "message": error_message}
            if error_kind is not None
            else None,
        },
    }
    if kind == "opened":
        _opened(cur, config, incident_id, task_id, at, name, tags, details)
    else:
        _closed(cur, config, incident_id, task_id, at, started, details)
    cur.execute("UPDATE alert_events SET expanded_at = now() WHERE event_id = %s", (event_id,))


def _opened(
    cur: Any,
    config: AlertingConfig,
    incident_id: int,
    task_id: str,
    at: datetime,
    name: str | None,
    tags: list[str] | None,
    details: dict[str, Any],
) -> None:
    flapping = _flapping(cur, config, task_id, at)
    for channel, rule in config.routes(name, tags):
        if flapping is not None:
            _flapped(cur, config, incident_id, task_id, at, channel, rule.name, flapping, details)
            continue
        due = at + timedelta(seconds=rule.after_seconds)
        nid = notification_id(incident_id, "opened", channel)
        cur.execute(
            _INSERT,
            (str(nid), incident_id, task_id, channel, rule.name, "opened", 0, Json(details),
             due, due),
        )  # fmt: skip


def _flapping(cur: Any, config: AlertingConfig, task_id: str, at: datetime) -> int | None:
    """How many incidents the task opened within the flapping window up to `at`, when that
    makes it flapping; None otherwise."""
    if config.flapping is None:
        return None
    window = timedelta(seconds=config.flapping.window_seconds)
    cur.execute(
        "SELECT count(*) FROM incidents WHERE task_id = %s::uuid AND started_at > %s"
        " AND started_at <= %s",
        (task_id, at - window, at),
    )
    (count,) = cur.fetchone()
    return int(count) if count >= config.flapping.changes else None


def _flapped(
    cur: Any,
    config: AlertingConfig,
    incident_id: int,
    task_id: str,
    at: datetime,
    channel: str,
    rule: str,
    changes: int,
    details: dict[str, Any],
) -> None:
    """Report the task as flapping to `channel`, once per window: nothing if it was already."""
    assert config.flapping is not None
    window = config.flapping.window_seconds
    cur.execute(
        "SELECT 1 FROM notifications WHERE task_id = %s::uuid AND channel = %s"
        " AND kind = 'flapping' AND first_due_at > %s",
        (task_id, channel, at - timedelta(seconds=window)),
    )
    if cur.fetchone() is not None:
        return
    nid = notification_id(incident_id, "flapping", channel)
    flapped = {**details, "flapping": {"changes": changes, "window_seconds": window}}
    cur.execute(
        _INSERT,
        (str(nid), incident_id, task_id, channel, rule, "flapping", 0, Json(flapped), at, at),
    )


def _closed(
    cur: Any,
    config: AlertingConfig,
    incident_id: int,
    task_id: str,
    at: datetime,
    started: datetime,
    details: dict[str, Any],
) -> None:
    # Waits for a sender that holds one of these rows: then its outcome is known here.
    cur.execute(
        "SELECT channel, rule, kind, state, held FROM notifications WHERE incident_id = %s"
        " AND kind IN ('opened', 'reminder') ORDER BY notification_id FOR UPDATE",
        (incident_id,),
    )
    opened: dict[str, tuple[str, str]] = {}
    for channel, rule_name, kind, state, held in cur.fetchall():
        if kind == "opened":
            # Held back by a maintenance window and over before it ended: told to nobody.
            opened[channel] = (rule_name, "held" if state == "pending" and held else state)
    # Reminders still to come are moot now.
    cur.execute(
        "UPDATE notifications SET state = 'cancelled', finished_at = now(),"
        " last_error = 'the incident closed' WHERE incident_id = %s AND kind = 'reminder'"
        " AND state = 'pending'",
        (incident_id,),
    )
    lasted = (at - started).total_seconds()
    for channel, (rule_name, state) in sorted(opened.items()):
        rule = config.rule(rule_name)
        after = rule.after_seconds if rule is not None else 0.0
        if state == "held" or (state == "pending" and lasted < after):
            # Down for less than the rule waits: nobody hears of it, neither of the recovery.
            cur.execute(
                "UPDATE notifications SET state = 'cancelled', finished_at = now(),"
                " last_error = 'the incident closed before it was due (or in maintenance)'"
                " WHERE notification_id = %s",
                (str(notification_id(incident_id, "opened", channel)),),
            )
            continue
        if state == "cancelled" or (rule is not None and not rule.recovery):
            continue
        nid = notification_id(incident_id, "closed", channel)
        cur.execute(
            _INSERT,
            (str(nid), incident_id, task_id, channel, rule_name, "closed", 0, Json(details),
             at, at),
        )  # fmt: skip


# A recovery waits while its channel's opening (or a reminder) is still pending (being
# retried): a receiver hears of the incident before it hears of its end.
_CLAIM = """
SELECT n.notification_id, n.incident_id, n.task_id::text, n.channel, n.rule, n.kind,
       n.sequence, n.details, n.first_due_at, n.attempts,
       (SELECT i.ended_at IS NULL FROM incidents AS i WHERE i.incident_id = n.incident_id)
FROM notifications AS n
WHERE n.state = 'pending' AND n.due_at <= now()
  AND (n.kind <> 'closed' OR NOT EXISTS (
      SELECT FROM notifications AS p
      WHERE p.incident_id = n.incident_id AND p.channel = n.channel
        AND p.kind IN ('opened', 'reminder') AND p.state = 'pending'))
  {only}
ORDER BY n.due_at
LIMIT %s
FOR UPDATE OF n SKIP LOCKED
"""


def claim(cur: Any, limit: int) -> list[Notification]:
    """Lock up to `limit` due notifications until the caller's transaction ends."""
    cur.execute(_CLAIM.format(only=""), (limit,))
    return _claimed(cur)


def claim_channel(
    cur: Any, channel: str, besides: list[uuid.UUID], limit: int
) -> list[Notification]:
    """Lock up to `limit` more due notifications of `channel`, other than `besides` (which
    this transaction holds already), to fold them into a summary."""
    only = "AND n.channel = %s AND n.notification_id <> ALL(%s::uuid[])"
    cur.execute(_CLAIM.format(only=only), (channel, [str(i) for i in besides], limit))
    return _claimed(cur)


def _claimed(cur: Any) -> list[Notification]:
    return [
        Notification(
            notification_id=uuid.UUID(str(r[0])),
            incident_id=r[1],
            task_id=r[2],
            channel=r[3],
            rule=r[4],
            kind=r[5],
            sequence=r[6],
            details=r[7],
            first_due_at=r[8],
            attempts=r[9],
            incident_open=bool(r[10]),
        )
        for r in cur.fetchall()
    ]


def sent(cur: Any, n: Notification, repeat_seconds: float | None) -> None:
    """Mark `n` sent; schedule the next reminder when the rule repeats and the incident is
    still open."""
    cur.execute(
        "UPDATE notifications SET state = 'sent', finished_at = now(), attempts = attempts + 1,"
        " last_error = NULL WHERE notification_id = %s",
        (str(n.notification_id),),
    )
    _remind(cur, n, repeat_seconds)


def summarised(cur: Any, n: Notification, summary: uuid.UUID, repeat_seconds: float | None) -> None:
    """Mark `n` told through the summary `summary` (sent in it, not on its own); its rule's
    reminders follow as if it was sent."""
    cur.execute(
        "UPDATE notifications SET state = 'summarised', summary_id = %s, finished_at = now(),"
        " attempts = attempts + 1, last_error = NULL WHERE notification_id = %s",
        (str(summary), str(n.notification_id)),
    )
    _remind(cur, n, repeat_seconds)


def _remind(cur: Any, n: Notification, repeat_seconds: float | None) -> None:
    """Schedule the next reminder when the rule repeats and the incident is still open."""
    if repeat_seconds is not None and n.kind in ("opened", "reminder") and n.incident_open:
        sequence = n.sequence + 1
        nid = notification_id(n.incident_id, "reminder", n.channel, sequence)
        cur.execute(
            "INSERT INTO notifications (notification_id, incident_id, task_id, channel, rule,"
            " kind, sequence, details, first_due_at, due_at)"
            " SELECT %s, %s, %s::uuid, %s, %s, 'reminder', %s, %s,"
            " now() + make_interval(secs => %s), now() + make_interval(secs => %s)"
            " WHERE EXISTS (SELECT FROM incidents WHERE incident_id = %s AND ended_at IS NULL)"
            " ON CONFLICT (notification_id) DO NOTHING",
            (str(nid), n.incident_id, n.task_id, n.channel, n.rule, sequence, Json(n.details),
             repeat_seconds, repeat_seconds, n.incident_id),
        )  # fmt: skip


def hold(cur: Any, n: Notification, until: datetime) -> None:
    """Hold `n` back until a maintenance window ends (not a try: no attempt counted)."""
    cur.execute(
        "UPDATE notifications SET held = true, due_at = %s WHERE notification_id = %s",
        (until, str(n.notification_id)),
    )


def wait(cur: Any, waiting: list[Notification], until: datetime) -> None:
    """Put these off until `until`, when their channel's rate limit has room again (not a
    try: no attempt counted)."""
    cur.execute(
        "UPDATE notifications SET due_at = %s WHERE notification_id = ANY(%s::uuid[])",
        (until, [str(n.notification_id) for n in waiting]),
    )


def retry(cur: Any, n: Notification, delay: float, error: str) -> None:
    """Try `n` again in `delay` seconds, keeping the error."""
    cur.execute(
        "UPDATE notifications SET attempts = attempts + 1, last_error = %s,"
        " due_at = now() + make_interval(secs => %s) WHERE notification_id = %s",
        (error, delay, str(n.notification_id)),
    )


def failed(cur: Any, n: Notification, error: str) -> None:
    """Give `n` up, keeping the last error."""
    cur.execute(
        "UPDATE notifications SET state = 'failed', attempts = attempts + 1, last_error = %s,"
        " finished_at = now() WHERE notification_id = %s",
        (error, str(n.notification_id)),
    )


def cancelled(cur: Any, n: Notification, reason: str) -> None:
    cur.execute(
        "UPDATE notifications SET state = 'cancelled', finished_at = now(), last_error = %s"
        " WHERE notification_id = %s",
        (reason, str(n.notification_id)),
    )


def pending(cur: Any) -> tuple[int, int]:
    """How many notifications are pending, and how many of those are due now."""
    cur.execute(
        "SELECT count(*), count(*) FILTER (WHERE due_at <= now()) FROM notifications"
        " WHERE state = 'pending'"
    )
    total, due = cur.fetchone()
    return int(total), int(due)


def listing(cur: Any, states: tuple[str, ...], limit: int = 1000) -> list[dict[str, Any]]:
    """Notifications in `states`, oldest first, for `notifications list`."""
    cur.execute(
        "SELECT notification_id::text, state, kind, channel, rule, task_id::text,"
        " details->'task'->>'name', incident_id, attempts, due_at, last_error"
        " FROM notifications WHERE state = ANY(%s) ORDER BY due_at LIMIT %s",
        (list(states), limit),
    )
    names = [d.name for d in cur.description]
    names[6] = "task_name"
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
