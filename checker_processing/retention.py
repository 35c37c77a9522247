"""Daily partitions of check_results: which check times are kept, create the coming days,
drop the expired ones (and the rows that only referred to what they held)."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta

from psycopg2 import sql
from psycopg2.extensions import connection as Connection

log = logging.getLogger(__name__)

DAYS_AHEAD = 3
_PARTITION = re.compile(r"^check_results_p(\d{8})$")


def first_kept_day(today: date, retention_days: int) -> date:
    """The oldest day whose partition retention keeps (pure)."""
    return today - timedelta(days=retention_days)


def expired(partition_days: list[date], today: date, retention_days: int) -> list[date]:
    """Days whose partition holds only results older than the retention (pure).

    A day's partition ends at the next midnight; it goes when that end is at or before the
    cut-off `today - retention_days`, so a partition that still holds a kept result stays.
    """
    cutoff = first_kept_day(today, retention_days)
    return sorted(day for day in partition_days if day + timedelta(days=1) <= cutoff)


@dataclass(frozen=True)
class Window:
    """The check times a result may carry to be stored, around the processor's clock.

    Not before the first day retention keeps: such a row would re-create a dropped
    partition, to be dropped again. Not more than `max_clock_skew` ahead of now: a checker
    with a wrong clock would create a partition retention never drops and freeze its task's
    latest result and incidents until real time caught up."""

    retention_days: int
    max_clock_skew: timedelta

    def bounds(self, now: datetime) -> tuple[datetime, datetime]:
        """The earliest and the latest check time stored at `now` (UTC), both included."""
        first = first_kept_day(now.astimezone(UTC).date(), self.retention_days)
        return datetime.combine(first, time(), UTC), now + self.max_clock_skew


def ahead(today: date, days: int = DAYS_AHEAD) -> list[date]:
    return [today + timedelta(days=n) for n in range(days + 1)]


def partition_days(conn: Connection) -> list[date]:
    """The days that have a partition in the current schema."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT c.relname FROM pg_inherits i"
            " JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = to_regclass(quote_ident(current_schema()) || '.check_results')"
        )
        names = [row[0] for row in cur.fetchall()]
    conn.commit()
    days = []
    for name in names:
        match = _PARTITION.match(name)
        if match:
            text = match[1]
            days.append(date(int(text[:4]), int(text[4:6]), int(text[6:])))
    return sorted(days)


def maintain(conn: Connection, today: date, retention_days: int) -> list[date]:
    """Create partitions for today and the next days; drop the expired ones. Returns the
    dropped days. Each step is its own short transaction."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT check_results_ensure_partition(d) FROM unnest(%s::date[]) AS d",
            (ahead(today),),
        )
    conn.commit()
    dropped = []
    for day in expired(partition_days(conn), today, retention_days):
        name = f"check_results_p{day:%Y%m%d}"
        with conn.cursor() as cur:
            # Dropping a partition locks the parent; do not queue behind a long reader forever.
            cur.execute("SET LOCAL lock_timeout = '10s'")
            cur.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(name)))
        conn.commit()
        dropped.append(day)
        log.info("dropped partition %s (retention %d days)", name, retention_days)
    cutoff = first_kept_day(today, retention_days)
    with conn.cursor() as cur:
        # The ids of the dropped rows: a copy arriving now is older than the window anyway.
        cur.execute(
            "DELETE FROM result_ids WHERE checked_at < %s",
            (datetime.combine(cutoff, time(), UTC),),
        )
        # The slots of the dropped rows, a day later: a check starts up to an hour after its
        # slot (MAX_START_LAG), so a result the window keeps may hold a slot before the cutoff.
        cur.execute(
            "DELETE FROM result_slots WHERE scheduled_at < %s",
            (datetime.combine(cutoff - timedelta(days=1), time(), UTC),),
        )
        cur.execute(
            "DELETE FROM rejected_messages WHERE rejected_at < %s::date",
            (cutoff,),
        )
        cur.execute(
            "DELETE FROM incidents WHERE ended_at < %s::date",
            (cutoff,),
        )
        # A task removed before the first kept day has no results left, and its incidents
        # ended at its removal at the latest: nothing refers to it any more.
        cur.execute(
            "DELETE FROM tasks WHERE removed_at < %s::date",
            (cutoff,),
        )
        # Alerting's outbox: events as old as that (expanded or not: with alerting off nobody
        # expands them) and notifications finished before it.
        cur.execute("DELETE FROM alert_events WHERE created_at < %s::date", (cutoff,))
        cur.execute(
            "DELETE FROM notifications WHERE state <> 'pending' AND finished_at < %s::date",
            (cutoff,),
        )
        # A channel's budget matters in its minute only: a day is kept to look back on.
        cur.execute(
            "DELETE FROM notification_windows WHERE window_start < now() - interval '1 day'"
        )
    conn.commit()
    return dropped
