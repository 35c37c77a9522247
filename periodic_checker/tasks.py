"""A task as the checker keeps it: a definition (`checker_common.task_spec.TaskSpec`) with its
identity and the state the checker keeps (status, health, runs); the scheduling math and the
state transitions, as pure functions.

Secrets in a definition are stored as given, because the probe sends them, and leave the
checker only masked (`redacted`). A masked value sent back (`***`) means "keep the stored one"
(`kept_secrets`), so a client can read a task and write it back unchanged.
"""

from __future__ import annotations

import hashlib
import math
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import yarl
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

from checker_common.contract import NOT_JUDGED, ErrorKind, Health
from checker_common.redact import MASK, redact_headers, redact_url
from checker_common.task_spec import TaskSpec, TaskStatus, assembled, compacted_spec
from checker_common.urls import InvalidURL


class Task(BaseModel):
    """A stored task: its definition plus the checker's state."""

    model_config = ConfigDict(frozen=True)

    id: uuid.UUID
    spec: TaskSpec
    status: TaskStatus = TaskStatus.ACTIVE
    status_reason: str | None = None
    health: Health = Health.UNKNOWN
    runs: int = Field(
        0, description="scheduled runs that ended (retries spent); `end_after_runs` counts these"
    )
    manual_runs: int = Field(
        0, description="runs started by hand (POST /tasks/{id}/run); they never end the task"
    )
    failures_in_a_row: int = Field(
        0, description="runs of either kind in a row, up to the latest, whose result failed"
    )
    created_at: datetime
    updated_at: datetime
    last_run_at: datetime | None = Field(
        None, description="when the latest run of either kind ended; null before the first"
    )


# --- Secrets: masked when shown, kept when the mask comes back (pure) -----------------------


def redacted(task: Task) -> Task:
    """The task as the API shows it: URL user info and secret header values masked."""
    spec = task.spec
    url = redact_url(spec.url)
    secret = spec.secret_header_names
    if url == spec.url and not any(name.lower() in secret for name in spec.headers):
        return task
    shown = _replaced(spec, url=url, headers=redact_headers(spec.headers, secret))
    return task.model_copy(update={"spec": shown})


def kept_secrets(spec: TaskSpec, stored: TaskSpec | None) -> TaskSpec:
    """`spec` with each mask (`***`) in a secret place replaced by the stored secret.

    A client that read a task (masked) and writes it back must not store the mask. The stored
    secret is kept only where it would go to the same place: the URL's user info when the
    scheme, user, host and port are the ones shown; a secret header's value when the header is
    still secret and the URL's origin is unchanged. Anywhere else a mask is refused (the field
    is named), so a secret is never sent to a host it was not given for.
    """
    update: dict[str, Any] = {}
    sent = spec.fetch_url
    if _masked(sent):
        if stored is None or _secret_place(stored) != _secret_place(spec):
            raise _refused(
                "url",
                f"{MASK} stands for the stored password, which is kept only with the same"
                " scheme, user, host and port; give the password",
            )
        kept = stored.fetch_url
        update["url"] = str(sent.with_user(kept.user).with_password(kept.password))
    was_secret = stored.secret_header_names if stored is not None else frozenset()
    masked = [
        name
        for name, value in spec.headers.items()
        if value == MASK
        and (name.lower() in spec.secret_header_names or name.lower() in was_secret)
    ]
    if masked:
        old = {k.lower(): v for k, v in stored.headers.items()} if stored is not None else {}
        same_origin = stored is not None and _origin(stored) == _origin(spec)
        headers = dict(spec.headers)
        for name in masked:
            key = name.lower()
            if not (same_origin and key in was_secret and key in spec.secret_header_names):
                raise _refused(
                    f"headers.{name}",
                    "the stored value of a secret header is kept only while the header stays"
                    " secret and the URL keeps its origin; send the value again",
                )
            if key not in old:
                raise _refused(f"headers.{name}", f"{MASK} stands for a stored value; none is")
            headers[name] = old[key]
        update["headers"] = headers
    return _replaced(spec, **update) if update else spec


