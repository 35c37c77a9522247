"""The systemd notify protocol (sd_notify) without a C dependency.

`READY=1` once a daemon really serves, `WATCHDOG=1` from its main loop (so a wedged loop is
restarted), `STOPPING=1` on SIGTERM, `STATUS=...` for `systemctl status`. Outside systemd
(no NOTIFY_SOCKET) every call is a cheap no-op.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self._address: str | bytes | None = None
        if address.startswith("@"):
            self._address = b"\0" + address[1:].encode()
        elif address.startswith("/"):
            self._address = address
        self._socket: socket.socket | None = None
        self.watchdog_interval = _watchdog_interval(env)
        self._last_ping = 0.0

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, *states: str) -> bool:
        if self._address is None:
            return False
        if self._socket is None:
            # Non-blocking: a reader that stops reading must never freeze the daemon's loop;
            # a datagram that does not fit is dropped (the next watchdog ping follows soon).
            self._socket = socket.socket(
                socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
            )
        try:
            self._socket.sendto("\n".join(states).encode(), self._address)
        except BlockingIOError:
            log.debug("systemd notify socket full; dropped %s", states)
            return False
        except OSError as exc:
            log.warning("cannot notify systemd: %s", exc)
            return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def stopping(self, status: str = "") -> bool:
        return self.notify("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def watchdog(self) -> bool:
        """Ping the watchdog, at most twice per interval; call it from the main loop."""
        if self.watchdog_interval is None:
            return False
        now = time.monotonic()
        if now - self._last_ping < self.watchdog_interval / 2:
            return False
        self._last_ping = now
        return self.notify("WATCHDOG=1")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    return int(usec) / 1_000_000
