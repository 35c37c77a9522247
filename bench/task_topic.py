"""The task topic in cluster mode: start-up of a node to READY, and how soon a change made
through one node is visible through another.

    .venv/bin/python bench/task_topic.py startup --records 100000 --runs 3
    .venv/bin/python bench/task_topic.py visibility --changes 200 --runs 3
    .venv/bin/python bench/task_topic.py build --records 100000

`startup`: a compacted task topic (12 partitions) holding `--records` valid task records (each
task once; interval 3600 s, so few checks run meanwhile; `--urls`: each task its own URL, the
default, or all one URL) read by a new cluster-mode checker with
an empty store: process start -> READY=1 on a NOTIFY_SOCKET the bench binds. The daemon's own
log lines split the time: reading the topic to its end, decoding and validating the records,
writing the SQLite view, adding the jobs to the scheduler; the node's CPU time at READY and
the machine's (every process) over the same time. `--claims`: the names topic holds a claim of
each task's name too, as it does where the tasks were created through the API (the records
above are written as another program would, with no claim). `--states`: the state topic holds
each task's state as another node running it left it (a cluster's nodes keep one there). After
READY the bench waits until the node has taken its partitions (the group's first assignment)
and reports when the names topic was read to its end, how long the take took, and the slowest
and median /status answer meanwhile (the event loop's stalls). The node's modules are compiled
to bytecode first, as `pip install` leaves a deployed checker (`common.as_installed`).
`--alternate-env NAME=VALUE` (repeatable) starts every second node with those variables too
and prints the medians of each kind: a variant beside the plain node, on one broker, in one run
(the measurement-only switches of `bench/results/ready-levers.patch` are set so).

`visibility`: two cluster-mode nodes on one broker; `--changes` tasks created through node A,
one at a time; for each, the time from A's answer (201) until node B's API serves the task
(B is polled every 2 ms over a kept-alive connection), and A's own answer time.

`build`: in-process, no broker: where the view's time goes per record (decoding and validating,
the policy's check, making the task, the row), and building and writing the whole view with the
garbage collector running and paused; making a task with and without validation; and the view
built as the daemon builds it (written by the store's thread meanwhile), the records in the order
of their sites and shuffled.

Each prints a Markdown table (per run and the medians where there are runs), with the machine
(`lscpu` model name) and the load average. Everything runs on 127.0.0.1 and is stopped at the
end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
from common import (
    ROOT,
    Kafka,
    api_get,
    as_installed,
    busy_seconds,
    cpu_model,
    kafka,
    machine,
    proc_sample,
    wait_ready,
    workdir,
)
from confluent_kafka import Producer

from checker_common.contract import Health
from checker_common.task_record import TaskRecord, encode
from checker_common.task_spec import TaskSpec
from devstack import create_topics, free_port
from periodic_checker.names import claim_key, claim_value
from periodic_checker.task_state import StateKind, TaskState, encode_state

PYTHON = Path(sys.executable)
PARTITIONS = 12
START_TIMEOUT = 600.0


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def make_topics(k: Kafka) -> tuple[str, str, str]:
    base = f"bench-{uuid.uuid4().hex[:10]}"
    results, tasks, names = base, f"{base}-tasks", f"{base}-names"
    create_topics(
        k.config(),
        [results, tasks, names, f"{base}-state"],
        partitions=PARTITIONS,
        compacted=frozenset({tasks, names, f"{base}-state"}),
        partitions_of={names: 1},
    )
    return results, tasks, names


# `--urls own` (the default): each task its own URL, four pages on each of a quarter as many
# host names, as a real task list has them; `--urls one`: every task the same URL (the figures
# before 2026-12-06 11:00 UTC), so each URL is read once for all (`urls.parse_url` keeps what
# it read). The names are never looked up before READY.
URL_CHOICES = ("own", "one")


def task_url(n: int, urls: str) -> str:
    if urls == "one":
        return "http://127.0.0.1:9/"
    return f"http://site-{n // 4}.bench.example:9/page/{n % 4}"


BENCH_SPEC = TaskSpec(name="x", url="http://127.0.0.1:9/", interval=3600, timeout=5)


def bench_record(n: int, urls: str, now: datetime) -> TaskRecord:
    """The bench's task record `n`, as another program writes one (no claim, its own origin)."""
    return TaskRecord(
        id=uuid.UUID(int=n + 1, version=4),
        spec=BENCH_SPEC.model_copy(update={"name": f"bench task {n}", "url": task_url(n, urls)}),
        created_at=now,
        updated_at=now,
        origin="bench",
    )