def _replaced(spec: TaskSpec, **update: Any) -> TaskSpec:
    """`spec` with some fields replaced, without the values cached from the old ones
    (`model_copy` would carry `secret_values` over). Every value was validated before."""
    return TaskSpec.model_construct(spec.model_fields_set | set(update), **{**dict(spec), **update})


def _masked(url: yarl.URL) -> bool:
    """Whether the URL's user info is what a read shows in place of its secret: `user:***`,
    or `***` for a lone user name."""
    if url.raw_password is not None:
        return url.raw_password == MASK
    return url.raw_user == MASK


# The URLs are read as the probe reads them (`TaskSpec.fetch_url`); a stored definition that no
# longer validates is in no place and has no origin.


def _secret_place(spec: TaskSpec) -> tuple[object, ...] | None:
    """Where the secret of the URL's user info goes: the scheme, whether there is user info, the
    user that goes with a password, the host and the port."""
    try:
        url = spec.fetch_url
    except InvalidURL:
        return None
    has_password = url.raw_password is not None
    has_userinfo = has_password or url.raw_user is not None
    user = url.user if has_password else None
    return url.scheme, has_userinfo, has_password, user, url.raw_host, url.port


def _origin(spec: TaskSpec) -> tuple[str, str | None, int | None] | None:
    try:
        url = spec.fetch_url
    except InvalidURL:
        return None
    return url.scheme, url.raw_host, url.port


def _refused(field: str, message: str) -> ValidationError:
    """A validation error naming `field`, as the API reports any invalid definition."""
    loc = tuple(field.split(".", 1))
    error = InitErrorDetails(type=PydanticCustomError("secret_mask", message), loc=loc, input=MASK)
    return ValidationError.from_exception_data("TaskSpec", [error])


# Tasks (or their states) handled between two turns of the event loop where thousands are handled
# at once (a take of partitions, the states read since the last pass): the API and the task topic
# are answered meanwhile.
TASKS_PER_LOOP_TURN = 2000

# --- Scheduling math (pure: the clock is an argument) -------------------------------------------

# A one-shot task loaded at start (it never ran before a restart) runs within this many seconds,
# spread by its id, so a restart with many pending one-shots does not fire them together.
ONE_SHOT_SPREAD = 10.0

# The late slots of a handover run within about as long as the handover took (the age of a
# task's oldest late slot), but over at least this many seconds: the catch-up of thousands of
# tasks is spread, and one of a task whose slot passed a moment ago is not held back.
CATCH_UP_MIN_SPREAD = 5.0


def _id_fraction(task_id: uuid.UUID, person: hashlib.blake2b) -> float:
    """A stable number in [0, 1) from the id: the 8-byte BLAKE2b digest of its 16 bytes, under
    `person` (a hash made with that personalisation, copied: a third cheaper than making one
    for each id, the same digest, `bench/micro.py stored-rows`); another `person` gives an
    independent number."""
    digest = person.copy()
    digest.update(task_id.int.to_bytes(16, "big"))  # `task_id.bytes`, without its property
    return int.from_bytes(digest.digest(), "big") / 2**64


_PHASE = hashlib.blake2b(digest_size=8, person=b"")
_LATE_TURN = hashlib.blake2b(digest_size=8, person=b"late-turn")


def phase_fraction(task_id: uuid.UUID) -> float:
    """A stable number in [0, 1) derived from the id: the same task always gets the same one."""
    return _id_fraction(task_id, _PHASE)


def spread_fraction(task_id: uuid.UUID) -> float:
    """A second stable number in [0, 1) from the id, independent of `phase_fraction`: where a
    spread-out turn falls for a task must not follow its place on the grid, or the tasks whose
    slots passed together would take their turn together."""
    return _id_fraction(task_id, _LATE_TURN)


