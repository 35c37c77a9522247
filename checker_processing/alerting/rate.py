"""The rate limit of a channel: at most `max_per_minute` notifications sent one by one in a
minute, and the others then due folded into one summary; one summary a minute at most.

The minute is a fixed window by the database's clock, shared by every processor through one
row of `notification_windows` per channel and minute (migration 0014). A sender locks its
channel's row (`INSERT ... ON CONFLICT DO UPDATE`, which takes the row lock and reads its
latest values) before it decides what to send there, and holds it until its round commits,
after the sends: a second sender waits for it, then reads what the first spent. Rows are
locked in channel order, so two senders never wait for each other in a circle. What counts
is tries, not successes: a receiver that failed to take a notification still got the request.
A sender that dies mid-send rolls its spending back with its claims; whoever sends those again
spends again.

Alertmanager has no limit (config.AlertingConfig.max_per_minute says why).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from checker_processing.alerting import outbox
from checker_processing.alerting.config import AlertingConfig
from checker_processing.alerting.message import SummaryBody, SummaryItem, summary_body

# The most notifications one summary stands for; any more wait for the next minute's.
MAX_FOLDED = 10_000
WINDOW = timedelta(minutes=1)


@dataclass(frozen=True, slots=True)
class Allowance:
    """What a channel may do with its due notifications in this window: send the first
    `send` one by one; fold the others into a summary (`fold`), or else put them off to the
    next window."""

    send: int
    fold: bool


def allowance(due: int, limit: int, spent: int, summarised: bool) -> Allowance:
    """The allowance of `due` notifications on a channel that may send `limit` a window, has
    sent `spent` in this one and has (or has not) sent its summary in it (pure)."""
    room = max(0, limit - spent)
    if due <= room:
        return Allowance(send=due, fold=False)
    return Allowance(send=room, fold=not summarised)


@dataclass(frozen=True, slots=True)
class Window:
    """A channel's budget in the current minute, as locked by this transaction."""

    channel: str
    start: datetime
    spent: int
    summary_id: uuid.UUID | None

    @property
    def end(self) -> datetime:
        return self.start + WINDOW


def lock_window(cur: Any, channel: str) -> Window:
    """Lock the channel's row of the current minute until the transaction ends; read it."""
    cur.execute(
        "INSERT INTO notification_windows (channel, window_start)"
        " VALUES (%s, date_trunc('minute', clock_timestamp()))"
        " ON CONFLICT (channel, window_start) DO UPDATE SET sent = notification_windows.sent"
        " RETURNING window_start, sent, summary_id",
        (channel,),
    )
    start, spent, summary = cur.fetchone()
    return Window(channel, start, spent, uuid.UUID(str(summary)) if summary else None)


def spend(cur: Any, window: Window, sent: int, summary: uuid.UUID | None) -> None:
    cur.execute(
        "UPDATE notification_windows SET sent = sent + %s, summary_id = coalesce(%s, summary_id)"
        " WHERE channel = %s AND window_start = %s",
        (sent, str(summary) if summary else None, window.channel, window.start),
    )


@dataclass(frozen=True, slots=True)
class Summary:
    """A summary to send, and the notifications it stands for."""

    body: SummaryBody
    folded: list[outbox.Notification]


@dataclass
class Plan:
    """What a round sends: notifications one by one, and summaries."""

    one_by_one: list[outbox.Notification] = field(default_factory=list)
    summaries: list[Summary] = field(default_factory=list)
    put_off: int = 0


def moot(n: outbox.Notification) -> bool:
    """A reminder of an incident that closed meanwhile: cancelled, neither sent nor counted."""
    return n.kind == "reminder" and not n.incident_open


def plan(
    cur: Any,
    config: AlertingConfig,
    claimed: list[outbox.Notification],
    free: Callable[[list[outbox.Notification]], list[outbox.Notification]],
) -> Plan:
    """Split the claimed notifications by their channels' budgets, in the caller's transaction:
    within budget they go one by one; beyond it, they and every other notification due to the
    channel (claimed now, those `free` keeps: not held by maintenance) make one summary, or,
    when the channel's summary of this minute is spent too, they wait for the next minute."""
    result = Plan()
    channels: dict[str, list[outbox.Notification]] = {}
    for n in claimed:
        channels.setdefault(n.channel, []).append(n)
    for channel in sorted(channels):
        due = channels[channel]
        live = [n for n in due if not moot(n)]
        result.one_by_one += [n for n in due if moot(n)]
        limit = config.max_per_minute(channel)
        if limit is None or not live:
            result.one_by_one += live
            continue
        window = lock_window(cur, channel)
        allowed = allowance(len(live), limit, window.spent, window.summary_id is not None)
        result.one_by_one += live[: allowed.send]
        rest = live[allowed.send :]
        summary = None
        if rest and allowed.fold:
            besides = [n.notification_id for n in due]
            more = free(outbox.claim_channel(cur, channel, besides, MAX_FOLDED - len(rest)))
            result.one_by_one += [n for n in more if moot(n)]
            rest += [n for n in more if not moot(n)]
            summary = fold(channel, window, limit, rest)
            result.summaries.append(summary)
        elif rest:
            outbox.wait(cur, rest, window.end)
            result.put_off += len(rest)
        spend(cur, window, allowed.send, summary.body.notification_id if summary else None)
    return result


def fold(channel: str, window: Window, limit: int, folded: list[outbox.Notification]) -> Summary:
    """One summary of these notifications (pure)."""
    items = [
        SummaryItem(
            notification_id=n.notification_id,
            kind=n.kind,
            task_id=uuid.UUID(n.task_id),
            task_name=(n.details.get("task") or {}).get("name"),
        )
        for n in folded
    ]
    sid = outbox.summary_id(channel, [n.notification_id for n in folded])
    return Summary(summary_body(sid, channel, window.start, limit, items), folded)
