"""Builders and small queries the processor tests share."""

from __future__ import annotations

import contextlib
import socket
import threading
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from checker_common.contract import CheckResult, encode
from checker_processing.retention import Window
from checker_processing.writer import Record

# Keeps any time these tests use, from 1926 on (the fixed dates of the fixtures stay inside);
# results up to 5 minutes ahead of the clock, as by default.
WIDE_WINDOW = Window(retention_days=36_500, max_clock_skew=timedelta(seconds=300))


def make_result(**fields: Any) -> CheckResult:
    base: dict[str, Any] = {
        "result_id": uuid.uuid4(),
        "name": "example",
        "url": "https://example.test/",
        "timestamp": datetime.now(UTC) - timedelta(seconds=5),
        "status": 200,
        "load_time": 0.25,
        "ok": True,
        "health": "up",
    }
    base.update(fields)
    return CheckResult.model_validate(base)


def record_of(
    task_id: uuid.UUID, result: CheckResult, *, topic: str = "t", partition: int = 0, offset: int
) -> Record:
    key, value = encode(task_id, result)
    return Record(topic, partition, offset, key, value)


def raw_record(value: bytes | None, *, topic: str = "t", partition: int = 0, offset: int) -> Record:
    return Record(topic, partition, offset, b"raw-key", value)


def scalar(conn: Any, query: str, *args: Any) -> Any:
    with conn.cursor() as cur:
        cur.execute(query, args)
        row = cur.fetchone()
    return row[0] if row else None


def rows(conn: Any, query: str, *args: Any) -> list[tuple[Any, ...]]:
    with conn.cursor() as cur:
        cur.execute(query, args)
        return list(cur.fetchall())


class TcpProxy:
    """A TCP forwarder in front of PostgreSQL: `stop()` is an outage for every client (open
    connections cut, new ones refused), `start()` brings the same database back."""

    def __init__(self, target: tuple[str, int], port: int) -> None:
        self.target = target
        self.port = port
        self._listener: socket.socket | None = None
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self._listener = listener
        self._spawn(self._accept, listener)

    def stop(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        threads, self._threads = self._threads, []
        for thread in threads:
            thread.join(timeout=10)

    def _spawn(self, target: Any, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, upstream]
            self._spawn(self._pump, client, upstream)
            self._spawn(self._pump, upstream, client)

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)