def fill(
    k: Kafka,
    topic: str,
    records: int,
    urls: str,
    names_topic: str | None = None,
    state_topic: str | None = None,
) -> float:
    """`records` task records, one per task; with `names_topic`, each task's name claimed
    there too, as a task created through the API has it (`names.claim_key`, `claim_value`);
    with `state_topic`, each task's state as the node running it last wrote it (a `running`
    snapshot of another node, `task_state.encode_state`); seconds taken."""
    started = time.monotonic()
    now = datetime.now(UTC)
    producer = Producer(k.config(**{"linger.ms": 50, "queue.buffering.max.messages": 200_000}))
    for n in range(records):
        record = bench_record(n, urls, now)
        task_id = record.id
        writes = [(topic, *encode(record))]
        if names_topic is not None:
            name = record.spec.name
            writes.append((names_topic, claim_key(name, task_id), claim_value(name, task_id, now)))
        if state_topic is not None:
            state = TaskState(
                task_id=task_id, kind=StateKind.RUNNING, node="bench-other", at=now,
                health=Health.UP, failures_in_a_row=0, runs=60, manual_runs=0,
                last_run_at=now, last_slot=now.timestamp(), record=(n % PARTITIONS, n),
            )  # fmt: skip
            writes.append((state_topic, *encode_state(state)))
        for to, key, value in writes:
            while True:
                try:
                    producer.produce(to, key=key, value=value)
                    break
                except BufferError:
                    producer.poll(0.1)
    assert producer.flush(120) == 0
    return time.monotonic() - started


def node_env(
    k: Kafka, topics: tuple[str, str, str], store: Path, port: int, node: str
) -> dict[str, str]:
    results, tasks, names = topics
    return {
        **os.environ,
        **k.env(),
        "PYTHONPATH": str(ROOT),
        "KAFKA_TOPIC": results,
        "KAFKA_TASKS_TOPIC": tasks,
        "KAFKA_TASK_NAMES_TOPIC": names,
        "KAFKA_TASK_STATE_TOPIC": f"{results}-state",
        "CHECKER_MODE": "cluster",
        "CHECKER_NODE_ID": node,
        "TASK_STORAGE": str(store),
        "MAX_TASKS": "200000",
        "API_PORT": str(port),
        "LOG_LEVEL": "INFO",
    }


PHASES = re.compile(
    r"read: (\d+) records, (\d+) tasks in ([\d.]+) s \(reading ([\d.]+) s, decoding and"
    r" validating ([\d.]+) s(?: after it)?, writing the view ([\d.]+) s(?: after that)?\)"
)
SCHEDULED = re.compile(r"(\d+) tasks scheduled in ([\d.]+) s")


