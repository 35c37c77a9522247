"""periodic_checker.http1 on its own: the request it writes, the response it reads, how it fails.

The servers are raw asyncio TCP servers on 127.0.0.1 that record every byte they receive and
answer with scripted bytes, so a response can be as malformed, truncated or large as a case
needs. A few tests read a private attribute of the exchange; each says why.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import logging
import ssl
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from yarl import URL

from devstack import free_port
from periodic_checker import http1
from periodic_checker.policy import TargetPolicy
from periodic_checker.probe import PolicyResolver

from helpers import wait_for

MIB = 1024 * 1024

# --- raw servers -------------------------------------------------------------------------

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class RawServer:
    """What one scripted server received, and its connections' writers (for their transports)."""

    port: int
    received: bytearray = field(default_factory=bytearray)
    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    finished: asyncio.Event = field(default_factory=asyncio.Event)  # a connection's handler ended

    def url(self, path: str = "/", *, host: str = "127.0.0.1", scheme: str = "http") -> URL:
        return URL(f"{scheme}://{host}:{self.port}{path}")


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def reply(data: bytes, *, close: bool) -> Script:
    """Send `data`; then close, or leave the connection to the client (so the response must end
    by its own framing, not by the server closing)."""

    async def script(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(data)
        await writer.drain()
        if close:
            writer.close()

    return script


StartServer = Callable[..., Awaitable[RawServer]]


@pytest.fixture
async def serve() -> AsyncIterator[StartServer]:
    """`await serve(script, tls=None)`: a server on 127.0.0.1 that reads one request (head, then
    Content-Length bytes), records it and runs `script`. While the script leaves the connection
    open, the server waits for the client to close it and records anything more it sends."""
    servers: list[asyncio.Server] = []
    handlers: set[asyncio.Task[Any]] = set()
    everything: list[RawServer] = []

    async def start(script: Script, *, tls: ssl.SSLContext | None = None) -> RawServer:
        raw: RawServer

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            if task is not None:
                handlers.add(task)
            raw.writers.append(writer)
            try:
                head = await reader.readuntil(b"\r\n\r\n")
                raw.received += head
                raw.received += await reader.readexactly(_content_length(head))
                await script(reader, writer)
                if not writer.is_closing():
                    raw.received += await reader.read()
            except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
                pass  # the client went away; what it sent is in `received`
            finally:
                writer.close()
                raw.finished.set()

        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=tls)
        servers.append(server)
        raw = RawServer(port=server.sockets[0].getsockname()[1])
        everything.append(raw)
        return raw

    yield start
    for server in servers:
        server.close()
    for raw in everything:
        for writer in raw.writers:
            writer.close()
    for task in handlers:
        task.cancel()
    await asyncio.gather(*handlers, return_exceptions=True)
    for server in servers:
        await server.wait_closed()


@pytest.fixture
async def resolver() -> AsyncIterator[PolicyResolver]:
    # The default policy denies only link-local networks (policy.DEFAULT_DENY): loopback, where
    # these servers listen, is allowed, as it is for the probe's own tests.
    found = PolicyResolver(TargetPolicy())
    yield found
    await found.close()


def new_marks() -> SimpleNamespace:
    return SimpleNamespace(
        conn_start=None, dns_start=None, dns_end=None, tls_start=None, conn_end=None, sent=None
    )


async def fetch(
    url: URL,
    resolver: PolicyResolver,
    *,
    method: str = "GET",
    body: bytes | None = None,
    tls: ssl.SSLContext | None = None,
    marks: SimpleNamespace | None = None,
) -> http1.Response:
    head = http1.request_head(method, url, {}, body, {})
    return await http1.exchange(
        method,
        url,
        head,
        body,
        tls=tls,
        resolver=resolver,
        marks=marks if marks is not None else new_marks(),
    )


async def read_body(response: http1.Response, into: bytearray | None = None) -> bytes:
    """The whole body; what was read so far is also in `into` (for a read that fails)."""
    pieces = into if into is not None else bytearray()
    while piece := await response.readany():
        pieces += piece
    return bytes(pieces)


# --- request_head ------------------------------------------------------------------------

DEFAULTS = {"User-Agent": "periodic-checker/test", "Accept": "*/*"}


