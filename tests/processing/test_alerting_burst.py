"""A thousand tasks going down at once, on real parts: the real writer opens 1,000 incidents
in a real PostgreSQL; real senders (one, then two at once) deliver to a real HTTP receiver that
checks each request's signature. The channel's rate limit holds: at most `max_per_minute`
notifications one by one in a minute, the others told in one summary; every notification ends
sent or summarised, none twice, none lost, and the processor's metrics count them. A
notification told in a summary is told: its reminders follow, and so does its recovery."""

from __future__ import annotations

import json
import threading
import uuid
from datetime import timedelta
from functools import partial
from typing import Any

import pytest
from aiohttp import web
from processing.processing_helpers import make_result, record_of
from processing.test_alerting_delivery import (  # noqa: F401 (fixtures)
    START,
    Receiver,
    Senders,
    config_for,
    receiver,
    rows,
    senders,
    settled,
    until,
    writer,
)

from checker_processing import db
from checker_processing.alerting import sender as sender_module
from checker_processing.alerting.config import AlertingConfig
from checker_processing.alerting.sender import Sender
from checker_processing.metrics import Metrics
from checker_processing.writer import Writer
from devstack import free_port

pytestmark = pytest.mark.postgres

TASKS = 1000
LIMIT = 50


def down_at_once(into: Writer, tasks: int = TASKS, health: str = "down", minutes: int = 0) -> None:
    """1,000 tasks, each with a name of its own, down in one batch (or up again)."""
    down = health == "down"
    error = {"kind": "connect", "message": "connection refused"} if down else None
    into.write(
        [
            record_of(
                uuid.UUID(int=0x4000_8000_0000_0000_0000 + i),
                make_result(
                    timestamp=START + timedelta(minutes=minutes),
                    ok=not down,
                    health=health,
                    error=error,
                    name=f"task-{i:04d}",
                ),
                offset=minutes * tasks + i,
            )
            for i in range(tasks)
        ]
    )


def limited(port: int, limit: int = LIMIT, **rule: Any) -> AlertingConfig:
    config = config_for(port, **rule)
    ops = config.channels["ops"].model_copy(update={"max_per_minute": limit})
    return config.model_copy(update={"channels": {"ops": ops}})


def start(pool: Senders, config: AlertingConfig, count: int, metrics: Metrics) -> None:
    """Like `Senders.start`, with the processor's metrics."""
    for _ in range(count):
        sender = Sender(partial(db.connect, pool.dsn), config, pool.stop, metrics)
        thread = threading.Thread(target=sender.run)
        thread.start()
        pool.senders.append(sender)
        pool.threads.append(thread)


class SummaryRefusing(Receiver):
    """A receiver that answers 503 to the first `refuse` summaries."""

    def __init__(self, port: int, refuse: int) -> None:
        super().__init__(port)
        self.refuse = refuse

    async def handle(self, request: web.Request) -> web.Response:
        if json.loads(await request.read())["kind"] == "summary" and self.refuse > 0:
            self.refuse -= 1
            self.refused += 1
            return web.Response(status=503)
        return await super().handle(request)


def a_minute_passes(conn: Any) -> None:
    """The senders' clock is the database's: their budgets move ten minutes back, and what
    waits for the next minute is due now."""
    with conn.cursor() as cur:
        cur.execute("UPDATE notification_windows SET window_start = window_start"
                    " - interval '10 minutes'")  # fmt: skip
        cur.execute("UPDATE notifications SET due_at = now() WHERE state = 'pending'")


def settled_in_minutes(conn: Any, count: int = TASKS) -> Any:
    """Whether every notification is sent or summarised; whenever all that is left waits for
    the next minute (two senders: one folded the rest while the other held a batch, which then
    found the minute's summary spent), that minute comes at once."""
    done = settled(conn, count)
    due = "SELECT count(*) FILTER (WHERE due_at <= now()), count(*) FROM notifications"
    due += " WHERE state = 'pending'"

    def check() -> bool:
        if done():
            return True
        ((now, pending),) = rows(conn, due)
        if pending and not now:
            a_minute_passes(conn)
        return False

    return check


