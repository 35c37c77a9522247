"""Whose time a check spent: the target's, or the checker's own.

A check's time-out is for the target. The checker can hold a check up itself: its event loop
stalls (a long callback, a garbage-collection pause, more work than one core can do), or a
name lookup waits in the DNS pool's queue for a free thread. Counted against the target, that
time turns a healthy site into a false time-out, a false 'down' and a false incident.

- `LoopStalls` watches the loop: a timer that fires late by more than `threshold` marks the
  loop stalled from its due time until it ran (a stall shorter than the watcher's `period`
  can go unseen; a longer one is seen but for at most one period).
- `CheckerWaits` holds one check's waits in the checker's queues (`begin_wait()` finds the
  running check's through a context variable, so the DNS pool needs no handle on the check).
- `TargetDeadline` is the check's time-out over the target's time only: the check's time
  minus the union of loop stalls and queue waits. It expires once the target has had its
  `timeout`, but at the latest at `HOLD_FACTOR` x timeout; a check stopped there without the
  target having used its time is `overloaded`: not judged, not a time-out.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import time
from collections import deque
from types import TracebackType
from typing import Final

# A check lasts at most this many times its time-out, however much the checker held it up.
HOLD_FACTOR: Final = 2.0
# The target has had its time when it is this close to the time-out (timers may fire early by
# the clock's resolution).
TOLERANCE: Final = 0.005
# A busy loop is seen as stalled for the part of each of its iterations past the watcher's due
# time: the shorter the period, the more of it is seen (100 wake-ups a second cost 0.6-0.7 % of a
# core: `bench/micro.py stalls`).
WATCH_PERIOD: Final = 0.01
# Lateness below this is the timer's own jitter (uvloop's clock has millisecond steps).
STALL_THRESHOLD: Final = 0.002
# Stalls are kept as long as a check can last (task_spec.MAX_TIMEOUT x HOLD_FACTOR).
KEEP_SECONDS: Final = 600.0

Span = tuple[float, float]


class LoopStalls:
    """When the event loop was stalled, from a watcher task that measures its own lateness."""

    def __init__(
        self,
        period: float = WATCH_PERIOD,
        threshold: float = STALL_THRESHOLD,
        keep: float = KEEP_SECONDS,
    ) -> None:
        self.period = period
        self.threshold = threshold
        self.keep = keep
        self.total = 0.0  # seconds stalled since start (a counter for /metrics)
        self._spans: deque[Span] = deque()  # (start, end), ordered, not overlapping
        self._due: float | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start watching (inside the running loop); once."""
        if self._task is None:
            self._task = asyncio.create_task(self._watch(), name="loop-stalls")

    async def stop(self) -> None:
        task, self._task = self._task, None
        self._due = None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _watch(self) -> None:
        while True:
            due = time.monotonic() + self.period
            self._due = due
            await asyncio.sleep(self.period)
            self.record(due + self.threshold, time.monotonic())

    def record(self, start: float, end: float) -> None:
        """The loop was stalled from `start` to `end` (monotonic seconds)."""
        if end <= start:
            return
        if self._spans and start < self._spans[-1][1]:
            start = self._spans[-1][1]
            if end <= start:
                return
        self._spans.append((start, end))
        self.total += end - start
        while self._spans and self._spans[0][1] < end - self.keep:
            self._spans.popleft()

    def spans(self, since: float, until: float) -> list[Span]:
        """The stalls between `since` and `until`, cut to that window; with the one going on
        now if the watcher is late (it has not run yet to record it)."""
        found: list[Span] = []
        for start, end in reversed(self._spans):
            if end <= since:
                break
            if start < until:
                found.append((max(start, since), min(end, until)))
        found.reverse()
        if self._due is not None:
            start = max(self._due + self.threshold, since, found[-1][1] if found else since)
            if start < until:
                found.append((start, until))
        return found

    def longest(self, window: float, now: float | None = None) -> float:
        """The longest stall that ended in the last `window` seconds (0.0 when none)."""
        now = time.monotonic() if now is None else now
        longest = 0.0
        for start, end in reversed(self._spans):
            if end < now - window:
                break
            longest = max(longest, end - start)
        return longest


