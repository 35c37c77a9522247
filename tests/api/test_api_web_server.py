"""The API as a web server: it answers only to its own host names, takes changes only as JSON,
answers what aiohttp's HTTP parser refuses in its one JSON shape, and holds no connection open
for a request head or body that does not arrive. Raw requests go over a socket to the runner
the daemon serves with (`ApiRunner`)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
from aiohttp import web
from api.support import Client, ClientFactory, make_settings

from devstack import free_port
from periodic_checker.api.app import create_app
from periodic_checker.api.server import ApiRunner
from periodic_checker.checker_service import CheckerService

TASK = {"name": "site", "url": "http://127.0.0.1:9/", "interval": 3600}
FAST = 1.0  # seconds: the head and body deadlines (and the linger) of the app served here


# --- Host: a page that rebinds its own DNS name to 127.0.0.1 reaches nothing ------------------


@pytest.mark.parametrize(
    "host",
    [
        "rebound.attacker.example",
        "rebound.attacker.example:8080",
        "localhost.attacker.example",
        "127.0.0.1.nip.io",
        "[::2]",
        "",
    ],
)
async def test_a_request_for_another_host_is_refused(
    client: Client, service: CheckerService, host: str
) -> None:
    for method, path, body in [("GET", "/tasks", None), ("GET", "/status", None),
                               ("POST", "/tasks", TASK)]:  # fmt: skip
        response = await client.request(method, path, json=body, headers={"Host": host})

        assert response.status == 421, (method, path)
        assert response.content_type == "application/json"
        answer = await response.json()
        assert answer["error"] == "host_not_allowed"
        assert "API_ALLOWED_HOSTS" in answer["message"]
    assert service.scheduler.tasks == {}


@pytest.mark.parametrize("host", ["localhost", "LOCALHOST:8080", "127.0.0.1:1", "[::1]:8080"])
async def test_loopback_names_with_any_port_are_answered(client: Client, host: str) -> None:
    response = await client.get("/health", headers={"Host": host})

    assert response.status == 200


async def test_the_allowed_hosts_come_from_the_setting(
    aiohttp_client: ClientFactory, service: CheckerService, dev_certs: Path
) -> None:
    settings = make_settings(dev_certs, api_allowed_hosts="checker.internal")
    client = await aiohttp_client(create_app(service, settings))

    named = await client.get("/health", headers={"Host": "checker.internal:8080"})
    loopback = await client.get("/health", headers={"Host": "localhost:8080"})
    own = await client.get("/health", headers={"Host": "127.0.0.1"})  # API_HOST itself

    assert (named.status, loopback.status, own.status) == (200, 421, 200)


# --- changes are JSON: a cross-site form cannot pause, run or delete a task ------------------


FORMS = [
    ("form", {"Content-Type": "application/x-www-form-urlencoded"}, b"x=1"),
    ("text", {"Content-Type": "text/plain"}, b"{}"),
    ("multipart", {"Content-Type": "multipart/form-data; boundary=b"}, b"--b--\r\n"),
    ("nothing", {}, None),
]


async def test_a_change_without_a_json_content_type_is_refused(
    client: Client, service: CheckerService, subtests: pytest.Subtests
) -> None:
    created = await (await client.post("/tasks", json=TASK)).json()
    path = f"/tasks/{created['id']}"
    for suffix, method in [("/pause", "POST"), ("/run", "POST"), ("", "DELETE"),
                           ("/resume", "POST"), ("", "PATCH")]:  # fmt: skip
        for case, headers, body in FORMS:
            with subtests.test(f"{method} {suffix or '/'}", body=case):
                response = await client.request(method, path + suffix, data=body, headers=headers)
                assert response.status == 415
                assert (await response.json())["error"] == "unsupported_media_type"
    task = await (await client.get(path)).json()
    assert task["status"] == "active"
    assert task["runs"] == 0


@pytest.mark.parametrize(
    ("body", "status"),
    [(None, 200), (b"", 200), (b"{}", 200), (b'{"now": true}', 422), (b"[]", 422),
     (b"{", 400)],
)  # fmt: skip
async def test_an_action_takes_an_empty_json_object_or_no_body(
    client: Client, body: bytes | None, status: int
) -> None:
    created = await (await client.post("/tasks", json=TASK)).json()
    response = await client.post(
        f"/tasks/{created['id']}/pause", data=body, headers={"Content-Type": "application/json"}
    )

    assert response.status == status, await response.text()


# --- raw requests to the served runner ------------------------------------------------------


@dataclass
class Served:
    host: str
    port: int

    async def exchange(self, raw: bytes, *, wait: float = 30) -> bytes:
        """Send `raw`, then read until the server closes the connection."""
        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            writer.write(raw)
            await writer.drain()
            return await asyncio.wait_for(reader.read(), wait)
        finally:
            writer.close()


@pytest.fixture
async def served(service: CheckerService, dev_certs: Path) -> AsyncIterator[Served]:
    app = create_app(service, make_settings(dev_certs), body_timeout=FAST)
    runner = ApiRunner(app, head_timeout=FAST, linger=FAST, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield Served("127.0.0.1", port)
    finally:
        await runner.cleanup()


def head_and_body(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


HOST = b"Host: 127.0.0.1\r\n"
# Each is refused by aiohttp's HTTP parser before any route or middleware runs.
PARSER_REFUSALS = [
    ("negative Content-Length", b"POST /tasks HTTP/1.1\r\n" + HOST + b"Content-Length: -1\r\n\r\n"),
    ("two Content-Lengths", b"POST /tasks HTTP/1.1\r\n" + HOST
     + b"Content-Length: 1\r\nContent-Length: 2\r\n\r\nab"),
    ("20 KB request line", b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\n" + HOST + b"\r\n"),
    ("9 KB header", b"GET /health HTTP/1.1\r\n" + HOST + b"X-A: " + b"a" * 9000 + b"\r\n\r\n"),
    ("5,000 headers", b"GET /health HTTP/1.1\r\n" + HOST
     + b"".join(b"X-%d: 1\r\n" % i for i in range(5000)) + b"\r\n"),
    ("Content-Length and chunked", b"POST /tasks HTTP/1.1\r\n" + HOST
     + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    ("bad chunk size", b"POST /tasks HTTP/1.1\r\n" + HOST
     + b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"),
    ("NUL in a header", b"GET /health HTTP/1.1\r\n" + HOST + b"X-A: a\x00b\r\n\r\n"),
    ("bad method", b"G@T /health HTTP/1.1\r\n" + HOST + b"\r\n"),
    ("unknown HTTP version", b"GET /health HTTP/9.9\r\n" + HOST + b"\r\n"),
    ("TLS on the plain port", b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03"),
]  # fmt: skip


async def test_what_the_http_parser_refuses_gets_the_json_error_shape(
    served: Served, subtests: pytest.Subtests
) -> None:
    for case, raw in PARSER_REFUSALS:
        with subtests.test(case):
            status, headers, body = head_and_body(await served.exchange(raw))
            assert status == 400
            assert headers["content-type"].startswith("application/json")
            answer = orjson.loads(body)
            assert set(answer) == {"error", "message", "detail"}
            assert answer["error"] == "bad_request"
            assert answer["message"].startswith("malformed HTTP request: ")
            assert "aaaa" not in answer["message"]  # the request's bytes are not echoed


async def test_a_request_without_a_host_header_is_refused(served: Served) -> None:
    status, _, body = head_and_body(await served.exchange(b"GET /tasks HTTP/1.0\r\n\r\n"))

    assert status == 421
    assert orjson.loads(body)["error"] == "host_not_allowed"
    # HTTP/1.1 requires the header: without it the request is malformed (docs/api.md).
    status, _, body = head_and_body(await served.exchange(b"GET /tasks HTTP/1.1\r\n\r\n"))

    assert status == 400
    assert orjson.loads(body)["error"] == "bad_request"


async def test_a_slow_request_head_is_cut_off(served: Served) -> None:
    reader, writer = await asyncio.open_connection(served.host, served.port)
    try:
        writer.write(b"GET /health HTTP/1.1\r\n" + HOST)
        for n in range(600):  # a header every 0.1 s, for up to a minute: never a whole head
            try:
                writer.write(b"X-Slow-%d: 1\r\n" % n)
                await writer.drain()
                answer = await asyncio.wait_for(reader.read(1), 0.1)
            except TimeoutError:
                continue
            except ConnectionError:
                return  # closed while we were still sending
            assert answer == b"", "the server answered a head that never ended"
            return  # closed without an answer
        pytest.fail("the server kept reading a head that never ends")
    finally:
        writer.close()


async def test_a_connection_that_sends_nothing_is_closed(served: Served) -> None:
    assert await served.exchange(b"") == b""


async def test_a_body_declared_and_not_sent_is_408_and_the_connection_closes(
    served: Served, service: CheckerService
) -> None:
    head = (
        b"POST /tasks HTTP/1.1\r\n" + HOST + b"Content-Type: application/json\r\n"
        b"Content-Length: 1000\r\n\r\n"
    )
    status, headers, body = head_and_body(await served.exchange(head + b'{"name": '))

    assert status == 408
    assert orjson.loads(body)["error"] == "body_timeout"
    assert headers["connection"] == "close"
    assert service.scheduler.tasks == {}


async def test_a_body_trickled_slower_than_the_deadline_is_408(served: Served) -> None:
    reader, writer = await asyncio.open_connection(served.host, served.port)
    try:
        writer.write(
            b"PUT /tasks/" + str(uuid.uuid4()).encode() + b" HTTP/1.1\r\n" + HOST
            + b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )  # fmt: skip
        for _ in range(600):  # one byte every 0.1 s, in a chunk each, for up to a minute
            writer.write(b"1\r\n \r\n")
            try:
                await writer.drain()
                # read(n) consumes nothing when it times out (read() would drop what it got).
                first = await asyncio.wait_for(reader.read(65536), 0.1)
                break
            except TimeoutError:
                continue
        else:
            pytest.fail("the server kept reading a body that never ends")
        status, _, body = head_and_body(first + await asyncio.wait_for(reader.read(), 30))
        assert status == 408
        assert orjson.loads(body)["error"] == "body_timeout"
    finally:
        writer.close()
