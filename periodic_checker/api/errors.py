"""Errors as JSON: every refusal names the field and the problem, nothing escapes as a bare 500.

Handlers raise `ApiError`; the middleware in `app.py` renders it (and aiohttp's own HTTP
exceptions, and anything unexpected) as `{"error": ..., "message": ..., "detail": [...]}`.
"""

from __future__ import annotations

from collections.abc import Sequence

from aiohttp import web
from pydantic import ValidationError

from periodic_checker.api.models import MAX_BODY_BYTES, ErrorBody, FieldError
from periodic_checker.task_service import (
    BrokerUnavailable,
    InvalidChange,
    NameTaken,
    ServiceError,
    TargetDenied,
    TaskNotFound,
    TooManyTasks,
    ViewBehind,
)

# Errors are named by what went wrong; clients switch on this word, people read `message`.
AIOHTTP_ERRORS = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    415: "unsupported_media_type",
}

# A message names this many problems in full; `detail` always has every one.
SUMMARY_FIELDS = 3


class ApiError(Exception):
    """A refusal with its HTTP status, a short error word, a sentence and field details."""

    def __init__(
        self,
        status: int,
        error: str,
        message: str,
        detail: Sequence[FieldError] = (),
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message
        self.detail = list(detail)
        self.headers = headers or {}

    def response(self) -> web.Response:
        body = ErrorBody(error=self.error, message=self.message, detail=self.detail)
        return web.json_response(
            body.model_dump(mode="json"), status=self.status, headers=self.headers
        )


def field_errors(exc: ValidationError, prefix: Sequence[str | int] = ()) -> list[FieldError]:
    """One `FieldError` per pydantic problem; the field is the dotted location."""
    found = []
    for error in exc.errors(include_url=False, include_input=False, include_context=False):
        loc = [*prefix, *error.get("loc", ())]
        field = ".".join(str(part) for part in loc) or "body"
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        found.append(FieldError(field=field, message=message))
    return found


def validation_error(exc: ValidationError, prefix: Sequence[str | int] = ()) -> ApiError:
    detail = field_errors(exc, prefix)
    return ApiError(422, "validation", f"invalid input: {summarise(detail)}", detail)


def summarise(detail: Sequence[FieldError], shown: int = SUMMARY_FIELDS) -> str:
    """The problems as one line: the first `shown` in full, then how many more `detail` has,
    so the message never reads as if it were all of them."""
    parts = [f"{d.field}: {d.message}" for d in detail[:shown]]
    if len(detail) > shown:
        parts.append(f"and {len(detail) - shown} more (see detail)")
    return "; ".join(parts)


def invalid(field: str, message: str) -> ApiError:
    """A 422 about one named field."""
    return ApiError(
        422,
        "validation",
        f"invalid input: {field}: {message}",
        [FieldError(field=field, message=message)],
    )


def from_service(exc: ServiceError) -> ApiError:
    """The HTTP meaning of each error the task service raises."""
    message = str(exc) or type(exc).__name__
    if isinstance(exc, TaskNotFound):
        return ApiError(404, "not_found", message, [FieldError(field="id", message=message)])
    if isinstance(exc, NameTaken):
        return ApiError(409, "name_taken", message, [FieldError(field="name", message=message)])
    if isinstance(exc, TooManyTasks):
        # 409: the request is fine, the checker's state (full) refuses it until tasks go.
        return ApiError(409, "too_many_tasks", message)
    if isinstance(exc, TargetDenied):
        reason = message.removeprefix("url: ")
        return ApiError(
            422, "target_denied", f"url: {reason}", [FieldError(field="url", message=reason)]
        )
    if isinstance(exc, InvalidChange):
        return ApiError(409, "invalid_change", message)
    if isinstance(exc, BrokerUnavailable):
        # Cluster mode: nothing changed; the same request may be sent again.
        return ApiError(503, "broker_unavailable", message, headers={"Retry-After": "5"})
    if isinstance(exc, ViewBehind):
        return ApiError(503, "not_applied_yet", message, headers={"Retry-After": "1"})
    return ApiError(409, "conflict", message)


def from_http_exception(exc: web.HTTPException) -> ApiError:
    """aiohttp's own refusals (unknown route, wrong method, body too large) as JSON."""
    headers = {}
    if isinstance(exc, web.HTTPMethodNotAllowed):
        headers["Allow"] = ", ".join(sorted(exc.allowed_methods))
    error = AIOHTTP_ERRORS.get(exc.status, "http_error")
    message = exc.reason
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        message = f"request body is larger than {MAX_BODY_BYTES} bytes"
    return ApiError(exc.status, error, message, headers=headers)


def internal_error() -> ApiError:
    return ApiError(500, "internal", "internal error; the checker's log has the details")
