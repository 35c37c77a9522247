"""The harness of the fault scenarios: both daemons as real processes (`daemons.Daemon`) against
the real broker and PostgreSQL, a target web server, a TCP proxy in front of PostgreSQL, and the
tally that ends every scenario (taken from the topic and from PostgreSQL by result_id).

    with Target() as target, fresh_schema(pg_dsn) as dsn:
        ids = seed_tasks(storage, [spec(target.url("/ok")) for _ in range(100)])
        checker = Daemon.checker(checker_env(kafka, topic, storage), tmp_path / "checker.log")
        processor = Daemon.processor(processor_env(kafka, topic, dsn), tmp_path / "p.log")
        ...  # the fault
        assert checker.terminate() == 0
        tally = Tally.of(published(kafka, topic), stored(dsn))
        assert tally.lost == tally.duplicates == 0
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import os
import socket
import sqlite3
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import psycopg2
from aiohttp import web
from checker.targets import make_app
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition
from processing.processing_helpers import TcpProxy
from psycopg2 import sql

from checker_common.contract import ContractError, Decoded, decode
from checker_common.task_spec import TaskSpec
from devstack import free_port
from periodic_checker.store import SQLiteTaskStore
from periodic_checker.tasks import Task

from daemons import Daemon
from helpers import KafkaTarget, tasks_topic_of
from helpers import wait_for as poll_until

FULL = os.environ.get("FAULTS_FULL") == "1"
DEADLINE_S = 120.0
# How long a checker's backlog may take to reach the broker before a scenario ends.
DRAIN_DEADLINE_S = 180.0
PARTITIONS = 3


# Poll with this module's deadline unless a call names its own.
wait_for = partial(poll_until, timeout=DEADLINE_S)


# --- processes ---------------------------------------------------------------------------------


def checker_env(
    kafka: KafkaTarget, topic: str, storage: Path, **extra: str | int | float
) -> dict[str, str]:
    env = {
        **kafka.env(),
        "KAFKA_TOPIC": topic,
        "KAFKA_TASKS_TOPIC": tasks_topic_of(topic),
        "TASK_STORAGE": str(storage),
        "API_HOST": "127.0.0.1",
        "API_PORT": str(free_port()),
        "LOG_LEVEL": "INFO",
        "SHUTDOWN_TIMEOUT": "15",
        # Every target is on 127.0.0.1: the per-host cap would otherwise be the bottleneck.
        "PER_HOST_IN_FLIGHT": "2000",
        "MAX_IN_FLIGHT": "2000",
    }
    env.update({k: str(v) for k, v in extra.items()})
    return env


def processor_env(
    kafka: KafkaTarget, topic: str, dsn: str, group: str | None = None, **extra: str | int | float
) -> dict[str, str]:
    env = {
        **kafka.env(),
        "POSTGRESQL_CONNECTION": dsn,
        "KAFKA_CONSUMER_TOPICS": topic,
        "KAFKA_CONSUMER_GROUP": group or f"g-{uuid.uuid4().hex[:8]}",
        "KAFKA_SESSION_TIMEOUT_MS": "6000",
        "METRICS_PORT": "0",
        "BATCH_MAX_MESSAGES": "500",
        "BATCH_MAX_MS": "200",
        "LOG_LEVEL": "INFO",
    }
    env.update({k: str(v) for k, v in extra.items()})
    return env


# --- tasks and targets -------------------------------------------------------------------------


def spec(url: str, *, interval: float = 1.0, timeout: float = 0.9, **fields: Any) -> TaskSpec:
    return TaskSpec(
        name=fields.pop("name", f"t-{uuid.uuid4().hex}"),
        url=url,
        interval=interval,
        timeout=timeout,
        **fields,
    )


def seed_tasks(storage: Path, specs: Iterable[TaskSpec]) -> list[uuid.UUID]:
    """Write tasks into the checker's SQLite store before it starts; their ids."""
    now = datetime.now(UTC)
    store = SQLiteTaskStore(storage)
    ids = []
    try:
        for one in specs:
            task = Task(id=uuid.uuid4(), spec=one, created_at=now, updated_at=now)
            store.insert(task)
            ids.append(task.id)
    finally:
        store.close()
    return ids


def runs_in_store(storage: Path) -> int:
    """Completed runs over all tasks, as the checker last wrote them."""
    store = SQLiteTaskStore(storage)
    try:
        return sum(task.runs for task in store.load(datetime.now(UTC)))
    finally:
        store.close()


