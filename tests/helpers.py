"""Helpers the tests share (not fixtures)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


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
