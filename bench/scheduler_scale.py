"""Scheduler at scale: the real checker daemon with N tasks against one local nginx page.

    .venv/bin/python bench/scheduler_scale.py --tasks 10000 --interval 10 --intervals 3 --runs 3
    .venv/bin/python bench/scheduler_scale.py --tasks 100000 --interval 60 --intervals 3 \
        --plot bench/results/lag-100k.png
    .venv/bin/python bench/scheduler_scale.py --tasks 100000 --interval 60 --runs 3 --startup-only
    .venv/bin/python bench/scheduler_scale.py --nodes 3 --tasks 100000 --interval 60 \
        --intervals 3 --runs 3 --json bench/results/cluster-cadence-100k.json

`--startup-only`: per run, only start-up to READY=1 and VmRSS at READY and its most over the
next `--settle` seconds (checks running), then the daemon is stopped; no window, no lag.
With `--upgrade`, the store's definitions are marked as another release's validator left them:
the first start after an upgrade, which validates every one again. `--urls own`: each task
checks its own URL (`/page/N`, nginx answers the same page for each), as a real task list
has them, so each task holds its own URL read (`TaskSpec.fetch_url`); by default all check one.

Per run: a fresh broker (tansu + stunnel mTLS) and topic, N tasks bulk-written into a new
SQLite store, then `python -m periodic_checker.cli run` as a subprocess, its modules compiled
to bytecode first as `pip install` leaves them (`common.as_installed`). The bench binds a
NOTIFY_SOCKET to time start-up (process start -> READY=1) and consumes the topic itself.

Measured in a window of `--intervals` whole intervals that starts one interval after READY
(slots that pass while loading are skipped by design, see scheduler.py): every task has
exactly `intervals` slots in it, so expected = N x intervals results whose `scheduled_at` lies
in the window; missed = expected - distinct (task, scheduled_at) pairs received. Lag is
`timestamp - scheduled_at` of those results. CPU and VmRSS are read from /proc/<pid> of the
daemon each second; the load average is sampled with them.

`--nodes 3`: the tasks go to the task topic instead and three cluster-mode nodes share them;
the window starts one interval after ownership settles, and a slot checked by two nodes counts
as checked twice (bench/cluster_cadence.py). `--urls own` gives each task of the topic its
own URL there too.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition  # noqa: E402

from bench.common import (  # noqa: E402
    Kafka,
    api_get,
    as_installed,
    cpu_model,
    drain_notify,
    kafka,
    machine,
    proc_sample,
    wait_ready,
    workdir,
)
from bench.probe_engine import PATTERN, start_nginx  # noqa: E402
from checker_common.task_spec import TaskSpec, checked_digest  # noqa: E402
from devstack import free_port, stop_process  # noqa: E402
from periodic_checker.store import _CHECKED, _COLUMNS, SQLiteTaskStore, _task_to_row  # noqa: E402
from periodic_checker.tasks import Task  # noqa: E402

PYTHON = ROOT / ".venv" / "bin" / "python"
START_TIMEOUT = 300.0
# After the window closes, results still being checked or batched by the producer arrive.
DRAIN = 15.0
PARTITIONS = 3


def write_tasks(
    path: Path,
    count: int,
    url: str,
    interval: float,
    *,
    keepalive: bool = False,
    upgrade: bool = False,
    own_urls: bool = False,
) -> float:
    """Bulk-insert `count` tasks in one transaction, in the store's own row shape and as the
    checker leaves them once it has run: each definition marked as validated by this checker
    (`upgrade`: by another release's validator, so the start validates every one again), each
    task's record published to the task topic (else the start is an upgrade from a release
    without the task topic, which publishes every task once); `own_urls`: task N checks
    `{url}page/N`, else all check `url`; seconds."""
    started = time.monotonic()
    store = SQLiteTaskStore(path, max_tasks=count)  # creates the schema
    now = datetime.now(UTC)
    spec = TaskSpec(
        name="x",
        url=url,
        pattern=PATTERN,
        interval=interval,
        timeout=min(5, interval / 2),
        keepalive=keepalive,
    )
    template = Task(id=uuid.uuid4(), spec=spec, created_at=now, updated_at=now)
    spec_json = spec.model_dump_json()
    rows = []
    for n in range(count):
        row = list(_task_to_row(template))
        row[0] = str(uuid.uuid4())
        row[1] = f"bench-{n}"
        spec_n = spec_json.replace('"name":"x"', f'"name":"bench-{n}"', 1)
        if own_urls:  # the page of each task its own URL: `{url}page/{n}`
            row[2] = f"{url}page/{n}"
            spec_n = spec_n.replace(f'"url":"{url}"', f'"url":"{row[2]}"', 1)
        row[3] = spec_n
        row[-1] = None if upgrade else checked_digest(spec_n)
        rows.append(tuple(row))
    db = store._db  # the bench writes in bulk; the store's API inserts one task a transaction
    db.execute("BEGIN")
    marks = ", ".join("?" * len(rows[0]))
    db.executemany(f"INSERT INTO tasks ({_COLUMNS}, {_CHECKED}) VALUES ({marks})", rows)
    db.execute("UPDATE tasks SET published_at = updated_at")
    db.execute("COMMIT")
    store.close()
    return time.monotonic() - started


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


class Tally:
    """The results read from the result topic, against a window [start, end) of whole
    intervals: every task has one slot per interval in it, so a (task, `scheduled_at`) pair
    inside it is a planned slot. A slot's first result counts it received; another result with
    another `result_id` is the slot checked twice, one with the same `result_id` a redelivery
    of the same check. Lag (`timestamp - scheduled_at`) of every distinct check, also per node
    (the result's `node`; "-" without one)."""

    def __init__(self, start: float, end: float) -> None:
        self.start = start
        self.end = end
        self._first: dict[tuple[str, str], str] = {}  # (task, slot) -> its first result_id
        self._others: dict[tuple[str, str], set[str]] = {}  # the slot's other result_ids
        self.lags: list[float] = []
        self.lags_of: dict[str, list[float]] = {}
        self.series: list[tuple[float, float]] = []  # (planned, s from the start; lag)
        self.failed = 0
        self.redelivered = 0
        self.all_results = 0

    @property
    def received(self) -> int:
        return len(self._first)

    @property
    def twice(self) -> int:
        """Slots checked more than once (two or more distinct result ids)."""
        return len(self._others)

    def add(self, task_id: str, result: dict[str, Any]) -> None:
        planned = result.get("scheduled_at")
        if planned is None:
            return
        planned_t = datetime.fromisoformat(planned).timestamp()
        lag = datetime.fromisoformat(result["timestamp"]).timestamp() - planned_t
        self.all_results += 1
        self.series.append((planned_t - self.start, lag))
        if not self.start <= planned_t < self.end:
            return
        key = (task_id, planned)
        result_id = str(result["result_id"])
        first = self._first.get(key)
        if first is None:
            self._first[key] = result_id
        elif first == result_id or result_id in self._others.get(key, ()):
            self.redelivered += 1
            return
        else:
            self._others.setdefault(key, set()).add(result_id)
        self.failed += not result["ok"]
        self.lags.append(lag)
        self.lags_of.setdefault(str(result.get("node") or "-"), []).append(lag)

    def read(self, consumer: Consumer, timeout: float = 0.2) -> None:
        """What the consumer has now (waiting at most `timeout` s for the first message)."""
        for message in consumer.consume(5000, timeout=timeout):
            value = message.value()
            if message.error() is not None or value is None:
                continue
            ((task_id, result),) = orjson.loads(value).items()
            self.add(task_id, result)


@dataclass
class RunResult:
    tasks: int
    interval: float
    intervals: int
    startup_s: float
    write_s: float
    expected: int
    received: int
    missed: int
    duplicates: int
    failed: int
    lag_p50: float
    lag_p99: float
    lag_max: float
    cpu_s: float
    window_s: float
    rss_start_mb: float
    rss_max_mb: float
    load_avg: list[float]
    series: list[tuple[float, float]] = field(default_factory=list)  # (s into window, lag)
    all_results: int = 0  # every result read, planned inside the window or not
    daemon_status: dict[str, object] = field(default_factory=dict)  # GET /status at window end
    cpu_to_ready_s: float = 0.0  # the daemon's own CPU time (user + system) from start to READY


def one_run(
    kafka_: Kafka,
    page: str,
    tasks: int,
    interval: float,
    intervals: int,
    settle: float | None = None,
    *,
    keepalive: bool = False,
    extra_env: dict[str, str] | None = None,
    upgrade: bool = False,
    own_urls: bool = False,
) -> RunResult:
    """One daemon on `tasks` tasks of `page`; with `settle` (start-up only), the figures of the
    `settle` seconds after READY and no window; `extra_env` adds to (or overrides) its settings
    (bench/capacity.py: SSL_CERT_FILE for an https page)."""
    topic = kafka_.topic(partitions=PARTITIONS)
    with workdir() as work:
        store = work / "tasks.sqlite3"
        write_s = write_tasks(
            store, tasks, page, interval, keepalive=keepalive, upgrade=upgrade, own_urls=own_urls
        )
        notify_path = work / "notify.sock"
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(notify_path))
        notify.settimeout(1.0)
        env = {
            **os.environ,
            **kafka_.checker_env(topic, PARTITIONS),
            # The daemon runs the code of the tree this script is in (a copy of the repository
            # benchmarks that copy, whatever the venv's editable install points at).
            "PYTHONPATH": str(ROOT),
            "TASK_STORAGE": str(store),
            "MAX_TASKS": str(tasks),
            "API_PORT": str(free_port()),
            # Every bench task targets the same host; real task sets spread over many.
            "PER_HOST_IN_FLIGHT": "500",
            "LOG_LEVEL": "WARNING",
            "NOTIFY_SOCKET": str(notify_path),
            **(extra_env or {}),
        }
        # Partitions assigned by hand: a group join takes about 20 s with this broker.
        consumer = Consumer(
            kafka_.config(
                **{"group.id": f"bench-{uuid.uuid4().hex[:8]}", "enable.auto.commit": False}
            )
        )
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(PARTITIONS)])
        log = (work / "daemon.log").open("wb")
        started = time.monotonic()
        proc = subprocess.Popen(
            [str(PYTHON), "-m", "periodic_checker.cli", "run"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=work,
        )
        try:
            ready_at = wait_ready(notify, proc, started, START_TIMEOUT)
            startup = ready_at - started
            print(f"  ready after {startup:.1f} s", file=sys.stderr)
            window_start = time.time() + interval
            window_end = window_start + intervals * interval
            if settle is not None:
                window_start, window_end = time.time(), time.time() + settle
            cpu_to_ready, rss_start = proc_sample(proc.pid)
            rss_max = rss_start
            loads: list[float] = []
            cpu_at_start: float | None = None
            cpu_at_end: float | None = None
            tally = Tally(window_start, window_end)
            status: dict[str, object] = {}
            next_sample = 0.0
            stop_at = window_end + (DRAIN if settle is None else 1.0)
            while time.time() < stop_at:
                if proc.poll() is not None:
                    raise RuntimeError(f"daemon exited with {proc.returncode}; see its log")
                drain_notify(notify)  # the daemon's STATUS= updates block it once the queue is full
                now = time.time()
                if now >= next_sample:
                    next_sample = now + 1.0
                    cpu, rss = proc_sample(proc.pid)
                    rss_max = max(rss_max, rss)
                    if cpu_at_start is None and now >= window_start:
                        cpu_at_start, t_cpu0 = cpu, now
                    if cpu_at_end is None and now >= window_end:
                        cpu_at_end, t_cpu1 = cpu, now
                        status = daemon_status(int(env["API_PORT"]))
                    if window_start <= now <= window_end:
                        loads.append(os.getloadavg()[0])
                tally.read(consumer)
            assert cpu_at_start is not None
            assert cpu_at_end is not None
            expected = tasks * intervals if settle is None else 0
            return RunResult(
                tasks=tasks,
                interval=interval,
                intervals=intervals,
                startup_s=startup,
                write_s=write_s,
                expected=expected,
                received=tally.received,
                missed=expected - tally.received if settle is None else 0,
                duplicates=tally.twice + tally.redelivered,
                failed=tally.failed,
                lag_p50=pct(tally.lags, 50),
                lag_p99=pct(tally.lags, 99),
                lag_max=max(tally.lags, default=float("nan")),
                cpu_s=cpu_at_end - cpu_at_start,
                window_s=t_cpu1 - t_cpu0,
                rss_start_mb=rss_start / 2**20,
                rss_max_mb=rss_max / 2**20,
                load_avg=[min(loads, default=0), statistics.mean(loads or [0]), max(loads or [0])],
                series=tally.series,
                all_results=tally.all_results,
                daemon_status=status,
                cpu_to_ready_s=cpu_to_ready,
            )
        finally:
            stop_process(proc, timeout=60)
            consumer.close()
            notify.close()
            log.close()
            tail = (work / "daemon.log").read_text(errors="replace").splitlines()[-5:]
            if tail:
                print("  daemon log tail:\n    " + "\n    ".join(tail), file=sys.stderr)


def daemon_status(port: int) -> dict[str, object]:
    try:
        return dict(json.loads(api_get(port, "/status")))
    except (OSError, ValueError) as exc:
        return {"error": str(exc)}


def plot(results: list[RunResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    for n, run in enumerate(results):
        xs = [x for x, _ in run.series]
        ys = [y * 1000 for _, y in run.series]
        ax.scatter(xs, ys, s=1, alpha=0.3, label=f"run {n + 1}")
        # p99 per second, to see the tail over time
        buckets: dict[int, list[float]] = {}
        for x, y in zip(xs, ys, strict=True):
            buckets.setdefault(int(x), []).append(y)
        secs = sorted(buckets)
        ax.plot(secs, [pct(buckets[s], 99) for s in secs], linewidth=1, label=f"run {n + 1} p99/s")
    run0 = results[0]
    ax.set_title(
        f"Schedule lag, {run0.tasks:,} tasks every {run0.interval:g} s on one checker process"
    )
    ax.set_xlabel(
        "planned start, seconds from the measured window's start (0 = READY + 1 interval)"
    )
    ax.set_ylabel("lag: actual start - planned (ms)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper right", markerscale=8, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--interval", type=float, default=10.0)
    parser.add_argument("--intervals", type=int, default=3)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--plot", type=Path, help="PNG of lag over time")
    parser.add_argument("--json", type=Path, help="also write the figures (no series) here")
    parser.add_argument(
        "--startup-only", action="store_true", help="start-up to READY and RSS only (no window)"
    )
    parser.add_argument("--settle", type=float, default=20.0, help="seconds after READY")
    parser.add_argument(
        "--upgrade",
        action="store_true",
        help="the first start after an upgrade: every stored definition validated again",
    )
    parser.add_argument(
        "--urls",
        choices=("one", "own"),
        default="one",
        help="one: every task checks the same page (the figures so far); own: each task its own"
        " URL (`/page/N`, the same page), as a real task list has them: each holds its URL read",
    )
    parser.add_argument(
        "--nodes",
        type=int,
        default=1,
        help="above 1: that many cluster-mode nodes share the tasks (bench/cluster_cadence.py)",
    )
    args = parser.parse_args()
    print(machine(), file=sys.stderr)
    if args.nodes > 1 and (args.startup_only or args.plot):
        parser.error("--nodes takes neither --startup-only nor --plot")
    print(f"URLs: {args.urls}", file=sys.stderr)
    # Imported here: it builds on this module's tally.
    from bench import cluster_cadence

    as_installed()  # the daemons' modules read as a deployed checker reads them

    results: list[RunResult] = []
    runs: list[cluster_cadence.ClusterRun] = []
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    load_at_start = os.getloadavg()
    with workdir() as work, kafka(work) as kafka_:
        www = work / "nginx"
        www.mkdir()
        www.chmod(0o755)
        work.chmod(0o755)  # nginx workers run as an unprivileged user
        port = free_port()
        # Every /page/N is the page (`--urls own`).
        nginx = start_nginx(
            www,
            port,
            extra="\n        location /page/ { default_type text/html; try_files /index.html =404; }",
        )
        page = f"http://127.0.0.1:{port}/"
        try:
            for n in range(args.runs):
                print(f"run {n + 1}/{args.runs}", file=sys.stderr)
                if args.nodes > 1:
                    runs.append(
                        cluster_cadence.one_run(
                            kafka_,
                            page,
                            args.tasks,
                            args.interval,
                            args.intervals,
                            args.nodes,
                            own_urls=args.urls == "own",
                        )
                    )
                    print(f"  {cluster_cadence.summary_line(runs[-1])}", file=sys.stderr)
                    continue
                run = one_run(
                    kafka_,
                    page,
                    args.tasks,
                    args.interval,
                    args.intervals,
                    settle=args.settle if args.startup_only else None,
                    upgrade=args.upgrade,
                    own_urls=args.urls == "own",
                )
                results.append(run)
                print(f"  {summary_line(run)}", file=sys.stderr)
        finally:
            stop_process(nginx)
    if runs:
        host: dict[str, Any] = {
            "cpu_model": cpu_model(),
            "nproc": os.cpu_count(),
            "load_avg_at_start": load_at_start,
            "load_avg_at_end": os.getloadavg(),
            "date": when,
        }
        loads = " / ".join(
            " ".join(f"{x:.2f}" for x in load)
            for load in (host["load_avg_at_start"], host["load_avg_at_end"])
        )
        print(
            f"{when}, `lscpu` model name {host['cpu_model']!r}, nproc {host['nproc']}, "
            f"load average (1, 5, 15 min) at start / end {loads}\n"
        )
        print(cluster_cadence.table(runs))
        if args.json:
            body = {
                "host": host,
                "runs": [r.to_json() for r in runs],
                "median": cluster_cadence.median(runs),
            }
            args.json.write_text(json.dumps(body, indent=2))
        return 0
    print(table(results))
    for n, r in enumerate(results):
        print(
            f"\nrun {n + 1}: {r.all_results:,} results read in all; daemon /status at the end"
            f" of the window: {json.dumps(r.daemon_status)}"
        )
    if args.plot:
        plot(results, args.plot)
    if args.json:
        rows = [{k: v for k, v in vars(r).items() if k != "series"} for r in results]
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


def summary_line(r: RunResult) -> str:
    return (
        f"start-up {r.startup_s:.1f} s ({r.cpu_to_ready_s:.1f} s of CPU), expected {r.expected}, received {r.received}, "
        f"missed {r.missed}, failed {r.failed}, lag p50/p99/max "
        f"{r.lag_p50 * 1000:.1f}/{r.lag_p99 * 1000:.1f}/{r.lag_max * 1000:.0f} ms, "
        f"CPU {r.cpu_s / r.window_s:.2f} cores, RSS {r.rss_start_mb:.0f}->{r.rss_max_mb:.0f} MB, "
        f"load {r.load_avg[1]:.2f}"
    )


def table(results: list[RunResult]) -> str:
    lines = [
        "| run | tasks / interval | start-up to READY | checks expected | received | missed "
        "| failed | lag p50 | lag p99 | lag max | checker CPU (cores) | CPU ms per check "
        "| VmRSS after start / max | load avg (min/mean/max) |",
        "|---" * 14 + "|",
    ]
    for n, r in enumerate(results):
        per_check = r.cpu_s / max(1, r.received) * 1000
        lines.append(
            f"| {n + 1} | {r.tasks:,} / {r.interval:g} s | {r.startup_s:.1f} s | {r.expected:,} "
            f"| {r.received:,} | {r.missed} | {r.failed} | {r.lag_p50 * 1000:.1f} ms "
            f"| {r.lag_p99 * 1000:.1f} ms | {r.lag_max * 1000:.0f} ms "
            f"| {r.cpu_s / r.window_s:.2f} | {per_check:.2f} "
            f"| {r.rss_start_mb:.0f} / {r.rss_max_mb:.0f} MB "
            f"| {r.load_avg[0]:.1f} / {r.load_avg[1]:.1f} / {r.load_avg[2]:.1f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
