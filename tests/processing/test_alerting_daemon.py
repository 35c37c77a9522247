"""The processor as a process with ALERTING_CONFIG: results from the real broker open and close
an incident, its sender delivers to a real webhook receiver once each, SIGTERM exits 0, and a
second group reading every result again sends nothing more."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from processing.processing_helpers import make_result
from processing.test_daemon import (  # noqa: F401 (fixtures)
    again_group,
    committed,
    count,
    daemons,
    env,
    high_watermarks,
    observer,
    produce,
    wait_for,
)

from checker_common.contract import encode
from devstack import free_port

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]

SECRET = b"whsec-daemon-test"


class Receiver(ThreadingHTTPServer):
    """A webhook receiver in a thread: keeps each body whose signature holds."""

    def __init__(self, port: int = 0) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.forged = 0
        super().__init__(("127.0.0.1", port), _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers["Content-Length"]))
        stamp = self.headers["X-Checker-Timestamp"]
        mac = hmac.new(SECRET, stamp.encode() + b"." + raw, hashlib.sha256).hexdigest()
        if self.headers["X-Checker-Signature"] == f"sha256={mac}":
            self.server.bodies.append(json.loads(raw))
            self.send_response(204)
        else:
            self.server.forged += 1
            self.send_response(401)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    yield server
    server.shutdown()
    thread.join()
    server.server_close()


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
        return str(page.read().decode())


def alerting_file(tmp_path: Path, port: int) -> Path:
    path = tmp_path / "alerting.toml"
    path.write_text(
        f"""
[delivery]
poll_seconds = 0.1
retry_initial_seconds = 0.1
retry_max_seconds = 0.5
[channels.ops]
type = "webhook"
url = "http://127.0.0.1:{port}/hook"
secret = "{SECRET.decode()}"
[[rules]]
name = "all"
channels = ["ops"]
all = true
"""
    )
    return path


def test_the_processor_notifies_once_per_incident_change(
    kafka: Any,
    topic: str,
    env: dict[str, str],  # noqa: F811
    daemons: Any,  # noqa: F811
    receiver: Receiver,
    tmp_path: Path,
) -> None:
    alerting = tmp_path / "alerting.toml"
    alerting.write_text(
        f"""
[delivery]
poll_seconds = 0.1
[channels.ops]
type = "webhook"
url = "http://127.0.0.1:{receiver.server_address[1]}/hook"
secret = "{SECRET.decode()}"
[[rules]]
name = "all"
channels = ["ops"]
all = true
"""
    )
    task = uuid.uuid4()
    start = datetime.now(UTC) - timedelta(minutes=10)
    results = [
        make_result(timestamp=start + timedelta(minutes=i), ok=ok, health=health, name="shop",
                    error=None if ok else {"kind": "status", "message": "status 503"})
        for i, (ok, health) in enumerate([(True, "up"), (False, "down"), (False, "down"),
                                          (True, "up")])
    ]  # fmt: skip
    produce(kafka, topic, [encode(task, r) for r in results])
    metrics_port = free_port()
    daemon = daemons(env, ALERTING_CONFIG=str(alerting), METRICS_PORT=str(metrics_port))
    wait_for(lambda: len(receiver.bodies) == 2, "the opening and the recovery")
    sent = 'checker_processing_notifications_total{channel="ops",kind="%s",outcome="sent"} 1.0'
    wait_for(
        lambda: all(sent % kind in scrape(metrics_port) for kind in ("opened", "closed")),
        "the metrics to count both",
    )
    delays = 'checker_processing_notification_delay_seconds_count{channel="ops"} 2.0'
    assert delays in scrape(metrics_port)
    assert daemon.terminate() == 0
    assert sorted(b["kind"] for b in receiver.bodies) == ["closed", "opened"]
    assert receiver.forged == 0
    assert "whsec-daemon-test" not in daemon.text()

    # Every result again, through another group: no incident changes, nothing is sent.
    group = f"g-{uuid.uuid4().hex[:8]}"
    again = daemons({**env, "KAFKA_CONSUMER_GROUP": group}, ALERTING_CONFIG=str(alerting))
    wait_for(
        lambda: (
            committed(kafka, {**env, "KAFKA_CONSUMER_GROUP": again_group(again)}, topic)
            == high_watermarks(kafka, topic)
        ),
        "the second group to read everything",
    )
    assert again.terminate() == 0
    assert len(receiver.bodies) == 2


def test_a_processor_killed_before_the_send_sends_after_its_restart(
    kafka: Any,
    topic: str,
    env: dict[str, str],  # noqa: F811
    daemons: Any,  # noqa: F811
    observer: Any,  # noqa: F811
    tmp_path: Path,
) -> None:
    port = free_port()  # nothing listens there yet: every try is refused
    alerting = alerting_file(tmp_path, port)
    task = uuid.uuid4()
    down = make_result(ok=False, health="down", name="shop",
                       error={"kind": "status", "message": "status 503"})  # fmt: skip
    produce(kafka, topic, [encode(task, down)])
    first = daemons(env, ALERTING_CONFIG=str(alerting))
    tried = "SELECT count(*) FROM notifications WHERE attempts >= 2 AND state = 'pending'"
    wait_for(lambda: count(observer, tried) == 1, "the incident stored and its send failing")
    first.kill()  # SIGKILL: no goodbye

    receiver = Receiver(port)
    thread = threading.Thread(target=receiver.serve_forever)
    thread.start()
    try:
        second = daemons(env, ALERTING_CONFIG=str(alerting))
        wait_for(lambda: len(receiver.bodies) == 1, "the notification after the restart")
        wait_for(
            lambda: count(observer, "SELECT count(*) FROM notifications WHERE state = 'sent'") == 1,
            "the row marked sent",
        )
        assert second.terminate() == 0
    finally:
        receiver.shutdown()
        thread.join()
        receiver.server_close()
    assert [b["kind"] for b in receiver.bodies] == ["opened"]
