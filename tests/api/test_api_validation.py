"""Every invalid input gets a 4xx JSON body naming the field and the problem, never a 500."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path
from typing import Any

import pytest
from api.support import Client, ClientFactory, checker_service, make_settings

from periodic_checker.api.app import create_app
from periodic_checker.api.models import MAX_BODY_BYTES
from periodic_checker.checker_service import CheckerService

OK = {"name": "site", "url": "http://127.0.0.1:9/"}
HOSTILE = r"\w{1000}\w{1000}\w{1000}\w{1000}Z"  # 12005 RE2 instructions
BIG_SEARCH = {**OK, "pattern": "x" * 100, "max_body_bytes": 64 * 1_048_576}  # 104 x 64 MiB
STATUSES = "accepted_statuses"
# One parser reads 169.254.169.254 as the host, the probe's refuses the URL.
BACKSLASH = "http://127.0.0.1:9\\@169.254.169.254/"

# (case, JSON body for POST /tasks, status, field named in detail, words in its message)
BODY_CASES: list[tuple[str, Any, int, str, str]] = [
    ("file scheme", {**OK, "url": "file:///etc/passwd"}, 422, "url", "scheme"),
    ("ftp scheme", {**OK, "url": "ftp://example.com/"}, 422, "url", "scheme"),
    ("no host", {**OK, "url": "http:///path"}, 422, "url", "host"),
    ("not a url", {**OK, "url": "example.com"}, 422, "url", "scheme"),
    ("space in url", {**OK, "url": "http://exa mple.com/"}, 422, "url", "spaces"),
    ("bad port", {**OK, "url": "http://example.com:99999/"}, 422, "url", "port"),
    ("interval too small", {**OK, "interval": 0.5}, 422, "interval", "greater than or equal"),
    ("interval too large", {**OK, "interval": 10**9}, 422, "interval", "less than or equal"),
    ("timeout zero", {**OK, "timeout": 0}, 422, "timeout", "greater than"),
    ("timeout too large", {**OK, "timeout": 301, "interval": 600}, 422, "timeout", "less than"),
    ("timeout not below interval", {**OK, "interval": 5, "timeout": 5}, 422, "timeout", "below"),
    ("pattern RE2 refuses", {**OK, "pattern": "(a"}, 422, "pattern", "RE2"),
    ("pattern backreference", {**OK, "pattern": r"(a)\1"}, 422, "pattern", "RE2"),
    ("pattern program too large", {**OK, "pattern": HOSTILE}, 422, "pattern", "at most 1000"),
    ("pattern and body cap too large", BIG_SEARCH, 422, "max_body_bytes", "at most 41297762"),
    ("header value with CRLF", {**OK, "headers": {"X-A": "1\r\nX-B: 2"}}, 422, "headers", "CR"),
    ("header name with LF", {**OK, "headers": {"X-\nA": "1"}}, 422, "headers", "token"),
    ("header value not text", {**OK, "headers": {"X-A": 1}}, 422, "headers.X-A", "string"),
    ("unknown field", {**OK, "colour": "red"}, 422, "colour", "not permitted"),
    (
        "secret header not among the headers",
        {**OK, "headers": {"X-Api-Key": "k"}, "secret_headers": ["X-Api-Kye"]},
        422,
        "secret_headers",
        "not one of the task's headers",
    ),
    (
        "secret header not a token",
        {**OK, "secret_headers": ["X A"]},
        422,
        "secret_headers",
        "token",
    ),
    ("mask as a new password", {**OK, "url": "http://u:***@h/"}, 422, "url", "stored password"),
    (
        "mask as a new secret value",
        {**OK, "headers": {"Authorization": "***"}},
        422,
        "headers.Authorization",
        "stored value",
    ),
    ("missing name", {"url": OK["url"]}, 422, "name", "required"),
    ("empty name", {**OK, "name": ""}, 422, "name", "at least 1"),
    ("wrong method", {**OK, "method": "TRACE"}, 422, "method", "GET"),
    ("bad status ranges", {**OK, "accepted_statuses": "200-"}, 422, "accepted_statuses", "ranges"),
    # A HEAD response has no body: the pattern would never be searched, and the check pass.
    ("pattern with HEAD", {**OK, "method": "HEAD", "pattern": "ok"}, 422, "pattern", "HEAD"),
    ("retries negative", {**OK, "retries": -1}, 422, "retries", "greater than or equal"),
    ("interval a string", {**OK, "interval": "often"}, 422, "interval", "number"),
    ("body is a list", [OK], 422, "body", "JSON object"),
    ("body is a string", "task", 422, "body", "JSON object"),
    # A default is validated like a given value: 10 s is not below 5 s.
    ("timeout left out, interval 5", {**OK, "interval": 5}, 422, "timeout", "default"),
    ("timeout left out, interval 10", {**OK, "interval": 10}, 422, "timeout", "below"),
    # The URL is read by the parser the probe fetches with.
    ("port 0", {**OK, "url": "http://example.com:0/"}, 422, "url", "port"),
    ("empty label", {**OK, "url": "http://a..b/"}, 422, "url", "empty label"),
    ("64-character label", {**OK, "url": f"http://{'a' * 64}.example/"}, 422, "url", "63"),
    ("host over 253", {**OK, "url": f"http://{'a.' * 127}ab/"}, 422, "url", "253"),
    ("invalid punycode", {**OK, "url": "http://xn--a.example/"}, 422, "url", "IDNA"),
    ("symbol in host", {**OK, "url": "http://a!b.example/"}, 422, "url", "DNS name"),
    ("backslash in authority", {**OK, "url": BACKSLASH}, 422, "url", "backslash"),
    ("percent-encoded host", {**OK, "url": "http://%31%36%39.254.169.254/"}, 422, "url", "percent"),
    ("zone id", {**OK, "url": "http://[fe80::1%25eth0]/"}, 422, "url", "zone"),
    ("brackets, not IPv6", {**OK, "url": "http://[1:2]/"}, 422, "url", "IPv6"),
    ("tab in url", {**OK, "url": "http://example.com/a\tb"}, 422, "url", "control"),
    ("bidi override in url", {**OK, "url": "http://example.com/\u202e"}, 422, "url", "control"),
    # Strict: a JSON string is not a number and not a boolean.
    ("interval a numeric string", {**OK, "interval": "10"}, 422, "interval", "number"),
    ("interval true", {**OK, "interval": True}, 422, "interval", "number"),
    ("timeout a numeric string", {**OK, "timeout": "5"}, 422, "timeout", "number"),
    ("verify_tls yes", {**OK, "verify_tls": "yes"}, 422, "verify_tls", "boolean"),
    ("keepalive 1", {**OK, "keepalive": 1}, 422, "keepalive", "boolean"),
    ("retries a numeric string", {**OK, "retries": "1"}, 422, "retries", "integer"),
    ("max_redirects a fraction", {**OK, "max_redirects": 1.5}, 422, "max_redirects", "integer"),
    ("end_at a number", {**OK, "end_at": 1_800_000_000}, 422, "end_at", "datetime"),
    # Text that reaches results and logs holds no control characters.
    ("NUL in name", {**OK, "name": "a\u0000b"}, 422, "name", "U+0000"),
    ("ANSI escape in name", {**OK, "name": "\u001b[31mred"}, 422, "name", "control"),
    ("DEL in name", {**OK, "name": "a\u007f"}, 422, "name", "control"),
    ("C1 control in name", {**OK, "name": "a\u009b31m"}, 422, "name", "control"),
    ("line separator in name", {**OK, "name": "a\u2028b"}, 422, "name", "control"),
    ("bidi override in name", {**OK, "name": "abc\u202egpj.exe"}, 422, "name", "control"),
    ("header value SOH", {**OK, "headers": {"X-A": "a\u0001"}}, 422, "headers", "U+0001"),
    ("header value DEL", {**OK, "headers": {"X-A": "a\u007f"}}, 422, "headers", "control"),
    ("header value VT", {**OK, "headers": {"X-A": "a\u000bb"}}, 422, "headers", "control"),
    ("header value NUL", {**OK, "headers": {"X-A": "a\u0000"}}, 422, "headers", "NUL"),
    # The checker writes the body's framing itself; a task's own would contradict it.
    ("Content-Length header", {**OK, "headers": {"Content-Length": "5"}}, 422, "headers", "body"),
    ("Transfer-Encoding header", {**OK, "headers": {"transfer-encoding": "chunked"}}, 422,
     "headers", "body"),
    # Names ignore case: one of the two would be sent, the other dropped.
    ("header twice in two cases", {**OK, "headers": {"X-A": "1", "x-a": "2"}}, 422, "headers",
     "twice"),
    # The status ranges are what the pattern in the document says.
    ("status code 600", {**OK, "accepted_statuses": "200-600"}, 422, STATUSES, "100-599"),
    ("status code 000", {**OK, "accepted_statuses": "000"}, 422, STATUSES, "100-599"),
    ("status range with tab", {**OK, "accepted_statuses": "200,\t204"}, 422, STATUSES, "ranges"),
    # Tags: a few short labels of letters, digits and punctuation that reads in a rule.
    ("tag with a space", {**OK, "tags": ["a b"]}, 422, "tags", "letters"),
    ("empty tag", {**OK, "tags": [""]}, 422, "tags", "letters"),
    ("tag of 65 characters", {**OK, "tags": ["a" * 65]}, 422, "tags", "1-64"),
    ("tag twice", {**OK, "tags": ["prod", "prod"]}, 422, "tags", "twice"),
    ("21 tags", {**OK, "tags": [f"t{i}" for i in range(21)]}, 422, "tags", "20"),
    ("tags not a list", {**OK, "tags": "prod"}, 422, "tags", "array"),
]  # fmt: skip

# Near misses of the rules above that are valid, so the rules are not too wide.
ACCEPTED_CASES: list[tuple[str, dict[str, Any]]] = [
    ("a JSON integer is a number", {**OK, "interval": 30, "timeout": 5}),
    ("a number without a fraction is an integer", {**OK, "retries": 2.0, "max_redirects": 3.0}),
    ("timeout left out, interval 11", {**OK, "interval": 11}),
    ("timeout left out, run once", {**OK, "interval": None}),
    ("emoji with joiners in name", {**OK, "name": "\U0001f468\u200d\U0001f469\u200d\U0001f467"}),
    ("tab inside a header value", {**OK, "headers": {"X-A": "a\tb"}}),
    ("non-ASCII header value", {**OK, "headers": {"X-A": "caf\u00e9"}}),
    ("IDN host", {**OK, "url": "http://b\u00fccher.example/"}),
    ("63-character label", {**OK, "url": f"http://{'a' * 63}.example/"}),
    ("underscore in host", {**OK, "url": "http://my_service.internal:8080/"}),
    ("trailing dot", {**OK, "url": "http://example.com./"}),
    ("IPv6 literal", {**OK, "url": "http://[::1]:9/"}),
    ("port 65535", {**OK, "url": "http://example.com:65535/"}),
    ("status range written high to low", {**OK, "accepted_statuses": "399-200, 418"}),
    ("end_at as text", {**OK, "end_at": "2099-01-01T00:00:00Z"}),
    ("20 tags of 64 characters", {**OK, "tags": [f"{i:02d}" + "x" * 62 for i in range(20)]}),
    ("tags with punctuation", {**OK, "tags": ["team:web", "env=prod", "a/b_c.d-e"]}),
]  # fmt: skip


async def test_invalid_tasks_are_refused_naming_the_field(
    client: Client, subtests: pytest.Subtests
) -> None:
    for case, body, status, field, words in BODY_CASES:
        for method, path in [("POST", "/tasks"), ("PUT", f"/tasks/{uuid.uuid4()}")]:
            with subtests.test(case, method=method):
                response = await client.request(method, path, json=body)
                assert response.status == status, await response.text()
                answer = await response.json()
                assert answer["error"] == "validation"
                fields = {d["field"]: d["message"] for d in answer["detail"]}
                assert field in fields, answer
                assert words.lower() in fields[field].lower(), answer
    listed = await (await client.get("/tasks")).json()
    assert listed["tasks"] == []


async def test_near_misses_of_the_rules_are_accepted(
    client: Client, subtests: pytest.Subtests
) -> None:
    for number, (case, body) in enumerate(ACCEPTED_CASES):
        with subtests.test(case):
            response = await client.post("/tasks", json={**body, "name": f"{number} {case}"})
            assert response.status == 201, await response.text()


# (case, method, path, raw body, content type, status, error word)
JSON = "application/json"
BAD_TYPE = "unsupported_media_type"
ANY_ID = "/tasks/0b6cbe3a-0cd6-4b16-9f1e-3f9a4bb8a0d4"
RAW_CASES: list[tuple[str, str, str, bytes | None, str | None, int, str]] = [
    ("malformed JSON", "POST", "/tasks", b'{"name": ', JSON, 400, "malformed_json"),
    ("NaN is not JSON", "POST", "/tasks", b'{"timeout": NaN}', JSON, 400, "malformed_json"),
    ("form body", "POST", "/tasks", b"name=a", "application/x-www-form-urlencoded", 415, BAD_TYPE),
    ("text body", "PUT", ANY_ID, b"{}", "text/plain", 415, BAD_TYPE),
    ("no body at all", "POST", "/tasks", None, None, 415, BAD_TYPE),
    ("patch as text", "PATCH", ANY_ID, b"{}", "text/plain", 415, BAD_TYPE),
    ("wrong method", "DELETE", "/tasks", None, None, 405, "method_not_allowed"),
    ("unknown route", "GET", "/nothing-here", None, None, 404, "not_found"),
]


async def test_bad_requests_get_json_errors(client: Client, subtests: pytest.Subtests) -> None:
    for case, method, path, raw, content_type, status, error in RAW_CASES:
        with subtests.test(case):
            headers = {"Content-Type": content_type} if content_type else {}
            response = await client.request(method, path, data=raw, headers=headers)
            assert response.status == status
            assert response.content_type == "application/json"
            assert (await response.json())["error"] == error


async def test_405_says_which_methods_are_allowed(client: Client) -> None:
    response = await client.request("DELETE", "/tasks")
    assert set(response.headers["Allow"].split(", ")) >= {"GET", "POST"}


async def test_a_body_over_64_kib_is_413(client: Client) -> None:
    big = {**OK, "body": "x" * MAX_BODY_BYTES}
    response = await client.post("/tasks", json=big)
    assert response.status == 413
    assert (await response.json())["error"] == "too_large"


async def test_a_chunked_body_over_64_kib_is_413(client: Client) -> None:
    async def chunks() -> Any:
        yield b'{"name": "a", "body": "'
        for _ in range(MAX_BODY_BYTES // 1024 + 1):
            yield b"x" * 1024
        yield b'"}'

    response = await client.post(
        "/tasks", data=chunks(), headers={"Content-Type": "application/json"}
    )
    assert response.status == 413
    assert (await response.json())["error"] == "too_large"


@pytest.mark.parametrize("path", ["/tasks/not-a-uuid", "/tasks/not-a-uuid/pause"])
async def test_a_malformed_id_is_422_naming_id(client: Client, path: str) -> None:
    response = (
        await client.post(path, json={}) if path.endswith("pause") else await client.get(path)
    )
    assert response.status == 422
    assert (await response.json())["detail"] == [{"field": "id", "message": "must be a UUID"}]


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "many"}, "limit"),
        ({"status": "sleeping"}, "status"),
        ({"health": "meh"}, "health"),
        ({"sort": "name"}, "sort"),
        ({"cursor": "0"}, "cursor"),
        ({"cursor": "WyIyMDI2LTExLTI3IiwgIngiXQ"}, "cursor"),  # the old base64 cursors
        ({"q": "\u0000zzzz"}, "q"),  # SQLite's LIKE ended the text at the NUL: every task
        ({"q": "a\u001bb"}, "q"),
    ],
)
async def test_bad_list_queries_name_the_parameter(
    client: Client, query: dict[str, str], field: str
) -> None:
    response = await client.get("/tasks", params=query)
    assert response.status == 422
    assert [d["field"] for d in (await response.json())["detail"]] == [field]


async def test_patch_refuses_unknown_fields_and_nulls_where_not_allowed(client: Client) -> None:
    created = await (await client.post("/tasks", json=OK)).json()
    path = f"/tasks/{created['id']}"
    unknown = await client.patch(path, json={"colour": "red"})
    assert unknown.status == 422
    assert (await unknown.json())["detail"][0]["field"] == "colour"
    null_name = await client.patch(path, json={"name": None})
    assert null_name.status == 422
    assert (await null_name.json())["detail"][0]["field"] == "name"


async def test_an_unexpected_error_is_a_logged_500_json(
    aiohttp_client: ClientFactory,
    dev_certs: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Broken(CheckerService):
        async def get(self, task_id: uuid.UUID) -> Any:
            raise RuntimeError("disk on fire")

    async with checker_service(tmp_path / "t.sqlite3", service_class=Broken) as broken:
        client = await aiohttp_client(create_app(broken, make_settings(dev_certs)))
        with caplog.at_level(logging.ERROR, logger="periodic_checker.api.app"):
            response = await client.get(f"/tasks/{uuid.uuid4()}")
    assert response.status == 500
    body = await response.json()
    assert body["error"] == "internal"
    assert "disk on fire" not in body["message"]
    assert any(
        "unexpected error on GET /tasks/" in r.getMessage() and r.exc_info for r in caplog.records
    )


async def test_the_message_accounts_for_every_problem_in_detail(client: Client) -> None:
    three = {"name": "", "url": "ftp://example.com/", "retries": -1}
    four = {**three, "colour": "red"}

    answer = await (await client.post("/tasks", json=three)).json()
    assert len(answer["detail"]) == 3
    for problem in answer["detail"]:
        assert f"{problem['field']}: {problem['message']}" in answer["message"]
    assert "more" not in answer["message"]

    answer = await (await client.post("/tasks", json=four)).json()
    assert len(answer["detail"]) == 4
    named = [d for d in answer["detail"] if f"{d['field']}: {d['message']}" in answer["message"]]
    assert len(named) == 3
    assert answer["message"].endswith("; and 1 more (see detail)")


@pytest.mark.parametrize(
    "cursor",
    [
        "00000000T000000000000-00000000000000000000000000000000",
        "99999999T999999999999-ffffffffffffffffffffffffffffffff",
        "20261399T256199000000-0123456789abcdef0123456789abcdef",  # no such time: still a place
    ],
)
async def test_any_cursor_of_the_documented_shape_is_a_place_in_the_list(
    client: Client, cursor: str
) -> None:
    await client.post("/tasks", json=OK)

    response = await client.get("/tasks", params={"cursor": cursor})

    assert response.status == 200
    page = await response.json()
    assert len(page["tasks"]) == (1 if cursor.startswith("0") else 0)
