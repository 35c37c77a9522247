"""The processor as a process: real broker over mutual TLS, real PostgreSQL, signals."""

from __future__ import annotations

import re
import signal
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import psycopg2
import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from processing import crash_after_batch
from processing.processing_helpers import WIDE_WINDOW, TcpProxy, make_result, rows

from checker_common import task_record
from checker_common.contract import encode
from checker_common.task_record import TaskRecord
from checker_common.task_spec import TaskSpec, TaskStatus
from checker_processing import db
from checker_processing.consumer import Processor
from checker_processing.daemon import consumer_config
from checker_processing.settings import ProcessorSettings
from checker_processing.writer import Writer
from devstack import create_topics, free_port

from daemons import PROCESSOR, Daemon
from helpers import run_cli
from helpers import wait_for as poll_until

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]

CRASH_AFTER_BATCH = Path(crash_after_batch.__file__)
DEADLINE_S = 90.0


# Poll with this module's deadline unless a call names its own.
wait_for = partial(poll_until, timeout=DEADLINE_S)


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Factory: a processor as a process with `env` and the settings given as keywords
    (`program` and `args`: a test entry script instead); every one is killed at the end."""
    started: list[Daemon] = []

    def start(
        env: dict[str, str],
        program: str | Path = PROCESSOR,
        args: tuple[str, ...] = (),
        **extra: str,
    ) -> Daemon:
        log = tmp_path / f"processor-{len(started)}.log"
        started.append(Daemon(program, {**env, **extra}, log, args=args))
        return started[-1]

    yield start
    for daemon in started:
        daemon.kill()


@pytest.fixture
def env(kafka: Any, schema_dsn: str, topic: str) -> dict[str, str]:
    return {
        **kafka.env(),
        "POSTGRESQL_CONNECTION": schema_dsn,
        "KAFKA_CONSUMER_TOPICS": topic,
        "KAFKA_CONSUMER_GROUP": f"g-{uuid.uuid4().hex[:8]}",
        "KAFKA_SESSION_TIMEOUT_MS": "6000",
        "METRICS_PORT": "0",
        "BATCH_MAX_MESSAGES": "500",
        "BATCH_MAX_MS": "200",
        "MAX_MESSAGE_BYTES": "2048",
    }


@pytest.fixture
def observer(schema_dsn: str) -> Iterator[Any]:
    """A connection for assertions, named so it is not taken for the processor's."""
    conn = psycopg2.connect(schema_dsn, application_name="test-observer")
    conn.autocommit = True
    yield conn
    conn.close()


def count(conn: Any, query: str = "SELECT count(*) FROM check_results") -> int:
    try:
        with conn.cursor() as cur:
            cur.execute(query)
            return int(cur.fetchone()[0])
    except psycopg2.errors.UndefinedTable:
        return 0  # not migrated yet


# Offset after the last message produced to each partition, from the delivery reports
# (this broker's ListOffsets high watermark is not reliable), per topic.
PRODUCED: dict[str, dict[int, int]] = {}


def produce(
    kafka: Any, topic: str, messages: list[tuple[bytes | None, bytes]], compression: str = "none"
) -> None:
    producer = Producer(
        kafka.client_config(
            **{"enable.idempotence": True, "linger.ms": 5, "compression.type": compression}
        )
    )
    ends = PRODUCED.setdefault(topic, {})

    def delivered(err: Any, msg: Any) -> None:
        assert err is None, err
        ends[msg.partition()] = max(ends.get(msg.partition(), 0), msg.offset() + 1)

    for key, value in messages:
        while True:
            try:
                producer.produce(topic, key=key, value=value, on_delivery=delivered)
                break
            except BufferError:
                producer.poll(0.1)
    assert producer.flush(60) == 0