def head_lines(
    url: str,
    headers: dict[str, str] | None = None,
    *,
    method: str = "GET",
    body: bytes | None = None,
    defaults: dict[str, str] | None = None,
) -> list[str]:
    """The request line and header lines of a head (the final blank line is tested apart)."""
    head = http1.request_head(method, URL(url), headers or {}, body, defaults or DEFAULTS)
    return head.decode("utf-8").removesuffix("\r\n\r\n").split("\r\n")


def header(lines: list[str], name: str) -> list[str]:
    """The values of every line naming `name` (case-insensitively)."""
    found = []
    for line in lines[1:]:
        key, _, value = line.partition(": ")
        if key.lower() == name.lower():
            found.append(value)
    return found


def test_a_whole_head() -> None:
    head = http1.request_head(
        "GET", URL("http://example.com:8080/a/b?q=1&r=%20"), {}, None, {"User-Agent": "t/1"}
    )

    assert head == (
        b"GET /a/b?q=1&r=%20 HTTP/1.1\r\n"
        b"User-Agent: t/1\r\n"
        b"Host: example.com:8080\r\n"
        b"Connection: close\r\n"
        b"\r\n"
    )


@pytest.mark.parametrize(
    ("method", "url", "line"),
    [
        ("GET", "http://example.com/a/b?q=1&q=2", "GET /a/b?q=1&q=2 HTTP/1.1"),
        ("GET", "http://example.com", "GET / HTTP/1.1"),
        ("HEAD", "http://example.com/page#section", "HEAD /page HTTP/1.1"),
        ("POST", "http://example.com/caf%C3%A9?x=a%26b", "POST /caf%C3%A9?x=a%26b HTTP/1.1"),
        ("OPTIONS", "http://example.com/café?q=ü", "OPTIONS /caf%C3%A9?q=%C3%BC HTTP/1.1"),
    ],
    ids=["path-and-query", "no-path", "fragment-not-sent", "percent-encoded", "non-ascii"],
)
def test_request_line(method: str, url: str, line: str) -> None:
    assert head_lines(url, method=method)[0] == line


@pytest.mark.parametrize(
    ("url", "host"),
    [
        ("http://example.com:8080/", "example.com:8080"),
        ("http://example.com:80/", "example.com"),
        ("https://example.com:443/", "example.com"),
        ("https://example.com:80/", "example.com:80"),
        ("http://[::1]:8080/", "[::1]:8080"),
        ("http://[2001:db8::1]/", "[2001:db8::1]"),
        ("http://bücher.de/", "xn--bcher-kva.de"),
        ("http://127.0.0.1:9000/", "127.0.0.1:9000"),
    ],
    ids=[
        "other-port",
        "http-default-port",
        "https-default-port",
        "https-on-80",
        "ipv6-with-port",
        "ipv6",
        "idna",
        "ipv4",
    ],
)
def test_host_comes_from_the_url(url: str, host: str) -> None:
    assert header(head_lines(url), "Host") == [host]


def test_defaults_apply_unless_the_task_names_them_in_any_case() -> None:
    lines = head_lines(
        "http://example.com/",
        {"user-agent": "my-agent/2", "ACCEPT": "text/html", "X-Extra": "1"},
        defaults={"User-Agent": "checker/1", "Accept": "*/*", "Accept-Encoding": "gzip"},
    )

    names = [line.partition(":")[0] for line in lines[1:]]
    assert "user-agent: my-agent/2" in lines
    assert "ACCEPT: text/html" in lines
    assert "Accept-Encoding: gzip" in lines
    assert "X-Extra: 1" in lines
    assert len(names) == len({name.lower() for name in names})  # one line per header


def test_a_tasks_own_host_wins() -> None:
    lines = head_lines("http://127.0.0.1:8080/", {"host": "virtual.example"})

    assert header(lines, "Host") == ["virtual.example"]
    assert "host: virtual.example" in lines


def basic(credentials: str) -> str:
    return "Basic " + base64.b64encode(credentials.encode()).decode("ascii")


