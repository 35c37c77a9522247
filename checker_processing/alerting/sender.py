"""The sender loop: expand incident events into notifications, claim the due ones, deliver.

One round: in one transaction, the waiting events become notifications (`outbox.expand`); in
the next, up to `batch_size` due notifications are claimed (`FOR UPDATE SKIP LOCKED`), split by
their channels' rate limits (`rate.plan`: one by one within the budget, the rest of the
channel's due ones folded into one summary), sent concurrently, each marked sent (or
summarised), retried later (backoff with jitter, at least Retry-After) or failed (refused by
the receiver, or still failing `give_up_after_seconds` after it was due), and the transaction
commits. A summary's notifications share its fate: told, retried together, or failed. The
rows stay locked while they are sent, so another processor never sends them too; should this
one die mid-send, they are sent again by whoever comes next (the stable id lets receivers drop
the repeat). Should the database go away after a send and before its commit, the sender
remembers what the receivers answered to the one-by-one notifications: when the rows are
claimed again, that answer is recorded and nothing is sent twice.

It runs in a thread of its own with its own event loop and database connection, beside the
processor's consume loop, until `stop` is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import aiohttp
import psycopg2
from psycopg2.extensions import connection as Connection

from checker_common.errors import first_line
from checker_processing import db
from checker_processing.alerting import alertmanager, mail, outbox, rate, slack, webhook
from checker_processing.alerting.config import (
    AlertingConfig,
    AlertmanagerChannel,
    EmailChannel,
    SlackChannel,
    WebhookChannel,
)
from checker_processing.alerting.delivery import (
    Delivered,
    Outcome,
    Refused,
    TryAgain,
    next_delay,
)
from checker_processing.alerting.message import Body, SummaryBody, body
from checker_processing.metrics import Metrics

log = logging.getLogger(__name__)

MAX_ERROR = 500
# How often the gauges of pending notifications are read from the database, at most.
GAUGE_SECONDS = 5.0
# Answers remembered across a database outage (a round's worth each); the oldest go first.
MAX_UNRECORDED = 10_000


async def send(
    session: aiohttp.ClientSession,
    config: AlertingConfig,
    channel: str,
    notification: Body,
) -> Outcome:
    """Deliver one notification body through the named channel (one try)."""
    target = config.channels.get(channel)
    if isinstance(target, WebhookChannel):
        return await webhook.send(session, target, notification)
    if isinstance(target, SlackChannel):
        return await slack.send(session, target, notification)
    if isinstance(target, EmailChannel):
        return await mail.send(target, notification)
    if isinstance(target, AlertmanagerChannel):
        if isinstance(notification, SummaryBody):
            return Refused("Alertmanager takes each alert, never a summary")
        return await alertmanager.send(session, target, notification)
    return Refused(f"channel {channel!r} is not in the alerting file")


class Sender:
    """Delivers the outbox's notifications; `run()` until `stop` is set."""

    def __init__(
        self,
        connect: Callable[[], Connection],
        config: AlertingConfig,
        stop: threading.Event,
        metrics: Metrics | None = None,
    ) -> None:
        self._connect = connect
        self._config = config
        self._stop = stop
        self._metrics = metrics
        self._conn: Connection | None = None
        self._gauged = 0.0
        self.sent = 0
        # What receivers answered in a round whose commit failed: not sent again when claimed.
        self._unrecorded: dict[uuid.UUID, Outcome] = {}

    @property
    def conn(self) -> Connection:
        if self._conn is None or self._conn.closed:
            self._conn = self._connect()
        return self._conn

    def _reset(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg2.Error):
                self._conn.close()
        self._conn = None

    def run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        delivery = self._config.delivery
        failures = 0
        async with aiohttp.ClientSession() as session:
            while not self._stop.is_set():
                try:
                    busy = await self.round(session)
                    failures = 0
                except db.TRANSIENT_ERRORS as exc:
                    self._reset()
                    failures += 1
                    delay = next_delay(failures, 0.5, 30.0)
                    log.warning(
                        "alerting: database unavailable (attempt %d, retry in %.2fs): %s",
                        failures,
                        delay,
                        first_line(exc),
                    )
                    await self._wait(delay)
                    continue
                except Exception:
                    # Not connection trouble (a schema or a bug): said loudly, tried again
                    # later, so that alerting is not silently gone until a restart.
                    self._reset()
                    log.exception("alerting: a sender round failed; trying again in 30 s")
                    await self._wait(30.0)
                    continue
                if not busy:
                    await self._wait(delivery.poll_seconds)
        self._reset()

    async def _wait(self, seconds: float) -> None:
        # In a worker thread: set from the signal handler's thread, `stop` ends the wait at once.
        await asyncio.to_thread(self._stop.wait, seconds)

    async def round(self, session: aiohttp.ClientSession) -> int:
        """Expand waiting events, then deliver one batch of due notifications; returns how
        many events and notifications it handled (0: nothing to do)."""
        conn = self.conn
        try:
            with conn.cursor() as cur:
                expanded = outbox.expand(cur, self._config)
            conn.commit()
            with conn.cursor() as cur:
                claimed = self._not_held(cur, outbox.claim(cur, self._config.delivery.batch_size))
                plan = rate.plan(cur, self._config, claimed, partial(self._not_held, cur))
                singles, summaries = await asyncio.gather(
                    asyncio.gather(*(self._deliver(session, n) for n in plan.one_by_one)),
                    asyncio.gather(
                        *(
                            send(session, self._config, s.body.channel, s.body)
                            for s in plan.summaries
                        )
                    ),
                )
                self._remember(plan.one_by_one, singles)
                for n, outcome in zip(plan.one_by_one, singles, strict=True):
                    self._record(cur, n, outcome)
                for summary, told in zip(plan.summaries, summaries, strict=True):
                    self._record_summary(cur, summary, told)
            conn.commit()
            for n in plan.one_by_one:
                self._unrecorded.pop(n.notification_id, None)
            self._gauge(conn)
        except BaseException:
            with contextlib.suppress(psycopg2.Error):
                conn.rollback()
            raise
        folded = sum(len(s.folded) for s in plan.summaries)
        return expanded + len(plan.one_by_one) + folded + plan.put_off

    def _not_held(self, cur: Any, claimed: list[outbox.Notification]) -> list[outbox.Notification]:
        """The claimed notifications no maintenance window holds back; the others wait for
        their window's end."""
        if not self._config.maintenance:
            return claimed
        now = datetime.now(UTC)
        free = []
        for n in claimed:
            task = n.details.get("task", {})
            until = self._config.held_until(task.get("name"), task.get("tags"), now)
            if until is None:
                free.append(n)
            else:
                outbox.hold(cur, n, until)
                log.info(
                    "notification %s to %s held by maintenance until %s",
                    n.notification_id, n.channel, until.isoformat(),
                )  # fmt: skip
        return free

    def _remember(self, claimed: list[outbox.Notification], outcomes: list[Outcome | None]) -> None:
        """Keep the receivers' final answers until the round commits (a try to come again
        needs no keeping)."""
        for n, outcome in zip(claimed, outcomes, strict=True):
            if isinstance(outcome, Delivered | Refused):
                self._unrecorded[n.notification_id] = outcome
        while len(self._unrecorded) > MAX_UNRECORDED:
            del self._unrecorded[next(iter(self._unrecorded))]

    async def _deliver(
        self, session: aiohttp.ClientSession, n: outbox.Notification
    ) -> Outcome | None:
        answered = self._unrecorded.get(n.notification_id)
        if answered is not None:
            log.info(
                "notification %s to %s was answered before the database went away:"
                " recorded, not sent again",
                n.notification_id, n.channel,
            )  # fmt: skip
            return answered
        if n.kind == "reminder" and not n.incident_open:
            return None  # the incident closed meanwhile
        notification = body(n.notification_id, n.kind, n.sequence, n.channel, n.rule, n.details)  # type: ignore[arg-type]
        return await send(session, self._config, n.channel, notification)

    def _record_summary(self, cur: Any, summary: rate.Summary, outcome: Outcome) -> None:
        """The summary's outcome is that of each notification it stands for; tried again, they
        are tried again together (one delay), so that they fold into the same summary."""
        told = summary.body
        self._count(told.channel, "summary", _outcome_name(outcome))
        delay = None
        if isinstance(outcome, Delivered):
            log.info(
                "summary %s of %d notifications sent to %s",
                told.notification_id, len(summary.folded), told.channel,
                extra={"notification_id": str(told.notification_id), "channel": told.channel},
            )  # fmt: skip
        else:
            log.warning(
                "summary %s of %d notifications to %s failed: %s",
                told.notification_id, len(summary.folded), told.channel, outcome.error,
                extra={"notification_id": str(told.notification_id), "channel": told.channel},
            )  # fmt: skip
        if isinstance(outcome, TryAgain):
            delivery = self._config.delivery
            attempts = max(n.attempts for n in summary.folded) + 1
            delay = next_delay(
                attempts,
                delivery.retry_initial_seconds,
                delivery.retry_max_seconds,
                outcome.retry_after,
            )
        for n in summary.folded:
            self._record(cur, n, outcome, summary=told.notification_id, delay=delay)

    def _count(self, channel: str, kind: str, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.notified(channel, kind, outcome)

    def _gauge(self, conn: Connection) -> None:
        """Read the pending and due notifications into their gauges, every few seconds."""
        if self._metrics is None or time.monotonic() < self._gauged + GAUGE_SECONDS:
            return
        self._gauged = time.monotonic()
        with conn.cursor() as cur:
            pending, due = outbox.pending(cur)
        conn.rollback()
        self._metrics.outbox(pending, due)

    def _record(
        self,
        cur: Any,
        n: outbox.Notification,
        outcome: Outcome | None,
        summary: uuid.UUID | None = None,
        delay: float | None = None,
    ) -> None:
        """Mark `n` by its outcome (None: the incident closed meanwhile); `summary`: the
        outcome is that of this summary, which stands for `n`, and `delay` its retry's."""
        ids = {"notification_id": str(n.notification_id), "channel": n.channel}
        if outcome is None:
            outbox.cancelled(cur, n, "the incident closed")
            self._count(n.channel, n.kind, "cancelled")
            return
        if isinstance(outcome, Delivered):
            rule = self._config.rule(n.rule)
            repeat = rule.repeat_seconds if rule is not None else None
            if self._metrics is not None:
                late = (datetime.now(UTC) - n.first_due_at).total_seconds()
                self._metrics.delivered(n.channel, late)
            if summary is not None:
                outbox.summarised(cur, n, summary, repeat)
                self._count(n.channel, n.kind, "summarised")
                return
            outbox.sent(cur, n, repeat)
            self._count(n.channel, n.kind, "sent")
            self.sent += 1
            log.info(
                "notification %s (%s) sent to %s", n.notification_id, n.kind, n.channel, extra=ids
            )
            return
        error = outcome.error[:MAX_ERROR]
        if summary is not None:
            error = f"summary {summary}: {error}"[:MAX_ERROR]
        if isinstance(outcome, Refused):
            outbox.failed(cur, n, error)
            self._count(n.channel, n.kind, "failed")
            log.error(
                "notification %s to %s refused, not retried: %s",
                n.notification_id,
                n.channel,
                error,
                extra=ids,
            )
            return
        assert isinstance(outcome, TryAgain)
        delivery = self._config.delivery
        if delay is None:
            delay = next_delay(
                n.attempts + 1,
                delivery.retry_initial_seconds,
                delivery.retry_max_seconds,
                outcome.retry_after,
            )
        give_up = n.first_due_at + timedelta(seconds=delivery.give_up_after_seconds)
        if datetime.now(UTC) + timedelta(seconds=delay) > give_up:
            outbox.failed(cur, n, error)
            self._count(n.channel, n.kind, "failed")
            log.error(
                "notification %s to %s failed, giving up after %d tries: %s",
                n.notification_id, n.channel, n.attempts + 1, error, extra=ids,
            )  # fmt: skip
            return
        outbox.retry(cur, n, delay, error)
        self._count(n.channel, n.kind, "retried")
        # A summary's notifications: its own line says it once.
        log.log(
            logging.DEBUG if summary is not None else logging.WARNING,
            "notification %s to %s failed (try %d, again in %.1fs): %s",
            n.notification_id, n.channel, n.attempts + 1, delay, error, extra=ids,
        )  # fmt: skip


def _outcome_name(outcome: Outcome) -> str:
    """A summary's `outcome` label (its notifications are counted each by its own)."""
    if isinstance(outcome, Delivered):
        return "sent"
    return "failed" if isinstance(outcome, Refused) else "retried"
