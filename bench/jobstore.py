"""APScheduler's own CPU per fire with many interval jobs: MemoryJobStore against HeapJobStore.

    .venv/bin/python bench/jobstore.py [--jobs 100000] [--interval 60] [--seconds 15] [--runs 3]

Each contender runs in a process of its own, on uvloop (the checker's loop): an
`AsyncIOScheduler` with the checker's job defaults (coalesce, no misfire grace time, no
instance limit) and `--jobs` interval jobs of `--interval` seconds whose first fires are spread
evenly over one interval, as the checker spreads its tasks. Each job runs an empty coroutine,
so the process's CPU while the jobs fire is the scheduler's: waking up, taking the due jobs
from the store, computing and storing each job's next run time, submitting the coroutine. It
is measured over a window of `--seconds` that opens once every job has been added, divided by
the fires in the window.

Contenders: APScheduler's `MemoryJobStore` (a list kept sorted by next run time), and
`periodic_checker.jobstore.HeapJobStore` without a tick and with the checker's tick
(`scheduler.SCHEDULE_TICK`), which wakes the scheduler once for all the jobs due in it.
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

CONTENDERS = ("memory", "heap", "heap-tick")
NAMES = {
    "memory": "APScheduler MemoryJobStore",
    "heap": "HeapJobStore, no tick",
    "heap-tick": "HeapJobStore, the checker's tick",
}
# Time to add every job before the first fires (MemoryJobStore inserts one at a time into its
# sorted list); jobs start firing this long after the scheduler starts.
LEAD_S = 10.0


def worker(store: str, jobs: int, interval: float, seconds: float) -> dict[str, float]:
    """One contender in this process: the figures of its window."""
    import uvloop
    from apscheduler.jobstores.memory import MemoryJobStore
    from apscheduler.schedulers.asyncio import AsyncIOScheduler
    from apscheduler.triggers.interval import IntervalTrigger

    from periodic_checker.jobstore import HeapJobStore
    from periodic_checker.scheduler import SCHEDULE_TICK

    fires = 0

    async def job() -> None:
        nonlocal fires
        fires += 1

    async def main() -> dict[str, float]:
        if store == "memory":
            jobstore = MemoryJobStore()
        else:
            jobstore = HeapJobStore(tick=SCHEDULE_TICK if store == "heap-tick" else 0.0)
        scheduler = AsyncIOScheduler(
            timezone=UTC,
            jobstores={"default": jobstore},
            job_defaults={"coalesce": True, "misfire_grace_time": None, "max_instances": 10**6},
        )
        scheduler.start(paused=True)
        added = time.monotonic()
        first = datetime.now(UTC) + timedelta(seconds=LEAD_S)
        for n in range(jobs):
            trigger = IntervalTrigger(
                seconds=interval,
                start_date=first + timedelta(seconds=interval * n / jobs),
                timezone=UTC,
            )
            scheduler.add_job(job, trigger, id=str(n))
        add_s = time.monotonic() - added
        if add_s > LEAD_S - 1:
            raise RuntimeError(f"adding the jobs took {add_s:.1f} s: first fires already passed")
        scheduler.resume()
        # Open the window once the jobs fire at their steady rate.
        await asyncio.sleep(max(0.0, (first - datetime.now(UTC)).total_seconds()) + 1.0)
        fires0, cpu0, wall0 = fires, time.process_time(), time.monotonic()
        await asyncio.sleep(seconds)
        cpu, wall, fired = time.process_time() - cpu0, time.monotonic() - wall0, fires - fires0
        scheduler.shutdown(wait=False)
        return {"add_s": add_s, "fires": fired, "cpu_s": cpu, "wall_s": wall}

    return uvloop.run(main())


def run_worker(store: str, args: argparse.Namespace) -> dict[str, float]:
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--worker",
            store,
            "--jobs",
            str(args.jobs),
            "--interval",
            str(args.interval),
            "--seconds",
            str(args.seconds),
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
    parser.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.jobs, args.interval, args.seconds)))
        return 0

    host = machine()
    results: dict[str, list[dict[str, float]]] = {c: [] for c in CONTENDERS}
    for run in range(args.runs):
        order = CONTENDERS if run % 2 == 0 else CONTENDERS[::-1]
        for store in order:
            figures = run_worker(store, args)
            results[store].append(figures)
            print(f"run {run + 1} {store}: {figures}", file=sys.stderr)

    def per_fire_us(r: dict[str, float]) -> float:
        return 1e6 * r["cpu_s"] / r["fires"]

    print(
        f"\n{args.jobs:,} jobs every {args.interval:g} s ({args.jobs / args.interval:,.0f} fires "
        f"a second), a {args.seconds:g} s window, {args.runs} runs, medians; {host}\n"
    )
    print(
        "| job store | CPU per fire, us (per run) | CPU, share of a core | fires a second "
        "| adding every job, s |"
    )
    print("|---|---|---|---|---|")
    for store, runs in results.items():
        print(
            f"| {NAMES[store]} | {statistics.median(map(per_fire_us, runs)):.0f} "
            f"({', '.join(f'{per_fire_us(r):.0f}' for r in runs)}) "
            f"| {statistics.median(r['cpu_s'] / r['wall_s'] for r in runs):.2f} "
            f"| {statistics.median(r['fires'] / r['wall_s'] for r in runs):,.0f} "
            f"| {statistics.median(r['add_s'] for r in runs):.1f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
