"""Hostile patterns and bodies in a real checker, beside normal tasks.

Patterns: tasks added through the API with the largest pattern it allows, against 1 MiB bodies
on which RE2 works hardest (about 7 s a search), more of them than the slow search lane has
threads. Bodies: an 8 MB body and 64 MiB compression bombs in gzip, br, zstd and gzip inside
br, each read under the default 1 MiB cap. Meanwhile `/health` is polled and normal tasks
(with an everyday pattern, and without one) run every second.

Each hostile pattern check ends with `pattern_timeout` at its own time-out; each body is read
to the cap, searched there and marked `body_truncated`; `/health` answers every poll; the
normal tasks keep their schedule and never fail; memory stays bounded; SIGTERM still exits 0
with searches running."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from checker.targets import HOSTILE_PATTERN, a_and_b, gzip_bomb, zeros
from faults.faults_support import (
    FULL,
    Daemon,
    Target,
    checker_env,
    emit,
    percentile,
    read_topic,
    rss_bytes,
    seed_tasks,
    spec,
)
from faults.test_process_faults import missing_slots

from helpers import KafkaTarget

pytestmark = [pytest.mark.faults, pytest.mark.kafka]

EACH = 4  # tasks of each hostile class; the slow search lane has one thread
NORMAL = 10  # tasks, half with a pattern
RUN_S = 60.0 if FULL else 20.0
CAP = 1_048_576  # the default max_body_bytes
# A poll gets as long as a hostile check: a search on the loop (about 7 s) would exceed it.
HEALTH_TIMEOUT = aiohttp.ClientTimeout(total=2.0)
RSS_LIMIT = 600 * 1024 * 1024
BODIES = {
    "8 MB body": "/bytes?size=8000000",
    "gzip bomb": "/gzip-bomb?mb=64",
    "br bomb": "/bomb?codings=br&mb=64",
    "zstd bomb": "/bomb?codings=zstd&mb=64",
    "gzip bomb inside br": "/bomb?codings=gzip,br&mb=64",
}


async def test_hostile_patterns_and_bodies_stall_nothing_else(
    kafka: KafkaTarget, topic: str, tmp_path: Path
) -> None:
    storage = tmp_path / "tasks.sqlite3"
    # Built once before the run, not inside a request.
    a_and_b(CAP)
    gzip_bomb(64)
    zeros(64)
    with Target() as target, Target() as fine:
        normal = [
            spec(fine.url("/ok"), pattern="hello periodic" if i % 2 else None)
            for i in range(NORMAL)
        ]
        classes: dict[uuid.UUID, str] = dict.fromkeys(seed_tasks(storage, normal), "normal")
        for name, path in BODIES.items():
            # "x" is in none of them: the search runs over the whole cap. Time-outs leave room
            # to read 1 MiB from one local server on a busy 2-core machine.
            bodies = [
                spec(target.url(path), interval=6, timeout=5, pattern="x") for _ in range(EACH)
            ]
            classes.update(dict.fromkeys(seed_tasks(storage, bodies), name))
        env = checker_env(kafka, topic, storage)
        checker = Daemon.checker(env, tmp_path / "checker.log")
        api = f"http://127.0.0.1:{env['API_PORT']}"
        health: Counter[str] = Counter()
        peak = 0
        try:
            async with aiohttp.ClientSession() as http:
                refused = await add_task(http, api, r"\w{1000}\w{1000}\w{1000}\w{1000}Z", target)
                for _ in range(EACH):
                    added = await add_task(http, api, HOSTILE_PATTERN, target)
                    classes[uuid.UUID(added["id"])] = "hostile pattern"
                started = time.monotonic()
                while time.monotonic() - started < RUN_S:
                    health[await poll_health(http, api)] += 1
                    peak = max(peak, rss_bytes(checker.proc.pid))
                    await asyncio.sleep(0.2)
            assert checker.alive(), checker.tail()
            ended = time.time()
            # Searches are still running in their threads: they must not hold up the exit.
            assert checker.terminate() == 0, checker.tail()
        finally:
            checker.kill()
    messages = await asyncio.to_thread(read_topic, kafka, topic)

    lags: list[float] = []
    slots: dict[uuid.UUID, list[float]] = defaultdict(list)
    outcomes: dict[str, Counter[str]] = defaultdict(Counter)
    for message in messages:
        result = message.result
        kind = classes[message.task_id]
        outcomes[kind][result.error.kind.value if result.error else "ok"] += 1
        if kind == "hostile pattern":
            if result.error is not None and "waited for a search thread" in result.error.message:
                outcomes[kind]["of which waited for a thread"] += 1
        elif kind != "normal":
            if result.body_truncated:
                outcomes[kind][f"truncated at {result.bytes}"] += 1
        else:
            assert result.scheduled_at is not None
            lags.append((result.timestamp - result.scheduled_at).total_seconds())
            slots[message.task_id].append(result.scheduled_at.timestamp())
    missed = sum(missing_slots(s, 1.0, ended - 1.0) for s in slots.values())
    expected = sum(len([x for x in s if x < ended - 1.0]) for s in slots.values()) + missed
    emit(
        f"FAULTS hostile_patterns_and_bodies: each={EACH} normal={NORMAL} run_s={RUN_S:.0f}"
        f" health={dict(health)} missed_slots={missed}/{expected}"
        f" lag_p50={percentile(lags, 50):.3f} lag_p99={percentile(lags, 99):.3f}"
        f" rss_peak_mib={peak / 1048576:.0f}"
        f" outcomes={ {k: dict(v) for k, v in sorted(outcomes.items())} }"
    )
    assert refused["status"] == 422
    assert refused["detail"][0]["field"] == "pattern"
    assert "at most 1000 are allowed" in refused["detail"][0]["message"]
    # The loop answered every poll made while the hostile checks ran.
    assert set(health) == {"ok"}, health
    # The hostile pattern checks ended at their own time-out, as what it is; a check whose body
    # took its whole time-out to arrive (a busy machine: 12 of 14 once at load 12 on 2 cores)
    # never got to search, and fails as a plain time-out.
    hostile = outcomes["hostile pattern"]
    assert hostile["pattern_timeout"] >= 1, hostile
    allowed = {"pattern_timeout", "of which waited for a thread", "timeout", "checker_overloaded"}
    assert set(hostile) <= allowed, hostile
    # Each body was read and searched up to the cap, and said so.
    for name in BODIES:
        assert set(outcomes[name]) == {"pattern", f"truncated at {CAP}"}, (name, outcomes[name])
        assert outcomes[name]["pattern"] == outcomes[name][f"truncated at {CAP}"] > 0
    # The normal tasks: every one ran, none failed, and (a little slack for a shared machine)
    # none missed its schedule.
    assert set(slots) == {task for task, kind in classes.items() if kind == "normal"}
    assert set(outcomes["normal"]) == {"ok"}, outcomes["normal"]
    assert missed <= expected // 20, f"{missed} of {expected} slots missed"
    assert peak < RSS_LIMIT, f"RSS peaked at {peak / 1048576:.0f} MiB"


async def add_task(
    http: aiohttp.ClientSession, api: str, pattern: str, target: Target
) -> dict[str, Any]:
    """POST a hostile-pattern task; its answer (the task, or the refusal with its status)."""
    body = {
        "name": f"hostile-{uuid.uuid4().hex[:8]}",
        "url": target.url(f"/ab?size={CAP}"),
        "pattern": pattern,
        "interval": 6,
        # Well below the 7 s a search takes: no search of these can finish in time.
        "timeout": 3,
    }
    async with http.post(f"{api}/tasks", json=body) as response:
        answer: dict[str, Any] = await response.json()
        return answer if response.status == 201 else {**answer, "status": response.status}


async def poll_health(http: aiohttp.ClientSession, api: str) -> str:
    try:
        async with http.get(f"{api}/health", timeout=HEALTH_TIMEOUT) as response:
            return "ok" if response.status == 200 else f"status {response.status}"
    except TimeoutError:
        return "timed out"
    except aiohttp.ClientError as exc:
        return type(exc).__name__
