"""A checker given more checks than it can start, as a real process against a healthy but
slow site: it sheds the slots it cannot start in time (counted in /status and /metrics)
instead of running them late, and no result says the healthy site is down."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from faults.faults_support import (
    Daemon,
    Target,
    checker_env,
    emit,
    read_topic,
    seed_tasks,
    spec,
    wait_for,
)

from checker_common.contract import NOT_JUDGED

from helpers import KafkaTarget

pytestmark = pytest.mark.kafka

TASKS = 30  # each once a second, 0.3 s each, one at a time: about 3 of the 30 fit a second


def get(port: str, path: str) -> bytes | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as page:
            return bytes(page.read())
    except OSError:
        return None


def status(port: str) -> dict[str, Any] | None:
    """GET /status with its `extra` figures merged in."""
    page = get(port, "/status")
    if page is None:
        return None
    found = dict(json.loads(page))
    return {**found, **found.pop("extra")}


def test_an_overloaded_checker_sheds_slots_and_judges_no_healthy_site_down(
    kafka: KafkaTarget, topic: str, tmp_path: Path
) -> None:
    storage = tmp_path / "tasks.sqlite3"
    with Target() as site:
        slow_but_fine = site.url("/slow?delay=0.3")
        ids = set(seed_tasks(storage, [spec(slow_but_fine, timeout=0.9) for _ in range(TASKS)]))
        env = checker_env(kafka, topic, storage, MAX_IN_FLIGHT=1, MAX_START_LAG=0.5)
        port = env["API_PORT"]
        checker = Daemon.checker(env, tmp_path / "checker.log")
        try:

            def shed_enough() -> dict[str, Any] | None:
                now = status(port)
                if now is None or now.get("slots_skipped", 0) < 100 or now["checks"] < 20:
                    return None
                return now

            shed = wait_for(shed_enough, "the checker to shed 100 slots")
            metrics = (get(port, "/metrics") or b"").decode()
            assert checker.terminate() == 0, checker.tail()
        finally:
            checker.kill()
        log = checker.text()

    results = [m.result for m in read_topic(kafka, topic) if m.task_id in ids]
    judged_down = [
        r for r in results if not r.ok and (r.error is None or r.error.kind not in NOT_JUDGED)
    ]
    not_judged = len([r for r in results if not r.ok]) - len(judged_down)
    emit(
        f"OVERLOAD tasks={TASKS} max_in_flight=1 results={len(results)}"
        f" slots_skipped={shed['slots_skipped']} judged_down={len(judged_down)}"
        f" not_judged={not_judged} lag_p99={shed['schedule_lag_p99']}"
    )
    assert results, "the checks that did start published their results"
    assert judged_down == [], [(r.error.kind, r.error.message) for r in judged_down if r.error]
    assert set(shed["slots_skipped_by_task"]) <= {str(task_id) for task_id in ids}
    assert any(
        line.startswith("periodic_checker_slots_skipped_total ") and float(line.split()[1]) >= 100
        for line in metrics.splitlines()
    ), metrics
    assert "the checker cannot keep up" in log
