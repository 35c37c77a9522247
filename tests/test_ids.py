"""Time-ordered result ids (UUID version 7)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from checker_common.ids import canonical_id, parse_id, uuid7, uuid7_millis


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


def _spellings(value: uuid.UUID) -> list[str]:
    text = str(value)
    return [
        text,
        text.upper(),
        "{" + text + "}",
        "urn:uuid:" + text,
        value.hex,
        text[:8] + text[9:13] + "-" + text[13:] + "-",  # hyphens elsewhere
        "+" + text[1:],  # int() reads a sign ...
        text[:-1] + "_",  # ... and underscores between digits
        " " + text[1:],  # ... and spaces around them
        "0x" + text[2:],
        text[:-1] + "g",
        text[:-1],
        text + "0",
        "-" + text[1:],
        "",
    ]


def test_a_task_id_is_read_from_its_text_exactly_as_uuid_reads_it() -> None:
    for value in [uuid.uuid4() for _ in range(200)] + [uuid.UUID(int=0), uuid.UUID(int=2**128 - 1)]:
        for text in _spellings(value):
            try:
                expected: uuid.UUID | None = uuid.UUID(text)
            except ValueError:
                expected = None
            try:
                got: uuid.UUID | None = parse_id(text)
            except ValueError:
                got = None
            assert got == expected, text
            if got is not None:
                assert (got.int, got.is_safe) == (expected.int, expected.is_safe)  # type: ignore[union-attr]
            quick = canonical_id(text)
            assert quick is None or quick == expected, text
        assert canonical_id(str(value)) == value  # the usual spelling takes the quick way
