"""When each task fires next, and the timer that fires them: a dict and a heap on the event loop.

The checker's own replacement for APScheduler 3 (what it used before, with
`jobstore.HeapJobStore`): it holds one entry per scheduled task - its next fire time (epoch
seconds) and its interval, None for a one-shot - and wakes once per `tick` for every entry due
in it. A due interval entry moves to its task's next slot on its grid after the current time
(`tasks.next_fire_time`): a late wake-up (a busy loop, a pause of the collector) runs each late
task once, not once per slot it missed ("coalesce"). A due one-shot entry is removed.

Why not APScheduler: at 100,000 tasks adding its jobs took 10-11 s of the checker's start-up
(a `Job` with its trigger and its checks, made and stored one by one) and about 1 KB a job;
here an entry is a tuple in a dict and one in a heap, and a fire costs a heap pop and push
(`bench/timetable.py`, `bench/scheduler_scale.py`; BENCHMARKS.md, "Scheduler at scale").
What the checker used of APScheduler besides the timer (coalescing, no misfire limit, jobs as
asyncio tasks) is the few lines of `_on_timer` and `CheckScheduler._launch`.

An entry that is moved or removed stays in the heap, stale by its version, until it reaches the
top, where it is dropped (lazy deletion); the heap is rebuilt when stale entries outnumber live
ones.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
import uuid
from collections.abc import Callable
from heapq import heapify, heappop, heappush

from periodic_checker.tasks import next_fire_time

# Rebuild the heap when it holds more than this many entries per live one (plus a margin, so a
# small timetable is not rebuilt over and over).
COMPACT_RATIO = 2
COMPACT_MARGIN = 1024
# An interval task's next slot is the first one after the wake-up plus this much: a slot is
# never fired twice because of float rounding at the slot itself.
SLOT_EPSILON = 0.001

_Entry = tuple[float, int, uuid.UUID]  # (fire time, version, task id)


class Timetable:
    """Next fire times of the scheduled tasks; `fire(task_id)` is called when one is due.

    `fire` runs on the event loop inside the timer's callback: it must not block (the scheduler
    starts an asyncio task there). Nothing fires before `resume()` nor after `pause()`.
    """

    def __init__(
        self,
        fire: Callable[[uuid.UUID], None],
        *,
        tick: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if tick < 0:
            raise ValueError(f"tick must be 0 or more seconds, not {tick}")
        self.fire = fire
        self.tick = tick
        self.clock = clock
        # task id -> (fire time, interval or None for a one-shot, version of its heap entry)
        self._next: dict[uuid.UUID, tuple[float, float | None, int]] = {}
        self._heap: list[_Entry] = []
        self._versions = itertools.count()
        self._paused = True
        self._timer: asyncio.TimerHandle | None = None
        self._armed_for = math.inf

    def __len__(self) -> int:
        return len(self._next)

    # -- entries -----------------------------------------------------------------------------

    def set(self, task_id: uuid.UUID, when: float, interval: float | None) -> None:
        """Fire `task_id` at `when` (epoch seconds), then every `interval` seconds on its grid
        (None: once). Replaces the task's entry if it has one."""
        version = next(self._versions)
        self._next[task_id] = (when, interval, version)
        heappush(self._heap, (when, version, task_id))
        self._compact_if_sparse()
        if when < self._armed_for:
            self._arm()

    def remove(self, task_id: uuid.UUID) -> bool:
        """Stop firing `task_id`; whether it had an entry."""
        if self._next.pop(task_id, None) is None:
            return False
        self._compact_if_sparse()
        return True

    def next_fire(self, task_id: uuid.UUID) -> float | None:
        entry = self._next.get(task_id)
        return None if entry is None else entry[0]

    def move_passed(self, now: float) -> int:
        """Move every interval entry due before `now` to its next slot at or after `now`,
        without firing it; a one-shot stays due. How many moved."""
        moved: list[_Entry] = []
        kept: list[_Entry] = []
        while (entry := self._first_live()) is not None and entry[0] < now:
            heappop(self._heap)
            if self._next[entry[2]][1] is None:
                kept.append(entry)  # a one-shot runs late rather than never
                continue
            moved.append(entry)
        for entry in kept:
            heappush(self._heap, entry)
        for _, _, task_id in moved:
            _, interval, _ = self._next[task_id]
            assert interval is not None
            self.set(task_id, next_fire_time(task_id, interval, now), interval)
        return len(moved)

    # -- the timer -----------------------------------------------------------------------------

    def resume(self) -> None:
        """Start firing (on the running event loop)."""
        self._paused = False
        self._arm()

    def pause(self) -> None:
        """Stop firing; the entries stay."""
        self._paused = True
        self._disarm()

    def due(self, now: float) -> list[uuid.UUID]:
        """Take the entries due at `now`, earliest first: each interval entry moves to its next
        slot after `now` (once, however many slots it missed), each one-shot is removed."""
        heap = self._heap
        entries = self._next
        fired: list[uuid.UUID] = []
        again: list[tuple[uuid.UUID, float]] = []
        while heap and heap[0][0] <= now:
            _, version, task_id = heappop(heap)
            entry = entries.get(task_id)
            if entry is None or entry[2] != version:
                continue  # moved or removed since
            fired.append(task_id)
            interval = entry[1]
            if interval is None:
                del entries[task_id]
            else:
                again.append((task_id, interval))
        for task_id, interval in again:
            when = next_fire_time(task_id, interval, now + SLOT_EPSILON)
            version = next(self._versions)
            entries[task_id] = (when, interval, version)
            heappush(heap, (when, version, task_id))
        return fired

    def _on_timer(self) -> None:
        self._timer = None
        self._armed_for = math.inf
        if self._paused:
            return
        for task_id in self.due(self.clock()):
            self.fire(task_id)
        self._arm()

    def _arm(self) -> None:
        """Make the timer go off at the tick of the earliest entry (at once if it is due)."""
        if self._paused:
            return
        entry = self._first_live()
        if entry is None:
            self._disarm()
            return
        wake = math.ceil(entry[0] / self.tick) * self.tick if self.tick else entry[0]
        wake = max(wake, entry[0])  # never before the entry itself (float rounding)
        if self._timer is not None and self._armed_for <= wake:
            return
        self._disarm()
        self._armed_for = wake
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(max(0.0, wake - self.clock()), self._on_timer)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._armed_for = math.inf

    def _first_live(self) -> _Entry | None:
        heap = self._heap
        entries = self._next
        while heap:
            entry = heap[0]
            found = entries.get(entry[2])
            if found is not None and found[2] == entry[1]:
                return entry
            heappop(heap)
        return None

    def _compact_if_sparse(self) -> None:
        if len(self._heap) > COMPACT_RATIO * len(self._next) + COMPACT_MARGIN:
            self._heap = [
                (when, version, task_id) for task_id, (when, _, version) in self._next.items()
            ]
            heapify(self._heap)
