"""Runs each active task on its cadence: the timetable fires, caps bound the load, the probe
checks, the health rules decide, the store and the publisher get the result.

The store is the source of truth; `start()` rebuilds the timetable from it and live changes
(add, edit, pause, remove) apply without a restart. Each task fires on a fixed grid shifted by
an offset derived from its id (`tasks.start_offset`), so tasks sharing an interval spread over
it and keep their phase across restarts. Next fire times live in `timetable.Timetable` (a dict
and a heap: a fire costs O(log n)), which wakes once per `schedule_tick` for all the tasks due
in it, adding at most one tick to the schedule lag. Each fire runs as an asyncio task; a late
wake-up runs a task once, however many of its slots passed (coalesced).

State changes are written in batches, one short transaction each, instead of one per check:
changes that matter promptly (status, its reason, health, and any change of a task that has an
end: `end_after_runs`, `end_at` or one-shot) within `flush_interval`; mere progress of an
open-ended task (runs, last_run_at, failures_in_a_row with health unchanged) once it has
waited `progress_flush_interval` since its first change, a task's changes in that time making
one write (spread over the flushes as the checks are over their intervals). `stop()` writes
everything. So a SIGKILL may lose up to `progress_flush_interval` of runs/last_run_at progress of
open-ended tasks, but never a health or status change older than `flush_interval`.

When the checker cannot keep up it sheds load explicitly: a slot that would start later than
`start_bound()` after its planned time (`max_start_lag`, at most half the task's interval) is
skipped, counted per task and in total, instead of being run late. A skipped slot publishes
nothing and changes nothing; the task's next slot is planned as usual.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from checker_common.contract import NOT_JUDGED, CheckResult, Health
from checker_common.task_spec import TaskSpec, TaskStatus
from periodic_checker import metrics
from periodic_checker.store import TaskStore
from periodic_checker.tasks import (
    Task,
    after_attempt,
    ended_by_now,
    next_fire_time,
    one_shot_fire_time,
    planned_fire_time,
)
from periodic_checker.timetable import Timetable

log = logging.getLogger(__name__)

# A fire is matched to the grid slot it was planned for; allow for a timer that goes off a
# hair before the slot (the event loop's clock has millisecond steps).
SLOT_TOLERANCE = 0.001
# The scheduler wakes once for the tasks due within a tick rather than once a task; a check
# starts at most this much later than planned because of it.
SCHEDULE_TICK = 0.005
LAG_SAMPLES = 10_000
# A slot that cannot start within this many seconds of its plan is skipped (MAX_START_LAG).
DEFAULT_MAX_START_LAG = 5.0
# Skipped slots are logged at most this often (one WARNING with the count), not one by one.
SHED_LOG_EVERY = 60.0


def start_bound(interval: float | None, max_start_lag: float) -> float | None:
    """How late a slot may start before it is skipped (pure): `max_start_lag`, but at most
    half the interval (a later start is nearer the next slot than its own). None for a
    one-shot task: its only run is never skipped."""
    if interval is None:
        return None
    return min(max_start_lag, interval / 2)


class Checker(Protocol):
    """The probe: one check of one task, never raises (errors are data in the result)."""

    async def check(
        self,
        task_id: uuid.UUID,
        spec: TaskSpec,
        *,
        scheduled_at: datetime | None = None,
        attempt: int = 1,
    ) -> CheckResult: ...


class Publisher(Protocol):
    """Takes a result for delivery; never blocks, never raises."""

    def publish(self, task_id: uuid.UUID, result: CheckResult) -> None: ...


class LagReservoir:
    """The most recent schedule lags (actual start - planned start), for p50/p99 on demand."""

    def __init__(self, size: int = LAG_SAMPLES) -> None:
        self._samples: deque[float] = deque(maxlen=size)
        self.count = 0
        self.max = 0.0

    def add(self, lag: float) -> None:
        lag = max(lag, 0.0)
        self._samples.append(lag)
        self.count += 1
        self.max = max(self.max, lag)

    def percentile(self, q: float) -> float | None:
        """The q-th percentile (0-100) of the recent samples; None before the first one."""
        if not self._samples:
            return None
        ordered = sorted(self._samples)
        index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))
        return ordered[index]


@dataclass
class _HostSlot:
    limit: asyncio.Semaphore
    users: int = 0


@dataclass
class SchedulerStats:
    fired: int = 0
    checks: int = 0
    retries: int = 0
    skipped_overlap: int = 0
    skipped_late: int = 0  # slots not started: they would have started too late
    skipped_handover: int = 0  # slots that passed while a task moved between nodes
    not_judged: int = 0  # checks the checker held up past twice their time-out
    runs_failed: int = 0  # runs that ended in an exception instead of a result (a bug: logged)
    in_flight: int = 0


class CheckScheduler:
    """The running checker's view of its tasks (`tasks`) and the timetable that runs them."""

    def __init__(
        self,
        store: TaskStore,
        checker: Checker,
        publisher: Publisher,
        *,
        max_in_flight: int = 500,
        per_host_in_flight: int = 10,
        flush_interval: float = 1.0,
        progress_flush_interval: float = 60.0,
        schedule_tick: float = SCHEDULE_TICK,
        max_start_lag: float = DEFAULT_MAX_START_LAG,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.checker = checker
        self.publisher = publisher
        # Told when a task changes its status by itself (it ended, the policy refused its
        # target), so the change can go where the task list is shared (the task topic).
        self.on_status_change: Callable[[Task], None] | None = None
        # Cluster mode: whether this node runs a task now (it owns the task's partition,
        # `ownership.py`). A task it does not own stays in `tasks` (the API shows it) with no
        # job. None: every task is this node's.
        self.owns: Callable[[uuid.UUID], bool] | None = None
        # The latest slot (planned time) each task fired for here: where a next owner
        # continues after a handover (`ownership.py`).
        self.last_slots: dict[uuid.UUID, float] = {}
        # Slots of a handover that passed and run late, oldest first (`take`), with whether
        # each is held to MAX_START_LAG (a slot of the task that came while they ran is).
        self._late: dict[uuid.UUID, deque[tuple[float, bool]]] = {}
        self.per_host_in_flight = per_host_in_flight
        self.max_start_lag = max_start_lag
        # Slots skipped per task since start (tasks removed are forgotten).
        self.skipped_slots: Counter[uuid.UUID] = Counter()
        self._shed_logged = (0, time.monotonic() - SHED_LOG_EVERY)
        self.flush_interval = flush_interval
        self.progress_flush_interval = progress_flush_interval
        self.clock = clock
        # A dict that also counts tasks by status and health, for /metrics and /status.
        self.tasks: metrics.TaskMap = metrics.TaskMap()
        self.lags = LagReservoir()
        self.stats = SchedulerStats()
        self._global = asyncio.Semaphore(max_in_flight)
        self._hosts: dict[str, _HostSlot] = {}
        self._running: dict[uuid.UUID, asyncio.Task[Any]] = {}
        self._one_shot_at: dict[uuid.UUID, float] = {}
        # Runs waiting to retry, woken early by stop() or release().
        self._retry_wakes: dict[uuid.UUID, asyncio.Event] = {}
        # States to write: `_dirty` within flush_interval, `_progress` (mere progress of
        # open-ended tasks) within progress_flush_interval. A task is in one of them at most.
        self._dirty: dict[uuid.UUID, Task] = {}
        self._progress = ProgressWrites()
        self._stopping = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        # Late runs (a collector pause, a busy loop) still happen, once; overlap is prevented
        # by `_running` (which also covers run_now) and counted quietly.
        self._timetable = Timetable(self._launch, tick=schedule_tick, clock=clock)
        self._fires: set[asyncio.Task[None]] = set()

    # -- life cycle ----------------------------------------------------------------------------

    async def start(self, tasks: Iterable[Task]) -> None:
        """Schedule the stored tasks and start firing."""
        now = datetime.now(UTC)
        owns = self.owns
        loaded: list[Task] = []
        ended = []
        for task in tasks:
            at_start = ended_by_now(task, now)
            if at_start is not task:
                ended.append(at_start)
            loaded.append(at_start)
        # At once (`TaskMap.load`): item by item, the map's counts were most of this step.
        self.tasks.load(loaded)
        # Nothing fires while the timetable is filled: it is paused until resume() below.
        for task in loaded:
            if task.status is TaskStatus.ACTIVE and (owns is None or owns(task.id)):
                self._schedule(task, at_load=True)
        if ended:
            self.store.save_states(ended)
            if self.on_status_change is not None:
                for task in ended:
                    self.on_status_change(task)
        # The loaded tasks live as long as the process: keep them out of the collector's full
        # passes, which otherwise walk every one (`bench/micro.py jobs-gc`). No collection
        # first: one pass over 100,000 loaded tasks is most of a second, for next to no garbage
        # (`CollectorPolicy` collects what cycles there are within the hour).
        gc.freeze()
        # Last, so that nothing passes after it: a first fire that fell inside the loading
        # time goes to the task's next slot. Otherwise every task whose slot passed while the
        # others were being added would fire at once: the burst a restart must not cause. Each
        # keeps its phase; like a slot during downtime, a slot during loading is not made up.
        moved = self._timetable.move_passed(self.clock())
        self._timetable.resume()
        self._flusher = asyncio.create_task(self._flush_loop(), name="state-flusher")
        if moved:
            log.info("%d tasks whose slot passed while loading wait for their next one", moved)

    async def stop(self, grace: float) -> None:
        """Stop firing, let running checks finish (up to `grace` seconds), write the last states."""
        self._stopping.set()
        for wake in self._retry_wakes.values():
            wake.set()
        self._timetable.pause()
        running = set(self._running.values())
        if running:
            log.info("waiting up to %.0f s for %d running checks", grace, len(running))
            _, late = await asyncio.wait(running, timeout=grace)
            for job in late:
                job.cancel()
            if late:
                log.warning("cancelled %d checks still running after %.0f s", len(late), grace)
                await asyncio.wait(late, timeout=5)
        if self._fires:
            # Fires that had not started when stopping began end at once.
            await asyncio.wait(set(self._fires), timeout=5)
        if self._flusher is not None:
            await self._flusher
        await self.flush()
        gc.unfreeze()

    # -- live changes --------------------------------------------------------------------------

    def add(self, task: Task) -> None:
        self.tasks[task.id] = task
        if task.status is TaskStatus.ACTIVE:
            self._schedule(task, at_load=False)

    def replace(self, task: Task) -> None:
        """A task's definition or status changed (edit, pause, resume)."""
        old = self.tasks.get(task.id)
        self.tasks[task.id] = task
        if task.id in self._dirty:
            self._dirty[task.id] = task
        else:
            self._progress.replace(task)
        if task.status is not TaskStatus.ACTIVE:
            self._unschedule(task.id)
        elif (
            old is None
            or old.status is not TaskStatus.ACTIVE
            or old.spec.interval != task.spec.interval
            or task.spec.interval is None
        ):
            self._late.pop(task.id, None)  # slots of another grid
            self._schedule(task, at_load=False)

    def remove(self, task_id: uuid.UUID) -> None:
        self.tasks.pop(task_id, None)
        self.skipped_slots.pop(task_id, None)
        self.last_slots.pop(task_id, None)
        self._dirty.pop(task_id, None)
        self._progress.pop(task_id)
        self._unschedule(task_id)

    def next_fire(self, task_id: uuid.UUID) -> datetime | None:
        fire = self._timetable.next_fire(task_id)
        return None if fire is None else datetime.fromtimestamp(fire, UTC)

    @property
    def in_flight(self) -> int:
        return self.stats.in_flight

    def running(self, task_id: uuid.UUID) -> bool:
        return task_id in self._running

    # -- cluster mode: tasks that move between nodes (`ownership.py`) ---------------------------

    def take(
        self,
        task: Task,
        *,
        first: float | None = None,
        skipped: int = 0,
        late: Iterable[float] = (),
    ) -> None:
        """Run a task this node now owns, with the state it came with. `first`: when it
        fires first (a slot that passed runs late, or is skipped, by the rule of
        MAX_START_LAG); None: the first slot from now. `late`: slots of the handover that
        passed, run at `first` one after the other, each with its own `scheduled_at` and not
        held to MAX_START_LAG (`tasks.resume_plan` bounds them). `skipped`: slots of the
        handover too old to run, counted here (`skipped_handover`, and per task)."""
        self.tasks[task.id] = task
        if skipped:
            # Not load shedding: counted apart from skipped_late (and its WARNING).
            self.stats.skipped_handover += skipped
            self.skipped_slots[task.id] += skipped
        if task.status is TaskStatus.ACTIVE:
            self._schedule(task, at_load=False, first=first)
            slots = deque((slot, False) for slot in late)
            if slots and task.spec.interval is not None:
                self._late[task.id] = slots

    def mirror(self, task: Task) -> bool:
        """Keep the state another node measured of a task this node does not run (cluster
        mode, `state_mirror`): written with the node's own state changes; nothing is
        scheduled or stopped. False when the task is gone or its definition changed."""
        current = self.tasks.get(task.id)
        if current is None or current.spec is not task.spec or current.status is not task.status:
            return False
        self.tasks[task.id] = task
        self._mark_changed(current, task)
        return True

    async def release(self, task_ids: Iterable[uuid.UUID], grace: float) -> int:
        """Stop running tasks here (another node takes them): call once `owns` says no. No
        slot of theirs starts any more, a retry waiting is dropped, and their running checks
        may finish for up to `grace` seconds (their results are published and their states
        kept). The number still running after that: they finish later, unwaited."""
        running = []
        for task_id in task_ids:
            self._unschedule(task_id)
            wake = self._retry_wakes.get(task_id)
            if wake is not None:
                wake.set()
            run = self._running.get(task_id)
            if run is not None:
                running.append(run)
        if not running:
            return 0
        _, late = await asyncio.wait(running, timeout=grace)
        return len(late)

    def _schedule(self, task: Task, *, at_load: bool, first: float | None = None) -> None:
        if self.owns is not None and not self.owns(task.id):
            if not at_load:  # at load no job exists yet
                self._unschedule(task.id)
            return
        now = self.clock()
        if task.spec.interval is None:
            fire = one_shot_fire_time(task.id, now, at_load=at_load)
            self._one_shot_at[task.id] = fire
        else:
            fire = next_fire_time(task.id, task.spec.interval, now)
        if first is not None and task.spec.interval is not None:
            # A slot that may lie in the past (a handover's missed slot): it fires at once, and
            # runs late or is skipped by the rule of MAX_START_LAG.
            fire = first
        self._timetable.set(task.id, fire, task.spec.interval)

    def _unschedule(self, task_id: uuid.UUID) -> None:
        self._one_shot_at.pop(task_id, None)
        self._late.pop(task_id, None)
        self._timetable.remove(task_id)

    def _launch(self, task_id: uuid.UUID) -> None:
        """A task's slot is due (called by the timetable): run it as an asyncio task."""
        fire = asyncio.create_task(self._fire(task_id))
        self._fires.add(fire)
        fire.add_done_callback(self._fires.discard)

    # -- one run: attempts, caps, health -------------------------------------------------------

    async def _fire(self, task_id: uuid.UUID) -> None:
        now = self.clock()
        task = self.tasks.get(task_id)
        if task is None or task.status is not TaskStatus.ACTIVE or self._stopping.is_set():
            return
        if self.owns is not None and not self.owns(task_id):
            return  # released while this fire was on its way
        self.stats.fired += 1
        late = self._late.get(task_id)
        if task_id in self._running:
            if late is not None and task.spec.interval is not None:
                # Its handover's late slots are running: this slot runs after them.
                slot = planned_fire_time(task_id, task.spec.interval, now + SLOT_TOLERANCE)
                late.append((slot, True))
                return
            self.stats.skipped_overlap += 1
            log.debug("task %s still running; this fire is skipped", task_id)
            return
        if task.spec.interval is None:
            planned = self._one_shot_at.pop(task_id, now)
        else:
            planned = planned_fire_time(task_id, task.spec.interval, now + SLOT_TOLERANCE)
            if late is None:
                self.last_slots[task_id] = planned
        current = asyncio.current_task()
        assert current is not None
        self._running[task_id] = current
        try:
            if late is None:
                await self._attempts(task_id, planned)
            else:
                await self._run_late(task_id, planned, late)
        except asyncio.CancelledError:
            if not self._stopping.is_set():
                raise
            # Cancelled by stop() after its grace period, which logged it once for all of them.
        except Exception:
            # Errors are data in results; this is a bug, and it must not end the scheduler.
            # Counted where an operator looks (/status `runs_failed`, a metric), as the task
            # gets no result from it.
            self.stats.runs_failed += 1
            log.exception("run of task %s failed", task_id, extra={"task_id": str(task_id)})
        finally:
            self._running.pop(task_id, None)

    async def _run_late(
        self, task_id: uuid.UUID, planned: float, slots: deque[tuple[float, bool]]
    ) -> None:
        """Run a handover's late slots (`take`), oldest first, then `planned` if it is a later
        slot, and any slot of the task that comes meanwhile. Each is the last slot run once it
        starts, so a release in between hands the rest on to the next owner."""
        interval = self.tasks[task_id].spec.interval
        assert interval is not None
        if not slots or planned > slots[-1][0] + interval / 2:
            slots.append((planned, True))
        try:
            while slots and not self._stopping.is_set():
                if self.owns is not None and not self.owns(task_id):
                    return  # released: the next owner runs the rest
                slot, held = slots.popleft()
                self.last_slots[task_id] = slot
                await self._attempts(task_id, slot, held=held)
        finally:
            if self._late.get(task_id) is slots:
                del self._late[task_id]

    async def _attempts(self, task_id: uuid.UUID, planned: float, *, held: bool = True) -> None:
        """A slot's check and its retries; `held`: the slot is skipped if it cannot start
        within MAX_START_LAG of `planned` (a handover's late slot is not)."""
        attempt = 1
        scheduled_at = datetime.fromtimestamp(planned, UTC)
        while True:
            task = self.tasks.get(task_id)
            if task is None or task.status is not TaskStatus.ACTIVE:
                return
            if attempt > 1 and self.owns is not None and not self.owns(task_id):
                return  # released: the retry is dropped, as at stop
            if task.spec.end_at is not None:
                # `end_at` passed since the last run: the task ends here, unchecked (a retry
                # after it is dropped the same way).
                ended = ended_by_now(task, datetime.now(UTC))
                if ended is not task:
                    self.tasks[task_id] = ended
                    self._changed(task, ended)
                    return
            spec = task.spec
            result = await self._check(
                task_id, spec, scheduled_at, attempt, planned if attempt == 1 and held else None
            )
            if result is None:
                return  # the slot was skipped: too late to start
            retry_after = self._settle(task_id, spec, result, attempt, counts_as_run=True)
            if retry_after is None or self._stopping.is_set():
                return
            self.stats.retries += 1
            scheduled_at = datetime.fromtimestamp(self.clock() + retry_after, UTC)
            if not await self._retry_wait(task_id, retry_after):
                return  # stopping or released: the retry is dropped, health stays as it was
            attempt += 1

    async def _retry_wait(self, task_id: uuid.UUID, delay: float) -> bool:
        """Wait `delay` seconds for a retry; False when woken by stop() or release()."""
        wake = self._retry_wakes[task_id] = asyncio.Event()
        if self._stopping.is_set():
            return False
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), delay)
        finally:
            self._retry_wakes.pop(task_id, None)
        return not wake.is_set()

    async def _check(
        self,
        task_id: uuid.UUID,
        spec: TaskSpec,
        scheduled_at: datetime | None,
        attempt: int,
        planned: float | None,
    ) -> CheckResult | None:
        """Run one check under the caps; None when its slot (`planned`) is skipped because it
        could only start too late."""
        host = spec.host
        slot = self._hosts.get(host)
        if slot is None:
            slot = self._hosts[host] = _HostSlot(asyncio.Semaphore(self.per_host_in_flight))
        slot.users += 1
        try:
            async with slot.limit, self._global:
                if planned is not None:
                    lag = self.clock() - planned
                    self.lags.add(lag)
                    metrics.record_lag(lag)
                    bound = start_bound(spec.interval, self.max_start_lag)
                    if bound is not None and lag > bound:
                        self.stats.skipped_late += 1
                        self.skipped_slots[task_id] += 1
                        log.debug("task %s: slot skipped, %.3f s late", task_id, lag)
                        return None
                self.stats.in_flight += 1
                self.stats.checks += 1
                try:
                    result = await self.checker.check(
                        task_id, spec, scheduled_at=scheduled_at, attempt=attempt
                    )
                finally:
                    self.stats.in_flight -= 1
        finally:
            slot.users -= 1
            if slot.users == 0:
                del self._hosts[host]
        metrics.record_check(result)
        if not result.ok:
            if result.error is not None and result.error.kind in NOT_JUDGED:
                self.stats.not_judged += 1
            _log_failure(task_id, result)
        return result

    def _settle(
        self,
        task_id: uuid.UUID,
        spec: TaskSpec,
        result: CheckResult,
        attempt: int,
        *,
        counts_as_run: bool,
    ) -> float | None:
        """Apply the health rules, record the state, publish; the retry delay or None."""
        current = self.tasks.get(task_id)
        if current is None or current.spec is not spec:
            # Deleted or edited while the check ran: publish what was measured, change nothing.
            health = Health.UNKNOWN if current is None else current.health
            self.publisher.publish(task_id, result.model_copy(update={"health": health}))
            return None
        outcome = after_attempt(
            current,
            ok=result.ok,
            error_kind=result.error.kind if result.error else None,
            error_message=result.error.message if result.error else "",
            attempt=attempt,
            now=datetime.now(UTC),
            counts_as_run=counts_as_run,
        )
        task = outcome.task
        if outcome.changed:
            self.tasks[task_id] = task
            self._changed(current, task)
        self.publisher.publish(task_id, result.model_copy(update={"health": task.health}))
        return outcome.retry_after

    def _changed(self, current: Task, task: Task) -> None:
        """A task's state changed by itself (a check's outcome, its end): written, logged, its
        slots dropped once it is no longer active, and told (`on_status_change`)."""
        task_id = task.id
        self._mark_changed(current, task)
        if task.status is not current.status:
            log.info(
                "task %s is now %s: %s", task_id, task.status, task.status_reason,
                extra={"task_id": str(task_id)},
            )  # fmt: skip
            if task.status is not TaskStatus.ACTIVE:
                self._unschedule(task_id)
            if self.on_status_change is not None:
                self.on_status_change(task)
        if task.health is not current.health:
            log.info(
                "task %s health %s -> %s", task_id, current.health, task.health,
                extra={"task_id": str(task_id)},
            )  # fmt: skip

    async def run_now(self, task_id: uuid.UUID) -> CheckResult:
        """One check at once, outside the cadence: health moves and it counts in `manual_runs`;
        `runs` and the task's end do not move. Waits for the task's running check first, so a
        task never overlaps itself."""
        while (running := self._running.get(task_id)) is not None:
            await asyncio.wait([running])
        task = self.tasks.get(task_id)
        if task is None:
            raise KeyError(task_id)
        current = asyncio.current_task()
        assert current is not None
        self._running[task_id] = current
        try:
            result = await self._check(task_id, task.spec, None, 1, None)
            assert result is not None  # only scheduled slots are skipped
            self._settle(task_id, task.spec, result, 1, counts_as_run=False)
            latest = self.tasks.get(task_id, task)
            return result.model_copy(update={"health": latest.health})
        finally:
            self._running.pop(task_id, None)

    # -- batched state writes ------------------------------------------------------------------

    def _mark_changed(self, before: Task, after: Task) -> None:
        """Queue a changed state for the prompt writes, or for the progress writes when only
        the counters of an open-ended task moved."""
        task_id = after.id
        if task_id in self._dirty or not _mere_progress(before, after):
            self._dirty[task_id] = after
            self._progress.pop(task_id)
        else:
            self._progress.put(after, time.monotonic())

    async def flush(self, *, progress_since: float | None = None) -> None:
        """Write the changed states now, in one transaction: the prompt ones, and the progress
        first recorded before `progress_since` (a monotonic time; None: all of it)."""
        batch, self._dirty = self._dirty, {}
        batch.update(self._progress.take(progress_since))  # disjoint from the prompt ones
        if not batch:
            return
        try:
            await asyncio.to_thread(self.store.save_states, list(batch.values()))
        except Exception:
            log.exception("writing %d task states failed; will retry", len(batch))
            # Retried with the next flush. A task changed meanwhile keeps its newer state,
            # written as promptly as the failed one was due.
            for task_id, task in batch.items():
                if task_id in self.tasks and task_id not in self._dirty:
                    self._dirty[task_id] = self._progress.pop(task_id) or task

    async def _flush_loop(self) -> None:
        collector = CollectorPolicy()
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.flush_interval)
            # Progress is written once it has waited progress_flush_interval: checks are
            # spread over their intervals, so each flush writes a steady slice of it rather
            # than all of it at once (100,000 rows in one go held the loop back for seconds).
            await self.flush(progress_since=time.monotonic() - self.progress_flush_interval)
            collector.tick(time.monotonic())
            self._log_shedding(time.monotonic())

    def _log_shedding(self, now: float) -> None:
        """One WARNING a minute at most while slots are being skipped, with the count."""
        count, at = self._shed_logged
        skipped = self.stats.skipped_late
        if skipped > count and now - at >= SHED_LOG_EVERY:
            log.warning(
                "the checker cannot keep up: %d slots skipped since the last report, %d in all"
                " (a slot is skipped when it would start more than MAX_START_LAG=%g s, or half"
                " its interval, late)",
                skipped - count, skipped, self.max_start_lag,
            )  # fmt: skip
            self._shed_logged = (skipped, now)


