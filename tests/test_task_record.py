"""The task record: what every reader of the task topic makes of a record, the same everywhere."""

from __future__ import annotations

import json
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest
from pydantic import ValidationError

from checker_common import task_record
from checker_common.task_record import (
    InvalidTask,
    TaskChange,
    TaskRecord,
    TaskRemoved,
    UnusableRecord,
    decode,
    encode,
)
from checker_common.task_spec import TaskSpec, TaskStatus

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = ROOT / "schema" / "task-record.schema.json"
TASK = uuid.UUID("3f1c8a52-6a8e-4c39-9a44-5d2b1f0e7c11")
KEY = str(TASK).encode()
SPEC = {"name": "shop", "url": "https://shop.example.net/health", "interval": 30, "timeout": 5}


def record(**changes: Any) -> TaskRecord:
    fields: dict[str, Any] = {
        "id": TASK,
        "spec": TaskSpec.model_validate(SPEC),
        "status": TaskStatus.PAUSED,
        "created_at": datetime(2026, 12, 1, tzinfo=UTC),
        "updated_at": datetime(2026, 12, 2, tzinfo=UTC),
        "origin": "node-a",
    }
    return TaskRecord(**{**fields, **changes})


def value(**fields: Any) -> bytes:
    return orjson.dumps({"schema_version": 1, "id": str(TASK), "spec": SPEC, **fields})


def test_a_record_comes_back_as_it_was_sent() -> None:
    sent = record(status_reason=None)
    key, body = encode(sent)
    assert key == KEY
    assert decode(key, body) == TaskChange(TASK, sent)


def test_a_null_value_removes_the_task() -> None:
    assert decode(KEY, None) == TaskRemoved(TASK)


def test_a_producer_may_leave_the_id_out_of_the_value() -> None:
    decoded = decode(KEY, orjson.dumps({"spec": SPEC}))
    assert isinstance(decoded, TaskChange)
    assert decoded.record.id == TASK
    assert decoded.record.status is TaskStatus.ACTIVE  # the default
    assert decoded.record.origin is None


def test_an_id_in_the_value_is_the_key_however_the_uuid_is_spelled() -> None:
    decoded = decode(KEY, value(id=str(TASK).upper()))
    assert isinstance(decoded, TaskChange)
    assert decoded.task_id == decoded.record.id == TASK


@pytest.mark.parametrize("key", [None, b"", b"shop", b"\xff\xfe", b"3f1c8a52"])
def test_a_record_without_a_task_id_is_no_task(key: bytes | None) -> None:
    decoded = decode(key, value())
    assert isinstance(decoded, UnusableRecord)
    assert "task id" in decoded.reason


# What no API request could be either: each becomes a task in error, named by what is wrong.
INVALID = {
    "not JSON": (b"{shop", "not JSON"),
    "a list": (b"[1, 2]", "not a JSON object"),
    "another id": (value(id=str(uuid.uuid4())), "is not the key"),
    "no spec": (orjson.dumps({"id": str(TASK)}), "spec: Field required"),
    "ftp URL": (value(spec={**SPEC, "url": "ftp://example.net/"}), "spec.url"),
    "interval as text": (value(spec={**SPEC, "interval": "30"}), "spec.interval"),
    "timeout past interval": (value(spec={**SPEC, "timeout": 30}), "spec.timeout"),
    "unknown spec field": (value(spec={**SPEC, "colour": "red"}), "spec.colour"),
    "unknown field": (value(colour="red"), "colour"),
    "unknown status": (value(status="sleeping"), "status"),
    "schema version 2": (value(schema_version=2), "schema_version"),
    "control character in name": (value(spec={**SPEC, "name": "shop\x1b[31m"}), "spec.name"),
    "too large": (b" " * (task_record.MAX_RECORD_BYTES + 1), "larger than"),
    "time before year 1 in UTC": (value(updated_at="0001-01-01T00:00:00+05:00"), "updated_at"),
    "control character in reason": (value(status="error", status_reason="bad\x00"), "reason"),
}


@pytest.mark.parametrize(("body", "words"), INVALID.values(), ids=INVALID.keys())
def test_a_record_that_does_not_validate_is_a_task_in_error(body: bytes, words: str) -> None:
    decoded = decode(KEY, body)
    assert isinstance(decoded, InvalidTask), decoded
    assert decoded.task_id == TASK
    assert words in decoded.reason
    assert decoded.reason.startswith("invalid task record: ")
    assert decoded.reason.isprintable()


def test_a_task_in_error_keeps_what_could_be_read_of_it_fit_for_a_log_line() -> None:
    bad = decode(KEY, value(spec={**SPEC, "name": "sh\x00op", "url": "ftp://x/"}, origin="n"))
    assert isinstance(bad, InvalidTask)
    assert (bad.name, bad.url, bad.interval, bad.origin) == ("sh\ufffdop", "ftp://x/", 30.0, "n")
    unreadable = decode(KEY, b"[]")
    assert isinstance(unreadable, InvalidTask)
    assert (unreadable.name, unreadable.url) == (f"invalid record {TASK}", "")


def test_records_are_validated_exactly_as_the_api_validates_a_task() -> None:
    # The same model, strict the same way: whatever TaskSpec refuses, a record refuses.
    for spec in ({**SPEC, "verify_tls": "yes"}, {**SPEC, "retries": -1}, {**SPEC, "url": ""}):
        with pytest.raises(ValidationError):
            TaskSpec.model_validate_json(orjson.dumps(spec))
        assert isinstance(decode(KEY, value(spec=spec)), InvalidTask)


def test_committed_json_schema_is_current() -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    from gen_schema import render

    assert SCHEMA.read_text() == render(task_record.json_schema), (
        "run: python scripts/gen_schema.py"
    )


def test_encoded_records_are_valid_against_the_committed_schema() -> None:
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(orjson.loads(encode(record())[1]), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"id": str(TASK), "spec": SPEC, "colour": "red"}, schema)
