"""Processor ingest: drain rate beside a raw COPY, and end-to-end latency at a steady rate.

    .venv/bin/python bench/ingest.py throughput [--messages 1000000] [--runs 3]
        [--batch 10000:500 --batch 20000:500 ...]   (default: the daemon's defaults, 10000:500)
        [--revision REV[@B:MS] --revision REV[@B:MS] ...]   (default: HEAD; several side by side)
        [--ids time-ordered|random|sequential]   (result ids; default as the checker makes them)
    .venv/bin/python bench/ingest.py latency [--rate 1000] [--seconds 30] [--runs 3]
    .venv/bin/python bench/ingest.py breakdown [--messages 100000] [--batch-size 5000]
    .venv/bin/python bench/ingest.py dedupe [--messages 300000] [--ids random --ids time-ordered]
    .venv/bin/python bench/ingest.py join [--runs 2]

Both start their own broker (Tansu behind stunnel, mutual TLS, 127.0.0.1) and their own
PostgreSQL database (migrated with the processor's migrations, dropped at the end), and run the
real daemon as a subprocess: `python -m checker_processing.cli run`.

throughput: N results are produced once (realistic messages built from `contract.encode`, 1,000
tasks, 1 % 'down' so incidents open and close). Each run, into the same emptied tables:
- `raw COPY`: the same N rows in COPY text, one COPY statement into check_results, committed;
- `processor`: a new consumer group drains the topic; timed from the first committed offset to
  the last (offsets are committed right after each batch's database commit), and from the
  daemon's start (group join included). The two alternate order from run to run.

latency: a daemon with the given batch settings is started and joined; results are produced at
a steady rate with timestamp = now - load_time, so "check finished" = produce time. An observer
polls PostgreSQL every 50 ms for new rows. Per result: visible = first poll that saw the row;
ingested_at = the row's column (now() = start of the writer's transaction, before its commit,
so it is a lower bound of visibility). A bare consumer on the same topic gives the Kafka part
alone (message create time to delivery) as the reference.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cached_property, partial
from pathlib import Path
from typing import Any

import psycopg2
from confluent_kafka import Consumer, Producer, TopicPartition

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    Kafka,
    MessageTemplate,
    cpu_seconds,
    daemon,
    kafka,
    machine,
    migrate,
    peak_rss_mib,
    percentile,
    server_version,
    snapshot,
    task_id,
    temp_database,
    workdir,
)

from checker_common.contract import decode_plain
from checker_common.ids import uuid7
from checker_processing.writer import Record, Row, copy_text

PARTITIONS = 3
TASKS = 1000
DOWN_EVERY = 101  # about 1 % of results 'down', spread over all tasks


# The processor's source: a `git archive` of a revision, or the uncommitted work tree.
WORK_TREE = "WORKTREE"


def source_of(revision: str, out: Path) -> tuple[Path, str]:
    if revision != WORK_TREE:
        return snapshot(revision, out)
    root = Path(__file__).resolve().parent.parent
    for package in ("checker_common", "checker_processing"):
        shutil.copytree(root / package, out / package, ignore=shutil.ignore_patterns("__pycache__"))
    return out, "work tree (uncommitted)"


# -- producing ---------------------------------------------------------------------------------


def producer_config(kafka: Kafka, linger_ms: int) -> dict[str, Any]:
    """The checker's own producer options (idempotent, acks=all, zstd), larger batches."""
    return kafka.config(
        **{
            "enable.idempotence": True,
            "acks": "all",
            "compression.type": "zstd",
            "linger.ms": linger_ms,
            "batch.size": 1_000_000,
            "queue.buffering.max.messages": 500_000,
            "queue.buffering.max.kbytes": 1_048_576,
        }
    )


@dataclass(frozen=True)
class Dataset:
    """The N results of a throughput run: result i is task i % TASKS, timestamps one hour
    back spread evenly (so all rows land in today's and perhaps yesterday's partition).

    Result ids: `time-ordered` (UUID version 7 from the result's time, as the checker makes
    them), `random` (version 4, as the checker made them before) or `sequential` (a counter
    behind a random prefix, the ids of the runs before 2026-12-03 15:00)."""

    count: int
    ids: str = "time-ordered"
    prefix: str = field(default_factory=lambda: str(uuid.uuid4())[:23])
    start: datetime = field(
        default_factory=lambda: datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    )

    @cached_property
    def _made_ids(self) -> list[str]:
        if self.ids == "random":
            return [str(uuid.uuid4()) for _ in range(self.count)]
        return [str(uuid7(self.stamp(i))) for i in range(self.count)]

    def result_id(self, i: int) -> str:
        if self.ids == "sequential":
            return f"{self.prefix}-{i:012x}"
        return self._made_ids[i]

    def stamp(self, i: int) -> datetime:
        return self.start + timedelta(seconds=3600 * i / self.count)

    def is_down(self, i: int) -> bool:
        return i % DOWN_EVERY == 0


def produce_dataset(kafka: Kafka, topic: str, data: Dataset) -> float:
    """Produce every result; returns the seconds it took."""
    up, down = MessageTemplate(), MessageTemplate(down=True)
    up.check()
    down.check()
    tasks = [task_id(n) for n in range(TASKS)]
    keys = [t.encode() for t in tasks]
    producer = Producer(producer_config(kafka, linger_ms=50))
    errors: list[str] = []

    def delivered(err: Any, msg: Any) -> None:
        if err is not None:
            errors.append(str(err))

    started = time.monotonic()
    for i in range(data.count):
        t = i % TASKS
        value = (down if data.is_down(i) else up).build(tasks[t], data.result_id(i), data.stamp(i))
        while True:
            try:
                producer.produce(topic, value, keys[t], on_delivery=delivered)
                break
            except BufferError:
                producer.poll(0.05)
        if i % 10_000 == 0:
            producer.poll(0)
    left = producer.flush(300)
    if left or errors:
        raise RuntimeError(f"{left} messages not delivered, errors: {errors[:3]}")
    return time.monotonic() - started


