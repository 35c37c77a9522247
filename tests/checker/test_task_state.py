"""The pure parts of a handover between cluster nodes: where a new owner continues a task, the
state record that travels with it, and the group generation read from librdkafka's metadata."""

from __future__ import annotations

import sys
import uuid
from datetime import UTC, datetime

import pytest

from checker_common.contract import Health
from checker_common.task_spec import TaskSpec
from periodic_checker.group_member import group_generation
from periodic_checker.task_state import (
    StateKind,
    decode_state,
    encode_state,
    state_of,
    with_state,
)
from periodic_checker.tasks import Task, next_fire_time, resume_plan, start_offset

TASK = uuid.UUID("3f1c8a52-6a8e-4c39-9a44-5d2b1f0e7c11")
INTERVAL = 10.0
BASE = 1_796_300_000.0
# A slot of the task's grid (the grid is the same on every node).
SLOT = next_fire_time(TASK, INTERVAL, BASE)
BOUND = 5.0


def test_the_grid_is_a_pure_function_of_the_id_and_the_interval() -> None:
    assert (SLOT - start_offset(TASK, INTERVAL)) % INTERVAL == pytest.approx(0, abs=1e-6)
    assert next_fire_time(TASK, INTERVAL, SLOT + 0.5) == pytest.approx(SLOT + INTERVAL)


@pytest.mark.parametrize(
    ("now", "first", "skipped"),
    [
        # The handover ended before the next slot: it runs on time, nothing is skipped.
        (SLOT + 3.0, SLOT + 10.0, 0),
        # The next slot passed 2 s ago (within the bound): it runs late.
        (SLOT + 12.0, SLOT + 10.0, 0),
        # It passed 6 s ago (beyond the bound of 5 s): skipped and counted; the next on time.
        (SLOT + 16.0, SLOT + 20.0, 1),
        # Three slots passed, the latest 1 s ago: two skipped, the latest runs late.
        (SLOT + 31.0, SLOT + 30.0, 2),
        # Exactly on a slot: it runs now.
        (SLOT + 20.0, SLOT + 20.0, 1),
    ],
)
def test_a_new_owner_continues_after_the_last_slot_run(
    now: float, first: float, skipped: int
) -> None:
    plan = resume_plan(TASK, INTERVAL, SLOT, now, BOUND)
    assert plan[0] == pytest.approx(first)
    assert plan[1] == skipped


def test_a_new_owner_never_runs_the_last_slot_again() -> None:
    for now in (SLOT, SLOT + 0.001, SLOT + 4.9):
        first, _ = resume_plan(TASK, INTERVAL, SLOT, now, BOUND)
        assert first > SLOT


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
