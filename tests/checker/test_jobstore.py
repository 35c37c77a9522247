"""The heap job store answers the scheduler exactly as APScheduler's MemoryJobStore does, and a
real AsyncIOScheduler on it fires interval jobs in order."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from apscheduler.events import EVENT_JOB_SUBMITTED, JobSubmissionEvent
from apscheduler.job import Job
from apscheduler.jobstores.base import ConflictingIdError, JobLookupError
from apscheduler.jobstores.memory import MemoryJobStore
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.schedulers.base import BaseScheduler
from apscheduler.triggers.date import DateTrigger
from apscheduler.triggers.interval import IntervalTrigger

from periodic_checker.jobstore import COMPACT_MARGIN, COMPACT_RATIO, HeapJobStore

T0 = datetime(2030, 1, 1, tzinfo=UTC)
DEADLINE = 30.0  # generous: the machine is shared
OWNER = AsyncIOScheduler(timezone=UTC)  # the jobs' scheduler, never started


def at(seconds: float | None) -> datetime | None:
    return None if seconds is None else T0 + timedelta(seconds=seconds)


def noop() -> None:
    pass


def make_job(job_id: str, seconds: float | None) -> Job:
    """A real APScheduler job; `seconds` after T0 is its next run time (None: paused)."""
    return Job(
        OWNER,
        id=job_id,
        name=job_id,
        func=noop,
        args=(),
        kwargs={},
        trigger=DateTrigger(T0, timezone=UTC),
        executor="default",
        misfire_grace_time=None,
        coalesce=True,
        max_instances=1,
        next_run_time=at(seconds),
    )


def apply(store: Any, operation: tuple[Any, ...]) -> Any:
    """One operation as the scheduler makes it; job lists come back as ids, errors as types."""
    kind, *args = operation
    try:
        if kind == "add":
            return store.add_job(make_job(*args))
        if kind == "replace":  # add_job(replace_existing=True): a new Job object
            return store.update_job(make_job(*args))
        if kind == "fire":  # _process_jobs: the stored job is changed in place, then updated
            job_id, seconds = args
            job = store.lookup_job(job_id)
            if job is None:
                raise JobLookupError(job_id)
            job._modify(next_run_time=at(seconds))
            return store.update_job(job)
        if kind == "remove":
            return store.remove_job(*args)
        if kind == "lookup":
            job = store.lookup_job(*args)
            return None if job is None else (job.id, job.next_run_time)
        if kind == "due":
            return [job.id for job in store.get_due_jobs(at(args[0]))]
        if kind == "next":
            return store.get_next_run_time()
        if kind == "all":
            return [(job.id, job.next_run_time) for job in store.get_all_jobs()]
        if kind == "clear":
            return store.remove_all_jobs()
    except (ConflictingIdError, JobLookupError) as exc:
        return type(exc)
    raise AssertionError(f"unknown operation {kind}")


OPERATIONS: list[tuple[Any, ...]] = [
    ("next",),
    ("all",),
    ("due", 100),
    ("add", "b", 20),
    ("add", "a", 20),  # same time: ordered by id
    ("add", "c", 10),
    ("add", "p", None),  # paused: never due, listed last
    ("add", "o", None),
    ("add", "a", 5),  # ConflictingIdError
    ("next",),
    ("all",),
    ("due", 9.999),
    ("due", 10),  # a job due exactly now is due
    ("due", 20),
    ("lookup", "a"),
    ("lookup", "zz"),
    ("fire", "c", 30),
    ("fire", "a", 20),  # same time again
    ("replace", "b", 25),
    ("due", 20),
    ("next",),
    ("all",),
    ("fire", "p", 1),  # a paused job resumed, due at once
    ("fire", "a", None),  # and a job paused
    ("due", 100),
    ("next",),
    ("all",),
    ("replace", "zz", 1),  # JobLookupError
    ("fire", "zz", 1),
    ("remove", "zz"),
    ("remove", "c"),
    ("remove", "c"),
    ("due", 100),
    ("all",),
    ("fire", "b", 1),
    ("fire", "b", 50),
    ("fire", "b", 1),  # back to an earlier time: only one entry counts
    ("due", 1),
    ("remove", "b"),
    ("remove", "p"),
    ("next",),  # only paused jobs left
    ("due", 1000),
    ("all",),
    ("add", "c", 3),  # a removed id can be added again
    ("all",),
    ("clear",),
    ("next",),
    ("all",),
    ("lookup", "c"),
]


def test_the_heap_store_answers_like_the_memory_store() -> None:
    memory, heap = MemoryJobStore(), HeapJobStore()
    for step, operation in enumerate(OPERATIONS):
        expected = apply(memory, operation)
        assert apply(heap, operation) == expected, f"step {step}: {operation}"


def test_random_operations_answer_like_the_memory_store() -> None:
    """Many updates per job (stale heap entries, rebuilds), ties, pauses and removals."""
    rnd = random.Random(20301)
    memory, heap = MemoryJobStore(), HeapJobStore()
    ids = [f"job-{i:02d}" for i in range(40)]
    for step in range(20_000):
        job_id = rnd.choice(ids)
        seconds = rnd.choice([None, rnd.randrange(0, 50), rnd.uniform(0, 50)])
        operation = rnd.choice(
            [
                ("add", job_id, seconds),
                ("fire", job_id, seconds),
                ("fire", job_id, seconds),
                ("fire", job_id, seconds),
                ("replace", job_id, seconds),
                ("remove", job_id),
                ("due", rnd.uniform(0, 50)),
                ("next",),
                ("lookup", job_id),
            ]
        )
        expected = apply(memory, operation)
        assert apply(heap, operation) == expected, f"step {step}: {operation}"
        if step % 1000 == 0:
            assert apply(heap, ("all",)) == apply(memory, ("all",))
    assert len(heap._heap) <= COMPACT_RATIO * len(ids) + COMPACT_MARGIN + 1


def test_a_tick_rounds_the_wake_up_up_to_the_tick_and_never_before_the_job() -> None:
    store = HeapJobStore(tick=0.25)
    store.add_job(make_job("a", 10.1))
    store.add_job(make_job("b", 10.2))
    assert store.get_next_run_time() == at(10.25)
    assert [job.id for job in store.get_due_jobs(at(10.25))] == ["a", "b"]
    store.update_job(make_job("a", 11.0))
    store.remove_job("b")
    wake = store.get_next_run_time()
    assert wake is not None
    assert at(11.0) <= wake <= at(11.25)
    with pytest.raises(ValueError, match="tick"):
        HeapJobStore(tick=-1)


@pytest.mark.parametrize("tick", [0.0, 0.005])
async def test_a_real_scheduler_fires_interval_jobs_in_order(tick: float) -> None:
    interval = 0.3
    started: list[str] = []
    submitted: list[tuple[str, list[datetime]]] = []  # job id, its planned times, per submission

    async def run(job_id: str) -> None:
        started.append(job_id)

    def on_submit(event: JobSubmissionEvent) -> None:
        submitted.append((event.job_id, list(event.scheduled_run_times)))

    scheduler = AsyncIOScheduler(
        timezone=UTC,
        jobstores={"default": HeapJobStore(tick=tick)},
        # Every slot runs, even after a stall of the (shared, noisy) machine.
        job_defaults={"coalesce": False, "misfire_grace_time": None},
    )
    scheduler.add_listener(on_submit, EVENT_JOB_SUBMITTED)
    scheduler.start(paused=True)
    first = datetime.now(UTC) + timedelta(seconds=0.5)
    ids = [f"job-{i}" for i in range(6)]
    for i, job_id in reversed(list(enumerate(ids))):  # added out of order
        start = first + timedelta(seconds=interval * i / len(ids))
        trigger = IntervalTrigger(seconds=interval, start_date=start, timezone=UTC)
        scheduler.add_job(run, trigger, args=(job_id,), id=job_id)
    scheduler.add_job(run, trigger, args=("paused",), id="paused", next_run_time=None)
    scheduler.add_job(run, trigger, args=("removed",), id="removed")
    scheduler.remove_job("removed")
    scheduler.resume()
    try:
        await wait_until(lambda: len(started) >= 5 * len(ids), scheduler)
    finally:
        scheduler.shutdown(wait=False)
        await asyncio.sleep(0)

    assert "paused" not in started
    assert "removed" not in started
    earliest = [times[0] for _, times in submitted]
    assert earliest == sorted(earliest), "submitted in order of their planned time"
    in_order = [job_id for job_id, times in submitted for _ in times]
    assert started == in_order[: len(started)], "started in the order submitted"
    for job_id in ids:
        own = [
            when for submitted_id, times in submitted if submitted_id == job_id for when in times
        ]
        assert len(own) >= 4
        # Every slot of the job's grid, none skipped or repeated.
        gaps = {(b - a).total_seconds() for a, b in itertools.pairwise(own)}
        assert gaps == {interval}, job_id


async def wait_until(done: Any, scheduler: BaseScheduler) -> None:
    deadline = time.monotonic() + DEADLINE
    while not done():
        assert time.monotonic() < deadline, f"too few fires: {scheduler.get_jobs()}"
        await asyncio.sleep(0.02)