def copy_rows(data: Dataset, topic: str) -> str:
    """The same rows in the COPY text the writer sends (built from a template of the writer's
    own `copy_text`, Kafka positions made up: partition i % 3, offset i)."""
    templates = {}
    for down in (False, True):
        template = MessageTemplate(down=down)
        value = template.build("MARK-TASK", "MARK-RESULT", datetime(2000, 1, 1, tzinfo=UTC))
        value = value.replace(b"MARK-TASK", task_id(0).encode()).replace(
            b"MARK-RESULT", b"00000000-0000-4000-8000-0000000000bb"
        )
        record = Record(topic, 0, 0, None, value)
        line = copy_text([Row(record, decode_plain(value))]).rstrip("\n")
        line = line.rsplit("\t", 4)[0].replace("%", "%%")  # drop legacy .. offset
        line = line.replace(task_id(0), "%(task)s", 1)
        line = line.replace("00000000-0000-4000-8000-0000000000bb", "%(result)s", 1)
        # The writer copies the message's own ISO string (Z) or, before, isoformat() (+00:00).
        line = line.replace("2000-01-01T00:00:00+00:00", "%(stamp)s", 1)
        line = line.replace("2000-01-01T00:00:00Z", "%(stamp)s", 1)
        templates[down] = line + "\tf\t" + topic + "\t%(partition)d\t%(offset)d\n"
    tasks = [task_id(n) for n in range(TASKS)]
    parts = []
    for i in range(data.count):
        parts.append(
            templates[data.is_down(i)]
            % {
                "task": tasks[i % TASKS],
                "result": data.result_id(i),
                "stamp": data.stamp(i).isoformat(),
                "partition": i % PARTITIONS,
                "offset": i,
            }
        )
    return "".join(parts)


# -- database ----------------------------------------------------------------------------------


def execute(dsn: str, *statements: str) -> None:
    conn = psycopg2.connect(dsn, connect_timeout=5)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            for statement in statements:
                cur.execute(statement)
    finally:
        conn.close()


def empty_tables(dsn: str) -> None:
    """Same starting point for each contender: empty tables, no dirty pages pending."""
    execute(
        dsn,
        "TRUNCATE check_results, result_ids, result_slots, tasks, incidents, rejected_messages",
        "CHECKPOINT",
    )


def count_rows(dsn: str) -> int:
    conn = psycopg2.connect(dsn, connect_timeout=5)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM check_results")
            row = cur.fetchone()
        return int(row[0]) if row else 0
    finally:
        conn.close()


def raw_copy(dsn: str, text: str) -> tuple[float, float]:
    """(seconds, CPU seconds of its PostgreSQL backend)."""
    import io

    conn = psycopg2.connect(dsn, connect_timeout=5)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            backend = cur.fetchone()[0]
        conn.commit()
        cpu = cpu_seconds(backend)
        buffer = io.StringIO(text)
        started = time.monotonic()
        with conn.cursor() as cur:
            columns = ", ".join(_columns())
            cur.copy_expert(f"COPY check_results ({columns}) FROM STDIN", buffer, size=1 << 20)
        conn.commit()
        return time.monotonic() - started, cpu_seconds(backend) - cpu
    finally:
        conn.close()


def backends_cpu(dsn: str, application_name: str) -> float:
    """CPU seconds so far of the database's backends serving `application_name`."""
    conn = psycopg2.connect(dsn, connect_timeout=5)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                " AND application_name = %s",
                (application_name,),
            )
            pids = [row[0] for row in cur.fetchall()]
        return sum(cpu_seconds(pid) for pid in pids)
    finally:
        conn.close()


def broker_cpu(kafka: Kafka) -> float:
    """CPU seconds so far of the broker and its TLS proxy."""
    return sum(cpu_seconds(proc.pid) for proc in kafka.broker.procs.values())


def _columns() -> tuple[str, ...]:
    from checker_processing.writer import COLUMNS

    return COLUMNS


def ensure_partitions(dsn: str, data: Dataset) -> None:
    first, last = data.stamp(0).date(), data.stamp(data.count - 1).date()
    execute(
        dsn,
        f"SELECT check_results_ensure_partition(d::date) FROM generate_series("
        f"'{first}'::date, '{last}'::date, '1 day') AS d",
    )


# -- throughput --------------------------------------------------------------------------------


@dataclass
class Drain:
    from_first_s: float
    first_rows: int
    from_start_s: float
    cpu_s: float
    peak_rss_mib: float
    pg_cpu_s: float  # the processor's PostgreSQL backends
    broker_cpu_s: float  # the broker and its TLS proxy, while the processor ran
    # Seconds from the daemon's start to: its "consuming" log line (imports, settings,
    # migrations check, consumer made), its first "assigned" line (group joined), its first
    # committed offset.
    phases: dict[str, float] = field(default_factory=dict)

    def rate(self, count: int) -> float:
        return (count - self.first_rows) / self.from_first_s


def committed_total(watcher: Any, partitions: list[TopicPartition]) -> int:
    found = watcher.committed(partitions, timeout=10)
    return sum(max(0, tp.offset) for tp in found)


