"""The pure parts of a handover between cluster nodes: where a new owner continues a task, the
state record that travels with it, and the group generation read from librdkafka's metadata."""

from __future__ import annotations

import math
import sys
import uuid
from collections import Counter
from datetime import UTC, datetime

import pytest

from checker_common.contract import Health
from checker_common.task_spec import TaskSpec
from periodic_checker.group_member import group_generation
from periodic_checker.ownership import rejoin_wait
from periodic_checker.task_state import (
    StateKind,
    TaskState,
    decode_state,
    encode_state,
    held_elsewhere,
    runs_here,
    state_of,
    unreleased,
    with_state,
)
from periodic_checker.tasks import (
    CATCH_UP_MIN_SPREAD,
    Task,
    next_fire_time,
    phase_fraction,
    resume_plan,
    spread_fraction,
    start_offset,
)

TASK = uuid.UUID("3f1c8a52-6a8e-4c39-9a44-5d2b1f0e7c11")
INTERVAL = 10.0
BASE = 1_796_300_000.0
# A slot of the task's grid (the grid is the same on every node).
SLOT = next_fire_time(TASK, INTERVAL, BASE)
LIMIT = 30.0  # the catch-up limit of the tests below: late slots at most 30 s old run
# Times here are epoch seconds (about 1.8e9): pytest.approx's default relative tolerance would
# accept half an hour off, so every comparison of times names its own.
EPS = 1e-6


def test_the_grid_is_a_pure_function_of_the_id_and_the_interval() -> None:
    assert (SLOT - start_offset(TASK, INTERVAL)) % INTERVAL == pytest.approx(0, abs=1e-6)
    assert next_fire_time(TASK, INTERVAL, SLOT + 0.5) == pytest.approx(SLOT + INTERVAL, abs=EPS)


@pytest.mark.parametrize(
    ("now", "limit", "late", "skipped", "next_slot"),
    [
        # The handover ended before the next slot: it runs on time, nothing late or skipped.
        (SLOT + 3.0, LIMIT, [], 0, SLOT + 10.0),
        # The next slot passed 2 s ago: it runs late.
        (SLOT + 12.0, LIMIT, [10.0], 0, SLOT + 20.0),
        # Exactly on a slot: the one before runs late, this one on time.
        (SLOT + 20.0, LIMIT, [10.0], 0, SLOT + 20.0),
        # Three slots passed, the oldest 21 s ago: all three run late, each once.
        (SLOT + 31.0, LIMIT, [10.0, 20.0, 30.0], 0, SLOT + 40.0),
        # Five passed; the two older than the limit are skipped and counted.
        (SLOT + 55.0, LIMIT, [30.0, 40.0, 50.0], 2, SLOT + 60.0),
        # A slot exactly as old as the limit still runs.
        (SLOT + 40.0, LIMIT, [10.0, 20.0, 30.0], 0, SLOT + 40.0),
        # All passed slots older than the limit: all skipped, the next on time.
        (SLOT + 48.0, 5.0, [], 4, SLOT + 50.0),
        # No catch-up (a limit of 0): every passed slot is skipped.
        (SLOT + 31.0, 0.0, [], 3, SLOT + 40.0),
    ],
)
def test_a_new_owner_runs_the_slots_of_the_handover_late_within_the_limit(
    now: float, limit: float, late: list[float], skipped: int, next_slot: float
) -> None:
    plan = resume_plan(TASK, INTERVAL, SLOT, now, limit)
    assert list(plan.late) == pytest.approx([SLOT + d for d in late], abs=EPS)
    assert plan.skipped == skipped
    if late:
        # Their turn comes at a point set by the task's id, within the age of the oldest of them
        # (at least CATCH_UP_MIN_SPREAD) and before the next slot.
        spread = min(next_slot - now, max(now - (SLOT + late[0]), CATCH_UP_MIN_SPREAD))
        assert now <= plan.first <= next_slot
        assert plan.first - now == pytest.approx(spread_fraction(TASK) * spread, abs=EPS)
    else:
        assert plan.first == pytest.approx(next_slot, abs=EPS)