def start_offset(task_id: uuid.UUID, interval: float) -> float:
    """Where in each interval the task fires, in seconds after a multiple of the interval.

    Tasks with the same interval spread evenly over it instead of firing together, and a task
    keeps its phase across restarts because the offset depends on nothing but its id.
    """
    return phase_fraction(task_id) * interval


def next_fire_time(task_id: uuid.UUID, interval: float, now: float) -> float:
    """The first fire time at or after `now` (epoch seconds) on the task's fixed grid."""
    offset = start_offset(task_id, interval)
    cycles = math.ceil((now - offset) / interval)
    fire = cycles * interval + offset
    # Float rounding can put `fire` a hair before `now`; step to the next slot then.
    return fire if fire >= now else fire + interval


def planned_fire_time(task_id: uuid.UUID, interval: float, now: float) -> float:
    """The latest grid slot at or before `now`: when the run happening now was planned."""
    offset = start_offset(task_id, interval)
    cycles = math.floor((now - offset) / interval)
    return cycles * interval + offset


@dataclass(frozen=True)
class ResumePlan:
    """Where a new owner continues a task after a clean handover (`resume_plan`)."""

    first: float  # when the task fires first: its late slots' turn, or its next slot
    late: tuple[float, ...]  # passed slots run late, oldest first, each as its own slot
    skipped: int  # passed slots too old to run: not run, counted


def resume_plan(
    task_id: uuid.UUID, interval: float, last_slot: float, now: float, limit: float
) -> ResumePlan:
    """Where a new owner continues a task whose previous owner ran up to `last_slot` and
    handed it over.

    Every slot after `last_slot` that passed before `now` (the handover took longer than an
    interval) is run late, once, if it is at most `limit` seconds old; older ones are skipped
    and counted. None is run twice. The late slots run at `first`, a time set by the task's id
    within the age of the oldest of them (at least CATCH_UP_MIN_SPREAD) and before the task's
    next slot: a node that takes thousands of tasks spreads their late runs over about as long
    as the handover took, instead of starting them all at once, and a slot a few seconds old
    runs seconds late, not somewhere in its task's interval (an hour, for an hourly task).
    For 30,000 tasks at 60 s taken after a handover of 10 s, their late runs come at 1.8 x the
    tasks' usual rate in the busiest second, lag p50 7.6 s, p99 18 s (anywhere before the next
    slot, as until 2026-12-05: 1.1 x, p50 33 s, p99 59 s); after 30 s, 3.0 x (1.8 x); after a
    whole interval, when every late turn must also come before the task's next slot, 7.3 x
    (7.7 x): `bench/micro.py catch-up`.
    """
    after = next_fire_time(task_id, interval, last_slot + interval / 2)
    upcoming = next_fire_time(task_id, interval, now)
    if after >= upcoming:
        return ResumePlan(after, (), 0)
    passed = round((upcoming - after) / interval)  # slots in [after, now)
    # Each as a node running the task all along plans it (`planned_fire_time`), to the bit: a
    # result's scheduled_at is what "per (task, slot)" counts.
    slots = [
        planned_fire_time(task_id, interval, after + (k + 0.5) * interval) for k in range(passed)
    ]
    late = tuple(slot for slot in slots if now - slot <= limit)
    if not late:
        return ResumePlan(upcoming, (), passed)
    spread = min(upcoming - now, max(now - late[0], CATCH_UP_MIN_SPREAD))
    first = now + spread_fraction(task_id) * spread
    return ResumePlan(first, late, passed - len(late))


def one_shot_fire_time(task_id: uuid.UUID, now: float, *, at_load: bool) -> float:
    """A one-shot task runs at once when created, or spread over a few seconds after a restart."""
    return now + phase_fraction(task_id) * ONE_SHOT_SPREAD if at_load else now


# --- State transitions (pure) -------------------------------------------------------------------


