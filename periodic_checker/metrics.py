"""Prometheus metrics of the checker, served by the API on GET /metrics (the default registry).

Two kinds, by cost on the hot path (CPU per check is benchmarked):

- Per check, a counter child resolved once per (outcome, error kind) at import and two
  histogram observations: `record_check()` and `record_lag()`, a few microseconds together.
- Everything the scheduler and the publisher count anyway (tasks by status and health, checks
  in flight, retries, skipped overlaps, producer queue, outbox, deliveries) is read when
  Prometheus scrapes, by `CheckerCollector`: nothing extra per check. Tasks by status and
  health come from counts `TaskMap` keeps as tasks change (no walk, no SQLite per scrape).
"""

from __future__ import annotations

import operator
import uuid
from collections import Counter as Tally
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from checker_common.contract import NOT_JUDGED, CheckResult, ErrorKind, Health
from checker_common.task_spec import TaskStatus
from periodic_checker.tasks import Task

# From a fast local page to a slow site near its time-out (at most 60 s, tasks.py).
CHECK_SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Lag is milliseconds when all is well; seconds mean the loop or the caps hold checks back.
LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

NO_ERROR = "none"

CHECKS = Counter(
    "periodic_checker_checks",
    "Checks run, by outcome (ok, failed, not_judged: the checker held it up) and error kind"
    " (none when ok)",
    ["outcome", "error_kind"],
)
CHECK_SECONDS = Histogram(
    "periodic_checker_check_seconds",
    "Duration of one check (load_time: start to last byte or to the failure)",
    buckets=CHECK_SECONDS_BUCKETS,
)
SCHEDULE_LAG = Histogram(
    "periodic_checker_schedule_lag_seconds",
    "Actual start of a scheduled check minus its planned start (after the concurrency caps)",
    buckets=LAG_BUCKETS,
)

# Children resolved once: `.labels()` per check would build a tuple and take a lock each time.
_OK = CHECKS.labels("ok", NO_ERROR)
_FAILED: dict[ErrorKind | None, Any] = {
    kind: CHECKS.labels("not_judged" if kind in NOT_JUDGED else "failed", kind)
    for kind in ErrorKind
}
_FAILED[None] = CHECKS.labels("failed", NO_ERROR)


def record_check(result: CheckResult) -> None:
    """Count one finished check and observe its duration."""
    if result.ok:
        _OK.inc()
    else:
        error = result.error
        _FAILED[error.kind if error is not None else None].inc()
    CHECK_SECONDS.observe(result.load_time)


def record_lag(seconds: float) -> None:
    SCHEDULE_LAG.observe(seconds if seconds > 0 else 0.0)


class TaskMap(dict[uuid.UUID, Task]):
    """The scheduler's tasks by id, counting them by status and health as they change.

    Walking 100,000 tasks takes 12-22 ms of the event loop here (`bench/micro.py taskmap`),
    too much for every scrape; this keeps the counts for the cost of a comparison per update.
    Only item assignment, `del` and `pop` are supported changes (all the scheduler uses).
    """

    def __init__(self) -> None:
        super().__init__()
        self.by_status: Tally[TaskStatus] = Tally()
        self.by_health: Tally[Health] = Tally()

    def __setitem__(self, key: uuid.UUID, task: Task) -> None:
        old = dict.get(self, key)
        dict.__setitem__(self, key, task)
        if old is None:
            self.by_status[task.status] += 1
            self.by_health[task.health] += 1
            return
        if old.status is not task.status:
            self.by_status[old.status] -= 1
            self.by_status[task.status] += 1
        if old.health is not task.health:
            self.by_health[old.health] -= 1
            self.by_health[task.health] += 1

    def load(self, tasks: Sequence[Task]) -> None:
        """Fill an empty map with tasks of distinct ids, counted all at once: item by item
        (`__setitem__` is Python), 100,000 tasks were most of the 0.16 s a cluster node's
        scheduler took at start, 0.10 s since (`bench/task_topic.py startup`, adding the jobs)."""
        if self:
            raise ValueError("load() fills an empty TaskMap")
        dict.update(self, zip(map(_id_of, tasks), tasks, strict=True))
        if len(self) != len(tasks):
            dict.clear(self)
            raise ValueError("load() takes tasks of distinct ids")
        self.by_status.update(map(_status_of, tasks))
        self.by_health.update(map(_health_of, tasks))

    def __delitem__(self, key: uuid.UUID) -> None:
        self._forget(dict.pop(self, key))

    def pop(self, key: uuid.UUID, *default: Any) -> Any:
        if key in self:
            task = dict.pop(self, key)
            self._forget(task)
            return task
        if default:
            return default[0]
        raise KeyError(key)

    def _forget(self, task: Task) -> None:
        self.by_status[task.status] -= 1
        self.by_health[task.health] -= 1

    def _unsupported(self, *_args: Any, **_kwargs: Any) -> Any:
        raise TypeError("TaskMap supports only [key] = task, del and pop (the counts)")

    update = setdefault = popitem = clear = __ior__ = _unsupported