@pytest.mark.parametrize(
    ("url", "headers", "authorization"),
    [
        ("http://alice:s3cret@example.com/", {}, [basic("alice:s3cret")]),
        ("http://al%40ice:p%3Aw@example.com/", {}, [basic("al@ice:p:w")]),
        ("http://alice@example.com/", {}, [basic("alice:")]),
        ("http://alice:s3cret@example.com/", {"authorization": "Bearer t"}, ["Bearer t"]),
        ("http://example.com/", {}, []),
    ],
    ids=["user-and-password", "percent-decoded", "user-only", "task-header-wins", "none"],
)
def test_basic_auth_from_the_url(
    url: str, headers: dict[str, str], authorization: list[str]
) -> None:
    assert header(head_lines(url, headers), "Authorization") == authorization


@pytest.mark.parametrize(
    ("method", "body", "length"),
    [
        ("GET", None, []),
        ("HEAD", None, []),
        ("DELETE", None, []),
        ("POST", None, ["0"]),
        ("PUT", None, ["0"]),
        ("PATCH", None, ["0"]),
        ("POST", b"", ["0"]),
        ("POST", b"abc", ["3"]),
        ("PUT", "café".encode(), ["5"]),
        ("GET", b"query", ["5"]),
    ],
    ids=[
        "get",
        "head",
        "delete",
        "post-no-body",
        "put-no-body",
        "patch-no-body",
        "post-empty-body",
        "post-body",
        "length-in-bytes",
        "get-with-body",
    ],
)
def test_content_length(method: str, body: bytes | None, length: list[str]) -> None:
    lines = head_lines("http://example.com/", method=method, body=body)

    assert header(lines, "Content-Length") == length


def test_a_tasks_content_length_is_replaced_by_the_bodys() -> None:
    lines = head_lines("http://example.com/", {"content-length": "99"}, method="POST", body=b"ab")

    assert header(lines, "Content-Length") == ["2"]


@pytest.mark.parametrize(
    "headers",
    [{}, {"Connection": "keep-alive"}, {"connection": "Upgrade"}],
    ids=["default", "keep-alive", "lower-case"],
)
def test_the_connection_is_always_closed(headers: dict[str, str]) -> None:
    lines = head_lines("http://example.com/", headers)

    assert header(lines, "Connection") == ["close"]


def test_a_tasks_transfer_encoding_is_dropped() -> None:
    lines = head_lines(
        "http://example.com/", {"Transfer-Encoding": "chunked"}, method="POST", body=b"x"
    )

    assert header(lines, "Transfer-Encoding") == []
    assert header(lines, "Content-Length") == ["1"]


def test_the_head_ends_with_one_blank_line() -> None:
    head = http1.request_head("POST", URL("http://u:p@example.com/"), {"A": "b"}, b"x", DEFAULTS)

    assert head.endswith(b"\r\n\r\n")
    assert head.count(b"\r\n\r\n") == 1
    assert not head.endswith(b"\r\n\r\n\r\n")


# --- content_charset ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content_type", "charset"),
    [
        ('text/html; charset="utf-8"', "utf-8"),
        ("text/html; charset='utf-8'", "utf-8"),
        ("text/html; charset=utf-8", "utf-8"),
        ("text/html;charset=windows-1251", "windows-1251"),
        ("text/html; CHARSET=UTF-8", "UTF-8"),
        ("text/html; Charset = ISO-8859-1 ", "ISO-8859-1"),
        ("text/plain; format=flowed; charset=latin-1", "latin-1"),
        ("text/plain; charset=latin-1; format=flowed", "latin-1"),
        ("text/plain; xcharset=no; charset=yes", "yes"),
        ("text/plain", None),
        ("text/plain; format=flowed", None),
        ("", None),
        ("text/plain; charset=", None),
        ('text/plain; charset=""', None),
        ("text/plain; charset", None),
        ('multipart/mixed; boundary="a;charset=x"', None),
        ('multipart/mixed; boundary="a;charset=x"; charset=utf-8', "utf-8"),
        ('text/plain; charset="utf\\-8"', "utf-8"),
        ('text/plain; title="say \\"hi\\"; charset=no"; charset=koi8-r', "koi8-r"),
    ],
    ids=[
        "double-quoted",
        "single-quoted",
        "unquoted",
        "no-space",
        "upper-case-name",
        "spaces-around",
        "param-before",
        "param-after",
        "similar-name-first",
        "missing",
        "other-param-only",
        "empty-header",
        "empty-value",
        "empty-quoted",
        "no-equals",
        "semicolon-inside-quotes",
        "after-a-quoted-semicolon",
        "escaped-character",
        "escaped-quote-inside-quotes",
    ],
)
def test_content_charset(content_type: str, charset: str | None) -> None:
    assert http1.content_charset(content_type) == charset


