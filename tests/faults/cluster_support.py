"""The harness of the cluster fault scenarios (docs/cluster.md, RELIABILITY.md): checker nodes in
cluster mode as real processes, each reaching the broker through a TLS proxy of its own (so one
node can be cut off while the others are not), one processor, tasks written to the task topic
as another program would, and the tally per (task, slot) taken from the results topic.

    cluster = Cluster(kafka, Topics.make(kafka), dsn, tmp_path, target, own_proxies=True)
    cluster.seed(150)                   # task records on the task topic
    cluster.start_processor()
    for name in ("node-a", "node-b", "node-c"):
        cluster.node(name).start()
    cluster.settle()                    # every task owned, every task fired
    start = now()
    ...                                 # the fault
    window = Window("a node leaves", start, now(), fault_at=start)
    cluster.finish()                    # outboxes drained, nodes and processor stopped
    counts = tally(window, cluster.tasks, results(kafka, topics.results))

A slot is a (task, scheduled_at) pair: a task fires on a fixed grid shifted by an offset derived
from its id (`periodic_checker.tasks.next_fire_time`), the same on every node, so the slots a
task should have had between two moments are known exactly.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import subprocess
import time
import urllib.request
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from checker.nodes import Topics, read_topic
from confluent_kafka import Producer
from faults.faults_support import Target, checker_env, emit, processor_env, stored, wait_for

from checker_common.task_record import TaskRecord, encode
from checker_common.task_spec import TaskSpec
from devstack import (
    Broker,
    create_topics,
    start_process,
    stop_process,
    stunnel_binary,
    wait_for_port,
)
from periodic_checker.tasks import next_fire_time, start_offset

from daemons import Daemon
from helpers import KafkaTarget

FULL = os.environ.get("FAULTS_FULL") == "1"
# About 1,000 tasks at 5-10 s in the full version (about 130 checks/s over the cluster).
TASKS = 1000 if FULL else 150
INTERVALS = (5, 6, 7, 8, 9, 10)
SESSION_MS = 6000
OWN_LOCALHOST = Path(__file__).resolve().parent / "own_localhost.py"


def can_cut_one_node() -> bool:
    """A node can have its own `localhost` (a mount namespace of its own) only as root."""
    if os.geteuid() != 0 or shutil.which("mount") is None or shutil.which("unshare") is None:
        return False
    done = subprocess.run(["unshare", "-m", "true"], capture_output=True, timeout=30)
    return done.returncode == 0


class NodeProxy:
    """stunnel in front of the broker for one node, on 127.0.0.K at the broker's TLS port (the
    address the broker advertises, seen through the node's own /etc/hosts)."""

    def __init__(self, broker: Broker, address: str, run_dir: Path) -> None:
        self.broker = broker
        self.address = address
        self.run_dir = run_dir
        self.pid_file = run_dir / f"stunnel-{address}.pid"
        self.hosts = run_dir / f"hosts-{address}"
        self.hosts.write_text(f"{address} localhost\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        certs = self.broker.certs
        conf = self.run_dir / f"stunnel-{self.address}.conf"
        conf.write_text(
            "\n".join(
                [
                    "foreground = yes",
                    "pid =",
                    "debug = warning",
                    "[kafka]",
                    f"accept = {self.address}:{self.broker.tls_port}",
                    f"connect = 127.0.0.1:{self.broker.plain_port}",
                    f"cert = {certs / 'broker.pem'}",
                    f"key = {certs / 'broker.key'}",
                    f"CAfile = {certs / 'ca.pem'}",
                    "verifyChain = yes",
                    "requireCert = yes",
                    "",
                ]
            )
        )
        self.proc = start_process(
            [stunnel_binary(), str(conf)],
            self.run_dir / f"stunnel-{self.address}.log",
            self.pid_file,
        )
        wait_for_port(self.broker.tls_port, host=self.address)

    def stop(self) -> None:
        """Stop it: the node's connections are cut, new ones refused."""
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None
        self.pid_file.unlink(missing_ok=True)


@dataclass
class ClusterNode:
    """One checker node: `periodic-checker run` in cluster mode, started and stopped as often
    as a scenario wants (a log file per start)."""

    name: str
    env: dict[str, str]
    directory: Path
    proxy: NodeProxy | None = None
    daemon: Daemon | None = None
    starts: int = 0

    def start(self) -> ClusterNode:
        self.starts += 1
        log = self.directory / f"{self.name}-{self.starts}.log"
        if self.proxy is None:
            self.daemon = Daemon.checker(self.env, log)
        else:
            self.daemon = Daemon(OWN_LOCALHOST, self.env, log, args=[str(self.proxy.hosts)])
            self.daemon._started("started: ")
        return self

    def alive(self) -> bool:
        return self.daemon is not None and self.daemon.alive()

    def terminate(self) -> int:
        assert self.daemon is not None
        return self.daemon.terminate()

    def kill(self) -> None:
        if self.daemon is not None:
            self.daemon.kill()

    def status(self) -> dict[str, Any] | None:
        """GET /status, its `extra` merged in; None when it does not answer."""
        url = f"http://127.0.0.1:{self.env['API_PORT']}/status"
        try:
            with urllib.request.urlopen(url, timeout=5) as page:
                body = dict(json.load(page))
        except (OSError, ValueError):
            return None
        return {**body, **dict(body.get("extra") or {})}


@dataclass(frozen=True)
class Window:
    """The slots a phase is judged on: scheduled at or after `start`, before `end`; `fault_at`
    is when its fault began (for the failover time)."""

    name: str
    start: float
    end: float
    fault_at: float | None = None


@dataclass(frozen=True)
class SlotTally:
    """Per (task, slot) of a window: expected, checked once, checked twice (or more), missed;
    `failover_s`: from the fault to the last missed slot (0 when none was missed); `checks`:
    results of those slots, `by_node` the same by the result's `node` ("?" when it has none)."""

    name: str
    expected: int
    once: int
    twice: int
    missed: int
    failover_s: float
    checks: int = 0
    by_node: dict[str, int] = field(default_factory=dict)

    def report(self, **figures: Any) -> str:
        extra = " ".join(f"{k}={v}" for k, v in figures.items())
        nodes = ",".join(f"{n}:{c}" for n, c in sorted(self.by_node.items()))
        line = (
            f"FAULTS cluster {self.name}: expected={self.expected} once={self.once}"
            f" twice={self.twice} missed={self.missed} checks={self.checks}"
            f" failover_s={self.failover_s:.1f}"
            f" session_s={SESSION_MS / 1000:.0f} by_node={nodes or '-'} {extra}"
        ).rstrip()
        emit(line)
        return line


@dataclass(frozen=True)
class Result:
    task_id: uuid.UUID
    scheduled_at: float
    node: str | None
    result_id: str


def results(kafka: KafkaTarget, topic: str) -> list[Result]:
    """Every scheduled result in the results topic (manual runs have no slot)."""
    found = []
    for _partition, _offset, _key, value in read_topic(kafka, topic):
        if value is None:
            continue
        with contextlib.suppress(ValueError, AttributeError):
            ((task, body),) = json.loads(value).items()
            scheduled = body.get("scheduled_at")
            if scheduled is None:
                continue
            at = datetime.fromisoformat(scheduled.replace("Z", "+00:00")).timestamp()
            found.append(Result(uuid.UUID(task), at, body.get("node"), body["result_id"]))
    return found


def tally(window: Window, tasks: dict[uuid.UUID, float], found: list[Result]) -> SlotTally:
    """Count every slot of every task inside the window: the checks of a slot are its distinct
    result_ids (a message the producer sent twice is one check)."""
    expected: dict[tuple[uuid.UUID, int], float] = {}
    for task_id, interval in tasks.items():
        at = next_fire_time(task_id, interval, window.start)
        while at < window.end:
            expected[(task_id, slot_number(task_id, at, interval))] = at
            at += interval
    checked: Counter[tuple[uuid.UUID, int]] = Counter()
    by_node: Counter[str] = Counter()
    seen: set[str] = set()
    for one in found:
        interval = tasks.get(one.task_id)
        # A result sent again (the outbox after an outage) is one check, not two.
        if interval is None or one.result_id in seen:
            continue
        seen.add(one.result_id)
        key = (one.task_id, slot_number(one.task_id, one.scheduled_at, interval))
        if key in expected:
            checked[key] += 1
            by_node[one.node or "?"] += 1
    missed = [at for key, at in expected.items() if checked[key] == 0]
    fault = window.fault_at
    return SlotTally(
        name=window.name,
        expected=len(expected),
        once=sum(1 for key in expected if checked[key] == 1),
        twice=sum(1 for key in expected if checked[key] >= 2),
        missed=len(missed),
        failover_s=max(0.0, max(missed) - fault) if missed and fault is not None else 0.0,
        checks=sum(checked.values()),
        by_node=dict(by_node),
    )


def slot_number(task_id: uuid.UUID, at: float, interval: float) -> int:
    """Which slot of its task's grid `at` is (the grid: whole intervals after its offset)."""
    return round((at - start_offset(task_id, interval)) / interval)


class Cluster:
    """Nodes, processor, tasks and windows of one cluster scenario run."""

    def __init__(
        self,
        kafka: KafkaTarget,
        topics: Topics,
        dsn: str,
        tmp_path: Path,
        target: Target,
        *,
        own_proxies: bool,
    ) -> None:
        self.kafka = kafka
        self.broker = kafka.require_local()
        self.topics = topics
        self.dsn = dsn
        self.tmp_path = tmp_path
        self.target = target
        self.own_proxies = own_proxies
        self.tasks: dict[uuid.UUID, float] = {}
        self.nodes: dict[str, ClusterNode] = {}
        self.processor: Daemon | None = None
        # The nodes' own consumer group, and the topic their tasks' run state travels in.
        self.group = f"nodes-{uuid.uuid4().hex[:8]}"
        self.state_topic = f"{topics.results}-state"
        create_topics(
            kafka.client_config(),
            [self.state_topic],
            partitions=3,
            compacted=frozenset({self.state_topic}),
        )

    # -- set-up ---------------------------------------------------------------------------

    def seed(self, n: int, seed: int = 17) -> dict[uuid.UUID, float]:
        """`n` tasks at 5-10 s written to the task topic, as another program would."""
        rng = random.Random(seed)
        producer = Producer(self.kafka.client_config(**{"enable.idempotence": True}))
        for _ in range(n):
            interval = float(rng.choice(INTERVALS))
            spec = TaskSpec(
                name=f"t-{uuid.uuid4().hex}",
                url=self.target.url("/ok"),
                interval=interval,
                timeout=2.0,
            )
            record = TaskRecord(id=uuid.uuid4(), spec=spec)
            key, value = encode(record)
            producer.produce(self.topics.tasks, key=key, value=value)
            self.tasks[record.id] = interval
        assert producer.flush(60) == 0
        return self.tasks

    def start_processor(self) -> Daemon:
        env = processor_env(
            self.kafka, self.topics.results, self.dsn, KAFKA_TASKS_TOPIC=self.topics.tasks
        )
        self.processor = Daemon.processor(env, self.tmp_path / "processor.log")
        return self.processor

    def node(self, name: str) -> ClusterNode:
        """A node (made on first use, not started)."""
        if name not in self.nodes:
            storage = self.tmp_path / f"{name}.sqlite3"
            env = checker_env(
                self.kafka,
                self.topics.results,
                storage,
                KAFKA_TASKS_TOPIC=self.topics.tasks,
                KAFKA_TASK_NAMES_TOPIC=self.topics.names,
                CHECKER_MODE="cluster",
                CHECKER_NODE_ID=name,
                CHECKER_GROUP_ID=self.group,
                KAFKA_TASK_STATE_TOPIC=self.state_topic,
                KAFKA_SESSION_TIMEOUT_MS=SESSION_MS,
                KAFKA_MESSAGE_TIMEOUT_MS=3000,
            )
            proxy = None
            if self.own_proxies:
                proxy = NodeProxy(self.broker, f"127.0.0.{len(self.nodes) + 2}", self.tmp_path)
                proxy.start()
            self.nodes[name] = ClusterNode(name, env, self.tmp_path, proxy)
        return self.nodes[name]

    def start_nodes(self, *names: str) -> list[ClusterNode]:
        return [self.node(name).start() for name in names]

    def live(self) -> list[ClusterNode]:
        return [node for node in self.nodes.values() if node.alive()]

    # -- what the nodes say ---------------------------------------------------------------

    def ownership(self) -> bool:
        """Whether the nodes share the tasks (their /status has `owned_partitions`); before
        ownership every node runs every task."""
        return any("owned_partitions" in (node.status() or {}) for node in self.live())

    def owned(self) -> int | None:
        """Tasks owned over the live nodes (None without ownership or an answer)."""
        statuses = [node.status() for node in self.live()]
        if not statuses or any(s is None or "tasks_owned" not in s for s in statuses):
            return None
        return sum(int(s["tasks_owned"]) for s in statuses if s is not None)

    def settle(self, timeout: float = 180.0) -> float:
        """Wait until the live nodes own every task between them (with ownership; at once
        without), then one longest interval more so every task fired; the seconds it took."""
        started = time.monotonic()
        if self.ownership():
            wait_for(
                lambda: self.owned() == len(self.tasks),
                f"the live nodes to own all {len(self.tasks)} tasks",
                timeout=timeout,
            )
        time.sleep(max(INTERVALS))
        return time.monotonic() - started

    def wait_outboxes_empty(self, timeout: float = 180.0) -> None:
        def empty() -> bool:
            sizes = [node.status() for node in self.live()]
            return all(s is not None and int(s.get("outbox_size", 1)) == 0 for s in sizes)

        wait_for(empty, "every node's outbox to drain", timeout=timeout)

    # -- faults ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def broker_down(self) -> Any:
        """The whole broker unreachable for everyone: every TLS proxy stopped."""
        self.broker.stop_proxy()
        for node in self.nodes.values():
            if node.proxy is not None:
                node.proxy.stop()
        try:
            yield
        finally:
            self.broker.start_proxy()
            for node in self.nodes.values():
                if node.proxy is not None:
                    node.proxy.start()

    # -- the end --------------------------------------------------------------------------

    def finish(self) -> dict[str, int]:
        """Outboxes drained, every node stopped with SIGTERM (exit 0), PostgreSQL holding what
        was published, the processor stopped; the by-result_id check: published, stored, lost."""
        self.wait_outboxes_empty()
        for node in self.live():
            code = node.terminate()
            assert code == 0, f"{node.name} exited {code}"
        published = {one.result_id for one in results(self.kafka, self.topics.results)}
        with contextlib.suppress(AssertionError):
            wait_for(lambda: published <= set(stored(self.dsn)), "every result stored")
        rows = stored(self.dsn)
        if self.processor is not None and self.processor.alive():
            assert self.processor.terminate() == 0
        return {
            "published": len(published),
            "rows": sum(rows.values()),
            "lost": len(published - set(rows)),
        }

    def close(self) -> None:
        for node in self.nodes.values():
            node.kill()
            if node.proxy is not None:
                node.proxy.stop()
        if self.processor is not None:
            self.processor.kill()


def now() -> float:
    return time.time()