@pytest.fixture
def metrics() -> Metrics:
    return Metrics.create()


def counted(metrics: Metrics, kind: str, outcome: str) -> float:
    value = metrics.registry.get_sample_value(
        "checker_processing_notifications_total",
        {"channel": "ops", "kind": kind, "outcome": outcome},
    )
    return value or 0.0


def accounted(received: list[dict[str, Any]], migrated: Any) -> tuple[int, list[dict[str, Any]]]:
    """Check that each of the 1,000 notifications reached the receiver once, on its own or in
    one summary, as its row says; return how many came one by one, and the summaries."""
    ones = [b for b in received if b["kind"] != "summary"]
    summaries = [b for b in received if b["kind"] == "summary"]
    ids = [b["notification_id"] for b in ones]
    ids += [i for s in summaries for i in s["notification_ids"]]
    assert len(ids) == TASKS
    assert len(set(ids)) == TASKS  # 0 duplicates, summaries included
    assert len({b["notification_id"] for b in received}) == len(received)
    states = dict(rows(migrated, "SELECT state, count(*) FROM notifications GROUP BY state"))
    assert states == {"sent": len(ones), "summarised": TASKS - len(ones)}
    for s in summaries:
        assert s["counts"] == {
            "opened": len(s["notification_ids"]), "reminder": 0, "closed": 0, "flapping": 0
        }  # fmt: skip
        assert len(s["first"]) == min(20, len(s["notification_ids"]))
        assert s["more"] == len(s["notification_ids"]) - len(s["first"])
        assert s["summary"].startswith(f"[SUMMARY] {len(s['notification_ids'])} notifications")
        folded = rows(
            migrated,
            "SELECT notification_id::text FROM notifications WHERE summary_id = %s",
            s["notification_id"],
        )
        assert sorted(i for (i,) in folded) == sorted(s["notification_ids"])
    return len(ones), summaries


def within_the_rate(migrated: Any, ones: int, summaries: int) -> int:
    """Each minute the channel spent at most its limit one by one and one summary; returns the
    minutes the burst spanned (1, or 2 when it crossed the turn of a minute)."""
    windows = rows(migrated, "SELECT sent, summary_id FROM notification_windows")
    assert all(sent <= LIMIT for sent, _ in windows)
    assert sum(sent for sent, _ in windows) == ones
    assert sum(1 for _, s in windows if s is not None) == summaries
    assert ones <= LIMIT * len(windows)
    return len(windows)


@pytest.mark.parametrize("count", [1, 2], ids=["one sender", "two senders"])
async def test_a_thousand_tasks_down_at_once_make_fifty_calls_and_a_summary(
    writer: Writer,  # noqa: F811
    migrated: Any,
    receiver: Receiver,  # noqa: F811
    senders: Senders,  # noqa: F811
    metrics: Metrics,
    count: int,
) -> None:
    down_at_once(writer)
    start(senders, limited(receiver.port), count, metrics)
    await until(settled_in_minutes(migrated), "every notification sent or summarised")

    assert receiver.bad == []
    ones, summaries = accounted(receiver.received, migrated)
    minutes = within_the_rate(migrated, ones, len(summaries))
    if minutes == 1:
        assert (ones, len(summaries)) == (LIMIT, 1)
        assert summaries[0]["counts"]["opened"] == TASKS - LIMIT
        assert summaries[0]["more"] == TASKS - LIMIT - 20
    # The metrics say the same.
    assert counted(metrics, "opened", "sent") == ones
    assert counted(metrics, "opened", "summarised") == TASKS - ones
    assert counted(metrics, "summary", "sent") == len(summaries)
    delays = metrics.registry.get_sample_value(
        "checker_processing_notification_delay_seconds_count", {"channel": "ops"}
    )
    assert delays == TASKS
    # Due an hour ago (the results' time): delivered between one hour and four.
    assert metrics.registry.get_sample_value(
        "checker_processing_notification_delay_seconds_bucket", {"channel": "ops", "le": "3600.0"}
    ) == 0  # fmt: skip


