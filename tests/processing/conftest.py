"""Fixtures of the processor tests: a schema of its own per test, result builders."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import psycopg2
import pytest
from psycopg2 import sql

from checker_processing import db, migrate

pytestmark = pytest.mark.postgres


@pytest.fixture
def schema_dsn(pg_dsn: str) -> Iterator[str]:
    """A DSN whose search_path is a fresh schema (dropped afterwards); its application_name is
    the schema name, so a test can find (and terminate) exactly its processor's backends."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg2.connect(pg_dsn) as conn, conn.cursor() as cur:
        cur.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    conn.close()
    sep = "&" if "?" in pg_dsn else "?"
    yield f"{pg_dsn}{sep}options={quote(f'-csearch_path={schema}')}&application_name={schema}"
    with psycopg2.connect(pg_dsn) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            (schema,),
        )
        cur.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
    conn.close()


@pytest.fixture
def migrated(schema_dsn: str) -> Iterator[Any]:
    """A migrated schema and an open connection to it (autocommit, for assertions)."""
    conn = db.connect(schema_dsn)
    migrate.apply(conn)
    conn.autocommit = True
    yield conn
    conn.close()
