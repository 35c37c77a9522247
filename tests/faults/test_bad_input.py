"""Bad input at the edges of the running daemons.

Covered elsewhere (not repeated here): settings -- tests/test_settings.py (a table of invalid
values, each naming its field); the API -- tests/api/test_api_validation.py (a hand table) and
tests/api/test_api_schemathesis.py (generated requests); messages -- tests/processing
(not JSON, missing fields, too large, null value in test_writer.py and test_daemon.py).

Here: every kind of broken Kafka message, through the real broker into the running processor,
ends in rejected_messages at its own offset while good results around it are stored; and a
ReDoS pattern against a long body through the API's /run returns at once (RE2 is linear).
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from checker.targets import serve
from confluent_kafka import Producer
from faults.faults_support import (
    Daemon,
    checker_env,
    fresh_schema,
    processor_env,
    query,
    seed_tasks,
    spec,
    stored,
    wait_for,
)
from processing.processing_helpers import make_result

from checker_common.contract import encode

from helpers import KafkaTarget

pytestmark = [pytest.mark.faults, pytest.mark.kafka, pytest.mark.postgres]

MAX_MESSAGE_BYTES = 4096


def broken_messages() -> dict[str, tuple[bytes | None, bytes | None]]:
    """name -> (key, value) of messages the processor must reject."""
    task = uuid.uuid4()
    key, good = encode(task, make_result())
    body = json.loads(good)[str(task)]

    def wrapped(inner: Any, task_key: str = str(task)) -> bytes:
        return orjson.dumps({task_key: inner})

    return {
        "random bytes": (key, b"\xff\xfe" + os.urandom(300)),
        "truncated JSON": (key, good[: len(good) // 2]),
        "empty value": (key, b""),
        "null value": (key, None),
        "JSON array": (key, b"[1, 2, 3]"),
        "two task ids": (key, orjson.dumps({str(task): body, str(uuid.uuid4()): body})),
        "wrong type: status": (key, wrapped({**body, "status": "two hundred"})),
        "wrong type: load_time": (key, wrapped({**body, "load_time": "fast"})),
        "wrong type: ok": (key, wrapped({**body, "ok": {"yes": 1}})),
        "negative load_time": (key, wrapped({**body, "load_time": -1})),
        "unknown schema_version": (key, wrapped({**body, "schema_version": 2})),
        "non-UUID task id": (b"not-a-uuid", wrapped(body, "not-a-uuid")),
        "non-UUID result_id": (key, wrapped({**body, "result_id": "42"})),
        "huge message": (key, wrapped({**body, "name": "x" * 200_000})),
    }


def test_every_broken_message_is_rejected_at_its_offset(
    kafka: KafkaTarget, topic: str, pg_dsn: str, tmp_path: Path
) -> None:
    broken = broken_messages()
    good = [encode(uuid.uuid4(), make_result()) for _ in range(len(broken) + 1)]
    # Not broken: a field this version does not know is ignored (fields are added within a
    # schema_version; the contract's CheckResult has extra="ignore" for that).
    newer = orjson.loads(good[0][1])
    next(iter(newer.values()))["added_in_a_later_release"] = True
    good[0] = (good[0][0], orjson.dumps(newer))
    # Good and broken alternate on one partition, so each broken one sits between stored ones.
    sequence: list[tuple[str | None, bytes | None, bytes | None]] = [(None, *good[0])]
    for (name, (key, value)), (good_key, good_value) in zip(broken.items(), good[1:], strict=True):
        sequence += [(name, key, value), (None, good_key, good_value)]
    where: dict[str | None, list[tuple[int, int]]] = {}

    def delivered(name: str | None) -> Any:
        def report(err: Any, msg: Any) -> None:
            assert err is None, err
            where.setdefault(name, []).append((msg.partition(), msg.offset()))

        return report

    producer = Producer(kafka.client_config(**{"enable.idempotence": True}))
    for label, key, value in sequence:
        producer.produce(topic, key=key, value=value, partition=1, on_delivery=delivered(label))
    assert producer.flush(60) == 0

    with fresh_schema(pg_dsn) as dsn:
        processor = Daemon.processor(
            processor_env(kafka, topic, dsn, MAX_MESSAGE_BYTES=MAX_MESSAGE_BYTES),
            tmp_path / "processor.log",
        )
        try:

            def rejected() -> dict[tuple[int, int], str]:
                rows = query(
                    dsn, "SELECT kafka_partition, kafka_offset, error FROM rejected_messages"
                )
                return {(p, o): e for p, o, e in rows}

            wait_for(lambda: len(rejected()) == len(broken), f"{len(broken)} rejected messages")
            wait_for(lambda: sum(stored(dsn).values()) == len(good), "the good results")
            assert processor.alive(), "poison must not stop the processor"
            found = rejected()
            assert processor.terminate() == 0
        finally:
            processor.kill()
    for name in broken:
        ((position,),) = [where[name]]
        assert position in found, f"{name} not rejected at {position}"
    assert len({where[name][0] for name in broken}) == len(broken)
    print("\n".join(f"{n}: {found[where[n][0]]}" for n in broken))


async def test_redos_pattern_against_a_long_body_returns_at_once(
    kafka: KafkaTarget, topic: str, tmp_path: Path
) -> None:
    # (a+)+$ against "aaa...a!" takes exponential time in a backtracking engine; at 100,000
    # characters it would never end. RE2 is linear: the check ends well inside its time-out.
    async def evil(_request: web.Request) -> web.Response:
        return web.Response(text="a" * 100_000 + "!")

    app = web.Application()
    app.router.add_get("/evil", evil)
    storage = tmp_path / "tasks.sqlite3"
    async with serve(app) as base:
        (task,) = seed_tasks(
            storage,
            [spec(str(base / "evil"), interval=3600, timeout=5, pattern="(a+)+$", name="redos")],
        )
        env = checker_env(kafka, topic, storage)
        checker = Daemon("periodic_checker.cli", env, tmp_path / "checker.log")
        try:
            api = f"http://127.0.0.1:{env['API_PORT']}"
            timeout = aiohttp.ClientTimeout(total=30)
            async with aiohttp.ClientSession(timeout=timeout) as http:
                for _ in range(300):
                    try:
                        async with http.get(f"{api}/health") as response:
                            if response.status == 200:
                                break
                    except aiohttp.ClientConnectionError:
                        pass
                    assert checker.alive(), checker.tail()
                    await asyncio.sleep(0.1)
                async with http.post(f"{api}/tasks/{task}/run", json={}) as response:
                    assert response.status == 200, await response.text()
                    result = (await response.json())["result"]
        finally:
            checker.kill()
    assert result["error"] is not None
    assert result["error"]["kind"] == "pattern"
    assert result["pattern_search"] == "no_match"
    assert result["status"] == 200
    assert result["bytes"] == 100_001
