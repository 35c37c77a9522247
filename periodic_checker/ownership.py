"""Cluster mode: which tasks this node runs. The nodes share one consumer group on the task
topic (`group_member.GroupMember`); a node runs exactly the tasks whose partition it owns
(docs/ownership.md), and hands them over as the group moves partitions.

Every task is in every node's view (the materialiser reads the whole topic on its own); the
scheduler asks `owns()` before it schedules or starts a task, so the materialiser's adds and
changes of tasks of other partitions are shown but never run here.

- Assigned (`_take`): fence the state topic (every release written before is read), then for
  each task of the new partitions: its state from the previous owner, and its first slot: after
  a clean release the slot after the last one run (the slots that passed meanwhile run late,
  each once, up to CHECKER_HANDOVER_CATCH_UP old; older ones are skipped and counted);
  otherwise (the owner died or was cut off) the first slot from now. A `running` state record
  says the task is this node's now.
- Revoked (`_release`, inside the rebalance callback, which does not return before): no slot
  of those tasks starts any more, running checks finish (up to half SHUTDOWN_TIMEOUT), their
  states are written, a `released` record per task (with its last slot) is confirmed by the
  broker; only then does the group hand the partitions on. SIGTERM leaves the group this way.
- Lost (cut off from the group longer than the session time-out): the node keeps running the
  tasks it last owned; once back in the group it follows the assignment it is given
  (`_give_up_after_cut`): tasks not in it stop at once and, unless another node took them
  meanwhile, are released like a revoke's. Until `rejoin_wait` after such a return, a task it
  is given that is still `running` on another node waits (at most `rejoin_wait`) for that
  node's release: when the whole broker was down, every node comes back with its partitions
  lost and the group assigns afresh, while the last holder still runs the task until it is
  back too. A holder that does not release in time (dead, or still cut off) is treated as
  after a death: its tasks start here from now.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Protocol

from prometheus_client import Counter, Gauge, Histogram

from checker_common.task_spec import TaskStatus
from periodic_checker.group_member import GroupMember
from periodic_checker.scheduler import CheckScheduler, start_bound
from periodic_checker.settings import CheckerSettings
from periodic_checker.task_service import BrokerUnavailable
from periodic_checker.task_state import (
    Producing,
    StateKind,
    TaskState,
    TaskStates,
    encode_state,
    held_elsewhere,
    runs_here,
    state_of,
    unreleased,
    with_state,
)
from periodic_checker.tasks import (
    TASKS_PER_LOOP_TURN,
    ResumePlan,
    Task,
    ended_by_now,
    next_fire_time,
    resume_plan,
)

log = logging.getLogger(__name__)

HANDOVER_SECONDS = Histogram(
    "periodic_checker_handover_seconds",
    "Time a handover took on this node: release (revoked until the last check ended and the"
    " released states were confirmed), take (assigned until the tasks were scheduled)",
    ["side"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)
HANDOVER_SLOTS_SKIPPED = Counter(
    "periodic_checker_handover_slots_skipped",
    "Slots that passed while their task moved to this node and were older than"
    " CHECKER_HANDOVER_CATCH_UP: not run, counted (cluster mode)",
)
TASKS_OWNED = Gauge(
    "periodic_checker_tasks_owned",
    "Tasks in the task-topic partitions this node owns (cluster mode): the tasks it runs",
)
PARTITIONS_OWNED = Gauge(
    "periodic_checker_partitions_owned", "Task-topic partitions this node owns (cluster mode)"
)
# How long a take waits for its fences; past it, the tasks start from now without the state.
FENCE_TIMEOUT = 15.0
# How long a count of the tasks owned stands while nothing it depends on changed.
OWNED_COUNT_SECONDS = 1.0
# Longest a revoke waits for the handover beyond its checks' grace (states confirmed).
PUBLISH_MARGIN = 15.0
# librdkafka's reconnect.backoff.max.ms (its default; not set here): after a long outage a
# client tries the broker again about this often, so nodes back from the same outage reach it
# up to this far apart.
RECONNECT_BACKOFF_MAX = 10.0
# The longest a node back from a cut waits for a last holder's release, whatever the session.
REJOIN_WAIT_MAX = 60.0


def rejoin_wait(session_timeout_ms: int) -> float:
    """How long a node back in the group after a cut waits for the release of a task another
    node, back from the same outage, may still run (pure): that node reaches the broker within
    RECONNECT_BACKOFF_MAX of this one and has its assignment within a rebalance (two session
    time-outs: the bound of a failover); at most REJOIN_WAIT_MAX."""
    return min(2 * session_timeout_ms / 1000 + RECONNECT_BACKOFF_MAX, REJOIN_WAIT_MAX)


class Positions(Protocol):
    """Where each task's record is (`materialiser.TaskTopicFollower`)."""

    def partition_of(self, task_id: uuid.UUID) -> int | None: ...

    def position_of(self, task_id: uuid.UUID) -> tuple[int, int] | None: ...


