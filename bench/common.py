"""Helpers the benchmarks share: the machine, a database and a broker of their own, result
messages built fast, the processor daemon as a subprocess, a checker daemon's READY, CPU and
memory.

Everything started here is stopped by the context managers that started it.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Container, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import psycopg2
from psycopg2 import sql

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from checker_common.contract import CheckResult, decode, encode  # noqa: E402
from devstack import Broker, create_topics, make_certs  # noqa: E402

__all__ = ["make_certs"]

ADMIN_DSN = os.environ.get("BENCH_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")


def machine() -> str:
    """One line: cores, CPU model, memory, PostgreSQL server version."""
    fields: dict[str, str] = {}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if not line.strip():
            break  # the first CPU's block is enough
        name, _, value = line.partition(":")
        fields[name.strip()] = value.strip()
    model = fields.get("model name", "?")
    # A model name such as "AMD EPYC" does not say which generation: the family and model do.
    generation = f" (family {fields.get('cpu family', '?')}, model {fields.get('model', '?')})"
    mem_kb = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kb = int(line.split()[1])
    return (
        f"nproc {os.cpu_count()}, CPU {model}{generation}, memory {mem_kb / 1024 / 1024:.0f} GiB, "
        f"Python {platform.python_version()}, load average at start "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )


def cpu_model() -> str:
    """`lscpu`'s model name ("?" without lscpu)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "?"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "?"


def server_version(dsn: str) -> str:
    conn = psycopg2.connect(dsn, connect_timeout=5)
    try:
        with conn.cursor() as cur:
            cur.execute("SHOW server_version")
            row = cur.fetchone()
        return str(row[0]) if row else "?"
    finally:
        conn.close()


@contextlib.contextmanager
def temp_database(prefix: str) -> Iterator[str]:
    """A database of its own, dropped (with its connections) at the end."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = psycopg2.connect(ADMIN_DSN, connect_timeout=5)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield f"{ADMIN_DSN.rsplit('/', 1)[0]}/{name}"
    finally:
        with admin.cursor() as cur:
            cur.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
        admin.close()


def migrate(dsn: str) -> None:
    from checker_processing import db
    from checker_processing import migrate as migrations

    conn = db.connect(dsn)
    try:
        migrations.apply(conn)
    finally:
        conn.close()


@dataclass(frozen=True)
class Kafka:
    """The local broker behind mutual TLS: settings env vars and librdkafka options."""

    broker: Broker
    certs: Path

    def env(self) -> dict[str, str]:
        return {
            "KAFKA_CONNECTION": self.broker.bootstrap,
            "KAFKA_CA_PATH": str(self.certs / "ca.pem"),
            "KAFKA_CERT_PATH": str(self.certs / "client.pem"),
            "KAFKA_KEY_FILE": str(self.certs / "client.key"),
            "KAFKA_CERT_PASS": (self.certs / "client.pass").read_text().strip(),
        }

    def config(self, **extra: Any) -> dict[str, Any]:
        env = self.env()
        return {
            "bootstrap.servers": env["KAFKA_CONNECTION"],
            "security.protocol": "SSL",
            "ssl.ca.location": env["KAFKA_CA_PATH"],
            "ssl.certificate.location": env["KAFKA_CERT_PATH"],
            "ssl.key.location": env["KAFKA_KEY_FILE"],
            "ssl.key.password": env["KAFKA_CERT_PASS"],
            **extra,
        }

    def checker_env(self, results: str, partitions: int) -> dict[str, str]:
        """A single-mode checker's broker settings in a bench: this broker, results to
        `results`, and a task topic of its own with `partitions`, as a deployment has (without
        one, single mode keeps looking for it; the checker follows it as it would there)."""
        return {**self.env(), "KAFKA_TOPIC": results, "KAFKA_TASKS_TOPIC": self.topic(partitions)}

    def processor_env(self, dsn: str, topic: str, **settings: str) -> dict[str, str]:
        """The processor's settings in a bench: this broker, the database `dsn`, results from
        `topic`, a consumer group of its own with the shortest session a stock Kafka accepts
        (its join is 3 s of every start, BENCHMARKS.md "Ingest"), no metrics port, logs at
        INFO (the benches read its phases there); `settings` add to these or replace them."""
        return {
            **self.env(),
            "POSTGRESQL_CONNECTION": dsn,
            "KAFKA_CONSUMER_TOPICS": topic,
            "KAFKA_CONSUMER_GROUP": f"bench-{uuid.uuid4().hex[:8]}",
            "KAFKA_SESSION_TIMEOUT_MS": "6000",
            "METRICS_PORT": "0",
            "LOG_LEVEL": "INFO",
            **settings,
        }

    def topic(self, partitions: int) -> str:
        name = f"bench-{uuid.uuid4().hex[:10]}"
        create_topics(self.config(), [name], partitions=partitions)
        return name


@contextlib.contextmanager
def kafka(workdir: Path) -> Iterator[Kafka]:
    """Tansu + stunnel (mTLS) on 127.0.0.1 with fresh development certificates."""
    certs = make_certs(workdir / "certs")
    broker = Broker(workdir / "broker", certs).start()
    try:
        yield Kafka(broker, certs)
    finally:
        broker.stop()


@contextlib.contextmanager
def workdir() -> Iterator[Path]:
    """A scratch directory, removed at the end; kept (its path printed) with BENCH_KEEP=1, for
    the daemons' logs of a run worth reading."""
    if os.environ.get("BENCH_KEEP") == "1":
        kept = Path(tempfile.mkdtemp(prefix="bench-"))
        print(f"  work directory kept: {kept}", flush=True)
        yield kept
        return
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        yield Path(tmp)


