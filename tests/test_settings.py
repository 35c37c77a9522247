"""Settings: bad input stops a daemon at start with one line naming the variable, exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from checker_common.settings import CommonSettings, field_env_names
from checker_processing.settings import ProcessorSettings
from periodic_checker.settings import CheckerSettings

from helpers import copy_of_the_repository, run_cli, run_the_settings_cases

CHECKER = "periodic_checker.cli"
PROCESSOR = "checker_processing.cli"


@pytest.fixture
def good_env(dev_certs: Path, tmp_path: Path) -> dict[str, str]:
    return {
        "KAFKA_CONNECTION": "localhost:9093",
        "KAFKA_CA_PATH": str(dev_certs / "ca.pem"),
        "KAFKA_CERT_PATH": str(dev_certs / "client.pem"),
        "KAFKA_KEY_FILE": str(dev_certs / "client.key"),
        "KAFKA_CERT_PASS": (dev_certs / "client.pass").read_text().strip(),
        "TASK_STORAGE": str(tmp_path / "tasks.sqlite3"),
        "POSTGRESQL_CONNECTION": "postgresql://reporter:hunter2-db-secret@127.0.0.1:1/none",
    }


# One row per variable: (daemon, variable, bad value, words the error must contain)
BAD_SETTINGS = [
    (CHECKER, "LOG_LEVEL", "LOUD", "LOG_LEVEL"),
    (CHECKER, "LOG_FORMAT", "xml", "LOG_FORMAT"),
    (CHECKER, "KAFKA_CONNECTION", "", "KAFKA_CONNECTION"),
    (CHECKER, "KAFKA_CONNECTION", "localhost", "KAFKA_CONNECTION"),
    (CHECKER, "KAFKA_CONNECTION", "localhost:99999", "KAFKA_CONNECTION"),
    (CHECKER, "KAFKA_CA_PATH", "/nonexistent/ca.pem", "KAFKA_CA_PATH"),
    (CHECKER, "KAFKA_CERT_PATH", "/nonexistent/client.pem", "KAFKA_CERT_PATH"),
    (CHECKER, "KAFKA_KEY_FILE", "/nonexistent/client.key", "KAFKA_KEY_FILE"),
    (CHECKER, "KAFKA_CERT_PASS", "not-the-passphrase", "KAFKA_CERT_PASS"),
    (CHECKER, "KAFKA_SECURITY_PROTOCOL", "PLAINTEXT", "KAFKA_SECURITY_PROTOCOL"),
    (CHECKER, "TASK_STORAGE", "/nonexistent-dir/tasks.sqlite3", "TASK_STORAGE"),
    (CHECKER, "KAFKA_TOPIC", "bad topic!", "KAFKA_TOPIC"),
    (CHECKER, "API_HOST", "0.0.0.0", "API_TOKEN"),
    (CHECKER, "API_PORT", "http", "API_PORT"),
    (CHECKER, "API_PORT", "70000", "API_PORT"),
    (CHECKER, "API_TOKEN", "short", "API_TOKEN"),
    (CHECKER, "API_ALLOWED_HOSTS", "localhost:8080", "API_ALLOWED_HOSTS"),
    (CHECKER, "API_ALLOWED_HOSTS", "::1", "API_ALLOWED_HOSTS"),
    (CHECKER, "API_ALLOWED_HOSTS", " , ", "API_ALLOWED_HOSTS"),
    (CHECKER, "MAX_TASKS", "0", "MAX_TASKS"),
    (CHECKER, "MAX_IN_FLIGHT", "-1", "MAX_IN_FLIGHT"),
    (CHECKER, "PER_HOST_IN_FLIGHT", "many", "PER_HOST_IN_FLIGHT"),
    (CHECKER, "MAX_START_LAG", "0", "MAX_START_LAG"),
    (CHECKER, "MAX_START_LAG", "soon", "MAX_START_LAG"),
    (CHECKER, "KAFKA_MESSAGE_TIMEOUT_MS", "10", "KAFKA_MESSAGE_TIMEOUT_MS"),
    (CHECKER, "SHUTDOWN_TIMEOUT", "soon", "SHUTDOWN_TIMEOUT"),
    (CHECKER, "TARGET_DENY_NETWORKS", "10.0.0.0/33", "TARGET_DENY_NETWORKS"),
    (CHECKER, "TARGET_ALLOW_NETWORKS", "not-a-net", "TARGET_ALLOW_NETWORKS"),
    (CHECKER, "CHECKER_MODE", "both", "CHECKER_MODE"),
    (CHECKER, "CHECKER_NODE_ID", "node one", "CHECKER_NODE_ID"),
    (CHECKER, "KAFKA_TASKS_TOPIC", "tasks topic!", "KAFKA_TASKS_TOPIC"),
    (CHECKER, "KAFKA_TASKS_TOPIC", "checker-results", "KAFKA_TASKS_TOPIC"),
    (CHECKER, "KAFKA_TASK_NAMES_TOPIC", "..", "KAFKA_TASK_NAMES_TOPIC"),
    (CHECKER, "KAFKA_TASK_NAMES_TOPIC", "checker-tasks", "KAFKA_TASK_NAMES_TOPIC"),
    (CHECKER, "KAFKA_TASK_STATE_TOPIC", "state topic!", "KAFKA_TASK_STATE_TOPIC"),
    (CHECKER, "CHECKER_GROUP_ID", "", "CHECKER_GROUP_ID"),
    (CHECKER, "KAFKA_SESSION_TIMEOUT_MS", "500", "KAFKA_SESSION_TIMEOUT_MS"),
    (CHECKER, "CHECKER_STATE_SNAPSHOT_INTERVAL", "0", "CHECKER_STATE_SNAPSHOT_INTERVAL"),
    (CHECKER, "CHECKER_HANDOVER_CATCH_UP", "-1", "CHECKER_HANDOVER_CATCH_UP"),
    (PROCESSOR, "LOG_LEVEL", "verbose", "LOG_LEVEL"),
    (PROCESSOR, "KAFKA_CA_PATH", "/nonexistent/ca.pem", "KAFKA_CA_PATH"),
    (PROCESSOR, "KAFKA_CERT_PASS", "not-the-passphrase", "KAFKA_CERT_PASS"),
    (PROCESSOR, "KAFKA_TASKS_TOPIC", "", "KAFKA_TASKS_TOPIC"),
    (PROCESSOR, "POSTGRESQL_CONNECTION", "", "POSTGRESQL_CONNECTION"),
    (PROCESSOR, "POSTGRESQL_CONNECTION", "mysql://x@y/z", "POSTGRESQL_CONNECTION"),
    (PROCESSOR, "KAFKA_CONSUMER_GROUP", "", "KAFKA_CONSUMER_GROUP"),
    (PROCESSOR, "KAFKA_CONSUMER_TOPICS", " , ", "KAFKA_CONSUMER_TOPICS"),
    (PROCESSOR, "KAFKA_CONSUMER_TOPICS", "checker-results,checker-tasks", "KAFKA_TASKS_TOPIC"),
    (PROCESSOR, "KAFKA_SESSION_TIMEOUT_MS", "5", "KAFKA_SESSION_TIMEOUT_MS"),
    (PROCESSOR, "METRICS_HOST", "", "METRICS_HOST"),
    (PROCESSOR, "METRICS_PORT", "-3", "METRICS_PORT"),
    (PROCESSOR, "RESULTS_RETENTION_DAYS", "0", "RESULTS_RETENTION_DAYS"),
    (PROCESSOR, "BATCH_MAX_MESSAGES", "0", "BATCH_MAX_MESSAGES"),
    (PROCESSOR, "BATCH_MAX_MS", "x", "BATCH_MAX_MS"),
    (PROCESSOR, "MAX_MESSAGE_BYTES", "12", "MAX_MESSAGE_BYTES"),
    (PROCESSOR, "MAX_CLOCK_SKEW_SECONDS", "-1", "MAX_CLOCK_SKEW_SECONDS"),
    (PROCESSOR, "MAX_CLOCK_SKEW_SECONDS", "soon", "MAX_CLOCK_SKEW_SECONDS"),
]


@pytest.mark.parametrize(("daemon", "variable", "value", "named"), BAD_SETTINGS)
@pytest.mark.parametrize("command", ["run", "check-config"])
def test_bad_setting_stops_at_start_with_one_line(
    good_env: dict[str, str], daemon: str, variable: str, value: str, named: str, command: str
) -> None:
    env = {**good_env, variable: value}
    result = run_cli(daemon, command, env=env)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert named in lines[0]
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("daemon", [CHECKER, PROCESSOR])
@pytest.mark.parametrize("missing", ["KAFKA_CONNECTION", "KAFKA_CA_PATH", "KAFKA_KEY_FILE"])
def test_missing_required_setting_is_named(
    good_env: dict[str, str], daemon: str, missing: str
) -> None:
    env = {k: v for k, v in good_env.items() if k != missing}
    result = run_cli(daemon, "run", env=env)
    assert result.returncode == 2
    assert result.stderr.strip() == f"{daemon.split('.')[0].replace('_', '-')}: error: " + (
        f"{missing}: is required but not set"
    )


def test_encrypted_key_without_passphrase_is_named(good_env: dict[str, str]) -> None:
    env = {k: v for k, v in good_env.items() if k != "KAFKA_CERT_PASS"}
    result = run_cli(CHECKER, "run", env=env)
    assert result.returncode == 2
    assert "KAFKA_CERT_PASS" in result.stderr
    assert "encrypted" in result.stderr


def test_key_that_does_not_match_the_certificate_is_named(
    good_env: dict[str, str], dev_certs: Path
) -> None:
    env = {**good_env, "KAFKA_KEY_FILE": str(dev_certs / "rogue" / "client.key")}
    env.pop("KAFKA_CERT_PASS")
    result = run_cli(CHECKER, "run", env=env)
    assert result.returncode == 2
    assert "KAFKA_KEY_FILE" in result.stderr


def bad_client_certificate(case: str, dev_certs: Path, tmp_path: Path) -> Path:
    """A file given as KAFKA_CERT_PATH that is not the client's certificate."""
    if case == "empty":
        empty = tmp_path / "empty.pem"
        empty.write_text("")
        return empty
    if case == "not-pem":
        text = tmp_path / "hostname"
        text.write_text("checker-1\n")
        return text
    if case == "the-key":
        return dev_certs / "client.key"
    return dev_certs / "ca.pem"


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("empty", "not a PEM certificate"),
        ("not-pem", "not a PEM certificate"),
        ("the-key", "not a PEM certificate"),
        ("ca", "does not match the key"),
    ],
)
@pytest.mark.parametrize(("daemon", "command"), [(CHECKER, "run"), (PROCESSOR, "check-config")])
def test_bad_client_certificate_is_named_not_blamed_on_the_passphrase(
    good_env: dict[str, str],
    dev_certs: Path,
    tmp_path: Path,
    case: str,
    words: str,
    daemon: str,
    command: str,
) -> None:
    cert = bad_client_certificate(case, dev_certs, tmp_path)
    result = run_cli(daemon, command, env={**good_env, "KAFKA_CERT_PATH": str(cert)})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert ": error: KAFKA_CERT_PATH: " in lines[0]
    assert words in lines[0]
    assert "passphrase" not in lines[0]
    assert result.stdout == ""


