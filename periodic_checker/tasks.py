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

import re2
import yarl
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from checker_common.contract import MAX_NAME, MAX_URL, ErrorKind, Health
from periodic_checker.urls import URL_DESCRIPTION, URL_PATTERN, InvalidURL, parse_url

# Each rule below is one regular expression, used by the validator and shown as the field's
# `pattern` in the OpenAPI document; the syntax is the subset Python, ECMAScript and the
# fuzzer read alike (no `\s`, `\d` or `\p`).
#
# Text that goes into results and logs holds none of: ASCII and C1 controls (NUL makes
# PostgreSQL refuse the result, ESC writes ANSI escapes into a terminal), line and paragraph
# separators, bidirectional embeddings, overrides and isolates. (A lone surrogate cannot come
# through JSON; naming surrogates here would make the pattern invalid for ECMAScript engines.)
_UNSAFE_TEXT = r"\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069"
NAME_PATTERN = rf"^[^\x00-\x1f{_UNSAFE_TEXT}]*$"
# A header value may also hold a horizontal tab (RFC 9110 field-value).
HEADER_VALUE_PATTERN = rf"^[^\x00-\x08\x0a-\x1f{_UNSAFE_TEXT}]*$"
HEADER_NAME_PATTERN = r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,256}$"
_CODE = "[1-5][0-9][0-9]"
_RANGE = f"{_CODE}(?: *- *{_CODE})?"
STATUS_RANGES_PATTERN = rf"^ *{_RANGE}(?: *, *{_RANGE})* *$"
MAX_HEADER_VALUE = 8192
# The integer fields of TaskSpec (a test keeps this in step with the model).
INTEGER_FIELDS = ("max_redirects", "max_body_bytes", "retries", "end_after_runs")

NAME_TEXT = re.compile(NAME_PATTERN)
HEADER_NAME = re.compile(HEADER_NAME_PATTERN)
HEADER_VALUE = re.compile(HEADER_VALUE_PATTERN)
STATUS_RANGES = re.compile(STATUS_RANGES_PATTERN)
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
    """'200-399,418' -> ((200, 399), (418, 418)); raises ValueError when malformed.

    Codes are 100-599; a range may be written either way round ('399-200' is '200-399'), so
    the pattern alone is the whole rule."""
    if not STATUS_RANGES.match(text):
        raise ValueError(
            "expected ranges of status codes 100-599 like '200-399' or '200,204,301-302'"
        )
    ranges = []
    for part in text.split(","):
        low, _, high = part.strip().partition("-")
        lo, hi = sorted((int(low), int(high or low)))
        ranges.append((lo, hi))
    return tuple(ranges)


def status_accepted(status: int, ranges: tuple[tuple[int, int], ...]) -> bool:
    return any(lo <= status <= hi for lo, hi in ranges)


def _headers_schema(schema: dict[str, Any]) -> None:
    schema["propertyNames"] = {"pattern": HEADER_NAME_PATTERN}
    schema["additionalProperties"] = {
        "type": "string",
        "pattern": HEADER_VALUE_PATTERN,
        "maxLength": MAX_HEADER_VALUE,
    }


