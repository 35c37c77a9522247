"""The scheduler and the task service against real HTTP targets, the real probe and a real
SQLite store. Results are collected by a recording publisher (the Kafka publisher has its own
tests; the daemon test runs the whole path through the broker)."""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import sqlite3
import time
import uuid
import weakref
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from checker_common.contract import CheckResult, ErrorKind, Health
from checker_common.task_spec import TaskSpec, TaskStatus
from periodic_checker.checker_service import CheckerService
from periodic_checker.metrics import CheckerCollector
from periodic_checker.policy import TargetPolicy
from periodic_checker.probe import Prober
from periodic_checker.scheduler import (
    CheckScheduler,
    CollectorPolicy,
    ProgressWrites,
    start_bound,
)
from periodic_checker.store import SQLiteTaskStore
from periodic_checker.task_service import InvalidChange, NameTaken, TaskFilter, TooManyTasks
from periodic_checker.tasks import Task, next_fire_time, planned_fire_time, start_offset

DEADLINE = 30.0  # generous: the machine is shared


@dataclass
class RecordingPublisher:
    """Keeps every published result and wakes waiters."""

    results: list[tuple[uuid.UUID, CheckResult]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def publish(self, task_id: uuid.UUID, result: CheckResult) -> None:
        self.results.append((task_id, result))
        self.changed.set()

    def of(self, task_id: uuid.UUID) -> list[CheckResult]:
        return [result for tid, result in self.results if tid == task_id]

    async def wait_for(self, done: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + DEADLINE
        while not done():
            self.changed.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out waiting for {what}")
            try:
                await asyncio.wait_for(self.changed.wait(), remaining)
            except TimeoutError:
                continue


class CountingChecker:
    """The real probe, with a count of checks in flight per task."""

    def __init__(self, prober: Prober) -> None:
        self.prober = prober
        self.in_flight: dict[uuid.UUID, int] = defaultdict(int)
        self.most_in_flight: dict[uuid.UUID, int] = defaultdict(int)
        self.total_in_flight = 0
        self.most_total = 0

    async def check(self, task_id: uuid.UUID, spec: TaskSpec, **kw: Any) -> CheckResult:
        self.in_flight[task_id] += 1
        self.total_in_flight += 1
        self.most_in_flight[task_id] = max(self.most_in_flight[task_id], self.in_flight[task_id])
        self.most_total = max(self.most_total, self.total_in_flight)
        try:
            return await self.prober.check(task_id, spec, **kw)
        finally:
            self.in_flight[task_id] -= 1
            self.total_in_flight -= 1


@dataclass
class Target:
    url: str
    status: dict[str, int]


@pytest.fixture
async def target() -> AsyncIterator[Target]:
    """A real HTTP server: /ok, /fail, /slow (longer than any time-out), /flip (settable)."""
    status = {"flip": 500}

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    async def fail(request: web.Request) -> web.Response:
        return web.Response(status=500, text="broken")

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(10)
        return web.Response(text="late")

    async def flip(request: web.Request) -> web.Response:
        return web.Response(status=status["flip"], text="flip")

    app = web.Application()
    app.router.add_get("/ok", ok)
    app.router.add_get("/fail", fail)
    app.router.add_get("/slow", slow)
    app.router.add_get("/flip", flip)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield Target(url=f"http://127.0.0.1:{server.port}", status=status)
    finally:
        await server.close()


@dataclass
class Checker:
    store: SQLiteTaskStore
    scheduler: CheckScheduler
    service: CheckerService
    publisher: RecordingPublisher
    checker: CountingChecker


@pytest.fixture
async def make_checker(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """Factory: a started store + scheduler + service; everything is stopped at the end."""
    started: list[tuple[Checker, Prober]] = []

    async def make(path: Path | None = None, **options: Any) -> Checker:
        store = SQLiteTaskStore(
            path or tmp_path / "tasks.sqlite3", max_tasks=options.pop("max_tasks", 100)
        )
        prober = Prober(policy=TargetPolicy())
        await prober.start()
        checker = CountingChecker(prober)
        publisher = RecordingPublisher()
        scheduler = CheckScheduler(store, checker, publisher, flush_interval=0.2, **options)
        service = CheckerService(store, scheduler, policy=TargetPolicy(), publisher=None)
        await scheduler.start(store.load(datetime.now(UTC)))
        made = Checker(store, scheduler, service, publisher, checker)
        started.append((made, prober))
        return made

    yield make
    for made, prober in started:
        await stop(made)
        await prober.close()


async def stop(made: Checker) -> None:
    if not made.scheduler._stopping.is_set():
        await made.scheduler.stop(grace=5)
        made.store.close()


def spec(target: Target, path: str = "/ok", **fields: Any) -> TaskSpec:
    values: dict[str, Any] = {"name": f"task-{uuid.uuid4().hex[:8]}", "url": target.url + path}
    values.update(interval=1.0, timeout=0.8)
    values.update(fields)
    return TaskSpec(**values)


# -- live changes ----------------------------------------------------------------------------------


async def test_add_edit_pause_resume_and_remove_apply_live(
    target: Target, make_checker: Any
) -> None:
    c = await make_checker()
    task = await c.service.create(spec(target, "/ok"))
    await c.publisher.wait_for(lambda: len(c.publisher.of(task.id)) >= 2, "two runs")
    assert (await c.service.get(task.id)).health is Health.UP

    edited = await c.service.update(task.id, {"url": target.url + "/fail"})
    assert edited.health is Health.UNKNOWN
    await c.publisher.wait_for(
        lambda: any(r.url.endswith("/fail") for r in c.publisher.of(task.id)), "a run of the edit"
    )
    await c.publisher.wait_for(
        lambda: c.scheduler.tasks[task.id].health is Health.DOWN, "health down"
    )

    await c.service.pause(task.id)
    assert c.scheduler.next_fire(task.id) is None
    await wait_until(lambda: not c.scheduler.running(task.id))
    count = len(c.publisher.of(task.id))
    # Another task's two runs show time passing; the paused one must not have run meanwhile.
    witness = await c.service.create(spec(target, "/ok"))
    await c.publisher.wait_for(lambda: len(c.publisher.of(witness.id)) >= 2, "witness runs")
    assert len(c.publisher.of(task.id)) == count

    resumed = await c.service.resume(task.id)
    assert resumed.status is TaskStatus.ACTIVE
    assert c.scheduler.next_fire(task.id) is not None
    await c.publisher.wait_for(lambda: len(c.publisher.of(task.id)) > count, "a run after resume")

    await c.service.delete(task.id)
    assert c.scheduler.next_fire(task.id) is None
    assert task.id not in c.scheduler.tasks
    assert c.store.get(task.id) is None


async def wait_until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_service_errors(target: Target, make_checker: Any) -> None:
    c = await make_checker(max_tasks=2)
    first = await c.service.create(spec(target, name="same"))
    with pytest.raises(NameTaken):
        await c.service.create(spec(target, name="same"))
    await c.service.create(spec(target, name="second"))
    with pytest.raises(TooManyTasks):
        await c.service.create(spec(target, name="third"))
    done = await c.service.update(first.id, {"end_after_runs": 1})
    await c.publisher.wait_for(
        lambda: c.scheduler.tasks[first.id].status is TaskStatus.DONE, "the task to be done"
    )
    assert done.status is TaskStatus.ACTIVE
    with pytest.raises(InvalidChange, match="done"):
        await c.service.resume(first.id)


async def test_put_creates_then_replaces_under_the_clients_id(
    target: Target, make_checker: Any
) -> None:
    c = await make_checker()
    task_id = uuid.uuid4()
    created, was_created = await c.service.put(
        task_id, spec(target, name="mine", interval=60, timeout=5)
    )
    replaced, again = await c.service.put(
        task_id, spec(target, name="mine", interval=30, timeout=5)
    )
    assert (was_created, again) == (True, False)
    assert created.id == replaced.id == task_id
    assert replaced.spec.interval == 30
    page = await c.service.list(TaskFilter(text="mine"))
    assert [t.id for t in page.tasks] == [task_id]


async def test_run_now_checks_publishes_and_returns_the_result(
    target: Target, make_checker: Any
) -> None:
    c = await make_checker()
    task = await c.service.create(spec(target, "/ok", interval=3600, timeout=5))
    result = await c.service.run_now(task.id)
    assert result.ok
    assert result.status == 200
    assert result.health is Health.UP
    assert c.publisher.of(task.id) == [result]
    after = await c.service.get(task.id)
    assert after.runs == 0, "a run by hand is not one of its scheduled runs"
    assert after.manual_runs == 1
    status = c.service.status()
    assert status.tasks_by_status == {"active": 1}
    assert status.tasks_by_health == {"up": 1}


# -- overlap, caps, retries ------------------------------------------------------------------------


async def test_a_task_never_overlaps_itself(target: Target, make_checker: Any) -> None:
    """Each run lasts about 2.4 s (three timed-out attempts) against an interval of 1 s."""
    c = await make_checker(per_host_in_flight=2)
    slow = [
        await c.service.create(spec(target, "/slow", timeout=0.6, retries=2, retry_interval=0.3))
        for _ in range(3)
    ]
    await wait_until(lambda: c.scheduler.stats.skipped_overlap >= 6)
    await c.publisher.wait_for(
        lambda: all(c.scheduler.tasks[t.id].health is Health.DOWN for t in slow), "downs"
    )
    for task in slow:
        assert c.checker.most_in_flight[task.id] == 1
        attempts = [r.attempt for r in c.publisher.of(task.id)]
        assert attempts[:3] == [1, 2, 3]
    # Three tasks on one host, at most two checks there at once.
    assert c.checker.most_total <= 2


@pytest.mark.parametrize(
    ("interval", "max_start_lag", "bound"),
    [(60.0, 5.0, 5.0), (4.0, 5.0, 2.0), (1.0, 0.2, 0.2), (None, 5.0, None)],
)
def test_a_slot_may_start_late_by_max_start_lag_or_half_its_interval(
    interval: float | None, max_start_lag: float, bound: float | None
) -> None:
    assert start_bound(interval, max_start_lag) == bound


async def test_a_slot_that_cannot_start_in_time_is_skipped_and_counted_not_run_late(
    target: Target, make_checker: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """One check at a time; one task holds the slot 0.9 s of every second, so the others whose
    slots fall in its hold wait longer than MAX_START_LAG (0.2 s) and are shed. Each slot's place
    on the grid comes from its task id: with eight others, the chance that none lands in the
    0.7 s window that sheds is 0.3 ** 8 (under 1 in 15,000)."""
    caplog.set_level(logging.WARNING, logger="periodic_checker.scheduler")
    c = await make_checker(max_in_flight=1, max_start_lag=0.2)
    hog = await c.service.create(spec(target, "/slow", timeout=0.9))
    others = [await c.service.create(spec(target, "/ok")) for _ in range(8)]
    await wait_until(lambda: c.scheduler.stats.skipped_late >= 10)
    await wait_until(lambda: "cannot keep up" in caplog.text)
    await stop(c)

    status = c.service.status().extra
    assert status["slots_skipped"] == c.scheduler.stats.skipped_late
    assert sum(status["slots_skipped_by_task"].values()) <= status["slots_skipped"]
    assert set(status["slots_skipped_by_task"]) <= {str(t.id) for t in [hog, *others]}
    assert status["max_start_lag"] == 0.2
    # A skipped slot publishes nothing and is not a run: each run left one result.
    for task in [hog, *others]:
        assert c.scheduler.tasks[task.id].runs == len(c.publisher.of(task.id))


class BrokenPublisher(RecordingPublisher):
    """A publisher with a bug: it raises for every result of one task."""

    broken: uuid.UUID | None = None

    def publish(self, task_id: uuid.UUID, result: CheckResult) -> None:
        if task_id == self.broken:
            raise RuntimeError("a bug in the publisher")
        super().publish(task_id, result)


async def test_a_run_that_ends_in_an_error_of_the_checker_is_counted_where_operators_look(
    target: Target, make_checker: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # Such a run gives its task no result: counted, or a task that fails so on every run
    # (a site answering "HTTP/1.1 000", before it was handled) only shows as never checked.
    c = await make_checker()
    broken = BrokenPublisher()
    c.scheduler.publisher = broken
    healthy = await c.service.create(spec(target, "/ok"))
    silenced = await c.service.create(spec(target, "/ok"))
    broken.broken = silenced.id
    await broken.wait_for(lambda: len(broken.of(healthy.id)) >= 2, "the healthy task's results")
    await wait_until(lambda: c.scheduler.stats.runs_failed >= 2)

    assert c.service.status().extra["runs_failed"] == c.scheduler.stats.runs_failed
    metrics = {m.name: m for m in CheckerCollector(c.scheduler, None).collect()}
    assert metrics["periodic_checker_runs_failed"].samples[0].value >= 2
    assert f"run of task {silenced.id} failed" in caplog.text
    assert broken.of(silenced.id) == []


async def test_retries_come_before_down_and_health_moves_after_the_last_attempt(
    target: Target, make_checker: Any
) -> None:
    c = await make_checker()
    task = await c.service.create(
        spec(target, "/flip", interval=60, timeout=5, retries=2, retry_interval=0.1)
    )
    first_run = await c.service.run_now(task.id)  # by hand: one attempt, no retries
    assert first_run.health is Health.DOWN
    await c.service.delete(task.id)

    task = await c.service.create(
        spec(target, "/flip", interval=1, timeout=0.8, retries=2, retry_interval=0.1)
    )
    await c.publisher.wait_for(lambda: len(c.publisher.of(task.id)) >= 3, "three attempts")
    first = c.publisher.of(task.id)[:3]
    assert [r.attempt for r in first] == [1, 2, 3]
    assert [r.ok for r in first] == [False, False, False]
    assert [r.health for r in first] == [Health.UNKNOWN, Health.UNKNOWN, Health.DOWN]
    assert first[0].error is not None
    assert first[0].error.kind is ErrorKind.STATUS
    assert first[1].scheduled_at is not None
    assert first[1].scheduled_at > first[0].timestamp

    target.status["flip"] = 200
    await c.publisher.wait_for(lambda: c.publisher.of(task.id)[-1].health is Health.UP, "up")
    assert c.publisher.of(task.id)[-1].attempt == 1


# -- ends and errors -------------------------------------------------------------------------------


async def test_one_shot_and_end_after_runs_become_done(target: Target, make_checker: Any) -> None:
    c = await make_checker()
    once = await c.service.create(spec(target, "/ok", interval=None, timeout=5))
    twice = await c.service.create(spec(target, "/fail", end_after_runs=2))
    await c.publisher.wait_for(
        lambda: (
            c.scheduler.tasks[once.id].status is TaskStatus.DONE
            and c.scheduler.tasks[twice.id].status is TaskStatus.DONE
        ),
        "both done",
    )
    assert len(c.publisher.of(once.id)) == 1
    assert len(c.publisher.of(twice.id)) == 2
    assert c.scheduler.next_fire(once.id) is None
    assert c.scheduler.next_fire(twice.id) is None
    await c.scheduler.flush()
    stored = c.store.get(twice.id)
    assert stored is not None
    assert stored.status is TaskStatus.DONE
    assert stored.runs == 2
    assert stored.health is Health.DOWN
    assert stored.status_reason == "ran 2 of 2 runs"


async def test_a_task_whose_end_time_passes_between_runs_ends_at_its_next_slot_unchecked(
    target: Target, make_checker: Any
) -> None:
    """`end_at` is the last moment a check may start: the slot after it ends the task (done,
    written, told) without checking the site once more."""
    c = await make_checker()
    told: list[Task] = []
    c.scheduler.on_status_change = told.append
    end_at = datetime.now(UTC) + timedelta(seconds=3.5)  # a run or more before it, here too
    task = await c.service.create(spec(target, "/ok", interval=1.0, end_at=end_at))

    await wait_until(lambda: c.scheduler.tasks[task.id].status is TaskStatus.DONE)

    ended = c.scheduler.tasks[task.id]
    assert ended.status_reason == f"end time {end_at.isoformat()} reached"
    assert c.publisher.of(task.id), "it ran before its end"
    assert all(r.timestamp < end_at for r in c.publisher.of(task.id))
    assert ended.runs == len(c.publisher.of(task.id))
    assert c.scheduler.next_fire(task.id) is None
    assert [(t.id, t.status) for t in told] == [(task.id, TaskStatus.DONE)]
    await c.scheduler.flush()
    stored = c.store.get(task.id)
    assert stored is not None
    assert (stored.status, stored.status_reason) == (TaskStatus.DONE, ended.status_reason)


async def test_a_target_the_policy_refuses_puts_the_task_in_error(make_checker: Any) -> None:
    c = await make_checker()
    # Created by name (allowed), resolved to a denied address at check time.
    deny = TargetPolicy.from_strings("127.0.0.0/8,::1/128")
    c.scheduler.checker = CountingChecker(Prober(policy=deny))
    await c.scheduler.checker.prober.start()
    try:
        task = await c.service.create(
            TaskSpec(name="inside", url="http://localhost:9/", interval=1, timeout=0.8, retries=2)
        )
        await c.publisher.wait_for(
            lambda: c.scheduler.tasks[task.id].status is TaskStatus.ERROR, "error status"
        )
        (result,) = c.publisher.of(task.id)
        assert result.error is not None
        assert result.error.kind is ErrorKind.DENIED_TARGET
        reason = c.scheduler.tasks[task.id].status_reason or ""
        assert reason.startswith("target refused by policy")
        assert c.scheduler.next_fire(task.id) is None
    finally:
        await c.scheduler.checker.prober.close()


async def test_a_stored_definition_that_no_longer_validates_is_not_scheduled(
    tmp_path: Path, target: Target, make_checker: Any
) -> None:
    path = tmp_path / "old.sqlite3"
    store = SQLiteTaskStore(path)
    good = Task(id=uuid.uuid4(), spec=spec(target), created_at=_now(), updated_at=_now())
    store.insert(good)
    store.close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE tasks SET spec = json_set(spec, '$.timeout', 5.0)")
    c = await make_checker(path)
    task = c.scheduler.tasks[good.id]
    assert task.status is TaskStatus.ERROR
    assert "timeout: must be below the interval" in (task.status_reason or "")
    assert c.scheduler.next_fire(good.id) is None
    with pytest.raises(InvalidChange, match="does not validate"):
        await c.service.resume(good.id)
    fixed = await c.service.update(good.id, {"timeout": 0.5})
    assert fixed.status is TaskStatus.ACTIVE
    assert c.scheduler.next_fire(good.id) is not None


# -- state writes ----------------------------------------------------------------------------------


def stored(path: Path, task_id: uuid.UUID) -> Task:
    """The task as written to the file, read through a connection of its own."""
    store = SQLiteTaskStore(path)
    try:
        task = store.get(task_id)
    finally:
        store.close()
    assert task is not None
    return task


async def test_progress_waits_for_its_own_flush_but_health_and_ends_are_written_promptly(
    tmp_path: Path, target: Target, make_checker: Any
) -> None:
    path = tmp_path / "writes.sqlite3"
    c = await make_checker(path, progress_flush_interval=3600)
    steady = await c.service.create(spec(target, "/ok"))  # open-ended, always up
    ending = await c.service.create(spec(target, "/ok", end_after_runs=1000))
    flip = await c.service.create(spec(target, "/flip"))  # down until the target flips
    tasks = c.scheduler.tasks
    await c.publisher.wait_for(
        lambda: (
            tasks[steady.id].runs >= 3
            and tasks[ending.id].runs >= 3
            and tasks[flip.id].health is Health.DOWN
        ),
        "three runs each",
    )
    runs_before_flip = tasks[steady.id].runs
    ending_runs_before_flip = tasks[ending.id].runs
    target.status["flip"] = 200

    # The health change is written by the short flush...
    await wait_until(lambda: stored(path, flip.id).health is Health.UP)
    # ... which writes every prompt change made before it: the runs of a task with an end,
    ending_stored = stored(path, ending.id)
    assert ending_stored.runs >= ending_runs_before_flip
    # but not the runs of the open-ended task, only its first one (health unknown -> up).
    steady_stored = stored(path, steady.id)
    assert steady_stored.health is Health.UP
    assert steady_stored.runs < runs_before_flip

    await stop(c)
    final = c.scheduler.tasks[steady.id]
    steady_stored = stored(path, steady.id)
    assert steady_stored.runs == final.runs, "stop() writes the progress too"
    assert steady_stored.last_run_at == final.last_run_at


async def test_progress_is_written_every_progress_flush_interval(
    tmp_path: Path, target: Target, make_checker: Any
) -> None:
    path = tmp_path / "progress.sqlite3"
    c = await make_checker(path, progress_flush_interval=0.5)
    steady = await c.service.create(spec(target, "/ok"))
    await c.publisher.wait_for(lambda: c.scheduler.tasks[steady.id].runs >= 3, "three runs")
    await wait_until(lambda: stored(path, steady.id).runs >= 3)


# -- restart ---------------------------------------------------------------------------------------


async def test_a_restart_resumes_state_and_phase(
    tmp_path: Path, target: Target, make_checker: Any
) -> None:
    path = tmp_path / "restart.sqlite3"
    c = await make_checker(path)
    up = await c.service.create(spec(target, "/ok", interval=2, timeout=1))
    down = await c.service.create(spec(target, "/fail", interval=2, timeout=1))
    held = await c.service.create(spec(target, "/ok", interval=60, timeout=5))
    await c.service.pause(held.id)
    await c.publisher.wait_for(
        lambda: (
            c.scheduler.tasks[up.id].health is Health.UP
            and c.scheduler.tasks[down.id].health is Health.DOWN
        ),
        "both checked",
    )
    await stop(c)
    runs = {t.id: t.runs for t in c.scheduler.tasks.values()}

    again = await make_checker(path)
    assert again.scheduler.tasks[up.id].health is Health.UP
    assert again.scheduler.tasks[down.id].health is Health.DOWN
    assert again.scheduler.tasks[up.id].runs == runs[up.id] >= 1
    assert again.scheduler.tasks[held.id].status is TaskStatus.PAUSED
    assert again.scheduler.next_fire(held.id) is None
    for task in (up, down):
        fire = again.scheduler.next_fire(task.id)
        assert fire is not None
        # The next fire is the task's own slot on its grid, not "now" for everyone.
        cycles = (fire.timestamp() - start_offset(task.id, 2)) / 2
        assert cycles == pytest.approx(round(cycles), abs=1e-3)
    await again.publisher.wait_for(lambda: len(again.publisher.of(up.id)) >= 1, "a run")
    assert again.scheduler.lags.count >= 1
    assert again.scheduler.lags.percentile(99) is not None


def _now() -> datetime:
    return datetime.now(UTC)


def store_many(path: Path, count: int, interval: float) -> None:
    store = SQLiteTaskStore(path, max_tasks=count)
    for i in range(count):
        store.insert(
            Task(
                id=uuid.uuid4(),
                spec=TaskSpec(name=f"t{i}", url="http://unused.test/", interval=interval),
                created_at=_now(),
                updated_at=_now(),
            )
        )
    store.close()


async def test_a_restart_with_many_tasks_spreads_them_over_the_interval(
    tmp_path: Path, make_checker: Any
) -> None:
    store_many(tmp_path / "many.sqlite3", 3000, 600)
    started = time.time()
    c = await make_checker(tmp_path / "many.sqlite3", max_tasks=3000)
    fires = [c.scheduler.next_fire(task_id) for task_id in c.scheduler.tasks]
    seconds = [f.timestamp() - started for f in fires if f is not None]
    assert len(seconds) == 3000
    assert min(seconds) >= 0, "no slot in the past: nothing fires at once at the start"
    per_minute = Counter(int(s // 60) for s in seconds)
    # 300 a minute on average over the ten minutes of the interval.
    assert len(per_minute) >= 10
    assert max(per_minute.values()) < 2 * 300


async def test_slots_that_pass_while_loading_wait_for_their_next_turn(
    tmp_path: Path, make_checker: Any
) -> None:
    """A fake clock makes each task take 0.2 s to schedule: loading lasts 600 s, a whole
    interval, so without care every task would be due at once when the scheduler starts."""
    store_many(tmp_path / "slow.sqlite3", 3000, 600)
    ticks = itertools.count()
    t0 = time.time()
    c = await make_checker(
        tmp_path / "slow.sqlite3", max_tasks=3000, clock=lambda: t0 + next(ticks) * 0.2
    )
    ready = t0 + 3000 * 0.2
    fires = [c.scheduler.next_fire(task_id) for task_id in c.scheduler.tasks]
    seconds = [f.timestamp() - ready for f in fires if f is not None]
    assert min(seconds) >= 0
    assert max(seconds) < 600 + 5  # the passes over the jobs read the clock a few times more
    assert max(Counter(int(s // 60) for s in seconds).values()) < 2 * 300


def test_the_collector_policy_freezes_survivors_and_collects_cycles_rarely() -> None:
    policy = CollectorPolicy(freeze_every=5, full_every=100)
    start = time.monotonic()
    gc.unfreeze()
    try:
        survivors = [[i] for i in range(1000)]
        policy.tick(start + 1)
        assert gc.get_freeze_count() == 0, "not before freeze_every"
        policy.tick(start + 5)
        assert gc.get_freeze_count() >= len(survivors)

        class Node:
            other: Any = None

        cycle_a, cycle_b = Node(), Node()
        cycle_a.other, cycle_b.other = cycle_b, cycle_a
        alive = weakref.ref(cycle_a)
        gc.freeze()  # the cycle is frozen, then dropped: only a full pass can free it
        del cycle_a, cycle_b
        policy.tick(start + 50)
        assert alive() is not None
        policy.tick(start + 100)
        assert alive() is None, "the full pass freed the frozen cycle"
    finally:
        gc.unfreeze()


async def test_stop_cancels_late_checks_with_one_warning_and_no_errors(
    target: Target, make_checker: Any, caplog: pytest.LogCaptureFixture
) -> None:
    c = await make_checker()
    for _ in range(3):  # one-shot checks of a page that answers after 10 s
        await c.service.create(spec(target, "/slow", interval=None, timeout=20.0))
    await wait_until(lambda: len(c.scheduler._running) == 3)

    with caplog.at_level(logging.WARNING):
        await c.scheduler.stop(grace=0.2)
        await asyncio.sleep(0.1)  # the cancelled checks end on the loop

    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert any("cancelled 3 checks" in r.getMessage() for r in caplog.records)
    c.store.close()


def _progress_task(runs: int, task_id: uuid.UUID | None = None) -> Task:
    now = datetime.now(UTC)
    spec = TaskSpec(name="progress", url="http://127.0.0.1:9/", interval=60)
    return Task(id=task_id or uuid.uuid4(), spec=spec, created_at=now, updated_at=now, runs=runs)


def test_progress_is_written_in_the_order_of_first_change_once_it_has_waited() -> None:
    writes = ProgressWrites()
    first, second, third = _progress_task(1), _progress_task(1), _progress_task(1)
    writes.put(first, now=10.0)
    writes.put(second, now=20.0)
    writes.put(third, now=30.0)
    writes.put(_progress_task(5, first.id), now=35.0)  # newer state, same place in the queue

    taken = writes.take(since=25.0)

    assert list(taken) == [first.id, second.id]
    assert taken[first.id].runs == 5
    assert third.id in writes
    assert list(writes.take(since=None)) == [third.id]
    assert len(writes) == 0


def test_progress_taken_for_a_prompt_write_leaves_the_queue() -> None:
    writes = ProgressWrites()
    task = _progress_task(1)
    writes.put(task, now=1.0)

    assert writes.pop(task.id) == task
    writes.put(_progress_task(2, task.id), now=50.0)  # queued again: waits from its new change

    assert writes.take(since=40.0) == {}
    assert list(writes.take(since=50.0)) == [task.id]


async def test_a_task_changing_status_by_itself_is_told_at_load_and_when_it_ends(
    target: Target, tmp_path: Path
) -> None:
    """The task topic hears of these changes through `on_status_change` (single mode publishes
    them; cluster mode shares them between nodes)."""
    store = SQLiteTaskStore(tmp_path / "tasks.sqlite3")
    now = datetime.now(UTC)
    past = spec(target, end_at=now - timedelta(seconds=1))
    store.insert(Task(id=uuid.uuid4(), spec=past, created_at=now, updated_at=now))
    prober = Prober(policy=TargetPolicy())
    await prober.start()
    scheduler = CheckScheduler(store, prober, RecordingPublisher(), flush_interval=0.2)
    told: list[Task] = []
    scheduler.on_status_change = told.append
    service = CheckerService(store, scheduler, policy=TargetPolicy())
    try:
        await scheduler.start(store.load(now))
        assert [(t.spec.name, t.status) for t in told] == [(past.name, TaskStatus.DONE)]
        once = await service.create(spec(target, interval=None))
        await wait_until(lambda: len(told) == 2)
        assert (told[1].id, told[1].status, told[1].status_reason) == (
            once.id, TaskStatus.DONE, "one-shot task ran",
        )  # fmt: skip
    finally:
        await scheduler.stop(grace=5)
        await prober.close()
        store.close()


# -- cluster mode: tasks this node owns (ownership.py) ---------------------------------------


async def test_a_task_not_owned_is_kept_but_never_scheduled_and_take_release_move_it(
    target: Target, make_checker: Any
) -> None:
    c = await make_checker()
    owned: set[uuid.UUID] = set()
    c.scheduler.owns = lambda task_id: task_id in owned
    task = await c.service.create(spec(target, "/slow", interval=2.0, timeout=1.5))
    assert c.scheduler.tasks[task.id] == task  # shown, as every node shows every task
    assert c.scheduler.next_fire(task.id) is None  # but not run here

    owned.add(task.id)
    passed = next_fire_time(task.id, 2.0, time.time())
    await asyncio.sleep(passed - time.time() + 0.1)  # a slot just passed, within the bound
    c.scheduler.take(task, first=passed, skipped=2)  # a slot of the handover, run late
    fire = c.scheduler.next_fire(task.id)
    assert fire is not None
    assert fire.timestamp() == pytest.approx(passed, abs=0.001)
    assert c.scheduler.stats.skipped_handover == 2
    assert c.scheduler.skipped_slots[task.id] == 2
    assert c.scheduler.stats.skipped_late == 0  # not load shedding
    await wait_until(lambda: c.scheduler.running(task.id))
    assert c.scheduler.last_slots[task.id] == pytest.approx(passed, abs=0.001)

    owned.discard(task.id)
    still = await c.scheduler.release([task.id], grace=0.1)  # /slow answers after 10 s
    assert still == 1  # handed over anyway; it finishes here, unwaited
    assert c.scheduler.next_fire(task.id) is None
    assert task.id in c.scheduler.tasks


async def test_a_handovers_late_slots_run_once_each_with_their_own_slot(
    target: Target, make_checker: Any
) -> None:
    c = await make_checker()
    owned: set[uuid.UUID] = set()
    c.scheduler.owns = lambda task_id: task_id in owned
    task = await c.service.create(spec(target, "/ok", interval=2.0, timeout=1.5))
    owned.add(task.id)
    now = time.time()
    upcoming = next_fire_time(task.id, 2.0, now)
    # Five slots that passed while the task moved, 2-10 s old: far beyond MAX_START_LAG
    # (half the interval, 1 s), run all the same, each as the slot it stands for.
    late = [planned_fire_time(task.id, 2.0, upcoming - k * 2.0 + 1.0) for k in range(5, 0, -1)]
    c.scheduler.take(task, first=now, late=late)

    def planned() -> list[float]:
        return [r.scheduled_at.timestamp() for r in c.publisher.of(task.id) if r.scheduled_at]

    await c.publisher.wait_for(lambda: len(planned()) >= 7, "the late slots and two more")
    ran = planned()
    assert ran[:5] == pytest.approx(late, abs=1e-6)  # oldest first, each once
    # Then the task's own slots, on time (one shed under load would be counted, not run late).
    assert all(r >= upcoming - 1e-6 for r in ran[5:])
    assert len(set(ran)) == len(ran)
    assert c.scheduler.last_slots[task.id] >= upcoming
