"""A task's definition: what to check, how often, and what counts as success.

`TaskSpec` is the definition a user gives, validated here once for every reader: the checker's
API, its store and its probe, a task record on the task topic (`task_record.py`), and the
processor that follows that topic. Both daemons import it; nothing else spells its fields.

Secrets in a definition - the password in the URL's user info (or a lone user name, often a
token) and the values of the credential headers (`CREDENTIAL_HEADERS`) and of the headers
named in `secret_headers` - are stored as given, because the probe sends them, and leave the
checker only masked (see `periodic_checker.tasks.redacted`).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import re
import sys
from datetime import UTC, datetime
from enum import StrEnum
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, TypeVar

import orjson
import re2
import yarl
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from checker_common.contract import MAX_NAME, MAX_URL, SAFE_TEXT_PATTERN, UNSAFE_TEXT
from checker_common.redact import MASK
from checker_common.urls import URL_DESCRIPTION, URL_PATTERN, InvalidURL, parse_url, url_host

# Each rule below is one regular expression, used by the validator and shown as the field's
# `pattern` in the OpenAPI document; the syntax is the subset Python, ECMAScript and the
# fuzzer read alike (no `\s`, `\d` or `\p`).
#
# Text that goes into results and logs: none of the contract's UNSAFE_TEXT.
NAME_PATTERN = SAFE_TEXT_PATTERN
# A header value may also hold a horizontal tab (RFC 9110 field-value).
HEADER_VALUE_PATTERN = rf"^[^\x00-\x08\x0a-\x1f{UNSAFE_TEXT}]*$"
HEADER_NAME_PATTERN = r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,256}$"
_CODE = "[1-5][0-9][0-9]"
_RANGE = f"{_CODE}(?: *- *{_CODE})?"
STATUS_RANGES_PATTERN = rf"^ *{_RANGE}(?: *, *{_RANGE})* *$"
MAX_HEADER_VALUE = 8192
# A tag: a label that alerting rules (and people) select tasks by, e.g. `prod`, `team:web`.
TAG_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:/=-]{0,63}$"
MAX_TAGS = 20
# The integer fields of TaskSpec (a test keeps this in step with the model).
INTEGER_FIELDS = ("max_redirects", "max_body_bytes", "retries", "end_after_runs")

NAME_TEXT = re.compile(NAME_PATTERN)
HEADER_NAME = re.compile(HEADER_NAME_PATTERN)
HEADER_VALUE = re.compile(HEADER_VALUE_PATTERN)
STATUS_RANGES = re.compile(STATUS_RANGES_PATTERN)
TAG = re.compile(TAG_PATTERN)
MAX_INTERVAL = 7 * 24 * 3600.0
MIN_INTERVAL = 1.0
MAX_TIMEOUT = 300.0
DEFAULT_MAX_BODY = 1_048_576
# Headers that frame the request's body: the checker writes them from `body` (a task's own
# would contradict it: a Content-Length on a request without a body makes a server wait for
# bytes that never come, and both of them together is how requests are smuggled).
FRAMING_HEADERS = frozenset({"content-length", "transfer-encoding"})
# Headers whose values are always secret (masked when shown, dropped when a redirect leaves
# the origin), whether or not the task names them in `secret_headers`.
CREDENTIAL_HEADERS = frozenset({"authorization", "cookie", "proxy-authorization"})


# How large a compiled pattern may be, in RE2 instructions (`programsize`). RE2 is linear in
# the body, but where its DFA gives up (it does on hostile patterns) each body byte costs about
# 4-6 ns per instruction (`bench/micro.py re2-worst`; docs/api.md). Everyday patterns compile
# to 6-100 instructions (a ten-word case-insensitive alternation: 91, `bench/micro.py
# re2-sizes`); 1,000 leaves ten times that.
MAX_PATTERN_PROGRAM = 1000
# Instructions x max_body_bytes: the most work one search may take, about 20 s of one core at
# 4-5 ns. It bounds what a search the check gave up on still costs, as its thread cannot be
# stopped. Up to a 4 MiB cap any allowed pattern fits; a 64 MiB cap allows 64 instructions.
MAX_SEARCH_WORK = 2**32


@functools.lru_cache(maxsize=4096)
def compile_pattern(pattern: str) -> Any:
    """Compile with RE2 (linear time: no catastrophic backtracking); ValueError if invalid or
    larger than MAX_PATTERN_PROGRAM instructions.

    Tasks that look for the same pattern share one compiled pattern (RE2's are safe to use
    from several threads): each task holding its own is memory, and compiling was about a
    tenth of validating a definition (py-spy, BENCHMARKS.md "Start-up at 100,000 tasks")."""
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


@functools.lru_cache(maxsize=1024)
def parse_status_ranges(text: str) -> tuple[tuple[int, int], ...]:
    """'200-399,418' -> ((200, 399), (418, 418)); raises ValueError when malformed.

    Codes are 100-599; a range may be written either way round ('399-200' is '200-399'), so
    the pattern alone is the whole rule. Cached: most tasks share a few texts, and a node
    validating 100,000 task records at start parsed the same '200-399' 100,000 times."""
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
        # Only the keys: a definition's texts are as a rule its own (its name, its URL), and
        # the few it shares with others are held once anyway (`_share_texts`). Looking each
        # value up in pydantic's cache of texts was about a tenth of validating a definition
        # (10.8-11.0 against 11.7-12.0 us, `bench/micro.py record-decode`).
        cache_strings="keys",
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
        description="request headers: token names, values without control characters; each"
        " name once, whatever its case; no Content-Length or Transfer-Encoding (the checker"
        " writes them from `body`)",
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
        " instructions x max_body_bytes at most 2^32; not with method HEAD (no body to search)",
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
    tags: list[str] = Field(
        default_factory=list,
        max_length=MAX_TAGS,
        description=f"labels that alerting rules select tasks by: at most {MAX_TAGS}, each 1-64"
        " letters, digits and _ . : / = - (starting with a letter or digit), no repeats",
        json_schema_extra={
            "items": {"type": "string", "pattern": TAG_PATTERN},
            "uniqueItems": True,
        },
    )

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
            url_host(value)  # a URL the probe can fetch (its host read from a plain spelling)
        except InvalidURL as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        if not value:
            return value  # most definitions (a node validates 100,000 of them at start)
        seen: set[str] = set()
        for name, header in value.items():
            if not HEADER_NAME.match(name):
                raise ValueError(f"header name {name[:40]!r} is not a valid token")
            lower = name.lower()
            if lower in FRAMING_HEADERS:
                raise ValueError(f"header {name!r} is written by the checker from `body`")
            # Names are case-insensitive: one of two spellings would be sent, the other dropped.
            if lower in seen:
                raise ValueError(f"header {name!r} is given twice (names ignore case)")
            seen.add(lower)
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
        if not value:
            return value  # `info.data` is a new dict at each reading: not for nothing
        headers = info.data.get("headers")
        names = {name.lower() for name in headers} if headers is not None else None
        for name in value:
            if not HEADER_NAME.match(name):
                raise ValueError(f"header name {name[:40]!r} is not a valid token")
            # A misspelt name would leave the real header unprotected: refuse it.
            if names is not None and name.lower() not in names:
                raise ValueError(f"{name!r} is not one of the task's headers")
        return value

    @field_validator("tags")
    @classmethod
    def _tags(cls, value: list[str]) -> list[str]:
        seen = set()
        for tag in value:
            if not TAG.match(tag):
                raise ValueError(
                    f"tag {tag[:70]!r} must be 1-64 letters, digits and _ . : / = -,"
                    " starting with a letter or digit"
                )
            if tag in seen:
                raise ValueError(f"tag {tag!r} is given twice")
            seen.add(tag)
        return value

    @field_validator("pattern")
    @classmethod
    def _pattern_compiles(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None:
            # A HEAD response has no body: the pattern would never be searched, and the check
            # would pass as if it had been.
            if info.data.get("method") == "HEAD":
                raise ValueError("a HEAD request gets no body to search; use GET")
            compile_pattern(value)
        return value

    @field_validator("max_body_bytes")
    @classmethod
    def _search_work(cls, value: int, info: ValidationInfo) -> int:
        # Below this cap every pattern compile_pattern allows fits: no need to compile again.
        if value <= MAX_SEARCH_WORK // MAX_PATTERN_PROGRAM:
            return value
        pattern = info.data.get("pattern")
        if pattern is None:
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

    @property
    def fetch_url(self) -> yarl.URL:
        """The URL the probe fetches; InvalidURL for a stored definition that no longer
        validates (built without validation). Not kept here: `parse_url` keeps the URLs of the
        checks running now, and a URL kept by each definition was about 550 bytes a task, 55 MB
        at 100,000 tasks with their own URLs (`bench/scheduler_scale.py --urls own`)."""
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
        if not self.secret_headers:
            return CREDENTIAL_HEADERS  # shared: most tasks name none
        return CREDENTIAL_HEADERS | {name.lower() for name in self.secret_headers}

    @cached_property
    def secret_values(self) -> tuple[str, ...]:
        """Every secret this definition holds, to mask wherever one might appear in text."""
        found = [v for k, v in self.headers.items() if k.lower() in self.secret_header_names]
        try:
            url = self.fetch_url
        except InvalidURL:
            url = None
        # The password, else a lone user name (often a token): as the URL spells it and as sent.
        if url is not None and url.raw_password is not None:
            found += [url.raw_password, url.password or ""]
        elif url is not None and url.raw_user is not None:
            found += [url.raw_user, url.user or ""]
        return tuple(sorted({v for v in found if v and v != MASK}, key=len, reverse=True))


# -- definitions this validator already validated ---------------------------------------------

# Fields of a definition built from a stored one (all fields are stored): one set shared by
# every such definition (pydantic copies it before changing it, and a frozen model never does).
_ALL_FIELDS = set(TaskSpec.model_fields)
_NFIELDS = len(_ALL_FIELDS)
# Texts that many definitions share (a URL is as a rule a task's own).
_SHARED_TEXTS = ("method", "pattern", "pattern_fails_when", "accepted_statuses")
_Model = TypeVar("_Model", bound=BaseModel)
# What a definition's validation depends on besides this module: the URL rules and the limits
# of the contract, and the libraries that read them.
_VALIDATION_SOURCES = ("task_spec.py", "urls.py", "contract.py", "redact.py")
_VALIDATION_LIBRARIES = ("pydantic", "pydantic-core", "google-re2", "yarl", "idna")


@functools.cache
def validator_fingerprint() -> bytes:
    """A digest of everything that decides whether a definition validates: the source of the
    modules that hold the rules, the versions of the libraries they use, and Python's. Any
    change to them (an upgrade) gives another fingerprint, so a definition stored as validated
    under the old one is validated again."""
    digest = hashlib.blake2b(digest_size=16)
    here = Path(__file__).parent
    for name in _VALIDATION_SOURCES:
        digest.update(name.encode() + b"\0" + (here / name).read_bytes() + b"\0")
    for library in _VALIDATION_LIBRARIES:
        try:
            version = importlib.metadata.version(library)
        except importlib.metadata.PackageNotFoundError:
            version = "-"
        digest.update(f"{library}={version}\0".encode())
    digest.update(sys.version.encode())
    return digest.digest()


def checked_digest(spec_json: str) -> str:
    """What a store keeps beside a definition (as `TaskSpec.model_dump_json()` wrote it) that
    this validator accepted: the definition's text under `validator_fingerprint()`."""
    digest = hashlib.blake2b(spec_json.encode(), digest_size=16, key=validator_fingerprint())
    return digest.hexdigest()


