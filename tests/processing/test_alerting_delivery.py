"""Alerting end to end on real parts: results written by the real writer into a real
PostgreSQL open and close incidents; real senders deliver to a real HTTP receiver that checks
each request's HMAC signature against the committed JSON Schema's contract."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from aiohttp import web
from processing.processing_helpers import WIDE_WINDOW, make_result, record_of, rows

from checker_processing import db
from checker_processing.alerting import message, outbox
from checker_processing.alerting.config import AlertingConfig, parse
from checker_processing.alerting.sender import Sender
from checker_processing.writer import Writer
from devstack import free_port

pytestmark = pytest.mark.postgres

SECRET = "whsec-test-0123456789"
A = uuid.UUID("00000000-0000-4000-8000-0000000000a1")
B = uuid.UUID("00000000-0000-4000-8000-0000000000b2")
START = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
SCHEMA = json.loads(
    (Path(__file__).resolve().parents[2] / "schema" / "notification.schema.json").read_text()
)
# Long enough for any loaded machine; the tests wait for events, never for a time.
DEADLINE = 120.0


def at(minutes: float) -> datetime:
    return START + timedelta(minutes=minutes)


def iso(when: datetime) -> str:
    """As the body says it (JSON Schema's date-time, UTC)."""
    return when.isoformat().replace("+00:00", "Z")


def result(task: uuid.UUID, offset: int, minutes: float, health: str) -> Any:
    ok = health == "up"
    error = None if ok else {"kind": "status", "message": "status 503"}
    checked = make_result(
        timestamp=at(minutes), ok=ok, health=health, error=error, name=f"task-{str(task)[-2:]}"
    )
    return record_of(task, checked, offset=offset)


class Receiver:
    """A webhook receiver on a real port: checks the signature and the body's schema, keeps
    every notification it accepted; answers `fail_with` for as long as that is set."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.received: list[dict[str, Any]] = []
        self.bad: list[str] = []
        self.fail_with: tuple[int, dict[str, str]] | None = None
        self.refused = 0
        self._runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        stamp = request.headers.get("X-Checker-Timestamp", "")
        mac = hmac.new(SECRET.encode(), stamp.encode() + b"." + raw, hashlib.sha256)
        if request.headers.get("X-Checker-Signature") != f"sha256={mac.hexdigest()}":
            self.bad.append("signature")
            return web.Response(status=401)
        if abs(time.time() - int(stamp)) > 300:
            self.bad.append("stale timestamp")
            return web.Response(status=401)
        body = json.loads(raw)
        jsonschema.validate(body, SCHEMA)
        if request.headers["X-Checker-Notification-Id"] != body["notification_id"]:
            self.bad.append("id header")
        if self.fail_with is not None:
            self.refused += 1
            status, headers = self.fail_with
            return web.Response(status=status, headers=headers)
        self.received.append(body)
        return web.Response(status=204)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def kinds(self) -> list[tuple[str, str]]:
        return sorted((b["task"]["name"], b["kind"]) for b in self.received)


def config_for(port: int, **rule: Any) -> AlertingConfig:
    extra = "".join(f"{k} = {json.dumps(v)}\n" for k, v in rule.items())
    return parse(
        f"""
[delivery]
retry_initial_seconds = 0.05
retry_max_seconds = 0.5
poll_seconds = 0.05

[channels.ops]
type = "webhook"
url = "http://127.0.0.1:{port}/hook"
secret = "{SECRET}"
# The most: on a loaded machine a slow answer must not be taken for a lost one (a retry of a
# request that did arrive is a repeat, which receivers drop by the id, but this test counts).
timeout_seconds = 60
# These tests count notifications one by one: the rate limit has its own (test_alerting_burst).
max_per_minute = 10000

[[rules]]
name = "everything"
channels = ["ops"]
all = true
{extra}"""
    )


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver(free_port())
    await r.start()
    yield r
    await r.stop()


@pytest.fixture
def writer(schema_dsn: str, migrated: Any) -> Iterator[Writer]:
    w = Writer(partial(db.connect, schema_dsn), max_message_bytes=4096, window=WIDE_WINDOW)
    yield w
    w.close()


class Senders:
    """Sender threads against one schema, stopped (and awaited) at the end of the test."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.senders: list[Sender] = []

    def start(self, config: AlertingConfig, count: int = 1) -> None:
        for _ in range(count):
            sender = Sender(partial(db.connect, self.dsn), config, self.stop)
            thread = threading.Thread(target=sender.run)
            thread.start()
            self.senders.append(sender)
            self.threads.append(thread)

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(DEADLINE)
            assert not thread.is_alive()


@pytest.fixture
def senders(schema_dsn: str) -> Iterator[Senders]:
    s = Senders(schema_dsn)
    yield s
    s.close()


def states(conn: Any) -> list[tuple[str, str]]:
    return rows(conn, "SELECT kind, state FROM notifications ORDER BY kind, due_at")


async def until(condition: Any, what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        await asyncio.sleep(0.05)


def settled(conn: Any, count: int) -> Any:
    """Whether `count` notifications exist and none is pending any more."""

    def check() -> bool:
        found = rows(conn, "SELECT state FROM notifications")
        return len(found) == count and all(s != "pending" for (s,) in found)

    return check


async def test_an_incident_opens_one_call_and_closes_one_recovery(
    writer: Writer, migrated: Any, receiver: Receiver, senders: Senders
) -> None:
    senders.start(config_for(receiver.port))
    writer.write([result(A, 0, 0, "up"), result(A, 1, 1, "down"), result(A, 2, 2, "down")])
    await until(lambda: len(receiver.received) == 1, "the opening")
    writer.write([result(A, 3, 3, "up")])
    await until(settled(migrated, 2), "the recovery")

    assert receiver.kinds() == [("task-a1", "closed"), ("task-a1", "opened")]
    assert receiver.bad == []
    opened, closed = sorted(receiver.received, key=lambda b: b["kind"], reverse=True)
    assert opened["incident"]["started_at"] == iso(at(1))
    assert opened["incident"]["first_error"] == {"kind": "status", "message": "status 503"}
    assert opened["summary"].startswith("[DOWN] task-a1 (https://example.test/): status")
    assert closed["incident"]["ended_at"] == iso(at(3))
    assert (
        closed["summary"]
        == "[RECOVERED] task-a1 (https://example.test/) is up again after 2m 0s down"
    )
    assert opened["notification_id"] != closed["notification_id"]
    assert states(migrated) == [("closed", "sent"), ("opened", "sent")]


async def test_redelivered_results_send_nothing_twice(
    writer: Writer, migrated: Any, receiver: Receiver, senders: Senders
) -> None:
    batch = [result(A, 0, 0, "down"), result(A, 1, 1, "up")]
    writer.write(batch)
    writer.write(batch)  # Kafka gave the same batch again
    writer.write([*batch, result(A, 2, 2, "down")])  # and again, inside a larger one
    senders.start(config_for(receiver.port))
    await until(settled(migrated, 3), "every notification")
    writer.write(batch)
    await until(settled(migrated, 3), "the redelivery to settle")

    assert receiver.kinds() == [("task-a1", "closed"), ("task-a1", "opened"), ("task-a1", "opened")]
    assert len({b["notification_id"] for b in receiver.received}) == 3


async def test_a_receiver_down_then_back_gets_each_notification_once(
    writer: Writer, migrated: Any, senders: Senders
) -> None:
    receiver = Receiver(free_port())  # nothing listens there yet: connections are refused
    senders.start(config_for(receiver.port))
    writer.write([result(A, 0, 0, "down"), result(A, 1, 1, "up"), result(B, 2, 2, "down")])
    tried = "SELECT kind, attempts >= 3 FROM notifications ORDER BY kind, task_id"
    await until(
        lambda: rows(migrated, tried) == [("closed", False), ("opened", True), ("opened", True)],
        "three failed tries of each opening",
    )
    # The recovery waits for its opening: a receiver never hears of the end first.
    assert rows(migrated, "SELECT attempts FROM notifications WHERE kind = 'closed'") == [(0,)]
    (error,) = rows(
        migrated,
        "SELECT DISTINCT split_part(last_error, ':', 1) FROM notifications WHERE kind = 'opened'",
    )
    assert error == ("ClientConnectorError",)
    await receiver.start()
    try:
        await until(settled(migrated, 3), "the deliveries")
    finally:
        await receiver.stop()
    assert receiver.kinds() == [("task-a1", "closed"), ("task-a1", "opened"), ("task-b2", "opened")]


async def test_retry_after_is_honoured(
    writer: Writer, migrated: Any, receiver: Receiver, senders: Senders
) -> None:
    receiver.fail_with = (429, {"Retry-After": "3600"})  # the backoff alone says 0.05-0.5 s
    senders.start(config_for(receiver.port))
    writer.write([result(A, 0, 0, "down")])
    query = "SELECT attempts, due_at > now() + interval '59 minutes' FROM notifications"
    await until(lambda: rows(migrated, query) == [(1, True)], "the try to be recorded")
    assert receiver.refused == 1
    assert rows(migrated, "SELECT state, last_error FROM notifications") == [
        ("pending", "HTTP 429")
    ]


async def test_a_refusal_is_not_retried(
    writer: Writer, migrated: Any, receiver: Receiver, senders: Senders
) -> None:
    receiver.fail_with = (410, {})
    senders.start(config_for(receiver.port))
    writer.write([result(A, 0, 0, "down")])
    await until(settled(migrated, 1), "the refusal")
    assert rows(migrated, "SELECT state, last_error, attempts FROM notifications") == [
        ("failed", "HTTP 410", 1)
    ]
    assert receiver.refused == 1
    assert receiver.received == []


async def test_a_sender_gives_up_after_the_configured_time_keeping_the_last_error(
    writer: Writer, migrated: Any, receiver: Receiver, senders: Senders
) -> None:
    receiver.fail_with = (503, {})
    config = config_for(receiver.port)
    config = config.model_copy(
        update={"delivery": config.delivery.model_copy(update={"give_up_after_seconds": 1.0})}
    )
    senders.start(config)
    writer.write([result(A, 0, 0, "down")])
    await until(settled(migrated, 1), "giving up")
    ((state, error, attempts),) = rows(
        migrated, "SELECT state, last_error, attempts FROM notifications"
    )
    assert (state, error) == ("failed", "HTTP 503")
    assert attempts >= 1


async def test_two_senders_never_send_one_notification_twice(
    writer: Writer, migrated: Any, receiver: Receiver, senders: Senders
) -> None:
    tasks = [uuid.UUID(int=0x4000_8000_0000_0000_0000 + i) for i in range(60)]
    batch = []
    for i, task in enumerate(tasks):
        batch += [result(task, 3 * i, 0, "down"), result(task, 3 * i + 1, 1, "up"),
                  result(task, 3 * i + 2, 2, "down")]  # fmt: skip
    senders.start(config_for(receiver.port), count=2)
    writer.write(batch)
    await until(settled(migrated, 180), "every notification")

    ids = [b["notification_id"] for b in receiver.received]
    assert len(ids) == 180
    assert len(set(ids)) == 180
    assert all(s.sent > 0 for s in senders.senders)  # both took part


def test_a_recovery_is_not_lost_when_two_senders_expand_at_once(
    writer: Writer, migrated: Any, schema_dsn: str
) -> None:
    """One sender is expanding an incident's opening (its transaction still open) when the
    incident closes and another sender takes the closing event: the recovery waits for the
    opening's notifications instead of finding none (and being told to nobody)."""
    config = config_for(free_port())
    first = db.connect(schema_dsn)
    try:
        writer.write([result(A, 0, 0, "down")])
        with first.cursor() as cur:
            assert outbox.expand(cur, config) == 1  # the opening, not committed yet
        writer.write([result(A, 1, 1, "up")])
        second = db.connect(schema_dsn)
        try:
            with second.cursor() as cur:
                outbox.expand(cur, config)
            second.commit()
            first.commit()
            with second.cursor() as cur:
                outbox.expand(cur, config)
            second.commit()
        finally:
            second.close()
    finally:
        first.close()
    assert states(migrated) == [("closed", "pending"), ("opened", "pending")]


async def test_after_seconds_holds_back_a_short_incident_and_its_recovery(
    writer: Writer, migrated: Any, receiver: Receiver, senders: Senders
) -> None:
    senders.start(config_for(receiver.port, after_seconds=600))
    # Down for 2 minutes: less than the rule waits. Then down for good, an hour ago.
    writer.write([result(A, 0, 0, "down"), result(A, 1, 2, "up"), result(B, 2, 0, "down")])
    await until(lambda: len(receiver.received) == 1, "the long incident")
    await until(
        lambda: (
            rows(migrated, "SELECT count(*) FROM notifications WHERE state = 'pending'") == [(0,)]
        ),
        "the short one to be dropped",
    )
    assert receiver.kinds() == [("task-b2", "opened")]
    assert ("opened", "cancelled") in states(migrated)


async def test_only_tasks_a_rule_selects_are_notified(
    writer: Writer, migrated: Any, receiver: Receiver, senders: Senders
) -> None:
    with migrated.cursor() as cur:
        cur.execute("INSERT INTO tasks (task_id, tags) VALUES (%s, %s)", (str(A), ["prod"]))
    config = parse(
        config_for(receiver.port).model_dump_json()
        and f"""
[delivery]
poll_seconds = 0.05
[channels.ops]
type = "webhook"
url = "http://127.0.0.1:{receiver.port}/hook"
secret = "{SECRET}"
[[rules]]
name = "prod"
channels = ["ops"]
tags = ["prod"]
"""
    )
    senders.start(config)
    writer.write([result(B, 0, 0, "down"), result(A, 1, 0, "down")])
    await until(lambda: len(receiver.received) == 1, "the prod task's opening")
    await until(
        lambda: (
            rows(migrated, "SELECT count(*) FROM alert_events WHERE expanded_at IS NULL") == [(0,)]
        ),
        "both events expanded",
    )
    assert receiver.kinds() == [("task-a1", "opened")]
    assert receiver.received[0]["task"]["tags"] == ["prod"]


def test_the_committed_schema_is_current() -> None:
    assert json.loads(json.dumps(message.json_schema())) == SCHEMA


async def test_a_slack_compatible_webhook_gets_the_summary_as_text(
    writer: Writer, migrated: Any, senders: Senders
) -> None:
    texts: list[dict[str, Any]] = []

    async def incoming(request: web.Request) -> web.Response:
        texts.append(await request.json())
        return web.Response(text="ok")  # what Slack answers

    app = web.Application()
    app.router.add_post("/services/T0/B0/token-secret", incoming)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        config = parse(
            f"""
[delivery]
poll_seconds = 0.05
[channels.chat]
type = "slack"
url = "http://127.0.0.1:{port}/services/T0/B0/token-secret"
[[rules]]
name = "all"
channels = ["chat"]
all = true
"""
        )
        senders.start(config)
        writer.write([result(A, 0, 0, "down"), result(A, 1, 5, "up")])
        await until(settled(migrated, 2), "both messages")
    finally:
        await runner.cleanup()
    assert [t["text"].split(" (")[0] for t in texts] == ["[DOWN] task-a1", "[RECOVERED] task-a1"]
    assert texts[1]["text"].endswith("is up again after 5m 0s down")


async def test_reminders_repeat_while_down_and_stop_when_it_closes(
    writer: Writer, migrated: Any, receiver: Receiver, senders: Senders
) -> None:
    senders.start(config_for(receiver.port, repeat_seconds=3600))
    writer.write([result(A, 0, 0, "down")])
    await until(lambda: len(receiver.received) == 1, "the opening")
    reminder = "SELECT sequence, due_at > now() + interval '59 minutes' FROM notifications"
    await until(
        lambda: (1, True) in rows(migrated, reminder + " WHERE state = 'pending'"),
        "the first reminder, an hour ahead",
    )
    # An hour passes (the database's clock is the sender's): the reminder is due now.
    with migrated.cursor() as cur:
        cur.execute("UPDATE notifications SET due_at = now() WHERE state = 'pending'")
    await until(lambda: len(receiver.received) == 2, "the first reminder")
    await until(
        lambda: (2, True) in rows(migrated, reminder + " WHERE state = 'pending'"),
        "the second reminder, an hour ahead",
    )
    writer.write([result(A, 1, 30, "up")])
    await until(settled(migrated, 4), "the recovery")

    assert [(b["kind"], b["sequence"]) for b in receiver.received] == [
        ("opened", 0),
        ("reminder", 1),
        ("closed", 0),
    ]
    assert receiver.received[1]["summary"].startswith("[STILL DOWN] task-a1")
    assert rows(migrated, "SELECT sequence, state FROM notifications WHERE kind = 'reminder'"
                " ORDER BY sequence") == [(1, "sent"), (2, "cancelled")]  # fmt: skip


def test_retention_empties_the_outbox_of_what_is_older_than_it_keeps(
    writer: Writer, migrated: Any
) -> None:
    from checker_processing import retention

    writer.write([result(A, 0, 0, "down"), result(A, 1, 1, "up"), result(B, 2, 2, "down")])
    with migrated.cursor() as cur:
        cur.execute(
            "INSERT INTO notifications (notification_id, incident_id, task_id, channel, rule,"
            " kind, details, first_due_at, due_at, state, finished_at) VALUES"
            " (gen_random_uuid(), 1, %s, 'ops', 'r', 'opened', '{}', now(), now(), 'sent',"
            "  now() - interval '100 days'),"
            " (gen_random_uuid(), 1, %s, 'ops', 'r', 'closed', '{}', now(), now(), 'sent', now()),"
            " (gen_random_uuid(), 2, %s, 'ops', 'r', 'opened', '{}', now(), now(), 'pending',"
            "  NULL)",
            (str(A), str(A), str(B)),
        )
        cur.execute("UPDATE alert_events SET created_at = now() - interval '100 days'"
                    " WHERE kind = 'opened' AND task_id = %s", (str(A),))  # fmt: skip
    retention.maintain(migrated, datetime.now(UTC).date(), 90)
    assert rows(migrated, "SELECT kind, state FROM notifications ORDER BY kind") == [
        ("closed", "sent"),
        ("opened", "pending"),
    ]
    assert rows(migrated, "SELECT count(*) FROM alert_events") == [(2,)]


async def test_a_flapping_task_is_reported_once_as_flapping(
    writer: Writer, migrated: Any, receiver: Receiver, senders: Senders
) -> None:
    config = config_for(receiver.port)
    flapping = parse(
        "[channels.x]\ntype = 'webhook'\nurl = 'http://127.0.0.1:9/'\n"
        "[flapping]\nchanges = 3\nwindow_seconds = 900\n"
    ).flapping
    senders.start(config.model_copy(update={"flapping": flapping}))
    # Down and up four times in eight minutes: incidents open at minutes 0, 2, 4 and 6.
    healths = ["down", "up"] * 4
    writer.write([result(A, i, i, health) for i, health in enumerate(healths)])
    await until(settled(migrated, 5), "every notification")

    assert [b["kind"] for b in sorted(receiver.received, key=lambda b: b["incident"]["id"])] == [
        "opened", "closed", "opened", "closed", "flapping",
    ]  # fmt: skip
    (flapped,) = [b for b in receiver.received if b["kind"] == "flapping"]
    assert flapped["flapping"] == {"changes": 3, "window_seconds": 900.0}
    assert flapped["summary"].startswith("[FLAPPING] task-a1 (https://example.test/) went down 3")
    assert rows(migrated, "SELECT count(*) FROM incidents") == [(4,)]
