"""`periodic-checker run`: open the store, start probe, publisher, scheduler and API; stop on
SIGTERM or SIGINT.

Results flow one way: the scheduler fires -> caps -> probe -> health rules (retries) -> store
(batched) -> publisher (Kafka, or the outbox while the broker is away).

Shutdown, within SHUTDOWN_TIMEOUT seconds in all: stop firing; let running checks finish (up to
half the budget); stop the API; flush the publisher (what it cannot deliver in the rest of the
budget goes to the outbox); write the last task states; close the store. Exit 0.

Under systemd (Type=notify) it sends READY=1 once the API serves, WATCHDOG=1 from the event
loop, STATUS= with the figures that matter, and STOPPING=1 on the signal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from datetime import UTC, datetime

import uvloop
from aiohttp import web

from checker_common import logs
from checker_common.cli import EXIT_USAGE
from checker_common.systemd import Notifier
from periodic_checker import metrics
from periodic_checker.checker_service import CheckerService
from periodic_checker.outbox import Outbox
from periodic_checker.policy import TargetPolicy
from periodic_checker.probe import Prober
from periodic_checker.producer import ResultPublisher
from periodic_checker.scheduler import CheckScheduler
from periodic_checker.settings import CheckerSettings
from periodic_checker.store import SQLiteTaskStore, StoreError, StoreReadOnly
from periodic_checker.task_service import TaskService

log = logging.getLogger(__name__)

# Part of SHUTDOWN_TIMEOUT given to running checks; the rest is for the publisher's flush.
CHECKS_SHARE_OF_SHUTDOWN = 0.5
MIN_FLUSH_TIME = 1.0
# Seconds between watchdog pings and status updates (shorter when systemd's WatchdogSec asks).
WATCHDOG_PERIOD = 5.0


def run(settings: CheckerSettings) -> int:
    """Run until SIGTERM or SIGINT; 0 after a clean stop, 1 when start-up fails, 2 (as for a bad
    setting) when TASK_STORAGE cannot be written."""
    logs.setup(settings.log_level, settings.log_format, settings.secrets())
    try:
        # uvloop: less CPU per check than asyncio's loop (bench/results/probe.md).
        return uvloop.run(serve(settings))
    except KeyboardInterrupt:  # a second Ctrl-C during shutdown
        return 130


async def serve(settings: CheckerSettings) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        return await _serve(settings, stop)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


async def _serve(settings: CheckerSettings, stop: asyncio.Event) -> int:
    notifier = Notifier()
    notifier.status("loading tasks")
    try:
        store = SQLiteTaskStore(settings.task_storage, max_tasks=settings.max_tasks)
        tasks = store.load(datetime.now(UTC))
    except StoreReadOnly as exc:
        log.error("TASK_STORAGE: %s", exc)
        return EXIT_USAGE
    except StoreError as exc:
        log.error("cannot open the task storage: %s", exc)
        return 1
    policy = TargetPolicy.from_settings(settings)
    prober = Prober(policy=policy, max_connections=settings.max_in_flight)
    outbox = Outbox(settings.task_storage)
    publisher = ResultPublisher(settings, outbox)
    await prober.start()
    await publisher.start()
    scheduler = CheckScheduler(
        store,
        prober,
        publisher,
        max_in_flight=settings.max_in_flight,
        per_host_in_flight=settings.per_host_in_flight,
        max_start_lag=settings.max_start_lag,
    )
    service = CheckerService(
        store, scheduler, policy=policy, publisher=publisher, stalls=prober.stalls
    )
    collector = metrics.register(scheduler, publisher, prober.stalls)
    await scheduler.start(tasks)
    runner = api_runner(build_app(service, settings))
    await runner.setup()
    started = False
    try:
        site = web.TCPSite(runner, settings.api_host, settings.api_port)
        await site.start()
        started = True
    except OSError as exc:
        log.error("cannot serve the API on %s:%d: %s", settings.api_host, settings.api_port, exc)
    if started:
        counts = ", ".join(f"{n} {s}" for s, n in sorted(service.status().tasks_by_status.items()))
        log.info(
            "started: %d tasks (%s), API on http://%s:%d, topic %s",
            len(tasks),
            counts or "none",
            settings.api_host,
            settings.api_port,
            settings.kafka_topic,
        )
        notifier.ready(f"{len(tasks)} tasks ({counts or 'none'})")
        watchdog = asyncio.create_task(
            _feed_watchdog(notifier, scheduler, publisher, stop), name="watchdog"
        )
        await stop.wait()
        log.info("stopping")
        notifier.stopping("stopping")
        await watchdog
    deadline = time.monotonic() + settings.shutdown_timeout
    await scheduler.stop(grace=settings.shutdown_timeout * CHECKS_SHARE_OF_SHUTDOWN)
    await runner.cleanup()
    await publisher.close(max(MIN_FLUSH_TIME, deadline - time.monotonic()))
    await prober.close()
    outbox.close()
    store.close()
    metrics.unregister(collector)
    notifier.close()
    log.info("stopped")
    return 0 if started else 1


async def _feed_watchdog(
    notifier: Notifier, scheduler: CheckScheduler, publisher: ResultPublisher, stop: asyncio.Event
) -> None:
    """Pings systemd's watchdog from the event loop (a wedged loop stops the pings) and keeps
    `systemctl status` current with figures that are cheap to read at 100,000 tasks."""
    period = min(WATCHDOG_PERIOD, (notifier.watchdog_interval or WATCHDOG_PERIOD) / 4)
    while not stop.is_set():
        notifier.watchdog()
        lag = scheduler.lags.percentile(99)
        notifier.status(
            f"{len(scheduler.tasks)} tasks, {scheduler.in_flight} checks running,"
            f" lag p99 {'-' if lag is None else f'{lag:.3f} s'},"
            f" outbox {publisher.stats().outbox_size}"
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), period)


def api_runner(app: web.Application) -> web.AppRunner:
    """The API's runner (JSON for requests aiohttp's parser refuses, a deadline for request
    heads) when the API is installed, else aiohttp's own."""
    try:
        from periodic_checker.api.server import ApiRunner
    except ImportError:
        return web.AppRunner(app, access_log=None)
    return ApiRunner(app, access_log=None)


def build_app(service: TaskService, settings: CheckerSettings) -> web.Application:
    """The API when it is installed, else a minimal app answering GET /health."""
    try:
        from periodic_checker.api.app import create_app
    except ImportError:
        app = web.Application()
        app.router.add_get("/health", _health)
        return app
    return create_app(service, settings)


async def _health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})