def startup_run(
    k: Kafka,
    records: int,
    urls: str,
    claims: bool,
    states: bool = False,
    extra_env: dict[str, str] | None = None,
) -> dict[str, Any]:
    topics = make_topics(k)
    fill_s = fill(
        k,
        topics[1],
        records,
        urls,
        topics[2] if claims else None,
        f"{topics[0]}-state" if states else None,
    )
    with workdir() as work:
        notify_path = work / "notify.sock"
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(notify_path))
        notify.settimeout(1.0)
        port = free_port()
        env = {**node_env(k, topics, work / "a.sqlite3", port, "a"),
               "NOTIFY_SOCKET": str(notify_path), **(extra_env or {})}  # fmt: skip
        load = loadavg()
        log_path = work / "a.log"
        with log_path.open("wb") as log:
            busy_before = busy_seconds()
            started = time.monotonic()
            proc = subprocess.Popen(
                [str(PYTHON), "-m", "periodic_checker.cli", "run"],
                env=env, stdout=log, stderr=subprocess.STDOUT, cwd=work,
            )  # fmt: skip
            try:
                ready = wait_ready(notify, proc, started, START_TIMEOUT) - started
                cpu_s, rss = proc_sample(proc.pid)
                rss_mb = rss / 1e6  # VmRSS, MB
                busy_s = busy_seconds() - busy_before
                after = after_ready(port, started + ready)
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)
                notify.close()
        text = log_path.read_text(errors="replace")
    phases = PHASES.search(text)
    scheduled = SCHEDULED.search(text)
    if phases is None or scheduled is None:
        raise RuntimeError(f"no phase lines in the log:\n{text[-3000:]}")
    return {
        "fill_s": fill_s,
        "ready_s": ready,
        "tasks": int(phases.group(2)),
        "read_s": float(phases.group(4)),
        "build_s": float(phases.group(5)),
        "write_s": float(phases.group(6)),
        "schedule_s": float(scheduled.group(2)),
        "rss_mb": rss_mb,
        "cpu_s": cpu_s,
        "busy_s": busy_s,
        **after,
        "load": load,
    }


def after_ready(port: int, ready_at: float) -> dict[str, float]:
    """After READY, until the node has taken its partitions (the group's first assignment: it
    writes a `running` state record of each task and schedules them): when its /status first
    said `task_topic_caught_up` (the names topic is read after READY), when the take ended
    (its `last_take_seconds`), and the slowest and the median /status answer meanwhile (the
    event loop's stalls: every API call waits for them). Polled every 100 ms (one answer at
    100,000 tasks costs the node some milliseconds of its loop)."""
    caught_up_s: float | None = None
    answers: list[float] = []
    while time.monotonic() - ready_at < START_TIMEOUT:
        asked = time.monotonic()
        extra = json.loads(api_get(port, "/status"))["extra"]
        answered = time.monotonic()
        answers.append(answered - asked)
        if caught_up_s is None and extra["task_topic_caught_up"]:
            caught_up_s = answered - ready_at
        if caught_up_s is not None and extra.get("last_take_seconds") is not None:
            return {
                "caught_up_s": caught_up_s,
                "taken_s": answered - ready_at,
                "take_s": float(extra["last_take_seconds"]),
                "status_max_s": max(answers),
                "status_p50_s": statistics.median(answers),
            }
        time.sleep(max(0.0, 0.1 - (time.monotonic() - asked)))
    raise RuntimeError("the node never caught up and took its partitions")


