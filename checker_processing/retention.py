"""Daily partitions of check_results: create the coming days, drop the expired ones."""

from __future__ import annotations

import logging
import re
from datetime import date, timedelta

from psycopg2 import sql
from psycopg2.extensions import connection as Connection

log = logging.getLogger(__name__)

DAYS_AHEAD = 3
_PARTITION = re.compile(r"^check_results_p(\d{8})$")


def expired(partition_days: list[date], today: date, retention_days: int) -> list[date]:
    """Days whose partition holds only results older than the retention (pure).

    A day's partition ends at the next midnight; it goes when that end is at or before the
    cut-off `today - retention_days`, so a partition that still holds a kept result stays.
    """
    cutoff = today - timedelta(days=retention_days)
    return sorted(day for day in partition_days if day + timedelta(days=1) <= cutoff)


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
    cutoff = today - timedelta(days=retention_days)
    with conn.cursor() as cur:
        cur.execute(
            "DELETE FROM rejected_messages WHERE rejected_at < %s::date",
            (cutoff,),
        )
        cur.execute(
            "DELETE FROM incidents WHERE ended_at < %s::date",
            (cutoff,),
        )
    conn.commit()
    return dropped
