"""Cluster mode: the state the owners measured, shown on every node (the state mirror).

Every node reads the whole state topic (`task_state.TaskStates`). A task's owner writes its
state there when it takes the task, every CHECKER_STATE_SNAPSHOT_INTERVAL while its health,
failures in a row or status change, and when it gives the task up (docs/ownership.md). This
node applies those states, for the tasks it does not run, to its own view (memory and SQLite),
so that list, show and `/status` on any node say what the owner saw as of its last snapshot,
not what this node saw the last time it ran the task (or `unknown`, if it never did).

A state measured under another task record than the one this node holds brings its counters
only, not its health (`task_state.with_state`). The tasks this node runs are never touched:
their state is the one it measures.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable
from typing import Protocol

from periodic_checker.task_state import TaskState, with_state
from periodic_checker.tasks import TASKS_PER_LOOP_TURN, Task

log = logging.getLogger(__name__)

# How often the states read since the last pass are applied.
EVERY_SECONDS = 1.0


class States(Protocol):
    """`task_state.TaskStates`: the latest state of each task, and which ones came since."""

    latest: dict[uuid.UUID, TaskState]

    def take_fresh(self) -> set[uuid.UUID]: ...


class Mirrored(Protocol):
    """`scheduler.CheckScheduler`."""

    @property
    def tasks(self) -> dict[uuid.UUID, Task]: ...

    def mirror(self, task: Task) -> bool: ...


class Positions(Protocol):
    def position_of(self, task_id: uuid.UUID) -> tuple[int, int] | None: ...


def mirrored(
    task: Task, state: TaskState, position: tuple[int, int] | None, *, node_id: str
) -> Task | None:
    """The task with the state another node measured of it, or None when that state says
    nothing new (or is this node's own) (pure)."""
    if state.node == node_id:
        return None
    after = with_state(task, state, position)
    same = (
        after.health is task.health
        and after.failures_in_a_row == task.failures_in_a_row
        and after.runs == task.runs
        and after.manual_runs == task.manual_runs
        and after.last_run_at == task.last_run_at
    )
    return None if same else after


class StateMirror:
    """Applies the states other nodes wrote to the tasks this node does not own."""

    def __init__(
        self,
        states: States,
        scheduler: Mirrored,
        positions: Positions,
        owns: Callable[[uuid.UUID], bool],
        *,
        node_id: str,
        every: float = EVERY_SECONDS,
    ) -> None:
        self.states = states
        self.scheduler = scheduler
        self.positions = positions
        self.owns = owns
        self.node_id = node_id
        self.every = every
        self.applied = 0
        self._runner: asyncio.Task[None] | None = None

    async def apply_fresh(self) -> int:
        """Apply the states read since the last call; how many tasks changed. Each task is
        checked and written in one step on the event loop, so ownership cannot change between
        its check and its write; the loop is let run between chunks (a node that starts reads
        every task's state at once: 100,000 of them were a second and more in one go)."""
        changed = 0
        latest = self.states.latest
        tasks = self.scheduler.tasks
        for n, task_id in enumerate(self.states.take_fresh(), 1):
            if n % TASKS_PER_LOOP_TURN == 0:
                await asyncio.sleep(0)
            state = latest.get(task_id)
            task = tasks.get(task_id)
            if state is None or task is None or self.owns(task_id):
                continue
            after = mirrored(task, state, self.positions.position_of(task_id), node_id=self.node_id)
            if after is not None and self.scheduler.mirror(after):
                changed += 1
        self.applied += changed
        return changed

    async def start(self) -> None:
        self._runner = asyncio.create_task(self._run(), name="state-mirror")

    async def stop(self) -> None:
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.every)
            try:
                await self.apply_fresh()
            except Exception:
                log.exception("applying other nodes' task states failed; trying again")