def results(
    n: int, tasks: int = 12
) -> tuple[list[tuple[bytes | None, bytes]], dict[str, tuple[str, float, int | None]]]:
    """n encoded results over some tasks, and result_id -> (task_id, load_time, status)."""
    task_ids = [uuid.uuid4() for _ in range(tasks)]
    messages: list[tuple[bytes | None, bytes]] = []
    expected = {}
    for i in range(n):
        task = task_ids[i % tasks]
        result = make_result(load_time=i / 1000, status=200 + i % 300)
        expected[str(result.result_id)] = (str(task), result.load_time, result.status)
        messages.append(encode(task, result))
    return messages, expected


def committed(kafka: Any, env: dict[str, str], topic: str) -> dict[int, int]:
    consumer = Consumer(kafka.client_config(**{"group.id": env["KAFKA_CONSUMER_GROUP"]}))
    try:
        found = consumer.committed([TopicPartition(topic, p) for p in range(3)], timeout=30)
        return {tp.partition: tp.offset for tp in found}
    finally:
        consumer.close()


def high_watermarks(kafka: Any, topic: str) -> dict[int, int]:
    """Where a consumer that read everything produced has committed, per partition."""
    return {p: PRODUCED[topic].get(p, -1001) for p in range(3)}


def test_results_and_poison_are_stored_and_sigterm_commits(
    kafka: Any, topic: str, env: dict[str, str], observer: Any, daemons: Any
) -> None:
    messages, expected = results(300)
    poison: list[tuple[bytes | None, bytes]] = [
        (b"k1", b"{not json"),
        (b"k2", orjson.dumps({str(uuid.uuid4()): {"schema_version": 1, "ok": True}})),
        (b"k3", b"x" * 4096),
    ]
    produce(kafka, topic, messages[:100] + poison[:2] + messages[100:200])
    produce(kafka, topic, [poison[2], *messages[200:]])
    metrics_port = free_port()
    daemon = daemons(env, METRICS_PORT=str(metrics_port))
    wait_for(lambda: count(observer) == 300, "300 rows")
    wait_for(lambda: count(observer, "SELECT count(*) FROM rejected_messages") == 3, "3 rejected")
    assert daemon.alive(), "the consumer must keep running after poison messages"
    with observer.cursor() as cur:
        cur.execute(
            "SELECT result_id::text, task_id::text, load_time, status_code FROM check_results"
        )
        assert {r[0]: r[1:] for r in cur.fetchall()} == expected
        cur.execute("SELECT message_key, error FROM rejected_messages ORDER BY message_key")
        rejected = [(bytes(k), e.split(":")[0]) for k, e in cur.fetchall()]
    assert rejected == [
        (b"k1", "not valid JSON"),
        (b"k2", "result_id"),
        (b"k3", "message too large"),
    ]

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as page:
        metrics = page.read().decode()
    assert 'checker_processing_messages_total{outcome="stored"} 300.0' in metrics
    assert 'checker_processing_messages_total{outcome="rejected"} 3.0' in metrics
    assert "checker_processing_result_doubles_total 0.0" in metrics  # one node, no doubles

    assert daemon.terminate() == 0
    assert daemon.stored() == 300
    assert committed(kafka, env, topic) == high_watermarks(kafka, topic)

    # Redelivery: a new group reads everything again; nothing is stored twice.
    again = daemons({**env, "KAFKA_CONSUMER_GROUP": f"g-{uuid.uuid4().hex[:8]}"})
    wait_for(
        lambda: (
            committed(kafka, {**env, "KAFKA_CONSUMER_GROUP": again_group(again)}, topic)
            == high_watermarks(kafka, topic)
        ),
        "the second group to commit everything",
    )
    assert again.terminate() == 0
    assert again.stored() == 0
    assert count(observer) == 300
    assert count(observer, "SELECT count(DISTINCT result_id) FROM check_results") == 300
    assert count(observer, "SELECT count(*) FROM rejected_messages") == 3


def again_group(daemon: Daemon) -> str:
    match = re.search(r"as group (\S+)", daemon.text())
    return match[1] if match else "?"


