"""Alerting under faults, on real parts: the processor as a process (the real broker behind
mutual TLS, real PostgreSQL) and real receivers: the webhook receiver of the delivery tests
(HMAC signature, JSON Schema), a Slack-compatible one, an SMTP server (aiosmtpd, STARTTLS and a
login) and Debian's Alertmanager. Results produced to the topic open and close incidents while
the fault lasts. Each scenario counts at the receivers: notifications (what PostgreSQL says
was sent), received (distinct notification ids the receiver accepted), duplicates, lost, and
prints one `ALERTING <scenario> <channel>` line for RELIABILITY.md.

    receivers down 60 s (all four kinds at once)    long: scripts/test.sh -m long -k receivers
    PostgreSQL away while notifications are sent    long (and a quick in-process version)
    SIGKILL after the commit, before the send
    two processors in one group
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import shutil
import signal
import ssl
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import psycopg2
import pytest
from aiohttp import web
from aiosmtpd.controller import Controller
from faults.faults_support import emit
from processing import crash_before_send
from processing.processing_helpers import WIDE_WINDOW, TcpProxy, make_result, record_of, rows
from processing.test_alerting_alertmanager import alertmanager, alerts  # noqa: F401 (fixture)
from processing.test_alerting_delivery import SECRET, Receiver
from processing.test_alerting_mail import PASSWORD, Mailbox, authenticator, tls  # noqa: F401
from processing.test_daemon import (  # noqa: F401 (fixtures)
    count,
    daemons,
    env,
    observer,
    produce,
)

from checker_common.contract import encode
from checker_processing import db
from checker_processing.alerting.config import parse
from checker_processing.alerting.sender import Sender
from checker_processing.writer import Writer
from devstack import free_port

from helpers import wait_for as poll_until

pytestmark = [pytest.mark.faults, pytest.mark.kafka, pytest.mark.postgres]

T = TypeVar("T")
DEADLINE_S = 180.0
RECEIVERS_DOWN_S = 60.0
DATABASE_DOWN_S = 20.0
# The rate limit has tests of its own (test_alerting_burst.py): here every notification goes
# one by one, to be counted by its id.
ONE_BY_ONE = "max_per_minute = 10000\n"


def wait_for(condition: Callable[[], Any], what: str, timeout: float = DEADLINE_S) -> Any:
    return poll_until(condition, what, timeout)


# --- receivers, served from a thread of their own (the test itself blocks) -------------------


class Loop:
    """An asyncio loop in a thread: the receivers run there while the test waits."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(60)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(30)
        self.loop.close()


class Hooks(Receiver):
    """The delivery tests' webhook receiver (signature, schema, id header) on `/hook`, a
    Slack-compatible incoming webhook on `/slack`; while `gate` is set, webhook requests are
    held unanswered (counted in `arrived`) until it opens."""

    def __init__(self, port: int) -> None:
        super().__init__(port)
        self.texts: list[str] = []
        self.arrived = 0
        self.gate: asyncio.Event | None = None

    async def handle(self, request: web.Request) -> web.Response:
        self.arrived += 1
        if self.gate is not None:
            await self.gate.wait()
        return await super().handle(request)

    async def slack(self, request: web.Request) -> web.Response:
        self.texts.append((await request.json())["text"])
        return web.Response(text="ok")  # what Slack answers

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        app.router.add_post("/slack", self.slack)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def hold(self) -> None:
        self.gate = asyncio.Event()

    async def release(self) -> None:
        if self.gate is not None:
            self.gate.set()


