"""Cluster mode: every node shows the health the owner of a task measured (the state mirror),
not what it saw the last time it ran the task itself, or `unknown`."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from checker.nodes import DEADLINE, Node, Topics

from checker_common.contract import Health
from checker_common.task_spec import TaskSpec
from periodic_checker.state_mirror import mirrored
from periodic_checker.task_state import StateKind, TaskState
from periodic_checker.tasks import Task

from conftest import KafkaTarget
from helpers import wait_for

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
# A task lands on a node by its id: this many without one on each node is (2/3)^40 unlikely.
MOST_TASKS = 40


def task() -> Task:
    spec = TaskSpec(name="shop", url="http://shop.example/", interval=60, timeout=5)
    return Task(id=uuid.uuid4(), spec=spec, created_at=NOW, updated_at=NOW)


def state(of: Task, *, node: str = "node-a", record: tuple[int, int] | None = (0, 7)) -> TaskState:
    return TaskState(
        task_id=of.id,
        kind=StateKind.RUNNING,
        node=node,
        at=NOW,
        health=Health.DOWN,
        failures_in_a_row=4,
        runs=12,
        manual_runs=1,
        last_run_at=NOW,
        record=record,
    )


def test_the_owners_state_of_the_same_record_brings_its_health() -> None:
    mine = task()
    shown = mirrored(mine, state(mine), (0, 7), node_id="node-b")
    assert shown is not None
    assert (shown.health, shown.failures_in_a_row, shown.runs) == (Health.DOWN, 4, 12)
    assert shown.spec is mine.spec


def test_a_state_measured_under_another_record_brings_its_counters_only() -> None:
    mine = task()
    shown = mirrored(mine, state(mine, record=(0, 3)), (0, 7), node_id="node-b")
    assert shown is not None
    assert shown.health is Health.UNKNOWN
    assert shown.runs == 12


def test_this_nodes_own_state_and_a_state_with_nothing_new_change_nothing() -> None:
    mine = task()
    assert mirrored(mine, state(mine, node="node-b"), (0, 7), node_id="node-b") is None
    seen = mirrored(mine, state(mine), (0, 7), node_id="node-b")
    assert seen is not None
    assert mirrored(seen, state(mine), (0, 7), node_id="node-b") is None


@pytest.fixture
def nodes(kafka: KafkaTarget, tmp_path: Path) -> Iterator[tuple[Node, Node]]:
    topics = Topics.make(kafka)
    # A state snapshot a second, so that the owners tell quickly.
    extra = {"CHECKER_STATE_SNAPSHOT_INTERVAL": "1"}
    made = [
        Node(name, kafka, topics, tmp_path, mode="cluster", extra=extra)
        for name in ("node-a", "node-b")
    ]
    try:
        yield made[0].start(), made[1].start()
    finally:
        for node in made:
            node.kill()


@pytest.mark.kafka
def test_every_node_shows_the_health_the_owner_measured(nodes: tuple[Node, Node]) -> None:
    a, b = nodes

    def owned() -> list[int]:
        return [int(node.status()["tasks_owned"]) for node in (a, b)]

    wait_for(
        lambda: all(node.status()["owned_partitions"] for node in (a, b)),
        "both nodes owning partitions",
        DEADLINE,
    )
    # Tasks until each node runs some (a task's partition comes from its id): each node then
    # shows tasks it runs and tasks the other runs.
    made = 0
    while not all(owned()):
        assert made < MOST_TASKS, f"{made} tasks, all on one node: {owned()}"
        spec = {"name": f"t{made}", "url": "http://127.0.0.1:1/", "interval": 2, "timeout": 1}
        status, body = a.call("POST", "/tasks", spec)
        assert status == 201, body
        made += 1
        wait_for(lambda n=made: sum(owned()) == n, "the new task owned by a node", DEADLINE)

    def all_down_everywhere() -> bool:
        return all(
            {t["health"] for t in node.task_list()} == {"down"}
            and node.call("GET", "/status")[1]["tasks_by_health"] == {"down": made}
            for node in (a, b)
        )

    wait_for(all_down_everywhere, "every task down on both nodes (list and /status)", DEADLINE)
