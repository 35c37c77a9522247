"""One result counts per (task, slot): when two checker nodes checked the same slot (one of
them cut off from the broker), both results are stored with their node, the first stored
decides, and the other (a double) moves neither health, nor incidents, nor availability."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import orjson
import pytest
from processing.processing_helpers import WIDE_WINDOW, make_result, record_of, rows, scalar

from checker_common.contract import CheckResult
from checker_processing import db
from checker_processing.metrics import Metrics
from checker_processing.report import availability
from checker_processing.writer import Outcome, Record, Writer

pytestmark = pytest.mark.postgres

TASK = uuid.UUID("00000000-0000-4000-8000-0000000000a1")
T0 = datetime(2026, 11, 1, 12, tzinfo=UTC)
SLOT = T0 + timedelta(minutes=1)  # the slot both nodes check
INCIDENTS = "SELECT opened_by::text, closed_by::text FROM incidents ORDER BY started_at"


@pytest.fixture
def writer(schema_dsn: str, migrated: Any) -> Any:
    w = Writer(partial(db.connect, schema_dsn), max_message_bytes=4096, window=WIDE_WINDOW)
    yield w
    w.close()


def check(node: str, slot: datetime, health: str, *, late: float = 0.01) -> CheckResult:
    """A result of TASK's `slot` by `node`, `late` seconds after the slot."""
    down = health == "down"
    return make_result(
        node=node,
        scheduled_at=slot,
        timestamp=slot + timedelta(seconds=late),
        ok=not down,
        health=health,
        status=503 if down else 200,
        error={"kind": "status", "message": "503"} if down else None,
    )


def write(writer: Writer, *batches: list[CheckResult], first_offset: int = 10) -> None:
    offset = first_offset
    for batch in batches:
        records = []
        for result in batch:
            records.append(record_of(TASK, result, offset=offset))
            offset += 1
        writer.write(records)


@pytest.mark.parametrize("before", ["up", "down"])
@pytest.mark.parametrize(("first", "second"), [("up", "down"), ("down", "up")])
@pytest.mark.parametrize("together", [True, False], ids=["one batch", "two batches"])
@pytest.mark.parametrize("double_late", [0.01, 0.03], ids=["stamped before", "stamped after"])
def test_a_slot_checked_by_two_nodes_counts_once_and_the_first_stored_decides(
    writer: Writer,
    migrated: Any,
    before: str,
    first: str,
    second: str,
    together: bool,
    double_late: float,
) -> None:
    """Whatever the verdicts, the order, the batching and which node's clock said what: both
    rows are stored with their node, the one read first decides the task's health and
    incidents, the other is marked as its double and opens or closes nothing, and the report
    counts the slot once."""
    earlier = check("node-a", T0, before)
    write(writer, [earlier], first_offset=0)
    # Node A was cut off: it checks the slot, and so does node B, which took its tasks over.
    # Node B's answer is read first (lower offset); node A's comes later, from its outbox.
    deciding = check("node-b", SLOT, first, late=0.02)
    double = check("node-a", SLOT, second, late=double_late)
    if together:
        write(writer, [deciding, double])
    else:
        write(writer, [deciding], [double])

    assert rows(
        migrated, "SELECT result_id::text, node, double_of::text FROM check_results"
        " WHERE scheduled_at = %s ORDER BY kafka_offset", SLOT,
    ) == [
        (str(deciding.result_id), "node-b", None),
        (str(double.result_id), "node-a", str(deciding.result_id)),
    ]  # fmt: skip
    # Health and latest_results: the deciding result, whichever timestamp is newer.
    assert rows(migrated, "SELECT last_result_id::text, last_health FROM tasks") == [
        (str(deciding.result_id), first)
    ]
    assert rows(migrated, "SELECT result_id::text, node FROM latest_results") == [
        (str(deciding.result_id), "node-b")
    ]
    # Incidents: as if only the deciding result had come.
    expected = {
        ("up", "up"): [],
        ("up", "down"): [(str(deciding.result_id), None)],
        ("down", "up"): [(str(earlier.result_id), str(deciding.result_id))],
        ("down", "down"): [(str(earlier.result_id), None)],
    }[(before, first)]
    assert rows(migrated, INCIDENTS) == expected
    # Availability: two slots, two checks; the successes are the deciding results'.
    successes = [before, first].count("up")
    (report,) = availability(migrated, timedelta(days=1), None, now=T0 + timedelta(hours=1))
    assert (report.checks, report.successes) == (2, successes)
    assert rows(migrated, "SELECT checks, successes FROM availability_hourly") == [(2, successes)]
    assert rows(migrated, "SELECT checks, successes FROM availability_daily") == [(2, successes)]


