"""The newcomer's command: `scripts/stack.sh up` brings the pipeline up, `down` stops it."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg2
import pytest
from psycopg2 import sql

from devstack import free_port

ROOT = Path(__file__).resolve().parents[2]
ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"


@pytest.fixture
def stack_env(tmp_path: Path) -> dict[str, str]:
    database = f"pc_stack_{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "STACK_RUN_DIR": str(tmp_path / "run"),
        "STACK_DATABASE": database,
        "STACK_KAFKA_PORT": str(free_port()),
        "STACK_KAFKA_PLAIN_PORT": str(free_port()),
        "STACK_API_PORT": str(free_port()),
        "STACK_METRICS_PORT": str(free_port()),
        "STACK_PAGE_PORT": str(free_port()),
    }
    yield env
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "stack.py"), "down"],
        env=env,
        capture_output=True,
        timeout=120,
    )
    admin = psycopg2.connect(ADMIN_DSN)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database))
        )
    admin.close()


def alive(pid_file: Path) -> bool:
    try:
        os.kill(int(pid_file.read_text()), 0)
    except (OSError, ValueError):
        return False
    return True


def test_stack_up_makes_results_flow_and_down_stops_every_process(
    stack_env: dict[str, str],
) -> None:
    stack = [sys.executable, str(ROOT / "scripts" / "stack.py")]
    up = subprocess.run([*stack, "up"], env=stack_env, capture_output=True, text=True, timeout=240)
    assert up.returncode == 0, up.stdout + up.stderr
    assert "results are flowing into PostgreSQL" in up.stdout
    run_dir = Path(stack_env["STACK_RUN_DIR"])
    pid_files = sorted(run_dir.glob("*.pid"))
    assert {p.stem for p in pid_files} == {
        "periodic-checker",
        "checker-processing",
        "example-page",
        "stunnel",
        "tansu",
    }
    assert all(alive(p) for p in pid_files)
    dsn = f"postgresql://postgres@127.0.0.1:5432/{stack_env['STACK_DATABASE']}"
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT ok, pattern_result FROM latest_results WHERE name = 'local example'")
        assert cur.fetchone() == (True, "match")
    conn.close()
    pids = [int(p.read_text()) for p in pid_files]

    down = subprocess.run(
        [*stack, "down"], env=stack_env, capture_output=True, text=True, timeout=120
    )
    assert down.returncode == 0, down.stderr
    assert list(run_dir.glob("*.pid")) == []
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
