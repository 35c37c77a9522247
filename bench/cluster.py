"""Several checker nodes: CPU per check of a node in a 3-node cluster against one single-mode
checker doing the same work, side by side in each run.

    .venv/bin/python bench/cluster.py --tasks 3000 --interval 10 --window 40 --runs 3

Per run, on one broker (tansu + stunnel mTLS) and one local nginx page:

- *single*: `periodic-checker run` in single mode, the N tasks written into its SQLite file;
- *share*: the same with N / nodes of those tasks: the work one node of the cluster has;
- *cluster*: three `periodic-checker run` nodes in cluster mode (`--nodes`), the same N tasks
  (the same ids and intervals) written to their task topic as another program would; each
  node reads them all, and runs the ones it owns (every one of them before ownership).

Each arm runs alone. After READY and a warm-up (one interval, plus until the nodes' `/status`
owns every task between them when they say what they own), CPU seconds (user + system, from
/proc/PID/stat) and checks run (`periodic_checker_checks_total` from each node's /metrics) are
sampled at the start and the end of a `--window` of seconds; CPU per check = CPU / checks, for
the single checker and for the cluster's nodes together (and per node). The load average is
sampled during the windows. The ratio that tells the cost of cluster mode is the nodes' CPU per
check against *share* (the same checks a second per process); against *single* it also holds
the fixed cost of three processes instead of one. Medians over `--runs`; one Markdown table on
stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from confluent_kafka import Producer  # noqa: E402

from bench.common import (  # noqa: E402
    Kafka,
    api_get,
    drain_notify,
    kafka,
    machine,
    proc_sample,
    wait_ready,
    workdir,
)
from bench.probe_engine import PATTERN, start_nginx  # noqa: E402
from checker_common.task_record import TaskRecord, encode  # noqa: E402
from checker_common.task_spec import TaskSpec  # noqa: E402
from devstack import create_topics, free_port, stop_process  # noqa: E402
from periodic_checker.store import SQLiteTaskStore  # noqa: E402
from periodic_checker.tasks import Task  # noqa: E402

PYTHON = ROOT / ".venv" / "bin" / "python"
PARTITIONS = 12
SESSION_MS = 6000


@dataclass(frozen=True)
class Topics:
    results: str
    tasks: str
    names: str
    state: str

    @classmethod
    def make(cls, k: Kafka) -> Topics:
        base = f"bench-{uuid.uuid4().hex[:10]}"
        topics = cls(base, f"{base}-tasks", f"{base}-names", f"{base}-state")
        create_topics(
            k.config(),
            [topics.results, topics.tasks, topics.names, topics.state],
            partitions=PARTITIONS,
            compacted=frozenset({topics.tasks, topics.names, topics.state}),
            partitions_of={topics.names: 1},
        )
        return topics


@dataclass(frozen=True)
class Arm:
    """One arm of a run: CPU seconds and checks in the window, per process."""

    name: str
    cpu: list[float]
    checks: list[float]
    load: float

    @property
    def per_check_ms(self) -> float:
        return 1000 * sum(self.cpu) / max(1.0, sum(self.checks))

    def per_node_ms(self) -> list[float]:
        return [1000 * c / max(1.0, n) for c, n in zip(self.cpu, self.checks, strict=True)]


def specs(tasks: int, url: str, interval: float, *, own_urls: bool = False) -> list[Task]:
    """`tasks` tasks on the page `url`; `own_urls`: task N on `{url}page/N` (the same page),
    as `bench/scheduler_scale.py --urls own` has them."""
    now = datetime.now(UTC)
    return [
        Task(
            id=uuid.uuid4(),
            spec=TaskSpec(
                name=f"bench-{n}",
                url=f"{url}page/{n}" if own_urls else url,
                pattern=PATTERN,
                interval=interval,
                timeout=min(5.0, interval / 2),
            ),
            created_at=now,
            updated_at=now,
        )
        for n in range(tasks)
    ]


def env_of(k: Kafka, topics: Topics, store: Path, notify: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        **k.env(),
        "PYTHONPATH": str(ROOT),
        "KAFKA_TOPIC": topics.results,
        "KAFKA_TASKS_TOPIC": topics.tasks,
        "KAFKA_TASK_NAMES_TOPIC": topics.names,
        "TASK_STORAGE": str(store),
        "MAX_TASKS": "200000",
        "API_PORT": str(free_port()),
        "PER_HOST_IN_FLIGHT": "500",
        "LOG_LEVEL": "WARNING",
        "NOTIFY_SOCKET": str(notify),
        **extra,
    }


def checks_run(port: str) -> float:
    total = 0.0
    for line in api_get(port, "/metrics").decode().splitlines():
        if line.startswith("periodic_checker_checks_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


@dataclass(frozen=True)
class Owning:
    """What a node's /status says it owns (cluster mode)."""

    tasks: int
    partitions: frozenset[int]
    rebalances: int


