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
    """Runs `tasks` commands in a worker thread (the API keeps serving on the loop), with the
    API's address in the environment and no token."""

    def __init__(
        self, api: LiveApi, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        for name in [n for n in os.environ if n.upper().startswith("API_")]:
            monkeypatch.delenv(name)
        monkeypatch.setenv("API_HOST", api.host)
        monkeypatch.setenv("API_PORT", str(api.port))
        self.capsys = capsys

    async def __call__(self, *argv: str) -> Outcome:
        self.capsys.readouterr()
        try:
            code = await asyncio.to_thread(main, ["tasks", *argv])
        except SystemExit as exited:  # argparse refusing the arguments
            code = int(exited.code or 0)
        captured = self.capsys.readouterr()
        return Outcome(code, captured.out, captured.err)

    async def ok(self, *argv: str) -> Outcome:
        outcome = await self(*argv)
        assert outcome.code == 0, outcome.err
        assert outcome.err == ""
        return outcome


@pytest.fixture
def cli(live: LiveApi, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Cli:
    return Cli(live, capsys, monkeypatch)


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


async def test_tags_are_set_shown_replaced_and_cleared_with_flags(cli: Cli) -> None:
    added = await cli.ok("add", "tagged", "https://127.0.0.1:9/", "--tag", "prod", "--tag",
                         "team:web", "--json")  # fmt: skip
    assert added.json()["spec"]["tags"] == ["prod", "team:web"]
    assert "tags:      prod, team:web" in (await cli.ok("show", "tagged")).out
    edited = await cli.ok("edit", "tagged", "--tag", "staging", "--json")
    assert edited.json()["spec"]["tags"] == ["staging"]
    cleared = await cli.ok("edit", "tagged", "--no-tags", "--json")
    assert cleared.json()["spec"]["tags"] == []


async def test_secrets_are_marked_with_flags_and_never_printed(cli: Cli) -> None:
    url = "https://alice:hunter2@127.0.0.1:9/"
    added = await cli.ok(
        "add", "secret", url, "--header", "X-Api-Key: k3y", "--secret-header", "X-Api-Key",
        "--json",
    )  # fmt: skip
    edited = await cli.ok("edit", "secret", "--header", "X-Api-Key: ***", "--json")
    shown = [await cli.ok(*args) for args in (["list"], ["show", "secret"], ["list", "--json"])]

    assert added.json()["spec"]["secret_headers"] == ["X-Api-Key"]
    assert edited.json()["spec"]["headers"] == {"X-Api-Key": "***"}
    assert "https://alice:***@127.0.0.1:9/" in shown[0].out
    for outcome in [added, edited, *shown]:
        assert "hunter2" not in outcome.out
        assert "k3y" not in outcome.out


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
        (["run", "nobody"], "no task with id or name 'nobody'"),
        (["edit", "nobody"], "nothing to change"),
        (["add", "x", "http://e/", "--header", "no colon"], "expected 'Name: value'"),
        (["list", "--api", "localhost:8080"], "--api 'localhost:8080': expected a URL"),
    ],
)
async def test_a_refused_request_exits_2_with_one_line(
    cli: Cli, argv: list[str], message: str
) -> None:
    outcome = await cli(*argv)
    assert outcome.code == 2
    assert outcome.out == ""
    lines = outcome.err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("periodic-checker tasks: error: ")
    assert message in lines[0]


async def test_run_exits_0_when_the_check_passed_and_1_when_it_failed(
    cli: Cli, target: TestServer
) -> None:
    await cli.ok("add", "passing", str(target.make_url("/")))
    await cli.ok("add", "failing", str(target.make_url("/status/503")))

    passed = await cli("run", "passing")
    assert (passed.code, passed.err) == (0, "")
    assert passed.out.startswith("ok status=200 ")

    failed = await cli("run", "failing")
    assert (failed.code, failed.err) == (1, "")
    assert failed.out.startswith("FAILED status=503 ")
    failed_json = await cli("run", "failing", "--json")
    assert failed_json.code == 1
    assert failed_json.json()["result"]["ok"] is False


async def test_show_after_a_run_by_hand_and_a_pause_counts_what_ran(
    cli: Cli, target: TestServer
) -> None:
    await cli.ok("add", "shop", str(target.make_url("/status/503")), "--interval", "3600")
    assert (await cli("run", "shop")).code == 1
    await cli.ok("pause", "shop")

    shown = (await cli.ok("show", "shop")).out
    assert "runs:      0 on schedule, 1 by hand (failures in a row: 1)" in shown
    assert "last run:  -" not in shown
    task = (await cli.ok("show", "shop", "--json")).json()
    assert (task["runs"], task["manual_runs"], task["failures_in_a_row"]) == (0, 1, 1)
    assert task["status"] == "paused"


async def test_bad_arguments_exit_2(cli: Cli) -> None:
    missing = await cli("run")
    assert missing.code == 2
    assert "the following arguments are required: task" in missing.err
    unknown = await cli("run", "x", "--colour", "red")
    assert unknown.code == 2


async def test_a_name_in_use_is_reported(cli: Cli) -> None:
    await cli.ok("add", "dup", "http://127.0.0.1:9/")
    outcome = await cli("add", "dup", "http://127.0.0.1:9/")
    assert outcome.code == 2
    assert "HTTP 409: a task named 'dup' already exists" in outcome.err


@pytest.mark.parametrize("argv", [["list"], ["run", "shop"], ["run", str(uuid.UUID(int=1))]])
async def test_an_unreachable_api_is_one_line_and_exit_3(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, argv: list[str]
) -> None:
    dead = LiveApi("127.0.0.1", free_port())
    outcome = await Cli(dead, capsys, monkeypatch)(*argv)
    assert outcome.code == 3
    assert outcome.err.startswith(
        f"periodic-checker tasks: error: cannot reach the API at {dead.url}"
    )
    assert len(outcome.err.splitlines()) == 1


async def test_an_api_that_fails_is_exit_3(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(request: web.Request) -> web.Response:
        body = {"error": "internal", "message": "internal error", "detail": []}
        return web.json_response(body, status=500)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", broken)
    runner, where = await serve(app)
    try:
        outcome = await Cli(where, capsys, monkeypatch)("list")
    finally:
        await runner.cleanup()
    assert outcome.code == 3
    assert outcome.err == "periodic-checker tasks: error: HTTP 500: internal error\n"


async def test_a_bad_api_setting_is_named_with_exit_2(
    cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("API_PORT", "http")
    outcome = await cli("list")
    assert outcome.code == 2
    assert outcome.err.startswith("periodic-checker tasks: error: API_PORT: ")
    assert len(outcome.err.splitlines()) == 1


async def run_subprocess(*argv: str, env: dict[str, str]) -> Outcome:
    """`python -m periodic_checker.tasks_cli` with only the given settings in its environment."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("API_", "KAFKA_"))}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "periodic_checker.tasks_cli", *argv,
        env={**base, **env},
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
    assert refused.code == 2
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
