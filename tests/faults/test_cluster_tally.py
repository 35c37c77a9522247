"""The cluster scenarios' tally per (task, slot), on results made up here: a slot checked once,
twice, missed; a result sent twice is one check; results outside the window or of other tasks
left out; the failover time."""

from __future__ import annotations

import uuid

from faults.cluster_support import Result, Window, tally

from periodic_checker.tasks import next_fire_time


def test_slots_checked_once_twice_and_missed_are_told_apart() -> None:
    task = uuid.uuid4()
    start = 1_000_000.0
    first = next_fire_time(task, 5.0, start)
    slots = [first + 5 * n for n in range(6)]  # the window holds exactly these six
    window = Window("w", start, first + 5 * 5 + 1, fault_at=start)

    found = [Result(task, slots[0], "a", "r0")]
    found += [Result(task, slots[1], "a", "r1"), Result(task, slots[1] + 0.0004, "b", "r1b")]
    found += [Result(task, at, "b", f"r{n}") for n, at in enumerate(slots[4:], start=4)]
    found += [Result(task, first - 5, "a", "before"), Result(uuid.uuid4(), slots[2], "a", "x")]
    found += [Result(task, slots[0], "a", "r0")]  # the same result sent again: one check

    counted = tally(window, {task: 5.0}, found)

    assert (counted.expected, counted.once, counted.twice, counted.missed) == (6, 3, 1, 2)
    assert counted.checks == 5
    assert counted.by_node == {"a": 2, "b": 3}
    assert counted.failover_s == slots[3] - start  # the last missed slot


def test_nothing_missed_means_no_failover_time() -> None:
    task = uuid.uuid4()
    first = next_fire_time(task, 10.0, 0.0)
    counted = tally(Window("w", 0.0, first + 1, fault_at=0.0), {task: 10.0}, [
        Result(task, first, None, "r")
    ])  # fmt: skip
    assert (counted.expected, counted.once, counted.failover_s) == (1, 1, 0.0)
    assert counted.by_node == {"?": 1}
