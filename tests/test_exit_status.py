"""Both command lines state the one exit-status rule in every command's --help."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import pytest

from checker_common import __version__
from checker_common.cli import EXIT_EPILOG
from checker_processing import cli as processing_cli
from periodic_checker import cli as checker_cli

COMMANDS: list[tuple[Callable[[], argparse.ArgumentParser], list[str]]] = [
    (checker_cli.build_parser, []),
    (checker_cli.build_parser, ["run"]),
    (checker_cli.build_parser, ["check-config"]),
    (checker_cli.build_parser, ["probe"]),
    (checker_cli.build_parser, ["tasks"]),
    (checker_cli.build_parser, ["tasks", "run"]),
    (checker_cli.build_parser, ["tasks", "show"]),
    (checker_cli.build_parser, ["tasks", "add"]),
    (checker_cli.build_parser, ["tasks", "list"]),
    (checker_cli.build_parser, ["tasks", "edit"]),
    (processing_cli.build_parser, []),
    (processing_cli.build_parser, ["run"]),
    (processing_cli.build_parser, ["check-config"]),
    (processing_cli.build_parser, ["migrate"]),
    (processing_cli.build_parser, ["report"]),
    (processing_cli.build_parser, ["alerts", "test"]),
    (processing_cli.build_parser, ["alerts", "list"]),
]


@pytest.mark.parametrize(("parser", "argv"), COMMANDS)
def test_help_states_the_exit_statuses(
    parser: Callable[[], argparse.ArgumentParser],
    argv: list[str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        parser().parse_args([*argv, "--help"])
    assert exited.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert EXIT_EPILOG in help_text


@pytest.mark.parametrize(
    ("parser", "prog"),
    [
        (checker_cli.build_parser, "periodic-checker"),
        (processing_cli.build_parser, "checker-processing"),
    ],
)
def test_both_command_lines_say_their_version(
    parser: Callable[[], argparse.ArgumentParser], prog: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        parser().parse_args(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"{prog} {__version__}\n"
