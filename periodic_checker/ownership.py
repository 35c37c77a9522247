"""Cluster mode: which tasks this node runs. The nodes share one consumer group on the task
topic (`group_member.GroupMember`); a node runs exactly the tasks whose partition it owns
(docs/ownership.md), and hands them over as the group moves partitions.

Every task is in every node's view (the materialiser reads the whole topic on its own); the
scheduler asks `owns()` before it schedules or starts a task, so the materialiser's adds and
changes of tasks of other partitions are shown but never run here.

- Assigned (`_take`): fence the state topic (every release written before is read), then for
  each task of the new partitions: its state from the previous owner, and its first slot: after
  a clean release the slot after the last one run (a passed slot runs late within
  MAX_START_LAG, older ones are skipped and counted); otherwise (the owner died or was cut
  off) the first slot from now. A `running` state record says the task is this node's now.
- Revoked (`_release`, inside the rebalance callback, which does not return before): no slot
  of those tasks starts any more, running checks finish (up to half SHUTDOWN_TIMEOUT), their
  states are written, a `released` record per task (with its last slot) is confirmed by the
  broker; only then does the group hand the partitions on. SIGTERM leaves the group this way.
- Lost (cut off from the group longer than the session time-out): the node keeps running the
  tasks it last owned; once back in the group it follows the assignment it is given.
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
    state_of,
    with_state,
)
from periodic_checker.tasks import Task, at_load, next_fire_time, resume_plan

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
    "Slots that passed while their task moved to this node and could no longer start within"
    " MAX_START_LAG: not run, counted (cluster mode)",
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
# Longest a revoke waits for the handover beyond its checks' grace (states confirmed).
PUBLISH_MARGIN = 15.0


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
        self.member = GroupMember(settings, handover_timeout=grace + PUBLISH_MARGIN)
        self.owned: frozenset[int] = frozenset()
        self.last_take_seconds: float | None = None
        self.last_release_seconds: float | None = None
        self._lock = asyncio.Lock()
        self._snapshots: asyncio.Task[None] | None = None
        # What the last state record of each task run here said (`_worth_telling`).
        self._published: dict[uuid.UUID, tuple[object, ...]] = {}

    # -- what the scheduler asks --------------------------------------------------------------

    def owns(self, task_id: uuid.UUID) -> bool:
        return self.positions.partition_of(task_id) in self.owned

    def tasks_owned(self) -> int:
        owned = self.owned
        if not owned:
            return 0
        partition_of = self.positions.partition_of
        return sum(1 for task_id in list(self.scheduler.tasks) if partition_of(task_id) in owned)

    def status(self) -> dict[str, object]:
        """The figures of /status."""
        return {
            "owned_partitions": sorted(self.owned),
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
        cut off: `partitions` is the whole assignment, and what is not in it goes."""
        async with self._lock:
            started = time.monotonic()
            given = frozenset(partitions)
            if follow:
                dropped = self.owned - given
                self.owned = self.owned & given
                if dropped:
                    # Another node has run them since the cut: no release to write.
                    ids = self._tasks_of(dropped)
                    await self.scheduler.release(ids, 0)
                    log.info(
                        "back in the group: partitions %s are another node's now (%d tasks)",
                        sorted(dropped), len(ids),
                    )  # fmt: skip
            new = given - self.owned
            if not new:
                return
            try:
                await asyncio.wait_for(self.states.fence(self.producer), FENCE_TIMEOUT)
                fenced = True
            except (BrokerUnavailable, TimeoutError) as exc:
                fenced = False
                log.warning("state topic not read to its end (%s): tasks start from now", exc)
            # The states as the previous owners left them (this node's own records of the
            # take below are read into `latest` too).
            latest = self.states.latest
            prior = {i: latest.get(i) for i in self._tasks_of(new)} if fenced else {}
            # Say first that this node runs them: a later owner must not continue after an old
            # release once this node has run slots past it.
            merged = [
                self._plan(self.scheduler.tasks[i], s, self.clock())[0] for i, s in prior.items()
            ]
            await self._publish(self._states(merged, StateKind.RUNNING), "taken")
            self.owned = self.owned | new
            now = self.clock()
            changed = []
            continued = skipped = 0
            for task_id in self._tasks_of(new):
                state = prior.get(task_id)
                task, first, missed = self._plan(self.scheduler.tasks[task_id], state, now)
                self.scheduler.take(task, first=first, skipped=missed)
                self._published[task_id] = _worth_telling(task)
                continued += state is not None and state.kind is StateKind.RELEASED
                skipped += missed
                changed.append(task)
            HANDOVER_SLOTS_SKIPPED.inc(skipped)
            if changed:
                await asyncio.to_thread(self.store.save_states, changed)
            took = time.monotonic() - started
            self.last_take_seconds = took
            HANDOVER_SECONDS.labels("take").observe(took)
            log.info(
                "partitions %s taken: %d tasks (%d continued after a release, %d slots of the"
                " handover skipped) in %.3f s; generation %s",
                sorted(new), len(changed), continued, skipped, took, self.member.generation,
            )  # fmt: skip

    def _plan(
        self, task: Task, state: TaskState | None, now: float
    ) -> tuple[Task, float | None, int]:
        """(the task with its state, its first slot or None for the first from now, slots
        skipped) for a task this node takes."""
        if state is not None and state.node != self.node_id:
            task = with_state(task, state, self.positions.position_of(task.id))
            # Ended under the previous owner (its runs, a one-shot that ran), whose record of
            # it may not have arrived yet: not run again.
            task = at_load(task, datetime.now(UTC))
        interval = task.spec.interval
        if interval is None or task.status is not TaskStatus.ACTIVE:
            return task, None, 0
        ran_here = self.scheduler.last_slots.get(task.id)
        if state is not None and state.kind is StateKind.RELEASED and state.last_slot is not None:
            last = max(state.last_slot, ran_here or state.last_slot)
            bound = start_bound(interval, self.scheduler.max_start_lag) or 0.0
            first, skipped = resume_plan(task.id, interval, last, now, bound)
            return task, first, skipped
        known = [s for s in (ran_here, state.last_slot if state else None) if s is not None]
        if known:
            # Never a slot that was run already.
            return task, next_fire_time(task.id, interval, max(now, max(known) + interval / 2)), 0
        return task, None, 0

    async def _release(self, partitions: list[int]) -> None:
        """Hand the tasks of revoked partitions over (see the module doc)."""
        async with self._lock:
            started = time.monotonic()
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
        topic = self.states.topic
        answers = await asyncio.gather(
            *(self.producer.produce(topic, *encode_state(s)) for s in states),
            return_exceptions=True,
        )
        failed = sum(1 for answer in answers if isinstance(answer, BaseException))
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
            async with self._lock:  # never after a release of the same task
                changed = []
                for task_id in self._tasks_of(self.owned):
                    task = self.scheduler.tasks.get(task_id)
                    if task is None:
                        continue
                    told = _worth_telling(task)
                    if told != self._published.get(task_id):
                        changed.append(task)
                        self._published[task_id] = told
                await self._publish(self._states(changed, StateKind.RUNNING), "snapshot")

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


def _worth_telling(task: Task) -> tuple[object, ...]:
    """What of a task's state a snapshot carries news of: health, failures in a row, its
    status, and its runs when they end it (`end_after_runs`)."""
    runs = task.runs if task.spec.end_after_runs is not None else None
    return task.health, task.failures_in_a_row, task.status, runs
