"""Name resolution for the probe, in threads of its own.

getaddrinfo() blocks, so asyncio runs it in the loop's default executor, the one the checker
also uses for its SQLite writes (task states, the outbox). A name server that does not answer
costs 5-10 s per lookup (the C library's defaults, resolv.conf(5): 5 s a try, 2 tries): tasks
with such names would queue the checker's own writes behind their lookups, and at exit asyncio
waits for every queued lookup to run. Here lookups get a pool of their own: at most `threads`
run at once, a lookup whose check has already timed out is dropped from the queue before it
runs, and the threads are daemon threads, so stopping the checker never waits for a name
server.

One domain cannot take the pool: the lookups of one registered domain hold at most
`per_domain` threads (`DNS_THREADS_PER_DOMAIN` of `DNS_THREADS`), the others wait for one of
those, so a name server that never answers delays its own domain's checks, not the rest.
getaddrinfo() cannot be stopped: a caller leaves at its check's deadline, but its thread stays
counted against the domain until the lookup returns. The registered domain is approximated by
the host name's last two labels (no public-suffix list is shipped): `a.shop.example.co.uk` and
`b.example.co.uk` share `co.uk`'s threads, a stricter bound than needed, never a looser one.
A name server that serves many domains is not known here and is bounded per domain only.

Time a lookup spends queued for a free thread of the pool is the checker's, not the target's:
it is recorded on the running check (`overload.begin_wait`) and does not count against its
time-out. Time queued behind the same domain's lookups is the target's (its name servers are
slow), and does.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import queue
import socket
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Any, Final

from aiohttp.abc import AbstractResolver, ResolveResult

from periodic_checker import overload

DNS_THREADS: Final = 32
DNS_THREADS_PER_DOMAIN: Final = 4
_NUMERIC: Final = socket.AI_NUMERICHOST | socket.AI_NUMERICSERV

_Work = tuple["Future[Any]", Callable[..., Any], tuple[Any, ...], dict[str, Any]]
# getaddrinfo(host, port, family, type, proto, flags); tests pass a function of their own.
Lookup = Callable[[str, int, int, int, int, int], list[Any]]


def registered_domain(host: str) -> str:
    """The registered domain of a host name, approximated by its last two labels (pure)."""
    labels = host.rstrip(".").lower().rsplit(".", 2)
    return ".".join(labels[-2:])


class DaemonThreadPool(Executor):
    """A thread pool whose threads never hold up the process's exit.

    Threads are started as work arrives, up to `threads`. `shutdown(cancel_futures=True)`
    cancels what has not started; work running in a thread is left to finish on its own.
    """

    def __init__(self, threads: int = DNS_THREADS, name: str = "dns") -> None:
        if threads < 1:
            raise ValueError("threads must be at least 1")
        self._max = threads
        self._name = name
        self._queue: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = threading.Semaphore(0)
        self._lock = threading.Lock()
        self._shutdown = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new work after shutdown")
            future: Future[Any] = Future()
            self._queue.put((future, fn, args, kwargs))
            if not self._idle.acquire(blocking=False) and len(self._threads) < self._max:
                thread = threading.Thread(
                    target=self._work, name=f"{self._name}-{len(self._threads)}", daemon=True
                )
                thread.start()
                self._threads.append(thread)
            return future

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            future, fn, args, kwargs = item
            if future.set_running_or_notify_cancel():  # False: cancelled while queued
                try:
                    result = fn(*args, **kwargs)
                except BaseException as exc:  # handed to the waiting caller
                    future.set_exception(exc)
                else:
                    future.set_result(result)
            del item, future, fn, args, kwargs
            self._idle.release()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
        if cancel_futures:
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    item[0].cancel()
        for _ in self._threads:
            self._queue.put(None)
        if wait:
            for thread in self._threads:
                thread.join()


@dataclass
class _DomainSlots:
    limit: asyncio.Semaphore
    users: int = 0  # callers waiting for a slot or holding one (a thread may hold it longer)


class PoolResolver(AbstractResolver):
    """getaddrinfo() in a pool of its own, at most `per_domain` threads per registered domain;
    the same answers as aiohttp's ThreadedResolver."""

    def __init__(
        self,
        pool: Executor,
        *,
        per_domain: int = DNS_THREADS_PER_DOMAIN,
        lookup: Lookup = socket.getaddrinfo,
    ) -> None:
        if per_domain < 1:
            raise ValueError("per_domain must be at least 1")
        self._pool = pool
        self._per_domain = per_domain
        self._lookup = lookup
        self._domains: dict[str, _DomainSlots] = {}

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        infos = await self._run(
            functools.partial(
                self._lookup, host, port, family, socket.SOCK_STREAM, 0, socket.AI_ADDRCONFIG
            ),
            registered_domain(host),
        )
        found: list[ResolveResult] = []
        for found_family, _, proto, _, address in infos:
            if found_family == socket.AF_INET6 and len(address) < 3:
                continue  # IPv6 not supported by this Python build
            found.append(
                ResolveResult(
                    hostname=host,
                    host=str(address[0]),
                    port=int(address[1]),
                    family=found_family,
                    proto=proto,
                    flags=_NUMERIC,
                )
            )
        return found

    async def _run(self, lookup: Callable[[], list[Any]], domain: str) -> list[Any]:
        """Run `lookup` in the pool once the domain has a free slot; the slot is given back
        when the thread is done with it, which may be after this caller left."""
        slots = self._domains.get(domain)
        if slots is None:
            slots = self._domains[domain] = _DomainSlots(asyncio.Semaphore(self._per_domain))
        slots.users += 1
        try:
            await slots.limit.acquire()
        except BaseException:
            self._leave(domain, slots, held=False)
            raise
        loop = asyncio.get_running_loop()
        wait = overload.begin_wait()  # the pool's queue is the checker's time

        def in_thread() -> list[Any]:
            if wait is not None:
                wait.end()
            return lookup()

        def done(_: Future[list[Any]]) -> None:
            # Any thread: the worker's, or this loop's when a queued lookup is cancelled.
            with contextlib.suppress(RuntimeError):  # the loop is closed: nothing to give back
                loop.call_soon_threadsafe(self._leave, domain, slots, True)

        try:
            future = self._pool.submit(in_thread)
        except BaseException:
            self._leave(domain, slots, held=True)
            raise
        future.add_done_callback(done)
        try:
            return await asyncio.wrap_future(future)
        finally:
            if wait is not None:
                wait.end()

    def _leave(self, domain: str, slots: _DomainSlots, held: bool) -> None:
        if held:
            slots.limit.release()
        slots.users -= 1
        if slots.users == 0 and self._domains.get(domain) is slots:
            del self._domains[domain]

    async def close(self) -> None:
        pass