class Mail:
    """aiosmtpd with STARTTLS and a login on a fixed port: `stop()` is an outage (connections
    refused), `start()` the same server back."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.box = Mailbox()
        self.port = free_port()
        self._tls = context
        self._controller: Controller | None = None

    def start(self) -> None:
        self._controller = Controller(
            self.box, hostname="127.0.0.1", port=self.port, tls_context=self._tls,
            require_starttls=True, authenticator=authenticator,
        )  # fmt: skip
        self._controller.start()

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def ids(self) -> list[str]:
        return [str(mail["X-Checker-Notification-Id"]) for _, mail in self.box.messages]


@pytest.fixture
def loop() -> Iterator[Loop]:
    served = Loop()
    yield served
    served.close()


@pytest.fixture
def hooks(loop: Loop) -> Iterator[Hooks]:
    receiver = Hooks(free_port())
    loop.run(receiver.start())
    yield receiver
    loop.run(receiver.release())
    loop.run(receiver.stop())


def alerting_file(
    tmp_path: Path,
    channels: dict[str, str],
    *,
    batch_size: int = 50,
) -> Path:
    """An alerting file routing every task to `channels` (name -> its TOML body), retrying
    quickly (0.5 s up to 5 s) so that a receiver back is tried within seconds."""
    path = tmp_path / "alerting.toml"
    bodies = "".join(f"[channels.{name}]\n{body}\n" for name, body in channels.items())
    path.write_text(
        f"""
[delivery]
poll_seconds = 0.2
retry_initial_seconds = 0.5
retry_max_seconds = 5
batch_size = {batch_size}
{bodies}
[[rules]]
name = "all"
channels = {json.dumps(list(channels))}
all = true
"""
    )
    return path


def webhook(hooks: Hooks) -> str:
    # The most: on a loaded machine a slow answer must not be taken for a lost one.
    return (
        f'type = "webhook"\nurl = "http://127.0.0.1:{hooks.port}/hook"\n'
        f'secret = "{SECRET}"\ntimeout_seconds = 60\n{ONE_BY_ONE}'
    )


# --- what happened -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Count:
    """One channel's figures in one scenario."""

    notifications: int  # sent, as PostgreSQL says
    received: int  # distinct notifications the receiver accepted
    duplicates: int  # accepted more than once (extra copies)
    lost: int  # sent, and never accepted
    unknown: int  # accepted, and not a notification of this run

    @classmethod
    def of(cls, expected: set[Any], accepted: list[Any]) -> Count:
        seen = Counter(accepted)
        return cls(
            notifications=len(expected),
            received=len(set(seen) & expected),
            duplicates=sum(n - 1 for n in seen.values()),
            lost=len(expected - set(seen)),
            unknown=len(set(seen) - expected),
        )

    def report(self, scenario: str, channel: str, **extra: Any) -> None:
        figures = " ".join(f"{k}={v}" for k, v in extra.items())
        emit(
            f"ALERTING {scenario} {channel}: notifications={self.notifications}"
            f" received={self.received} duplicates={self.duplicates} lost={self.lost}"
            f" unknown={self.unknown} {figures}".rstrip()
        )

    @property
    def once(self) -> bool:
        """Every notification received, once, and nothing else."""
        return (self.received, self.duplicates, self.lost, self.unknown) == (
            self.notifications, 0, 0, 0,
        )  # fmt: skip


def settled(conn: Any, total: int) -> Callable[[], bool]:
    """Whether `total` notifications exist and none is pending."""

    def check() -> bool:
        try:
            found = rows(conn, "SELECT state, count(*) FROM notifications GROUP BY 1")
        except psycopg2.errors.UndefinedTable:
            return False  # not migrated yet
        states = dict(found)
        return sum(states.values()) == total and "pending" not in states

    return check


def sent(conn: Any, channel: str) -> list[tuple[str, str, str]]:
    """(notification_id, kind, task name) of every notification sent to `channel`."""
    return [
        (str(nid), kind, name)
        for nid, kind, name in rows(
            conn,
            "SELECT notification_id, kind, details->'task'->>'name' FROM notifications"
            " WHERE channel = %s AND state = 'sent'",
            channel,
        )
    ]


def not_sent(conn: Any) -> list[tuple[Any, ...]]:
    return rows(conn, "SELECT channel, kind, state, last_error FROM notifications"
                          " WHERE state <> 'sent'")  # fmt: skip


def results(task: uuid.UUID, name: str, *healths: str) -> list[tuple[bytes | None, bytes]]:
    """Encoded results of one task, a second apart, ending now: each 'down' or 'up'."""
    now = time.time()
    encoded = []
    for i, health in enumerate(healths):
        ok = health == "up"
        result = make_result(
            timestamp=datetime.fromtimestamp(now - len(healths) + i + 1, UTC), ok=ok,
            health=health, name=name,
            error=None if ok else {"kind": "status", "message": "status 503"},
        )  # fmt: skip
        encoded.append(encode(task, result))
    return encoded


