"""Cadence of a cluster: N tasks over several cluster-mode checker nodes, every planned slot
checked once and on time. Run through `bench/scheduler_scale.py --nodes 3` (its window, lag and
missed tally; bench/cluster.py's node start-up).

Per run, on the shared broker and nginx page: fresh topics (12 partitions), the N task records
written to the task topic as another program would, then the nodes (`periodic-checker run`,
CHECKER_MODE=cluster, one group) started together. After every node said READY=1, the warm-up
lasts until ownership settles (every node holds partitions, every partition exactly one node,
the nodes' `tasks_owned` add up to N, twice in a row a second apart), then one more interval
(slots that passed during the join are run late by design, docs/cluster.md); the window is the
`intervals` whole intervals after it. Counted in it: expected = N x intervals, received
(distinct (task, `scheduled_at`)), missed, checked twice (a slot with two or more distinct
`result_id`s), lag over all nodes and per node (the result's `node`), CPU cores and VmRSS per
node from /proc, rebalances per node from settling to the window's end (from /status), the load
average.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from bench import cluster
from bench.common import Kafka, drain_notify, proc_sample, workdir
from bench.scheduler_scale import DRAIN, Tally, pct


@dataclass(frozen=True)
class NodeFigures:
    node: str
    tasks_owned: int
    partitions: int
    received: int
    lag_p50: float
    lag_p99: float
    lag_max: float
    cores: float
    rss_max_mb: float
    rebalances_after_settling: int  # to the window's end: 0 expected (-1: /status silent)


@dataclass(frozen=True)
class ClusterRun:
    tasks: int
    interval: float
    intervals: int
    nodes: int
    publish_s: float  # writing the N records to the task topic
    ready_s: float  # the nodes' start -> every one READY=1
    settle_s: float  # every one READY -> ownership settled
    expected: int
    received: int
    missed: int
    twice: int
    redelivered: int
    failed: int
    lag_p50: float
    lag_p99: float
    lag_max: float
    cores: float
    load_avg: tuple[float, float, float]  # min / mean / max in the window
    per_node: tuple[NodeFigures, ...]
    all_results: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Sampler:
    """Once a second: CPU seconds of each process at the window's start and end, each one's
    VmRSS at its most, the load average inside the window."""

    def __init__(self, pids: list[int], start: float, end: float) -> None:
        self.pids = pids
        self.start = start
        self.end = end
        self.rss_max = [0] * len(pids)
        self.loads: list[float] = []
        self._cpu0: tuple[float, list[float]] | None = None
        self._cpu1: tuple[float, list[float]] | None = None
        self._next = 0.0

    def tick(self, now: float) -> None:
        if now < self._next:
            return
        self._next = now + 1.0
        samples = [proc_sample(pid) for pid in self.pids]
        self.rss_max = [max(m, rss) for m, (_, rss) in zip(self.rss_max, samples, strict=True)]
        cpu = [c for c, _ in samples]
        if self._cpu0 is None and now >= self.start:
            self._cpu0 = (now, cpu)
        if self._cpu1 is None and now >= self.end:
            self._cpu1 = (now, cpu)
        if self.start <= now <= self.end:
            self.loads.append(os.getloadavg()[0])

    def cores(self) -> list[float]:
        """Each process's CPU over the window, in cores."""
        assert self._cpu0 is not None, "window start not sampled"
        assert self._cpu1 is not None, "window end not sampled"
        (t0, c0), (t1, c1) = self._cpu0, self._cpu1
        return [(b - a) / (t1 - t0) for a, b in zip(c0, c1, strict=True)]


def owning_now(port: str) -> cluster.Owning | None:
    """What the node owns at the window's end; None if it does not answer (shown as -1
    rebalances rather than ending the run)."""
    try:
        return cluster.owning(port)
    except OSError:
        return None


