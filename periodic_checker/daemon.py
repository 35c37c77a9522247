"""`periodic-checker run`: open the store, start probe, publisher, scheduler and API; stop on
SIGTERM or SIGINT.

Results flow one way: the scheduler fires -> caps -> probe -> health rules (retries) -> store
(batched) -> publisher (Kafka, or the outbox while the broker is away).

Shutdown, within SHUTDOWN_TIMEOUT seconds in all: stop firing; let running checks finish (up to
half the budget); stop the API; flush the publisher (what it cannot deliver in the rest of the
budget goes to the outbox); write the last task states; close the store. Exit 0.

Under systemd (Type=notify) it sends READY=1 once the API serves, WATCHDOG=1 from the event
loop, STATUS= with the figures that matter, and STOPPING=1 on the signal.

The task topic (docs/tasks-topic.md): in single mode (CHECKER_MODE=single) the tasks come from
the store, every change goes to the topic, and another program's records are followed in the
background (the broker is not needed to start). In cluster mode the node reads the whole topic
first, makes its store exactly that view, and only then schedules, serves and says READY.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import queue
import signal
import sys
import time
from datetime import UTC, datetime
from typing import NoReturn

import uvloop
from aiohttp import web

from checker_common import logs
from checker_common.cli import EXIT_USAGE
from checker_common.systemd import Notifier
from periodic_checker import metrics
from periodic_checker.checker_service import CheckerService
from periodic_checker.materialiser import (
    FollowerError,
    Snapshot,
    TaskRecordRead,
    TaskTopicFollower,
    ViewBuilder,
)
from periodic_checker.memory import give_back_free_memory
from periodic_checker.names import NameClaims
from periodic_checker.outbox import Outbox
from periodic_checker.ownership import Ownership
from periodic_checker.policy import TargetPolicy
from periodic_checker.probe import Prober
from periodic_checker.producer import ResultPublisher
from periodic_checker.scheduler import CheckScheduler
from periodic_checker.settings import CheckerMode, CheckerSettings
from periodic_checker.state_mirror import StateMirror
from periodic_checker.store import SQLiteTaskStore, StoreError, StoreReadOnly
from periodic_checker.task_service import TaskService
from periodic_checker.task_state import StateTopicMissing, TaskStates
from periodic_checker.task_topic import RecordProducer, RecordPublisher
from periodic_checker.tasks import Task
from periodic_checker.writes import LocalWrites, TaskWrites, TopicWrites

log = logging.getLogger(__name__)

# Part of SHUTDOWN_TIMEOUT given to running checks; the rest is for the publisher's flush.
CHECKS_SHARE_OF_SHUTDOWN = 0.5
MIN_FLUSH_TIME = 1.0
# Seconds between watchdog pings and status updates (shorter when systemd's WatchdogSec asks).
WATCHDOG_PERIOD = 5.0


def run(settings: CheckerSettings) -> NoReturn:
    """Run until SIGTERM or SIGINT, then end the process (`leave`): 0 after a clean stop, 1 when
    start-up fails, 2 (as for a bad setting) when TASK_STORAGE cannot be written."""
    logs.setup(settings.log_level, settings.log_format, settings.secrets())
    try:
        # uvloop: less CPU per check than asyncio's loop (bench/results/probe.md).
        code = uvloop.run(serve(settings))
    except KeyboardInterrupt:  # a second Ctrl-C during shutdown
        code = 130
    leave(code)


def leave(code: int) -> NoReturn:
    """End the process with `code`, past the interpreter's finalization.

    A pattern search may still run in its daemon thread when the daemon stops (search.py: the
    threads never hold up the exit). Should it come back from RE2's C++ code while the
    interpreter finalizes, Python ends that thread with pthread_exit, whose unwinding through
    the binding's noexcept frame aborts the whole process ("terminate called without an active
    exception", exit 134 instead of 0: seen once in
    tests/faults/test_hostile_patterns_and_bodies.py). By now every result is delivered or in
    the outbox and every store is closed; the logs and the standard streams are flushed here,
    and nothing else is left for the finalization to do.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


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
    cluster = settings.checker_mode is CheckerMode.CLUSTER
    try:
        store = SQLiteTaskStore(settings.task_storage, max_tasks=settings.max_tasks)
        # Cluster mode: the view is made from the topic below, not loaded.
        tasks = [] if cluster else _load(store)
    except StoreReadOnly as exc:
        log.error("TASK_STORAGE: %s", exc)
        return EXIT_USAGE
    except StoreError as exc:
        log.error("cannot open the task storage: %s", exc)
        return 1
    policy = TargetPolicy.from_settings(settings)
    prober = Prober(
        policy=policy, max_connections=settings.max_in_flight, node=settings.checker_node_id
    )
    outbox = Outbox(settings.task_storage)
    publisher = ResultPublisher(settings, outbox)
    records = RecordPublisher(publisher, store, settings.checker_node_id)
    scheduler = CheckScheduler(
        store,
        prober,
        publisher,
        max_in_flight=settings.max_in_flight,
        per_host_in_flight=settings.per_host_in_flight,
        max_start_lag=settings.max_start_lag,
    )
    # A task that ends by itself (or that the policy refuses) is news for the task topic.
    scheduler.on_status_change = records.publish
    names = NameClaims() if cluster else None
    follower = TaskTopicFollower(
        settings, store, scheduler, policy=policy, own=None if cluster else records, names=names
    )
    producer: RecordProducer | None = None
    ownership: Ownership | None = None
    states: TaskStates | None = None
    mirror: StateMirror | None = None
    if cluster:
        assert names is not None
        notifier.status("reading the task topic")
        states = TaskStates(settings)
        # Its first round trip to the broker (the state topic's partitions) while the task
        # topic is read; the state topic itself is read once the node serves (below).
        states_started = asyncio.create_task(states.start(follow=False), name="state-topic-start")
        prober.load_trust_store()  # the same, for the probe's TLS contexts
        try:
            made = await _materialise(settings, store, follower, stop)
        except FollowerError as exc:
            log.error("cannot read the task topic %s: %s", settings.kafka_tasks_topic, exc)
            await _abandon(states, states_started)
            store.close()
            return 1
        if made is None:  # stopped while reading
            await _abandon(states, states_started)
            await follower.stop()
            store.close()
            return 0
        tasks = made
        producer = RecordProducer(settings)
        producer.start()
        try:
            await states_started
        except StateTopicMissing as exc:
            log.error("KAFKA_TASK_STATE_TOPIC: %s", exc)
            await states.stop()
            await follower.stop()
            await producer.close()
            store.close()
            return 1
        # This node runs the tasks of the partitions it owns, from the first assignment on.
        ownership = Ownership(
            settings,
            scheduler,
            follower,
            states,
            producer,
            store,
            grace=settings.shutdown_timeout * CHECKS_SHARE_OF_SHUTDOWN,
        )
        scheduler.owns = ownership.owns
        # The tasks other nodes run show the state those nodes measured.
        mirror = StateMirror(
            states, scheduler, follower, ownership.owns, node_id=settings.checker_node_id
        )
        writes: TaskWrites = TopicWrites(
            producer,
            follower,
            names,
            store,
            scheduler,
            node_id=settings.checker_node_id,
            tasks_topic=settings.kafka_tasks_topic,
            names_topic=settings.kafka_task_names_topic,
            max_tasks=settings.max_tasks,
        )
    else:
        writes = LocalWrites(store, scheduler, records)
    await prober.start()
    await publisher.start()
    service = CheckerService(
        store,
        scheduler,
        policy=policy,
        publisher=publisher,
        stalls=prober.stalls,
        writes=writes,
        describe=lambda: _topic_status(settings, follower, records, publisher, ownership),
    )
    collector = metrics.register(scheduler, publisher, prober.stalls)
    scheduling = time.monotonic()
    await scheduler.start(tasks)
    log.info("%d tasks scheduled in %.2f s", len(tasks), time.monotonic() - scheduling)
    # What loading made and dropped (records, rows, parsed JSON) is free but still resident:
    # 70 MB at 100,000 task records (`bench/task_topic.py startup`, VmRSS at READY).
    give_back_free_memory()
    if not cluster:
        # An upgrade from a release without the task topic publishes every task here, once.
        records.publish_unpublished()
    await records.start()
    await follower.start()
    if isinstance(writes, TopicWrites):
        await writes.start()
    if ownership is not None:
        await ownership.start()
    if mirror is not None:
        await mirror.start()
    runner = api_runner(build_app(service, settings))
    await runner.setup()
    started = False
    checkpointing: asyncio.Task[None] | None = None
    try:
        site = web.TCPSite(runner, settings.api_host, settings.api_port)
        await site.start()
        started = True
    except OSError as exc:
        log.error("cannot serve the API on %s:%d: %s", settings.api_host, settings.api_port, exc)
    if started:
        counts = ", ".join(f"{n} {s}" for s, n in sorted(service.status().tasks_by_status.items()))
        log.info(
            "started: %d tasks (%s), API on http://%s:%d, topic %s, %s mode, task topic %s",
            len(tasks),
            counts or "none",
            settings.api_host,
            settings.api_port,
            settings.kafka_topic,
            settings.checker_mode,
            settings.kafka_tasks_topic,
        )
        notifier.ready(f"{len(tasks)} tasks ({counts or 'none'})")
        if states is not None:
            states.follow()
        if cluster:
            # The rebuilt view into the store's file, now that the node is up (`ViewRebuild`).
            checkpointing = asyncio.create_task(_checkpoint(store), name="checkpoint")
        watchdog = asyncio.create_task(
            _feed_watchdog(notifier, scheduler, publisher, stop), name="watchdog"
        )
        await stop.wait()
        log.info("stopping")
        notifier.stopping("stopping")
        await watchdog
    deadline = time.monotonic() + settings.shutdown_timeout
    if mirror is not None:
        await mirror.stop()
    if ownership is not None:
        # Leave the group first: its tasks are handed over cleanly (running checks end, their
        # states are published), then the others take them.
        await ownership.stop()
    await scheduler.stop(grace=settings.shutdown_timeout * CHECKS_SHARE_OF_SHUTDOWN)
    await runner.cleanup()
    if isinstance(writes, TopicWrites):
        await writes.stop()
    if states is not None:
        await states.stop()
    if producer is not None:
        await producer.close(max(MIN_FLUSH_TIME, deadline - time.monotonic()) / 2)
    # The follower may still republish (single mode): it stops before the publisher closes.
    await follower.stop()
    await publisher.close(max(MIN_FLUSH_TIME, deadline - time.monotonic()))
    # After the publisher: every record it held is delivered or in the outbox by now.
    await records.stop()
    await prober.close()
    outbox.close()
    if checkpointing is not None:
        await checkpointing
    store.close()
    metrics.unregister(collector)
    notifier.close()
    log.info("stopped")
    return 0 if started else 1