Message = tuple[bytes | None, bytes]


def every(tasks: list[uuid.UUID], names: list[str], health: str) -> list[Message]:
    """One result of each task, all `health`."""
    return [m for task, name in zip(tasks, names, strict=True) for m in results(task, name, health)]


def incidents(conn: Any) -> tuple[int, int]:
    """(incidents, closed incidents)."""
    try:
        found = rows(conn, "SELECT count(*), count(ended_at) FROM incidents")
    except psycopg2.errors.UndefinedTable:
        return (0, 0)  # not migrated yet
    return int(found[0][0]), int(found[0][1])


def slack_keys(texts: list[str]) -> list[tuple[str, str]]:
    """(task name, kind) of each Slack text: the text carries no notification id, and every
    task of these scenarios has one incident at most, so the pair names one notification."""
    kinds = {"DOWN": "opened", "RECOVERED": "closed"}
    keys = []
    for text in texts:
        match = re.match(r"\[(DOWN|RECOVERED)\] (\S+) ", text)
        assert match, text
        keys.append((match[2], kinds[match[1]]))
    return keys


def alertmanager_received(base: str) -> Counter[str]:
    """Alertmanager's own count of the alerts posted to it, by status (firing, resolved)."""
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as page:
        text = page.read().decode()
    found: Counter[str] = Counter()
    for labels, value in re.findall(r"^alertmanager_alerts_received_total\{(.*)\} (\S+)$", text,
                                    re.MULTILINE):  # fmt: skip
        status = re.search(r'status="(\w+)"', labels)
        assert status, labels
        found[status[1]] += int(float(value))
    return found


def alertmanager_count(posted: Counter[str], got: Counter[str]) -> Count:
    """Alertmanager keeps no ids: openings sent against alerts received firing, closings
    against alerts received resolved (its alert list shows which incidents fire)."""
    pairs = [(posted["opened"], got["firing"]), (posted["closed"], got["resolved"])]
    return Count(
        notifications=posted.total(),
        received=sum(min(s, g) for s, g in pairs),
        duplicates=sum(max(0, g - s) for s, g in pairs),
        lost=sum(max(0, s - g) for s, g in pairs),
        unknown=0,
    )


def active_tasks(base: str) -> set[str]:
    """Task ids of the alerts Alertmanager holds (resolved ones leave its list)."""
    return {a["labels"]["task"] for a in alerts(base)}


# --- a. every kind of receiver down for 60 s ---------------------------------------------------


