"""A task: what to check, how often, and what counts as success.

`TaskSpec` is the definition a user gives (validated here, once: the API, the store and the
probe all use it); `Task` adds identity and the state the checker keeps (status, health, runs).
"""

from __future__ import annotations

import hashlib
import math
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from functools import cached_property
from typing import Any, Literal
from urllib.parse import urlsplit

import re2
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from checker_common.contract import MAX_NAME, MAX_URL, NOT_JUDGED, ErrorKind, Health

HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,256}$")
STATUS_RANGES = re.compile(r"^\s*\d{3}(\s*-\s*\d{3})?(\s*,\s*\d{3}(\s*-\s*\d{3})?)*\s*$")
MAX_INTERVAL = 7 * 24 * 3600.0
MIN_INTERVAL = 1.0
MAX_TIMEOUT = 300.0
DEFAULT_MAX_BODY = 1_048_576


def compile_pattern(pattern: str) -> Any:
    """Compile with RE2 (linear time: no catastrophic backtracking); ValueError if invalid."""
    options = re2.Options()
    options.log_errors = False
    try:
        return re2.compile(pattern, options)
    except re2.error as exc:
        reason = exc.args[0] if exc.args else exc
        if isinstance(reason, bytes):
            reason = reason.decode(errors="replace")
        raise ValueError(f"not a valid RE2 regular expression: {reason}") from None


class TaskStatus(StrEnum):
    ACTIVE = "active"
    PAUSED = "paused"
    DONE = "done"
    ERROR = "error"


Method = Literal["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]


def parse_status_ranges(text: str) -> tuple[tuple[int, int], ...]:
    """'200-399,418' -> ((200, 399), (418, 418)); raises ValueError when malformed."""
    if not STATUS_RANGES.match(text):
        raise ValueError("expected ranges like '200-399' or '200,204,301-302'")
    ranges = []
    for part in text.split(","):
        low, _, high = part.strip().partition("-")
        lo, hi = int(low), int(high or low)
        if not 100 <= lo <= hi <= 599:
            raise ValueError(f"'{part.strip()}' is not a range of HTTP status codes (100-599)")
        ranges.append((lo, hi))
    return tuple(ranges)


def status_accepted(status: int, ranges: tuple[tuple[int, int], ...]) -> bool:
    return any(lo <= status <= hi for lo, hi in ranges)


class TaskSpec(BaseModel):
    """What a user defines. Unknown fields are refused; every error names its field."""

    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)

    # A task's name and URL go into each of its results: the contract's limits.
    name: str = Field(min_length=1, max_length=MAX_NAME)
    url: str = Field(min_length=1, max_length=MAX_URL, description="http:// or https:// URL")
    method: Method = "GET"
    headers: dict[str, str] = Field(default_factory=dict, max_length=50)
    body: str | None = Field(None, max_length=65_536)
    interval: float | None = Field(
        60.0,
        ge=MIN_INTERVAL,
        le=MAX_INTERVAL,
        description="seconds between runs; null runs the check once",
    )
    timeout: float = Field(10.0, gt=0, le=MAX_TIMEOUT, description="seconds; below the interval")
    pattern: str | None = Field(
        None, min_length=1, max_length=4096, description="RE2 regular expression"
    )
    pattern_fails_when: Literal["absent", "present"] = "absent"
    accepted_statuses: str = Field("200-399", max_length=200)
    follow_redirects: bool = True
    max_redirects: int = Field(10, ge=0, le=30)
    verify_tls: bool = True
    max_body_bytes: int = Field(DEFAULT_MAX_BODY, ge=0, le=64 * 1_048_576)
    keepalive: bool = Field(False, description="reuse connections instead of a new one per check")
    retries: int = Field(0, ge=0, le=10, description="failed tries before a failure counts")
    retry_interval: float = Field(5.0, gt=0, le=3600)
    end_after_runs: int | None = Field(None, ge=1)
    end_at: datetime | None = None

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if any(c in value for c in "\r\n\t ") or not value.isprintable():
            raise ValueError("must not contain spaces or control characters")
        parts = urlsplit(value)
        if parts.scheme.lower() not in {"http", "https"}:
            raise ValueError("scheme must be http or https")
        if not parts.hostname:
            raise ValueError("must name a host")
        try:
            _ = parts.port
        except ValueError:
            raise ValueError("port must be a number from 1 to 65535") from None
        return value

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        for name, header in value.items():
            if not HEADER_NAME.match(name):
                raise ValueError(f"header name {name[:40]!r} is not a valid token")
            if any(c in header for c in "\r\n\x00"):
                raise ValueError(f"header {name!r} value must not contain CR, LF or NUL")
            if len(header) > 8192:
                raise ValueError(f"header {name!r} value is longer than 8192 characters")
        return value

    @field_validator("pattern")
    @classmethod
    def _pattern_compiles(cls, value: str | None) -> str | None:
        if value is not None:
            compile_pattern(value)
        return value

    @field_validator("accepted_statuses")
    @classmethod
    def _statuses(cls, value: str) -> str:
        parse_status_ranges(value)
        return value

    @field_validator("end_at")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value

    @field_validator("timeout")
    @classmethod
    def _timeout_below_interval(cls, value: float, info: ValidationInfo) -> float:
        interval = info.data.get("interval")
        if interval is not None and value >= interval:
            raise ValueError(f"must be below the interval ({value:g} s >= {interval:g} s)")
        return value

    @cached_property
    def compiled_pattern(self) -> Any:
        return compile_pattern(self.pattern) if self.pattern is not None else None

    @cached_property
    def status_ranges(self) -> tuple[tuple[int, int], ...]:
        return parse_status_ranges(self.accepted_statuses)

    @property
    def host(self) -> str:
        return (urlsplit(self.url).hostname or "").lower()


