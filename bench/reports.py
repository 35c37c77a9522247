"""Reports on 10 million results: 30-day availability of one task, latest result per task.

    .venv/bin/python bench/reports.py [--rows 10000000] [--repeat 5]

A PostgreSQL database of its own is created, migrated with the processor's migrations, filled
with INSERT ... SELECT generate_series (then VACUUM ANALYZE) and dropped at the end. The rows
span the last 30 days over 10,000 tasks: 1,000 busy tasks get 90 % of the rows (about 9,000
each, one every ~5 minutes), 9,000 quiet ones the rest (about 111 each); about 1 % are 'down',
each opening an incident closed a minute later. The tasks table points at each task's latest
result, as the processor leaves it.

Each query is run once to warm up, then timed `--repeat` times client-side (rows fetched);
medians are printed beside references from the same run (a round trip, a bare index scan of
the same rows, the tasks table alone) and the server's own EXPLAIN ANALYZE time. The CLI
(`python -m checker_processing.cli report --since 30d --task ID`) is timed as a subprocess
beside `--version` (interpreter start-up and imports).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg2
from psycopg2 import sql

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    machine,
    make_certs,
    migrate,
    server_version,
    snapshot,
    task_id,
    temp_database,
    workdir,
)

TASKS = 10_000
BUSY = 1_000
DAYS = 30
CHUNK = 500_000

# Row g of N: the rows with g % 10 != 0 go round the busy tasks 0..999 in turn, every tenth row
# round the quiet tasks 1000..9999.
_FILL = """
INSERT INTO check_results (
    result_id, checked_at, task_id, name, url, method, scheduled_at, attempt, status_code,
    load_time, pattern_result, ok, health, error_kind, error_message, dns_time, connect_time,
    tls_time, ttfb_time, transfer_time, bytes, final_url, redirects, cert_expires_at, legacy,
    kafka_topic, kafka_partition, kafka_offset)
SELECT md5('r' || g)::uuid,
       s.at,
       ('00000000-0000-4000-8000-' || lpad(to_hex(s.t), 12, '0'))::uuid,
       'site ' || s.t,
       'https://site-' || s.t || '.example.test/',
       'GET',
       s.at - interval '3 ms',
       1,
       CASE WHEN s.down THEN 503 ELSE 200 END,
       0.02 + random() * 0.4,
       CASE WHEN s.down THEN NULL ELSE 'match' END,
       NOT s.down,
       CASE WHEN s.down THEN 'down' ELSE 'up' END,
       CASE WHEN s.down THEN 'status' END,
       CASE WHEN s.down THEN 'status 503 is not in 200-399' END,
       0.001, 0.002, 0.004, 0.01 + random() * 0.2, 0.001,
       48213,
       'https://site-' || s.t || '.example.test/',
       0,
       timestamptz '2027-03-01 00:00:00+00',
       false,
       'checker-results',
       s.t %% 3,
       g
FROM generate_series(%(lo)s::bigint, %(hi)s::bigint) AS g,
     LATERAL (SELECT %(start)s::timestamptz + (g * %(step)s::float8) * interval '1 second' AS at,
                     CASE WHEN g %% 10 <> 0 THEN ((g / 10 * 9 + g %% 10 - 1) %% 1000)::int
                          ELSE 1000 + ((g / 10) %% 9000)::int END AS t,
                     (g * 7919) %% 97 = 0 AS down) AS s
"""

_TASKS = """
INSERT INTO tasks (task_id, name, url, method, last_result_id, last_checked_at,
                   last_status_code, last_ok, last_health)
SELECT r.task_id, r.name, r.url, r.method, r.result_id, r.checked_at, r.status_code, r.ok,
       r.health
FROM generate_series(0, %(tasks)s - 1) AS n,
     LATERAL (SELECT * FROM check_results c
              WHERE c.task_id = ('00000000-0000-4000-8000-' || lpad(to_hex(n), 12, '0'))::uuid
              ORDER BY c.checked_at DESC LIMIT 1) AS r
