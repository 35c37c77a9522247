"""`scripts/stack.sh up --nodes 2` on a fresh clone: two checker nodes in cluster mode, each with
its own settings file, SQLite file, API port and node id, plus the processor; `status` names
every node and its address; `up` of another layout is refused while it runs; `down` stops every
node and `down --purge` removes what `up` made.

The tests share one stack and run in the order written: the last one takes it down.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest
from ops.test_local_stack import Stack, alive, database_exists, drop_database, result_rows

from devstack import free_port

from helpers import copy_of_the_repository

NODES = ("node-1", "node-2")


def free_ports(n: int) -> int:
    """The first of `n` consecutive free ports (the nodes' API ports follow STACK_API_PORT)."""
    for _ in range(50):
        base = free_port()
        # Every socket opened is closed, also when a later port of the range is taken.
        with contextlib.ExitStack() as held:
            try:
                for i in range(n):
                    held.enter_context(socket.create_server(("127.0.0.1", base + i)))
            except OSError:
                continue
        return base
    raise AssertionError(f"no {n} consecutive free ports")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    clone = copy_of_the_repository(tmp_path_factory.mktemp("clone"))
    (clone / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    database = f"pc_cluster_{uuid.uuid4().hex[:8]}"
    api = free_ports(len(NODES))

    def other_port() -> str:
        """A free port outside the nodes' API ports (free_port may hand one of them out)."""
        while (port := free_port()) in range(api, api + len(NODES)):
            pass
        return str(port)

    env = {
        **os.environ,
        "STACK_DATABASE": database,
        "STACK_KAFKA_PORT": other_port(),
        "STACK_KAFKA_PLAIN_PORT": other_port(),
        "STACK_API_PORT": str(api),
        "STACK_METRICS_PORT": other_port(),
        "STACK_PAGE_PORT": other_port(),
    }
    stack = Stack(clone, env, database, subprocess.CompletedProcess([], 0))
    try:
        stack.up = stack.command("up", "--nodes", str(len(NODES)))
        assert stack.up.returncode == 0, stack.up.stdout + stack.up.stderr
        yield stack
    finally:
        stack.command("down", "--purge")
        drop_database(database)


def api_port(stack: Stack, node: int) -> int:
    return int(stack.env["STACK_API_PORT"]) + node


def get(port: int, path: str) -> dict[str, object]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as page:
        return dict(json.load(page))


def test_up_starts_every_node_in_cluster_mode_and_prints_its_address(cluster: Stack) -> None:
    out = cluster.up.stdout
    assert "results are flowing into PostgreSQL" in out
    for i, name in enumerate(NODES):
        assert f"{name}: API http://127.0.0.1:{api_port(cluster, i)}/" in out, out
        settings = (cluster.run_dir / f"{name}.env").read_text()
        assert "CHECKER_MODE=cluster" in settings
        assert f"CHECKER_NODE_ID={name}" in settings
        assert f"TASK_STORAGE={cluster.run_dir / f'{name}.sqlite3'}" in settings
        assert f"API_PORT={api_port(cluster, i)}" in settings
        assert (cluster.run_dir / f"{name}.sqlite3").is_file()
    pids = {p.stem for p in cluster.run_dir.glob("*.pid")}
    assert pids == {f"periodic-checker-{n}" for n in NODES} | {
        "checker-processing",
        "example-page",
        "stunnel",
        "tansu",
    }
    assert result_rows(cluster.dsn) > 0


def test_every_node_has_the_example_check_created_through_the_first(cluster: Stack) -> None:
    for i, _name in enumerate(NODES):
        tasks = get(api_port(cluster, i), "/tasks?q=local%20example")["tasks"]
        assert [task["spec"]["name"] for task in tasks] == ["local example"]  # type: ignore[attr-defined]


def test_status_names_every_node_and_its_address(cluster: Stack) -> None:
    done = cluster.command("status")

    assert done.returncode == 0, done.stdout + done.stderr
    for i, name in enumerate(NODES):
        line = f"periodic-checker-{name}: running, API http://127.0.0.1:{api_port(cluster, i)}/"
        assert line in done.stdout, done.stdout
    # The nodes share the task topic's partitions: each owns some, none twice.
    owned = re.findall(r"owns partitions \[([\d, ]*)\]", done.stdout)
    assert len(owned) == len(NODES), done.stdout
    partitions = [int(p) for one in owned for p in one.split(",") if p.strip()]
    assert partitions, done.stdout
    assert len(partitions) == len(set(partitions)), done.stdout


def test_up_of_another_layout_is_refused_while_the_cluster_runs(cluster: Stack) -> None:
    single = cluster.command("up")
    assert single.returncode == 1
    assert "the stack runs 2 cluster nodes; run `scripts/stack.sh down` first" in single.stderr

    for bad in (["--nodes", "0"], ["--nodes"], ["--nodes", "x"], ["--node", "2"]):
        refused = cluster.command("up", *bad)
        assert refused.returncode == 2, bad
        assert "--nodes takes a whole number >= 1" in refused.stderr


def test_down_stops_every_node_and_purge_removes_what_up_made(cluster: Stack) -> None:
    pids = [int(p.read_text()) for p in cluster.run_dir.glob("*.pid")]

    down = cluster.command("down")

    assert down.returncode == 0, down.stderr
    for name in NODES:
        assert f"stopped periodic-checker-{name}" in down.stdout
    assert [pid for pid in pids if alive(pid)] == []
    assert list(cluster.run_dir.glob("*.pid")) == []
    assert (cluster.run_dir / "node-2.sqlite3").is_file()
    stopped = cluster.command("status")
    assert stopped.returncode == 1
    assert "periodic-checker-node-2: stopped" in stopped.stdout

    purge = cluster.command("down", "--purge")

    assert purge.returncode == 0, purge.stderr
    assert not cluster.run_dir.exists()
    assert not database_exists(cluster.database)
    with pytest.raises(psycopg2.OperationalError):
        result_rows(cluster.dsn)