def results_consumer(k: Kafka, topic: str) -> Consumer:
    """Every partition of the result topic from the beginning, assigned by hand (no group
    join to wait for)."""
    consumer = Consumer(
        k.config(
            **{
                "group.id": f"bench-{uuid.uuid4().hex[:8]}",
                "enable.auto.commit": False,
                "fetch.queue.backoff.ms": 10,
            }
        )
    )
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(cluster.PARTITIONS)])
    return consumer


def one_run(
    k: Kafka,
    page: str,
    tasks: int,
    interval: float,
    intervals: int,
    nodes: int,
    *,
    own_urls: bool = False,
) -> ClusterRun:
    made = cluster.specs(tasks, page, interval, own_urls=own_urls)
    with workdir() as work:
        topics = cluster.Topics.make(k)
        began = time.monotonic()
        cluster.publish(k, topics.tasks, made)
        publish_s = time.monotonic() - began
        del made
        envs = cluster.node_envs(k, topics, work, nodes)
        names = [env["CHECKER_NODE_ID"] for env in envs]
        ports = [env["API_PORT"] for env in envs]
        consumer = results_consumer(k, topics.results)
        try:
            began = time.monotonic()
            with cluster.started("node", envs, work) as (procs, sockets):
                ready_at = time.monotonic()
                print(f"  every node READY after {ready_at - began:.1f} s", file=sys.stderr)
                before = cluster.wait_settled(ports, sockets, tasks, procs)
                if before is None:
                    raise RuntimeError("the nodes' /status says nothing of what they own")
                settled_at = time.monotonic()
                print(
                    f"  ownership settled after {settled_at - ready_at:.1f} s: "
                    + ", ".join(f"{n} {o.tasks}" for n, o in zip(names, before, strict=True)),
                    file=sys.stderr,
                )
                start = time.time() + interval
                end = start + intervals * interval
                tally = Tally(start, end)
                sampler = Sampler([p.pid for p in procs], start, end)
                after: list[cluster.Owning | None] | None = None
                while time.time() < end + DRAIN:
                    for name, proc in zip(names, procs, strict=True):
                        if proc.poll() is not None:
                            raise RuntimeError(f"{name} exited with {proc.returncode}")
                    for notify in sockets:
                        drain_notify(notify)
                    sampler.tick(time.time())
                    if after is None and time.time() >= end:
                        after = [owning_now(port) for port in ports]
                    tally.read(consumer)
        finally:
            consumer.close()
    assert after is not None
    cores = sampler.cores()
    per_node = tuple(
        NodeFigures(
            node=name,
            tasks_owned=was.tasks,
            partitions=len(was.partitions),
            received=len(tally.lags_of.get(name, [])),
            lag_p50=pct(tally.lags_of.get(name, []), 50),
            lag_p99=pct(tally.lags_of.get(name, []), 99),
            lag_max=max(tally.lags_of.get(name, []), default=float("nan")),
            cores=core,
            rss_max_mb=rss / 2**20,
            rebalances_after_settling=now.rebalances - was.rebalances if now else -1,
        )
        for name, was, now, core, rss in zip(
            names, before, after, cores, sampler.rss_max, strict=True
        )
    )
    expected = tasks * intervals
    loads = sampler.loads or [float("nan")]
    return ClusterRun(
        tasks=tasks,
        interval=interval,
        intervals=intervals,
        nodes=nodes,
        publish_s=publish_s,
        ready_s=ready_at - began,
        settle_s=settled_at - ready_at,
        expected=expected,
        received=tally.received,
        missed=expected - tally.received,
        twice=tally.twice,
        redelivered=tally.redelivered,
        failed=tally.failed,
        lag_p50=pct(tally.lags, 50),
        lag_p99=pct(tally.lags, 99),
        lag_max=max(tally.lags, default=float("nan")),
        cores=sum(cores),
        load_avg=(min(loads), statistics.mean(loads), max(loads)),
        per_node=per_node,
        all_results=tally.all_results,
    )


