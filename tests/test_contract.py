"""The result message: one contract, its JSON Schema, the first version's shape."""

from __future__ import annotations

import json
import re
import sys
import typing
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

import jsonschema
import msgspec
import orjson
import pytest

from checker_common import contract
from checker_common.contract import (
    CheckError,
    CheckResult,
    ContractError,
    ErrorKind,
    Health,
    PatternResult,
    Plain,
    Timings,
    decode,
    decode_plain,
    decode_plain_many,
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


def test_a_result_names_the_node_that_ran_it() -> None:
    task_id = uuid.uuid4()
    _, value = encode(task_id, a_result(node="checker-b"))
    assert orjson.loads(value)[str(task_id)]["node"] == "checker-b"
    assert decode(value).result.node == "checker-b"
    assert decode_plain(value).body.node == "checker-b"


def test_a_result_of_a_checker_before_the_node_field_is_accepted_without_one() -> None:
    body = a_result().model_dump(mode="json")
    del body["node"]
    value = orjson.dumps({str(uuid.uuid4()): body})
    assert decode(value).result.node is None
    assert decode_plain(value).body.node is None


@pytest.mark.parametrize("node", ["", "node a", "n" * 256, "nöde", "a\tb"])
def test_a_node_name_that_is_not_a_checker_node_id_is_refused(node: str) -> None:
    value = changed(MINIMAL, node=node)
    with pytest.raises(ContractError, match=r"^node: "):
        decode(value)
    with pytest.raises(ContractError, match=r"^node: "):
        decode_plain(value)


def test_the_schema_describes_the_node() -> None:
    node = json.loads(SCHEMA.read_text())["$defs"]["CheckResult"]["properties"]["node"]
    assert {"type": "string", "maxLength": 255, "pattern": contract.NODE_PATTERN} in node["anyOf"]
    assert "CHECKER_NODE_ID" in node["description"]


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


# -- decode_plain: the ingest path's decoder must agree with decode() on every message ------

TASK = "0b7e2a4c-5d6f-4a1b-9c8d-7e6f5a4b3c2d"
CANONICAL = a_result(
    ok=False,
    status=503,
    health=Health.DOWN,
    pattern_search=None,
    error=CheckError(kind=ErrorKind.STATUS, message="status 503 is not in 200-399"),
    scheduled_at=datetime(2026, 11, 27, 11, 59, 59, tzinfo=UTC),
    cert_expires_at=datetime(2027, 3, 1, tzinfo=UTC),
    node="checker-a.example:1",
).model_dump(mode="json")
MINIMAL = {
    "schema_version": 1,
    "result_id": "5f0c8a52-2b1e-4c4e-8f57-1c8f3b1d2a10",
    "name": "n",
    "url": "u",
    "timestamp": "2026-11-27T12:00:00Z",
    "load_time": 0.5,
    "ok": True,
}


def changed(base: dict[str, object], **changes: object) -> bytes:
    body = {**base, **changes}
    return orjson.dumps({TASK: {k: v for k, v in body.items() if v is not DROP}})


DROP = object()


def spliced(base: dict[str, object], raw: bytes) -> bytes:
    """The message of `base` with raw JSON members added at the end of its body (later
    members of the same name win in JSON readers that allow duplicates)."""
    return changed(base)[:-2] + b"," + raw + b"}}"


AGREEMENT = {
    # valid, in encode()'s shape
    "canonical": changed(CANONICAL),
    "minimal": changed(MINIMAL),
    "unknown top-level field ignored": changed(MINIMAL, future_field={"x": 1}),
    "+00:00 offset": changed(MINIMAL, timestamp="2026-11-27T12:00:00.5+00:00"),
    "integer seconds": changed(MINIMAL, load_time=1, timings={"dns": 0}),
    "some timings": changed(MINIMAL, timings={"dns": 0.1, "ttfb": None}),
    "name at its limit": changed(MINIMAL, name="n" * 200),
    "method at its limit": changed(MINIMAL, method="PROPFINDXX"),
    "message at its limit": changed(CANONICAL, error={"kind": "dns", "message": "m" * 2000}),
    "control characters in the message": changed(
        CANONICAL, error={"kind": "invalid_response", "message": "a\x00b\x1b[31m\u2028c\u202e"}
    ),
    "final_url at its limit": changed(MINIMAL, final_url="u" * 8192),
    "NUL in a name (the database refuses it, not the contract)": changed(MINIMAL, name="a\x00b"),
    "escapes in free text": changed(MINIMAL, name="a\tb\\c\nd\re"),
    # valid, but spelled as only the model accepts: decode() itself decides
    "+02:00 offset": changed(MINIMAL, timestamp="2026-11-27T14:00:00+02:00"),
    "naive timestamp": changed(MINIMAL, timestamp="2026-11-27T12:00:00"),
    "upper-case result id": changed(MINIMAL, result_id=MINIMAL["result_id"].upper()),  # type: ignore[attr-defined]
    "status as text": changed(MINIMAL, status="200"),
    "attempt as 2.0": changed(MINIMAL, attempt=2.0),
    "huge integer seconds": changed(MINIMAL, load_time=2**53 + 1),
    "bool as text": changed(MINIMAL, ok="true"),
    "schema_version true": changed(MINIMAL, schema_version=True),
    "legacy shape": orjson.dumps(
        {TASK: {"name": "old", "timestamp": "02/15/21 - 16:43:17", "load_time": "0.5"}}
    ),
    "upper-case task id": orjson.dumps({TASK.upper(): MINIMAL}),
    # invalid
    "no value": None,
    "not JSON": b"{",
    "two tasks": orjson.dumps({TASK: MINIMAL, str(uuid.uuid4()): MINIMAL}),
    "task id not a UUID": orjson.dumps({"task": MINIMAL}),
    "body not an object": orjson.dumps({TASK: [1]}),
    "schema_version 2": changed(MINIMAL, schema_version=2),
    "no schema_version": changed(MINIMAL, schema_version=DROP),
    "no result_id": changed(MINIMAL, result_id=DROP),
    "result_id not a UUID": changed(MINIMAL, result_id="r-1"),
    "no name": changed(MINIMAL, name=DROP),
    "name too long": changed(MINIMAL, name="n" * 201),
    "name a number": changed(MINIMAL, name=5),
    "method null": changed(MINIMAL, method=None),
    "method too long": changed(MINIMAL, method="M" * 11),
    "no timestamp": changed(MINIMAL, timestamp=DROP),
    "timestamp null": changed(MINIMAL, timestamp=None),
    "timestamp not a date": changed(MINIMAL, timestamp="2026-02-30T00:00:00Z"),
    "timestamp not a time": changed(MINIMAL, timestamp="yesterday"),
    "scheduled_at not a time": changed(MINIMAL, scheduled_at="soon"),
    "attempt 0": changed(MINIMAL, attempt=0),
    "status 99": changed(MINIMAL, status=99),
    "status 1000": changed(MINIMAL, status=1000),
    "no load_time": changed(MINIMAL, load_time=DROP),
    "negative load_time": changed(MINIMAL, load_time=-0.1),
    "pattern unknown": changed(MINIMAL, pattern_search="maybe"),
    "no ok": changed(MINIMAL, ok=DROP),
    "health unknown": changed(MINIMAL, health="sideways"),
    "error kind unknown": changed(MINIMAL, error={"kind": "gremlins", "message": "m"}),
    "error without message": changed(MINIMAL, error={"kind": "dns"}),
    "error with extra field": changed(MINIMAL, error={"kind": "dns", "message": "m", "x": 1}),
    "error message too long": changed(MINIMAL, error={"kind": "dns", "message": "m" * 2001}),
    "timings null": changed(MINIMAL, timings=None),
    "timings unknown phase": changed(MINIMAL, timings={"dns": 0.1, "render": 0.2}),
    "timings negative": changed(MINIMAL, timings={"tls": -1}),
    "bytes negative": changed(MINIMAL, bytes=-1),
    "redirects negative": changed(MINIMAL, redirects=-1),
    "final_url too long": changed(MINIMAL, final_url="u" * 8193),
    "node null": changed(MINIMAL, node=None),
    "node at its limit": changed(MINIMAL, node="n" * 255),
    "node with a backslash": changed(MINIMAL, node="dc\\node"),
    "node too long": changed(MINIMAL, node="n" * 256),
    "node empty": changed(MINIMAL, node=""),
    "node with a space": changed(MINIMAL, node="node a"),
    "node with a newline at its end": changed(MINIMAL, node="node-a\n"),
    "node not ASCII": changed(MINIMAL, node="nöde"),
    "node a number": changed(MINIMAL, node=1),
    # where JSON readers could differ: decode() reads with orjson, the fast path does not
    "huge integer count (a float to orjson)": spliced(MINIMAL, b'"bytes":18446744073709551617'),
    "huge integer seconds (a float to orjson)": spliced(
        MINIMAL, b'"load_time":18446744073709551617'
    ),
    "integer -0 seconds": spliced(MINIMAL, b'"load_time":-0'),
    "duplicate field, the last one valid": spliced(MINIMAL, b'"ok":"x","ok":false'),
    "duplicate field, the last one invalid": spliced(MINIMAL, b'"ok":false,"ok":"x"'),
    "duplicate task id": b"{" + orjson.dumps({TASK: {}})[1:-1] + b"," + changed(MINIMAL)[1:],
    "invalid UTF-8 in an unknown field": spliced(MINIMAL, b'"x":"\xff"'),
    "invalid UTF-8 in a name": spliced(MINIMAL, b'"name":"\xc0\xaf"'),
    "UTF-16 surrogate in an unknown field": spliced(MINIMAL, b'"x":"\\ud800"'),
    "UTF-16 surrogate in a name": spliced(MINIMAL, b'"name":"\\ud800x"'),
    "deeply nested unknown field": spliced(MINIMAL, b'"x":' + b"[" * 1100 + b"]" * 1100),
    "non-ASCII text": changed(MINIMAL, name="Ünïcödé ✓ 😀", url="https://exämple.test/ä"),
    "lower-case t in a timestamp": changed(MINIMAL, timestamp="2026-11-27t12:00:00Z"),
    "timestamp with 7 fraction digits": changed(MINIMAL, timestamp="2026-11-27T12:00:00.1234567Z"),
    "timestamp hour 24": changed(MINIMAL, timestamp="2026-11-27T24:00:00Z"),
    "cert_expires_at not a date": changed(MINIMAL, cert_expires_at="2027-02-29T00:00:00Z"),
    "schema_version 1.0": changed(MINIMAL, schema_version=1.0),
    "ok as 1": changed(MINIMAL, ok=1),
    "health upper case": changed(MINIMAL, health="UP"),
}


def reference(value: bytes | None) -> tuple[object, ...]:
    """What decode() makes of a message, in the terms decode_plain() gives it."""
    try:
        decoded = decode(value, topic="t", partition=1, offset=7, max_bytes=20_000)
    except ContractError as exc:
        return ("rejected", str(exc))
    result = decoded.result
    return ("accepted", str(decoded.task_id), result, result.timestamp, decoded.legacy)


def plain_view(value: bytes | None) -> tuple[object, ...]:
    try:
        plain = decode_plain(value, topic="t", partition=1, offset=7, max_bytes=20_000)
    except ContractError as exc:
        return ("rejected", str(exc))
    return view(plain)


def view(plain: Plain | ContractError) -> tuple[object, ...]:
    if isinstance(plain, ContractError):
        return ("rejected", str(plain))
    body = msgspec.to_builtins(plain.body)
    assert set(body) == set(CheckResult.model_fields)
    # The ISO strings go to PostgreSQL as they are: each must be the model's instant, in UTC.
    for field in ("timestamp", "scheduled_at", "cert_expires_at"):
        if body[field] is not None:
            assert body[field].endswith(("Z", "+00:00"))
    result = CheckResult.model_validate(body)
    assert datetime.fromisoformat(body["timestamp"]) == result.timestamp == plain.checked_at
    assert body["result_id"] == str(result.result_id)
    return ("accepted", plain.task_id, result, plain.checked_at, plain.legacy)


@pytest.mark.parametrize("value", AGREEMENT.values(), ids=AGREEMENT.keys())
def test_decode_plain_accepts_and_rejects_exactly_what_decode_does(value: bytes | None) -> None:
    assert plain_view(value) == reference(value)


class Where(NamedTuple):
    value: bytes | None
    topic: str = "t"
    partition: int = 1
    offset: int = 7


def test_a_batch_agrees_message_by_message() -> None:
    """Ids and timestamps are checked a column at a time: one bad message in a batch must
    not change what becomes of the others."""
    values = list(AGREEMENT.values())
    batch = decode_plain_many([Where(v) for v in values], max_bytes=20_000)
    assert [view(plain) for plain in batch] == [reference(v) for v in values]


def test_an_impossible_date_in_a_batch_in_the_usual_shape_rejects_only_its_own_message() -> None:
    """A batch whose every message looks canonical has its timestamps read a column at a
    time; a date that only looks right (30 February) sends just its own message to the model."""
    values = [
        changed(MINIMAL),
        changed(MINIMAL, timestamp="2026-02-30T00:00:00Z"),
        changed(MINIMAL),
        changed(MINIMAL, cert_expires_at="2026-02-30T00:00:00Z"),
        changed(MINIMAL, scheduled_at="2026-11-27T25:00:00Z"),
        changed(MINIMAL),
    ]
    batch = decode_plain_many([Where(v) for v in values], max_bytes=20_000)
    assert [view(plain) for plain in batch] == [reference(v) for v in values]
    assert [view(plain)[0] for plain in batch] == [
        "accepted",
        "rejected",
        "accepted",
        "rejected",
        "rejected",
        "accepted",
    ]


def test_a_value_with_a_newline_cannot_pass_for_two_lines_of_a_column() -> None:
    one, two = str(uuid.uuid4()), str(uuid.uuid4())
    values = [changed(MINIMAL, result_id=f"{one}\n{two}"), changed(MINIMAL)]
    batch = decode_plain_many([Where(v) for v in values], max_bytes=20_000)
    assert [view(plain) for plain in batch] == [reference(v) for v in values]
    assert [view(plain)[0] for plain in batch] == ["rejected", "accepted"]


@pytest.mark.parametrize(
    "odd",
    [
        {"result_id": "5F0C8A52-2B1E-4C4E-8F57-1C8F3B1D2A10"},
        {"result_id": "5f0c8a52-2b1e-4c4e-8f57-1c8f3b1d2a1g"},
        {"result_id": "5f0c8a52-2b1e-4c4e-8f5-71c8f3b1d2a10"},
        {"timestamp": "2026-11-27T12:00:0aZ"},
        {"timestamp": "2026-11-27T12:00:00z"},
        {"timestamp": "2026-11-27 12:00:00Z"},
        {"timestamp": "2026-11-2712:00:00ZZ"},
        {"cert_expires_at": "2026-11-27T12:00:00+01:00"},
        {"cert_expires_at": "2026-11-27T12:00:00+00:00"},
        {"cert_expires_at": "2026-11-27T12:00:00.25Z"},
    ],
)
def test_one_odd_spelling_among_alike_values_is_found(odd: dict[str, object]) -> None:
    """A column whose values all look alike is checked by their shape, not by the regex: one
    value spelled otherwise must still be told apart, in any place of the batch."""
    alike = [
        changed(MINIMAL, result_id=str(uuid.uuid4()), cert_expires_at=f"2027-0{n}-01T00:00:00Z")
        for n in range(1, 6)
    ]
    for at in (0, 2, 5):
        values = [*alike[:at], changed(MINIMAL, **odd), *alike[at:]]
        batch = decode_plain_many([Where(v) for v in values], max_bytes=20_000)
        assert [view(plain) for plain in batch] == [reference(v) for v in values]


def test_an_offset_other_than_utc_among_alike_ones_is_found() -> None:
    values = [changed(MINIMAL, timestamp=f"2026-11-27T12:00:0{n}+0{n // 4}:00") for n in range(5)]
    batch = decode_plain_many([Where(v) for v in values], max_bytes=20_000)
    assert [view(plain) for plain in batch] == [reference(v) for v in values]
    assert [isinstance(plain, ContractError) for plain in batch] == [False] * 5


def test_fast_path_values_are_the_enums_values() -> None:
    assert set(typing.get_args(contract.HealthValue)) == {h.value for h in Health}
    assert set(typing.get_args(contract.PatternValue)) == {p.value for p in PatternResult}
    assert set(typing.get_args(contract.ErrorKindValue)) == {k.value for k in ErrorKind}


def test_fast_path_fields_are_the_models_fields() -> None:
    assert set(contract.PlainBody.__struct_fields__) == set(CheckResult.model_fields)
    assert set(contract.PlainTimings.__struct_fields__) == set(Timings.model_fields)
    assert set(contract.PlainError.__struct_fields__) == set(CheckError.model_fields)


def test_decode_plain_agrees_on_size_limit() -> None:
    value = changed(MINIMAL, name="n" * 150)
    assert plain_view(value) == reference(value)
    with pytest.raises(ContractError, match="too large") as raised:
        decode_plain(value, max_bytes=len(value) - 1)
    assert str(raised.value) == f"message too large: {len(value)} bytes > {len(value) - 1}"


ERROR = CheckError(kind=ErrorKind.TLS, message="certificate\thas expired\n")

# What a hostile server can put into an error message: NUL (PostgreSQL refuses the row), an
# ANSI escape, a line separator, a right-to-left override, C1 NEL, a tab, a lone surrogate
# (undecodable bytes read with surrogateescape).
HOSTILE_TEXT = "to \x00evil\x1b[31m\u2028line\u202eright\x85next\tend\udc85"
UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def test_an_error_message_never_holds_control_characters() -> None:
    error = CheckError(kind=ErrorKind.INVALID_RESPONSE, message=HOSTILE_TEXT)
    assert error.message == "to \ufffdevil\ufffd[31m line\ufffdright next end\ufffd"
    assert not UNSAFE.search(error.message)
    assert CheckError(kind=ErrorKind.DNS, message="plain text, café").message == "plain text, café"


@pytest.mark.parametrize(
    "char", ["\x00", "\x01", "\x1b", "\x7f", "\x85", "\x9b", "\u2028", "\u2066"]
)
def test_both_decoders_read_a_control_character_in_an_error_message_alike(char: str) -> None:
    """From a producer that did not make its message safe: the fast path leaves it to the
    model, which replaces it; the row the processor stores holds none."""
    message = f"before {char} after"
    value = changed(MINIMAL, ok=False, error={"kind": "invalid_response", "message": message})
    (fast,) = decode_plain_many([Where(value)])
    assert not isinstance(fast, ContractError)
    assert fast.body.error is not None
    model = decode(value).result.error
    assert model is not None
    assert fast.body.error.message == model.message
    assert not UNSAFE.search(model.message)
    assert model.message in ("before \ufffd after", "before   after")


def test_messages_from_encode_take_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    def model_path(*args: object, **kwargs: object) -> None:
        raise AssertionError("decode() was used")

    expected = {k: reference(v) for k, v in AGREEMENT.items() if k in ("canonical", "minimal")}
    monkeypatch.setattr(contract, "decode", model_path)
    assert plain_view(AGREEMENT["canonical"]) == expected["canonical"]
    assert plain_view(AGREEMENT["minimal"]) == expected["minimal"]
    _, value = encode(uuid.uuid4(), a_result())
    decode_plain(value)
    batch = [Where(encode(uuid.uuid4(), a_result(error=e))[1]) for e in (None, ERROR) * 50]
    assert not any(isinstance(p, ContractError) for p in decode_plain_many(batch))
