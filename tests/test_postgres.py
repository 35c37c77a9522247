"""The test database is a real PostgreSQL of its own."""

from __future__ import annotations

import psycopg2


def test_postgres_round_trip(pg_dsn: str) -> None:
    with psycopg2.connect(pg_dsn) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE round_trip (id int PRIMARY KEY, note text)")
        cur.execute("INSERT INTO round_trip VALUES (%s, %s)", (1, "stored"))
    with psycopg2.connect(pg_dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT note FROM round_trip WHERE id = 1")
        assert cur.fetchone() == ("stored",)
        cur.execute("DROP TABLE round_trip")