def late_turns(interval: float, gap: float, tasks: int) -> tuple[Counter[int], list[float]]:
    """Many tasks taken by a new owner after a handover of `gap` seconds: how many late runs
    start in each second after the take, and each late run's lag behind its slot."""
    now = BASE + 0.25
    per_second: Counter[int] = Counter()
    lags: list[float] = []
    for n in range(tasks):
        task_id = uuid.UUID(int=n * 0x9E3779B97F4A7C15 % 2**128)
        last = next_fire_time(task_id, interval, now - gap) - interval  # run by the old owner
        plan = resume_plan(task_id, interval, last, now, limit=60.0)
        for slot in plan.late:
            per_second[math.floor(plan.first - now)] += 1
            lags.append(plan.first - slot)
    return per_second, sorted(lags)


def test_the_late_slots_of_a_short_handover_run_within_about_its_length() -> None:
    per_second, lags = late_turns(interval=60.0, gap=10.0, tasks=30_000)
    usual = 30_000 / 60.0  # the tasks' checks a second
    assert len(lags) == pytest.approx(30_000 * 10 / 60, rel=0.05)  # a sixth of the slots passed
    # Seconds late, not up to the interval: within the gap plus as long again.
    assert max(lags) <= 2 * 10.0 + 1e-6
    assert lags[len(lags) // 2] < 10.0
    # And spread out: no second of the catch-up starts twice the tasks' usual rate.
    assert max(per_second.values()) < 2 * usual
    assert max(per_second) < 20


def test_a_late_slot_of_a_long_interval_task_does_not_wait_for_its_next_slot() -> None:
    # An hourly task whose slot passed 8 s before the take runs it within those 8 s (at least
    # CATCH_UP_MIN_SPREAD), not at some point of the next hour.
    slot = next_fire_time(TASK, 3600.0, BASE)
    now = slot + 8.0
    plan = resume_plan(TASK, 3600.0, slot - 3600.0, now, limit=60.0)
    assert plan.late == pytest.approx((slot,), abs=EPS)
    assert now <= plan.first <= now + max(8.0, CATCH_UP_MIN_SPREAD)


def test_where_a_late_turn_falls_does_not_follow_the_place_on_the_grid() -> None:
    # Tasks whose slots passed together (neighbours on the grid) must not take their turn
    # together: the turn's fraction is a second hash of the id, not its phase.
    ids = [uuid.UUID(int=n * 0x9E3779B97F4A7C15 % 2**128) for n in range(20_000)]
    neighbours = sorted(ids, key=phase_fraction)[:2_000]  # one tenth of the grid
    turns = sorted(spread_fraction(task_id) for task_id in neighbours)
    # Spread over the whole of [0, 1) as the fractions of all tasks are.
    assert turns[len(turns) // 10] < 0.2
    assert turns[-len(turns) // 10] > 0.8


def test_a_new_owner_never_runs_the_last_slot_again() -> None:
    for now in (SLOT, SLOT + 0.001, SLOT + 4.9, SLOT + 10.5, SLOT + 100.0):
        plan = resume_plan(TASK, INTERVAL, SLOT, now, LIMIT)
        assert plan.first > SLOT
        assert all(slot > SLOT + INTERVAL / 2 for slot in plan.late)


def test_every_slot_after_the_last_is_either_late_skipped_or_still_to_come() -> None:
    for step in range(200):
        now = SLOT + 0.1 + step * 0.7
        plan = resume_plan(TASK, INTERVAL, SLOT, now, LIMIT)
        passed = round((next_fire_time(TASK, INTERVAL, now) - SLOT) / INTERVAL) - 1
        assert len(plan.late) + plan.skipped == passed
        assert len(set(plan.late)) == len(plan.late)


def task(**update: object) -> Task:
    now = datetime(2026, 12, 3, tzinfo=UTC)
    spec = TaskSpec(name="shop", url="http://127.0.0.1:9/", interval=10, timeout=5)
    return Task(id=TASK, spec=spec, created_at=now, updated_at=now).model_copy(update=update)


def test_a_state_record_reads_back_as_written() -> None:
    ran = task(health=Health.DOWN, failures_in_a_row=3, runs=7, manual_runs=1)
    at = datetime(2026, 12, 3, 12, tzinfo=UTC)
    state = state_of(ran, StateKind.RELEASED, node="n1", at=at, last_slot=SLOT, record=(2, 41))
    key, value = encode_state(state)
    assert key == str(TASK).encode()
    assert decode_state(key, value) == state


@pytest.mark.parametrize(
    ("key", "value"),
    [
        (b"fence:n1", b"{}"),
        (str(TASK).encode(), None),
        (str(TASK).encode(), b"not json"),
        (str(uuid.uuid4()).encode(), None),
    ],
)
def test_fences_tombstones_and_unreadable_records_are_no_state(
    key: bytes, value: bytes | None
) -> None:
    assert decode_state(key, value) is None


def test_a_state_under_another_key_is_no_state() -> None:
    state = state_of(task(), StateKind.RUNNING, node="n1", at=datetime.now(UTC), last_slot=None,
                     record=None)  # fmt: skip
    _, value = encode_state(state)
    assert decode_state(str(uuid.uuid4()).encode(), value) is None


def test_health_is_taken_over_only_under_the_same_record() -> None:
    measured = task(health=Health.DOWN, failures_in_a_row=2, runs=9)
    state = state_of(measured, StateKind.RELEASED, node="n1", at=datetime.now(UTC),
                     last_slot=SLOT, record=(1, 5))  # fmt: skip
    view = task(health=Health.UNKNOWN, runs=4)

    same = with_state(view, state, (1, 5))
    assert (same.health, same.failures_in_a_row, same.runs) == (Health.DOWN, 2, 9)
    changed = with_state(view, state, (1, 8))  # the record changed since: maybe another check
    assert (changed.health, changed.failures_in_a_row, changed.runs) == (Health.UNKNOWN, 0, 9)


def test_the_group_generation_is_read_from_librdkafkas_metadata() -> None:
    generation = (7).to_bytes(4, sys.byteorder, signed=True)
    assert group_generation(b"CGMDv2:" + generation + b"group\x00") == 7
    assert group_generation(b"CGMDv2:\xff\xff\xff\xffx") == -1
    assert group_generation(b"something else") is None


def record(kind: StateKind, node: str) -> TaskState:
    return state_of(task(), kind, node=node, at=datetime.now(UTC), last_slot=SLOT, record=None)


@pytest.mark.parametrize(
    ("latest", "held", "waits", "running"),
    [
        # Another node runs it: this node, giving it up after a cut, must not release over
        # that node's record, and a node back from a cut given it waits for its release.
        (("running", "n2"), True, True, False),
        # Released by another node: the next owner continues after its last slot.
        (("released", "n2"), False, False, False),
        # This node's own records.
        (("running", "n1"), False, False, True),
        # ... a release of its own is not what a later owner must find while it runs it.
        (("released", "n1"), False, False, False),
        # No record (a task added since its holder's take): its holder releases it at the
        # return, and a node back from the same cut waits for that.
        (None, False, True, False),
    ],
)
def test_who_holds_a_task_is_read_from_its_latest_state(
    latest: tuple[str, str] | None, held: bool, waits: bool, running: bool
) -> None:
    state = None if latest is None else record(StateKind(latest[0]), latest[1])
    assert held_elsewhere(state, "n1") is held
    assert unreleased(state, "n1") is waits
    assert runs_here(state, "n1") is running


@pytest.mark.parametrize(
    ("session_ms", "wait"),
    [(3_000, 16.0), (6_000, 22.0), (25_000, 60.0), (300_000, 60.0)],
)
def test_a_node_back_from_a_cut_waits_for_releases_a_bounded_time(
    session_ms: int, wait: float
) -> None:
    # Two session time-outs (an assignment of the holder) and librdkafka's reconnect back-off
    # (the holder reaching the broker later), at most a minute.
    assert rejoin_wait(session_ms) == wait
