"""Bring the whole pipeline up on this machine, or stop everything it started.

    scripts/stack.sh up            certificates, broker behind mutual TLS, topics, database,
                                   .env.prod, both daemons, an example page and a check of it
    scripts/stack.sh up --nodes N  the same with N checker nodes in cluster mode (N >= 1;
                                   docs/cluster.md): node-1 .. node-N, each with its own
                                   settings file .run/node-I.env, SQLite file and API port
                                   (STACK_API_PORT + I - 1); one processor
    scripts/stack.sh down          stop every process it started, by PID; keep the data
    scripts/stack.sh down --purge  stop them, then remove what `up` made but the certificates:
                                   .env.prod, .run/ and the database
    scripts/stack.sh status        which of them run, and each checker's API address

Run state (PID files, logs, the task SQLite files, the nodes' settings, `layout`: how many
nodes `up` started, `stack.env`: the STACK_* settings it ran with) lives in `.run/`, which git
ignores. `down`, `down --purge` and `status` use the recorded settings, not the shell's; the
next `up` carries on with them unless a STACK_* variable is set again.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import psycopg2
from psycopg2 import sql

# The local broker harness lives beside scripts/ in the repository and is not installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from devstack import (
    Broker,
    StackError,
    create_topics,
    make_certs,
    start_process,
    stop_pid_file,
    wait_for_port,
)

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / ".run"
CERTS = ROOT / "certs" / "dev"
ENV_FILE = ROOT / ".env.prod"
BIN = Path(sys.executable).parent
TOPIC = "checker-results"
# Compacted (docs/tasks-topic.md): the tasks with as many partitions as the results, the name
# claims of cluster mode on one.
TASKS_TOPIC = "checker-tasks"
TASK_NAMES_TOPIC = "checker-task-names"
# Cluster mode: the tasks' run state handed from node to node (docs/ownership.md), compacted.
TASK_STATE_TOPIC = "checker-task-state"
CHECKER = "periodic-checker"
# Stopped in this order after the checker(s), which go first so they can flush; the broker last.
OTHERS = ["checker-processing", "example-page", "stunnel", "tansu"]
# What `up` started: "single", or the number of cluster nodes.
LAYOUT = RUN / "layout"
# The STACK_* settings `up` ran with, read back by `down`, `status` and the next `up`.
RECORD = RUN / "stack.env"
ENV_HEADER = "# Written by scripts/stack.sh up for the local stack; see .env.prod.example."


@dataclass(frozen=True)
class Settings:
    """What the stack is made of: a database and ports, each the STACK_* variable `variable`
    names (or its default)."""

    database: str = "periodic_checker"
    admin_dsn: str = "postgresql://postgres@127.0.0.1:5432/postgres"
    kafka_port: int = 9093
    kafka_plain_port: int = 19092
    api_port: int = 8080
    metrics_port: int = 9108
    page_port: int = 8089

    @classmethod
    def of(cls, values: Mapping[str, str]) -> Settings:
        """The settings named in `values` (STACK_* variables), the defaults for the others."""
        given: dict[str, Any] = {}
        for field in fields(cls):
            name = variable(field.name)
            if name in values:
                given[field.name] = int(values[name]) if field.type == "int" else values[name]
        return replace(cls(), **given)

    def variables(self) -> dict[str, str]:
        """Every setting under its STACK_* name."""
        return {variable(f.name): str(getattr(self, f.name)) for f in fields(self)}


def variable(field: str) -> str:
    """The STACK_* variable of a Settings field (`admin_dsn` is STACK_POSTGRES_ADMIN)."""
    return "STACK_POSTGRES_ADMIN" if field == "admin_dsn" else f"STACK_{field.upper()}"


def stack_variables(environ: Mapping[str, str]) -> dict[str, str]:
    """The STACK_* variables set in `environ`."""
    return {k: v for k, v in environ.items() if k in Settings().variables()}


def read_record(path: Path) -> dict[str, str]:
    """The STACK_* settings recorded at `path` by `up`; empty when there is no record."""
    if not path.exists():
        return {}
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return stack_variables({key.strip(): value.strip() for key, value in pairs})


def write_record(path: Path, settings: Settings) -> None:
    """Record what `up` makes the stack of, for `down`, `status` and the next `up`."""
    lines = ["# Written by scripts/stack.sh up: what down, status and the next up use."]
    lines += [f"{key}={value}" for key, value in settings.variables().items()]
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)  # the admin DSN may hold a password


def settings_for(command: str, environ: Mapping[str, str], record: Mapping[str, str]) -> Settings:
    """`up` takes the STACK_* variables set in the shell and the record for the others (it
    carries on where it stopped); `down` and `status` take the record over the shell, which
    they use only when there is none."""
    shell = stack_variables(environ)
    return Settings.of({**record, **shell} if command == "up" else {**shell, **record})


@dataclass(frozen=True)
class Node:
    """One checker process of the stack: the single-mode checker, or cluster node `node-I`."""

    name: str  # the process name (PID and log files); CHECKER_NODE_ID in cluster mode
    port: int
    env_file: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def checkers(nodes: int | None, api_port: int) -> list[Node]:
    """The checker(s) of a layout: None is the single-mode checker, N the cluster's N nodes."""
    if nodes is None:
        return [Node(CHECKER, api_port, ENV_FILE)]
    return [Node(f"node-{i}", api_port + i - 1, RUN / f"node-{i}.env") for i in range(1, nodes + 1)]


