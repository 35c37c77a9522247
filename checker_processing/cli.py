"""`checker-processing`: run the consumer, check the configuration, migrate, report."""

from __future__ import annotations

import argparse
import sys
import uuid
from datetime import timedelta

from checker_common import __version__, dependency_checks
from checker_common.cli import (
    EXIT_EPILOG,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    Check,
    CheckFn,
    env_file_parent,
    fail,
    run_checks,
    settings_or_exit,
)
from checker_common.errors import first_line
from checker_processing.settings import DatabaseSettings, ProcessorSettings

PROG = "checker-processing"


def build_parser() -> argparse.ArgumentParser:
    common = env_file_parent()
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Stores check results from Kafka in PostgreSQL, exactly once.",
        parents=[common],
        epilog=EXIT_EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("run", parents=[common], help="run the processor daemon")
    sub.add_parser(
        "check-config",
        parents=[common],
        help="validate settings and try the broker and the database",
        epilog=EXIT_EPILOG,
    )
    sub.add_parser(
        "migrate",
        parents=[common],
        help="apply database migrations (idempotent; reads only POSTGRESQL_CONNECTION)",
        epilog=EXIT_EPILOG,
    )
    report = sub.add_parser(
        "report",
        parents=[common],
        help="print availability per task over a recent window (reads only POSTGRESQL_CONNECTION)",
        epilog=EXIT_EPILOG,
    )
    # Validated by hand (not `choices=`), so a bad value is one line and exit 2.
    report.add_argument("--since", default="30d", help="window: 30d, 24h, 90m, 2w (default 30d)")
    report.add_argument(
        "--task", default=None, metavar="ID|NAME", help="only this task: its id or exact name"
    )
    report.add_argument("--format", default="table", help="table, json or csv (default table)")
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
        return Check("postgresql", False, f"{where}: {first_line(exc)}")
    return Check("postgresql", True, f"{where}: connected (server {row[0] if row else '?'})")


def check_config(settings: ProcessorSettings) -> int:
    steps: list[CheckFn] = [
        lambda: Check("settings", True, "valid"),
        lambda: dependency_checks.broker_tls(settings),
        lambda: dependency_checks.kafka_topics(settings, settings.topics),
        lambda: postgres_check(settings),
    ]
    return run_checks(steps, settings.secrets(), print)


def migrate_command(settings: DatabaseSettings) -> int:
    import psycopg2

    from checker_processing import db, migrate

    try:
        conn = db.connect(settings.postgresql_connection)
        try:
            applied = migrate.apply(conn)
        finally:
            conn.close()
    except psycopg2.Error as exc:
        fail(PROG, f"migrate: {_first_line(exc, settings)}", code=EXIT_UNAVAILABLE)
    for migration in applied:
        print(f"applied {migration.version:04d}_{migration.name}")
    if not applied:
        print("schema is up to date")
    return EXIT_OK


def report_command(
    settings: DatabaseSettings, since: timedelta, task: uuid.UUID | str | None, fmt: str
) -> int:
    import psycopg2

    from checker_processing import db, report

    try:
        conn = db.connect(settings.postgresql_connection)
        try:
            rows = report.availability(conn, since, report.resolve_task(conn, task))
        finally:
            conn.close()
    except psycopg2.Error as exc:
        fail(PROG, f"report: {_first_line(exc, settings)}", code=EXIT_UNAVAILABLE)
    except report.ReportArgumentError as exc:
        fail(PROG, str(exc))
    print(report.render(rows, fmt))
    return EXIT_OK


def _first_line(exc: BaseException, settings: DatabaseSettings) -> str:
    from checker_common.redact import redact_text

    return redact_text(first_line(exc), settings.secrets())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "report":
        from checker_processing import report

        # Arguments first: a typo is reported even where no settings are present.
        try:
            since = report.parse_since(args.since)
            task = report.parse_task(args.task)
            fmt = report.parse_format(args.format)
        except report.ReportArgumentError as exc:
            fail(PROG, str(exc))
    # `migrate` and `report` read only the database's settings: they run where the Kafka
    # files are not (a laptop with a read-only database user, a cron job).
    if args.command == "migrate":
        return migrate_command(settings_or_exit(PROG, DatabaseSettings, args))
    if args.command == "report":
        return report_command(settings_or_exit(PROG, DatabaseSettings, args), since, task, fmt)
    settings = settings_or_exit(PROG, ProcessorSettings, args)
    if args.command == "check-config":
        return check_config(settings)
    from checker_processing.daemon import run

    return run(settings)


if __name__ == "__main__":
    sys.exit(main())