class ProgressWrites:
    """Progress states waiting to be written, in the order of their first change since the
    last write (a later change of the same task replaces the state, not its place)."""

    def __init__(self) -> None:
        # task id -> (when its first change was recorded, its newest state); a dict keeps the
        # order of first insertion when a value is replaced.
        self._waiting: dict[uuid.UUID, tuple[float, Task]] = {}

    def __len__(self) -> int:
        return len(self._waiting)

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._waiting

    def put(self, task: Task, now: float) -> None:
        first = self._waiting.get(task.id)
        self._waiting[task.id] = (now if first is None else first[0], task)

    def replace(self, task: Task) -> None:
        """A newer state of a task already waiting (an edit); nothing if it is not."""
        first = self._waiting.get(task.id)
        if first is not None:
            self._waiting[task.id] = (first[0], task)

    def pop(self, task_id: uuid.UUID) -> Task | None:
        found = self._waiting.pop(task_id, None)
        return None if found is None else found[1]

    def take(self, since: float | None) -> dict[uuid.UUID, Task]:
        """Remove and return the states first recorded before `since` (all when None)."""
        due = []
        for task_id, (first, _) in self._waiting.items():  # oldest first
            if since is not None and first > since:
                break
            due.append(task_id)
        return {task_id: self._waiting.pop(task_id)[1] for task_id in due}