async def _abandon(states: TaskStates, starting: asyncio.Task[None]) -> None:
    """Stop the state topic's reader, started or still starting (a broker that does not
    answer keeps it waiting). Not cancelled: its consumer is closed only once no request of
    it runs on another thread."""
    states.interrupt()
    with contextlib.suppress(Exception):  # StateTopicMissing: nothing to say now
        await starting
    await states.stop()


async def _checkpoint(store: SQLiteTaskStore) -> None:
    started = time.monotonic()
    try:
        await asyncio.to_thread(store.checkpoint)
    except StoreError as exc:  # the log stays; SQLite copies it at a later commit
        log.warning("%s", exc)
        return
    log.info("task view copied into the store's file in %.2f s", time.monotonic() - started)


def _load(store: SQLiteTaskStore) -> list[Task]:
    """Single mode: the stored tasks. Millions of objects that all live on: the collector is
    paused while they are made (its full passes over them were a third of loading 100,000
    tasks, `bench/scheduler_scale.py --startup-only`), and they go straight to its permanent
    generation."""
    gc.disable()
    try:
        return store.load(datetime.now(UTC))
    finally:
        gc.freeze()
        gc.enable()


async def _materialise(
    settings: CheckerSettings,
    store: SQLiteTaskStore,
    follower: TaskTopicFollower,
    stop: asyncio.Event,
) -> list[Task] | None:
    """Cluster mode: read the whole task topic and make the store exactly that view; the
    tasks, or None when stopped meanwhile. FollowerError when the topic cannot be read.

    Three threads at once: one reads the topic (mostly waiting for the broker), one decodes
    each batch read into its tasks and their rows, and the store's own writes the rows."""
    started = time.monotonic()
    runtime = await asyncio.to_thread(store.runtime_states)
    batches: queue.SimpleQueue[list[TaskRecordRead] | None] = queue.SimpleQueue()
    read_at = started

    def read() -> Snapshot:
        nonlocal read_at
        try:
            return follower.read_everything(on_records=batches.put)
        finally:
            read_at = time.monotonic()
            batches.put(None)

    def build(builder: ViewBuilder) -> None:
        while (batch := batches.get()) is not None:
            builder.add(batch)

    # Hundreds of thousands of objects that all live on: the collector need not walk them
    # as they pile up (the scheduler freezes them once loaded).
    gc.disable()
    try:
        # Written by the store's thread while the records are decoded (on another core).
        rebuild = store.rebuild_view()
        builder = follower.view_builder(runtime, datetime.now(UTC), sink=rebuild)
        reading = asyncio.create_task(asyncio.to_thread(read))
        building = asyncio.create_task(asyncio.to_thread(build, builder))
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait([reading, stopping], return_when=asyncio.FIRST_COMPLETED)
        if not reading.done():
            follower.interrupt()
        stopping.cancel()
        try:
            snapshot = await reading
            await building
            writes = builder.finish(snapshot.unusable)  # and the records without a key
        except BaseException:
            with contextlib.suppress(BaseException):
                await building  # ends at the reading's end
            rebuild.abandon()
            if isinstance(reading.exception(), FollowerError) and stop.is_set():
                return None  # stopped while reading
            raise
        built_at = time.monotonic()
        await asyncio.to_thread(rebuild.finish, snapshot.offsets)
    finally:
        gc.freeze()  # before the collector runs again: it need not walk them at all
        gc.enable()
    log.info(
        "task topic %s read: %d records, %d tasks in %.2f s (reading %.2f s, decoding and"
        " validating %.2f s after it, writing the view %.2f s after that)",
        settings.kafka_tasks_topic,
        snapshot.records,
        len(writes),
        time.monotonic() - started,
        read_at - started,
        built_at - read_at,
        time.monotonic() - built_at,
    )
    return [write.task for write in writes]


def _topic_status(
    settings: CheckerSettings,
    follower: TaskTopicFollower,
    records: RecordPublisher,
    publisher: ResultPublisher,
    ownership: Ownership | None,
) -> dict[str, object]:
    """The mode, the task topic's figures and (cluster mode) what this node owns, for /status."""
    stats = follower.stats
    owned = ownership.status() if ownership is not None else {}
    return {
        **owned,
        "mode": str(settings.checker_mode),
        "node_id": settings.checker_node_id,
        "task_topic_caught_up": follower.caught_up.is_set(),
        "task_records_applied": stats.applied,
        "task_records_rejected": stats.rejected,
        "task_records_published": records.published,
        "task_records_republished": stats.republished,
        "task_records_waiting": publisher.stats().records_waiting,
    }


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
