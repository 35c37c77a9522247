"""The README is the truth for set-up: it names every setting and the two commands."""

from __future__ import annotations

import argparse
import re
import shlex
from collections.abc import Callable
from pathlib import Path

import pytest

from checker_common.settings import field_env_names
from checker_processing import cli as processor_cli
from checker_processing.settings import ProcessorSettings
from periodic_checker import cli as checker_cli
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


PARSERS: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "periodic-checker": checker_cli.build_parser,
    "checker-processing": processor_cli.build_parser,
}


def readme_command_lines() -> list[str]:
    """Every line of the README's shell blocks that runs one of the two commands by name."""
    blocks = re.findall(r"```sh\n(.*?)```", README, re.DOTALL)
    return [
        line for block in blocks for line in block.splitlines() if line.split(" ")[0] in PARSERS
    ]


@pytest.mark.parametrize("line", readme_command_lines())
def test_each_readme_command_line_is_one_command_its_parser_takes(line: str) -> None:
    program, *argv = shlex.split(line, comments=True)
    PARSERS[program]().parse_args(argv)  # anything it does not take exits 2 and fails
