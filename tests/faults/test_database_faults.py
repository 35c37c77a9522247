"""PostgreSQL goes away while results flow (a TCP proxy in front of it is stopped), and its
backends are terminated in the middle of batches: the processor keeps its batch and its group,
retries, and stores every result exactly once. FAULTS_FULL=1 runs the long versions."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from faults.faults_support import (
    FULL,
    now_utc,
    pg_proxy,
    pipeline,
    recovery_seconds,
    terminate_backends,
)

from helpers import KafkaTarget

pytestmark = [pytest.mark.faults, pytest.mark.kafka, pytest.mark.postgres]

TASKS = 1_000 if FULL else 150
OUTAGE_S = 60.0 if FULL else 10.0
TERMINATIONS = 10 if FULL else 4


def test_database_outage_while_results_flow_loses_nothing(
    kafka: KafkaTarget, topic: str, pg_dsn: str, tmp_path: Path
) -> None:
    with pipeline(kafka, topic, pg_dsn, tmp_path) as line, pg_proxy(line.dsn) as (proxy, via):
        line.seed(TASKS)
        processor = line.start_processor(via)
        line.start_checker()
        line.wait_for_rows(TASKS, "results flowing before the outage")
        proxy.stop()
        try:
            time.sleep(OUTAGE_S)  # the fault itself lasts this long
            frozen = line.rows()
        finally:
            proxy.start()
        ended = now_utc()
        line.wait_for_rows(frozen + 2 * TASKS, "results after the outage")
        tally = line.finish()
        recovery = recovery_seconds(line.dsn, ended)
        log = processor.text()
    tally.report(
        "database_outage",
        tasks=TASKS,
        outage_s=OUTAGE_S,
        recovery_s=recovery if recovery is not None else -1.0,
    )
    assert "database unavailable" in log
    assert ": revoked " not in log.split("signal SIGTERM")[0], "it must keep its partitions"
    assert tally.lost == tally.duplicates == tally.unknown == tally.outbox_left == 0
    assert tally.rows == tally.produced


@pytest.mark.long  # CI's time budget: `scripts/test.sh -m long`
def test_backends_terminated_mid_batch_lose_and_double_nothing(
    kafka: KafkaTarget, topic: str, pg_dsn: str, tmp_path: Path
) -> None:
    with pipeline(kafka, topic, pg_dsn, tmp_path) as line:
        line.seed(TASKS)
        # Small batches written often: a termination lands inside a transaction more often.
        processor = line.start_processor(BATCH_MAX_MESSAGES=50, BATCH_MAX_MS=50)
        line.start_checker()
        line.wait_for_rows(0, "the first results")
        killed = 0
        while killed < TERMINATIONS:
            before = line.rows()
            line.wait_for_rows(before, "rows between terminations")
            killed += terminate_backends(line.dsn) > 0
            time.sleep(0.5)
        line.wait_for_rows(line.rows() + TASKS, "results after the terminations")
        tally = line.finish()
        log = processor.text()
    tally.report("backends_terminated", tasks=TASKS, terminations=killed)
    assert "database unavailable" in log
    assert tally.lost == tally.duplicates == tally.unknown == tally.outbox_left == 0
    assert tally.rows == tally.produced
