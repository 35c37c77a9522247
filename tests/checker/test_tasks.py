"""Scheduling math and task state transitions: pure functions, a fake clock (plain numbers)."""

from __future__ import annotations

import math
import typing
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from checker_common.contract import ErrorKind, Health
from checker_common.task_spec import INTEGER_FIELDS, TaskSpec, TaskStatus
from periodic_checker.tasks import (
    ONE_SHOT_SPREAD,
    Task,
    after_attempt,
    edited,
    end_reason,
    ended_by_now,
    next_fire_time,
    one_shot_fire_time,
    paused,
    planned_fire_time,
    resumed,
    spread_fraction,
    start_offset,
)

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
T0 = 1_800_000_000.0  # a fake clock reading, epoch seconds


def make_task(status: TaskStatus = TaskStatus.ACTIVE, **spec: Any) -> Task:
    fields: dict[str, Any] = {"name": "site", "url": "http://example.test/", "interval": 60.0}
    fields.update(spec)
    return Task(
        id=uuid.UUID(int=7),
        spec=TaskSpec(**fields),
        status=status,
        created_at=NOW,
        updated_at=NOW,
    )


# -- offsets and fire times ------------------------------------------------------------------------


def test_offset_is_stable_and_inside_the_interval() -> None:
    task_id = uuid.uuid4()
    assert start_offset(task_id, 60) == start_offset(uuid.UUID(str(task_id)), 60)
    assert 0 <= start_offset(task_id, 60) < 60
    assert start_offset(task_id, 120) == pytest.approx(2 * start_offset(task_id, 60))


def test_a_task_keeps_its_place_on_the_grid_across_releases() -> None:
    # Nodes of two releases share tasks during a rolling upgrade, and a restart must not move
    # a task: the phase is the 8-byte BLAKE2b digest of the id's bytes, whatever computes it.
    task_id = uuid.UUID("0b0e3c3e-8f3a-4d7e-9c1a-5f6e7d8c9b0a")
    assert start_offset(task_id, 60) == pytest.approx(51.451799047763735, abs=1e-12)
    assert spread_fraction(task_id) == pytest.approx(0.2786762154109694, abs=1e-15)


@pytest.mark.parametrize("interval", [1.0, 7.5, 60.0, 3600.0])
@pytest.mark.parametrize("now", [T0, T0 + 0.3, T0 + 59.999, T0 + 86_400.123])
def test_next_fire_is_the_first_slot_of_the_grid_at_or_after_now(
    interval: float, now: float
) -> None:
    task_id = uuid.UUID(int=12345)
    fire = next_fire_time(task_id, interval, now)
    assert now <= fire < now + interval
    cycles = (fire - start_offset(task_id, interval)) / interval
    assert cycles == pytest.approx(round(cycles), abs=1e-6)


@pytest.mark.parametrize("interval", [1.0, 60.0, 300.0])
def test_planned_time_is_the_slot_just_passed(interval: float) -> None:
    task_id = uuid.uuid4()
    fire = next_fire_time(task_id, interval, T0)
    assert planned_fire_time(task_id, interval, fire + 0.25) == pytest.approx(fire, abs=1e-6)
    assert planned_fire_time(task_id, interval, fire - 0.25) == pytest.approx(
        fire - interval, abs=1e-6
    )


def test_a_restart_keeps_the_phase() -> None:
    """After any downtime, the next fire lies on the same grid as before it."""
    task_id = uuid.uuid4()
    before = next_fire_time(task_id, 60, T0)
    after = next_fire_time(task_id, 60, T0 + 12_345.6)
    assert (after - before) / 60 == pytest.approx(round((after - before) / 60), abs=1e-6)


def test_ten_thousand_tasks_spread_over_their_interval() -> None:
    interval = 60.0
    ids = [uuid.uuid4() for _ in range(10_000)]
    fires = [next_fire_time(task_id, interval, T0) for task_id in ids]
    per_second = Counter(math.floor(fire - T0) for fire in fires)
    assert set(per_second) == set(range(60)), "every second of the interval gets some"
    # 166.7 per second on average; a uniform spread stays far below twice that.
    assert max(per_second.values()) < 2 * len(ids) / interval
    # Restarting at any moment does not bunch them up either.
    later = [next_fire_time(task_id, interval, T0 + 1234.5) for task_id in ids]
    assert max(Counter(math.floor(f) for f in later).values()) < 2 * len(ids) / interval


