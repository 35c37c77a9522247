"""What the HTTP API and the CLI may ask of the running checker.

`TaskService` is the seam between the API (which validates requests and renders responses) and
the daemon (store + scheduler + probe + producer). The errors below are the only ones the API
needs to turn into HTTP statuses.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any, Protocol

from pydantic import Field

from checker_common.contract import CheckResult, Health
from checker_common.task_spec import TaskSpec, TaskStatus
from periodic_checker.tasks import Task


class ServiceError(Exception):
    """Base of the errors the API maps to 4xx; the message is meant for the user."""


class TaskNotFound(ServiceError):
    pass


class NameTaken(ServiceError):
    pass


class TooManyTasks(ServiceError):
    pass


class TargetDenied(ServiceError):
    """The target policy refuses the task's host (server-side request forgery guard)."""


class InvalidChange(ServiceError):
    """A change that is well-formed but not allowed now (for example resuming a done task)."""


class BrokerUnavailable(ServiceError):
    """Cluster mode: the change could not be put on the task topic; nothing changed."""


class ViewBehind(ServiceError):
    """Cluster mode: the change is on the task topic, but this node has not applied it in
    time; it will, and every node will."""


# Every string of this shape is a position in the list (after a creation time and an id, in
# digits and hex), so the OpenAPI document states the whole rule as a pattern and a cursor
# that matches it is never refused. The store makes and reads them.
CURSOR_PATTERN = r"^[0-9]{8}T[0-9]{12}-[0-9a-f]{32}$"


@dataclass(frozen=True)
class TaskPage:
    tasks: list[Task]
    next_cursor: str | None


@dataclass(frozen=True)
class TaskFilter:
    status: TaskStatus | None = None
    health: Health | None = None
    text: str | None = None  # substring of name or URL, case-insensitive
    cursor: str | None = None
    limit: int = 100


@dataclass
class ServiceStatus:
    tasks_by_status: dict[str, int] = field(default_factory=dict)
    tasks_by_health: dict[str, int] = field(default_factory=dict)
    checks_in_flight: int = 0
    schedule_lag_p99: float | None = None
    producer_queue: int = 0
    outbox_size: int = 0
    broker_reachable: bool = False
    last_delivered_at: str | None = None
    version: str = ""
    extra: Annotated[
        dict[str, Any],
        Field(
            description="more numbers: schedule_lag_p50, schedule_lag_max, checks, retries,"
            " skipped_overlap and, from the publisher, deliveries (results the broker"
            " confirmed), delivery_failures, outbox_writes (results written to the checker's"
            " outbox) and results_dropped; see docs/api.md"
        ),
    ] = field(default_factory=dict)


class TaskService(Protocol):
    async def create(self, spec: TaskSpec) -> Task: ...

    async def put(self, task_id: uuid.UUID, spec: TaskSpec) -> tuple[Task, bool]:
        """Create or replace under a client-chosen id; True when it was created."""
        ...

    async def update(self, task_id: uuid.UUID, changes: dict[str, Any]) -> Task:
        """Apply some spec fields; the merged spec is validated again."""
        ...

    async def delete(self, task_id: uuid.UUID) -> None: ...

    async def get(self, task_id: uuid.UUID) -> Task: ...

    async def list(self, query: TaskFilter) -> TaskPage: ...

    async def pause(self, task_id: uuid.UUID) -> Task: ...

    async def resume(self, task_id: uuid.UUID) -> Task: ...

    async def run_now(self, task_id: uuid.UUID) -> CheckResult:
        """Run the check at once, publish its result like any other, and return it."""
        ...

    def status(self) -> ServiceStatus: ...
