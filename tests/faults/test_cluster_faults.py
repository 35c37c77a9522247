"""Three checker nodes in cluster mode, one processor, the real broker behind mutual TLS (each
node through a TLS proxy of its own), real PostgreSQL and a local target; tasks at 5-10 s
(150; 1,000 with FAULTS_FULL=1) written to the task topic. One run goes through the scenarios
of docs/cluster.md in turn, each judged on the slots scheduled during it, counted per
(task, scheduled_at) from the results topic:

1. steady state                         every slot checked exactly once
2. a node leaves (SIGTERM)              0 twice, 0 missed
3. a node joins                         0 twice, 0 missed
4. a node SIGKILLed                     0 twice; missed only within two session time-outs
   ... and restarted after that         0 twice, 0 missed (a join)
5. one node's broker connection cut     0 missed (checked twice allowed while the cut lasts)
   for twice the session time-out
   ... and back                         0 twice, 0 missed
6. the whole broker down for 30 s       0 twice, 0 missed (results wait in the outboxes)
   ... and back                         0 twice, 0 missed

and, over the whole run, every published result stored in PostgreSQL (by result_id). Each
scenario prints a `FAULTS cluster ...` line (appended to $FAULTS_REPORT when set) before anything
is asserted. Without ownership (every node runs every task: /status has no
`owned_partitions`) the run reports its doubles and is an expected failure.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from checker.nodes import Topics
from faults.cluster_support import (
    FULL,
    SESSION_MS,
    TASKS,
    Cluster,
    SlotTally,
    Window,
    can_cut_one_node,
    now,
    results,
    tally,
)
from faults.faults_support import Target, fresh_schema

from helpers import KafkaTarget

# Several minutes: run by hand (`scripts/test.sh -m long -k cluster`), figures in RELIABILITY.md.
pytestmark = [pytest.mark.faults, pytest.mark.long, pytest.mark.kafka, pytest.mark.postgres]

SESSION_S = SESSION_MS / 1000
# How long each phase runs once the cluster settled after its event.
HOLD_S = 60.0 if FULL else 20.0
BROKER_DOWN_S = 30.0
CUT_S = 2 * SESSION_S + 5
# Longer than a check of the local target takes from its slot to its result (milliseconds).
IN_FLIGHT_S = 1.0


@pytest.fixture
def cluster(kafka: KafkaTarget, pg_dsn: str, tmp_path: Path) -> Iterator[Cluster]:
    with Target() as target, fresh_schema(pg_dsn) as dsn:
        line = Cluster(
            kafka, Topics.make(kafka), dsn, tmp_path, target, own_proxies=can_cut_one_node()
        )
        try:
            yield line
        finally:
            line.close()


@pytest.mark.timeout(3600 if FULL else 1500)
def test_three_nodes_through_join_leave_kill_cut_and_broker_down(cluster: Cluster) -> None:
    cluster.seed(TASKS)
    cluster.start_processor()
    a, b, c = (cluster.node(name) for name in ("node-a", "node-b", "node-c"))
    for node in (a, b, c):
        node.start()
    ownership = cluster.ownership()
    cluster.settle()
    windows: list[Window] = []

    # 1. Steady state.
    start = now()
    time.sleep(HOLD_S * 2)
    windows.append(Window("steady state", start, now()))

    # 2. A node leaves with SIGTERM.
    start = now()
    assert c.terminate() == 0
    cluster.settle()
    time.sleep(HOLD_S)
    windows.append(Window("node leaves (SIGTERM)", start, now(), start))

    # 3. A node joins.
    start = now()
    c.start()
    cluster.settle()
    time.sleep(HOLD_S)
    windows.append(Window("node joins", start, now(), start))

    # 4. A node SIGKILLed; judged until it is restarted two session time-outs later, its
    #    return (a join) on its own. Its window opens a second before the kill: the checks a
    #    killed node has in flight were scheduled just before it, and their loss is the kill's
    #    (counted against the join before, 2 of 10,044 slots in a full run).
    start = now()
    time.sleep(IN_FLIGHT_S)
    killed_at = now()
    b.kill()
    time.sleep(2 * SESSION_S + HOLD_S / 2)
    windows.append(Window("node SIGKILLed", start, now(), killed_at))
    start = now()
    b.start()
    cluster.settle()
    time.sleep(HOLD_S)
    windows.append(Window("SIGKILLed node restarted", start, now(), start))

    # 5. One node cut off from the broker for longer than the session time-out; its return
    #    on its own.
    if a.proxy is not None:
        start = now()
        a.proxy.stop()
        time.sleep(CUT_S)
        windows.append(Window(f"node cut off {CUT_S:.0f} s", start, now(), start))
        start = now()
        a.proxy.start()
        cluster.wait_outboxes_empty()
        cluster.settle()
        time.sleep(HOLD_S)
        windows.append(Window("cut-off node back", start, now(), start))

    # 6. The whole broker down for 30 s; its return on its own.
    start = now()
    with cluster.broker_down():
        time.sleep(BROKER_DOWN_S)
        windows.append(Window(f"broker down {BROKER_DOWN_S:.0f} s", start, now(), start))
        start = now()
    cluster.wait_outboxes_empty()
    cluster.settle()
    time.sleep(HOLD_S)
    windows.append(Window("broker back", start, now(), start))

    end = cluster.finish()
    found = results(cluster.kafka, cluster.topics.results)
    tallies = {w.name: tally(w, cluster.tasks, found) for w in windows}
    for one in tallies.values():
        one.report(tasks=TASKS, ownership=ownership, **end)

    assert end["lost"] == 0, end
    if a.proxy is None:
        pytest.skip("not root: one node cannot be cut off alone (the other scenarios ran)")
    if not ownership:
        pytest.xfail("every node runs every task (no ownership yet): slots checked 3 times")
    judge(tallies)


# Windows whose slots a handover to a (re)joining node may skip on the local broker: the moved
# partitions are nobody's for 7-11 s (a cooperative join takes two rounds) and passed slots
# beyond MAX_START_LAG are skipped and counted (RELIABILITY.md, "Cluster"; docs/ownership.md).
HANDOVER = ("node leaves", "node joins", "restarted", "node back", "broker back")


def judge(tallies: dict[str, SlotTally]) -> None:
    """The guarantees of docs/cluster.md, each named in the failure; slots missed at a
    handover (HANDOVER) are known and open: an expected failure naming them."""
    failures, handover = [], []
    for name, one in tallies.items():
        # A cut-off node runs its tasks until it reaches the group again, after the cut too.
        # At the broker's return every partition is assigned afresh, and a task that moves
        # runs on its last holder until it released it (docs/ownership.md): no double there.
        if "cut" not in name and one.twice:
            failures.append(f"{name}: {one.twice} slots checked twice")
        if name == "node SIGKILLed":
            if one.failover_s > 2 * SESSION_S:
                failures.append(f"{name}: failover {one.failover_s:.1f} s > 2 session time-outs")
        elif one.missed and any(part in name for part in HANDOVER):
            handover.append(f"{name}: {one.missed} missed ({one.failover_s:.1f} s)")
        elif one.missed:
            failures.append(f"{name}: {one.missed} slots missed")
        if one.expected == 0:
            failures.append(f"{name}: no slots expected (the window is empty)")
    assert not failures, "\n".join(failures)
    if handover:
        pytest.xfail("known handover gaps: " + "; ".join(handover))