class Task(BaseModel):
    """A stored task: its definition plus the checker's state."""

    model_config = ConfigDict(frozen=True)

    id: uuid.UUID
    spec: TaskSpec
    status: TaskStatus = TaskStatus.ACTIVE
    status_reason: str | None = None
    health: Health = Health.UNKNOWN
    runs: int = 0
    failures_in_a_row: int = 0
    created_at: datetime
    updated_at: datetime
    last_run_at: datetime | None = None


# --- Scheduling math (pure: the clock is an argument) -------------------------------------------

# A one-shot task loaded at start (it never ran before a restart) runs within this many seconds,
# spread by its id, so a restart with many pending one-shots does not fire them together.
ONE_SHOT_SPREAD = 10.0


def phase_fraction(task_id: uuid.UUID) -> float:
    """A stable number in [0, 1) derived from the id: the same task always gets the same one."""
    digest = hashlib.blake2b(task_id.bytes, digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


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
    `counts_as_run=False` (a run started by hand) moves health but leaves runs and status.
    """
    if error_kind is ErrorKind.DENIED_TARGET:
        reason = f"target refused by policy: {error_message}"[:500]
        return CheckOutcome(
            task.model_copy(
                update={
                    "status": TaskStatus.ERROR,
                    "status_reason": reason,
                    "updated_at": now,
                    "last_run_at": now,
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
    update: dict[str, Any] = {"last_run_at": now}
    if judged:
        update["health"] = Health.UP if ok else Health.DOWN
        update["failures_in_a_row"] = 0 if ok else task.failures_in_a_row + 1
    if counts_as_run:
        runs = task.runs + 1
        update["runs"] = runs
        ended = end_reason(task.spec, runs, now)
        if ended is not None and task.status is TaskStatus.ACTIVE:
            update.update(status=TaskStatus.DONE, status_reason=ended, updated_at=now)
    return CheckOutcome(task.model_copy(update=update), retry_after=None, changed=True)


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


def at_load(task: Task, now: datetime) -> Task:
    """An active task whose end time passed while the checker was stopped becomes done."""
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
