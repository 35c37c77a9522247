"""`periodic-checker tasks ...` against the API served on a real port, over the real service."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from api.support import TOKEN, checker_service, make_settings

from devstack import free_port
from periodic_checker.api.app import create_app
from periodic_checker.tasks_cli import main

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class LiveApi:
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


@dataclass
class Outcome:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


async def serve(app: web.Application) -> tuple[web.AppRunner, LiveApi]:
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, LiveApi("127.0.0.1", port)


@pytest.fixture
async def live(tmp_path: Path, dev_certs: Path) -> AsyncIterator[LiveApi]:
    """The API on a free port with no token."""
    async with checker_service(tmp_path / "tasks.sqlite3") as service:
        runner, where = await serve(create_app(service, make_settings(dev_certs)))
        try:
            yield where
        finally:
            await runner.cleanup()


@pytest.fixture
async def live_with_token(tmp_path: Path, dev_certs: Path) -> AsyncIterator[LiveApi]:
    async with checker_service(tmp_path / "tasks.sqlite3") as service:
        runner, where = await serve(create_app(service, make_settings(dev_certs, TOKEN)))
        try:
            yield where
        finally:
            await runner.cleanup()


class Cli:
    """Runs `tasks` commands in a worker thread (the API keeps serving on the loop)."""

    def __init__(self, api: LiveApi, capsys: pytest.CaptureFixture[str]) -> None:
        self.environ = {"API_HOST": api.host, "API_PORT": str(api.port)}
        self.capsys = capsys

    async def __call__(self, *argv: str) -> Outcome:
        self.capsys.readouterr()
        code = await asyncio.to_thread(main, ["tasks", *argv], self.environ)
        captured = self.capsys.readouterr()
        return Outcome(code, captured.out, captured.err)

    async def ok(self, *argv: str) -> Outcome:
        outcome = await self(*argv)
        assert outcome.code == 0, outcome.err
        assert outcome.err == ""
        return outcome


@pytest.fixture
def cli(live: LiveApi, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(live, capsys)


async def test_add_list_show_edit_pause_resume_remove(cli: Cli) -> None:
    added = await cli.ok(
        "add", "shop", "http://127.0.0.1:9/", "--interval", "120", "--pattern", "x", "--json"
    )
    task = added.json()
    task_id = task["id"]
    assert task["spec"]["interval"] == 120

    table = (await cli.ok("list")).out.splitlines()
    assert table[0].split() == ["ID", "NAME", "STATUS", "HEALTH", "EVERY", "URL"]
    assert table[1].split() == [task_id, "shop", "active", "unknown", "120s", "http://127.0.0.1:9/"]

    shown = (await cli.ok("show", "shop")).out
    assert f"id:        {task_id}" in shown
    assert "every:     120s (timeout 10s)" in shown

    edited = await cli.ok("edit", task_id, "--timeout", "5", "--pattern", "none", "--json")
    assert edited.json()["spec"]["timeout"] == 5
    assert edited.json()["spec"]["pattern"] is None
    assert edited.json()["spec"]["interval"] == 120

    assert (await cli.ok("pause", "shop", "--json")).json()["status"] == "paused"
    assert (await cli.ok("resume", "shop", "--json")).json()["status"] == "active"
    assert (await cli.ok("remove", "shop")).out.strip() == f"removed {task_id}"
    assert (await cli.ok("list")).out.strip() == "no tasks"


async def test_run_prints_the_checks_result(cli: Cli) -> None:
    target = TestServer(_target_app(), host="127.0.0.1")
    await target.start_server()
    try:
        url = str(target.make_url("/"))
        await cli.ok("add", "target", url, "--pattern", "nominal")
        line = (await cli.ok("run", "target")).out.strip()
        assert line.startswith("ok status=200 load_time=")
        assert line.endswith("pattern=match")
        answer = (await cli.ok("run", "target", "--json")).json()
        assert answer["result"]["status"] == 200
    finally:
        await target.close()


def _target_app() -> web.Application:
    async def page(request: web.Request) -> web.Response:
        return web.Response(text="all systems nominal")

    app = web.Application()
    app.router.add_get("/", page)
    return app


async def test_add_with_an_id_twice_makes_one_task(cli: Cli) -> None:
    task_id = str(uuid.uuid4())
    first = await cli.ok("add", "once", "http://127.0.0.1:9/", "--id", task_id, "--json")
    again = await cli.ok("add", "once", "http://127.0.0.1:9/", "--id", task_id, "--json")
    assert first.json()["id"] == again.json()["id"] == task_id
    assert len((await cli.ok("list", "--json")).json()["tasks"]) == 1


async def test_task_flags_reach_the_definition(cli: Cli) -> None:
    task = (
        await cli.ok(
            "add", "flags", "https://127.0.0.1:9/", "--header", "X-Probe: 1", "--method", "HEAD",
            "--no-follow-redirects", "--no-verify-tls", "--retries", "2",
            "--accepted-statuses", "200,204", "--json",
        )
    ).json()  # fmt: skip
    spec = task["spec"]
    assert spec["headers"] == {"X-Probe": "1"}
    assert spec["method"] == "HEAD"
    assert spec["follow_redirects"] is False
    assert spec["verify_tls"] is False
    assert spec["retries"] == 2
    assert spec["accepted_statuses"] == "200,204"


async def test_list_all_follows_the_cursor(cli: Cli) -> None:
    for i in range(3):
        await cli.ok("add", f"site-{i}", f"http://127.0.0.1:9/{i}")
    first = await cli.ok("list", "--limit", "2")
    assert "(more: --cursor " in first.out
    everything = (await cli.ok("list", "--limit", "1", "--all", "--json")).json()
    assert [t["spec"]["name"] for t in everything["tasks"]] == ["site-0", "site-1", "site-2"]
    assert everything["next_cursor"] is None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["add", "x", "ftp://example.com/"], "HTTP 422: url: scheme must be http or https"),
        (["add", "x", "http://e/", "--interval", "5", "--timeout", "5"], "HTTP 422: timeout:"),
        (["add", "x", "http://169.254.169.254/"], "HTTP 422: url: address 169.254.169.254"),
        (["show", str(uuid.UUID(int=1))], "HTTP 404: no task 00000000-0000-0000-0000-000000000001"),
        (["show", "nobody"], "no task with id or name 'nobody'"),
        (["edit", "nobody"], "nothing to change"),
        (["add", "x", "http://e/", "--header", "no colon"], "expected 'Name: value'"),
    ],
)
async def test_errors_exit_non_zero_with_one_line(cli: Cli, argv: list[str], message: str) -> None:
    outcome = await cli(*argv)
    assert outcome.code == 1
    assert outcome.out == ""
    lines = outcome.err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("periodic-checker tasks: error: ")
    assert message in lines[0]


async def test_a_name_in_use_is_reported(cli: Cli) -> None:
    await cli.ok("add", "dup", "http://127.0.0.1:9/")
    outcome = await cli("add", "dup", "http://127.0.0.1:9/")
    assert outcome.code == 1
    assert "HTTP 409: a task named 'dup' already exists" in outcome.err


async def test_an_unreachable_api_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    dead = LiveApi("127.0.0.1", free_port())
    outcome = await Cli(dead, capsys)("list")
    assert outcome.code == 1
    assert outcome.err.startswith(
        f"periodic-checker tasks: error: cannot reach the API at {dead.url}"
    )


async def run_subprocess(*argv: str, env: dict[str, str]) -> Outcome:
    """`python -m periodic_checker.tasks_cli` with only the given settings in its environment."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("API_", "KAFKA_"))}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "periodic_checker.tasks_cli", *argv,
        env={**base, **env}, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return Outcome(proc.returncode, out.decode(), err.decode())