def drain(
    kafka: Kafka,
    dsn: str,
    topic: str,
    tasks_topic: str,
    count: int,
    batch: tuple[int, int],
    log: Path,
    source: Path,
    profile: Path | None = None,
) -> Drain:
    group = f"bench-{uuid.uuid4().hex[:8]}"
    env = kafka.processor_env(
        dsn,
        topic,
        # Subscribed beside the results and empty, as in a pipeline whose tasks do not change
        # (a revision before the task topic ignores it).
        KAFKA_TASKS_TOPIC=tasks_topic,
        KAFKA_CONSUMER_GROUP=group,
        BATCH_MAX_MESSAGES=str(batch[0]),
        BATCH_MAX_MS=str(batch[1]),
    )
    partitions = [TopicPartition(topic, p) for p in range(PARTITIONS)]
    watcher = Consumer(kafka.config(**{"group.id": group, "enable.auto.commit": False}))
    try:
        broker_before = broker_cpu(kafka)
        started, started_wall = time.monotonic(), time.time()
        with daemon(env, log, source) as proc, profiler(proc.proc.pid, profile):
            first_at, first_rows = 0.0, 0
            deadline = started + 1800
            while True:
                done = committed_total(watcher, partitions)
                now = time.monotonic()
                if done and not first_at:
                    first_at, first_rows = now, done
                if done >= count:
                    break
                if proc.proc.poll() is not None or now > deadline:
                    raise RuntimeError(f"processor stopped or stalled at {done}: {proc.tail()}")
                time.sleep(0.2)
            finished = now
            cpu = cpu_seconds(proc.proc.pid)
            rss = peak_rss_mib(proc.proc.pid)
            pg_cpu = backends_cpu(dsn, "checker-processing")
            broker = broker_cpu(kafka) - broker_before
    finally:
        watcher.close()
    phases = log_phases(log, started_wall)
    phases["first commit"] = first_at - started
    return Drain(
        finished - first_at, first_rows, finished - started, cpu, rss, pg_cpu, broker, phases
    )


def log_phases(log: Path, started_wall: float) -> dict[str, float]:
    """Seconds from `started_wall` to the first log line of each phase (the text format's
    local-time stamps, millisecond resolution)."""
    marks = {"consuming": ": consuming ", "assigned": ": assigned "}
    found: dict[str, float] = {}
    for line in log.read_text(errors="replace").splitlines():
        for name, mark in marks.items():
            if name not in found and mark in line:
                stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
                found[name] = stamp.timestamp() - started_wall
    return found


@contextlib.contextmanager
def profiler(pid: int, out: Path | None) -> Iterator[None]:
    """py-spy sampling the daemon (collapsed stacks, idle frames kept) while it drains."""
    if out is None:
        yield
        return
    spy = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "py-spy"),
            "record",
            "--pid",
            str(pid),
            "--rate",
            "200",
            "--idle",
            "--threads",
            "--format",
            "raw",
            "-o",
            str(out),
            "--nonblocking",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)
        try:
            spy.wait(timeout=60)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait(timeout=10)


@dataclass(frozen=True)
class Contender:
    """The processor at one revision with one batch setting."""

    commit: str
    source: Path
    batch: tuple[int, int]

    def name(self, with_commit: bool) -> str:
        batch = f"{self.batch[0]}:{self.batch[1]}"
        return f"{self.commit} {batch}" if with_commit else batch


