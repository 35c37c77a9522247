"""`checker-processing`: run the consumer, check the configuration, migrate, report."""

from __future__ import annotations

import argparse
import sys

from checker_common import dependency_checks
from checker_common.cli import (
    EXIT_CHECK_FAILED,
    EXIT_EPILOG,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    Check,
    CommandLine,
    fail,
)
from checker_common.errors import first_line
from checker_processing.settings import AlertingSettings, DatabaseSettings, ProcessorSettings

PROG = "checker-processing"


def command_line() -> CommandLine:
    # `migrate` and `report` read only the database's settings: they run where the Kafka
    # files are not (a laptop with a read-only database user, a cron job).
    line = CommandLine(PROG, "Stores check results from Kafka in PostgreSQL, exactly once.")
    line.add_daemon(
        ProcessorSettings,
        run_daemon,
        check_config,
        runs="processor daemon",
        tries="the broker and the database",
    )
    line.add(
        "migrate",
        lambda args: migrate_command(line.settings(DatabaseSettings, args)),
        help="apply database migrations (idempotent; reads only POSTGRESQL_CONNECTION)",
    )
    report = line.add(
        "report",
        lambda args: report_command(line, args),
        help="print availability per task over a recent window (reads only POSTGRESQL_CONNECTION)",
    )
    # Validated by hand (not `choices=`), so a bad value is one line and exit 2.
    report.add_argument("--since", default="30d", help="window: 30d, 24h, 90m, 2w (default 30d)")
    report.add_argument(
        "--task", default=None, metavar="ID|NAME", help="only this task: its id or exact name"
    )
    report.add_argument("--format", default="table", help="table, json or csv (default table)")
    alerts = line.add(
        "alerts",
        lambda args: alerts_command(line, args),
        help="alerting: send a test notification, list pending and failed notifications",
    )
    which = alerts.add_subparsers(dest="alerts_command", required=True, metavar="ACTION")
    test = which.add_parser(
        "test",
        parents=[line.common],
        epilog=EXIT_EPILOG,
        help="send a test notification to a channel (reads only ALERTING_CONFIG)",
    )
    test.add_argument("channel", help="a channel of the alerting file")
    listed = which.add_parser(
        "list",
        parents=[line.common],
        epilog=EXIT_EPILOG,
        help="list notifications (reads only POSTGRESQL_CONNECTION)",
    )
    listed.add_argument(
        "--state",
        default="pending,failed",
        help="pending, sent, summarised, failed, cancelled, comma separated"
        " (default pending,failed)",
    )
    listed.add_argument("--format", default="table", help="table or json (default table)")
    return line


def build_parser() -> argparse.ArgumentParser:
    return command_line().parser


def run_daemon(settings: ProcessorSettings) -> int:
    from checker_processing.daemon import run  # not needed by the other commands

    return run(settings)


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
    def storage() -> list[Check]:
        return [postgres_check(settings), alerting_check(settings)]

    return dependency_checks.check_config(settings, settings.subscribed_topics, storage)


def alerting_check(settings: ProcessorSettings) -> Check:
    """The alerting file was read and validated with the settings: say what it holds."""
    config = settings.alerting
    if config is None:
        return Check("alerting", True, "off (ALERTING_CONFIG is not set)")
    channels = ", ".join(f"{name} ({c.type})" for name, c in config.channels.items())
    return Check(
        "alerting",
        True,
        f"{settings.alerting_config}: channels {channels}; {len(config.rules)} rules",
    )


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


def report_command(line: CommandLine, args: argparse.Namespace) -> int:
    import psycopg2

    from checker_processing import db, report

    # Arguments first: a typo is reported even where no settings are present.
    try:
        since = report.parse_since(args.since)
        task = report.parse_task(args.task)
        fmt = report.parse_format(args.format)
    except report.ReportArgumentError as exc:
        line.fail(str(exc))
    settings = line.settings(DatabaseSettings, args)
    try:
        conn = db.connect(settings.postgresql_connection)
        try:
            report.require_schema(conn)
            rows = report.availability(conn, since, report.resolve_task(conn, task))
        finally:
            conn.close()
    except psycopg2.Error as exc:
        line.fail(f"report: {_first_line(exc, settings)}", code=EXIT_UNAVAILABLE)
    except (report.ReportArgumentError, report.SchemaMissingError) as exc:
        line.fail(str(exc))
    print(report.render(rows, fmt))
    return EXIT_OK


def alerts_command(line: CommandLine, args: argparse.Namespace) -> int:
    from checker_processing.alerting import commands

    if args.alerts_command == "test":
        settings = line.settings(AlertingSettings, args)
        if settings.alerting is None:
            line.fail("ALERTING_CONFIG: is required but not set")
        if args.channel not in settings.alerting.channels:
            known = ", ".join(settings.alerting.channels)
            line.fail(f"alerts test: {args.channel!r} is not a channel of the file ({known})")
        outcome = commands.send_test(settings.alerting, args.channel)
        text = f"test notification to {args.channel}: {commands.describe(outcome)}"
        from checker_common.redact import redact_text

        print(redact_text(text, settings.secrets()))
        return EXIT_OK if commands.delivered(outcome) else EXIT_CHECK_FAILED
    try:
        states = commands.parse_states(args.state)
    except ValueError as exc:
        line.fail(str(exc))
    if args.format not in ("table", "json"):
        line.fail(f"--format: {args.format!r} is not table or json")
    import psycopg2

    from checker_processing import db

    database = line.settings(DatabaseSettings, args)
    try:
        conn = db.connect(database.postgresql_connection)
        try:
            found = commands.listing(conn, states)
        finally:
            conn.close()
    except psycopg2.Error as exc:
        line.fail(f"alerts list: {_first_line(exc, database)}", code=EXIT_UNAVAILABLE)
    print(commands.render(found, args.format))
    return EXIT_OK


def _first_line(exc: BaseException, settings: DatabaseSettings) -> str:
    from checker_common.redact import redact_text

    return redact_text(first_line(exc), settings.secrets())


def main(argv: list[str] | None = None) -> int:
    return command_line().main(argv)


if __name__ == "__main__":
    sys.exit(main())
