"""What a record of the task topic does to a checker's task, and when the checker publishes
again: the pure rules of `task_view`, one table per rule."""

from __future__ import annotations

import sys
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from checker_common.contract import Health
from checker_common.task_record import InvalidTask, TaskChange, TaskRecord, decode, encode
from checker_common.task_spec import TaskSpec, TaskStatus
from periodic_checker.store import RuntimeState
from periodic_checker.task_view import (
    INVALID_RECORD,
    Action,
    Refusals,
    action_for,
    applied,
    judged,
    record_of,
    republish_after_echo,
    republish_after_foreign,
    says_the_same,
    with_runtime,
)
from periodic_checker.tasks import Task

TASK = uuid.UUID("3f1c8a52-6a8e-4c39-9a44-5d2b1f0e7c11")
OTHER = uuid.UUID("a0b1c2d3-0000-4000-8000-000000000001")
NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
EARLIER = NOW - timedelta(hours=1)
SPEC = {"name": "shop", "url": "https://shop.example.net/health", "interval": 30, "timeout": 5}


def spec(**changes: Any) -> TaskSpec:
    return TaskSpec.model_validate({**SPEC, **changes})


def change(**fields: Any) -> TaskChange:
    record = TaskRecord(id=TASK, **{"spec": spec(), **fields})
    return TaskChange(TASK, record)


def running(**fields: Any) -> Task:
    """The task as a checker has it after some runs."""
    base: dict[str, Any] = {
        "id": TASK,
        "spec": spec(),
        "health": Health.DOWN,
        "runs": 7,
        "manual_runs": 2,
        "failures_in_a_row": 3,
        "last_run_at": EARLIER,
        "created_at": EARLIER - timedelta(days=1),
        "updated_at": EARLIER,
    }
    return Task(**{**base, **fields})


# --- applying a record ---------------------------------------------------------------------------


def test_a_record_of_a_new_task_makes_it_with_the_records_definition_status_and_times() -> None:
    created, updated = EARLIER - timedelta(days=2), EARLIER
    task = applied(
        change(status=TaskStatus.PAUSED, created_at=created, updated_at=updated), None, NOW
    )
    assert (task.id, task.spec, task.status) == (TASK, spec(), TaskStatus.PAUSED)
    assert (task.created_at, task.updated_at) == (created, updated)
    assert (task.health, task.runs, task.last_run_at) == (Health.UNKNOWN, 0, None)


def test_a_task_made_from_a_record_is_held_as_compactly_as_one_loaded_from_the_store() -> None:
    """A cluster node holds every task of the topic: each in dictionaries that share their keys
    (a third of the size of the ones validation makes), and so is it after a rebuilt view gave
    it back its state."""
    record = change(spec=spec(pattern="up and running"))
    made = applied(record, None, NOW)
    kept = with_runtime(made, RuntimeState(Health.UP, 9, 1, 0, EARLIER, (2, 40)), same_record=True)
    for task in (made, kept):
        for model in (task, task.spec):
            assert sys.getsizeof(model.__dict__) < sys.getsizeof(dict(model.__dict__))
    assert made.spec == record.record.spec
    assert (
        made.model_dump()
        == Task(id=TASK, spec=record.record.spec, created_at=NOW, updated_at=NOW).model_dump()
    )
    assert (kept.runs, kept.health) == (9, Health.UP)
    assert made.spec.pattern is applied(record, None, NOW).spec.pattern  # one string for both


def test_a_record_without_times_takes_now_and_keeps_the_known_creation_time() -> None:
    assert applied(change(), None, NOW).created_at == NOW
    before = running()
    task = applied(change(), before, NOW)
    assert (task.created_at, task.updated_at) == (before.created_at, NOW)


@pytest.mark.parametrize(
    ("new_spec", "health_kept"),
    [
        (spec(name="renamed shop"), True),  # the same check under another name
        (spec(url="https://shop.example.net/other"), False),
        (spec(interval=60, timeout=5), False),
    ],
)
def test_a_record_keeps_the_checkers_state_and_a_new_check_starts_health_over(
    new_spec: TaskSpec, health_kept: bool
) -> None:
    before = running()
    task = applied(TaskChange(TASK, TaskRecord(id=TASK, spec=new_spec)), before, NOW)
    assert (task.runs, task.manual_runs, task.last_run_at) == (7, 2, EARLIER)
    if health_kept:
        assert (task.health, task.failures_in_a_row) == (Health.DOWN, 3)
    else:
        assert (task.health, task.failures_in_a_row) == (Health.UNKNOWN, 0)


def test_an_active_record_of_a_task_past_its_end_makes_it_done() -> None:
    task = applied(change(spec=spec(end_after_runs=5)), running(), NOW)
    assert task.status is TaskStatus.DONE
    assert task.status_reason == "ran 7 of 5 runs"


def test_a_record_that_does_not_validate_makes_a_task_in_error_that_can_be_found() -> None:
    bad = decode(str(TASK).encode(), orjson.dumps({"spec": {**SPEC, "url": "ftp://shop/"}}))
    assert isinstance(bad, InvalidTask)
    task = applied(bad, None, NOW)
    assert task.status is TaskStatus.ERROR
    assert task.status_reason is not None
    assert task.status_reason.startswith(INVALID_RECORD)
    assert "spec.url" in task.status_reason
    assert (task.spec.name, task.spec.url, task.spec.interval) == ("shop", "ftp://shop/", 30)


