"""The result message: one contract, its JSON Schema, the first version's shape."""

from __future__ import annotations

import json
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path

import jsonschema
import orjson
import pytest

from checker_common.contract import (
    CheckError,
    CheckResult,
    ContractError,
    ErrorKind,
    Health,
    PatternResult,
    Timings,
    decode,
    encode,
    legacy_result_id,
)

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = ROOT / "schema" / "result-message.schema.json"


def a_result(**changes: object) -> CheckResult:
    values: dict[str, object] = {
        "result_id": uuid.uuid4(),
        "name": "example",
        "url": "https://example.test/",
        "timestamp": datetime(2026, 11, 27, 12, 0, 0, 250000, tzinfo=UTC),
        "status": 200,
        "load_time": 0.59,
        "pattern_search": PatternResult.MATCH,
        "ok": True,
        "health": Health.UP,
        "timings": Timings(dns=0.001, connect=0.002, tls=0.01, ttfb=0.3, transfer=0.2),
        "bytes": 1024,
        "final_url": "https://example.test/",
    }
    values.update(changes)
    return CheckResult.model_validate(values)


def test_message_is_keyed_by_task_id_with_task_id_on_top() -> None:
    task_id = uuid.uuid4()
    key, value = encode(task_id, a_result())
    assert key == str(task_id).encode()
    document = orjson.loads(value)
    assert list(document) == [str(task_id)]
    body = document[str(task_id)]
    assert body["status"] == 200
    assert body["load_time"] == 0.59
    assert body["pattern_search"] == "match"
    assert body["timestamp"] == "2026-11-27T12:00:00.250000Z"
    assert body["schema_version"] == 1


def test_round_trip_keeps_every_field() -> None:
    task_id = uuid.uuid4()
    original = a_result(
        ok=False,
        status=None,
        error=CheckError(kind=ErrorKind.TIMEOUT, message="no answer within 5 s"),
        pattern_search=None,
        cert_expires_at=datetime(2027, 1, 1, tzinfo=UTC),
        attempt=2,
        redirects=3,
    )
    decoded = decode(encode(task_id, original)[1])
    assert decoded.task_id == task_id
    assert decoded.result == original
    assert not decoded.legacy


def test_committed_json_schema_is_current() -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    from gen_schema import render

    assert SCHEMA.read_text() == render(), "run: python scripts/gen_schema.py"


def test_encoded_messages_are_valid_against_the_committed_schema() -> None:
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    _, value = encode(uuid.uuid4(), a_result(error=CheckError(kind="dns", message="x")))
    jsonschema.validate(orjson.loads(value), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"a": 1, "b": 2}, schema)


def test_first_version_shape_is_accepted_with_a_derived_id() -> None:
    task_id = str(uuid.uuid4())
    raw = orjson.dumps(
        {
            task_id: {
                "name": "old",
                "timestamp": "02/15/21 - 16:43:17",
                "status": 200,
                "load_time": "0.59",
                "pattern_search": "match",
            }
        }
    )
    first = decode(raw, topic="checks", partition=2, offset=41)
    again = decode(raw, topic="checks", partition=2, offset=41)
    assert first.legacy
    assert first.result.result_id == again.result.result_id == legacy_result_id("checks", 2, 41)
    assert first.result.timestamp == datetime(2021, 2, 15, 16, 43, 17, tzinfo=UTC)
    assert first.result.load_time == 0.59
    assert first.result.ok is True


BAD_MESSAGES = [
    (None, "empty"),
    (b"\xff\xfe not json", "not valid JSON"),
    (b'{"a": 1', "not valid JSON"),
    (b"[]", "exactly one key"),
    (b'{"x": {}, "y": {}}', "exactly one key"),
    (b'{"not-a-uuid": {"status": 200}}', "not a UUID"),
    (orjson.dumps({str(uuid.uuid4()): "text"}), "must be an object"),
    (orjson.dumps({str(uuid.uuid4()): {"schema_version": 9, "result_id": "x"}}), "schema_version"),
    (
        orjson.dumps(
            {str(uuid.uuid4()): {**a_result().model_dump(mode="json"), "status": "two hundred"}}
        ),
        "status",
    ),
    (orjson.dumps({str(uuid.uuid4()): {"timestamp": "x", "load_time": "fast"}}), "load_time"),
]


@pytest.mark.parametrize(("value", "reason"), BAD_MESSAGES)
def test_messages_that_break_the_contract_say_why(value: bytes | None, reason: str) -> None:
    with pytest.raises(ContractError, match=reason):
        decode(value)


def test_too_large_message_is_refused_before_parsing() -> None:
    with pytest.raises(ContractError, match="too large"):
        decode(b"{" + b" " * 2000 + b"}", max_bytes=1024)
