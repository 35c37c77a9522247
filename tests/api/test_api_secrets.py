"""Secrets in tasks are write-only: no read shows them (token or not), no log line or result
holds them, and what a read showed can be written back without losing them."""

from __future__ import annotations

import base64
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from api.support import TOKEN, Client, published

from checker_common.contract import encode
from periodic_checker.checker_service import CheckerService

PASSWORD = "hunter2-pw"
KEY = "k3y-value"
BEARER = "t0ken-value"
SECRETS = (PASSWORD, KEY, BEARER)
SEEN: web.AppKey[list[dict[str, str]]] = web.AppKey("seen", list)


@pytest.fixture
async def echo() -> AsyncIterator[TestServer]:
    """A target that records the headers of each request and answers 200."""

    async def page(request: web.Request) -> web.Response:
        request.app[SEEN].append(dict(request.headers))
        return web.Response(text="all systems nominal")

    async def back(request: web.Request) -> web.Response:
        # A hostile target that quotes the secret it received in its redirect.
        raise web.HTTPFound(f"/loop?key={request.headers.get('X-Api-Key', '')}")

    app = web.Application()
    app[SEEN] = []
    app.add_routes([web.get("/", page), web.get("/loop", back)])
    # Without an access log: what the target logs of its requests is not the checker's.
    server = TestServer(app, host="127.0.0.1")
    await server.start_server(access_log=None)
    try:
        yield server
    finally:
        await server.close()


def with_secrets(target: TestServer, path: str = "/", **extra: Any) -> dict[str, Any]:
    url = target.make_url(path).with_user("alice").with_password(PASSWORD)
    return {
        "name": "secret site",
        "url": str(url),
        "headers": {"X-Api-Key": KEY, "Authorization": f"Bearer {BEARER}", "X-Trace": "1"},
        "secret_headers": ["X-Api-Key"],
        **extra,
    }


def shown_url(target: TestServer, path: str = "/") -> str:
    return str(target.make_url(path).with_user("alice").with_password("***"))


def assert_masked(task: dict[str, Any], target: TestServer, path: str = "/") -> None:
    assert task["spec"]["url"] == shown_url(target, path)
    assert task["spec"]["headers"] == {"X-Api-Key": "***", "Authorization": "***", "X-Trace": "1"}


@pytest.fixture(params=["no token", "token"])
def api(request: pytest.FixtureRequest) -> tuple[Client, dict[str, str]]:
    """The API without API_TOKEN, and with it (requests then carry the token)."""
    if request.param == "token":
        return request.getfixturevalue("authed"), {"Authorization": f"Bearer {TOKEN}"}
    return request.getfixturevalue("client"), {}


async def test_no_read_route_shows_a_secret_with_or_without_the_token(
    api: tuple[Client, dict[str, str]], echo: TestServer, subtests: pytest.Subtests
) -> None:
    client, auth = api
    answers: dict[str, Any] = {}
    created = await client.post("/tasks", json=with_secrets(echo), headers=auth)
    answers["POST /tasks"] = await created.json()
    task_id = answers["POST /tasks"]["id"]
    path = f"/tasks/{task_id}"
    answers["GET /tasks/{id}"] = await (await client.get(path, headers=auth)).json()
    answers["GET /tasks"] = (await (await client.get("/tasks", headers=auth)).json())["tasks"][0]
    patched = await client.patch(path, json={"interval": 120}, headers=auth)
    answers["PATCH"] = await patched.json()
    put = await client.put(path, json=with_secrets(echo, interval=90), headers=auth)
    answers["PUT"] = await put.json()
    put_new = await client.put(
        f"/tasks/{uuid.uuid4()}", json=with_secrets(echo, name="other"), headers=auth
    )
    answers["PUT (created)"] = await put_new.json()
    answers["pause"] = await (await client.post(f"{path}/pause", json={}, headers=auth)).json()
    answers["resume"] = await (await client.post(f"{path}/resume", json={}, headers=auth)).json()

    for route, task in answers.items():
        with subtests.test(route):
            assert_masked(task, echo)
    run = await (await client.post(f"{path}/run", json={}, headers=auth)).json()
    assert run["result"]["ok"] is True
    assert run["result"]["url"] == shown_url(echo)
    assert run["result"]["final_url"] == shown_url(echo)


