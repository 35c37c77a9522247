"""`periodic-checker`: run the daemon, check the configuration, probe one URL, manage tasks."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from checker_common import __version__, checks
from checker_common.cli import (
    EXIT_EPILOG,
    Check,
    CheckFn,
    env_file_parent,
    run_checks,
    settings_or_exit,
)
from periodic_checker.probe_cli import add_probe_parser, run_probe
from periodic_checker.settings import CheckerMode, CheckerSettings
from periodic_checker.tasks_cli import add_tasks_parser, run_tasks

PROG = "periodic-checker"


def build_parser() -> argparse.ArgumentParser:
    common = env_file_parent()
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Runs website checks and publishes results to Kafka.",
        parents=[common],
        epilog=EXIT_EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("run", parents=[common], help="run the checker daemon")
    sub.add_parser(
        "check-config",
        parents=[common],
        help="validate settings and try the broker and the task storage",
        epilog=EXIT_EPILOG,
    )
    add_probe_parser(sub, parents=[common])
    add_tasks_parser(sub, [common])
    return parser


def check_config(settings: CheckerSettings) -> int:
    steps: list[CheckFn] = [
        lambda: Check("settings", True, "valid"),
        lambda: checks.broker_tls(settings),
        lambda: checks.kafka_topics(settings, checker_topics(settings)),
        lambda: storage_writable(settings.task_storage),
    ]
    return run_checks(steps, settings.secrets(), print)


def checker_topics(settings: CheckerSettings) -> list[str]:
    """The topics the checker needs: results and tasks, and the name claims in cluster mode."""
    topics = [settings.kafka_topic, settings.kafka_tasks_topic]
    if settings.checker_mode is CheckerMode.CLUSTER:
        topics.append(settings.kafka_task_names_topic)
    return topics


def storage_writable(path: Path) -> Check:
    """The read-only problem `run` stops on, else a write transaction on the file."""
    from periodic_checker.store import read_only_problem  # not needed by `probe` and `tasks`

    problem = read_only_problem(path)
    if problem is not None:
        return Check(f"task storage {path}", False, f"not writable: {problem}")
    return checks.sqlite_writable(path)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Each command reads only the settings it uses: a probe none (its options say everything),
    # `tasks` the API's address and token (ApiSettings), `run` and `check-config` all of them.
    if args.command == "probe":
        return run_probe(args)
    if args.command == "tasks":
        return run_tasks(args)
    settings = settings_or_exit(PROG, CheckerSettings, args)
    if args.command == "check-config":
        return check_config(settings)
    from periodic_checker.daemon import run

    return run(settings)


if __name__ == "__main__":
    sys.exit(main())
