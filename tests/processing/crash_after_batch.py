"""`checker-processing run` killed at the worst moment: right after the database commit of
batch N, before that batch's offsets are committed. The test puts the fault there by wrapping
the production Writer; the processor itself has no such hook.

    python crash_after_batch.py N run     # SIGKILLs itself once batch N is in PostgreSQL
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Sequence

from checker_processing import cli
from checker_processing.writer import Outcome, Prepared, Record, Writer

SAYS = "crash_after_batch: killed after the database commit of batch"


def crash_after(batch: int) -> None:
    """Make the `batch`-th successful Writer.write (it returns once its transaction is
    committed) end the process with SIGKILL before returning to the loop."""
    write = Writer.write
    written = 0

    def write_then_die(
        self: Writer, records: Sequence[Record], prepared: Prepared | None = None
    ) -> Outcome:
        nonlocal written
        outcome = write(self, records, prepared)
        written += 1
        if written == batch:
            print(f"{SAYS} {batch}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return outcome

    Writer.write = write_then_die  # type: ignore[method-assign]


if __name__ == "__main__":
    crash_after(int(sys.argv[1]))
    sys.exit(cli.main(sys.argv[2:]))
