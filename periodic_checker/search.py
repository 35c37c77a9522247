"""Pattern searches, in threads of their own: no search runs on the event loop.

RE2 is linear in the body, but its cost also grows with the compiled pattern: where its DFA
gives up (hostile patterns make it) a search costs about 4-6 ns per body byte per RE2
instruction (4.2 at 1,000 instructions, 6 at 30, on the 2-core development machine:
`bench/micro.py re2-worst`). A 1 MiB body against a pattern of 1,000 instructions takes about
4.3 s; on the event loop that would stall every other check, the API and the systemd watchdog.
google-re2 releases the GIL while it searches (`bench/micro.py re2-gil`: beside that search in
a thread, the loop still woke every 1.2 ms or so, its longest gap 10-30 ms on the machine
shared at load 3-4), so a thread keeps the loop free.

The work of a search is bounded before it starts: `task_spec.compile_pattern` refuses patterns of
more than MAX_PATTERN_PROGRAM instructions, and a task's instructions x max_body_bytes is at
most MAX_SEARCH_WORK (about 20 s of one core). A body in a charset other than UTF-8 is searched
re-encoded, up to 3 x its bytes (`searched_size`): up to three times that bound, and its lane
is chosen by the bytes searched.

Two lanes, each a fixed number of daemon threads with a queue in front. A search whose worst
case (instructions x bytes) is at most QUICK_WORK (under 1 s) runs in the quick lane, any
other in the slow lane, so hostile patterns can fill only the slow lane: everyday searches (a
100-instruction pattern over a 1 MiB page) keep the quick one. When every thread of a lane is
busy, a search waits in its queue; the wait counts inside the check's time-out. A check that
runs out of time while its search waits or runs ends with `pattern_timeout`. A search still
waiting is then dropped before it starts; a running one cannot be stopped (Python cannot kill
a thread) and finishes on its own, within the bound above, its thread busy meanwhile. The
threads never hold up the process's exit; the daemon ends past the interpreter's finalization
(`daemon.leave`), which a thread coming back from RE2 meanwhile would abort.

A lane hands a search over with a queue and answers with `call_soon_threadsafe` on the
caller's future: 14-21 us of CPU a search (median 19), against 21-27 us (median 24) through
`run_in_executor` (its concurrent Future, condition and chained callbacks), on uvloop, the
machine shared at load 2-4; a search of a 1 KB page itself takes about 1.3 us
(`bench/micro.py handoff`).
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from typing import Any, Final, NamedTuple, Protocol

# codecs.lookup() names whose bytes RE2 can search directly.
UTF8_COMPATIBLE: Final = frozenset({"utf-8", "ascii"})
QUICK_WORK: Final = 2**27  # instructions x bytes: 0.6-0.8 s at 4-6 ns
QUICK_THREADS: Final = 2
SLOW_THREADS: Final = 1


class SearchMarks(Protocol):
    """Where a check notes when its search left the queue (None while it waits)."""

    search_started: float | None


def search_body(pattern: Any, body: bytes, charset: str) -> bool:
    """Does the RE2 `pattern` occur in the body decoded with `charset`?

    RE2 works on UTF-8: a UTF-8 (or ASCII) body is searched as it is, any other is decoded
    and re-encoded. Handing RE2 bytes rather than `str` matters: for a `str` the binding
    maps every match position back to characters, 150 x slower for a match near the end of a
    100 KB page (`bench/micro.py regex`).
    """
    if charset not in UTF8_COMPATIBLE:
        # A codec that cannot read it after all (`probe.body_charset` drops most): as UTF-8.
        with contextlib.suppress(LookupError, UnicodeError):
            body = body.decode(charset, errors="replace").encode("utf-8")
    return pattern.search(body) is not None


def searched_size(size: int, charset: str) -> int:
    """The most bytes RE2 searches for a body of `size` bytes in `charset` (pure): a body in
    another charset is searched re-encoded as UTF-8, at most 3 bytes for each byte read (a
    character of a one-byte charset, or U+FFFD for a byte that does not decode)."""
    return size if charset in UTF8_COMPATIBLE else 3 * size


def search_work(pattern: Any, size: int) -> int:
    """The worst case of searching `size` bytes, in instructions x bytes (pure)."""
    return int(pattern.programsize) * size


class _Job(NamedTuple):
    loop: asyncio.AbstractEventLoop
    answer: asyncio.Future[bool]
    pattern: Any
    body: bytes
    charset: str
    marks: SearchMarks | None


class PatternSearcher:
    """Runs `search_body` off the event loop, in the quick or the slow lane (module doc)."""

    def __init__(
        self, *, quick_threads: int = QUICK_THREADS, slow_threads: int = SLOW_THREADS
    ) -> None:
        self._lock = threading.Lock()
        self._closed = False
        self.started = 0  # searches that left a queue, ever
        self.running = 0  # searches in a thread now (some may belong to checks that gave up)
        self._quick: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._slow: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lanes = ((self._quick, quick_threads), (self._slow, slow_threads))
        for lane, count in self._lanes:
            for n in range(count):
                name = f"search-{'quick' if lane is self._quick else 'slow'}-{n}"
                threading.Thread(target=self._work, args=(lane,), name=name, daemon=True).start()

    async def search(
        self, pattern: Any, body: bytes, charset: str, marks: SearchMarks | None = None
    ) -> bool:
        """Whether `pattern` occurs in `body`. Cancelling the caller drops a search that has
        not started; one that has runs to its end in its thread, its answer unused."""
        if self._closed:
            raise RuntimeError("the searcher is closed")
        work = search_work(pattern, searched_size(len(body), charset))
        lane = self._quick if work <= QUICK_WORK else self._slow
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[bool] = loop.create_future()
        lane.put(_Job(loop, answer, pattern, body, charset, marks))
        return await answer

    def _work(self, lane: queue.SimpleQueue[_Job | None]) -> None:
        while (job := lane.get()) is not None:
            # Read across threads: a cancelled future stays cancelled, so a stale False only
            # means one more search.
            if self._closed or job.answer.cancelled():
                continue
            if job.marks is not None:
                job.marks.search_started = time.monotonic()
            with self._lock:
                self.started += 1
                self.running += 1
            found: bool | None = None
            error: Exception | None = None
            try:
                found = search_body(job.pattern, job.body, job.charset)
            except Exception as exc:  # handed to the waiting check, which turns it into data
                error = exc
            with self._lock:
                self.running -= 1
            self._answer(job, found, error)
            del job, error

    @staticmethod
    def _answer(job: _Job, found: bool | None, error: Exception | None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits for it
            job.loop.call_soon_threadsafe(_settle, job.answer, found, error)

    def close(self) -> None:
        """Drop the searches still waiting; running ones end on their own (daemon threads)."""
        self._closed = True
        for lane, count in self._lanes:
            for _ in range(count):
                lane.put(None)


def _settle(answer: asyncio.Future[bool], found: bool | None, error: Exception | None) -> None:
    if answer.done():  # cancelled: its check gave up
        return
    if error is not None:
        answer.set_exception(error)
    else:
        answer.set_result(bool(found))