# --- exchange ----------------------------------------------------------------------------

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@pytest.mark.parametrize(
    ("method", "body"),
    [("GET", None), ("POST", b'{"name": "caf\xc3\xa9"}'), ("POST", None), ("PUT", b"")],
    ids=["get", "post-body", "post-no-body", "put-empty-body"],
)
async def test_the_server_receives_exactly_the_head_and_the_body(
    method: str, body: bytes | None, serve: StartServer, resolver: PolicyResolver
) -> None:
    server = await serve(reply(OK, close=False))
    url = server.url("/submit?x=1")
    head = http1.request_head(method, url, {"X-Task": "t"}, body, DEFAULTS)

    response = await http1.exchange(
        method, url, head, body, tls=None, resolver=resolver, marks=new_marks()
    )
    async with contextlib.aclosing(response):
        assert await read_body(response) == b"ok"
    await server.finished.wait()  # the server read up to the client's close

    assert bytes(server.received) == head + (body or b"")


async def test_status_and_headers(serve: StartServer, resolver: PolicyResolver) -> None:
    server = await serve(
        reply(
            b"HTTP/1.1 201 Created\r\n"
            b"Content-Type: text/plain; charset=latin-1\r\n"
            b"X-Twice: first\r\n"
            b"x-twice: second\r\n"
            b"Location: /made/1\r\n"
            b"Content-Length: 0\r\n"
            b"\r\n",
            close=False,
        )
    )

    async with contextlib.aclosing(await fetch(server.url(), resolver)) as response:
        assert response.status == 201
        assert response.headers == {
            "content-type": "text/plain; charset=latin-1",
            "x-twice": "first",
            "location": "/made/1",
            "content-length": "0",
        }
        assert response.charset == "latin-1"
        assert response.ssl_object() is None


@dataclass(frozen=True)
class Framing:
    id: str
    response: bytes
    close: bool  # whether the server closes after sending it
    body: bytes


