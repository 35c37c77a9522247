"""An in-memory APScheduler 3 job store for many interval jobs: a dict and a heap.

APScheduler's MemoryJobStore keeps one list sorted by next run time, so every fire (its
`update_job`) runs a binary search written in Python twice and moves a slice of the whole list
(O(n) at 100,000 jobs). Here a job's record lives in a dict and its next run time in a heap of
`(timestamp, job id, version)` entries: add, update and remove are O(log n) in C. An entry whose
job was updated or removed stays in the heap, marked stale by its version, until it reaches the
top, where it is dropped (lazy deletion); the heap is rebuilt when stale entries outnumber live
ones.

`tick` (seconds, 0 to disable) lets the scheduler wake once for all the jobs due within the same
tick instead of once a job: `get_next_run_time` rounds up to the next multiple of the tick.
Jobs still run in order of their next run time, each at most one tick later than planned (the
schedule lag includes it).

What it saves, measured by `bench/jobstore.py` (100,000 jobs every 60 s, an empty job, 3 runs):
APScheduler's CPU per fire 145 us with MemoryJobStore, 79 us with this store and no tick, 25 us
with the checker's 5 ms tick.
"""

from __future__ import annotations

import itertools
import math
from datetime import UTC, datetime
from heapq import heapify, heappop, heappush
from typing import Any

from apscheduler.jobstores.base import BaseJobStore, ConflictingIdError, JobLookupError

# Rebuild the heap when it holds more than this many entries per live job (plus a margin, so
# a small store is not rebuilt over and over).
COMPACT_RATIO = 2
COMPACT_MARGIN = 1024

_Entry = tuple[float, str, int]  # (next run timestamp, job id, version)


class HeapJobStore(BaseJobStore):  # type: ignore[misc]  # apscheduler has no type hints
    """A drop-in replacement for MemoryJobStore, with O(log n) updates."""

    def __init__(self, tick: float = 0.0) -> None:
        super().__init__()
        if tick < 0:
            raise ValueError(f"tick must be 0 or more seconds, not {tick}")
        self.tick = tick
        # job id -> (job, next run timestamp or None when paused, version of its heap entry)
        self._jobs: dict[str, tuple[Any, float | None, int]] = {}
        self._heap: list[_Entry] = []
        self._versions = itertools.count()

    def lookup_job(self, job_id: str) -> Any:
        record = self._jobs.get(job_id)
        return None if record is None else record[0]

    def get_due_jobs(self, now: datetime) -> list[Any]:
        """The jobs whose next run time is at or before `now`, earliest first (ties by id)."""
        limit = now.timestamp()
        heap = self._heap
        jobs = self._jobs
        due: list[_Entry] = []
        while heap and heap[0][0] <= limit:
            entry = heappop(heap)
            record = jobs.get(entry[1])
            if record is not None and record[2] == entry[2]:
                due.append(entry)
        # They stay stored until the scheduler updates or removes them.
        for entry in due:
            heappush(heap, entry)
        return [jobs[entry[1]][0] for entry in due]

    def get_next_run_time(self) -> datetime | None:
        """When the scheduler should wake next: the earliest next run time, rounded up to the
        tick; None when no job has a next run time."""
        entry = self._first_live()
        if entry is None:
            return None
        next_run_time: datetime = self._jobs[entry[1]][0].next_run_time
        if not self.tick:
            return next_run_time
        wake = datetime.fromtimestamp(math.ceil(entry[0] / self.tick) * self.tick, UTC)
        # Never before the job's own time (float and microsecond rounding).
        return max(wake, next_run_time)

    def get_all_jobs(self) -> list[Any]:
        """Every job, by next run time (ties by id), then the paused ones (by id)."""
        records = self._jobs.values()
        timed = sorted(
            ((ts, job.id, job) for job, ts, _ in records if ts is not None),
            key=lambda item: (item[0], item[1]),
        )
        paused = sorted((job for job, ts, _ in records if ts is None), key=lambda job: job.id)
        return [job for _, _, job in timed] + paused

    def add_job(self, job: Any) -> None:
        if job.id in self._jobs:
            raise ConflictingIdError(job.id)
        self._put(job, None)

    def update_job(self, job: Any) -> None:
        old = self._jobs.get(job.id)
        if old is None:
            raise JobLookupError(job.id)
        self._put(job, old)

    def remove_job(self, job_id: str) -> None:
        if self._jobs.pop(job_id, None) is None:
            raise JobLookupError(job_id)
        self._compact_if_sparse()

    def remove_all_jobs(self) -> None:
        self._jobs = {}
        self._heap = []

    def shutdown(self) -> None:
        self.remove_all_jobs()

    def _put(self, job: Any, old: tuple[Any, float | None, int] | None) -> None:
        when = job.next_run_time
        timestamp = None if when is None else when.timestamp()
        if old is not None and old[1] == timestamp:
            # Same place in the order: its heap entry stays valid.
            self._jobs[job.id] = (job, timestamp, old[2])
            return
        version = next(self._versions)
        self._jobs[job.id] = (job, timestamp, version)
        if timestamp is not None:
            heappush(self._heap, (timestamp, job.id, version))
            self._compact_if_sparse()

    def _first_live(self) -> _Entry | None:
        heap = self._heap
        jobs = self._jobs
        while heap:
            entry = heap[0]
            record = jobs.get(entry[1])
            if record is not None and record[2] == entry[2]:
                return entry
            heappop(heap)
        return None

    def _compact_if_sparse(self) -> None:
        if len(self._heap) > COMPACT_RATIO * len(self._jobs) + COMPACT_MARGIN:
            self._heap = [
                (ts, job_id, version)
                for job_id, (_, ts, version) in self._jobs.items()
                if ts is not None
            ]
            heapify(self._heap)