"""

_LATERAL = """
SELECT r.* FROM tasks t
CROSS JOIN LATERAL (SELECT * FROM check_results c
                    WHERE c.result_id = t.last_result_id AND c.checked_at = t.last_checked_at
                    LIMIT 1) AS r
"""

# latest_results as migration 0001 defined it (0002 replaced it by the LATERAL form).
_JOIN_0001 = """
SELECT r.* FROM tasks t
JOIN check_results r ON r.result_id = t.last_result_id AND r.checked_at = t.last_checked_at
"""

_INCIDENTS = """
INSERT INTO incidents (task_id, started_at, ended_at, first_error_kind, first_error_message,
                       opened_by, closed_by)
SELECT task_id, checked_at, checked_at + interval '1 minute', error_kind, error_message,
       result_id, result_id
FROM check_results WHERE health = 'down'
"""


def connect(dsn: str) -> Any:
    conn = psycopg2.connect(dsn, connect_timeout=5, application_name="bench-reports")
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SET TIME ZONE 'UTC'")
    return conn


def fill(dsn: str, rows: int, start: datetime) -> float:
    """Generate the rows in chunks on two connections; returns the seconds it took."""
    step = DAYS * 86400 / rows
    chunks = [(lo, min(rows, lo + CHUNK) - 1) for lo in range(0, rows, CHUNK)]
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker() -> None:
        conn = connect(dsn)
        try:
            with conn.cursor() as cur:
                cur.execute("SET synchronous_commit = off")
                while True:
                    with lock:
                        if not chunks or errors:
                            return
                        lo, hi = chunks.pop(0)
                    cur.execute(_FILL, {"lo": lo, "hi": hi, "start": start, "step": step})
                    print(f"  rows {lo:,}..{hi:,}", file=sys.stderr)
        except BaseException as exc:
            errors.append(exc)
        finally:
            conn.close()

    began = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return time.monotonic() - began


def timed(conn: Any, query: str, params: Any, repeat: int) -> tuple[float, int]:
    """Median client-side seconds over `repeat` runs after one warm-up, and the row count."""
    times = []
    found = 0
    with conn.cursor() as cur:
        for attempt in range(repeat + 1):
            began = time.monotonic()
            cur.execute(query, params)
            found = len(cur.fetchall())
            if attempt:
                times.append(time.monotonic() - began)
    return statistics.median(times), found


def timed_call(fn: Any) -> float:
    began = time.monotonic()
    fn()
    return time.monotonic() - began


def fresh_report(dsn: str, report: Any, task: str) -> None:
    """What `checker-processing report --task` does after start-up: connect, query, close."""
    import uuid

    from checker_processing import db

    conn = db.connect(dsn)
    try:
        report.availability(conn, timedelta(days=30), uuid.UUID(task))
    finally:
        conn.close()


def explain(conn: Any, query: str, params: Any, prefix: str = "") -> tuple[float, list[str]]:
    """EXPLAIN ANALYZE of `query`; `prefix` statements up to its last `;` run first (SETs)."""
    with conn.cursor() as cur:
        settings = prefix.rsplit(";", 1)[0] if ";" in prefix else ""
        if settings:
            cur.execute(settings)
        cur.execute("EXPLAIN (ANALYZE, BUFFERS) " + query, params)
        plan = [row[0] for row in cur.fetchall()]
    total = next(
        float(line.split(":")[1].split()[0]) for line in plan if line.startswith("Execution Time")
    )
    return total / 1000, plan


def cli_seconds(source: Path, certs: Path, dsn: str, args: list[str], repeat: int) -> float:
    base = {k: v for k, v in os.environ.items() if not k.isupper() or k in ("PATH", "HOME")}
    env = {**base, "PYTHONPATH": str(source), "POSTGRESQL_CONNECTION": dsn}
    env.update(
        {
            "KAFKA_CONNECTION": "localhost:9",  # settings need it; `report` never connects
            "KAFKA_CA_PATH": str(certs / "ca.pem"),
            "KAFKA_CERT_PATH": str(certs / "client.pem"),
            "KAFKA_KEY_FILE": str(certs / "client.key"),
            "KAFKA_CERT_PASS": (certs / "client.pass").read_text().strip(),
        }
    )
    times = []
    for attempt in range(repeat + 1):
        began = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "checker_processing.cli", *args],
            env=env,
            cwd=source,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{args}: exit {done.returncode}: {done.stderr[-2000:]}")
        if attempt:
            times.append(time.monotonic() - began)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--revision", default="HEAD", help="git revision of the processor (HEAD)")
    parser.add_argument("--plans", type=Path, help="write the EXPLAIN ANALYZE plans here")
    args = parser.parse_args()

    from checker_processing import report

    host = machine()
    now = datetime.now(UTC).replace(microsecond=0)
    start = now - timedelta(days=DAYS)
    busy, quiet = task_id(1), task_id(BUSY + 1)
    since = now - timedelta(days=30)
    figures: list[tuple[str, float, str]] = []
    plans: dict[str, list[str]] = {}
    with workdir() as work, temp_database("bench_reports") as dsn:
        source, commit = snapshot(args.revision, work / "source")
        migrate(dsn)
        conn = connect(dsn)
        with conn.cursor() as cur:
            cur.execute(
                "SELECT count(check_results_ensure_partition(d::date)) FROM generate_series("
                "%s::date, %s::date, '1 day') AS d",
                (start.date(), now.date()),
            )
        fill_s = fill(dsn, args.rows, start)
        began = time.monotonic()
        with conn.cursor() as cur:
            cur.execute(_TASKS, {"tasks": TASKS})
            cur.execute(_INCIDENTS)
            cur.execute("VACUUM ANALYZE")
            cur.execute("SELECT count(*) FROM check_results")
            stored = cur.fetchone()[0]
            cur.execute("SELECT count(*) FROM tasks")
            tasks = cur.fetchone()[0]
            cur.execute("SELECT count(*) FROM incidents")
            incidents = cur.fetchone()[0]
            cur.execute("SELECT pg_size_pretty(pg_database_size(current_database()))")
            size = cur.fetchone()[0]
        prepare_s = time.monotonic() - began
        print(f"filled in {fill_s:.0f} s, tasks+vacuum {prepare_s:.0f} s", file=sys.stderr)

        report_query = sql.SQL(report._QUERY).format(task_filter=sql.SQL("AND task_id = %(task)s"))
        report_sql = report_query.as_string(conn)
        r = args.repeat
        for label, task in (("busy task", busy), ("quiet task", quiet)):
            params = {"since": since, "task": task}
            seconds, _ = timed(conn, report_sql, params, r)
            server, plan = explain(conn, report_sql, params)
            plans[f"30-day availability, {label}"] = plan
            window, _ = timed(
                conn,
                "SELECT task_id, checked_at, load_time, ok FROM check_results"
                " WHERE task_id = %(task)s AND checked_at >= %(since)s",
                params,
                r,
            )
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT count(*) FROM check_results"
                    " WHERE task_id = %(task)s AND checked_at >= %(since)s",
                    params,
                )
                rows = cur.fetchone()[0]
            with conn.cursor() as cur:
                cur.execute("SET jit = off")
            no_jit, _ = timed(conn, report_sql, params, r)
            with conn.cursor() as cur:
                cur.execute("RESET jit")
            fresh = statistics.median(
                timed_call(lambda task=task: fresh_report(dsn, report, task)) for _ in range(r)
            )
            figures.append(
                (
                    f"30-day availability of one {label} ({rows:,} rows), report.py's query",
                    seconds,
                    f"server {server:.3f} s; reference: fetching the same {rows:,} rows "
                    f"bare {window:.3f} s; same query with jit = off {no_jit:.3f} s; "
                    f"`report.availability()` on a new connection (as the CLI) {fresh:.3f} s",
                )
            )
        ping, _ = timed(conn, "SELECT 1", None, r)
        all_latest, count = timed(conn, "SELECT * FROM latest_results", None, r)
        server, plan = explain(conn, "SELECT * FROM latest_results", None)
        plans["latest_results, all tasks"] = plan
        tasks_only, _ = timed(conn, "SELECT * FROM tasks", None, r)
        figures.append(
            (
                f"latest_results, all {count:,} tasks",
                all_latest,
                f"server {server:.3f} s; reference: SELECT * FROM tasks {tasks_only:.3f} s",
            )
        )
        # What the view could be: one parameterised probe per task (run-time partition pruning)
        # instead of the hash join over every partition that the planner picks.
        for label, query in (
            (
                "latest_results, all tasks, hash and merge joins disabled (same view)",
                "SET enable_hashjoin = off; SET enable_mergejoin = off;"
                " SELECT * FROM latest_results",
            ),
            ("alternative view body: LATERAL ... LIMIT 1 per task", _LATERAL),
            ("the first view body (migration 0001): a join on (result_id, checked_at)", _JOIN_0001),
        ):
            seconds, count_alt = timed(conn, query, None, r)
            with conn.cursor() as cur:
                cur.execute("RESET enable_hashjoin; RESET enable_mergejoin")
            server, plan = explain(conn, query.rsplit(";", 1)[-1], None, prefix=query)
            with conn.cursor() as cur:
                cur.execute("RESET enable_hashjoin; RESET enable_mergejoin")
            plans[label] = plan
            figures.append((f"{label} ({count_alt:,} rows)", seconds, f"server {server:.3f} s"))
        one_latest, _ = timed(
            conn, "SELECT * FROM latest_results WHERE task_id = %(task)s", {"task": busy}, r
        )
        server, plan = explain(
            conn, "SELECT * FROM latest_results WHERE task_id = %(task)s", {"task": busy}
        )
        plans["latest_results, one task"] = plan
        figures.append(
            (
                "latest_results, one task",
                one_latest,
                f"server {server:.4f} s; SELECT 1 {ping:.4f} s",
            )
        )
        conn.close()
        certs = make_certs(work / "certs")
        cli = cli_seconds(
            source, certs, dsn, ["report", "--since", "30d", "--task", busy, "--format", "json"], r
        )
        startup = cli_seconds(source, certs, dsn, ["--version"], r)
        figures.append(
            (
                "`checker-processing report --since 30d --task ID` (busy task), whole process",
                cli,
                f"reference: `checker-processing --version` {startup:.3f} s",
            )
        )
        version = server_version(dsn)

    print(
        f"\n{stored:,} results over {DAYS} days, {tasks:,} tasks, {incidents:,} incidents, "
        f"database {size}; median of {r} after a warm-up, client-side (rows fetched); "
        f"processor as committed at {commit}; {host}; PostgreSQL {version}; "
        f"generated in {fill_s:.0f} s + {prepare_s:.0f} s for tasks, incidents, VACUUM ANALYZE\n"
    )
    print("| query | median s | beside it, same run |")
    print("|---|---|---|")
    for name, seconds, note in figures:
        print(f"| {name} | {seconds:.3f} | {note} |")
    print("\nGoal: each under 1 s.")
    if args.plans:
        args.plans.write_text(
            "\n\n".join(f"## {name}\n\n```\n" + "\n".join(p) + "\n```" for name, p in plans.items())
            + "\n"
        )
    return 0


if __name__ == "__main__":
    began = time.monotonic()
    code = main()
    print(f"(took {time.monotonic() - began:.0f} s)", file=sys.stderr)
    sys.exit(code)
