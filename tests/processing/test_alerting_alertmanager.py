"""The Alertmanager channel against a real Alertmanager (Debian's prometheus-alertmanager): an
incident's alert fires with the task's labels, then shows resolved once the incident closes."""

from __future__ import annotations

import json
import shutil
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from processing.processing_helpers import WIDE_WINDOW, make_result, record_of

from checker_processing import db
from checker_processing.alerting.config import parse
from checker_processing.alerting.sender import Sender
from checker_processing.writer import Writer
from devstack import free_port, start_process, stop_pid, wait_for_port

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(
        shutil.which("prometheus-alertmanager") is None,
        reason="needs Debian's prometheus-alertmanager (apt-get install prometheus-alertmanager)",
    ),
]
DEADLINE = 120.0


@pytest.fixture
def alertmanager(tmp_path: Path) -> Iterator[str]:
    config = tmp_path / "alertmanager.yml"
    config.write_text("route:\n  receiver: nobody\nreceivers:\n  - name: nobody\n")
    port = free_port()
    process = start_process(
        [
            "prometheus-alertmanager",
            f"--config.file={config}",
            f"--storage.path={tmp_path / 'am-data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",
        ],
        tmp_path / "alertmanager.log",
        tmp_path / "alertmanager.pid",
    )
    try:
        wait_for_port(port, timeout=60)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_pid(process.pid)
        process.wait(30)


def alerts(base: str) -> list[dict[str, Any]]:
    """Every alert Alertmanager holds, resolved ones too (the API leaves those out unless
    asked by their state: they are inactive)."""
    with urllib.request.urlopen(f"{base}/api/v2/alerts", timeout=10) as page:
        return list(json.load(page))


def wait(condition: Any, what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.1)


def test_an_incident_fires_an_alert_and_its_end_resolves_it(
    alertmanager: str, schema_dsn: str, migrated: Any
) -> None:
    with migrated.cursor() as cur:
        task = uuid.uuid4()
        cur.execute("INSERT INTO tasks (task_id, tags) VALUES (%s, %s)", (str(task), ["prod"]))
    config = parse(
        f"""
[delivery]
poll_seconds = 0.1
[channels.am]
type = "alertmanager"
url = "{alertmanager}"
[[rules]]
name = "all"
channels = ["am"]
all = true
"""
    )
    stop = threading.Event()
    sender = Sender(partial(db.connect, schema_dsn), config, stop)
    thread = threading.Thread(target=sender.run)
    thread.start()
    writer = Writer(partial(db.connect, schema_dsn), max_message_bytes=4096, window=WIDE_WINDOW)
    try:
        down = make_result(ok=False, health="down", name="shop",
                           error={"kind": "status", "message": "status 503"})  # fmt: skip
        writer.write([record_of(task, down, offset=0)])
        wait(lambda: len(alerts(alertmanager)) == 1, "the alert to fire")
        (firing,) = alerts(alertmanager)
        assert firing["status"]["state"] == "active"
        assert firing["labels"] == {
            "alertname": "PeriodicCheckDown",
            "task": str(task),
            "name": "shop",
            "url": "https://example.test/",
            "tags": "prod",
        }
        assert firing["annotations"]["summary"].startswith("[DOWN] shop")

        writer.write([record_of(task, make_result(name="shop"), offset=1)])
        # A resolved alert leaves the API's list of alerts.
        wait(lambda: alerts(alertmanager) == [], "the alert to be resolved")
    finally:
        writer.close()
        stop.set()
        thread.join(DEADLINE)
    sent = "SELECT kind, state FROM notifications ORDER BY kind"
    with migrated.cursor() as cur:
        cur.execute(sent)
        assert cur.fetchall() == [("closed", "sent"), ("opened", "sent")]
