"""The newcomer's first hour, on one fresh clone and in this order: `scripts/stack.sh up`, the
commands it prints and the README shows, the tests, then `down` (keeps the data) and
`down --purge` (removes what `up` made).

The tests share one stack (bringing it up takes a while) and run in the order written: the
last one takes it down.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg2
import pytest
from psycopg2 import sql

from devstack import free_port

from helpers import ROOT, copy_of_the_repository, run_the_settings_cases

ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
PROCESSES = {"periodic-checker", "checker-processing", "example-page", "stunnel", "tansu"}


@dataclass
class Stack:
    clone: Path
    env: dict[str, str]
    database: str
    up: subprocess.CompletedProcess[str]

    @property
    def dsn(self) -> str:
        return f"{ADMIN_DSN.rsplit('/', 1)[0]}/{self.database}"

    @property
    def run_dir(self) -> Path:
        return self.clone / ".run"

    def command(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`scripts/stack.sh ARGS` in the clone (its bootstrap step left out)."""
        return subprocess.run(
            [str(self.clone / ".venv" / "bin" / "python"), "scripts/stack.py", *args],
            cwd=self.clone,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=240,
        )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    clone = copy_of_the_repository(tmp_path_factory.mktemp("clone"))
    # The virtual environment `scripts/bootstrap.sh` would make: this suite's, under the
    # clone's name (installing one is not what these tests are about).
    (clone / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    database = f"pc_stack_{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "STACK_DATABASE": database,
        "STACK_KAFKA_PORT": str(free_port()),
        "STACK_KAFKA_PLAIN_PORT": str(free_port()),
        "STACK_API_PORT": str(free_port()),
        "STACK_METRICS_PORT": str(free_port()),
        "STACK_PAGE_PORT": str(free_port()),
    }
    stack = Stack(clone, env, database, subprocess.CompletedProcess([], 0))
    try:
        stack.up = stack.command("up")
        assert stack.up.returncode == 0, stack.up.stdout + stack.up.stderr
        yield stack
    finally:
        stack.command("down", "--purge")
        drop_database(database)


def drop_database(name: str) -> None:
    admin = psycopg2.connect(ADMIN_DSN)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    admin.close()


def database_exists(name: str) -> bool:
    admin = psycopg2.connect(ADMIN_DSN)
    with admin.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
        found = cur.fetchone() is not None
    admin.close()
    return found


def result_rows(dsn: str) -> int:
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM check_results")
        row = cur.fetchone()
    conn.close()
    assert row is not None
    return int(row[0])


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def readme_commands(api_port: str) -> list[str]:
    """The shell lines of the README's "Adding checks" block, against this stack's API, less
    the two that need the internet (`tasks run shop` and `probe` reach *.example.net)."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Adding checks", 1)[1]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    return [
        line.replace("127.0.0.1:8080", f"127.0.0.1:{api_port}")
        for line in block.splitlines()
        if not line.startswith(("periodic-checker tasks run", "periodic-checker probe"))
    ]


def bash(script: str, stack: Stack, path: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-e", "-c", script],
        cwd=stack.clone,
        env={**stack.env, "PATH": path},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_up_makes_results_flow_and_records_every_process(stack: Stack) -> None:
    assert "results are flowing into PostgreSQL" in stack.up.stdout
    pid_files = list(stack.run_dir.glob("*.pid"))
    assert {p.stem for p in pid_files} == PROCESSES
    assert all(alive(int(p.read_text())) for p in pid_files)
    with psycopg2.connect(stack.dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT ok, pattern_result FROM latest_results WHERE name = 'local example'")
        assert cur.fetchone() == (True, "match")
    conn.close()


def test_the_line_up_prints_puts_the_readme_commands_on_the_path(stack: Stack) -> None:
    activate = re.search(r"^ *(\. \S+/bin/activate)$", stack.up.stdout, re.MULTILINE)
    assert activate is not None, stack.up.stdout
    # A new shell, where nothing put the virtual environment on the PATH yet.
    path = os.pathsep.join(
        entry
        for entry in os.environ["PATH"].split(os.pathsep)
        if not (Path(entry) / "periodic-checker").exists()
    )
    assert bash("periodic-checker --help", stack, path).returncode == 127  # command not found

    script = "\n".join([activate.group(1), *readme_commands(stack.env["STACK_API_PORT"])])
    done = bash(script, stack, path)

    assert done.returncode == 0, f"{script}\n{done.stdout}{done.stderr}"
    assert "blog" in done.stdout
    assert "local example" in done.stdout


def test_the_settings_cases_pass_in_the_clone_up_ran_in(stack: Stack, tmp_path: Path) -> None:
    assert "KAFKA_CONNECTION=" in (stack.clone / ".env.prod").read_text()

    run_the_settings_cases(stack.clone, tmp_path / "pytest", env={})


def test_down_keeps_the_data_and_down_purge_removes_what_up_made(stack: Stack) -> None:
    pids = [int(p.read_text()) for p in stack.run_dir.glob("*.pid")]
    made = f".env.prod, .run/ (tasks, logs) and the database {stack.database}"

    down = stack.command("down")

    assert down.returncode == 0, down.stderr
    assert f"kept {made}" in down.stdout
    assert [pid for pid in pids if alive(pid)] == []
    assert list(stack.run_dir.glob("*.pid")) == []
    assert (stack.clone / ".env.prod").is_file()
    assert (stack.run_dir / "tasks.sqlite3").is_file()
    assert result_rows(stack.dsn) > 0

    purge = stack.command("down", "--purge")

    assert purge.returncode == 0, purge.stderr
    assert f"removing {made}" in purge.stdout
    assert not (stack.clone / ".env.prod").exists()
    assert not stack.run_dir.exists()
    assert not database_exists(stack.database)
    assert (stack.clone / "certs" / "dev" / "ca.pem").is_file()  # stays, as it says
