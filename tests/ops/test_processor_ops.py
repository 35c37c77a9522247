"""The processor in production: systemd notify protocol, /metrics with real traffic, clean logs.

Each test runs `python -m checker_processing.cli run` (`daemons.Daemon`) against the real broker
(mutual TLS) and a real PostgreSQL reached through a TCP proxy the test can cut, so an outage is
real too.
"""

from __future__ import annotations

import re
import socket
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import orjson
import psycopg2
import pytest
from confluent_kafka import Producer
from processing.processing_helpers import TcpProxy, make_result
from psycopg2 import sql

from checker_common.contract import encode
from checker_processing.daemon import consumer_config
from checker_processing.metrics import partition_lags
from checker_processing.settings import ProcessorSettings
from devstack import free_port

from daemons import PROCESSOR, Daemon
from helpers import run_cli
from helpers import wait_for as poll_until

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]

DEADLINE_S = 60.0
WATCHDOG_USEC = "2000000"


# Poll with this module's deadline unless a call names its own.
wait_for = partial(poll_until, timeout=DEADLINE_S)


class NotifySocket:
    """What systemd would listen on: an AF_UNIX datagram socket; keeps every datagram."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.received: list[str] = []

    def states(self) -> list[str]:
        """Every NAME=value line received so far, in order."""
        while True:
            try:
                self.received.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                break
        return [line for datagram in self.received for line in datagram.split("\n")]

    def count(self, state: str) -> int:
        return self.states().count(state)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def started(tmp_path: Path) -> Iterator[Callable[[dict[str, str]], Daemon]]:
    daemons: list[Daemon] = []

    def start(env: dict[str, str]) -> Daemon:
        directory = tmp_path / f"processor-{len(daemons)}"
        directory.mkdir()
        out, err = directory / "processor.out", directory / "processor.err"
        daemons.append(Daemon(PROCESSOR, env, out, stderr=err))
        return daemons[-1]

    yield start
    for daemon in daemons:
        daemon.kill()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    # AF_UNIX paths are short (108 bytes): pytest's tmp_path can be too long.
    path = Path("/tmp") / f"pc-notify-{uuid.uuid4().hex[:12]}.sock"
    listener = NotifySocket(path)
    yield listener
    listener.close()
    path.unlink(missing_ok=True)


@pytest.fixture
def pg_proxy(pg_dsn: str) -> Iterator[TcpProxy]:
    """A TCP proxy in front of PostgreSQL (not started): stop() is an outage for the daemon."""
    parts = urlsplit(pg_dsn)
    proxy = TcpProxy((parts.hostname or "127.0.0.1", parts.port or 5432), free_port())
    yield proxy
    proxy.stop()


@pytest.fixture
def schema(pg_dsn: str) -> Iterator[str]:
    """A fresh schema (its name doubles as the daemon's application_name), dropped after."""
    name = f"ops_{uuid.uuid4().hex[:12]}"
    admin(pg_dsn, sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
    yield name
    admin(
        pg_dsn,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
        (name,),
    )
    admin(pg_dsn, sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


def admin(dsn: str, statement: Any, args: tuple[Any, ...] = ()) -> None:
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(statement, args)
    finally:
        conn.close()


def daemon_dsn(pg_dsn: str, proxy: TcpProxy, schema: str, user: str | None = None) -> str:
    """The database of the session, through the proxy, in `schema`."""
    parts = urlsplit(pg_dsn)
    netloc = f"{user or parts.username}@127.0.0.1:{proxy.port}"
    query = f"options={quote(f'-csearch_path={schema}')}&application_name={schema}"
    return parts._replace(netloc=netloc, query=query).geturl()


def base_env(kafka: Any, topic: str, dsn: str) -> dict[str, str]:
    return {
        **kafka.env(),
        "POSTGRESQL_CONNECTION": dsn,
        "KAFKA_CONSUMER_TOPICS": topic,
        "KAFKA_CONSUMER_GROUP": f"g-{uuid.uuid4().hex[:8]}",
        "KAFKA_SESSION_TIMEOUT_MS": "6000",
        "METRICS_PORT": "0",
        "BATCH_MAX_MESSAGES": "500",
        "BATCH_MAX_MS": "200",
        "MAX_MESSAGE_BYTES": "2048",
    }


def produce(kafka: Any, topic: str, messages: list[tuple[bytes | None, bytes]]) -> list[Any]:
    """Produce and wait for delivery; returns the delivered messages (with their offsets)."""
    producer = Producer(kafka.client_config(**{"enable.idempotence": True, "linger.ms": 5}))
    delivered: list[Any] = []

    def report(err: Any, msg: Any) -> None:
        assert err is None, err
        delivered.append(msg)

    for key, value in messages:
        producer.produce(topic, key=key, value=value, on_delivery=report)
    assert producer.flush(30) == 0
    return delivered


def good(n: int) -> list[tuple[bytes | None, bytes]]:
    task = uuid.uuid4()
    return [encode(task, make_result()) for _ in range(n)]


POISON: tuple[bytes | None, bytes] = (b"poison", b"{not json")


def scrape(port: int) -> dict[str, float]:
    """/metrics as {'name{labels}': value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
        text = page.read().decode()
    found = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            found[name] = float(value)
    return found


def lags(metrics: dict[str, float], topic: str) -> dict[int, float]:
    pattern = re.compile(
        r'checker_processing_consumer_lag\{partition="(\d+)",topic="' + re.escape(topic) + '"}'
    )
    return {int(m[1]): v for k, v in metrics.items() if (m := pattern.fullmatch(k))}


STORED = 'checker_processing_messages_total{outcome="stored"}'
REJECTED = 'checker_processing_messages_total{outcome="rejected"}'
CONSUMED = "checker_processing_consumed_messages_total"
BATCHES = "checker_processing_batch_seconds_count"
DB_WRITE_ERRORS = 'checker_processing_db_errors_total{stage="write"}'
DB_RETRIES = "checker_processing_db_retries_total"


# -- systemd --------------------------------------------------------------------------------


def test_notify_ready_only_with_the_database_watchdog_all_along_stopping_on_sigterm(
    kafka: Any,
    topic: str,
    pg_dsn: str,
    pg_proxy: TcpProxy,
    schema: str,
    notify: NotifySocket,
    started: Callable[[dict[str, str]], Daemon],
) -> None:
    env = base_env(kafka, topic, daemon_dsn(pg_dsn, pg_proxy, schema))
    # The database is not there yet (proxy not started): alive, but not ready.
    daemon = started({**env, "NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": WATCHDOG_USEC})
    wait_for(lambda: daemon.running() and notify.count("WATCHDOG=1") >= 2, "2 pings while waiting")
    assert "unavailable at start" in daemon.text()
    assert "READY=1" not in notify.states()

    pg_proxy.start()
    wait_for(lambda: daemon.running() and "READY=1" in notify.states(), "READY=1")
    states = notify.states()
    assert any(s.startswith("STATUS=consuming") for s in states[states.index("READY=1") :])
    pings_at_ready = notify.count("WATCHDOG=1")
    wait_for(lambda: notify.count("WATCHDOG=1") >= pings_at_ready + 2, "2 pings after READY=1")
    assert "STOPPING=1" not in notify.states()

    assert daemon.terminate() == 0
    assert "STOPPING=1" in notify.states()
    assert notify.states().index("STOPPING=1") > notify.states().index("READY=1")


# -- metrics --------------------------------------------------------------------------------


def test_metrics_follow_traffic_poison_and_a_database_outage(
    kafka: Any,
    topic: str,
    pg_dsn: str,
    pg_proxy: TcpProxy,
    schema: str,
    notify: NotifySocket,
    started: Callable[[dict[str, str]], Daemon],
) -> None:
    pg_proxy.start()
    port = free_port()
    env = base_env(kafka, topic, daemon_dsn(pg_dsn, pg_proxy, schema))
    daemon = started(
        {
            **env,
            "METRICS_PORT": str(port),
            "NOTIFY_SOCKET": str(notify.path),
            "WATCHDOG_USEC": WATCHDOG_USEC,
        }
    )
    wait_for(lambda: daemon.running() and "READY=1" in notify.states(), "READY=1")

    produce(kafka, topic, [*good(10), POISON, *good(9)])
    metrics = wait_for(
        lambda: (m := scrape(port)).get(STORED) == 19 and m.get(REJECTED) == 1 and m,
        "19 stored and 1 rejected",
    )
    assert metrics[CONSUMED] >= 20
    assert metrics[BATCHES] > 0
    assert metrics["checker_processing_batch_messages_sum"] >= 20
    # Everything is committed: the lag of every partition goes to 0.
    wait_for(lambda: (lag := lags(scrape(port), topic)) and sum(lag.values()) == 0, "lag 0")

    # The database goes away: the batch is held, nothing is committed, the lag shows it.
    pg_proxy.stop()
    pings_before = notify.count("WATCHDOG=1")
    produce(kafka, topic, good(10))
    metrics = wait_for(
        lambda: (
            (m := scrape(port)).get(DB_WRITE_ERRORS, 0) >= 2 and sum(lags(m, topic).values()) and m
        ),
        "database errors and a lag",
    )
    assert metrics[DB_RETRIES] >= 2
    assert metrics[STORED] == 19
    assert sum(lags(metrics, topic).values()) <= 10
    # The loop is alive while it waits for the database: the watchdog keeps being fed.
    wait_for(lambda: notify.count("WATCHDOG=1") >= pings_before + 2, "pings during the outage")
    assert any(s.startswith("STATUS=database unavailable") for s in notify.states())

    pg_proxy.start()
    wait_for(lambda: scrape(port).get(STORED) == 29, "29 stored after the outage")
    wait_for(lambda: (lag := lags(scrape(port), topic)) and sum(lag.values()) == 0, "lag 0 again")

    assert daemon.terminate() == 0
    log = daemon.text()
    assert re.search(r"WARNING checker_processing\.consumer: database unavailable \(attempt", log)
    assert "Traceback" not in log


def test_partition_lags_from_librdkafka_statistics() -> None:
    def part(**fields: Any) -> dict[str, Any]:
        return {"desired": True, "lo_offset": 0, "committed_offset": -1001, **fields}

    stats = {
        "topics": {
            "t": {
                "partitions": {
                    "0": part(consumer_lag=4, hi_offset=14, ls_offset=14, committed_offset=10),
                    # Never committed by this group: everything from the low watermark.
                    "1": part(consumer_lag=-1, hi_offset=7, ls_offset=7, lo_offset=2),
                    # Offsets not known yet: no series rather than a wrong one.
                    "2": part(consumer_lag=-1, hi_offset=-1, ls_offset=-1),
                    # Owned by another member of the group.
                    "3": part(consumer_lag=3, desired=False),
                    "-1": part(consumer_lag=0),
                }
            }
        }
    }
    assert partition_lags(stats) == {("t", 0): 4, ("t", 1): 5}
    assert partition_lags({}) == {}


# -- logs -----------------------------------------------------------------------------------


@pytest.fixture
def secret_role(pg_dsn: str, schema: str) -> Iterator[tuple[str, str]]:
    """A login role with a password that owns `schema`; dropped afterwards."""
    role, password = f"pc_secret_{uuid.uuid4().hex[:8]}", f"pw-{uuid.uuid4().hex}"
    admin(
        pg_dsn,
        sql.SQL("CREATE ROLE {} LOGIN PASSWORD %s").format(sql.Identifier(role)),
        (password,),
    )
    admin(
        pg_dsn,
        sql.SQL("ALTER SCHEMA {} OWNER TO {}").format(sql.Identifier(schema), sql.Identifier(role)),
    )
    yield role, password
    admin(
        pg_dsn,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
        (role,),
    )
    admin(pg_dsn, sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
    admin(pg_dsn, sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
    admin(pg_dsn, sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_json_logs_are_one_object_per_line_with_ids_and_no_secrets(
    kafka: Any,
    topic: str,
    pg_dsn: str,
    pg_proxy: TcpProxy,
    schema: str,
    secret_role: tuple[str, str],
    started: Callable[[dict[str, str]], Daemon],
) -> None:
    role, password = secret_role
    dsn = daemon_dsn(pg_dsn, pg_proxy, schema, user=f"{role}:{password}")
    cert_pass = kafka.password or f"unused-{uuid.uuid4().hex}"  # an unencrypted key ignores it
    env = {
        **base_env(kafka, topic, dsn),
        "KAFKA_CERT_PASS": cert_pass,
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "DEBUG",
        "KAFKA_GROUP_INSTANCE_ID": f"processor-{uuid.uuid4().hex[:6]}",
    }
    # Started before its database: the wait is logged as warnings, without a stack trace.
    daemon = started(env)
    wait_for(lambda: daemon.running() and "unavailable at start" in daemon.text(), "a failed start")
    pg_proxy.start()
    delivered = produce(kafka, topic, [*good(5), POISON])
    poison = next(m for m in delivered if m.key() == b"poison")

    def logged_batches() -> list[dict[str, Any]]:
        lines = daemon.text().splitlines(keepends=True)
        complete = [orjson.loads(line) for line in lines if line.endswith("\n")]
        return [r for r in complete if r["message"].startswith("batch ")]

    wait_for(
        lambda: daemon.running() and sum(r["batch_size"] for r in logged_batches()) == 6,
        "batch lines for all 6 messages",
    )
    assert daemon.terminate() == 0

    raw = daemon.stderr.read_text()
    records = [orjson.loads(line) for line in raw.splitlines()]  # every line is one JSON object
    assert records
    assert all(isinstance(r, dict) and r.keys() >= {"level", "message"} for r in records)
    for secret in (password, cert_pass):
        assert secret not in raw
        assert secret not in daemon.stdout.read_text()

    start_failures = [r for r in records if "unavailable at start" in r["message"]]
    assert start_failures
    assert all(r["level"] == "WARNING" for r in start_failures)
    assert "Traceback" not in raw
    rejected = [r for r in records if r["message"].startswith("rejected message")]
    assert [(r["topic"], r["partition"], r["offset"]) for r in rejected] == [
        (topic, poison.partition(), poison.offset())
    ]
    batches = [r for r in records if "batch_size" in r and r["message"].startswith("batch ")]
    assert sum(r["batch_size"] for r in batches) == 6
    assert sum(r["stored"] for r in batches) == 5
    assert any(r["message"].startswith("ready: consuming") for r in records)


def test_consumer_config_sets_static_membership_only_when_asked(kafka: Any) -> None:
    def config(**extra: Any) -> dict[str, Any]:
        settings = ProcessorSettings(
            **{k.lower(): v for k, v in kafka.env().items()},
            postgresql_connection="postgresql://x@127.0.0.1/db",
            **extra,
        )
        return consumer_config(settings)

    assert "group.instance.id" not in config()
    assert "group.instance.id" not in config(kafka_group_instance_id="  ")
    assert config(kafka_group_instance_id="processor-1")["group.instance.id"] == "processor-1"


def test_metrics_port_in_use_is_one_line_and_exit_1(kafka: Any) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        env = {
            **kafka.env(),
            "POSTGRESQL_CONNECTION": "postgresql://nobody@127.0.0.1:1/none",
            "METRICS_PORT": str(taken.getsockname()[1]),
        }
        result = run_cli("checker_processing.cli", "run", env=env, timeout=30)
    assert result.returncode == 1
    assert "cannot serve metrics on 127.0.0.1:" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
