"""The sender loop: expand incident events into notifications, claim the due ones, deliver.

One round: in one transaction, the waiting events become notifications (`outbox.expand`); in
the next, up to `batch_size` due notifications are claimed (`FOR UPDATE SKIP LOCKED`), sent
concurrently, each marked sent, retried later (backoff with jitter, at least Retry-After) or
failed (refused by the receiver, or still failing `give_up_after_seconds` after it was due),
and the transaction commits. The rows stay locked while they are sent, so another processor
never sends them too; should this one die mid-send, they are sent again by whoever comes next
(the stable id lets receivers drop the repeat).

It runs in a thread of its own with its own event loop and database connection, beside the
processor's consume loop, until `stop` is set. With nothing to do it waits for the NOTIFY of a
new incident event (`wakeup.py`), or `delivery.poll_seconds` at most.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import psycopg2
from psycopg2.extensions import connection as Connection

from checker_common.errors import first_line
from checker_processing import db
from checker_processing.alerting import alertmanager, mail, outbox, slack, wakeup, webhook
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
from checker_processing.alerting.message import NotificationBody, body

log = logging.getLogger(__name__)

MAX_ERROR = 500


async def send(
    session: aiohttp.ClientSession,
    config: AlertingConfig,
    channel: str,
    notification: NotificationBody,
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
        return await alertmanager.send(session, target, notification)
    return Refused(f"channel {channel!r} is not in the alerting file")


class Sender:
    """Delivers the outbox's notifications; `run()` until `stop` is set."""

    def __init__(
        self,
        connect: Callable[[], Connection],
        config: AlertingConfig,
        stop: threading.Event,
    ) -> None:
        self._connect = connect
        self._config = config
        self._stop = stop
        self._conn: Connection | None = None
        self._wakeup = wakeup.Wakeup(connect, stop)
        self.sent = 0

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
                    await asyncio.to_thread(self._wakeup.wait, delivery.poll_seconds)
        self._reset()
        self._wakeup.close()

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
                if claimed:
                    outcomes = await asyncio.gather(*(self._deliver(session, n) for n in claimed))
                    for n, outcome in zip(claimed, outcomes, strict=True):
                        self._record(cur, n, outcome)
            conn.commit()
        except BaseException:
            with contextlib.suppress(psycopg2.Error):
                conn.rollback()
            raise
        return expanded + len(claimed)

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

    async def _deliver(
        self, session: aiohttp.ClientSession, n: outbox.Notification
    ) -> Outcome | None:
        if n.kind == "reminder" and not n.incident_open:
            return None  # the incident closed meanwhile
        notification = body(n.notification_id, n.kind, n.sequence, n.channel, n.rule, n.details)  # type: ignore[arg-type]
        return await send(session, self._config, n.channel, notification)

    def _record(self, cur: Any, n: outbox.Notification, outcome: Outcome | None) -> None:
        ids = {"notification_id": str(n.notification_id), "channel": n.channel}
        if outcome is None:
            outbox.cancelled(cur, n, "the incident closed")
            return
        if isinstance(outcome, Delivered):
            rule = self._config.rule(n.rule)
            outbox.sent(cur, n, rule.repeat_seconds if rule is not None else None)
            self.sent += 1
            log.info(
                "notification %s (%s) sent to %s", n.notification_id, n.kind, n.channel, extra=ids
            )
            return
        error = outcome.error[:MAX_ERROR]
        if isinstance(outcome, Refused):
            outbox.failed(cur, n, error)
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
        delay = next_delay(
            n.attempts + 1,
            delivery.retry_initial_seconds,
            delivery.retry_max_seconds,
            outcome.retry_after,
        )
        give_up = n.first_due_at + timedelta(seconds=delivery.give_up_after_seconds)
        if datetime.now(UTC) + timedelta(seconds=delay) > give_up:
            outbox.failed(cur, n, error)
            log.error(
                "notification %s to %s failed, giving up after %d tries: %s",
                n.notification_id, n.channel, n.attempts + 1, error, extra=ids,
            )  # fmt: skip
            return
        outbox.retry(cur, n, delay, error)
        log.warning(
            "notification %s to %s failed (try %d, again in %.1fs): %s",
            n.notification_id, n.channel, n.attempts + 1, delay, error, extra=ids,
        )  # fmt: skip
