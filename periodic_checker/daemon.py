"""Daemon entry point (filled in by the daemon's own issue)."""

from __future__ import annotations

from checker_common.settings import CommonSettings


def run(settings: CommonSettings) -> int:
    raise SystemExit("run: not built yet")
