"""One HTTP/1.1 request on a new connection: the exchange a fresh check makes, and nothing more.

No pooling, cookies, proxies or redirects (the probe follows redirects itself, hop by hop).
The response head is parsed by httptools (llhttp, Node.js's parser, as uvicorn uses it); the
sockets, the TLS layer and flow control are the event loop's; what is left here is plumbing:
write one request, hand the body over in the chunks it arrives in, and say precisely what went
wrong. Responses are read as the keep-alive engine (aiohttp) reads them, with the same
leniencies and header text, and a head is held to curl's limits; where the two engines and curl
still differ is in docs/api.md ("Where the probe differs from curl").

Why not aiohttp's session for this: a bare loop of new-connection requests through it costs
0.18 ms of CPU per request on this machine, through this exchange 0.09 ms, both on uvloop
(`bench/probe_engine.py`, its two bare contenders). On a checker doing a thousand checks a
second that is a tenth of a core. Keep-alive checks still go through aiohttp, which pools
connections.

The caller's `Marks` gets a clock reading at each phase: `conn_start` (before anything),
`dns_start`/`dns_end` (host names only), `tls_start` (https), `conn_end` (ready to send) and
`sent` (request written).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import ipaddress
import re
import socket
import ssl
import time
from collections.abc import Mapping
from typing import Any, Final, Protocol, cast

import aiohappyeyeballs
import httptools
from aiohttp.abc import AbstractResolver
from yarl import URL

# Reading is paused while this much body is waiting for the caller (a fast server cannot fill
# memory) and resumed below the low mark.
HIGH_WATER: Final = 256 * 1024
LOW_WATER: Final = 64 * 1024
HAPPY_EYEBALLS_DELAY: Final = 0.25
# curl's limits on a response head: one header line at most 100 KiB, the whole head (status
# lines and headers of every interim response too) at most 300 KiB. A head that goes on and on
# costs at most this much memory.
MAX_HEADER_LINE: Final = 100 * 1024
MAX_HEAD: Final = 300 * 1024
BODY_METHODS: Final = frozenset({"POST", "PUT", "PATCH"})


class Marks(Protocol):
    """Where the phases' clock readings go (the probe's per-check record)."""

    conn_start: float | None
    dns_start: float | None
    dns_end: float | None
    tls_start: float | None
    conn_end: float | None
    sent: float | None


class ExchangeError(Exception):
    """An HTTP exchange failed; subclasses say at which stage."""


class ResolveFailed(ExchangeError):
    """The host name did not resolve (or resolved only to denied addresses)."""

    def __init__(self, host: str, cause: BaseException) -> None:
        super().__init__(f"cannot resolve {host}: {cause}")
        self.host = host
        self.cause = cause


class ConnectFailed(ExchangeError):
    """No TCP connection to any address of the host."""

    def __init__(self, host: str, port: int, cause: OSError) -> None:
        super().__init__(f"cannot connect to {host}:{port}: {cause}")
        self.host = host
        self.port = port
        self.cause = cause


class TLSFailed(ExchangeError):
    """The TLS handshake failed (`cause` is an ssl.SSLError for a refused certificate)."""

    def __init__(self, host: str, port: int, cause: BaseException) -> None:
        super().__init__(f"TLS with {host}:{port} failed: {cause}")
        self.host = host
        self.port = port
        self.cause = cause


class ServerDisconnected(ExchangeError):
    """The connection closed before a response head arrived."""


class MalformedResponse(ExchangeError):
    """What the server sent is not HTTP/1.x."""


class BrokenBody(ExchangeError):
    """The connection closed (or the framing broke) before the body's end."""