def checked_spec(fields: dict[str, Any]) -> TaskSpec | None:
    """A stored definition whose `checked_digest` matches, built without validating it again
    (several times faster than validating): `fields` is its stored JSON, read. None when it
    does not hold exactly the fields of a definition (then validate it). Takes `fields` over:
    its values are changed in place."""
    if fields.keys() != _ALL_FIELDS:
        return None
    # The decoder's keys go nowhere: the instance's dictionary holds the model's own names.
    _share_texts(fields)
    end_at = fields["end_at"]
    if end_at is not None:
        fields["end_at"] = datetime.fromisoformat(end_at)
    return assembled(TaskSpec, fields, _ALL_FIELDS)


def compacted_spec(spec: TaskSpec) -> TaskSpec:
    """The same definition held as a stored one is (`checked_spec`): its values in a dictionary
    that shares its keys, one set of fields for all, the texts many definitions repeat once.
    For a definition that stays in memory as long as its task (a record a cluster node applies);
    it is a third of the size of the one validation made."""
    if spec.__pydantic_fields_set__ is _ALL_FIELDS:
        return spec  # held so already: made by `assembled` here (`checked_spec`, this function)
    compact = assembled(TaskSpec, spec.__dict__, _ALL_FIELDS)  # the values copied over
    _share_texts(compact.__dict__)  # values replaced in place: the keys stay shared
    return compact


