"""What `check-config` tries: each dependency check returns `Check`s and never raises."""

from __future__ import annotations

import contextlib
import sqlite3
import ssl
from pathlib import Path

from checker_common.cli import Check, CheckFn, run_checks
from checker_common.kafka import bootstrap_addresses, client_config, tls_handshake
from checker_common.settings import KafkaSettings


def check_config(settings: KafkaSettings, topics: list[str], storage: CheckFn) -> int:
    """`check-config` of a daemon: its settings (valid, since they loaded), each broker's mutual
    TLS, the topics, then its own storage; one line per check with secrets masked, exit 1 when
    one failed."""
    steps: list[CheckFn] = [
        lambda: Check("settings", True, "valid"),
        lambda: broker_tls(settings),
        lambda: kafka_topics(settings, topics),
        storage,
    ]
    return run_checks(steps, settings.secrets(), print)


def broker_tls(settings: KafkaSettings) -> list[Check]:
    checks = []
    for host, port in bootstrap_addresses(settings):
        name = f"broker {host}:{port}"
        try:
            version = tls_handshake(settings, host, port)
            checks.append(Check(name, True, f"mutual TLS handshake ({version})"))
        except ssl.SSLError as exc:
            checks.append(Check(name, False, f"TLS refused: {exc.reason or exc}"))
        except OSError as exc:
            checks.append(Check(name, False, f"unreachable: {exc.strerror or exc}"))
    return checks


def kafka_topics(settings: KafkaSettings, topics: list[str], timeout: float = 10.0) -> Check:
    from confluent_kafka.admin import AdminClient

    config = client_config(settings, client_id="check-config")
    config.pop("logger")
    config["log_level"] = 0
    admin = AdminClient(config)
    try:
        metadata = admin.list_topics(timeout=timeout)
    except Exception as exc:
        return Check("kafka topics", False, f"metadata request failed: {exc}")
    missing = [t for t in topics if t not in metadata.topics]
    if missing:
        return Check("kafka topics", False, f"missing on the broker: {', '.join(missing)}")
    parts = ", ".join(f"{t} ({len(metadata.topics[t].partitions)} partitions)" for t in topics)
    return Check("kafka topics", True, parts)


def sqlite_writable(path: Path) -> Check:
    name = f"task storage {path}"
    try:
        with contextlib.closing(sqlite3.connect(path, timeout=5)) as db:
            db.execute("BEGIN IMMEDIATE")
            db.execute("CREATE TABLE IF NOT EXISTS _check_config_probe (x INTEGER)")
            db.execute("ROLLBACK")
        return Check(name, True, "writable")
    except sqlite3.Error as exc:
        return Check(name, False, f"not writable: {exc}")