class StateStore(Protocol):
    def save_states(self, tasks: Sequence[Task]) -> None: ...


class Ownership:
    """This node's part of the task topic (see the module doc)."""

    def __init__(
        self,
        settings: CheckerSettings,
        scheduler: CheckScheduler,
        positions: Positions,
        states: TaskStates,
        producer: Producing,
        store: StateStore,
        *,
        grace: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.node_id = settings.checker_node_id
        self.scheduler = scheduler
        self.positions = positions
        self.states = states
        self.producer = producer
        self.store = store
        self.grace = grace
        self.clock = clock
        self.rejoin_wait = rejoin_wait(settings.kafka_session_timeout_ms)
        self.member = GroupMember(settings, handover_timeout=grace + PUBLISH_MARGIN)
        self.owned: frozenset[int] = frozenset()
        self.last_take_seconds: float | None = None
        self.last_release_seconds: float | None = None
        self._lock = asyncio.Lock()
        # Partitions assigned whose take has not run their tasks yet (it waits for releases).
        self._pending: frozenset[int] = frozenset()
        # When this node was last back in the group after a cut (monotonic): its takes within
        # `rejoin_wait` of it wait for releases of tasks still held elsewhere (`_take`).
        self._back_at: float | None = None
        self._snapshots: asyncio.Task[None] | None = None
        # (when, for which partitions and number of tasks, how many): `tasks_owned`.
        self._owned_count: tuple[float, tuple[frozenset[int], int] | None, int] = (0.0, None, 0)
        # What the last state record of each task run here said (`_worth_telling`).
        self._published: dict[uuid.UUID, tuple[object, ...]] = {}

    # -- what the scheduler asks --------------------------------------------------------------

    def owns(self, task_id: uuid.UUID) -> bool:
        # Nothing owned (a node that just started): no task looked up (the scheduler asks
        # for each of 100,000 at start).
        return bool(self.owned) and self.positions.partition_of(task_id) in self.owned

    def tasks_owned(self) -> int:
        """The tasks of the partitions owned: counted anew when the partitions or the number of
        tasks changed, else at most once a second (a count walks every task: 10 ms at 100,000,
        and /status and the metrics ask for it)."""
        owned = self.owned
        if not owned:
            return 0
        now = time.monotonic()
        key = (owned, len(self.scheduler.tasks))
        counted_at, counted_for, count = self._owned_count
        if counted_for == key and now - counted_at < OWNED_COUNT_SECONDS:
            return count
        partition_of = self.positions.partition_of
        count = sum(1 for task_id in list(self.scheduler.tasks) if partition_of(task_id) in owned)
        self._owned_count = (now, key, count)
        return count

    def status(self) -> dict[str, object]:
        """The figures of /status."""
        return {
            "owned_partitions": sorted(self.owned),
            # Assigned, their take waiting for another node's release (back from a cut).
            "partitions_awaiting_release": sorted(self._pending),
            "tasks_owned": self.tasks_owned(),
            **self.member.status(),
            "last_take_seconds": self.last_take_seconds,
            "last_release_seconds": self.last_release_seconds,
        }

    # -- life cycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Join the group; tasks are taken and released as it assigns and revokes."""
        TASKS_OWNED.set_function(self.tasks_owned)
        PARTITIONS_OWNED.set_function(lambda: len(self.owned))
        await self.member.start(take=self._take, release=self._release)
        self._snapshots = asyncio.create_task(self._snapshot_loop(), name="state-snapshots")

    async def stop(self) -> None:
        """Leave the group: the revoke hands every owned task over cleanly (see `_release`)."""
        if self._snapshots is not None:
            self._snapshots.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._snapshots
        await self.member.stop(self.settings.shutdown_timeout)

    # -- handovers (the event loop, called by the group member) ----------------------------------

    async def _take(self, partitions: list[int], follow: bool) -> None:
        """Run the tasks of newly assigned partitions. `follow`: back in the group after being
        cut off: `partitions` is the whole assignment, and what is not in it goes. Within
        `rejoin_wait` of such a return, a task still `running` on another node waits for that
        node's release first (`_await_holders`)."""
        started = time.monotonic()
        given = frozenset(partitions)
        async with self._lock:
            if follow:
                self._back_at = started
                await self._give_up_after_cut(self.owned - given)
            new = given - self.owned
            if not new:
                return
            self._pending = self._pending | new
            fenced = await self._fence()
        if not fenced:
            log.warning("state topic not read to its end: tasks start from now")
        elif self._back_at is not None and started - self._back_at < self.rejoin_wait:
            # Outside the lock: a revoke meanwhile must not wait for it (the group would
            # wait too, and with it the assignment that lets the holder release).
            await self._await_holders(sorted(new))
        async with self._lock:
            new = new & self._pending  # not revoked meanwhile
            self._pending = self._pending - new
            if not new:
                return
            # The states as the previous owners left them (this node's own records of the
            # take below are read into `latest` too).
            latest = self.states.latest
            prior = {i: latest.get(i) for i in self._tasks_of(new)} if fenced else {}
            # Each task as taken, with the state its previous owner left: made once (a copy of
            # the task: 1.9 s of 100,000), the event loop let run between chunks (the API, the
            # task topic); a task changed meanwhile is made again below as it is then.
            made: dict[uuid.UUID, tuple[Task, Task]] = {}
            for n, (task_id, state) in enumerate(prior.items(), 1):
                current = self.scheduler.tasks.get(task_id)
                if current is not None:
                    made[task_id] = (current, self._with_state(current, state))
                if n % TASKS_PER_LOOP_TURN == 0:
                    await asyncio.sleep(0)
            # Say first that this node runs them: a later owner must not continue after an old
            # release once this node has run slots past it.
            running = await self._states_yielding([task for _, task in made.values()])
            await self._publish(running, "taken")
            now = self.clock()
            # Where each one continues, planned in chunks too (nothing of them is owned yet, so
            # nothing runs meanwhile); one changed meanwhile is planned again below.
            planned: dict[uuid.UUID, tuple[Task, Task, ResumePlan | None]] = {}
            for n, task_id in enumerate(self._tasks_of(new), 1):
                if n % TASKS_PER_LOOP_TURN == 0:
                    await asyncio.sleep(0)
                current = self.scheduler.tasks.get(task_id)
                if current is None:
                    continue
                state = prior.get(task_id)
                was, task = made.get(task_id, (None, current))
                if was is not current:
                    task = self._with_state(current, state)
                planned[task_id] = (current, task, self._resume(task, state, now))
            self.owned = self.owned | new
            changed = []
            continued = skipped = late = 0
            # In one go: no slot of a task owned from now on runs before its take.
            for task_id in self._tasks_of(new):
                current = self.scheduler.tasks[task_id]
                state = prior.get(task_id)
                was, task, plan = planned.get(task_id, (None, current, None))
                if was is not current:
                    task = self._with_state(current, state)
                    plan = self._resume(task, state, now)
                released = state is not None and state.kind is StateKind.RELEASED
                if released and state is not None and state.last_slot is not None:
                    # What a release before the late slots ran hands on from (not an older
                    # slot this node ran the last time it owned the task).
                    ran = self.scheduler.last_slots.get(task_id, state.last_slot)
                    self.scheduler.last_slots[task_id] = max(state.last_slot, ran)
                if plan is None:
                    self.scheduler.take(task)
                else:
                    self.scheduler.take(
                        task, first=plan.first, skipped=plan.skipped, late=plan.late
                    )
                    skipped += plan.skipped
                    late += len(plan.late)
                self._published[task_id] = _worth_telling(task)
                continued += released
                changed.append(task)
            HANDOVER_SLOTS_SKIPPED.inc(skipped)
            # A chunk at a time: the API reads the store meanwhile (it waits for the store's
            # lock, the event loop with it).
            for start in range(0, len(changed), TASKS_PER_LOOP_TURN):
                chunk = changed[start : start + TASKS_PER_LOOP_TURN]
                await asyncio.to_thread(self.store.save_states, chunk)
            took = time.monotonic() - started
            self.last_take_seconds = took
            HANDOVER_SECONDS.labels("take").observe(took)
            log.info(
                "partitions %s taken: %d tasks (%d continued after a release, %d slots of the"
                " handover to run late, %d skipped) in %.3f s; generation %s",
                sorted(new), len(changed), continued, late, skipped, took,
                self.member.generation,
            )  # fmt: skip

    async def _give_up_after_cut(self, dropped: frozenset[int]) -> None:
        """Back in the group after a cut, the partitions not given again (`dropped`): their
        tasks stop at once (no slot starts; running checks finish, up to the grace), and each
        is released with its last slot, as at a revoke, so that its new owner continues after
        it, unless another node took the task since the cut (its `running` record is the
        task's latest: it runs the task already, and a release must not overrule that). A task
        with no record at all (added since this node's take) is released too."""
        if not dropped:
            return
        started = time.monotonic()
        self.owned = self.owned - dropped
        ids = self._tasks_of(dropped)
        late = await self.scheduler.release(ids, self.grace)
        if late:
            log.warning("%d checks still running after %.0f s: released anyway", late, self.grace)
        await self.scheduler.flush()
        # Read every record written while this node was cut off (a take by another node).
        fenced = await self._fence()
        latest = self.states.latest
        mine = [i for i in ids if fenced and not held_elsewhere(latest.get(i), self.node_id)]
        tasks = [t for t in (self.scheduler.tasks.get(i) for i in mine) if t is not None]
        await self._publish(self._states(tasks, StateKind.RELEASED), "released")
        for task_id in ids:
            self._published.pop(task_id, None)
        log.info(
            "back in the group: partitions %s are another node's now: %d tasks, %d released"
            " (%d run by another node since the cut) in %.3f s",
            sorted(dropped), len(ids), len(tasks), len(ids) - len(mine),
            time.monotonic() - started,
        )  # fmt: skip

    async def _await_holders(self, partitions: list[int]) -> None:
        """Back from a cut, wait (up to `rejoin_wait`) until no running task of `partitions`
        is still held by another node (its `running` record, or no record: `unreleased`): the
        whole broker may have been down, and that node, back too, runs the task until it
        learns it is no longer its, then releases it (`_give_up_after_cut`). A node that does
        not (it died meanwhile, or is still cut off) leaves its tasks to start here from now,
        as after a death."""
        latest = self.states.latest
        held = [
            i
            for i in self._tasks_of(frozenset(partitions))
            if _runs(self.scheduler.tasks[i]) and unreleased(latest.get(i), self.node_id)
        ]
        if not held:
            return
        started = time.monotonic()
        log.info(
            "partitions %s: %d tasks still run by their last holder; waiting up to %.0f s for"
            " its release",
            partitions, len(held), self.rejoin_wait,
        )  # fmt: skip
        still = await self.states.await_release(held, self.rejoin_wait)
        log_at = logging.WARNING if still else logging.INFO
        log.log(
            log_at,
            "partitions %s: %d of %d tasks released by their last holder in %.3f s; %d not"
            " (they start from now)",
            partitions, len(held) - len(still), len(held), time.monotonic() - started,
            len(still),
        )  # fmt: skip

    async def _fence(self) -> bool:
        """Read the state topic up to every record written before this call; False when the
        broker did not allow it within FENCE_TIMEOUT."""
        try:
            await asyncio.wait_for(self.states.fence(self.producer), FENCE_TIMEOUT)
        except (BrokerUnavailable, TimeoutError) as exc:
            log.warning("the state topic could not be fenced: %s", str(exc) or "time-out")
            return False
        return True

    def _with_state(self, task: Task, state: TaskState | None) -> Task:
        """A task this node takes, with the state its previous owner measured (pure but for
        the clock)."""
        if state is None or state.node == self.node_id:
            return task
        task = with_state(task, state, self.positions.position_of(task.id))
        # Ended under the previous owner (its runs, a one-shot that ran), whose record of it
        # may not have arrived yet: not run again.
        return ended_by_now(task, datetime.now(UTC))

    def _resume(self, task: Task, state: TaskState | None, now: float) -> ResumePlan | None:
        """Where a task this node takes continues (`_with_state` made it): None for the first
        slot from now."""
        interval = task.spec.interval
        if interval is None or task.status is not TaskStatus.ACTIVE:
            return None
        ran_here = self.scheduler.last_slots.get(task.id)
        if state is not None and state.kind is StateKind.RELEASED and state.last_slot is not None:
            last = max(state.last_slot, ran_here or state.last_slot)
            bound = start_bound(interval, self.scheduler.max_start_lag) or 0.0
            limit = max(self.settings.checker_handover_catch_up, bound)
            return resume_plan(task.id, interval, last, now, limit)
        known = [s for s in (ran_here, state.last_slot if state else None) if s is not None]
        if known:
            # Never a slot that was run already.
            first = next_fire_time(task.id, interval, max(now, max(known) + interval / 2))
            return ResumePlan(first, (), 0)
        return None

    async def _release(self, partitions: list[int]) -> None:
        """Hand the tasks of revoked partitions over (see the module doc)."""
        async with self._lock:
            started = time.monotonic()
            # A take still waiting for their holder's release gives them up (`_take`).
            self._pending = self._pending - frozenset(partitions)
            gone = self.owned & frozenset(partitions)
            if not gone:
                return
            self.owned = self.owned - gone
            ids = self._tasks_of(gone)
            late = await self.scheduler.release(ids, self.grace)
            if late:
                log.warning(
                    "%d checks still running after %.0f s: handed over anyway", late, self.grace
                )
            await self.scheduler.flush()
            tasks = [self.scheduler.tasks.get(i) for i in ids]
            released = self._states([t for t in tasks if t is not None], StateKind.RELEASED)
            await self._publish(released, "released")
            for task_id in ids:
                self._published.pop(task_id, None)
            took = time.monotonic() - started
            self.last_release_seconds = took
            HANDOVER_SECONDS.labels("release").observe(took)
            log.info(
                "partitions %s handed over: %d tasks released in %.3f s",
                sorted(gone), len(released), took,
            )  # fmt: skip

    async def _publish(self, states: list[TaskState], what: str) -> int:
        """Write state records and wait for the broker; the number it did not confirm."""
        if not states:
            return 0
        failed = await self.producer.produce_all(
            self.states.topic, [encode_state(s) for s in states]
        )
        if failed:
            log.warning("%d of %d %s states not confirmed by the broker", failed, len(states), what)
        return failed

    async def _snapshot_loop(self) -> None:
        """The state of the tasks run here, when it changed in what a next owner needs, every
        snapshot interval: what that owner finds should this node die (a new owner after a
        death starts from now, so mere progress of an open-ended task is not worth a record)."""
        every = self.settings.checker_state_snapshot_interval
        while True:
            await asyncio.sleep(every)
            if self.member.cut_off:
                continue  # out of the group: its release at the return tells the rest
            async with self._lock:  # never after a release of the same task
                changed = []
                latest = self.states.latest
                for task_id in self._tasks_of(self.owned):
                    task = self.scheduler.tasks.get(task_id)
                    if task is None:
                        continue
                    told = _worth_telling(task)
                    # Also when the task's latest record is not this node's `running` (a
                    # release that crossed this node's take, or a take that wrote none): a
                    # later owner must see that this node runs the task.
                    ours = runs_here(latest.get(task_id), self.node_id)
                    if told != self._published.get(task_id) or not ours:
                        changed.append(task)
                        self._published[task_id] = told
                await self._publish(self._states(changed, StateKind.RUNNING), "snapshot")

    async def _states_yielding(self, tasks: Sequence[Task]) -> list[TaskState]:
        """`_states(tasks, RUNNING)`, the event loop let run between chunks (a take's 100,000
        state records are made in about a second)."""
        states: list[TaskState] = []
        for start in range(0, len(tasks), TASKS_PER_LOOP_TURN):
            states += self._states(tasks[start : start + TASKS_PER_LOOP_TURN], StateKind.RUNNING)
            await asyncio.sleep(0)
        return states

    def _states(self, tasks: Sequence[Task], kind: StateKind) -> list[TaskState]:
        at = datetime.now(UTC)
        return [
            state_of(
                task, kind, node=self.node_id, at=at,
                last_slot=self.scheduler.last_slots.get(task.id),
                record=self.positions.position_of(task.id),
            )
            for task in tasks
        ]  # fmt: skip

    def _in(self, task_id: uuid.UUID, partitions: frozenset[int]) -> bool:
        return self.positions.partition_of(task_id) in partitions

    def _tasks_of(self, partitions: frozenset[int]) -> list[uuid.UUID]:
        return [task_id for task_id in list(self.scheduler.tasks) if self._in(task_id, partitions)]


def _runs(task: Task) -> bool:
    """Whether a task runs on a cadence (active, with an interval): one a holder ran."""
    return task.status is TaskStatus.ACTIVE and task.spec.interval is not None


def _worth_telling(task: Task) -> tuple[object, ...]:
    """What of a task's state a snapshot carries news of: health, failures in a row, its
    status, and its runs when they end it (`end_after_runs`)."""
    runs = task.runs if task.spec.end_after_runs is not None else None
    return task.health, task.failures_in_a_row, task.status, runs
