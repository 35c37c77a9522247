"""`periodic-checker`: run the daemon, check the configuration, probe one URL, manage tasks."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from checker_common import dependency_checks
from checker_common.cli import Check, CommandLine
from periodic_checker.probe_cli import add_probe_parser, run_probe
from periodic_checker.settings import CheckerMode, CheckerSettings
from periodic_checker.tasks_cli import add_tasks_parser, run_tasks

PROG = "periodic-checker"


def command_line() -> CommandLine:
    # Each command reads only the settings it uses: a probe none (its options say everything),
    # `tasks` the API's address and token (ApiSettings), `run` and `check-config` all of them.
    line = CommandLine(PROG, "Runs website checks and publishes results to Kafka.")
    line.add_daemon(
        CheckerSettings,
        run_daemon,
        check_config,
        runs="checker daemon",
        tries="the broker and the task storage",
    )
    line.attach("probe", run_probe, add_probe_parser)
    line.attach("tasks", run_tasks, add_tasks_parser)
    return line


def build_parser() -> argparse.ArgumentParser:
    return command_line().parser


def run_daemon(settings: CheckerSettings) -> int:
    from periodic_checker.daemon import run  # not needed by the other commands

    return run(settings)


def check_config(settings: CheckerSettings) -> int:
    return dependency_checks.check_config(
        settings, checker_topics(settings), lambda: storage_writable(settings.task_storage)
    )


def checker_topics(settings: CheckerSettings) -> list[str]:
    """The topics the checker needs: results and tasks, and in cluster mode the name claims
    and the tasks' state."""
    topics = [settings.kafka_topic, settings.kafka_tasks_topic]
    if settings.checker_mode is CheckerMode.CLUSTER:
        topics += [settings.kafka_task_names_topic, settings.kafka_task_state_topic]
    return topics


def storage_writable(path: Path) -> Check:
    """The read-only problem `run` stops on, else a write transaction on the file."""
    from periodic_checker.store import read_only_problem  # not needed by `probe` and `tasks`

    problem = read_only_problem(path)
    if problem is not None:
        return Check(f"task storage {path}", False, f"not writable: {problem}")
    return dependency_checks.sqlite_writable(path)


def main(argv: list[str] | None = None) -> int:
    return command_line().main(argv)


if __name__ == "__main__":
    sys.exit(main())
