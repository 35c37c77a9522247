"""Each task endpoint through a real app instance, and real targets for /run."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from api.support import Client, ClientFactory, checker_service, make_settings, published

from periodic_checker.api.app import create_app
from periodic_checker.checker_service import CheckerService


def spec(name: str = "example", url: str = "http://127.0.0.1:9/", **extra: Any) -> dict[str, Any]:
    return {"name": name, "url": url, **extra}


async def create(client: Client, **fields: Any) -> dict[str, Any]:
    response = await client.post("/tasks", json=spec(**fields))
    assert response.status == 201, await response.text()
    body: dict[str, Any] = await response.json()
    return body


async def test_create_answers_201_with_location_and_the_task(client: Client) -> None:
    response = await client.post("/tasks", json=spec(interval=30, timeout=5))
    assert response.status == 201
    body = await response.json()
    assert response.headers["Location"] == f"/tasks/{body['id']}"
    assert body["spec"]["name"] == "example"
    assert body["spec"]["interval"] == 30
    assert body["status"] == "active"
    assert body["health"] == "unknown"


async def test_get_returns_the_created_task(client: Client) -> None:
    created = await create(client)
    response = await client.get(f"/tasks/{created['id']}")
    assert response.status == 200
    assert await response.json() == created


async def test_put_creates_then_replaces_under_the_same_id(client: Client) -> None:
    task_id = uuid.uuid4()
    first = await client.put(f"/tasks/{task_id}", json=spec())
    assert first.status == 201
    assert first.headers["Location"] == f"/tasks/{task_id}"
    retried = await client.put(f"/tasks/{task_id}", json=spec())
    assert retried.status == 200
    replaced = await client.put(f"/tasks/{task_id}", json=spec(interval=120))
    assert replaced.status == 200
    assert (await replaced.json())["spec"]["interval"] == 120
    listed = await (await client.get("/tasks")).json()
    assert [t["id"] for t in listed["tasks"]] == [str(task_id)]


async def test_patch_changes_only_the_fields_sent(client: Client) -> None:
    created = await create(client, interval=60, timeout=10, pattern="ok")
    response = await client.patch(f"/tasks/{created['id']}", json={"timeout": 20})
    assert response.status == 200
    changed = (await response.json())["spec"]
    assert changed["timeout"] == 20
    assert changed["interval"] == 60
    assert changed["pattern"] == "ok"


async def test_patch_null_interval_makes_a_one_off_check(client: Client) -> None:
    created = await create(client)
    response = await client.patch(f"/tasks/{created['id']}", json={"interval": None})
    assert response.status == 200
    assert (await response.json())["spec"]["interval"] is None


async def test_patch_validates_the_merged_definition(client: Client) -> None:
    created = await create(client, interval=60, timeout=10)
    response = await client.patch(f"/tasks/{created['id']}", json={"interval": 5})
    assert response.status == 422
    body = await response.json()
    assert [d["field"] for d in body["detail"]] == ["timeout"]


async def test_delete_answers_204_and_the_task_is_gone(client: Client) -> None:
    created = await create(client)
    response = await client.delete(f"/tasks/{created['id']}", json={})
    assert response.status == 204
    assert await response.read() == b""
    assert (await client.get(f"/tasks/{created['id']}")).status == 404
    assert (await client.delete(f"/tasks/{created['id']}", json={})).status == 404


async def test_remove_task_is_the_first_versions_delete(client: Client) -> None:
    created = await create(client)
    response = await client.post("/remove_task", json={"id": created["id"]})
    assert response.status == 204
    assert response.headers["Deprecation"] == "true"
    assert (await client.get(f"/tasks/{created['id']}")).status == 404


async def test_pause_and_resume(client: Client) -> None:
    created = await create(client)
    paused = await client.post(f"/tasks/{created['id']}/pause", json={})
    assert paused.status == 200
    assert (await paused.json())["status"] == "paused"
    resumed = await client.post(f"/tasks/{created['id']}/resume", json={})
    assert resumed.status == 200
    assert (await resumed.json())["status"] == "active"


async def test_resume_of_a_done_task_is_a_conflict(client: Client) -> None:
    past = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    created = await create(client, end_at=past)
    assert created["status"] == "done"
    response = await client.post(f"/tasks/{created['id']}/resume", json={})
    assert response.status == 409
    assert (await response.json())["error"] == "invalid_change"


async def test_run_returns_the_result_of_a_check_of_the_real_target(
    client: Client, target: TestServer, service: CheckerService
) -> None:
    created = await create(client, url=str(target.make_url("/")), pattern="systems? nominal")
    response = await client.post(f"/tasks/{created['id']}/run", json={})
    assert response.status == 200
    body = await response.json()
    assert body["task_id"] == created["id"]
    result = body["result"]
    assert result["ok"] is True
    assert result["status"] == 200
    assert result["pattern_search"] == "match"
    assert result["url"] == str(target.make_url("/"))
    # ... and publishes it like any scheduled result.
    assert (uuid.UUID(created["id"]), result["result_id"]) in {
        (tid, str(r.result_id)) for tid, r in published(service)
    }


async def test_run_reports_a_failing_target_as_data(client: Client, target: TestServer) -> None:
    created = await create(client, url=str(target.make_url("/status/503")))
    response = await client.post(f"/tasks/{created['id']}/run", json={})
    assert response.status == 200
    result = (await response.json())["result"]
    assert result["ok"] is False
    assert result["status"] == 503
    assert result["error"]["kind"] == "status"


async def test_list_pages_with_a_cursor_until_the_end(client: Client) -> None:
    made = [(await create(client, name=f"site-{i}"))["id"] for i in range(5)]
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        response = await client.get("/tasks", params=params)
        assert response.status == 200
        page = await response.json()
        seen += [task["id"] for task in page["tasks"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == made
    assert pages == 3


async def test_list_filters_by_status_and_text(client: Client) -> None:
    await create(client, name="shop front", url="http://shop.example/")
    blog = await create(client, name="blog", url="http://blog.example/")
    await client.post(f"/tasks/{blog['id']}/pause", json={})

    paused = await (await client.get("/tasks", params={"status": "paused"})).json()
    assert [t["spec"]["name"] for t in paused["tasks"]] == ["blog"]
    by_url = await (await client.get("/tasks", params={"q": "SHOP.example"})).json()
    assert [t["spec"]["name"] for t in by_url["tasks"]] == ["shop front"]
    by_health = await (await client.get("/tasks", params={"health": "up"})).json()
    assert by_health["tasks"] == []


async def test_list_refuses_a_cursor_it_did_not_make(client: Client) -> None:
    response = await client.get("/tasks", params={"cursor": "not-a-cursor"})
    assert response.status == 422
    assert (await response.json())["detail"][0]["field"] == "cursor"


async def test_a_used_name_is_a_conflict(client: Client) -> None:
    await create(client, name="twice")
    response = await client.post("/tasks", json=spec(name="twice"))
    assert response.status == 409
    body = await response.json()
    assert body["error"] == "name_taken"
    assert body["detail"][0]["field"] == "name"


async def test_the_task_limit_is_a_conflict_that_says_so(
    aiohttp_client: ClientFactory, dev_certs: Path, tmp_path: Path
) -> None:
    async with checker_service(tmp_path / "small.sqlite3", max_tasks=2) as small:
        client = await aiohttp_client(create_app(small, make_settings(dev_certs)))
        await assert_limit_refused(client)


async def assert_limit_refused(client: Client) -> None:
    await create(client, name="a")
    await create(client, name="b")
    response = await client.post("/tasks", json=spec(name="c"))
    assert response.status == 409
    body = await response.json()
    assert body["error"] == "too_many_tasks"
    assert "maximum of 2" in body["message"]


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/",
        "http://[::ffff:0:a9fe:a9fe]/",  # SIIT
        "http://[64:ff9b:1::a9fe:a9fe]/",  # local-use NAT64
    ],
)
async def test_a_denied_target_is_422_naming_url(client: Client, url: str) -> None:
    response = await client.post("/tasks", json=spec(url=url))
    assert response.status == 422
    body = await response.json()
    assert body["error"] == "target_denied"
    assert body["detail"][0]["field"] == "url"
    assert "169.254.0.0/16" in body["detail"][0]["message"]


async def test_unknown_id_is_404_on_every_task_route(client: Client) -> None:
    path = f"/tasks/{uuid.uuid4()}"
    for method, suffix, body in [
        ("GET", "", None),
        ("PATCH", "", {"timeout": 1}),
        ("DELETE", "", {}),
        ("POST", "/pause", {}),
        ("POST", "/resume", {}),
        ("POST", "/run", {}),
    ]:
        response = await client.request(method, path + suffix, json=body)
        assert response.status == 404, (method, suffix)
        assert (await response.json())["error"] == "not_found"


async def test_100_concurrent_creates_give_100_scheduled_tasks(
    client: Client, service: CheckerService
) -> None:
    responses = await asyncio.gather(
        *(client.post("/tasks", json=spec(name=f"site-{i}", interval=3600)) for i in range(100))
    )
    assert sorted(r.status for r in responses) == [201] * 100
    ids = {(await r.json())["id"] for r in responses}
    assert len(ids) == 100
    assert all(service.scheduler.next_fire(uuid.UUID(i)) is not None for i in ids)
    listed = await (await client.get("/tasks", params={"limit": "1000"})).json()
    assert len(listed["tasks"]) == 100
