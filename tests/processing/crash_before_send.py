"""`checker-processing run` killed between the commit and the send: the incident is committed
by the writer, its notification expanded into the outbox and committed, claimed by the sender's
round; as the sender is about to hand it to a channel, before a byte goes to the receiver, the
process SIGKILLs itself. The test puts the fault there by wrapping the production `send`; the
processor itself has no such hook.

    python crash_before_send.py run     # SIGKILLs itself at the first notification it sends
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from checker_processing import cli
from checker_processing.alerting import sender
from checker_processing.alerting.delivery import Outcome

SAYS = "crash_before_send: killed before sending notification"


def crash_before_send() -> None:
    """Make the sender's first `send` end the process with SIGKILL instead of sending."""

    async def die(*args: Any) -> Outcome:
        notification = args[3]
        print(f"{SAYS} {notification.notification_id}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("SIGKILL returned")

    sender.send = die


if __name__ == "__main__":
    crash_before_send()
    sys.exit(cli.main(sys.argv[1:]))
