"""`checker-processing`: run the consumer, check the configuration, migrate, report."""

from __future__ import annotations

import argparse
import sys

from checker_common import __version__, checks
from checker_common.cli import Check, CheckFn, env_file_parent, run_checks, settings_or_exit
from checker_processing.settings import ProcessorSettings

PROG = "checker-processing"


def build_parser() -> argparse.ArgumentParser:
    common = env_file_parent()
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Stores check results from Kafka in PostgreSQL, exactly once.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("run", parents=[common], help="run the processor daemon")
    sub.add_parser(
        "check-config",
        parents=[common],
        help="validate settings and try the broker and the database",
    )
    return parser


def postgres_check(settings: ProcessorSettings) -> Check:
    import psycopg2

    from checker_common.redact import redact_dsn

    where = redact_dsn(settings.postgresql_connection)
    try:
        with psycopg2.connect(settings.postgresql_connection, connect_timeout=5) as conn:
            with conn.cursor() as cur:
                cur.execute("SHOW server_version")
                row = cur.fetchone()
            conn.rollback()
        conn.close()
    except psycopg2.Error as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return Check("postgresql", False, f"{where}: {reason}")
    return Check("postgresql", True, f"{where}: connected (server {row[0] if row else '?'})")


def check_config(settings: ProcessorSettings) -> int:
    steps: list[CheckFn] = [
        lambda: Check("settings", True, "valid"),
        lambda: checks.broker_tls(settings),
        lambda: checks.kafka_topics(settings, settings.topics),
        lambda: postgres_check(settings),
    ]
    return run_checks(steps, settings.secrets(), print)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = settings_or_exit(PROG, ProcessorSettings, args)
    if args.command == "check-config":
        return check_config(settings)
    from checker_processing.daemon import run

    return run(settings)


if __name__ == "__main__":
    sys.exit(main())