def recorded_layout() -> int | None:
    """How many cluster nodes the last `up` started (None: the single-mode checker)."""
    text = LAYOUT.read_text().strip() if LAYOUT.exists() else "single"
    return int(text) if text.isdigit() else None


def process_names(nodes: int | None, api_port: int) -> list[str]:
    """Every process of a layout, in the order `down` stops them."""
    return [pid_name(node) for node in checkers(nodes, api_port)] + OTHERS


def pid_name(node: Node) -> str:
    return node.name if node.name == CHECKER else f"{CHECKER}-{node.name}"


def say(message: str) -> None:
    print(f"stack: {message}", flush=True)


def running(name: str) -> bool:
    pid_file = RUN / f"{name}.pid"
    if not pid_file.exists():
        return False
    try:
        os.kill(int(pid_file.read_text().strip()), 0)
    except (ValueError, ProcessLookupError):
        return False
    return True


def ensure_database(stack: Settings) -> str:
    admin = psycopg2.connect(stack.admin_dsn, connect_timeout=5)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (stack.database,))
        if cur.fetchone() is None:
            cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(stack.database)))
            say(f"created database {stack.database}")
    admin.close()
    return f"{stack.admin_dsn.rsplit('/', 1)[0]}/{stack.database}"


def write_env(dsn: str, stack: Settings) -> None:
    """Write .env.prod: the settings `up` manages updated, every other line of it kept."""
    password = (CERTS / "client.pass").read_text().strip()
    settings: dict[str, object] = {
        "LOG_LEVEL": "INFO",
        "KAFKA_CONNECTION": f"localhost:{stack.kafka_port}",
        "KAFKA_CA_PATH": CERTS / "ca.pem",
        "KAFKA_CERT_PATH": CERTS / "client.pem",
        "KAFKA_KEY_FILE": CERTS / "client.key",
        "KAFKA_CERT_PASS": password,
        "KAFKA_TOPIC": TOPIC,
        "KAFKA_TASKS_TOPIC": TASKS_TOPIC,
        "TASK_STORAGE": RUN / "tasks.sqlite3",
        "API_HOST": "127.0.0.1",
        "API_PORT": stack.api_port,
        "POSTGRESQL_CONNECTION": dsn,
        "KAFKA_CONSUMER_TOPICS": TOPIC,
        # A short session lets a restarted local processor rejoin in seconds.
        "KAFKA_SESSION_TIMEOUT_MS": 6000,
        "METRICS_PORT": stack.metrics_port,
        "BATCH_MAX_MS": 200,
    }
    ENV_FILE.write_text(merged_env(ENV_FILE.read_text() if ENV_FILE.exists() else "", settings))
    ENV_FILE.chmod(0o600)