def test_a_double_read_after_newer_slots_moves_nothing_backwards(
    writer: Writer, migrated: Any
) -> None:
    """Node A's outbox is read after node B's results of later slots: its double of an older
    slot, even one whose timestamp is newer than everything stored (a clock ahead), leaves the
    task, latest_results and the incidents as node B's results put them."""
    b_results = [check("node-b", T0 + timedelta(minutes=n), "up") for n in range(3)]
    write(writer, b_results)
    # The same slot as node B's second result, down, stamped after node B's last one.
    double = check("node-a", T0 + timedelta(minutes=1), "down", late=600)
    write(writer, [double], first_offset=20)

    assert scalar(
        migrated, "SELECT double_of::text FROM check_results WHERE result_id = %s",
        str(double.result_id),
    ) == str(b_results[1].result_id)  # fmt: skip
    assert rows(migrated, "SELECT last_result_id::text, last_health FROM tasks") == [
        (str(b_results[2].result_id), "up")
    ]
    assert rows(migrated, INCIDENTS) == []
    (report,) = availability(migrated, timedelta(days=1), None, now=T0 + timedelta(hours=1))
    assert (report.checks, report.successes) == (3, 3)


def test_a_slot_seen_three_times_in_a_redelivered_batch_counts_once(
    writer: Writer, migrated: Any
) -> None:
    """Three nodes checked one slot; the batch is then delivered again (a processor restart):
    three rows, two doubles of the first, one incident."""
    results = [check(node, SLOT, "down") for node in ("node-c", "node-a", "node-b")]
    records = [record_of(TASK, r, offset=n) for n, r in enumerate(results)]
    outcome = writer.write(records)
    assert outcome == Outcome(inserted=3, doubles=2)
    assert writer.write(records) == Outcome(duplicates=3)
    metrics = Metrics.create()
    metrics.batch(outcome, 0.1)
    assert metrics.registry.get_sample_value("checker_processing_result_doubles_total") == 2
    assert rows(
        migrated, "SELECT node, double_of::text FROM check_results ORDER BY kafka_offset"
    ) == [
        ("node-c", None),
        ("node-a", str(results[0].result_id)),
        ("node-b", str(results[0].result_id)),
    ]
    assert rows(migrated, INCIDENTS) == [(str(results[0].result_id), None)]


def test_results_without_a_slot_or_not_judged_each_count_as_before(
    writer: Writer, migrated: Any
) -> None:
    """A manual run has no slot, and a 'checker_overloaded' result judges nothing: neither
    takes a slot, so neither makes another result a double."""
    manual = [make_result(node="node-a", timestamp=SLOT + timedelta(seconds=n)) for n in (1, 2)]
    overloaded = make_result(
        node="node-a",
        scheduled_at=SLOT,
        timestamp=SLOT,
        ok=False,
        health="up",
        error={"kind": "checker_overloaded", "message": "held up"},
    )
    judged = check("node-b", SLOT, "up", late=0.5)
    write(writer, [*manual, overloaded, judged])
    assert scalar(migrated, "SELECT count(*) FROM check_results WHERE double_of IS NOT NULL") == 0
    assert scalar(migrated, "SELECT count(*) FROM result_slots") == 1
    (report,) = availability(migrated, timedelta(days=1), None, now=T0 + timedelta(hours=1))
    assert report.checks == 3


def test_a_result_of_a_checker_before_the_node_field_is_stored_with_no_node(
    writer: Writer, migrated: Any
) -> None:
    body = check("node-a", SLOT, "up").model_dump(mode="json")
    del body["node"]
    value = orjson.dumps({str(TASK): body})
    assert writer.write([Record("t", 0, 0, str(TASK).encode(), value)]) == Outcome(inserted=1)
    assert rows(migrated, "SELECT node, double_of FROM check_results") == [(None, None)]
    assert scalar(migrated, "SELECT count(*) FROM rejected_messages") == 0