_id_of = operator.attrgetter("id")
_status_of = operator.attrgetter("status")
_health_of = operator.attrgetter("health")


def count_tasks(tasks: Mapping[uuid.UUID, Task]) -> tuple[dict[str, int], dict[str, int]]:
    """Tasks by status and by health, every known value present (0 when none)."""
    by_status = dict.fromkeys((str(s) for s in TaskStatus), 0)
    by_health = dict.fromkeys((str(h) for h in Health), 0)
    if isinstance(tasks, TaskMap):
        statuses: Mapping[TaskStatus, int] = tasks.by_status
        healths: Mapping[Health, int] = tasks.by_health
    else:
        statuses = Tally(task.status for task in tasks.values())
        healths = Tally(task.health for task in tasks.values())
    for status, count in statuses.items():
        by_status[str(status)] += count
    for health, count in healths.items():
        by_health[str(health)] += count
    return by_status, by_health


class _SchedulerStats(Protocol):
    @property
    def fired(self) -> int: ...
    @property
    def retries(self) -> int: ...
    @property
    def skipped_overlap(self) -> int: ...
    @property
    def skipped_late(self) -> int: ...
    @property
    def in_flight(self) -> int: ...
    @property
    def runs_failed(self) -> int: ...


class SchedulerView(Protocol):
    """What the collector reads from `scheduler.CheckScheduler`."""

    @property
    def tasks(self) -> Mapping[uuid.UUID, Task]: ...
    @property
    def stats(self) -> _SchedulerStats: ...


class PublisherView(Protocol):
    """What the collector reads from `producer.ResultPublisher` (its `PublisherStats`)."""

    def stats(self) -> Any: ...


class StallsView(Protocol):
    """What the collector reads from `overload.LoopStalls`."""

    @property
    def total(self) -> float: ...

    def longest(self, window: float, now: float | None = None) -> float: ...


# The window of the "longest recent stall" gauge and /status figure.
STALL_WINDOW = 60.0


