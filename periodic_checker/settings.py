"""Settings of the checker: where its HTTP API is (all that `periodic-checker tasks` reads), and
what the daemon adds to it."""

from __future__ import annotations

import ipaddress
import re
import socket
from enum import StrEnum
from pathlib import Path
from typing import Self

from pydantic import Field, SecretStr, field_validator, model_validator

from checker_common.contract import NODE_PATTERN
from checker_common.settings import CommonSettings, KafkaSettings, LoggingSettings, topic_name

DEFAULT_ALLOWED_HOSTS = "localhost,127.0.0.1,[::1]"
WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::", "[::]"})  # noqa: S104 - names, not a bind
_HOST_NAME = re.compile(r"^[a-z0-9_-]+(\.[a-z0-9_-]+)*\.?$")


def parse_networks(value: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    networks = []
    for part in value.split(","):
        part = part.strip()
        if part:
            networks.append(ipaddress.ip_network(part, strict=False))
    return networks


class ApiSettings(CommonSettings):
    """The HTTP API: where the daemon serves it, and where `periodic-checker tasks` finds it."""

    api_host: str = Field("127.0.0.1", min_length=1, description="address the HTTP API listens on")
    api_port: int = Field(8080, ge=1, le=65535, description="port of the HTTP API and /metrics")
    api_token: SecretStr | None = Field(
        None, description="bearer token for changes over the API; required off loopback"
    )

    @field_validator("api_token")
    @classmethod
    def _token_strength(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and 0 < len(value.get_secret_value()) < 16:
            raise ValueError("must be at least 16 characters")
        if value is not None and not value.get_secret_value():
            return None
        return value

    def secrets(self) -> list[str]:
        found = super().secrets()
        if self.api_token is not None:
            found.append(self.api_token.get_secret_value())
        return found


class CheckerMode(StrEnum):
    """Where the list of tasks lives (docs/tasks-topic.md)."""

    SINGLE = "single"  # the SQLite store; the task topic is a copy of it
    CLUSTER = "cluster"  # the task topic; every node's SQLite store is a view of it


# A node id goes into every record the node writes (`origin`); printable, no spaces.
NODE_ID = re.compile(NODE_PATTERN)


def default_node_id() -> str:
    return socket.gethostname() or "checker"


class CheckerSettings(ApiSettings, KafkaSettings, LoggingSettings):
    """Everything `periodic-checker run` reads at start."""

    task_storage: Path = Field(Path("tasks.sqlite3"), description="SQLite file holding the tasks")
    kafka_topic: str = Field("checker-results", description="topic the checker writes results to")
    checker_mode: CheckerMode = Field(
        CheckerMode.SINGLE,
        description="single: the SQLite store holds the tasks and the task topic is a copy;"
        " cluster: the task topic holds them and every node keeps a view",
    )
    checker_node_id: str = Field(
        "",
        description="this checker's name in the task records it writes and in every result;"
        " empty: the host name",
    )
    kafka_task_names_topic: str = Field(
        "checker-task-names",
        description="topic of the name claims that keep names unique (cluster mode)",
    )
    kafka_task_state_topic: str = Field(
        "checker-task-state",
        description="topic of the tasks' run state handed from node to node (cluster mode)",
    )
    checker_group_id: str = Field(
        "periodic-checker",
        min_length=1,
        max_length=249,
        description="consumer group of the cluster's nodes: its partitions of the task topic"
        " say which node runs which tasks (cluster mode)",
    )
    kafka_session_timeout_ms: int = Field(
        6_000,
        ge=1_000,
        le=300_000,
        description="consumer group session time-out: how long a dead node's tasks wait"
        " before another node takes them (cluster mode)",
    )
    checker_state_snapshot_interval: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="seconds between snapshots of the run state of the tasks a node runs, for"
        " the node that takes them should it die (cluster mode)",
    )
    checker_handover_catch_up: float = Field(
        60.0,
        ge=0,
        le=3600,
        description="seconds back a node that takes a task after a clean handover runs the"
        " slots that passed meanwhile, late, each once; older ones are skipped and counted"
        " (cluster mode)",
    )
    api_allowed_hosts: str = Field(
        DEFAULT_ALLOWED_HOSTS,
        description=(
            "host names the API answers to in the Host header (any port), comma separated;"
            " API_HOST is added unless it is a wildcard; * answers any"
        ),
    )
    max_tasks: int = Field(100_000, ge=1, description="most tasks the store accepts")
    max_in_flight: int = Field(500, ge=1, le=100_000, description="checks running at once")
    per_host_in_flight: int = Field(
        10, ge=1, le=10_000, description="checks running at once against one host"
    )
    max_start_lag: float = Field(
        5.0,
        gt=0,
        le=3600,
        description="seconds a scheduled check may start late (at most half its interval);"
        " a slot that cannot start in time is skipped and counted",
    )
    kafka_message_timeout_ms: int = Field(
        300_000, ge=1_000, description="how long the producer retries before the outbox keeps it"
    )
    shutdown_timeout: float = Field(
        20.0, gt=0, le=600, description="seconds SIGTERM waits for running checks and the flush"
    )
    target_deny_networks: str = Field(
        "169.254.0.0/16,fe80::/10",
        description="networks checks may not reach, comma separated (cloud metadata by default)",
    )
    target_allow_networks: str = Field(
        "", description="networks allowed even inside a denied one, comma separated"
    )

    @field_validator("kafka_topic", "kafka_task_names_topic", "kafka_task_state_topic")
    @classmethod
    def _topic_name(cls, value: str) -> str:
        return topic_name(value)

    @field_validator("checker_node_id")
    @classmethod
    def _node_id(cls, value: str) -> str:
        value = value.strip() or default_node_id()
        if not NODE_ID.match(value):
            raise ValueError("must be 1-255 printable ASCII characters without spaces")
        return value

    @model_validator(mode="after")
    def _distinct_topics(self) -> Self:
        topics = [
            self.kafka_topic,
            self.kafka_tasks_topic,
            self.kafka_task_names_topic,
            self.kafka_task_state_topic,
        ]
        if len(set(topics)) < len(topics):
            raise ValueError(
                "KAFKA_TOPIC, KAFKA_TASKS_TOPIC, KAFKA_TASK_NAMES_TOPIC and KAFKA_TASK_STATE_TOPIC"
                " must be four topics"
            )
        return self

    @field_validator("task_storage")
    @classmethod
    def _storage_dir_exists(cls, value: Path) -> Path:
        path = value.expanduser()
        if path.exists() and not path.is_file():
            raise ValueError(f"not a file: {path}")
        if not path.parent.resolve().is_dir():
            raise ValueError(f"directory does not exist: {path.parent}")
        return path

    @field_validator("target_deny_networks", "target_allow_networks")
    @classmethod
    def _networks(cls, value: str) -> str:
        try:
            parse_networks(value)
        except ValueError as exc:
            raise ValueError(f"not a list of networks: {exc}") from None
        return value

    @field_validator("api_allowed_hosts")
    @classmethod
    def _allowed_hosts(cls, value: str) -> str:
        entries = [part.strip() for part in value.split(",") if part.strip()]
        if not entries:
            raise ValueError("must name at least one host (or * for any)")
        for entry in entries:
            if entry != "*" and normal_host(entry) is None:
                raise ValueError(
                    f"not a host name or address: {entry[:60]!r} (no port, IPv6 in brackets)"
                )
        return value

    def allowed_hosts(self) -> frozenset[str] | None:
        """The Host header values (port removed, lower case) the API answers; None: any."""
        entries = [part.strip() for part in self.api_allowed_hosts.split(",") if part.strip()]
        if "*" in entries:
            return None
        found = {host for host in map(normal_host, entries) if host is not None}
        own = self.api_host.strip()
        if own not in WILDCARD_HOSTS:
            spelled = f"[{own}]" if ":" in own and not own.startswith("[") else own
            host = normal_host(spelled)
            if host is not None:
                found.add(host)
        return frozenset(found)

    @model_validator(mode="after")
    def _token_off_loopback(self) -> Self:
        if self.api_token is None and not is_loopback(self.api_host):
            raise ValueError(
                f"API_TOKEN is required when API_HOST ({self.api_host}) is not a loopback address"
            )
        return self


def normal_host(text: str) -> str | None:
    """A host as the Host header's host part compares: lower case, no trailing dot, IPv6 in
    brackets and compressed; None when `text` is not a host name or an IP address."""
    host = text.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        try:
            return f"[{ipaddress.IPv6Address(host[1:-1])}]"
        except ValueError:
            return None
    if not _HOST_NAME.match(host):
        return None
    return host.removesuffix(".") or None


def host_header_host(value: str) -> str | None:
    """The host of a Host header value (`name:port`, `[v6]:port`), normalised like
    `normal_host()`; None when it is not one."""
    text = value.strip()
    if text.startswith("["):
        end = text.find("]")
        rest = text[end + 1 :]
        if end < 0 or (rest and not (rest[0] == ":" and _is_port(rest[1:]))):
            return None
        return normal_host(text[: end + 1])
    name, colon, port = text.rpartition(":")
    if colon and not _is_port(port):
        return None
    return normal_host(name if colon else text)


def _is_port(text: str) -> bool:
    return text.isascii() and text.isdigit() and 0 < int(text) <= 65535


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
