"""Helpers the tests share (not fixtures)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from checker_common.settings import field_env_names
from checker_processing.settings import ProcessorSettings
from devstack import Broker
from periodic_checker.settings import CheckerSettings

ROOT = Path(__file__).resolve().parent.parent


def run_cli(
    module: str,
    *args: str,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """Run `python -m MODULE ARGS` with only the given settings in its environment."""
    base = {k: v for k, v in os.environ.items() if not _is_setting(k)}
    base.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        env=base,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


SETTINGS = frozenset(field_env_names(CheckerSettings)) | frozenset(
    field_env_names(ProcessorSettings)
)
# systemd's hand-over: a daemon a test starts must not notify the test runner's own manager.
SERVICE_MANAGER = frozenset({"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"})


def _is_setting(name: str) -> bool:
    """Whether a daemon reads this environment variable (names are case-insensitive)."""
    return name.upper() in SETTINGS | SERVICE_MANAGER


def copy_of_the_repository(into: Path) -> Path:
    """The repository as a fresh clone holds it, with uncommitted edits: tracked and untracked
    files, nothing git ignores (no `.venv`, `.run/`, `.env.prod` or `certs/dev/`)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():  # a file deleted but not yet committed is still listed
            target = into / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return into


def run_the_settings_cases(clone: Path, basetemp: Path, env: dict[str, str]) -> str:
    """Run the clone's `tests/test_settings.py` with pytest from the clone's root, as
    `scripts/test.sh` runs the suite, with `env` added to the environment; fail with pytest's
    output unless every case passes. Returns that output."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "tests/test_settings.py",
            "-x",
            "-q",
            "-p",
            "no:cacheprovider",
            f"--basetemp={basetemp}",
            "-k",
            # Not itself; and a bad setting once per case (`run`): `check-config` reads the
            # settings through the same loader, and each case is a process start (CI's time).
            "not ignore_the_developers and not check-config",
        ],
        cwd=clone,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    return done.stdout


@dataclass
class KafkaTarget:
    """Where the tests' broker is and how to reach it over mutual TLS."""

    bootstrap: str
    ca: Path
    cert: Path
    key: Path
    password: str | None
    certs_dir: Path | None  # the development certificates, incl. rogue/, when we made them
    local: Broker | None  # None when an external Kafka is used

    def env(self) -> dict[str, str]:
        env = {
            "KAFKA_CONNECTION": self.bootstrap,
            "KAFKA_CA_PATH": str(self.ca),
            "KAFKA_CERT_PATH": str(self.cert),
            "KAFKA_KEY_FILE": str(self.key),
        }
        if self.password is not None:
            env["KAFKA_CERT_PASS"] = self.password
        return env

    def client_config(self, **extra: Any) -> dict[str, Any]:
        config: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap,
            "security.protocol": "SSL",
            "ssl.ca.location": str(self.ca),
            "ssl.certificate.location": str(self.cert),
            "ssl.key.location": str(self.key),
        }
        if self.password is not None:
            config["ssl.key.password"] = self.password
        config.update(extra)
        return config

    def require_local(self) -> Broker:
        if self.local is None:
            pytest.skip("needs the local broker (an external Kafka cannot be cut off)")
        return self.local


def wait_for(condition: Callable[[], Any], what: str, timeout: float) -> Any:
    """Poll `condition` until it is truthy and return its value; fail naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@contextmanager
def http_server(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """A threaded HTTP server on 127.0.0.1 answering with `handler`, for the block: its base
    URL (no trailing slash)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def broker_cut(broker: Broker) -> Iterator[None]:
    """The broker unreachable for every client (its TLS proxy stopped) while inside, and
    always back after it."""
    broker.stop_proxy()
    try:
        yield
    finally:
        broker.start_proxy()


def tasks_topic_of(topic: str) -> str:
    """The task topic the `topic` fixture makes beside a results topic."""
    return f"{topic}-tasks"


def start_checker(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """`periodic-checker run` as a process with only the given settings; output to `log`. Its
    task topic is the one made beside its results topic unless `env` names one: tests do not
    share the default topic (each test's checkers follow their own tasks)."""
    from daemons import CHECKER, Daemon  # daemons imports this module

    if "KAFKA_TOPIC" in env and "KAFKA_TASKS_TOPIC" not in env:
        env = {**env, "KAFKA_TASKS_TOPIC": tasks_topic_of(env["KAFKA_TOPIC"])}
    return Daemon(CHECKER, env, log).proc
