"""What both command lines share: --env-file, settings errors as one line and exit 2,
and the one-line-per-check output of `check-config`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NoReturn, TypeVar

from checker_common.redact import redact_text
from checker_common.settings import CommonSettings, SettingsError, load_settings

EXIT_SETTINGS = 2
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


def fail(prog: str, message: str, code: int = EXIT_SETTINGS) -> NoReturn:
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
    return 1 if failed else 0