def test_one_shot_runs_at_once_when_created_and_spread_after_a_restart() -> None:
    task_id = uuid.uuid4()
    assert one_shot_fire_time(task_id, T0, at_load=False) == T0
    at_start = one_shot_fire_time(task_id, T0, at_load=True)
    assert T0 <= at_start < T0 + ONE_SHOT_SPREAD
    assert at_start == one_shot_fire_time(task_id, T0, at_load=True)


# -- ends ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "runs", "ended"),
    [
        ({"interval": None, "timeout": 5}, 0, False),
        ({"interval": None, "timeout": 5}, 1, True),
        ({"end_after_runs": 3}, 2, False),
        ({"end_after_runs": 3}, 3, True),
        ({"end_at": NOW + timedelta(seconds=1)}, 100, False),
        ({"end_at": NOW}, 0, True),
        ({}, 10_000, False),
    ],
)
def test_end_reason(spec: dict[str, Any], runs: int, ended: bool) -> None:
    assert (end_reason(make_task(**spec).spec, runs, NOW) is not None) is ended


# -- the transitions table (docs/task-states.md), one test per row ---------------------------------


def attempt(task: Task, ok: bool, n: int = 1, kind: ErrorKind | None = None, **kw: Any) -> Any:
    if not ok and kind is None:
        kind = ErrorKind.CONNECT
    return after_attempt(
        task, ok=ok, error_kind=kind, error_message="refused", attempt=n, now=NOW, **kw
    )


def test_success_moves_health_to_up_and_counts_the_run() -> None:
    outcome = attempt(make_task(), ok=True)
    assert outcome.retry_after is None
    assert outcome.changed
    assert outcome.task.health is Health.UP
    assert outcome.task.runs == 1
    assert outcome.task.status is TaskStatus.ACTIVE


def test_failure_without_retries_moves_health_to_down() -> None:
    outcome = attempt(make_task(), ok=False)
    assert outcome.task.health is Health.DOWN
    assert outcome.task.failures_in_a_row == 1


def test_failure_with_retries_left_retries_and_leaves_health() -> None:
    task = make_task(retries=2, retry_interval=3).model_copy(update={"health": Health.UP})
    first = attempt(task, ok=False, n=1)
    second = attempt(task, ok=False, n=2)
    last = attempt(task, ok=False, n=3)
    assert first.retry_after == 3
    assert not first.changed
    assert first.task.health is Health.UP
    assert second.retry_after == 3
    assert second.task.runs == 0
    assert last.retry_after is None
    assert last.task.health is Health.DOWN
    assert last.task.runs == 1


def test_a_retry_that_succeeds_moves_health_to_up() -> None:
    outcome = attempt(make_task(retries=2), ok=True, n=2)
    assert outcome.task.health is Health.UP
    assert outcome.task.failures_in_a_row == 0


def test_one_shot_becomes_done_after_its_run() -> None:
    outcome = attempt(make_task(interval=None, timeout=5), ok=False)
    assert outcome.task.status is TaskStatus.DONE
    assert outcome.task.status_reason == "one-shot task ran"
    assert outcome.task.health is Health.DOWN


def test_end_after_runs_becomes_done_at_the_last_run() -> None:
    task = make_task(end_after_runs=2)
    once = attempt(task, ok=True).task
    twice = attempt(once, ok=True).task
    assert once.status is TaskStatus.ACTIVE
    assert twice.status is TaskStatus.DONE
    assert twice.runs == 2


def test_end_at_passed_becomes_done_at_the_next_run_or_at_load() -> None:
    task = make_task(end_at=NOW - timedelta(seconds=1))
    assert attempt(task, ok=True).task.status is TaskStatus.DONE
    loaded = ended_by_now(task, NOW)
    assert loaded.status is TaskStatus.DONE
    assert "end time" in (loaded.status_reason or "")
    assert ended_by_now(make_task(), NOW).status is TaskStatus.ACTIVE


def test_denied_target_becomes_error_with_the_reason_and_no_retry() -> None:
    outcome = attempt(make_task(retries=3), ok=False, kind=ErrorKind.DENIED_TARGET)
    assert outcome.retry_after is None
    assert outcome.task.status is TaskStatus.ERROR
    assert outcome.task.status_reason == "target refused by policy: refused"
    assert outcome.task.health is Health.UNKNOWN
    assert (outcome.task.runs, outcome.task.last_run_at) == (1, NOW), "it ran, and was refused"