def test_key_file_that_holds_no_key_is_named(good_env: dict[str, str], tmp_path: Path) -> None:
    garbage = tmp_path / "client.key"
    garbage.write_text("not a key\n")
    result = run_cli(CHECKER, "run", env={**good_env, "KAFKA_KEY_FILE": str(garbage)})
    assert result.returncode == 2
    assert ": error: KAFKA_KEY_FILE: not a PEM private key" in result.stderr
    assert "passphrase" not in result.stderr


def test_unreadable_certificate_is_named(good_env: dict[str, str], tmp_path: Path) -> None:
    garbage = tmp_path / "ca.pem"
    garbage.write_text("not a certificate\n")
    result = run_cli(CHECKER, "run", env={**good_env, "KAFKA_CA_PATH": str(garbage)})
    assert result.returncode == 2
    assert "KAFKA_CA_PATH" in result.stderr


@pytest.mark.parametrize("daemon", [CHECKER, PROCESSOR])
def test_secrets_never_appear_in_errors(good_env: dict[str, str], daemon: str) -> None:
    env = {**good_env, "API_TOKEN": "tok-" + "s3cr3t" * 4, "LOG_LEVEL": "LOUD"}
    result = run_cli(daemon, "run", env=env)
    assert result.returncode == 2
    output = result.stdout + result.stderr
    for secret in (good_env["KAFKA_CERT_PASS"], "s3cr3ts3cr3t", "hunter2-db-secret"):
        assert secret not in output