@pytest.mark.long
@pytest.mark.skipif(
    shutil.which("prometheus-alertmanager") is None,
    reason="needs Debian's prometheus-alertmanager",
)
def test_receivers_down_for_a_minute_get_every_notification_once_when_back(
    kafka: Any,
    topic: str,
    env: dict[str, str],  # noqa: F811
    daemons: Any,  # noqa: F811
    observer: Any,  # noqa: F811
    loop: Loop,
    hooks: Hooks,
    tls: ssl.SSLContext,  # noqa: F811
    alertmanager: str,  # noqa: F811
    dev_certs: Path,
    tmp_path: Path,
) -> None:
    """Six incidents open before the outage; while every receiver is down for a minute,
    three of them close, six more open and three of those close again; when they are back,
    each of the 72 notifications reaches its receiver once."""
    mail = Mail(tls)
    mail.start()
    # Alertmanager is reached through a TCP proxy: stopping it cuts it off while the process
    # keeps what it holds (a restarted Alertmanager forgets its alerts, see RELIABILITY.md).
    am = TcpProxy(("127.0.0.1", urlsplit(alertmanager).port or 9093), free_port())
    am.start()
    config = alerting_file(
        tmp_path,
        {
            "hook": webhook(hooks),
            "chat": f'type = "slack"\nurl = "http://127.0.0.1:{hooks.port}/slack"\n{ONE_BY_ONE}',
            "mail": (
                f'type = "email"\nhost = "localhost"\nport = {mail.port}\n'
                f'security = "starttls"\nusername = "alerts"\npassword = "{PASSWORD}"\n'
                f'ca_file = "{dev_certs / "ca.pem"}"\nfrom_address = "checker@example.test"\n'
                f'to = ["oncall@example.test"]\n{ONE_BY_ONE}'
            ),
            "am": f'type = "alertmanager"\nurl = "http://127.0.0.1:{am.port}"\n',
        },
    )
    tasks = [uuid.uuid4() for _ in range(12)]
    names = [f"task-{i:02d}" for i in range(12)]
    try:
        daemon = daemons(env, ALERTING_CONFIG=str(config))
        # Before: tasks 0-5 go down.
        produce(kafka, topic, [m for i in range(6) for m in results(tasks[i], names[i], "down")])
        wait_for(settled(observer, 6 * 4), "the first six openings sent to every channel")
        assert active_tasks(alertmanager) == {str(t) for t in tasks[:6]}

        loop.run(hooks.stop())  # the webhook and the Slack-compatible receiver
        mail.stop()
        am.stop()
        down_at = time.monotonic()
        # During: 0-2 come back; 6-11 go down; 6-8 come back.
        produce(kafka, topic, [m for i in range(3) for m in results(tasks[i], names[i], "up")])
        produce(kafka, topic, every(tasks[6:], names[6:], "down"))
        wait_for(lambda: incidents(observer) == (12, 3), "six more incidents open, three closed")
        produce(kafka, topic, [m for i in range(6, 9) for m in results(tasks[i], names[i], "up")])
        wait_for(lambda: incidents(observer) == (12, 6), "three of the new incidents closed")
        tried = (
            "SELECT count(DISTINCT channel) FROM notifications"
            " WHERE state = 'pending' AND attempts >= 2"
        )
        wait_for(lambda: count(observer, tried) == 4, "every channel failing during the outage")
        time.sleep(max(0.0, RECEIVERS_DOWN_S - (time.monotonic() - down_at)))
        waiting = count(observer, "SELECT count(*) FROM notifications WHERE state = 'pending'")
        most_tries = count(observer, "SELECT max(attempts) FROM notifications")

        loop.run(hooks.start())
        mail.start()
        am.start()
        wait_for(settled(observer, 12 * 4 + 6 * 4), "every notification after the outage")
        assert daemon.alive()
        assert not_sent(observer) == []

        counts = {
            "hook": Count.of(
                {nid for nid, _, _ in sent(observer, "hook")},
                [b["notification_id"] for b in hooks.received],
            ),
            "chat": Count.of(
                {(name, kind) for _, kind, name in sent(observer, "chat")},
                slack_keys(hooks.texts),
            ),
            "mail": Count.of({nid for nid, _, _ in sent(observer, "mail")}, mail.ids()),
        }
        counts["am"] = alertmanager_count(
            Counter(kind for _, kind, _ in sent(observer, "am")),
            alertmanager_received(alertmanager),
        )
        for channel, found in counts.items():
            found.report("receivers_down", channel, outage_s=int(RECEIVERS_DOWN_S),
                         pending_at_return=waiting, most_tries=most_tries)  # fmt: skip
        # The incidents still open fire in Alertmanager; every closed one is resolved there.
        still_open = {str(tasks[i]) for i in (3, 4, 5, 9, 10, 11)}
        assert active_tasks(alertmanager) == still_open
        assert hooks.bad == []
        assert daemon.terminate() == 0
        assert all(found.once for found in counts.values()), counts
    finally:
        am.stop()
        mail.stop()


# --- b. PostgreSQL away while notifications are being sent -------------------------------------