def test_a_result_not_judged_moves_neither_health_nor_failures_and_is_not_retried() -> None:
    task = make_task(retries=2).model_copy(update={"health": Health.UP, "failures_in_a_row": 0})
    outcome = attempt(task, ok=False, kind=ErrorKind.CHECKER_OVERLOADED)
    assert outcome.retry_after is None
    assert outcome.task.health is Health.UP
    assert outcome.task.failures_in_a_row == 0
    assert outcome.task.runs == 1  # a run like any other: a task with an end still ends
    assert outcome.task.last_run_at == NOW
    down = task.model_copy(update={"health": Health.DOWN, "failures_in_a_row": 4})
    assert attempt(down, ok=False, kind=ErrorKind.CHECKER_OVERLOADED).task.health is Health.DOWN
    assert attempt(down, ok=False, kind=ErrorKind.CHECKER_OVERLOADED).task.failures_in_a_row == 4


def test_a_result_not_judged_counts_towards_the_end_of_the_task() -> None:
    once = attempt(make_task(end_after_runs=1), ok=False, kind=ErrorKind.CHECKER_OVERLOADED)
    assert once.task.status is TaskStatus.DONE
    assert once.task.health is Health.UNKNOWN
    one_shot = attempt(
        make_task(interval=None, timeout=5), ok=False, kind=ErrorKind.CHECKER_OVERLOADED
    )
    assert one_shot.task.status is TaskStatus.DONE


def test_a_run_by_hand_not_judged_changes_nothing() -> None:
    task = make_task().model_copy(update={"health": Health.UP})
    outcome = attempt(task, ok=False, kind=ErrorKind.CHECKER_OVERLOADED, counts_as_run=False)
    assert not outcome.changed
    assert outcome.task == task


def test_run_by_hand_moves_health_and_counts_apart_from_the_scheduled_runs() -> None:
    outcome = attempt(make_task(interval=None, timeout=5), ok=True, counts_as_run=False)
    assert outcome.task.health is Health.UP
    assert (outcome.task.runs, outcome.task.manual_runs) == (0, 1)
    assert outcome.task.status is TaskStatus.ACTIVE, "a one-shot task run by hand still runs"


@pytest.mark.parametrize("by_hand", [False, True])
@pytest.mark.parametrize("kind", [ErrorKind.CONNECT, ErrorKind.DENIED_TARGET, None])
def test_every_final_run_is_counted_once_so_the_counters_agree_with_the_last_run(
    by_hand: bool, kind: ErrorKind | None
) -> None:
    task = make_task()
    for n in range(1, 4):
        task = attempt(task, ok=kind is None, kind=kind, counts_as_run=not by_hand).task
        assert task.runs + task.manual_runs == n
        assert task.failures_in_a_row <= task.runs + task.manual_runs
        assert task.last_run_at == NOW
    assert (task.manual_runs if by_hand else task.runs) == 3


def test_pause_and_resume() -> None:
    task = make_task()
    stopped = paused(task, NOW)
    assert stopped.status is TaskStatus.PAUSED
    assert paused(stopped, NOW).status is TaskStatus.PAUSED
    assert resumed(stopped, NOW).status is TaskStatus.ACTIVE
    assert resumed(task, NOW).status is TaskStatus.ACTIVE


@pytest.mark.parametrize("status", [TaskStatus.DONE, TaskStatus.ERROR])
def test_done_and_error_tasks_cannot_be_paused(status: TaskStatus) -> None:
    with pytest.raises(ValueError, match="cannot be paused"):
        paused(make_task(status), NOW)


def test_a_done_task_cannot_be_resumed() -> None:
    with pytest.raises(ValueError, match="done"):
        resumed(make_task(TaskStatus.DONE), NOW)


def test_an_error_task_resumes_when_its_definition_validates() -> None:
    task = make_task(TaskStatus.ERROR).model_copy(update={"status_reason": "target refused"})
    again = resumed(task, NOW)
    assert again.status is TaskStatus.ACTIVE
    assert again.status_reason is None


