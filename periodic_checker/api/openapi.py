"""OpenAPI 3.1 description of the API, generated from the same pydantic models the handlers use.

Only the operations are spelled here (paths, status codes, which model goes where); every
schema comes from `model_json_schema`, so the document cannot drift from validation: each
rule a pattern can state (URL shape, name and header characters, status ranges, the list
cursor) is one regular expression that the validators use and the schemas show. What a
schema cannot state is in the field's description (a timeout below the interval, a pattern
RE2 compiles, a host the checker can reach).
"""

from __future__ import annotations

import functools
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from checker_common.task_spec import TaskSpec
from periodic_checker.api.models import (
    MAX_BODY_BYTES,
    ErrorBody,
    HealthResponse,
    NoBody,
    RemoveTaskRequest,
    RunResponse,
    StatusAdapter,
    TaskListQuery,
    TaskPageResponse,
    TaskPatch,
)
from periodic_checker.tasks import Task

REF = "#/components/schemas/{model}"
MODELS: list[tuple[type[BaseModel], JsonSchemaMode]] = [
    (TaskSpec, "validation"),
    (TaskPatch, "validation"),
    (RemoveTaskRequest, "validation"),
    (NoBody, "validation"),
    (Task, "serialization"),
    (TaskPageResponse, "serialization"),
    (RunResponse, "serialization"),
    (HealthResponse, "serialization"),
    (ErrorBody, "serialization"),
]
ERRORS = {
    400: "Malformed JSON",
    401: "Missing or wrong bearer token (only when API_TOKEN is set)",
    404: "No task with this id",
    408: "The request body did not arrive in time",
    409: "Conflict: name already used, too many tasks, or a change not allowed now",
    413: f"Request body over {MAX_BODY_BYTES} bytes",
    415: "Content-Type is not application/json (every change must send it)",
    421: "The Host header is not one this API answers to (API_ALLOWED_HOSTS)",
    422: "Invalid input; `detail` names each field and its problem",
    503: "Cluster mode only: the task topic cannot take the change (`broker_unavailable`:"
    " nothing changed) or this node has not applied it in time (`not_applied_yet`: it will)",
}
# Every operation can meet a wrong Host; every change a missing JSON Content-Type.
ANY_ERRORS = (421,)
CHANGE_ERRORS = (401, 415)
# Changes of a task's definition or status go through the task topic in cluster mode.
TOPIC_ERRORS = (503,)
BODY_ERRORS = (400, 408, 413, 422)
EXAMPLE_TASK = {
    "name": "example home page",
    "url": "https://example.com/",
    "interval": 60,
    "timeout": 10,
    "pattern": "Example Domain",
}
# Where the id of a created task goes next (OpenAPI links; tools follow them).
TASK_LINKS = {
    name: {"operationId": operation, "parameters": {"id": "$response.body#/id"}}
    for name, operation in [
        ("GetTask", "getTask"),
        ("ReplaceTask", "putTask"),
        ("UpdateTask", "updateTask"),
        ("DeleteTask", "deleteTask"),
        ("PauseTask", "pauseTask"),
        ("ResumeTask", "resumeTask"),
        ("RunTask", "runTask"),
    ]
}


@functools.cache
def build_openapi(version: str) -> dict[str, Any]:
    """The whole document, ready for JSON (built once; treat it as read-only)."""
    _, defs = models_json_schema(MODELS, ref_template=REF)
    schemas: dict[str, Any] = dict(defs["$defs"])
    schemas["ServiceStatus"] = StatusAdapter.json_schema(ref_template=REF, mode="serialization")
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "periodic-checker",
            "version": version,
            "description": (
                "Manage the checker's tasks and read its state. Routes that change something "
                "need `Content-Type: application/json` (with `{}` where there is no data), and "
                "`Authorization: Bearer <API_TOKEN>` when API_TOKEN is set. The Host header "
                "must be one of API_ALLOWED_HOSTS (421 otherwise). Secrets are "
                "write-only: every answer, with the token or without, shows the password in a "
                "URL's user info and the values of Authorization, Cookie, Proxy-Authorization "
                "and the `secret_headers` as `***`; `***` sent back keeps the stored value."
            ),
        },
        "paths": _paths(),
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def _ref(name: str) -> dict[str, str]:
    return {"$ref": REF.format(model=name)}


def _json(name: str, description: str, **extra: Any) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": _ref(name)}},
        **extra,
    }


def _errors(*codes: int) -> dict[str, Any]:
    every = {*codes, *ANY_ERRORS}
    return {str(code): _json("ErrorBody", ERRORS[code]) for code in sorted(every)}


def _body(name: str, example: dict[str, Any] | None = None) -> dict[str, Any]:
    media: dict[str, Any] = {"schema": _ref(name)}
    if example is not None:
        media["example"] = example
    return {
        "required": True,
        "description": f"JSON, at most {MAX_BODY_BYTES} bytes",
        "content": {"application/json": media},
    }


# DELETE and the actions carry no data, but like every change they say they are JSON: `{}`
# (an empty body with the Content-Type is accepted too).
NO_BODY = {
    "required": True,
    "description": "`{}`: a change carries Content-Type: application/json even with no data",
    "content": {"application/json": {"schema": {"$ref": REF.format(model="NoBody")}}},
}


def _task(description: str, *, created: bool = False) -> dict[str, Any]:
    response = _json("Task", description, links=TASK_LINKS)
    if created:
        response["headers"] = LOCATION
    return response


ID_PARAM = {
    "name": "id",
    "in": "path",
    "required": True,
    "description": "task id (UUID)",
    "schema": {"type": "string", "format": "uuid"},
}
LOCATION = {
    "Location": {"description": "URL of the task", "schema": {"type": "string"}},
}


