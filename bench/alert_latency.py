"""Alert latency: from the result that opens an incident to the webhook that tells of it, at
1,000 results a second.

    .venv/bin/python bench/alert_latency.py [--rate 1000] [--seconds 40] [--openings 220]
        [--runs 3] [--revision REV --revision REV ...]   (default: HEAD; several side by side)
        [--poll-seconds 1.0]

Everything real, on 127.0.0.1: the broker (Tansu behind stunnel, mutual TLS), a PostgreSQL
database of its own per run and processor (migrated by the daemon itself), the processor daemon
(`python -m checker_processing.cli run`, default batch settings) at the given revision with an
alerting file: one webhook channel to an aiohttp receiver in this process, one rule
`all = true`, `after_seconds = 0`, the given `poll_seconds` (the file's default, 1 s).

Each run, per processor (their order alternates from run to run): after the daemon joined its
group, results are produced at `--rate` a second for `--seconds`, as `bench/ingest.py latency`
produces them (1,000 tasks in turn, one result each a second, timestamp = produce time - load
time). At `--openings` moments spread over the run (random gaps, none in its first 2 s or last
6 s), the next task in turn not yet used goes down for 3 s: its first 'down' result opens an
incident, its first 'up' result after that closes it. Per opening result:

- produced: this process's clock just before the result is handed to the producer (= the check
  finished; the result's own `timestamp`, the check's start, is one load time earlier);
- visible: when the writer's transaction that stored it committed (a trigger in the bench's own
  database, not a migration, sends a NOTIFY from each statement that inserts into
  `check_results`; PostgreSQL delivers it at commit) - the ingest path alone, the reference;
- picked up: the `created_at` of its notification (the start of the sender's transaction that
  expanded the event, PostgreSQL's clock, the same host's);
- received: when the webhook request reached the receiver.

Every opening must be received as 'opened' and every closing as 'closed', or the run fails.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg2
from aiohttp import web
from confluent_kafka import Producer

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    NOTIFY_ON_COMMIT,
    Kafka,
    MessageTemplate,
    cpu_seconds,
    daemon,
    kafka,
    machine,
    percentile,
    server_version,
    task_id,
    temp_database,
    watch_commits,
    workdir,
)
from ingest import PARTITIONS, TASKS, producer_config, source_of, wait_joined

from devstack import free_port

DOWN_SECONDS = 3.0
SETTLE_S = 60.0  # after the last result: time for the last notifications to arrive


# -- the webhook receiver ------------------------------------------------------------------------


class Receiver:
    """An aiohttp webhook receiver on its own thread and loop: (task id, kind) -> when the
    first request for it arrived (epoch seconds)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.received: dict[tuple[str, str], float] = {}
        self.requests = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="bench-receiver")

    async def _handle(self, request: web.Request) -> web.Response:
        arrived = time.time()
        body = await request.json()
        self.requests += 1
        self.received.setdefault((body["task"]["id"], body["kind"]), arrived)
        return web.Response(status=204)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(runner.setup())
        self._loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            self._loop.run_until_complete(runner.cleanup())
            self._loop.close()

    def __enter__(self) -> Receiver:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the webhook receiver did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)


def alerting_file(path: Path, port: int, poll_seconds: float) -> Path:
    path.write_text(
        f"""[delivery]
poll_seconds = {poll_seconds}

[channels.bench]
type = "webhook"
url = "http://127.0.0.1:{port}/hook"
# Every opening and closing one by one: the latency of each is measured, not the rate limit
# (the default, 20 a minute, would fold most of them into summaries).
max_per_minute = 10000

[[rules]]
name = "all"
channels = ["bench"]
all = true
after_seconds = 0
"""
    )
    return path


# -- one run of one processor ---------------------------------------------------------------------


@dataclass
class Opening:
    task: str
    result_id: str
    produced: float  # epoch seconds, just before produce()
    checked: float  # the result's timestamp (the check's start)
    closed_produced: float | None = None


@dataclass
class Run:
    openings: list[Opening]
    received: dict[tuple[str, str], float]
    visible: dict[str, float]
    picked: dict[str, float]  # task id -> its 'opened' notification's created_at
    achieved: float
    cpu: float
    load: tuple[float, float]
    figures: dict[str, float] = field(default_factory=dict)


def schedule(seconds: float, openings: int, rng: random.Random) -> list[float]:
    """Moments (seconds into the run) of the openings: random gaps over [2, seconds - 6)."""
    span = seconds - 8.0
    gaps = [rng.uniform(0.5, 1.5) for _ in range(openings)]
    scale = span / sum(gaps)
    moments, at = [], 2.0
    for gap in gaps:
        moments.append(at)
        at += gap * scale
    return moments


def picked_up(dsn: str) -> dict[str, float]:
    conn = psycopg2.connect(dsn, connect_timeout=5)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT task_id::text, extract(epoch FROM created_at)::float8 FROM notifications"
                " WHERE kind = 'opened'"
            )
            return dict(cur.fetchall())
    finally:
        conn.close()


