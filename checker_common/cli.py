"""What both command lines share: the exit statuses, --env-file, settings errors as one line
and exit 2, and the one-line-per-check output of `check-config`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NoReturn, TypeVar

from checker_common.redact import redact_text
from checker_common.settings import CommonSettings, SettingsError, load_settings

# Every command of both command lines exits with one of these (README, "Exit status"). A script
# can tell "the site is down" (1) from "fix the command" (2) and "ask again later" (3).
EXIT_OK = 0
EXIT_CHECK_FAILED = 1  # a check ran and failed: probe, tasks run, check-config
EXIT_USAGE = 2  # bad arguments or settings, or a request the checker's API refuses (4xx)
EXIT_UNAVAILABLE = 3  # the checker's API or the database could not be reached, or failed
EXIT_EPILOG = (
    "exit status: 0 success (probe, tasks run, check-config: the checks passed); 1 a check"
    " failed; 2 bad arguments or settings, or a request the API refused; 3 the API or the"
    " database could not be reached, or failed"
)

S = TypeVar("S", bound=CommonSettings)


def env_file_parent() -> argparse.ArgumentParser:
    """A parent parser so `--env-file` works before or after the sub-command."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--env-file",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help="dotenv file to read (default: .env.prod in the working directory, if present)",
    )
    return parent


def fail(prog: str, message: str, code: int = EXIT_USAGE) -> NoReturn:
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def settings_or_exit(prog: str, cls: type[S], args: argparse.Namespace) -> S:
    """Load settings; on any problem print one line naming the variable and exit 2."""
    try:
        return load_settings(cls, getattr(args, "env_file", None))
    except SettingsError as exc:
        fail(prog, str(exc))


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


CheckFn = Callable[[], Check | list[Check]]


def run_checks(
    checks: Iterable[CheckFn], secrets: Iterable[str], out: Callable[[str], None]
) -> int:
    """Run each dependency check, print one line per result, return the exit status."""
    secrets = list(secrets)
    failed = 0
    for check in checks:
        try:
            outcome = check()
        except Exception as exc:  # a check that crashes is a failed check, said in one line
            name = getattr(check, "__name__", "check").removeprefix("check_")
            outcome = Check(name, False, f"{type(exc).__name__}: {exc}")
        for result in outcome if isinstance(outcome, list) else [outcome]:
            failed += not result.ok
            status = "ok  " if result.ok else "FAIL"
            line = f"{status} {result.name}: {result.detail}".replace("\n", " ")
            out(redact_text(line, secrets))
    return EXIT_CHECK_FAILED if failed else EXIT_OK