def spec_json(spec: TaskSpec) -> str:
    """`spec.model_dump_json()`, the same text, in half the time (1.5-2.4 against 2.7-4.9 us,
    `bench/micro.py view-rows`) for a definition held as `compacted_spec` holds one, whose
    values orjson writes as they are (a cluster node writes 100,000 of them into its view at
    start). Every other definition, and one orjson would write otherwise (a time, an integer
    beyond 64 bits), goes through pydantic."""
    values = spec.__dict__
    # All fields validated, nothing cached beside them (the shared table keeps field order).
    if (
        spec.__pydantic_fields_set__ is _ALL_FIELDS
        and len(values) == _NFIELDS
        and values["end_at"] is None
    ):
        try:
            return orjson.dumps(values).decode()
        except orjson.JSONEncodeError:
            pass
    return spec.model_dump_json()


def _share_texts(fields: dict[str, Any]) -> None:
    """Texts many definitions repeat are held once (`sys.intern`: a string nothing else holds
    any more is dropped from its table); a decoder makes a new string for each one."""
    for name in _SHARED_TEXTS:
        value = fields[name]
        if value is not None:
            fields[name] = sys.intern(value)


def assembled(model: type[_Model], values: dict[str, Any], fields_set: set[str]) -> _Model:
    """An instance of `model` holding `values` (every field, already valid) as they are: what
    `model_construct` makes, without its loop in Python over the fields (the largest part of
    loading stored tasks once validation was skipped). `fields_set` may be shared by many
    instances: pydantic copies it before it changes it (`model_copy`), and a frozen model
    never changes it in place.

    The instance's `__dict__` shares its table of field names with every other instance
    assembled here (CPython's key-sharing dictionary, as an object's attributes get): it holds
    only the values, about a third of a dictionary of its own (280 bytes against 832 for a
    definition). `values` must name every field (and may hold values the model caches)."""
    instance = model.__new__(model)
    _set = object.__setattr__
    held = _shared_keys(model).copy()  # a copy of a key-sharing dictionary shares its keys
    held.update(values)  # existing keys only: the values are set in place, the keys stay shared
    _set(instance, "__dict__", held)
    _set(instance, "__pydantic_fields_set__", fields_set)
    _set(instance, "__pydantic_extra__", None)
    _set(instance, "__pydantic_private__", None)
    return instance


