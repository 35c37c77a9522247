"""Bearer token on mutating routes; health, status, metrics, OpenAPI and the offline Swagger UI."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass

import pytest
from api.support import TOKEN, Client
from prometheus_client import REGISTRY, Counter

from checker_common.contract import NODE_PATTERN
from checker_common.task_spec import (
    HEADER_NAME_PATTERN,
    HEADER_VALUE_PATTERN,
    NAME_PATTERN,
    STATUS_RANGES_PATTERN,
    TAG_PATTERN,
)
from checker_common.urls import URL_PATTERN
from periodic_checker.api.openapi import build_openapi
from periodic_checker.api.routes import ROUTES
from periodic_checker.checker_service import CheckerService
from periodic_checker.producer import PublisherStats
from periodic_checker.task_service import CURSOR_PATTERN

TASK = {"name": "site", "url": "http://127.0.0.1:9/"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


MUTATIONS = [
    ("POST", "/tasks"),
    ("PUT", "/tasks/{id}"),
    ("PATCH", "/tasks/{id}"),
    ("DELETE", "/tasks/{id}"),
    ("POST", "/tasks/{id}/pause"),
    ("POST", "/tasks/{id}/resume"),
    ("POST", "/tasks/{id}/run"),
    ("POST", "/remove_task"),
]


async def test_with_a_token_set_mutating_routes_refuse_without_it(
    authed: Client, service: CheckerService, subtests: pytest.Subtests
) -> None:
    for method, path in MUTATIONS:
        for token in [None, "wrong-token-0123456789", ""]:
            with subtests.test(f"{method} {path}", token=token):
                headers = {} if token is None else bearer(token)
                url = path.format(id=uuid.uuid4())
                response = await authed.request(method, url, json=TASK, headers=headers)
                assert response.status == 401
                assert response.headers["WWW-Authenticate"].startswith("Bearer")
                assert (await response.json())["error"] == "unauthorized"
    assert service.scheduler.tasks == {}


async def test_with_the_token_mutating_routes_work(authed: Client) -> None:
    created = await authed.post("/tasks", json=TASK, headers=bearer(TOKEN))
    assert created.status == 201
    task_id = (await created.json())["id"]
    paused = await authed.post(f"/tasks/{task_id}/pause", json={}, headers=bearer(TOKEN))
    assert paused.status == 200
    deleted = await authed.delete(f"/tasks/{task_id}", json={}, headers=bearer(TOKEN))
    assert deleted.status == 204


async def test_with_a_token_set_reads_stay_open(authed: Client) -> None:
    created = await authed.post("/tasks", json=TASK, headers=bearer(TOKEN))
    task_id = (await created.json())["id"]
    reads = ["/", "/tasks", f"/tasks/{task_id}", "/health", "/status", "/metrics", "/openapi.json"]
    for path in reads:
        assert (await authed.get(path)).status == 200, path


async def test_without_a_token_mutating_routes_are_open(client: Client) -> None:
    response = await client.post("/tasks", json=TASK)
    assert response.status == 201


async def test_health_answers_while_the_loop_turns(client: Client) -> None:
    response = await client.get("/health")
    assert response.status == 200
    assert await response.json() == {"status": "ok"}


async def test_status_reports_the_services_numbers(client: Client) -> None:
    await client.post("/tasks", json=TASK)
    body = await (await client.get("/status")).json()
    assert body["tasks_by_status"] == {"active": 1}
    assert body["tasks_by_health"] == {"unknown": 1}
    for key in [
        "checks_in_flight",
        "schedule_lag_p99",
        "producer_queue",
        "outbox_size",
        "broker_reachable",
        "last_delivered_at",
        "version",
    ]:
        assert key in body


@dataclass
class PublisherFigures:
    """What the Kafka publisher reports, as a source of `stats()` for the service."""

    figures: PublisherStats

    def stats(self) -> PublisherStats:
        return self.figures


async def test_status_names_the_publisher_counters_for_what_the_checker_saw(
    client: Client, service: CheckerService
) -> None:
    service.publisher = PublisherFigures(
        PublisherStats(
            queue_length=2, outbox_size=3, broker_reachable=True, last_delivered_at=None,
            delivered=11, failed=5, in_flight=2, max_in_flight=100, stored=7, dropped=1,
        )
    )  # fmt: skip
    body = await (await client.get("/status")).json()
    assert (body["producer_queue"], body["outbox_size"], body["broker_reachable"]) == (2, 3, True)
    expected = {"deliveries": 11, "delivery_failures": 5, "outbox_writes": 7, "results_dropped": 1}
    assert {key: body["extra"].get(key) for key in expected} == expected
    # A result written to the checker's outbox is not a result the processor stored.
    assert "results_stored" not in body["extra"]


async def test_metrics_are_the_default_registry_in_prometheus_text(client: Client) -> None:
    name = f"api_test_{uuid.uuid4().hex[:8]}"
    counter = Counter(name, "a counter registered by other code")
    counter.inc(3)
    try:
        response = await client.get("/metrics")
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        assert f"{name}_total 3.0" in await response.text()
    finally:
        REGISTRY.unregister(counter)


async def test_requests_are_counted_by_route_pattern(client: Client) -> None:
    created = await client.post("/tasks", json=TASK)
    await client.get(f"/tasks/{(await created.json())['id']}")
    await client.get("/no/such/route")
    text = await (await client.get("/metrics")).text()
    for series in [
        'periodic_checker_api_requests_total{method="POST",route="/tasks",status="201"}',
        'periodic_checker_api_requests_total{method="GET",route="/tasks/{id}",status="200"}',
        'periodic_checker_api_requests_total{method="GET",route="unmatched",status="404"}',
    ]:
        assert series in text, series


async def test_openapi_is_3_1_and_describes_every_api_route(client: Client) -> None:
    document = await (await client.get("/openapi.json")).json()
    assert document["openapi"].startswith("3.1")
    described = {
        (method.upper(), path)
        for path, item in document["paths"].items()
        for method in item
        if method != "parameters"
    }
    served = {
        (route.method, route.path)
        for route in ROUTES
        if not route.path.startswith(("/docs", "/openapi"))
    }
    assert served == described
    task_spec = document["components"]["schemas"]["TaskSpec"]
    assert task_spec["additionalProperties"] is False
    assert document == build_openapi(document["info"]["version"])


async def test_the_address_up_prints_is_a_page_whose_links_all_answer(client: Client) -> None:
    page = await client.get("/")
    assert page.status == 200
    assert page.content_type == "text/html"
    links = re.findall(r'href="([^"]+)"', await page.text())
    assert {"docs/", "openapi.json", "tasks", "status", "health", "metrics"} <= set(links)
    for link in links:
        assert (await client.get(f"/{link}")).status == 200, link


async def test_swagger_ui_is_served_from_the_package_without_a_cdn(client: Client) -> None:
    redirect = await client.get("/docs", allow_redirects=False)
    assert redirect.status == 302
    page = await client.get("/docs/")
    assert page.status == 200
    html = await page.text()
    sources = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert sources
    assert not [s for s in sources if "//" in s]
    for source in sources:
        asset = await client.get(f"/docs/{source}")
        assert asset.status == 200, source
    init = await (await client.get("/docs/swagger-init.js")).text()
    assert "../openapi.json" in init


async def test_docs_do_not_serve_other_files(client: Client) -> None:
    for name in ["..%2Fapp.py", "SWAGGER-UI-LICENSE", ".hidden.js", "missing.js"]:
        assert (await client.get(f"/docs/{name}")).status == 404, name


def patterns_in(node: object) -> list[str]:
    """The `pattern` of every schema in a document (not of example payloads)."""
    if isinstance(node, dict):
        found = [node["pattern"]] if isinstance(node.get("pattern"), str) else []
        inner = [v for k, v in node.items() if k not in ("example", "examples")]
        return found + [p for value in inner for p in patterns_in(value)]
    if isinstance(node, list):
        return [p for value in node for p in patterns_in(value)]
    return []


def test_every_pattern_in_the_document_is_one_the_validators_use() -> None:
    jsonschema_rs = pytest.importorskip("jsonschema_rs")  # schemathesis's validator (ECMA 262)
    document = build_openapi("test")
    patterns = set(patterns_in(document))
    assert patterns == {
        NAME_PATTERN,
        URL_PATTERN,
        HEADER_NAME_PATTERN,
        HEADER_VALUE_PATTERN,
        STATUS_RANGES_PATTERN,
        CURSOR_PATTERN,
        TAG_PATTERN,
        NODE_PATTERN,  # a result's node (the run-now answer is a result)
    }
    for pattern in patterns:  # a pattern a JSON Schema validator cannot read is ignored by it
        jsonschema_rs.validator_for({"type": "string", "pattern": pattern})
