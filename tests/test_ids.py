"""Time-ordered result ids (UUID version 7)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from checker_common.ids import uuid7, uuid7_millis


def test_a_uuid7_holds_its_millisecond_and_rfc_version_and_variant() -> None:
    at = datetime(2026, 12, 3, 23, 59, 59, 999_000, tzinfo=UTC)
    made = uuid7(at)

    assert made.version == 7
    assert made.variant == uuid.RFC_4122
    assert uuid7_millis(made) == int(at.timestamp() * 1000)
    assert uuid.UUID(str(made)) == made


def test_ids_sort_by_their_time_and_differ_within_one_millisecond() -> None:
    start = datetime(2026, 12, 3, tzinfo=UTC)
    later = [uuid7(start + timedelta(milliseconds=n)) for n in range(0, 5000, 7)]
    same = {uuid7(start) for _ in range(10_000)}

    assert later == sorted(later)
    assert [str(i) for i in later] == sorted(str(i) for i in later)  # as text too
    assert len(same) == 10_000


def test_other_versions_carry_no_time() -> None:
    assert uuid7_millis(uuid.uuid4()) is None