class Wait:
    """A wait in one of the checker's queues; `end()` may be called from any thread."""

    __slots__ = ("since", "until")

    def __init__(self, since: float) -> None:
        self.since = since
        self.until: float | None = None

    def end(self) -> None:
        if self.until is None:
            self.until = time.monotonic()


class CheckerWaits:
    """The waits of one check in the checker's own queues."""

    __slots__ = ("_waits",)

    def __init__(self) -> None:
        self._waits: list[Wait] = []

    def begin(self) -> Wait:
        wait = Wait(time.monotonic())
        self._waits.append(wait)
        return wait

    def spans(self, until: float) -> list[Span]:
        """Each wait as (start, end), one still going on ending at `until`."""
        return [
            (w.since, min(until, w.until if w.until is not None else until)) for w in self._waits
        ]


_current: contextvars.ContextVar[CheckerWaits | None] = contextvars.ContextVar(
    "periodic_checker_waits", default=None
)


def begin_wait() -> Wait | None:
    """Start timing a wait of the running check in a checker queue (None outside a check)."""
    waits = _current.get()
    return None if waits is None else waits.begin()


def covered(spans: list[Span]) -> float:
    """The length of the union of these spans (pure)."""
    total = 0.0
    reach = -float("inf")
    for start, end in sorted(spans):
        if end <= reach:
            continue
        total += end - max(start, reach)
        reach = end
    return total


class TargetDeadline:
    """One check's time-out, counting the target's time only (an async context manager).

    Inside it the check runs under an `asyncio.Timeout`. A judge wakes when the target could
    have had `timeout` seconds and looks at what it really had (the check's time minus the
    checker's stalls and waits): if the time-out is used up, the timeout expires now;
    otherwise the judge wakes again when it could be. The timeout itself is set at
    `HOLD_FACTOR` x timeout, the longest a check may last.
    """

    def __init__(self, timeout: float, stalls: LoopStalls | None) -> None:
        self.timeout = timeout
        self.stalls = stalls
        self.waits = CheckerWaits()
        self.started = 0.0
        self._timeout: asyncio.Timeout | None = None
        self._judge: asyncio.TimerHandle | None = None
        self._token: contextvars.Token[CheckerWaits | None] | None = None

    async def __aenter__(self) -> TargetDeadline:
        loop = asyncio.get_running_loop()
        self.started = time.monotonic()
        self._token = _current.set(self.waits)
        self._timeout = asyncio.timeout(self.timeout * HOLD_FACTOR)
        await self._timeout.__aenter__()
        self._judge = loop.call_later(self.timeout, self._on_judge)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._judge is not None:
            self._judge.cancel()
            self._judge = None
        if self._token is not None:
            _current.reset(self._token)
            self._token = None
        assert self._timeout is not None
        await self._timeout.__aexit__(exc_type, exc, tb)

    def expired(self) -> bool:
        """Whether this deadline ended the check (its TimeoutError is then the one seen)."""
        return self._timeout is not None and self._timeout.expired()

    def checker_time(self, now: float | None = None) -> float:
        """Seconds of the check so far that the checker held it up (stalls and waits)."""
        now = time.monotonic() if now is None else now
        spans = self.waits.spans(now)
        if self.stalls is not None:
            spans += self.stalls.spans(self.started, now)
        return covered(spans)

    def target_time(self, now: float | None = None) -> float:
        """Seconds of the check so far that were the target's."""
        now = time.monotonic() if now is None else now
        return max(0.0, now - self.started - self.checker_time(now))

    def overloaded(self, now: float | None = None) -> bool:
        """After the deadline expired: True when the target had not used its time-out."""
        return self.target_time(now) < self.timeout - TOLERANCE

    def _on_judge(self) -> None:
        self._judge = None
        assert self._timeout is not None
        if self._timeout.expired():  # the hold limit came first
            return
        now = time.monotonic()
        left = self.timeout - self.target_time(now)
        if left <= TOLERANCE or now - self.started >= self.timeout * HOLD_FACTOR:
            self._timeout.reschedule(asyncio.get_running_loop().time())
            return
        self._judge = asyncio.get_running_loop().call_later(left, self._on_judge)
