"""A task created over the API is in the store the moment 201 is answered: a SIGKILL right after
does not lose it, and the restarted daemon schedules it again."""

from __future__ import annotations

import asyncio
import signal
import time
from datetime import datetime
from pathlib import Path

import aiohttp
import pytest

from devstack import free_port, stop_process, wait_for_port

from helpers import KafkaTarget, start_checker

pytestmark = pytest.mark.kafka


async def test_task_created_then_sigkill_is_there_after_restart(
    kafka: KafkaTarget, topic: str, tmp_path: Path
) -> None:
    api_port = free_port()
    env = {
        **kafka.env(),
        "KAFKA_TOPIC": topic,
        "TASK_STORAGE": str(tmp_path / "tasks.sqlite3"),
        "API_PORT": str(api_port),
        "LOG_LEVEL": "INFO",
    }
    log = tmp_path / "checker.log"
    api = f"http://127.0.0.1:{api_port}"
    daemon = start_checker(env, log)
    try:
        wait_for_port(api_port, timeout=60)
        async with aiohttp.ClientSession() as http:
            created = await http.post(
                f"{api}/tasks",
                json={"name": "kept", "url": "http://127.0.0.1:9/", "interval": 2, "timeout": 1},
            )
            assert created.status == 201, await created.text()
            task = await created.json()
        daemon.send_signal(signal.SIGKILL)
        assert daemon.wait(timeout=30) == -signal.SIGKILL

        restarted_at = time.time()
        daemon = start_checker(env, log)
        wait_for_port(api_port, timeout=60)
        async with aiohttp.ClientSession() as http:
            got = await http.get(f"{api}/tasks/{task['id']}")
            assert got.status == 200, log.read_text()
            body = await got.json()
            assert body["spec"]["name"] == "kept"
            assert body["status"] == "active"
            # Scheduled again: it runs after the restart without anyone touching it.
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                body = await (await http.get(f"{api}/tasks/{task['id']}")).json()
                last = body.get("last_run_at")
                if last and datetime.fromisoformat(last).timestamp() > restarted_at:
                    break
                await asyncio.sleep(0.5)
            else:
                pytest.fail(f"not run after the restart: {body}")
    finally:
        stop_process(daemon)
