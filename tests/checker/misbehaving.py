"""A raw HTTP server that answers each path with the exact bytes a test gives it, however wrong.

It runs its own event loop in a thread, so one server outlives the tests' loops (a module
fixture), and listens on 127.0.0.1 (http and https) and on ::1 (http):

    with MisbehavingServer(routes, tls=context) as server:
        server.http, server.https, server.http6      # the ports

`routes` maps a request path (as sent, without the query) to a `Reply`: bytes written as they
are once `{origin}` (scheme://Host of the request) and `{authority}` (its Host) are filled in,
then what the server does with the connection:

- `KEEP`: reads the next request on it (a well-framed response, as a real server does),
  unless the request said `Connection: close`;
- `CLOSE`: closes it (a body ended by close, or a cut one);
- `HOLD`: leaves it open and silent until the client closes it (a body that never ends).

A path not in `routes` is tried against the built-in ones:

- `/land/...` (and `//land/...`): 200 with the body `landed METHOD TARGET on HOST (N bytes
  sent)`: TARGET the request target exactly as the client sent it, HOST its Host header, N the
  request body's length; where a redirect arrived, with which method and body;
- `/chain/N`: 302 to `/chain/N-1`, and `/chain/0` to `/land/chain`;
- `/loop/a`, `/loop/b`: 302 to each other;
- anything else: 404.

The built-in routes answer HEAD without a body.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ssl
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType

MAX_HEAD = 65_536


class Then(enum.Enum):
    KEEP = "keep"
    CLOSE = "close"
    HOLD = "hold"


KEEP, CLOSE, HOLD = Then.KEEP, Then.CLOSE, Then.HOLD


@dataclass(frozen=True)
class Reply:
    data: bytes
    then: Then = KEEP


@dataclass(frozen=True)
class Request:
    method: str
    target: str
    path: str
    host: str
    scheme: str
    body: bytes
    close: bool = False  # the client sent `Connection: close`


def response(
    status: str, body: bytes = b"", *, headers: tuple[str, ...] = (), version: str = "1.1"
) -> bytes:
    """A well-framed response: the status line, `headers`, Content-Length and the body."""
    head = [f"HTTP/{version} {status}", *headers, f"Content-Length: {len(body)}"]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def redirect(code: int, location: str) -> bytes:
    return response(f"{code} Moved", headers=(f"Location: {location}",))


def builtin(request: Request) -> Reply:
    """The built-in routes' answer, without its body for HEAD (these behave)."""
    data = _builtin(request)
    if request.method == "HEAD":
        data = data[: data.index(b"\r\n\r\n") + 4]
    return Reply(data)


def _builtin(request: Request) -> bytes:
    path = request.path
    if path.startswith(("/land/", "//land/")):
        text = (
            f"landed {request.method} {request.target} on {request.host}"
            f" ({len(request.body)} bytes sent)\n"
        )
        return response("200 OK", text.encode(), headers=("Content-Type: text/plain",))
    if path.startswith("/chain/") and path[7:].isdigit():
        left = int(path[7:])
        return redirect(302, f"/chain/{left - 1}" if left else "/land/chain")
    if path in ("/loop/a", "/loop/b"):
        return redirect(302, "/loop/b" if path == "/loop/a" else "/loop/a")
    return response("404 Not Found", b"no such route\n")


class MisbehavingServer:
    """The server, in a thread of its own with its own event loop."""

    def __init__(self, routes: Mapping[str, Reply], *, tls: ssl.SSLContext) -> None:
        self._routes = routes
        self._tls = tls
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="misbehaving")
        self._servers: list[asyncio.Server] = []
        self._handlers: set[asyncio.Task[None]] = set()
        self.http = self.https = self.http6 = 0

    def __enter__(self) -> MisbehavingServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=30)
        return self

    def __exit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None
    ) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop.close()

    async def _start(self) -> None:
        async def listen(host: str, tls: ssl.SSLContext | None) -> int:
            scheme = "https" if tls is not None else "http"

            async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                await self._serve(scheme, reader, writer)

            server = await asyncio.start_server(handle, host, 0, ssl=tls, limit=MAX_HEAD)
            self._servers.append(server)
            return int(server.sockets[0].getsockname()[1])

        self.http = await listen("127.0.0.1", None)
        self.https = await listen("127.0.0.1", self._tls)
        self.http6 = await listen("::1", None)

    async def _stop(self) -> None:
        for server in self._servers:
            server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()

    async def _serve(
        self, scheme: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            while True:
                request = await _read_request(scheme, reader)
                if request is None:
                    return
                reply = self._routes.get(request.path) or builtin(request)
                origin = f"{scheme}://{request.host}".encode()
                data = reply.data.replace(b"{origin}", origin)
                data = data.replace(b"{authority}", request.host.encode())
                writer.write(data)
                await writer.drain()
                # As real servers do: a client that asked to close gets the close at once (the
                # fresh engine always asks; its TLS shutdown then never waits on this thread).
                if reply.then is CLOSE or (reply.then is KEEP and request.close):
                    return
                if reply.then is HOLD:
                    while await reader.read(65_536):
                        pass
                    return
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except asyncio.CancelledError:
            pass  # the server stops; ending quietly keeps asyncio from logging it
        except ssl.SSLError:
            pass  # a client that refused the certificate, or spoke no TLS
        finally:
            self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


async def _read_request(scheme: str, reader: asyncio.StreamReader) -> Request | None:
    """The next request on the connection; None when the client closed it."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, target, _version = lines[0].split(" ", 2)
    host = ""
    length = 0
    close = False
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "host":
            host = value.strip()
        elif name == "content-length":
            length = int(value)
        elif name == "connection":
            close = value.strip().lower() == "close"
    body = await reader.readexactly(length) if length else b""
    return Request(method, target, target.split("?", 1)[0], host, scheme, body, close)
