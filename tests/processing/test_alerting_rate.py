"""The rate limit's arithmetic and the summary's words, as pure functions: what a channel may
send in a minute, what one summary says and which id it has, in each channel's format."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from pathlib import Path

import jsonschema
import orjson
import pytest

from checker_processing.alerting import mail, slack
from checker_processing.alerting.config import AlertingConfigError, parse
from checker_processing.alerting.message import SummaryItem, summary_body
from checker_processing.alerting.outbox import summary_id
from checker_processing.alerting.rate import Allowance, allowance

SCHEMA = json.loads(
    (Path(__file__).resolve().parents[2] / "schema" / "notification.schema.json").read_text()
)
WINDOW = datetime(2026, 12, 4, 17, 45, tzinfo=UTC)


# (due now, limit, spent in this minute, summary sent in it) -> (sent one by one, folded)
ALLOWANCES = [
    (10, 20, 0, False, 10, False),
    (20, 20, 0, False, 20, False),
    (21, 20, 0, False, 20, True),  # the 21st and any other due: one summary
    (1000, 50, 0, False, 50, True),
    (5, 20, 18, False, 2, True),
    (5, 20, 20, False, 0, True),
    (5, 20, 18, True, 2, False),  # the summary is spent too: the rest wait a minute
    (5, 20, 20, True, 0, False),
    (5, 20, 25, False, 0, True),  # spent past the limit (a sender died mid-send): no room
    (0, 20, 20, True, 0, False),
]


@pytest.mark.parametrize(("due", "limit", "spent", "summarised", "send", "fold"), ALLOWANCES)
def test_a_channel_sends_up_to_its_budget_then_folds_the_rest_once_a_minute(
    due: int, limit: int, spent: int, summarised: bool, send: int, fold: bool
) -> None:
    assert allowance(due, limit, spent, summarised) == Allowance(send=send, fold=fold)


def items(count: int) -> list[SummaryItem]:
    kinds = ["opened"] * 3 + ["closed"]  # three openings to a recovery
    return [
        SummaryItem(
            notification_id=uuid.UUID(int=i + 1),
            kind=kinds[i % 4],  # type: ignore[arg-type]
            task_id=uuid.UUID(int=0x4000_8000_0000_0000_0000 + i),
            task_name=f"task-{i:04d}" if i != 1 else None,
        )
        for i in range(count)
    ]


def test_a_summary_counts_by_kind_names_the_first_twenty_and_counts_the_others() -> None:
    folded = items(950)
    body = summary_body(uuid.UUID(int=7), "ops", WINDOW, 50, folded)

    assert body.kind == "summary"
    assert (body.counts.opened, body.counts.closed, body.counts.reminder) == (713, 237, 0)
    assert body.notification_ids == [i.notification_id for i in folded]
    assert body.first == folded[:20]
    assert body.more == 930
    assert body.summary == (
        "[SUMMARY] 950 notifications over the limit of 50 a minute: 713 opened, 237 closed:"
        " task-0000, 00000000-0000-4000-8000-000000000001, task-0002, task-0003, task-0004,"
        " task-0005, task-0006, task-0007, task-0008, task-0009, task-0010, task-0011,"
        " task-0012, task-0013, task-0014, task-0015, task-0016, task-0017, task-0018,"
        " task-0019 and 930 more"
    )
    jsonschema.validate(json.loads(body.model_dump_json()), SCHEMA)


def test_a_small_summary_names_every_task() -> None:
    body = summary_body(uuid.UUID(int=7), "ops", WINDOW, 50, items(1))
    assert body.summary == (
        "[SUMMARY] 1 notification over the limit of 50 a minute: 1 opened: task-0000"
    )
    assert body.more == 0


def test_the_summary_id_is_that_of_its_channel_and_notifications_in_any_order() -> None:
    ids = [uuid.UUID(int=i) for i in range(1, 60)]
    assert summary_id("ops", ids) == summary_id("ops", list(reversed(ids)))
    assert summary_id("ops", ids) != summary_id("chat", ids)
    assert summary_id("ops", ids) != summary_id("ops", ids[1:])


def test_slack_and_e_mail_tell_a_summary_in_their_own_way() -> None:
    body = summary_body(uuid.UUID(int=7), "ops", WINDOW, 50, items(25))
    assert orjson.loads(slack.payload(body)) == {"text": body.summary}

    config = parse(
        "[channels.m]\ntype = 'email'\nhost = 'smtp.test'\nfrom_address = 'a@b.test'\n"
        "to = ['c@d.test']\nmax_per_minute = 5\n"
    )
    channel = config.channels["m"]
    assert config.max_per_minute("m") == 5
    message = mail.message(channel, body)  # type: ignore[arg-type]
    assert message["Subject"] == body.summary[:200]
    assert message["Message-ID"] == f"<{body.notification_id}@periodic-checker>"
    text = message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert "opened: task-0000\n" in text
    assert "closed: task-0003\n" in text
    assert "and: 5 more\n" in text


def test_a_channel_has_a_default_limit_and_alertmanager_none() -> None:
    config = parse(
        "[channels.ops]\ntype = 'webhook'\nurl = 'http://127.0.0.1:9/'\n"
        "[channels.am]\ntype = 'alertmanager'\nurl = 'http://127.0.0.1:9093'\n"
    )
    assert config.max_per_minute("ops") == 20
    assert config.max_per_minute("am") is None
    with pytest.raises(AlertingConfigError, match=r"line 7: channels.am.max_per_minute: Extra"):
        parse(
            "[channels.ops]\ntype = 'webhook'\nurl = 'http://127.0.0.1:9/'\n"
            "[channels.am]\ntype = 'alertmanager'\nurl = 'http://127.0.0.1:9093'\n"
            "max_per_minute = 10\n",
            "f.toml",
        )
