"""How the API is served: aiohttp's server, with two changes made where aiohttp allows them.

- A request aiohttp's HTTP parser refuses before any route or middleware sees it (a negative
  or repeated Content-Length, a request line or header over 8190 bytes, more than 128
  headers, a malformed chunk, TLS sent to the plain port) is answered `400` in the API's one
  JSON error shape, without echoing the request's bytes, and logged as one line at DEBUG
  instead of a traceback at ERROR. aiohttp renders these in `RequestHandler.handle_error()`;
  `ApiRunner` makes its connections with `ApiRequestHandler`, which overrides it.
- Deadlines: a request head must arrive within `HEAD_TIMEOUT` seconds of the connection (or
  of the previous response, on a kept-alive connection), else the connection is closed
  (aiohttp's keep-alive timer closes a connection still waiting for a whole head); a body
  within `BODY_READ_TIMEOUT` seconds of the handler asking for it, else `408`
  (`routes.read_body`); the connection is then closed once the rest of the body has come or
  `LINGER` seconds have passed (aiohttp reads and drops it meanwhile, so that the client
  reads the answer instead of a reset).
"""

from __future__ import annotations

import logging
from typing import Any, Final

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from periodic_checker.api.models import ErrorBody

log = logging.getLogger(__name__)

HEAD_TIMEOUT: Final = 15.0
BODY_READ_TIMEOUT: Final = 15.0
LINGER: Final = 10.0
MAX_LINE: Final = 8190  # aiohttp's limit for the request line and each header field
MAX_HEADERS: Final = 128  # aiohttp's limit for the number of header fields


class ApiRequestHandler(RequestHandler):
    """aiohttp's connection handler; its error page is the API's JSON error."""

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            # Part of a response went out already: nothing can be said any more.
            raise ConnectionError("response already started; cannot send an error")
        if status >= 500:
            log.error("error handling %s %s", request.method, request.path, exc_info=exc)
            body = ErrorBody(
                error="internal", message="internal error; the checker's log has the details"
            )
        else:
            reason = parser_refusal(exc)
            log.debug("refused a malformed request from %s: %s", request.remote, reason)
            body = ErrorBody(error="bad_request", message=f"malformed HTTP request: {reason}")
        response = web.Response(
            status=status,
            body=body.__pydantic_serializer__.to_json(body),
            content_type="application/json",
            headers={"X-Content-Type-Options": "nosniff"},
        )
        response.force_close()
        return response


def parser_refusal(exc: BaseException | None) -> str:
    """One line for people saying what the parser refused, without the request's bytes."""
    if isinstance(exc, LineTooLong):
        return f"the request line or a header field is longer than {MAX_LINE} bytes"
    if isinstance(exc, HttpProcessingError):
        first = (exc.message or "").splitlines()[0] if exc.message else ""
        first = first.split(": b'")[0].split(": bytearray(")[0].rstrip(" :")
        text = "".join(c for c in first if c.isascii() and c.isprintable())
        if "too many headers" in text.lower():
            return f"more than {MAX_HEADERS} header fields"
        return text[:200] or type(exc).__name__
    return "the request could not be read"


class ApiServer(web.Server):
    """aiohttp's low-level server, making `ApiRequestHandler` connections."""

    def __call__(self) -> RequestHandler:
        return ApiRequestHandler(self, loop=self._loop, **self._kwargs)


class ApiRunner(web.AppRunner):
    """`web.AppRunner` serving with `ApiServer`, `head_timeout` for request heads (and idle
    kept-alive connections) and `linger` for the rest of a body nobody reads."""

    def __init__(
        self,
        app: web.Application,
        *,
        head_timeout: float = HEAD_TIMEOUT,
        linger: float = LINGER,
        **kwargs: Any,
    ) -> None:
        super().__init__(app, keepalive_timeout=head_timeout, lingering_time=linger, **kwargs)

    async def _make_server(self) -> web.Server:
        made = await super()._make_server()
        return ApiServer(
            made.request_handler,
            request_factory=made.request_factory,
            handler_cancellation=made.handler_cancellation,
            loop=made._loop,
            **made._kwargs,
        )
