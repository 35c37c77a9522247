"""Settings shared by both daemons, and the one way to load them.

Settings are read once at start from the environment and a dotenv file (the environment wins)
and passed down; nothing reads the environment at import. Every problem becomes a
`SettingsError` whose message is one line naming the variable.

Each group of variables is defined once, in one class (`LoggingSettings`, `KafkaSettings`
here; the database, the API and the daemons' own in their packages), and a command loads the
class made of the groups it uses: `checker-processing report` reads only the database, so a
machine without the Kafka files can run it.
"""

from __future__ import annotations

import os
import re
import ssl
from enum import StrEnum
from pathlib import Path
from typing import Self, TypeVar

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_ENV_FILE = ".env.prod"
TOPIC_NAME = re.compile(r"^[A-Za-z0-9._-]{1,249}$")


class SettingsError(Exception):
    """A setting is missing or wrong; the message is one line that names the variable."""


class LogLevel(StrEnum):
    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"


class LogFormat(StrEnum):
    TEXT = "text"
    JSON = "json"


class CommonSettings(BaseSettings):
    """What every settings class shares: where values come from and how secrets are named."""

    model_config = SettingsConfigDict(
        env_file=None,
        env_file_encoding="utf-8",
        case_sensitive=False,
        extra="ignore",
        validate_default=True,
    )

    def secrets(self) -> list[str]:
        """Secret values that must never appear in output (used by the log filter).

        Each group adds its own to `super().secrets()`, so a class made of several groups
        names all of them."""
        return []


class LoggingSettings(CommonSettings):
    """How a daemon logs."""

    log_level: LogLevel = Field(LogLevel.INFO, description="DEBUG, INFO, WARNING or ERROR")
    log_format: LogFormat = Field(
        LogFormat.TEXT, description="text for people, json for log shippers"
    )


class KafkaSettings(CommonSettings):
    """The Kafka connection over mutual TLS."""

    kafka_connection: str = Field(
        description="Kafka bootstrap servers, host:port[,host:port...]",
    )
    kafka_ca_path: Path = Field(description="CA certificate (PEM) that signed the broker's cert")
    kafka_cert_path: Path = Field(description="client certificate (PEM) for mutual TLS")
    kafka_key_file: Path = Field(description="client private key (PEM), may be encrypted")
    kafka_cert_pass: SecretStr | None = Field(
        None, description="passphrase of an encrypted client key (optional)"
    )
    kafka_security_protocol: str = Field(
        "SSL", description="SSL (mutual TLS); only SSL is supported"
    )
    # Both daemons follow the task topic: one definition, so they cannot disagree on its name.
    kafka_tasks_topic: str = Field(
        "checker-tasks",
        description="compacted topic of the task records (key = task id, null = removed);"
        " the checker writes it, both daemons follow it",
    )

    @field_validator("kafka_connection")
    @classmethod
    def _bootstrap_servers(cls, value: str) -> str:
        servers = [part.strip() for part in value.split(",") if part.strip()]
        if not servers:
            raise ValueError("must name at least one host:port")
        for server in servers:
            host, sep, port = server.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"'{server}' is not host:port")
        return ",".join(servers)

    @field_validator("kafka_tasks_topic")
    @classmethod
    def _tasks_topic(cls, value: str) -> str:
        return topic_name(value)

    @field_validator("kafka_security_protocol")
    @classmethod
    def _only_ssl(cls, value: str) -> str:
        if value.upper() != "SSL":
            raise ValueError("only SSL (mutual TLS) is supported")
        return "SSL"

    @field_validator("kafka_ca_path", "kafka_cert_path", "kafka_key_file")
    @classmethod
    def _readable_file(cls, value: Path) -> Path:
        return readable_file(value)

    @model_validator(mode="after")
    def _tls_material_loads(self) -> Self:
        check_tls_material(self)
        return self

    def secrets(self) -> list[str]:
        found = super().secrets()
        if self.kafka_cert_pass and self.kafka_cert_pass.get_secret_value():
            found.append(self.kafka_cert_pass.get_secret_value())
        return found


def topic_name(value: str) -> str:
    """`value` when it is a valid Kafka topic name; ValueError otherwise."""
    if not TOPIC_NAME.match(value) or value in {".", ".."}:
        raise ValueError("not a valid Kafka topic name (letters, digits, '.', '_', '-')")
    return value


def readable_file(value: Path) -> Path:
    path = value.expanduser()
    if not path.exists():
        raise ValueError(f"file not found: {path}")
    if not path.is_file():
        raise ValueError(f"not a file: {path}")
    if not os.access(path, os.R_OK):
        raise ValueError(f"file not readable: {path}")
    return path


