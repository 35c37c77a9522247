"""`create_app(service, settings)`: the checker's HTTP API as an aiohttp application.

The daemon builds the task service, passes it here and serves the app on API_HOST:API_PORT
with `periodic_checker.api.server.ApiRunner`. Middlewares wrap every route, outermost first:
errors become JSON (an unexpected one is logged and becomes a 500); the Host header must name
this API (API_ALLOWED_HOSTS), so a web page that rebinds its own DNS name to 127.0.0.1 gets
nothing; a bearer token guards every change when API_TOKEN is set; and every change must say
`Content-Type: application/json`, which a cross-site form cannot send without the browser
asking first (a CORS preflight this API never grants).
"""

from __future__ import annotations

import asyncio
import hmac
import logging

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from prometheus_client import Counter

from checker_common import __version__
from periodic_checker.api.errors import ApiError, from_http_exception, internal_error
from periodic_checker.api.models import MAX_BODY_BYTES
from periodic_checker.api.openapi import build_openapi
from periodic_checker.api.routes import BODY_TIMEOUT, OPENAPI, ROUTES, SERVICE
from periodic_checker.api.server import BODY_READ_TIMEOUT
from periodic_checker.settings import CheckerSettings, host_header_host
from periodic_checker.task_service import TaskService

log = logging.getLogger(__name__)

READ_ONLY = frozenset({"GET", "HEAD", "OPTIONS"})
JSON = "application/json"
# Labelled by the route's pattern (/tasks/{id}), never the raw path, to keep the series few.
REQUESTS = Counter(
    "periodic_checker_api_requests",
    "HTTP API requests answered, by method, route pattern and status",
    ["method", "route", "status"],
)


def create_app(
    service: TaskService, settings: CheckerSettings, *, body_timeout: float = BODY_READ_TIMEOUT
) -> web.Application:
    """The API over `service`; `settings.api_token` (if set) guards the mutating routes and
    `settings.allowed_hosts()` lists the Host header values it answers. A request body must
    arrive within `body_timeout` seconds."""
    token = settings.api_token.get_secret_value() if settings.api_token else None
    middlewares: list[Middleware] = [count_requests, errors_as_json]
    allowed = settings.allowed_hosts()
    if allowed is not None:
        middlewares.append(host_guard(allowed))
    if token:
        middlewares.append(bearer_guard(token))
    middlewares.append(changes_are_json)
    # client_max_size bounds bodies read without a Content-Length (chunked) too.
    app = web.Application(middlewares=middlewares, client_max_size=MAX_BODY_BYTES)
    app[SERVICE] = service
    app[OPENAPI] = orjson.dumps(build_openapi(__version__))
    app[BODY_TIMEOUT] = body_timeout
    app.add_routes(ROUTES)
    return app


@web.middleware
async def count_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:  # redirects pass through as exceptions
        status = exc.status
        raise
    finally:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        REQUESTS.labels(request.method, route, str(status)).inc()


@web.middleware
async def errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response = await handler(request)
    except ApiError as exc:
        response = exc.response()
    except web.HTTPException as exc:
        if exc.status < 400:  # redirects are answers, not errors
            raise
        response = from_http_exception(exc).response()
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unexpected error on %s %s", request.method, request.path)
        response = internal_error().response()
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    if response.status == 408:  # the rest of the body may still come: no next request
        response.force_close()
    return response


def host_guard(allowed: frozenset[str]) -> Middleware:
    """421 unless the Host header names this API (a rebound DNS name does not)."""
    shown = ", ".join(sorted(allowed))

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        given = request.headers.get("Host")
        if given is None or host_header_host(given) not in allowed:
            raise ApiError(
                421,
                "host_not_allowed",
                f"the Host header {given[:100] if given is not None else '(none)'!r} is not"
                f" one this API answers to ({shown}; see API_ALLOWED_HOSTS)",
            )
        return await handler(request)

    return guard


@web.middleware
async def changes_are_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    """415 for a change without `Content-Type: application/json` (even one with no body)."""
    unrouted = request.match_info.http_exception is not None
    if request.method in READ_ONLY or unrouted or request.content_type == JSON:
        return await handler(request)
    given = request.headers.get("Content-Type")
    raise ApiError(
        415,
        "unsupported_media_type",
        f"Content-Type must be application/json, not {given[:100] if given else 'none'}"
        " (every change sends it, with {} or no body where there is nothing to send)",
    )


def bearer_guard(token: str) -> Middleware:
    expected = token.encode()

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        unrouted = request.match_info.http_exception is not None
        if request.method in READ_ONLY or unrouted:
            return await handler(request)
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise ApiError(
                401,
                "unauthorized",
                "this route needs Authorization: Bearer <API_TOKEN>",
                headers={"WWW-Authenticate": 'Bearer realm="periodic-checker"'},
            )
        # compare_digest: the time taken must not tell how much of a guess was right.
        if not hmac.compare_digest(given.strip().encode("utf-8", "replace"), expected):
            raise ApiError(
                401,
                "unauthorized",
                "the bearer token is not API_TOKEN",
                headers={
                    "WWW-Authenticate": 'Bearer realm="periodic-checker", error="invalid_token"'
                },
            )
        return await handler(request)

    return guard
