"""Targets for probe tests and benchmarks: a real aiohttp app with normal and hostile routes,
and raw socket servers for what an HTTP server cannot fake (silence, stalled TLS).

    async with serve(make_app()) as base:            # base = URL("http://127.0.0.1:PORT")
        result = await prober.check(task_id, TaskSpec(name="x", url=str(base / "ok")))

Routes (GET and HEAD unless noted):
    /ok                      200, small HTML page containing "hello periodic checker"
    /status/{code}           that status, short text body
    /redirect/{n}            a chain of n 302 redirects ending at /ok
    /loop/a, /loop/b         302 to each other forever
    /to?url=U&code=302       a redirect to any URL U (for redirects into denied networks);
                             also POST
    /slow?delay=S            waits S seconds before the headers
    /trickle?interval=S&count=N   headers at once, then one byte every S seconds
    /gzip-bomb?mb=N          N MiB of zeros, gzip-encoded (about 1 KiB on the wire per MiB)
    /gzip, /deflate, /deflate-raw   a small compressed page containing "hello periodic checker"
    /encoded?codings=C1,C2&lines=1&members=2
                             the page encoded with C1, then C2 (gzip, deflate, br, zstd; any
                             other name is sent as it is, the page not encoded), declared as
                             `Content-Encoding: C1, C2`, or one header line each with lines=1;
                             members=2: gzip and zstd in two members (frames), cut in the
                             middle of the page: "checker</h1>" only in the second
    /bomb?codings=C1,C2&mb=N N MiB of zeros encoded with C1, then C2
    /empty-gzip-members      gzip members of nothing, without end (until the client leaves)
    /charset/{codec}         "café Привет" encoded with codec (latin-1 keeps only "café"),
                             declared in Content-Type
    /bytes?size=N&tail=T     N bytes of "a", then T (default none)
    /ab?size=N               N bytes of a and b (random, the same every time): the body on
                             which HOSTILE_PATTERN makes RE2 work hardest
    /empty                   200 with an empty body
    /no-content              204
    /echo                    JSON of the request (method, headers, body); also POST

Every request is recorded in `app[SEEN]` (path, method, client address, headers), so a test
can tell new connections from reused ones and see which headers reached which hop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gzip
import json
import random
import ssl
import sys
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import brotli
import re2
from aiohttp import web
from aiohttp.typedefs import Handler
from yarl import URL

from checker_common.task_spec import MAX_PATTERN_PROGRAM

if sys.version_info >= (3, 14):
    from compression import zstd
else:
    from backports import zstd

SEEN: web.AppKey[list[Seen]] = web.AppKey("seen", list)
PAGE = "<html><body><h1>hello periodic checker</h1></body></html>"
CHARSET_TEXT = "café Привет"


def _hostile_pattern() -> str:
    """`[ab]*a[ab]{N}Z` with the largest N the pattern limit allows. RE2's DFA gives up on it
    over a body of a and b (2**N states), so every byte costs the NFA about N steps: the
    costliest search a task may ask for."""
    n = MAX_PATTERN_PROGRAM
    while re2.compile(f"[ab]*a[ab]{{{n}}}Z").programsize > MAX_PATTERN_PROGRAM:
        n -= 1
    return f"[ab]*a[ab]{{{n}}}Z"


HOSTILE_PATTERN = _hostile_pattern()


@dataclass(frozen=True)
class Seen:
    """One request as the server saw it: who sent it (peer port tells connections apart)."""

    path: str
    method: str
    peer: tuple[str, int]
    headers: dict[str, str]


@web.middleware
async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    request.app[SEEN].append(
        Seen(
            path=request.path_qs,
            method=request.method,
            peer=(peer[0], peer[1]) if peer else ("", 0),
            headers=dict(request.headers),
        )
    )
    return await handler(request)


async def ok(_request: web.Request) -> web.Response:
    return web.Response(text=PAGE, content_type="text/html")


async def status(request: web.Request) -> web.Response:
    code = int(request.match_info["code"])
    return web.Response(status=code, text=f"status {code}")


async def redirect_chain(request: web.Request) -> web.Response:
    hops = int(request.match_info["n"])
    target = "/ok" if hops <= 1 else f"/redirect/{hops - 1}"
    raise web.HTTPFound(target)


async def loop(request: web.Request) -> web.Response:
    other = "b" if request.match_info["side"] == "a" else "a"
    raise web.HTTPFound(f"/loop/{other}")


async def redirect_to(request: web.Request) -> web.Response:
    code = int(request.query.get("code", "302"))
    return web.Response(status=code, headers={"Location": request.query["url"]})


async def slow(request: web.Request) -> web.Response:
    await asyncio.sleep(float(request.query.get("delay", "5")))
    return web.Response(text=PAGE, content_type="text/html")


async def trickle(request: web.Request) -> web.StreamResponse:
    interval = float(request.query.get("interval", "0.5"))
    count = int(request.query.get("count", "100"))
    response = web.StreamResponse(headers={"Content-Type": "text/plain"})
    response.content_length = count
    await response.prepare(request)
    # The client hangs up at its deadline; that is the expected end here, not an error.
    with contextlib.suppress(ConnectionError):
        for _ in range(count):
            await response.write(b".")
            await asyncio.sleep(interval)
        await response.write_eof()
    return response


@functools.lru_cache(maxsize=4)
def gzip_bomb(mebibytes: int) -> bytes:
    """gzip of `mebibytes` MiB of zeros (compressed ~1000:1), built once per size."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = bytes(1 << 20)
    parts = [compressor.compress(block) for _ in range(mebibytes)]
    parts.append(compressor.flush())
    return b"".join(parts)