def request_head(
    method: str,
    url: URL,
    headers: Mapping[str, str],
    body: bytes | None,
    defaults: Mapping[str, str],
) -> bytes:
    """The request line and headers, ending in the blank line.

    `defaults` apply unless `headers` names them (case-insensitively); `Host` comes from the
    URL unless given; credentials in the URL become basic auth unless Authorization is given;
    the connection is always closed after the response.
    """
    merged: dict[str, tuple[str, str]] = {}
    for name, value in defaults.items():
        merged[name.lower()] = (name, value)
    for name, value in headers.items():
        merged[name.lower()] = (name, value)
    if "host" not in merged:
        merged["host"] = ("Host", url.host_port_subcomponent or "")
    if "authorization" not in merged:
        authorization = basic_authorization(url)
        if authorization is not None:
            merged["authorization"] = ("Authorization", authorization)
    if body is not None or method in BODY_METHODS:
        merged["content-length"] = ("Content-Length", str(len(body or b"")))
    merged.pop("transfer-encoding", None)
    merged["connection"] = ("Connection", "close")
    lines = [f"{method} {url.raw_path_qs or '/'} HTTP/1.1"]
    lines.extend(f"{name}: {value}" for name, value in merged.values())
    lines.append("\r\n")
    return "\r\n".join(lines).encode("utf-8")


def basic_authorization(url: URL) -> str | None:
    """`Basic ...` for the URL's user info (percent-decoded, UTF-8), None without user info."""
    if url.raw_user is None:
        return None
    credentials = f"{url.user or ''}:{url.password or ''}"
    return "Basic " + base64.b64encode(credentials.encode()).decode("ascii")


def content_charset(content_type: str) -> str | None:
    """The `charset` parameter of a Content-Type value, unquoted; None when absent.

    Parameters are read as RFC 9110 writes them: a quoted value may hold `;` and `=` (a
    multipart boundary often does) and backslash escapes."""
    for match in _PARAMETER.finditer(content_type):
        name, quoted, token = match.groups()
        if name.lower() != "charset" or (quoted is None and token is None):
            continue
        if quoted is not None:
            value = _QUOTED_PAIR.sub(r"\1", quoted)
        else:
            value = token.strip().strip("'").strip()
        return value or None
    return None


# `; name` or `; name=value`, value a quoted string (its closing quote may be missing) or
# anything up to the next `;`.
_PARAMETER: Final = re.compile(r';\s*([^\s;=]+)\s*(?:=\s*(?:"((?:[^"\\]|\\.)*)"?|([^;]*)))?')
_QUOTED_PAIR: Final = re.compile(r"\\(.)")


class Response:
    """A response whose head has arrived; the body is read with `readany()`."""

    __slots__ = ("_exchange", "_transport", "headers", "status")

    def __init__(self, exchange: _Exchange, transport: asyncio.Transport) -> None:
        self._exchange = exchange
        self._transport = transport
        self.status = exchange.status
        # Lower-case names; the first value of a repeated header (Content-Encoding: all, in
        # order, joined with ", "); values decoded from UTF-8, other bytes as surrogates.
        self.headers: dict[str, str] = exchange.headers

    async def readany(self) -> bytes:
        """The next piece of the (still encoded) body, b"" at its end."""
        return await self._exchange.readany()

    @property
    def charset(self) -> str | None:
        return content_charset(self.headers.get("content-type", ""))

    @property
    def content_encoding(self) -> str:
        return self.headers.get("content-encoding", "")

    def ssl_object(self) -> ssl.SSLObject | None:
        found = self._transport.get_extra_info("ssl_object")
        return found if isinstance(found, ssl.SSLObject) else None

    def close(self) -> None:
        self._exchange.abandon()
        self._transport.close()

    async def aclose(self) -> None:
        self.close()