def _mere_progress(before: Task, after: Task) -> bool:
    """Whether a change only counts progress (runs, last run, failures in a row) of a task
    without an end, so it may wait for the next progress write."""
    spec = after.spec
    return (
        spec.interval is not None
        and spec.end_after_runs is None
        and spec.end_at is None
        and after.status is before.status
        and after.status_reason == before.status_reason
        and after.health is before.health
    )


def _log_failure(task_id: uuid.UUID, result: CheckResult) -> None:
    """One INFO line per failed check: a failing site is data, not an error of the checker."""
    if not log.isEnabledFor(logging.INFO):
        return
    error = result.error
    kind = str(error.kind) if error is not None else "none"
    message = error.message if error is not None else ""
    verdict = "not judged" if error is not None and error.kind in NOT_JUDGED else "failed"
    log.info(
        "check of task %s %s (%s): %s", task_id, verdict, kind, message,
        extra={
            "task_id": str(task_id),
            "result_id": str(result.result_id),
            "error_kind": kind,
            "attempt": result.attempt,
        },
    )  # fmt: skip


class CollectorPolicy:
    """Keeps the garbage collector's full passes short with 100,000 tasks.

    Every fire replaces a few long-lived objects per task (the timetable's entries, the
    task's state); they pile up in the oldest generation, and a full pass then walks them all
    (0.13 s at 100k jobs, `bench/micro.py jobs-gc`: every check due in that time starts late).
    So every `freeze_every` seconds the survivors move to the permanent generation
    (`gc.freeze()`, cheap), which full passes skip; objects there are still freed by reference
    counting when replaced. Only cyclic garbage that reached the oldest generation would stay,
    so once every `full_every` seconds one full pass runs over everything: one pause an hour,
    not many.
    """

    def __init__(self, freeze_every: float = 5.0, full_every: float = 3600.0) -> None:
        self.freeze_every = freeze_every
        self.full_every = full_every
        now = time.monotonic()
        self._last_freeze = now
        self._last_full = now

    def tick(self, now: float) -> None:
        if now - self._last_full >= self.full_every:
            started = time.monotonic()
            gc.unfreeze()
            found = gc.collect()
            gc.freeze()
            self._last_full = self._last_freeze = now
            log.info(
                "full garbage collection: %d objects freed in %.3f s",
                found, time.monotonic() - started,
            )  # fmt: skip
        elif now - self._last_freeze >= self.freeze_every:
            gc.freeze()
            self._last_freeze = now