def _mutating(operation: dict[str, Any]) -> dict[str, Any]:
    return {**operation, "security": [{"bearer": []}, {}]}


def _query_parameters() -> list[dict[str, Any]]:
    """GET /tasks's query, from `TaskListQuery` (a `null` choice means "leave it out")."""
    schema = TaskListQuery.model_json_schema(ref_template=REF)
    parameters = []
    for name, prop in schema["properties"].items():
        prop = dict(prop)
        choices = [c for c in prop.pop("anyOf", []) if c.get("type") != "null"]
        if len(choices) == 1:
            prop.update(choices[0])
        prop.pop("default", None)
        description = prop.pop("description", None)
        parameter: dict[str, Any] = {"name": name, "in": "query", "required": False, "schema": prop}
        if description:
            parameter["description"] = description
        parameters.append(parameter)
    return parameters


def _paths() -> dict[str, Any]:
    task = _json("Task", "The task")
    return {
        "/tasks": {
            "get": {
                "operationId": "listTasks",
                "summary": "List tasks a page at a time",
                "parameters": _query_parameters(),
                "responses": {
                    "200": _json("TaskPageResponse", "One page of tasks"),
                    **_errors(422),
                },
            },
            "post": _mutating(
                {
                    "operationId": "createTask",
                    "summary": "Create a task (the server picks its id)",
                    "requestBody": _body("TaskSpec", EXAMPLE_TASK),
                    "responses": {
                        "201": _task("Created", created=True),
                        **_errors(*CHANGE_ERRORS, *TOPIC_ERRORS, *BODY_ERRORS, 409),
                    },
                }
            ),
        },
        "/tasks/{id}": {
            "parameters": [ID_PARAM],
            "get": {
                "operationId": "getTask",
                "summary": "One task",
                "responses": {"200": task, **_errors(404, 422)},
            },
            "put": _mutating(
                {
                    "operationId": "putTask",
                    "summary": "Create or replace the task under a client-chosen id (idempotent)",
                    "requestBody": _body("TaskSpec", EXAMPLE_TASK),
                    "responses": {
                        "200": _task("Replaced"),
                        "201": _task("Created", created=True),
                        **_errors(*CHANGE_ERRORS, *TOPIC_ERRORS, *BODY_ERRORS, 409),
                    },
                }
            ),
            "patch": _mutating(
                {
                    "operationId": "updateTask",
                    "summary": "Change some fields of a task",
                    "requestBody": _body("TaskPatch", {"interval": 120, "timeout": 20}),
                    "responses": {
                        "200": task,
                        **_errors(*CHANGE_ERRORS, *TOPIC_ERRORS, *BODY_ERRORS, 404, 409),
                    },
                }
            ),
            "delete": _mutating(
                {
                    "operationId": "deleteTask",
                    "summary": "Delete a task (results already stored stay in PostgreSQL)",
                    "requestBody": NO_BODY,
                    "responses": {
                        "204": {"description": "Deleted"},
                        **_errors(*CHANGE_ERRORS, *TOPIC_ERRORS, *BODY_ERRORS, 404),
                    },
                }
            ),
        },
        "/tasks/{id}/pause": _action("pauseTask", "Stop running the task until resumed"),
        "/tasks/{id}/resume": _action("resumeTask", "Run a paused task again"),
        "/tasks/{id}/run": {
            "parameters": [ID_PARAM],
            "post": _mutating(
                {
                    "operationId": "runTask",
                    "summary": "Run the check now, publish its result and return it",
                    "requestBody": NO_BODY,
                    "responses": {
                        "200": _json("RunResponse", "The result message"),
                        **_errors(*CHANGE_ERRORS, *BODY_ERRORS, 404, 409),
                    },
                }
            ),
        },
        "/remove_task": {
            "post": _mutating(
                {
                    "operationId": "removeTask",
                    "summary": "Deprecated: the first version's name for DELETE /tasks/{id}",
                    "deprecated": True,
                    "requestBody": _body("RemoveTaskRequest"),
                    "responses": {
                        "204": {"description": "Deleted"},
                        **_errors(*CHANGE_ERRORS, *TOPIC_ERRORS, *BODY_ERRORS, 404),
                    },
                }
            ),
        },
        "/": {
            "get": {
                "operationId": "index",
                "summary": "A page with links to the docs, the tasks, the status and the metrics",
                "responses": {
                    "200": {
                        "description": "The page",
                        "content": {"text/html": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/health": {
            "get": {
                "operationId": "health",
                "summary": "Liveness: the event loop answers",
                "responses": {"200": _json("HealthResponse", "Alive"), **_errors()},
            }
        },
        "/status": {
            "get": {
                "operationId": "status",
                "summary": "Tasks by status and health, checks in flight, lag, queues, broker",
                "responses": {"200": _json("ServiceStatus", "The checker's state"), **_errors()},
            }
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "summary": "Prometheus metrics (text format)",
                "responses": {
                    "200": {
                        "description": "Metrics",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    **_errors(),
                },
            }
        },
    }


def _action(operation_id: str, summary: str) -> dict[str, Any]:
    return {
        "parameters": [ID_PARAM],
        "post": _mutating(
            {
                "operationId": operation_id,
                "summary": summary,
                "requestBody": NO_BODY,
                "responses": {
                    "200": _json("Task", "The task"),
                    **_errors(*CHANGE_ERRORS, *TOPIC_ERRORS, *BODY_ERRORS, 404, 409),
                },
            }
        ),
    }