class Target:
    """The test target app (tests/checker/targets.py) served from a thread of its own, so the
    test itself can block; `/flip` answers 200 with the page, or 503 while `failing` is set."""

    def __init__(self) -> None:
        self.failing = False
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def _flip(self, _request: web.Request) -> web.Response:
        if self.failing:
            return web.Response(status=503, text="down for maintenance")
        return web.Response(text="<h1>hello periodic checker</h1>", content_type="text/html")

    async def _start(self) -> None:
        app = make_app()
        app.router.add_get("/flip", self._flip)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    def __enter__(self) -> Target:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(30)
        return self

    def __exit__(self, *_exc: object) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        self._loop.close()


# --- PostgreSQL --------------------------------------------------------------------------------


@contextlib.contextmanager
def fresh_schema(pg_dsn: str) -> Iterator[str]:
    """A DSN whose search_path is a new schema (dropped afterwards); its application_name is the
    schema name, so a test can find and terminate exactly its processors' backends."""
    schema = f"f_{uuid.uuid4().hex[:12]}"
    with psycopg2.connect(pg_dsn) as conn, conn.cursor() as cur:
        cur.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    conn.close()
    sep = "&" if "?" in pg_dsn else "?"
    try:
        yield f"{pg_dsn}{sep}options={quote(f'-csearch_path={schema}')}&application_name={schema}"
    finally:
        with psycopg2.connect(pg_dsn) as conn, conn.cursor() as cur:
            cur.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = %s",
                (schema,),
            )
            cur.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
        conn.close()


@contextlib.contextmanager
def pg_proxy(dsn: str) -> Iterator[tuple[TcpProxy, str]]:
    """A started TCP proxy in front of the DSN's server, and the DSN that goes through it."""
    parts = urlsplit(dsn)
    proxy = TcpProxy((parts.hostname or "127.0.0.1", parts.port or 5432), free_port())
    proxy.start()
    user = f"{parts.username}@" if parts.username else ""
    try:
        yield proxy, parts._replace(netloc=f"{user}127.0.0.1:{proxy.port}").geturl()
    finally:
        proxy.stop()


def query(dsn: str, text: str, *args: Any) -> list[tuple[Any, ...]]:
    conn = psycopg2.connect(dsn)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(text, args)
            return list(cur.fetchall())
    except psycopg2.errors.UndefinedTable:
        return []  # not migrated yet
    finally:
        conn.close()


def stored(dsn: str) -> Counter[str]:
    """Rows in check_results per result_id."""
    rows = query(dsn, "SELECT result_id::text, count(*) FROM check_results GROUP BY 1")
    return Counter({result_id: int(n) for result_id, n in rows})


def terminate_backends(dsn: str) -> int:
    """pg_terminate_backend() on every connection of this DSN's application_name."""
    app = dict(part.split("=", 1) for part in urlsplit(dsn).query.split("&"))["application_name"]
    rows = query(
        dsn,
        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity"
        " WHERE application_name = %s AND pid <> pg_backend_pid()",
        app,
    )
    return int(rows[0][0])


def recovery_seconds(dsn: str, fault_ended: datetime) -> float | None:
    """How long after the fault ended the last result checked before its end was stored."""
    rows = query(
        dsn,
        "SELECT extract(epoch FROM max(ingested_at) - %s) FROM check_results"
        " WHERE checked_at <= %s",
        fault_ended,
        fault_ended,
    )
    return None if not rows or rows[0][0] is None else max(0.0, float(rows[0][0]))


# --- Kafka -------------------------------------------------------------------------------------


def published(kafka: KafkaTarget, topic: str) -> Counter[str]:
    """Every result_id in the topic and how many times it was published."""
    return Counter(str(one.result.result_id) for one in read_topic(kafka, topic))


def read_topic(kafka: KafkaTarget, topic: str, quiet_s: float = 3.0) -> list[Decoded]:
    """Every result message in the topic, decoded, read from the start of every partition
    until each is at its end and nothing more came for `quiet_s`."""
    consumer = Consumer(
        kafka.client_config(
            **{
                "group.id": f"tally-{uuid.uuid4().hex[:8]}",
                "enable.auto.commit": False,
                "enable.partition.eof": True,
            }
        )
    )
    found: list[Decoded] = []
    at_end: set[int] = set()
    last = time.monotonic()
    deadline = last + DEADLINE_S
    try:
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(PARTITIONS)])
        while time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None:
                if len(at_end) == PARTITIONS and time.monotonic() - last > quiet_s:
                    break
                continue
            error = message.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    at_end.add(message.partition() or 0)
                continue
            at_end.discard(message.partition() or 0)
            last = time.monotonic()
            value = message.value()
            if value is None:
                continue
            with contextlib.suppress(ContractError, ValueError):
                found.append(decode(value))
        else:
            raise AssertionError(f"the topic was not read to its end; partitions at end {at_end}")
    finally:
        consumer.close()
    return found