def test_terminated_database_connections_lose_and_duplicate_nothing(
    kafka: Any, topic: str, env: dict[str, str], observer: Any, daemons: Any, schema_dsn: str
) -> None:
    messages, _ = results(10_000)
    produce(kafka, topic, messages)
    daemon = daemons(env, BATCH_MAX_MESSAGES="200")
    app = re.search(r"application_name=([^&]+)", schema_dsn)
    assert app
    kills_midway = 0
    last = -1
    while (stored := count(observer)) < 10_000:
        assert daemon.alive(), daemon.text()[-2000:]
        # A few terminations spread over the run; each costs a backoff and a reconnect.
        if stored != last and kills_midway < 4:
            with observer.cursor() as cur:
                cur.execute(
                    "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid))"
                    " FROM pg_stat_activity WHERE application_name = %s",
                    (app[1],),
                )
                killed = cur.fetchone()[0]
            if killed and 0 < stored < 10_000:
                kills_midway += 1
            last = stored
        time.sleep(0.2)
    assert kills_midway >= 1
    assert "database unavailable" in daemon.text()
    assert daemon.terminate() == 0
    assert count(observer) == 10_000
    assert count(observer, "SELECT count(DISTINCT result_id) FROM check_results") == 10_000
    assert count(observer, "SELECT count(*) FROM rejected_messages") == 0
    assert committed(kafka, env, topic) == high_watermarks(kafka, topic)


def test_crash_between_database_and_offset_commit_is_exact_after_restart(
    kafka: Any, topic: str, env: dict[str, str], observer: Any, daemons: Any
) -> None:
    messages, _ = results(1_000)
    produce(kafka, topic, messages)
    # A short session: the restart waits for the crashed member's session to expire.
    env = {**env, "KAFKA_SESSION_TIMEOUT_MS": "3000"}
    crashing = daemons(env, CRASH_AFTER_BATCH, ("3",), BATCH_MAX_MESSAGES="100")
    assert crashing.proc.wait(timeout=DEADLINE_S) == -signal.SIGKILL, crashing.tail()
    assert f"{crash_after_batch.SAYS} 3" in crashing.text()
    stored_before = count(observer)
    assert 0 < stored_before < 1_000
    # The rows of batch 3 are in PostgreSQL and its offsets are not committed; every offset
    # that is committed is of a stored row.
    offsets = {p: max(end, 0) for p, end in committed(kafka, env, topic).items()}
    assert sum(offsets.values()) < stored_before, "offsets committed before their rows"
    stored_per_partition = dict(
        rows(observer, "SELECT kafka_partition, count(*) FROM check_results GROUP BY 1")
    )
    for partition, end in offsets.items():
        assert end <= stored_per_partition.get(partition, 0)

    restarted = daemons(env, BATCH_MAX_MESSAGES="100")
    wait_for(lambda: count(observer) == 1_000, "1000 rows after the restart")
    wait_for(
        lambda: committed(kafka, env, topic) == high_watermarks(kafka, topic),
        "offsets committed",
    )
    assert restarted.terminate() == 0
    # Batch 3 was read again (its offsets were never committed) and found already stored.
    assert re.search(r"\d+ stored, [1-9]\d* duplicates", restarted.text())
    assert count(observer) == 1_000
    assert count(observer, "SELECT count(DISTINCT result_id) FROM check_results") == 1_000


def test_two_processors_split_the_partitions(
    kafka: Any, topic: str, env: dict[str, str], observer: Any, daemons: Any
) -> None:
    first_half, _ = results(1_500, tasks=30)
    second_half, _ = results(1_500, tasks=30)
    first = daemons(env, BATCH_MAX_MESSAGES="100")
    produce(kafka, topic, first_half)
    wait_for(lambda: count(observer) > 0, "the first processor to store rows")
    # The second one joins mid-stream: the first commits on revoke, the second starts there.
    second = daemons(env, BATCH_MAX_MESSAGES="100")

    def split() -> bool:
        a, b = first.assigned(), second.assigned()
        return bool(a and b and not a & b and a | b == {0, 1, 2})

    wait_for(split, "both processors to own partitions")
    assert ": revoked " in first.text()
    produce(kafka, topic, second_half)
    wait_for(lambda: count(observer) == 3_000, "3000 rows")
    wait_for(lambda: committed(kafka, env, topic) == high_watermarks(kafka, topic), "commit")
    assert first.terminate() == 0
    assert second.terminate() == 0
    assert first.stored() > 0
    assert second.stored() > 0
    assert first.stored() + second.stored() == 3_000
    assert count(observer, "SELECT count(DISTINCT result_id) FROM check_results") == 3_000


