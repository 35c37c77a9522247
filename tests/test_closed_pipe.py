"""A reader that stops reading (`| head -1`) ends a command quietly: no traceback, status 141."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler

import pytest

from checker_common.cli import EXIT_READER_GONE

from helpers import http_server


class FakeApi(BaseHTTPRequestHandler):
    """Answers `GET /tasks` with a page of tasks, more than a pipe's buffer holds."""

    def do_GET(self) -> None:
        tasks = [
            {
                "id": f"task-{n}",
                "status": "active",
                "health": "up",
                "spec": {"name": f"site-{n}", "url": f"http://site-{n}.example/", "interval": 60},
            }
            for n in range(2000)
        ]
        body = json.dumps({"tasks": tasks, "next_cursor": None}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def api() -> Iterator[str]:
    with http_server(FakeApi) as url:
        yield url


def run_into_a_closed_pipe(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `python -m MODULE ARGS` with stdout a pipe whose reader is gone before it writes."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            [sys.executable, "-m", module, *args],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(write_end)


@pytest.mark.parametrize("json_output", [False, True])
def test_tasks_list_into_a_closed_pipe_stops_quietly(api: str, json_output: bool) -> None:
    args = ["tasks", "list", "--api", api, *(["--json"] if json_output else [])]
    result = run_into_a_closed_pipe("periodic_checker.cli", *args)
    assert result.stderr == ""
    assert result.returncode == EXIT_READER_GONE


@pytest.mark.parametrize("module", ["periodic_checker.cli", "checker_processing.cli"])
def test_help_into_a_closed_pipe_stops_quietly(module: str) -> None:
    result = run_into_a_closed_pipe(module, "--help")
    assert result.stderr == ""
    # argparse itself drops a help text it cannot write, and exits 0 as for any --help.
    assert result.returncode in {0, EXIT_READER_GONE}


def test_the_whole_output_read_is_a_success(api: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "periodic_checker.cli", "tasks", "list", "--api", api],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1].split()[:2] == ["task-0", "site-0"]
