"""`CheckerService`: the `TaskService` the API talks to, over the store and the scheduler.

It validates every change here, the same way in both modes, and leaves making it to its
`TaskWrites` (`writes.py`): in single mode the store first (the source of truth), then the
running scheduler and the task topic, so what the API answered is what a restart will load; in
cluster mode the task topic first, answered once this node's view has it.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Protocol

from pydantic import ValidationError

from checker_common import __version__
from checker_common.contract import CheckResult
from checker_common.task_spec import TaskSpec, TaskStatus
from periodic_checker.metrics import STALL_WINDOW, StallsView, count_tasks
from periodic_checker.scheduler import CheckScheduler
from periodic_checker.store import TaskExists, TaskStore
from periodic_checker.task_service import (
    InvalidChange,
    ServiceStatus,
    TargetDenied,
    TaskFilter,
    TaskNotFound,
    TaskPage,
)
from periodic_checker.tasks import Task, edited, end_reason, kept_secrets, paused, redacted, resumed
from periodic_checker.writes import LocalWrites, TaskWrites

log = logging.getLogger(__name__)


class HostPolicy(Protocol):
    def check_url(self, url: str) -> str | None: ...


class StatsSource(Protocol):
    def stats(self) -> Any: ...


class CheckerService:
    """Implements `periodic_checker.task_service.TaskService`."""

    def __init__(
        self,
        store: TaskStore,
        scheduler: CheckScheduler,
        *,
        policy: HostPolicy | None = None,
        publisher: StatsSource | None = None,
        stalls: StallsView | None = None,
        writes: TaskWrites | None = None,
        describe: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.store = store
        self.scheduler = scheduler
        self.policy = policy
        self.publisher = publisher
        self.stalls = stalls
        self.writes = writes if writes is not None else LocalWrites(store, scheduler)
        # More figures for /status (the mode, the task topic).
        self.describe = describe

    async def create(self, spec: TaskSpec) -> Task:
        return await self._create(uuid.uuid4(), kept_secrets(spec, None))

    async def put(self, task_id: uuid.UUID, spec: TaskSpec) -> tuple[Task, bool]:
        existing = self.scheduler.tasks.get(task_id)
        if existing is None:
            try:
                return await self._create(task_id, kept_secrets(spec, None)), True
            except TaskExists:
                existing = self._stored(task_id)
        return await self._replace(existing, kept_secrets(spec, existing.spec)), False

    async def update(self, task_id: uuid.UUID, changes: dict[str, Any]) -> Task:
        task = await self.get(task_id)
        # Merged with the task as a read shows it: the stored secrets come back as masks, so
        # a change of origin must give them again (they are never sent where not given).
        merged = {**redacted(task).spec.model_dump(exclude_unset=False), **changes}
        spec = TaskSpec.model_validate(merged)  # ValidationError names the field (422)
        return await self._replace(task, kept_secrets(spec, task.spec))

    async def delete(self, task_id: uuid.UUID) -> None:
        if not await self.writes.delete(task_id):
            raise TaskNotFound(f"no task {task_id}")
        log.info("task %s deleted", task_id, extra={"task_id": str(task_id)})

    async def get(self, task_id: uuid.UUID) -> Task:
        task = self.scheduler.tasks.get(task_id)
        return task if task is not None else self._stored(task_id)

    async def list(self, query: TaskFilter) -> TaskPage:
        # The store is read after the pending states are written, so the page is current.
        await self.scheduler.flush()
        return self.store.page(query)  # ValueError for a cursor it did not make

    async def pause(self, task_id: uuid.UUID) -> Task:
        task = await self.get(task_id)
        try:
            changed = paused(task, _now())
        except ValueError as exc:
            raise InvalidChange(str(exc)) from None
        return await self._save_state(changed)

    async def resume(self, task_id: uuid.UUID) -> Task:
        task = await self.get(task_id)
        try:
            changed = resumed(task, _now())
        except ValidationError as exc:
            first = exc.errors(include_url=False, include_input=False)[0]
            where = ".".join(str(p) for p in first.get("loc", ()))
            raise InvalidChange(
                f"the stored definition does not validate ({where}: {first.get('msg')});"
                " replace it with PUT"
            ) from None
        except ValueError as exc:
            raise InvalidChange(str(exc)) from None
        self._check_policy(changed.spec)
        return await self._save_state(changed)

    async def run_now(self, task_id: uuid.UUID) -> CheckResult:
        task = await self.get(task_id)
        if task.status is TaskStatus.ERROR:
            raise InvalidChange(f"the task is in error ({task.status_reason}); fix it first")
        try:
            return await self.scheduler.run_now(task_id)
        except KeyError:
            raise TaskNotFound(f"no task {task_id}") from None

    def status(self) -> ServiceStatus:
        by_status, by_health = count_tasks(self.scheduler.tasks)
        status = ServiceStatus(
            # Only the values that occur, as before (the metrics show the zeros).
            tasks_by_status={k: n for k, n in by_status.items() if n},
            tasks_by_health={k: n for k, n in by_health.items() if n},
            checks_in_flight=self.scheduler.in_flight,
            schedule_lag_p99=self.scheduler.lags.percentile(99),
            version=__version__,
        )
        stats = self.scheduler.stats
        status.extra.update(
            schedule_lag_p50=self.scheduler.lags.percentile(50),
            schedule_lag_max=self.scheduler.lags.max,
            checks=stats.checks,
            retries=stats.retries,
            skipped_overlap=stats.skipped_overlap,
            # The load signals (README, "Reading the load signals").
            slots_skipped=stats.skipped_late,
            # Cluster mode: slots that passed while their task moved between nodes.
            slots_skipped_handover=stats.skipped_handover,
            slots_skipped_by_task={
                str(task_id): n for task_id, n in self.scheduler.skipped_slots.most_common(10)
            },
            max_start_lag=self.scheduler.max_start_lag,
            checks_not_judged=stats.not_judged,
            runs_failed=stats.runs_failed,
        )
        if self.stalls is not None:
            status.extra["loop_stall_longest_1m"] = self.stalls.longest(STALL_WINDOW)
        if self.publisher is not None:
            _publisher_status(status, self.publisher.stats())
        if self.describe is not None:
            status.extra.update(self.describe())
        return status

    # -- helpers ---------------------------------------------------------------------------------

    async def _create(self, task_id: uuid.UUID, spec: TaskSpec) -> Task:
        self._check_policy(spec)
        now = _now()
        reason = end_reason(spec, 0, now)
        task = Task(
            id=task_id,
            spec=spec,
            status=TaskStatus.DONE if reason else TaskStatus.ACTIVE,
            status_reason=reason,
            created_at=now,
            updated_at=now,
        )
        made = await self.writes.insert(task)  # NameTaken, TooManyTasks, TaskExists
        log.info("task %s created: %s", task_id, spec.name, extra={"task_id": str(task_id)})
        return made

    async def _replace(self, task: Task, spec: TaskSpec) -> Task:
        self._check_policy(spec)
        changed = await self.writes.replace(task, edited(task, spec, _now()))  # NameTaken
        log.info("task %s changed", task.id, extra={"task_id": str(task.id)})
        return changed

    async def _save_state(self, task: Task) -> Task:
        saved = await self.writes.save_state(task)
        log.info("task %s is now %s", task.id, task.status, extra={"task_id": str(task.id)})
        return saved

    def _stored(self, task_id: uuid.UUID) -> Task:
        task = self.store.get(task_id)
        if task is None:
            raise TaskNotFound(f"no task {task_id}")
        return task

    def _check_policy(self, spec: TaskSpec) -> None:
        if self.policy is not None:
            reason = self.policy.check_url(spec.url)
            if reason is not None:
                raise TargetDenied(reason)


# The publisher's counters (`producer.PublisherStats`) -> their names in /status, the same as
# their metrics (docs/metrics.md). Each says what the checker itself saw: the broker confirmed
# a result, or the result went into its own outbox; whether the processor stored it is only
# known in PostgreSQL.
PUBLISHER_COUNTERS = {
    "delivered": "deliveries",
    "failed": "delivery_failures",
    "stored": "outbox_writes",
    "dropped": "results_dropped",
}


def _publisher_status(status: ServiceStatus, stats: Any) -> None:
    """Copy what the publisher reports (`producer.PublisherStats`) into the status."""
    status.producer_queue = int(getattr(stats, "queue_length", 0) or 0)
    status.outbox_size = int(getattr(stats, "outbox_size", 0) or 0)
    status.broker_reachable = bool(getattr(stats, "broker_reachable", False))
    last = getattr(stats, "last_delivered_at", None)
    status.last_delivered_at = last.isoformat() if isinstance(last, datetime) else None
    for name, shown_as in PUBLISHER_COUNTERS.items():
        if hasattr(stats, name):
            status.extra[shown_as] = getattr(stats, name)
    # Results the broker will never take, moved out of their task's way (producer.py).
    status.extra["outbox_set_aside"] = int(getattr(stats, "set_aside_size", 0) or 0)


def _now() -> datetime:
    return datetime.now(UTC)
