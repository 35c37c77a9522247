"""What the probe sends across redirects, and that its results hold no secret.

Two local servers on different ports (so another origin: same host, other port): `first`
redirects (`/to?url=...&code=...`), `second` echoes; each records the headers it received.
Every test runs on both engines: a fresh connection (`http1`) and the keep-alive aiohttp
session (`keepalive: true`).
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web
from checker.targets import SEEN, Seen, make_app, serve
from yarl import URL

from checker_common.contract import ErrorKind, decode, encode
from checker_common.task_spec import TaskSpec
from periodic_checker.probe import Prober

TASK = uuid.UUID("00000000-0000-4000-8000-000000000002")
ENGINES = pytest.mark.parametrize("keepalive", [False, True], ids=["fresh", "keepalive"])


@dataclass
class Servers:
    first: URL
    second: URL
    first_app: web.Application
    second_app: web.Application

    def seen(self) -> tuple[list[Seen], list[Seen]]:
        return self.first_app[SEEN], self.second_app[SEEN]

    def redirect(self, to: str, code: int = 302) -> str:
        """A URL on `first` that redirects to `to` (absolute, or a path on `first`)."""
        return str((self.first / "to").with_query(url=to, code=str(code)))


@pytest.fixture
async def servers() -> AsyncIterator[Servers]:
    first_app, second_app = make_app(), make_app()
    async with serve(first_app) as first, serve(second_app) as second:
        assert first.port != second.port
        yield Servers(first, second, first_app, second_app)


@pytest.fixture
async def prober() -> AsyncIterator[Prober]:
    async with Prober() as started:
        yield started


def spec(url: str, keepalive: bool, **fields: Any) -> TaskSpec:
    return TaskSpec(name="secrets", url=url, interval=None, keepalive=keepalive, **fields)


def basic(credentials: str) -> str:
    return "Basic " + base64.b64encode(credentials.encode()).decode("ascii")


# --- headers across a redirect to another origin ------------------------------------------


@ENGINES
async def test_credential_headers_stop_at_another_origin(
    servers: Servers, prober: Prober, keepalive: bool
) -> None:
    credentials = {
        "Authorization": "Bearer t0ken",
        "Cookie": "session=c00kie",
        "Proxy-Authorization": "Basic cHJveHk6cHc=",
    }
    url = servers.redirect(str(servers.second / "echo"))
    result = await prober.check(TASK, spec(url, keepalive, headers=credentials))

    (first,), (second,) = servers.seen()
    assert result.ok
    assert result.redirects == 1
    assert {name: first.headers.get(name) for name in credentials} == credentials
    assert not set(credentials) & set(second.headers)


@ENGINES
async def test_credential_headers_follow_a_redirect_on_the_same_origin(
    servers: Servers, prober: Prober, keepalive: bool
) -> None:
    headers = {"Authorization": "Bearer t0ken", "Cookie": "session=c00kie"}
    result = await prober.check(TASK, spec(servers.redirect("/echo"), keepalive, headers=headers))

    _, second = servers.seen()[0]
    assert result.ok
    assert result.redirects == 1
    assert second.path == "/echo"
    assert second.headers["Authorization"] == "Bearer t0ken"
    assert second.headers["Cookie"] == "session=c00kie"


@ENGINES
async def test_user_info_is_basic_auth_on_the_same_origin_only(
    servers: Servers, prober: Prober, keepalive: bool
) -> None:
    # /to -> /to (same origin, relative) -> second (another port)
    onward = str((URL("/to")).with_query(url=str(servers.second / "echo")))
    url = URL(servers.redirect(onward)).with_user("al@ice").with_password("pa:ss wörd")
    result = await prober.check(TASK, spec(str(url), keepalive))

    (hop1, hop2), (hop3,) = servers.seen()
    assert result.ok
    assert result.redirects == 2
    assert hop1.headers["Authorization"] == basic("al@ice:pa:ss wörd")
    assert hop2.headers["Authorization"] == basic("al@ice:pa:ss wörd")
    assert "Authorization" not in hop3.headers


@ENGINES
async def test_the_tasks_own_authorization_wins_over_user_info(
    servers: Servers, prober: Prober, keepalive: bool
) -> None:
    url = (servers.first / "echo").with_user("alice").with_password("s3cret")
    headers = {"authorization": "Bearer mine"}
    result = await prober.check(TASK, spec(str(url), keepalive, headers=headers))

    (only,) = servers.seen()[0]
    assert result.ok
    assert only.headers["Authorization"] == "Bearer mine"


@ENGINES
async def test_secret_headers_stop_at_another_origin_but_follow_the_same_one(
    servers: Servers, prober: Prober, keepalive: bool
) -> None:
    onward = str(URL("/to").with_query(url=str(servers.second / "echo")))
    headers = {"X-Api-Key": "k3y", "X-Other-Secret": "0ther"}
    task = spec(
        servers.redirect(onward),
        keepalive,
        headers=headers,
        secret_headers=["x-api-key", "X-Other-Secret"],
    )
    result = await prober.check(TASK, task)

    (hop1, hop2), (hop3,) = servers.seen()
    assert result.ok
    assert result.redirects == 2
    for hop in (hop1, hop2):
        assert hop.headers["X-Api-Key"] == "k3y"
        assert hop.headers["X-Other-Secret"] == "0ther"
    assert "X-Api-Key" not in hop3.headers
    assert "X-Other-Secret" not in hop3.headers


@ENGINES
async def test_an_ordinary_custom_header_follows_to_another_origin_like_curl(
    servers: Servers, prober: Prober, keepalive: bool
) -> None:
    url = servers.redirect(str(servers.second / "echo"))
    result = await prober.check(TASK, spec(url, keepalive, headers={"X-Trace": "kept"}))

    (first,), (second,) = servers.seen()
    assert result.ok
    assert first.headers["X-Trace"] == "kept"
    assert second.headers["X-Trace"] == "kept"


@ENGINES
async def test_a_custom_host_is_kept_on_the_same_origin_only(
    servers: Servers, prober: Prober, keepalive: bool
) -> None:
    onward = str(URL("/to").with_query(url=str(servers.second / "echo")))
    headers = {"Host": "virtual.example"}
    result = await prober.check(TASK, spec(servers.redirect(onward), keepalive, headers=headers))

    (hop1, hop2), (hop3,) = servers.seen()
    assert result.ok
    assert result.redirects == 2
    assert hop1.headers["Host"] == "virtual.example"
    assert hop2.headers["Host"] == "virtual.example"
    # curl would keep it across the port change; it named the first server, not this one.
    assert hop3.headers["Host"] == f"127.0.0.1:{servers.second.port}"


# --- the body's headers after a redirect that drops the body -------------------------------


@ENGINES
@pytest.mark.parametrize(
    ("code", "method", "body"),
    [
        (301, "GET", ""),
        (302, "GET", ""),
        (303, "GET", ""),
        (307, "POST", "payload"),
        (308, "POST", "payload"),
    ],
)
async def test_body_headers_go_with_the_body(
    servers: Servers, prober: Prober, keepalive: bool, code: int, method: str, body: str
) -> None:
    headers = {
        "Content-Type": "application/json",
        "Content-Language": "en",
        "Content-Encoding": "identity",
        "Content-Location": "/payload",
        "X-Trace": "kept",
    }
    task = spec(
        servers.redirect("/echo", code),
        keepalive,
        method="POST",
        body="payload",
        headers=headers,
    )
    result = await prober.check(TASK, task)

    first, second = servers.seen()[0]
    assert result.ok
    assert (first.method, second.method) == ("POST", method)
    assert first.headers["Content-Type"] == "application/json"
    assert second.headers["X-Trace"] == "kept"
    body_headers = {name: second.headers.get(name) for name in headers if name != "X-Trace"}
    if body:
        assert body_headers == {name: headers[name] for name in body_headers}
        assert second.headers["Content-Length"] == str(len(body))
    else:
        assert body_headers == dict.fromkeys(body_headers)
        assert second.headers.get("Content-Length", "0") == "0"


# --- what leaves in a result --------------------------------------------------------------


@ENGINES
async def test_a_result_message_carries_no_password(
    servers: Servers, prober: Prober, keepalive: bool
) -> None:
    url = URL(servers.redirect("/ok")).with_user("alice").with_password("hunter2")
    result = await prober.check(TASK, spec(str(url), keepalive))

    _, value = encode(TASK, result)
    sent = decode(value).result
    assert result.ok
    assert "hunter2" not in value.decode()
    assert sent.url == str(URL(servers.redirect("/ok")).with_user("alice").with_password("***"))
    assert sent.final_url == str(servers.first / "ok")
    # ... while the server did get the password.
    assert servers.seen()[0][0].headers["Authorization"] == basic("alice:hunter2")


@ENGINES
async def test_an_error_message_carries_no_secret_even_when_the_server_echoes_it(
    servers: Servers, prober: Prober, keepalive: bool
) -> None:
    # A hostile target puts the task's secrets into the Location the message quotes.
    location = str((servers.second / "echo").with_query(key="k3y", pw="hunter2"))
    url = URL(servers.redirect(location)).with_user("alice").with_password("hunter2")
    task = spec(
        str(url),
        keepalive,
        headers={"X-Api-Key": "k3y"},
        secret_headers=["X-Api-Key"],
        max_redirects=0,
    )
    result = await prober.check(TASK, task)

    # (The task's own URL quotes them too, in its query: that is the task's choice.)
    _, value = encode(TASK, result)
    message = json.loads(value)[str(TASK)]["error"]["message"]
    assert result.error is not None
    assert result.error.kind is ErrorKind.TOO_MANY_REDIRECTS
    assert message.endswith("(next: " + str(servers.second / "echo") + "?key=***&pw=***)")