def end_reason(spec: TaskSpec, runs: int, now: datetime) -> str | None:
    """Why a task with `runs` completed runs is finished, or None while it should keep running."""
    if spec.interval is None and runs >= 1:
        return "one-shot task ran"
    if spec.end_after_runs is not None and runs >= spec.end_after_runs:
        return f"ran {runs} of {spec.end_after_runs} runs"
    if spec.end_at is not None and now >= spec.end_at:
        return f"end time {spec.end_at.isoformat()} reached"
    return None


@dataclass(frozen=True)
class CheckOutcome:
    """What the checker does after one attempt: the task's new state and whether to retry."""

    task: Task
    retry_after: float | None  # seconds until the next attempt; None when this one was final
    changed: bool  # the stored state must be written


def after_attempt(
    task: Task,
    *,
    ok: bool,
    error_kind: ErrorKind | None,
    error_message: str,
    attempt: int,
    now: datetime,
    counts_as_run: bool = True,
) -> CheckOutcome:
    """Apply one attempt's result to a task (see docs/task-states.md for the table).

    - the target policy refused the host: status `error` with the reason, no retry;
    - a failure with retries left: retry after `retry_interval`, health and runs unchanged;
    - not judged (`checker_overloaded`: the checker held the check up, the target was not
      judged): no retry, health and failures_in_a_row unchanged; the run is counted like any
      other, so a task with an end still ends;
    - otherwise the attempt is final: health becomes up or down, the run is counted, and the
      task becomes `done` when its end is reached (one-shot, end_after_runs, end_at).
    Every final attempt counts once, in `runs` when scheduled, in `manual_runs` when started by
    hand (`counts_as_run=False`: one attempt, and it never ends the task), so the counters
    always account for `last_run_at` and `failures_in_a_row`.
    """
    counter = "runs" if counts_as_run else "manual_runs"
    counted = getattr(task, counter) + 1
    if error_kind is ErrorKind.DENIED_TARGET:
        reason = f"target refused by policy: {error_message}"[:500]
        return CheckOutcome(
            task.model_copy(
                update={
                    "status": TaskStatus.ERROR,
                    "status_reason": reason,
                    "updated_at": now,
                    "last_run_at": now,
                    counter: counted,
                }
            ),
            retry_after=None,
            changed=True,
        )
    judged = error_kind is None or error_kind not in NOT_JUDGED
    if not judged and not counts_as_run:
        return CheckOutcome(task, retry_after=None, changed=False)
    if not ok and judged and counts_as_run and attempt <= task.spec.retries:
        return CheckOutcome(task, retry_after=task.spec.retry_interval, changed=False)
    update: dict[str, Any] = {"last_run_at": now, counter: counted}
    if judged:
        update["health"] = Health.UP if ok else Health.DOWN
        update["failures_in_a_row"] = 0 if ok else task.failures_in_a_row + 1
    if counts_as_run:
        ended = end_reason(task.spec, counted, now)
        if ended is not None and task.status is TaskStatus.ACTIVE:
            update.update(status=TaskStatus.DONE, status_reason=ended, updated_at=now)
    return CheckOutcome(with_state(task, update), retry_after=None, changed=True)


# Fields of a task built from values known valid (all of them): one set shared by all such tasks.
ALL_TASK_FIELDS = set(Task.model_fields)
# A new task's state: the model's defaults.
_NEW_TASK_STATE = {
    name: field.default for name, field in Task.model_fields.items() if not field.is_required()
}


def compacted(task: Task) -> Task:
    """The same task held as one loaded from the store is (`task_spec.assembled`): a dictionary
    sharing its keys and one set of fields for all tasks, its definition compacted too."""
    values = {**task.__dict__, "spec": compacted_spec(task.spec)}
    return assembled(Task, values, ALL_TASK_FIELDS)


