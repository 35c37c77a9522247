"""Small in-process measurements that comments and docstrings quote, one command each.

    .venv/bin/python bench/micro.py [NAME ...]      (no name: all of them, about two minutes)

- `regex`     RE2 on a 100 KB page handed bytes against str (`probe.search_body`).
- `validate`  building a check's result with and without validation (`probe._result`).
- `taskmap`   counting 100,000 tasks by status and health by walking them (`metrics.TaskMap`).
- `shared-keys` the size of a definition's and a task's `__dict__` as validation makes it and as
              `task_spec.assembled` holds it (key-sharing).
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
- `re2-sizes` RE2 instructions (`programsize`) of everyday and of refused patterns
              (`task_spec.MAX_PATTERN_PROGRAM`, docs/api.md "Patterns").
- `re2-worst` RE2 where its DFA gives up (`[ab]*a[ab]{N}Z` over a body of a and b): CPU per
              body byte per instruction, and a 1 MiB body against the largest allowed pattern
              (`search.py`, `task_spec.MAX_SEARCH_WORK`).
- `re2-gil`   the event loop's longest gap while that 1 MiB search runs in a thread (google-re2
              releases the GIL: `search.py`).
- `handoff`   a 1 KB page searched through `PatternSearcher` (queue, `call_soon_threadsafe`)
              against `loop.run_in_executor`, on uvloop, and the search alone (`search.py`).
- `stalls`    CPU of the `LoopStalls` watcher (100 wake-ups a second) on an idle uvloop loop,
              against the loop alone (`overload.py`).
- `cert-expiry` reading a certificate's notAfter from its DER (`probe.cert_not_after`)
              against looking it up by the certificate's bytes (`probe.certificate_expiry`).
- `cycles`    objects a check through the Prober leaves in reference cycles, for the garbage
              collector (`http1._Exchange.connection_lost`; the checker runs a full collection
              only once an hour, `scheduler.CollectorPolicy`).
- `stored-rows` loading 100,000 stored tasks (`store.SQLiteTaskStore.load`): the rows
              fetched at once against 2,000 at a time, the table's order against the
              `(created_at, id)` index's, the unpublished tasks found by a scan against the
              partial index (schema 5); per row, a status read through the enumeration against a
              dictionary, an id through `uuid.UUID` against `ids.canonical_id`, a phase
              hashed by a fresh BLAKE2b against a copied one (`tasks._id_fraction`).
- `view-rows` the rows of a view a cluster node rebuilds from 100,000 task records
              (`store.ViewRebuild.add`): each value formatted in Python (`store._view_row`)
              against the values orjson writes itself (`for_json=True`), and a
              definition's text through pydantic against `task_spec.spec_json`.
- `record-decode` validating a task record's definition (`TaskSpec.model_validate_json`) with
              pydantic's cache of texts for keys only (`cache_strings="keys"`, as configured)
              against every text (pydantic's default), with and without the definition's
              validators (the same fields and settings, no validator).
- `plain-urls` reading 100,000 task URLs, each its own (four pages a site, in no order), through
              `urls.parse_url` with and without the one-step reading of a plainly spelled one
              (`urls._plain`).
- `bombs`     compression ratios of 64 MiB of zeros in gzip, brotli and zstd, and the least
              output brotli's decompressor hands back per call (`decoding.py`).

Each prints medians of several repeats, per item, with this process's CPU time.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import operator
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
    from periodic_checker.search import search_body

    filler = "lorem ipsum dolor sit amet, consectetur adipiscing elit " * 1800
    page = filler[:99_000] + "MARKER" + filler[:994]  # 100 KB, the match near the end
    body = page.encode()
    for label, pattern in (("matching near the end", "MARKER"), ("absent", "absent-pattern")):
        compiled = compile_pattern(pattern)
        as_bytes = cpu_per_item(functools.partial(compiled.search, body), 1, 50)
        as_str = cpu_per_item(functools.partial(compiled.search, page), 1, 20)
        via_probe = cpu_per_item(functools.partial(search_body, compiled, body, "utf-8"), 1, 50)
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


def cert_expiry() -> None:
    import ssl
    import subprocess
    import tempfile

    from periodic_checker.probe import _cert_not_after_seen, cert_not_after

    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
             "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", f"{tmp}/k.pem",
             "-out", f"{tmp}/c.pem", "-days", "90", "-subj", "/CN=localhost",
             "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
            check=True, capture_output=True,
        )  # fmt: skip
        der = ssl.PEM_cert_to_DER_cert(Path(f"{tmp}/c.pem").read_text())
    parsed = cpu_per_item(lambda: [cert_not_after(der) for _ in range(5000)], 5000)
    seen = cpu_per_item(lambda: [_cert_not_after_seen(der) for _ in range(5000)], 5000)
    print(
        f"cert-expiry, one {len(der)}-byte certificate: read from DER {us(parsed)}, "
        f"looked up by its bytes {us(seen)}"
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


def shared_keys() -> None:
    import sys

    from checker_common.task_spec import TaskSpec, checked_spec
    from periodic_checker.tasks import Task, compacted

    spec = TaskSpec(name="x", url="http://127.0.0.1:8089/", interval=60, timeout=5, pattern="ok")
    loaded = checked_spec(spec.model_dump(mode="json"))
    assert loaded is not None
    now = datetime.now(UTC)
    task = Task(id=uuid.uuid4(), spec=spec, created_at=now, updated_at=now)
    held = compacted(task)
    print(
        "shared-keys, bytes of a `__dict__` (sys.getsizeof): a definition as validation makes it "
        f"{sys.getsizeof(spec.__dict__)}, assembled (key-sharing) "
        f"{sys.getsizeof(loaded.__dict__)}; a task {sys.getsizeof(task.__dict__)} against "
        f"{sys.getsizeof(held.__dict__)}"
    )


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

    from periodic_checker.scheduler import SCHEDULE_TICK
    from periodic_checker.timetable import Timetable

    async def main() -> None:
        tasks = loaded_tasks(100_000)
        table = Timetable(lambda task_id: None, tick=SCHEDULE_TICK)
        first = time.time() + 3600
        for n, tid in enumerate(tasks):
            table.set(tid, first + 60 * n / 100_000, 60)
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
        print(
            f"jobs-gc, a full collection with 100,000 tasks and their timetable loaded: "
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
    from checker_processing.records import Record

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
    from checker_processing.records import Record

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
    from checker_processing.records import Record
    from checker_processing.writer import prepare

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


EVERYDAY_PATTERNS = {
    "ok": "ok",
    "a JSON status": '"status":\\s*"ok"',
    "a UUID": "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
    "ten words, case-insensitive": (
        "(?i)(?:maintenance|unavailable|forbidden|exception|traceback|critical|timeout"
        "|refused|denied|error)"
    ),
    "a repetition count": "\\w{1000}",
    "a Unicode class": "\\pL{100}",
}


def re2_sizes() -> None:
    import re2

    options = re2.Options()
    options.max_mem = 1 << 30  # measure the refused ones too
    for label, pattern in EVERYDAY_PATTERNS.items():
        size = re2.compile(pattern, options).programsize
        print(f"re2-sizes, {label} {pattern!r}: {size:,} instructions")


def hostile(instructions: int) -> Any:
    """`[ab]*a[ab]{N}Z` compiled, with the largest N whose program fits `instructions`: over a
    body of a and b its DFA needs 2**N states, gives up, and every byte costs the NFA."""
    import re2

    options = re2.Options()
    options.log_errors = False  # as task_spec.compile_pattern: no "DFA out of memory" lines
    n = instructions
    while (compiled := re2.compile(f"[ab]*a[ab]{{{n}}}Z", options)).programsize > instructions:
        n -= 1
    return compiled


def a_and_b(size: int) -> bytes:
    import random

    rng = random.Random(1)
    return bytes(rng.choice(b"ab") for _ in range(size))


def re2_worst() -> None:
    from checker_common.task_spec import MAX_PATTERN_PROGRAM, MAX_SEARCH_WORK

    body = a_and_b(256 * 1024)
    for instructions in (30, 64, 100, 300, MAX_PATTERN_PROGRAM):
        pattern = hostile(instructions)
        seconds = cpu_per_item(functools.partial(pattern.search, body), 1, 3)
        per = seconds / len(body) / pattern.programsize
        print(
            f"re2-worst, {pattern.programsize} instructions over 256 KiB of a and b:"
            f" {seconds * 1e3:.0f} ms, {per * 1e9:.2f} ns per byte per instruction"
        )
    pattern = hostile(MAX_PATTERN_PROGRAM)
    mib = a_and_b(1 << 20)
    began = time.process_time()
    pattern.search(mib)
    seconds = time.process_time() - began
    print(
        f"re2-worst, {pattern.programsize} instructions over 1 MiB: {seconds:.1f} s"
        f" ({seconds / len(mib) / pattern.programsize * 1e9:.2f} ns per byte per instruction);"
        f" MAX_SEARCH_WORK (2^{MAX_SEARCH_WORK.bit_length() - 1}) at that rate:"
        f" {MAX_SEARCH_WORK * seconds / len(mib) / pattern.programsize:.0f} s"
    )


def re2_gil() -> None:
    import asyncio
    import threading

    from checker_common.task_spec import MAX_PATTERN_PROGRAM

    pattern, body = hostile(MAX_PATTERN_PROGRAM), a_and_b(1 << 20)

    async def watch() -> tuple[float, float, int]:
        loop = asyncio.get_running_loop()
        began = time.monotonic()
        done = loop.create_future()
        threading.Thread(
            target=lambda: (pattern.search(body), loop.call_soon_threadsafe(done.set_result, 0))
        ).start()
        longest, ticks, last = 0.0, 0, time.monotonic()
        while not done.done():
            await asyncio.sleep(0.001)
            now = time.monotonic()
            longest, last, ticks = max(longest, now - last), now, ticks + 1
        return time.monotonic() - began, longest, ticks

    seconds, longest, ticks = asyncio.run(watch())
    print(
        f"re2-gil, a {seconds:.1f} s search in a thread: the loop woke {ticks:,} times"
        f" (sleeping 1 ms), longest gap {longest * 1e3:.1f} ms"
    )


def handoff() -> None:
    import asyncio

    import uvloop

    from checker_common.task_spec import compile_pattern
    from periodic_checker.search import PatternSearcher, search_body

    pattern = compile_pattern("absent-pattern")
    page = (b"lorem ipsum dolor sit amet, consectetur adipiscing elit " * 20)[:1000]
    count = 20_000

    async def through(run: Callable[[], Any]) -> float:
        for _ in range(200):
            await run()  # warm-up
        began = time.process_time()
        for _ in range(count):
            await run()
        return (time.process_time() - began) / count

    async def both() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        searcher = PatternSearcher()
        try:
            lane = await through(lambda: searcher.search(pattern, page, "utf-8"))
        finally:
            searcher.close()
        executor = await through(
            lambda: loop.run_in_executor(None, search_body, pattern, page, "utf-8")
        )
        return lane, executor

    lanes, executors = [], []
    for _ in range(3):
        lane, executor = uvloop.run(both())
        lanes.append(lane)
        executors.append(executor)
    alone = cpu_per_item(lambda: search_body(pattern, page, "utf-8"), 1, 1000)
    print(
        f"handoff, one search of a 1 KB page, CPU of the whole process (uvloop): the lanes"
        f" {', '.join(us(x) for x in lanes)}; run_in_executor {', '.join(us(x) for x in executors)};"
        f" the search alone {us(alone)}"
    )


def stalls() -> None:
    import asyncio

    import uvloop

    from periodic_checker.overload import WATCH_PERIOD, LoopStalls

    seconds = 10.0

    async def idle(watched: bool) -> float:
        watcher = LoopStalls()
        if watched:
            watcher.start()
        began = time.process_time()
        await asyncio.sleep(seconds)
        cpu = time.process_time() - began
        await watcher.stop()
        return cpu

    alone = uvloop.run(idle(False))
    watched = uvloop.run(idle(True))
    print(
        f"stalls, an idle uvloop loop for {seconds:.0f} s: {alone / seconds:.2%} of a core alone,"
        f" {watched / seconds:.2%} with LoopStalls ({1 / WATCH_PERIOD:.0f} wake-ups a second)"
    )


def bombs() -> None:
    import zlib

    import brotli

    if sys.version_info >= (3, 14):
        from compression import zstd
    else:
        from backports import zstd

    zeros = bytes(64 << 20)
    gz = zlib.compressobj(9, zlib.DEFLATED, 31)
    gzipped = gz.compress(zeros) + gz.flush()
    squeezed = brotli.compress(zeros, quality=5)  # as the tests' bomb (checker/targets.py)
    framed = zstd.compress(zeros, 19)
    for label, packed in (("gzip -9", gzipped), ("brotli 5", squeezed), ("zstd 19", framed)):
        print(
            f"bombs, 64 MiB of zeros as {label}: {len(packed):,} bytes"
            f" ({len(zeros) / len(packed):,.0f}:1)"
        )
    decompressor = brotli.Decompressor()
    first = decompressor.process(squeezed, output_buffer_limit=1)
    print(f"bombs, brotli's decompressor asked for 1 byte hands back {len(first):,}")


def catch_up() -> None:
    """The late slots of a handover (`tasks.resume_plan`): 30,000 tasks at 60 s taken after a
    handover of 10, 30 and 60 s, the take at 8 moments 7.5 s apart within the minute; the late
    runs in the busiest second against the tasks' usual rate (the highest of the 8), and their
    lag (all 8 together). "before": the turn anywhere before the task's next slot, at its phase
    (the code until 2026-12-05)."""
    import math
    from collections import Counter

    from periodic_checker.tasks import next_fire_time, phase_fraction, resume_plan

    interval, tasks = 60.0, 30_000
    ids = [uuid.UUID(int=n * 0x9E3779B97F4A7C15 % 2**128) for n in range(tasks)]
    for gap in (10.0, 30.0, 60.0):
        for variant in ("now", "before"):
            busiest = 0.0
            lags: list[float] = []
            for moment in range(8):
                now = 1_796_300_000.25 + 7.5 * moment
                per_second: Counter[int] = Counter()
                for one in ids:
                    last = next_fire_time(one, interval, now - gap) - interval
                    plan = resume_plan(one, interval, last, now, limit=60.0)
                    first = plan.first
                    if variant == "before" and plan.late:
                        upcoming = next_fire_time(one, interval, now)
                        first = now + phase_fraction(one) * (upcoming - now)
                    for slot in plan.late:
                        per_second[math.floor(first - now)] += 1
                        lags.append(first - slot)
                busiest = max(busiest, max(per_second.values()) / (tasks / interval))
            lags.sort()
            print(
                f"catch-up, handover of {gap:.0f} s, {variant}: busiest second {busiest:.2f} x"
                f" the usual rate, lag p50 {lags[len(lags) // 2]:.1f} s,"
                f" p99 {lags[int(len(lags) * 0.99)]:.1f} s, max {lags[-1]:.1f} s"
            )


def stored_rows() -> None:
    import hashlib
    import sqlite3
    import tempfile

    from bench.scheduler_scale import write_tasks
    from checker_common.ids import canonical_id
    from checker_common.task_spec import TaskStatus
    from periodic_checker import store as stores
    from periodic_checker.tasks import phase_fraction

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tasks.sqlite3"
        # The store of `scheduler_scale.py`: as the checker leaves it, every task published.
        write_tasks(path, 100_000, "http://127.0.0.1:8089/", 60.0)
        db = sqlite3.connect(path)
        columns = f"{stores._COLUMNS}, {stores._CHECKED}"
        for label, sql in (
            (
                "in the index's order, all at once",
                f"SELECT {columns} FROM tasks ORDER BY created_at, id",
            ),
            ("in the table's order, all at once", f"SELECT {columns} FROM tasks"),
        ):
            walls = []
            for _ in range(3):
                began = time.perf_counter()
                db.execute(sql).fetchall()
                walls.append(time.perf_counter() - began)
            print(f"stored-rows, reading 100,000 rows {label}: {statistics.median(walls):.3f} s")
        db.close()
        store = stores.SQLiteTaskStore(path, max_tasks=100_000)
        for label, index in (("by a scan", False), ("through the partial index", True)):
            # `SQLiteTaskStore.unpublished` itself, without and with its index (schema 5).
            store._db.execute(stores.MIGRATIONS[4][0] if index else "DROP INDEX tasks_unpublished")
            walls = []
            for _ in range(3):
                began = time.perf_counter()
                assert store.unpublished() == []
                walls.append(time.perf_counter() - began)
            print(
                f"stored-rows, the unpublished tasks found {label}: {statistics.median(walls) * 1000:.1f} ms"
            )
        for size in (100_000, 2_000):
            walls = []
            for _ in range(3):
                gc.disable()
                began = time.perf_counter()
                cursor = store._db.execute(f"SELECT {columns} FROM tasks")
                loaded = [stores._checked_row_to_task(r) for r in stores._chunked(cursor, size)]
                walls.append(time.perf_counter() - began)
                del loaded
                gc.enable()
            print(
                f"stored-rows, making the tasks of rows fetched {size:,} at a time: {statistics.median(walls):.3f} s"
            )
        store.close()
    text = str(uuid.uuid4())
    by_value = {status.value: status for status in TaskStatus}
    ids = [uuid.uuid4() for _ in range(100_000)]

    def fresh_fraction(task_id: uuid.UUID, person: bytes) -> float:  # `tasks.py` before
        digest = hashlib.blake2b(task_id.bytes, digest_size=8, person=person).digest()
        return int.from_bytes(digest, "big") / 2**64

    def fresh_phase(task_id: uuid.UUID) -> float:
        return fresh_fraction(task_id, b"")

    assert all(fresh_phase(i) == phase_fraction(i) for i in ids[:1000]), "the same phases"
    for label, fn in (
        (
            "a status through TaskStatus(text)",
            lambda: [TaskStatus("active") for _ in range(100_000)],
        ),
        ("a status through a dictionary", lambda: [by_value["active"] for _ in range(100_000)]),
        ("an id through uuid.UUID(text)", lambda: [uuid.UUID(text) for _ in range(100_000)]),
        (
            "an id through ids.canonical_id (store.py, task_record.py, names.py)",
            lambda: [canonical_id(text) for _ in range(100_000)],
        ),
        ("a phase, a fresh BLAKE2b (`tasks.py` before)", lambda: [fresh_phase(i) for i in ids]),
        ("a phase, a copied BLAKE2b (phase_fraction)", lambda: [phase_fraction(i) for i in ids]),
    ):
        print(f"stored-rows, {label}: {us(cpu_per_item(fn, 100_000))}")


def view_rows() -> None:
    import orjson

    from checker_common.task_record import TaskRecord, decode, encode
    from checker_common.task_spec import TaskSpec, spec_json
    from periodic_checker import store as stores
    from periodic_checker.task_view import applied

    now = datetime.now(UTC)
    spec = TaskSpec(name="x", url="http://127.0.0.1:9/", interval=3600, timeout=5)
    writes = []
    for n in range(100_000):
        record = TaskRecord(
            id=uuid.uuid4(),
            spec=spec.model_copy(update={"name": f"task {n}", "url": f"http://s{n}.test/p"}),
            created_at=datetime.now(UTC),
            updated_at=datetime.now(UTC),
        )
        change = decode(*encode(record))
        assert not isinstance(change, str)
        task = applied(change, None, now)  # type: ignore[arg-type]
        writes.append(stores.ViewWrite(task, True, n % 12, n))
    slow = orjson.dumps([stores._view_row(w, checked=False) for w in writes[:1000]])
    fast = orjson.dumps([stores._view_row(w, checked=False, for_json=True) for w in writes[:1000]])
    assert slow == fast, "the same JSON"
    specs = [w.task.spec for w in writes]
    view_columns = stores._VIEW_COLUMNS
    plain_part = operator.itemgetter(*(view_columns.index(c) for c in stores._PLAIN_COLUMNS))
    assert [
        plain_part(stores._view_row(w, checked=False, for_json=True)) for w in writes[:100]
    ] == [stores._plain_view_row(w) for w in writes[:100]]
    for label, fn in (
        (
            "a row, values formatted in Python (_view_row)",
            lambda: [stores._view_row(w, checked=False) for w in writes],
        ),
        (
            "a row, values orjson writes (for_json=True)",
            lambda: [stores._view_row(w, checked=False, for_json=True) for w in writes],
        ),
        (
            "a plain row's columns, picked from its row (the code before `_plain_view_row`)",
            lambda: [plain_part(stores._view_row(w, checked=False, for_json=True)) for w in writes],
        ),
        (
            "a plain row's columns, made from the task (_plain_view_row)",
            lambda: [stores._plain_view_row(w) for w in writes],
        ),
        ("a definition's text, model_dump_json()", lambda: [s.model_dump_json() for s in specs]),
        ("a definition's text, spec_json()", lambda: [spec_json(s) for s in specs]),
    ):
        print(f"view-rows, {label}: {us(cpu_per_item(fn, 100_000, repeats=3))}")


def validate_each(model: Any, texts: list[bytes]) -> list[Any]:
    """Each text validated by `model` (pydantic)."""
    return [model.model_validate_json(t) for t in texts]


def record_decode() -> None:
    import orjson
    from pydantic import ConfigDict, create_model, field_validator

    from checker_common.task_record import TaskRecord, encode
    from checker_common.task_spec import TaskSpec

    now = datetime.now(UTC)
    spec = TaskSpec(name="x", url="http://127.0.0.1:9/", interval=3600, timeout=5)
    texts = []
    for n in range(BATCH):
        record = TaskRecord(
            id=uuid.uuid4(),
            spec=spec.model_copy(
                update={"name": f"task {n}", "url": f"http://site-{n // 4}.test:9/page/{n % 4}"}
            ),
            created_at=now,
            updated_at=now,
        )
        texts.append(orjson.dumps(orjson.loads(encode(record)[1])["spec"]))
    fields: dict[str, Any] = {n: (f.annotation, f) for n, f in TaskSpec.model_fields.items()}
    assert TaskSpec.model_config.get("cache_strings") == "keys"
    every_text = ConfigDict(**{**TaskSpec.model_config, "cache_strings": True})
    validators: dict[str, Any] = {  # the same validators, made again from the model's own
        name: field_validator(*d.info.fields, mode=d.info.mode)(
            classmethod(getattr(d.func, "__func__"))  # noqa: B009 (typed as a plain callable)
        )
        for name, d in TaskSpec.__pydantic_decorators__.field_validators.items()
    }
    models: dict[str, Any] = {
        "as configured (keys)": TaskSpec,
        "every text cached": create_model(
            "EveryText",
            __config__=every_text,
            __validators__=validators,
            **fields,
        ),
        "no validators, keys": create_model("Bare", __config__=TaskSpec.model_config, **fields),
        "no validators, every text cached": create_model(
            "BareAll", __config__=every_text, **fields
        ),
    }
    assert len(models["every text cached"].__pydantic_decorators__.field_validators) == len(
        TaskSpec.__pydantic_decorators__.field_validators
    )
    for model in models.values():  # the first pass over the texts of each is slower
        [model.model_validate_json(t) for t in texts]
    for label, model in models.items():
        each = cpu_per_item(functools.partial(validate_each, model, texts), BATCH)
        print(f"record-decode, a definition, {label}: {us(each)}")


def plain_urls() -> None:
    import random

    from checker_common import urls

    texts = [f"https://site-{n // 4}.example.com/page/{n % 4}?ref=x" for n in range(100_000)]
    random.Random(3).shuffle(texts)
    read = urls.parse_url.__wrapped__  # not kept: each URL read anew
    plain = urls._plain

    def three_steps() -> object:
        urls._plain = lambda _text: None  # type: ignore[assignment]
        try:
            return [read(t) for t in texts]
        finally:
            urls._plain = plain

    for label, fn in (
        ("as written, three steps (the site, the reference, joined)", three_steps),
        ("plainly spelled, one step (_plain)", lambda: [read(t) for t in texts]),
    ):
        urls.host_problem.cache_clear()
        print(f"plain-urls, {label}: {us(cpu_per_item(fn, len(texts), repeats=3))} a URL")


def cycles() -> None:
    import asyncio

    import uvloop
    from aiohttp import web

    from checker_common.task_spec import TaskSpec
    from devstack import free_port
    from periodic_checker.policy import TargetPolicy
    from periodic_checker.probe import Prober

    count = 500

    async def left_to_the_collector() -> int:
        app = web.Application()

        async def page(_request: web.Request) -> web.Response:
            return web.Response(text="lorem ipsum pattern dolor")

        app.router.add_get("/", page)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        prober = Prober(policy=TargetPolicy(), max_connections=100, node="bench")
        await prober.start()
        spec = TaskSpec(
            name="x", url=f"http://127.0.0.1:{port}/", interval=60, timeout=5, pattern="pattern"
        )
        try:
            for _ in range(20):
                await prober.check(uuid.uuid4(), spec)  # warm-up
            await asyncio.sleep(0.1)
            gc.collect()
            gc.disable()
            await asyncio.gather(*(prober.check(uuid.uuid4(), spec) for _ in range(count)))
            await asyncio.sleep(0.2)  # the closed connections' callbacks run
            return gc.collect()
        finally:
            gc.enable()
            await prober.close()
            await runner.cleanup()

    found = [uvloop.run(left_to_the_collector()) for _ in range(3)]
    print(
        f"cycles, {count} checks of a local page through the Prober (uvloop), objects the"
        f" collector then found in reference cycles: {', '.join(str(n) for n in found)}"
        f" ({statistics.median(found) / count:.1f} a check)"
    )


BENCHES: dict[str, Callable[[], None]] = {
    "catch-up": catch_up,
    "regex": regex,
    "validate": validate,
    "taskmap": taskmap,
    "shared-keys": shared_keys,
    "jobs-gc": jobs_gc,
    "records": records,
    "tuple": tuple_vs_dataclass,
    "decode": decode,
    "prepare-gc": prepare_gc,
    "re2-sizes": re2_sizes,
    "re2-worst": re2_worst,
    "re2-gil": re2_gil,
    "handoff": handoff,
    "stalls": stalls,
    "bombs": bombs,
    "cert-expiry": cert_expiry,
    "cycles": cycles,
    "stored-rows": stored_rows,
    "view-rows": view_rows,
    "plain-urls": plain_urls,
    "record-decode": record_decode,
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