class CheckerCollector(Collector):
    """The figures the scheduler and the publisher keep anyway, read at scrape time."""

    def __init__(
        self,
        scheduler: SchedulerView,
        publisher: PublisherView | None,
        stalls: StallsView | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.publisher = publisher
        self.stalls = stalls

    def describe(self) -> Iterator[Metric]:
        # Names only: registering must not walk 100,000 tasks.
        return self._families(sampled=False)

    def collect(self) -> Iterator[Metric]:
        return self._families(sampled=True)

    def _families(self, *, sampled: bool) -> Iterator[Metric]:
        by_status, by_health = count_tasks(self.scheduler.tasks) if sampled else ({}, {})
        stats = self.scheduler.stats
        tasks = GaugeMetricFamily(
            "periodic_checker_tasks", "Tasks known to the checker, by status", labels=["status"]
        )
        health = GaugeMetricFamily(
            "periodic_checker_tasks_by_health",
            "Tasks known to the checker, by health",
            labels=["health"],
        )
        for name, count in by_status.items():
            tasks.add_metric([name], count)
        for name, count in by_health.items():
            health.add_metric([name], count)
        yield tasks
        yield health
        yield _gauge("periodic_checker_checks_in_flight", "Checks running now", stats.in_flight)
        yield _counter("periodic_checker_fires", "Scheduled fires of a task", stats.fired)
        yield _counter(
            "periodic_checker_retries", "Failed checks retried by the task's rules", stats.retries
        )
        yield _counter(
            "periodic_checker_skipped_overlaps",
            "Fires skipped because the task's previous check was still running",
            stats.skipped_overlap,
        )
        yield _counter(
            "periodic_checker_runs_failed",
            "Runs that ended in an error of the checker itself instead of a result (each one"
            " logged with its traceback): a bug to report; the task got no result from it",
            stats.runs_failed,
        )
        yield _counter(
            "periodic_checker_slots_skipped",
            "Slots not run because they could only start later than MAX_START_LAG (or half"
            " the task's interval): the checker is shedding load",
            stats.skipped_late,
        )
        if self.stalls is not None:
            yield _counter(
                "periodic_checker_loop_stall_seconds",
                "Seconds the event loop was stalled (not counted against checks' time-outs)",
                self.stalls.total,
            )
            yield _gauge(
                "periodic_checker_loop_stall_longest_seconds",
                f"Longest stall of the event loop in the last {STALL_WINDOW:.0f} s",
                self.stalls.longest(STALL_WINDOW) if sampled else None,
            )
        if self.publisher is None:
            return
        published = self.publisher.stats() if sampled else None

        def value(name: str) -> float:
            return float(getattr(published, name, 0) or 0)

        yield _gauge(
            "periodic_checker_producer_queue",
            "Results in librdkafka's queue or on their way to the outbox",
            value("queue_length"),
        )
        yield _gauge(
            "periodic_checker_outbox_size",
            "Results waiting in the SQLite outbox for the broker",
            value("outbox_size"),
        )
        yield _gauge(
            "periodic_checker_broker_reachable",
            "1 when the last delivery report said delivered, 0 when the broker is away"
            " or not heard from yet",
            1.0 if getattr(published, "broker_reachable", None) else 0.0,
        )
        yield _counter(
            "periodic_checker_deliveries", "Results the broker confirmed", value("delivered")
        )
        yield _counter(
            "periodic_checker_delivery_failures",
            "Delivery reports that said failed (the result went to, or stayed in, the outbox)",
            value("failed"),
        )
        yield _counter(
            "periodic_checker_outbox_writes",
            "Results written to the outbox (the broker away, or librdkafka full)",
            value("stored"),
        )
        yield _counter(
            "periodic_checker_results_set_aside",
            "Results set aside because the broker or the client refuses them for good (too"
            " large, invalid): each is logged and kept in the outbox_set_aside table",
            value("set_aside"),
        )
        yield _gauge(
            "periodic_checker_outbox_set_aside",
            "Results in the outbox_set_aside table of the SQLite file",
            value("set_aside_size"),
        )
        yield _counter(
            "periodic_checker_results_dropped",
            "Results that could not be encoded (a bug: each is logged)",
            value("dropped"),
        )


def _gauge(name: str, documentation: str, value: float | None) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation)
    if value is not None:
        family.add_metric([], value)
    return family


def _counter(name: str, documentation: str, value: float | None) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation)
    if value is not None:
        family.add_metric([], value)
    return family


def register(
    scheduler: SchedulerView,
    publisher: PublisherView | None,
    stalls: StallsView | None = None,
    registry: CollectorRegistry = REGISTRY,
) -> CheckerCollector:
    """Serve the scheduler's, publisher's and loop's figures; `unregister()` the result at
    stop."""
    collector = CheckerCollector(scheduler, publisher, stalls)
    registry.register(collector)
    return collector


def unregister(collector: CheckerCollector, registry: CollectorRegistry = REGISTRY) -> None:
    registry.unregister(collector)