def test_environment_wins_over_env_file(good_env: dict[str, str], tmp_path: Path) -> None:
    env_file = tmp_path / "custom.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in good_env.items()) + "LOG_LEVEL=LOUD\n")
    from_file = run_cli(CHECKER, "--env-file", str(env_file), "run", env={})
    assert from_file.returncode == 2
    assert "LOG_LEVEL" in from_file.stderr  # the file was read
    overridden = run_cli(
        CHECKER,
        "check-config",
        "--env-file",
        str(env_file),
        env={"LOG_LEVEL": "DEBUG", "KAFKA_TOPIC": "bad topic!"},
    )
    assert overridden.returncode == 2
    assert "KAFKA_TOPIC" in overridden.stderr  # LOG_LEVEL from the environment won


def test_dot_env_prod_in_working_directory_is_read(
    good_env: dict[str, str], tmp_path: Path
) -> None:
    (tmp_path / ".env.prod").write_text(
        "".join(f"{k}={v}\n" for k, v in good_env.items()) + "API_PORT=nope\n"
    )
    result = run_cli(CHECKER, "run", env={}, cwd=tmp_path)
    assert result.returncode == 2
    assert "API_PORT" in result.stderr


@pytest.mark.timeout(900)  # runs the settings cases again in a clone: minutes when busy
def test_the_settings_cases_ignore_the_developers_own_settings(
    good_env: dict[str, str], tmp_path: Path
) -> None:
    """`scripts/stack.sh up` leaves a full `.env.prod` in the clone, and a developer may have
    settings exported: the cases above must pass all the same, so no daemon they start may
    read either (a 'missing' setting found there turns an exit 2 into a daemon that runs)."""
    clone = copy_of_the_repository(tmp_path / "clone")
    full = {**good_env, "KAFKA_TOPIC": "checker-results", "API_PORT": "8080"}
    text = "".join(f"{k}={v}\n" for k, v in full.items())
    (clone / ".env.prod").write_text(text)

    run_the_settings_cases(clone, tmp_path / "pytest", env=full)

    assert (clone / ".env.prod").read_text() == text  # it was there all along, untouched