def test_an_edit_resets_health_unless_only_the_name_changes() -> None:
    task = make_task().model_copy(update={"health": Health.DOWN, "failures_in_a_row": 3})
    renamed = edited(task, task.spec.model_copy(update={"name": "other"}), NOW)
    moved = edited(task, TaskSpec(name="site", url="http://elsewhere.test/"), NOW)
    assert renamed.health is Health.DOWN
    assert moved.health is Health.UNKNOWN
    assert moved.failures_in_a_row == 0


@pytest.mark.parametrize(
    ("before", "changes", "after"),
    [
        (TaskStatus.PAUSED, {"interval": 30}, TaskStatus.PAUSED),
        (TaskStatus.ERROR, {"interval": 30}, TaskStatus.ACTIVE),
        (TaskStatus.DONE, {"end_after_runs": 10}, TaskStatus.ACTIVE),
        (TaskStatus.ACTIVE, {"end_after_runs": 3}, TaskStatus.DONE),
    ],
)
def test_an_edit_sets_the_status_from_the_new_end(
    before: TaskStatus, changes: dict[str, Any], after: TaskStatus
) -> None:
    task = make_task(before, end_after_runs=5).model_copy(update={"runs": 3})
    spec = TaskSpec(**{**task.spec.model_dump(), **changes})
    assert edited(task, spec, NOW).status is after


# -- definitions: what validation accepts is what storage loads back -------------------------------


@pytest.mark.parametrize(
    ("fields", "field", "words"),
    [
        ({"interval": 5}, "timeout", "default timeout is 10 s"),
        ({"interval": 10}, "timeout", "below the interval"),
        ({"interval": 8, "timeout": 8}, "timeout", "below the interval"),
    ],
)
def test_a_default_is_validated_like_a_given_value(
    fields: dict[str, Any], field: str, words: str
) -> None:
    with pytest.raises(ValidationError) as refused:
        TaskSpec(name="site", url="http://example.test/", **fields)

    [error] = refused.value.errors()
    assert error["loc"] == (field,)
    assert words in error["msg"]


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"interval": 11},
        {"interval": 5, "timeout": 4},
        {"interval": None},
        {"interval": 1, "timeout": 0.5, "retries": 3, "retry_interval": 60},
        {"end_at": NOW, "accepted_statuses": "399-200,418", "headers": {"X-A": "a\tb"}},
        {"url": "http://B\u00fccher.example:8080/p?q#f", "name": "caf\u00e9 \U0001f600"},
    ],
)
def test_a_definition_that_validates_loads_back_from_storage(fields: dict[str, Any]) -> None:
    spec = TaskSpec(**{"name": "site", "url": "http://example.test/", **fields})

    assert TaskSpec.model_validate_json(spec.model_dump_json()) == spec
    assert TaskSpec.model_validate(spec.model_dump()) == spec


def test_stored_definitions_keep_loading_under_strict_validation() -> None:
    # Definitions stored before the API was strict: JSON integers for numbers load as before.
    stored = '{"name": "site", "url": "http://example.test/", "interval": 60, "timeout": 10,'
    stored += ' "retry_interval": 5, "end_at": "2099-01-01T00:00:00Z"}'

    spec = TaskSpec.model_validate_json(stored)

    assert (spec.interval, spec.timeout, spec.retry_interval) == (60.0, 10.0, 5.0)
    assert spec.end_at == datetime(2099, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("field", "value"),
    [("interval", "10"), ("interval", True), ("timeout", "5"), ("verify_tls", "yes"),
     ("follow_redirects", 1), ("retries", "1"), ("max_body_bytes", 1024.5)],
)  # fmt: skip
def test_a_json_string_is_not_a_number_and_not_a_boolean(field: str, value: Any) -> None:
    document = orjson.dumps({"name": "site", "url": "http://example.test/", field: value})

    with pytest.raises(ValidationError) as refused:
        TaskSpec.model_validate_json(document)

    assert [error["loc"] for error in refused.value.errors()] == [(field,)]


def test_every_integer_field_takes_a_number_without_a_fraction() -> None:
    integers = {
        name
        for name, info in TaskSpec.model_fields.items()
        if int in (info.annotation, *typing.get_args(info.annotation))
    }
    assert set(INTEGER_FIELDS) == integers  # JSON Schema's `integer`: 3.0 is one
    document = {"name": "site", "url": "http://example.test/", **dict.fromkeys(integers, 3.0)}

    spec = TaskSpec.model_validate_json(orjson.dumps(document))

    assert all(getattr(spec, name) == 3 for name in integers)
