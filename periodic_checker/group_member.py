"""A cluster node's membership in the nodes' consumer group on the task topic: which partitions
the group gives it, told to `ownership.Ownership` as they change (docs/ownership.md).

The consumer fetches nothing: in `on_assign` it assigns the new partitions and pauses them at
once (a bare pause there is undone by the automatic assign after it). It lives in a thread of
its own that polls (rebalances are served there) and, at `stop()`, closes the consumer: the
close revokes what the node owns and leaves the group.

- assigned: `take(partitions, follow)` runs on the event loop, not awaited by the thread (it
  reads the state topic first, and the thread keeps serving the group);
- revoked: `release(partitions)` runs on the event loop and the callback waits for it (up to
  `handover_timeout`): the group hands the partitions on only after it;
- lost (cut off from the group longer than the session time-out, or the broker forgot the
  member): nothing stops; the next assignment is the whole truth (`follow=True`). librdkafka
  calls the lost callback on its own clock (no heartbeat answered for `session.timeout.ms`),
  the same whether the broker is down for every node or only this node's line is cut.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import threading
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import Consumer, TopicPartition
from prometheus_client import Counter

from checker_common.kafka import client_config, group_timing
from periodic_checker.settings import CheckerSettings

log = logging.getLogger(__name__)

REBALANCES = Counter(
    "periodic_checker_rebalances",
    "Changes of this node's partitions of the task topic (cluster mode): assigned, revoked,"
    " lost (cut off from the group; the node keeps running its tasks)",
    ["event"],
)
POLL_SECONDS = 0.2

Take = Callable[[list[int], bool], Coroutine[Any, Any, None]]
Release = Callable[[list[int]], Coroutine[Any, Any, None]]


def group_generation(metadata: bytes) -> int | None:
    """The generation in librdkafka's serialised consumer group metadata (`CGMDv2:` and the
    generation as a native int32); None when it is not that."""
    prefix = b"CGMDv2:"
    if not metadata.startswith(prefix) or len(metadata) < len(prefix) + 4:
        return None
    raw = metadata[len(prefix) : len(prefix) + 4]
    return int.from_bytes(raw, sys.byteorder, signed=True)


class GroupMember:
    """The group consumer of one node (see the module doc)."""

    def __init__(self, settings: CheckerSettings, *, handover_timeout: float) -> None:
        self.settings = settings
        self.handover_timeout = handover_timeout
        self.generation: int | None = None
        self.rebalanced_at: datetime | None = None
        self.rebalances = 0
        self.cut_off = False  # partitions lost; running the last ones owned until back
        self._take: Take | None = None
        self._release: Release | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = threading.Event()
        self._left = asyncio.Event()  # the consumer closed: out of the group
        self._thread: threading.Thread | None = None
        self._pending: set[Any] = set()

    def consumer_config(self) -> dict[str, Any]:
        node = self.settings.checker_node_id
        config = client_config(self.settings, client_id=f"periodic-checker-{node}")
        config.update(
            {
                "group.id": self.settings.checker_group_id,
                "partition.assignment.strategy": "cooperative-sticky",
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                **group_timing(self.settings.kafka_session_timeout_ms),
            }
        )
        return config

    def status(self) -> dict[str, object]:
        at = self.rebalanced_at
        return {
            "group_id": self.settings.checker_group_id,
            "group_generation": self.generation,
            "last_rebalance_at": None if at is None else at.isoformat(),
            "rebalances": self.rebalances,
            "group_cut_off": self.cut_off,
        }

    async def start(self, *, take: Take, release: Release) -> None:
        """Join the group (in a thread of its own, which serves the rebalances)."""
        self._take, self._release = take, release
        self._loop = asyncio.get_running_loop()
        consumer = Consumer(self.consumer_config())
        consumer.subscribe(
            [self.settings.kafka_tasks_topic],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        self._thread = threading.Thread(
            target=self._serve, args=(consumer,), name="group-member", daemon=True
        )
        self._thread.start()
        log.info(
            "joining group %s on %s as %s",
            self.settings.checker_group_id,
            self.settings.kafka_tasks_topic,
            self.settings.checker_node_id,
        )

    async def stop(self, timeout: float) -> None:  # noqa: ASYNC109 - the leave's budget
        """Leave the group (the revoke runs `release` first); waits up to `timeout`."""
        self._stop.set()
        if self._thread is not None:
            try:
                await asyncio.wait_for(self._left.wait(), timeout)
            except TimeoutError:
                log.warning("the group did not answer the leave in time; stopping anyway")
        if self._pending:
            pending = [asyncio.wrap_future(f) for f in list(self._pending)]
            await asyncio.wait(pending, timeout=timeout)

    def _serve(self, consumer: Any) -> None:
        """The consumer's thread: poll (nothing is fetched) so rebalances are served, then
        close, which revokes what is owned and leaves the group."""
        while not self._stop.is_set():
            try:
                consumer.poll(POLL_SECONDS)
            except Exception:
                log.exception("the group consumer's poll failed")
                self._stop.wait(1.0)
        try:
            consumer.close()
        except Exception:
            log.exception("leaving the group failed")
        finally:
            if self._loop is not None:
                with contextlib.suppress(RuntimeError):  # the loop is closed
                    self._loop.call_soon_threadsafe(self._left.set)

    # -- rebalance callbacks (the consumer's thread) -----------------------------------------

    def _rebalanced(self, consumer: Any, event: str) -> None:
        REBALANCES.labels(event).inc()
        self.rebalances += 1
        self.rebalanced_at = datetime.now(UTC)
        with contextlib.suppress(Exception):
            self.generation = group_generation(consumer.consumer_group_metadata())

    def _on_assign(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        consumer.incremental_assign(partitions)
        consumer.pause(partitions)
        self._rebalanced(consumer, "assigned")
        follow = self.cut_off
        self.cut_off = False
        numbers = sorted(p.partition for p in partitions)
        if (not numbers and not follow) or self._take is None or self._loop is None:
            return
        # Not awaited here: the take waits for the state topic, and the thread keeps serving.
        future = asyncio.run_coroutine_threadsafe(self._take(numbers, follow), self._loop)
        self._pending.add(future)
        future.add_done_callback(self._done)

    def _on_revoke(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        self._rebalanced(consumer, "revoked")
        numbers = sorted(p.partition for p in partitions)
        if not numbers or self._release is None or self._loop is None:
            return
        # Waited for: the partitions go on only once their tasks are handed over.
        future = asyncio.run_coroutine_threadsafe(self._release(numbers), self._loop)
        try:
            future.result(self.handover_timeout)
        except Exception:
            log.exception("handing over partitions %s failed", numbers)

    def _on_lost(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        self._rebalanced(consumer, "lost")
        self.cut_off = True
        log.warning(
            "partitions %s lost (cut off from the group): their tasks keep running here until"
            " the node is back in the group",
            sorted(p.partition for p in partitions),
        )

    def _done(self, future: Any) -> None:
        self._pending.discard(future)
        if not future.cancelled() and future.exception() is not None:
            log.error("taking partitions failed", exc_info=future.exception())
