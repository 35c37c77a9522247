"""The handlers: read and validate the request, call the task service, render the answer.

Every route is listed once in `ROUTES`; `openapi.py` describes the same list.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import TypeVar

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from pydantic import BaseModel, ValidationError

from checker_common.task_spec import TaskSpec
from periodic_checker.api.errors import ApiError, from_service, invalid, validation_error
from periodic_checker.api.models import (
    MAX_BODY_BYTES,
    HealthResponse,
    NoBody,
    RemoveTaskRequest,
    RunResponse,
    StatusAdapter,
    TaskListQuery,
    TaskPageResponse,
    TaskPatch,
    patch_changes,
)
from periodic_checker.task_service import ServiceError, TaskFilter, TaskService
from periodic_checker.tasks import Task, redacted

SERVICE = web.AppKey("service", TaskService)
OPENAPI = web.AppKey("openapi", bytes)
BODY_TIMEOUT = web.AppKey("body_timeout", float)
STATIC = resources.files("periodic_checker.api") / "static"
STATIC_TYPES = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".css": "text/css",
}

M = TypeVar("M", bound=BaseModel)
R = TypeVar("R")


def service_of(request: web.Request) -> TaskService:
    return request.app[SERVICE]


def json_response(body: BaseModel, status: int = 200, **headers: str) -> web.Response:
    return web.Response(
        body=body.__pydantic_serializer__.to_json(body),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def task_response(task: Task, status: int = 200) -> web.Response:
    """A task as every route shows it: secrets masked, token or not (see docs/api.md)."""
    shown = redacted(task)
    if status == 201:
        return json_response(shown, status, Location=f"/tasks/{task.id}")
    return json_response(shown, status)


def task_id(request: web.Request) -> uuid.UUID:
    raw = request.match_info["id"]
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise invalid("id", "must be a UUID") from None


async def read_body(request: web.Request) -> bytes:
    """The raw body: 415 unless it says it is JSON, 413 past the limit, 408 when it does not
    arrive in time (a client that declares a body and sends part of it holds nothing open)."""
    if request.content_type != "application/json":
        raise ApiError(
            415,
            "unsupported_media_type",
            f"Content-Type must be application/json, not {request.content_type or 'none'}",
        )
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise ApiError(413, "too_large", f"request body is larger than {MAX_BODY_BYTES} bytes")
    deadline = request.app[BODY_TIMEOUT]
    try:
        async with asyncio.timeout(deadline):
            # the app's client_max_size bounds bodies sent without a length
            return await request.read()
    except TimeoutError:
        raise ApiError(
            408, "body_timeout", f"the request body did not arrive within {deadline:g} s"
        ) from None


async def read_model(request: web.Request, model: type[M]) -> M:
    """The body validated as `model` from its JSON text: strictly, so a JSON string is not a
    number, while a JSON string is a time or an id where the model says so."""
    raw = await read_body(request)
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "malformed_json", f"request body is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise invalid("body", "must be a JSON object")
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise validation_error(exc) from None


async def read_nothing(request: web.Request) -> None:
    """A change that carries no data: no body, or `{}`."""
    if request.body_exists and await read_body(request):
        await read_model(request, NoBody)


def service_errors(exc: Exception) -> ApiError:
    """Errors from the service: its own, or a merged spec that fails validation."""
    if isinstance(exc, ValidationError):
        return validation_error(exc)
    assert isinstance(exc, ServiceError)
    return from_service(exc)


async def on_task(
    request: web.Request, call: Callable[[TaskService, uuid.UUID], Awaitable[R]]
) -> R:
    """An action on the task the path names that carries no data (pause, resume, run,
    delete): the id (400 unless a UUID), no body or `{}`, the service's answer, the service's
    errors as the API's."""
    ident = task_id(request)
    await read_nothing(request)
    try:
        return await call(service_of(request), ident)
    except ServiceError as exc:
        raise from_service(exc) from None


# --- tasks ---


async def create_task(request: web.Request) -> web.Response:
    spec = await read_model(request, TaskSpec)
    try:
        task = await service_of(request).create(spec)
    except (ServiceError, ValidationError) as exc:
        raise service_errors(exc) from None
    return task_response(task, 201)


async def put_task(request: web.Request) -> web.Response:
    ident = task_id(request)
    spec = await read_model(request, TaskSpec)
    try:
        task, created = await service_of(request).put(ident, spec)
    except (ServiceError, ValidationError) as exc:
        raise service_errors(exc) from None
    return task_response(task, 201 if created else 200)


async def get_task(request: web.Request) -> web.Response:
    ident = task_id(request)
    try:
        task = await service_of(request).get(ident)
    except ServiceError as exc:
        raise from_service(exc) from None
    return task_response(task)


async def patch_task(request: web.Request) -> web.Response:
    ident = task_id(request)
    patch = await read_model(request, TaskPatch)
    try:
        task = await service_of(request).update(ident, patch_changes(patch))
    except (ServiceError, ValidationError) as exc:
        raise service_errors(exc) from None
    return task_response(task)


