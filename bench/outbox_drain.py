"""How fast the checker's outbox drains a backlog: one task's, and many tasks' at once.

    .venv/bin/python bench/outbox_drain.py [--results 200] [--tasks 200] [--runs 3]

A broker of its own on 127.0.0.1 (Tansu behind stunnel, mutual TLS: bench/common.py), a fresh
topic of 3 partitions, and the checker's `ResultPublisher` with its SQLite outbox, as the daemon
builds them. Each case publishes a burst before any delivery report comes back: the first
result of each task goes to librdkafka, the others wait in the outbox behind it (a task's
results go out in order, so its next one leaves only once the one before is acknowledged).
Timed from the burst to the last acknowledgement with the outbox empty.

- one task: `--results` results of one task, its backlog draining one row per round trip;
- many tasks: `--tasks` tasks with 20 results each, their heads handed over together.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Kafka, kafka, machine, workdir
from checker_common.contract import CheckResult
from periodic_checker.outbox import Outbox
from periodic_checker.producer import ResultPublisher
from periodic_checker.settings import CheckerSettings

DEADLINE_S = 300.0


def a_result(sequence: int) -> CheckResult:
    return CheckResult(
        result_id=uuid.uuid4(),
        name="site",
        url="http://127.0.0.1:9/",
        timestamp=datetime.now(UTC),
        attempt=sequence,
        status=200,
        load_time=0.012,
        ok=True,
    )


async def drain(broker: Kafka, storage: Path, tasks: int, per_task: int) -> float:
    """Seconds from a burst of `per_task` results for each of `tasks` tasks to all delivered."""
    env = {k.lower(): v for k, v in broker.env().items()}
    settings = CheckerSettings(**env, kafka_topic=broker.topic(3), task_storage=storage)
    outbox = Outbox(settings.task_storage)
    publisher = ResultPublisher(settings, outbox)
    await publisher.start()
    ids = [uuid.uuid4() for _ in range(tasks)]
    try:
        began = time.monotonic()
        for n in range(per_task):
            for task in ids:
                publisher.publish(task, a_result(n + 1))
        while True:
            stats = publisher.stats()
            if stats.delivered == tasks * per_task and stats.outbox_size == 0:
                return time.monotonic() - began
            if stats.failed or time.monotonic() - began > DEADLINE_S:
                raise SystemExit(f"not drained: {stats}")
            await asyncio.sleep(0.01)
    finally:
        await publisher.close(timeout=10)
        outbox.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=int, default=200, help="one task's backlog")
    parser.add_argument("--tasks", type=int, default=200, help="tasks of the many-task case")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    print(machine())
    cases = {
        f"one task, {args.results} results": (1, args.results),
        f"{args.tasks} tasks, 20 results each": (args.tasks, 20),
    }
    with workdir() as tmp, kafka(tmp) as broker:
        for label, (tasks, per_task) in cases.items():
            rates = []
            for run in range(args.runs):
                storage = tmp / f"{uuid.uuid4().hex[:8]}.sqlite3"
                seconds = asyncio.run(drain(broker, storage, tasks, per_task))
                rates.append(tasks * per_task / seconds)
                print(f"{label}, run {run + 1}: {seconds:.2f} s, {rates[-1]:,.0f} results/s")
            print(
                f"{label}: median {statistics.median(rates):,.0f} results/s"
                f" (runs {', '.join(f'{r:,.0f}' for r in rates)})"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
