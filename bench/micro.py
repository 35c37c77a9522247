"""Small in-process measurements that comments and docstrings quote, one command each.

    .venv/bin/python bench/micro.py [NAME ...]      (no name: all of them, about a minute)

- `regex`     RE2 on a 100 KB page handed bytes against str (`probe.search_body`).
- `validate`  building a check's result with and without validation (`probe._result`).
- `taskmap`   counting 100,000 tasks by status and health by walking them (`metrics.TaskMap`).
- `jobs-gc`   a full garbage collection with 100,000 loaded jobs and tasks, before and after
              `gc.freeze()` (`scheduler.py`: start-up and `CollectorPolicy`).
- `records`   one `Record` per consumed Kafka message: a Python loop against the consumer's
              `map` over the message methods (`consumer.Processor._consume`).
- `tuple`     building a `Record` (a NamedTuple) against an equivalent frozen dataclass.
- `decode`    decoding result messages: the ingest path (`decode_plain_many`, msgspec) against
              the pydantic model (`decode`) and `orjson.loads` alone, which checks nothing.
- `prepare-gc` preparing a batch of 20,000 messages (`writer.prepare`, the consumer's helper
              thread) at the garbage collector's default young threshold and at the
              consumer's (`consumer.GC_YOUNG_OBJECTS`), with what the consumer freezes at start.

Each prints medians of several repeats, per item, with this process's CPU time.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import statistics
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import MessageTemplate, machine, task_id

BATCH = 20_000  # the processor's default BATCH_MAX_MESSAGES


def cpu_per_item(fn: Callable[[], object], items: int, repeats: int = 5) -> float:
    """Median CPU seconds per item of `fn()` (which handles `items` items) over `repeats`."""
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        began = time.process_time()
        fn()
        times.append((time.process_time() - began) / items)
    return statistics.median(times)


def us(seconds: float) -> str:
    return f"{seconds * 1e6:.2f} us"


def regex() -> None:
    from checker_common.task_spec import compile_pattern
    from periodic_checker.probe import search_body

    filler = "lorem ipsum dolor sit amet, consectetur adipiscing elit " * 1800
    page = filler[:99_000] + "MARKER" + filler[:994]  # 100 KB, the match near the end
    body = page.encode()
    for label, pattern in (("matching near the end", "MARKER"), ("absent", "absent-pattern")):
        compiled = compile_pattern(pattern)
        as_bytes = cpu_per_item(lambda c=compiled: c.search(body), 1, 50)
        as_str = cpu_per_item(lambda c=compiled: c.search(page), 1, 20)
        via_probe = cpu_per_item(lambda c=compiled: search_body(c, body, "utf-8"), 1, 50)
        print(
            f"regex, 100 KB page, pattern {label}: bytes {us(as_bytes)}, str {us(as_str)} "
            f"({as_str / as_bytes:.0f} x), probe.search_body {us(via_probe)}"
        )


def result_fields() -> dict[str, Any]:
    from checker_common.contract import Health, PatternResult, Timings

    now = datetime.now(UTC)
    return {
        "result_id": uuid.uuid4(),
        "name": "shop front page",
        "url": "https://shop.example.test/en/index.html",
        "method": "GET",
        "timestamp": now,
        "scheduled_at": now - timedelta(milliseconds=3),
        "status": 200,
        "load_time": 0.0123,
        "pattern_search": PatternResult.MATCH,
        "ok": True,
        "health": Health.UP,
        "timings": Timings(dns=None, connect=0.0021, tls=0.0042, ttfb=0.0038, transfer=0.0011),
        "bytes": 48213,
        "final_url": "https://shop.example.test/en/index.html",
        "cert_expires_at": now + timedelta(days=60),
        "error": None,
        "attempt": 1,
        "redirects": 0,
    }


def validate() -> None:
    from checker_common.contract import CheckResult
    from periodic_checker.probe import _result

    fields = result_fields()
    validated = cpu_per_item(
        lambda: [CheckResult.model_validate(fields) for _ in range(2000)], 2000
    )
    built = cpu_per_item(lambda: [_result(**fields) for _ in range(2000)], 2000)
    print(
        f"validate, one check's result: CheckResult.model_validate {us(validated)}, "
        f"probe._result (checks only status and scheduled_at) {us(built)}"
    )


def loaded_tasks(count: int) -> dict[uuid.UUID, Any]:
    from checker_common.task_spec import TaskSpec
    from periodic_checker.tasks import Task

    now = datetime.now(UTC)
    spec = TaskSpec(name="x", url="http://127.0.0.1:8089/", interval=60, timeout=5)
    template = Task(id=uuid.uuid4(), spec=spec, created_at=now, updated_at=now)
    tasks = {}
    for _ in range(count):
        task = template.model_copy(update={"id": uuid.uuid4()})
        tasks[task.id] = task
    return tasks


def taskmap() -> None:
    tasks = loaded_tasks(100_000)

    def walk() -> object:
        return Counter(t.status for t in tasks.values()), Counter(t.health for t in tasks.values())

    walk()
    walls = []
    for _ in range(5):
        began = time.perf_counter()
        walk()
        walls.append(time.perf_counter() - began)
    print(
        f"taskmap, counting 100,000 tasks by status and health by walking them: "
        f"{1000 * statistics.median(walls):.0f} ms (runs {', '.join(f'{1000 * w:.0f}' for w in walls)})"
    )


def jobs_gc() -> None:
    import asyncio

    from apscheduler.schedulers.asyncio import AsyncIOScheduler
    from apscheduler.triggers.interval import IntervalTrigger

    from periodic_checker.jobstore import HeapJobStore
    from periodic_checker.scheduler import SCHEDULE_TICK

    async def noop() -> None:
        pass

    async def main() -> None:
        tasks = loaded_tasks(100_000)
        scheduler = AsyncIOScheduler(
            timezone=UTC, jobstores={"default": HeapJobStore(tick=SCHEDULE_TICK)}
        )
        scheduler.start(paused=True)
        first = datetime.now(UTC) + timedelta(hours=1)
        for n, tid in enumerate(tasks):
            trigger = IntervalTrigger(
                seconds=60, start_date=first + timedelta(seconds=60 * n / 100_000), timezone=UTC
            )
            scheduler.add_job(noop, trigger, id=str(tid))
        walls = []
        for _ in range(3):
            began = time.perf_counter()
            gc.collect()
            walls.append(time.perf_counter() - began)
        gc.freeze()
        frozen = []
        for _ in range(3):
            began = time.perf_counter()
            gc.collect()
            frozen.append(time.perf_counter() - began)
        gc.unfreeze()
        scheduler.shutdown(wait=False)
        print(
            f"jobs-gc, a full collection with 100,000 jobs and tasks loaded: "
            f"{1000 * statistics.median(walls):.0f} ms; after gc.freeze(): "
            f"{1000 * statistics.median(frozen):.1f} ms"
        )

    asyncio.run(main())


def kafka_messages(count: int) -> list[Any]:
    from confluent_kafka import Message

    template = MessageTemplate()
    stamp = datetime.now(UTC)
    return [
        Message(
            topic="checker-results",
            partition=n % 3,
            offset=n,
            key=task_id(n % 1000).encode(),
            value=template.build(task_id(n % 1000), str(uuid.uuid4()), stamp),
        )
        for n in range(count)
    ]


def records() -> None:
    from itertools import repeat

    from checker_processing import consumer
    from checker_processing.writer import Record

    messages = kafka_messages(BATCH)

    def loop() -> object:
        return [
            Record(m.topic(), m.partition(), m.offset(), m.key(), m.value(), m.timestamp()[1])
            for m in messages
        ]

    def mapped() -> object:  # as consumer.Processor._consume builds them
        return list(
            map(
                consumer._new_record,
                repeat(Record),
                zip(
                    map(consumer._topic_of, messages),
                    map(consumer._partition_of, messages),
                    map(consumer._offset_of, messages),
                    map(consumer._key_of, messages),
                    map(consumer._value_of, messages),
                    map(consumer._second, map(consumer._timestamp_of, messages)),
                    strict=True,
                ),
            )
        )

    assert loop() == mapped()
    print(
        f"records, one Record per message ({BATCH:,}): Python loop {us(cpu_per_item(loop, BATCH))}"
        f", the consumer's map {us(cpu_per_item(mapped, BATCH))}"
    )


def tuple_vs_dataclass() -> None:
    from checker_processing.writer import Record

    @dataclasses.dataclass(frozen=True)
    class FrozenRecord:
        topic: str
        partition: int
        offset: int
        key: bytes | None
        value: bytes | None

    @dataclasses.dataclass(frozen=True, slots=True)
    class SlottedRecord:
        topic: str
        partition: int
        offset: int
        key: bytes | None
        value: bytes | None

    value = b"x" * 600

    def build(cls: Any) -> Callable[[], object]:
        return lambda: [cls("t", 1, n, b"k", value) for n in range(BATCH)]

    print(
        f"tuple, building one record: Record (NamedTuple) {us(cpu_per_item(build(Record), BATCH))}"
        f", frozen dataclass {us(cpu_per_item(build(FrozenRecord), BATCH))}, with slots "
        f"{us(cpu_per_item(build(SlottedRecord), BATCH))}"
    )


def decode() -> None:
    import orjson

    from checker_common import contract

    template = MessageTemplate()
    template.check()
    stamp = datetime.now(UTC)
    values = [template.build(task_id(n % 1000), str(uuid.uuid4()), stamp) for n in range(BATCH)]
    batch = [contract._Message(v, "checker-results", n % 3, n) for n, v in enumerate(values)]
    assert not any(isinstance(p, Exception) for p in contract.decode_plain_many(batch))
    many = cpu_per_item(lambda: contract.decode_plain_many(batch), BATCH)
    model = cpu_per_item(lambda: [contract.decode(v) for v in values], BATCH, 3)
    loads = cpu_per_item(lambda: [orjson.loads(v) for v in values], BATCH)
    print(
        f"decode, one result message (batches of {BATCH:,}): decode_plain_many {us(many)}, "
        f"decode (pydantic model) {us(model)}, orjson.loads alone {us(loads)}"
    )


def prepare_gc() -> None:
    from checker_processing import consumer
    from checker_processing.writer import Record, prepare

    template, down = MessageTemplate(), MessageTemplate(down=True)
    stamp = datetime.now(UTC)
    batches = [
        [
            Record(
                "checker-results",
                n % 3,
                n,
                task_id(n % 1000).encode(),
                (down if n % 101 == 0 else template).build(
                    task_id(n % 1000), str(uuid.uuid4()), stamp + timedelta(microseconds=n)
                ),
            )
            for n in range(b * BATCH, (b + 1) * BATCH)
        ]
        for b in range(3)
    ]
    counts: Counter[int] = Counter()

    def count(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            counts[info["generation"]] += 1

    gc.callbacks.append(count)
    original = gc.get_threshold()
    figures = {}
    try:
        # The consumer freezes what exists at start, then raises the young threshold.
        for label, freeze, young in (
            ("default thresholds, nothing frozen", False, original[0]),
            ("default thresholds, start-up frozen", True, original[0]),
            (
                f"young threshold {consumer.GC_YOUNG_OBJECTS:,}, start-up frozen",
                True,
                consumer.GC_YOUNG_OBJECTS,
            ),
        ):
            if freeze:
                gc.freeze()
            gc.set_threshold(young, *original[1:])
            per_row = []
            collections = []
            for _ in range(5):
                for batch in batches:
                    counts.clear()
                    began = time.process_time()
                    prepared = prepare(batch, 1_048_576)
                    per_row.append((time.process_time() - began) / BATCH)
                    collections.append(sum(counts.values()))
                    del prepared
            figures[label] = (statistics.median(per_row), statistics.median(collections))
            gc.unfreeze()
    finally:
        gc.set_threshold(*original)
        gc.callbacks.remove(count)
    for label, (cpu, collected) in figures.items():
        print(
            f"prepare-gc, writer.prepare of {BATCH:,} messages, {label}: "
            f"{us(cpu)} per row, {collected:.0f} collections per batch"
        )


BENCHES: dict[str, Callable[[], None]] = {
    "regex": regex,
    "validate": validate,
    "taskmap": taskmap,
    "jobs-gc": jobs_gc,
    "records": records,
    "tuple": tuple_vs_dataclass,
    "decode": decode,
    "prepare-gc": prepare_gc,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", choices=[[], *BENCHES], metavar="NAME")
    args = parser.parse_args()
    print(machine())
    for name in args.names or BENCHES:
        BENCHES[name]()
    return 0


if __name__ == "__main__":
    sys.exit(main())
