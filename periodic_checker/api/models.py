"""Request and response bodies of the HTTP API: one pydantic model per body.

A task's definition is `checker_common.task_spec.TaskSpec` itself (POST and PUT bodies) and a
stored task is `Task`; `TaskPatch` is derived from `TaskSpec` so the two never drift apart.
"""

from __future__ import annotations

import copy
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, create_model
from pydantic.fields import FieldInfo

from checker_common.contract import SAFE_TEXT_PATTERN, CheckResult, Health
from checker_common.task_spec import TaskSpec, TaskStatus
from periodic_checker.task_service import CURSOR_PATTERN, ServiceStatus
from periodic_checker.tasks import Task

MAX_BODY_BYTES = 64 * 1024
MAX_PAGE = 1000


class FieldError(BaseModel):
    field: str = Field(description="dotted location of the problem, e.g. `timeout` or `id`")
    message: str


class ErrorBody(BaseModel):
    """What every 4xx and 5xx carries."""

    error: str = Field(description="a word for programs: validation, not_found, name_taken ...")
    message: str = Field(description="one line for people")
    detail: list[FieldError] = Field(default_factory=list)


def _optional_copy(info: FieldInfo) -> FieldInfo:
    """The same field (type, limits, description, pattern) but not required and without a
    default; the `None` that marks "not given" is not validated."""
    copied = copy.copy(info)
    copied.default = None
    copied.default_factory = None
    copied.validate_default = False
    extra = info.json_schema_extra

    # The default only marks "not given" (see exclude_unset); it must not appear in the schema,
    # where `null` would read as a valid value for fields such as `name`.
    def schema_without_default(schema: dict[str, Any]) -> None:
        if callable(extra):
            extra(schema)
        elif extra:
            schema.update(extra)
        schema.pop("default", None)

    copied.json_schema_extra = schema_without_default
    return copied


# PATCH /tasks/{id}: any subset of the spec's fields, with the spec's own validators. Fields
# that need the others (timeout below interval) are checked again on the merged spec.
_PATCH_FIELDS: dict[str, Any] = {
    name: (info.annotation, _optional_copy(info)) for name, info in TaskSpec.model_fields.items()
}
TaskPatch: type[TaskSpec] = create_model(
    "TaskPatch",
    __base__=TaskSpec,
    __doc__="Some fields of a task's definition; the others keep their values.",
    **_PATCH_FIELDS,
)


def patch_changes(patch: TaskSpec) -> dict[str, Any]:
    """Only the fields the client sent, as validated values for `TaskService.update` (which
    validates the merged definition again, strictly: a time stays a datetime)."""
    return patch.model_dump(exclude_unset=True)


class TaskListQuery(BaseModel):
    """Query of GET /tasks."""

    model_config = ConfigDict(extra="forbid")

    status: TaskStatus | None = None
    health: Health | None = None
    q: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        # Names hold no control characters, and SQLite's LIKE ends the pattern at a NUL.
        pattern=SAFE_TEXT_PATTERN,
        description="text in the name or URL; no control characters",
    )
    limit: int = Field(100, ge=1, le=MAX_PAGE)
    cursor: str | None = Field(
        None, pattern=CURSOR_PATTERN, description="next_cursor of the previous page"
    )


class TaskPageResponse(BaseModel):
    tasks: list[Task]
    next_cursor: str | None = Field(
        description="pass as `cursor` for the next page; null at the end",
        json_schema_extra={"pattern": CURSOR_PATTERN},
    )


class RunResponse(BaseModel):
    """The result message of a check run now, as published (task id + result)."""

    task_id: uuid.UUID
    result: CheckResult


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"


class NoBody(BaseModel):
    """Body of a change that carries no data (DELETE, pause, resume, run): `{}`, or none."""

    model_config = ConfigDict(extra="forbid")


class RemoveTaskRequest(BaseModel):
    """Body of the first version's POST /remove_task (deprecated alias of DELETE /tasks/{id})."""

    model_config = ConfigDict(extra="forbid", strict=True)

    id: uuid.UUID


StatusAdapter: TypeAdapter[ServiceStatus] = TypeAdapter(ServiceStatus)