def merged_env(text: str, settings: Mapping[str, object]) -> str:
    """`text` (a settings file, empty when there is none) with `settings` in it: each one `up`
    manages updated where it stands (once) or added at the end; every other line (one the
    user added, a comment) kept as it is."""
    lines, done = [], set()
    for line in text.splitlines() or [ENV_HEADER]:
        key = setting_of(line)
        if key is not None and key in settings:
            if key not in done:
                lines.append(f"{key}={settings[key]}")
            done.add(key)
        else:
            lines.append(line)
    lines += [f"{key}={value}" for key, value in settings.items() if key not in done]
    return "\n".join(lines) + "\n"


def setting_of(line: str) -> str | None:
    """The name a settings line sets, or None (a comment, a blank line)."""
    if line.lstrip().startswith("#") or "=" not in line:
        return None
    return line.split("=", 1)[0].strip()


def start_daemon(name: str, *args: str, program: str | None = None) -> None:
    """Start `program` (by default the command `name`) unless `name` runs already."""
    if running(name):
        say(f"{name} already runs")
        return
    command = [str(BIN / (program or name)), *args]
    start_process(command, RUN / f"{name}.log", RUN / f"{name}.pid")


def activate_line() -> str:
    """The shell line that puts `periodic-checker` and `checker-processing` on the PATH."""
    return f". {BIN / 'activate'}"


def write_node_env(node: Node) -> None:
    """A cluster node's settings: the stack's, plus its mode, id, SQLite file and API port."""
    own = {
        "CHECKER_MODE": "cluster",
        "CHECKER_NODE_ID": node.name,
        "TASK_STORAGE": RUN / f"{node.name}.sqlite3",
        "API_PORT": node.port,
    }
    kept = [
        line
        for line in ENV_FILE.read_text().splitlines()
        if line.split("=", 1)[0] not in own and not line.startswith("#")
    ]
    lines = [f"# Written by scripts/stack.sh up --nodes: {ENV_FILE.name} and {node.name}'s own."]
    lines += kept + [f"{key}={value}" for key, value in own.items()]
    node.env_file.write_text("\n".join(lines) + "\n")
    node.env_file.chmod(0o600)


def port_taken(port: int) -> bool:
    try:
        with socket.create_server(("127.0.0.1", port)):
            return False
    except OSError:
        return True


def api(method: str, path: str, body: dict[str, object] | None = None, *, port: int) -> object:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=data,
        method=method,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
        text = response.read()
    return json.loads(text) if text else None


