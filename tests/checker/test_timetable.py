"""The timetable: due entries come out earliest first, interval entries move to their next slot
on their grid once however late the wake-up, one-shots go, moved and removed entries never fire;
a real event loop fires them at their time, once per tick."""

from __future__ import annotations

import asyncio
import random
import time
import uuid

import pytest

from periodic_checker.tasks import next_fire_time, start_offset
from periodic_checker.timetable import COMPACT_MARGIN, COMPACT_RATIO, Timetable

T0 = 1_800_000_000.0  # a fake clock reading, epoch seconds
DEADLINE = 30.0  # generous: the machine is shared


def timetable(tick: float = 0.0) -> Timetable:
    return Timetable(lambda task_id: None, tick=tick, clock=lambda: T0)


def test_due_entries_come_out_earliest_first_and_only_when_due() -> None:
    table = timetable()
    ids = [uuid.uuid4() for _ in range(50)]
    whens = {task_id: T0 + random.uniform(0, 100) for task_id in ids}
    for task_id, when in whens.items():
        table.set(task_id, when, None)
    assert table.due(T0 - 1) == []
    fired = table.due(T0 + 50)
    assert fired == sorted((i for i in ids if whens[i] <= T0 + 50), key=whens.__getitem__)
    assert table.due(T0 + 50) == [], "a one-shot fires once"
    assert len(table) == len(ids) - len(fired)


def test_an_interval_entry_moves_to_its_next_slot_once_however_late() -> None:
    table = timetable()
    task_id = uuid.uuid4()
    first = next_fire_time(task_id, 10, T0)
    table.set(task_id, first, 10)
    # Woken 35 s late: one fire (coalesced), then the first slot of its grid after the wake-up.
    assert table.due(first + 35) == [task_id]
    moved = table.next_fire(task_id)
    assert moved == pytest.approx(first + 40, abs=1e-6)
    cycles = (moved - start_offset(task_id, 10)) / 10
    assert cycles == pytest.approx(round(cycles), abs=1e-6), "on the task's grid"
    assert table.due(first + 39.9) == []
    assert table.due(moved) == [task_id]
    assert table.next_fire(task_id) == pytest.approx(first + 50, abs=1e-6)


def test_moved_and_removed_entries_never_fire_from_their_old_place() -> None:
    table = timetable()
    moved, removed, kept = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    for task_id in (moved, removed, kept):
        table.set(task_id, T0 + 1, None)
    table.set(moved, T0 + 100, None)
    assert table.remove(removed)
    assert not table.remove(removed)
    assert table.next_fire(removed) is None
    assert table.due(T0 + 10) == [kept]
    assert table.due(T0 + 100) == [moved]


def test_slots_passed_while_loading_move_on_and_one_shots_stay_due() -> None:
    table = timetable()
    late = [uuid.uuid4() for _ in range(100)]
    for task_id in late:
        table.set(task_id, next_fire_time(task_id, 60, T0), 60)
    once = uuid.uuid4()
    table.set(once, T0 + 1, None)
    ready = T0 + 60
    moved = table.move_passed(ready)
    assert moved == len(late)
    for task_id in late:
        fire = table.next_fire(task_id)
        assert fire is not None
        assert ready <= fire < ready + 60
        assert fire == pytest.approx(next_fire_time(task_id, 60, ready), abs=1e-6)
    assert table.due(ready) == [once]


def test_the_heap_is_rebuilt_when_stale_entries_outnumber_live_ones() -> None:
    table = timetable()
    task_id = uuid.uuid4()
    for n in range(COMPACT_RATIO * COMPACT_MARGIN * 2):
        table.set(task_id, T0 + n, None)
    assert len(table._heap) <= COMPACT_RATIO * len(table) + COMPACT_MARGIN + 1
    assert table.due(T0 + 10**6) == [task_id]


async def test_a_real_loop_fires_each_entry_at_its_time_once_per_slot() -> None:
    fired: list[tuple[uuid.UUID, float]] = []
    done = asyncio.Event()
    ids = [uuid.uuid4() for _ in range(20)]

    def fire(task_id: uuid.UUID) -> None:
        fired.append((task_id, time.time()))
        if len(fired) >= 2 * len(ids):
            done.set()

    table = Timetable(fire, tick=0.005)
    now = time.time()
    for task_id in ids:
        table.set(task_id, next_fire_time(task_id, 1.0, now + 0.2), 1.0)
    early = uuid.uuid4()
    table.set(early, now + 0.1, None)
    table.remove(early)
    await asyncio.sleep(0.3)
    assert fired == [], "nothing fires before resume()"
    table.move_passed(time.time())
    table.resume()
    try:
        await asyncio.wait_for(done.wait(), DEADLINE)
    finally:
        table.pause()
    assert early not in {task_id for task_id, _ in fired}
    for task_id in ids:
        times = [at for fired_id, at in fired if fired_id == task_id]
        assert len(times) >= 2
        # Never before its first slot, and each fire in a slot of its own.
        assert times[0] >= next_fire_time(task_id, 1.0, now + 0.2) - 1e-6
        slots = [int((at - start_offset(task_id, 1.0)) // 1.0) for at in times]
        assert len(set(slots)) == len(slots)