class _Exchange(asyncio.Protocol):
    """Parses one response as it arrives; the caller awaits the head, then the body."""

    def __init__(self, loop: asyncio.AbstractEventLoop, *, head_request: bool = False) -> None:
        self._loop = loop
        # httptools cannot be told a response answers HEAD: its head is the whole message.
        self._head_request = head_request
        self._parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)
        # What aiohttp (the keep-alive engine) and curl accept of a response too: obsolete line
        # folding (unfolded to a space, as RFC 9112 5.2 asks of a user agent) and other header
        # bytes llhttp calls invalid, a bare LF ending a line, spaces after a chunk size. Lax
        # reading is a request-smuggling risk only where a connection carries more than one
        # message; this one carries one request and is then closed.
        self._parser.set_dangerous_leniencies(
            lenient_headers=True,
            lenient_optional_cr_before_lf=True,
            lenient_spaces_after_chunk_size=True,
        )
        self._head_read = 0  # bytes read before the head was complete, interim heads included
        self._head_size = 0  # bytes of its header lines
        self._transport: asyncio.Transport | None = None
        self._head: asyncio.Future[None] = loop.create_future()
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._complete = False
        self._error: ExchangeError | None = None
        self.closed = False
        self.status = 0
        self.headers: dict[str, str] = {}

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if self._complete or self._error is not None or parser is None:
            return
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._complete = True  # 101: nothing more of HTTP to read
            self._wake()
        except httptools.HttpParserError as exc:
            if self._complete:
                return  # bytes after the end of the response (a Content-Length too short)
            if isinstance(exc.__context__, ExchangeError):  # raised by a callback below
                self._fail(exc.__context__)
                return
            reason = " ".join(str(exc).split()) or type(exc).__name__
            if self._head.done():
                self._fail(BrokenBody(reason))
            else:
                self._fail(MalformedResponse(reason))
            return
        if not self._head.done() and self._error is None:
            # Everything read so far is head: this bounds a header line that never ends,
            # which the parser holds until it ends.
            self._head_read += len(data)
            if self._head_read > MAX_HEAD:
                self._fail(MalformedResponse(f"response head larger than {MAX_HEAD} bytes"))

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost decides what the EOF means

    def connection_lost(self, exc: Exception | None) -> None:
        # Nothing more arrives: the parser goes, and with it the cycle it makes with this
        # protocol (it calls back into it). Reference counting frees the exchange then; a
        # cycle would wait for a full pass of the collector, which runs once an hour at
        # 100,000 tasks (`scheduler.CollectorPolicy`): hundreds of MB of exchanges by then.
        self._parser = None
        if self._complete or self._error is not None:
            self._wake()
            return
        if not self._head.done():
            self._fail(ServerDisconnected("server closed the connection early"))
        elif self._delimited_by_close():
            self._complete = True
            self._wake()
        else:
            self._fail(BrokenBody("connection closed before the end of the body"))

    # -- httptools callbacks -------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._head.done():  # later ones are trailers
            # Raised here, the parser stops and data_received() fails the exchange with it.
            line = len(name) + len(value) + 4
            if line > MAX_HEADER_LINE:
                raise MalformedResponse(f"a header line of more than {MAX_HEADER_LINE} bytes")
            self._head_size += line
            if self._head_size > MAX_HEAD:
                raise MalformedResponse(f"response head larger than {MAX_HEAD} bytes")
            if b"\0" in value:  # lenient reading lets it through; aiohttp and curl refuse it
                raise MalformedResponse("NUL in a header value")
            value = value.rstrip(b" \t")  # the parser strips the space before a value only
            key = name.decode("latin-1").lower()
            # As aiohttp reads them, so both engines see the same text: UTF-8 (a Location
            # with a non-ASCII path or host is UTF-8 on the wire), and a byte that is not
            # UTF-8 kept as a surrogate, to be percent-encoded as itself (urls.py).
            text = value.decode("utf-8", "surrogateescape")
            if key not in self.headers:
                self.headers[key] = text
            elif key == "content-encoding":  # a list: every line counts, in order
                self.headers[key] += ", " + text

    def on_headers_complete(self) -> None:
        assert self._parser is not None  # called by the parser itself
        status = self._parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self.headers = {}  # an interim response: the real head follows
            return
        self.status = status
        if self._head_request:
            self._complete = True
        if not self._head.done():
            self._head.set_result(None)

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER and not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._head.done():
            self._complete = True
            self._wake()

    # -- the caller's side ---------------------------------------------------------------------

    async def head(self) -> None:
        await self._head

    async def readany(self) -> bytes:
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._complete:
                return b""
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data = self._chunks.popleft()
        self._buffered -= len(data)
        if self._paused and self._buffered < LOW_WATER and self._transport is not None:
            self._paused = False
            self._transport.resume_reading()
        return data

    def _delimited_by_close(self) -> bool:
        """True when the body ends with the connection (no length, not chunked)."""
        if "content-length" in self.headers:
            return False
        return "chunked" not in self.headers.get("transfer-encoding", "").lower()

    def abandon(self) -> None:
        """The caller is done with the response: a pending or later read ends at once."""
        if not self._complete and self._error is None:
            self._error = BrokenBody("the response was closed before its end")
        self.closed = True
        self._wake()

    def _fail(self, error: ExchangeError) -> None:
        if self.closed:
            return  # the caller is gone: nobody would read it
        self._error = error
        if not self._head.done():
            self._head.set_exception(error)
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