class FieldError(ValueError):
    """A problem that belongs to a named setting (raised by a validator of several fields)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def check_tls_material(settings: KafkaSettings) -> None:
    """Load CA, certificate and key the way the TLS client will, so mistakes show at start."""
    # Without the system's CA bundle, which `ssl.create_default_context` loads (20 ms of each
    # start, for nothing: only these files are checked).
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cafile=str(settings.kafka_ca_path))
    except (ssl.SSLError, OSError) as exc:
        raise FieldError("kafka_ca_path", f"not a PEM CA certificate ({_reason(exc)})") from None
    only_ca = _only_ca_certificates(settings.kafka_cert_path)
    password = settings.kafka_cert_pass.get_secret_value() if settings.kafka_cert_pass else None
    try:
        # An empty passphrase callback result makes OpenSSL fail fast instead of prompting.
        context.load_cert_chain(
            str(settings.kafka_cert_path), str(settings.kafka_key_file), password=password or ""
        )
    except ssl.SSLError as exc:
        raise _key_problem(settings, _reason(exc), password, only_ca=only_ca) from None


def _only_ca_certificates(cert_path: Path) -> bool:
    """Whether every certificate in `cert_path` is a CA's; FieldError when it holds none.

    OpenSSL loads the certificate before the key and says only "PEM lib" for either, so the
    certificate is read on its own first: a wrong file is not blamed on the key."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cafile=str(cert_path))
    except (ssl.SSLError, OSError) as exc:
        reason = _reason(exc)
        if "NO_CERTIFICATE" in reason:
            reason = "no certificate in the file"
        raise FieldError("kafka_cert_path", f"not a PEM certificate ({reason})") from None
    stats = context.cert_store_stats()
    if not stats["x509"]:  # a file of CRLs only
        raise FieldError("kafka_cert_path", "not a PEM certificate (no certificate in the file)")
    return stats["x509_ca"] == stats["x509"]


def _key_problem(
    settings: KafkaSettings, reason: str, password: str | None, *, only_ca: bool
) -> FieldError:
    """What is wrong when a readable certificate and its key do not load together."""
    if "KEY_VALUES_MISMATCH" in reason.upper() or "key values mismatch" in reason:
        if only_ca:
            return FieldError(
                "kafka_cert_path",
                "a CA certificate, not the client's: it does not match the key in KAFKA_KEY_FILE",
            )
        return FieldError("kafka_key_file", "key does not match the certificate in KAFKA_CERT_PATH")
    if _looks_like_passphrase_problem(settings.kafka_key_file, reason):
        if password:
            return FieldError("kafka_cert_pass", "wrong passphrase for the key in KAFKA_KEY_FILE")
        return FieldError("kafka_cert_pass", "KAFKA_KEY_FILE is encrypted; set its passphrase")
    # OpenSSL says only "PEM lib" when the file holds no key it can read.
    return FieldError("kafka_key_file", "not a PEM private key")


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
    return str(reason).replace("\n", " ")


def _looks_like_passphrase_problem(key_file: Path, reason: str) -> bool:
    try:
        head = key_file.read_text(errors="replace")[:4096]
    except OSError:
        return False
    encrypted = "ENCRYPTED" in head
    return encrypted or "bad decrypt" in reason.lower()


S = TypeVar("S", bound=CommonSettings)


def load_settings(cls: type[S], env_file: str | os.PathLike[str] | None = None) -> S:
    """Build settings from the environment and a dotenv file; the environment wins.

    With no `env_file`, `.env.prod` in the working directory is read when it exists. A file
    named explicitly must exist. Any problem raises `SettingsError` with one line.
    """
    if env_file is None:
        chosen: Path | None = Path(DEFAULT_ENV_FILE) if Path(DEFAULT_ENV_FILE).is_file() else None
    else:
        chosen = Path(env_file)
        if not chosen.is_file():
            raise SettingsError(f"--env-file: file not found: {chosen}")
    try:
        return cls(_env_file=chosen)
    except ValidationError as exc:
        raise SettingsError(describe_validation_error(exc)) from None
    except FieldError as exc:
        raise SettingsError(f"{exc.field.upper()}: {exc}") from None


def describe_validation_error(exc: ValidationError) -> str:
    """The first problem as one line: the variable's name, then what is wrong."""
    first = exc.errors(include_url=False, include_input=False)[0]
    loc = first.get("loc") or ()
    ctx = first.get("ctx") or {}
    inner = ctx.get("error")
    if isinstance(inner, FieldError):
        return f"{inner.field.upper()}: {inner}"
    name = str(loc[0]).upper() if loc else "settings"
    message = str(first.get("msg", "invalid"))
    if first.get("type") == "missing":
        message = "is required but not set"
    message = message.removeprefix("Value error, ")
    return f"{name}: {message}".replace("\n", " ")


def field_env_names(cls: type[BaseSettings]) -> list[str]:
    """The environment variable names a settings class reads, in declaration order."""
    return [name.upper() for name in cls.model_fields]