class TaskSpec(BaseModel):
    """What a user defines. Unknown fields are refused; every error names its field.

    Strict: a JSON string is not a number and not a boolean (a JSON integer is a number).
    Defaults are validated like given values, so a rule between fields (timeout below the
    interval) holds for a field left out too.
    """

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        str_strip_whitespace=True,
        strict=True,
        validate_default=True,
    )

    # A task's name and URL go into each of its results: the contract's limits.
    name: str = Field(
        min_length=1,
        max_length=MAX_NAME,
        description="unique; no control characters",
        json_schema_extra={"pattern": NAME_PATTERN},
    )
    url: str = Field(
        min_length=1,
        max_length=MAX_URL,
        description=URL_DESCRIPTION,
        json_schema_extra={"pattern": URL_PATTERN},
    )
    method: Method = "GET"
    headers: dict[str, str] = Field(
        default_factory=dict,
        max_length=50,
        description="request headers: token names, values without control characters",
        json_schema_extra=_headers_schema,
    )
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
    accepted_statuses: str = Field(
        "200-399",
        max_length=200,
        description="status codes that count as up, e.g. 200-399 or 200,204,301-302",
        json_schema_extra={"pattern": STATUS_RANGES_PATTERN},
    )
    follow_redirects: bool = True
    max_redirects: int = Field(10, ge=0, le=30)
    verify_tls: bool = True
    max_body_bytes: int = Field(DEFAULT_MAX_BODY, ge=0, le=64 * 1_048_576)
    keepalive: bool = Field(False, description="reuse connections instead of a new one per check")
    retries: int = Field(0, ge=0, le=10, description="failed tries before a failure counts")
    retry_interval: float = Field(5.0, gt=0, le=3600)
    end_after_runs: int | None = Field(None, ge=1)
    end_at: datetime | None = None

    @field_validator(*INTEGER_FIELDS, mode="before")
    @classmethod
    def _integral_numbers_are_integers(cls, value: Any) -> Any:
        # JSON Schema's `integer` (the document's word) is any number without a fraction, 7.0
        # too; strict mode alone would refuse 7.0. A string or a boolean stays refused. (Only
        # on integer fields: a before-validator makes the rest of a field's validation read
        # Python values, where strict mode refuses a time written as text.)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return value

    @field_validator("name")
    @classmethod
    def _printable_name(cls, value: str) -> str:
        if not NAME_TEXT.match(value):
            raise ValueError(f"must not contain control characters ({_first_unsafe(value)})")
        return value

    @field_validator("url")
    @classmethod
    def _fetchable_url(cls, value: str) -> str:
        try:
            parse_url(value)
        except InvalidURL as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        for name, header in value.items():
            if not HEADER_NAME.match(name):
                raise ValueError(f"header name {name[:40]!r} is not a valid token")
            if not HEADER_VALUE.match(header):
                raise ValueError(
                    f"header {name!r} value must not contain CR, LF, NUL or other control"
                    f" characters ({_first_unsafe(header, tab=True)})"
                )
            if len(header) > MAX_HEADER_VALUE:
                raise ValueError(
                    f"header {name!r} value is longer than {MAX_HEADER_VALUE} characters"
                )
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
        # Runs for the default too (validate_default): interval 5 without a timeout is refused
        # here, not stored and then turned to `error` at the next start.
        interval = info.data.get("interval")
        if interval is not None and value >= interval:
            default = cls.model_fields["timeout"].default
            hint = f"; the default timeout is {default:g} s" if value == default else ""
            raise ValueError(f"must be below the interval ({value:g} s >= {interval:g} s{hint})")
        return value

    @cached_property
    def compiled_pattern(self) -> Any:
        return compile_pattern(self.pattern) if self.pattern is not None else None

    @cached_property
    def status_ranges(self) -> tuple[tuple[int, int], ...]:
        return parse_status_ranges(self.accepted_statuses)

    @cached_property
    def fetch_url(self) -> yarl.URL:
        """The URL the probe fetches; InvalidURL for a stored definition that no longer
        validates (built without validation)."""
        return parse_url(self.url)

    @property
    def host(self) -> str:
        """The URL's host as the probe connects to it (IDNA, lower case); '' if unreadable."""
        try:
            return self.fetch_url.raw_host or ""
        except InvalidURL:
            return ""


def _first_unsafe(text: str, *, tab: bool = False) -> str:
    """Where the first refused character is, spelled so that it can be read: 'U+0000 at 3'."""
    for position, char in enumerate(text):
        if (tab and char == "\t") or NAME_TEXT.match(char):
            continue
        return f"U+{ord(char):04X} at {position}"
    return "none"


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
    if not ok and counts_as_run and attempt <= task.spec.retries:
        return CheckOutcome(task, retry_after=task.spec.retry_interval, changed=False)
    update: dict[str, Any] = {
        "health": Health.UP if ok else Health.DOWN,
        "failures_in_a_row": 0 if ok else task.failures_in_a_row + 1,
        "last_run_at": now,
    }
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
