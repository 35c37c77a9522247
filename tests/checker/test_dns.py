"""The probe's name lookups run in a pool of their own: answers like aiohttp's resolver,
lookups of timed-out checks dropped before they run, and nothing that holds up the exit."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from aiohttp.resolver import ThreadedResolver

from periodic_checker.dns import DaemonThreadPool, PoolResolver

ROOT = Path(__file__).resolve().parents[2]


def _key(found: list[dict[str, object]]) -> list[tuple[object, ...]]:
    return sorted((r["hostname"], r["host"], r["port"], r["family"], r["proto"]) for r in found)


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_UNSPEC])
async def test_answers_are_those_of_aiohttps_threaded_resolver(
    family: socket.AddressFamily,
) -> None:
    pool = DaemonThreadPool(2)
    try:
        ours = await PoolResolver(pool).resolve("localhost", 8080, family)
        theirs = await ThreadedResolver().resolve("localhost", 8080, family)
    finally:
        pool.shutdown()

    assert ours
    assert _key(ours) == _key(theirs)  # type: ignore[arg-type]


async def test_a_name_that_does_not_resolve_raises_gaierror() -> None:
    pool = DaemonThreadPool(1)
    try:
        with pytest.raises(socket.gaierror):
            await PoolResolver(pool).resolve("no-such-host.invalid", 80, socket.AF_UNSPEC)
    finally:
        pool.shutdown()


async def test_a_lookup_given_up_while_queued_never_runs() -> None:
    pool = DaemonThreadPool(1)
    release = threading.Event()
    ran: list[str] = []
    loop = asyncio.get_running_loop()
    busy = loop.run_in_executor(pool, release.wait)  # the only thread is taken
    queued = asyncio.ensure_future(loop.run_in_executor(pool, ran.append, "queued"))
    await asyncio.sleep(0)

    queued.cancel()  # what a check's time-out does to its lookup
    await asyncio.sleep(0)  # asyncio hands the cancel on to the pool's future in a callback
    release.set()
    await busy
    assert await loop.run_in_executor(pool, lambda: "after") == "after"  # the queue moved on
    pool.shutdown()

    assert queued.cancelled()
    assert ran == []


def test_shutdown_cancels_what_has_not_started_and_does_not_wait() -> None:
    pool = DaemonThreadPool(1)
    release = threading.Event()
    running = pool.submit(release.wait)
    waiting = pool.submit(lambda: "never")

    pool.shutdown(wait=False, cancel_futures=True)

    assert waiting.cancelled()
    assert not running.done()  # still in its thread, and nobody waited for it
    with pytest.raises(RuntimeError):
        pool.submit(lambda: None)
    release.set()
    assert running.result(timeout=30) is True


def test_threads_start_as_work_arrives_up_to_the_limit() -> None:
    pool = DaemonThreadPool(3, name="limit-test")
    release = threading.Event()
    started = [pool.submit(release.wait) for _ in range(5)]

    alive = [t for t in threading.enumerate() if t.name.startswith("limit-test-")]
    release.set()
    assert all(f.result(timeout=30) for f in started)
    pool.shutdown()

    assert len(alive) == 3
    assert all(t.daemon for t in alive)


def test_a_process_exits_while_a_lookup_hangs() -> None:
    # A name server that never answers, played by a call that blocks for ten minutes.
    script = (
        "import time\n"
        "from periodic_checker.dns import DaemonThreadPool\n"
        "pool = DaemonThreadPool(2)\n"
        "pool.submit(time.sleep, 600)\n"
        "pool.submit(time.sleep, 600)\n"
        "pool.shutdown(wait=False, cancel_futures=True)\n"
        "print('exiting')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )

    assert (done.returncode, done.stdout) == (0, "exiting\n"), done.stderr