# CPython (3.11, as measured) gives a class's shared table room for 30 names, and each instance made
# takes one from the room left beyond the names it holds (`dk_usable`): every dictionary that
# shares the table holds a slot for each name and each one of that room.
_SHARED_KEYS_ROOM = 30


@functools.cache
def _shared_keys(model: type[BaseModel]) -> dict[str, Any]:
    """A dictionary of `model`'s fields (values None) whose keys are a shared table: made the
    way CPython makes an object's attributes, one at a time on an instance without a
    `__dict__`. The instance is of a class of its own, whose table nothing else touches (the
    model's own can be given up by CPython when one of its instances takes attributes another
    way, and a dictionary made then would hold its own keys). The table keeps room for the
    model's cached properties (a definition caches its parsed URL and the like at its first
    check), no more: a dictionary that outgrows it gets keys of its own, which is only larger."""
    holder_class = type(f"_{model.__name__}Fields", (), {})
    holder = holder_class()
    for name in model.model_fields:
        setattr(holder, name, None)
    cached = [name for name, value in vars(model).items() if isinstance(value, cached_property)]
    for _ in range(_SHARED_KEYS_ROOM - len(model.model_fields) - len(cached) - 1):
        holder_class()  # each one takes a slot of room from the table
    held: dict[str, Any] = holder.__dict__
    return held


def _first_unsafe(text: str, *, tab: bool = False) -> str:
    """Where the first refused character is, spelled so that it can be read: 'U+0000 at 3'."""
    for position, char in enumerate(text):
        if (tab and char == "\t") or NAME_TEXT.match(char):
            continue
        return f"U+{ord(char):04X} at {position}"
    return "none"
