"""Serving a Prometheus registry on /metrics from a thread of its own, and stopping it."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 5.0


class MetricsServerError(Exception):
    """The endpoint cannot be served (address in use, not local, ...); one line."""


@dataclass
class MetricsServer:
    """A running /metrics endpoint; `stop()` it at shutdown."""

    server: WSGIServer
    thread: threading.Thread

    @classmethod
    def start(cls, registry: CollectorRegistry, host: str, port: int) -> MetricsServer | None:
        """Serve `registry` on http://host:port/metrics; None when port is 0 (metrics off).

        Raises MetricsServerError when the address cannot be bound.
        """
        if not port:
            return None
        try:
            server, thread = start_http_server(port, host, registry=registry)
        except OSError as exc:
            raise MetricsServerError(
                f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}"
            ) from None
        log.info("metrics on http://%s:%d/metrics", host, port)
        return cls(server, thread)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=STOP_TIMEOUT_S)
