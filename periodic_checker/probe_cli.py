"""`periodic-checker probe URL [options]`: run one check now and print its result message.

No daemon, no broker, no settings: the options build a `TaskSpec` (validated like the API
does, so an error names the option) and the target policy (the daemon's defaults unless
--deny-networks / --allow-networks say otherwise). The output is the message value the
daemon would publish, as one line of JSON. The exit status follows the rule of both command
lines (`checker_common.cli`): 0 when the check passed, 1 when it failed, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import logging
import sys
import uuid
from collections.abc import Sequence
from typing import Any

import uvloop
from pydantic import ValidationError

from checker_common.cli import EXIT_CHECK_FAILED, EXIT_EPILOG, EXIT_OK, fail
from checker_common.contract import CheckResult, encode
from checker_common.task_spec import TaskSpec
from periodic_checker.policy import TargetPolicy
from periodic_checker.probe import Prober
from periodic_checker.settings import CheckerSettings

PROG = "periodic-checker probe"
DESCRIPTION = (
    "Check one URL now and print the result message as JSON (no daemon, broker or settings)."
)
# TaskSpec field -> the option that sets it, for error messages.
OPTIONS = {
    "url": "URL",
    "headers": "--header",
    "verify_tls": "--insecure",
    "follow_redirects": "--no-follow-redirects",
}


def _default(field: str) -> str:
    value = CheckerSettings.model_fields[field].default
    return str(value)


def add_probe_arguments(parser: argparse.ArgumentParser) -> None:
    """The probe's options; values stay strings so TaskSpec validates them and names them."""
    parser.add_argument("url", metavar="URL", help="http:// or https:// URL to check")
    parser.add_argument("--name", default="probe", help="task name in the result")
    parser.add_argument("--method", default="GET", help="GET, HEAD, POST, PUT, PATCH or DELETE")
    parser.add_argument("--pattern", help="RE2 regular expression searched in the body")
    parser.add_argument(
        "--pattern-fails-when",
        default="absent",
        metavar="absent|present",
        help="absent (default): the check fails without a match; present: fails with one",
    )
    parser.add_argument(
        "--timeout", default="10", metavar="SECONDS", help="seconds for the whole check"
    )
    parser.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="'NAME: VALUE'",
        help="request header, repeatable",
    )
    parser.add_argument("--body", help="request body (for POST, PUT, PATCH)")
    parser.add_argument(
        "--accepted-statuses", default="200-399", metavar="RANGES", help="e.g. 200-399,418"
    )
    parser.add_argument(
        "--no-follow-redirects", action="store_true", help="report a 3xx instead of following"
    )
    parser.add_argument(
        "--max-redirects", default="10", metavar="N", help="most redirects followed"
    )
    parser.add_argument("--insecure", action="store_true", help="do not verify TLS certificates")
    parser.add_argument(
        "--max-body-bytes",
        default="1048576",
        metavar="N",
        help="most body bytes read and searched; a longer body is cut there",
    )
    parser.add_argument(
        "--fail-if-body-larger",
        action="store_true",
        help="fail (body_too_large) when the body is longer than --max-body-bytes",
    )
    parser.add_argument(
        "--task-id", metavar="UUID", help="task id for the message key (default: a new one)"
    )
    parser.add_argument(
        "--deny-networks",
        metavar="CIDRS",
        default=_default("target_deny_networks"),
        help="networks the check may not reach (default: %(default)s)",
    )
    parser.add_argument(
        "--allow-networks",
        metavar="CIDRS",
        default=_default("target_allow_networks"),
        help="networks allowed inside denied ones",
    )


def add_probe_parser(
    subparsers: Any, parents: Sequence[argparse.ArgumentParser] = ()
) -> argparse.ArgumentParser:
    """Register `probe` on a sub-parsers object (`parser.add_subparsers()`)."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "probe",
        parents=list(parents),
        help="check one URL now and print the result message (no daemon, no settings)",
        description=DESCRIPTION,
        epilog=EXIT_EPILOG,
    )
    add_probe_arguments(parser)
    return parser


def build_spec(args: argparse.Namespace) -> TaskSpec:
    """The TaskSpec the options describe; exits 2 naming the option when one is invalid."""
    headers: dict[str, str] = {}
    for header in args.header:
        name, colon, value = header.partition(":")
        if not colon or not name.strip():
            fail(PROG, f"--header: expected 'Name: value', got {header[:60]!r}")
        headers[name.strip()] = value.strip()
    fields: dict[str, Any] = {
        "name": args.name,
        "url": args.url,
        "method": args.method.upper(),
        "headers": headers,
        "body": args.body,
        "interval": None,  # runs once: the timeout need not be below an interval
        "timeout": args.timeout,
        "pattern": args.pattern,
        "pattern_fails_when": args.pattern_fails_when,
        "accepted_statuses": args.accepted_statuses,
        "follow_redirects": not args.no_follow_redirects,
        "max_redirects": args.max_redirects,
        "verify_tls": not args.insecure,
        "max_body_bytes": args.max_body_bytes,
        "fail_if_body_larger": args.fail_if_body_larger,
    }
    try:
        # Options are text: read numbers from it here (the API is strict, a command line cannot be).
        return TaskSpec.model_validate(fields, strict=False)
    except ValidationError as exc:
        fail(PROG, describe(exc))


def describe(exc: ValidationError) -> str:
    """One line: the option, then what is wrong with its value."""
    first = exc.errors(include_url=False, include_input=False)[0]
    loc = first.get("loc") or ("",)
    field = str(loc[0])
    option = OPTIONS.get(field, "--" + field.replace("_", "-"))
    message = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    return f"{option}: {message}"


def build_policy(args: argparse.Namespace) -> TargetPolicy:
    for option, value in (
        ("--deny-networks", args.deny_networks),
        ("--allow-networks", args.allow_networks),
    ):
        try:
            TargetPolicy.from_strings(value)
        except ValueError as exc:
            fail(PROG, f"{option}: not a list of networks: {exc}")
    return TargetPolicy.from_strings(args.deny_networks, args.allow_networks)


def task_id(args: argparse.Namespace) -> uuid.UUID:
    if args.task_id is None:
        return uuid.uuid4()
    try:
        return uuid.UUID(args.task_id)
    except ValueError:
        fail(PROG, f"--task-id: not a UUID: {args.task_id[:60]!r}")


async def probe_once(spec: TaskSpec, policy: TargetPolicy, task: uuid.UUID) -> CheckResult:
    async with Prober(policy=policy) as prober:
        return await prober.check(task, spec)


def run_probe(args: argparse.Namespace) -> int:
    """Run the `probe` command from parsed arguments; returns the exit status."""
    spec = build_spec(args)
    policy = build_policy(args)
    task = task_id(args)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    result = uvloop.run(probe_once(spec, policy, task))
    _, value = encode(task, result)
    sys.stdout.write(value.decode() + "\n")
    return EXIT_OK if result.ok else EXIT_CHECK_FAILED


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION, epilog=EXIT_EPILOG)
    add_probe_arguments(parser)
    return run_probe(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