async def test_a_failed_summary_loses_none_of_its_notifications(
    writer: Writer,  # noqa: F811
    migrated: Any,
    senders: Senders,  # noqa: F811
    metrics: Metrics,
    monkeypatch: Any,
) -> None:
    monkeypatch.setattr(sender_module, "GAUGE_SECONDS", 0.0)  # read the gauges every round
    refusing = SummaryRefusing(free_port(), refuse=1)
    await refusing.start()
    try:
        # What follows, up to the minute the test makes pass, happens within one minute.
        early = "SELECT extract(second FROM clock_timestamp()) < 40"
        await until(lambda: rows(migrated, early)[0][0], "the first 40 s of a minute")
        down_at_once(writer)
        start(senders, limited(refusing.port), 1, metrics)
        # The summary fails; tried again at once, its notifications find this minute's summary
        # spent, and wait for the next minute, every one of them still pending.
        waiting = (
            "SELECT count(*) FROM notifications WHERE state = 'pending' AND attempts = 1"
            " AND last_error LIKE 'summary %%: HTTP 503' AND due_at > now()"
        )
        await until(lambda: rows(migrated, waiting)[0][0] > 0, "the summary's failure")
        await until(
            lambda: (
                rows(migrated, "SELECT count(*) FROM notifications WHERE state = 'pending'")
                == rows(migrated, waiting)
            ),
            "every folded notification waiting",
        )
        (pending,) = rows(migrated, "SELECT count(*) FROM notifications WHERE state = 'pending'")
        assert pending[0] >= TASKS - 2 * LIMIT
        assert counted(metrics, "summary", "retried") == 1
        assert counted(metrics, "opened", "retried") == pending[0]
        gauge = metrics.registry.get_sample_value
        await until(
            lambda: (
                gauge("checker_processing_notifications_pending") == pending[0]
                and gauge("checker_processing_notifications_due") == 0
            ),
            "the gauges to show them waiting",
        )
        a_minute_passes(migrated)
        await until(settled_in_minutes(migrated), "every notification sent or summarised")
        await until(
            lambda: gauge("checker_processing_notifications_pending") == 0, "the gauge at 0"
        )
    finally:
        await refusing.stop()

    assert refusing.refused == 1
    _, summaries = accounted(refusing.received, migrated)
    assert len(summaries) >= 1
    assert counted(metrics, "summary", "sent") == len(summaries)


async def test_a_summarised_opening_is_reminded_of_and_its_recovery_told(
    writer: Writer,  # noqa: F811
    migrated: Any,
    receiver: Receiver,  # noqa: F811
    senders: Senders,  # noqa: F811
    metrics: Metrics,
) -> None:
    down_at_once(writer, tasks=3)
    start(senders, limited(receiver.port, 1, repeat_seconds=3600), 1, metrics)
    reminders = "SELECT count(*) FROM notifications WHERE kind = 'reminder' AND state = 'pending'"
    # Told in the summary as much as on its own: each opening has its reminder an hour ahead.
    await until(lambda: rows(migrated, reminders) == [(3,)], "three reminders")
    down_at_once(writer, tasks=3, health="up", minutes=5)
    await until(settled_in_minutes(migrated, 9), "the recoveries")

    assert rows(migrated, "SELECT kind, state, count(*) FROM notifications"
                " GROUP BY kind, state ORDER BY kind, state") == [
        ("closed", "sent", 1), ("closed", "summarised", 2),
        ("opened", "sent", 1), ("opened", "summarised", 2),
        ("reminder", "cancelled", 3),
    ]  # fmt: skip
    summaries = [b for b in receiver.received if b["kind"] == "summary"]
    assert [(s["counts"]["opened"], s["counts"]["closed"]) for s in summaries] == [(2, 0), (0, 2)]
    assert summaries[1]["summary"].startswith("[SUMMARY] 2 notifications over the limit of 1")
    assert counted(metrics, "closed", "summarised") == 2
