"""Checker nodes as real processes for the task topic's tests: start, stop, call the API, read
and write the topics as another program would (not fixtures)."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition

from devstack import create_topics, free_port, stop_process
from periodic_checker.settings import CheckerSettings
from periodic_checker.store import MIGRATIONS
from periodic_checker.tasks import Task

from conftest import KafkaTarget
from helpers import start_checker, wait_for

DEADLINE = 60.0


@dataclass
class Topics:
    """A test's own results, task, names and state topics."""

    results: str
    tasks: str
    names: str
    states: str

    @classmethod
    def make(cls, kafka: KafkaTarget) -> Topics:
        base = f"test-{uuid.uuid4().hex[:12]}"
        topics = cls(base, f"{base}-tasks", f"{base}-names", f"{base}-state")
        create_topics(
            kafka.client_config(),
            [topics.results, topics.tasks, topics.names, topics.states],
            partitions=3,
            compacted=frozenset({topics.tasks, topics.names, topics.states}),
            partitions_of={topics.names: 1},
        )
        return topics


def node_settings(
    kafka: KafkaTarget, topics: Topics, directory: Path, mode: str = "cluster"
) -> CheckerSettings:
    """The settings of node-a run in-process: this test's topics, its store in `directory`."""
    env: dict[str, Any] = {k.lower(): v for k, v in kafka.env().items()}
    return CheckerSettings(
        **env,
        kafka_topic=topics.results,
        kafka_tasks_topic=topics.tasks,
        kafka_task_names_topic=topics.names,
        kafka_task_state_topic=topics.states,
        checker_mode=mode,
        checker_node_id="node-a",
        task_storage=directory / "tasks.sqlite3",
    )


@dataclass
class Node:
    """One `periodic-checker run` process with its own SQLite file and API port."""

    name: str
    kafka: KafkaTarget
    topics: Topics
    directory: Path
    mode: str = "single"
    extra: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def storage(self) -> Path:
        return self.directory / f"{self.name}.sqlite3"

    @property
    def log(self) -> Path:
        return self.directory / f"{self.name}.log"

    def env(self) -> dict[str, str]:
        return {
            **self.kafka.env(),
            "KAFKA_TOPIC": self.topics.results,
            "KAFKA_TASKS_TOPIC": self.topics.tasks,
            "KAFKA_TASK_NAMES_TOPIC": self.topics.names,
            "KAFKA_TASK_STATE_TOPIC": self.topics.states,
            # A group per test: nodes of other tests follow other topics.
            "CHECKER_GROUP_ID": f"{self.topics.tasks}-nodes",
            # Short, as in the other group tests: joins and failover in seconds here.
            "KAFKA_SESSION_TIMEOUT_MS": "3000",
            "CHECKER_MODE": self.mode,
            "CHECKER_NODE_ID": self.name,
            "TASK_STORAGE": str(self.storage),
            "API_HOST": "127.0.0.1",
            "API_PORT": str(self.port),
            "LOG_LEVEL": "INFO",
            "SHUTDOWN_TIMEOUT": "10",
            **self.extra,
        }

    def start(self) -> Node:
        """Start and wait until it is ready (READY: in cluster mode, the topic is read)."""
        starts = self.log.read_text().count("started:") if self.log.exists() else 0
        self.proc = start_checker(self.env(), self.log)

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited {self.proc.returncode}:\n{self.text()}")
            return self.text().count("started:") > starts

        wait_for(ready, f"{self.name} to start", DEADLINE)
        return self

    def stop(self) -> int:
        """SIGTERM; the exit status."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(DEADLINE)
        finally:
            stop_process(self.proc)

    def kill(self) -> None:
        """Stop it if it runs (SIGTERM, then SIGKILL), and reap it."""
        if self.proc is not None:
            stop_process(self.proc)

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """(status, JSON body) of one API request; changes send JSON (`{}` when no body)."""
        data = None
        headers = {}
        if method != "GET":
            data = json.dumps({} if body is None else body).encode()
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}", data=data, method=method, headers=headers
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                raw = response.read()
                return response.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            return exc.code, json.loads(raw) if raw else None

    def task_list(self) -> list[dict[str, Any]]:
        """Every task, as the API lists them (all pages)."""
        found: list[dict[str, Any]] = []
        cursor = ""
        while True:
            status, page = self.call("GET", f"/tasks?limit=1000{cursor}")
            assert status == 200, page
            found += page["tasks"]
            if not page["next_cursor"]:
                return found
            cursor = f"&cursor={page['next_cursor']}"

    def tasks(self) -> dict[str, dict[str, Any]]:
        """Every task by name."""
        return {task["spec"]["name"]: task for task in self.task_list()}

    def status(self) -> dict[str, Any]:
        status, body = self.call("GET", "/status")
        assert status == 200, body
        return dict(body["extra"])

    def metric(self, name: str) -> float:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/metrics")
        with urllib.request.urlopen(request, timeout=30) as response:
            for line in response.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
        return 0.0


def read_topic(
    kafka: KafkaTarget, topic: str, partitions: int = 3
) -> list[tuple[int, int, bytes | None, bytes | None]]:
    """Every record of the topic now: (partition, offset, key, value), each partition in order."""
    consumer = Consumer(
        kafka.client_config(
            **{
                "group.id": f"test-{uuid.uuid4().hex[:8]}",
                "enable.auto.commit": False,
                "enable.partition.eof": True,
                # The end is a fetch that finds nothing new. The local broker holds a fetch for
                # its whole wait (500 ms by default), so while nodes keep producing (40 tasks at
                # 2 s: a record every 150 ms a partition) every answer had records and a
                # partition could fail to reach its end within the deadline (seen once in CI).
                "fetch.wait.max.ms": 10,
                "fetch.queue.backoff.ms": 10,
            }
        )
    )
    found = []
    try:
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
        ended: set[int] = set()
        deadline = time.monotonic() + DEADLINE
        while len(ended) < partitions:
            assert time.monotonic() < deadline, f"{topic} was not read to its end"
            for message in consumer.consume(500, 0.5):
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        ended.add(message.partition())
                    continue
                found.append(
                    (message.partition(), message.offset(), message.key(), message.value())
                )
    finally:
        consumer.close()
    return found


def records_of(kafka: KafkaTarget, topic: str, task_id: str) -> list[dict[str, Any] | None]:
    """The values of one task's records in topic order (None: a tombstone)."""
    return [
        None if value is None else json.loads(value)
        for _, _, key, value in sorted(read_topic(kafka, topic))
        if key == task_id.encode()
    ]


