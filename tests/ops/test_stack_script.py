"""`scripts/stack.sh` without a whole stack: what `up` records and `down`, `down --purge` and
`status` read back instead of the shell's STACK_* variables (and `up` refusing to move a running
stack), `up` refusing a taken broker port before it starts anything, and `up` keeping the lines
a user added to `.env.prod`.

The commands run in a fresh clone (as `tests/ops/test_local_stack.py` runs them), where they
stop before starting a process; the record and the `.env.prod` merge are also tested as the
functions they are.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import psycopg2
import pytest
from ops.test_local_stack import ADMIN_DSN, database_exists, drop_database
from psycopg2 import sql

from devstack import free_port

from helpers import ROOT, copy_of_the_repository


def load_stack() -> ModuleType:
    """scripts/stack.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("stack_script", ROOT / "scripts" / "stack.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


stack = load_stack()


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    clone = copy_of_the_repository(tmp_path_factory.mktemp("clone"))
    (clone / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    return clone


def command(clone: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """`scripts/stack.sh ARGS` in the clone (its bootstrap step left out)."""
    return subprocess.run(
        [str(clone / ".venv" / "bin" / "python"), "scripts/stack.py", *args],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def shell(**stack_variables: str) -> dict[str, str]:
    """This environment without any STACK_* variable, plus `stack_variables`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STACK_")}
    return {**env, **stack_variables}


@pytest.fixture
def databases() -> Iterator[list[str]]:
    """Two new databases, dropped at the end whatever the test did to them."""
    names = [f"pc_record_{uuid.uuid4().hex[:8]}" for _ in range(2)]
    admin = psycopg2.connect(ADMIN_DSN)
    admin.autocommit = True
    with admin.cursor() as cur:
        for name in names:
            cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    admin.close()
    try:
        yield names
    finally:
        for name in names:
            drop_database(name)


def test_the_record_round_trips_and_down_and_status_prefer_it_to_the_shell(
    tmp_path: Path,
) -> None:
    made = stack.Settings(database="explore_one", api_port=8180, kafka_port=9193)
    stack.write_record(tmp_path / "stack.env", made)
    record = stack.read_record(tmp_path / "stack.env")
    assert stack.Settings.of(record) == made
    assert (tmp_path / "stack.env").stat().st_mode & 0o777 == 0o600

    other = {"STACK_DATABASE": "periodic_checker", "STACK_API_PORT": "8080", "HOME": "/root"}
    for command_name in ("down", "status"):
        assert stack.settings_for(command_name, other, record) == made
        assert stack.settings_for(command_name, {}, record) == made
    # Without a record, the shell's (or the defaults), as before.
    assert stack.settings_for("down", other, {}).database == "periodic_checker"
    assert stack.settings_for("status", {}, {}) == stack.Settings()
    assert stack.read_record(tmp_path / "missing.env") == {}


def test_up_carries_on_with_the_record_unless_the_shell_sets_a_variable() -> None:
    record = stack.Settings(database="explore_one", api_port=8180).variables()

    again = stack.settings_for("up", {}, record)
    moved = stack.settings_for("up", {"STACK_API_PORT": "8280"}, record)

    assert (again.database, again.api_port) == ("explore_one", 8180)
    assert (moved.database, moved.api_port) == ("explore_one", 8280)


def test_status_prints_the_recorded_api_port_not_the_shells(clone: Path) -> None:
    run = clone / ".run"
    run.mkdir(exist_ok=True)
    port = free_port()
    stack.write_record(run / "stack.env", stack.Settings(api_port=port))
    try:
        done = command(clone, shell(), "status")
    finally:
        (run / "stack.env").unlink()

    assert done.returncode == 1, done.stdout + done.stderr  # nothing runs
    assert f"periodic-checker: stopped, API http://127.0.0.1:{port}/" in done.stdout


def test_down_purge_drops_the_recorded_database_not_the_shells(
    clone: Path, databases: list[str]
) -> None:
    recorded, in_the_shell = databases
    (clone / ".run").mkdir(exist_ok=True)
    stack.write_record(clone / ".run" / "stack.env", stack.Settings(database=recorded))
    (clone / ".env.prod").write_text("LOG_LEVEL=INFO\n")

    done = command(clone, shell(STACK_DATABASE=in_the_shell), "down", "--purge")

    assert done.returncode == 0, done.stdout + done.stderr
    assert f"removed .env.prod, .run/ (tasks, logs) and the database {recorded}" in done.stdout
    assert not database_exists(recorded)
    assert database_exists(in_the_shell)
    assert not (clone / ".run").exists()
    assert not (clone / ".env.prod").exists()


@pytest.mark.parametrize(
    "variable", ["STACK_KAFKA_PORT", "STACK_KAFKA_PLAIN_PORT"], ids=["tls", "plain"]
)
def test_up_refuses_a_taken_broker_port_before_starting_anything(
    clone: Path, variable: str
) -> None:
    ports = {
        name: str(free_port())
        for name in (
            "STACK_KAFKA_PORT",
            "STACK_KAFKA_PLAIN_PORT",
            "STACK_API_PORT",
            "STACK_METRICS_PORT",
            "STACK_PAGE_PORT",
        )
    }
    with socket.create_server(("127.0.0.1", 0)) as other_stack:
        ports[variable] = str(other_stack.getsockname()[1])
        done = command(clone, shell(STACK_DATABASE="pc_never_made", **ports), "up")

    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stderr.splitlines() == [
        f"stack: error: the broker's {'TLS' if variable == 'STACK_KAFKA_PORT' else 'plain'} "
        f"port {ports[variable]} is taken ({variable})"
    ]
    assert done.stdout == ""
    assert list((clone / ".run").glob("*.pid")) == []
    assert not (clone / ".env.prod").exists()
    assert not database_exists("pc_never_made")


def test_up_refuses_to_move_a_running_stack(clone: Path) -> None:
    run = clone / ".run"
    run.mkdir(exist_ok=True)
    port = free_port()
    stack.write_record(run / "stack.env", stack.Settings(api_port=port))
    # A process of the recorded stack, as far as its PID file says.
    with subprocess.Popen(["sleep", "60"]) as sleeper:
        (run / "example-page.pid").write_text(f"{sleeper.pid}\n")
        try:
            done = command(clone, shell(STACK_API_PORT=str(free_port())), "up")
        finally:
            sleeper.kill()
            (run / "example-page.pid").unlink()
            (run / "stack.env").unlink()

    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stderr.splitlines() == [
        f"stack: error: the stack runs with STACK_API_PORT={port}; "
        "run `scripts/stack.sh down` first"
    ]


def test_up_keeps_the_lines_a_user_added_to_env_prod_and_updates_its_own() -> None:
    first = stack.merged_env("", {"API_PORT": 8080, "LOG_LEVEL": "INFO"})
    assert first == f"{stack.ENV_HEADER}\nAPI_PORT=8080\nLOG_LEVEL=INFO\n"
    edited = first + "# mine\nAPI_TOKEN=s3cret\nLOG_LEVEL=DEBUG\n"

    again = stack.merged_env(edited, {"API_PORT": 8180, "LOG_LEVEL": "INFO", "BATCH_MAX_MS": 200})

    assert again.splitlines() == [
        stack.ENV_HEADER,
        "API_PORT=8180",
        "LOG_LEVEL=INFO",
        "# mine",
        "API_TOKEN=s3cret",
        "BATCH_MAX_MS=200",
    ]