def produce(
    broker: Kafka,
    topic: str,
    args: argparse.Namespace,
    moments: list[float],
    watched: dict[str, str],
) -> tuple[list[Opening], float]:
    """Results at the rate for the duration, the openings at their moments (each opening
    result put in `watched` before it is produced); returns the openings (with their
    closings) and the achieved rate."""
    up, down = MessageTemplate(), MessageTemplate(down=True)
    up.check()
    down.check()
    tasks = [task_id(n) for n in range(TASKS)]
    keys = [t.encode() for t in tasks]
    producer = Producer(producer_config(broker, linger_ms=20))  # the checker's linger
    total = args.rate * args.seconds
    tick = 0.01
    per_tick = max(1, round(args.rate * tick))
    down_until: dict[int, float] = {}  # task index -> monotonic end of its 'down' spell
    open_of: dict[int, Opening] = {}  # task index -> its opening, until it is closed
    used: set[int] = set()
    openings: list[Opening] = []
    pending = list(moments)
    started = time.monotonic()
    sent = 0
    while sent < total:
        due = started + (sent // per_tick) * tick
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        now_mono = time.monotonic()
        while pending and pending[0] <= now_mono - started:
            pending.pop(0)
            n = sent % TASKS
            while n in used:
                n = (n + 1) % TASKS
            used.add(n)
            down_until[n] = now_mono + DOWN_SECONDS
        for _ in range(per_tick):
            n = sent % TASKS
            is_down = down_until.get(n, 0.0) > time.monotonic()
            result = str(uuid.uuid4())
            now = datetime.now(UTC)
            checked = now - timedelta(seconds=up.load_time)
            value = (down if is_down else up).build(tasks[n], result, checked)
            produced = time.time()
            if is_down and n not in open_of:
                opening = Opening(tasks[n], result, produced, checked.timestamp())
                openings.append(opening)
                open_of[n] = opening
                watched[result] = tasks[n]
            elif not is_down and n in open_of:
                open_of.pop(n).closed_produced = produced
            producer.produce(topic, value, keys[n])
            sent += 1
        producer.poll(0)
    achieved = sent / (time.monotonic() - started)
    # The spells still open close now (one 'up' result each), so every opening has a closing.
    for n, opening in open_of.items():
        opening.closed_produced = time.time()
        checked = datetime.now(UTC) - timedelta(seconds=up.load_time)
        producer.produce(topic, up.build(tasks[n], str(uuid.uuid4()), checked), keys[n])
    left = producer.flush(60)
    if left:
        raise RuntimeError(f"{left} results not delivered to the broker")
    return openings, achieved


def one_run(
    broker: Kafka,
    receiver: Receiver,
    source: Path,
    args: argparse.Namespace,
    work: Path,
    label: str,
    seed: int,
) -> Run:
    receiver.received.clear()
    load_start = os.getloadavg()[0]
    with temp_database("bench_alerts") as dsn:
        topic = broker.topic(PARTITIONS)
        alerting = alerting_file(work / f"alerting-{label}.toml", receiver.port, args.poll_seconds)
        env = broker.processor_env(
            dsn,
            topic,
            KAFKA_TASKS_TOPIC=broker.topic(PARTITIONS),
            ALERTING_CONFIG=str(alerting),
        )
        log = work / f"processor-{label}.log"
        visible: dict[str, float] = {}
        watched: dict[str, str] = {}
        errors: list[str] = []
        stop, ready = threading.Event(), threading.Event()
        with daemon(env, log, source) as proc:
            wait_joined(log, proc)  # migrated, joined
            conn = psycopg2.connect(dsn, connect_timeout=5)
            with conn, conn.cursor() as cur:
                cur.execute(NOTIFY_ON_COMMIT)
            conn.close()
            listener = threading.Thread(
                target=watch_commits,
                args=(dsn, stop, ready, visible, errors),
                kwargs={"only": watched, "health": "down"},
            )
            listener.start()
            try:
                if not ready.wait(30):
                    raise RuntimeError("the commit listener did not start")
                moments = schedule(args.seconds, args.openings, random.Random(seed))
                cpu_before, began = cpu_seconds(proc.proc.pid), time.monotonic()
                # `watched` is filled as the openings are produced (read by the listener).
                openings, achieved = produce(broker, topic, args, moments, watched)
                cpu = (cpu_seconds(proc.proc.pid) - cpu_before) / (time.monotonic() - began)
                deadline = time.monotonic() + SETTLE_S
                while time.monotonic() < deadline:
                    if all(
                        (o.task, "opened") in receiver.received
                        and (o.task, "closed") in receiver.received
                        and o.result_id in visible
                        for o in openings
                    ):
                        break
                    time.sleep(0.1)
            finally:
                stop.set()
                listener.join(30)
            picked = picked_up(dsn)
        if errors:
            raise RuntimeError("; ".join(errors))
    missing = [
        o.task
        for o in openings
        if (o.task, "opened") not in receiver.received
        or (o.task, "closed") not in receiver.received
        or o.result_id not in visible
    ]
    if missing:
        raise RuntimeError(
            f"{len(missing)} of {len(openings)} incidents not seen through: {missing[:3]}"
        )
    return Run(
        openings, dict(receiver.received), visible, picked, achieved, cpu,
        (load_start, os.getloadavg()[0]),
    )  # fmt: skip


# -- figures ---------------------------------------------------------------------------------------

# name -> what it is, in the order they are shown
MEASURES = {
    "alert": "**result produced -> webhook received** (opening)",
    "alert_from_check": "check timestamp -> webhook received (opening)",
    "visible": "reference, ingest alone: result produced -> row visible (same results)",
    "added": "what alerting adds: row visible -> webhook received",
    "wait": "  of which: row visible -> sender's round begins (its wait)",
    "send": "  of which: round begins -> webhook received (expand, claim, POST)",
    "close": "closing result produced -> webhook received (recovery)",
}


def samples(run: Run) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {name: [] for name in MEASURES}
    for o in run.openings:
        received = run.received[(o.task, "opened")]
        visible = run.visible[o.result_id]
        out["alert"].append(received - o.produced)
        out["alert_from_check"].append(received - o.checked)
        out["visible"].append(visible - o.produced)
        out["added"].append(received - visible)
        if o.task in run.picked:
            out["wait"].append(run.picked[o.task] - visible)
            out["send"].append(received - run.picked[o.task])
        assert o.closed_produced is not None
        out["close"].append(run.received[(o.task, "closed")] - o.closed_produced)
    return out


def summarise(run: Run) -> dict[str, float]:
    figures: dict[str, float] = {}
    for name, values in samples(run).items():
        figures[f"{name} p50"] = percentile(values, 0.5)
        figures[f"{name} p99"] = percentile(values, 0.99)
        figures[f"{name} max"] = max(values) if values else float("nan")
    return figures


def line(label: str, run: Run) -> str:
    f = run.figures
    parts = [
        f"{name} p50/p99/max {f[f'{name} p50']:.3f}/{f[f'{name} p99']:.3f}/{f[f'{name} max']:.3f} s"
        for name in MEASURES
    ]
    return (
        f"{label}: {len(run.openings)} openings, {run.achieved:.0f} results/s; "
        + "; ".join(parts)
        + f"; processor CPU {run.cpu:.2f} cores; load average {run.load[0]:.2f} -> {run.load[1]:.2f}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--seconds", type=int, default=40)
    parser.add_argument("--openings", type=int, default=220)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--poll-seconds", type=float, default=1.0)
    parser.add_argument(
        "--revision",
        action="append",
        help="git revision of the processor (HEAD), or WORKTREE; repeat to compare side by side",
    )
    args = parser.parse_args()
    if args.seconds < 10:
        parser.error("--seconds: at least 10 (openings fall in [2, seconds - 6))")
    host = machine()
    print(f"{host}; started {datetime.now(UTC):%Y-%m-%d %H:%M} UTC", flush=True)
    revisions = args.revision or ["HEAD"]
    runs: dict[str, list[Run]] = {}
    with workdir() as work, kafka(work) as broker, Receiver() as receiver:
        contenders = []
        for n, revision in enumerate(revisions):
            source, commit = source_of(revision, work / f"source-{n}")
            contenders.append((f"{revision} ({commit})", source))
        for run_no in range(args.runs):
            order = contenders if run_no % 2 == 0 else list(reversed(contenders))
            for name, source in order:
                label = f"run {run_no + 1} {name}"
                run = one_run(broker, receiver, source, args, work, label.replace(" ", "-"), run_no)
                run.figures = summarise(run)
                runs.setdefault(name, []).append(run)
                print(line(label, run), flush=True)
        with temp_database("bench_version") as dsn:
            version = server_version(dsn)
    print(
        f"\n{args.rate} results/s for {args.seconds} s, {args.openings} openings a run "
        f"(down {DOWN_SECONDS:.0f} s each), poll_seconds {args.poll_seconds}, {args.runs} runs, "
        f"medians; PostgreSQL {version}; load average at the end "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}\n"
    )
    for name, done in runs.items():
        print(f"processor {name}:\n")
        print("| from -> to | p50 s | p99 s (runs) | max s (all runs) |")
        print("|---|---|---|---|")
        for measure, what in MEASURES.items():
            p50 = statistics.median(r.figures[f"{measure} p50"] for r in done)
            p99s = [r.figures[f"{measure} p99"] for r in done]
            worst = max(r.figures[f"{measure} max"] for r in done)
            print(
                f"| {what} | {p50:.3f} | {statistics.median(p99s):.3f} "
                f"({', '.join(f'{v:.3f}' for v in p99s)}) | {worst:.3f} |"
            )
        cpu = statistics.median(r.cpu for r in done)
        print(f"\nprocessor CPU (median) {cpu:.2f} cores\n")
    return 0


if __name__ == "__main__":
    began = time.monotonic()
    code = main()
    print(f"(took {time.monotonic() - began:.0f} s)", file=sys.stderr)
    sys.exit(code)