def new_task(
    task_id: uuid.UUID,
    spec: TaskSpec,
    status: TaskStatus,
    status_reason: str | None,
    created_at: datetime,
    updated_at: datetime,
) -> Task:
    """A task that has not run yet, from values already validated (a record of the task topic),
    held compactly (`compacted`) and made without validating them again."""
    values = {
        **_NEW_TASK_STATE,
        "id": task_id,
        "spec": compacted_spec(spec),
        "status": status,
        "status_reason": status_reason,
        "created_at": created_at,
        "updated_at": updated_at,
    }
    return assembled(Task, values, ALL_TASK_FIELDS)


def with_state(task: Task, update: dict[str, Any]) -> Task:
    """`task.model_copy(update=update)` for state the checker computed or kept (valid values), the
    copy sharing the task's set of fields that were set when `update` adds none to it, rather
    than a copied set for each task after each check (pydantic copies a set before it changes
    it, and a frozen model never changes it)."""
    fields_set = task.__pydantic_fields_set__
    if not update.keys() <= fields_set:
        return task.model_copy(update=update)
    return assembled(Task, {**task.__dict__, **update}, fields_set)


def paused(task: Task, now: datetime) -> Task:
    """active -> paused (paused stays paused); done and error tasks cannot be paused."""
    if task.status in (TaskStatus.ACTIVE, TaskStatus.PAUSED):
        return task.model_copy(
            update={"status": TaskStatus.PAUSED, "status_reason": None, "updated_at": now}
        )
    raise ValueError(f"a task in status {task.status} cannot be paused")


def resumed(task: Task, now: datetime) -> Task:
    """paused or error -> active (active stays active); a done task stays done."""
    if task.status is TaskStatus.DONE:
        raise ValueError("the task is done; change its end (end_after_runs, end_at) to rerun it")
    if task.status is TaskStatus.ERROR:
        # Its definition must validate again (an upgrade may have made it invalid).
        TaskSpec.model_validate(task.spec.model_dump())
    reason = end_reason(task.spec, task.runs, now)
    if reason is not None:
        raise ValueError(f"the task has reached its end: {reason}")
    return task.model_copy(
        update={"status": TaskStatus.ACTIVE, "status_reason": None, "updated_at": now}
    )


def edited(task: Task, spec: TaskSpec, now: datetime) -> Task:
    """A new definition for an existing task.

    A change to what is checked (anything but the name) resets health to unknown. The status
    follows the new end: done when it is already reached; an error or done task otherwise
    becomes active again; a paused task stays paused.
    """
    same_check = spec.model_dump(exclude={"name"}) == _dump_or_none(task.spec, exclude={"name"})
    update: dict[str, Any] = {"spec": spec, "updated_at": now}
    if not same_check:
        update.update(health=Health.UNKNOWN, failures_in_a_row=0)
    reason = end_reason(spec, task.runs, now)
    if reason is not None:
        update.update(status=TaskStatus.DONE, status_reason=reason)
    elif task.status is TaskStatus.PAUSED:
        update.update(status=TaskStatus.PAUSED, status_reason=None)
    else:
        update.update(status=TaskStatus.ACTIVE, status_reason=None)
    return task.model_copy(update=update)


def ended_by_now(task: Task, now: datetime) -> Task:
    """An active task whose end is reached by `now` becomes done (its end time passed while the
    checker was stopped, before a task is taken over, or between two of its runs); any other
    task comes back as it is."""
    if task.status is TaskStatus.ACTIVE:
        reason = end_reason(task.spec, task.runs, now)
        if reason is not None:
            return task.model_copy(
                update={"status": TaskStatus.DONE, "status_reason": reason, "updated_at": now}
            )
    return task


def _dump_or_none(spec: TaskSpec, *, exclude: set[str]) -> dict[str, Any] | None:
    # A definition that no longer validates was built without validation; it may not dump.
    try:
        return spec.model_dump(exclude=exclude)
    except Exception:
        return None