@pytest.mark.long
def test_a_database_outage_mid_send_loses_and_repeats_nothing(
    kafka: Any,
    topic: str,
    env: dict[str, str],  # noqa: F811
    daemons: Any,  # noqa: F811
    observer: Any,  # noqa: F811
    loop: Loop,
    hooks: Hooks,
    tmp_path: Path,
) -> None:
    """The receiver holds the sender's requests; PostgreSQL goes away (the TCP proxy in front
    of it stopped, as the database fault tests do); the receiver answers, so the sender has
    delivered what it cannot record; results keep coming. After 20 s the database is back:
    every notification, the delivered-but-unrecorded ones too, reaches the receiver once."""
    parts = urlsplit(env["POSTGRESQL_CONNECTION"])
    proxy = TcpProxy((parts.hostname or "127.0.0.1", parts.port or 5432), free_port())
    proxy.start()
    via_proxy = parts._replace(netloc=f"{parts.username}@127.0.0.1:{proxy.port}").geturl()
    config = alerting_file(tmp_path, {"hook": webhook(hooks)})
    tasks = [uuid.uuid4() for _ in range(15)]
    names = [f"task-{i:02d}" for i in range(15)]
    try:
        loop.run(hooks.hold())
        daemon = daemons({**env, "POSTGRESQL_CONNECTION": via_proxy}, ALERTING_CONFIG=str(config))
        produce(kafka, topic, [m for i in range(10) for m in results(tasks[i], names[i], "down")])
        notifications = "SELECT count(*) FROM notifications"
        wait_for(lambda: count(observer, notifications) == 10, "ten openings in the outbox")
        wait_for(lambda: hooks.arrived > 0, "the sender's requests held by the receiver")
        in_flight = hooks.arrived

        proxy.stop()
        try:
            down_at = time.monotonic()
            loop.run(hooks.release())  # delivered now, and the database is gone
            # Due during the outage: 0-4 come back, 10-14 go down.
            produce(kafka, topic, [m for i in range(5) for m in results(tasks[i], names[i], "up")])
            produce(kafka, topic, every(tasks[10:], names[10:], "down"))
            wait_for(
                lambda: "alerting: database unavailable (attempt 2," in daemon.text(),
                "the sender failing to reach the database",
            )
            time.sleep(max(0.0, DATABASE_DOWN_S - (time.monotonic() - down_at)))
        finally:
            proxy.start()
        wait_for(settled(observer, 10 + 5 + 5), "every notification after the outage")
        assert daemon.alive()
        assert not_sent(observer) == []
        found = Count.of(
            {nid for nid, _, _ in sent(observer, "hook")},
            [b["notification_id"] for b in hooks.received],
        )
        found.report("database_down", "hook", outage_s=int(DATABASE_DOWN_S), in_flight=in_flight)
        assert hooks.bad == []
        assert daemon.terminate() == 0
        assert found.once, found
        # What was answered before the outage was recorded after it, not sent again.
        assert daemon.text().count("recorded, not sent again") == in_flight
    finally:
        proxy.stop()


