"""Schemathesis over /openapi.json against the running API (real service, served by the runner
the daemon uses): no 5xx; every response (status, content type, headers, body) matches the
document; every request the document calls valid is accepted and every one it calls invalid is
refused with a 4xx (schemathesis.toml), so validation and the document cannot disagree
unnoticed. The rules a schema cannot state are dropped from the valid requests by
schemathesis_hooks.py."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from api.support import TOKEN, checker_service, make_settings

from devstack import free_port
from periodic_checker.api.app import create_app
from periodic_checker.api.server import ApiRunner

HERE = Path(__file__).resolve().parent
CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
        "response_schema_conformance",
        "positive_data_acceptance",
        "negative_data_rejection",
    ]
)
RUN_DEADLINE = 240.0  # generous for a shared machine; the run itself is bounded by examples


@pytest.fixture
async def served(tmp_path: Path, dev_certs: Path) -> AsyncIterator[str]:
    async with checker_service(tmp_path / "tasks.sqlite3", max_tasks=10_000) as service:
        runner = ApiRunner(create_app(service, make_settings(dev_certs, TOKEN)), access_log=None)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            await runner.cleanup()


def schemathesis_command() -> list[str]:
    beside = Path(sys.executable).with_name("schemathesis")
    found = str(beside) if beside.exists() else shutil.which("schemathesis")
    if found is None:
        pytest.skip("schemathesis is not installed (dev dependency)")
    return [found]


@pytest.mark.timeout(300)
async def test_every_response_matches_the_openapi_document(served: str, tmp_path: Path) -> None:
    command = [
        *schemathesis_command(),
        "--config-file", str(HERE / "schemathesis.toml"),
        "run",
        f"{served}/openapi.json",
        "--checks", CHECKS,
        "--max-examples", "25",
        "--phases", "examples,coverage,fuzzing,stateful",
        "--header", f"Authorization: Bearer {TOKEN}",
        "--seed", "20261127",
        "--generation-database", "none",
        "--request-timeout", "30",
        "--workers", "1",
        "--no-color",
        "--report-dir", str(tmp_path / "report"),
    ]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *command,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=tmp_path,
        env={
            **os.environ,
            "NO_COLOR": "1",
            "SCHEMATHESIS_HOOKS": "schemathesis_hooks",
            "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
        },
    )
    out, _ = await asyncio.wait_for(proc.communicate(), RUN_DEADLINE)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-6000:]
