"""Logging set-up for both daemons: one line per event, text or JSON, secrets masked."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import orjson

from checker_common.redact import redact_text

# Attributes of a LogRecord that are not user-supplied `extra=` fields.
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}
IDS = ("task_id", "result_id", "topic", "partition", "offset")


class SecretFilter(logging.Filter):
    """Replaces every known secret in the formatted message with ***."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self.secrets = [s for s in secrets if s]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact_text(message, self.secrets)
        if record.exc_info and record.exc_info[1] is not None:
            # Exceptions are rendered as one line too: a check failure is not a stack trace.
            exc = record.exc_info[1]
            cleaned = f"{cleaned}: {type(exc).__name__}: {redact_text(str(exc), self.secrets)}"
            record.exc_info = None
            record.exc_text = None
        if cleaned != message or record.args:
            record.msg = cleaned
            record.args = None
        return True


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = [f"{key}={value}" for key, value in _extras(record).items()]
        if extras:
            line = f"{line} [{' '.join(extras)}]"
        return line.replace("\n", "\\n")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        document.update(_extras(record))
        return orjson.dumps(document, default=str).decode()


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    items = record.__dict__.items()
    return {k: v for k, v in items if k not in _STANDARD and not k.startswith("_")}


def setup(level: str, fmt: str, secrets: Iterable[str] = (), stream: Any = None) -> None:
    """Configure the root logger once at start."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(SecretFilter(secrets))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # librdkafka is chatty at debug.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
