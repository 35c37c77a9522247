"""Settings of the processor: the results database (all that `migrate` and `report` read), and
what the daemon adds to it."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, PrivateAttr, ValidationInfo, field_validator, model_validator

from checker_common.redact import dsn_password
from checker_common.settings import (
    CommonSettings,
    FieldError,
    KafkaSettings,
    LoggingSettings,
    readable_file,
)
from checker_processing.alerting.config import AlertingConfig, AlertingConfigError, load


class DatabaseSettings(CommonSettings):
    """The results database: all that `migrate` and `report` need."""

    postgresql_connection: str = Field(
        description="libpq URL or key=value DSN of the results database",
    )

    @field_validator("postgresql_connection")
    @classmethod
    def _dsn(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("is empty")
        if "://" in value and not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("URL must start with postgresql://")
        if "://" not in value and "=" not in value:
            raise ValueError("not a libpq URL or key=value DSN")
        return value

    def secrets(self) -> list[str]:
        found = super().secrets()
        password = dsn_password(self.postgresql_connection)
        if password:
            found.append(password)
        return found


class AlertingSettings(CommonSettings):
    """The alerting file: all that `alerts test` needs."""

    alerting_config: Path | None = Field(
        None,
        description="TOML file of alerting channels and rules (README, Alerting); unset: no"
        " notifications are sent",
    )
    _alerting: AlertingConfig | None = PrivateAttr(None)

    @field_validator("alerting_config", mode="before")
    @classmethod
    def _alerting_path(cls, value: object) -> object:
        # An empty line in the env file means "not set".
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("alerting_config")
    @classmethod
    def _alerting_file(cls, value: Path | None) -> Path | None:
        return None if value is None else readable_file(value)

    @model_validator(mode="after")
    def _load_alerting(self) -> AlertingSettings:
        if self.alerting_config is not None:
            try:
                self._alerting = load(self.alerting_config)
            except AlertingConfigError as exc:
                raise FieldError("alerting_config", str(exc)) from None
        return self

    @property
    def alerting(self) -> AlertingConfig | None:
        """The alerting file, read and validated at start; None when ALERTING_CONFIG is unset."""
        return self._alerting

    def secrets(self) -> list[str]:
        found = super().secrets()
        if self._alerting is not None:
            found.extend(self._alerting.secrets())
        return found


class ProcessorSettings(DatabaseSettings, KafkaSettings, LoggingSettings, AlertingSettings):
    """Everything `checker-processing run` reads at start."""

    kafka_consumer_group: str = Field(
        "checker-processing", min_length=1, description="consumer group id"
    )
    kafka_consumer_topics: str = Field(
        "checker-results", description="topics to consume, comma separated"
    )
    kafka_session_timeout_ms: int = Field(
        6_000, ge=1_000, le=300_000, description="consumer group session time-out"
    )
    kafka_group_instance_id: str | None = Field(
        None,
        max_length=249,
        description="static group membership id, unique per processor (optional)",
    )
    metrics_host: str = Field(
        "127.0.0.1", min_length=1, description="address of the /metrics endpoint"
    )
    metrics_port: int = Field(9108, ge=0, le=65535, description="port of /metrics (0: off)")
    results_retention_days: int = Field(
        90, ge=1, le=36_500, description="days of results kept; older daily partitions dropped"
    )
    batch_max_messages: int = Field(
        10_000, ge=1, le=1_000_000, description="most messages written in one transaction"
    )
    batch_max_ms: int = Field(
        500, ge=1, le=60_000, description="longest wait to fill a batch, milliseconds"
    )
    max_message_bytes: int = Field(
        1_048_576, ge=1_024, description="larger messages go to rejected_messages"
    )
    max_clock_skew_seconds: int = Field(
        300,
        ge=0,
        le=86_400,
        description="results dated further ahead of this clock go to rejected_messages",
    )

    @field_validator("kafka_group_instance_id")
    @classmethod
    def _instance_id(cls, value: str | None) -> str | None:
        # An empty line in the env file means "not set": dynamic membership.
        value = (value or "").strip()
        return value or None

    @field_validator("kafka_consumer_topics")
    @classmethod
    def _topics(cls, value: str, info: ValidationInfo) -> str:
        topics = [t.strip() for t in value.split(",") if t.strip()]
        if not topics:
            raise ValueError("must name at least one topic")
        # KAFKA_TASKS_TOPIC (KafkaSettings) is validated before: its records are not results.
        tasks_topic = info.data.get("kafka_tasks_topic")
        if tasks_topic in topics:
            raise ValueError(
                f"names {tasks_topic}, the task topic (KAFKA_TASKS_TOPIC): results and task"
                " records need topics of their own"
            )
        return ",".join(topics)

    @property
    def topics(self) -> list[str]:
        """The results topics."""
        return self.kafka_consumer_topics.split(",")

    @property
    def subscribed_topics(self) -> list[str]:
        """What the processor consumes: the results topics and the task topic."""
        return [*self.topics, self.kafka_tasks_topic]