async def test_the_command_needs_no_kafka_settings_and_reads_the_token_from_env(
    live_with_token: LiveApi, tmp_path: Path
) -> None:
    where = {"API_HOST": live_with_token.host, "API_PORT": str(live_with_token.port)}
    refused = await run_subprocess("tasks", "add", "a", "http://127.0.0.1:9/", env=where)
    assert refused.code == 1
    assert "HTTP 401: this route needs Authorization: Bearer" in refused.err

    allowed = await run_subprocess(
        "tasks", "add", "a", "http://127.0.0.1:9/", "--json", env={**where, "API_TOKEN": TOKEN}
    )
    assert allowed.code == 0, allowed.err
    assert allowed.json()["spec"]["name"] == "a"


async def test_flags_and_the_env_file_give_the_address(
    live_with_token: LiveApi, tmp_path: Path
) -> None:
    env_file = tmp_path / "checker.env"
    env_file.write_text(f"API_PORT={live_with_token.port}\nAPI_TOKEN={TOKEN}\n")
    from_file = await run_subprocess(
        "--env-file", str(env_file), "tasks", "add", "b", "http://127.0.0.1:9/", env={}
    )
    assert from_file.code == 0, from_file.err
    listed = await run_subprocess("tasks", "list", "--api", live_with_token.url, env={})
    assert listed.code == 0, listed.err
    assert " b " in listed.out
    removed = await run_subprocess(
        "tasks", "remove", "b", "--api", live_with_token.url, "--token", TOKEN, env={}
    )
    assert removed.code == 0, removed.err