def test_a_task_with_state_keeps_it_when_its_record_turns_invalid() -> None:
    bad = decode(str(TASK).encode(), b"not json")
    assert isinstance(bad, InvalidTask)
    task = applied(bad, running(), NOW)
    assert (task.status, task.runs, task.health) == (TaskStatus.ERROR, 7, Health.DOWN)


# --- the checks the API makes against the checker's own state -----------------------------------


@pytest.mark.parametrize(
    ("refusals", "reason"),
    [
        (Refusals(), None),
        (Refusals(target="169.254.0.0/16 is denied"), "target refused by policy: 169.254"),
        (Refusals(name_taken_by=OTHER), f"name 'shop' is taken by task {OTHER}"),
        (Refusals(full=10), "the checker holds its maximum of 10 tasks"),
        # The policy is named first: it says most about what to fix.
        (Refusals(target="denied", name_taken_by=OTHER), "target refused by policy: denied"),
    ],
)
def test_a_record_the_api_would_refuse_makes_a_task_in_error(
    refusals: Refusals, reason: str | None
) -> None:
    task = judged(applied(change(), None, NOW), refusals, NOW)
    if reason is None:
        assert task.status is TaskStatus.ACTIVE
    else:
        assert task.status is TaskStatus.ERROR
        assert task.status_reason is not None
        assert task.status_reason.startswith(reason)


def test_a_record_that_does_not_validate_keeps_its_own_reason() -> None:
    bad = decode(str(TASK).encode(), b"[]")
    assert isinstance(bad, InvalidTask)
    task = applied(bad, None, NOW)
    assert judged(task, Refusals(target="denied"), NOW) == task


def test_a_record_says_the_same_unless_status_reason_or_definition_differ() -> None:
    task = applied(change(), None, NOW)
    record = change().record
    assert says_the_same(task, record)  # times the record leaves out are no difference
    assert not says_the_same(judged(task, Refusals(target="denied"), NOW), record)
    assert not says_the_same(task, change(status=TaskStatus.PAUSED).record)
    assert not says_the_same(task, change(spec=spec(interval=60)).record)


def test_the_record_of_a_task_comes_back_as_the_same_task() -> None:
    task = running(status=TaskStatus.PAUSED, status_reason=None)
    key, value = encode(record_of(task, "node-a"))
    decoded = decode(key, value)
    assert isinstance(decoded, TaskChange)
    assert decoded.record.origin == "node-a"
    assert applied(decoded, task, NOW) == task


def test_a_rebuilt_view_keeps_run_counters_and_keeps_health_only_for_the_same_record() -> None:
    kept = RuntimeState(Health.UP, 9, 1, 0, EARLIER, (2, 40))
    task = applied(change(), None, NOW)
    same = with_runtime(task, kept, same_record=True)
    newer = with_runtime(task, kept, same_record=False)
    assert (same.runs, same.manual_runs, same.last_run_at, same.health) == (
        9,
        1,
        EARLIER,
        Health.UP,
    )
    assert (newer.runs, newer.health) == (9, Health.UNKNOWN)


# --- single mode: when the checker publishes again ----------------------------------------------


@pytest.mark.parametrize(
    ("own_pending", "own_later", "as_recorded", "again"),
    [
        (False, False, True, False),  # applied as it came: the topic says what SQLite has
        (False, False, False, True),  # refused or ended here: the topic hears the verdict
        (True, False, True, True),
        (False, True, True, True),
    ],
)
def test_after_another_programs_record(
    own_pending: bool, own_later: bool, as_recorded: bool, again: bool
) -> None:
    assert (
        republish_after_foreign(
            own_pending=own_pending, own_later=own_later, as_recorded=as_recorded
        )
        is again
    )


@pytest.mark.parametrize(
    ("echo_at", "current", "own_pending", "own_later", "again"),
    [
        (EARLIER, running(updated_at=EARLIER), False, False, False),  # the topic is right
        # Another program's record was applied after this one was made, but landed before it.
        (EARLIER, running(updated_at=NOW), False, False, True),
        (EARLIER, running(updated_at=NOW), True, False, False),  # the newer one is on its way
        (EARLIER, running(updated_at=NOW), False, True, False),  # ... or landed after
        (EARLIER, None, False, False, False),  # not this checker's task (or its tombstone follows)
        (None, running(updated_at=NOW), False, False, False),  # an echo that does not validate
    ],
)
def test_after_reading_back_its_own_record(
    echo_at: datetime | None, current: Task | None, own_pending: bool, own_later: bool, again: bool
) -> None:
    assert (
        republish_after_echo(echo_at, current, own_pending=own_pending, own_later=own_later)
        is again
    )


# --- what a record does, by mode ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("cluster", "own", "own_pending", "own_later", "action"),
    [
        # Cluster mode: the topic is the truth; every record is applied, its own included.
        (True, True, False, False, Action.APPLY),
        (True, False, True, True, Action.APPLY),
        # Single mode: SQLite is the truth and has its own records already.
        (False, True, False, False, Action.ECHO),
        (False, True, True, True, Action.ECHO),
        (False, False, False, False, Action.APPLY),
        # Another program's record, with one of this checker's landing after it.
        (False, False, True, False, Action.SUPERSEDED),
        (False, False, False, True, Action.SUPERSEDED),
    ],
)
def test_what_a_record_does_in_each_mode(
    cluster: bool, own: bool, own_pending: bool, own_later: bool, action: Action
) -> None:
    assert (
        action_for(cluster=cluster, own=own, own_pending=own_pending, own_later=own_later) is action
    )
