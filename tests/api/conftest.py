"""Fixtures of the API tests: the app over the checker's real task service, a real target."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from api.support import TOKEN, Client, ClientFactory, checker_service, make_settings

from periodic_checker.api.app import create_app
from periodic_checker.checker_service import CheckerService
from periodic_checker.settings import CheckerSettings


@pytest.fixture(scope="session")
def open_settings(dev_certs: Path) -> CheckerSettings:
    return make_settings(dev_certs)


@pytest.fixture(scope="session")
def token_settings(dev_certs: Path) -> CheckerSettings:
    return make_settings(dev_certs, TOKEN)


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[CheckerService]:
    async with checker_service(tmp_path / "tasks.sqlite3", max_tasks=200) as running:
        yield running


@pytest.fixture
async def client(
    aiohttp_client: ClientFactory, service: CheckerService, open_settings: CheckerSettings
) -> Client:
    """The API with no token: every route open."""
    return await aiohttp_client(create_app(service, open_settings))


@pytest.fixture
async def authed(
    aiohttp_client: ClientFactory, service: CheckerService, token_settings: CheckerSettings
) -> Client:
    """The API with API_TOKEN set: mutating routes need the bearer token."""
    return await aiohttp_client(create_app(service, token_settings))


async def _page(request: web.Request) -> web.Response:
    page = "<html><body>all systems nominal</body></html>"
    return web.Response(text=page, content_type="text/html")


async def _status(request: web.Request) -> web.Response:
    return web.Response(status=int(request.match_info["code"]), text="status page")


@pytest.fixture
async def target() -> AsyncIterator[TestServer]:
    """A real HTTP server the checks can reach: / answers 200, /status/{code} that status."""
    app = web.Application()
    app.add_routes([web.get("/", _page), web.get("/status/{code}", _status)])
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield server
    finally:
        await server.close()
