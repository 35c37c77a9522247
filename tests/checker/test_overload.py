"""A check's time-out is the target's time: a stalled event loop or a full DNS pool in the
checker extends it, and a check the checker held up past twice its time-out is not judged
(`checker_overloaded`) instead of a false time-out. Real servers; the stall is a callback
that blocks the loop, as a long garbage-collection pause or a CPU-bound burst would."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from checker.targets import make_app, serve, silent_server
from yarl import URL

from checker_common.contract import ErrorKind
from checker_common.task_spec import TaskSpec
from periodic_checker.overload import LoopStalls, TargetDeadline, begin_wait, covered
from periodic_checker.probe import Prober

TASK = uuid.UUID("00000000-0000-4000-8000-0000000000aa")


def spec(url: str, timeout: float) -> TaskSpec:
    return TaskSpec(name="site", url=url, interval=60, timeout=timeout)


def block(seconds: float) -> None:
    """What a CPU-bound burst does to the event loop."""
    time.sleep(seconds)


def stall_loop(after: float, seconds: float) -> None:
    """Block the running event loop for `seconds`, starting `after` seconds from now."""
    asyncio.get_running_loop().call_later(after, block, seconds)


@pytest.fixture
async def site() -> AsyncIterator[URL]:
    async with serve(make_app()) as base:
        yield base


@pytest.fixture
async def prober() -> AsyncIterator[Prober]:
    async with Prober() as started:
        yield started


# --- the arithmetic -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spans", "length"),
    [
        ([], 0.0),
        ([(1.0, 2.0)], 1.0),
        ([(1.0, 2.0), (3.0, 3.5)], 1.5),
        ([(1.0, 2.0), (1.5, 2.5)], 1.5),  # a queue wait during a stall counts once
        ([(1.0, 4.0), (2.0, 3.0)], 3.0),
        ([(3.0, 3.5), (1.0, 2.0)], 1.5),
    ],
)
def test_checker_time_is_the_union_of_stalls_and_waits(
    spans: list[tuple[float, float]], length: float
) -> None:
    assert covered(spans) == pytest.approx(length)


def test_stalls_are_cut_to_the_window_asked_for() -> None:
    stalls = LoopStalls()
    stalls.record(10.0, 11.0)
    stalls.record(12.0, 12.5)
    stalls.record(12.2, 12.4)  # inside the last one: nothing new

    assert stalls.spans(10.5, 12.25) == [(10.5, 11.0), (12.0, 12.25)]
    assert stalls.spans(11.0, 12.0) == []
    assert stalls.total == pytest.approx(1.5)
    assert stalls.longest(60.0, now=13.0) == pytest.approx(1.0)


async def test_the_watcher_sees_a_stall() -> None:
    stalls = LoopStalls()
    stalls.start()
    try:
        await asyncio.sleep(0.1)  # the watcher is asleep
        before = time.monotonic()
        block(0.3)
        after = time.monotonic()
        # The watcher has not run since: the stall going on now is counted all the same.
        assert covered(stalls.spans(before, after)) >= 0.3 - stalls.period - stalls.threshold
        await asyncio.sleep(0.1)
        assert stalls.longest(60.0) >= 0.3 - stalls.period - stalls.threshold
    finally:
        await stalls.stop()


# --- the probe ----------------------------------------------------------------------------


async def test_a_healthy_site_is_not_timed_out_by_a_stalled_checker(
    site: URL, prober: Prober
) -> None:
    # The site answers after 0.5 s; the checker's loop is stuck from 0.1 s to 1.2 s, past the
    # 1 s time-out. The answer is there when the loop runs again: the site was fine.
    stall_loop(0.1, 1.1)
    result = await prober.check(TASK, spec(str(site / "slow" % {"delay": "0.5"}), 1.0))

    assert (result.ok, result.error, result.status) == (True, None, 200)


async def test_a_dead_site_still_gets_its_whole_time_out_after_a_stall(prober: Prober) -> None:
    async with silent_server() as port:
        stall_loop(0.1, 0.5)
        result = await prober.check(TASK, spec(f"http://127.0.0.1:{port}/", 2.0))

    assert result.error is not None
    assert result.error.kind is ErrorKind.TIMEOUT
    assert "the checker held it up" in result.error.message
    # 2 s for the site on top of the 0.5 s the checker was stuck (less what the stall watcher,
    # waking every 10 ms, cannot see of it).
    assert result.load_time > 2.0 + 0.5 - 0.1


async def test_a_check_held_up_past_twice_its_time_out_is_not_judged(prober: Prober) -> None:
    async with silent_server() as port:
        stall_loop(0.05, 1.2)
        result = await prober.check(TASK, spec(f"http://127.0.0.1:{port}/", 0.5))

    assert result.ok is False
    assert result.error is not None
    assert result.error.kind is ErrorKind.CHECKER_OVERLOADED
    assert result.error.message.startswith("not judged: the checker held the check up")


async def test_a_lookup_queued_behind_another_domain_does_not_count_against_the_site(
    site: URL,
) -> None:
    # One DNS thread; a lookup of another domain holds it for 1.3 s. The site's own lookup
    # waits in the pool's queue past its 1 s time-out: the checker's time, not the site's.
    def lookup(host: str, port: int, *_: Any) -> list[Any]:
        if host == "held.example":
            time.sleep(1.3)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]

    async with Prober(dns_threads=1, dns_lookup=lookup) as prober:
        held = asyncio.create_task(
            prober.check(TASK, spec(f"http://held.example:{site.port}/ok", 5.0))
        )
        await asyncio.sleep(0.1)  # its lookup has the thread
        result = await prober.check(TASK, spec(f"http://shop.test:{site.port}/ok", 1.0))
        await held

    assert (result.ok, result.error, result.status) == (True, None, 200)
    assert result.load_time > 1.0


async def test_a_deadline_records_a_queue_wait_of_its_check() -> None:
    deadline = TargetDeadline(10.0, None)
    async with deadline:
        wait = begin_wait()
        assert wait is not None
        await asyncio.sleep(0.2)
        wait.end()

    assert deadline.checker_time() >= 0.2
    assert deadline.target_time() < deadline.checker_time()