def _address_infos(host: str, port: int) -> list[Any] | None:
    """addrinfo tuples for an IP literal; None for a name (it needs DNS)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if address.version == 6:
        return [(socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (host, port, 0, 0))]
    return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (host, port))]


async def _resolve(resolver: AbstractResolver, host: str, port: int) -> list[Any]:
    found = await resolver.resolve(host, port, family=socket.AF_UNSPEC)
    infos: list[Any] = []
    for entry in found:
        family = entry["family"]
        address = (
            (entry["host"], entry["port"], 0, 0)
            if family == socket.AF_INET6
            else (entry["host"], entry["port"])
        )
        infos.append((family, socket.SOCK_STREAM, entry["proto"], "", address))
    return infos


async def exchange(
    method: str,
    url: URL,
    head: bytes,
    body: bytes | None,
    *,
    tls: ssl.SSLContext | None,
    resolver: AbstractResolver,
    marks: Marks,
) -> Response:
    """Connect to `url`'s host, send `head` (+ `body`) and return once the response head is in.

    Raises an `ExchangeError` subclass for every failure it knows. The caller must `close()`
    the response. `head` comes from `request_head()`.
    """
    loop = asyncio.get_running_loop()
    head_request = method == "HEAD"
    host = url.raw_host or ""
    port = url.port or (443 if tls is not None else 80)
    marks.conn_start = time.monotonic()
    infos = _address_infos(host, port)
    if infos is None:
        marks.dns_start = marks.conn_start
        try:
            infos = await _resolve(resolver, host, port)
        except OSError as exc:
            raise ResolveFailed(host, exc) from exc
        marks.dns_end = time.monotonic()
    try:
        sock = await aiohappyeyeballs.start_connection(
            infos, happy_eyeballs_delay=HAPPY_EYEBALLS_DELAY, interleave=1, loop=loop
        )
    except OSError as exc:
        raise ConnectFailed(host, port, exc) from exc
    # From here the loop owns the socket: create_connection closes it if it fails.
    try:
        if tls is None:
            transport, protocol = await loop.create_connection(
                lambda: _Exchange(loop, head_request=head_request), sock=sock
            )
        else:
            marks.tls_start = time.monotonic()
            try:
                transport, protocol = await loop.create_connection(
                    lambda: _Exchange(loop, head_request=head_request),
                    sock=sock,
                    ssl=tls,
                    server_hostname=host.rstrip("."),
                    ssl_handshake_timeout=None,
                )
            except (ssl.SSLError, OSError) as exc:
                raise TLSFailed(host, port, exc) from exc
    except ExchangeError:
        raise
    except OSError as exc:
        raise ConnectFailed(host, port, exc) from exc
    marks.conn_end = time.monotonic()
    response_ready = False
    try:
        transport.write(head + body if body else head)
        marks.sent = time.monotonic()
        await protocol.head()
        response_ready = True
        return Response(protocol, transport)
    finally:
        if not response_ready:
            protocol.abandon()
            transport.close()