def produce(kafka: KafkaTarget, topic: str, key: bytes | None, value: bytes | None) -> None:
    """One record, as another program would write it (confluent-kafka's default partitioner,
    the one the checker uses too)."""
    producer = Producer(kafka.client_config())
    producer.produce(topic, key=key, value=value)
    assert producer.flush(30) == 0


# The outbox as the release before the task topic made it.
PREVIOUS_OUTBOX = """
CREATE TABLE outbox (seq INTEGER PRIMARY KEY, task_id TEXT NOT NULL, key BLOB NOT NULL,
                     value BLOB NOT NULL, added_at REAL NOT NULL);
CREATE INDEX outbox_task_seq ON outbox (task_id, seq);
CREATE TABLE outbox_set_aside (id INTEGER PRIMARY KEY AUTOINCREMENT, seq INTEGER NOT NULL,
                               task_id TEXT NOT NULL, key BLOB NOT NULL, value BLOB NOT NULL,
                               reason TEXT NOT NULL, set_aside_at REAL NOT NULL);
"""


def previous_release_store(
    path: Path, tasks: list[Task], results: list[tuple[str, bytes, bytes]] = ()
) -> None:
    """A SQLite file as the release before the task topic left it: tasks at schema 2 (names
    UNIQUE, no topic columns), and an outbox of results (task id, key, value) without topics."""
    with sqlite3.connect(path) as db:
        for step in MIGRATIONS[:2]:
            for statement in step:
                db.execute(statement)
        for task in tasks:
            db.execute(
                "INSERT INTO tasks (id, name, url, spec, status, health, runs, failures_in_a_row,"
                " created_at, updated_at, manual_runs) VALUES (?, ?, ?, ?, ?, 'up', 4, 0, ?, ?, 1)",
                (str(task.id), task.spec.name, task.spec.url, task.spec.model_dump_json(),
                 str(task.status), task.created_at.isoformat(), task.updated_at.isoformat()),
            )  # fmt: skip
        db.execute("PRAGMA user_version = 2")
        db.executescript(PREVIOUS_OUTBOX)
        for seq, (task_id, key, value) in enumerate(results, start=1):
            db.execute("INSERT INTO outbox VALUES (?, ?, ?, ?, 0)", (seq, task_id, key, value))
    db.close()
