"""What one result per (task, slot) costs the database: COPY of a batch's result ids alone
(what every stored result already costs, the reference), and beside it the same ids plus their
slots in result_slots, keyed as migration 0009 keys it (scheduled_at, task_id) and the other
way round (task_id, scheduled_at).

    .venv/bin/python bench/slots.py [--results 200000] [--batch 10000] [--tasks 1000] [--runs 5]

Results of `--tasks` tasks, one slot each, 18 ms apart (in time order, as they arrive), COPied a
batch per transaction into a database of its own (dropped at the end); the three contenders
take turns within each run, into emptied tables. Prints the medians and each run's seconds.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg2

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, temp_database

TABLES = """
CREATE TABLE result_ids (result_id uuid PRIMARY KEY, checked_at timestamptz NOT NULL);
CREATE TABLE slots_time_first (
    scheduled_at timestamptz NOT NULL, task_id uuid NOT NULL, result_id uuid NOT NULL,
    PRIMARY KEY (scheduled_at, task_id));
CREATE TABLE slots_task_first (
    task_id uuid NOT NULL, scheduled_at timestamptz NOT NULL, result_id uuid NOT NULL,
    PRIMARY KEY (task_id, scheduled_at));
"""

CONTENDERS = {
    "result_ids only (reference)": None,
    "+ result_slots (scheduled_at, task_id), as migrated": "slots_time_first",
    "+ result_slots (task_id, scheduled_at)": "slots_task_first",
}


def batches(args: argparse.Namespace) -> list[tuple[str, dict[str, str]]]:
    """Each batch's COPY text for result_ids and for each slot table."""
    tasks = [str(uuid.uuid4()) for _ in range(args.tasks)]
    start = datetime.now(UTC)
    made = []
    for first in range(0, args.results, args.batch):
        ids, time_first, task_first = [], [], []
        for i in range(first, min(first + args.batch, args.results)):
            result, task = str(uuid.uuid4()), tasks[i % args.tasks]
            slot = (start + timedelta(milliseconds=18 * i)).isoformat()
            ids.append(f"{result}\t{slot}\n")
            time_first.append(f"{slot}\t{task}\t{result}\n")
            task_first.append(f"{task}\t{slot}\t{result}\n")
        made.append(
            (
                "".join(ids),
                {
                    "slots_time_first": "".join(time_first),
                    "slots_task_first": "".join(task_first),
                },
            )
        )
    return made


def run(conn: Any, work: list[tuple[str, dict[str, str]]], table: str | None) -> float:
    with conn.cursor() as cur:
        cur.execute("TRUNCATE result_ids, slots_time_first, slots_task_first")
        cur.execute("CHECKPOINT")
    conn.commit()
    started = time.monotonic()
    for ids, slots in work:
        with conn.cursor() as cur:
            cur.copy_expert("COPY result_ids FROM STDIN", io.StringIO(ids))
            if table is not None:
                cur.copy_expert(f"COPY {table} FROM STDIN", io.StringIO(slots[table]))
        conn.commit()
    return time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=10_000)
    parser.add_argument("--tasks", type=int, default=1_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    host = machine()
    work = batches(args)
    seconds: dict[str, list[float]] = {name: [] for name in CONTENDERS}
    with temp_database("bench_slots") as dsn:
        conn = psycopg2.connect(dsn)
        try:
            with conn.cursor() as cur:
                cur.execute(TABLES)
            conn.commit()
            for _ in range(args.runs):
                for name, table in CONTENDERS.items():
                    seconds[name].append(run(conn, work, table))
        finally:
            conn.close()
    print(
        f"\n{args.results:,} results of {args.tasks:,} tasks in batches of {args.batch:,},"
        f" {args.runs} runs, medians; {host}; load average at the end"
        f" {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n"
    )
    print("| contender | seconds (median) | runs |")
    print("|---|---|---|")
    for name, values in seconds.items():
        runs = ", ".join(f"{v:.2f}" for v in values)
        print(f"| {name} | {statistics.median(values):.2f} | {runs} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
