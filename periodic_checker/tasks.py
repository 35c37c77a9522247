"""A task: what to check, how often, and what counts as success.

`TaskSpec` is the definition a user gives (validated here, once: the API, the store and the
probe all use it); `Task` adds identity and the state the checker keeps (status, health, runs).

Secrets in a definition - the password in the URL's user info (or a lone user name, often a
token) and the values of the credential headers (`CREDENTIAL_HEADERS`) and of the headers
named in `secret_headers` - are stored as given, because the probe sends them, and leave the
checker only masked (`redacted`). A masked value sent back (`***`) means "keep the stored one"
(`kept_secrets`), so a client can read a task and write it back unchanged.
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
from urllib.parse import unquote, urlsplit

import re2
import yarl
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from checker_common.contract import MAX_NAME, MAX_URL, NOT_JUDGED, ErrorKind, Health
from checker_common.redact import MASK, redact_headers, redact_url
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
# Headers whose values are always secret (masked when shown, dropped when a redirect leaves
# the origin), whether or not the task names them in `secret_headers`.
CREDENTIAL_HEADERS = frozenset({"authorization", "cookie", "proxy-authorization"})


# How large a compiled pattern may be, in RE2 instructions (`programsize`). RE2 is linear in
# the body, but where its DFA gives up (it does on hostile patterns) each body byte costs up to
# about 7 ns per instruction (measured; docs/api.md). Everyday patterns compile to 6-100
# instructions (a ten-word case-insensitive alternation: 99); 1,000 leaves ten times that.
MAX_PATTERN_PROGRAM = 1000
# Instructions x max_body_bytes: the most work one search may take, about 30 s of one core at
# 7 ns. It bounds what a search the check gave up on still costs, as its thread cannot be
# stopped. Up to a 4 MiB cap any allowed pattern fits; a 64 MiB cap allows 64 instructions.
MAX_SEARCH_WORK = 2**32


def compile_pattern(pattern: str) -> Any:
    """Compile with RE2 (linear time: no catastrophic backtracking); ValueError if invalid or
    larger than MAX_PATTERN_PROGRAM instructions."""
    options = re2.Options()
    options.log_errors = False
    try:
        compiled = re2.compile(pattern, options)
    except re2.error as exc:
        reason = exc.args[0] if exc.args else exc
        if isinstance(reason, bytes):
            reason = reason.decode(errors="replace")
        raise ValueError(f"not a valid RE2 regular expression: {reason}") from None
    size = compiled.programsize
    if size > MAX_PATTERN_PROGRAM:
        raise ValueError(
            f"compiles to {size} RE2 instructions; at most {MAX_PATTERN_PROGRAM} are allowed"
            " (a search costs up to the body size times the instructions)"
        )
    return compiled


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
    secret_headers: list[str] = Field(
        default_factory=list,
        max_length=50,
        description="names of headers (in `headers`) whose values are secret: never shown,"
        " dropped when a redirect leaves the origin",
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
        None,
        min_length=1,
        max_length=4096,
        description="RE2 regular expression that compiles to at most 1000 RE2 instructions;"
        " instructions x max_body_bytes at most 2^32",
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
    max_body_bytes: int = Field(
        DEFAULT_MAX_BODY,
        ge=0,
        le=64 * 1_048_576,
        description="the most body bytes read and searched; a longer body is cut there",
    )
    fail_if_body_larger: bool = Field(
        False,
        description="fail with body_too_large when the body is longer than max_body_bytes",
    )
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

    @field_validator("secret_headers")
    @classmethod
    def _secret_headers(cls, value: list[str], info: ValidationInfo) -> list[str]:
        headers = info.data.get("headers")
        names = {name.lower() for name in headers} if headers is not None else None
        for name in value:
            if not HEADER_NAME.match(name):
                raise ValueError(f"header name {name[:40]!r} is not a valid token")
            # A misspelt name would leave the real header unprotected: refuse it.
            if names is not None and name.lower() not in names:
                raise ValueError(f"{name!r} is not one of the task's headers")
        return value

    @field_validator("pattern")
    @classmethod
    def _pattern_compiles(cls, value: str | None) -> str | None:
        if value is not None:
            compile_pattern(value)
        return value

    @field_validator("max_body_bytes")
    @classmethod
    def _search_work(cls, value: int, info: ValidationInfo) -> int:
        pattern = info.data.get("pattern")
        # Below this cap every pattern compile_pattern allows fits: no need to compile again.
        if pattern is None or value <= MAX_SEARCH_WORK // MAX_PATTERN_PROGRAM:
            return value
        size = compile_pattern(pattern).programsize
        if size * value > MAX_SEARCH_WORK:
            raise ValueError(
                f"at most {MAX_SEARCH_WORK // size} bytes with this pattern ({size} RE2"
                f" instructions): instructions x max_body_bytes may be at most {MAX_SEARCH_WORK}"
            )
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

    @cached_property
    def secret_header_names(self) -> frozenset[str]:
        """Lower-case names of the headers whose values are secret."""
        return CREDENTIAL_HEADERS | {name.lower() for name in self.secret_headers}

    @cached_property
    def secret_values(self) -> tuple[str, ...]:
        """Every secret this definition holds, to mask wherever one might appear in text."""
        found = [v for k, v in self.headers.items() if k.lower() in self.secret_header_names]
        userinfo = _userinfo(self.url)
        if userinfo:
            user, colon, password = userinfo.partition(":")
            found += [password, unquote(password)] if colon else [user, unquote(user)]
        return tuple(sorted({v for v in found if v and v != MASK}, key=len, reverse=True))


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
    # A URL with user info that masking leaves unchanged carries the mask itself.
    if _userinfo(spec.url) is not None and redact_url(spec.url) == spec.url:
        if stored is None or _authority(redact_url(stored.url)) != _authority(spec.url):
            raise _refused(
                "url",
                f"{MASK} stands for the stored password, which is kept only with the same"
                " scheme, user, host and port; give the password",
            )
        update["url"] = _authority(stored.url) + spec.url[len(_authority(spec.url)) :]
    was_secret = stored.secret_header_names if stored is not None else frozenset()
    masked = [
        name
        for name, value in spec.headers.items()
        if value == MASK
        and (name.lower() in spec.secret_header_names or name.lower() in was_secret)
    ]
    if masked:
        old = {k.lower(): v for k, v in stored.headers.items()} if stored is not None else {}
        same_origin = stored is not None and _origin(stored.url) == _origin(spec.url)
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


def _userinfo(url: str) -> str | None:
    netloc = urlsplit(url).netloc
    return netloc.rpartition("@")[0] if "@" in netloc else None


def _authority(url: str) -> str:
    """`scheme://userinfo@host:port`, scheme in lower case, as the URL spells the rest."""
    parts = urlsplit(url)
    return f"{parts.scheme.lower()}://{parts.netloc}"


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or (443 if scheme == "https" else 80)


def _refused(field: str, message: str) -> ValidationError:
    """A validation error naming `field`, as the API reports any invalid definition."""
    loc = tuple(field.split(".", 1))
    error = InitErrorDetails(type=PydanticCustomError("secret_mask", message), loc=loc, input=MASK)
    return ValidationError.from_exception_data("TaskSpec", [error])


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
