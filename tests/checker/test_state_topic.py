"""The state topic's reader against the real broker: a node learns the topic while it starts
and fetches nothing of it until it follows it (once it serves), and a node whose state topic
does not exist says so and stops, having read its task topic or not."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from checker.nodes import Node, Topics, node_settings, produce

from periodic_checker.task_state import TaskStates

from conftest import KafkaTarget
from helpers import start_checker

pytestmark = pytest.mark.kafka


async def test_the_state_topic_is_fetched_only_once_followed(
    kafka: KafkaTarget, topics: Topics, tmp_path: Path
) -> None:
    # A consumer fetches what is assigned to it whether it is read or not: a node that
    # assigned 100,000 state records while it started held them all at READY.
    produce(kafka, topics.states, b"\x00fence:node-b", b"{}")
    states = TaskStates(node_settings(kafka, topics, tmp_path))
    await states.start(follow=False)
    try:
        assert states._consumer.assignment() == []

        states.follow()

        assigned = {(p.topic, p.partition) for p in states._consumer.assignment()}
        assert assigned == {(topics.states, p) for p in range(3)}
        await _read_to_the_end(states)
    finally:
        await states.stop()


async def _read_to_the_end(states: TaskStates) -> None:
    """Until the one record on the topic is read (30 s at most)."""
    for _ in range(600):
        if sum(states._next.values()) >= 1:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the state topic's record was never read")


def test_a_node_without_its_state_topic_says_so_and_stops(
    kafka: KafkaTarget, topics: Topics, tmp_path: Path
) -> None:
    node = Node(
        "node-a",
        kafka,
        topics,
        tmp_path,
        mode="cluster",
        extra={"KAFKA_TASK_STATE_TOPIC": f"{topics.states}-missing"},
    )
    try:
        node.proc = start_checker(node.env(), node.log)
        code = node.proc.wait(60)
    finally:
        node.kill()

    assert code == 1
    assert f"KAFKA_TASK_STATE_TOPIC: topic {topics.states}-missing does not exist" in node.text()
    assert "Traceback" not in node.text()
