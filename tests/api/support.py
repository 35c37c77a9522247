"""Shared pieces of the API tests (not fixtures): settings, and the checker's real task service
(SQLite store, scheduler, probe) with results collected by a recording publisher; the Kafka
publisher has its own tests."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient
from pydantic import SecretStr

from checker_common.contract import CheckResult
from periodic_checker.checker_service import CheckerService
from periodic_checker.policy import TargetPolicy
from periodic_checker.probe import Prober
from periodic_checker.scheduler import CheckScheduler
from periodic_checker.settings import CheckerSettings
from periodic_checker.store import SQLiteTaskStore

TOKEN = "test-token-0123456789abcdef"

Client = TestClient[web.Request, web.Application]
ClientFactory = Callable[..., Awaitable[Client]]


def make_settings(certs: Path, token: str | None = None, **extra: Any) -> CheckerSettings:
    return CheckerSettings(
        kafka_connection="127.0.0.1:9",
        kafka_ca_path=certs / "ca.pem",
        kafka_cert_path=certs / "client.pem",
        kafka_key_file=certs / "client.key",
        kafka_cert_pass=SecretStr((certs / "client.pass").read_text().strip()),
        api_token=SecretStr(token) if token else None,
        **extra,
    )


@dataclass
class RecordingPublisher:
    results: list[tuple[uuid.UUID, CheckResult]] = field(default_factory=list)

    def publish(self, task_id: uuid.UUID, result: CheckResult) -> None:
        self.results.append((task_id, result))


@asynccontextmanager
async def checker_service(
    path: Path, *, max_tasks: int = 1000, service_class: type[CheckerService] = CheckerService
) -> AsyncIterator[CheckerService]:
    """The daemon's task service over a fresh store, started; stopped on exit."""
    store = SQLiteTaskStore(path, max_tasks=max_tasks)
    policy = TargetPolicy()
    prober = Prober(policy=policy)
    await prober.start()
    scheduler = CheckScheduler(store, prober, RecordingPublisher(), flush_interval=0.2)
    service = service_class(store, scheduler, policy=policy)
    await scheduler.start(store.load(datetime.now(UTC)))
    try:
        yield service
    finally:
        await scheduler.stop(grace=5)
        await prober.close()
        store.close()
        await asyncio.sleep(0)


def published(service: CheckerService) -> list[tuple[uuid.UUID, CheckResult]]:
    publisher = service.scheduler.publisher
    assert isinstance(publisher, RecordingPublisher)
    return publisher.results
