"""The sender's wake-up: a LISTEN for the NOTIFY that a new incident event sends (migration
0016), so an incident change is sent as soon as the writer's transaction commits rather than
at the sender's next poll.

The poll stays, and is still how retries and reminders that fall due are found; it is also the
fallback whenever this listening connection cannot be had or is lost (the next wait listens
again). A connection of its own, autocommit, used only from the waiting thread.
"""

from __future__ import annotations

import contextlib
import logging
import select
import threading
import time
from collections.abc import Callable

import psycopg2
from psycopg2.extensions import connection as Connection

from checker_common.errors import first_line

log = logging.getLogger(__name__)

CHANNEL = "checker_alert_events"
# A threading.Event has no file to select on: while listening, a wait looks at `stop` this
# often, which bounds how long a stopping processor waits for its sender.
STOP_CHECK_SECONDS = 0.1


class Wakeup:
    """`wait()` returns when this schema's events were notified, `stop` is set, or the poll
    interval is over, whichever comes first."""

    def __init__(self, connect: Callable[[], Connection], stop: threading.Event) -> None:
        self._connect = connect
        self._stop = stop
        self._conn: Connection | None = None
        self._schema = ""

    def wait(self, seconds: float) -> None:
        """Block (in a worker thread) until woken, stopped or `seconds` passed. Right after it
        starts listening it returns at once: events written before the LISTEN are for the
        round that follows to find."""
        if self._conn is None:
            if not self._listen():
                self._stop.wait(seconds)  # polling only, until listening works again
            return
        deadline = time.monotonic() + seconds
        while not self._stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            readable, _, _ = select.select([self._conn], [], [], min(left, STOP_CHECK_SECONDS))
            if readable and self._notified():
                return

    def _listen(self) -> bool:
        try:
            self._conn = self._connect()
            self._conn.autocommit = True
            with self._conn.cursor() as cur:
                cur.execute("SELECT current_schema()")
                row = cur.fetchone()
                cur.execute(f"LISTEN {CHANNEL}")
        except psycopg2.Error as exc:
            log.warning("alerting: not listening for new events, polling: %s", first_line(exc))
            self.close()
            return False
        self._schema = str(row[0]) if row else ""
        return True

    def _notified(self) -> bool:
        """Read what arrived: whether it names this schema. A lost connection counts as a
        wake-up (the round that follows finds out what was missed) and is made again."""
        assert self._conn is not None
        try:
            self._conn.poll()
            if self._conn.closed:
                raise psycopg2.OperationalError("the server closed the connection")
        except psycopg2.Error as exc:
            log.warning("alerting: lost the listening connection: %s", first_line(exc))
            self.close()
            return True
        mine = any(n.payload == self._schema for n in self._conn.notifies)
        self._conn.notifies.clear()
        return mine

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg2.Error):
                self._conn.close()
        self._conn = None