# -- messages --------------------------------------------------------------------------------

TASK_MARK = "00000000-0000-4000-8000-00000000aaaa"
RESULT_MARK = "00000000-0000-4000-8000-00000000bbbb"
STAMP_MARK = "2000-01-01T00:00:00.000000Z"


def task_id(n: int) -> str:
    return f"00000000-0000-4000-8000-{n:012x}"


class MessageTemplate:
    """The JSON of one realistic result from `contract.encode`, with the task id, result id
    and timestamp swapped in by string formatting (1M messages in seconds, not minutes). The
    slot (`scheduled_at`) is the timestamp, so each result of a task has a slot of its own.
    `node` is left out unless given: messages every revision of the processor reads alike
    (one before the field sends a message with it down its slower path).
    `check()` proves a built message still decodes under the contract."""

    def __init__(self, *, down: bool = False, node: str | None = None) -> None:
        fields: dict[str, Any] = {
            "result_id": uuid.UUID(RESULT_MARK),
            "name": "shop front page",
            "url": "https://shop.example.test/en/index.html",
            "timestamp": datetime(2000, 1, 1, tzinfo=UTC),
            "scheduled_at": datetime(2000, 1, 1, tzinfo=UTC),
            "status": 200,
            "load_time": 0.0123,
            "pattern_search": "match",
            "ok": True,
            "health": "up",
            "timings": {
                "dns": 0.0011,
                "connect": 0.0021,
                "tls": 0.0042,
                "ttfb": 0.0038,
                "transfer": 0.0011,
            },
            "bytes": 48213,
            "final_url": "https://shop.example.test/en/index.html",
            "cert_expires_at": datetime(2027, 3, 1, tzinfo=UTC),
        }
        if down:
            fields.update(
                status=503,
                ok=False,
                health="down",
                pattern_search=None,
                error={"kind": "status", "message": "status 503 is not in 200-399"},
            )
        if node is not None:
            fields["node"] = node
        result = CheckResult.model_validate(fields)
        body = result.model_dump(mode="json", exclude=None if node else {"node"})
        value = orjson.dumps({TASK_MARK: body})
        # encode()'s own message, but for `node` (which a revision before it has not).
        encoded = orjson.loads(encode(uuid.UUID(TASK_MARK), result)[1])[TASK_MARK]
        assert {**encoded, "node": node} == {**body, "node": node}
        text = value.decode()
        stamp = orjson.loads(value)[TASK_MARK]["timestamp"]
        assert text.count(TASK_MARK) == 1, text
        assert text.count(RESULT_MARK) == 1, text
        assert text.count(stamp) == 2, text  # timestamp and scheduled_at
        self.format = (
            text.replace("%", "%%")
            .replace(TASK_MARK, "%(task)s")
            .replace(RESULT_MARK, "%(result)s")
            .replace(stamp, "%(stamp)s")
        )
        self.load_time = float(fields["load_time"])

    def build(self, task: str, result: str, stamp: datetime) -> bytes:
        iso = stamp.astimezone(UTC).isoformat().replace("+00:00", "Z")
        return (self.format % {"task": task, "result": result, "stamp": iso}).encode()

    def check(self) -> None:
        now = datetime.now(UTC)
        result = str(uuid.uuid4())
        decoded = decode(self.build(task_id(7), result, now))
        assert str(decoded.task_id) == task_id(7)
        assert str(decoded.result.result_id) == result
        assert decoded.result.timestamp == decoded.result.scheduled_at == now


# -- the daemon --------------------------------------------------------------------------------


def snapshot(revision: str, out: Path) -> tuple[Path, str]:
    """The packages as committed at `revision` (read-only `git archive`), so a benchmark
    measures a known version while others edit the work tree. Returns (dir, commit)."""
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", revision],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    out.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", commit, "checker_common", "checker_processing"],
        capture_output=True,
        check=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return out, commit


class Daemon:
    """`python -m checker_processing.cli run` with only the given settings; `source` is the
    directory its packages are imported from (default: the work tree)."""

    def __init__(self, env: dict[str, str], log: Path, source: Path = ROOT) -> None:
        base = {k: v for k, v in os.environ.items() if not k.isupper() or k in ("PATH", "HOME")}
        base["PYTHONPATH"] = str(source)
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "checker_processing.cli", "run"],
                env={**base, **env},
                cwd=source,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(timeout=10)

    def tail(self, chars: int = 2000) -> str:
        return self.log.read_text(errors="replace")[-chars:]