def startup(args: argparse.Namespace) -> None:
    print(f"machine: {machine()}; lscpu model name: {cpu_model()}")
    as_installed()  # the node's modules read as a deployed checker reads them
    runs = []
    alternate = dict(args.alternate_env)
    with workdir() as work, kafka(work) as k:
        for n in range(args.runs):
            # With --alternate-env: the even runs (2, 4, ...) with those variables, the odd ones
            # without, on the same broker, so that the two are compared side by side.
            extra = alternate if alternate and n % 2 else {}
            run = startup_run(k, args.records, args.urls, args.claims, args.states, extra)
            run["variant"] = " ".join(f"{name}={value}" for name, value in extra.items()) or "-"
            runs.append(run)
            print(f"run {n + 1}: {run}", file=sys.stderr)
    columns = [
        ("ready_s", "process start to READY"),
        ("read_s", "reading the topic"),
        ("build_s", "decoding and validating"),
        ("write_s", "writing the SQLite view"),
        ("schedule_s", "adding the jobs"),
    ]
    claims = ", each name claimed on the names topic" if args.claims else ""
    claims += ", each task's state on the state topic" if args.states else ""
    print(
        f"\n{args.records:,} task records, {PARTITIONS} partitions, empty store,"
        f" URLs: {args.urls}{claims}\n"
    )
    # CPU to READY: the node's own (all its threads), and the machine's (the node, the broker,
    # stunnel and everything else; two cores give at most twice the time to READY).
    columns += [("cpu_s", "node's CPU to READY"), ("busy_s", "machine's CPU meanwhile")]
    # The names topic, read once the node serves: READY -> /status says caught up; the take of
    # the partitions (the group's first assignment) and the API's answers until it ended.
    columns += [
        ("caught_up_s", "caught up after READY"),
        ("taken_s", "tasks taken after READY"),
        ("take_s", "the take"),
        ("status_max_s", "slowest /status meanwhile"),
        ("status_p50_s", "median /status"),
    ]
    print(
        "| run | environment | tasks | " + " | ".join(label for _, label in columns)
        + " | VmRSS at READY | load average |"
    )  # fmt: skip
    print("|---|---|---|" + "---|" * len(columns) + "---|---|")
    for n, run in enumerate(runs, 1):
        cells = " | ".join(f"{run[key]:.2f} s" for key, _ in columns)
        print(
            f"| {n} | {run['variant']} | {run['tasks']:,} | {cells} | {run['rss_mb']:.0f} MB"
            f" | {run['load']} |"
        )
    for variant in dict.fromkeys(run["variant"] for run in runs):
        group = [run for run in runs if run["variant"] == variant]
        medians = " | ".join(
            f"**{statistics.median(r[key] for r in group):.2f} s**" for key, _ in columns
        )
        rss = statistics.median(r["rss_mb"] for r in group)
        print(f"| median of {len(group)} | {variant} | | {medians} | **{rss:.0f} MB** | |")


def visibility_run(k: Kafka, changes: int) -> dict[str, Any]:
    topics = make_topics(k)
    with workdir() as work:
        ports = [free_port(), free_port()]
        procs = []
        logs = []
        for node, port in zip("ab", ports, strict=True):
            log = (work / f"{node}.log").open("wb")
            logs.append(log)
            procs.append(
                subprocess.Popen(
                    [str(PYTHON), "-m", "periodic_checker.cli", "run"],
                    env=node_env(k, topics, work / f"{node}.sqlite3", port, node),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=work,
                )
            )
        try:
            load = loadavg()
            answers, seen = asyncio.run(measure(ports, changes))
            load = f"{load} -> {loadavg()}"
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            for proc in procs:
                proc.wait(60)
            for log in logs:
                log.close()
    return {"answers": answers, "seen": seen, "load": load}


async def measure(ports: list[int], changes: int) -> tuple[list[float], list[float]]:
    """Create through the first node; (its answer times, the times until the second serves
    each task after that answer)."""
    async with aiohttp.ClientSession() as http:
        a, b = (f"http://127.0.0.1:{port}" for port in ports)
        for url in (a, b):
            await wait_health(http, url)
        answers, seen = [], []
        for n in range(changes):
            body = {"name": f"v{n}", "url": "http://127.0.0.1:9/", "interval": 3600}
            sent = time.monotonic()
            async with http.post(f"{a}/tasks", json=body) as response:
                assert response.status == 201, await response.text()
                task_id = (await response.json())["id"]
            answered = time.monotonic()
            while True:
                async with http.get(f"{b}/tasks/{task_id}") as response:
                    await response.read()
                    if response.status == 200:
                        break
                await asyncio.sleep(0.002)
            seen.append(time.monotonic() - answered)
            answers.append(answered - sent)
    return answers, seen