async def test_the_search_does_not_match_inside_a_password(
    client: Client, echo: TestServer
) -> None:
    await client.post("/tasks", json=with_secrets(echo))

    async def found(text: str) -> int:
        page = await (await client.get("/tasks", params={"q": text})).json()
        return len(page["tasks"])

    assert await found("alice") == 1
    assert await found(PASSWORD[:4]) == 0
    assert await found(KEY) == 0


async def test_a_task_read_and_written_back_keeps_its_secrets(
    client: Client, echo: TestServer, service: CheckerService
) -> None:
    created = await (await client.post("/tasks", json=with_secrets(echo))).json()
    path = f"/tasks/{created['id']}"
    read = await (await client.get(path)).json()
    spec = {**read["spec"], "timeout": 5}

    put = await client.put(path, json=spec)
    patched = await client.patch(path, json={"headers": read["spec"]["headers"]})
    moved = await client.patch(path, json={"url": shown_url(echo, "/?page=2")})

    assert (put.status, patched.status, moved.status) == (200, 200, 200), await moved.text()
    assert_masked(await moved.json(), echo, "/?page=2")
    stored = (await service.get(uuid.UUID(created["id"]))).spec
    assert stored.url == with_secrets(echo, "/?page=2")["url"]
    assert stored.headers == with_secrets(echo)["headers"]
    assert stored.timeout == 5
    # ... and the check still sends the real ones.
    await client.post(f"{path}/run", json={})
    seen = echo.app[SEEN][-1]
    assert seen["X-Api-Key"] == KEY
    assert seen["Authorization"] == f"Bearer {BEARER}"


async def test_user_info_alone_is_basic_auth(client: Client, echo: TestServer) -> None:
    url = str(echo.make_url("/").with_user("alice").with_password(PASSWORD))
    created = await (await client.post("/tasks", json={"name": "basic", "url": url})).json()
    await client.post(f"/tasks/{created['id']}/run", json={})

    credentials = base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
    assert echo.app[SEEN][-1]["Authorization"] == f"Basic {credentials}"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"url": "http://alice:***@localhost:9/"}, "url"),
        ({"url": "http://mallory:***@{host}/"}, "url"),
        ({"url": "http://localhost:9/"}, "headers.X-Api-Key"),
        ({"secret_headers": []}, "headers.X-Api-Key"),
    ],
    ids=["password-to-another-host", "password-for-another-user", "keys-to-another-host", "unmark"],
)
async def test_a_change_that_would_send_a_secret_elsewhere_is_refused(
    client: Client, echo: TestServer, service: CheckerService, change: dict[str, Any], field: str
) -> None:
    created = await (await client.post("/tasks", json=with_secrets(echo))).json()
    host = f"{echo.host}:{echo.port}"
    change = {k: v.format(host=host) if isinstance(v, str) else v for k, v in change.items()}

    response = await client.patch(f"/tasks/{created['id']}", json=change)

    answer = await response.json()
    assert response.status == 422, answer
    assert [d["field"] for d in answer["detail"]] == [field]
    text = await response.text()
    assert not any(secret in text for secret in SECRETS)
    stored = (await service.get(uuid.UUID(created["id"]))).spec
    assert stored.url == with_secrets(echo)["url"]


async def test_no_log_line_and_no_result_holds_a_secret(
    client: Client,
    echo: TestServer,
    service: CheckerService,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    # A failing check logs its error; this target quotes the key in its redirect.
    created = await (await client.post("/tasks", json=with_secrets(echo, "/loop"))).json()
    path = f"/tasks/{created['id']}"
    await client.patch(path, json={"interval": 30})
    run = await (await client.post(f"{path}/run", json={})).json()

    assert run["result"]["error"]["kind"] == "too_many_redirects"
    assert "key=***" in run["result"]["error"]["message"]
    assert "check of task" in caplog.text  # the failure was logged
    messages = [encode(task, result)[1].decode() for task, result in published(service)]
    for secret in SECRETS:
        assert secret not in caplog.text
        assert not [m for m in messages if secret in m]
