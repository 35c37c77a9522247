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

from periodic_checker.dns import DaemonThreadPool, PoolResolver, registered_domain

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


# --- one domain cannot take the pool ------------------------------------------------------


class Hanging:
    """A name server that never answers for `.hang.example`: a lookup blocks until released.
    Counts the lookups blocked at once; every other name resolves at once."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.blocked = 0
        self.most_blocked = 0
        self._lock = threading.Lock()

    def __call__(self, host: str, port: int, *_: object) -> list[object]:
        if host.endswith(".hang.example"):
            with self._lock:
                self.blocked += 1
                self.most_blocked = max(self.most_blocked, self.blocked)
            self.release.wait(60)
            with self._lock:
                self.blocked -= 1
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]


@pytest.mark.parametrize(
    ("host", "domain"),
    [
        ("shop.example.net", "example.net"),
        ("a.b.shop.example.net.", "example.net"),
        ("Example.NET", "example.net"),
        ("localhost", "localhost"),
        ("www.example.co.uk", "co.uk"),  # the approximation: stricter, never looser
    ],
)
def test_a_host_names_registered_domain_is_its_last_two_labels(host: str, domain: str) -> None:
    assert registered_domain(host) == domain


async def test_a_domain_that_never_answers_holds_at_most_its_share_of_the_pool() -> None:
    pool = DaemonThreadPool(4)
    hanging = Hanging()
    resolver = PoolResolver(pool, per_domain=2, lookup=hanging)
    stuck = [asyncio.create_task(resolver.resolve(f"n{i}.hang.example", 80)) for i in range(6)]
    try:
        await asyncio.sleep(0.2)  # every lookup that can start has started
        async with asyncio.timeout(10):
            found = await resolver.resolve("shop.example.net", 80)  # not behind them
        assert found[0]["host"] == "127.0.0.1"
        assert hanging.blocked == 2
    finally:
        hanging.release.set()
        await asyncio.gather(*stuck)
        pool.shutdown()

    assert hanging.most_blocked == 2


async def test_a_caller_leaves_at_its_deadline_but_the_thread_stays_counted() -> None:
    pool = DaemonThreadPool(4)
    hanging = Hanging()
    resolver = PoolResolver(pool, per_domain=1, lookup=hanging)
    try:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):  # the check's deadline
                await resolver.resolve("a.hang.example", 80)
        # getaddrinfo() cannot be stopped: its thread is still the domain's only one, so the
        # next lookup of the domain waits for it instead of taking another thread.
        second = asyncio.create_task(resolver.resolve("b.hang.example", 80))
        await asyncio.sleep(0.2)
        assert not second.done()
        assert hanging.most_blocked == 1
        hanging.release.set()
        async with asyncio.timeout(10):
            assert (await second)[0]["host"] == "127.0.0.1"
    finally:
        hanging.release.set()
        pool.shutdown()
