"""Kafka client configuration from settings: one place for the mutual-TLS options."""

from __future__ import annotations

import logging
import socket
import ssl
from typing import Any

from checker_common.settings import KafkaSettings

log = logging.getLogger(__name__)


class LibrdkafkaLevels(logging.Filter):
    """librdkafka's syslog level 3 (mapped to ERROR by confluent-kafka) as WARNING for
    connection failures ("FAIL"): during a broker outage they repeat every few seconds and
    the client reconnects on its own; an outage that matters shows in the results' delivery."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if record.levelno == logging.ERROR and isinstance(args, tuple) and args[:1] == ("FAIL",):
            record.levelno = logging.WARNING
            record.levelname = logging.getLevelName(logging.WARNING)
        return True


def librdkafka_logger() -> logging.Logger:
    """The logger librdkafka writes to, with `LibrdkafkaLevels` attached once."""
    logger = logging.getLogger("librdkafka")
    if not any(isinstance(f, LibrdkafkaLevels) for f in logger.filters):
        logger.addFilter(LibrdkafkaLevels())
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
