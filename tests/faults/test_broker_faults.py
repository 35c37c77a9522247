"""The broker goes away while checks run: longer than the producer's message time-out (results
wait in the outbox), and flapping. Nothing is lost, nothing doubled, both daemons recover by
themselves. FAULTS_FULL=1 runs the long versions (60 s at 1,000 checks/s, a minute of flaps)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from faults.faults_support import (
    DEADLINE_S,
    FULL,
    now_utc,
    pg_proxy,
    pipeline,
)

from helpers import KafkaTarget, broker_cut, wait_for

pytestmark = [pytest.mark.faults, pytest.mark.kafka, pytest.mark.postgres]

TASKS = 1_000 if FULL else 150  # each checked once a second
OUTAGE_S = 60.0 if FULL else 10.0
FLAP_S = 60.0 if FULL else 18.0
FLAP_PERIOD_S = 5.0 if FULL else 3.0  # down, then up, this long each


def test_broker_outage_longer_than_the_message_timeout_loses_nothing(
    kafka: KafkaTarget, topic: str, pg_dsn: str, tmp_path: Path
) -> None:
    broker = kafka.require_local()
    with pipeline(kafka, topic, pg_dsn, tmp_path) as line:
        line.seed(TASKS)
        line.start_processor()
        line.start_checker(KAFKA_MESSAGE_TIMEOUT_MS=3000)
        line.wait_for_rows(TASKS, "results flowing before the outage")
        with broker_cut(broker):
            time.sleep(OUTAGE_S)  # the fault itself lasts this long
        ended = now_utc()
        outbox_used = "result kept in the outbox" in line.checker.text()
        # Recovered by itself: the backlog is delivered while checks go on.
        back = line.recover(ended, 2 * TASKS, "results after the outage")
    tally = back.tally
    tally.report(
        "broker_outage",
        tasks=TASKS,
        outage_s=OUTAGE_S,
        outbox_drained_s=back.outbox_drained_s,
        recovery_s=back.recovery_s,
    )
    assert outbox_used, "an outage past the message time-out must go through the outbox"
    assert tally.lost == tally.duplicates == tally.unknown == tally.outbox_left == 0
    assert tally.rows == tally.produced


@pytest.mark.long  # about a minute: `scripts/test.sh -m long`
def test_sigterm_with_the_broker_away_stores_what_is_in_flight_without_waiting_out_its_budget(
    kafka: KafkaTarget, topic: str, pg_dsn: str, tmp_path: Path
) -> None:
    broker = kafka.require_local()
    with pipeline(kafka, topic, pg_dsn, tmp_path) as line:
        line.seed(TASKS)
        line.start_processor()
        # librdkafka would hold the results for minutes; the daemon may take ten to stop.
        line.start_checker(KAFKA_MESSAGE_TIMEOUT_MS=300_000, SHUTDOWN_TIMEOUT=600)
        line.wait_for_rows(TASKS, "results flowing before the outage")
        with broker_cut(broker):
            wait_for(
                lambda: (line.status() or {}).get("broker_reachable") is False,
                timeout=60,
                what="the checker to see the broker gone",
            )
            time.sleep(2)  # results pile up in librdkafka
            # Well inside its 600 s: waiting out the budget would fail here.
            code = line.checker.terminate(timeout=120)
            assert code == 0, line.checker.tail()
            said = line.checker.text()
            assert "broker unreachable at shutdown" in said
            assert "moved to the outbox at shutdown" in said
        ended = now_utc()
        line.start_checker()  # the broker back: the next start sends what the outbox kept
        back = line.recover(ended, TASKS, "results after the restart")
    tally = back.tally
    tally.report("sigterm_broker_away", tasks=TASKS, outbox_drained_s=back.outbox_drained_s)
    assert tally.lost == tally.duplicates == tally.unknown == tally.outbox_left == 0
    assert tally.rows == tally.produced


@pytest.mark.long  # minutes: `scripts/test.sh -m long`
def test_broker_flapping_loses_nothing(
    kafka: KafkaTarget, topic: str, pg_dsn: str, tmp_path: Path
) -> None:
    broker = kafka.require_local()
    with pipeline(kafka, topic, pg_dsn, tmp_path) as line:
        line.seed(TASKS)
        line.start_processor()
        line.start_checker(KAFKA_MESSAGE_TIMEOUT_MS=3000)
        line.wait_for_rows(TASKS, "results flowing before the flaps")
        flaps = 0
        started = time.monotonic()
        while time.monotonic() - started < FLAP_S:
            with broker_cut(broker):
                flaps += 1
                time.sleep(FLAP_PERIOD_S)
            time.sleep(FLAP_PERIOD_S)
        back = line.recover(now_utc(), 2 * TASKS, "results after the flaps")
    tally = back.tally
    tally.report(
        "broker_flapping",
        tasks=TASKS,
        flaps=flaps,
        outbox_drained_s=back.outbox_drained_s,
        recovery_s=back.recovery_s,
    )
    assert tally.lost == tally.duplicates == tally.unknown == tally.outbox_left == 0
    assert tally.rows == tally.produced


def test_broker_and_database_unreachable_at_start_are_caught_up_by_themselves(
    kafka: KafkaTarget, topic: str, pg_dsn: str, tmp_path: Path
) -> None:
    broker = kafka.require_local()
    with pipeline(kafka, topic, pg_dsn, tmp_path) as line, pg_proxy(line.dsn) as (database, dsn):
        line.seed(TASKS)
        database.stop()
        with broker_cut(broker):
            # Not a settings error: both start, say what is missing, and keep what they have.
            processor = line.start_processor(dsn, assigned=False)
            checker = line.start_checker(KAFKA_MESSAGE_TIMEOUT_MS=3000)
            wait_for(
                lambda: (
                    (s := line.status()) is not None
                    and s["broker_reachable"] is False
                    and s["outbox_size"] > 0
                ),
                "the checker to report the broker unreachable and keep results in its outbox",
                timeout=DEADLINE_S,
            )
            processor.wait_for_text("database unavailable at start")
            assert checker.alive()
            assert processor.alive()
            checker.wait_for_text("kafka: 1/1 brokers are down")
        database.start()
        back = line.recover(now_utc(), 2 * TASKS, "results after both came")
    tally = back.tally
    tally.report(
        "unreachable_at_start",
        tasks=TASKS,
        outbox_drained_s=back.outbox_drained_s,
        recovery_s=back.recovery_s,
    )
    assert tally.lost == tally.duplicates == tally.unknown == tally.outbox_left == 0
    assert tally.rows == tally.produced