def summary_line(r: ClusterRun) -> str:
    return (
        f"expected {r.expected:,}, received {r.received:,}, missed {r.missed}, twice {r.twice}, "
        f"lag p50/p99/max {r.lag_p50 * 1000:.1f}/{r.lag_p99 * 1000:.1f}/{r.lag_max * 1000:.0f} ms, "
        f"CPU {r.cores:.2f} cores, load {r.load_avg[1]:.2f}"
    )


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def table(runs: list[ClusterRun]) -> str:
    """One row per run, the median row, then one row per node of each run (Markdown)."""
    lines = [
        "| run | tasks / interval / nodes | READY (all) / settled | expected | received | missed "
        "| checked twice | failed | lag p50 | lag p99 | lag max | CPU cores, all (per node) "
        "| VmRSS max per node | load avg (min/mean/max) |",
        "|---" * 14 + "|",
    ]
    for n, r in enumerate(runs, start=1):
        lines.append(
            f"| {n} | {r.tasks:,} / {r.interval:g} s / {r.nodes} "
            f"| {r.ready_s:.1f} s / {r.settle_s:.1f} s | {r.expected:,} | {r.received:,} "
            f"| {r.missed} | {r.twice} | {r.failed} | {_ms(r.lag_p50)} | {_ms(r.lag_p99)} "
            f"| {r.lag_max * 1000:.0f} ms "
            f"| {r.cores:.2f} ({' / '.join(f'{x.cores:.2f}' for x in r.per_node)}) "
            f"| {' / '.join(f'{x.rss_max_mb:.0f}' for x in r.per_node)} MB "
            f"| {r.load_avg[0]:.1f} / {r.load_avg[1]:.1f} / {r.load_avg[2]:.1f} |"
        )
    if len(runs) > 1:
        med = median(runs)
        lines.append(
            f"| **median** | | {med['ready_s']:.1f} s / {med['settle_s']:.1f} s "
            f"| {med['expected']:,.0f} | {med['received']:,.0f} "
            f"| **{med['missed']:g}** (worst {max(r.missed for r in runs)}) "
            f"| **{med['twice']:g}** (worst {max(r.twice for r in runs)}) | {med['failed']:g} "
            f"| {_ms(med['lag_p50'])} "
            f"| **{_ms(med['lag_p99'])}** (worst {_ms(max(r.lag_p99 for r in runs))}) "
            f"| {med['lag_max'] * 1000:.0f} ms | {med['cores']:.2f} "
            f"| | {med['load_avg']:.1f} (mean) |"
        )
    lines += [
        "",
        "| run | node | tasks owned (partitions) | checks in the window | lag p50 | lag p99 "
        "| lag max | CPU cores | VmRSS max | rebalances after settling |",
        "|---" * 10 + "|",
    ]
    for n, r in enumerate(runs, start=1):
        for x in r.per_node:
            lines.append(
                f"| {n} | {x.node} | {x.tasks_owned:,} ({x.partitions}) | {x.received:,} "
                f"| {_ms(x.lag_p50)} | {_ms(x.lag_p99)} | {x.lag_max * 1000:.0f} ms "
                f"| {x.cores:.2f} | {x.rss_max_mb:.0f} MB | {x.rebalances_after_settling} |"
            )
    return "\n".join(lines)


MEDIAN_OF = (
    "ready_s",
    "settle_s",
    "expected",
    "received",
    "missed",
    "twice",
    "failed",
    "lag_p50",
    "lag_p99",
    "lag_max",
    "cores",
)


def median(runs: list[ClusterRun]) -> dict[str, float]:
    """The median over the runs of each run-level figure (pure)."""
    found = {name: statistics.median(getattr(r, name) for r in runs) for name in MEDIAN_OF}
    found["load_avg"] = statistics.median(r.load_avg[1] for r in runs)
    return found
