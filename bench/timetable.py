"""The scheduler's own cost with many interval tasks: APScheduler 3 against the checker's
timetable (`periodic_checker/timetable.py`), which replaced it.

    .venv/bin/python bench/timetable.py [--jobs 100000] [--interval 60] [--seconds 15] \
        [--runs 3] [--lead 10]

APScheduler is not a dependency of the checker any more: `pip install -e '.[bench]'`.

Each contender runs in a process of its own, on uvloop (the checker's loop), with `--jobs`
interval jobs of `--interval` seconds whose first fires are spread evenly over one interval, as
the checker spreads its tasks. Each fire starts an asyncio task running an empty coroutine, so
the process's CPU while the jobs fire is the scheduler's: waking up, taking the due jobs,
computing and storing each one's next fire time, starting the coroutine. It is measured over a
window of `--seconds` that opens once every job has been added, divided by the fires in the
window; adding every job and the memory that took (VmRSS before and after) are reported too.

Contenders: an `AsyncIOScheduler` with APScheduler's `MemoryJobStore` (a list kept sorted by
next run time) and the checker's job defaults (coalesce, no misfire grace time, no instance
limit); and `Timetable` with the checker's tick (`scheduler.SCHEDULE_TICK`), which wakes once
for all the jobs due in it. (The heap job store the checker used with APScheduler in between,
25 us a fire with the tick, is in bench/results/quoted.md.)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import machine  # noqa: E402

CONTENDERS = ("apscheduler", "timetable")
NAMES = {
    "apscheduler": "APScheduler 3, MemoryJobStore",
    "timetable": "the checker's timetable, 5 ms tick",
}
# Time to add every job before the first fires (MemoryJobStore inserts one at a time into its
# sorted list); jobs start firing this long after the scheduler starts (`--lead`).
LEAD_S = 10.0


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def worker(
    contender: str, jobs: int, interval: float, seconds: float, lead: float = LEAD_S
) -> dict[str, float]:
    """One contender in this process: the figures of its window."""
    import uuid

    import uvloop

    from periodic_checker.scheduler import SCHEDULE_TICK
    from periodic_checker.tasks import next_fire_time
    from periodic_checker.timetable import Timetable

    fires = 0
    running: set[asyncio.Task[None]] = set()

    async def job() -> None:
        nonlocal fires
        fires += 1

    def launch(task_id: uuid.UUID) -> None:
        task = asyncio.create_task(job())
        running.add(task)
        task.add_done_callback(running.discard)

    async def main() -> dict[str, float]:
        before = rss_mb()
        added = time.monotonic()
        first = time.time() + lead
        if contender == "apscheduler":
            from apscheduler.jobstores.memory import MemoryJobStore
            from apscheduler.schedulers.asyncio import AsyncIOScheduler
            from apscheduler.triggers.interval import IntervalTrigger

            scheduler = AsyncIOScheduler(
                timezone=UTC,
                jobstores={"default": MemoryJobStore()},
                job_defaults={"coalesce": True, "misfire_grace_time": None, "max_instances": 10**6},
            )
            scheduler.start(paused=True)
            start = datetime.fromtimestamp(first, UTC)
            for n in range(jobs):
                trigger = IntervalTrigger(
                    seconds=interval,
                    start_date=start + timedelta(seconds=interval * n / jobs),
                    timezone=UTC,
                )
                scheduler.add_job(job, trigger, id=str(n))
            add_s = time.monotonic() - added
            scheduler.resume()
            stop = lambda: scheduler.shutdown(wait=False)  # noqa: E731
        else:
            table = Timetable(launch, tick=SCHEDULE_TICK)
            for _ in range(jobs):
                # On each task's own grid, as the checker places them (spread by the id).
                task_id = uuid.uuid4()
                table.set(task_id, next_fire_time(task_id, interval, first), interval)
            add_s = time.monotonic() - added
            table.resume()
            stop = table.pause
        added_mb = rss_mb() - before
        if add_s > lead - 1:
            raise RuntimeError(f"adding the jobs took {add_s:.1f} s: first fires already passed")
        # Open the window once the jobs fire at their steady rate.
        await asyncio.sleep(max(0.0, first - time.time()) + 1.0)
        fires0, cpu0, wall0 = fires, time.process_time(), time.monotonic()
        await asyncio.sleep(seconds)
        cpu, wall, fired = time.process_time() - cpu0, time.monotonic() - wall0, fires - fires0
        stop()
        return {"add_s": add_s, "added_mb": added_mb, "fires": fired, "cpu_s": cpu, "wall_s": wall}

    return uvloop.run(main())


def run_worker(contender: str, args: argparse.Namespace) -> dict[str, float]:
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--worker",
            contender,
            "--jobs",
            str(args.jobs),
            "--interval",
            str(args.interval),
            "--seconds",
            str(args.seconds),
            "--lead",
            str(args.lead),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--interval", type=float, default=60.0)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--lead", type=float, default=LEAD_S, help="seconds to add the jobs in")
    parser.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.jobs, args.interval, args.seconds, args.lead)))
        return 0

    host = machine()
    results: dict[str, list[dict[str, float]]] = {c: [] for c in CONTENDERS}
    for run in range(args.runs):
        order = CONTENDERS if run % 2 == 0 else CONTENDERS[::-1]
        for contender in order:
            figures = run_worker(contender, args)
            results[contender].append(figures)
            print(f"run {run + 1} {contender}: {figures}", file=sys.stderr)

    def per_fire_us(r: dict[str, float]) -> float:
        return 1e6 * r["cpu_s"] / r["fires"]

    print(
        f"\n{args.jobs:,} jobs every {args.interval:g} s ({args.jobs / args.interval:,.0f} fires "
        f"a second), a {args.seconds:g} s window, {args.runs} runs, medians; {host}\n"
    )
    print(
        "| scheduler | CPU per fire, us (per run) | CPU, share of a core | fires a second "
        "| adding every job, s | memory for the jobs, MB |"
    )
    print("|---|---|---|---|---|---|")
    for contender, runs in results.items():
        print(
            f"| {NAMES[contender]} | {statistics.median(map(per_fire_us, runs)):.0f} "
            f"({', '.join(f'{per_fire_us(r):.0f}' for r in runs)}) "
            f"| {statistics.median(r['cpu_s'] / r['wall_s'] for r in runs):.2f} "
            f"| {statistics.median(r['fires'] / r['wall_s'] for r in runs):,.0f} "
            f"| {statistics.median(r['add_s'] for r in runs):.2f} "
            f"| {statistics.median(r['added_mb'] for r in runs):.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