async def delete_task(request: web.Request) -> web.Response:
    await on_task(request, lambda service, ident: service.delete(ident))
    return web.Response(status=204)


async def remove_task(request: web.Request) -> web.Response:
    """POST /remove_task {"id": ...}: the first version's name for DELETE /tasks/{id}."""
    body = await read_model(request, RemoveTaskRequest)
    try:
        await service_of(request).delete(body.id)
    except ServiceError as exc:
        raise from_service(exc) from None
    return web.Response(status=204, headers={"Deprecation": "true"})


async def list_tasks(request: web.Request) -> web.Response:
    try:
        query = TaskListQuery.model_validate(dict(request.query))
    except ValidationError as exc:
        raise validation_error(exc) from None
    wanted = TaskFilter(
        status=query.status,
        health=query.health,
        text=query.q,
        cursor=query.cursor,
        limit=query.limit,
    )
    try:
        page = await service_of(request).list(wanted)
    except ServiceError as exc:
        raise from_service(exc) from None
    except ValueError as exc:  # the service could not read the opaque cursor
        raise invalid("cursor", str(exc) or "not a cursor from this API") from None
    shown = [redacted(task) for task in page.tasks]
    return json_response(TaskPageResponse(tasks=shown, next_cursor=page.next_cursor))


async def pause_task(request: web.Request) -> web.Response:
    return task_response(await on_task(request, lambda service, ident: service.pause(ident)))


async def resume_task(request: web.Request) -> web.Response:
    return task_response(await on_task(request, lambda service, ident: service.resume(ident)))


async def run_task(request: web.Request) -> web.Response:
    result = await on_task(request, lambda service, ident: service.run_now(ident))
    return json_response(RunResponse(task_id=task_id(request), result=result))


# --- the checker ---

# Where someone who opens the API's address in a browser goes next (links relative, so they
# still work behind a proxy that serves the API under a prefix).
INDEX_LINKS = [
    ("docs/", "Swagger UI: every route, and a form to try each one"),
    ("openapi.json", "the OpenAPI 3.1 document"),
    ("tasks", "the tasks"),
    ("status", "the checker's state: tasks by status and health, lag, queues, broker"),
    ("health", "liveness"),
    ("metrics", "Prometheus metrics"),
]
INDEX_PAGE = "\n".join(
    [
        '<!DOCTYPE html>\n<html lang="en">',
        '<head><meta charset="UTF-8"><title>periodic-checker API</title></head>',
        "<body>\n<h1>periodic-checker API</h1>\n<ul>",
        *(f'<li><a href="{href}">/{href}</a>: {what}</li>' for href, what in INDEX_LINKS),
        "</ul>\n</body>\n</html>\n",
    ]
)


async def index(request: web.Request) -> web.Response:
    return web.Response(text=INDEX_PAGE, content_type="text/html")


async def health(request: web.Request) -> web.Response:
    """Liveness: answering at all means the event loop turns."""
    return json_response(HealthResponse())


async def status(request: web.Request) -> web.Response:
    body = StatusAdapter.dump_json(service_of(request).status())
    return web.Response(body=body, content_type="application/json")


async def metrics(request: web.Request) -> web.Response:
    return web.Response(
        body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=request.app[OPENAPI], content_type="application/json")


async def docs_redirect(request: web.Request) -> web.Response:
    raise web.HTTPFound("/docs/")


async def docs_asset(request: web.Request) -> web.Response:
    """Swagger UI from the package's own files, so /docs works without the internet."""
    name = request.match_info.get("name") or "index.html"
    suffix = name[name.rfind(".") :] if "." in name else ""
    if "/" in name or name.startswith(".") or suffix not in STATIC_TYPES:
        raise ApiError(404, "not_found", "no such file")
    asset = STATIC / name
    if not asset.is_file():
        raise ApiError(404, "not_found", "no such file")
    return web.Response(
        body=asset.read_bytes(),
        content_type=STATIC_TYPES[suffix],
        headers={"Cache-Control": "max-age=3600"},
    )


ROUTES = [
    web.get("/", index),
    web.get("/health", health),
    web.get("/status", status),
    web.get("/metrics", metrics),
    web.get("/openapi.json", openapi),
    web.get("/docs", docs_redirect),
    web.get("/docs/", docs_asset),
    web.get("/docs/{name}", docs_asset),
    web.get("/tasks", list_tasks),
    web.post("/tasks", create_task),
    web.get("/tasks/{id}", get_task),
    web.put("/tasks/{id}", put_task),
    web.patch("/tasks/{id}", patch_task),
    web.delete("/tasks/{id}", delete_task),
    web.post("/tasks/{id}/pause", pause_task),
    web.post("/tasks/{id}/resume", resume_task),
    web.post("/tasks/{id}/run", run_task),
    web.post("/remove_task", remove_task),
]