def wait_until_stored(dsn: str, ids: Iterable[str], timeout: float = DEADLINE_S) -> None:
    wanted = set(ids)
    wait_for(
        lambda: wanted <= set(stored(dsn)), f"{len(wanted)} results in PostgreSQL", timeout=timeout
    )


# --- the tally ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tally:
    """What a scenario ends with: results published (distinct result_ids in the topic),
    messages in the topic, rows stored, duplicate rows, published-but-not-stored, rows that
    were never published (must be none), and results left unpublished in the checker's
    outbox after it stopped."""

    produced: int
    messages: int
    rows: int
    duplicates: int
    lost: int
    unknown: int
    outbox_left: int = 0

    @classmethod
    def of(cls, topic_ids: Counter[str], rows: Counter[str]) -> Tally:
        return cls(
            produced=len(topic_ids),
            messages=sum(topic_ids.values()),
            rows=sum(rows.values()),
            duplicates=sum(n - 1 for n in rows.values()),
            lost=len(set(topic_ids) - set(rows)),
            unknown=len(set(rows) - set(topic_ids)),
        )

    def report(self, scenario: str, **figures: Any) -> str:
        """One line for the log and for RELIABILITY.md (pytest shows it with -s or -rA)."""
        extra = " ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in figures.items())  # fmt: skip
        line = (
            f"FAULTS {scenario}: produced={self.produced} messages={self.messages}"
            f" rows={self.rows} duplicates={self.duplicates} lost={self.lost}"
            f" unknown={self.unknown} outbox_left={self.outbox_left} {extra}"
        ).rstrip()
        emit(line)
        return line


def emit(line: str) -> None:
    """Print a scenario's figures; also append them to $FAULTS_REPORT when it is set."""
    print(line)
    report = os.environ.get("FAULTS_REPORT")
    if report:
        with open(report, "a") as out:
            out.write(line + "\n")


def settle_and_tally(kafka: KafkaTarget, topic: str, dsn: str) -> Tally:
    """After the checker stopped: read the topic, wait until PostgreSQL holds every result in
    it, and tally."""
    topic_ids = published(kafka, topic)
    # A loss shows in the tally (lost > 0) rather than as a time-out here.
    with contextlib.suppress(AssertionError):
        wait_until_stored(dsn, topic_ids)
    return Tally.of(topic_ids, stored(dsn))


# --- a whole pipeline --------------------------------------------------------------------------


@dataclass(frozen=True)
class Recovery:
    """How a pipeline came back after a fault: the tally, seconds until the checker's outbox
    drained, and `recovery_seconds` (-1 when no result from before the fault was stored)."""

    tally: Tally
    outbox_drained_s: float
    recovery_s: float