def throughput(args: argparse.Namespace) -> int:
    host = machine()
    batches = [tuple(int(x) for x in b.split(":")) for b in (args.batch or ["10000:500"])]
    revisions = args.revision or ["HEAD"]
    data = Dataset(args.messages, args.ids)
    figures: dict[str, list[float]] = {"copy": []}
    notes: list[str] = []
    with workdir() as work, kafka(work) as broker, temp_database("bench_ingest") as dsn:
        processors = []
        for n, given in enumerate(revisions):
            # REV@BATCH_MAX_MESSAGES:BATCH_MAX_MS runs that revision with that batch only.
            revision, _, pinned = given.partition("@")
            source, commit = source_of(revision, work / f"source-{n}")
            own = [tuple(int(x) for x in pinned.split(":"))] if pinned else batches
            processors += [Contender(commit, source, (b[0], b[1])) for b in own]
        named = len(revisions) > 1
        migrate(dsn)
        ensure_partitions(dsn, data)
        topic = broker.topic(PARTITIONS)
        tasks_topic = broker.topic(PARTITIONS)
        produced_s = produce_dataset(broker, topic, data)
        print(f"produced {data.count} in {produced_s:.1f} s", file=sys.stderr)
        text = copy_rows(data, topic)
        print(f"COPY text {len(text) / 1e6:.0f} MB", file=sys.stderr)
        for run in range(args.runs):
            contenders: list[Contender | None] = [None, *processors]  # None: the raw COPY
            if run % 2:
                contenders.reverse()
            for contender in contenders:
                empty_tables(dsn)
                if contender is None:
                    seconds, copy_cpu = raw_copy(dsn, text)
                    figures["copy"].append(data.count / seconds)
                    figures.setdefault("copy pg cpu", []).append(copy_cpu / data.count * 100_000)
                    print(f"run {run + 1} raw COPY: {seconds:.1f} s", file=sys.stderr)
                    continue
                name = contender.name(named)
                label = name.replace(" ", "-").replace(":", "-")
                log = work / f"processor-{run}-{label}.log"
                profile = None
                if args.profile and run == 0:
                    profile = args.profile / f"processor-{label}.txt"
                result = drain(
                    broker,
                    dsn,
                    topic,
                    tasks_topic,
                    data.count,
                    contender.batch,
                    log,
                    contender.source,
                    profile,
                )
                stored = count_rows(dsn)
                if stored != data.count:
                    raise RuntimeError(f"{stored} rows stored, expected {data.count}")
                figures.setdefault(name, []).append(result.rate(data.count))
                figures.setdefault(name + " total", []).append(data.count / result.from_start_s)
                figures.setdefault(name + " cpu", []).append(result.cpu_s / data.count * 100_000)
                figures.setdefault(name + " rss", []).append(result.peak_rss_mib)
                per_100k = 100_000 / data.count
                figures.setdefault(name + " pg cpu", []).append(result.pg_cpu_s * per_100k)
                figures.setdefault(name + " broker cpu", []).append(result.broker_cpu_s * per_100k)
                for phase, at in result.phases.items():
                    figures.setdefault(f"{name} phase {phase}", []).append(at)
                print(
                    f"run {run + 1} processor {name}: {result.from_first_s:.1f} s from "
                    f"first commit ({result.first_rows} rows), {result.from_start_s:.1f} s "
                    f"from start, CPU {result.cpu_s:.1f} s, peak RSS {result.peak_rss_mib:.0f} MiB"
                    f" ({', '.join(f'{k} at {v:.2f} s' for k, v in result.phases.items())})",
                    file=sys.stderr,
                )
        version = server_version(dsn)

    copy_rate = statistics.median(figures["copy"])
    commits = ", ".join(dict.fromkeys(c.commit for c in processors))
    print(f"\n{data.count:,} results x {args.runs} runs, medians; {host}; PostgreSQL {version}")
    print(
        f"(processor as committed at {commits}; produced in {produced_s:.0f} s, not timed; "
        f"load average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())})\n"
    )
    print(
        "| contender | BATCH_MAX_MESSAGES:BATCH_MAX_MS | rows/s from first commit "
        "| rows/s from daemon start | processor CPU s per 100k rows | processor peak RSS MiB "
        "| share of raw COPY |"
    )
    print("|---|---|---|---|---|---|---|")
    print(f"| raw COPY, one statement | - | {copy_rate:,.0f} | - | - | - | 100 % |")
    for contender in processors:
        name = contender.name(named)
        rate = statistics.median(figures[name])
        ratios = [r / c for r, c in zip(figures[name], figures["copy"], strict=True)]
        rss = figures[name + " rss"]
        print(
            f"| processor daemon{f' at {contender.commit}' if named else ''} "
            f"| {contender.batch[0]}:{contender.batch[1]} | {rate:,.0f} "
            f"| {statistics.median(figures[name + ' total']):,.0f} "
            f"| {statistics.median(figures[name + ' cpu']):.1f} "
            f"| {statistics.median(rss):.0f} (max {max(rss):.0f}) "
            f"| {100 * statistics.median(ratios):.0f} % (runs: "
            f"{', '.join(f'{100 * r:.0f}' for r in ratios)}) |"
        )
    print("\nGoal: processor >= 75 % of raw COPY (ratio taken within each run, median shown).")
    print_shares_from_start(figures, [c.name(named) for c in processors])
    print_phases(figures, [c.name(named) for c in processors])
    print_cpu(figures, [c.name(named) for c in processors])
    for note in notes:
        print(note)
    return 0


def print_cpu(figures: dict[str, list[float]], names: list[str]) -> None:
    """Where the CPU went, per 100k rows (medians): on this machine's cores the sum bounds
    the drain rate from below whatever overlaps."""
    print("\nCPU seconds per 100k rows, medians:")
    print(
        "\n| contender | processor (Python, librdkafka) | its PostgreSQL backends "
        "| broker + TLS proxy | sum |"
    )
    print("|---|---|---|---|---|")
    copy = statistics.median(figures["copy pg cpu"])
    print(f"| raw COPY | - | {copy:.2f} | - | {copy:.2f} |")
    for name in names:
        parts = [statistics.median(figures[f"{name} {k}"]) for k in ("cpu", "pg cpu", "broker cpu")]
        print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in parts) + f" | {sum(parts):.2f} |")


def print_phases(figures: dict[str, list[float]], names: list[str]) -> None:
    """Medians of when each phase began, seconds from the daemon's start."""
    phases = ("consuming", "assigned", "first commit")
    print("\n| processor | " + " | ".join(f"{p} at (s from start)" for p in phases) + " |")
    print("|---|" + "---|" * len(phases))
    for name in names:
        cells = []
        for phase in phases:
            values = figures.get(f"{name} phase {phase}", [])
            cells.append(f"{statistics.median(values):.2f}" if values else "-")
        print(f"| {name} | " + " | ".join(cells) + " |")


def print_shares_from_start(figures: dict[str, list[float]], names: list[str]) -> None:
    """The share of raw COPY with the processor timed from its process start (start-up and
    group join included: what a user waits for) beside the share timed from its first
    committed offset (the steady drain alone), each taken within its run."""
    print(
        "\n| processor BATCH_MAX_MESSAGES:BATCH_MAX_MS | share of raw COPY, timed from the "
        "daemon's start | share of raw COPY, timed from its first committed offset |"
    )
    print("|---|---|---|")
    for name in names:
        columns = []
        for key in (name + " total", name):
            shares = [r / c for r, c in zip(figures[key], figures["copy"], strict=True)]
            columns.append(
                f"{100 * statistics.median(shares):.0f} % (runs: "
                f"{', '.join(f'{100 * r:.0f}' for r in shares)})"
            )
        print(f"| {name} | {columns[0]} | {columns[1]} |")