def test_database_outage_keeps_the_batch_and_the_group(
    kafka: Any, topic: str, env: dict[str, str], observer: Any, daemons: Any, pg_dsn: str
) -> None:
    parts = urlsplit(env["POSTGRESQL_CONNECTION"])
    proxy = TcpProxy((parts.hostname or "127.0.0.1", parts.port or 5432), free_port())
    try:
        via_proxy = parts._replace(netloc=f"{parts.username}@127.0.0.1:{proxy.port}").geturl()
        # Started before its database: it waits for it instead of exiting.
        daemon = daemons({**env, "POSTGRESQL_CONNECTION": via_proxy})
        wait_for(lambda: "unavailable at start (attempt 2," in daemon.text(), "a retried start")
        proxy.start()
        first, _ = results(200)
        produce(kafka, topic, first)
        wait_for(lambda: count(observer) == 200, "the first 200 rows")
        wait_for(lambda: committed(kafka, env, topic) == high_watermarks(kafka, topic), "commit")
        before = dict(PRODUCED[topic])

        proxy.stop()
        second, _ = results(300)
        produce(kafka, topic, second)
        # Backoff grows (0.25, 0.5, 1, 2 s ...) past the 6 s session time-out in total.
        wait_for(lambda: "database unavailable (attempt 5," in daemon.text(), "5 failed tries")
        assert count(observer) == 200
        assert committed(kafka, env, topic) == before, "no offset may move while rows are not in"
        proxy.start()

        wait_for(lambda: count(observer) == 500, "all 500 rows after the outage")
        wait_for(lambda: committed(kafka, env, topic) == high_watermarks(kafka, topic), "commit")
        assert daemon.alive()
        # It stayed in its group the whole time: assigned once, never revoked before SIGTERM.
        assert daemon.text().count(": assigned ") == 1
        assert ": revoked " not in daemon.text()
        assert daemon.terminate() == 0
        assert daemon.stored() == 500
    finally:
        proxy.stop()


def test_sigterm_mid_stream_commits_exactly_what_is_stored(
    kafka: Any, topic: str, env: dict[str, str], observer: Any, daemons: Any
) -> None:
    messages, _ = results(5_000)
    produce(kafka, topic, messages)
    daemon = daemons(env, BATCH_MAX_MESSAGES="20")
    wait_for(lambda: count(observer) > 0, "the first rows")
    assert daemon.terminate() == 0
    assert "signal SIGTERM" in daemon.text()
    with observer.cursor() as cur:
        cur.execute(
            "SELECT kafka_partition, count(*), max(kafka_offset) + 1 FROM check_results"
            " GROUP BY 1 ORDER BY 1"
        )
        stored = {p: (n, end) for p, n, end in cur.fetchall()}
    offsets = committed(kafka, env, topic)
    for partition, (n, end) in stored.items():
        # Every stored row's offset is committed, and nothing past the stored rows is.
        assert offsets[partition] == end == n
    assert sum(n for n, _ in stored.values()) < 5_000, "stopped before reading everything"


