"""Helpers the tests share (not fixtures)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from devstack import Broker


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


def _is_setting(name: str) -> bool:
    prefixes = (
        "KAFKA_",
        "API_",
        "LOG_",
        "POSTGRESQL_",
        "TASK_",
        "METRICS_",
        "RESULTS_",
        "BATCH_",
        "MAX_",
        "PER_HOST_",
        "SHUTDOWN_",
        "TARGET_",
    )
    return name.startswith(prefixes)


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


def start_checker(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """`periodic-checker run` as a process with only the given settings; output to `log`."""
    base = {k: v for k, v in os.environ.items() if not _is_setting(k)}
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "periodic_checker.cli", "run"],
            env={**base, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
