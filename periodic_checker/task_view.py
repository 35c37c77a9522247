"""What a record of the task topic does to a checker's tasks, and when the checker must publish
again (pure: no I/O, the clock is an argument; docs/tasks-topic.md).

A record carries a task's definition and status; the checker keeps the rest (health, runs,
failures in a row, last run) itself. So applying a record keeps that state, except that a
change of what is checked (anything but the name) starts health over, as an edit through the
API does (`tasks.edited`).

A record is validated exactly as the API validates a request: `task_record.decode` checks the
definition; `judged` adds what the API checks against the checker's own state (the target
policy, unique names, the task limit). A record refused there still becomes a task, in status
`error` with the reason, so it never runs and is visible.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Final

from checker_common.contract import Health
from checker_common.task_record import MAX_REASON, InvalidTask, TaskChange, TaskRecord
from checker_common.task_spec import TaskSpec, TaskStatus
from periodic_checker.tasks import Task, compacted, end_reason, new_task, with_state

if TYPE_CHECKING:
    from periodic_checker.store import RuntimeState

# The reason of a task made from a record that does not validate starts so
# (`task_record.decode`); the store keeps such a reason rather than its own.
INVALID_RECORD = "invalid task record:"


def record_of(task: Task, origin: str) -> TaskRecord:
    """The record that says what `task` is, written by node `origin`."""
    reason = task.status_reason[:MAX_REASON] if task.status_reason else task.status_reason
    return TaskRecord(
        id=task.id,
        spec=task.spec,
        status=task.status,
        status_reason=reason,
        created_at=task.created_at,
        updated_at=task.updated_at,
        origin=origin,
    )


def applied(change: TaskChange | InvalidTask, current: Task | None, now: datetime) -> Task:
    """The task as `change` leaves it, `current` being the task before (None: a new task)."""
    if isinstance(change, InvalidTask):
        return _invalid(change, current, now)
    record = change.record
    spec = record.spec
    created = record.created_at or (current.created_at if current is not None else now)
    updated = record.updated_at or now
    if current is None:
        task = new_task(change.task_id, spec, record.status, record.status_reason, created, updated)
    else:
        fields: dict[str, Any] = {
            "spec": spec,
            "status": record.status,
            "status_reason": record.status_reason,
            "created_at": created,
            "updated_at": updated,
        }
        if not _same_check(current.spec, spec):
            fields.update(health=Health.UNKNOWN, failures_in_a_row=0)
        task = current.model_copy(update=fields)
    if task.status is TaskStatus.ACTIVE:
        # As the API would have it: an active task past its end is done.
        reason = end_reason(spec, task.runs, now)
        if reason is not None:
            task = with_state(
                task, {"status": TaskStatus.DONE, "status_reason": reason, "updated_at": now}
            )
    # Held as long as the task is: as compact as a task loaded from the store.
    return task if current is None else compacted(task)


def with_runtime(task: Task, kept: RuntimeState, *, same_record: bool) -> Task:
    """`task` (from a record) with the state this node kept of it: its run counters always;
    its health when the record is the one the state was measured against (else the check may
    have changed while the node was away, and health starts over)."""
    update: dict[str, Any] = {
        "runs": kept.runs,
        "manual_runs": kept.manual_runs,
        "last_run_at": kept.last_run_at,
    }
    if same_record:
        update.update(health=kept.health, failures_in_a_row=kept.failures_in_a_row)
    return with_state(task, update)


def _invalid(bad: InvalidTask, current: Task | None, now: datetime) -> Task:
    # Built without validation (like a stored definition that no longer validates), from what
    # could be read of it: it can be listed, found by name and replaced, never run.
    spec = TaskSpec.model_construct(name=bad.name, url=bad.url, interval=bad.interval)
    fields = {
        "spec": spec,
        "status": TaskStatus.ERROR,
        "status_reason": bad.reason,
        "updated_at": now,
    }
    if current is None:
        return Task(id=bad.task_id, created_at=now, **fields)
    return current.model_copy(update=fields)


def _same_check(before: TaskSpec, after: TaskSpec) -> bool:
    try:
        return before.model_dump(exclude={"name"}) == after.model_dump(exclude={"name"})
    except Exception:  # a definition built without validation may not dump
        return False


@dataclass(frozen=True, slots=True)
class Refusals:
    """What the checker's own state says of a task from a record (None: nothing)."""

    target: str | None = None  # the target policy's reason
    name_taken_by: uuid.UUID | None = None  # another task holds the name
    full: int | None = None  # the task is new and the checker holds this maximum of tasks


