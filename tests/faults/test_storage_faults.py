"""The checker's SQLite file cannot be written.

Full at run time: its file system (a small tmpfs) is filled up, first with the broker up (task
states cannot be written) and then with the broker down too (the outbox cannot be written):
results stay in memory, nothing is lost once there is room again.

Read-only at start: the file, or the directory it is to be created in, is seen through a
read-only bind mount: the checker stops with one line naming TASK_STORAGE, exit 2, and leaves
every byte as it was. Read-only at run time is not testable this way: root ignores permission
bits, and a mount with the checker's SQLite files open for writing refuses `remount,ro` ("mount
point is busy").

Both need root with CAP_SYS_ADMIN for the mounts; skipped otherwise."""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from faults.faults_support import checker_env, pipeline, seed_tasks, spec, wait_for

from periodic_checker.outbox import Outbox
from periodic_checker.store import SQLiteTaskStore

from helpers import KafkaTarget, broker_cut, run_cli

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


@pytest.mark.long  # minutes: `scripts/test.sh -m long`
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


@contextlib.contextmanager
def read_only_view(source: Path, path: Path) -> Iterator[Path]:
    """`source` seen through a read-only bind mount at `path`, made before anything opens it."""
    path.mkdir()
    if mount("--bind", str(source), str(path)).returncode != 0:
        pytest.skip("cannot bind-mount here (needs CAP_SYS_ADMIN)")
    try:
        remount = mount("-o", "remount,bind,ro", str(path))
        assert remount.returncode == 0, remount.stderr
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


def digests(directory: Path) -> dict[str, str]:
    """SHA-256 of every file in `directory`, by name."""
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in directory.iterdir()}


def left_by_a_killed_checker(storage: Path) -> None:
    """3 tasks, and 2 outbox rows only in the -wal: a process that wrote them and died."""
    seed_tasks(storage, [spec("http://127.0.0.1:9/") for _ in range(3)])
    code = (
        "import os, sys, uuid\n"
        "from pathlib import Path\n"
        "from periodic_checker.outbox import Outbox\n"
        "Outbox(Path(sys.argv[1])).add([(uuid.uuid4(), b'k', b'v') for _ in range(2)])\n"
        "os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", code, str(storage)], check=True, timeout=60)


def refusal(output: str) -> str:
    """The one line of `periodic-checker run` output that says why it stopped."""
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if "TASK_STORAGE" in line]
    assert len(lines) == 1, output
    assert " ERROR " in lines[0], output
    return lines[0]


def test_read_only_task_storage_stops_the_checker_and_changes_nothing(
    kafka: KafkaTarget, topic: str, tmp_path: Path
) -> None:
    source = tmp_path / "store"
    source.mkdir()
    left_by_a_killed_checker(source / "tasks.sqlite3")
    before = digests(source)
    assert {"tasks.sqlite3", "tasks.sqlite3-wal"} <= set(before)
    with read_only_view(source, tmp_path / "ro") as ro:
        env = checker_env(kafka, topic, ro / "tasks.sqlite3")
        run = run_cli("periodic_checker.cli", "run", env=env)
        check = run_cli("periodic_checker.cli", "check-config", env=env)
        after = digests(ro)
    line = refusal(run.stdout + run.stderr)
    assert run.returncode == 2, run.stdout + run.stderr
    assert f"file {ro / 'tasks.sqlite3'} is read-only (read-only file system)" in line
    assert after == before
    assert check.returncode == 1
    assert any(
        one.startswith("FAIL task storage") and "read-only file system" in one
        for one in check.stdout.splitlines()
    ), check.stdout
    # Writable again, the store holds what it held: the tasks and the outbox rows in the -wal.
    store = SQLiteTaskStore(source / "tasks.sqlite3")
    outbox = Outbox(source / "tasks.sqlite3")
    try:
        assert len(store.load(datetime.now(UTC))) == 3
        assert outbox.size() == 2
    finally:
        outbox.close()
        store.close()


def test_read_only_directory_stops_the_checker_before_creating_the_store(
    kafka: KafkaTarget, topic: str, tmp_path: Path
) -> None:
    source = tmp_path / "empty"
    source.mkdir()
    with read_only_view(source, tmp_path / "ro") as ro:
        env = checker_env(kafka, topic, ro / "tasks.sqlite3")
        run = run_cli("periodic_checker.cli", "run", env=env)
        check = run_cli("periodic_checker.cli", "check-config", env=env)
    line = refusal(run.stdout + run.stderr)
    assert run.returncode == 2, run.stdout + run.stderr
    assert f"directory {ro} is read-only (read-only file system)" in line
    assert list(source.iterdir()) == []
    assert check.returncode == 1
    assert any(
        one.startswith("FAIL task storage") and f"directory {ro} is read-only" in one
        for one in check.stdout.splitlines()
    ), check.stdout