async def wait_health(http: aiohttp.ClientSession, url: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        try:
            async with http.get(f"{url}/health") as response:
                if response.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not start")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def visibility(args: argparse.Namespace) -> None:
    print(f"machine: {machine()}; lscpu model name: {cpu_model()}")
    runs = []
    with workdir() as work, kafka(work) as k:
        for n in range(args.runs):
            run = visibility_run(k, args.changes)
            runs.append(run)
            print(f"run {n + 1}: B p99 {percentile(run['seen'], 99):.3f} s", file=sys.stderr)
    print(f"\n{args.changes} creates through node A per run; B polled every 2 ms\n")
    print("| run | A answers, p50 / p99 | visible on B after A's answer, p50 / p99 / max |"
          " load average (start -> end) |")  # fmt: skip
    print("|---|---|---|---|")
    for n, run in enumerate(runs, 1):
        answers, seen = run["answers"], run["seen"]
        print(
            f"| {n} | {percentile(answers, 50) * 1000:.1f} / {percentile(answers, 99) * 1000:.1f}"
            f" ms | {percentile(seen, 50) * 1000:.1f} / {percentile(seen, 99) * 1000:.1f} /"
            f" {max(seen) * 1000:.1f} ms | {run['load']} |"
        )
    p50 = statistics.median(percentile(r["seen"], 50) for r in runs)
    p99 = statistics.median(percentile(r["seen"], 99) for r in runs)
    a50 = statistics.median(percentile(r["answers"], 50) for r in runs)
    a99 = statistics.median(percentile(r["answers"], 99) for r in runs)
    print(
        f"| median | {a50 * 1000:.1f} / {a99 * 1000:.1f} ms |"
        f" **{p50 * 1000:.1f} / {p99 * 1000:.1f} ms** | |"
    )


def build(args: argparse.Namespace) -> None:
    import gc
    import tempfile

    from checker_common.task_record import decode
    from checker_common.urls import parse_url
    from periodic_checker.materialiser import Snapshot, TaskTopicFollower
    from periodic_checker.policy import TargetPolicy
    from periodic_checker.settings import CheckerSettings
    from periodic_checker.store import SQLiteTaskStore, ViewWrite, _task_to_row
    from periodic_checker.task_view import Refusals, applied, judged
    from periodic_checker.tasks import Task

    print(f"machine: {machine()}; lscpu model name: {cpu_model()}")
    n = args.records
    now = datetime.now(UTC)
    snapshot = Snapshot()
    for i in range(n):
        key, value = encode(bench_record(i, args.urls, now))
        snapshot.last[key] = (i % PARTITIONS, i, value)
    policy = TargetPolicy()
    items = [(key, value) for key, (_, _, value) in snapshot.last.items()]

    def per_record(label: str, work: Any) -> None:
        started = time.perf_counter()
        work()
        print(f"| {label} | {(time.perf_counter() - started) / n * 1e6:.1f} us |")

    gc.collect()
    gc.disable()
    print(f"\n{n:,} records, collector paused\n\n| step | per record |\n|---|---|")
    decoded: list[Any] = []
    per_record("decode (JSON, TaskSpec)", lambda: decoded.extend(decode(k, v) for k, v in items))
    tasks: list[Any] = []
    per_record("make the task", lambda: tasks.extend(applied(d, None, now) for d in decoded))
    refused: list[Any] = []
    per_record("target policy", lambda: refused.extend(policy.check_url(t.spec.url) for t in tasks))
    per_record(
        "judge",
        lambda: [judged(t, Refusals(target=r), now) for t, r in zip(tasks, refused, strict=True)],
    )
    per_record("the row's values", lambda: [_task_to_row(t) for t in tasks])
    one = tasks[0]
    fields = {"id": one.id, "spec": one.spec, "created_at": now, "updated_at": now}
    per_record("Task(...) (validated)", lambda: [Task(**fields) for _ in range(n)])
    per_record(
        "Task.model_construct(...)", lambda: [Task.model_construct(**fields) for _ in range(n)]
    )

    settings = CheckerSettings.model_construct(
        checker_mode="cluster", checker_node_id="bench", kafka_tasks_topic="t"
    )
    print("\n| whole view | collector running | collector paused |\n|---|---|---|")
    timings: dict[str, list[float]] = {"build": [], "write": []}
    for paused in (False, True):
        parse_url.cache_clear()  # each URL read anew, as by a node that just started
        gc.collect()
        if paused:
            gc.disable()
        else:
            gc.enable()
        with tempfile.TemporaryDirectory() as tmp:
            store = SQLiteTaskStore(Path(tmp) / "view.sqlite3", max_tasks=n + 1)
            follower = TaskTopicFollower(settings, store, None, policy=policy)  # type: ignore[arg-type]
            started = time.perf_counter()
            writes: list[ViewWrite] = follower.build_view(snapshot, {}, now)
            built = time.perf_counter()
            store.replace_view(writes, {})
            timings["build"].append(built - started)
            timings["write"].append(time.perf_counter() - built)
            store.close()
    gc.enable()
    for step, label in (("build", "decoding and validating"), ("write", "writing SQLite")):
        running, paused_s = timings[step]
        print(f"| {label} | {running:.2f} s | {paused_s:.2f} s |")

    # As the daemon builds it: the rows written by the store's thread meanwhile, the collector
    # paused; the records in the order of their sites, and shuffled, as the topic gives them
    # (by partition: a site's pages far apart, so what yarl and parse_url keep helps little).
    shuffled = list(snapshot.last.items())
    random.Random(7).shuffle(shuffled)
    orders = {"site order": snapshot, "shuffled": Snapshot(last=dict(shuffled))}
    print(
        "\n| beside the writing thread, 3 runs | decoding, validating, making the rows"
        " | the writing left after |\n|---|---|---|"
    )
    for label, records in orders.items():
        built_s, left_s = [], []
        for _ in range(3):
            parse_url.cache_clear()
            gc.collect()
            gc.disable()
            with tempfile.TemporaryDirectory() as tmp:
                store = SQLiteTaskStore(Path(tmp) / "view.sqlite3", max_tasks=n + 1)
                follower = TaskTopicFollower(settings, store, None, policy=policy)  # type: ignore[arg-type]
                started = time.perf_counter()
                rebuild = store.rebuild_view()
                follower.build_view(records, {}, now, sink=rebuild)
                built = time.perf_counter()
                rebuild.finish({})
                built_s.append(built - started)
                left_s.append(time.perf_counter() - built)
                store.close()
            gc.enable()
        print(
            f"| {label} | {' / '.join(f'{x:.2f}' for x in built_s)} s"
            f" | {' / '.join(f'{x:.2f}' for x in left_s)} s |"
        )
    print(f"\nload average at the end {loadavg()}")


def env_setting(text: str) -> tuple[str, str]:
    """NAME=VALUE, for --alternate-env."""
    name, sep, value = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE")
    return name, value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    one = sub.add_parser("startup", help="start-up of a cluster node to READY")
    one.add_argument("--records", type=int, default=100_000)
    one.add_argument("--runs", type=int, default=3)
    one.add_argument("--urls", choices=URL_CHOICES, default="own")
    one.add_argument(
        "--claims",
        action="store_true",
        help="each task's name claimed on the names topic too, as tasks created through the"
        " API have them (the node reads those at start as well)",
    )
    one.add_argument(
        "--states",
        action="store_true",
        help="each task's state on the state topic too, as the nodes running the tasks leave"
        " it (the node reads that topic from its start as well)",
    )
    one.add_argument(
        "--alternate-env",
        action="append",
        default=[],
        type=env_setting,
        metavar="NAME=VALUE",
        help="run every second node with this environment variable too (repeatable), to"
        " compare a variant side by side with the plain node in one run",
    )
    two = sub.add_parser("visibility", help="a change through A, visible through B")
    two.add_argument("--changes", type=int, default=200)
    two.add_argument("--runs", type=int, default=3)
    three = sub.add_parser("build", help="where the view's time goes, in-process")
    three.add_argument("--records", type=int, default=100_000)
    three.add_argument("--urls", choices=URL_CHOICES, default="own")
    args = parser.parse_args()
    if args.what == "startup":
        startup(args)
    elif args.what == "build":
        build(args)
    else:
        visibility(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
