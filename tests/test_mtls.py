"""The broker is reached only over mutual TLS, with the encrypted client key."""

from __future__ import annotations

import socket
import ssl
import time
import uuid

import pytest
from confluent_kafka import Consumer, KafkaException, Producer
from confluent_kafka.admin import AdminClient

from helpers import KafkaTarget


def test_produce_and_consume_over_mutual_tls_with_encrypted_key(
    kafka: KafkaTarget, topic: str
) -> None:
    assert kafka.password, "the client key is expected to be encrypted"
    assert "ENCRYPTED" in kafka.key.read_text()
    producer = Producer(kafka.client_config(**{"enable.idempotence": True, "acks": "all"}))
    sent = {str(uuid.uuid4()): f"value-{i}".encode() for i in range(20)}
    for key, value in sent.items():
        producer.produce(topic, key=key, value=value)
    assert producer.flush(30) == 0

    consumer = Consumer(
        kafka.client_config(
            **{
                "group.id": f"g-{uuid.uuid4().hex[:8]}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
                "session.timeout.ms": 6000,
                "heartbeat.interval.ms": 1000,
            }
        )
    )
    consumer.subscribe([topic])
    received: dict[str, bytes] = {}
    deadline = time.monotonic() + 60
    while len(received) < len(sent) and time.monotonic() < deadline:
        message = consumer.poll(0.5)
        if message is not None and message.error() is None:
            received[message.key().decode()] = message.value()
    consumer.close()
    assert received == sent


def refused_by(alert: str) -> str:
    return f"{alert}|EOF occurred in violation of protocol|Connection reset"


def _handshake(kafka: KafkaTarget, cert: str | None, key: str | None) -> None:
    host, _, port = kafka.bootstrap.rpartition(":")
    context = ssl.create_default_context(cafile=str(kafka.ca))
    if cert and key:
        context.load_cert_chain(cert, key)
    with (
        socket.create_connection((host, int(port)), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        tls.settimeout(5)
        # TLS 1.3: the server judges our certificate after the handshake; the alert arrives
        # on the first read.
        tls.sendall(b"\x00")
        tls.recv(1)


def test_client_without_certificate_is_refused(kafka: KafkaTarget) -> None:
    kafka.require_local()
    # The proxy sends the TLS alert; when it closes first the client sees the EOF instead.
    with pytest.raises(
        (ssl.SSLError, ConnectionResetError), match=refused_by("certificate required")
    ):
        _handshake(kafka, None, None)


def test_client_with_certificate_from_another_ca_is_refused(kafka: KafkaTarget) -> None:
    kafka.require_local()
    assert kafka.certs_dir is not None
    rogue = kafka.certs_dir / "rogue"
    with pytest.raises((ssl.SSLError, ConnectionResetError), match=refused_by("unknown ca")):
        _handshake(kafka, str(rogue / "client.pem"), str(rogue / "client.key"))


def test_kafka_client_without_certificate_gets_no_metadata(kafka: KafkaTarget) -> None:
    kafka.require_local()
    config = kafka.client_config()
    for option in ("ssl.certificate.location", "ssl.key.location", "ssl.key.password"):
        config.pop(option, None)
    admin = AdminClient(config)
    with pytest.raises(KafkaException):
        admin.list_topics(timeout=3)
