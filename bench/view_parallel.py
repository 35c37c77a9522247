"""What a second process would give a cluster node's start: the records of a task topic
decoded, validated and made into tasks by one process, against two processes each taking half
of them at the same time, and what handing the tasks made in one process to another costs.

    .venv/bin/python bench/view_parallel.py --records 100000 --rounds 3

In-process, no broker: the records are made as `bench/task_topic.py build` makes them (each
task its own URL), then forked processes (the records already in their memory) time the
node's per-record step (`ViewBuilder.add` without a sink: decoding, validating, the task,
the target policy's judgement; the view's rows left out) on all of them, and two at once on half each. The hand-over is half of the tasks
pickled, then read back, as a worker process would send them to the node. Each round prints
a Markdown row: wall and CPU seconds. BENCHMARKS.md, "The slow kind measured", quotes it.
"""

from __future__ import annotations

import argparse
import gc
import pickle
import time
from datetime import UTC, datetime
from multiprocessing import get_context
from typing import Any

from common import cpu_model, machine
from task_topic import PARTITIONS, bench_record

from checker_common.task_record import encode
from periodic_checker.materialiser import TaskRecordRead, TaskTopicFollower
from periodic_checker.policy import TargetPolicy
from periodic_checker.settings import CheckerSettings


def records(n: int) -> list[TaskRecordRead]:
    """The bench's records (each task its own URL) as the node reads them: key, partition,
    offset, value."""
    now = datetime.now(UTC)
    read: list[TaskRecordRead] = []
    for i in range(n):
        key, value = encode(bench_record(i, "own", now))
        read.append((key, i % PARTITIONS, i, value))
    return read


def tasks_of(items: list[TaskRecordRead]) -> list[Any]:
    """The node's own per-record step (`ViewBuilder.add`: decode, make, judge), no rows."""
    settings = CheckerSettings.model_construct(
        checker_mode="cluster", checker_node_id="bench", kafka_tasks_topic="t"
    )
    follower = TaskTopicFollower(settings, None, None, policy=TargetPolicy())  # type: ignore[arg-type]
    builder = follower.view_builder({}, datetime.now(UTC))
    builder.add(items)
    return [write.task for write in builder.finish()]


def timed(items: list[TaskRecordRead]) -> tuple[float, float]:
    """Wall and CPU seconds of the per-record step over `items`, the collector paused as the
    node pauses it."""
    gc.disable()
    wall, cpu = time.perf_counter(), time.process_time()
    tasks_of(items)
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    n = args.records
    print(f"machine: {machine()}; lscpu model name: {cpu_model()}\n")
    items = records(n)
    half = n // 2
    handed = tasks_of(items[:half])
    context = get_context("fork")
    print(
        f"| round | one process, {n:,} records | two processes at once, {half:,} each"
        f" | {half:,} tasks pickled | and read back |\n|---|---|---|---|---|"
    )
    for round_ in range(1, args.rounds + 1):
        with context.Pool(1) as pool:
            one_wall, one_cpu = pool.apply(timed, (items,))
        with context.Pool(2) as pool:
            halves = pool.map(timed, [items[:half], items[half:]])
        gc.disable()
        started = time.perf_counter()
        blob = pickle.dumps(handed, protocol=pickle.HIGHEST_PROTOCOL)
        pickled = time.perf_counter() - started
        started = time.perf_counter()
        pickle.loads(blob)
        read = time.perf_counter() - started
        gc.enable()
        print(
            f"| {round_} | {one_wall:.2f} s ({one_cpu:.2f} s CPU)"
            f" | {max(w for w, _ in halves):.2f} s ({', '.join(f'{c:.2f}' for _, c in halves)}"
            f" s CPU) | {pickled:.2f} s ({len(blob) / 1e6:.1f} MB) | {read:.2f} s |",
            flush=True,
        )


if __name__ == "__main__":
    main()