def backlog(n: int, tasks: int = 1_000) -> list[tuple[bytes | None, bytes]]:
    """n results that compress as a real backlog of similar checks does (zstd: about 50
    times), made from one encoded result with the ids swapped."""
    task_ids = [uuid.uuid4() for _ in range(tasks)]
    template = make_result(result_id=uuid.UUID(int=0))
    _, value = encode(task_ids[0], template)
    text = value.decode()
    prefix = uuid.uuid4().hex[:8]
    messages: list[tuple[bytes | None, bytes]] = []
    for i in range(n):
        task = str(task_ids[i % tasks])
        result = f"{prefix}-0000-4000-8000-{i:012x}"
        body = text.replace(str(task_ids[0]), task).replace(str(uuid.UUID(int=0)), result)
        messages.append((task.encode(), body.encode()))
    return messages


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_draining_a_backlog_with_the_defaults_stays_under_256_mib(
    kafka: Any, topic: str, env: dict[str, str], observer: Any, daemons: Any
) -> None:
    """What librdkafka fetches of a backlog is decompressed in its queue, and the batch in
    hand and the one prepared beside it are in Python: the defaults keep both bounded
    (without bounds, 300,000 such results took 450 MiB)."""
    produce(kafka, topic, backlog(200_000), compression="zstd")
    defaults = {k: v for k, v in env.items() if not k.startswith(("BATCH_", "MAX_MESSAGE"))}
    daemon = daemons(defaults)
    wait_for(lambda: count(observer) == 200_000, "200,000 rows")
    peak = peak_rss_mib(daemon.proc.pid)
    assert daemon.terminate() == 0
    assert peak < 256, f"peak RSS {peak:.0f} MiB"


class CannotSeek(Consumer):
    """A real consumer whose seek() fails the way librdkafka's does for a partition it is
    not fetching ("Local: Erroneous state"), and that records, for each consume() of the
    processor, its assignment (read by the test's thread)."""

    calls: list[frozenset[int]]

    def seek(self, partition: TopicPartition) -> None:
        raise KafkaException(KafkaError(KafkaError._STATE, "test: seek refused"))

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[Any]:
        messages = super().consume(num_messages=num_messages, timeout=timeout)
        self.calls.append(frozenset(tp.partition for tp in self.assignment()))
        return messages


@pytest.mark.parametrize("other_joins", ["before the outage", "during the outage"])
def test_a_rebalance_during_a_database_outage_loses_and_stalls_nothing(
    kafka: Any, topic: str, env: dict[str, str], observer: Any, migrated: Any, other_joins: str
) -> None:
    """Another member leaves while the processor holds a batch through a database outage,
    and every partition is assigned to it again. librdkafka keeps a partition paused through
    that: those it had paused stayed paused for good when the resume after the outage came
    between the revocation and the new assignment (other member joining during the outage).
    A partition new to it came unpaused (other member there before the outage): its records
    arrived in the middle of the outage and were sought back, lost when the seek failed (the
    position stayed past them). Now partitions assigned during an outage are paused, and
    nothing depends on seek: this consumer's always fails."""
    settings = ProcessorSettings.model_validate({k.lower(): v for k, v in env.items()})
    first, _ = results(1_500)
    produce(kafka, topic, first)
    parts = urlsplit(env["POSTGRESQL_CONNECTION"])
    proxy = TcpProxy((parts.hostname or "127.0.0.1", parts.port or 5432), free_port())
    proxy.start()
    via_proxy = parts._replace(netloc=f"{parts.username}@127.0.0.1:{proxy.port}").geturl()
    consumer = CannotSeek(consumer_config(settings))
    consumer.calls = []
    stop = threading.Event()
    processor = Processor(
        consumer,
        Writer(partial(db.connect, via_proxy), 2048, window=WIDE_WINDOW),
        topics=[topic],
        batch_max_messages=100,
        batch_max_ms=200,
        stop=stop,
    )
    thread = threading.Thread(target=processor.run)
    thread.start()
    other = Consumer(
        kafka.client_config(
            **{
                "group.id": env["KAFKA_CONSUMER_GROUP"],
                "enable.auto.commit": False,
                "session.timeout.ms": 6000,
                "heartbeat.interval.ms": 1000,
            }
        )
    )

    def join_other() -> None:
        """The other member takes some partitions (it reads them, never commits)."""
        other.subscribe([topic])

        def split() -> bool:
            other.poll(0.2)
            mine = consumer.calls[-1] if consumer.calls else frozenset()
            return bool(mine) and bool(other.assignment()) and len(mine) < 3

        wait_for(split, "the partitions split between the two members")

    try:
        wait_for(lambda: thread.is_alive() and count(observer) == 1_500, "the first 1500 rows")
        if other_joins == "before the outage":
            join_other()
        proxy.stop()
        second, _ = results(600)
        produce(kafka, topic, second)
        if other_joins == "during the outage":
            # Early, while the backoff's waits are short: the revocation comes in one wait,
            # the new assignment after it.
            wait_for(lambda: processor.stats.db_retries >= 2, "the processor holding its batch")
            join_other()
        else:
            # Long enough that the backoff's waits span the rebalance below.
            wait_for(lambda: processor.stats.db_retries >= 5, "the processor holding its batch")
        other.close()
        since = len(consumer.calls)
        wait_for(
            lambda: {0, 1, 2} in consumer.calls[since:], "every partition assigned to it again"
        )
        retries = processor.stats.db_retries
        wait_for(lambda: processor.stats.db_retries > retries, "one more try in the outage")
        proxy.start()
        wait_for(
            lambda: committed(kafka, env, topic) == high_watermarks(kafka, topic),
            "every offset committed",
            timeout=60,
        )
        assert count(observer) == 2_100
        assert count(observer, "SELECT count(DISTINCT result_id) FROM check_results") == 2_100
    finally:
        stop.set()
        thread.join(timeout=60)
        proxy.stop()