FRAMINGS = [
    Framing(
        "content-length",
        b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nhello world",
        close=False,
        body=b"hello world",
    ),
    Framing(
        "chunked",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n1;ext=1\r\n \r\nA\r\nworld, 10 \r\n0\r\n\r\n",
        close=False,
        body=b"hello world, 10 ",
    ),
    Framing(
        "chunked-with-trailer",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\nX-Trailer: late\r\n\r\n",
        close=False,
        body=b"abc",
    ),
    Framing(
        "until-close",
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nto the end",
        close=True,
        body=b"to the end",
    ),
    Framing("http-1.0", b"HTTP/1.0 200 OK\r\n\r\nold", close=True, body=b"old"),
    Framing("empty-by-length", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", False, b""),
    Framing("no-content", b"HTTP/1.1 204 No Content\r\n\r\n", close=False, body=b""),
    Framing("not-modified", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n", False, b""),
]


@pytest.mark.parametrize("framing", FRAMINGS, ids=[framing.id for framing in FRAMINGS])
async def test_the_body_ends_by_its_framing(
    framing: Framing, serve: StartServer, resolver: PolicyResolver
) -> None:
    server = await serve(reply(framing.response, close=framing.close))

    async with contextlib.aclosing(await fetch(server.url(), resolver)) as response:
        assert await read_body(response) == framing.body
        assert await response.readany() == b""  # and stays at its end
        assert "x-trailer" not in response.headers


@pytest.mark.parametrize(
    "interim",
    [
        b"HTTP/1.1 100 Continue\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 100 Continue\r\n\r\n",
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n",
    ],
    ids=["100-continue", "two-interims", "103-early-hints"],
)
async def test_an_interim_response_is_skipped(
    interim: bytes, serve: StartServer, resolver: PolicyResolver
) -> None:
    final = b"HTTP/1.1 200 OK\r\nX-Final: yes\r\nContent-Length: 2\r\n\r\nok"
    server = await serve(reply(interim + final, close=False))

    async with contextlib.aclosing(
        await fetch(server.url(), resolver, method="POST", body=b"data")
    ) as response:
        assert response.status == 200
        assert response.headers == {"x-final": "yes", "content-length": "2"}
        assert await read_body(response) == b"ok"


async def test_marks_for_an_ip_literal(serve: StartServer, resolver: PolicyResolver) -> None:
    server = await serve(reply(OK, close=False))
    marks = new_marks()

    async with contextlib.aclosing(await fetch(server.url(), resolver, marks=marks)):
        pass

    assert marks.conn_start <= marks.conn_end <= marks.sent
    assert (marks.dns_start, marks.dns_end, marks.tls_start) == (None, None, None)


async def test_marks_for_a_name(serve: StartServer, resolver: PolicyResolver) -> None:
    server = await serve(reply(OK, close=False))
    marks = new_marks()

    async with contextlib.aclosing(
        await fetch(server.url(host="localhost"), resolver, marks=marks)
    ) as response:
        assert await read_body(response) == b"ok"

    assert marks.conn_start <= marks.dns_start <= marks.dns_end <= marks.conn_end <= marks.sent
    assert marks.tls_start is None


# --- failures ----------------------------------------------------------------------------


async def close_at_once(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.close()


@pytest.mark.parametrize(
    "script",
    [
        close_at_once,
        reply(b"HTTP/1.1 200 OK\r\nContent-Le", close=True),
        reply(b"\r\n", close=True),
    ],
    ids=["nothing", "half-a-head", "blank-line"],
)
async def test_a_server_that_closes_before_the_head_is_disconnected(
    script: Script, serve: StartServer, resolver: PolicyResolver
) -> None:
    server = await serve(script)
    marks = new_marks()

    with pytest.raises(http1.ServerDisconnected):
        await fetch(server.url(), resolver, marks=marks)
    assert marks.sent is not None  # it failed after sending, not before


@pytest.mark.parametrize(
    "answer",
    [
        b"garbage\r\n\r\n",
        b"SSH-2.0-OpenSSH_9.6\r\n",
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nx",
        b"HTTP/1.1 200 OK\r\nContent-Length: many\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Bare: a\nb\r\n\r\n",
    ],
    ids=[
        "garbage",
        "another-protocol",
        "bad-status",
        "two-lengths",
        "bad-length",
        "length-and-chunked",
        "bare-lf-in-header",
    ],
)
async def test_what_is_not_http_is_malformed(
    answer: bytes, serve: StartServer, resolver: PolicyResolver
) -> None:
    server = await serve(reply(answer, close=False))  # no close: the parser alone decides

    with pytest.raises(http1.MalformedResponse):
        await fetch(server.url(), resolver)
    await server.finished.wait()  # and the client closed the connection


@pytest.mark.parametrize(
    ("start", "more"),
    [(b"X-Endless: ", b"x" * 65_536), (b"", b"X-Again: and again\r\n" * 3_000)],
    ids=["one-endless-line", "endless-lines"],
)
async def test_a_head_that_never_ends_is_refused_past_curls_limit(
    start: bytes, more: bytes, serve: StartServer, resolver: PolicyResolver
) -> None:
    """Refused once it passes 300 KiB, as curl refuses it, instead of growing in memory until
    the check's time-out (the guard below only keeps a failure from hanging the suite)."""

    async def endless(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\n" + start)
        while True:  # until the client leaves (ConnectionError, caught by the fixture)
            writer.write(more)
            await writer.drain()

    server = await serve(endless)

    async with asyncio.timeout(60):
        with pytest.raises(http1.MalformedResponse, match="larger than 307200 bytes"):
            await fetch(server.url(), resolver)
        await server.finished.wait()


async def test_a_body_shorter_than_its_length_breaks_after_what_arrived(
    serve: StartServer, resolver: PolicyResolver
) -> None:
    server = await serve(
        reply(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789", close=True)
    )
    arrived = bytearray()

    async with contextlib.aclosing(await fetch(server.url(), resolver)) as response:
        assert response.status == 200
        with pytest.raises(http1.BrokenBody):
            await read_body(response, into=arrived)

    assert arrived == b"0123456789"


@pytest.mark.parametrize(
    ("answer", "close", "before"),
    [
        (b"5\r\nhello\r\na\r\n01234", True, b"hello01234"),
        (b"5\r\nhello\r\n", True, b"hello"),
        (b"5\r\nhello\r\n0\r\n", True, b"hello"),
        (b"5\r\nhello\r\nzz\r\n", False, b"hello"),
    ],
    ids=["mid-chunk", "between-chunks", "before-the-last-crlf", "bad-chunk-size"],
)
async def test_a_cut_or_broken_chunked_body_breaks(
    answer: bytes, close: bool, before: bytes, serve: StartServer, resolver: PolicyResolver
) -> None:
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    server = await serve(reply(head + answer, close=close))
    arrived = bytearray()

    async with contextlib.aclosing(await fetch(server.url(), resolver)) as response:
        with pytest.raises(http1.BrokenBody):
            await read_body(response, into=arrived)

    assert arrived == before


async def test_a_closed_port_fails_to_connect(resolver: PolicyResolver) -> None:
    port = free_port()  # nothing listens there
    marks = new_marks()

    with pytest.raises(http1.ConnectFailed) as failed:
        await fetch(URL(f"http://127.0.0.1:{port}/"), resolver, marks=marks)

    assert (failed.value.host, failed.value.port) == ("127.0.0.1", port)
    assert isinstance(failed.value.cause, ConnectionRefusedError)
    assert marks.conn_start is not None
    assert marks.conn_end is None


async def test_a_name_that_does_not_resolve(resolver: PolicyResolver) -> None:
    marks = new_marks()

    with pytest.raises(http1.ResolveFailed) as failed:
        await fetch(URL("http://no-such-host.invalid/"), resolver, marks=marks)

    assert failed.value.host == "no-such-host.invalid"
    assert isinstance(failed.value.cause, OSError)
    assert marks.dns_start is not None
    assert marks.dns_end is None


# --- TLS ---------------------------------------------------------------------------------


def server_tls(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(cert), str(key))
    return context


def trusting(ca: Path) -> ssl.SSLContext:
    """A verifying client context that trusts only `ca`."""
    return ssl.create_default_context(cafile=str(ca))


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_tls_with_a_trusted_certificate(
    host: str, dev_certs: Path, serve: StartServer, resolver: PolicyResolver
) -> None:
    server = await serve(
        reply(OK, close=False), tls=server_tls(dev_certs / "broker.pem", dev_certs / "broker.key")
    )
    marks = new_marks()

    async with contextlib.aclosing(
        await fetch(
            server.url(host=host, scheme="https"),
            resolver,
            tls=trusting(dev_certs / "ca.pem"),
            marks=marks,
        )
    ) as response:
        assert response.ssl_object() is not None
        assert response.status == 200
        assert await read_body(response) == b"ok"

    assert marks.conn_start <= marks.tls_start <= marks.conn_end <= marks.sent


@pytest.mark.parametrize(
    "served",
    [("broker.pem", "broker.key"), ("ca.pem", "ca.key")],
    ids=["signed-by-another-ca", "self-signed"],
)
async def test_tls_with_an_untrusted_certificate_fails(
    served: tuple[str, str], dev_certs: Path, serve: StartServer, resolver: PolicyResolver
) -> None:
    server = await serve(
        reply(OK, close=False), tls=server_tls(dev_certs / served[0], dev_certs / served[1])
    )
    marks = new_marks()

    with pytest.raises(http1.TLSFailed) as failed:
        await fetch(
            server.url(scheme="https"),
            resolver,
            tls=trusting(dev_certs / "rogue" / "ca.pem"),
            marks=marks,
        )

    assert isinstance(failed.value.cause, ssl.SSLCertVerificationError)
    assert failed.value.port == server.port
    assert marks.tls_start is not None
    assert marks.conn_end is None


# --- flow control ------------------------------------------------------------------------


@pytest.mark.parametrize("framing", ["content-length", "until-close"])
async def test_a_fast_server_cannot_fill_the_clients_memory(
    framing: str, serve: StartServer, resolver: PolicyResolver
) -> None:
    body = bytes(range(256)) * (16 * MIB // 256)
    length = f"Content-Length: {len(body)}\r\n" if framing == "content-length" else ""
    head = f"HTTP/1.1 200 OK\r\n{length}\r\n".encode()
    server = await serve(reply(head + body, close=True))  # one write, then await drain()

    async with contextlib.aclosing(await fetch(server.url(), resolver)) as response:
        # The client reads nothing more. Wait until the server is blocked: bytes wait in its
        # write buffer and the amount stays put between two polls.
        sizes = [-1]

        def server_is_blocked() -> bool:
            size = server.writers[0].transport.get_write_buffer_size()
            steady = size > 0 and size == sizes[-1]
            sizes.append(size)
            return steady

        # wait_for sleeps between polls: in a worker thread, so the loop keeps running the
        # server and the client's protocol; the condition only reads a buffer size.
        await asyncio.to_thread(wait_for, server_is_blocked, "the server to block", 60)

        # A private read: how much body the exchange holds for the caller is what is bounded.
        # Reading pauses once it passes HIGH_WATER, which may be in the middle of one read.
        buffered = response._exchange._buffered
        assert http1.HIGH_WATER < buffered <= 2 * http1.HIGH_WATER

        assert await read_body(response) == body


# --- closing -----------------------------------------------------------------------------


async def test_close_closes_the_servers_side_quietly(
    serve: StartServer, resolver: PolicyResolver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    loop = asyncio.get_running_loop()
    loop_errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: loop_errors.append(context))
    # Part of a long body, then the server waits for the client to close.
    server = await serve(
        reply(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\npart", close=False)
    )
    response = await fetch(server.url(), resolver)
    # A private spy on the exchange's protocol: the transport calls connection_lost on it.
    exchange = response._exchange
    lost: list[BaseException | None] = []
    original = exchange.connection_lost

    def connection_lost(exc: Exception | None) -> None:
        try:
            original(exc)
        except BaseException as raised:
            lost.append(raised)
            raise
        lost.append(None)

    exchange.connection_lost = connection_lost  # type: ignore[method-assign]
    caplog.clear()

    response.close()
    await server.finished.wait()  # the server read EOF
    await asyncio.to_thread(wait_for, lambda: lost, "connection_lost", 30)

    loop.set_exception_handler(None)

    assert lost == [None]
    assert bytes(server.received).endswith(b"\r\n\r\n")  # the request, then EOF: nothing more
    assert loop_errors == []
    assert [record for record in caplog.records if record.levelno >= logging.WARNING] == []


async def test_the_answer_to_head_is_its_head_whatever_its_length_says(
    serve: StartServer, resolver: PolicyResolver
) -> None:
    # A HEAD answer carries the length of the body a GET would get, and no body; the server
    # keeps the connection open, so only knowing it was HEAD ends the read.
    server = await serve(reply(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n", close=False))

    async with contextlib.aclosing(await fetch(server.url(), resolver, method="HEAD")) as response:
        assert response.status == 200
        assert await read_body(response) == b""


async def test_a_read_after_close_fails_instead_of_waiting(
    serve: StartServer, resolver: PolicyResolver
) -> None:
    server = await serve(reply(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123", close=False))
    response = await fetch(server.url(), resolver)
    pending = asyncio.ensure_future(read_body(response))
    await asyncio.sleep(0)  # the read is now waiting for the rest of the body

    response.close()

    with pytest.raises(http1.BrokenBody):
        await pending
    with pytest.raises(http1.BrokenBody):
        await response.readany()


# --- memory ------------------------------------------------------------------------------


async def test_a_finished_exchange_is_freed_without_the_garbage_collector(
    serve: StartServer, resolver: PolicyResolver
) -> None:
    # A checker makes thousands of exchanges a second and runs the collector's full pass once an
    # hour (scheduler.CollectorPolicy): an exchange kept alive by a reference cycle until then
    # is memory that grows for an hour. Reads the private protocol: the cycle is inside it.
    server = await serve(reply(OK, close=False))
    gc.disable()
    try:
        response = await fetch(server.url(), resolver)
        async with contextlib.aclosing(response):
            assert await read_body(response) == b"ok"
        protocol = weakref.ref(response._exchange)
        del response
        for _ in range(100):  # the loop tells the protocol its connection is lost, soon
            if protocol() is None:
                break
            await asyncio.sleep(0.01)
        assert protocol() is None, "the exchange is held by a reference cycle"
    finally:
        gc.enable()