# -- latency -----------------------------------------------------------------------------------


@dataclass
class Seen:
    visible: list[float] = field(default_factory=list)
    ingested: list[float] = field(default_factory=list)
    kafka: list[float] = field(default_factory=list)


def observe_rows(dsn: str, stop: threading.Event, seen: Seen, expected: int) -> None:
    """Poll for new rows every 50 ms; record visible-minus-finished per result."""
    conn = psycopg2.connect(dsn, connect_timeout=5, application_name="bench-observer")
    conn.autocommit = True
    known: set[str] = set()
    since = 0.0
    try:
        with conn.cursor() as cur:
            while len(known) < expected and not stop.is_set():
                cur.execute(
                    "SELECT result_id::text, extract(epoch FROM checked_at)::float8 + load_time,"
                    " extract(epoch FROM ingested_at)::float8 FROM check_results"
                    " WHERE ingested_at >= to_timestamp(%s)",
                    (since,),
                )
                now = time.time()
                for result, finished, ingested in cur.fetchall():
                    if result in known:
                        continue
                    known.add(result)
                    seen.visible.append(now - finished)
                    seen.ingested.append(ingested - finished)
                    since = max(since, ingested)
                time.sleep(0.05)
    finally:
        conn.close()


def observe_kafka(
    kafka: Kafka, topic: str, stop: threading.Event, ready: threading.Event, seen: Seen
) -> None:
    """The reference: a bare consumer's delivery time minus the message's create time."""
    consumer = Consumer(
        kafka.config(
            **{
                "group.id": f"bench-ref-{uuid.uuid4().hex[:8]}",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "fetch.queue.backoff.ms": 10,
                "session.timeout.ms": 6000,
                "heartbeat.interval.ms": 1000,
            }
        )
    )
    consumer.subscribe([topic], on_assign=lambda c, parts: ready.set())
    try:
        while not stop.is_set():
            for message in consumer.consume(num_messages=1000, timeout=0.1):
                if message.error() is None:
                    seen.kafka.append(time.time() - message.timestamp()[1] / 1000)
    finally:
        consumer.close()


def wait_joined(log: Path, proc: Any, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while ": assigned " not in log.read_text(errors="replace"):
        if proc.proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"processor did not join: {proc.tail()}")
        time.sleep(0.2)


def latency_run(
    broker: Kafka, dsn: str, args: argparse.Namespace, log: Path, source: Path
) -> tuple[Seen, int, float]:
    topic = broker.topic(PARTITIONS)
    env = broker.processor_env(
        dsn,
        topic,
        KAFKA_TASKS_TOPIC=broker.topic(PARTITIONS),
        BATCH_MAX_MESSAGES=str(args.batch_max_messages),
        BATCH_MAX_MS=str(args.batch_max_ms),
    )
    template = MessageTemplate()
    template.check()
    tasks = [task_id(n) for n in range(TASKS)]
    total = args.rate * args.seconds
    seen = Seen()
    stop, ready = threading.Event(), threading.Event()
    with daemon(env, log, source) as proc:
        wait_joined(log, proc)
        threads = [
            threading.Thread(target=observe_rows, args=(dsn, stop, seen, total)),
            threading.Thread(target=observe_kafka, args=(broker, topic, stop, ready, seen)),
        ]
        for thread in threads:
            thread.start()
        try:
            if not ready.wait(120):  # the reference consumer joins its group
                raise RuntimeError("the reference consumer got no partitions")
            producer = Producer(producer_config(broker, linger_ms=20))  # the checker's linger
            tick = 0.01
            per_tick = max(1, round(args.rate * tick))
            started = time.monotonic()
            sent = 0
            while sent < total:
                due = started + (sent // per_tick) * tick
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                for _ in range(per_tick):
                    t = sent % TASKS
                    now = datetime.now(UTC)
                    value = template.build(
                        tasks[t], str(uuid.uuid4()), now - timedelta(seconds=template.load_time)
                    )
                    producer.produce(topic, value, tasks[t].encode())
                    sent += 1
                producer.poll(0)
            achieved = sent / (time.monotonic() - started)
            producer.flush(60)
            deadline = time.monotonic() + 120
            while len(seen.visible) < total and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=30)
        cpu = cpu_seconds(proc.proc.pid)
    if len(seen.visible) < total:
        raise RuntimeError(f"only {len(seen.visible)} of {total} rows became visible")
    return seen, round(achieved), cpu / args.seconds