def test_a_task_deleted_on_the_task_topic_closes_its_incident(
    kafka: Any, topic: str, env: dict[str, str], observer: Any, migrated: Any, daemons: Any
) -> None:
    """The proof of #16 on the processor's side: `checker-processing run` follows
    KAFKA_TASKS_TOPIC beside its results; a pause shows in the report, a tombstone closes the
    task's open incident with the reason task_removed."""
    tasks = f"{topic}-tasks"
    create_topics(kafka.client_config(), [tasks], partitions=3)
    task = uuid.uuid4()
    spec = TaskSpec(name="shop", url="https://shop.test/", interval=30.0, timeout=5.0)

    def record(status: TaskStatus) -> tuple[bytes | None, bytes]:
        return task_record.encode(TaskRecord(id=task, spec=spec, status=status))

    down = make_result(ok=False, health="down", error={"kind": "status", "message": "503"})
    produce(kafka, tasks, [record(TaskStatus.ACTIVE)])
    produce(kafka, topic, [encode(task, down)])
    daemon = daemons(env, KAFKA_TASKS_TOPIC=tasks)

    def incident() -> list[tuple[Any, ...]]:
        return rows(
            observer, "SELECT ended_at, end_reason FROM incidents WHERE task_id = %s", str(task)
        )

    wait_for(lambda: incident() == [(None, None)], "the incident opened")
    produce(kafka, tasks, [record(TaskStatus.PAUSED)])
    db_env = {"POSTGRESQL_CONNECTION": env["POSTGRESQL_CONNECTION"]}

    def reported_status() -> Any:
        done = run_cli("checker_processing.cli", "report", "--format", "json", env=db_env)
        assert done.returncode == 0, done.stderr
        return [(r["name"], r["status"]) for r in orjson.loads(done.stdout)]

    wait_for(lambda: reported_status() == [("shop", "paused")], "the report saying paused")

    producer = Producer(kafka.client_config())
    producer.produce(tasks, key=task_record.tombstone_key(task), value=None)
    assert producer.flush(30) == 0
    wait_for(lambda: incident()[0][1] == "task_removed", "the incident closed by the removal")
    assert count(observer, "SELECT count(*) FROM latest_results") == 0
    assert reported_status() == [("shop", "removed")]
    assert daemon.terminate() == 0
