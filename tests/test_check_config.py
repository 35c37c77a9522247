"""`check-config` tries every dependency and prints one line per check."""

from __future__ import annotations

from pathlib import Path

import pytest

from devstack import create_topics

from helpers import KafkaTarget, run_cli, tasks_topic_of


def test_checker_check_config_passes_against_real_broker(
    kafka: KafkaTarget, topic: str, tmp_path: Path
) -> None:
    env = {
        **kafka.env(),
        "KAFKA_TOPIC": topic,
        "KAFKA_TASKS_TOPIC": tasks_topic_of(topic),
        "TASK_STORAGE": str(tmp_path / "t.sqlite3"),
    }
    result = run_cli("periodic_checker.cli", "check-config", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == ["ok"] * len(lines)
    assert any("mutual TLS handshake" in line for line in lines)
    assert any(topic in line and tasks_topic_of(topic) in line for line in lines)
    assert any("task storage" in line and "writable" in line for line in lines)
    if kafka.password:
        assert kafka.password not in result.stdout + result.stderr


def test_checker_check_config_names_a_missing_task_topic_and_in_cluster_mode_names_topic(
    kafka: KafkaTarget, topic: str, tmp_path: Path
) -> None:
    env = {
        **kafka.env(),
        "KAFKA_TOPIC": topic,
        "KAFKA_TASKS_TOPIC": tasks_topic_of(topic),
        "KAFKA_TASK_NAMES_TOPIC": f"{topic}-no-such-names",
        "TASK_STORAGE": str(tmp_path / "t.sqlite3"),
    }
    single = run_cli("periodic_checker.cli", "check-config", env=env)
    assert single.returncode == 0, single.stdout  # single mode needs no names topic
    cluster = run_cli(
        "periodic_checker.cli", "check-config", env={**env, "CHECKER_MODE": "cluster"}
    )
    assert cluster.returncode == 1
    assert f"FAIL kafka topics: missing on the broker: {topic}-no-such-names" in cluster.stdout


def test_processor_check_config_reports_each_failure_and_hides_password(
    kafka: KafkaTarget, tmp_path: Path
) -> None:
    env = {
        **kafka.env(),
        "KAFKA_CONNECTION": "localhost:1",
        "KAFKA_CONSUMER_TOPICS": "no-such-topic",
        "POSTGRESQL_CONNECTION": "postgresql://someone:pa55-word-secret@127.0.0.1:1/nowhere",
    }
    result = run_cli("checker_processing.cli", "check-config", env=env)
    assert result.returncode == 1
    lines = result.stdout.strip().splitlines()
    assert any(line.startswith("FAIL broker localhost:1") for line in lines)
    assert any(line.startswith("FAIL postgresql") for line in lines)
    assert "pa55-word-secret" not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


def test_processor_check_config_passes(kafka: KafkaTarget, topic: str, pg_dsn: str) -> None:
    tasks = f"{topic}-tasks"
    create_topics(kafka.client_config(), [tasks], partitions=3)
    env = {
        **kafka.env(),
        "KAFKA_CONSUMER_TOPICS": topic,
        "KAFKA_TASKS_TOPIC": tasks,
        "POSTGRESQL_CONNECTION": pg_dsn,
    }
    result = run_cli("checker_processing.cli", "check-config", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("ok   postgresql") for line in lines)
    # It consumes the task topic too: a missing one fails the check, named.
    assert any(topic in line and tasks in line for line in lines)
    missing = run_cli(
        "checker_processing.cli", "check-config", env={**env, "KAFKA_TASKS_TOPIC": "no-such-tasks"}
    )
    assert missing.returncode == 1
    assert "FAIL kafka topics: missing on the broker: no-such-tasks" in missing.stdout


def test_check_config_fails_when_storage_is_not_writable(
    kafka: KafkaTarget, topic: str, tmp_path: Path
) -> None:
    storage = tmp_path / "ro.sqlite3"
    storage.write_bytes(b"this is not a sqlite database, padded " * 40)
    env = {**kafka.env(), "KAFKA_TOPIC": topic, "TASK_STORAGE": str(storage)}
    result = run_cli("periodic_checker.cli", "check-config", env=env)
    assert result.returncode == 1
    assert any(line.startswith("FAIL task storage") for line in result.stdout.splitlines())


def email_channel(ca_file: Path) -> str:
    return (
        "[channels.oncall-mail]\n"
        'type = "email"\n'
        'host = "smtp.example.net"\n'
        f'ca_file = "{ca_file}"\n'
        'from_address = "alerts@example.net"\n'
        'to = ["oncall@example.net"]\n'
    )


@pytest.mark.parametrize("command", ["run", "check-config"])
@pytest.mark.parametrize("case", ["missing", "not-pem"])
def test_processor_refuses_an_email_channel_with_a_bad_ca_file(
    dev_certs: Path, tmp_path: Path, command: str, case: str
) -> None:
    ca_file = tmp_path / "no-such-ca.pem"
    if case == "not-pem":
        ca_file = tmp_path / "ca.pem"
        ca_file.write_text("not a certificate\n")
    alerting = tmp_path / "alerting.toml"
    alerting.write_text(email_channel(ca_file))
    env = {
        "KAFKA_CONNECTION": "localhost:9093",
        "KAFKA_CA_PATH": str(dev_certs / "ca.pem"),
        "KAFKA_CERT_PATH": str(dev_certs / "client.pem"),
        "KAFKA_KEY_FILE": str(dev_certs / "client.key"),
        "KAFKA_CERT_PASS": (dev_certs / "client.pass").read_text().strip(),
        "POSTGRESQL_CONNECTION": "postgresql://reporter@127.0.0.1:1/none",
        "ALERTING_CONFIG": str(alerting),
    }
    result = run_cli("checker_processing.cli", command, env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "ALERTING_CONFIG" in lines[0]
    assert "channels.oncall-mail.ca_file" in lines[0]
    assert str(ca_file) in lines[0]
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    # A PEM CA file is accepted.
    good = tmp_path / "good.toml"
    good.write_text(email_channel(dev_certs / "ca.pem"))
    if command == "check-config":
        accepted = run_cli(
            "checker_processing.cli", command, env={**env, "ALERTING_CONFIG": str(good)}
        )
        assert "ok   alerting: " in accepted.stdout, accepted.stdout + accepted.stderr
