"""Session fixtures: a real broker behind mutual TLS, a real PostgreSQL database.

The broker (Tansu behind stunnel) and the database are started or created once per test session
and stopped or dropped at the end. To run the same tests against a real Apache Kafka, set
TEST_KAFKA_BOOTSTRAP, TEST_KAFKA_CA_PATH, TEST_KAFKA_CERT_PATH, TEST_KAFKA_KEY_FILE and
optionally TEST_KAFKA_CERT_PASS; tests that cut the broker off then skip. TEST_POSTGRES_DSN
names an admin connection (default: postgresql://postgres@127.0.0.1:5432/postgres).
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg2
import pytest
import uvloop
from psycopg2 import sql

from devstack import Broker, create_topics, free_port, make_certs

from helpers import KafkaTarget, _is_setting, tasks_topic_of

if TYPE_CHECKING:
    from checker.nodes import Topics

# Test modules whose async tests run twice: on uvloop (the loop the daemons run on) and on
# asyncio's default loop (the probe is a library too). Transports differ between the two.
# Every other async test runs on asyncio's default loop only.
BOTH_LOOPS = frozenset({"test_probe.py", "test_http1.py", "test_curl_agreement.py"})


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    if item.path.name in BOTH_LOOPS:
        return {"uvloop": uvloop.new_event_loop, "asyncio": asyncio.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `long` (scenarios of several minutes, whose figures are in RELIABILITY.md)
    run only when asked for by name: `scripts/test.sh -m long` (or any -m naming `long`).
    The default run, which CI makes, stays within its time budget."""
    if "long" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="long scenario: run it by hand with scripts/test.sh -m long")
    for item in items:
        if item.get_closest_marker("long") is not None:
            item.add_marker(skip)


ROOT = Path(__file__).resolve().parent.parent
ADMIN_DSN = os.environ.get("TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.fixture(scope="session", autouse=True)
def clean_room(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every test, and every daemon or command it starts, runs in an empty directory with no
    settings in its environment: the developer's own `.env.prod` (which `scripts/stack.sh up`
    writes into the clone, where pytest runs) and exported settings are never read. A test
    that wants a settings file gives its path or its own working directory."""
    room = tmp_path_factory.mktemp("cwd")
    with pytest.MonkeyPatch.context() as patch:
        for name in [name for name in os.environ if _is_setting(name)]:
            patch.delenv(name)
        patch.chdir(room)
        yield room


@pytest.fixture(scope="session")
def dev_certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="session")
def kafka(
    tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config
) -> Iterator[KafkaTarget]:
    external = os.environ.get("TEST_KAFKA_BOOTSTRAP")
    if external:
        # Relative paths mean where pytest was started, not the clean room.
        here = pytestconfig.invocation_params.dir
        yield KafkaTarget(
            bootstrap=external,
            ca=here / os.environ["TEST_KAFKA_CA_PATH"],
            cert=here / os.environ["TEST_KAFKA_CERT_PATH"],
            key=here / os.environ["TEST_KAFKA_KEY_FILE"],
            password=os.environ.get("TEST_KAFKA_CERT_PASS"),
            certs_dir=None,
            local=None,
        )
        return
    certs = make_certs(tmp_path_factory.mktemp("broker-certs"))
    broker = Broker(tmp_path_factory.mktemp("broker-run"), certs).start()
    try:
        yield KafkaTarget(
            bootstrap=broker.bootstrap,
            ca=certs / "ca.pem",
            cert=certs / "client.pem",
            key=certs / "client.key",
            password=(certs / "client.pass").read_text().strip(),
            certs_dir=certs,
            local=broker,
        )
    finally:
        broker.stop()


@pytest.fixture
def topic(kafka: KafkaTarget) -> str:
    """A fresh topic with 3 partitions for one test, and its task topic (`tasks_topic_of`,
    compacted, 3 partitions), which a checker started by `helpers.start_checker` uses."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    create_topics(
        kafka.client_config(),
        [name, tasks_topic_of(name)],
        partitions=3,
        compacted=frozenset({tasks_topic_of(name)}),
    )
    return name


@pytest.fixture
def topics(kafka: KafkaTarget) -> Topics:
    """Fresh topics for cluster-mode nodes (`checker.nodes.Topics`): results, tasks, names and
    states, one set per test."""
    from checker.nodes import Topics  # it reads KafkaTarget from this module

    return Topics.make(kafka)


@pytest.fixture(scope="session")
def pg_dsn() -> Iterator[str]:
    """A database of its own for this test session, dropped at the end."""
    name = f"pc_test_{uuid.uuid4().hex[:10]}"
    admin = psycopg2.connect(ADMIN_DSN)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    base = ADMIN_DSN.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with admin.cursor() as cur:
            cur.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
        admin.close()


@pytest.fixture
def port() -> int:
    return free_port()