@contextlib.contextmanager
def daemon(env: dict[str, str], log: Path, source: Path = ROOT) -> Iterator[Daemon]:
    started = Daemon(env, log, source)
    try:
        yield started
    finally:
        started.stop()


def api_get(port: int | str, path: str) -> bytes:
    """The body of a daemon's API answer to GET `path` (on 127.0.0.1:`port`)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as page:
        return bytes(page.read())


def as_installed(source: Path = ROOT) -> None:
    """Compile the packages under `source` to bytecode, as `pip install` does for a deployed
    checker: a daemon started from the work tree (an editable install) otherwise compiles
    every module of its own at each start when nothing may write `__pycache__`
    (`PYTHONDONTWRITEBYTECODE`, set on this machine): 0.04 s more of its imports, which no
    installed checker pays (BENCHMARKS.md, "Start-up on the AMD EPYC host of family 25, model
    17, at `30ed9ea`")."""
    packages = ("checker_common", "periodic_checker", "checker_processing")
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", *(str(source / p) for p in packages)],
        check=True,
    )


def busy_seconds() -> float:
    """CPU seconds all processes of the machine have spent so far (/proc/stat: user, nice,
    system, irq, softirq, steal)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident memory so far (VmHWM), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (pure)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), math.ceil(q * len(ordered))))
    return ordered[rank - 1]


# -- a checker daemon: READY, CPU and memory ---------------------------------------------------


def proc_sample(pid: int) -> tuple[float, int]:
    """(CPU seconds user+system, VmRSS bytes) of a process."""
    cpu = cpu_seconds(pid)
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
    return cpu, rss


def drain_notify(notify: socket.socket) -> None:
    """Read every datagram waiting: the daemon's STATUS= updates block it once the queue is
    full."""
    notify.setblocking(False)
    try:
        while notify.recv(4096):
            pass
    except BlockingIOError:
        pass
    finally:
        notify.settimeout(1.0)


def wait_ready(
    notify: socket.socket,
    proc: subprocess.Popen[bytes],
    started: float,
    timeout: float = 300.0,
) -> float:
    """The monotonic time READY=1 arrived on `notify` (bound, time-out 1 s)."""
    while time.monotonic() - started < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {proc.returncode} before READY=1")
        try:
            data = notify.recv(4096)
        except TimeoutError:
            continue
        if b"READY=1" in data.split(b"\n"):
            return time.monotonic()
    raise RuntimeError("no READY=1 within the start time-out")


# -- rows becoming visible in PostgreSQL ------------------------------------------------------------

COMMIT_CHANNEL = "bench_rows_committed"
# Bench-only: the statement's transaction start (= the rows' ingested_at) in microseconds since
# the epoch, delivered to listeners when the transaction commits.
NOTIFY_ON_COMMIT = f"""
CREATE FUNCTION bench_notify_on_commit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('{COMMIT_CHANNEL}', (extract(epoch FROM now()) * 1000000)::bigint::text);
    RETURN NULL;
END
$$;
CREATE TRIGGER bench_notify_on_commit AFTER INSERT ON check_results
    FOR EACH STATEMENT EXECUTE FUNCTION bench_notify_on_commit();
"""


def watch_commits(
    dsn: str,
    stop: threading.Event,
    ready: threading.Event,
    visible: dict[str, float],
    errors: list[str],
    *,
    only: Container[str] | None = None,
    health: str | None = None,
) -> None:
    """LISTEN for `NOTIFY_ON_COMMIT`'s notifications; on each, read the result ids of the rows
    that transaction wrote (of this `health` only, when given) and note when each became
    visible (those in `only`, when given). An error goes to `errors` (the run then fails)."""
    conn = psycopg2.connect(dsn, connect_timeout=5, application_name="bench-listener")
    conn.autocommit = True
    query = (
        "SELECT result_id::text FROM check_results WHERE ingested_at ="
        " 'epoch'::timestamptz + %s::bigint * interval '1 microsecond'"
    )
    if health is not None:
        query += " AND health = %s"
    try:
        with conn.cursor() as cur:
            cur.execute(f"LISTEN {COMMIT_CHANNEL}")
            ready.set()
            while not stop.is_set():
                if select.select([conn], [], [], 0.1) == ([], [], []):
                    continue
                conn.poll()
                arrived = time.time()
                payloads = {n.payload for n in conn.notifies}
                conn.notifies.clear()
                for payload in sorted(payloads):
                    cur.execute(query, (payload,) if health is None else (payload, health))
                    for (result_id,) in cur.fetchall():
                        if only is None or result_id in only:
                            visible.setdefault(result_id, arrived)
    except Exception as exc:  # reported by the run, which then fails
        errors.append(f"listener: {exc!r}")
        ready.set()
    finally:
        conn.close()