async def bomb(request: web.Request) -> web.Response:
    body = gzip_bomb(int(request.query.get("mb", "32")))
    return web.Response(
        body=body, headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"}
    )


def _compressed(wbits: int, encoding: str) -> web.Response:
    compressor = zlib.compressobj(6, zlib.DEFLATED, wbits)
    body = compressor.compress(PAGE.encode()) + compressor.flush()
    return web.Response(
        body=body,
        headers={"Content-Encoding": encoding, "Content-Type": "text/html; charset=utf-8"},
    )


async def gzip_page(_request: web.Request) -> web.Response:
    return _compressed(16 + zlib.MAX_WBITS, "gzip")


async def deflate_page(_request: web.Request) -> web.Response:
    return _compressed(zlib.MAX_WBITS, "deflate")


async def raw_deflate_page(_request: web.Request) -> web.Response:
    return _compressed(-zlib.MAX_WBITS, "deflate")


def encoded(data: bytes, coding: str, *, members: int = 1) -> bytes:
    """`data` encoded with one content coding; gzip and zstd in `members` parts."""
    if members > 1 and coding in ("gzip", "zstd"):
        cut = len(data) // 2
        return encoded(data[:cut], coding) + encoded(data[cut:], coding, members=members - 1)
    if coding == "gzip":
        return gzip.compress(data)
    if coding == "deflate":
        return zlib.compress(data)
    if coding == "br":
        return bytes(brotli.compress(data, quality=5))
    if coding == "zstd":
        return zstd.compress(data)
    return data  # a coding nobody knows: sent as it is


def _encoded_response(data: bytes, request: web.Request) -> web.Response:
    codings = request.query["codings"].split(",")
    members = int(request.query.get("members", "1"))
    for coding in codings:
        data = encoded(data, coding, members=members)
    response = web.Response(body=data, headers={"Content-Type": "text/html; charset=utf-8"})
    if request.query.get("lines") == "1":
        for coding in codings:  # one header line each
            response.headers.add("Content-Encoding", coding)
    else:
        response.headers["Content-Encoding"] = ", ".join(codings)
    return response


async def encoded_page(request: web.Request) -> web.Response:
    return _encoded_response(PAGE.encode(), request)


@functools.lru_cache(maxsize=8)
def zeros(mebibytes: int) -> bytes:
    return bytes(mebibytes << 20)


