"""Name resolution for the probe, in threads of its own.

getaddrinfo() blocks, so asyncio runs it in the loop's default executor, the one the checker
also uses for its SQLite writes (task states, the outbox). A name server that does not answer
costs 5-10 s per lookup (the C library's defaults, resolv.conf(5): 5 s a try, 2 tries): tasks
with such names would queue the checker's own writes behind their lookups, and at exit asyncio
waits for every queued lookup to run. Here lookups get a pool of their own: at most `threads`
run at once, a lookup whose check has already timed out is dropped from the queue before it
runs, and the threads are daemon threads, so stopping the checker never waits for a name
server.
"""

from __future__ import annotations

import asyncio
import functools
import queue
import socket
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, Final

from aiohttp.abc import AbstractResolver, ResolveResult

DNS_THREADS: Final = 32
_NUMERIC: Final = socket.AI_NUMERICHOST | socket.AI_NUMERICSERV

_Work = tuple["Future[Any]", Callable[..., Any], tuple[Any, ...], dict[str, Any]]


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


class PoolResolver(AbstractResolver):
    """getaddrinfo() in a pool of its own; the same answers as aiohttp's ThreadedResolver."""

    def __init__(self, pool: Executor) -> None:
        self._pool = pool

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        lookup = functools.partial(
            socket.getaddrinfo, host, port, family, socket.SOCK_STREAM, 0, socket.AI_ADDRCONFIG
        )
        infos = await asyncio.get_running_loop().run_in_executor(self._pool, lookup)
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

    async def close(self) -> None:
        pass
