"""Settings of the checker daemon."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Self

from pydantic import Field, SecretStr, field_validator, model_validator

from checker_common.settings import CommonSettings

TOPIC_NAME = re.compile(r"^[A-Za-z0-9._-]{1,249}$")


def parse_networks(value: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    networks = []
    for part in value.split(","):
        part = part.strip()
        if part:
            networks.append(ipaddress.ip_network(part, strict=False))
    return networks


class CheckerSettings(CommonSettings):
    """Everything `periodic-checker run` reads at start."""

    task_storage: Path = Field(Path("tasks.sqlite3"), description="SQLite file holding the tasks")
    kafka_topic: str = Field("checker-results", description="topic the checker writes results to")
    api_host: str = Field("127.0.0.1", min_length=1, description="address the HTTP API listens on")
    api_port: int = Field(8080, ge=1, le=65535, description="port of the HTTP API and /metrics")
    api_token: SecretStr | None = Field(
        None, description="bearer token for changes over the API; required off loopback"
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

    @field_validator("kafka_topic")
    @classmethod
    def _topic_name(cls, value: str) -> str:
        if not TOPIC_NAME.match(value) or value in {".", ".."}:
            raise ValueError("not a valid Kafka topic name (letters, digits, '.', '_', '-')")
        return value

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

    @field_validator("api_token")
    @classmethod
    def _token_strength(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and 0 < len(value.get_secret_value()) < 16:
            raise ValueError("must be at least 16 characters")
        if value is not None and not value.get_secret_value():
            return None
        return value

    @model_validator(mode="after")
    def _token_off_loopback(self) -> Self:
        if self.api_token is None and not is_loopback(self.api_host):
            raise ValueError(
                f"API_TOKEN is required when API_HOST ({self.api_host}) is not a loopback address"
            )
        return self

    def secrets(self) -> list[str]:
        found = super().secrets()
        if self.api_token is not None:
            found.append(self.api_token.get_secret_value())
        return found


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
