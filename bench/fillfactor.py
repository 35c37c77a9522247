"""The `tasks` table's fillfactor (migration 0003): size, HOT updates and time of the batch update.

    .venv/bin/python bench/fillfactor.py [--tasks 1000] [--batches 300] [--runs 3]

Each run, for fillfactor 100 (PostgreSQL's default, before migration 0003) and 50 (after it),
in turn: a new database migrated with the processor's migrations (the bench sets fillfactor
100 back by hand for the first), `--tasks` tasks inserted, then `--batches` batches that each
update every task's row with the writer's own statement and parameters (`writer._UPDATE_TASKS`,
`writer._task_columns`: a newer result per task, as every batch of a busy processor does), one
transaction per batch as in the writer. Autovacuum stays on, as in production.

Reported per fillfactor (medians of the runs): the table's pages at the end, the share of
updates that were HOT (no new index entry; `pg_stat_user_tables`) and the median time of the
UPDATE statement per batch, client-side.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg2

from bench.common import machine, migrate, server_version, task_id, temp_database
from checker_processing import writer

FILLFACTORS = (100, 50)


def task_rows(tasks: int, at: datetime) -> list[tuple[object, ...]]:
    """Each task's newest row, as `_UPDATE_TASKS` takes them (the writer's RETURNING shape)."""
    return [
        (
            task_id(n),
            uuid.uuid4(),
            at,
            f"task {n}",
            f"https://site-{n}.example.test/health",
            "GET",
            200,
            True,
            "up",
        )
        for n in range(tasks)
    ]


def one(dsn: str, fillfactor: int, tasks: int, batches: int) -> dict[str, float]:
    migrate(dsn)
    conn = psycopg2.connect(dsn, connect_timeout=5)
    try:
        with conn.cursor() as cur:
            if fillfactor != 50:
                cur.execute(f"ALTER TABLE tasks SET (fillfactor = {fillfactor})")
            start = datetime.now(UTC) - timedelta(hours=1)
            cur.execute(
                "INSERT INTO tasks (task_id, last_result_id, last_checked_at, name, url, method,"
                " last_status_code, last_ok, last_health)"
                " SELECT * FROM unnest(%s::uuid[], %s::uuid[], %s::timestamptz[], %s::text[],"
                " %s::text[], %s::text[], %s::smallint[], %s::boolean[], %s::text[])",
                writer._task_columns(task_rows(tasks, start)),
            )
        conn.commit()
        times = []
        for b in range(batches):
            columns = writer._task_columns(task_rows(tasks, start + timedelta(seconds=b + 1)))
            with conn.cursor() as cur:
                began = time.perf_counter()
                cur.execute(writer._UPDATE_TASKS, columns)
                times.append(time.perf_counter() - began)
                if cur.rowcount != tasks:
                    raise RuntimeError(f"batch {b}: {cur.rowcount} rows updated, not {tasks}")
            conn.commit()
    finally:
        conn.close()
    time.sleep(1.5)  # a backend's statistics reach the shared view at most once a second
    conn = psycopg2.connect(dsn, connect_timeout=5)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT pg_relation_size('tasks') / current_setting('block_size')::int,"
                " n_tup_upd, n_tup_hot_upd, autovacuum_count"
                " FROM pg_stat_user_tables WHERE relname = 'tasks'"
            )
            row = cur.fetchone()
            assert row is not None
            pages, updates, hot, vacuums = row
    finally:
        conn.close()
    return {
        "pages": float(pages),
        "hot": hot / updates if updates else float("nan"),
        "update_ms": 1000 * statistics.median(times),
        "vacuums": float(vacuums),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    host = machine()
    figures: dict[int, list[dict[str, float]]] = {f: [] for f in FILLFACTORS}
    version = "?"
    for run in range(args.runs):
        for fillfactor in FILLFACTORS if run % 2 == 0 else FILLFACTORS[::-1]:
            with temp_database("bench_fillfactor") as dsn:
                result = one(dsn, fillfactor, args.tasks, args.batches)
                version = server_version(dsn)
            figures[fillfactor].append(result)
            print(f"run {run + 1} fillfactor {fillfactor}: {result}", file=sys.stderr)
    print(
        f"\n{args.tasks:,} tasks, {args.batches} batch updates of every task, {args.runs} runs, "
        f"medians; {host}; PostgreSQL {version}\n"
    )
    print(
        "| fillfactor | table pages at the end (per run) | HOT updates | UPDATE per batch, ms "
        "(per run) | autovacuums of tasks during the run |"
    )
    print("|---|---|---|---|---|")
    for fillfactor, runs in figures.items():

        def med(key: str, runs: list[dict[str, float]] = runs) -> float:
            return statistics.median(r[key] for r in runs)

        def each(key: str, fmt: str, runs: list[dict[str, float]] = runs) -> str:
            return ", ".join(format(r[key], fmt) for r in runs)

        print(
            f"| {fillfactor} | {med('pages'):.0f} ({each('pages', '.0f')}) "
            f"| {100 * med('hot'):.0f} % | {med('update_ms'):.1f} ({each('update_ms', '.1f')}) "
            f"| {each('vacuums', '.0f')} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
