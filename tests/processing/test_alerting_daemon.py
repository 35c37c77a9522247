"""The processor as a process with ALERTING_CONFIG: results from the real broker open and close
an incident, its sender delivers to a real webhook receiver once each, SIGTERM exits 0, and a
second group reading every result again sends nothing more."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
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
    daemons,
    env,
    high_watermarks,
    observer,
    produce,
    wait_for,
)

from checker_common.contract import encode

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]

SECRET = b"whsec-daemon-test"


class Receiver(ThreadingHTTPServer):
    """A webhook receiver in a thread: keeps each body whose signature holds."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.forged = 0
        super().__init__(("127.0.0.1", 0), _Handler)


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
    daemon = daemons(env, ALERTING_CONFIG=str(alerting))
    wait_for(lambda: len(receiver.bodies) == 2, "the opening and the recovery")
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