def test_a_sender_that_lost_the_database_after_sending_records_without_sending_again(
    migrated: Any,
    schema_dsn: str,
    loop: Loop,
    hooks: Hooks,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Scenario b in one process, quick: a sender thread whose database goes away while the
    receiver holds its three requests; answered then, they are recorded after the return and
    not sent again."""
    caplog.set_level(logging.INFO, logger="checker_processing.alerting")
    parts = urlsplit(schema_dsn)
    proxy = TcpProxy((parts.hostname or "127.0.0.1", parts.port or 5432), free_port())
    proxy.start()
    via_proxy = parts._replace(netloc=f"{parts.username}@127.0.0.1:{proxy.port}").geturl()
    config = parse(alerting_file(tmp_path, {"hook": webhook(hooks)}).read_text())
    writer = Writer(partial(db.connect, schema_dsn), max_message_bytes=4096, window=WIDE_WINDOW)
    stop = threading.Event()
    thread = threading.Thread(target=Sender(partial(db.connect, via_proxy), config, stop).run)
    error = {"kind": "status", "message": "status 503"}
    downs = [make_result(ok=False, health="down", error=error) for _ in range(3)]
    try:
        loop.run(hooks.hold())
        thread.start()
        writer.write([record_of(uuid.uuid4(), down, offset=i) for i, down in enumerate(downs)])
        wait_for(lambda: hooks.arrived == 3, "the three requests held by the receiver")
        proxy.stop()
        try:
            loop.run(hooks.release())
            wait_for(lambda: "database unavailable" in caplog.text, "the record failing")
        finally:
            proxy.start()
        wait_for(settled(migrated, 3), "the three recorded after the return")
    finally:
        stop.set()
        thread.join(DEADLINE_S)
        writer.close()
        proxy.stop()
    found = Count.of(
        {nid for nid, _, _ in sent(migrated, "hook")},
        [b["notification_id"] for b in hooks.received],
    )
    assert found.once, found
    assert caplog.text.count("recorded, not sent again") == 3


# --- c. SIGKILL after the commit, before the send ----------------------------------------------


@pytest.mark.long  # CI's time budget: `scripts/test.sh -m long`
def test_a_processor_killed_between_the_commit_and_the_send_sends_once_after_restart(
    kafka: Any,
    topic: str,
    env: dict[str, str],  # noqa: F811
    daemons: Any,  # noqa: F811
    observer: Any,  # noqa: F811
    hooks: Hooks,
    tmp_path: Path,
) -> None:
    """The receiver is up throughout; the processor dies at the moment it would send (the
    incident and its notification committed, the notification claimed): nothing reached the
    receiver, and after the restart it gets the notification once, then the recovery once."""
    config = alerting_file(tmp_path, {"hook": webhook(hooks)})
    task = uuid.uuid4()
    produce(kafka, topic, results(task, "shop", "down"))
    crashing = daemons(env, Path(crash_before_send.__file__), ALERTING_CONFIG=str(config))
    assert crashing.proc.wait(timeout=DEADLINE_S) == -signal.SIGKILL, crashing.tail()
    assert crash_before_send.SAYS in crashing.text()
    assert incidents(observer) == (1, 0)
    assert rows(observer, "SELECT kind, state, attempts FROM notifications") == [
        ("opened", "pending", 0)
    ]
    assert hooks.arrived == 0

    restarted = daemons(env, ALERTING_CONFIG=str(config))
    wait_for(settled(observer, 1), "the opening sent after the restart")
    produce(kafka, topic, results(task, "shop", "up"))
    wait_for(settled(observer, 2), "the recovery")
    assert restarted.terminate() == 0
    found = Count.of(
        {nid for nid, _, _ in sent(observer, "hook")},
        [b["notification_id"] for b in hooks.received],
    )
    found.report("killed_before_send", "hook")
    assert sorted(b["kind"] for b in hooks.received) == ["closed", "opened"]
    assert found.once, found


# --- d. two processors in one group ------------------------------------------------------------


@pytest.mark.long  # CI's time budget: `scripts/test.sh -m long`
def test_two_processors_in_one_group_send_each_notification_once(
    kafka: Any,
    topic: str,
    env: dict[str, str],  # noqa: F811
    daemons: Any,  # noqa: F811
    observer: Any,  # noqa: F811
    hooks: Hooks,
    tmp_path: Path,
) -> None:
    """Two processes share the partitions and the outbox (small batches, so both senders
    take part); 30 tasks go down, up and down again: 90 notifications, each received once."""
    config = alerting_file(tmp_path, {"hook": webhook(hooks)}, batch_size=5)
    first = daemons(env, ALERTING_CONFIG=str(config))
    second = daemons(env, ALERTING_CONFIG=str(config))

    def split() -> bool:
        a, b = first.assigned(), second.assigned()
        return bool(a and b and not a & b and a | b == {0, 1, 2})

    wait_for(split, "both processors to own partitions")
    tasks = [uuid.uuid4() for _ in range(30)]
    names = [f"task-{i:02d}" for i in range(30)]
    for health, expected in (("down", (30, 0)), ("up", (30, 30)), ("down", (60, 30))):
        produce(kafka, topic, [m for i in range(30) for m in results(tasks[i], names[i], health)])
        wait_for(partial(lambda e: incidents(observer) == e, expected), f"incidents {expected}")
    wait_for(settled(observer, 90), "every notification")
    assert first.terminate() == 0
    assert second.terminate() == 0
    by_sender = [d.text().count(" sent to hook") for d in (first, second)]
    found = Count.of(
        {nid for nid, _, _ in sent(observer, "hook")},
        [b["notification_id"] for b in hooks.received],
    )
    found.report("two_processors", "hook", by_sender=by_sender)
    assert not_sent(observer) == []
    assert found.once, found
    assert sum(by_sender) == 90