def wait_for(what: str, probe: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if probe():  # type: ignore[operator]
                return
        except (OSError, urllib.error.URLError, psycopg2.Error):
            pass
        time.sleep(0.5)
    raise StackError(f"{what} did not happen within {timeout:.0f} s (logs in {RUN})")


def add_example_check(port: int, page_port: int) -> None:
    tasks = api("GET", "/tasks?q=local%20example", port=port)
    if isinstance(tasks, dict) and tasks.get("tasks"):
        return
    api(
        "POST",
        "/tasks",
        {
            "name": "local example",
            "url": f"http://127.0.0.1:{page_port}/",
            "pattern": "periodic-checker example page",
            "interval": 10,
            "timeout": 5,
        },
        port=port,
    )
    say("added the check 'local example'")


def count_rows(dsn: str) -> int:
    with psycopg2.connect(dsn, connect_timeout=3) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM check_results")
        row = cur.fetchone()
    conn.close()
    return int(row[0]) if row else 0


def check_layout(nodes: int | None, stack: Settings) -> None:
    """Refuse to mix layouts: a running stack of another layout is taken down first."""
    recorded = recorded_layout()
    if recorded != nodes and any(running(pid_name(n)) for n in checkers(recorded, stack.api_port)):
        now = "one checker (single mode)" if recorded is None else f"{recorded} cluster nodes"
        raise StackError(f"the stack runs {now}; run `scripts/stack.sh down` first")
    for node in checkers(nodes, stack.api_port):
        if not running(pid_name(node)) and port_taken(node.port):
            raise StackError(f"{node.name}'s API port {node.port} is taken (STACK_API_PORT)")


def check_settings(stack: Settings, record: Mapping[str, str]) -> None:
    """Refuse to move a running stack: a STACK_* variable set to other than what it runs with
    waits for `down`."""
    if not any(running(pid_file.stem) for pid_file in RUN.glob("*.pid")):
        return
    for key, value in stack.variables().items():
        if key in record and record[key] != value:
            raise StackError(
                f"the stack runs with {key}={record[key]}; run `scripts/stack.sh down` first"
            )


def check_ports(stack: Settings) -> None:
    """Refuse a port another program holds (the broker's, the example page's, the processor's
    metrics), before anything starts; one of this stack's own processes may hold its port."""
    owners = [
        ("stunnel", stack.kafka_port, "the broker's TLS port", "STACK_KAFKA_PORT"),
        ("tansu", stack.kafka_plain_port, "the broker's plain port", "STACK_KAFKA_PLAIN_PORT"),
        ("example-page", stack.page_port, "the example page's port", "STACK_PAGE_PORT"),
        ("checker-processing", stack.metrics_port, "the metrics port", "STACK_METRICS_PORT"),
    ]
    broker_runs = running("stunnel") and running("tansu")  # else `up` restarts both
    for name, port, what, key in owners:
        own = broker_runs if name in ("stunnel", "tansu") else running(name)
        if not own and port_taken(port):
            raise StackError(f"{what} {port} is taken ({key})")


def up(stack: Settings, record: Mapping[str, str], nodes: int | None = None) -> None:
    RUN.mkdir(exist_ok=True)
    check_settings(stack, record)
    check_layout(nodes, stack)
    check_ports(stack)
    LAYOUT.write_text(f"{'single' if nodes is None else nodes}\n")
    write_record(RECORD, stack)
    make_certs(CERTS)
    if running("tansu") and running("stunnel"):
        say(f"broker already runs on localhost:{stack.kafka_port}")
    else:
        for name in ("stunnel", "tansu"):
            stop_pid_file(RUN / f"{name}.pid")
        Broker(RUN, CERTS, tls_port=stack.kafka_port, plain_port=stack.kafka_plain_port).start()
        say(f"broker (tansu) behind mutual TLS (stunnel) on localhost:{stack.kafka_port}")
    dsn = ensure_database(stack)
    write_env(dsn, stack)
    password = (CERTS / "client.pass").read_text().strip()
    create_topics(
        {
            "bootstrap.servers": f"localhost:{stack.kafka_port}",
            "security.protocol": "SSL",
            "ssl.ca.location": str(CERTS / "ca.pem"),
            "ssl.certificate.location": str(CERTS / "client.pem"),
            "ssl.key.location": str(CERTS / "client.key"),
            "ssl.key.password": password,
        },
        [TOPIC, TASKS_TOPIC, TASK_NAMES_TOPIC, TASK_STATE_TOPIC],
        compacted=frozenset({TASKS_TOPIC, TASK_NAMES_TOPIC, TASK_STATE_TOPIC}),
        partitions_of={TASK_NAMES_TOPIC: 1},
    )
    subprocess.run(
        [str(BIN / "checker-processing"), "--env-file", str(ENV_FILE), "migrate"],
        check=True,
        cwd=ROOT,
    )
    if not running("example-page"):
        start_process(
            [
                sys.executable,
                "-m",
                "http.server",
                str(stack.page_port),
                "--bind",
                "127.0.0.1",
                "--directory",
                str(ROOT / "deploy" / "local" / "www"),
            ],
            RUN / "example-page.log",
            RUN / "example-page.pid",
        )
    wait_for_port(stack.page_port)
    start_daemon("checker-processing", "--env-file", str(ENV_FILE), "run")
    started = checkers(nodes, stack.api_port)
    for node in started:
        if nodes is not None:
            write_node_env(node)
        start_daemon(pid_name(node), "--env-file", str(node.env_file), "run", program=CHECKER)
    for node in started:
        wait_for(
            f"{node.name}'s API to answer",
            lambda node=node: api("GET", "/health", port=node.port) is not None,
            120,
        )
    add_example_check(started[0].port, stack.page_port)
    wait_for("a first result in PostgreSQL", lambda: count_rows(dsn) > 0, 90)
    say("the pipeline is up and results are flowing into PostgreSQL")
    if nodes is not None:
        say(f"{nodes} checker node(s) in cluster mode (docs/cluster.md):")
        for node in started:
            print(f"  {node.name}: API {node.url}/  settings {node.env_file}")
    print(
        f"""
  API (and /docs, /metrics):  http://127.0.0.1:{stack.api_port}/
  results:                    psql {dsn} -c 'SELECT * FROM latest_results'
  processor metrics:          http://127.0.0.1:{stack.metrics_port}/metrics
  logs:                       {RUN}/*.log
  settings:                   {ENV_FILE}
  stop everything:            scripts/stack.sh down          (keeps the tasks, results, settings)
  remove what up made:        scripts/stack.sh down --purge

  periodic-checker and checker-processing are in .venv, not on your PATH. In your shell, run

    {activate_line()}

  then, in {ROOT} (the commands read the .env.prod there):

    periodic-checker tasks list
    periodic-checker tasks add site https://example.org/ --interval 60
"""
    )


def down(stack: Settings, purge: bool) -> None:
    # Whatever checker PID files there are (any layout), then the rest.
    names = sorted(p.stem for p in RUN.glob(f"{CHECKER}*.pid")) + OTHERS
    for name in names:
        pid_file = RUN / f"{name}.pid"
        if pid_file.exists():
            stop_pid_file(pid_file)
            say(f"stopped {name}")
    made = f".env.prod, .run/ (tasks, logs) and the database {stack.database}"
    if not purge:
        say(f"kept {made}; `scripts/stack.sh down --purge` removes them")
        return
    say(f"removing {made}; certs/dev/ stays (the next `up` uses it again)")
    ENV_FILE.unlink(missing_ok=True)
    if RUN.exists():
        shutil.rmtree(RUN)
    drop_database(stack)
    say(f"removed {made}")


def drop_database(stack: Settings) -> None:
    admin = psycopg2.connect(stack.admin_dsn, connect_timeout=5)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(stack.database)
            )
        )
    admin.close()


