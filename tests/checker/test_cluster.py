"""Cluster mode, with two real checker nodes and the real broker over mutual TLS: the task topic is
the source of truth and each node's SQLite store a view of it. A change through one node is read
through the other, a client reads its own write, names stay unique when two nodes race for one,
a record produced by hand shows the same on every node, a restarted node rebuilds its view, and
with the broker away a change is refused and nothing changes."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from checker.nodes import DEADLINE, Node, Topics, produce, records_of

from periodic_checker.names import claim_key, claim_value
from periodic_checker.store import SQLiteTaskStore

from conftest import KafkaTarget
from helpers import start_checker, wait_for

pytestmark = pytest.mark.kafka

DEAD = "http://127.0.0.1:9/"
SPEC = {"name": "shop", "url": DEAD, "interval": 60, "timeout": 5}
RACES = 20


@pytest.fixture
def nodes(kafka: KafkaTarget, topics: Topics, tmp_path: Path) -> Iterator[tuple[Node, Node]]:
    a = Node("node-a", kafka, topics, tmp_path, mode="cluster")
    b = Node("node-b", kafka, topics, tmp_path, mode="cluster")
    try:
        a.start()
        b.start()
        yield a, b
    finally:
        a.kill()
        b.kill()


def shown(node: Node) -> dict[str, tuple[str, str, str | None]]:
    """A node's tasks as (id, status, reason) by name."""
    return {
        name: (task["id"], task["status"], task["status_reason"])
        for name, task in node.tasks().items()
    }