def owning(port: str) -> Owning | None:
    """None when the node does not say what it owns."""
    body = json.loads(api_get(port, "/status"))
    found = {**body, **(body.get("extra") or {})}
    if "tasks_owned" not in found:
        return None
    return Owning(
        tasks=int(found["tasks_owned"]),
        partitions=frozenset(found.get("owned_partitions") or ()),
        rebalances=int(found.get("rebalances") or 0),
    )


def settled(nodes: list[Owning], tasks: int, partitions: int) -> bool:
    """Every node holds a share, every partition is held by exactly one node and the nodes' tasks
    add up to all of them: every task owned exactly once (pure)."""
    held = [p for node in nodes for p in node.partitions]
    return (
        all(node.partitions for node in nodes)
        and len(held) == len(set(held)) == partitions
        and sum(node.tasks for node in nodes) == tasks
    )


def wait_settled(
    ports: list[str],
    sockets: list[socket.socket],
    tasks: int,
    procs: list[subprocess.Popen[bytes]] | None = None,
    timeout: float = 300.0,
) -> list[Owning] | None:
    """Poll the nodes' /status until ownership settles (twice in a row, a second apart); None
    when they do not say what they own. A /status that does not answer in time counts as not
    settled yet (a node at 100,000 tasks can be too busy joining to answer within 10 s).
    Raises when a node exits or on the time-out."""
    deadline = time.monotonic() + timeout
    before: list[Owning] | None = None
    while time.monotonic() < deadline:
        for notify in sockets:
            drain_notify(notify)
        for n, proc in enumerate(procs or []):
            if proc.poll() is not None:
                raise RuntimeError(f"node {n + 1} exited with {proc.returncode} while joining")
        try:
            found = [owning(port) for port in ports]
        except OSError as exc:
            print(f"  /status did not answer ({exc!r}); asking again", file=sys.stderr)
            before = None
            time.sleep(1)
            continue
        if any(node is None for node in found):
            return None
        nodes = [node for node in found if node is not None]
        if settled(nodes, tasks, PARTITIONS) and nodes == before:
            return nodes
        before = nodes
        time.sleep(1)
    raise RuntimeError(f"ownership did not settle within {timeout:.0f} s: {before}")


@contextlib.contextmanager
def started(
    name: str, envs: list[dict[str, str]], work: Path
) -> Iterator[tuple[list[subprocess.Popen[bytes]], list[socket.socket]]]:
    """One `periodic-checker run` per settings, each with its NOTIFY_SOCKET bound, after every
    one said READY=1; all stopped at the end (logs in `work`/`name`-N.log)."""
    procs: list[subprocess.Popen[bytes]] = []
    sockets: list[socket.socket] = []
    try:
        for n, env in enumerate(envs):
            notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            notify.bind(env["NOTIFY_SOCKET"])
            notify.settimeout(1.0)
            sockets.append(notify)
            with (work / f"{name}-{n}.log").open("wb") as log:
                procs.append(
                    subprocess.Popen(
                        [str(PYTHON), "-m", "periodic_checker.cli", "run"],
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        cwd=work,
                    )
                )
        for notify, proc in zip(sockets, procs, strict=True):
            wait_ready(notify, proc, time.monotonic())
        yield procs, sockets
    finally:
        for proc in procs:
            stop_process(proc, timeout=60)
        for notify in sockets:
            notify.close()


def publish(k: Kafka, topic: str, made: list[Task]) -> None:
    """The tasks' records on the task topic, as another program would write them."""
    producer = Producer(k.config(**{"linger.ms": 50}))
    for task in made:
        key, value = encode(TaskRecord(id=task.id, spec=task.spec))
        while True:
            try:
                producer.produce(topic, key=key, value=value)
                break
            except BufferError:  # the client's queue is full (100,000 messages by default)
                producer.poll(0.5)
        producer.poll(0)
    assert producer.flush(120) == 0


def node_envs(k: Kafka, topics: Topics, work: Path, nodes: int) -> list[dict[str, str]]:
    """The settings of `nodes` cluster-mode nodes node-1 .. node-N in one group."""
    group = f"bench-nodes-{uuid.uuid4().hex[:8]}"
    return [
        env_of(
            k,
            topics,
            work / f"node-{n}.sqlite3",
            work / f"node-{n}.sock",
            CHECKER_MODE="cluster",
            CHECKER_NODE_ID=f"node-{n}",
            CHECKER_GROUP_ID=group,
            KAFKA_TASK_STATE_TOPIC=topics.state,
            KAFKA_SESSION_TIMEOUT_MS=str(SESSION_MS),
        )
        for n in range(1, nodes + 1)
    ]


