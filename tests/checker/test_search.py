"""Pattern searches off the event loop: the loop keeps running beside a hostile search, quick
searches do not queue behind slow ones, a search whose check gave up before it started never
runs, and the lane follows the search's worst case."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import re2
from checker.targets import HOSTILE_PATTERN, a_and_b

from checker_common.task_spec import MAX_PATTERN_PROGRAM, compile_pattern
from periodic_checker.search import QUICK_WORK, PatternSearcher, search_work

# About 1.1 s of RE2's NFA each (4.2 ns x 1,000 instructions x 256 KiB): long enough to see
# what runs beside it, short enough that the thread left running costs little.
HOSTILE_BODY = a_and_b(262_144)
PAGE = b"<html><body><h1>hello periodic checker</h1></body></html>"


class Started:
    """Search marks that tell the loop when the search left the queue."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self._loop = asyncio.get_running_loop()

    @property
    def search_started(self) -> float | None:
        return None

    @search_started.setter
    def search_started(self, _at: float | None) -> None:  # called in the search's thread
        self._loop.call_soon_threadsafe(self.event.set)


@pytest.fixture
async def searcher() -> AsyncIterator[PatternSearcher]:
    started = PatternSearcher(quick_threads=1, slow_threads=1)
    try:
        yield started
    finally:
        started.close()


def test_the_hostile_pattern_is_the_largest_allowed() -> None:
    assert compile_pattern(HOSTILE_PATTERN).programsize == MAX_PATTERN_PROGRAM


@pytest.mark.parametrize(
    ("pattern", "size", "lane"),
    [
        ("hello periodic", 1_048_576, "quick"),  # 18 instructions
        (r"(?i)(error|exception|fatal|panic|traceback|stack trace|out of memory)", 1_048_576,
         "quick"),
        (HOSTILE_PATTERN, 100_000, "quick"),
        (HOSTILE_PATTERN, 262_144, "slow"),
        ("hello periodic", 64 * 1_048_576, "slow"),
        ("x" * 990, 262_144, "slow"),
    ],
)  # fmt: skip
def test_the_lane_follows_the_worst_case(pattern: str, size: int, lane: str) -> None:
    work = search_work(re2.compile(pattern), size)

    assert ("quick" if work <= QUICK_WORK else "slow") == lane


async def test_the_loop_runs_beside_a_hostile_search(searcher: PatternSearcher) -> None:
    pattern = compile_pattern(HOSTILE_PATTERN)
    search = asyncio.ensure_future(searcher.search(pattern, HOSTILE_BODY, "utf-8"))
    ticks = 0
    while not search.done():
        await asyncio.sleep(0.01)
        ticks += 1

    assert search.result() is False
    # On the loop the search would have let no tick through until its end.
    assert ticks >= 10


async def test_quick_searches_do_not_wait_behind_a_slow_one(searcher: PatternSearcher) -> None:
    slow = asyncio.ensure_future(
        searcher.search(compile_pattern(HOSTILE_PATTERN), HOSTILE_BODY, "utf-8")
    )
    quick = asyncio.ensure_future(searcher.search(compile_pattern("hello"), PAGE, "utf-8"))

    done, _ = await asyncio.wait({slow, quick}, return_when=asyncio.FIRST_COMPLETED)

    assert quick in done
    assert quick.result() is True
    assert not slow.done()
    await slow


async def test_a_search_given_up_while_it_waits_never_runs(searcher: PatternSearcher) -> None:
    pattern = compile_pattern(HOSTILE_PATTERN)
    started = Started()
    first = asyncio.ensure_future(searcher.search(pattern, HOSTILE_BODY, "utf-8", started))
    await started.event.wait()  # the slow lane's only thread is busy

    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await searcher.search(pattern, HOSTILE_BODY, "utf-8")  # waits for the thread
    await first
    # The slow lane's next search (a long literal: RE2 finds no "x" at once) runs after the
    # dropped one would have.
    await searcher.search(compile_pattern("x" * 990), HOSTILE_BODY, "utf-8")

    assert searcher.started == 2
    assert searcher.running == 0


async def test_a_body_in_another_charset_is_searched_as_text(searcher: PatternSearcher) -> None:
    body = "café Привет".encode("windows-1251", errors="ignore")

    assert await searcher.search(compile_pattern("Привет"), body, "cp1251") is True
    assert await searcher.search(compile_pattern("Привет"), body, "utf-8") is False
