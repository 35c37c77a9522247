"""The README is the truth for set-up: it names every setting and the two commands."""

from __future__ import annotations

from pathlib import Path

from checker_common.settings import field_env_names
from checker_processing.settings import ProcessorSettings
from periodic_checker.settings import CheckerSettings

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_readme_settings_table_names_every_variable() -> None:
    names = set(field_env_names(CheckerSettings)) | set(field_env_names(ProcessorSettings))
    missing = sorted(name for name in names if f"| `{name}` |" not in README)
    assert missing == []


def test_readme_test_command_is_what_ci_runs() -> None:
    assert "scripts/test.sh" in README
    assert "scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
    assert "scripts/stack.sh up" in README