def latency(args: argparse.Namespace) -> int:
    host = machine()
    rows: list[dict[str, float]] = []
    with workdir() as work, kafka(work) as broker, temp_database("bench_latency") as dsn:
        source, commit = source_of(args.revision, work / "source")
        migrate(dsn)
        for run in range(args.runs):
            log = work / f"latency-{run}.log"
            seen, achieved, cpu = latency_run(broker, dsn, args, log, source)
            figures = {
                "rate": achieved,
                "cpu": cpu,
                "kafka_p50": percentile(seen.kafka, 0.5),
                "kafka_p99": percentile(seen.kafka, 0.99),
                "visible_p50": percentile(seen.visible, 0.5),
                "visible_p99": percentile(seen.visible, 0.99),
                "ingested_p50": percentile(seen.ingested, 0.5),
                "ingested_p99": percentile(seen.ingested, 0.99),
                "visible_max": max(seen.visible),
            }
            rows.append(figures)
            print(f"run {run + 1}: {figures}", file=sys.stderr)
            execute(dsn, "TRUNCATE check_results, result_ids, result_slots, tasks, incidents")
        version = server_version(dsn)

    def med(key: str) -> float:
        return statistics.median(r[key] for r in rows)

    print(
        f"\n{args.rate}/s for {args.seconds} s x {args.runs} runs, medians; "
        f"BATCH_MAX_MESSAGES={args.batch_max_messages}, BATCH_MAX_MS={args.batch_max_ms}; "
        f"processor as committed at {commit}; "
        f"{host}; PostgreSQL {version}\n"
    )
    print("| latency from check finished | p50 s | p99 s |")
    print("|---|---|---|")
    print(
        f"| reference: bare Kafka consumer receives it | {med('kafka_p50'):.3f} "
        f"| {med('kafka_p99'):.3f} |"
    )
    print(
        f"| row's ingested_at (writer's transaction start, lower bound) "
        f"| {med('ingested_p50'):.3f} | {med('ingested_p99'):.3f} |"
    )
    print(
        f"| row visible to a 50 ms poller (upper bound) | {med('visible_p50'):.3f} "
        f"| {med('visible_p99'):.3f} |"
    )
    print(
        f"\nAchieved produce rate (median): {med('rate'):.0f}/s; worst single result visible "
        f"after {max(r['visible_max'] for r in rows):.3f} s; processor CPU "
        f"{100 * med('cpu'):.0f} % of one core. Goal: p99 < 2 s."
    )
    return 0


# -- breakdown ---------------------------------------------------------------------------------


def records_of(data: Dataset, topic: str) -> list[Record]:
    up, down = MessageTemplate(), MessageTemplate(down=True)
    tasks = [task_id(n) for n in range(TASKS)]
    return [
        Record(
            topic,
            i % PARTITIONS,
            i,
            tasks[i % TASKS].encode(),
            (down if data.is_down(i) else up).build(
                tasks[i % TASKS], data.result_id(i), data.stamp(i)
            ),
        )
        for i in range(data.count)
    ]


def timed(fn: Any, *args: Any) -> tuple[Any, float, float]:
    """(result, wall s, this process's CPU s)."""
    wall, cpu = time.monotonic(), time.process_time()
    result = fn(*args)
    return result, time.monotonic() - wall, time.process_time() - cpu


def steps(dsn: str, batches: list[list[Record]], tally: Any) -> None:
    """The writer's own statements (its SQL constants), one by one, wall time each."""
    import io

    from checker_processing import db
    from checker_processing import writer as w

    conn = db.connect(dsn)
    try:
        for batch in batches:
            text = copy_text(w.parse(batch, 1_048_576)[0])
            with conn.cursor() as cur:
                started = time.monotonic()
                cur.execute(w._STAGING)
                cur.copy_expert(f"COPY staging_results ({w._COLS}) FROM STDIN", io.StringIO(text))
                copied = time.monotonic()
                cur.execute(w._INSERT)
                inserted_at = time.monotonic()
                inserted = cur.fetchall()
                fetched = time.monotonic()
                w._update_tasks_and_incidents(cur, w.new_rows(inserted))
                updated = time.monotonic()
            conn.commit()
            done = time.monotonic()
            tally("  step: COPY into the staging table", copied - started)
            tally("  step: INSERT .. ON CONFLICT DO NOTHING RETURNING", inserted_at - copied)
            tally("  step: fetchall of RETURNING (client-side parsing)", fetched - inserted_at)
            tally("  step: tasks upsert + incidents", updated - fetched)
            tally("  step: commit", done - updated)
    finally:
        conn.close()


def _tally(totals: dict[str, float], name: str, seconds: float) -> None:
    totals[name] = totals.get(name, 0.0) + seconds


def _copy_committed(conn: Any, text: str) -> None:
    import io

    with conn.cursor() as cur:
        cur.copy_expert(
            f"COPY check_results ({', '.join(_columns())}) FROM STDIN", io.StringIO(text)
        )
    conn.commit()


