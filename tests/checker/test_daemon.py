"""`periodic-checker run` as a real process: tasks from the store and from the API are checked
against a real HTTP server, their results arrive in Kafka over mutual TLS, SIGTERM exits 0."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import jsonschema
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from checker_common.contract import Health, decode
from checker_common.task_spec import TaskSpec, TaskStatus
from devstack import free_port, stop_pid
from periodic_checker.store import SQLiteTaskStore
from periodic_checker.tasks import Task

from conftest import ROOT, KafkaTarget
from helpers import start_checker

pytestmark = pytest.mark.kafka

DEADLINE = 60.0
SCHEMA = json.loads((ROOT / "schema" / "result-message.schema.json").read_text())


@pytest.fixture
async def site() -> AsyncIterator[str]:
    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="<h1>Welcome</h1>")

    app = web.Application()
    app.router.add_get("/", ok)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield f"http://127.0.0.1:{server.port}/"
    finally:
        await server.close()


def received(notify: socket.socket) -> list[str]:
    """The sd_notify states the daemon sent, one per line."""
    states = []
    with contextlib.suppress(BlockingIOError):
        while True:
            states += notify.recv(4096).decode().splitlines()
    return states


def read(log: Path) -> str:
    return log.read_text(errors="replace")


async def wait_for_line(proc: subprocess.Popen[bytes], log: Path, text: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while text not in read(log):
        if proc.poll() is not None:
            raise AssertionError(f"daemon exited {proc.returncode}:\n{read(log)}")
        assert time.monotonic() < deadline, f"no {text!r} in the log:\n{read(log)}"
        await asyncio.sleep(0.1)


def consume_results(
    kafka: KafkaTarget, topic: str, wanted: set[str], deadline: float
) -> dict[str, list[bytes]]:
    """Messages keyed by the wanted task ids, read from the start of every partition."""
    consumer = Consumer(
        kafka.client_config(
            **{"group.id": f"test-{uuid.uuid4().hex[:8]}", "enable.auto.commit": False}
        )
    )
    found: dict[str, list[bytes]] = {}
    try:
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(3)])
        while set(found) != wanted and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None or message.error():
                continue
            key, value = message.key(), message.value()
            if key is not None and value is not None and key.decode() in wanted:
                found.setdefault(key.decode(), []).append(value)
    finally:
        consumer.close()
    return found


async def test_daemon_checks_publishes_and_stops_on_sigterm(
    kafka: KafkaTarget, topic: str, site: str, tmp_path: Path
) -> None:
    storage = tmp_path / "tasks.sqlite3"
    # One task is in the store before start: the daemon must load and schedule it.
    now = datetime.now(UTC)
    stored = Task(
        id=uuid.uuid4(),
        spec=TaskSpec(name="stored", url=site, interval=2, timeout=1.9, pattern="Welcome"),
        created_at=now,
        updated_at=now,
    )
    store = SQLiteTaskStore(storage)
    store.insert(stored)
    store.close()

    api_port = free_port()
    notify_dir = Path(tempfile.mkdtemp(prefix="pc-notify-"))  # short: AF_UNIX paths are short
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_dir / "notify"))
    notify.setblocking(False)
    env = {
        "NOTIFY_SOCKET": str(notify_dir / "notify"),
        "WATCHDOG_USEC": "2000000",
        **kafka.env(),
        "KAFKA_TOPIC": topic,
        "TASK_STORAGE": str(storage),
        "API_HOST": "127.0.0.1",
        "API_PORT": str(api_port),
        "LOG_LEVEL": "INFO",
        "SHUTDOWN_TIMEOUT": "10",
        "CHECKER_NODE_ID": "checker-under-test",
    }
    log = tmp_path / "daemon.log"
    proc = start_checker(env, log)
    states: list[str] = []
    try:
        await wait_for_line(proc, log, "started: 1 tasks")
        wanted = {str(stored.id)}
        api = f"http://127.0.0.1:{api_port}"
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            async with http.get(f"{api}/health") as response:
                assert response.status == 200
            async with http.post(
                f"{api}/tasks",
                json={"name": "from-api", "url": site, "interval": 2, "timeout": 1.9},
            ) as response:
                # A task added live, through the API.
                assert response.status == 201, await response.text()
                wanted.add(str((await response.json())["id"]))
            async with http.get(f"{api}/status") as response:
                assert response.status == 200, await response.text()
                status = await response.json()
                assert status["tasks_by_status"] == {"active": len(wanted)}

        found = await asyncio.to_thread(
            consume_results, kafka, topic, wanted, time.monotonic() + DEADLINE
        )
        assert set(found) == wanted
        for task_id, values in found.items():
            for value in values:
                jsonschema.validate(json.loads(value), SCHEMA)
                decoded = decode(value)
                assert str(decoded.task_id) == task_id
                assert decoded.result.ok
                assert decoded.result.status == 200
                assert decoded.result.health is Health.UP
                assert decoded.result.scheduled_at is not None
                # Every result names the node that ran it.
                assert decoded.result.node == "checker-under-test"
        first = decode(found[str(stored.id)][0]).result
        assert first.pattern_search is not None
        assert first.pattern_search.value == "match"

        # The watchdog is fed all along, not once: wait for a second ping (at most one per
        # half interval, 1 s here) rather than assume the run above lasted long enough.
        states += received(notify)
        deadline = time.monotonic() + DEADLINE
        while states.count("WATCHDOG=1") < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            states += received(notify)
        proc.send_signal(signal.SIGTERM)
        # Awaited in a thread: the target site runs on this loop and must keep answering.
        assert await asyncio.to_thread(proc.wait, DEADLINE) == 0, read(log)
    finally:
        if proc.poll() is None:
            stop_pid(proc.pid)
    text = read(log)
    messages = states + received(notify)
    notify.close()
    shutil.rmtree(notify_dir)
    assert "READY=1" in messages
    assert messages.count("WATCHDOG=1") >= 2  # fed all along, not once
    assert "STOPPING=1" in messages
    assert "stopping" in text
    assert "stopped" in text
    # Status and health were written before the exit.
    store = SQLiteTaskStore(storage)
    try:
        again = store.get(stored.id)
        assert again is not None
        assert again.health is Health.UP
        assert again.status is TaskStatus.ACTIVE
        assert again.runs >= 1
    finally:
        store.close()
