"""End to end in cluster mode: two real checker nodes and the real processor, the real broker
behind mutual TLS and a real PostgreSQL. A task created through node A and checked by the
cluster opens an incident in PostgreSQL when its target is down; removing it through node B
closes that incident with the reason `task_removed`, dates the task's removal and takes it out
of `latest_results`; its history stays."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from checker.nodes import DEADLINE, Node, Topics
from faults.faults_support import Daemon, fresh_schema, processor_env, query

from conftest import KafkaTarget
from helpers import wait_for

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]

DEAD = "http://127.0.0.1:9/"  # nothing listens on port 9: every check fails at once


@pytest.fixture
def dsn(pg_dsn: str) -> Iterator[str]:
    with fresh_schema(pg_dsn) as schema_dsn:
        yield schema_dsn


def test_a_task_removed_through_another_node_closes_its_incident_in_postgresql(
    kafka: KafkaTarget, dsn: str, tmp_path: Path
) -> None:
    topics = Topics.make(kafka)
    a = Node("node-a", kafka, topics, tmp_path, mode="cluster")
    b = Node("node-b", kafka, topics, tmp_path, mode="cluster")
    env = processor_env(kafka, topics.results, dsn, KAFKA_TASKS_TOPIC=topics.tasks)
    processor = Daemon.processor(env, tmp_path / "processor.log")
    try:
        a.start()
        b.start()
        status, made = a.call(
            "POST", "/tasks", {"name": "shop", "url": DEAD, "interval": 1, "timeout": 0.5}
        )
        assert status == 201, made
        task_id = made["id"]

        def open_incident() -> bool:
            rows = query(
                dsn,
                "SELECT count(*) FROM incidents WHERE task_id = %s AND ended_at IS NULL",
                task_id,
            )
            return bool(rows) and rows[0][0] == 1

        wait_for(open_incident, "an open incident in PostgreSQL", DEADLINE)
        assert query(dsn, "SELECT health FROM latest_results WHERE task_id = %s", task_id) == [
            ("down",)
        ]

        status, _ = b.call("DELETE", f"/tasks/{task_id}")
        assert status == 204

        def closed_by_removal() -> list[tuple[object, ...]]:
            return query(
                dsn,
                "SELECT end_reason FROM incidents WHERE task_id = %s AND ended_at IS NOT NULL",
                task_id,
            )

        assert wait_for(closed_by_removal, "the incident closed", DEADLINE) == [("task_removed",)]
        assert query(
            dsn, "SELECT removed_at IS NOT NULL FROM tasks WHERE task_id = %s", task_id
        ) == [(True,)]
        assert query(dsn, "SELECT count(*) FROM latest_results WHERE task_id = %s", task_id) == [
            (0,)
        ]
        assert query(dsn, "SELECT count(*) > 0 FROM check_results WHERE task_id = %s", task_id) == [
            (True,)
        ]
        assert processor.alive()
    finally:
        a.kill()
        b.kill()
        processor.kill()
