"""A task: what to check, how often, and what counts as success.

`TaskSpec` is the definition a user gives (validated here, once: the API, the store and the
probe all use it); `Task` adds identity and the state the checker keeps (status, health, runs).
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from functools import cached_property
from typing import Any, Literal
from urllib.parse import urlsplit

import re2
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from checker_common.contract import Health

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

    name: str = Field(min_length=1, max_length=200)
    url: str = Field(min_length=1, max_length=8192, description="http:// or https:// URL")
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
