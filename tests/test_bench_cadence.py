"""The cadence benchmark's counting (bench/scheduler_scale.py, bench/cluster.py): which results
count as received, checked twice or redelivered inside a window, and when a cluster's ownership
has settled. Pure: no broker, no daemon."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from bench.cluster import Owning, settled
from bench.scheduler_scale import Tally

START = datetime(2026, 12, 4, 12, 0, tzinfo=UTC).timestamp()
TASK_A = "00000000-0000-4000-8000-00000000000a"
TASK_B = "00000000-0000-4000-8000-00000000000b"


def result(
    slot: float, result_id: str, *, lag: float = 0.01, node: str = "node-1"
) -> dict[str, Any]:
    def iso(t: float) -> str:
        return datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")

    return {
        "result_id": result_id,
        "scheduled_at": iso(START + slot),
        "timestamp": iso(START + slot + lag),
        "ok": True,
        "node": node,
    }


def test_a_slot_inside_the_window_counts_once_with_its_lag_and_node() -> None:
    tally = Tally(START, START + 20)
    tally.add(TASK_A, result(0, "r1", lag=0.25, node="node-2"))
    tally.add(TASK_A, result(10, "r2", node="node-2"))
    tally.add(TASK_B, result(5, "r3", node="node-3"))

    assert tally.received == 3
    assert tally.twice == 0
    assert sorted(tally.lags_of) == ["node-2", "node-3"]
    assert len(tally.lags_of["node-2"]) == 2
    assert abs(max(tally.lags) - 0.25) < 1e-3


def test_slots_outside_the_window_are_read_but_not_counted() -> None:
    tally = Tally(START, START + 20)
    tally.add(TASK_A, result(-10, "before"))
    tally.add(TASK_A, result(20, "at-the-end"))  # the window is [start, end)

    assert tally.all_results == 2
    assert tally.received == 0
    assert tally.lags == []


def test_two_checks_of_one_slot_count_as_checked_twice() -> None:
    tally = Tally(START, START + 20)
    tally.add(TASK_A, result(0, "r1", node="node-1"))
    tally.add(TASK_A, result(0, "r2", node="node-2"))
    tally.add(TASK_A, result(0, "r3", node="node-3"))

    assert tally.received == 1
    assert tally.twice == 1  # one slot, checked more than once
    assert len(tally.lags) == 3  # every check ran, each has its lag


def test_the_same_result_delivered_again_is_a_redelivery_not_a_second_check() -> None:
    tally = Tally(START, START + 20)
    tally.add(TASK_A, result(0, "r1"))
    tally.add(TASK_A, result(0, "r1"))
    tally.add(TASK_A, result(0, "r2"))
    tally.add(TASK_A, result(0, "r2"))

    assert tally.received == 1
    assert tally.twice == 1
    assert tally.redelivered == 2
    assert len(tally.lags) == 2


def owning(tasks: int, *partitions: int) -> Owning:
    return Owning(tasks=tasks, partitions=frozenset(partitions), rebalances=1)


def test_ownership_settles_when_every_partition_has_one_node_and_the_tasks_add_up() -> None:
    nodes = [owning(40, 0, 1), owning(30, 2), owning(30, 3)]
    assert settled(nodes, tasks=100, partitions=4)


def test_ownership_has_not_settled_while_a_node_holds_nothing() -> None:
    nodes = [owning(60, 0, 1), owning(40, 2, 3), owning(0)]
    assert not settled(nodes, tasks=100, partitions=4)


def test_ownership_has_not_settled_while_a_partition_is_held_twice_or_by_none() -> None:
    assert not settled([owning(50, 0, 1), owning(50, 1, 2), owning(10, 3)], 100, 4)
    assert not settled([owning(40, 0), owning(30, 1), owning(30, 2)], 100, 4)


def test_ownership_has_not_settled_while_a_node_has_not_loaded_every_task() -> None:
    nodes = [owning(40, 0, 1), owning(30, 2), owning(29, 3)]
    assert not settled(nodes, tasks=100, partitions=4)
