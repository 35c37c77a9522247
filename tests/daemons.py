"""Either daemon as a real process, the one harness every test that starts one uses:
`python -m <cli> run` (or a test entry script) with only the given settings, its output in
files, stopped with SIGTERM (exit code returned) or SIGKILL.

    processor = Daemon.processor(env, tmp_path / "processor.log")   # waits for partitions
    ...
    assert processor.terminate() == 0
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from helpers import _is_setting, wait_for

CHECKER = "periodic_checker.cli"
PROCESSOR = "checker_processing.cli"
# How long a daemon may take to say it started (a loaded machine, a broker still warming up).
START_DEADLINE_S = 120.0


class Daemon:
    """One daemon as a process with only the given settings: nothing of the test runner's own
    settings or service manager reaches it. Its output goes to `log`; its stderr (the log
    lines) to `stderr` when given, else to `log` too. `program` is a module run with `-m`, or
    the path of a test entry script (given `args` before the command)."""

    def __init__(
        self,
        program: str | Path,
        env: dict[str, str],
        log: Path,
        *,
        stderr: Path | None = None,
        args: Sequence[str] = (),
    ) -> None:
        base = {k: v for k, v in os.environ.items() if not _is_setting(k)}
        self.program = str(program)
        self.env = env
        self.log = self.stdout = log
        self.stderr = stderr or log
        command = [str(program), *args] if isinstance(program, Path) else ["-m", program]
        with contextlib.ExitStack() as files:
            out = files.enter_context(log.open("ab"))
            err = files.enter_context(stderr.open("ab")) if stderr else subprocess.STDOUT
            self.proc = subprocess.Popen(
                [sys.executable, *command, "run"],
                env={**base, **env},
                cwd=log.parent,
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
            )

    @classmethod
    def checker(cls, env: dict[str, str], log: Path) -> Daemon:
        """Start a checker and wait until it says it started."""
        return cls(CHECKER, env, log)._started("started: ")

    @classmethod
    def processor(cls, env: dict[str, str], log: Path, *, assigned: bool = True) -> Daemon:
        """Start a processor; with `assigned`, wait until it holds partitions."""
        daemon = cls(PROCESSOR, env, log)
        return daemon._started(": assigned ") if assigned else daemon

    def _started(self, text: str) -> Daemon:
        """Wait for `text` in the log; a daemon that never says it is killed, not left behind
        (nobody else holds it yet)."""
        try:
            self.wait_for_text(text)
        except BaseException:
            self.kill()
            raise
        return self

    def text(self) -> str:
        """What it logged so far."""
        return self.stderr.read_text(errors="replace")

    def tail(self, chars: int = 3000) -> str:
        return self.text()[-chars:]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def running(self) -> bool:
        """True while it runs; fails with its last words once it exited (for polling)."""
        assert self.alive(), f"{self.program} exited {self.proc.returncode}:\n{self.tail()}"
        return True

    def wait_for_text(self, text: str, timeout: float = START_DEADLINE_S) -> None:
        def seen() -> bool:
            return text in self.text() or not self.running()

        wait_for(seen, f"{text!r} in {self.stderr.name}", timeout)

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM, then the exit code (fails when it takes longer than `timeout`)."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.program} still running {timeout:.0f} s after SIGTERM:\n{self.tail()}"
            ) from None

    def kill(self) -> None:
        """SIGKILL unless it already exited; then reap it."""
        if self.alive():
            self.proc.kill()
        self.proc.wait(timeout=30)

    @property
    def api(self) -> str:
        """A checker's API address, from its settings."""
        return f"http://{self.env.get('API_HOST', '127.0.0.1')}:{self.env['API_PORT']}"

    # -- what a processor says ------------------------------------------------------------

    def assigned(self) -> set[int] | None:
        """Partitions of the processor's last assignment, None before the first."""
        found = re.findall(r": assigned (.*)$", self.text(), re.MULTILINE)
        if not found:
            return None
        if found[-1].startswith("nothing"):
            return set()
        return {int(part.rsplit("/", 1)[1]) for part in found[-1].split(", ")}

    def stored(self) -> int:
        """How many results the processor says it stored, from its last words."""
        match = re.search(r"stopped after \d+ batches: (\d+) stored", self.text())
        assert match, self.tail(2000)
        return int(match[1])