def test_missing_env_file_is_an_error(tmp_path: Path) -> None:
    result = run_cli(PROCESSOR, "--env-file", str(tmp_path / "nope.env"), "run", env={})
    assert result.returncode == 2
    assert "--env-file" in result.stderr


def example_variables() -> dict[str, str]:
    example = Path(__file__).resolve().parent.parent / ".env.prod.example"
    found = {}
    for line in example.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            found[name] = value
    return found


def default_text(cls: type[CommonSettings], name: str) -> str:
    field = cls.model_fields[name.lower()]
    if field.is_required() or field.default is None:
        return ""
    default = field.default
    return str(getattr(default, "value", default))


def test_env_example_lists_every_setting_with_its_default() -> None:
    example = example_variables()
    expected: dict[str, str] = {}
    for cls in (CheckerSettings, ProcessorSettings):
        for name in field_env_names(cls):
            expected[name] = default_text(cls, name)
    assert example == expected


# `migrate` and `report` read only POSTGRESQL_CONNECTION: no Kafka or logging variable is
# needed, and a bad one is not even looked at. (command, POSTGRESQL_CONNECTION or None: unset)
DATABASE_COMMANDS = ["migrate", "report"]
BAD_DATABASE_SETTINGS = [
    (None, "is required but not set"),
    ("", "is empty"),
    ("mysql://x@y/z", "URL must start with postgresql://"),
    ("just words", "not a libpq URL or key=value DSN"),
]


@pytest.mark.parametrize(("value", "words"), BAD_DATABASE_SETTINGS)
@pytest.mark.parametrize("command", DATABASE_COMMANDS)
def test_database_commands_refuse_a_bad_postgresql_connection_with_one_line(
    command: str, value: str | None, words: str, tmp_path: Path
) -> None:
    env = {} if value is None else {"POSTGRESQL_CONNECTION": value}
    result = run_cli(PROCESSOR, command, env=env, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr == f"checker-processing: error: POSTGRESQL_CONNECTION: {words}\n"
    assert result.stdout == ""


@pytest.mark.parametrize(
    "others", [{}, {"KAFKA_CA_PATH": "/nonexistent/ca.pem", "LOG_LEVEL": "LOUD"}]
)
@pytest.mark.parametrize("command", DATABASE_COMMANDS)
def test_database_commands_need_no_kafka_settings(
    command: str, others: dict[str, str], tmp_path: Path
) -> None:
    dsn = "postgresql://reporter:hunter2-db-secret@127.0.0.1:1/none"
    result = run_cli(PROCESSOR, command, env={"POSTGRESQL_CONNECTION": dsn, **others}, cwd=tmp_path)
    # Past the settings, at the database, which does not answer there: exit 3, not 2.
    assert result.returncode == 3, result.stderr
    assert result.stderr.startswith(f"checker-processing: error: {command}: ")
    assert len(result.stderr.splitlines()) == 1
    assert "hunter2-db-secret" not in result.stderr


@pytest.mark.parametrize(
    ("api_host", "allowed", "expected"),
    [
        ("127.0.0.1", None, {"localhost", "127.0.0.1", "[::1]"}),
        ("0.0.0.0", None, {"localhost", "127.0.0.1", "[::1]"}),
        ("::", None, {"localhost", "127.0.0.1", "[::1]"}),
        ("10.0.0.5", None, {"localhost", "127.0.0.1", "[::1]", "10.0.0.5"}),
        ("::1", "checker.internal", {"checker.internal", "[::1]"}),
        ("127.0.0.1", "Checker.Internal., [0:0::1]", {"checker.internal", "[::1]", "127.0.0.1"}),
        ("10.0.0.5", "*", None),
    ],
)
def test_the_api_answers_to_loopback_names_and_its_own_address(
    good_env: dict[str, str], api_host: str, allowed: str | None, expected: set[str] | None
) -> None:
    extra = {"api_host": api_host, "api_token": "t" * 16}
    if allowed is not None:
        extra["api_allowed_hosts"] = allowed
    settings = CheckerSettings(**{k.lower(): v for k, v in good_env.items()}, **extra)

    found = settings.allowed_hosts()

    assert (set(found) if found is not None else None) == expected