def run_arm(
    name: str, envs: list[dict[str, str]], work: Path, tasks: int, interval: float, window: float
) -> Arm:
    with started(name, envs, work) as (procs, sockets):
        ports = [env["API_PORT"] for env in envs]
        if len(envs) > 1:
            wait_settled(ports, sockets, tasks, procs)
        time.sleep(interval)
        before = [
            (proc_sample(p.pid)[0], checks_run(port)) for p, port in zip(procs, ports, strict=True)
        ]
        loads = []
        end = time.monotonic() + window
        while time.monotonic() < end:
            loads.append(os.getloadavg()[0])
            for notify in sockets:
                drain_notify(notify)
            time.sleep(1)
        after = [
            (proc_sample(p.pid)[0], checks_run(port)) for p, port in zip(procs, ports, strict=True)
        ]
        return Arm(
            name,
            cpu=[a[0] - b[0] for a, b in zip(after, before, strict=True)],
            checks=[a[1] - b[1] for a, b in zip(after, before, strict=True)],
            load=statistics.median(loads),
        )


def single_arm(
    name: str, k: Kafka, work: Path, made: list[Task], interval: float, window: float
) -> Arm:
    topics = Topics.make(k)
    path = work / f"{name}.sqlite3"
    store = SQLiteTaskStore(path, max_tasks=len(made))
    for task in made:
        store.insert(task)
    store.close()
    env = env_of(k, topics, path, work / f"{name}.sock")
    return run_arm(name, [env], work, len(made), interval, window)


def one_run(
    k: Kafka, url: str, tasks: int, interval: float, window: float, nodes: int
) -> tuple[Arm, Arm, Arm]:
    made = specs(tasks, url, interval)
    with workdir() as work:
        single = single_arm("single", k, work, made, interval, window)
        share = single_arm("share", k, work, made[: tasks // nodes], interval, window)

        topics = Topics.make(k)
        publish(k, topics.tasks, made)
        envs = node_envs(k, topics, work, nodes)
        cluster = run_arm("cluster", envs, work, tasks, interval, window)
    return single, share, cluster


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument("--interval", type=float, default=10.0)
    parser.add_argument("--window", type=float, default=40.0)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    print(machine(), file=sys.stderr)
    rows: list[tuple[Arm, Arm, Arm]] = []
    with workdir() as work, kafka(work) as k:
        www = work / "nginx"
        www.mkdir()
        www.chmod(0o755)
        work.chmod(0o755)  # nginx workers run as an unprivileged user
        port = free_port()
        nginx = start_nginx(www, port)
        try:
            for n in range(args.runs):
                arms = one_run(
                    k, f"http://127.0.0.1:{port}/", args.tasks, args.interval, args.window,
                    args.nodes,
                )  # fmt: skip
                rows.append(arms)
                print(f"run {n + 1}: " + "; ".join(describe(arm) for arm in arms), file=sys.stderr)
        finally:
            stop_process(nginx)
    print(
        f"| run | single ({args.tasks:,} tasks): checks / CPU per check"
        f" | share ({args.tasks // args.nodes:,} tasks): checks / CPU per check"
        f" | {args.nodes} nodes: checks (all) / CPU per check (per node)"
        " | nodes / share | nodes / single | load average (single / share / nodes) |"
    )
    print("|---|---|---|---|---|---|---|")
    for n, (single, share, cluster) in enumerate(rows, start=1):
        per_node = " / ".join(f"{x:.3f}" for x in cluster.per_node_ms())
        print(
            f"| {n} | {sum(single.checks):,.0f} / {single.per_check_ms:.3f} ms"
            f" | {sum(share.checks):,.0f} / {share.per_check_ms:.3f} ms"
            f" | {sum(cluster.checks):,.0f} / {cluster.per_check_ms:.3f} ms ({per_node})"
            f" | {cluster.per_check_ms / share.per_check_ms:.2f}"
            f" | {cluster.per_check_ms / single.per_check_ms:.2f}"
            f" | {single.load:.1f} / {share.load:.1f} / {cluster.load:.1f} |"
        )

    def median(values: list[float]) -> float:
        return statistics.median(values)

    print(
        f"| **median** | {median([r[0].per_check_ms for r in rows]):.3f} ms"
        f" | {median([r[1].per_check_ms for r in rows]):.3f} ms"
        f" | {median([r[2].per_check_ms for r in rows]):.3f} ms"
        f" | **{median([r[2].per_check_ms / r[1].per_check_ms for r in rows]):.2f}**"
        f" | {median([r[2].per_check_ms / r[0].per_check_ms for r in rows]):.2f} | |"
    )
    return 0


def describe(arm: Arm) -> str:
    nodes = ", ".join(f"{x:.3f}" for x in arm.per_node_ms())
    return (
        f"{arm.name} {arm.per_check_ms:.3f} ms/check ({sum(arm.checks):.0f} checks,"
        f" per process {nodes}, load {arm.load:.2f})"
    )


if __name__ == "__main__":
    sys.exit(main())
