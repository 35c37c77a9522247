"""PostgreSQL connections: one way to open them, with time-outs and a name to find them by."""

from __future__ import annotations

import psycopg2
from psycopg2.extensions import connection as Connection

APPLICATION_NAME = "checker-processing"
# Errors that a retry on a new connection can cure: the server went away, restarted, was
# terminated, timed out, or asked us to retry (serialization failure, deadlock).
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (psycopg2.OperationalError, psycopg2.InterfaceError)
# Errors that will fail again on every retry: the database refuses this data.
PERMANENT_ERRORS: tuple[type[Exception], ...] = (psycopg2.DataError, psycopg2.IntegrityError)
# Below the unit's WatchdogSec (60 s): a stuck statement fails and is retried before systemd
# would restart a process whose loop is only waiting on it.
STATEMENT_TIMEOUT_MS = 45_000


def connect(dsn: str, *, connect_timeout: int = 5) -> Connection:
    """Open a connection whose every network wait is bounded.

    The DSN's own application_name wins (tests use it to find the processor's backends).
    """
    conn = psycopg2.connect(
        dsn,
        connect_timeout=connect_timeout,
        fallback_application_name=APPLICATION_NAME,
        keepalives=1,
        keepalives_idle=10,
        keepalives_interval=5,
        keepalives_count=3,
        tcp_user_timeout=30_000,
    )
    # The writer sends COPY text as UTF-8 bytes, whatever the server's default.
    conn.set_client_encoding("UTF8")
    with conn.cursor() as cur:
        cur.execute(
            "SELECT set_config('statement_timeout', %s, false)", (str(STATEMENT_TIMEOUT_MS),)
        )
        cur.execute("SET TIME ZONE 'UTC'")
        # JIT compilation costs more than the short queries it would speed up (most of a
        # one-task report's time, bench/results/reports.md).
        cur.execute("SET jit = off")
    conn.commit()
    return conn