class Pipeline:
    """Target, checker and processor(s) of one scenario; `finish()` stops the checker with
    SIGTERM, waits for PostgreSQL to catch up, stops the processors and tallies."""

    def __init__(
        self, kafka: KafkaTarget, topic: str, dsn: str, tmp_path: Path, target: Target
    ) -> None:
        self.kafka = kafka
        self.topic = topic
        self.dsn = dsn
        self.tmp_path = tmp_path
        self.target = target
        self.storage = tmp_path / "tasks.sqlite3"
        self.group = f"g-{uuid.uuid4().hex[:8]}"
        self.checkers: list[Daemon] = []
        self.processors: list[Daemon] = []
        self.checker_extra: dict[str, str | int | float] = {}

    def seed(self, n: int, path: str = "/ok", **fields: Any) -> list[uuid.UUID]:
        return seed_tasks(self.storage, [spec(self.target.url(path), **fields) for _ in range(n)])

    def start_checker(self, **extra: str | int | float) -> Daemon:
        self.checker_extra = {**self.checker_extra, **extra}
        env = checker_env(self.kafka, self.topic, self.storage, **self.checker_extra)
        log = self.tmp_path / f"checker-{len(self.checkers)}.log"
        self.checkers.append(Daemon.checker(env, log))
        return self.checkers[-1]

    def start_processor(
        self, dsn: str | None = None, *, assigned: bool = True, **extra: str | int | float
    ) -> Daemon:
        env = processor_env(self.kafka, self.topic, dsn or self.dsn, self.group, **extra)
        log = self.tmp_path / f"processor-{len(self.processors)}.log"
        self.processors.append(Daemon.processor(env, log, assigned=assigned))
        return self.processors[-1]

    @property
    def checker(self) -> Daemon:
        return self.checkers[-1]

    @property
    def processor(self) -> Daemon:
        return self.processors[-1]

    def status(self) -> dict[str, Any] | None:
        """The running checker's GET /status, None when it does not answer."""
        port = self.checker.env["API_PORT"]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=5) as page:
                return dict(json.load(page))
        except (OSError, ValueError):
            return None

    def outbox_size(self) -> int | None:
        """Rows in the running checker's outbox, None when it does not answer."""
        status = self.status()
        return None if status is None else int(status["outbox_size"])

    def wait_outbox_empty(self, timeout: float = DEADLINE_S) -> float:
        """Seconds until the checker's outbox is empty (its backlog delivered)."""
        started = time.monotonic()
        wait_for(lambda: self.outbox_size() == 0, "the checker's outbox to drain", timeout=timeout)
        return time.monotonic() - started

    def outbox_left(self) -> int:
        """Rows in the outbox table of the (stopped) checker's SQLite file."""
        db = sqlite3.connect(self.storage)
        try:
            return int(db.execute("SELECT count(*) FROM outbox").fetchone()[0])
        finally:
            db.close()

    def rows(self) -> int:
        found = query(self.dsn, "SELECT count(*) FROM check_results")
        return int(found[0][0]) if found else 0

    def wait_for_rows(self, more_than: int, what: str = "rows") -> int:
        return int(wait_for(lambda: (n := self.rows()) > more_than and n, what))

    def recover(self, fault_ended: datetime, more_rows: int, what: str) -> Recovery:
        """After a fault: the checker's outbox drains and `more_rows` new results are stored
        (recovered by itself, checks going on), then `finish()`."""
        drained = self.wait_outbox_empty(DRAIN_DEADLINE_S)
        self.wait_for_rows(self.rows() + more_rows, what)
        tally = self.finish()
        recovery = recovery_seconds(self.dsn, fault_ended)
        return Recovery(tally, drained, recovery if recovery is not None else -1.0)

    def finish(self, stop_timeout: float = 60) -> Tally:
        """Wait for the checker's outbox to drain, stop it (exit 0), wait for PostgreSQL to
        hold everything published, stop the processors (exit 0); the tally, incl. outbox rows
        left behind (results the checker made but did not publish)."""
        if self.checker.alive():
            try:
                self.wait_outbox_empty(DRAIN_DEADLINE_S)
            except AssertionError:
                raise AssertionError(
                    f"the outbox did not drain in {DRAIN_DEADLINE_S:.0f} s:"
                    f" {self.outbox_size()} rows left"
                ) from None
            code = self.checker.terminate(stop_timeout)
            assert code == 0, f"checker exited {code}:\n{self.checker.tail()}"
        tally = settle_and_tally(self.kafka, self.topic, self.dsn)
        tally = dataclasses.replace(tally, outbox_left=self.outbox_left())
        for processor in self.processors:
            if processor.alive():
                code = processor.terminate(stop_timeout)
                assert code == 0, f"processor exited {code}:\n{processor.tail()}"
        return tally

    def close(self) -> None:
        for daemon in [*self.checkers, *self.processors]:
            daemon.kill()


@contextlib.contextmanager
def pipeline(kafka: KafkaTarget, topic: str, pg_dsn: str, tmp_path: Path) -> Iterator[Pipeline]:
    with Target() as target, fresh_schema(pg_dsn) as dsn:
        line = Pipeline(kafka, topic, dsn, tmp_path, target)
        try:
            yield line
        finally:
            line.close()


def now_utc() -> datetime:
    return datetime.now(UTC)


class SilentServer:
    """Accepts TCP connections and never sends a byte: an HTTP response or a TLS handshake
    that never comes. Connections are held until `close()`."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
        self.port: int = self._listener.getsockname()[1]
        self._held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self._held.append(conn)

    def __enter__(self) -> SilentServer:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._thread.join(10)
        for conn in self._held:
            conn.close()


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]
