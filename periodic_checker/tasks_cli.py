"""`periodic-checker tasks add|list|show|edit|pause|resume|run|remove`: a client of the HTTP API.

It needs only the API's address and token (`ApiSettings`), never the Kafka settings: `--api URL`
and `--token`, else API_HOST / API_PORT / API_TOKEN from the environment, else from the env
file. Tables for people, `--json` for scripts; an error is one line on stderr. Exit statuses
are the ones of both command lines (`checker_common.cli`): `run` exits 1 when the check failed,
2 for a request the API refuses (4xx, an unknown task) or bad arguments and settings, 3 when the
API cannot be reached or fails.

The task flags are generated from `TaskSpec`'s fields, so a new field gets its flag for free.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import types
import typing
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from checker_common.cli import (
    EXIT_CHECK_FAILED,
    EXIT_EPILOG,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
)
from checker_common.settings import SettingsError, load_settings
from checker_common.task_spec import TaskSpec
from periodic_checker.settings import ApiSettings

PROG = "periodic-checker tasks"
DEFAULT_TIMEOUT = 30.0
POSITIONAL = ("name", "url")
# Listening on every address still means the API is reachable on loopback.
CHANGES = frozenset({"POST", "PUT", "PATCH", "DELETE"})
WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "[::]": "::1"}  # noqa: S104


class CliError(Exception):
    """One line for stderr, and the exit status it stands for."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Output:
    """What a command prints, and its exit status."""

    text: str
    code: int = EXIT_OK


# --- the parser ---


def add_tasks_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    parents: Sequence[argparse.ArgumentParser] = (),
) -> argparse.ArgumentParser:
    """Add `tasks` and its commands to the `periodic-checker` parser."""
    tasks = subparsers.add_parser(
        "tasks",
        parents=list(parents),
        help="manage tasks through the running checker's HTTP API",
        description="Manage tasks through the running checker's HTTP API.",
        epilog=EXIT_EPILOG,
    )
    conn = _connection_parent(parents)
    sub = tasks.add_subparsers(dest="tasks_command", required=True, metavar="ACTION")

    add = sub.add_parser("add", parents=[conn], help="create a task", epilog=EXIT_EPILOG)
    add.add_argument("name", help="unique name of the task")
    add.add_argument("url", help="http:// or https:// URL to check")
    add.add_argument(
        "--id",
        type=_uuid,
        help="create under this id (PUT): repeating the command never makes two tasks",
    )
    _spec_flags(add, skip=POSITIONAL)

    lst = sub.add_parser("list", parents=[conn], help="list tasks", epilog=EXIT_EPILOG)
    lst.add_argument("--status", choices=["active", "paused", "done", "error"])
    lst.add_argument("--health", choices=["unknown", "up", "down"])
    lst.add_argument("-q", "--query", dest="q", help="text in the name or URL")
    lst.add_argument("--limit", type=int, default=100, help="tasks per page (1-1000)")
    lst.add_argument("--cursor", help="next_cursor of a previous page")
    lst.add_argument("--all", action="store_true", help="follow next_cursor to the end")

    show = sub.add_parser("show", parents=[conn], help="show one task", epilog=EXIT_EPILOG)
    show.add_argument("task", help="task id or exact name")

    edit = sub.add_parser(
        "edit", parents=[conn], help="change some fields of a task", epilog=EXIT_EPILOG
    )
    edit.add_argument("task", help="task id or exact name")
    _spec_flags(edit, skip=())

    for action, text in (
        ("pause", "stop running a task until resumed"),
        ("resume", "run a paused task again"),
        ("run", "run a check now and print its result; exit 1 when it failed"),
        ("remove", "delete a task (stored results stay)"),
    ):
        cmd = sub.add_parser(action, parents=[conn], help=text, epilog=EXIT_EPILOG)
        cmd.add_argument("task", help="task id or exact name")
    return tasks


