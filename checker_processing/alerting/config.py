"""The alerting file (ALERTING_CONFIG, TOML): channels, rules and delivery, validated at load.

A problem is one line naming the file, the line when it can be found, and the field:
`alerting.toml: line 7: rules[0].after_seconds: Input should be greater than or equal to 0`.
Secrets (a webhook's signing secret, a Slack-compatible webhook URL, which is its own
credential) are `SecretStr`: never in a repr or a log line; `secrets()` lists them for the log
filter.
"""

from __future__ import annotations

import re
import ssl
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from checker_common.settings import readable_file
from checker_common.task_spec import TAG_PATTERN
from checker_common.urls import InvalidURL, parse_url

CHANNEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class AlertingConfigError(ValueError):
    """The file cannot be used; the message is one line (file, line, field, reason)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def _http_url(value: str) -> str:
    try:
        parse_url(value)
    except InvalidURL as exc:
        raise ValueError(str(exc)) from None
    return value


def _pem_ca_file(value: str) -> str:
    """`value` when it names a readable file of PEM CA certificates; ValueError otherwise.

    Read as the mail sender will read it, so a wrong file stops the daemon at start (and
    fails `check-config`) rather than every notification of the channel."""
    path = readable_file(Path(value))
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=str(path))
    except (ssl.SSLError, OSError):
        raise ValueError(f"not a PEM CA certificate: {path}") from None
    return value


class WebhookChannel(_Strict):
    """A JSON POST (schema/notification.schema.json), signed with HMAC-SHA256 when `secret`
    is set."""

    type: Literal["webhook"]
    url: str = Field(min_length=1, max_length=2048)
    secret: SecretStr | None = Field(None, description="shared secret of the signature header")
    timeout_seconds: float = Field(10.0, gt=0, le=60)
    max_per_minute: int = Field(
        20, ge=1, le=10000, description="individual notifications a minute; the rest: a summary"
    )

    @model_validator(mode="after")
    def _url(self) -> WebhookChannel:
        try:
            _http_url(self.url)
        except ValueError as exc:
            raise ValueError(f"url: {exc}") from None
        return self


class SlackChannel(_Strict):
    """A Slack-compatible incoming webhook (Slack, Mattermost): the URL is the credential."""

    type: Literal["slack"]
    url: SecretStr
    timeout_seconds: float = Field(10.0, gt=0, le=60)
    max_per_minute: int = Field(
        20, ge=1, le=10000, description="individual notifications a minute; the rest: a summary"
    )

    @model_validator(mode="after")
    def _url(self) -> SlackChannel:
        try:
            _http_url(self.url.get_secret_value())
        except ValueError as exc:
            raise ValueError(f"url: {exc}") from None
        return self


class EmailChannel(_Strict):
    """E-mail over SMTP: STARTTLS (port 587), implicit TLS (465) or none (a relay on the same
    host), with a login when `username` is set; a plain-text and an HTML part."""

    type: Literal["email"]
    host: str = Field(min_length=1, max_length=253)
    port: int | None = Field(None, ge=1, le=65535, description="default 587, 465 for tls, 25")
    security: Literal["starttls", "tls", "none"] = "starttls"
    username: str | None = Field(None, min_length=1, max_length=256)
    password: SecretStr | None = None
    ca_file: str | None = Field(None, description="PEM CA file (default: the system's CAs)")
    from_address: str = Field(min_length=3, max_length=320, pattern=r"^[^@\s]+@[^@\s]+$")
    to: list[Annotated[str, Field(max_length=320, pattern=r"^[^@\s]+@[^@\s]+$")]] = Field(
        min_length=1, max_length=100
    )
    timeout_seconds: float = Field(30.0, gt=0, le=120)
    max_per_minute: int = Field(
        20, ge=1, le=10000, description="individual notifications a minute; the rest: a summary"
    )

    @field_validator("ca_file")
    @classmethod
    def _ca_file(cls, value: str | None) -> str | None:
        return None if value is None else _pem_ca_file(value)

    @model_validator(mode="after")
    def _login(self) -> EmailChannel:
        if (self.username is None) != (self.password is None):
            raise ValueError("password: username and password go together")
        if self.password is not None and self.security == "none":
            raise ValueError("security: a login needs starttls or tls (the password is sent)")
        return self

    @property
    def smtp_port(self) -> int:
        return self.port or {"starttls": 587, "tls": 465, "none": 25}[self.security]


class AlertmanagerChannel(_Strict):
    """Prometheus Alertmanager's v2 API: an incident is an alert (labels alertname, task, name,
    url, tags) firing from its start, resolved through `endsAt` when it closes.

    No `max_per_minute`: Alertmanager is built to take bursts, and groups, throttles and
    repeats by itself (group_by, group_interval); folding alerts into a summary would keep
    them from firing under their own labels, and so from being routed, silenced and resolved."""

    type: Literal["alertmanager"]
    url: str = Field(min_length=1, max_length=2048, description="base URL, e.g. http://am:9093")
    alert_name: str = Field("PeriodicCheckDown", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    # Alertmanager resolves an alert by itself at its endsAt: a firing alert says when that is.
    firing_seconds: float = Field(7 * 86400.0, ge=300, le=365 * 86400)
    timeout_seconds: float = Field(10.0, gt=0, le=60)

    @model_validator(mode="after")
    def _url(self) -> AlertmanagerChannel:
        try:
            _http_url(self.url)
        except ValueError as exc:
            raise ValueError(f"url: {exc}") from None
        return self


Channel = Annotated[
    WebhookChannel | SlackChannel | EmailChannel | AlertmanagerChannel,
    Field(discriminator="type"),
]


class Rule(_Strict):
    """Which tasks (any of `tags`, any of `tasks` by name, or `all`), to which channels, after
    how long down, whether to repeat while down, whether to send the recovery."""

    name: str = Field(min_length=1, max_length=64, pattern=CHANNEL_NAME_PATTERN)
    channels: list[str] = Field(min_length=1, max_length=20)
    tags: list[Annotated[str, Field(pattern=TAG_PATTERN)]] = Field(default_factory=list)
    tasks: list[Annotated[str, Field(min_length=1, max_length=255)]] = Field(default_factory=list)
    all: bool = False
    after_seconds: float = Field(0.0, ge=0, le=7 * 86400)
    repeat_seconds: float | None = Field(None, ge=60, le=30 * 86400)
    recovery: bool = True

    @model_validator(mode="after")
    def _selects_something(self) -> Rule:
        if not (self.all or self.tags or self.tasks):
            raise ValueError("selects no task: give tags, tasks or all = true")
        if self.all and (self.tags or self.tasks):
            raise ValueError("all = true selects every task: leave out tags and tasks")
        return self

    def matches(self, name: str | None, tags: list[str] | None) -> bool:
        """Whether this rule selects a task with this name and these tags (pure)."""
        return selects(self.all, self.tasks, self.tags, name, tags)


class Delivery(_Strict):
    """How the sender retries: exponential backoff with jitter from `retry_initial_seconds` up
    to `retry_max_seconds` (a receiver's Retry-After wins, up to that maximum), and gives up
    `give_up_after_seconds` after a notification was due, marking it failed."""

    retry_initial_seconds: float = Field(2.0, gt=0, le=3600)
    retry_max_seconds: float = Field(300.0, gt=0, le=86400)
    give_up_after_seconds: float = Field(86400.0, gt=0, le=30 * 86400)
    poll_seconds: float = Field(1.0, gt=0, le=60)
    batch_size: int = Field(50, ge=1, le=1000)


class Flapping(_Strict):
    """A task whose incidents open `changes` times within `window_seconds` is flapping: it is
    reported once as flapping (kind `flapping`), and its further incidents in the window are
    not reported (nor their recoveries)."""

    changes: int = Field(3, ge=2, le=100)
    window_seconds: float = Field(900.0, ge=60, le=86400)


WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]


class Maintenance(_Strict):
    """A window that holds notifications back for the tasks it selects (like a rule: `tags`,
    `tasks` or `all`): one-off (`start`, `end`) or weekly (`weekly` days, `at` HH:MM UTC,
    `duration_minutes`). A notification due inside it waits for its end; an incident that
    closes inside it is told to nobody."""

    name: str = Field(min_length=1, max_length=64, pattern=CHANNEL_NAME_PATTERN)
    tags: list[Annotated[str, Field(pattern=TAG_PATTERN)]] = Field(default_factory=list)
    tasks: list[Annotated[str, Field(min_length=1, max_length=255)]] = Field(default_factory=list)
    all: bool = False
    start: datetime | None = None
    end: datetime | None = None
    weekly: list[Weekday] = Field(default_factory=list, max_length=7)
    at: str | None = Field(None, pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]$", description="UTC")
    duration_minutes: int | None = Field(None, ge=1, le=7 * 24 * 60)

    @model_validator(mode="after")
    def _one_kind(self) -> Maintenance:
        if not (self.all or self.tags or self.tasks):
            raise ValueError("selects no task: give tags, tasks or all = true")
        one_off = self.start is not None or self.end is not None
        weekly = bool(self.weekly) or self.at is not None or self.duration_minutes is not None
        if one_off == weekly:
            raise ValueError(
                "give either start and end (one-off) or weekly, at and duration_minutes"
            )
        if one_off:
            if self.start is None or self.end is None:
                raise ValueError("end: a one-off window needs start and end")
            if _utc(self.end) <= _utc(self.start):
                raise ValueError("end: must be after start")
        elif not (self.weekly and self.at and self.duration_minutes):
            raise ValueError("weekly: a weekly window needs weekly, at and duration_minutes")
        return self

    def matches(self, name: str | None, tags: list[str] | None) -> bool:
        return selects(self.all, self.tasks, self.tags, name, tags)

    def active_until(self, now: datetime) -> datetime | None:
        """The end of this window if it is open at `now` (pure)."""
        if self.start is not None and self.end is not None:
            start, end = _utc(self.start), _utc(self.end)
            return end if start <= now < end else None
        assert self.at is not None
        assert self.duration_minutes is not None
        hour, minute = map(int, self.at.split(":"))
        length = timedelta(minutes=self.duration_minutes)
        # A window that opened on one of the last seven days may still be open (up to 7 days).
        for back in range(8):
            day = (now - timedelta(days=back)).date()
            if WEEKDAYS[day.weekday()] not in self.weekly:
                continue
            start = datetime(day.year, day.month, day.day, hour, minute, tzinfo=UTC)
            if start <= now < start + length:
                return start + length
        return None


def selects(
    every: bool, names: list[str], labels: list[str], name: str | None, tags: list[str] | None
) -> bool:
    """Whether a selection (a rule's or a maintenance window's: all, task names, tags) takes a
    task with this name and these tags (pure)."""
    if every:
        return True
    if name is not None and name in names:
        return True
    return bool(tags) and not set(labels).isdisjoint(tags or ())


def _utc(when: datetime) -> datetime:
    """A time without a zone is UTC."""
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


class AlertingConfig(_Strict):
    delivery: Delivery = Field(default_factory=Delivery)
    channels: dict[Annotated[str, Field(pattern=CHANNEL_NAME_PATTERN)], Channel] = Field(
        min_length=1
    )
    rules: list[Rule] = Field(default_factory=list)
    maintenance: list[Maintenance] = Field(default_factory=list)
    flapping: Flapping | None = None

    @model_validator(mode="after")
    def _references(self) -> AlertingConfig:
        names: set[str] = set()
        for index, rule in enumerate(self.rules):
            if rule.name in names:
                raise ValueError(f"rules[{index}].name: {rule.name!r} is used by another rule")
            names.add(rule.name)
            for channel in rule.channels:
                if channel not in self.channels:
                    raise ValueError(
                        f"rules[{index}].channels: {channel!r} is not a channel of [channels]"
                    )
        return self

    def held_until(
        self, name: str | None, tags: list[str] | None, now: datetime
    ) -> datetime | None:
        """The end of the latest maintenance window open at `now` for this task (pure)."""
        ends = [
            end
            for window in self.maintenance
            if window.matches(name, tags) and (end := window.active_until(now)) is not None
        ]
        return max(ends, default=None)

    def max_per_minute(self, channel: str) -> int | None:
        """The channel's rate limit; None for Alertmanager, which groups and throttles by
        itself and whose alerts must each fire (and resolve) under their own labels."""
        target = self.channels.get(channel)
        if target is None or isinstance(target, AlertmanagerChannel):
            return None
        return target.max_per_minute

    def rule(self, name: str) -> Rule | None:
        return next((rule for rule in self.rules if rule.name == name), None)

    def routes(self, name: str | None, tags: list[str] | None) -> list[tuple[str, Rule]]:
        """(channel, rule) for each channel that hears about this task: the first rule that
        selects it for a channel decides (pure)."""
        chosen: dict[str, Rule] = {}
        for rule in self.rules:
            if rule.matches(name, tags):
                for channel in rule.channels:
                    chosen.setdefault(channel, rule)
        return list(chosen.items())

    def secrets(self) -> list[str]:
        found = []
        for channel in self.channels.values():
            if isinstance(channel, WebhookChannel) and channel.secret is not None:
                found.append(channel.secret.get_secret_value())
            if isinstance(channel, SlackChannel):
                found.append(channel.url.get_secret_value())
            if isinstance(channel, EmailChannel) and channel.password is not None:
                found.append(channel.password.get_secret_value())
        return [s for s in found if s]


def load(path: Path) -> AlertingConfig:
    """Read and validate the file; AlertingConfigError with one line otherwise."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise AlertingConfigError(f"{path}: cannot be read: {exc}") from None
    return parse(text, str(path))


def parse(text: str, where: str = "alerting file") -> AlertingConfig:
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # "Expected '=' after a key in a key/value pair (at line 3, column 5)"
        message = str(exc)
        found = re.search(r"\(at line (\d+), column \d+\)", message)
        reason = re.sub(r" \(at line \d+, column \d+\)", "", message)
        line = f"line {found[1]}: " if found else ""
        raise AlertingConfigError(f"{where}: {line}not valid TOML: {reason}") from None
    try:
        return AlertingConfig.model_validate(document)
    except ValidationError as exc:
        raise AlertingConfigError(_describe(exc, text, where)) from None


def _describe(exc: ValidationError, text: str, where: str) -> str:
    first = exc.errors(include_url=False, include_input=False)[0]
    channel_types = ("webhook", "slack", "email", "alertmanager")
    loc = [part for part in first.get("loc", ()) if part not in channel_types]
    message = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    if first.get("type") == "missing":
        message = "is required"
    field = ""
    for part in loc:
        field += f"[{part}]" if isinstance(part, int) else (f".{part}" if field else str(part))
    # A validator that names a field itself ("rules[1].channels: ...") is precise already.
    inner = re.match(r"^([A-Za-z_]+(?:\[\d+\])?(?:\.[A-Za-z_]+)*): (.*)$", message)
    if inner and not field:
        field, message = inner[1], inner[2]
    elif inner:
        field, message = f"{field}.{inner[1]}", inner[2]
    # A missing field is written nowhere: no line to name.
    line = (
        None
        if first.get("type") == "missing"
        else _line_of(text, loc + _path(inner[1] if inner else ""))
    )
    at = f"line {line}: " if line else ""
    return f"{where}: {at}{field or 'file'}: {message}".replace("\n", " ")


def _path(field: str) -> list[str | int]:
    parts: list[str | int] = []
    for name, index in re.findall(r"([A-Za-z_]+)(?:\[(\d+)\])?", field):
        parts.append(name)
        if index:
            parts.append(int(index))
    return parts


def _line_of(text: str, loc: list[Any]) -> int | None:
    """The line where the field at `loc` is written, found by reading the text for its table
    headers and keys in order; None when it cannot be told (best effort, pure)."""
    lines = text.splitlines()
    position = 0
    found: int | None = None
    previous = ""
    for part in loc:
        if isinstance(part, int):
            hits = [i for i, line in enumerate(lines) if _header(line) == ["[", previous]]
            if part >= len(hits):
                break
            position = found = hits[part]
        else:
            hit = next((i for i in range(position, len(lines)) if _names(lines[i], part)), None)
            if hit is None:
                break
            position = found = hit
            previous = part
    return None if found is None else found + 1


def _header(line: str) -> list[str] | None:
    """`[[rules]]` -> ['[', 'rules']; `[channels.ops]` -> ['channels', 'ops']; else None."""
    stripped = line.strip()
    if stripped.startswith("[["):
        inner = stripped[2:].split("]]")[0]
        return ["[", *(p.strip().strip("\"'") for p in inner.split("."))]
    if stripped.startswith("["):
        inner = stripped[1:].split("]")[0]
        return [p.strip().strip("\"'") for p in inner.split(".")]
    return None


def _names(line: str, key: str) -> bool:
    """Whether the line is a table header with `key` in it, or sets `key`."""
    header = _header(line)
    if header is not None:
        return key in header
    name = line.split("=", 1)[0].strip().strip("\"'") if "=" in line else None
    return name == key