def breakdown(args: argparse.Namespace) -> int:
    """Where a batch's time goes, in-process with the writer's own functions (no broker)."""
    if args.revision != WORK_TREE:
        # In-process: it measures the writer this checkout imports, whatever its state.
        print("breakdown runs the work tree's writer in-process: only --revision WORKTREE")
        return 2
    host = machine()
    import orjson
    from pydantic import TypeAdapter

    from checker_common.contract import CheckResult
    from checker_processing import db
    from checker_processing.retention import Window
    from checker_processing.writer import Writer, parse

    window = Window(retention_days=90, max_clock_skew=timedelta(seconds=300))

    data = Dataset(args.messages)
    records = records_of(data, "bench")
    batches = [records[i : i + args.batch_size] for i in range(0, len(records), args.batch_size)]
    whole = TypeAdapter(dict[uuid.UUID, CheckResult])
    sums: dict[str, list[float]] = {}

    def add(name: str, seconds: float) -> None:
        sums.setdefault(name, []).append(seconds)

    with temp_database("bench_breakdown") as dsn:
        migrate(dsn)
        ensure_partitions(dsn, data)
        for run in range(args.runs):
            totals: dict[str, float] = {}
            tally = partial(_tally, totals)

            empty_tables(dsn)
            writer = Writer(lambda: db.connect(dsn), 1_048_576, window=window)
            for batch in batches:
                _, wall, cpu = timed(writer.write, batch)
                tally("Writer.write wall", wall)
                tally("Writer.write CPU", cpu)
            writer.close()
            # The database's part alone: the same writes with each batch prepared beforehand
            # (decode and COPY text not timed), the floor of a processor on one connection.
            empty_tables(dsn)
            writer = Writer(lambda: db.connect(dsn), 1_048_576, window=window)
            for batch in batches:
                prepared = writer.prepare(batch)
                _, wall, _ = timed(writer.write, batch, prepared)
                tally("Writer.write wall, batch prepared beforehand (the database's part)", wall)
            writer.close()
            for batch in batches:
                parsed, _, cpu = timed(parse, batch, 1_048_576)
                rows = parsed[0]
                tally("parse (contract.decode)", cpu)
                _, _, cpu = timed(copy_text, rows)
                tally("copy_text", cpu)
                _, _, cpu = timed(lambda b: [orjson.loads(r.value) for r in b], batch)
                tally("orjson.loads only", cpu)
                _, _, cpu = timed(lambda b: [whole.validate_json(r.value) for r in b], batch)
                tally("TypeAdapter(dict[UUID, CheckResult]).validate_json", cpu)
            empty_tables(dsn)
            steps(dsn, batches, tally)
            empty_tables(dsn)
            conn = db.connect(dsn)
            for batch in batches:
                text = copy_text(parse(batch, 1_048_576)[0])
                _, wall, _ = timed(_copy_committed, conn, text)
                tally("raw COPY of the batch's text, committed", wall)
            conn.close()
            for name, seconds in totals.items():
                add(name, seconds)
            print(f"run {run + 1}: {totals}", file=sys.stderr)

    n = data.count
    print(
        f"\n{n:,} results in batches of {args.batch_size:,}, {args.runs} runs, medians, "
        f"microseconds per row; {host}\n"
    )
    print("| stage | us per row |")
    print("|---|---|")
    for name, values in sums.items():
        print(f"| {name} | {1e6 * statistics.median(values) / n:.1f} |")
    return 0


# -- dedupe ------------------------------------------------------------------------------------

IDS = ("time-ordered", "random", "sequential")

DEDUPE_VARIANTS = (
    "primary key only (the raw COPY's table)",
    "primary key + result_ids (today's writer)",
    "primary key + UNIQUE (result_id) on each partition",
    "UNIQUE (result_id) on each partition, no primary key",
)


def dedupe(args: argparse.Namespace) -> int:
    """What keeping a result id once costs PostgreSQL, per way of keeping it and per kind of
    result id: the same rows COPied in committed batches (the writer's batch size) into
    check_results with each set of indexes; every (ids, indexes) pair once per round, order
    alternated; ratios to the primary key alone with the first kind of ids, within each
    round."""
    import io

    host = machine()
    kinds = args.ids or ["random", "time-ordered"]
    start = Dataset(1).start
    texts: dict[str, tuple[list[bytes], list[bytes]]] = {}
    for kind in kinds:
        data = Dataset(args.messages, kind, start=start)
        lines = copy_rows(data, "bench").splitlines(keepends=True)
        batches = [
            "".join(lines[i : i + args.batch_size]).encode()
            for i in range(0, len(lines), args.batch_size)
        ]
        ids = [
            b"".join(b"\t".join(line.split(b"\t", 2)[:2]) + b"\n" for line in batch.splitlines())
            for batch in batches
        ]
        texts[kind] = (batches, ids)
    columns = ", ".join(_columns())
    seconds: dict[tuple[str, str], list[float]] = {}
    with temp_database("bench_dedupe") as dsn:
        migrate(dsn)
        ensure_partitions(dsn, data)
        conn = psycopg2.connect(dsn, connect_timeout=5)
        try:

            def partitions() -> list[str]:
                with conn.cursor() as cur:
                    cur.execute(
                        "SELECT inhrelid::regclass::text FROM pg_inherits"
                        " WHERE inhparent = 'check_results'::regclass"
                    )
                    return [row[0] for row in cur.fetchall()]

            def indexes(variant: str, on: bool) -> None:
                with conn.cursor() as cur:
                    if not on:
                        cur.execute("TRUNCATE check_results")
                    if variant == DEDUPE_VARIANTS[3]:
                        cur.execute(
                            "ALTER TABLE check_results DROP CONSTRAINT check_results_pkey"
                            if on
                            else "ALTER TABLE check_results ADD PRIMARY KEY (result_id, checked_at)"
                        )
                    if variant in DEDUPE_VARIANTS[2:]:
                        for part in partitions():
                            cur.execute(
                                f"CREATE UNIQUE INDEX {part}_result_id ON {part} (result_id)"
                                if on
                                else f"DROP INDEX {part}_result_id"
                            )
                conn.commit()

            pairs = [(kind, variant) for kind in kinds for variant in DEDUPE_VARIANTS]
            for run in range(args.runs):
                for kind, variant in pairs if run % 2 == 0 else reversed(pairs):
                    batches, ids = texts[kind]
                    empty_tables(dsn)
                    indexes(variant, on=True)
                    with_ids = variant == DEDUPE_VARIANTS[1]
                    started = time.monotonic()
                    with conn.cursor() as cur:
                        for rows, id_rows in zip(batches, ids, strict=True):
                            if with_ids:
                                cur.copy_expert(
                                    "COPY result_ids (result_id, checked_at) FROM STDIN",
                                    io.BytesIO(id_rows),
                                    len(id_rows) + 1,
                                )
                            cur.copy_expert(
                                f"COPY check_results ({columns}) FROM STDIN",
                                io.BytesIO(rows),
                                len(rows) + 1,
                            )
                            conn.commit()
                    took = time.monotonic() - started
                    indexes(variant, on=False)
                    seconds.setdefault((kind, variant), []).append(took)
                    print(f"run {run + 1} {kind} ids, {variant}: {took:.2f} s", file=sys.stderr)
        finally:
            conn.close()
        version = server_version(dsn)
    base = seconds[(kinds[0], DEDUPE_VARIANTS[0])]
    print(
        f"\n{args.messages:,} rows, committed batches of {args.batch_size:,},"
        f" {args.runs} runs, medians; {host}; PostgreSQL {version}; load average at the end"
        f" {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n"
    )
    print(
        f"| result ids | indexes that keep a result id once | us per row "
        f"| x the primary key alone with {kinds[0]} ids (runs) |"
    )
    print("|---|---|---|---|")
    for (kind, variant), took in seconds.items():
        ratios = [t / b for t, b in zip(took, base, strict=True)]
        print(
            f"| {kind} | {variant} | {1e6 * statistics.median(took) / args.messages:.1f} "
            f"| {statistics.median(ratios):.2f} ({', '.join(f'{r:.2f}' for r in ratios)}) |"
        )
    return 0


