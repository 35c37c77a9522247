"""The checker in production: /metrics moving with real traffic, and clean JSON logs.

Each test runs `python -m periodic_checker.cli run` (`daemons.Daemon`) against the real broker
(mutual TLS), with tasks added over its API that check a local aiohttp site answering 200 and 500
in turn, and a closed port. (The notify protocol is proven in tests/checker/test_daemon.py.)
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from confluent_kafka import Producer

from checker_common.contract import Health
from checker_common.kafka import librdkafka_logger
from checker_common.task_spec import TaskSpec, TaskStatus
from devstack import free_port
from periodic_checker.metrics import TaskMap, count_tasks
from periodic_checker.tasks import Task

from daemons import CHECKER, Daemon
from helpers import KafkaTarget, tasks_topic_of

pytestmark = pytest.mark.kafka

DEADLINE_S = 60.0
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=10)

OK = 'periodic_checker_checks_total{error_kind="none",outcome="ok"}'
FAILED_STATUS = 'periodic_checker_checks_total{error_kind="status",outcome="failed"}'
FAILED_CONNECT = 'periodic_checker_checks_total{error_kind="connect",outcome="failed"}'
DELIVERIES = "periodic_checker_deliveries_total"
LAG_COUNT = "periodic_checker_schedule_lag_seconds_count"
MOVING = (OK, FAILED_STATUS, FAILED_CONNECT, DELIVERIES, LAG_COUNT)


@dataclass
class Targets:
    flip: str  # 200, 500, 200, ... in turn
    closed: str  # nothing listens there: the check fails to connect


@pytest.fixture
async def targets() -> AsyncIterator[Targets]:
    answered = 0

    async def flip(_request: web.Request) -> web.Response:
        nonlocal answered
        answered += 1
        return web.Response(status=200 if answered % 2 else 500, text="flip")

    app = web.Application()
    app.router.add_get("/flip", flip)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield Targets(f"http://127.0.0.1:{server.port}/flip", f"http://127.0.0.1:{free_port()}/")
    finally:
        await server.close()


@pytest.fixture
def started(
    kafka: KafkaTarget, topic: str, tmp_path: Path
) -> Iterator[Callable[[dict[str, str]], Daemon]]:
    daemons: list[Daemon] = []

    def start(extra: dict[str, str]) -> Daemon:
        directory = tmp_path / f"checker-{len(daemons)}"
        directory.mkdir()
        env = {
            **kafka.env(),
            "KAFKA_TOPIC": topic,
            "KAFKA_TASKS_TOPIC": tasks_topic_of(topic),
            "TASK_STORAGE": str(directory / "tasks.sqlite3"),
            "API_HOST": "127.0.0.1",
            "API_PORT": str(free_port()),
            "SHUTDOWN_TIMEOUT": "10",
            **extra,
        }
        out, err = directory / "checker.out", directory / "checker.err"
        daemons.append(Daemon(CHECKER, env, out, stderr=err))
        return daemons[-1]

    yield start
    for daemon in daemons:
        daemon.kill()


async def terminate(daemon: Daemon) -> int:
    # In a thread: the target site runs on this loop and must keep answering.
    return await asyncio.to_thread(daemon.terminate, DEADLINE_S)


async def wait_for(condition: Callable[[], Any], what: str) -> Any:
    deadline = time.monotonic() + DEADLINE_S
    while True:
        value = await condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.2)


async def serving(http: aiohttp.ClientSession, daemon: Daemon) -> bool:
    daemon.running()
    try:
        async with http.get(f"{daemon.api}/health") as response:
            return response.status == 200
    except aiohttp.ClientConnectionError:
        return False


async def add_task(
    http: aiohttp.ClientSession, daemon: Daemon, name: str, url: str, token: str | None = None
) -> str:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    task = {"name": name, "url": url, "interval": 1, "timeout": 0.9}
    async with http.post(f"{daemon.api}/tasks", json=task, headers=headers) as response:
        assert response.status == 201, await response.text()
        return str((await response.json())["id"])


async def scrape(http: aiohttp.ClientSession, daemon: Daemon) -> dict[str, float]:
    """/metrics as {'name{labels}': value}."""
    async with http.get(f"{daemon.api}/metrics") as response:
        assert response.status == 200
        text = await response.text()
    found = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            found[name] = float(value)
    return found


# -- metrics --------------------------------------------------------------------------------


async def test_metrics_move_with_checks_failures_and_deliveries(
    targets: Targets, started: Callable[[dict[str, str]], Daemon]
) -> None:
    daemon = started({"LOG_LEVEL": "INFO"})
    async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http:
        await wait_for(lambda: serving(http, daemon), "the API")
        await add_task(http, daemon, "flip", targets.flip)
        await add_task(http, daemon, "closed", targets.closed)

        async def all_counted() -> dict[str, float] | None:
            daemon.running()
            metrics = await scrape(http, daemon)
            return metrics if all(metrics.get(name, 0) > 0 for name in MOVING) else None

        first = await wait_for(all_counted, "ok, failed and delivered checks")

        async def all_moved() -> dict[str, float] | None:
            metrics = await all_counted()
            return metrics if metrics and all(metrics[n] > first[n] for n in MOVING) else None

        second = await wait_for(all_moved, "every counter moving between two scrapes")

    assert second['periodic_checker_tasks{status="active"}'] == 2
    assert second['periodic_checker_tasks{status="paused"}'] == 0
    assert sum(v for k, v in second.items() if k.startswith("periodic_checker_tasks_by_h")) == 2
    assert second["periodic_checker_outbox_size"] == 0
    assert second["periodic_checker_check_seconds_count"] >= sum(second[n] for n in MOVING[:3])
    assert "periodic_checker_checks_in_flight" in second
    assert "periodic_checker_producer_queue" in second
    assert second["periodic_checker_delivery_failures_total"] == 0
    assert second["periodic_checker_broker_reachable"] == 1
    assert await terminate(daemon) == 0
    assert "Traceback" not in daemon.text()


def test_task_counts_follow_every_change_without_a_walk() -> None:
    now = datetime.now(UTC)
    spec = TaskSpec(name="t", url="http://127.0.0.1/")
    tasks = [Task(id=uuid.uuid4(), spec=spec, created_at=now, updated_at=now) for _ in range(5)]
    counted = TaskMap()
    for task in tasks:
        counted[task.id] = task
    counted[tasks[0].id] = tasks[0].model_copy(update={"health": Health.UP})
    counted[tasks[1].id] = tasks[1].model_copy(
        update={"health": Health.DOWN, "status": TaskStatus.PAUSED}
    )
    counted[tasks[1].id] = counted[tasks[1].id]  # the same again: no change
    del counted[tasks[2].id]
    assert counted.pop(tasks[3].id) is tasks[3]
    assert counted.pop(uuid.uuid4(), None) is None
    with pytest.raises(KeyError):
        counted.pop(uuid.uuid4())

    by_status, by_health = count_tasks(counted)
    assert by_status == {"active": 2, "paused": 1, "done": 0, "error": 0}
    assert by_health == {"unknown": 1, "up": 1, "down": 1}
    assert count_tasks(dict(counted)) == (by_status, by_health)  # the same as a walk
    with pytest.raises(TypeError):
        counted.update({})


def test_tasks_loaded_at_once_are_counted_as_one_by_one() -> None:
    now = datetime.now(UTC)
    spec = TaskSpec(name="t", url="http://127.0.0.1/")
    kinds = [
        {}, {"health": Health.UP}, {"health": Health.DOWN, "status": TaskStatus.PAUSED},
        {"status": TaskStatus.ERROR, "status_reason": "bad"}, {"health": Health.UP},
    ]  # fmt: skip
    tasks = [
        Task(id=uuid.uuid4(), spec=spec, created_at=now, updated_at=now, **kind) for kind in kinds
    ]
    one_by_one = TaskMap()
    for task in tasks:
        one_by_one[task.id] = task
    at_once = TaskMap()

    at_once.load(tasks)

    assert dict(at_once) == dict(one_by_one)
    assert count_tasks(at_once) == count_tasks(one_by_one) == count_tasks(dict(one_by_one))
    del at_once[tasks[1].id]  # and changed as ever after
    assert count_tasks(at_once) == count_tasks(dict(at_once))
    with pytest.raises(ValueError, match="empty"):
        at_once.load(tasks[1:2])
    twice = TaskMap()
    with pytest.raises(ValueError, match="distinct"):
        twice.load([tasks[0], tasks[0]])
    assert not twice
    assert count_tasks(twice) == count_tasks({})


# -- logs -----------------------------------------------------------------------------------


async def test_json_logs_one_object_per_line_failures_as_info_no_secrets(
    kafka: KafkaTarget, targets: Targets, started: Callable[[dict[str, str]], Daemon]
) -> None:
    token = f"token-{uuid.uuid4().hex}"
    cert_pass = kafka.password or f"unused-{uuid.uuid4().hex}"  # an unencrypted key ignores it
    daemon = started(
        {
            "LOG_FORMAT": "json",
            "LOG_LEVEL": "DEBUG",
            "API_TOKEN": token,
            "KAFKA_CERT_PASS": cert_pass,
        }
    )

    def records() -> list[dict[str, Any]]:
        lines = daemon.text().splitlines(keepends=True)
        return [orjson.loads(line) for line in lines if line.endswith("\n")]

    def failures(task_id: str) -> list[dict[str, Any]]:
        return [r for r in records() if r.get("task_id") == task_id and "error_kind" in r]

    async def failed_twice() -> bool:
        return daemon.running() and len(failures(closed)) >= 2

    async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http:
        await wait_for(lambda: serving(http, daemon), "the API")
        closed = await add_task(http, daemon, "closed", targets.closed, token=token)
        await wait_for(failed_twice, "two failed checks logged")
    assert await terminate(daemon) == 0

    raw = daemon.stderr.read_text()
    parsed = [orjson.loads(line) for line in raw.splitlines()]  # every line is one JSON object
    assert all(isinstance(r, dict) and r.keys() >= {"level", "message"} for r in parsed)
    for secret in (token, cert_pass):
        assert secret not in raw
        assert secret not in daemon.stdout.read_text()
    assert "Traceback" not in raw
    for line in failures(closed):
        assert line["level"] == "INFO"
        assert line["error_kind"] == "connect"
        assert line["result_id"]
        assert closed in line["message"]
    assert any(r.get("task_id") == closed and "created" in r["message"] for r in parsed)


def test_librdkafka_connection_failures_are_warnings(caplog: pytest.LogCaptureFixture) -> None:
    """librdkafka reports a refused connection at syslog level 3, which is not our error."""
    producer = Producer(
        {
            "bootstrap.servers": f"127.0.0.1:{free_port()}",  # nothing listens
            "logger": librdkafka_logger(),
            "reconnect.backoff.ms": 10,
        }
    )
    caplog.set_level(logging.DEBUG, logger="librdkafka")
    deadline = time.monotonic() + DEADLINE_S
    failures: list[logging.LogRecord] = []
    while not failures and time.monotonic() < deadline:
        producer.poll(0.1)
        failures = [r for r in caplog.records if r.args and r.args[0] == "FAIL"]  # type: ignore[index]
    assert failures, "no connection failure reported"
    assert {r.levelname for r in failures} == {"WARNING"}
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    producer.flush(0)
