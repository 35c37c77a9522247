"""Maintenance windows: which are open when (a table over a fixed clock), and notifications held
back until a window ends, or told to nobody when the incident ends inside it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from processing.test_alerting_delivery import (  # noqa: F401 (fixtures)
    A,
    B,
    Receiver,
    Senders,
    config_for,
    receiver,
    result,
    rows,
    senders,
    settled,
    until,
    writer,
)

from checker_processing.alerting.config import AlertingConfigError, parse
from checker_processing.writer import Writer

WINDOWS = """
[channels.ops]
type = "webhook"
url = "http://127.0.0.1:9/"

[[maintenance]]
name = "db-upgrade"
tags = ["prod"]
start = 2026-12-05T22:00:00Z
end = 2026-12-06T02:00:00Z

[[maintenance]]
name = "nightly-deploy"
tasks = ["shop"]
weekly = ["mon", "fri"]
at = "23:30"
duration_minutes = 60
"""


# (when, task name, tags, the end of the window open then or None); 2026-12-04 is a Friday.
CASES = [
    ("2026-12-05T21:59:59", "blog", ["prod"], None),
    ("2026-12-05T22:00:00", "blog", ["prod"], "2026-12-06T02:00:00"),
    ("2026-12-06T01:59:59", "blog", ["prod", "eu"], "2026-12-06T02:00:00"),
    ("2026-12-06T02:00:00", "blog", ["prod"], None),
    ("2026-12-05T23:00:00", "blog", ["staging"], None),
    ("2026-12-04T23:30:00", "shop", [], "2026-12-05T00:30:00"),
    ("2026-12-05T00:29:00", "shop", [], "2026-12-05T00:30:00"),  # Saturday, Friday's window
    ("2026-12-05T23:45:00", "shop", [], None),  # Saturday evening: no window
    ("2026-12-07T23:31:00", "shop", [], "2026-12-08T00:30:00"),  # Monday
    ("2026-12-04T23:30:00", "blog", [], None),
]


@pytest.mark.parametrize(("when", "name", "tags", "end"), CASES)
def test_which_window_is_open_when(when: str, name: str, tags: list[str], end: str | None) -> None:
    config = parse(WINDOWS)
    now = datetime.fromisoformat(when).replace(tzinfo=UTC)
    expected = None if end is None else datetime.fromisoformat(end).replace(tzinfo=UTC)
    assert config.held_until(name, tags, now) == expected


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (("duration_minutes = 60", ""), "needs weekly, at and duration_minutes"),
        (('at = "23:30"', 'at = "24:00"'), "maintenance[1].at: String should match"),
        (("end = 2026-12-06T02:00:00Z", "end = 2026-12-05T02:00:00Z"), "end: must be after"),
        (('tasks = ["shop"]', ""), "maintenance[1]: selects no task"),
    ],
)
def test_a_bad_window_names_its_field(change: tuple[str, str], words: str) -> None:
    with pytest.raises(AlertingConfigError, match=words.replace("[", r"\[")):
        parse(WINDOWS.replace(*change))


def _with_window(port: int, end: datetime) -> Any:
    config = config_for(port)
    window = parse(
        WINDOWS.replace("2026-12-05T22:00:00Z", (end - timedelta(days=1)).isoformat())
        .replace("2026-12-06T02:00:00Z", end.isoformat())
        .replace('tags = ["prod"]', "all = true")
    ).maintenance[0]
    return config.model_copy(update={"maintenance": [window]})


async def test_a_notification_due_in_a_window_is_sent_once_when_it_ends(
    writer: Writer,  # noqa: F811
    migrated: Any,
    receiver: Receiver,  # noqa: F811
    senders: Senders,  # noqa: F811
) -> None:
    end = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=3)
    senders.start(_with_window(receiver.port, end))
    writer.write([result(A, 0, 0, "down")])
    await until(
        lambda: rows(migrated, "SELECT held, due_at FROM notifications") == [(True, end)],
        "the opening to be held until the window's end",
    )
    await until(settled(migrated, 1), "the window to end and the opening to go")
    assert receiver.kinds() == [("task-a1", "opened")]


async def test_an_incident_over_inside_a_window_is_told_to_nobody(
    writer: Writer,  # noqa: F811
    migrated: Any,
    receiver: Receiver,  # noqa: F811
    senders: Senders,  # noqa: F811
) -> None:
    end = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=1)
    senders.start(_with_window(receiver.port, end))
    writer.write([result(B, 0, 0, "down")])
    await until(lambda: rows(migrated, "SELECT held FROM notifications") == [(True,)], "the hold")
    writer.write([result(B, 1, 1, "up")])
    await until(settled(migrated, 1), "the opening to be dropped")
    assert rows(migrated, "SELECT kind, state FROM notifications") == [("opened", "cancelled")]
    assert receiver.received == []
