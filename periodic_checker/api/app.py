"""`create_app(service, settings)`: the checker's HTTP API as an aiohttp application.

The daemon builds the task service, passes it here and serves the app on API_HOST:API_PORT.
Two middlewares wrap every route: errors become JSON (an unexpected one is logged and becomes
a 500), and a bearer token guards every route that changes something when API_TOKEN is set.
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
from periodic_checker.api.routes import OPENAPI, ROUTES, SERVICE
from periodic_checker.service import TaskService
from periodic_checker.settings import CheckerSettings

log = logging.getLogger(__name__)

READ_ONLY = frozenset({"GET", "HEAD", "OPTIONS"})
# Labelled by the route's pattern (/tasks/{id}), never the raw path, to keep the series few.
REQUESTS = Counter(
    "periodic_checker_api_requests",
    "HTTP API requests answered, by method, route pattern and status",
    ["method", "route", "status"],
)


def create_app(service: TaskService, settings: CheckerSettings) -> web.Application:
    """The API over `service`; `settings.api_token` (if set) guards the mutating routes."""
    token = settings.api_token.get_secret_value() if settings.api_token else None
    middlewares: list[Middleware] = [count_requests, errors_as_json]
    if token:
        middlewares.append(bearer_guard(token))
    # client_max_size bounds bodies read without a Content-Length (chunked) too.
    app = web.Application(middlewares=middlewares, client_max_size=MAX_BODY_BYTES)
    app[SERVICE] = service
    app[OPENAPI] = orjson.dumps(build_openapi(__version__))
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
    return response


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