def status(stack: Settings) -> int:
    nodes = recorded_layout()
    for node in checkers(nodes, stack.api_port):
        state = "running" if running(pid_name(node)) else "stopped"
        say(f"{pid_name(node)}: {state}, API {node.url}/{owns(node) if nodes else ''}")
    for name in OTHERS:
        say(f"{name}: {'running' if running(name) else 'stopped'}")
    return 0 if all(running(name) for name in process_names(nodes, stack.api_port)) else 1


def owns(node: Node) -> str:
    """What a cluster node says it owns (its /status), or nothing when it does not answer."""
    try:
        found = api("GET", "/status", port=node.port)
    except (OSError, ValueError):
        return ""
    extra = found.get("extra") if isinstance(found, dict) else None
    if not isinstance(extra, dict) or "owned_partitions" not in extra:
        return ""
    return f", owns partitions {extra['owned_partitions']} ({extra.get('tasks_owned')} tasks)"


def nodes_of(args: list[str]) -> int | None:
    """`--nodes N` of `up` (N >= 1); None without it (the single-mode checker)."""
    if not args:
        return None
    if len(args) == 2 and args[0] == "--nodes" and args[1].isdigit() and int(args[1]) >= 1:
        return int(args[1])
    raise ValueError("--nodes takes a whole number >= 1")


def main(argv: list[str]) -> int:
    command = argv or ["up"]
    record = read_record(RECORD)
    try:
        stack = settings_for(command[0], os.environ, record)
    except ValueError as exc:
        print(f"stack: error: a STACK_*_PORT is not a number: {exc}", file=sys.stderr)
        return 2
    try:
        if command[0] == "up":
            try:
                nodes = nodes_of(command[1:])
            except ValueError as exc:
                print(f"stack: error: {exc}", file=sys.stderr)
                return 2
            up(stack, record, nodes)
        elif command in (["down"], ["down", "--purge"]):
            down(stack, purge="--purge" in command)
        elif command == ["status"]:
            return status(stack)
        else:
            print(
                "usage: scripts/stack.sh up [--nodes N] | down [--purge] | status", file=sys.stderr
            )
            return 2
    except (StackError, subprocess.CalledProcessError, psycopg2.Error) as exc:
        print(f"stack: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
