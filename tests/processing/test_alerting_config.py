"""The alerting file: a table of broken files and the one line each gives (file, line, field),
secrets never shown, and the daemon's start and `check-config` refusing a bad file (exit 2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from checker_processing.alerting.config import AlertingConfigError, parse

from helpers import run_cli

GOOD = """\
[delivery]
give_up_after_seconds = 3600

[channels.ops]
type = "webhook"
url = "https://hooks.example.net/checker"
secret = "whsec-0123456789"

[channels.chat]
type = "slack"
url = "https://hooks.slack.com/services/T0/B0/slack-token-secret"

[[rules]]
name = "prod"
channels = ["ops", "chat"]
tags = ["prod"]
after_seconds = 60
repeat_seconds = 3600

[[rules]]
name = "everything"
channels = ["ops"]
all = true
recovery = false
"""


def test_a_good_file_routes_tasks_by_tag_name_or_all() -> None:
    config = parse(GOOD)
    assert [(c, r.name) for c, r in config.routes("shop", ["prod", "eu"])] == [
        ("ops", "prod"),
        ("chat", "prod"),
    ]
    assert [(c, r.name) for c, r in config.routes("blog", [])] == [("ops", "everything")]
    assert config.delivery.give_up_after_seconds == 3600
    assert sorted(config.secrets()) == [
        "https://hooks.slack.com/services/T0/B0/slack-token-secret",
        "whsec-0123456789",
    ]
    assert "whsec" not in repr(config)
    assert "slack-token" not in repr(config)


# (case, the file, the line the error must end with after "f.toml: ")
BAD_FILES = [
    ("not TOML", GOOD.replace('type = "webhook"', "type = "), "line 5: not valid TOML:"),
    ("unknown key", GOOD.replace("secret =", "secrett ="), "line 7: channels.ops.secrett: Extra"),
    ("bad url", GOOD.replace("https://hooks.example", "ftp://hooks.example"),
     "line 6: channels.ops.url: scheme must be http or https"),
    ("unknown channel type", GOOD.replace('"slack"', '"sms"'), "line 9: channels.chat: Input tag"),
    ("negative after", GOOD.replace("after_seconds = 60", "after_seconds = -1"),
     "line 17: rules[0].after_seconds: Input should be greater than or equal to 0"),
    ("repeat too often", GOOD.replace("repeat_seconds = 3600", "repeat_seconds = 5"),
     "line 18: rules[0].repeat_seconds: Input should be greater than or equal to 60"),
    ("rule names an unknown channel", GOOD.replace('["ops"]', '["pager"]'),
     "line 22: rules[1].channels: 'pager' is not a channel of [channels]"),
    ("rule selects nothing", GOOD.replace("all = true", ""),
     "line 20: rules[1]: selects no task: give tags, tasks or all = true"),
    ("bad tag", GOOD.replace('tags = ["prod"]', 'tags = ["p rod"]'),
     "line 16: rules[0].tags[0]: String should match pattern"),
    ("text for a number", GOOD.replace("= 3600\n\n[channels", '= "1h"\n\n[channels'),
     "line 2: delivery.give_up_after_seconds: Input should be a valid number"),
    ("two rules of one name", GOOD.replace('"everything"', '"prod"'),
     "line 21: rules[1].name: 'prod' is used by another rule"),
    ("no rate", GOOD.replace('secret = "whsec-0123456789"\n', 'secret = "whsec-0123456789"\n'
                             'max_per_minute = 0\n'),
     "line 8: channels.ops.max_per_minute: Input should be greater than or equal to 1"),
    ("no channels", "[[rules]]\nname = 'a'\nchannels = ['x']\nall = true\n",
     "channels: is required"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "text", "expected"), BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_a_bad_file_is_one_line_naming_file_line_and_field(
    case: str, text: str, expected: str
) -> None:
    with pytest.raises(AlertingConfigError) as caught:
        parse(text, "f.toml")
    message = str(caught.value)
    assert message.startswith(f"f.toml: {expected}"), message
    assert "\n" not in message
    assert "whsec-0123456789" not in message
    assert "slack-token-secret" not in message


def _env(tmp_path: Path, text: str) -> dict[str, str]:
    path = tmp_path / "alerting.toml"
    path.write_text(text)
    return {
        "KAFKA_CONNECTION": "localhost:1",
        "POSTGRESQL_CONNECTION": "postgresql://x@127.0.0.1:1/none",
        "ALERTING_CONFIG": str(path),
    }


@pytest.mark.parametrize("command", ["run", "check-config"])
def test_the_processor_refuses_to_start_with_a_bad_file(
    command: str, tmp_path: Path, dev_certs: Path
) -> None:
    env = {
        **_env(tmp_path, GOOD.replace("after_seconds = 60", "after_seconds = -1")),
        "KAFKA_CA_PATH": str(dev_certs / "ca.pem"),
        "KAFKA_CERT_PATH": str(dev_certs / "client.pem"),
        "KAFKA_KEY_FILE": str(dev_certs / "client.key"),
        "KAFKA_CERT_PASS": (dev_certs / "client.pass").read_text().strip(),
    }
    result = run_cli("checker_processing.cli", command, env=env, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr == (
        f"checker-processing: error: ALERTING_CONFIG: {tmp_path / 'alerting.toml'}: line 17:"
        " rules[0].after_seconds: Input should be greater than or equal to 0\n"
    )
    assert "whsec" not in result.stdout + result.stderr


def test_check_config_says_what_the_file_holds_and_hides_its_secrets(
    tmp_path: Path, dev_certs: Path
) -> None:
    env = {
        **_env(tmp_path, GOOD),
        "KAFKA_CA_PATH": str(dev_certs / "ca.pem"),
        "KAFKA_CERT_PATH": str(dev_certs / "client.pem"),
        "KAFKA_KEY_FILE": str(dev_certs / "client.key"),
        "KAFKA_CERT_PASS": (dev_certs / "client.pass").read_text().strip(),
    }
    result = run_cli("checker_processing.cli", "check-config", env=env, cwd=tmp_path)
    assert result.returncode == 1  # no broker, no database there
    assert (
        f"ok   alerting: {tmp_path / 'alerting.toml'}: channels ops (webhook), chat (slack);"
        " 2 rules"
    ) in result.stdout
    assert "whsec" not in result.stdout
    assert "slack-token" not in result.stdout