def _connection_parent(parents: Sequence[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    conn = argparse.ArgumentParser(add_help=False, parents=list(parents))
    conn.add_argument("--api", metavar="URL", help="API address (default: from API_HOST/API_PORT)")
    conn.add_argument("--token", help="bearer token (default: API_TOKEN)")
    conn.add_argument("--json", action="store_true", help="print JSON for scripts")
    conn.add_argument(
        "--api-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="seconds to wait for the API (default 30)",
    )
    return conn


def _spec_flags(parser: argparse.ArgumentParser, skip: Sequence[str]) -> None:
    """One flag per `TaskSpec` field; values are sent as given and validated by the API."""
    group = parser.add_argument_group("task fields (see docs/api.md)")
    for name, info in TaskSpec.model_fields.items():
        if name in skip:
            continue
        flag = "--" + name.replace("_", "-")
        help_text = info.description or None
        if name == "headers":
            group.add_argument(
                "--header",
                dest="spec_headers",
                action="append",
                default=argparse.SUPPRESS,
                metavar="'NAME: VALUE'",
                help="request header (repeat; on edit, replaces all headers)",
            )
        elif name == "secret_headers":
            group.add_argument(
                "--secret-header",
                dest="spec_secret_headers",
                action="append",
                default=argparse.SUPPRESS,
                metavar="NAME",
                help="a header (given with --header) whose value is secret: never shown,"
                " not sent on after a redirect to another origin (repeat; on edit, replaces"
                " the list; a value of *** keeps the stored one)",
            )
        elif name == "tags":
            group.add_argument(
                "--tag",
                dest="spec_tags",
                action="append",
                default=argparse.SUPPRESS,
                metavar="TAG",
                help="a label alerting rules select tasks by (repeat; on edit, replaces the"
                " list; --no-tags clears it)",
            )
            group.add_argument(
                "--no-tags",
                dest="spec_tags",
                action="store_const",
                const=[],
                default=argparse.SUPPRESS,
                help="no tags (on edit: remove them all)",
            )
        elif _is_bool(info.annotation):
            group.add_argument(
                flag,
                dest=f"spec_{name}",
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
        elif typing.get_origin(info.annotation) is typing.Literal:
            group.add_argument(
                flag,
                dest=f"spec_{name}",
                choices=typing.get_args(info.annotation),
                default=argparse.SUPPRESS,
                help=help_text,
            )
        else:
            convert = _converter(info.annotation)
            metavar = name.upper()
            if _nullable(info.annotation):
                help_text = f"{help_text or ''} ('none' for null)".strip()
            group.add_argument(
                flag,
                dest=f"spec_{name}",
                type=convert,
                metavar=metavar,
                default=argparse.SUPPRESS,  # absent unless given, so `none` can mean null
                help=help_text,
            )


def _is_bool(annotation: Any) -> bool:
    return annotation is bool


def _nullable(annotation: Any) -> bool:
    return type(None) in typing.get_args(annotation)


def _converter(annotation: Any) -> Callable[[str], Any]:
    args = set(typing.get_args(annotation)) if _is_union(annotation) else {annotation}
    base: Callable[[str], Any] = str
    if int in args:
        base = int
    elif float in args:
        base = float
    nullable = type(None) in args

    def convert(text: str) -> Any:
        if nullable and text.lower() in {"none", "null"}:
            return None
        return base(text)

    convert.__name__ = getattr(base, "__name__", "value")  # argparse names it in errors
    return convert


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def _uuid(text: str) -> str:
    return str(uuid.UUID(text))


def spec_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The task fields given on the command line, as a JSON object."""
    fields: dict[str, Any] = {}
    for name in TaskSpec.model_fields:
        if name in POSITIONAL and getattr(args, name, None) is not None:
            fields[name] = getattr(args, name)
    for key, value in vars(args).items():
        if not key.startswith("spec_"):
            continue
        name = key.removeprefix("spec_")
        fields[name] = parse_headers(value) if name == "headers" else value
    return fields


def parse_headers(values: Sequence[str]) -> dict[str, str]:
    headers = {}
    for value in values:
        name, sep, text = value.partition(":")
        if not sep or not name.strip():
            raise CliError(f"--header {value!r}: expected 'Name: value'")
        headers[name.strip()] = text.strip()
    return headers


# --- where the API is ---


@dataclass(frozen=True)
class Endpoint:
    base: str
    token: str | None
    timeout: float


def endpoint(args: argparse.Namespace, settings: ApiSettings) -> Endpoint:
    """The flags first, then the settings (the environment, then the env file)."""
    base = args.api
    if not base:
        host = WILDCARDS.get(settings.api_host, settings.api_host)
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        base = f"http://{host}:{settings.api_port}"
    parts = urllib.parse.urlsplit(base)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise CliError(f"--api {base!r}: expected a URL like http://127.0.0.1:8080")
    token = args.token or (settings.api_token.get_secret_value() if settings.api_token else None)
    timeout = args.api_timeout or DEFAULT_TIMEOUT
    return Endpoint(base.rstrip("/"), token, timeout)


# --- talking to it ---


class Api:
    def __init__(self, where: Endpoint) -> None:
        self.where = where

    def call(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        query: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Send one request; the decoded JSON answer, or CliError with the API's message."""
        url = self.where.base + path
        if query:
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        headers = {"Accept": "application/json"}
        data = None
        if body is None and method in CHANGES:
            body = {}  # the API takes a change only as JSON, even one with nothing to send
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.where.token:
            headers["Authorization"] = f"Bearer {self.where.token}"
        request = urllib.request.Request(url, data=data, headers=headers, method=method)  # noqa: S310 - http(s) checked in endpoint()
        try:
            with urllib.request.urlopen(request, timeout=timeout or self.where.timeout) as answer:  # noqa: S310
                raw = answer.read()
        except urllib.error.HTTPError as exc:
            # 4xx: the request is wrong (unknown task, invalid field); 5xx: the API failed.
            code = EXIT_USAGE if exc.code < 500 else EXIT_UNAVAILABLE
            raise CliError(describe_error(exc.code, exc.read()), code) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, socket.timeout | TimeoutError):
                reason = "timed out"
            raise CliError(
                f"cannot reach the API at {self.where.base}: {reason}", EXIT_UNAVAILABLE
            ) from None
        return json.loads(raw) if raw else None

    def task_path(self, ref: str) -> str:
        """`/tasks/{id}` for an id, or for the task with exactly this name."""
        try:
            return f"/tasks/{uuid.UUID(ref)}"
        except ValueError:
            pass
        cursor = None
        while True:
            page = self.call("GET", "/tasks", query={"q": ref, "limit": 1000, "cursor": cursor})
            for task in page["tasks"]:
                if task["spec"]["name"] == ref:
                    return f"/tasks/{task['id']}"
            cursor = page.get("next_cursor")
            if not cursor:
                raise CliError(f"no task with id or name {ref!r}")


def describe_error(status: int, raw: bytes) -> str:
    """The API's error body as one line: its message, or each field and its problem."""
    try:
        body = json.loads(raw)
        message = body["message"]
        detail = body.get("detail") or []
    except (ValueError, KeyError, TypeError):
        text = raw.decode(errors="replace").strip() or "no message"
        return f"HTTP {status}: {text[:200]}".replace("\n", " ")
    if detail and body.get("error") == "validation":
        message = "; ".join(f"{d['field']}: {d['message']}" for d in detail)
    return f"HTTP {status}: {message}".replace("\n", " ")


# --- the commands ---


def run_tasks(args: argparse.Namespace) -> int:
    """Run one `tasks` command; its exit status, with one line on stderr when it fails."""
    try:
        settings = load_settings(ApiSettings, getattr(args, "env_file", None))
        api = Api(endpoint(args, settings))
        output = COMMANDS[args.tasks_command](api, args)
    except SettingsError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CliError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exc.code
    print(output.text)
    return output.code


def _add(api: Api, args: argparse.Namespace) -> Output:
    fields = spec_fields(args)
    if args.id:
        task = api.call("PUT", f"/tasks/{args.id}", fields)
    else:
        task = api.call("POST", "/tasks", fields)
    return Output(_dump(task) if args.json else render_task(task))


def _list(api: Api, args: argparse.Namespace) -> Output:
    query = {
        "status": args.status,
        "health": args.health,
        "q": args.q,
        "limit": args.limit,
        "cursor": args.cursor,
    }
    page = api.call("GET", "/tasks", query=query)
    tasks = list(page["tasks"])
    while args.all and page.get("next_cursor"):
        page = api.call("GET", "/tasks", query={**query, "cursor": page["next_cursor"]})
        tasks += page["tasks"]
    next_cursor = page.get("next_cursor")
    if args.json:
        return Output(_dump({"tasks": tasks, "next_cursor": next_cursor}))
    table = render_table(tasks)
    if next_cursor:
        table += f"\n(more: --cursor {next_cursor} or --all)"
    return Output(table)


def _show(api: Api, args: argparse.Namespace) -> Output:
    task = api.call("GET", api.task_path(args.task))
    return Output(_dump(task) if args.json else render_task(task))


def _edit(api: Api, args: argparse.Namespace) -> Output:
    fields = spec_fields(args)
    if not fields:
        raise CliError("nothing to change: give at least one field flag (see --help)")
    task = api.call("PATCH", api.task_path(args.task), fields)
    return Output(_dump(task) if args.json else render_task(task))


def _action(verb: str) -> Callable[[Api, argparse.Namespace], Output]:
    def act(api: Api, args: argparse.Namespace) -> Output:
        task = api.call("POST", f"{api.task_path(args.task)}/{verb}")
        return Output(_dump(task) if args.json else render_task(task))

    return act


def _run(api: Api, args: argparse.Namespace) -> Output:
    path = api.task_path(args.task)
    task = api.call("GET", path)
    # The check may take its whole time-out, for every retry; wait for that plus a margin.
    spec = task["spec"]
    needed = spec["timeout"] * (spec["retries"] + 1) + spec["retry_interval"] * spec["retries"]
    answer = api.call("POST", f"{path}/run", timeout=max(api.where.timeout, needed + 10))
    # Like `probe`: a failed check is still printed, and its exit status says it failed.
    code = EXIT_OK if answer["result"]["ok"] else EXIT_CHECK_FAILED
    return Output(_dump(answer) if args.json else render_result(answer), code)


def _remove(api: Api, args: argparse.Namespace) -> Output:
    path = api.task_path(args.task)
    api.call("DELETE", path)
    task_id = path.rsplit("/", 1)[1]
    return Output(_dump({"id": task_id, "removed": True}) if args.json else f"removed {task_id}")


COMMANDS: dict[str, Callable[[Api, argparse.Namespace], Output]] = {
    "add": _add,
    "list": _list,
    "show": _show,
    "edit": _edit,
    "pause": _action("pause"),
    "resume": _action("resume"),
    "run": _run,
    "remove": _remove,
}


# --- rendering ---


def _dump(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=False)


def _every(spec: Mapping[str, Any]) -> str:
    interval = spec.get("interval")
    return "once" if interval is None else f"{interval:g}s"


def render_table(tasks: Sequence[Mapping[str, Any]]) -> str:
    header = ("ID", "NAME", "STATUS", "HEALTH", "EVERY", "URL")
    rows = [
        (
            str(t["id"]),
            str(t["spec"]["name"]),
            str(t["status"]),
            str(t["health"]),
            _every(t["spec"]),
            str(t["spec"]["url"]),
        )
        for t in tasks
    ]
    if not rows:
        return "no tasks"
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    lines = []
    for row in [header, *rows]:
        cells = [cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True)]
        lines.append("  ".join([*cells, row[-1]]))
    return "\n".join(lines)


def render_task(task: Mapping[str, Any]) -> str:
    spec = task["spec"]
    lines = [
        f"id:        {task['id']}",
        f"name:      {spec['name']}",
        f"url:       {spec['method']} {spec['url']}",
        f"every:     {_every(spec)} (timeout {spec['timeout']:g}s)",
        f"status:    {task['status']}"
        + (f" ({task['status_reason']})" if task.get("status_reason") else ""),
        f"health:    {task['health']}",
        f"runs:      {task['runs']} on schedule, {task['manual_runs']} by hand"
        f" (failures in a row: {task['failures_in_a_row']})",
        f"last run:  {task.get('last_run_at') or '-'}",
    ]
    if spec.get("tags"):
        lines.append(f"tags:      {', '.join(spec['tags'])}")
    if spec.get("pattern"):
        lines.append(f"pattern:   {spec['pattern']} (fails when {spec['pattern_fails_when']})")
    return "\n".join(lines)


def render_result(answer: Mapping[str, Any]) -> str:
    result = answer["result"]
    error = result.get("error")
    parts = [
        "ok" if result["ok"] else "FAILED",
        f"status={result.get('status') if result.get('status') is not None else '-'}",
        f"load_time={result['load_time']:.3f}s",
    ]
    if result.get("pattern_search"):
        parts.append(f"pattern={result['pattern_search']}")
    if error:
        parts.append(f"error={error['kind']}: {error['message']}")
    return " ".join(parts).replace("\n", " ")


# --- standalone entry (`python -m periodic_checker.tasks_cli`), used by tests ---


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="periodic-checker")
    parser.add_argument("--env-file", default=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    add_tasks_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_tasks(args)


if __name__ == "__main__":
    sys.exit(main())
