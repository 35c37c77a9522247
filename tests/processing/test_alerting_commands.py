"""`checker-processing alerts test CHANNEL` against a real receiver, and `alerts list` against a
real PostgreSQL, run as the command a person types."""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from processing.processing_helpers import WIDE_WINDOW, make_result, record_of

from checker_processing import db
from checker_processing.alerting.config import parse
from checker_processing.alerting.sender import Sender
from checker_processing.writer import Writer
from devstack import free_port

from helpers import run_cli

SECRET = "whsec-command-test-secret"


def alerting_file(tmp_path: Path, port: int) -> Path:
    path = tmp_path / "alerting.toml"
    path.write_text(
        f"""
[channels.ops]
type = "webhook"
url = "http://127.0.0.1:{port}/hook"
secret = "{SECRET}"

[channels.chat]
type = "slack"
url = "http://127.0.0.1:{port}/services/slack-token-secret"

[[rules]]
name = "all"
channels = ["ops"]
all = true
"""
    )
    return path


async def run_cli_async(*args: str, env: dict[str, str]) -> Any:
    # In a thread: the receiver keeps answering on this loop meanwhile.
    return await asyncio.to_thread(run_cli, "checker_processing.cli", *args, env=env)


async def test_a_test_notification_reaches_each_channel(tmp_path: Path) -> None:
    got: list[tuple[str, dict[str, Any]]] = []

    async def hook(request: web.Request) -> web.Response:
        got.append((request.path, await request.json()))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    app.router.add_post("/services/slack-token-secret", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    env = {"ALERTING_CONFIG": str(alerting_file(tmp_path, port))}
    try:
        webhook = await run_cli_async("alerts", "test", "ops", env=env)
        slack = await run_cli_async("alerts", "test", "chat", env=env)
        unknown = await run_cli_async("alerts", "test", "pager", env=env)
    finally:
        await runner.cleanup()

    assert (webhook.returncode, webhook.stdout) == (0, "test notification to ops: delivered\n")
    assert (slack.returncode, slack.stdout) == (0, "test notification to chat: delivered\n")
    assert got[0][1]["kind"] == "test"
    summary = "[TEST] checker-processing test notification: a test notification; nothing is down"
    assert got[0][1]["summary"] == summary
    assert got[1][1] == {"text": summary}
    assert unknown.returncode == 2
    assert unknown.stderr == (
        "checker-processing: error: alerts test: 'pager' is not a channel of the file (ops, chat)\n"
    )


def test_a_test_notification_that_fails_says_why_and_exits_1(tmp_path: Path) -> None:
    env = {"ALERTING_CONFIG": str(alerting_file(tmp_path, free_port()))}  # nothing listens
    result = run_cli("checker_processing.cli", "alerts", "test", "chat", env=env)
    assert result.returncode == 1
    assert result.stdout.startswith("test notification to chat: failed: ClientConnectorError")
    assert "slack-token-secret" not in result.stdout + result.stderr


async def test_alerts_list_shows_pending_and_failed_notifications(
    schema_dsn: str, migrated: Any, tmp_path: Path
) -> None:
    port = free_port()  # nothing listens: every try fails
    config = parse(alerting_file(tmp_path, port).read_text())
    writer = Writer(lambda: db.connect(schema_dsn), max_message_bytes=4096, window=WIDE_WINDOW)
    task = uuid.uuid4()
    down = make_result(ok=False, health="down", error={"kind": "status", "message": "503"},
                       name="shop")  # fmt: skip
    writer.write([record_of(task, down, offset=0)])
    writer.close()
    sender = Sender(lambda: db.connect(schema_dsn), config, stop=threading.Event())
    async with aiohttp.ClientSession() as session:
        assert await sender.round(session) == 2  # one event expanded, one notification tried
    env = {"POSTGRESQL_CONNECTION": schema_dsn}
    table = await run_cli_async("alerts", "list", env=env)
    listed = await run_cli_async("alerts", "list", "--format", "json", env=env)
    none = await run_cli_async("alerts", "list", "--state", "sent", env=env)
    bad = await run_cli_async("alerts", "list", "--state", "lost", env=env)

    assert table.returncode == 0, table.stderr
    header, row = table.stdout.splitlines()
    assert header.split()[:5] == ["ID", "STATE", "KIND", "CHANNEL", "TASK"]
    assert row.split()[1:6] == ["pending", "opened", "ops", "shop", "1"]
    assert "ClientConnectorError" in row
    (found,) = json.loads(listed.stdout)
    assert (found["state"], found["task_id"], found["attempts"]) == ("pending", str(task), 1)
    assert none.stdout == "no notifications\n"
    assert bad.returncode == 2
    assert "--state: lost is not one of pending, sent, summarised, failed, cancelled" in bad.stderr