async def encoded_bomb(request: web.Request) -> web.Response:
    return _encoded_response(zeros(int(request.query.get("mb", "64"))), request)


async def empty_gzip_members(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Encoding": "gzip"})
    await response.prepare(request)
    chunk = gzip.compress(b"") * 4096  # 80 KiB on the wire, nothing decoded
    with contextlib.suppress(ConnectionError):  # the client hangs up: the expected end
        while True:
            await response.write(chunk)
    return response


@functools.lru_cache(maxsize=4)
def a_and_b(size: int) -> bytes:
    return bytes(random.Random(size).choices(b"ab", k=size))


async def ab(request: web.Request) -> web.Response:
    return web.Response(body=a_and_b(int(request.query["size"])), content_type="text/plain")


async def charset(request: web.Request) -> web.Response:
    codec = request.match_info["codec"]
    body = CHARSET_TEXT.encode(codec, errors="ignore")
    return web.Response(body=body, headers={"Content-Type": f"text/plain; charset={codec}"})


async def sized(request: web.Request) -> web.Response:
    body = b"a" * int(request.query["size"]) + request.query.get("tail", "").encode()
    return web.Response(body=body, content_type="text/plain")


async def empty(_request: web.Request) -> web.Response:
    return web.Response(body=b"")


async def no_content(_request: web.Request) -> web.Response:
    return web.Response(status=204)


async def echo(request: web.Request) -> web.Response:
    body = await request.text()
    document = {"method": request.method, "headers": dict(request.headers), "body": body}
    return web.Response(text=json.dumps(document), content_type="application/json")


def make_app() -> web.Application:
    app = web.Application(middlewares=[record])
    app[SEEN] = []
    app.router.add_routes(
        [
            web.get("/ok", ok),
            web.get("/status/{code:\\d{3}}", status),
            web.get("/redirect/{n:\\d+}", redirect_chain),
            web.get("/loop/{side:[ab]}", loop),
            web.get("/to", redirect_to),
            web.post("/to", redirect_to),
            web.get("/slow", slow),
            web.get("/trickle", trickle),
            web.get("/gzip-bomb", bomb),
            web.get("/gzip", gzip_page),
            web.get("/deflate", deflate_page),
            web.get("/deflate-raw", raw_deflate_page),
            web.get("/encoded", encoded_page),
            web.get("/bomb", encoded_bomb),
            web.get("/empty-gzip-members", empty_gzip_members),
            web.get("/ab", ab),
            web.get("/charset/{codec}", charset),
            web.get("/bytes", sized),
            web.get("/empty", empty),
            web.get("/no-content", no_content),
            web.get("/echo", echo),
            web.post("/echo", echo),
        ]
    )
    return app


@contextlib.asynccontextmanager
async def serve(
    app: web.Application, *, host: str = "127.0.0.1", ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[URL]:
    """Serve `app` on a free port; yields the base URL. Handlers still running (a trickle)
    are cut off at exit instead of being waited for."""
    runner = web.AppRunner(app, shutdown_timeout=0.1, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, 0, ssl_context=ssl_context)
    await site.start()
    try:
        sockets = runner.addresses
        port = sockets[0][1]
        scheme = "https" if ssl_context is not None else "http"
        yield URL.build(scheme=scheme, host=host, port=port)
    finally:
        await runner.cleanup()


class _Silent(asyncio.Protocol):
    """Accepts a connection and never writes a byte (reads are discarded)."""

    def __init__(self, open_transports: set[asyncio.BaseTransport]) -> None:
        self._open = open_transports
        self._transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._open.add(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self._open.discard(self._transport)


@contextlib.asynccontextmanager
async def silent_server(host: str = "127.0.0.1") -> AsyncIterator[int]:
    """A TCP server that accepts and then says nothing: over http the response never comes,
    over https the TLS handshake never completes. Yields its port."""
    open_transports: set[asyncio.BaseTransport] = set()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Silent(open_transports), host, 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for transport in list(open_transports):
            transport.close()
        await server.wait_closed()
