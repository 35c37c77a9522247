"""Versioned schema migrations: `migrations/NNNN_name.sql`, each applied once, in order."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from importlib import resources

from psycopg2.extensions import connection as Connection

log = logging.getLogger(__name__)

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def available() -> list[Migration]:
    """The migrations shipped with the package, by version."""
    found = []
    for entry in resources.files("checker_processing.migrations").iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    return sorted(found, key=lambda m: m.version)


def apply(conn: Connection) -> list[Migration]:
    """Apply the migrations not yet applied; return them. Safe to run concurrently."""
    applied_now = []
    with conn.cursor() as cur:
        # One migrator at a time per schema; the lock ends with the transaction.
        cur.execute("SELECT pg_advisory_xact_lock(hashtext(current_schema() || '.migrations'))")
        cur.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        cur.execute("SELECT version FROM schema_migrations")
        done = {row[0] for row in cur.fetchall()}
        for migration in available():
            if migration.version in done:
                continue
            cur.execute(migration.sql)
            cur.execute(
                "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                (migration.version, migration.name),
            )
            applied_now.append(migration)
            log.info("applied migration %04d_%s", migration.version, migration.name)
    conn.commit()
    return applied_now