# Most tasks: one for all (a cluster node judges 100,000 of them at start).
NOTHING_REFUSED: Final = Refusals()


def judged(task: Task, refusals: Refusals, now: datetime) -> Task:
    """`task` in status `error` with the reason when the API would have refused it; else as
    it is. A task already in error (its record does not validate) keeps its reason."""
    if task.status is TaskStatus.ERROR and (task.status_reason or "").startswith(INVALID_RECORD):
        return task
    if refusals.target is not None:
        reason = f"target refused by policy: {refusals.target}"
    elif refusals.name_taken_by is not None:
        reason = f"name {task.spec.name!r} is taken by task {refusals.name_taken_by}"
    elif refusals.full is not None:
        reason = f"the checker holds its maximum of {refusals.full} tasks"
    else:
        return task
    return task.model_copy(
        update={
            "status": TaskStatus.ERROR,
            "status_reason": reason[:MAX_REASON],
            "updated_at": now,
        }
    )


def says_the_same(task: Task, record: TaskRecord) -> bool:
    """Whether the record states the task's definition and status as they are, so a reader
    of the topic sees what the checker has (times a record leaves out are not a difference)."""
    return (
        task.status is record.status
        and task.status_reason == record.status_reason
        and task.spec == record.spec
    )


# --- What a checker does with a record -----------------------------------------------------------


class Action(StrEnum):
    APPLY = "apply"  # the record says what the task now is
    ECHO = "echo"  # this checker's own record read back: nothing to change
    SUPERSEDED = "superseded"  # a later record of this checker is (or will be) the last word


def action_for(*, cluster: bool, own: bool, own_pending: bool, own_later: bool) -> Action:
    """What a record does, by mode (`own`: written by this checker, by `origin`; a tombstone
    has none).

    Cluster mode: the topic is the source of truth, every record is applied in topic order,
    the checker's own included (its writes wait for exactly that). Single mode: SQLite is the
    source of truth and already has the checker's own records; another program's record is
    applied unless a record of this checker lands after it (`own_pending`: not confirmed yet;
    `own_later`: known to have landed at a later offset), which is then the topic's last word,
    as it is SQLite's.
    """
    if cluster:
        return Action.APPLY
    if own:
        return Action.ECHO
    if own_pending or own_later:
        return Action.SUPERSEDED
    return Action.APPLY


# --- Single mode: the topic must end with what SQLite holds ------------------------------------


def republish_after_foreign(*, own_pending: bool, own_later: bool, as_recorded: bool) -> bool:
    """After applying another program's record of a task: publish the task as it now is?

    Yes when a record of this checker still has to land (`own_pending`) or landed after the
    one applied (`own_later`): the topic would end with that one, not with what SQLite holds.
    Yes when the task is not as recorded (`as_recorded` False: the checker refused it, or it
    ended), so readers of the topic see the checker's verdict.
    """
    return own_pending or own_later or not as_recorded


def republish_after_echo(
    echo_updated_at: datetime | None,
    current: Task | None,
    *,
    own_pending: bool,
    own_later: bool,
) -> bool:
    """After reading back one of this checker's own records (`echo_updated_at` None: one that
    does not validate): publish the task as it now is (`current`)?

    The topic's last record of the task is this echo unless another own record is on its way
    or landed later. If the echo does not say what SQLite holds now (another program's record
    was applied after this one was made, and landed before it, and the crash of this checker
    lost what it knew of that order), the topic must hear it again. A task this checker does
    not have is left alone: its tombstone follows, or the record is not this checker's at all
    (another checker that shares its CHECKER_NODE_ID).
    """
    if own_pending or own_later or current is None or echo_updated_at is None:
        return False
    return current.updated_at != echo_updated_at
