"""The checker's SQLite file cannot be written at run time: its file system (a small tmpfs) is
filled up, first with the broker up (task states cannot be written) and then with the broker
down too (the outbox cannot be written): results stay in memory, nothing is lost once there is
room again. Needs root with CAP_SYS_ADMIN for the mount; skipped otherwise.

A read-only file is not testable this way: root ignores permission bits, and a file system with
the checker's SQLite files open for writing refuses `remount,ro` ("mount point is busy")."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from faults.faults_support import broker_cut, pipeline, wait_for

from helpers import KafkaTarget

pytestmark = [pytest.mark.faults, pytest.mark.kafka, pytest.mark.postgres]

TASKS = 150


def mount(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mount", *args], capture_output=True, text=True, timeout=30)


@contextlib.contextmanager
def small_file_system(path: Path) -> Iterator[Path]:
    """A 64 MiB tmpfs at `path`."""
    path.mkdir()
    if mount("-t", "tmpfs", "-o", "size=64m", "tmpfs", str(path)).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs CAP_SYS_ADMIN)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


@contextlib.contextmanager
def full(path: Path) -> Iterator[None]:
    """The file system of `path` full to the last byte while inside."""
    filler = path / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 20, 4096, 1):
            with contextlib.suppress(OSError):
                while os.write(fd, b"\0" * size):
                    pass
    finally:
        os.close(fd)
    try:
        yield
    finally:
        filler.unlink()


def test_full_task_storage_loses_no_result(
    kafka: KafkaTarget, topic: str, pg_dsn: str, tmp_path: Path
) -> None:
    broker = kafka.require_local()
    with (
        small_file_system(tmp_path / "fs") as fs,
        pipeline(kafka, topic, pg_dsn, tmp_path) as line,
    ):
        line.storage = fs / "tasks.sqlite3"
        line.seed(TASKS)
        line.start_processor()
        line.start_checker(KAFKA_MESSAGE_TIMEOUT_MS=3000)
        line.wait_for_rows(2 * TASKS, "results flowing")
        with full(fs):
            # States cannot be written; results still go to Kafka.
            line.checker.wait_for_text("task states failed", timeout=60)
            reconnects = line.checker.text().count("broker reachable")
            with broker_cut(broker):
                # Results time out of librdkafka and the outbox cannot take them.
                line.checker.wait_for_text("publisher step failed", timeout=60)
                time.sleep(3.0)
        # Back: the results held in memory are written to the outbox, then sent.
        line.checker.wait_for_text("broker reachable", timeout=60)
        wait_for(lambda: line.checker.text().count("broker reachable") > reconnects, "a reconnect")
        line.wait_outbox_empty()
        line.wait_for_rows(line.rows() + 2 * TASKS, "results after the file system is back")
        tally = line.finish()
        log = line.checker.text()
    tally.report("storage_full", tasks=TASKS)
    assert "task states failed" in log
    assert "database or disk is full" in log.split("publisher step failed", 1)[1]
    assert tally.lost == tally.duplicates == tally.unknown == tally.outbox_left == 0
    assert tally.rows == tally.produced