# -- join ----------------------------------------------------------------------------------------

JOIN_CASES: tuple[dict[str, Any], ...] = (
    {},
    {"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000},
    {"session.timeout.ms": 6000, "heartbeat.interval.ms": 100},
    {"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000, "max.poll.interval.ms": 6000},
    {
        "session.timeout.ms": 6000,
        "heartbeat.interval.ms": 1000,
        "partition.assignment.strategy": "roundrobin",
    },
    {
        "session.timeout.ms": 6000,
        "heartbeat.interval.ms": 1000,
        "partition.assignment.strategy": "cooperative-sticky",
    },
    {"session.timeout.ms": 10000, "heartbeat.interval.ms": 1000},
    {"session.timeout.ms": 2000, "heartbeat.interval.ms": 300},
)


def _assigned_at(into: list[float], consumer: Any, partitions: Any) -> None:
    into.append(time.monotonic())


def join(args: argparse.Namespace) -> int:
    """How long a new consumer group member waits for its partitions on this broker, per
    consumer setting: seconds from subscribe() to on_assign."""
    with workdir() as work, kafka(work) as broker:
        topic = broker.topic(PARTITIONS)
        print("| consumer options (beyond the bench's TLS ones) | seconds to on_assign (runs) |")
        print("|---|---|")
        for case in JOIN_CASES:
            took = []
            for _ in range(args.runs):
                consumer = Consumer(
                    broker.config(
                        **{"group.id": f"join-{uuid.uuid4().hex[:8]}", **case},
                        **{"enable.auto.commit": False},
                    )
                )
                started = time.monotonic()
                assigned: list[float] = []
                consumer.subscribe([topic], on_assign=partial(_assigned_at, assigned))
                while not assigned and time.monotonic() - started < 120:
                    consumer.poll(0.05)
                consumer.close()
                took.append(assigned[0] - started if assigned else float("nan"))
            options = ", ".join(f"{k}={v}" for k, v in case.items()) or "librdkafka defaults"
            print(f"| {options} | {', '.join(f'{t:.2f}' for t in took)} |", flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    t = sub.add_parser("throughput")
    t.add_argument("--messages", type=int, default=1_000_000)
    t.add_argument("--runs", type=int, default=3)
    t.add_argument("--batch", action="append", help="BATCH_MAX_MESSAGES:BATCH_MAX_MS")
    t.add_argument("--profile", type=Path, help="py-spy the first run's drains into this dir")
    t.add_argument("--ids", choices=IDS, default="time-ordered", help="result ids (Dataset)")
    lat = sub.add_parser("latency")
    lat.add_argument("--rate", type=int, default=1000)
    lat.add_argument("--seconds", type=int, default=30)
    lat.add_argument("--runs", type=int, default=3)
    lat.add_argument("--batch-max-messages", type=int, default=10000)
    lat.add_argument("--batch-max-ms", type=int, default=500)
    b = sub.add_parser("breakdown")
    b.add_argument("--messages", type=int, default=100_000)
    b.add_argument("--batch-size", type=int, default=5000)
    b.add_argument("--runs", type=int, default=3)
    t.add_argument(
        "--revision",
        action="append",
        help=f"git revision of the processor (HEAD), or {WORK_TREE} for the work tree;"
        " repeat it to run several side by side; REV@20000:500 runs REV with that batch only",
    )
    for mode in (lat, b):
        mode.add_argument(
            "--revision",
            default=WORK_TREE if mode is b else "HEAD",
            help=f"git revision of the processor run (HEAD), or {WORK_TREE} for the work tree",
        )
    d = sub.add_parser("dedupe")
    d.add_argument("--messages", type=int, default=300_000)
    d.add_argument("--batch-size", type=int, default=10_000)
    d.add_argument("--runs", type=int, default=3)
    d.add_argument(
        "--ids", choices=IDS, action="append", help="repeat; default random and time-ordered"
    )
    j = sub.add_parser("join")
    j.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    if args.mode == "join":
        return join(args)
    if args.mode == "dedupe":
        return dedupe(args)
    if args.mode == "breakdown":
        return breakdown(args)
    return throughput(args) if args.mode == "throughput" else latency(args)


if __name__ == "__main__":
    began = time.monotonic()
    code = main()
    print(f"(took {time.monotonic() - began:.0f} s)", file=sys.stderr)
    sys.exit(code)
