"""Single mode, with real processes and the real broker over mutual TLS: the SQLite store is the
source of truth and the task topic a copy of it. Every change reaches the topic in order (also
through the outbox while the broker is away, and across a restart), a store made by the
previous release is published once, and another program creates, changes and removes checks by
writing records, each validated as the API validates."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from checker.nodes import (
    DEADLINE,
    Node,
    Topics,
    previous_release_store,
    produce,
    read_topic,
    records_of,
)

from checker_common.contract import CheckResult, encode
from checker_common.task_spec import TaskSpec
from periodic_checker.tasks import Task

from conftest import ROOT, KafkaTarget
from helpers import wait_for

pytestmark = pytest.mark.kafka

SCHEMA = jsonschema.Draft202012Validator(
    json.loads((ROOT / "schema" / "task-record.schema.json").read_text())
)
DEAD = "http://127.0.0.1:9/"  # nothing listens: a check fails at once
SPEC = {"name": "shop", "url": DEAD, "interval": 60, "timeout": 5}


@pytest.fixture
def node(kafka: KafkaTarget, topics: Topics, tmp_path: Path) -> Any:
    one = Node("node-a", kafka, topics, tmp_path)
    yield one
    one.kill()


def summary(record: dict[str, Any] | None) -> tuple[str, ...] | None:
    """What a test reads of a record: status, name and interval, and who wrote it."""
    if record is None:
        return None
    SCHEMA.validate(record)
    return (record["status"], record["spec"]["name"], str(record["spec"]["interval"]),
            record.get("origin") or "-")  # fmt: skip


def test_every_change_reaches_the_task_topic_in_order(
    kafka: KafkaTarget, topics: Topics, node: Node
) -> None:
    node.start()
    status, task = node.call("POST", "/tasks", SPEC)
    assert status == 201, task
    path = f"/tasks/{task['id']}"
    assert node.call("PATCH", path, {"interval": 30})[0] == 200
    assert node.call("POST", f"{path}/pause")[0] == 200
    assert node.call("POST", f"{path}/resume")[0] == 200
    assert node.call("PUT", path, {**SPEC, "name": "shop renamed", "interval": 30})[0] == 200
    assert node.call("DELETE", path)[0] == 204

    expected = [
        ("active", "shop", "60.0", "node-a"),
        ("active", "shop", "30.0", "node-a"),
        ("paused", "shop", "30.0", "node-a"),
        ("active", "shop", "30.0", "node-a"),
        ("active", "shop renamed", "30.0", "node-a"),
        None,  # the tombstone
    ]
    found = wait_for(
        lambda: (
            (r := [summary(x) for x in records_of(kafka, topics.tasks, task["id"])]) == expected
            and r
        ),
        "the six records of the task in order",
        DEADLINE,
    )
    assert found == expected


def test_a_task_that_ends_by_itself_is_published_done(
    kafka: KafkaTarget, topics: Topics, node: Node
) -> None:
    node.start()
    status, task = node.call("POST", "/tasks", {**SPEC, "name": "once", "interval": None})
    assert status == 201, task

    def ended() -> list[tuple[str, ...] | None]:
        return [summary(r) for r in records_of(kafka, topics.tasks, task["id"])]

    wait_for(lambda: len(ended()) == 2, "the record of the task's end", DEADLINE)
    assert ended() == [("active", "once", "None", "node-a"), ("done", "once", "None", "node-a")]
    assert records_of(kafka, topics.tasks, task["id"])[1]["status_reason"] == "one-shot task ran"


def test_changes_made_while_the_broker_is_away_wait_in_the_outbox_across_a_restart(
    kafka: KafkaTarget, topics: Topics, tmp_path: Path
) -> None:
    broker = kafka.require_local()
    # A short delivery time-out: records librdkafka cannot deliver go to the outbox soon.
    node = Node("node-a", kafka, topics, tmp_path, extra={"KAFKA_MESSAGE_TIMEOUT_MS": "1000"})
    node.start()
    try:
        broker.stop_proxy()
        try:
            status, task = node.call("POST", "/tasks", SPEC)  # works without the broker
            assert status == 201, task
            assert node.call("POST", f"/tasks/{task['id']}/pause")[0] == 200
            assert node.status()["task_records_waiting"] == 2
            assert node.stop() == 0  # what librdkafka held goes to the outbox
        finally:
            broker.start_proxy()
        node.start()
        wait_for(
            lambda: (
                [summary(r) for r in records_of(kafka, topics.tasks, task["id"])]
                == [("active", "shop", "60.0", "node-a"), ("paused", "shop", "60.0", "node-a")]
            ),
            "both records, in order, after the restart",
            DEADLINE,
        )
        wait_for(lambda: node.status()["task_records_waiting"] == 0, "nothing waiting", DEADLINE)
        assert node.status()["task_records_published"] == 0  # sent from the outbox, not again
    finally:
        node.kill()


def test_a_store_of_the_previous_release_is_published_once(
    kafka: KafkaTarget, topics: Topics, node: Node
) -> None:
    now = datetime.now(UTC)
    tasks = [
        Task(
            id=uuid.uuid4(),
            spec=TaskSpec(name=f"old-{i}", url=DEAD, interval=3600, timeout=5),
            created_at=now,
            updated_at=now,
        )
        for i in range(3)
    ]
    waiting = CheckResult(
        result_id=uuid.uuid4(), name="old-0", url=DEAD, timestamp=now, load_time=0.1, ok=False
    )
    key, value = encode(tasks[0].id, waiting)
    previous_release_store(node.storage, tasks, [(str(tasks[0].id), key, value)])

    node.start()
    published = {str(t.id) for t in tasks}
    assert node.status()["task_records_published"] == 3

    def on_topic() -> list[str]:
        return [k.decode() for _, _, k, _ in read_topic(kafka, topics.tasks) if k is not None]

    wait_for(lambda: sorted(on_topic()) == sorted(published), "the three tasks", DEADLINE)
    # The result the old outbox held goes where results go.
    wait_for(
        lambda: any(v == value for _, _, _, v in read_topic(kafka, topics.results)),
        "the result from the old outbox on the results topic",
        DEADLINE,
    )
    assert node.stop() == 0
    node.start()
    assert node.status()["task_records_published"] == 0  # published once: not again
    assert sorted(on_topic()) == sorted(published)
    origins = {json.loads(v)["origin"] for *_, v in read_topic(kafka, topics.tasks) if v}
    assert origins == {"node-a"}


def test_another_program_creates_changes_and_removes_a_check_through_the_topic(
    kafka: KafkaTarget, topics: Topics, node: Node
) -> None:
    node.start()
    task_id = str(uuid.uuid4())
    record = {"schema_version": 1, "id": task_id, "spec": {**SPEC, "name": "from outside"}}
    produce(kafka, topics.tasks, task_id.encode(), json.dumps(record).encode())
    made = wait_for(lambda: node.tasks().get("from outside"), "the task on the API", DEADLINE)
    assert (made["id"], made["status"]) == (task_id, "active")

    produce(
        kafka, topics.tasks, task_id.encode(), json.dumps({**record, "status": "paused"}).encode()
    )
    wait_for(
        lambda: node.tasks()["from outside"]["status"] == "paused", "the task paused", DEADLINE
    )
    produce(kafka, topics.tasks, task_id.encode(), None)
    wait_for(lambda: "from outside" not in node.tasks(), "the task removed", DEADLINE)
    assert node.call("GET", f"/tasks/{task_id}")[0] == 404
    assert node.status()["task_records_republished"] == 0  # the topic said what SQLite has


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ({**SPEC, "name": "bad url", "url": "ftp://shop.example.net/"}, "spec.url"),
        ({**SPEC, "name": "bad timeout", "timeout": 90}, "spec.timeout"),
        ({**SPEC, "name": "metadata", "url": "http://169.254.169.254/"}, "target refused"),
    ],
)
def test_a_record_the_api_would_refuse_makes_a_task_in_error_with_the_reason(
    kafka: KafkaTarget, topics: Topics, node: Node, spec: dict[str, Any], reason: str
) -> None:
    node.start()
    task_id = str(uuid.uuid4())
    produce(kafka, topics.tasks, task_id.encode(), json.dumps({"spec": spec}).encode())

    task = wait_for(lambda: node.tasks().get(spec["name"]), "the task in error", DEADLINE)

    assert (task["id"], task["status"]) == (task_id, "error")
    assert reason in task["status_reason"]
    assert node.call("POST", f"/tasks/{task_id}/run")[0] == 409  # it never runs


def test_a_record_for_a_name_another_task_has_is_refused_and_the_verdict_published(
    kafka: KafkaTarget, topics: Topics, node: Node
) -> None:
    node.start()
    status, first = node.call("POST", "/tasks", SPEC)
    assert status == 201, first
    task_id = str(uuid.uuid4())
    produce(kafka, topics.tasks, task_id.encode(), json.dumps({"spec": SPEC}).encode())

    def verdict() -> dict[str, Any] | None:
        records = records_of(kafka, topics.tasks, task_id)
        return records[-1] if len(records) == 2 else None

    record = wait_for(verdict, "the checker's verdict on the topic", DEADLINE)
    assert record is not None
    assert (record["status"], record["origin"]) == ("error", "node-a")
    assert record["status_reason"] == f"name 'shop' is taken by task {first['id']}"
    status, shown = node.call("GET", f"/tasks/{task_id}")
    assert (status, shown["status"], shown["status_reason"]) == (
        200,
        "error",
        record["status_reason"],
    )


def test_a_record_without_a_task_id_is_counted_logged_and_changes_nothing(
    kafka: KafkaTarget, topics: Topics, node: Node
) -> None:
    node.start()
    produce(kafka, topics.tasks, b"not-a-task-id", b"{}")
    produce(kafka, topics.tasks, None, b"{}")
    after = str(uuid.uuid4())
    produce(
        kafka,
        topics.tasks,
        after.encode(),
        json.dumps({"spec": {**SPEC, "name": "after"}}).encode(),
    )

    wait_for(lambda: "after" in node.tasks(), "the record after them applied", DEADLINE)
    wait_for(
        lambda: node.metric("periodic_checker_task_records_rejected_total") == 2,
        "two rejected records counted",
        DEADLINE,
    )
    assert "task record rejected" in node.text()
    assert "b'not-a-task-id' is not a task id" in node.text()
    assert set(node.tasks()) == {"after"}


def test_another_programs_record_is_overridden_by_a_change_of_the_checker_that_lands_after_it(
    kafka: KafkaTarget, topics: Topics, tmp_path: Path
) -> None:
    broker = kafka.require_local()
    node = Node("node-a", kafka, topics, tmp_path, extra={"KAFKA_MESSAGE_TIMEOUT_MS": "1000"})
    node.start()
    try:
        status, task = node.call("POST", "/tasks", SPEC)
        assert status == 201, task
        wait_for(lambda: records_of(kafka, topics.tasks, task["id"]), "the record", DEADLINE)
        broker.stop_proxy()
        try:
            assert node.call("POST", f"/tasks/{task['id']}/pause")[0] == 200  # in SQLite
            assert node.stop() == 0  # its record waits in the outbox
        finally:
            broker.start_proxy()
        # Meanwhile another program renames the task: its record lands first.
        outside = {"spec": {**SPEC, "name": "renamed outside"}, "status": "active"}
        produce(kafka, topics.tasks, task["id"].encode(), json.dumps(outside).encode())

        node.start()

        def last() -> tuple[str, ...] | None:
            records = records_of(kafka, topics.tasks, task["id"])
            return summary(records[-1]) if len(records) == 3 else None

        # The checker's pause lands after the other program's record: it is the last word,
        # on the topic as in SQLite.
        assert wait_for(last, "the pause after the rename", DEADLINE) == (
            "paused", "shop", "60.0", "node-a",
        )  # fmt: skip
        wait_for(lambda: node.status()["task_topic_caught_up"], "the topic read", DEADLINE)
        wait_for(lambda: node.status()["task_records_waiting"] == 0, "nothing waiting", DEADLINE)
        shown = node.call("GET", f"/tasks/{task['id']}")[1]
        assert (shown["spec"]["name"], shown["status"]) == ("shop", "paused")
        assert node.status()["task_records_republished"] == 0
    finally:
        node.kill()


def test_the_readmes_example_producer_creates_pauses_and_removes_a_check(
    kafka: KafkaTarget, topics: Topics, node: Node
) -> None:
    if kafka.password is None:
        pytest.skip("the README's example opens an encrypted key, as the local stack makes")
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Creating checks through the queue") :]
    code = section[section.index("```python\n") + 10 : section.index("```\n", 10)]
    # The example as written, pointed at the test's broker, certificates and topic.
    config = kafka.client_config()
    code = (
        code.replace('"localhost:9093"', repr(config["bootstrap.servers"]))
        .replace('"certs/dev/ca.pem"', repr(config["ssl.ca.location"]))
        .replace('"certs/dev/client.pem"', repr(config["ssl.certificate.location"]))
        .replace('"certs/dev/client.key"', repr(config["ssl.key.location"]))
        .replace('open("certs/dev/client.pass").read().strip()', repr(kafka.password))
        .replace('"checker-tasks"', repr(topics.tasks))
    )
    node.start()

    exec(compile(code, "README.md", "exec"), {})

    wait_for(lambda: node.status()["task_records_applied"] == 3, "three records applied", DEADLINE)
    assert node.tasks() == {}  # created, paused, removed
    assert "task record rejected" not in node.text()