def test_a_change_through_one_node_is_read_through_the_other(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    status, made = a.call("POST", "/tasks", SPEC)
    assert status == 201, made
    path = f"/tasks/{made['id']}"
    assert a.call("GET", path) == (200, made)  # its own write, at once
    wait_for(lambda: b.call("GET", path)[0] == 200, "the task on node B", DEADLINE)

    renamed = {**SPEC, "name": "shop renamed", "interval": 30}
    status, replaced = b.call("PUT", path, renamed)  # PUT by id through the other node
    assert status == 200, replaced
    assert (replaced["spec"]["name"], replaced["spec"]["interval"]) == ("shop renamed", 30)
    wait_for(
        lambda: a.call("GET", path)[1]["spec"]["name"] == "shop renamed", "the rename on A", 10
    )
    again = a.call("PUT", path, renamed)  # the same PUT again: the same task
    assert (again[0], again[1]["id"], again[1]["spec"]) == (200, made["id"], replaced["spec"])

    paused = b.call("POST", f"{path}/pause")
    assert (paused[0], paused[1]["status"]) == (200, "paused")
    wait_for(lambda: a.call("GET", path)[1]["status"] == "paused", "the pause on A", DEADLINE)

    assert a.call("DELETE", path)[0] == 204
    assert a.call("GET", path)[0] == 404
    wait_for(lambda: b.call("GET", path)[0] == 404, "the task gone from B", DEADLINE)
    # The name is free again on every node.
    status, reborn = b.call("POST", "/tasks", SPEC)
    assert status == 201, reborn


def test_a_new_task_put_by_id_through_either_node(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    task_id = str(uuid.uuid4())
    status, made = b.call("PUT", f"/tasks/{task_id}", SPEC)
    assert (status, made["id"]) == (201, task_id)
    wait_for(lambda: a.call("GET", f"/tasks/{task_id}")[0] == 200, "the task on A", DEADLINE)
    assert a.call("PUT", f"/tasks/{task_id}", SPEC)[0] == 200


def race(nodes: tuple[Node, ...], name: str) -> list[int]:
    """POST one name through every node at the same moment; the statuses, sorted."""
    start = threading.Barrier(len(nodes))
    answers: dict[str, int] = {}

    def create(node: Node) -> None:
        start.wait()
        answers[node.name] = node.call("POST", "/tasks", {**SPEC, "name": name})[0]

    threads = [threading.Thread(target=create, args=(node,)) for node in nodes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(DEADLINE)
    return sorted(answers.values())


def test_two_creates_of_one_name_through_two_nodes_give_one_201_and_one_409(
    nodes: tuple[Node, Node],
) -> None:
    a, b = nodes
    outcomes = [race(nodes, f"raced-{n}") for n in range(RACES)]

    claims = [line for n in (a, b) for line in n.text().splitlines() if "claimed for" in line]
    assert outcomes == [[201, 409]] * RACES, "\n".join(claims)
    for node in (a, b):
        wait_for(
            lambda node=node: len(node.task_list()) == RACES, f"every winner on {node.name}", 10
        )
        named = sorted(task["spec"]["name"] for task in node.task_list())
        assert named == sorted(f"raced-{race}" for race in range(RACES))  # one task each


def test_a_bad_record_produced_by_hand_shows_the_same_on_every_node(
    kafka: KafkaTarget, topics: Topics, nodes: tuple[Node, Node]
) -> None:
    a, b = nodes
    task_id = str(uuid.uuid4())
    bad = {"spec": {**SPEC, "name": "by hand", "timeout": 600}}
    produce(kafka, topics.tasks, task_id.encode(), json.dumps(bad).encode())
    produce(kafka, topics.tasks, b"not-a-task-id", b"{}")

    seen = [
        wait_for(lambda n=n: shown(n).get("by hand"), f"the task on {n.name}", DEADLINE)
        for n in (a, b)
    ]

    assert seen[0] == seen[1]
    assert seen[0][:2] == (task_id, "error")
    assert seen[0][2] is not None
    assert "invalid task record: spec.timeout" in seen[0][2]
    for node in (a, b):
        wait_for(
            lambda node=node: node.metric("periodic_checker_task_records_rejected_total") == 1,
            f"the unusable record counted on {node.name}",
            DEADLINE,
        )
        assert "b'not-a-task-id' is not a task id" in node.text()
    # Fixing it through the API makes it a task like any other, on every node.
    fixed = a.call("PUT", f"/tasks/{task_id}", {**SPEC, "name": "by hand"})
    assert (fixed[0], fixed[1]["status"]) == (200, "active")
    wait_for(lambda: shown(b)["by hand"][1] == "active", "the fix on B", DEADLINE)


def test_a_restarted_node_rebuilds_its_view_from_the_topic(
    kafka: KafkaTarget, topics: Topics, nodes: tuple[Node, Node]
) -> None:
    a, b = nodes
    made = [a.call("POST", "/tasks", {**SPEC, "name": f"t{i}"})[1] for i in range(3)]
    wait_for(lambda: len(b.tasks()) == 3, "three tasks on B", DEADLINE)
    assert b.stop() == 0
    # While B is away: one task removed, one paused, one added.
    assert a.call("DELETE", f"/tasks/{made[0]['id']}")[0] == 204
    assert a.call("POST", f"/tasks/{made[1]['id']}/pause")[0] == 200
    assert a.call("POST", "/tasks", {**SPEC, "name": "t3"})[0] == 201

    b.start()  # READY only once it has read the whole task topic
    assert shown(b) == shown(a)
    assert set(shown(b)) == {"t1", "t2", "t3"}
    # The names topic is read once it serves: caught up on both soon after.
    wait_for(lambda: b.status()["task_topic_caught_up"] is True, "caught up", DEADLINE)
    # The view is committed into SQLite's log before READY, copied into its file after.
    wait_for(lambda: "task view copied into the store's file" in b.text(), "checkpoint", DEADLINE)

    assert b.stop() == 0
    b.storage.unlink()  # from nothing at all
    for suffix in ("-wal", "-shm"):
        Path(f"{b.storage}{suffix}").unlink(missing_ok=True)
    b.start()
    assert shown(b) == shown(a)


def test_a_node_just_ready_refuses_a_name_claimed_before_it_started(
    kafka: KafkaTarget, topics: Topics, nodes: tuple[Node, Node]
) -> None:
    # The names topic is read after READY; a write waits for its own claim, so every claim
    # before it counts all the same. A claim made by hand while B is away (a create in flight
    # on another node: no task record yet) holds the name.
    _, b = nodes
    assert b.stop() == 0
    in_flight = uuid.uuid4()
    now = datetime.now(UTC)
    produce(kafka, topics.names, claim_key("held", in_flight), claim_value("held", in_flight, now))
    b.start()

    refused = b.call("POST", "/tasks", {**SPEC, "name": "held"})
    made = b.call("POST", "/tasks", {**SPEC, "name": "free"})

    assert refused[0] == 409, refused
    assert made[0] == 201, made
    claims = [line for line in b.text().splitlines() if "name 'held' claimed for task" in line]
    assert len(claims) == 1
    assert ": lost" in claims[0]


def test_records_without_a_task_id_read_at_start_are_counted_and_logged(
    kafka: KafkaTarget, topics: Topics, nodes: tuple[Node, Node]
) -> None:
    a, b = nodes
    assert b.stop() == 0
    produce(kafka, topics.tasks, None, b"{}")
    produce(kafka, topics.tasks, None, b"{}")
    produce(kafka, topics.tasks, b"not-a-task-id", b"{}")
    assert a.call("POST", "/tasks", SPEC)[0] == 201
    b.start()  # reads them all before READY
    assert set(b.tasks()) == {"shop"}
    assert b.metric("periodic_checker_task_records_rejected_total") == 3
    started = b.text().rsplit("started:", 1)[0]
    assert started.count("record has no key") == 2
    assert "b'not-a-task-id' is not a task id" in started


def test_a_node_stopped_before_it_could_read_the_topic_exits_0_and_keeps_its_view(
    kafka: KafkaTarget, topics: Topics, nodes: tuple[Node, Node]
) -> None:
    broker = kafka.require_local()
    a, b = nodes
    for i in range(3):
        assert a.call("POST", "/tasks", {**SPEC, "name": f"t{i}"})[0] == 201
    wait_for(lambda: len(b.tasks()) == 3, "three tasks on B", DEADLINE)
    before = shown(b)
    assert b.stop() == 0
    broker.stop_proxy()
    try:
        assert b.proc is not None
        starts = b.text().count("started:")
        b.proc = start_checker(b.env(), b.log)  # waits for the broker to read the topic
        time.sleep(3)
        assert b.proc.poll() is None, b.text()
        assert b.text().count("started:") == starts  # not READY: the topic is not read
        assert b.stop() == 0
        assert "Traceback" not in b.text()  # nor from the state topic's reader, still starting
    finally:
        broker.start_proxy()
    # Its view was not emptied by the rebuild it began: the same tasks, read without the broker.
    stored = SQLiteTaskStore(b.storage)
    try:
        loaded = stored.load(datetime.now(UTC))
        kept = {t.spec.name: (str(t.id), str(t.status), t.status_reason) for t in loaded}
    finally:
        stored.close()
    assert kept == before
    b.start()
    assert shown(b) == before


def test_with_the_broker_away_a_change_is_refused_and_nothing_changes(
    kafka: KafkaTarget, topics: Topics, nodes: tuple[Node, Node]
) -> None:
    broker = kafka.require_local()
    a, b = nodes
    status, made = a.call("POST", "/tasks", SPEC)
    assert status == 201
    wait_for(lambda: "shop" in b.tasks(), "the task on B", DEADLINE)
    broker.stop_proxy()
    try:
        refused = a.call("POST", f"/tasks/{made['id']}/pause")
        created = b.call("POST", "/tasks", {**SPEC, "name": "while away"})
        reads = a.call("GET", f"/tasks/{made['id']}")  # reading works without the broker
    finally:
        broker.start_proxy()
    assert refused[0] == 503, refused
    assert refused[1]["error"] == "broker_unavailable"
    assert created[0] == 503, created
    assert reads[0] == 200
    assert reads[1]["status"] == "active"
    # Nothing of either change is anywhere once the broker is back.
    assert a.call("GET", f"/tasks/{made['id']}")[1]["status"] == "active"
    assert a.call("POST", "/tasks", {**SPEC, "name": "after"})[0] == 201
    for node in (a, b):
        wait_for(lambda node=node: "after" in node.tasks(), "a later change", DEADLINE)
        assert set(node.tasks()) == {"shop", "after"}
    assert [r["status"] for r in records_of(kafka, topics.tasks, made["id"]) if r] == ["active"]


def test_a_node_publishes_a_task_ending_by_itself_and_every_node_shows_it(
    kafka: KafkaTarget, topics: Topics, nodes: tuple[Node, Node]
) -> None:
    a, b = nodes
    status, made = a.call("POST", "/tasks", {**SPEC, "name": "once", "interval": None})
    assert status == 201, made

    def done(node: Node) -> Any:
        return node.tasks().get("once", {}).get("status") == "done"  # B may not have it yet

    wait_for(lambda: done(a) and done(b), "the task done on both nodes", DEADLINE)
    statuses = [r["status"] for r in records_of(kafka, topics.tasks, made["id"]) if r]
    assert statuses[0] == "active"
    assert set(statuses[1:]) == {"done"}
