"""Kafka client configuration from settings: one place for the mutual-TLS options."""

from __future__ import annotations

import logging
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from checker_common.settings import KafkaSettings

log = logging.getLogger(__name__)


class LibrdkafkaLevels(logging.Filter):
    """librdkafka's syslog level 3 (mapped to ERROR by confluent-kafka) as WARNING for
    connection failures ("FAIL"): the client reconnects on its own; an outage that matters
    shows in the results' delivery. (`LibrdkafkaRepeats` keeps an outage to a few lines.)"""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if record.levelno == logging.ERROR and isinstance(args, tuple) and args[:1] == ("FAIL",):
            record.levelno = logging.WARNING
            record.levelname = logging.getLevelName(logging.WARNING)
        return True


# While a broker is down librdkafka reports each reconnect that fails, per client and broker
# (a 20 s outage: some 400 lines a daemon). One line per message and this long, at most.
REPEAT_EVERY_S = 30.0
# "[thrd:ssl://kafka-1:9093/bootstrap]: ssl://kafka-1:9093/bootstrap: Connect to ... failed"
THREAD = re.compile(r"^\[thrd:([^\]]*)\]: ")
NUMBERS = re.compile(r"\d+")
MAX_REMEMBERED = 1024


@dataclass
class _Seen:
    """When a message was last logged, and how often it came since."""

    logged_at: float
    suppressed: int = 0


class LibrdkafkaRepeats(logging.Filter):
    """The same librdkafka message once per `every` seconds: a message is the client, the
    facility, the broker's thread and the rest of the text without its numbers. When
    it is logged again, it says how many times it was held back; any other message (a
    recovery, another broker's failure) is logged at once."""

    def __init__(
        self, every: float = REPEAT_EVERY_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self.every = every
        self.clock = clock
        self.seen: dict[tuple[str, ...], _Seen] = {}
        # confluent-kafka calls the logger from whichever thread polls each client.
        self.lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        key = repeat_key(record)
        if key is None:
            return True
        now = self.clock()
        with self.lock:
            seen = self.seen.get(key)
            if seen is not None and now - seen.logged_at < self.every:
                seen.suppressed += 1
                return False
            suppressed = seen.suppressed if seen is not None else 0
            self._forget_old(now)
            self.seen[key] = _Seen(now)
        if suppressed:
            record.msg = f"{record.msg} (%d repeats suppressed)"
            record.args = (*_tuple_args(record), suppressed)
        return True

    def _forget_old(self, now: float) -> None:
        """Keep the table small: messages not seen for a window need no memory (and a flood
        of distinct ones starts it afresh)."""
        if len(self.seen) >= MAX_REMEMBERED:
            self.seen = {k: v for k, v in self.seen.items() if now - v.logged_at < self.every}
        if len(self.seen) >= MAX_REMEMBERED:
            self.seen.clear()


def repeat_key(record: logging.LogRecord) -> tuple[str, ...] | None:
    """What makes two librdkafka records the same message; None for a record not shaped like
    confluent-kafka's (`"%s [%s] %s"`, facility, client name, text), which is never held."""
    args = record.args
    if not isinstance(args, tuple) or len(args) != 3:
        return None
    facility, client, text = args
    if not (isinstance(facility, str) and isinstance(client, str) and isinstance(text, str)):
        return None
    # The broker's thread as it is (brokers differ by their numbers too), and the text after
    # it without its numbers ("after 0ms", counts): another failure of the same broker (a
    # refused certificate after a refused connection) is another message.
    thread = THREAD.match(text)
    where = thread[1] if thread else ""
    rest = text[thread.end() :] if thread else text
    return (facility, client, where, NUMBERS.sub("#", rest))


def _tuple_args(record: logging.LogRecord) -> tuple[object, ...]:
    return record.args if isinstance(record.args, tuple) else ()


def librdkafka_logger() -> logging.Logger:
    """The logger librdkafka writes to, with `LibrdkafkaLevels` and `LibrdkafkaRepeats`
    attached once."""
    logger = logging.getLogger("librdkafka")
    if not any(isinstance(f, LibrdkafkaLevels) for f in logger.filters):
        logger.addFilter(LibrdkafkaLevels())
    if not any(isinstance(f, LibrdkafkaRepeats) for f in logger.filters):
        logger.addFilter(LibrdkafkaRepeats())
    return logger


def client_config(settings: KafkaSettings, *, client_id: str) -> dict[str, Any]:
    """librdkafka options shared by producers, consumers and admin clients."""
    config: dict[str, Any] = {
        "bootstrap.servers": settings.kafka_connection,
        "client.id": client_id,
        "security.protocol": "SSL",
        "ssl.ca.location": str(settings.kafka_ca_path),
        "ssl.certificate.location": str(settings.kafka_cert_path),
        "ssl.key.location": str(settings.kafka_key_file),
        "ssl.endpoint.identification.algorithm": "https",
        "socket.keepalive.enable": True,
        "logger": librdkafka_logger(),
    }
    if settings.kafka_cert_pass is not None:
        config["ssl.key.password"] = settings.kafka_cert_pass.get_secret_value()
    return config


def group_timing(session_timeout_ms: int) -> dict[str, Any]:
    """A consumer group member's session and heartbeat: the heartbeat a sixth of the session
    (1 s at 6 s), so a member misses several before it is taken for dead, and hears of a
    rebalance within about a heartbeat."""
    return {
        "session.timeout.ms": session_timeout_ms,
        "heartbeat.interval.ms": max(100, min(3000, session_timeout_ms // 6)),
    }


def bootstrap_addresses(settings: KafkaSettings) -> list[tuple[str, int]]:
    result = []
    for server in settings.kafka_connection.split(","):
        host, _, port = server.rpartition(":")
        result.append((host.strip("[]"), int(port)))
    return result


def tls_handshake(settings: KafkaSettings, host: str, port: int, timeout: float = 5.0) -> str:
    """Open a TLS connection to one broker with the client certificate; return the version.

    Raises OSError or ssl.SSLError when the broker is unreachable or refuses us.
    """
    context = ssl.create_default_context(cafile=str(settings.kafka_ca_path))
    password = settings.kafka_cert_pass.get_secret_value() if settings.kafka_cert_pass else ""
    context.load_cert_chain(
        str(settings.kafka_cert_path), str(settings.kafka_key_file), password=password
    )
    with (
        socket.create_connection((host, port), timeout=timeout) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        # TLS 1.3 sends the server's verdict on our certificate after the handshake; a
        # refused client certificate shows up on the first read.
        tls.settimeout(0.5)
        try:
            tls.recv(1)
        except TimeoutError:
            pass
        except ssl.SSLError:
            raise
        return tls.version() or "TLS"
