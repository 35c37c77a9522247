"""What both command lines share: the parser (sub-commands, --env-file before or after them,
--version, the exit statuses in every --help), the dispatch to each command's handler, the exit
statuses, settings errors as one line and exit 2, and the one-line-per-check output of
`check-config`."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import NoReturn, TypeVar

from checker_common import __version__
from checker_common.redact import redact_text
from checker_common.settings import CommonSettings, SettingsError, load_settings

# Every command of both command lines exits with one of these (README, "Exit status"). A script
# can tell "the site is down" (1) from "fix the command" (2) and "ask again later" (3).
EXIT_OK = 0
EXIT_CHECK_FAILED = 1  # a check ran and failed: probe, tasks run, check-config
EXIT_USAGE = 2  # bad arguments or settings, or a request the checker's API refuses (4xx)
EXIT_UNAVAILABLE = 3  # the checker's API or the database could not be reached, or failed
# The reader of the output went away (`| head -1`): 128 + SIGPIPE, what a shell reports for
# `cat` or `grep` in its place; the command stops quietly.
EXIT_READER_GONE = 141
EXIT_EPILOG = (
    "exit status: 0 success (probe, tasks run, check-config: the checks passed); 1 a check"
    " failed; 2 bad arguments or settings, or a request the API refused; 3 the API or the"
    " database could not be reached, or failed"
)

S = TypeVar("S", bound=CommonSettings)
Handler = Callable[[argparse.Namespace], int]
# What add_subparsers() returns (argparse has no public name for it).
SubParsers = argparse._SubParsersAction


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


class CommandLine:
    """One program's command line: its sub-commands, each with --env-file (before or after it)
    and the exit statuses in its --help, --version, and a handler per sub-command that returns
    the exit status. The daemon's `run` and `check-config` read all of its settings."""

    def __init__(self, prog: str, description: str) -> None:
        self.prog = prog
        self.common = env_file_parent()
        self.parser = argparse.ArgumentParser(
            prog=prog, description=description, parents=[self.common], epilog=EXIT_EPILOG
        )
        self.parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
        self.commands: SubParsers[argparse.ArgumentParser] = self.parser.add_subparsers(
            dest="command", required=True, metavar="COMMAND"
        )
        self.handlers: dict[str, Handler] = {}

    def add(self, name: str, handler: Handler, help: str) -> argparse.ArgumentParser:
        """A sub-command; its parser, for its own arguments."""
        self.handlers[name] = handler
        return self.commands.add_parser(name, parents=[self.common], help=help, epilog=EXIT_EPILOG)

    def attach(
        self,
        name: str,
        handler: Handler,
        add_parser: Callable[
            [SubParsers[argparse.ArgumentParser], Sequence[argparse.ArgumentParser]],
            argparse.ArgumentParser,
        ],
    ) -> None:
        """A sub-command whose parser a module of its own builds (given the sub-parsers and
        the parents that carry --env-file)."""
        self.handlers[name] = handler
        add_parser(self.commands, [self.common])

    def add_daemon(
        self,
        settings: type[S],
        run: Callable[[S], int],
        check_config: Callable[[S], int],
        *,
        runs: str,
        tries: str,
    ) -> None:
        """`run` (the daemon) and `check-config` (validate settings, try `tries`), both with
        every setting of `settings`."""
        self.add("run", lambda args: run(self.settings(settings, args)), help=f"run the {runs}")
        self.add(
            "check-config",
            lambda args: check_config(self.settings(settings, args)),
            help=f"validate settings and try {tries}",
        )

    def settings(self, cls: type[S], args: argparse.Namespace) -> S:
        """The settings `cls` reads (from --env-file if given); else one line and exit 2."""
        return settings_or_exit(self.prog, cls, args)

    def fail(self, message: str, code: int = EXIT_USAGE) -> NoReturn:
        fail(self.prog, message, code)

    def main(self, argv: list[str] | None = None) -> int:
        """Parse `argv` (the process's arguments by default) and run the command's handler.

        A reader that stops reading (`| head -1`) ends the command quietly, status 141."""
        try:
            try:
                args = self.parser.parse_args(argv)
                return self.handlers[args.command](args)
            finally:
                # A closed pipe shows here at the latest, not in Python's flush at exit.
                sys.stdout.flush()
        except BrokenPipeError:
            return reader_gone()


def reader_gone() -> int:
    """Stdout's reader went away: point stdout at /dev/null, so that Python's own flush at
    exit writes what is still buffered there instead of printing a second error."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        finally:
            os.close(devnull)
    except (OSError, ValueError):  # stdout is not a file (a test's capture): nothing to quiet
        pass
    return EXIT_READER_GONE


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
